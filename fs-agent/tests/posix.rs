//! POSIX behaviour of the FUSE mount, through real system calls on a real mount.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{pattern, TestFs, CHUNK_SIZE};

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn files_and_directories_behave_like_posix() {
    let mut fs = TestFs::start("posix", 3);
    let mnt = fs.mount();

    // Create, write, read back (spanning several chunks).
    let data = pattern(1, (CHUNK_SIZE * 2 + 12345) as usize);
    fs::write(mnt.join("big"), &data).unwrap();
    assert_eq!(fs::read(mnt.join("big")).unwrap(), data);
    assert_eq!(fs::metadata(mnt.join("big")).unwrap().len(), data.len() as u64);

    // Overwrite in the middle, across a chunk boundary.
    let mut f = OpenOptions::new().write(true).open(mnt.join("big")).unwrap();
    f.seek(SeekFrom::Start(CHUNK_SIZE - 10)).unwrap();
    f.write_all(b"01234567890123456789").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut expected = data.clone();
    expected[(CHUNK_SIZE - 10) as usize..(CHUNK_SIZE + 10) as usize].copy_from_slice(b"01234567890123456789");
    assert_eq!(fs::read(mnt.join("big")).unwrap(), expected);

    // ENOENT, EEXIST.
    assert_eq!(fs::read(mnt.join("missing")).unwrap_err().kind(), ErrorKind::NotFound);
    fs::create_dir(mnt.join("d")).unwrap();
    assert_eq!(errno(&fs::create_dir(mnt.join("d")).unwrap_err()), libc::EEXIST);
    let e = OpenOptions::new().write(true).create_new(true).open(mnt.join("big")).unwrap_err();
    assert_eq!(errno(&e), libc::EEXIST);

    // ENOTEMPTY, EISDIR, ENOTDIR.
    fs::write(mnt.join("d/inner"), b"x").unwrap();
    assert_eq!(errno(&fs::remove_dir(mnt.join("d")).unwrap_err()), libc::ENOTEMPTY);
    assert_eq!(errno(&OpenOptions::new().write(true).open(mnt.join("d")).unwrap_err()), libc::EISDIR);
    assert_eq!(errno(&fs::remove_file(mnt.join("d")).unwrap_err()), libc::EISDIR);
    assert_eq!(errno(&fs::remove_dir(mnt.join("big")).unwrap_err()), libc::ENOTDIR);

    // ENAMETOOLONG, and a 255-byte name works.
    let long = "n".repeat(256);
    assert_eq!(errno(&fs::write(mnt.join(&long), b"x").unwrap_err()), libc::ENAMETOOLONG);
    fs::write(mnt.join("n".repeat(255)), b"ok").unwrap();

    // Rename over an existing file, and across directories.
    fs::write(mnt.join("a"), b"new content").unwrap();
    fs::write(mnt.join("b"), b"old content").unwrap();
    fs::rename(mnt.join("a"), mnt.join("b")).unwrap();
    assert_eq!(fs::read(mnt.join("b")).unwrap(), b"new content");
    assert_eq!(fs::metadata(mnt.join("a")).unwrap_err().kind(), ErrorKind::NotFound);
    fs::rename(mnt.join("b"), mnt.join("d/b")).unwrap();
    assert_eq!(fs::read(mnt.join("d/b")).unwrap(), b"new content");
    fs::create_dir(mnt.join("e")).unwrap();
    fs::write(mnt.join("e/x"), b"x").unwrap();
    assert_eq!(errno(&fs::rename(mnt.join("d"), mnt.join("e")).unwrap_err()), libc::ENOTEMPTY);
    fs::remove_file(mnt.join("d/inner")).unwrap();
    fs::remove_file(mnt.join("d/b")).unwrap();
    fs::remove_dir(mnt.join("d")).unwrap();

    // Symlinks and hard links.
    std::os::unix::fs::symlink("e/x", mnt.join("sym")).unwrap();
    assert_eq!(fs::read_link(mnt.join("sym")).unwrap().to_str().unwrap(), "e/x");
    assert_eq!(fs::read(mnt.join("sym")).unwrap(), b"x");
    fs::hard_link(mnt.join("e/x"), mnt.join("hard")).unwrap();
    assert_eq!(fs::metadata(mnt.join("hard")).unwrap().nlink(), 2);
    fs::remove_file(mnt.join("e/x")).unwrap();
    assert_eq!(fs::read(mnt.join("hard")).unwrap(), b"x");
    assert_eq!(fs::metadata(mnt.join("hard")).unwrap().nlink(), 1);

    // chmod, chown, utimes, truncate.
    fs::set_permissions(mnt.join("hard"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(mnt.join("hard")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(mnt.join("hard"), Some(1234), Some(5678)).unwrap();
    let meta = fs::metadata(mnt.join("hard")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    fs::File::options().write(true).open(mnt.join("hard")).unwrap().set_modified(when).unwrap();
    assert_eq!(fs::metadata(mnt.join("hard")).unwrap().modified().unwrap(), when);
    let f = OpenOptions::new().write(true).open(mnt.join("big")).unwrap();
    f.set_len(100).unwrap();
    f.set_len(CHUNK_SIZE + 100).unwrap();
    drop(f);
    let back = fs::read(mnt.join("big")).unwrap();
    assert_eq!(back.len() as u64, CHUNK_SIZE + 100);
    assert_eq!(&back[..100], &expected[..100]);
    assert!(back[100..].iter().all(|b| *b == 0), "truncated bytes must read as zeros after extension");

    // Extended attributes (setfattr/getfattr are not installed: use the syscalls).
    let path = std::ffi::CString::new(mnt.join("hard").to_str().unwrap()).unwrap();
    let name = c"user.origin";
    // SAFETY: valid NUL-terminated path and name, a value buffer with its length.
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"template".as_ptr().cast(), 8, libc::XATTR_CREATE) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, libc::XATTR_CREATE) };
    assert_eq!((rc, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EEXIST)));
    let mut buf = [0u8; 64];
    // SAFETY: the buffer is valid for its length.
    let len = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..len as usize], b"template");
    // SAFETY: as above.
    let len = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..len as usize], b"user.origin\0");
    // SAFETY: valid path and name.
    assert_eq!(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }, 0);
    // SAFETY: as above.
    let len = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!((len, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENODATA)));

    // O_DIRECT: aligned writes and reads bypass the page cache.
    let mut aligned = vec![0u8; 8192];
    let offset = aligned.as_ptr().align_offset(4096);
    let buf = &mut aligned[offset..offset + 4096];
    buf.copy_from_slice(&pattern(3, 4096));
    let direct = OpenOptions::new().read(true).write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(mnt.join("direct")).unwrap();
    direct.write_all_at(buf, 4096).unwrap();
    buf.fill(0);
    direct.read_exact_at(buf, 4096).unwrap();
    assert_eq!(&buf[..], &pattern(3, 4096)[..]);
    drop(direct);
    assert_eq!(fs::read(mnt.join("direct")).unwrap()[4096..], pattern(3, 4096)[..]);

    // fallocate: extend, then punch a hole (reads as zeros, size kept).
    let holed = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(mnt.join("holed")).unwrap();
    // SAFETY: a valid descriptor, plain integers.
    assert_eq!(unsafe { libc::fallocate(holed.as_raw_fd(), 0, 0, 3 * CHUNK_SIZE as i64) }, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(holed.metadata().unwrap().len(), 3 * CHUNK_SIZE);
    let full = pattern(4, (3 * CHUNK_SIZE) as usize);
    holed.write_all_at(&full, 0).unwrap();
    let (hole_start, hole_len) = (CHUNK_SIZE / 2, CHUNK_SIZE + 12345);
    // SAFETY: as above.
    let rc = unsafe { libc::fallocate(holed.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, hole_start as i64, hole_len as i64) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    drop(holed);
    let mut expected_holed = full.clone();
    expected_holed[hole_start as usize..(hole_start + hole_len) as usize].fill(0);
    let holed_view = fs.mount();
    assert_eq!(fs::read(holed_view.join("holed")).unwrap(), expected_holed);
    fs::remove_file(mnt.join("holed")).unwrap();

    // A shared writable mmap: stores reach the file after msync.
    let mapped = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(mnt.join("mapped")).unwrap();
    mapped.set_len(8192).unwrap();
    // SAFETY: a fresh shared mapping of 8192 bytes of an open, writable file; unmapped below.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, mapped.as_raw_fd(), 0) };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: the mapping is 8192 bytes long and writable.
    unsafe { std::ptr::copy_nonoverlapping(b"through mmap".as_ptr(), map.cast::<u8>().add(5000), 12) };
    // SAFETY: the mapping is valid until munmap.
    assert_eq!(unsafe { libc::msync(map, 8192, libc::MS_SYNC) }, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(map, 8192) };
    mapped.sync_all().unwrap();
    drop(mapped);
    let other_view = fs.mount();
    assert_eq!(&fs::read(other_view.join("mapped")).unwrap()[5000..5012], b"through mmap");
    fs::remove_file(mnt.join("mapped")).unwrap();
    fs::remove_file(mnt.join("direct")).unwrap();

    // A file unlinked while open stays readable and writable until closed.
    let mut tmp = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(mnt.join("tmpfile")).unwrap();
    tmp.write_all(b"still here").unwrap();
    fs::remove_file(mnt.join("tmpfile")).unwrap();
    assert_eq!(fs::metadata(mnt.join("tmpfile")).unwrap_err().kind(), ErrorKind::NotFound);
    tmp.write_all(b" after unlink").unwrap();
    let mut unlinked_content = String::new();
    tmp.seek(SeekFrom::Start(0)).unwrap();
    tmp.read_to_string(&mut unlinked_content).unwrap();
    assert_eq!(unlinked_content, "still here after unlink");
    assert_eq!(tmp.metadata().unwrap().nlink(), 0);
    let orphan = tmp.metadata().unwrap().ino();
    drop(tmp);
    // The kernel sends the release after close returns: wait for the orphan to go.
    let ns = fs.namespace();
    common::wait_until("the unlinked file to be deleted at its last close", std::time::Duration::from_secs(30), || ns.inode(orphan).is_err());

    // readdir, statfs.
    let mut names: Vec<String> = fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["big".to_string(), "e".into(), "hard".into(), "n".repeat(255), "sym".into()]);
    let stat = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert!(stat.blocks() > 0);
    assert_eq!(stat.name_max(), 255);

    // Another mount (another node) sees the same tree and data.
    let other = fs.mount();
    assert_eq!(fs::read(other.join("big")).unwrap(), back);
    assert_eq!(fs::read(other.join("hard")).unwrap(), b"x");
}

#[test]
fn non_root_users_get_eacces() {
    let mut fs = TestFs::start("eacces", 3);
    let mnt = fs.mount();
    fs::create_dir(mnt.join("private")).unwrap();
    fs::set_permissions(mnt.join("private"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(mnt.join("secret"), b"root only").unwrap();
    fs::set_permissions(mnt.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(mnt.join("public"), b"everyone").unwrap();
    fs::set_permissions(mnt.join("public"), fs::Permissions::from_mode(0o644)).unwrap();

    let as_nobody = |script: &str| {
        Command::new("/bin/sh").arg("-c").arg(script).current_dir("/").uid(65534).gid(65534).output().unwrap()
    };
    let create = as_nobody(&format!("echo x > {}/private/f", mnt.display()));
    assert!(!create.status.success());
    assert!(String::from_utf8_lossy(&create.stderr).contains("Permission denied"), "{create:?}");
    let read = as_nobody(&format!("cat {}/secret", mnt.display()));
    assert!(!read.status.success());
    assert!(String::from_utf8_lossy(&read.stderr).contains("Permission denied"), "{read:?}");
    let public = as_nobody(&format!("cat {}/public", mnt.display()));
    assert!(public.status.success(), "{public:?}");
    assert_eq!(public.stdout, b"everyone");
    assert!(fs::metadata(mnt.join("private/f")).is_err(), "the refused create changed nothing");

    // A directory the user owns is theirs to write.
    fs::create_dir(mnt.join("home")).unwrap();
    std::os::unix::fs::chown(mnt.join("home"), Some(65534), Some(65534)).unwrap();
    let own = as_nobody(&format!("echo mine > {0}/home/f && cat {0}/home/f", mnt.display()));
    assert!(own.status.success(), "{own:?}");
    assert_eq!(fs::metadata(mnt.join("home/f")).unwrap().uid(), 65534);
    let mut content = String::new();
    fs::File::open(mnt.join("home/f")).unwrap().read_to_string(&mut content).unwrap();
    assert_eq!(content, "mine\n");
    let _ = OpenOptions::new().custom_flags(0).read(true).open(mnt.join("public")).unwrap();
}

#[test]
fn attributes_set_while_writing_stick_and_reach_other_nodes_at_close() {
    let mut fs = TestFs::start("posix-attrs", 3);
    let mnt = fs.mount();
    let other = fs.mount();
    let set_times = |f: &fs::File, secs: u64| {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t)).unwrap();
    };

    // As tar does: write, then set times, owner and mode through the open file, then close.
    let f = OpenOptions::new().write(true).create_new(true).open(mnt.join("a")).unwrap();
    f.write_all_at(&pattern(5, 10_000), 0).unwrap();
    f.write_all_at(&pattern(6, 10_000), 10_000).unwrap();
    set_times(&f, 1_000_000_000);
    std::os::unix::fs::fchown(&f, Some(1234), Some(5678)).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o4750)).unwrap();
    // This node sees them at once.
    let here = f.metadata().unwrap();
    assert_eq!((here.mtime(), here.uid(), here.gid(), here.mode() & 0o7777, here.len()), (1_000_000_000, 1234, 5678, 0o4750, 20_000));
    drop(f);
    // After the close, every node sees them, the size and the times set after the last write.
    std::thread::sleep(std::time::Duration::from_millis(1100)); // past both mounts' attribute TTL
    for m in [&mnt, &other] {
        let seen = fs::metadata(m.join("a")).unwrap();
        assert_eq!((seen.mtime(), seen.uid(), seen.gid(), seen.mode() & 0o7777, seen.len()), (1_000_000_000, 1234, 5678, 0o4750, 20_000), "seen on {}", m.display());
    }

    // A write after the times were set makes the mtime the write's again.
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let f = OpenOptions::new().write(true).open(mnt.join("a")).unwrap();
    set_times(&f, 1_000_000_000);
    f.write_all_at(b"later", 0).unwrap();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let seen = fs::metadata(other.join("a")).unwrap();
    assert!(seen.mtime() >= before, "mtime {} is not the write's (>= {before})", seen.mtime());
    // A chown through the open file clears setuid (the write by root kept it).
    assert_eq!(seen.mode() & 0o7777, 0o4750);
    let f = OpenOptions::new().write(true).open(mnt.join("a")).unwrap();
    std::os::unix::fs::fchown(&f, Some(1), None).unwrap();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(fs::metadata(other.join("a")).unwrap().mode() & 0o7777, 0o0750);
}

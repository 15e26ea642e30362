//! Copy-on-write clones: a clone shares its source's chunks until either file writes them,
//! deleting one file leaves the other whole, the last reference deletes the chunks, and a
//! source being written elsewhere is refused.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{pattern, run, Ext4Mount, LoopDevice, TestFs, BINARY, CHUNK_SIZE};
use fs_agent::namespace::{resolve_path, ChunkInfo};

fn fs_agent(fs: &TestFs, args: &[&str]) -> Output {
    Command::new(BINARY).arg(args[0]).args(["--meta", &fs.meta]).args(&args[1..]).env("FS_AGENT_LOG", "warn").output().unwrap()
}

/// Waits until no one holds the write lease of `path`: the kernel sends a file's release to
/// the mount after close(2) returns.
fn wait_released(fs: &TestFs, path: &str) {
    let ns = fs.namespace();
    let ino = resolve_path(&ns, path).unwrap().ino;
    common::wait_until(&format!("the write lease of {path} to be released"), Duration::from_secs(10), || {
        ns.acquire_lease(ino, "probe", false).map(|lease| ns.release_lease(&lease)).is_ok()
    });
}

fn clone(fs: &TestFs, src: &str, dst: &str) {
    wait_released(fs, src);
    let out = fs_agent(fs, &["clone", src, dst]);
    assert!(out.status.success(), "clone {src} {dst}: {}", String::from_utf8_lossy(&out.stderr));
}

fn chunks(fs: &TestFs, path: &str) -> Vec<ChunkInfo> {
    let ns = fs.namespace();
    let inode = resolve_path(&ns, path).unwrap();
    ns.chunks(inode.ino).unwrap().into_iter().map(|(_, chunk, _)| chunk).collect()
}

fn chunk_ids(fs: &TestFs, path: &str) -> Vec<u64> {
    chunks(fs, path).iter().map(|c| c.chunk_id).collect()
}

/// Chunk replicas stored on every chunk server, counted by their data files.
fn replica_files(fs: &TestFs) -> usize {
    fs.servers
        .iter()
        .map(|s| fs::read_dir(s.data.join("chunks")).map(|d| d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".data")).count()).unwrap_or(0))
        .sum()
}

fn status(fs: &TestFs) -> String {
    let out = fs_agent(fs, &["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8], expected: &mut [u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
    expected[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
}

#[test]
fn a_clone_shares_chunks_until_either_file_writes_them() {
    let mut fs = TestFs::start("clone", 3);
    let mnt = fs.mount();
    let mut template = pattern(21, (CHUNK_SIZE * 5 + 4321) as usize);
    fs::write(mnt.join("template"), &template).unwrap();
    clone(&fs, "/template", "/disk");
    assert_eq!(chunk_ids(&fs, "/disk"), chunk_ids(&fs, "/template"));
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), template);
    assert_eq!(fs::metadata(mnt.join("disk")).unwrap().len(), template.len() as u64);

    // A write to the clone copies that one chunk; the template keeps its bytes.
    let mut disk = template.clone();
    overwrite(&mnt.join("disk"), CHUNK_SIZE * 2 + 100, b"written to the clone", &mut disk);
    assert_eq!(fs::read(mnt.join("template")).unwrap(), template);
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), disk);
    let (before, after) = (chunks(&fs, "/template"), chunks(&fs, "/disk"));
    for (index, (original, clone)) in before.iter().zip(&after).enumerate() {
        assert_eq!(original.chunk_id == clone.chunk_id, index != 2, "chunk {index}");
        let servers = |c: &ChunkInfo| {
            let mut s = c.current_servers();
            s.sort();
            s
        };
        assert_eq!(servers(original), servers(clone), "the copy stays on the original's servers");
    }
    // And the other way round.
    overwrite(&mnt.join("template"), 7, b"written to the template", &mut template);
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), disk);
    assert_eq!(fs::read(mnt.join("template")).unwrap(), template);
    let other = fs.mount();
    assert_eq!(fs::read(other.join("disk")).unwrap(), disk);
    assert_eq!(fs::read(other.join("template")).unwrap(), template);

    // Counted per chunk: 6 chunks, 2 of them copied once each, 4 still shared.
    assert!(status(&fs).contains("chunks: 8, under-replicated: 0, unavailable: 0, stale replicas: 0, shared by clones: 4"), "{}", status(&fs));
    assert_eq!(replica_files(&fs), 8 * 3);

    // Deleting the template leaves the clone whole; deleting the clone deletes every chunk.
    // (A file still open here is deleted at its last close, which the kernel sends after
    // close(2) returns: hence the waits.)
    fs::remove_file(mnt.join("template")).unwrap();
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), disk);
    assert_eq!(fs::read(other.join("disk")).unwrap(), disk);
    let replicas_left = |expected: usize| common::wait_until(&format!("{expected} replica files to be left"), Duration::from_secs(10), || replica_files(&fs) == expected);
    replicas_left(6 * 3); // the template's copied chunks are gone, the shared ones stay
    fs::remove_file(mnt.join("disk")).unwrap();
    replicas_left(0);
    assert!(status(&fs).contains("chunks: 0,"));
}

#[test]
fn the_mount_clones_on_copy_file_range_and_a_source_being_written_elsewhere_is_refused() {
    let mut fs = TestFs::start("clone-mount", 3);
    let a = fs.mount();
    let b = fs.mount();
    let mut data = pattern(22, (CHUNK_SIZE * 3 + CHUNK_SIZE / 2) as usize);
    fs::write(a.join("src"), &data).unwrap();

    // cp uses copy_file_range, which the mount answers with a clone.
    let cp = Command::new("cp").arg(a.join("src")).arg(a.join("copy")).output().unwrap();
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    assert_eq!(chunk_ids(&fs, "/copy"), chunk_ids(&fs, "/src"));
    assert_eq!(fs::read(b.join("copy")).unwrap(), data);

    // Node A writes the source: its unflushed size is flushed before a clone on A, and its
    // next write copies the chunk it now shares.
    let mut writer = OpenOptions::new().write(true).open(a.join("src")).unwrap();
    writer.seek(SeekFrom::End(0)).unwrap();
    writer.write_all(b"appended, not flushed").unwrap();
    data.extend_from_slice(b"appended, not flushed");
    let cp = Command::new("cp").arg(a.join("src")).arg(a.join("copy2")).output().unwrap();
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    assert_eq!(fs::read(a.join("copy2")).unwrap(), data);
    assert_eq!(chunk_ids(&fs, "/copy2"), chunk_ids(&fs, "/src"));
    writer.write_all_at(b"after the clone", 10).unwrap();
    writer.sync_all().unwrap();
    assert_eq!(fs::read(a.join("copy2")).unwrap(), data, "the clone keeps the bytes of its moment");
    data[10..25].copy_from_slice(b"after the clone");

    // While A holds the source's lease, another node cannot clone it: the command says why;
    // the mount falls back to copying the bytes.
    let busy = fs_agent(&fs, &["clone", "/src", "/busy"]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is being written by node-0"), "{}", String::from_utf8_lossy(&busy.stderr));
    assert!(!a.join("busy").exists());
    let cp = Command::new("cp").arg(b.join("src")).arg(b.join("bytes")).output().unwrap();
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    assert_eq!(fs::read(b.join("bytes")).unwrap(), data);
    let (src_ids, copied_ids) = (chunk_ids(&fs, "/src"), chunk_ids(&fs, "/bytes"));
    assert!(copied_ids.iter().all(|id| !src_ids.contains(id)), "copied, not shared");
    drop(writer);
    wait_released(&fs, "/src");

    // Bad requests change nothing and say what is wrong.
    fs::create_dir(a.join("dir")).unwrap();
    for (src, dst, error) in [
        ("/dir", "/x", "is a directory"),
        ("/src", "/copy", "already exists"),
        ("/missing", "/x", "does not exist"),
        ("/src", "/nodir/x", "does not exist"),
        ("/src", "x", "from the filesystem root"),
    ] {
        let out = fs_agent(&fs, &["clone", src, dst]);
        assert!(!out.status.success(), "clone {src} {dst}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(error), "clone {src} {dst}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!a.join("x").exists());
    assert_eq!(fs::read(a.join("copy")).unwrap()[..10], data[..10]);
}

#[test]
fn a_fenced_writer_cannot_copy_a_shared_chunk() {
    let mut fs = TestFs::start("clone-fence", 3);
    let mnt = fs.mount();
    let data = pattern(23, (CHUNK_SIZE * 2) as usize);
    fs::write(mnt.join("template"), &data).unwrap();
    clone(&fs, "/template", "/disk");
    let mut zombie = OpenOptions::new().write(true).open(mnt.join("disk")).unwrap();
    let takeover = fs_agent(&fs, &["lease-takeover", "/disk"]);
    assert!(takeover.status.success(), "{}", String::from_utf8_lossy(&takeover.stderr));
    let refused = zombie.write_all(b"zombie write").expect_err("the fenced writer's copy-on-write must fail");
    assert_eq!(refused.raw_os_error(), Some(libc::EIO));
    drop(zombie);
    assert_eq!(chunk_ids(&fs, "/disk"), chunk_ids(&fs, "/template"), "both files still share every chunk");
    assert_eq!(replica_files(&fs), 2 * 3, "no copy was left behind");
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), data);
}

#[test]
fn heal_copies_a_shared_chunk_once_and_keeps_it_shared() {
    let mut fs = TestFs::start("clone-heal", 4);
    let mnt = fs.mount();
    let data = pattern(24, (CHUNK_SIZE * 6) as usize);
    fs::write(mnt.join("template"), &data).unwrap();
    clone(&fs, "/template", "/disk");
    let dead = fs.servers[3].addr.clone();
    let affected = chunks(&fs, "/template").iter().filter(|c| c.current_servers().contains(&dead)).count();
    assert!(affected > 0, "placement spreads 6 chunks over 4 servers");

    // A server dies; opening the template for writing fences, which marks its replicas stale
    // in both files' records at once.
    fs.kill_server(3);
    drop(OpenOptions::new().write(true).open(mnt.join("template")).unwrap());
    wait_released(&fs, "/template");
    assert_eq!(chunks(&fs, "/disk"), chunks(&fs, "/template"));
    assert!(status(&fs).contains(&format!("chunks: 6, under-replicated: {affected}, unavailable: 0, stale replicas: {affected}")), "{}", status(&fs));

    let out = fs_agent(&fs, &["heal"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(report.contains(&format!("healed: {affected} replicas copied; 0 chunks still under-replicated")), "each shared chunk is copied once: {report}");
    assert_eq!(chunks(&fs, "/disk"), chunks(&fs, "/template"));
    assert!(status(&fs).contains("chunks: 6, under-replicated: 0, unavailable: 0, stale replicas: 0, shared by clones: 6"), "{}", status(&fs));
    let other = fs.mount();
    assert_eq!(fs::read(other.join("disk")).unwrap(), data);
    assert_eq!(fs::read(other.join("template")).unwrap(), data);
}

#[test]
fn a_ve_disk_cloned_from_an_ext4_template_boots_and_leaves_the_template_alone() {
    let mut fs = TestFs::start("clone-ext4", 3);
    let mnt = fs.mount();
    let template = mnt.join("template.img");
    fs::File::create(&template).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&template));
    let root = fs.dir.path().join("root");
    {
        let device = LoopDevice::attach(&template);
        let ext4 = Ext4Mount::mount(&device.0, &root);
        fs::write(ext4.0.join("hostname"), b"template\n").unwrap();
        fs::write(ext4.0.join("blob"), pattern(25, 5_000_000)).unwrap();
    }
    let template_bytes = fs::read(&template).unwrap();
    clone(&fs, "/template.img", "/disk.img");
    {
        let device = LoopDevice::attach(&mnt.join("disk.img"));
        {
            let ext4 = Ext4Mount::mount(&device.0, &root);
            assert_eq!(fs::read(ext4.0.join("hostname")).unwrap(), b"template\n");
            assert_eq!(fs::read(ext4.0.join("blob")).unwrap(), pattern(25, 5_000_000));
            fs::write(ext4.0.join("hostname"), b"web1\n").unwrap();
            fs::write(ext4.0.join("more"), pattern(26, 3_000_000)).unwrap();
        }
        run(Command::new("e2fsck").args(["-f", "-n", &device.0]));
    }
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&template));
    assert!(fs::read(&template).unwrap() == template_bytes, "the template is unchanged");
    let other = fs.mount();
    wait_released(&fs, "/disk.img");
    let device = LoopDevice::attach(&other.join("disk.img"));
    let ext4 = Ext4Mount::mount(&device.0, &root);
    assert_eq!(fs::read(ext4.0.join("hostname")).unwrap(), b"web1\n");
    assert_eq!(fs::read(ext4.0.join("more")).unwrap(), pattern(26, 3_000_000));
}

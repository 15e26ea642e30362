//! One chunk server's disk full: new chunks go elsewhere, writes to its existing copies mark
//! it stale, nothing written is lost; with too few servers left a write fails with ENOSPC.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{pattern, TestFs, CHUNK_SIZE};

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"]).arg(at).status().unwrap().success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_server_is_avoided_and_nothing_is_lost() {
    let mut fs = TestFs::start("full", 4);
    // Server 0 gets a 1.5-chunk disk: it fills up during the writes.
    fs.kill_server(0);
    let small = Tmpfs::mount(&fs.servers[0].data.clone(), CHUNK_SIZE * 3 / 2);
    fs.start_server(0);
    let mnt = fs.mount();
    let data = pattern(21, (CHUNK_SIZE * 6) as usize);
    fs::write(mnt.join("f"), &data).unwrap();
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data);

    // With only the full server and one other left, a new chunk cannot get 2 copies: ENOSPC.
    fs.kill_server(2);
    fs.kill_server(3);
    let big = pattern(22, (CHUNK_SIZE * 2) as usize);
    let err = fs::write(mnt.join("g"), &big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(fs::read(other.join("f")).unwrap(), data, "the earlier file is intact");
    // The tmpfs goes first (lazily, while its server still runs), so that
    // the test's temporary directory can then be removed with everything in it.
    drop(small);
    drop(fs);
}

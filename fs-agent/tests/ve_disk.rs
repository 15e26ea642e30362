//! A VE disk: an ext4 image on the mount, attached to a loop device, under mixed I/O with
//! fsync, while a chunk server is killed; everything written reads back, and fsck is clean.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{pattern, run, Ext4Mount, LoopDevice, TestFs};

/// Writes `count` files of varied sizes with fsync; returns what each should contain.
fn workload(root: &Path, round: u64, count: u64) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = root.join(format!("round-{round}"));
    fs::create_dir_all(&dir).unwrap();
    (0..count)
        .map(|i| {
            let path = dir.join(format!("file-{i}"));
            let content = pattern(round * 1000 + i, (1 + (i * 37_813) % 300_000) as usize);
            let mut f = fs::File::create(&path).unwrap();
            f.write_all(&content).unwrap();
            f.sync_all().unwrap();
            (path, content)
        })
        .collect()
}

#[test]
fn an_ext4_image_on_the_mount_survives_mkfs_io_fsync_and_a_server_kill() {
    let mut fs = TestFs::start("vedisk", 3);
    let mnt = fs.mount();
    let image = mnt.join("disk.img");
    fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();

    let written;
    {
        let device = LoopDevice::attach(&image);
        run(Command::new("mkfs.ext4").args(["-q", "-F", &device.0]));
        let ext4 = Ext4Mount::mount(&device.0, &fs.dir.path().join("ve-root"));
        let mut all = workload(&ext4.0, 1, 40);
        fs.kill_server(0);
        all.extend(workload(&ext4.0, 2, 40));
        for (path, content) in &all {
            assert_eq!(&fs::read(path).unwrap(), content, "{}", path.display());
        }
        written = all.into_iter().map(|(p, c)| (p.strip_prefix(&ext4.0).unwrap().to_path_buf(), c)).collect::<Vec<_>>();
        drop(ext4);
        run(Command::new("e2fsck").args(["-f", "-n", &device.0]));
    }

    // Another node attaches the same image (after this one let go) and finds every byte.
    let other = fs.mount();
    let device = LoopDevice::attach(&other.join("disk.img"));
    run(Command::new("e2fsck").args(["-f", "-n", &device.0]));
    let ext4 = Ext4Mount::mount(&device.0, &fs.dir.path().join("ve-root-2"));
    for (relative, content) in &written {
        assert_eq!(&fs::read(ext4.0.join(relative)).unwrap(), content, "{}", relative.display());
    }
}

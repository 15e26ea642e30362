//! Fencing: once another writer took a file's lease, the old writer's writes fail and the new
//! writer's data stays intact.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::process::Command;

use common::{pattern, TestFs, BINARY};
use fs_agent::chunk_client::ChunkClient;
use fs_agent::chunk_protocol::{ChunkRequest, ChunkResponse};
use fs_agent::namespace::resolve_path;

#[test]
fn a_writer_whose_lease_was_taken_over_gets_errors() {
    let mut fs = TestFs::start("fence", 3);
    let mnt = fs.mount();
    let old_data = pattern(1, 200_000);
    let mut old_writer = OpenOptions::new().write(true).create(true).truncate(true).open(mnt.join("disk.img")).unwrap();
    old_writer.write_all(&old_data).unwrap();
    old_writer.sync_all().unwrap();

    // While the old writer holds the lease, another writer is refused without a takeover.
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/disk.img").unwrap();
    assert_eq!(ns.acquire_lease(inode.ino, "node-b", false).unwrap_err().errno(), libc::EBUSY);

    // Node B takes the lease over (as the HA manager does for a dead node) and writes.
    let lease = ns.acquire_lease(inode.ino, "node-b", true).unwrap();
    assert_eq!(lease.epoch, 2);
    let data = fs.file_data(2);
    data.fence(&lease).unwrap();
    let new_data = pattern(2, 150_000);
    data.write(&lease, 3, 0, &new_data, true, None).unwrap();
    ns.set_size(&lease, new_data.len() as u64).unwrap();

    // Every later write of the old writer fails, in place or past the end.
    old_writer.seek(SeekFrom::Start(0)).unwrap();
    let refused = old_writer.write_all(b"zombie write").expect_err("an overwrite by the fenced writer must fail");
    assert_eq!(refused.raw_os_error(), Some(libc::EIO));
    old_writer.seek(SeekFrom::Start(5_000_000)).unwrap();
    let extend = old_writer.write_all(b"zombie extension").and_then(|()| old_writer.sync_all());
    assert!(extend.is_err(), "an extension by the fenced writer must fail");
    drop(old_writer);

    // The new writer's data is intact, seen from another node.
    ns.release_lease(&lease).unwrap();
    let other = fs.mount();
    assert_eq!(fs::read(other.join("disk.img")).unwrap(), new_data);
}

#[test]
fn lease_takeover_command_fences_the_old_writer() {
    let mut fs = TestFs::start("takeover", 3);
    let mnt = fs.mount();
    let mut writer = OpenOptions::new().write(true).create(true).truncate(true).open(mnt.join("f")).unwrap();
    writer.write_all(&pattern(3, 10_000)).unwrap();
    writer.sync_all().unwrap();
    let out = Command::new(BINARY).args(["lease-takeover", "--meta", &fs.meta, "/f"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 2"));
    writer.seek(SeekFrom::Start(0)).unwrap();
    assert!(writer.write_all(b"late").is_err());
    let placement = Command::new(BINARY).args(["placement", "--meta", &fs.meta, "/f"]).output().unwrap();
    assert!(placement.status.success());
    assert!(String::from_utf8_lossy(&placement.stdout).contains("chunk 0"));
    let missing = Command::new(BINARY).args(["lease-takeover", "--meta", &fs.meta, "/nope"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}

#[test]
fn a_takeover_resyncs_replicas_a_dying_writer_left_different() {
    let mut fs = TestFs::start("resync", 3);
    let mnt = fs.mount();
    let data = pattern(4, 300_000);
    fs::write(mnt.join("f"), &data).unwrap();

    // Node A takes the lease and dies after its write reached only one replica.
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    let lease_a = ns.acquire_lease(inode.ino, "node-a", false).unwrap();
    let file_data = fs.file_data(2);
    file_data.fence(&lease_a).unwrap();
    let (chunk, _) = ns.chunk(inode.ino, 0).unwrap().unwrap();
    let replicas = chunk.current_servers();
    let client = ChunkClient::new();
    let torn = ChunkRequest::Write { file_id: inode.ino, epoch: lease_a.epoch, chunk_id: chunk.chunk_id, version: chunk.version, offset: 1000, data: b"never acknowledged".to_vec(), sync: true };
    client.call(&replicas[1], &torn).unwrap();

    // Node B takes over: afterwards every replica holds the same bytes.
    let lease_b = ns.acquire_lease(inode.ino, "node-b", true).unwrap();
    file_data.fence(&lease_b).unwrap();
    let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, len: data.len() as u64 };
    let copies: Vec<Vec<u8>> = replicas
        .iter()
        .map(|s| match client.call(s, &read) {
            Ok(ChunkResponse::Data(d)) => d,
            other => panic!("{s}: {other:?}"),
        })
        .collect();
    assert!(copies.iter().all(|c| *c == copies[0]), "replicas still differ after the takeover");
    let first_is_torn = copies[0][1000..1018] == *b"never acknowledged";
    let mut expected = data.clone();
    if first_is_torn {
        expected[1000..1018].copy_from_slice(b"never acknowledged");
    }
    assert_eq!(copies[0], expected, "one of the two outcomes, whole");
}

#[test]
fn a_frozen_writer_resumed_after_a_takeover_cannot_land_its_write() {
    let mut fs = TestFs::start("zombie", 3);
    let mnt = fs.mount();
    let path = mnt.join("disk.img");
    let old_data = pattern(8, 100_000);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&old_data, 0).unwrap();
    }
    file.sync_all().unwrap();

    // Node A freezes (it missed its self-fence); a write is issued meanwhile and waits in the kernel.
    fs.signal_mount(0, nix::sys::signal::Signal::SIGSTOP);
    let in_flight = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let result = file.write_all_at(b"zombie write", 0).and_then(|()| file.sync_all());
        result.map_err(|e| e.raw_os_error())
    });

    // Node B takes the file over and writes.
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/disk.img").unwrap();
    let lease = ns.acquire_lease(inode.ino, "node-b", true).unwrap();
    let data = fs.file_data(2);
    data.fence(&lease).unwrap();
    let new_data = pattern(9, 120_000);
    data.write(&lease, 3, 0, &new_data, true, None).unwrap();
    ns.set_size(&lease, new_data.len() as u64).unwrap();
    ns.release_lease(&lease).unwrap();

    // A wakes up: its queued write is refused, and B's data is intact.
    fs.signal_mount(0, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(in_flight.join().unwrap(), Err(Some(libc::EIO)));
    let other = fs.mount();
    assert_eq!(fs::read(other.join("disk.img")).unwrap(), new_data);
}

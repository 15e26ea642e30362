//! Healing: after a chunk server dies, `fs-agent heal` copies the missing replicas to the
//! servers still up, and every copy holds the right bytes.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{pattern, TestFs, BINARY, CHUNK_SIZE};
use fs_agent::chunk_client::ChunkClient;
use fs_agent::chunk_protocol::{ChunkRequest, ChunkResponse};
use fs_agent::namespace::resolve_path;

fn status(fs: &TestFs) -> String {
    let out = Command::new(BINARY).args(["status", "--meta", &fs.meta]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn heal_re_replicates_chunks_of_a_dead_server() {
    let mut fs = TestFs::start("heal", 4);
    let mnt = fs.mount();
    let mut data = pattern(11, (CHUNK_SIZE * 8) as usize);
    fs::write(mnt.join("f"), &data).unwrap();
    // A server dies; then every chunk is written again: its copies there go stale.
    fs.kill_server(3);
    let file = fs::OpenOptions::new().write(true).open(mnt.join("f")).unwrap();
    for index in 0..8u64 {
        let offset = index * CHUNK_SIZE + 1000;
        file.write_all_at(b"rewritten after the server died", offset).unwrap();
        data[offset as usize..offset as usize + 31].copy_from_slice(b"rewritten after the server died");
    }
    file.sync_all().unwrap();
    drop(file);
    let before = status(&fs);
    assert!(!before.contains("under-replicated: 0,"), "chunks placed on the dead server lack a copy: {before}");

    let out = Command::new(BINARY).args(["heal", "--meta", &fs.meta]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("0 chunks still under-replicated"), "{text}");
    let after = status(&fs);
    assert!(after.contains("under-replicated: 0, unavailable: 0, stale replicas: 0"), "{after}");

    // Every current replica of every chunk, new ones included, holds the file's bytes.
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    let dead = fs.servers[3].addr.clone();
    let client = ChunkClient::new();
    for (index, chunk, _) in ns.chunks(inode.ino).unwrap() {
        let servers = chunk.current_servers();
        assert_eq!(servers.len(), 3, "chunk {index}");
        assert!(!servers.contains(&dead));
        let expected = &data[(index * CHUNK_SIZE) as usize..((index + 1) * CHUNK_SIZE) as usize];
        for server in servers {
            let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, len: CHUNK_SIZE };
            match client.call(&server, &read) {
                Ok(ChunkResponse::Data(back)) => assert!(back == expected, "chunk {index} on {server} differs"),
                other => panic!("chunk {index} on {server}: {other:?}"),
            }
        }
    }
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data);

    // Four copies for this file: with the fourth server back, heal adds them.
    fs.start_server(3);
    let bad = Command::new(BINARY).args(["set-copies", "--meta", &fs.meta, "/f", "0"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("between 1 and 16"));
    let set = Command::new(BINARY).args(["set-copies", "--meta", &fs.meta, "/f", "4"]).output().unwrap();
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let out = Command::new(BINARY).args(["heal", "--meta", &fs.meta]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (index, chunk, _) in ns.chunks(inode.ino).unwrap() {
        assert_eq!(chunk.current_servers().len(), 4, "chunk {index}");
    }
    let third = fs.mount();
    assert_eq!(fs::read(third.join("f")).unwrap(), data);
}

#[test]
fn a_mount_heals_the_files_it_is_writing() {
    let mut fs = TestFs::start("heal-open", 4);
    let mnt = fs.mount();
    let mut data = pattern(12, (CHUNK_SIZE * 8) as usize);
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).open(mnt.join("disk.img")).unwrap();
    file.write_all_at(&data, 0).unwrap();
    fs.kill_server(3);
    for index in 0..8u64 {
        let offset = index * CHUNK_SIZE + 7;
        file.write_all_at(b"written while degraded", offset).unwrap();
        data[offset as usize..offset as usize + 22].copy_from_slice(b"written while degraded");
    }
    file.sync_all().unwrap();
    // The file stays open: `heal` must leave it alone, the mount heals it.
    let out = Command::new(BINARY).args(["heal", "--meta", &fs.meta]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 files skipped (being written)"), "{}", String::from_utf8_lossy(&out.stdout));
    common::wait_until("the mount to heal its open file", std::time::Duration::from_secs(120), || {
        status(&fs).contains("under-replicated: 0, unavailable: 0, stale replicas: 0")
    });
    // Writes go on after the heal, to the new replicas too.
    file.write_all_at(b"after the heal", 5).unwrap();
    data[5..19].copy_from_slice(b"after the heal");
    file.sync_all().unwrap();
    drop(file);
    let other = fs.mount();
    assert_eq!(fs::read(other.join("disk.img")).unwrap(), data);
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/disk.img").unwrap();
    for (index, chunk, _) in ns.chunks(inode.ino).unwrap() {
        assert_eq!(chunk.current_servers().len(), 3, "chunk {index}");
    }
}

//! Replication on real chunk server processes: a server killed during writes, a corrupt block.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::{pattern, TestFs, CHUNK_SIZE};
use fs_agent::chunk_client::{ChunkClient, ChunkClientError};
use fs_agent::chunk_protocol::{ChunkFailure, ChunkRequest, ChunkResponse};
use std::time::Duration;
use fs_agent::chunk_store::{ChunkStore, BLOCK_SIZE};
use fs_agent::namespace::resolve_path;

#[test]
fn writes_survive_a_chunk_server_killed_mid_stream() {
    let mut fs = TestFs::start("kill", 3);
    let mnt = fs.mount();
    let data = pattern(7, (CHUNK_SIZE * 4) as usize);
    let piece = 64 * 1024;
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(mnt.join("vm.img")).unwrap();
    for (i, part) in data.chunks(piece).enumerate() {
        if i == data.len() / piece / 3 {
            fs.kill_server(1);
        }
        // With 2 of 3 copies still writable, the writer never sees an error.
        file.write_all(part).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(fs::read(mnt.join("vm.img")).unwrap(), data);

    // A fresh mount has no page cache: the bytes come from the surviving replicas.
    let other = fs.mount();
    assert_eq!(fs::read(other.join("vm.img")).unwrap(), data);

    // The dead server's copies of the chunks written after the kill are stale.
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/vm.img").unwrap();
    let dead = fs.servers[1].addr.clone();
    let chunks = ns.chunks(inode.ino).unwrap();
    assert_eq!(chunks.len(), 4);
    for (index, chunk, _) in &chunks {
        let current = chunk.current_servers();
        assert!(current.len() >= 2, "chunk {index} keeps at least 2 current copies");
        if *index >= 2 {
            assert!(!current.contains(&dead), "chunk {index}: the killed server missed writes and must be stale");
        }
    }

    // The killed server comes back: its stale replicas are never served.
    fs.start_server(1);
    let third = fs.mount();
    assert_eq!(fs::read(third.join("vm.img")).unwrap(), data);
}

/// Whether the last scrub pass of `server` listed the block of byte 70 000 of `chunk_id` as corrupt (`corrupt`)
/// or, after at least one pass, as clean.
fn scrub_lists(server: &str, chunk_id: u64, corrupt: bool) -> bool {
    match ChunkClient::new().call(server, &ChunkRequest::ScrubReport) {
        Ok(ChunkResponse::Scrub(report)) => report.passes > 0 && report.corrupt_blocks.contains(&(chunk_id, 70_000 / BLOCK_SIZE)) == corrupt,
        _ => false,
    }
}

#[test]
fn a_corrupt_block_is_detected_served_from_another_replica_and_repaired() {
    let mut fs = TestFs::start("corrupt", 3);
    let mnt = fs.mount();
    let data = pattern(9, 300_000);
    fs::write(mnt.join("f"), &data).unwrap();

    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    let (chunk, _) = ns.chunk(inode.ino, 0).unwrap().unwrap();
    let first = chunk.current_servers()[0].clone();
    let chunk_id = chunk.chunk_id;
    let server = fs.servers.iter().find(|s| s.addr == first).unwrap();
    let path = ChunkStore::data_path(&server.data, chunk.chunk_id);
    let disk = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut byte = [0u8; 1];
    disk.read_exact_at(&mut byte, ChunkStore::disk_offset(70_000)).unwrap();
    disk.write_all_at(&[byte[0] ^ 0xff], ChunkStore::disk_offset(70_000)).unwrap();
    disk.sync_all().unwrap();

    // The corrupt replica refuses to serve the block...
    let client = ChunkClient::new();
    let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, len: data.len() as u64 };
    match client.call(&first, &read) {
        Err(ChunkClientError::Refused { failure: ChunkFailure::Corrupt { block, .. }, .. }) if block == 70_000 / BLOCK_SIZE => {}
        other => panic!("expected a crc error from {first}, got {other:?}"),
    }
    // The background scrub finds it too.
    common::wait_until("the scrub to report the corrupt block", Duration::from_secs(60), || scrub_lists(&first, chunk_id, true));
    // ...and readers get the right bytes from another replica.
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data);
    // ...and the read repaired the bad replica from a good one.
    match client.call(&first, &read) {
        Ok(ChunkResponse::Data(back)) => assert_eq!(back, data),
        other => panic!("expected the repaired replica to serve, got {other:?}"),
    }
    common::wait_until("a scrub pass to find the replica clean", Duration::from_secs(60), || scrub_lists(&first, chunk_id, false));
}

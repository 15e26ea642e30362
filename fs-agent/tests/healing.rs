//! Healing: after a chunk server dies, `fs-agent heal` (one pass) or `fs-agent healer` (the
//! service) copies the missing replicas to the servers still up, and every copy holds the
//! right bytes; a corrupt block a scrub found is repaired from a good replica.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{pattern, TestFs, BINARY, CHUNK_SIZE};
use fs_agent::chunk_client::ChunkClient;
use fs_agent::chunk_protocol::{ChunkRequest, ChunkResponse};
use fs_agent::chunk_store::ChunkStore;
use fs_agent::namespace::resolve_path;

fn status(fs: &TestFs) -> String {
    let out = Command::new(BINARY).args(["status", "--meta", &fs.meta]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn heal_re_replicates_chunks_of_a_dead_server() {
    let mut fs = TestFs::start("heal", 4);
    // This test watches the under-replication that `heal` repairs: the
    // writer's mount must not heal the file first.
    fs.mount_heal_interval_secs = 3600;
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

/// Every current replica of every chunk of `path` holds `data`'s bytes; returns the servers
/// holding them.
fn check_replicas(fs: &TestFs, path: &str, data: &[u8], copies: usize) -> Vec<String> {
    let ns = fs.namespace();
    let inode = resolve_path(&ns, path).unwrap();
    let client = fs.chunk_client();
    let mut holders = vec![];
    for (index, chunk, _) in ns.chunks(inode.ino).unwrap() {
        let servers = chunk.current_servers();
        assert_eq!(servers.len(), copies, "{path} chunk {index}: {:?}", chunk.replicas);
        assert_eq!(chunk.replicas.len(), copies, "{path} chunk {index} keeps no stale entries: {:?}", chunk.replicas);
        let start = (index * CHUNK_SIZE) as usize;
        let expected = &data[start..(start + CHUNK_SIZE as usize).min(data.len())];
        for server in servers {
            let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, len: expected.len() as u64 };
            match client.call(&server, &read) {
                Ok(ChunkResponse::Data(back)) => assert!(back == expected, "{path} chunk {index} on {server} differs"),
                other => panic!("{path} chunk {index} on {server}: {other:?}"),
            }
            holders.push(server);
        }
    }
    holders
}

#[test]
fn the_healer_re_replicates_the_chunks_of_a_dead_server() {
    let mut fs = TestFs::start("healer", 4);
    let mnt = fs.mount();
    let a = pattern(31, (CHUNK_SIZE * 6 + 999) as usize);
    let b = pattern(32, (CHUNK_SIZE * 3) as usize);
    let disk = pattern(33, (CHUNK_SIZE * 4) as usize);
    fs::write(mnt.join("a"), &a).unwrap();
    fs::write(mnt.join("b"), &b).unwrap();
    // A VE disk stays open on the mount, and is not written after the server dies: its mount
    // heals it once the healer has declared the server dead.
    let open_disk = fs::OpenOptions::new().write(true).create(true).truncate(true).open(mnt.join("disk.img")).unwrap();
    open_disk.write_all_at(&disk, 0).unwrap();
    open_disk.sync_all().unwrap();
    let dead = fs.servers[3].addr.clone();
    let on_dead = |path: &str| {
        let ns = fs.namespace();
        let inode = resolve_path(&ns, path).unwrap();
        ns.chunks(inode.ino).unwrap().iter().filter(|(_, c, _)| c.current_servers().contains(&dead)).count()
    };
    assert!(on_dead("/a") + on_dead("/b") + on_dead("/disk.img") > 0, "placement spreads 13 chunks over 4 servers");

    // Nothing is written after the kill: the chunk records still list the dead server, and
    // only its silence tells.
    fs.kill_server(3);
    assert!(!status(&fs).contains("under-replicated: 0,"), "chunks with a copy on a server that does not answer lack a copy");
    fs.start_service("healer", &["healer", "--interval-secs", "1", "--dead-after-secs", "3"]);
    common::wait_until("the healer to re-replicate every chunk", std::time::Duration::from_secs(120), || {
        let text = status(&fs);
        text.contains("under-replicated: 0, unavailable: 0, stale replicas: 0") && text.contains("left: 0 under-replicated, 0 unavailable")
    });
    let text = status(&fs);
    let line = text.lines().find(|l| l.contains(&dead)).unwrap_or_default().to_string();
    assert!(line.contains("DOWN") && line.contains("declared dead by the healer") && line.contains(" 0 current replicas"), "{text}");
    assert!(text.contains(&format!("dead: {dead}")), "{text}");
    for (path, data) in [("/a", &a), ("/b", &b), ("/disk.img", &disk)] {
        let holders = check_replicas(&fs, path, data, 3);
        assert!(!holders.contains(&dead), "{path} still lists the dead server");
    }
    let log = fs.log("healer.log");
    assert!(log.contains("declared dead"), "{log}");

    // The writer of the open disk goes on writing to its new replicas.
    open_disk.write_all_at(b"after the heal", 10).unwrap();
    open_disk.sync_all().unwrap();
    drop(open_disk);
    let mut disk = disk;
    disk[10..24].copy_from_slice(b"after the heal");
    let other = fs.mount();
    assert_eq!(fs::read(other.join("disk.img")).unwrap(), disk);

    // The server comes back (with its old data): its next heartbeat makes it alive again.
    fs.start_server(3);
    common::wait_until("the server to count as alive again", std::time::Duration::from_secs(60), || {
        let text = status(&fs);
        text.lines().any(|l| l.contains(&dead) && l.contains(" up, ") && !l.contains("dead")) && !text.contains("dead: ")
    });
}

#[test]
fn heal_repairs_the_corrupt_blocks_a_scrub_found() {
    let mut fs = TestFs::start("heal-scrub", 3);
    let mnt = fs.mount();
    let data = pattern(34, 300_000);
    fs::write(mnt.join("f"), &data).unwrap();
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    let (chunk, _) = ns.chunk(inode.ino, 0).unwrap().unwrap();
    let bad = chunk.current_servers()[1].clone();
    let server = fs.servers.iter().find(|s| s.addr == bad).unwrap();
    let disk = fs::OpenOptions::new().read(true).write(true).open(ChunkStore::data_path(&server.data, chunk.chunk_id)).unwrap();
    let mut byte = [0u8; 1];
    disk.read_exact_at(&mut byte, ChunkStore::disk_offset(200_000)).unwrap();
    disk.write_all_at(&[byte[0] ^ 0x5a], ChunkStore::disk_offset(200_000)).unwrap();
    disk.sync_all().unwrap();
    let client = fs.chunk_client();
    let scrub_lists = |corrupt: bool| match client.call(&bad, &ChunkRequest::ScrubReport) {
        Ok(ChunkResponse::Scrub(report)) => report.passes > 0 && report.corrupt_blocks.contains(&(chunk.chunk_id, 200_000 / fs_agent::chunk_store::BLOCK_SIZE)) == corrupt,
        _ => false,
    };
    common::wait_until("the scrub to report the corrupt block", std::time::Duration::from_secs(60), || scrub_lists(true));

    // Nobody reads the block; `heal --scrub` repairs it from a good replica.
    let out = fs.command().args(["heal", "--meta", &fs.meta, "--scrub"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 corrupt blocks repaired"), "{text}");
    let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, len: data.len() as u64 };
    match client.call(&bad, &read) {
        Ok(ChunkResponse::Data(back)) => assert!(back == data, "the repaired replica differs"),
        other => panic!("the repaired replica: {other:?}"),
    }
    common::wait_until("a scrub pass to find the replica clean", std::time::Duration::from_secs(60), || scrub_lists(false));
    let again = fs.command().args(["heal", "--meta", &fs.meta, "--scrub"]).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 corrupt blocks repaired"), "{}", String::from_utf8_lossy(&again.stdout));
}

fn fs_agent_ok(fs: &TestFs, args: &[&str]) -> String {
    let out = fs.command().args(args).args(["--meta", &fs.meta]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

fn fs_agent_refused(fs: &TestFs, args: &[&str]) -> String {
    let out = fs.command().args(args).args(["--meta", &fs.meta]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} must be refused: {}", String::from_utf8_lossy(&out.stdout));
    text
}

#[test]
fn servers_are_drained_removed_and_replaced() {
    let mut fs = TestFs::start("drain", 5);
    let mnt = fs.mount();
    let f = pattern(35, (CHUNK_SIZE * 6) as usize);
    fs::write(mnt.join("f"), &f).unwrap();
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    let (first, _) = ns.chunk(inode.ino, 0).unwrap().unwrap();
    let drained = first.current_servers()[0].clone();
    let replaced = first.current_servers()[1].clone();
    let index_of = |fs: &TestFs, addr: &str| fs.servers.iter().position(|s| s.addr == addr).unwrap();

    // Draining: the healer moves its replicas off while it still serves them.
    assert!(fs_agent_ok(&fs, &["drain-server", &drained]).contains("draining"));
    assert!(fs_agent_refused(&fs, &["remove-server", &drained]).contains("still answers"));
    fs_agent_ok(&fs, &["heal"]);
    assert!(!check_replicas(&fs, "/f", &f, 3).contains(&drained));
    let text = status(&fs);
    let line = text.lines().find(|l| l.contains(&drained)).unwrap_or_default().to_string();
    assert!(line.contains(" up, draining") && line.contains(" 0 current replicas"), "{text}");
    // It gets no new chunks.
    let g = pattern(36, (CHUNK_SIZE * 4) as usize);
    fs::write(mnt.join("g"), &g).unwrap();
    assert!(!check_replicas(&fs, "/g", &g, 3).contains(&drained));
    // Stopped, it is removed from the registry.
    fs.kill_server(index_of(&fs, &drained));
    assert!(fs_agent_ok(&fs, &["remove-server", &drained]).contains("removed"));
    assert!(!status(&fs).contains(&drained));

    // A lost disk: the new, empty one may not answer for the replicas the old one had.
    let lost = index_of(&fs, &replaced);
    fs.kill_server(lost);
    let new_disk = fs.dir.path().join("new-disk");
    let refused = fs.command().args(["chunkserver", "--listen", &replaced, "--data", new_disk.to_str().unwrap(), "--meta", &fs.meta]).output().unwrap();
    let text = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success() && text.contains("is a new data directory") && text.contains("remove-server --force"), "{text}");
    assert!(fs_agent_refused(&fs, &["remove-server", &replaced]).contains("still holds"));
    fs_agent_ok(&fs, &["remove-server", "--force", &replaced]);
    let healed = fs_agent_ok(&fs, &["heal"]);
    assert!(healed.contains("0 chunks still under-replicated"), "{healed}");
    for (path, data) in [("/f", &f), ("/g", &g)] {
        let holders = check_replicas(&fs, path, data, 3);
        assert!(!holders.contains(&replaced) && !holders.contains(&drained), "{path}: {holders:?}");
    }
    // Now no chunk lists the address: the new disk may start there.
    fs.servers[lost].data = new_disk;
    fs.start_server(lost);
    common::wait_until("the new disk to register", std::time::Duration::from_secs(60), || status(&fs).lines().any(|l| l.contains(&replaced) && l.contains(" up, ")));
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), f);
    assert_eq!(fs::read(other.join("g")).unwrap(), g);
}

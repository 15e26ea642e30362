//! A mount running its node's chunk server in its own process (`mount --chunk-data`): it
//! serves its replicas to other nodes over the network and uses them itself directly.

mod common;

use std::fs;

use common::{pattern, TestFs};
use fs_agent::chunk_store::ChunkStore;
use fs_agent::namespace::resolve_path;

#[test]
fn a_mount_serves_its_nodes_replicas_and_reads_them_itself() {
    let mut fs = TestFs::start("embedded", 2);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let data_dir = fs.dir.path().join("chunks-in-mount");
    let mnt = fs.mount_with(&["--chunk-data", data_dir.to_str().unwrap(), "--chunk-listen", &addr]);
    let ns = fs.namespace();
    // The mount registered its chunk server like a `chunkserver` process.
    assert!(ns.servers().unwrap().contains(&addr), "the mount's chunk server is not registered: {:?}", ns.servers());

    let data = pattern(41, 300_000);
    fs::write(mnt.join("f"), &data).unwrap();
    let inode = resolve_path(&ns, "/f").unwrap();
    let (chunk, _) = ns.chunk(inode.ino, 0).unwrap().unwrap();
    assert_eq!(chunk.current_servers().len(), 3, "every server holds a copy: {chunk:?}");
    assert!(chunk.current_servers().contains(&addr), "no copy on the mount's own server: {chunk:?}");
    assert!(ChunkStore::data_path(&data_dir, chunk.chunk_id).exists(), "the mount's replica is not in --chunk-data");

    // With the two other servers gone, the mount reads its own replica, and another node
    // reads it over the network from the mount's chunk server.
    fs.kill_server(0);
    fs.kill_server(1);
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data, "another node read wrong bytes from the mount's chunk server");
    // Past the kernel's cache: the mount reads its replica again through FUSE.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), data, "the mount read wrong bytes from its own replica");

    // A write reaching only its own replica is one copy, fewer than the 2 a write needs.
    let file = fs::OpenOptions::new().write(true).open(mnt.join("f")).unwrap();
    let err = std::os::unix::fs::FileExt::write_at(&file, b"x", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "a write with one reachable copy must fail, got {err}");
}

#[test]
fn a_chunk_listen_address_in_use_is_refused_with_a_clear_error() {
    let fs = TestFs::start("embedded-busy", 1);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let mnt = fs.dir.path().join("mnt-busy");
    fs::create_dir_all(&mnt).unwrap();
    let out = fs
        .command()
        .args(["mount", "--meta", &fs.meta, "--chunk-data", fs.dir.path().join("d").to_str().unwrap(), "--chunk-listen", &busy_addr, mnt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&busy_addr) && stderr.contains("another chunk server"), "unclear error: {stderr}");
    assert!(!common::is_fuse_mount(&mnt), "mounted although its chunk server could not listen");
    // --chunk-listen without --chunk-data is refused by the argument parser.
    let out = fs.command().args(["mount", "--meta", &fs.meta, "--chunk-listen", &busy_addr, mnt.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--chunk-data"), "{}", String::from_utf8_lossy(&out.stderr));
}

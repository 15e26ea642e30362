//! Restarts: a crashed mount, chunk servers and the metadata store come back with nothing
//! acknowledged lost.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::process::Command;

use common::{pattern, TestFs, BINARY};

#[test]
fn a_restarted_mount_serves_again_and_keeps_its_leases() {
    let mut fs = TestFs::start("restart", 3);
    let mnt = fs.mount();
    let data = pattern(5, 3_000_000);
    fs::write(mnt.join("done"), &data).unwrap();
    // A file left open for writing when the agent dies: its lease stays with this node.
    let mut open = OpenOptions::new().write(true).create(true).truncate(true).open(mnt.join("open")).unwrap();
    open.write_all(b"acknowledged").unwrap();
    open.sync_all().unwrap();

    fs.restart_mount(0);
    drop(open); // its mount is gone; closing the stale descriptor must not matter
    assert_eq!(fs::read(mnt.join("done")).unwrap(), data);
    assert_eq!(fs::read(mnt.join("open")).unwrap(), b"acknowledged");

    // The same node gets its lease back and writes again; another node is refused.
    let mut again = OpenOptions::new().write(true).open(mnt.join("open")).unwrap();
    again.seek(SeekFrom::End(0)).unwrap();
    again.write_all(b" and more").unwrap();
    again.sync_all().unwrap();
    let other = fs.mount();
    let busy = OpenOptions::new().write(true).open(other.join("open")).unwrap_err();
    assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
    drop(again);
    assert_eq!(fs::read(other.join("open")).unwrap(), b"acknowledged and more");
    OpenOptions::new().write(true).open(other.join("open")).unwrap().write_all(b"A").unwrap();
}

#[test]
fn chunk_servers_restart_without_losing_data_and_status_reports_health() {
    let mut fs = TestFs::start("servers", 3);
    let mnt = fs.mount();
    let data = pattern(6, 2_500_000);
    fs::write(mnt.join("f"), &data).unwrap();
    for i in 0..3 {
        fs.kill_server(i);
    }
    for i in 0..3 {
        fs.start_server(i);
    }
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data);

    let healthy = Command::new(BINARY).args(["status", "--meta", &fs.meta]).output().unwrap();
    let text = String::from_utf8_lossy(&healthy.stdout).to_string();
    assert!(healthy.status.success(), "{}", String::from_utf8_lossy(&healthy.stderr));
    assert!(text.contains("chunks: 3, under-replicated: 0"), "{text}");

    // One server down during a write: its copies turn stale, status counts them.
    fs.kill_server(2);
    fs::write(mnt.join("f"), pattern(7, 2_500_000)).unwrap();
    let degraded = Command::new(BINARY).args(["status", "--meta", &fs.meta]).output().unwrap();
    let text = String::from_utf8_lossy(&degraded.stdout).to_string();
    assert!(text.contains("DOWN"), "{text}");
    assert!(!text.contains("under-replicated: 0,"), "{text}");
}

#[test]
fn a_tls_metadata_store_works_and_a_wrong_ca_is_refused_clearly() {
    let mut fs = TestFs::start_with("tls", 3, true);
    let mnt = fs.mount();
    fs::write(mnt.join("f"), b"over tls").unwrap();
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"over tls");

    let other_ca = fs.dir.path().join("other-ca");
    cluster::tls::CaMaterial::create().unwrap().write(&other_ca).unwrap();
    let out = Command::new(BINARY)
        .args(["status", "--meta", &fs.meta, "--meta-ca"])
        .arg(other_ca.join("ca.pem"))
        .env("FS_AGENT_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "the error names the certificate problem: {stderr}");
    let ok = Command::new(BINARY).args(["status", "--meta", &fs.meta, "--meta-ca"]).arg(fs.meta_ca.as_ref().unwrap()).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

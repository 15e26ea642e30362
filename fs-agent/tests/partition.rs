//! A real network partition: storage in one network namespace, nodes A and B in their own,
//! linked by veths on a bridge. Node A is cut off after writing; node B takes the file's
//! lease over and writes; when A's link comes back, A's writes fail and B's data is intact.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{is_fuse_mount, pattern, wait_until, BINARY};

const STORE: &str = "10.200.0.1:7000";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Three network namespaces (storage, node A, node B) and everything started in them;
/// dropping it unmounts, kills and deletes all of it.
struct Lab {
    dir: tempfile::TempDir,
    netns: Vec<String>,
    processes: Vec<Child>,
    mounts: Vec<PathBuf>,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::Builder::new().prefix(&format!("fs-agent-partition-{}-", std::process::id())).tempdir().unwrap();
        let mut lab = Lab { dir, netns: vec![], processes: vec![], mounts: vec![] };
        let storage = lab.add_netns("s");
        ip(&["-n", &storage, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &storage, "addr", "add", "10.200.0.1/24", "dev", "br0"]);
        ip(&["-n", &storage, "link", "set", "br0", "up"]);
        for (node, address) in [("a", "10.200.0.2/24"), ("b", "10.200.0.3/24")] {
            let ns = lab.add_netns(node);
            let port = format!("v{node}");
            ip(&["-n", &storage, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &storage, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", address, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        lab
    }

    fn add_netns(&mut self, role: &str) -> String {
        let name = format!("fsa-{}-{role}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        self.netns.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    fn netns(&self, role: &str) -> String {
        format!("fsa-{}-{role}", std::process::id())
    }

    /// Runs `fs-agent ARGS` inside network namespace `role` (only the network: mounts stay
    /// visible here).
    fn command(&self, role: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns(role))).arg(BINARY).args(args);
        cmd
    }

    fn spawn(&mut self, role: &str, args: &[&str], log: &str) {
        let log = fs::File::create(self.dir.path().join(log)).unwrap();
        let child = self.command(role, args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        self.processes.push(child);
    }

    fn mount(&mut self, role: &str) -> PathBuf {
        let path = self.dir.path().join(format!("mnt-{role}"));
        fs::create_dir_all(&path).unwrap();
        let node_id = format!("node-{role}");
        let args = ["mount", "--meta", STORE, "--chunk-size", "1048576", "--node-id", &node_id, path.to_str().unwrap()];
        self.spawn(role, &args, &format!("mount-{role}.log"));
        self.mounts.push(path.clone());
        wait_until("the mount", Duration::from_secs(60), || is_fuse_mount(&path));
        path
    }

    fn set_link(&self, node: &str, up: bool) {
        ip(&["-n", &self.netns("s"), "link", "set", &format!("v{node}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mount in &self.mounts {
            let _ = nix::mount::umount2(mount.as_path(), nix::mount::MntFlags::MNT_DETACH);
        }
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn wait_for_store(lab: &Lab) {
    wait_until("the storage to come up", Duration::from_secs(60), || {
        lab.command("a", &["status", "--meta", STORE]).output().map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).matches(" up,").count() == 3).unwrap_or(false)
    });
}

#[test]
fn a_partitioned_writer_is_fenced_after_another_node_takes_its_file() {
    let mut lab = Lab::new();
    let meta_dir = lab.dir.path().join("meta");
    lab.spawn("s", &["meta-server", "--data-dir", meta_dir.to_str().unwrap(), "--client-addr", STORE, "--peer-addr", "10.200.0.1:7001"], "meta.log");
    for i in 1..=3 {
        let data = lab.dir.path().join(format!("chunks-{i}"));
        let listen = format!("10.200.0.1:710{i}");
        lab.spawn("s", &["chunkserver", "--listen", &listen, "--data", data.to_str().unwrap(), "--meta", STORE], &format!("chunkserver-{i}.log"));
    }
    wait_for_store(&lab);
    let node_a = lab.mount("a");
    let node_b = lab.mount("b");

    let first = pattern(31, 500_000);
    let on_a = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(node_a.join("disk.img")).unwrap();
    on_a.write_all_at(&first, 0).unwrap();
    on_a.sync_all().unwrap();

    // Node A drops off the network; node B takes the file over and writes.
    lab.set_link("a", false);
    let takeover = lab.command("b", &["lease-takeover", "--meta", STORE, "/disk.img"]).output().unwrap();
    assert!(takeover.status.success(), "{}", String::from_utf8_lossy(&takeover.stderr));
    let second = pattern(32, 400_000);
    let on_b = OpenOptions::new().write(true).truncate(true).open(node_b.join("disk.img")).unwrap();
    on_b.write_all_at(&second, 0).unwrap();
    on_b.sync_all().unwrap();
    drop(on_b);

    // A's link comes back: its writes are refused, never landed.
    lab.set_link("a", true);
    let late = on_a.write_all_at(b"late write from the partitioned node", 0).and_then(|()| on_a.sync_all());
    assert_eq!(late.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    drop(on_a);
    assert_eq!(fs::read(node_b.join("disk.img")).unwrap(), second);
    let fresh = fs::read(Path::new(&node_a).join("disk.img")).unwrap();
    assert_eq!(fresh, second, "node A, reconnected, reads B's data too");
}

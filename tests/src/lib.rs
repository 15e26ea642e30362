//! Shared harness of the system tests: a whole node in its own network
//! namespace, driven through the real `vectl` binary, torn down on drop
//! (VEs, daemons, mounts, cgroups, namespaces) even when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Path of a binary of this workspace, built next to the test binaries.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    let profile = deps.parent().expect("profile dir");
    let candidate = profile.join(name);
    assert!(
        candidate.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        candidate.display()
    );
    candidate
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Where the system tests find templates (built by scripts/test).
pub const TEMPLATES_DIR: &str = "/var/lib/vz/templates";

/// Builds a template if it is missing or stale (the builder skips it otherwise).
pub fn ensure_template(name: &str) {
    let status = Command::new(repo_root().join("images/build"))
        .arg(name)
        .arg("--out")
        .arg(TEMPLATES_DIR)
        .stdout(Stdio::null())
        .status()
        .expect("run images/build");
    assert!(status.success(), "images/build {name} failed");
}

pub fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    output
}

pub fn sh(script: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(script))
}

/// A node: its own network namespace with its bridge, state and run dirs,
/// cgroup parent and procfs mountpoint, so tests never collide.
pub struct TestNode {
    pub id: String,
    pub netns: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub cgroup_parent: String,
    pub bridge: String,
    pub clients: Vec<String>,
}

impl TestNode {
    pub fn new() -> TestNode {
        let n = NODE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}{n}", std::process::id());
        let netns = format!("vzt-node-{id}");
        let dir = PathBuf::from(format!("/tmp/vzt-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup_parent = format!("vzt-{id}");
        let bridge = format!("vzbr{id}").chars().take(15).collect::<String>();
        let config_path = dir.join("node.toml");
        std::fs::write(
            &config_path,
            format!(
                "state_dir = \"{dir}/state\"\nrun_dir = \"{dir}/run\"\ntemplates_dir = \"{TEMPLATES_DIR}\"\n\
                 cgroup_parent = \"{cgroup_parent}\"\nprocfs_mountpoint = \"{dir}/run/procfs\"\n\
                 [network]\nbridge = \"{bridge}\"\nipv4_gateway = \"10.213.0.1/24\"\n\
                 ipv6_gateway = \"fd00:213::1/64\"\nnat_outbound = false\ndns_servers = [\"10.213.0.1\"]\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let node = TestNode { id, netns, dir, config_path, cgroup_parent, bridge, clients: Vec::new() };
        let out = run(Command::new("ip").args(["netns", "add", &node.netns]));
        assert!(out.status.success(), "ip netns add: {}", String::from_utf8_lossy(&out.stderr));
        run(Command::new("ip").args(["-n", &node.netns, "link", "set", "lo", "up"]));
        node
    }

    /// A `vectl` command running in the node's network namespace.
    pub fn vectl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(workspace_binary("vectl"))
            .args(args)
            .env("VZ_CONFIG", &self.config_path);
        command
    }

    /// Runs vectl; returns its output whatever the exit status.
    pub fn vectl(&self, args: &[&str]) -> Output {
        run(&mut self.vectl_command(args))
    }

    /// Runs vectl and panics with its stderr unless it succeeds.
    pub fn vectl_ok(&self, args: &[&str]) -> String {
        let out = self.vectl(args);
        assert!(
            out.status.success(),
            "vectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell command inside a VE; returns (exit code, stdout, stderr).
    pub fn exec(&self, ve: &str, script: &str) -> (i32, String, String) {
        let out = self.vectl(&["exec", ve, "--", "/bin/sh", "-c", script]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Creates and starts a busybox VE with a fixed address.
    pub fn busybox_ve(&self, name: &str, ip: &str, extra: &[&str]) {
        ensure_template("busybox");
        let mut args = vec!["create", name, "--template", "busybox", "--ip", ip, "--start"];
        for (flag, default) in [("--memory", "128M"), ("--disk", "64M")] {
            if !extra.contains(&flag) {
                args.extend([flag, default]);
            }
        }
        args.extend_from_slice(extra);
        self.vectl_ok(&args);
    }

    /// A client network namespace plugged into the node's bridge with `ip`,
    /// playing a machine of the LAN or the internet.
    pub fn client(&mut self, ip_cidr: &str) -> String {
        let name = format!("vzt-cl{}-{}", self.clients.len(), self.id);
        let host_if = format!("vzc{}{}", self.clients.len(), self.id).chars().take(15).collect::<String>();
        let script = format!(
            "set -e; ip netns add {name}; ip -n {name} link set lo up; \
             ip link add {host_if} netns {node} type veth peer name eth0 netns {name}; \
             ip -n {node} link set {host_if} master {bridge} up; \
             ip -n {name} addr add {ip_cidr} dev eth0; ip -n {name} link set eth0 up",
            node = self.netns,
            bridge = self.bridge
        );
        let out = sh(&script);
        assert!(out.status.success(), "client netns: {}", String::from_utf8_lossy(&out.stderr));
        self.clients.push(name.clone());
        name
    }

    /// Runs a shell command in a client namespace.
    pub fn in_client(&self, client: &str, script: &str) -> Output {
        run(Command::new("ip").args(["netns", "exec", client, "sh", "-c", script]))
    }

    fn cleanup(&mut self) {
        // Stop and destroy every VE the test left.
        let list = self.vectl(&["list", "--json"]);
        if let Ok(ves) = serde_json::from_slice::<serde_json::Value>(&list.stdout) {
            for ve in ves.as_array().into_iter().flatten() {
                if let Some(name) = ve["spec"]["name"].as_str() {
                    let out = self.vectl(&["destroy", "--force", name]);
                    if !out.status.success() {
                        eprintln!("cleanup: destroy {name}: {}", String::from_utf8_lossy(&out.stderr));
                    }
                }
            }
        }
        // The node's ve-procfs daemon.
        let mountpoint = self.dir.join("run/procfs");
        sh(&format!("pkill -f -- '--mountpoint {}' ; sleep 0.1; umount -l {} 2>/dev/null", mountpoint.display(), mountpoint.display()));
        for client in &self.clients {
            run(Command::new("ip").args(["netns", "del", client]));
        }
        run(Command::new("ip").args(["netns", "del", &self.netns]));
        for controller in ["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "systemd", "unified"] {
            let path = Path::new("/sys/fs/cgroup").join(controller).join(&self.cgroup_parent);
            if path.exists() {
                // Children first.
                sh(&format!("find {} -depth -type d -exec rmdir {{}} \\; 2>/dev/null", path.display()));
            }
        }
        sh(&format!("grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null", self.dir.display()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestNode {
    /// Host pid of a VE's init, or None when it is stopped.
    pub fn init_pid(&self, ve: &str) -> Option<i64> {
        let info: serde_json::Value = serde_json::from_str(&self.vectl_ok(&["show", ve])).unwrap();
        info["init_pid"].as_i64()
    }
}

/// Polls `check` until it holds, panicking after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The node agent (`vz-node run`) of a test node, killed on drop.
pub struct NodeAgent(std::process::Child);

impl NodeAgent {
    pub fn start(node: &TestNode) -> NodeAgent {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(workspace_binary("vz-node"))
            .args(["run", "--interval", "0.2"])
            .env("VZ_CONFIG", &node.config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vz-node");
        NodeAgent(child)
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Default for TestNode {
    fn default() -> Self {
        TestNode::new()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.cleanup();
    }
}

//! Shared helpers for the root tests: a busybox bundle, a unique container per
//! test with its own state root, and a Drop guard that removes it even when
//! the test panics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};
use ve_runtime::{policy, Runtime};

/// Host uid/gid that the container's root maps to.
pub const ROOT_HOST_ID: u32 = 100000;
pub const RUNTIME: &str = env!("CARGO_BIN_EXE_ve-runtime");
pub const ATTACK: &str = env!("CARGO_BIN_EXE_ve-attack");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A container id unique across tests and concurrent test runs.
pub fn unique_id(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// What a CLI invocation printed.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the CLI with stdout/stderr in files: a created container inherits
/// them, so pipes would stay open as long as it lives.
pub fn cli(root: &Path, args: &[&str]) -> CliOutput {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let err = dir.path().join("err");
    let status = Command::new(RUNTIME)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    CliOutput {
        success: status.success(),
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// The VE config the node agent would write: policy defaults, all namespaces,
/// root mapped to 100000..165535, busybox `sleep` as init.
pub fn ve_config(id: &str) -> Value {
    let mut mounts = serde_json::to_value(policy::default_mounts()).unwrap();
    // The attack helper is a dynamically linked Rust program: lend it the host's libraries, read-only.
    for lib in ["/usr/lib", "/usr/lib64"] {
        mounts.as_array_mut().unwrap().push(json!({
            "destination": lib, "type": "bind", "source": lib, "options": ["rbind", "ro", "nosuid", "nodev"]
        }));
    }
    let caps = serde_json::to_value(policy::default_capabilities()).unwrap();
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": format!("ve-{}", &id[..id.len().min(40)]),
        "process": {
            "args": ["sleep", "100000"],
            "cwd": "/",
            "env": ["PATH=/bin:/usr/bin", "TERM=xterm"],
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}],
            "noNewPrivileges": false
        },
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"},
                           {"type": "network"}, {"type": "user"}, {"type": "cgroup"}],
            "uidMappings": [{"containerID": 0, "hostID": ROOT_HOST_ID, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": ROOT_HOST_ID, "size": 65536}],
            "cgroupsPath": format!("/ve-runtime-test/{id}"),
            "resources": {"pids": {"limit": 512}},
            "seccomp": serde_json::to_value(policy::default_seccomp()).unwrap(),
            "maskedPaths": policy::default_masked_paths(),
            "readonlyPaths": policy::default_readonly_paths()
        }
    })
}

fn chown_tree(path: &Path) {
    std::os::unix::fs::lchown(path, Some(ROOT_HOST_ID), Some(ROOT_HOST_ID)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path());
        }
    }
}

/// Writes a bundle: rootfs with busybox + applets + ve-attack, owned by the mapped root.
pub fn write_bundle(bundle: &Path, config: &Value) {
    let rootfs = bundle.join("rootfs");
    for dir in [
        "bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "etc",
        "root",
        "usr/lib",
        "usr/lib64",
        "mnt",
    ] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::fs::copy(ATTACK, rootfs.join("bin/ve-attack")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
    std::os::unix::fs::symlink("usr/lib", rootfs.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", rootfs.join("lib64")).unwrap();
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\ntty:x:5:\n").unwrap();
    chown_tree(&rootfs);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
}

/// A test container: own state root and bundle in a tempdir; Drop force-deletes it.
pub struct TestVe {
    pub id: String,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestVe {
    /// Prepares the bundle (not created yet). `edit` adjusts the config.
    pub fn new(name: &str, edit: impl FnOnce(&mut Value)) -> Self {
        let id = unique_id(name);
        let dir = tempfile::Builder::new()
            .prefix("ve-runtime-test-")
            .tempdir()
            .unwrap();
        // The container's root must be able to reach the rootfs.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let root = dir.path().join("state");
        let bundle = dir.path().join("bundle");
        let mut config = ve_config(&id);
        edit(&mut config);
        write_bundle(&bundle, &config);
        Self {
            id,
            root,
            bundle,
            dir,
        }
    }

    pub fn runtime(&self) -> Runtime {
        Runtime::new(&self.root)
    }

    pub fn cli(&self, args: &[&str]) -> CliOutput {
        cli(&self.root, args)
    }

    /// create + start through the CLI; panics with the error on failure.
    pub fn create_and_start(&self) {
        let out = self.cli(&[
            "create",
            "--bundle",
            self.bundle.to_str().unwrap(),
            &self.id,
        ]);
        assert!(out.success, "create failed: {}", out.stderr);
        let out = self.cli(&["start", &self.id]);
        assert!(out.success, "start failed: {}", out.stderr);
    }

    /// Runs a shell command inside the container.
    pub fn sh(&self, script: &str) -> CliOutput {
        self.cli(&["exec", &self.id, "/bin/sh", "-c", script])
    }

    pub fn init_pid(&self) -> i32 {
        self.runtime().state(&self.id).unwrap().pid
    }

    /// The container's cgroup directory under a v1 controller.
    pub fn cgroup_dir(&self, controller: &str) -> PathBuf {
        PathBuf::from(format!(
            "/sys/fs/cgroup/{controller}/ve-runtime-test/{}",
            self.id
        ))
    }
}

impl Drop for TestVe {
    fn drop(&mut self) {
        let runtime = self.runtime();
        if runtime.state(&self.id).is_ok() {
            if let Err(e) = runtime.delete(&self.id, true) {
                eprintln!("cleanup of {} failed: {e}", self.id);
            }
        }
    }
}

//! The node-wide helper daemons VEs rely on, started on demand: one
//! `ve-procfs` per node (never one per VE) serving the VEs' /proc views.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::NodeConfig;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot find the {0} binary next to this program or in PATH")]
    BinaryMissing(&'static str),
    #[error("cannot start {name}: {source}")]
    Spawn { name: &'static str, source: std::io::Error },
    #[error("{name} did not mount {mountpoint} within {seconds} s; see {log}")]
    NotReady { name: &'static str, mountpoint: PathBuf, seconds: u64, log: PathBuf },
}

/// Finds a sibling binary of the running program, else one in PATH.
pub fn find_binary(name: &'static str) -> Result<PathBuf, DaemonError> {
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        // Test binaries live in target/<profile>/deps, the daemons one level up.
        if let Some(up) = dir.parent() {
            let candidate = up.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(DaemonError::BinaryMissing(name))
}

/// Whether a live FUSE filesystem is mounted at `mountpoint`.
pub fn fuse_mounted(mountpoint: &Path) -> bool {
    let mounts = crate::disk::mountinfo::read().unwrap_or_default();
    let listed = crate::disk::mountinfo::mount_at(&mounts, mountpoint).is_some_and(|m| m.fs_type.starts_with("fuse"));
    // A mount whose daemon died answers ENOTCONN: not live.
    listed && std::fs::metadata(mountpoint).is_ok()
}

/// Makes sure the node's `ve-procfs` daemon serves its mountpoint, starting
/// it detached from the caller if needed. Returns whether views are served.
pub fn ensure_procfs(config: &NodeConfig) -> Result<bool, DaemonError> {
    let mountpoint = &config.procfs_mountpoint;
    if fuse_mounted(mountpoint) {
        return Ok(true);
    }
    let binary = find_binary("ve-procfs")?;
    let _ = std::fs::create_dir_all(&config.run_dir);
    let log = config.run_dir.join("ve-procfs.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|source| DaemonError::Spawn { name: "ve-procfs", source })?;
    let mut command = Command::new(&binary);
    command
        .arg("--mountpoint")
        .arg(mountpoint)
        .arg("--cgroup-parent")
        .arg(&config.cgroup_parent)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|source| DaemonError::Spawn { name: "ve-procfs", source })?)
        .stderr(log_file);
    // The daemon outlives this process and its session: VEs keep using it.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::setsid();
            Ok(())
        });
    }
    command.spawn().map_err(|source| DaemonError::Spawn { name: "ve-procfs", source })?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if fuse_mounted(mountpoint) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(DaemonError::NotReady { name: "ve-procfs", mountpoint: mountpoint.clone(), seconds: 5, log })
}

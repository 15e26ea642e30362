//! Per-VE /proc views, served by the node's single `ve-procfs` daemon (like lxcfs).
//!
//! Inside a VE, `free`, `top`, `uptime` and `cat /proc/meminfo` must show the
//! VE's own limits and uptime. One FUSE filesystem per node, mounted at
//! [`DEFAULT_MOUNTPOINT`], exposes `/<ve-id>/{meminfo,cpuinfo,stat,uptime,
//! loadavg,swaps,diskstats,cpu_online}` for every VE cgroup `<parent>/<ve-id>`;
//! each VE bind-mounts its files over /proc/<file> ([`proc_view_mounts`]) and
//! optionally /sys/devices/system/cpu/online ([`sys_view_mounts`]).
//!
//! - [`cgroup_files`], [`host_files`]: pure parsers of cgroup and host /proc files.
//! - [`render`]: pure renderers of each view from parsed inputs.
//! - [`loadavg`]: per-VE load averages (an approximation, see there).
//! - [`sources`]: reads a VE's cgroup (v1 or v2) and the host's /proc.
//! - [`views`]: the served files and how each is assembled.
//! - [`filesystem`]: the thin FUSE layer.
//! - [`daemon`]: mount, stale-mount recovery, signals.
//! - [`rebind`]: re-binds a running VE's views after a daemon restart.
//!
//! See docs/proc-views.md for what is virtualized and the approximations.

pub mod cgroup_files;
pub mod daemon;
pub mod filesystem;
pub mod host_files;
pub mod loadavg;
pub mod rebind;
pub mod render;
pub mod sources;
pub mod views;

use std::path::{Path, PathBuf};

pub use daemon::{run, DaemonError, DaemonOptions};
pub use rebind::{rebind_views, RebindError};
pub use views::ViewFile;

/// Where the node's daemon mounts the views unless told otherwise.
pub const DEFAULT_MOUNTPOINT: &str = "/run/vz/procfs";
/// Cgroup directory holding one child cgroup per VE.
pub const DEFAULT_CGROUP_PARENT: &str = "vz";

/// The bind mounts a VE needs: (file served by the daemon, path inside the VE).
/// Add each as an OCI mount `{"destination": target, "type": "bind",
/// "source": source, "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}`
/// after the VE's /proc mount.
pub fn proc_view_mounts(procfs_root: &Path, ve_id: &str) -> Vec<(PathBuf, &'static str)> {
    view_mounts(procfs_root, ve_id, |target| target.starts_with("/proc/"))
}

/// Optional bind mounts under /sys (cpu_online over /sys/devices/system/cpu/online,
/// so sysconf(_SC_NPROCESSORS_ONLN) counts the VE's cpus). Only for VEs with /sys
/// mounted: the target must exist. Same OCI mount entry as [`proc_view_mounts`].
pub fn sys_view_mounts(procfs_root: &Path, ve_id: &str) -> Vec<(PathBuf, &'static str)> {
    view_mounts(procfs_root, ve_id, |target| !target.starts_with("/proc/"))
}

fn view_mounts(
    procfs_root: &Path,
    ve_id: &str,
    wanted: impl Fn(&str) -> bool,
) -> Vec<(PathBuf, &'static str)> {
    ViewFile::ALL
        .into_iter()
        .filter(|file| wanted(file.target_in_ve()))
        .map(|file| {
            (
                procfs_root.join(ve_id).join(file.file_name()),
                file.target_in_ve(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_cover_every_view() {
        let mounts = proc_view_mounts(Path::new("/run/vz/procfs"), "web1");
        let sys = sys_view_mounts(Path::new("/run/vz/procfs"), "web1");
        assert_eq!(mounts.len() + sys.len(), ViewFile::ALL.len());
        assert_eq!(
            sys,
            vec![(
                PathBuf::from("/run/vz/procfs/web1/cpu_online"),
                "/sys/devices/system/cpu/online"
            )]
        );
        assert_eq!(
            mounts[0],
            (
                PathBuf::from("/run/vz/procfs/web1/meminfo"),
                "/proc/meminfo"
            )
        );
        assert!(mounts
            .iter()
            .any(|(source, target)| source.ends_with("web1/uptime") && *target == "/proc/uptime"));
    }
}

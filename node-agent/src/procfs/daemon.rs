//! Lifecycle of the node's `ve-procfs` daemon: prepare the mountpoint (clearing
//! a stale mount left by a crashed daemon), mount, serve, unmount on SIGTERM/SIGINT.

use std::io;
use std::path::{Path, PathBuf};

use fuser::{Config, MountOption, SessionACL};
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, Signal};

use super::filesystem::ProcViewFs;
use super::sources::{CgroupFiles, CgroupLayout, SourceError};
use super::views::ProcViews;

/// Source (and subtype) shown in /proc/mounts: `ve-procfs`.
pub const FS_SUBTYPE: &str = "ve-procfs";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create mountpoint {path}: {source}")]
    CreateMountpoint { path: PathBuf, source: io::Error },
    #[error("cannot inspect mountpoint {path}: {source}")]
    InspectMountpoint { path: PathBuf, source: io::Error },
    #[error("cannot detach the stale FUSE mount at {path} left by a crashed ve-procfs: {source}")]
    DetachStale { path: PathBuf, source: Errno },
    #[error("{path} is already served by a running ve-procfs; stop it first (or pick another --mountpoint)")]
    AlreadyServed { path: PathBuf },
    #[error("cannot find the VE cgroups: {0}")]
    Cgroups(#[from] SourceError),
    #[error("cannot mount the FUSE filesystem at {path}: {source} (is /dev/fuse available and are we root?)")]
    Mount { path: PathBuf, source: io::Error },
    #[error("FUSE session at {path} failed: {source}")]
    Session { path: PathBuf, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(Errno),
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub mountpoint: PathBuf,
    /// Cgroup directory holding one child per VE (`vz` → /sys/fs/cgroup/memory/vz/<id>).
    pub cgroup_parent: String,
    /// Where cgroup filesystems are mounted.
    pub cgroup_root: PathBuf,
    /// FUSE worker threads.
    pub threads: usize,
}

impl DaemonOptions {
    pub fn new(mountpoint: impl Into<PathBuf>, cgroup_parent: &str) -> Self {
        DaemonOptions {
            mountpoint: mountpoint.into(),
            cgroup_parent: cgroup_parent.to_string(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            threads: 4,
        }
    }
}

/// Whether `mount_point` (as in /proc/self/mountinfo) carries a ve-procfs mount.
/// Pure: takes the mountinfo text.
pub fn is_procfs_mounted_at(mountinfo: &str, mount_point: &Path) -> bool {
    let wanted = mount_point.to_string_lossy();
    mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(separator) = fields.iter().position(|field| *field == "-") else {
            return false;
        };
        // Field 5 is the mount point (octal-escaped); after "-" comes the fs type.
        let point = fields
            .get(4)
            .map(|point| unescape_mountinfo(point))
            .unwrap_or_default();
        // The pure-Rust mount leaves the type "fuse" and names us as the source.
        let fs_type = fields.get(separator + 1).copied().unwrap_or("");
        let source = fields.get(separator + 2).copied().unwrap_or("");
        point == wanted
            && (fs_type == "fuse" || fs_type == format!("fuse.{FS_SUBTYPE}"))
            && source == FS_SUBTYPE
    })
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Creates the mountpoint, and lazily unmounts a dead FUSE mount there (ENOTCONN:
/// its daemon crashed). Refuses if a live ve-procfs already serves it.
pub fn prepare_mountpoint(path: &Path) -> Result<PathBuf, DaemonError> {
    match std::fs::metadata(path) {
        Err(error) if error.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(path = %path.display(), "detaching stale FUSE mount left by a previous ve-procfs");
            umount2(path, MntFlags::MNT_DETACH).map_err(|source| DaemonError::DetachStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|source| DaemonError::CreateMountpoint {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(source) => {
            return Err(DaemonError::InspectMountpoint {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => {}
    }
    let canonical = path
        .canonicalize()
        .map_err(|source| DaemonError::InspectMountpoint {
            path: path.to_path_buf(),
            source,
        })?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        DaemonError::InspectMountpoint {
            path: path.to_path_buf(),
            source,
        }
    })?;
    if is_procfs_mounted_at(&mountinfo, &canonical) {
        return Err(DaemonError::AlreadyServed { path: canonical });
    }
    Ok(canonical)
}

fn fuse_config(threads: usize) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
        MountOption::FSName(FS_SUBTYPE.to_string()),
        MountOption::Subtype(FS_SUBTYPE.to_string()),
    ];
    // allow_other: VE processes run as other (mapped) uids.
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config
}

/// Mounts the filesystem and serves it until SIGTERM or SIGINT, then unmounts.
/// `on_ready` runs once the mount is live (used to signal a waiting parent).
pub fn run(options: &DaemonOptions, on_ready: impl FnOnce()) -> Result<(), DaemonError> {
    let layout = CgroupLayout::detect(&options.cgroup_root)?;
    let cgroups = CgroupFiles::new(layout, &options.cgroup_parent);
    let mountpoint = prepare_mountpoint(&options.mountpoint)?;

    // Block the stop signals in every thread; one thread waits for them.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    stop_signals.thread_block().map_err(DaemonError::Signals)?;

    tracing::info!(
        mountpoint = %mountpoint.display(),
        cgroups = %cgroups.parent_dir().display(),
        "serving per-VE /proc views"
    );
    let filesystem = ProcViewFs::new(ProcViews::new(cgroups));
    let notifier_slot = filesystem.notifier_slot();
    let mut session = fuser::Session::new(filesystem, &mountpoint, &fuse_config(options.threads))
        .map_err(|source| DaemonError::Mount {
        path: mountpoint.clone(),
        source,
    })?;
    let _ = notifier_slot.set(session.notifier());
    let mut unmounter = session.unmount_callable();
    let signal_mountpoint = mountpoint.clone();
    std::thread::Builder::new()
        .name("ve-procfs-signals".into())
        .spawn(move || {
            let signal = stop_signals.wait();
            tracing::info!(?signal, mountpoint = %signal_mountpoint.display(), "stopping: unmounting");
            if let Err(error) = unmounter.unmount() {
                // Busy (a reader holds a file open): detach instead.
                tracing::warn!(%error, "unmount failed, detaching lazily");
                let _ = umount2(&signal_mountpoint, MntFlags::MNT_DETACH);
            }
            // VEs may still hold bind mounts of our files, which keep the FUSE
            // connection alive; exiting closes it, so the session cannot linger.
            std::process::exit(0);
        })
        .map_err(|source| DaemonError::Session { path: mountpoint.clone(), source })?;
    on_ready();
    session.run().map_err(|source| DaemonError::Session {
        path: mountpoint,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_procfs_in_mountinfo() {
        let mountinfo = "\
36 25 0:32 / /run/vz/procfs rw,nosuid,nodev,noexec,relatime shared:1 - fuse.ve-procfs ve-procfs ro,user_id=0,group_id=0,allow_other\n\
37 25 0:33 / /run/other rw - fuse.sshfs host:/ rw\n\
39 25 0:35 / /run/plain ro - fuse ve-procfs ro,allow_other\n\
40 25 0:36 / /run/notours ro - fuse something ro\n\
38 25 0:34 / /tmp/with\\040space rw - fuse.ve-procfs ve-procfs ro\n";
        assert!(is_procfs_mounted_at(mountinfo, Path::new("/run/vz/procfs")));
        assert!(!is_procfs_mounted_at(mountinfo, Path::new("/run/other")));
        assert!(!is_procfs_mounted_at(mountinfo, Path::new("/run/vz")));
        assert!(is_procfs_mounted_at(
            mountinfo,
            Path::new("/tmp/with space")
        ));
        assert!(is_procfs_mounted_at(mountinfo, Path::new("/run/plain")));
        assert!(!is_procfs_mounted_at(mountinfo, Path::new("/run/notours")));
        assert!(!is_procfs_mounted_at(
            "garbage\n\n",
            Path::new("/run/vz/procfs")
        ));
    }

    #[test]
    fn prepare_creates_missing_mountpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("a").join("procfs");
        let prepared = prepare_mountpoint(&mountpoint).unwrap();
        assert!(prepared.is_dir());
    }
}

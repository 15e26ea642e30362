//! Re-binds a running VE's /proc views after the daemon was restarted.
//!
//! A VE's bind mounts point at the FUSE connection that existed when it
//! started; if `ve-procfs` dies, they answer ENOTCONN forever. The new daemon
//! cannot revive them, but the node agent can replace them: clone each view
//! file from the new mount as a detached mount (open_tree), enter the VE's
//! mount namespace on a throwaway thread, detach the dead mount over the
//! target and attach the fresh clone there (move_mount). Only that thread
//! changes namespace (after unshare(CLONE_FS)), so the caller is unaffected.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sched::{setns, unshare, CloneFlags};

use super::{proc_view_mounts, sys_view_mounts};

#[derive(Debug, thiserror::Error)]
pub enum RebindError {
    #[error("VE {ve_id}: cannot open the mount namespace of its init (pid {pid}): {source}; is the VE running?")]
    Namespace {
        ve_id: String,
        pid: u32,
        source: std::io::Error,
    },
    #[error(
        "VE {ve_id}: cannot clone view {source_path} (is ve-procfs serving this VE?): {errno}"
    )]
    CloneView {
        ve_id: String,
        source_path: PathBuf,
        errno: Errno,
    },
    #[error("VE {ve_id}: cannot enter its mount namespace: {errno}")]
    EnterNamespace { ve_id: String, errno: Errno },
    #[error("VE {ve_id}: cannot mount the view over {target} inside the VE: {errno}")]
    Attach {
        ve_id: String,
        target: &'static str,
        errno: Errno,
    },
    #[error("VE {ve_id}: the rebind thread panicked")]
    ThreadPanicked { ve_id: String },
}

fn path_cstring(path: &Path) -> CString {
    // Paths from proc_view_mounts never contain NUL; fall back to an empty (invalid) path.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Clones the mount at `path` into a detached mount, returned as an fd.
fn clone_detached(path: &Path) -> Result<OwnedFd, Errno> {
    let path = path_cstring(path);
    // SAFETY: open_tree takes a valid NUL-terminated path and flags; it returns a new fd
    // or -1, and does not touch our memory otherwise.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the detached mount `tree` at `target` in the current mount namespace.
fn attach_detached(tree: &OwnedFd, target: &str) -> Result<(), Errno> {
    let empty = CString::default();
    let target = CString::new(target).map_err(|_| Errno::EINVAL)?;
    // SAFETY: both paths are valid NUL-terminated strings and `tree` is an open fd;
    // move_mount only reads them.
    let result = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    };
    if result < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A daemon that just mounted may not answer for a moment (its mount is
/// listed before the stale one is gone, or before it serves): retry the
/// errors of that window for up to two seconds.
fn clone_when_served(source_path: &Path) -> Result<OwnedFd, Errno> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match clone_detached(source_path) {
            Err(Errno::ENOENT | Errno::ENOTCONN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Replaces the VE's /proc view bind mounts with fresh ones from the daemon now
/// mounted at `procfs_root`. `ve_init_pid` is the VE's init as seen from the host.
/// Safe to call when the views are healthy too: they are simply replaced.
pub fn rebind_views(ve_init_pid: u32, procfs_root: &Path, ve_id: &str) -> Result<(), RebindError> {
    let namespace_path = format!("/proc/{ve_init_pid}/ns/mnt");
    let namespace = File::open(&namespace_path).map_err(|source| RebindError::Namespace {
        ve_id: ve_id.to_string(),
        pid: ve_init_pid,
        source,
    })?;
    // Clone every view first, in our namespace: nothing in the VE changes if one fails.
    let mut clones = Vec::new();
    let proc_views = proc_view_mounts(procfs_root, ve_id)
        .into_iter()
        .map(|(source, target)| (source, target, true));
    // /sys views are optional: replaced only where the VE has one mounted.
    let sys_views = sys_view_mounts(procfs_root, ve_id)
        .into_iter()
        .map(|(source, target)| (source, target, false));
    for (source_path, target, always) in proc_views.chain(sys_views) {
        let tree = clone_when_served(&source_path).map_err(|errno| RebindError::CloneView {
            ve_id: ve_id.to_string(),
            source_path: source_path.clone(),
            errno,
        })?;
        clones.push((tree, target, always));
    }
    let ve = ve_id.to_string();
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<(), RebindError> {
                // setns(CLONE_NEWNS) needs a private fs context in a multithreaded process.
                unshare(CloneFlags::CLONE_FS).map_err(|errno| RebindError::EnterNamespace {
                    ve_id: ve.clone(),
                    errno,
                })?;
                setns(&namespace, CloneFlags::CLONE_NEWNS).map_err(|errno| {
                    RebindError::EnterNamespace {
                        ve_id: ve.clone(),
                        errno,
                    }
                })?;
                for (tree, target, always) in &clones {
                    // Drop the dead view if one is mounted there (EINVAL: nothing mounted).
                    let was_mounted = match umount2(*target, MntFlags::MNT_DETACH) {
                        Ok(()) => true,
                        Err(Errno::EINVAL) | Err(Errno::ENOENT) => false,
                        Err(errno) => {
                            tracing::warn!(ve_id = %ve, target, %errno, "cannot detach old view");
                            true
                        }
                    };
                    if !was_mounted && !always {
                        continue;
                    }
                    attach_detached(tree, target).map_err(|errno| RebindError::Attach {
                        ve_id: ve.clone(),
                        target,
                        errno,
                    })?;
                }
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(RebindError::ThreadPanicked {
                    ve_id: ve_id.to_string(),
                })
            })
    })
}

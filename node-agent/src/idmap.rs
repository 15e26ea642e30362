//! Idmapped bind mounts: a VE's disk seen through its uid range.
//!
//! Files in a VE image are owned by uid/gid 0..65535. The VE runs in a user
//! namespace mapping its root to host uid `base`. An idmapped bind mount of
//! the disk (open_tree + mount_setattr(MOUNT_ATTR_IDMAP) + move_mount, Linux
//! 5.12+) shows file uid `n` as host uid `base + n` and stores writes by host
//! uid `base + n` as `n`, so images move between nodes and uid ranges without
//! a chown.
//!
//! The idmap is taken from a user namespace whose uid_map/gid_map are
//! `0 base count`: a throwaway namespace made by a short-lived child process.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::MntFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::disk::mountinfo;

// <linux/mount.h>: not wrapped by nix 0.29.
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// struct mount_attr (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("invalid id mapping for {target}: {message}")]
    InvalidMapping { target: PathBuf, message: String },
    #[error("cannot idmap-mount {source_dir} at {target}: {target} does not exist or is not a directory")]
    TargetMissing {
        source_dir: PathBuf,
        target: PathBuf,
    },
    #[error("cannot idmap-mount {source_dir} at {target}: {what} is already mounted there (unmount it first)")]
    TargetBusy {
        source_dir: PathBuf,
        target: PathBuf,
        what: String,
    },
    #[error("cannot create a user namespace for the idmap of {target}: {message}")]
    UserNamespace { target: PathBuf, message: String },
    #[error("cannot idmap-mount {source_dir} at {target}: {step} failed: {error} (needs Linux 5.12+ and a filesystem that supports idmapped mounts, like ext4)")]
    Syscall {
        source_dir: PathBuf,
        target: PathBuf,
        step: &'static str,
        error: io::Error,
    },
    #[error(
        "cannot unmount {target}: {source} (processes still use it? see `fuser -vm {target}`)"
    )]
    Unmount {
        target: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("cannot read the mount table: {0}")]
    MountTable(#[source] io::Error),
}

/// The uid_map/gid_map line for a VE range. Pure.
pub fn mapping_line(host_base: u32, count: u32) -> String {
    format!("0 {host_base} {count}\n")
}

/// Checks a mapping of 0..count to host_base..host_base+count. Pure.
pub fn validate_mapping(host_uid_base: u32, host_gid_base: u32, count: u32) -> Result<(), String> {
    if count == 0 {
        return Err("count is 0".into());
    }
    for (what, base) in [("uid", host_uid_base), ("gid", host_gid_base)] {
        if base == 0 {
            // An identity map would hand the VE the host's own root files.
            return Err(format!(
                "host {what} base is 0: a VE range never starts at host root"
            ));
        }
        if base.checked_add(count).is_none() {
            return Err(format!(
                "host {what} range {base}+{count} overflows 32 bits"
            ));
        }
    }
    Ok(())
}

/// A child process parked in a new user namespace, killed and reaped on drop.
struct ParkedChild(Pid);

impl Drop for ParkedChild {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

/// Opens a user namespace mapping uid/gid 0..count to the host ranges.
///
/// The namespace is made by a child cloned straight into it: with
/// CLONE_FILES the child shares our descriptor table instead of holding
/// copies, so it cannot keep other threads' files (loop devices, locks)
/// open; it only pauses until we have the namespace's fd and kill it.
pub fn user_namespace_fd(
    host_uid_base: u32,
    host_gid_base: u32,
    count: u32,
    target: &Path,
) -> Result<OwnedFd, IdmapError> {
    let fail = |message: String| IdmapError::UserNamespace {
        target: target.to_path_buf(),
        message,
    };
    let flags = (libc::CLONE_NEWUSER | libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork
    // (the child runs on a copy-on-write copy of this stack); the child only
    // calls pause and _exit, raw system calls safe after forking a
    // multithreaded process. Argument order is x86_64's (flags, stack,
    // parent_tid, child_tid, tls).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        return Err(fail(format!(
            "clone(CLONE_NEWUSER): {} (user namespaces disabled? check /proc/sys/user/max_user_namespaces)",
            io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        // SAFETY: child side, see above: no allocation, no locks.
        unsafe {
            loop {
                libc::pause();
            }
        }
    }
    let child = ParkedChild(Pid::from_raw(pid as libc::pid_t));
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // As root in the parent namespace we may write gid_map without denying setgroups.
    fs::write(proc_dir.join("uid_map"), mapping_line(host_uid_base, count))
        .map_err(|e| fail(format!("writing uid_map: {e}")))?;
    fs::write(proc_dir.join("gid_map"), mapping_line(host_gid_base, count))
        .map_err(|e| fail(format!("writing gid_map: {e}")))?;
    let ns =
        File::open(proc_dir.join("ns/user")).map_err(|e| fail(format!("opening ns/user: {e}")))?;
    drop(child);
    Ok(OwnedFd::from(ns))
}

fn syscall_error(source: &Path, target: &Path, step: &'static str) -> IdmapError {
    IdmapError::Syscall {
        source_dir: source.to_path_buf(),
        target: target.to_path_buf(),
        step,
        error: io::Error::last_os_error(),
    }
}

fn c_path(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

/// Bind-mounts `source` at `target` (an existing directory), showing files
/// owned by uid/gid n in `source` as host `base + n` for n < count.
/// Idempotent: an idmapped mount of the same filesystem already at `target`
/// is accepted.
pub fn idmapped_bind(
    source: &Path,
    target: &Path,
    host_uid_base: u32,
    host_gid_base: u32,
    count: u32,
) -> Result<(), IdmapError> {
    validate_mapping(host_uid_base, host_gid_base, count).map_err(|message| {
        IdmapError::InvalidMapping {
            target: target.to_path_buf(),
            message,
        }
    })?;
    if !target.is_dir() {
        return Err(IdmapError::TargetMissing {
            source_dir: source.to_path_buf(),
            target: target.to_path_buf(),
        });
    }
    let canonical_target = fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let canonical_source = fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    let mounts = mountinfo::read().map_err(IdmapError::MountTable)?;
    if let Some(existing) = mountinfo::mount_at(&mounts, &canonical_target) {
        let source_mount = mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == canonical_source);
        let same_fs =
            source_mount.is_some_and(|s| (s.major, s.minor) == (existing.major, existing.minor));
        if same_fs && existing.is_idmapped() {
            tracing::debug!(target = %target.display(), "idmapped mount already in place");
            return Ok(());
        }
        return Err(IdmapError::TargetBusy {
            source_dir: source.to_path_buf(),
            target: target.to_path_buf(),
            what: format!("{} {}", existing.fs_type, existing.source),
        });
    }

    let userns = user_namespace_fd(host_uid_base, host_gid_base, count, target)?;
    let source_c = c_path(source);
    let target_c = c_path(target);
    let empty = c"";
    // SAFETY: open_tree with a valid NUL-terminated path; returns a new fd we own.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    };
    if tree < 0 {
        return Err(syscall_error(source, target, "open_tree"));
    }
    // SAFETY: `tree` is a fresh descriptor nobody else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as libc::c_int) };
    let attr = MountAttr {
        // nodev again: the VE root must never honour device nodes, whatever
        // the source mount says.
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_fd().as_raw_fd() as u64,
    };
    // SAFETY: `attr` is a valid struct mount_attr of the size we pass; the
    // detached tree is ours, so the change is invisible until move_mount.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(syscall_error(
            source,
            target,
            "mount_setattr(MOUNT_ATTR_IDMAP)",
        ));
    }
    // SAFETY: moves the detached tree onto a NUL-terminated target path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        // The tree is still detached: closing `tree` discards it.
        return Err(syscall_error(source, target, "move_mount"));
    }
    tracing::info!(source = %source.display(), target = %target.display(), host_uid_base, host_gid_base, count, "idmapped mount");
    Ok(())
}

/// Unmounts whatever is mounted at `target`. Idempotent: not a mount point
/// (or not there at all) is success.
pub fn unmount(target: &Path) -> Result<(), IdmapError> {
    let Ok(canonical) = fs::canonicalize(target) else {
        return Ok(());
    };
    // Stacked mounts are taken off one by one.
    for _ in 0..16 {
        let mounts = mountinfo::read().map_err(IdmapError::MountTable)?;
        if mountinfo::mount_at(&mounts, &canonical).is_none() {
            return Ok(());
        }
        match nix::mount::umount2(&canonical, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => tracing::debug!(target = %target.display(), "unmounted"),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(source) => {
                return Err(IdmapError::Unmount {
                    target: target.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(IdmapError::Unmount {
        target: target.to_path_buf(),
        source: nix::errno::Errno::EBUSY,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_lines() {
        assert_eq!(mapping_line(200000, 65536), "0 200000 65536\n");
    }

    #[test]
    fn validates_mappings() {
        assert!(validate_mapping(200000, 200000, 65536).is_ok());
        assert!(validate_mapping(200000, 200000, 0)
            .unwrap_err()
            .contains("count"));
        assert!(validate_mapping(0, 200000, 65536)
            .unwrap_err()
            .contains("uid base is 0"));
        assert!(validate_mapping(200000, u32::MAX - 5, 65536)
            .unwrap_err()
            .contains("gid range"));
    }

    #[test]
    fn mount_attr_is_version_0() {
        assert_eq!(std::mem::size_of::<MountAttr>(), 32);
    }
}

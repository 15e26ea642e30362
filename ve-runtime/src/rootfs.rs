//! The container's filesystem view: mounts, a minimal /dev, pivot_root,
//! masked and read-only paths. Runs in the container's init, inside its
//! mount namespace.
//!
//! Destinations are resolved with openat2(RESOLVE_IN_ROOT): the VE's root
//! owns its disk and could plant a symlink (say /proc -> /etc on the host);
//! resolving inside the rootfs keeps every mount inside it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};

use crate::mounts::MountSpec;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot {action} {path}: {errno}")]
    Sys {
        action: &'static str,
        path: PathBuf,
        errno: Errno,
    },
    #[error(
        "linux.devices: {path}: no host device {kind} {major}:{minor} to bind (looked at {host})"
    )]
    NoHostDevice {
        path: PathBuf,
        kind: char,
        major: i64,
        minor: i64,
        host: PathBuf,
    },
    #[error("linux.devices: {0}: fileMode/uid/gid differ from the host node; devices are bind-mounted and keep the host's")]
    DeviceOwnership(PathBuf),
}

fn sys(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(Errno) -> RootfsError {
    let path = path.into();
    move |errno| RootfsError::Sys {
        action,
        path,
        errno,
    }
}

/// Everything the init needs to build the container's filesystem.
#[derive(Debug, Clone)]
pub struct RootfsPlan {
    pub rootfs: PathBuf,
    pub readonly: bool,
    pub propagation: MsFlags,
    pub mounts: Vec<MountSpec>,
    pub devices: Vec<LinuxDevice>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
}

const DEFAULT_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes())
        .unwrap_or_else(|_| CString::new("/invalid\u{1}path").unwrap())
}

/// struct open_how of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// openat2(root, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS).
fn open_in_root(root: &OwnedFd, path: &Path, flags: OFlag, mode: u32) -> Result<OwnedFd, Errno> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let c_path = cstring(if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    });
    let how = OpenHow {
        flags: (flags | OFlag::O_CLOEXEC).bits() as u64,
        mode: mode as u64,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: c_path is a valid NUL-terminated string and `how` a valid open_how
    // whose size we pass; the kernel does not keep either pointer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens (creating as needed) a directory inside the rootfs.
fn ensure_dir(root: &OwnedFd, path: &Path) -> Result<OwnedFd, Errno> {
    match open_in_root(root, path, OFlag::O_PATH | OFlag::O_DIRECTORY, 0) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    let parent_path = path.parent().unwrap_or(Path::new("/"));
    let parent = ensure_dir(root, parent_path)?;
    let name = path.file_name().ok_or(Errno::EINVAL)?;
    match nix::sys::stat::mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o755),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    open_in_root(root, path, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)
}

/// Opens (creating an empty file as needed) a file inside the rootfs, as a bind target.
fn ensure_file(root: &OwnedFd, path: &Path) -> Result<OwnedFd, Errno> {
    match open_in_root(root, path, OFlag::O_PATH, 0) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    ensure_dir(root, path.parent().unwrap_or(Path::new("/")))?;
    match open_in_root(
        root,
        path,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY,
        0o644,
    ) {
        Ok(_) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    open_in_root(root, path, OFlag::O_PATH, 0)
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false)
}

/// Mount flags that a remount must repeat because an unprivileged user
/// namespace may not clear them (they are locked from the original mount).
fn locked_flags(path: &Path) -> MsFlags {
    let mut flags = MsFlags::empty();
    if let Ok(st) = nix::sys::statvfs::statvfs(path) {
        use nix::sys::statvfs::FsFlags;
        let f = st.flags();
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        ] {
            if f.contains(fs_flag) {
                flags |= ms_flag;
            }
        }
    }
    flags
}

fn remount_bind(target: &Path, shown: &Path, extra: MsFlags) -> Result<(), RootfsError> {
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | locked_flags(target) | extra;
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(sys("remount", shown))
}

/// Prepares the new root: propagation, the rootfs bind, the configured mounts
/// and /dev. Host paths are still visible (sources of bind mounts).
pub fn prepare(plan: &RootfsPlan) -> Result<(), RootfsError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        plan.propagation,
        None::<&str>,
    )
    .map_err(sys("set propagation of", "/"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(&plan.rootfs),
        &plan.rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("bind the rootfs", &plan.rootfs))?;
    let root = nix::fcntl::open(
        &plan.rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("open the rootfs", &plan.rootfs))?;
    // SAFETY: open returned a new descriptor that nothing else owns.
    let root = unsafe { OwnedFd::from_raw_fd(root) };

    let has_dev_mount = plan
        .mounts
        .iter()
        .any(|m| m.destination == Path::new("/dev"));
    if !has_dev_mount {
        let dev = ensure_dir(&root, Path::new("/dev")).map_err(sys("create", "/dev"))?;
        mount(
            Some("tmpfs"),
            &fd_path(&dev),
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some("mode=755,size=65536k"),
        )
        .map_err(sys("mount tmpfs on", "/dev"))?;
    }
    for m in &plan.mounts {
        mount_one(&root, m)?;
    }
    setup_dev(&root, &plan.devices)?;
    Ok(())
}

fn mount_one(root: &OwnedFd, m: &MountSpec) -> Result<(), RootfsError> {
    let dest = &m.destination;
    let source_is_dir = match (&m.source, m.bind) {
        (Some(source), true) => is_dir(source),
        _ => true,
    };
    let target_fd = if source_is_dir {
        ensure_dir(root, dest)
    } else {
        ensure_file(root, dest)
    }
    .map_err(sys("create mount point", dest))?;
    let target = fd_path(&target_fd);
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    if m.bind {
        let source = m.source.as_ref().expect("validated: bind has a source");
        let bind_flags = MsFlags::MS_BIND | (m.flags & MsFlags::MS_REC);
        mount(
            Some(source),
            &target,
            None::<&str>,
            bind_flags,
            None::<&str>,
        )
        .map_err(sys("bind mount onto", dest))?;
        let extra = m.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            let mounted = reopen(root, dest, source_is_dir)?;
            remount_bind(&fd_path(&mounted), dest, extra)?;
        }
    } else {
        let fs_type = m.fs_type.as_deref();
        let source = m
            .source
            .clone()
            .unwrap_or_else(|| PathBuf::from(fs_type.unwrap_or("none")));
        match mount(Some(&source), &target, fs_type, m.flags, data) {
            Ok(()) => {}
            // sysfs belongs to the network namespace: a joined host-owned netns
            // cannot be mounted from the VE's user namespace. Bind the host's
            // /sys read-only instead, as rootless runtimes do.
            Err(Errno::EPERM) if fs_type == Some("sysfs") => {
                mount(
                    Some("/sys"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(sys("bind host /sys onto", dest))?;
                let mounted = reopen(root, dest, true)?;
                remount_bind(
                    &fd_path(&mounted),
                    dest,
                    MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                )?;
            }
            Err(e) => return Err(sys("mount", dest)(e)),
        }
    }
    if !m.propagation.is_empty() {
        let mounted = reopen(root, dest, source_is_dir)?;
        mount(
            None::<&str>,
            &fd_path(&mounted),
            None::<&str>,
            m.propagation,
            None::<&str>,
        )
        .map_err(sys("set propagation of", dest))?;
    }
    Ok(())
}

/// A descriptor of what is mounted at `dest` now (the one taken before mounting
/// points to the directory underneath).
fn reopen(root: &OwnedFd, dest: &Path, is_dir: bool) -> Result<OwnedFd, RootfsError> {
    let flags = if is_dir {
        OFlag::O_PATH | OFlag::O_DIRECTORY
    } else {
        OFlag::O_PATH
    };
    open_in_root(root, dest, flags, 0).map_err(sys("reopen mount point", dest))
}

fn device_kind(typ: LinuxDeviceType) -> (char, SFlag) {
    match typ {
        LinuxDeviceType::B => ('b', SFlag::S_IFBLK),
        LinuxDeviceType::P => ('p', SFlag::S_IFIFO),
        _ => ('c', SFlag::S_IFCHR),
    }
}

/// Finds the host node of a device: /dev/{char,block}/MAJ:MIN (udev) or the same path.
fn host_device_node(device: &LinuxDevice) -> Result<PathBuf, RootfsError> {
    let (kind, sflag) = device_kind(device.typ());
    let dir = if kind == 'b' { "block" } else { "char" };
    let by_number = PathBuf::from(format!("/dev/{dir}/{}:{}", device.major(), device.minor()));
    let wanted = nix::sys::stat::makedev(device.major() as u64, device.minor() as u64);
    for candidate in [by_number.clone(), device.path().clone()] {
        if let Ok(st) = nix::sys::stat::stat(&candidate) {
            if st.st_rdev == wanted && (st.st_mode & SFlag::S_IFMT.bits()) == sflag.bits() {
                let mode_ok = device
                    .file_mode()
                    .is_none_or(|m| m & 0o7777 == st.st_mode & 0o7777);
                let owner_ok = device.uid().is_none_or(|u| u == st.st_uid)
                    && device.gid().is_none_or(|g| g == st.st_gid);
                if !mode_ok || !owner_ok {
                    return Err(RootfsError::DeviceOwnership(device.path().clone()));
                }
                return Ok(candidate);
            }
        }
    }
    Err(RootfsError::NoHostDevice {
        path: device.path().clone(),
        kind,
        major: device.major(),
        minor: device.minor(),
        host: by_number,
    })
}

/// A minimal /dev: host nodes bind-mounted (mknod is not allowed in a user
/// namespace), the usual symlinks.
fn setup_dev(root: &OwnedFd, devices: &[LinuxDevice]) -> Result<(), RootfsError> {
    let mut binds: Vec<(PathBuf, PathBuf)> = DEFAULT_DEVICES
        .iter()
        .map(|d| {
            (
                PathBuf::from(format!("/dev/{d}")),
                PathBuf::from(format!("/dev/{d}")),
            )
        })
        .collect();
    for device in devices {
        let host = host_device_node(device)?;
        binds.retain(|(dest, _)| dest != device.path());
        binds.push((device.path().clone(), host));
    }
    for (dest, host) in &binds {
        let target = ensure_file(root, dest).map_err(sys("create device node", dest))?;
        mount(
            Some(host),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind host device onto", dest))?;
    }
    let dev = ensure_dir(root, Path::new("/dev")).map_err(sys("open", "/dev"))?;
    for (name, target) in DEV_LINKS {
        match nix::unistd::symlinkat(*target, Some(dev.as_raw_fd()), *name) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(sys("create symlink", format!("/dev/{name}"))(e)),
        }
    }
    Ok(())
}

/// Makes the rootfs the process's / and detaches the old root.
pub fn pivot(rootfs: &Path) -> Result<(), RootfsError> {
    nix::unistd::chdir(rootfs).map_err(sys("enter", rootfs))?;
    // pivot_root(".", ".") stacks the old root under the new one; unmounting "."
    // then removes it without needing a directory for it in the VE's disk.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root to", rootfs))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root at", rootfs))?;
    nix::unistd::chdir("/").map_err(sys("enter", "/"))?;
    Ok(())
}

/// After pivot_root: masked and read-only paths, read-only root.
pub fn finish(plan: &RootfsPlan) -> Result<(), RootfsError> {
    for path in &plan.readonly_paths {
        let p = Path::new(path);
        match mount(
            Some(p),
            p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => remount_bind(
                p,
                p,
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            )?,
            Err(Errno::ENOENT) => {} // absent on this kernel: nothing to protect
            Err(e) => return Err(sys("make read-only", p)(e)),
        }
    }
    for path in &plan.masked_paths {
        let p = Path::new(path);
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(_) => continue, // absent on this kernel: nothing to hide
        };
        let result = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some("size=0"),
            )
        } else {
            mount(
                Some("/dev/null"),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        result.map_err(sys("mask", p))?;
    }
    if plan.readonly {
        remount_bind(Path::new("/"), Path::new("/"), MsFlags::MS_RDONLY)?;
    }
    Ok(())
}

/// Joins a path given in config.json onto the bundle when relative.
pub fn absolute_rootfs(bundle: &Path, root_path: &Path) -> PathBuf {
    let joined = if root_path.is_absolute() {
        root_path.to_path_buf()
    } else {
        bundle.join(root_path)
    };
    // Normalise "." and ".." lexically so the mount table shows a clean path.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_path_is_joined_and_normalised() {
        assert_eq!(
            absolute_rootfs(Path::new("/b/x"), Path::new("rootfs")),
            PathBuf::from("/b/x/rootfs")
        );
        assert_eq!(
            absolute_rootfs(Path::new("/b/x"), Path::new("./r/../rootfs")),
            PathBuf::from("/b/x/rootfs")
        );
        assert_eq!(
            absolute_rootfs(Path::new("/b"), Path::new("/abs")),
            PathBuf::from("/abs")
        );
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root_dir = tmp.path().join("root");
        std::fs::create_dir(&root_dir).unwrap();
        std::fs::create_dir(root_dir.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root_dir.join("escape")).unwrap();
        let fd =
            nix::fcntl::open(&root_dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        // SAFETY: fresh descriptor from open.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        // "/escape/x" must land in <root>/etc/x, never in the host's /etc.
        ensure_dir(&root, Path::new("/escape/ve-runtime-test-dir")).unwrap();
        assert!(root_dir.join("etc/ve-runtime-test-dir").is_dir());
        assert!(!Path::new("/etc/ve-runtime-test-dir").exists());
        ensure_file(&root, Path::new("/a/b/file")).unwrap();
        assert!(root_dir.join("a/b/file").is_file());
    }
}

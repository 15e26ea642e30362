//! VE disks: sparse ext4 image files on loop devices.
//!
//! A VE's root filesystem is `<state>/ves/<id>/disk.img`, a sparse ext4 image
//! whose size is the VE's disk quota (ENOSPC at the quota, no quota
//! accounting needed). Files inside are owned by uid/gid 0..65535; the
//! [`crate::idmap`] module maps them into the VE's host uid range.
//!
//! Mount flags of the host mount (and so of the VE's root, which is a bind
//! of it):
//! - `nodev`: device nodes inside the image are never honoured. The VE cannot
//!   mknod in its user namespace anyway, and its /dev is a tmpfs the runtime
//!   fills with bind mounts of the few host devices it may use; an image
//!   written elsewhere (a migrated or restored disk) must not grant access to
//!   host devices.
//! - suid allowed (no `nosuid`): setuid programs (su, passwd, ping...) must
//!   work inside the VE; setuid root there is the VE's root, an unprivileged
//!   host uid.
//! - exec allowed, relatime (the default).
//! - `errors=remount-ro`: a corrupted VE disk stops taking writes instead of
//!   spreading the damage; it never panics the node.
//! - `noinit_itable`: the inode tables of a grown disk sit in a sparse part of
//!   the image and already read as zeros; letting the kernel zero them in the
//!   background would write gigabytes of zeros into the image (and through it
//!   into the shared filesystem) for nothing.

pub mod loop_device;
pub mod mountinfo;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};

use crate::template::Template;
use loop_device::{LoopDevice, LoopError};

/// ext4 block size of our images; sizes are rounded down to it.
pub const BLOCK_SIZE: u64 = 4096;
/// How long a loop device may take to be released after its last unmount.
const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// How many fresh loop devices an attach tries when mounting fails with EIO.
const FRESH_MOUNT_ATTEMPTS: u32 = 3;
/// Data options of the host mount; see the module documentation.
const MOUNT_DATA: &str = "errors=remount-ro,noinit_itable";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create disk {image}: it already exists (destroy the VE first, or pick another path)")]
    AlreadyExists { image: PathBuf },
    #[error("cannot create disk {image}: {size} bytes is smaller than the {minimum} bytes template {template:?} needs")]
    TooSmall {
        image: PathBuf,
        template: String,
        size: u64,
        minimum: u64,
    },
    #[error("cannot create disk {image}: template image {template_image} is unreadable: {source}")]
    TemplateImage {
        image: PathBuf,
        template_image: PathBuf,
        source: io::Error,
    },
    #[error("disk image {image} does not exist")]
    ImageMissing { image: PathBuf },
    #[error("{image} is not an ext4 disk image ({reason})")]
    NotExt4 { image: PathBuf, reason: String },
    #[error("cannot attach disk {image}: already mounted at {mounted_at} by another VE or tool (detach it there first)")]
    MountedElsewhere { image: PathBuf, mounted_at: PathBuf },
    #[error(
        "cannot attach disk {image} at {mount_point}: something else ({what}) is mounted there"
    )]
    MountPointBusy {
        image: PathBuf,
        mount_point: PathBuf,
        what: String,
    },
    #[error("cannot attach disk {image}: another attach of the same image is in progress")]
    Locked { image: PathBuf },
    #[error("cannot mount disk {image} ({loop_device}) at {mount_point}: {source}")]
    Mount {
        image: PathBuf,
        loop_device: PathBuf,
        mount_point: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("cannot detach disk {image}: it is still mounted at {others:?} (stop the VE / unmount its rootfs first)")]
    StillInUse {
        image: PathBuf,
        others: Vec<PathBuf>,
    },
    #[error("cannot unmount disk {image} from {mount_point}: {source} (processes still use it? see `fuser -vm {mount_point}`)")]
    Unmount {
        image: PathBuf,
        mount_point: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("disk {image} stays on {loop_device} after unmount and cannot be released (still open by a VE's mount namespace? retry after the VE is gone)")]
    LoopBusy {
        image: PathBuf,
        loop_device: PathBuf,
    },
    #[error("cannot shrink disk {image} from {current} to {requested} bytes: disks only grow (copy the files to a new, smaller VE instead)")]
    ShrinkRefused {
        image: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("cannot grow disk {image} online: the node agent lacks CAP_SYS_RESOURCE, which ext4 online resize needs (stop the VE to grow it offline, or run the agent with that capability)")]
    OnlineGrowUnsupported { image: PathBuf },
    #[error("cannot grow disk {image} offline: it is attached to {loop_device} (pass the attached disk to grow it online)")]
    GrowWhileAttached {
        image: PathBuf,
        loop_device: PathBuf,
    },
    #[error("{what} failed for {image}: {message}")]
    Tool {
        what: String,
        image: PathBuf,
        message: String,
    },
    #[error("disk {image}: loop device: {source}")]
    Loop { image: PathBuf, source: LoopError },
    #[error("cannot read the mount table: {0}")]
    MountTable(#[source] io::Error),
    #[error("cannot read usage of {mount_point}: {source}")]
    Usage {
        mount_point: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("disk {image}: {action}: {source}")]
    Io {
        image: PathBuf,
        action: String,
        source: io::Error,
    },
}

fn io_error(image: &Path, action: impl Into<String>) -> impl FnOnce(io::Error) -> DiskError + '_ {
    let action = action.into();
    move |source| DiskError::Io {
        image: image.to_path_buf(),
        action,
        source,
    }
}

/// A disk image attached to a loop device and mounted on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDisk {
    pub image: PathBuf,
    pub loop_device: PathBuf,
    pub loop_major: u32,
    pub loop_minor: u32,
    pub mount_point: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub used_inodes: u64,
    pub total_inodes: u64,
}

/// Rounds a requested size down to whole filesystem blocks. Pure.
pub fn round_to_blocks(size_bytes: u64) -> u64 {
    size_bytes / BLOCK_SIZE * BLOCK_SIZE
}

/// Checks the ext4 superblock magic (0xEF53 at offset 1024 + 0x38). Pure.
pub fn check_ext4_superblock(first_2k: &[u8]) -> Result<(), String> {
    if first_2k.len() < 2048 {
        return Err(format!(
            "only {} bytes long, too short for a superblock",
            first_2k.len()
        ));
    }
    let magic = u16::from_le_bytes([first_2k[1024 + 0x38], first_2k[1024 + 0x39]]);
    if magic != 0xEF53 {
        return Err(format!(
            "no ext2/3/4 superblock magic: found {magic:#06x}, expected 0xef53"
        ));
    }
    Ok(())
}

fn verify_ext4_image(image: &Path) -> Result<(), DiskError> {
    let meta = match fs::metadata(image) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::ImageMissing {
                image: image.to_path_buf(),
            })
        }
        Err(e) => return Err(io_error(image, "cannot stat the image")(e)),
    };
    if !meta.file_type().is_file() {
        return Err(DiskError::NotExt4 {
            image: image.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut head = Vec::with_capacity(2048);
    File::open(image)
        .and_then(|f| f.take(2048).read_to_end(&mut head))
        .map_err(io_error(image, "cannot read the superblock"))?;
    check_ext4_superblock(&head).map_err(|reason| DiskError::NotExt4 {
        image: image.to_path_buf(),
        reason,
    })
}

/// Runs an e2fsprogs/coreutils tool; its stderr becomes the error message.
fn run_tool(command: &mut Command, what: &str, image: &Path) -> Result<(), DiskError> {
    tracing::debug!(?command, "running");
    let output = command.output().map_err(|e| DiskError::Tool {
        what: what.to_string(),
        image: image.to_path_buf(),
        message: format!(
            "cannot run {:?}: {e} (is e2fsprogs installed?)",
            command.get_program()
        ),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    Err(DiskError::Tool {
        what: what.to_string(),
        image: image.to_path_buf(),
        message: format!("{} ({}) {}", stderr.trim(), output.status, stdout.trim())
            .trim()
            .to_string(),
    })
}

/// Resizes an unmounted image (or device) to fill its size. resize2fs
/// insists on a freshly checked filesystem; a template copy is one, a disk
/// that was mounted before needs e2fsck first.
fn resize_offline(target: &Path, image: &Path) -> Result<(), DiskError> {
    if run_tool(Command::new("resize2fs").arg(target), "resize2fs", image).is_ok() {
        return Ok(());
    }
    let fsck = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(target)
        .output()
        .map_err(|e| DiskError::Tool {
            what: "e2fsck".into(),
            image: image.to_path_buf(),
            message: format!("cannot run e2fsck: {e}"),
        })?;
    // 0: clean, 1: errors fixed; anything else needs a human.
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(DiskError::Tool {
            what: "e2fsck".into(),
            image: image.to_path_buf(),
            message: format!(
                "{}: the filesystem has errors e2fsck -p cannot fix; run `e2fsck -f {}`",
                fsck.status,
                target.display()
            ),
        });
    }
    run_tool(Command::new("resize2fs").arg(target), "resize2fs", image)
}

/// Creates a VE disk: a sparse copy of the template image grown to
/// `size_bytes` (rounded down to 4 KiB). Refuses an existing image and a size
/// below the template's minimum; on error nothing is left behind.
///
/// Copy + resize2fs beats `mke2fs -d <rootfs>`: it needs no unpacked rootfs,
/// and copying a sparse image with `cp --sparse=always --reflink=auto` is a
/// clone on reflink filesystems. See docs/templates.md for timings.
pub fn create_disk(template: &Template, image: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let size = round_to_blocks(size_bytes);
    if image.exists() {
        return Err(DiskError::AlreadyExists {
            image: image.to_path_buf(),
        });
    }
    let template_size = fs::metadata(&template.image)
        .map_err(|source| DiskError::TemplateImage {
            image: image.to_path_buf(),
            template_image: template.image.clone(),
            source,
        })?
        .len();
    let minimum = template.meta.min_disk_bytes.max(template_size);
    if size < minimum {
        return Err(DiskError::TooSmall {
            image: image.to_path_buf(),
            template: template.name.clone(),
            size: size_bytes,
            minimum,
        });
    }
    let started = Instant::now();
    let file_name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = image.with_file_name(format!(".{file_name}.creating.{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&partial);
        run_tool(
            Command::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(&template.image)
                .arg(&partial),
            "copying the template image",
            image,
        )?;
        OpenOptions::new()
            .write(true)
            .open(&partial)
            .and_then(|f| f.set_len(size))
            .map_err(io_error(image, "cannot set the image size"))?;
        resize_offline(&partial, image)?;
        // Every disk its own UUID (cheap: the template has metadata_csum_seed).
        run_tool(
            Command::new("tune2fs").args(["-U", "random"]).arg(&partial),
            "tune2fs -U random",
            image,
        )?;
        // link() never replaces: a concurrent create of the same image loses cleanly.
        fs::hard_link(&partial, image).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                DiskError::AlreadyExists {
                    image: image.to_path_buf(),
                }
            } else {
                io_error(image, "cannot move the new image into place")(e)
            }
        })
    })();
    let _ = fs::remove_file(&partial);
    result?;
    tracing::info!(
        image = %image.display(),
        template = %template.name,
        size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "disk created"
    );
    Ok(())
}

/// Canonical form of a mount point, the form mountinfo uses.
fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The host mount of a loop device: the first mount of the whole filesystem
/// that is not an idmapped bind (those are VE rootfs views of it).
fn host_mount_of(mounts: &[mountinfo::MountEntry], device: &LoopDevice) -> Option<PathBuf> {
    mountinfo::mounts_of_device(mounts, device.major, device.minor)
        .into_iter()
        .find(|m| m.root == Path::new("/") && !m.is_idmapped())
        .map(|m| m.mount_point.clone())
}

/// [`find_attached`] for a disk expected at `mount_point`: the mount table
/// names its loop device, so no scan of every loop device is needed when
/// the disk is where it should be.
pub fn find_attached_at(image: &Path, mount_point: &Path) -> Result<Option<AttachedDisk>, DiskError> {
    let mounts = mountinfo::read().map_err(DiskError::MountTable)?;
    let expected = mountinfo::mount_at(&mounts, &canonical(mount_point))
        .filter(|m| m.root == Path::new("/") && !m.is_idmapped())
        .and_then(|m| loop_device::number_of_dev(m.major, m.minor))
        .and_then(|number| loop_device::if_backed_by(number, image));
    match expected {
        Some(device) => Ok(Some(attached_disk(image, &device, canonical(mount_point)))),
        None => find_attached(image),
    }
}

/// Re-discovers an attached, mounted disk (e.g. after an agent restart) from
/// the loop devices' backing files and the mount table. None when the image
/// is not on a loop device or the loop device is not mounted.
pub fn find_attached(image: &Path) -> Result<Option<AttachedDisk>, DiskError> {
    let Some(device) =
        loop_device::find_by_backing_file(image).map_err(|source| DiskError::Loop {
            image: image.to_path_buf(),
            source,
        })?
    else {
        return Ok(None);
    };
    let mounts = mountinfo::read().map_err(DiskError::MountTable)?;
    Ok(host_mount_of(&mounts, &device)
        .map(|mount_point| attached_disk(image, &device, mount_point)))
}

fn attached_disk(image: &Path, device: &LoopDevice, mount_point: PathBuf) -> AttachedDisk {
    AttachedDisk {
        image: canonical(image),
        loop_device: device.path.clone(),
        loop_major: device.major,
        loop_minor: device.minor,
        mount_point,
    }
}

/// Waits (bounded) until `device` no longer backs `image`; false if it still does.
/// Checks the backing file, not just "bound": the device may be reused at once.
fn wait_released(device: &LoopDevice, image: &Path) -> bool {
    let deadline = Instant::now() + RELEASE_WAIT;
    let image = canonical(image);
    loop {
        // One sysfs read: with a thousand loop devices a full scan per poll
        // is what made stops slow.
        if loop_device::backing_file(device.number).as_deref() != Some(image.as_path()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The host mount of a VE disk; see the module documentation for the flags.
fn mount_device(device: &LoopDevice, mount_point: &Path) -> Result<(), nix::errno::Errno> {
    nix::mount::mount(
        Some(&device.path),
        mount_point,
        Some("ext4"),
        MsFlags::MS_NODEV,
        Some(MOUNT_DATA),
    )
}

/// Removes a mount point directory we created, on failure.
struct CreatedDir(Option<PathBuf>);

impl Drop for CreatedDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Attaches `image` to a loop device and mounts it at `mount_point` (created
/// if missing). Idempotent: if the image is already mounted there, returns
/// that. On error nothing is left behind (no loop device, no mount, no
/// mount point we created).
pub fn attach(image: &Path, mount_point: &Path) -> Result<AttachedDisk, DiskError> {
    verify_ext4_image(image)?;
    let open_image = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(image)
            .map_err(io_error(image, "cannot open the image read-write"))
    };
    // Serialises concurrent attaches of one image on this node (the
    // cluster-wide lease on the image is the caller's business). A separate
    // open: the loop device keeps its file open, and with it any lock on it.
    let lock = open_image()?;
    // SAFETY: flock on a descriptor we own; released when it is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DiskError::Locked {
            image: image.to_path_buf(),
        });
    }

    let mut created = CreatedDir(None);
    if !mount_point.exists() {
        fs::create_dir(mount_point).map_err(io_error(
            image,
            format!("cannot create mount point {}", mount_point.display()),
        ))?;
        created.0 = Some(mount_point.to_path_buf());
    }
    let mount_point = canonical(mount_point);

    let mount_error = |device: &LoopDevice, source| DiskError::Mount {
        image: image.to_path_buf(),
        loop_device: device.path.clone(),
        mount_point: mount_point.clone(),
        source,
    };
    let mounts = mountinfo::read().map_err(DiskError::MountTable)?;
    let existing = loop_device::find_by_backing_file_held(image, &lock).map_err(|source| DiskError::Loop {
        image: image.to_path_buf(),
        source,
    })?;
    if let Some(device) = &existing {
        match host_mount_of(&mounts, device) {
            Some(at) if at == mount_point => {
                tracing::debug!(image = %image.display(), "already attached");
                return Ok(attached_disk(image, device, at));
            }
            Some(at) => {
                return Err(DiskError::MountedElsewhere {
                    image: image.to_path_buf(),
                    mounted_at: at,
                })
            }
            None => {}
        }
    }
    if let Some(other) = mountinfo::mount_at(&mounts, &mount_point) {
        return Err(DiskError::MountPointBusy {
            image: image.to_path_buf(),
            mount_point,
            what: format!("{} {}", other.fs_type, other.source),
        });
    }
    if let Some(device) = existing {
        // Still attached after a stop: a dying VE's mount namespace holds
        // the device until the kernel tears it down, and autoclear releases
        // it only then. It backs our image: mount it again.
        match mount_device(&device, &mount_point) {
            Ok(()) => {
                created.0 = None;
                tracing::info!(image = %image.display(), device = %device.path.display(), "disk re-mounted from its loop device");
                return Ok(attached_disk(image, &device, mount_point));
            }
            // Its release completed meanwhile: attach afresh below.
            Err(nix::errno::Errno::ENXIO) if wait_released(&device, image) => {}
            Err(source) => return Err(mount_error(&device, source)),
        }
    }

    // The descriptor keeps the device attached until the mount holds it;
    // dropping it on any error below releases the device (autoclear).
    // A fresh device can fail its first reads (EIO, "unable to read
    // superblock") while other loop devices are attached and detached at the
    // same moment; it happens about once in a hundred starts under heavy
    // loop churn. Nothing was mounted then, so a new device is tried.
    let mut attempt = 1;
    let device = loop {
        let (device, _device_fd) =
            loop_device::attach_file(&open_image()?, image).map_err(|source| DiskError::Loop {
                image: image.to_path_buf(),
                source,
            })?;
        match mount_device(&device, &mount_point) {
            Ok(()) => break device,
            Err(nix::errno::Errno::EIO) if attempt < FRESH_MOUNT_ATTEMPTS => {
                tracing::warn!(image = %image.display(), device = %device.path.display(), attempt, "fresh loop device failed its first read, retrying on another");
                attempt += 1;
            }
            Err(source) => return Err(mount_error(&device, source)),
        }
    };
    created.0 = None;
    tracing::info!(image = %image.display(), device = %device.path.display(), mount_point = %mount_point.display(), "disk attached");
    Ok(attached_disk(image, &device, mount_point))
}

/// Unmounts the disk and releases its loop device. Idempotent. Refuses (and
/// changes nothing) while other mounts of the disk exist in this mount
/// namespace, such as the VE's idmapped rootfs.
pub fn detach(disk: &AttachedDisk) -> Result<(), DiskError> {
    let image = &disk.image;
    let mounts = mountinfo::read().map_err(DiskError::MountTable)?;
    // The loop device may have been released and reused for another image
    // since `disk` was made: only touch it while it still backs our image.
    // The device we attached, if it still backs the image (one sysfs read);
    // otherwise a scan, which also matches the image by inode.
    let device = match loop_device::number_of(&disk.loop_device)
        .and_then(|number| loop_device::if_backed_by(number, image))
    {
        Some(device) => Some(device),
        None => loop_device::find_by_backing_file(image)
            .map_err(|source| DiskError::Loop {
                image: image.clone(),
                source,
            })?
            .filter(|d| d.path == disk.loop_device),
    };
    let Some(device) = device else {
        tracing::debug!(image = %image.display(), "already detached");
        return Ok(());
    };
    let ours = mountinfo::mounts_of_device(&mounts, device.major, device.minor);
    let others: Vec<PathBuf> = ours
        .iter()
        .filter(|m| m.mount_point != disk.mount_point)
        .map(|m| m.mount_point.clone())
        .collect();
    if !others.is_empty() {
        return Err(DiskError::StillInUse {
            image: image.clone(),
            others,
        });
    }
    if ours.iter().any(|m| m.mount_point == disk.mount_point) {
        nix::mount::umount2(&disk.mount_point, MntFlags::UMOUNT_NOFOLLOW).map_err(|source| {
            DiskError::Unmount {
                image: image.clone(),
                mount_point: disk.mount_point.clone(),
                source,
            }
        })?;
    }
    // Autoclear releases the device once its last user is gone. Another
    // mount namespace may still hold a copy of the mount for a while (a
    // stopping VE being torn down, a VE being started until its
    // pivot_root): the release then happens when it lets go. LOOP_CLR_FD
    // makes sure of that for a device set up without autoclear (by hand).
    // No waiting: if the device still backs the image, LOOP_CLR_FD either
    // releases it now or (while another namespace holds it) marks it to be
    // released at its last close; a later attach of the image re-mounts it.
    if loop_device::backing_file(device.number).as_deref() == Some(canonical(image).as_path()) {
        if let Err(error) = loop_device::clear(&device) {
            tracing::warn!(image = %image.display(), %error, "cannot release loop device");
            return Err(DiskError::LoopBusy {
                image: image.clone(),
                loop_device: device.path,
            });
        }
        tracing::info!(image = %image.display(), device = %device.path.display(), "loop device still open elsewhere: released at its last close");
    }
    tracing::info!(image = %image.display(), device = %device.path.display(), "disk detached");
    Ok(())
}

/// Grows a disk to `new_size_bytes` (rounded down to 4 KiB): online when
/// `attached` (the VE keeps running), offline otherwise. Shrinking is
/// refused. Re-running after an interrupted grow finishes it.
pub fn grow(
    image: &Path,
    new_size_bytes: u64,
    attached: Option<&AttachedDisk>,
) -> Result<(), DiskError> {
    let new_size = round_to_blocks(new_size_bytes);
    let current = match fs::metadata(image) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::ImageMissing {
                image: image.to_path_buf(),
            })
        }
        Err(e) => return Err(io_error(image, "cannot stat the image")(e)),
    };
    if new_size < current {
        return Err(DiskError::ShrinkRefused {
            image: image.to_path_buf(),
            current,
            requested: new_size_bytes,
        });
    }
    let device = loop_device::find_by_backing_file(image).map_err(|source| DiskError::Loop {
        image: image.to_path_buf(),
        source,
    })?;
    if attached.is_none() {
        if let Some(device) = &device {
            return Err(DiskError::GrowWhileAttached {
                image: image.to_path_buf(),
                loop_device: device.path.clone(),
            });
        }
    }
    if attached.is_some() && device.is_some() && !can_resize_online() {
        return Err(DiskError::OnlineGrowUnsupported {
            image: image.to_path_buf(),
        });
    }
    verify_ext4_image(image)?;
    let file = OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(io_error(image, "cannot open the image"))?;
    if new_size > current {
        file.set_len(new_size)
            .map_err(io_error(image, "cannot extend the image"))?;
    }
    drop(file);
    match (attached, device) {
        (Some(_), Some(device)) => {
            loop_device::set_capacity(&device).map_err(|source| DiskError::Loop {
                image: image.to_path_buf(),
                source,
            })?;
            // Mounted: resize2fs grows it online through the mount point.
            run_tool(
                Command::new("resize2fs").arg(&device.path),
                "online resize2fs",
                image,
            )?;
        }
        (Some(disk), None) => {
            // The caller's handle is stale: the disk was detached meanwhile.
            tracing::warn!(image = %image.display(), mount_point = %disk.mount_point.display(), "grow: disk no longer attached, growing offline");
            resize_offline(image, image)?;
        }
        (None, _) => resize_offline(image, image)?,
    }
    tracing::info!(image = %image.display(), size = new_size, online = attached.is_some(), "disk grown");
    Ok(())
}

/// ext4 online resize needs CAP_SYS_RESOURCE (some sandboxes drop it even
/// for root): checked first, so a refused grow changes nothing.
pub fn can_resize_online() -> bool {
    caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap_or(false)
}

/// Space and inodes used on a mounted disk.
pub fn usage(mount_point: &Path) -> Result<DiskUsage, DiskError> {
    let stat = nix::sys::statvfs::statvfs(mount_point).map_err(|source| DiskError::Usage {
        mount_point: mount_point.to_path_buf(),
        source,
    })?;
    let fragment = stat.fragment_size() as u64;
    let total_bytes = stat.blocks() as u64 * fragment;
    let free_bytes = stat.blocks_free() as u64 * fragment;
    Ok(DiskUsage {
        used_bytes: total_bytes.saturating_sub(free_bytes),
        total_bytes,
        used_inodes: (stat.files() as u64).saturating_sub(stat.files_free() as u64),
        total_inodes: stat.files() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_down_to_blocks() {
        assert_eq!(round_to_blocks(0), 0);
        assert_eq!(round_to_blocks(4095), 0);
        assert_eq!(round_to_blocks(4096), 4096);
        assert_eq!(round_to_blocks(1_000_000_000), 999_997_440);
    }

    #[test]
    fn superblock_magic() {
        let mut block = vec![0u8; 2048];
        assert!(check_ext4_superblock(&block)
            .unwrap_err()
            .contains("0x0000"));
        block[1024 + 0x38] = 0x53;
        block[1024 + 0x39] = 0xEF;
        assert!(check_ext4_superblock(&block).is_ok());
        assert!(check_ext4_superblock(&block[..100])
            .unwrap_err()
            .contains("too short"));
    }

    #[test]
    fn host_mount_skips_idmapped_views() {
        let mounts = mountinfo::parse(
            "1 0 7:3 / /r rw,nodev,idmapped - ext4 /dev/loop3 rw\n\
             2 0 7:3 /sub /b rw - ext4 /dev/loop3 rw\n\
             3 0 7:3 / /m rw,nodev - ext4 /dev/loop3 rw\n",
        );
        let device = LoopDevice {
            number: 3,
            path: "/dev/loop3".into(),
            major: 7,
            minor: 3,
        };
        assert_eq!(host_mount_of(&mounts, &device), Some(PathBuf::from("/m")));
    }
}

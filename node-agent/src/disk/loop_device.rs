//! Loop block devices: attach a file, find the device backing a file, grow, release.
//!
//! Devices are configured in one step with LOOP_CONFIGURE (kernel 5.8+) and
//! with LO_FLAGS_AUTOCLEAR, so the kernel releases the device when its last
//! user closes it: the mount holds it while mounted, and if anything fails
//! before the mount, dropping our file descriptor releases it. No error path
//! can leak a device.
//!
//! Direct I/O stays off: images sit on the shared FUSE filesystem and the
//! page cache in front of it is what makes small writes fast; direct I/O
//! would also demand alignment the backing filesystem may not offer.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// ioctl numbers and structures from <linux/loop.h>.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LOOP_MAJOR: u32 = 7;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot open /dev/loop-control: {0} (is the loop module loaded? try `modprobe loop`)")]
    Control(#[source] io::Error),
    #[error("no free loop device: {0}")]
    NoFreeDevice(#[source] io::Error),
    #[error("cannot create device node {path} for loop device {number}: {source}")]
    Node {
        number: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot open loop device {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot attach {image} to loop device {path}: {source}")]
    Configure {
        image: PathBuf,
        path: PathBuf,
        source: io::Error,
    },
    #[error("loop devices stayed busy after {attempts} attempts while attaching {image} (another process is grabbing them)")]
    Contended { image: PathBuf, attempts: u32 },
    #[error("cannot update the size of loop device {path}: {source}")]
    SetCapacity { path: PathBuf, source: io::Error },
    #[error("cannot release loop device {path}: {source}")]
    Clear { path: PathBuf, source: io::Error },
    #[error("cannot scan loop devices in /sys/block: {0}")]
    Scan(#[source] io::Error),
}

/// A configured loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub number: u32,
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

impl LoopDevice {
    fn from_number(number: u32) -> LoopDevice {
        let (major, minor) = read_dev_numbers(number).unwrap_or((LOOP_MAJOR, number));
        LoopDevice {
            number,
            path: device_path(number),
            major,
            minor,
        }
    }
}

fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

/// "7:12" from /sys/block/loop12/dev. Minors are not always the number (max_part).
fn read_dev_numbers(number: u32) -> Option<(u32, u32)> {
    let text = fs::read_to_string(format!("/sys/block/loop{number}/dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Makes sure /dev/loopN exists: on hosts without devtmpfs (or in a private
/// /dev) the kernel creates the device but nobody creates its node.
fn ensure_node(number: u32) -> Result<PathBuf, LoopError> {
    let path = device_path(number);
    match fs::metadata(&path) {
        Ok(meta) if meta.file_type().is_block_device() => return Ok(path),
        Ok(_) => {
            return Err(LoopError::Node {
                number,
                path,
                source: io::Error::other("exists but is not a block device"),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(LoopError::Node {
                number,
                path,
                source,
            })
        }
    }
    let (major, minor) = read_dev_numbers(number).unwrap_or((LOOP_MAJOR, number));
    let dev = nix::sys::stat::makedev(major.into(), minor.into());
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o660);
    match nix::sys::stat::mknod(&path, nix::sys::stat::SFlag::S_IFBLK, mode, dev) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(path),
        Err(errno) => Err(LoopError::Node {
            number,
            path,
            source: errno.into(),
        }),
    }
}

fn file_name_field(image: &Path) -> [u8; LO_NAME_SIZE] {
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = image.as_os_str().as_encoded_bytes();
    // Keep the tail, the part that names the VE; the last byte stays NUL.
    let tail = &bytes[bytes.len().saturating_sub(LO_NAME_SIZE - 1)..];
    name[..tail.len()].copy_from_slice(tail);
    name
}

/// Attaches `image` (opened read-write) to a free loop device with autoclear.
/// Returns the device and an open descriptor on it: the device stays
/// attached while the descriptor (or, later, a mount) is held.
pub fn attach_file(image_file: &File, image: &Path) -> Result<(LoopDevice, OwnedFd), LoopError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(LoopError::Control)?;
    const ATTEMPTS: u32 = 16;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(LoopError::NoFreeDevice(io::Error::last_os_error()));
        }
        let number = number as u32;
        let path = ensure_node(number)?;
        let device: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| LoopError::Open {
                path: path.clone(),
                source,
            })?
            .into();
        let mut info = zeroed_info();
        info.lo_flags = LO_FLAGS_AUTOCLEAR;
        info.lo_file_name = file_name_field(image);
        let config = LoopConfig {
            fd: image_file.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: `config` is a properly laid out struct loop_config that
        // outlives the call; the kernel only reads it.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE,
                &config as *const LoopConfig,
            )
        };
        if rc == 0 {
            tracing::debug!(image = %image.display(), device = %path.display(), "loop device attached");
            return Ok((LoopDevice::from_number(number), device));
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EBUSY) {
            // Another process configured this device between GET_FREE and CONFIGURE.
            continue;
        }
        return Err(LoopError::Configure {
            image: image.to_path_buf(),
            path,
            source: error,
        });
    }
    Err(LoopError::Contended {
        image: image.to_path_buf(),
        attempts: ATTEMPTS,
    })
}

/// Numbers of every loop device that has a backing file.
pub fn attached_numbers() -> Result<Vec<u32>, LoopError> {
    Ok(attached_backing_files()?.into_iter().map(|(number, _)| number).collect())
}

/// Every bound loop device with the path of its backing file, by number:
/// one sysfs read per device.
fn attached_backing_files() -> Result<Vec<(u32, PathBuf)>, LoopError> {
    let mut attached = Vec::new();
    for entry in fs::read_dir("/sys/block").map_err(LoopError::Scan)? {
        let entry = entry.map_err(LoopError::Scan)?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if let Some(path) = backing_file(number) {
            attached.push((number, path));
        }
    }
    attached.sort_unstable();
    Ok(attached)
}

/// The backing file of loop device `number`, None when it is free.
pub fn backing_file(number: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// (st_dev, st_ino) of the file backing loop device `number`, as the kernel
/// recorded it: matches even when the file is reached by another path.
fn backing_identity(number: u32) -> Option<(u64, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device_path(number))
        .ok()?;
    let mut info = zeroed_info();
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64 we own.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    };
    (rc == 0).then_some((info.lo_device, info.lo_inode))
}

/// The loop device `number` if it is bound to `image` (by path): one sysfs
/// read, for callers that know which device to expect.
pub fn if_backed_by(number: u32, image: &Path) -> Option<LoopDevice> {
    let canonical = fs::canonicalize(image).ok()?;
    (backing_file(number)? == canonical).then(|| LoopDevice::from_number(number))
}

/// The number of the loop device at `path` ("/dev/loop12" -> 12).
pub fn number_of(path: &Path) -> Option<u32> {
    path.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
}

/// The number of the loop device with block device numbers major:minor,
/// if it is one (from its /sys/dev/block link: minors depend on max_part).
pub fn number_of_dev(major: u32, minor: u32) -> Option<u32> {
    let target = fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    target.file_name()?.to_str()?.strip_prefix("loop")?.parse().ok()
}

/// Whether some open file description other than `ours` may exist for its
/// file. A bound loop device keeps its backing file open, so `false` proves
/// that no loop device backs the file, without scanning them all.
///
/// The proof is a write lease: the kernel grants one only while nobody else
/// has the file open (it checks the inode's reader and writer counts against
/// `ours`). It is dropped at once; an open by someone else in between waits
/// for that (microseconds). Filesystems without leases answer `true`: scan.
fn maybe_open_elsewhere(ours: &File) -> bool {
    // SAFETY: fcntl on a descriptor we borrow, with integer arguments.
    let granted = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) } == 0;
    if granted {
        // SAFETY: as above.
        unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
    !granted
}

/// The loop device `image` is attached to, if any.
pub fn find_by_backing_file(image: &Path) -> Result<Option<LoopDevice>, LoopError> {
    match OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(image) {
        Ok(file) => find_by_backing_file_held(image, &file),
        Err(_) => Ok(None),
    }
}

/// [`find_by_backing_file`] for a caller that holds `image` open as `held`
/// (and nothing else open on it).
pub fn find_by_backing_file_held(image: &Path, held: &File) -> Result<Option<LoopDevice>, LoopError> {
    let Ok(meta) = held.metadata() else {
        return Ok(None);
    };
    if !maybe_open_elsewhere(held) {
        return Ok(None);
    }
    let canonical = fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    // One sysfs read per device: on a node with a thousand VEs this scan is
    // a large part of a start, so the recorded paths are read only once.
    let recorded = attached_backing_files()?;
    if let Some((number, _)) = recorded.iter().find(|(_, path)| *path == canonical) {
        return Ok(Some(LoopDevice::from_number(*number)));
    }
    // The same file reached by another path (a bind mount, a hard link):
    // compare inodes by a stat of each recorded path; only for a path that
    // is gone (a rename) ask the loop driver, which means opening the
    // device: doing that for every device made starts slow on a node with a
    // thousand VEs.
    let identity = Some((meta.dev(), meta.ino()));
    Ok(recorded
        .into_iter()
        .find(|(n, recorded)| match fs::metadata(recorded) {
            Ok(m) => Some((m.dev(), m.ino())) == identity,
            Err(_) => backing_identity(*n) == identity,
        })
        .map(|(n, _)| LoopDevice::from_number(n)))
}

/// Makes the loop device see the new size of its (grown) backing file.
pub fn set_capacity(device: &LoopDevice) -> Result<(), LoopError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&device.path)
        .map_err(|source| LoopError::Open {
            path: device.path.clone(),
            source,
        })?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
    if rc != 0 {
        return Err(LoopError::SetCapacity {
            path: device.path.clone(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Detaches the backing file. Fails with EBUSY while the device is mounted or open.
pub fn clear(device: &LoopDevice) -> Result<(), LoopError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&device.path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(LoopError::Open {
                path: device.path.clone(),
                source,
            })
        }
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD, 0) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        // ENXIO: already free.
        if error.raw_os_error() != Some(libc::ENXIO) {
            return Err(LoopError::Clear {
                path: device.path.clone(),
                source: error,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn file_name_keeps_the_tail() {
        let short = file_name_field(Path::new("/a/disk.img"));
        assert_eq!(&short[..11], b"/a/disk.img");
        assert_eq!(short[11], 0);
        let long_path = format!("/{}/web1/disk.img", "x".repeat(100));
        let long = file_name_field(Path::new(&long_path));
        assert_eq!(long[LO_NAME_SIZE - 1], 0);
        assert!(long[..LO_NAME_SIZE - 1].ends_with(b"/web1/disk.img"));
    }
}

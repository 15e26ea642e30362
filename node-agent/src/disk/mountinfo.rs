//! /proc/self/mountinfo: which mounts exist, of which device, where, how.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem mounted here ("/" for a whole filesystem).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (rw, nodev, idmapped...).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_idmapped(&self) -> bool {
        self.mount_options.iter().any(|o| o == "idmapped")
    }

    pub fn has_option(&self, option: &str) -> bool {
        self.mount_options.iter().any(|o| o == option)
    }
}

/// Undoes the octal escapes (\040 for space...) the kernel uses in paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let _parent_id = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = PathBuf::from(unescape(fields.next()?));
    let mount_point = PathBuf::from(unescape(fields.next()?));
    let mount_options = fields.next()?.split(',').map(str::to_string).collect();
    let mut tail = after.split(' ');
    let fs_type = tail.next()?.to_string();
    let source = unescape(tail.next()?);
    Some(MountEntry {
        mount_id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
    })
}

/// Parses mountinfo text; lines it does not understand are skipped. Pure.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of this process's mount namespace, in mount order.
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at `path` (already canonical), if `path` is a mount point.
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Every mount of the block device major:minor.
pub fn mounts_of_device(mounts: &[MountEntry], major: u32, minor: u32) -> Vec<&MountEntry> {
    mounts
        .iter()
        .filter(|m| m.major == major && m.minor == minor)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
101 22 7:3 / /var/lib/vz/mnt/web\\0401 rw,nodev,relatime shared:50 - ext4 /dev/loop3 rw,errors=remount-ro
102 22 7:3 / /var/lib/vz/root/web1 rw,nodev,relatime,idmapped shared:51 - ext4 /dev/loop3 rw,errors=remount-ro
garbage line
";

    #[test]
    fn parses_entries() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 3);
        let disk = &mounts[1];
        assert_eq!((disk.major, disk.minor), (7, 3));
        assert_eq!(disk.mount_point, Path::new("/var/lib/vz/mnt/web 1"));
        assert_eq!(disk.fs_type, "ext4");
        assert_eq!(disk.source, "/dev/loop3");
        assert!(disk.has_option("nodev"));
        assert!(!disk.is_idmapped());
        assert!(mounts[2].is_idmapped());
    }

    #[test]
    fn finds_by_point_and_device() {
        let mounts = parse(SAMPLE);
        assert_eq!(
            mount_at(&mounts, Path::new("/var/lib/vz/root/web1"))
                .unwrap()
                .mount_id,
            102
        );
        assert!(mount_at(&mounts, Path::new("/var/lib/vz")).is_none());
        assert_eq!(mounts_of_device(&mounts, 7, 3).len(), 2);
        assert!(mounts_of_device(&mounts, 7, 4).is_empty());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\\\"), "\\\\");
    }
}

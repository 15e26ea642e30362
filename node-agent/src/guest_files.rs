//! Writing configuration files into a VE's root filesystem from the host:
//! hostname, hosts, resolv.conf, root's password and SSH keys.
//!
//! The VE's root owns its filesystem and may have replaced any path with a
//! symlink to a host file. Every path is therefore resolved with openat2's
//! RESOLVE_IN_ROOT, as if the VE's root were `/`, so no write can leave it.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GuestFileError {
    #[error("cannot open {path} inside VE root {root}: {source}")]
    Open { root: PathBuf, path: String, source: std::io::Error },
    #[error("cannot write {path} inside VE root {root}: {source}")]
    Write { root: PathBuf, path: String, source: std::io::Error },
    #[error("cannot hash the root password: {0}")]
    Hash(String),
    #[error("{path} inside VE root {root} has no line for user {user}")]
    NoSuchUser { root: PathBuf, path: String, user: String },
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

fn open_in_root(root: &Path, relative: &str, flags: i32, mode: u32) -> Result<std::fs::File, GuestFileError> {
    let open_error = |source| GuestFileError::Open { root: root.into(), path: relative.into(), source };
    let root_fd = std::fs::File::open(root).map_err(open_error)?;
    let trimmed = relative.trim_start_matches('/');
    let c_path = CString::new(if trimmed.is_empty() { "." } else { trimmed })
        .map_err(|_| open_error(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 },
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (a properly laid out struct open_how of the
    // given size) and the NUL-terminated path; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(open_error(std::io::Error::last_os_error()));
    }
    // SAFETY: openat2 returned a new file descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Ok(std::fs::File::from(owned))
}

/// Replaces the contents of `relative` (created with `mode` if missing)
/// inside the VE root `root`, owned by the VE's root (uid 0 in the image).
pub fn write_file(root: &Path, relative: &str, contents: &[u8], mode: u32) -> Result<(), GuestFileError> {
    let mut file = open_in_root(root, relative, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, mode)?;
    let write_error = |source| GuestFileError::Write { root: root.into(), path: relative.into(), source };
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

pub fn read_file(root: &Path, relative: &str) -> Result<String, GuestFileError> {
    let mut file = open_in_root(root, relative, libc::O_RDONLY, 0)?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|source| GuestFileError::Open { root: root.into(), path: relative.into(), source })?;
    Ok(text)
}

/// Creates a directory inside the VE root if missing.
pub fn ensure_dir(root: &Path, relative: &str, mode: u32) -> Result<(), GuestFileError> {
    let (parent, name) = match relative.trim_end_matches('/').rsplit_once('/') {
        Some((parent, name)) => (if parent.is_empty() { "/" } else { parent }, name),
        None => ("/", relative),
    };
    let dir = open_in_root(root, parent, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let c_name = CString::new(Path::new(name).as_os_str().as_bytes())
        .map_err(|_| GuestFileError::Open { root: root.into(), path: relative.into(), source: std::io::Error::from_raw_os_error(libc::EINVAL) })?;
    // SAFETY: mkdirat with a valid directory fd and a NUL-terminated name.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c_name.as_ptr(), mode) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(GuestFileError::Write { root: root.into(), path: relative.into(), source: error });
        }
    }
    Ok(())
}

/// The /etc/hosts of a VE: localhost plus its own name on its addresses.
pub fn hosts_file(hostname: &str, addresses: &[String]) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let names = if short == hostname { hostname.to_string() } else { format!("{hostname} {short}") };
    let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if addresses.is_empty() {
        text.push_str(&format!("127.0.1.1\t{names}\n"));
    }
    for address in addresses {
        text.push_str(&format!("{address}\t{names}\n"));
    }
    text
}

/// Hashes a password the way /etc/shadow expects it (SHA-512 crypt).
pub fn hash_password(password: &str) -> Result<String, GuestFileError> {
    let params = sha_crypt::Sha512Params::new(5000).map_err(|e| GuestFileError::Hash(format!("{e:?}")))?;
    sha_crypt::sha512_simple(password, &params).map_err(|e| GuestFileError::Hash(format!("{e:?}")))
}

/// Returns /etc/shadow text with `user`'s password field replaced.
pub fn set_shadow_password(shadow: &str, user: &str, hash: &str) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = shadow
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 2 && fields[0] == user {
                found = true;
                fields[1] = hash;
                fields.join(":")
            } else {
                line.to_string()
            }
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

/// Sets root's password inside the VE root.
pub fn set_root_password(root: &Path, password: &str) -> Result<(), GuestFileError> {
    let hash = hash_password(password)?;
    let shadow = read_file(root, "/etc/shadow")?;
    let updated = set_shadow_password(&shadow, "root", &hash).ok_or_else(|| GuestFileError::NoSuchUser {
        root: root.into(),
        path: "/etc/shadow".into(),
        user: "root".into(),
    })?;
    write_file(root, "/etc/shadow", updated.as_bytes(), 0o640)
}

/// Installs `keys` as root's authorized SSH keys inside the VE root.
pub fn set_root_ssh_keys(root: &Path, keys: &[String]) -> Result<(), GuestFileError> {
    ensure_dir(root, "/root", 0o700)?;
    ensure_dir(root, "/root/.ssh", 0o700)?;
    let text: String = keys.iter().map(|k| format!("{}\n", k.trim())).collect();
    write_file(root, "/root/.ssh/authorized_keys", text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_password_replaced_only_for_user() {
        let shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n";
        let out = set_shadow_password(shadow, "root", "$6$salt$hash").unwrap();
        assert_eq!(out, "root:$6$salt$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n");
        assert!(set_shadow_password(shadow, "nobody", "x").is_none());
    }

    #[test]
    fn password_hash_is_sha512_crypt() {
        let hash = hash_password("secret").unwrap();
        assert!(hash.starts_with("$6$"), "{hash}");
    }

    #[test]
    fn hosts_lists_the_ve_name() {
        let hosts = hosts_file("web1.example.com", &["10.0.0.5".into()]);
        assert!(hosts.contains("10.0.0.5\tweb1.example.com web1\n"));
        assert!(hosts_file("web1", &[]).contains("127.0.1.1\tweb1\n"));
    }

    #[test]
    fn writes_cannot_escape_through_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, "host data").unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(&target, root.path().join("etc/hostname")).unwrap();
        // A symlink as the last component is refused (O_NOFOLLOW)...
        assert!(write_file(root.path(), "/etc/hostname", b"evil", 0o644).is_err());
        // ...and a symlinked directory resolves inside the root, never outside.
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        let _ = write_file(root.path(), "/escape/victim", b"evil", 0o644);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "host data");
        write_file(root.path(), "/etc/hosts", b"ok", 0o644).unwrap();
        ensure_dir(root.path(), "/root", 0o700).unwrap();
        ensure_dir(root.path(), "/root/.ssh", 0o700).unwrap();
        assert!(root.path().join("root/.ssh").is_dir());
        assert_eq!(read_file(root.path(), "etc/hosts").unwrap(), "ok");
    }
}

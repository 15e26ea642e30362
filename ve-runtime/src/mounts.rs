//! OCI mount entries turned into mount(2) arguments (pure, unit-tested).

use std::path::PathBuf;

use nix::mount::MsFlags;
use oci_spec::runtime::Mount;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("config.json: mount {destination}: option {option:?} is not supported")]
    UnsupportedOption {
        destination: PathBuf,
        option: String,
    },
    #[error("config.json: mount {0}: destination must be an absolute path")]
    RelativeDestination(PathBuf),
    #[error("config.json: mount {0}: a bind mount needs a source")]
    BindWithoutSource(PathBuf),
    #[error("config.json: mount {0}: type is required unless the mount is a bind mount")]
    MissingType(PathBuf),
    #[error("config.json: linux.rootfsPropagation {0:?} is not supported (use private, rprivate, slave, rslave)")]
    BadPropagation(String),
}

/// One mount, ready for mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub destination: PathBuf,
    pub fs_type: Option<String>,
    pub source: Option<PathBuf>,
    /// Flags for the first mount(2) call.
    pub flags: MsFlags,
    /// Propagation to set after mounting (e.g. MS_PRIVATE), applied in a second call.
    pub propagation: MsFlags,
    /// Filesystem-specific options (the "data" argument), comma-joined.
    pub data: String,
    pub bind: bool,
}

impl MountSpec {
    pub fn is_readonly(&self) -> bool {
        self.flags.contains(MsFlags::MS_RDONLY)
    }

    pub fn from_oci(mount: &Mount) -> Result<Self, MountError> {
        let destination = mount.destination().clone();
        if !destination.is_absolute() {
            return Err(MountError::RelativeDestination(destination));
        }
        let mut flags = MsFlags::empty();
        let mut propagation = MsFlags::empty();
        let mut data = Vec::new();
        let mut bind = matches!(mount.typ().as_deref(), Some("bind"));
        for option in mount.options().iter().flatten() {
            let option = option.as_str();
            // (flag, set?) for the plain mount flags.
            let flag = match option {
                "ro" => Some((MsFlags::MS_RDONLY, true)),
                "rw" => Some((MsFlags::MS_RDONLY, false)),
                "nosuid" => Some((MsFlags::MS_NOSUID, true)),
                "suid" => Some((MsFlags::MS_NOSUID, false)),
                "nodev" => Some((MsFlags::MS_NODEV, true)),
                "dev" => Some((MsFlags::MS_NODEV, false)),
                "noexec" => Some((MsFlags::MS_NOEXEC, true)),
                "exec" => Some((MsFlags::MS_NOEXEC, false)),
                "sync" => Some((MsFlags::MS_SYNCHRONOUS, true)),
                "async" => Some((MsFlags::MS_SYNCHRONOUS, false)),
                "dirsync" => Some((MsFlags::MS_DIRSYNC, true)),
                "noatime" => Some((MsFlags::MS_NOATIME, true)),
                "atime" => Some((MsFlags::MS_NOATIME, false)),
                "nodiratime" => Some((MsFlags::MS_NODIRATIME, true)),
                "diratime" => Some((MsFlags::MS_NODIRATIME, false)),
                "relatime" => Some((MsFlags::MS_RELATIME, true)),
                "norelatime" => Some((MsFlags::MS_RELATIME, false)),
                "strictatime" => Some((MsFlags::MS_STRICTATIME, true)),
                "nostrictatime" => Some((MsFlags::MS_STRICTATIME, false)),
                "mand" => Some((MsFlags::MS_MANDLOCK, true)),
                "nomand" => Some((MsFlags::MS_MANDLOCK, false)),
                _ => None,
            };
            if let Some((f, set)) = flag {
                flags.set(f, set);
                continue;
            }
            match option {
                "bind" => bind = true,
                "rbind" => {
                    bind = true;
                    flags |= MsFlags::MS_REC;
                }
                "private" => propagation = MsFlags::MS_PRIVATE,
                "rprivate" => propagation = MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                "slave" => propagation = MsFlags::MS_SLAVE,
                "rslave" => propagation = MsFlags::MS_SLAVE | MsFlags::MS_REC,
                "shared" => propagation = MsFlags::MS_SHARED,
                "rshared" => propagation = MsFlags::MS_SHARED | MsFlags::MS_REC,
                "unbindable" => propagation = MsFlags::MS_UNBINDABLE,
                "runbindable" => propagation = MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
                // Recursive read-only, idmapped mounts and friends need mount_setattr; not done here.
                o if o.starts_with("rro")
                    || o.starts_with("rrw")
                    || o.starts_with("idmap")
                    || o.starts_with("ridmap")
                    || o == "remount"
                    || o.starts_with("tmpcopyup")
                    || o.starts_with("x-") =>
                {
                    return Err(MountError::UnsupportedOption {
                        destination,
                        option: o.to_string(),
                    })
                }
                // Anything with '=' or a bare word we do not know goes to the filesystem
                // (mode=, size=, newinstance, ptmxmode=...): the kernel rejects what it does not know.
                o => data.push(o.to_string()),
            }
        }
        if bind {
            flags |= MsFlags::MS_BIND;
            if mount.source().is_none() {
                return Err(MountError::BindWithoutSource(destination));
            }
        } else if mount.typ().is_none() {
            return Err(MountError::MissingType(destination));
        }
        Ok(Self {
            destination,
            fs_type: mount.typ().clone(),
            source: mount.source().clone(),
            flags,
            propagation,
            data: data.join(","),
            bind,
        })
    }
}

/// linux.rootfsPropagation -> flags for the container's / (default rprivate).
pub fn parse_propagation(value: &str) -> Result<MsFlags, MountError> {
    match value {
        "" | "rprivate" => Ok(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "private" => Ok(MsFlags::MS_PRIVATE),
        "rslave" => Ok(MsFlags::MS_SLAVE | MsFlags::MS_REC),
        "slave" => Ok(MsFlags::MS_SLAVE),
        other => Err(MountError::BadPropagation(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(json: serde_json::Value) -> Mount {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn devpts_options_split_into_flags_and_data() {
        let m = MountSpec::from_oci(&mount(serde_json::json!({
            "destination": "/dev/pts", "type": "devpts", "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
        })))
        .unwrap();
        assert_eq!(m.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(m.data, "newinstance,ptmxmode=0666,mode=0620,gid=5");
        assert!(!m.bind);
    }

    #[test]
    fn bind_mounts_of_files() {
        let m = MountSpec::from_oci(&mount(serde_json::json!({
            "destination": "/proc/meminfo", "type": "bind", "source": "/var/lib/views/meminfo",
            "options": ["rbind", "ro", "rprivate"]
        })))
        .unwrap();
        assert!(m.bind && m.is_readonly());
        assert!(m.flags.contains(MsFlags::MS_REC | MsFlags::MS_BIND));
        assert_eq!(m.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
    }

    #[test]
    fn bad_mounts_are_refused() {
        let relative = mount(serde_json::json!({"destination": "proc", "type": "proc"}));
        assert!(matches!(
            MountSpec::from_oci(&relative),
            Err(MountError::RelativeDestination(_))
        ));
        let idmap = mount(
            serde_json::json!({"destination": "/x", "type": "bind", "source": "/y", "options": ["idmap"]}),
        );
        assert!(matches!(
            MountSpec::from_oci(&idmap),
            Err(MountError::UnsupportedOption { .. })
        ));
        let no_source = mount(serde_json::json!({"destination": "/x", "options": ["bind"]}));
        assert!(matches!(
            MountSpec::from_oci(&no_source),
            Err(MountError::BindWithoutSource(_))
        ));
        assert!(parse_propagation("shared").is_err());
    }
}

//! Which namespaces a container gets, and the uid/gid maps of its user namespace.

use std::path::PathBuf;

use nix::sched::CloneFlags;
use oci_spec::runtime::{Linux, LinuxIdMapping, LinuxNamespaceType};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("config.json: linux.namespaces: the {0} namespace is not supported")]
    Unsupported(String),
    #[error("config.json: linux.namespaces lists the {0} namespace twice")]
    Duplicate(String),
    #[error("config.json: a user namespace needs linux.uidMappings and linux.gidMappings")]
    MissingMappings,
    #[error("config.json: linux.uidMappings/gidMappings need a new user namespace")]
    MappingsWithoutUserNamespace,
    #[error("config.json: linux.{0}Mappings: mapping container id {1} to host id {2} (size {3}) overflows")]
    MappingOverflow(&'static str, u32, u32, u32),
    #[error("cannot write {path}: {source}")]
    WriteMap {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the container gets its user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserNamespace {
    /// Runs in the caller's user namespace (no uid shift).
    Host,
    /// A new one, with maps the runtime writes from outside.
    New {
        uid_map: String,
        gid_map: String,
        root_host_uid: u32,
        root_host_gid: u32,
    },
    /// Joins an existing one.
    Join(PathBuf),
}

/// The namespaces to create and to join, derived from linux.namespaces (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePlan {
    /// Namespaces created after the user namespace (so it owns them).
    pub new: CloneFlags,
    /// Namespaces joined by path, before the user namespace is created.
    pub join: Vec<(CloneFlags, PathBuf)>,
    pub user: UserNamespace,
}

fn flag_of(typ: LinuxNamespaceType) -> Result<CloneFlags, NamespaceError> {
    Ok(match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        other => return Err(NamespaceError::Unsupported(other.to_string())),
    })
}

/// Formats /proc/PID/{uid,gid}_map contents: one "inside outside count" line per mapping.
pub fn format_id_map(
    kind: &'static str,
    mappings: &[LinuxIdMapping],
) -> Result<String, NamespaceError> {
    let mut text = String::new();
    for m in mappings {
        let overflow =
            NamespaceError::MappingOverflow(kind, m.container_id(), m.host_id(), m.size());
        m.container_id().checked_add(m.size()).ok_or(overflow)?;
        let overflow =
            NamespaceError::MappingOverflow(kind, m.container_id(), m.host_id(), m.size());
        m.host_id().checked_add(m.size()).ok_or(overflow)?;
        text.push_str(&format!(
            "{} {} {}\n",
            m.container_id(),
            m.host_id(),
            m.size()
        ));
    }
    Ok(text)
}

/// The host id that container id 0 maps to, if mapped.
pub fn host_id_of_root(mappings: &[LinuxIdMapping]) -> Option<u32> {
    mappings
        .iter()
        .find(|m| m.container_id() == 0 && m.size() > 0)
        .map(|m| m.host_id())
}

impl NamespacePlan {
    pub fn from_spec(linux: &Linux) -> Result<Self, NamespaceError> {
        let mut new = CloneFlags::empty();
        let mut join = Vec::new();
        let mut seen = CloneFlags::empty();
        let mut user = UserNamespace::Host;
        for ns in linux.namespaces().iter().flatten() {
            let flag = flag_of(ns.typ())?;
            if seen.contains(flag) {
                return Err(NamespaceError::Duplicate(ns.typ().to_string()));
            }
            seen |= flag;
            match (flag, ns.path()) {
                (CloneFlags::CLONE_NEWUSER, Some(path)) => user = UserNamespace::Join(path.clone()),
                (CloneFlags::CLONE_NEWUSER, None) => {
                    let uid = linux.uid_mappings().as_deref().unwrap_or_default();
                    let gid = linux.gid_mappings().as_deref().unwrap_or_default();
                    if uid.is_empty() || gid.is_empty() {
                        return Err(NamespaceError::MissingMappings);
                    }
                    user = UserNamespace::New {
                        uid_map: format_id_map("uid", uid)?,
                        gid_map: format_id_map("gid", gid)?,
                        root_host_uid: host_id_of_root(uid).unwrap_or(0),
                        root_host_gid: host_id_of_root(gid).unwrap_or(0),
                    };
                }
                (flag, Some(path)) => join.push((flag, path.clone())),
                (flag, None) => new |= flag,
            }
        }
        let has_maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty());
        if has_maps && !matches!(user, UserNamespace::New { .. }) {
            return Err(NamespaceError::MappingsWithoutUserNamespace);
        }
        Ok(Self { new, join, user })
    }

    pub fn new_user_namespace(&self) -> bool {
        matches!(self.user, UserNamespace::New { .. })
    }

    pub fn new_pid_namespace(&self) -> bool {
        self.new.contains(CloneFlags::CLONE_NEWPID)
    }

    /// Host uid and gid of the container's root (0, 0 without a new user namespace).
    pub fn root_host_ids(&self) -> (u32, u32) {
        match self.user {
            UserNamespace::New {
                root_host_uid,
                root_host_gid,
                ..
            } => (root_host_uid, root_host_gid),
            _ => (0, 0),
        }
    }
}

/// Writes the maps of a process that has just unshared its user namespace.
/// The caller is privileged in the parent namespace, so setgroups stays allowed.
pub fn write_id_maps(pid: i32, uid_map: &str, gid_map: &str) -> Result<(), NamespaceError> {
    for (file, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::write(&path, map).map_err(|source| NamespaceError::WriteMap { path, source })?;
    }
    Ok(())
}

/// The map of the nested user namespace that locks the VE's mounts: the ids
/// the outer namespace maps, mapped to themselves (pure).
pub fn nested_identity_map(outer_map: &str) -> String {
    outer_map
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() == 3).then(|| format!("{} {} {}\n", fields[0], fields[0], fields[2]))
        })
        .collect()
}

/// Namespace files under /proc/PID/ns in the order exec joins them: the user
/// namespace last, because the others are joined with the host's privileges.
pub const JOIN_ORDER: &[(&str, CloneFlags)] = &[
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
    ("user", CloneFlags::CLONE_NEWUSER),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(json: serde_json::Value) -> Linux {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn plan_splits_new_join_and_user() {
        let l = linux(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/ve1"}, {"type": "user"}, {"type": "mount"}],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}]
        }));
        let plan = NamespacePlan::from_spec(&l).unwrap();
        assert_eq!(plan.new, CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS);
        assert_eq!(
            plan.join,
            vec![(CloneFlags::CLONE_NEWNET, PathBuf::from("/run/netns/ve1"))]
        );
        assert_eq!(plan.root_host_ids(), (100000, 200000));
        match plan.user {
            UserNamespace::New { uid_map, .. } => assert_eq!(uid_map, "0 100000 65536\n"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nested_map_is_the_identity_over_mapped_ids() {
        assert_eq!(nested_identity_map("0 100000 65536\n"), "0 0 65536\n");
        assert_eq!(
            nested_identity_map("0 1000 1\n1 200000 999\n"),
            "0 0 1\n1 1 999\n"
        );
    }

    #[test]
    fn bad_plans_are_refused() {
        let dup = linux(serde_json::json!({"namespaces": [{"type": "pid"}, {"type": "pid"}]}));
        assert!(matches!(
            NamespacePlan::from_spec(&dup),
            Err(NamespaceError::Duplicate(_))
        ));
        let no_maps = linux(serde_json::json!({"namespaces": [{"type": "user"}]}));
        assert!(matches!(
            NamespacePlan::from_spec(&no_maps),
            Err(NamespaceError::MissingMappings)
        ));
        let time = linux(serde_json::json!({"namespaces": [{"type": "time"}]}));
        assert!(matches!(
            NamespacePlan::from_spec(&time),
            Err(NamespaceError::Unsupported(_))
        ));
        let overflow = linux(serde_json::json!({
            "namespaces": [{"type": "user"}],
            "uidMappings": [{"containerID": 0, "hostID": 4294967000u32, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]
        }));
        assert!(matches!(
            NamespacePlan::from_spec(&overflow),
            Err(NamespaceError::MappingOverflow(..))
        ));
    }
}

//! The node's configuration: where state lives, the bridge VEs attach to,
//! the uid ranges VEs map to. Read from `/etc/vz/node.toml` (or `$VZ_CONFIG`);
//! every field has a default so an empty file, or no file, is a working node.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Ipv4Cidr, Ipv6Cidr};

/// Where `vectl` and the node agent look for the configuration by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vz/node.toml";
/// Environment variable that overrides [`DEFAULT_CONFIG_PATH`] (tests use it).
pub const CONFIG_ENV: &str = "VZ_CONFIG";

/// Number of host uids (and gids) each VE maps: root in the VE is the first.
pub const UIDS_PER_VE: u32 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read node config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("node config {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Persistent state: `ves/<name>/` holds each VE's spec and disk image.
    pub state_dir: PathBuf,
    /// Volatile state (tmpfs): runtime state, rootfs mount points.
    pub run_dir: PathBuf,
    /// Built templates, one directory each (see images/).
    pub templates_dir: PathBuf,
    /// cgroup under which every VE's cgroup is created, in every hierarchy.
    pub cgroup_parent: String,
    /// First host uid of the VE uid ranges; VE number `n` maps to
    /// `uid_range_start + n * 65536`.
    pub uid_range_start: u32,
    /// How many VE uid ranges this node may hand out.
    pub uid_range_slots: u32,
    /// Where the node's `ve-procfs` daemon mounts the per-VE /proc views.
    pub procfs_mountpoint: PathBuf,
    pub network: NetworkConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The node bridge every VE's veth joins.
    pub bridge: String,
    /// The bridge's IPv4 address and prefix: the VEs' default gateway.
    pub ipv4_gateway: Option<Ipv4Cidr>,
    /// The bridge's IPv6 address and prefix.
    pub ipv6_gateway: Option<Ipv6Cidr>,
    /// Masquerade VE traffic leaving the node (so VEs reach package mirrors).
    pub nat_outbound: bool,
    /// Resolvers written to a new VE's /etc/resolv.conf; empty: copy the node's.
    pub dns_servers: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            state_dir: PathBuf::from("/var/lib/vz"),
            run_dir: PathBuf::from("/run/vz"),
            templates_dir: PathBuf::from("/var/lib/vz/templates"),
            cgroup_parent: "vz".into(),
            uid_range_start: 1_000_000_000,
            uid_range_slots: 50_000,
            procfs_mountpoint: PathBuf::from("/run/vz/procfs"),
            network: NetworkConfig::default(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "vzbr0".into(),
            ipv4_gateway: Some(Ipv4Cidr { address: Ipv4Addr::new(10, 213, 0, 1), prefix: 16 }),
            ipv6_gateway: Some(Ipv6Cidr {
                address: Ipv6Addr::new(0xfd00, 0x0213, 0, 0, 0, 0, 0, 1),
                prefix: 64,
            }),
            nat_outbound: true,
            dns_servers: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// Loads the config from `$VZ_CONFIG`, else [`DEFAULT_CONFIG_PATH`];
    /// a missing default file means the defaults.
    pub fn load_default() -> Result<NodeConfig, ConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) => NodeConfig::load(Path::new(&path)),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                NodeConfig::load(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(NodeConfig::default()),
        }
    }

    /// Loads `path` if given (a `--config` flag), else as [`NodeConfig::load_default`].
    pub fn load_from(path: Option<&Path>) -> Result<NodeConfig, ConfigError> {
        match path {
            Some(path) => NodeConfig::load(path),
            None => NodeConfig::load_default(),
        }
    }

    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        NodeConfig::parse(&text).map_err(|message| ConfigError::Invalid { path: path.into(), message })
    }

    /// Parses and validates a config file's text.
    pub fn parse(text: &str) -> Result<NodeConfig, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (field, path) in [
            ("state_dir", &self.state_dir),
            ("run_dir", &self.run_dir),
            ("templates_dir", &self.templates_dir),
            ("procfs_mountpoint", &self.procfs_mountpoint),
        ] {
            if !path.is_absolute() {
                return Err(format!("{field} must be an absolute path, got {}", path.display()));
            }
        }
        if self.cgroup_parent.is_empty()
            || !self.cgroup_parent.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "cgroup_parent must be a plain name of letters, digits, '-', '_' or '.', got {:?}",
                self.cgroup_parent
            ));
        }
        let bridge = &self.network.bridge;
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "network.bridge must be an interface name of 1 to 15 letters, digits, '-' or '_', got {bridge:?}"
            ));
        }
        if self.uid_range_start == 0 {
            return Err("uid_range_start must not be 0: host root must never be a VE's uid".into());
        }
        let last = self.uid_range_start as u64 + self.uid_range_slots as u64 * UIDS_PER_VE as u64;
        if self.uid_range_slots == 0 || last > u32::MAX as u64 {
            return Err(format!(
                "uid_range_start {} with {} slots of {UIDS_PER_VE} uids runs past the largest uid",
                self.uid_range_start, self.uid_range_slots
            ));
        }
        Ok(())
    }

    pub fn ves_dir(&self) -> PathBuf {
        self.state_dir.join("ves")
    }

    /// Persistent directory of one VE: spec, disk image.
    pub fn ve_dir(&self, name: &str) -> PathBuf {
        self.ves_dir().join(name)
    }

    /// Volatile directory of one running VE: OCI bundle, rootfs and disk mount points.
    pub fn ve_run_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join("ves").join(name)
    }

    /// State root handed to ve-runtime.
    pub fn runtime_root(&self) -> PathBuf {
        self.run_dir.join("runtime")
    }

    /// Host uid that is root in the VE holding uid slot `slot`.
    pub fn uid_base_for_slot(&self, slot: u32) -> u32 {
        self.uid_range_start + slot * UIDS_PER_VE
    }

    /// The slot a host uid base belongs to, if it is one of this node's.
    pub fn slot_for_uid_base(&self, uid_base: u32) -> Option<u32> {
        let offset = uid_base.checked_sub(self.uid_range_start)?;
        (offset % UIDS_PER_VE == 0 && offset / UIDS_PER_VE < self.uid_range_slots)
            .then_some(offset / UIDS_PER_VE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(NodeConfig::parse("").unwrap(), NodeConfig::default());
    }

    #[test]
    fn fields_override_defaults() {
        let config = NodeConfig::parse(
            "state_dir = \"/tmp/x\"\n[network]\nbridge = \"br-test\"\nipv4_gateway = \"10.9.0.1/24\"\n",
        )
        .unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.network.bridge, "br-test");
        assert_eq!(config.network.ipv4_gateway.unwrap().prefix, 24);
        assert_eq!(config.run_dir, PathBuf::from("/run/vz"));
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err = NodeConfig::parse("stat_dir = \"/x\"").unwrap_err();
        assert!(err.contains("stat_dir"), "{err}");
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(NodeConfig::parse("state_dir = \"relative\"").unwrap_err().contains("absolute"));
        assert!(NodeConfig::parse("[network]\nbridge = \"a-very-long-bridge-name\"").is_err());
        assert!(NodeConfig::parse("cgroup_parent = \"../escape\"").is_err());
        assert!(NodeConfig::parse("uid_range_start = 0").is_err());
        assert!(NodeConfig::parse("uid_range_start = 4000000000\nuid_range_slots = 10000").is_err());
        assert!(NodeConfig::parse("[network]\nipv4_gateway = \"10.0.0.1/40\"").is_err());
    }

    #[test]
    fn uid_slots_round_trip() {
        let config = NodeConfig::default();
        let base = config.uid_base_for_slot(7);
        assert_eq!(config.slot_for_uid_base(base), Some(7));
        assert_eq!(config.slot_for_uid_base(base + 1), None);
        assert_eq!(config.slot_for_uid_base(5), None);
    }
}

//! What a VE is: its name, template, addresses and limits, and the rules
//! they obey. Pure data and validation; nothing here touches the system.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("invalid VE name {0:?}: use 1 to 32 lowercase letters, digits or '-', starting with a letter")]
    Name(String),
    #[error("invalid hostname {0:?}: use letters, digits, '-' and '.', at most 253 characters, labels of at most 63")]
    Hostname(String),
    #[error("invalid address {input:?}: {reason}")]
    Address { input: String, reason: String },
    #[error("invalid size {input:?}: {reason}")]
    Size { input: String, reason: String },
    #[error("invalid limit: {0}")]
    Limit(String),
    #[error("invalid ssh key: {0}")]
    SshKey(String),
}

/// An IPv4 address with its prefix length, written `10.0.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

/// An IPv6 address with its prefix length, written `fd00::5/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Cidr {
    pub address: Ipv6Addr,
    pub prefix: u8,
}

fn split_cidr(input: &str, default_prefix: u8) -> Result<(&str, u8), SpecError> {
    match input.split_once('/') {
        None => Ok((input, default_prefix)),
        Some((address, prefix)) => {
            let prefix = prefix.parse::<u8>().map_err(|_| SpecError::Address {
                input: input.into(),
                reason: format!("prefix {prefix:?} is not a number"),
            })?;
            Ok((address, prefix))
        }
    }
}

impl FromStr for Ipv4Cidr {
    type Err = SpecError;
    fn from_str(input: &str) -> Result<Self, SpecError> {
        let (address, prefix) = split_cidr(input, 32)?;
        let address: Ipv4Addr = address.parse().map_err(|_| SpecError::Address {
            input: input.into(),
            reason: "not an IPv4 address".into(),
        })?;
        if prefix > 32 {
            return Err(SpecError::Address { input: input.into(), reason: "prefix must be 0 to 32".into() });
        }
        Ok(Ipv4Cidr { address, prefix })
    }
}

impl FromStr for Ipv6Cidr {
    type Err = SpecError;
    fn from_str(input: &str) -> Result<Self, SpecError> {
        let (address, prefix) = split_cidr(input, 128)?;
        let address: Ipv6Addr = address.parse().map_err(|_| SpecError::Address {
            input: input.into(),
            reason: "not an IPv6 address".into(),
        })?;
        if prefix > 128 {
            return Err(SpecError::Address { input: input.into(), reason: "prefix must be 0 to 128".into() });
        }
        Ok(Ipv6Cidr { address, prefix })
    }
}

impl Ipv4Cidr {
    fn mask(&self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }
    /// Whether `other` lies in this address's subnet.
    pub fn contains(&self, other: Ipv4Addr) -> bool {
        u32::from(self.address) & self.mask() == u32::from(other) & self.mask()
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !self.mask())
    }
}

impl Ipv6Cidr {
    fn mask(&self) -> u128 {
        if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) }
    }
    pub fn contains(&self, other: Ipv6Addr) -> bool {
        u128::from(self.address) & self.mask() == u128::from(other) & self.mask()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

macro_rules! serde_via_string {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_string!(Ipv4Cidr);
serde_via_string!(Ipv6Cidr);

/// Parses a byte size: a plain number of bytes, or with a K, M, G or T suffix
/// (powers of 1024, an optional trailing "iB" or "B").
pub fn parse_size(input: &str) -> Result<u64, SpecError> {
    let bad = |reason: &str| SpecError::Size { input: input.into(), reason: reason.into() };
    let text = input.trim();
    let text = text.strip_suffix("iB").or_else(|| text.strip_suffix('B')).unwrap_or(text);
    let (digits, multiplier) = match text.chars().last() {
        Some(c) if c.is_ascii_digit() => (text, 1u64),
        Some('K' | 'k') => (&text[..text.len() - 1], 1 << 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 1 << 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 1 << 30),
        Some('T' | 't') => (&text[..text.len() - 1], 1 << 40),
        _ => return Err(bad("expected a number with an optional K, M, G or T suffix")),
    };
    let value: u64 = digits.parse().map_err(|_| bad("expected a whole number before the suffix"))?;
    value.checked_mul(multiplier).ok_or_else(|| bad("too large"))
}

/// Formats a byte count the way [`parse_size`] reads it, exact where possible.
pub fn format_size(bytes: u64) -> String {
    for (suffix, unit) in [("T", 1u64 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Guaranteed and maximum resources of a VE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// RAM limit in bytes.
    pub memory_bytes: u64,
    /// Swap the VE may use beyond its RAM, in bytes.
    pub swap_bytes: u64,
    /// CPU quota in whole and fractional CPUs (1.5 = one and a half cores).
    pub cpus: f64,
    /// Relative CPU weight under contention (1 to 10000, default 100).
    pub cpu_weight: u64,
    /// Maximum number of processes and threads.
    pub pids: u64,
    /// Disk quota: the size of the VE's ext4 image, in bytes.
    pub disk_bytes: u64,
    /// Disk bandwidth and operation caps on the VE's disk (0: unlimited).
    #[serde(default)]
    pub io: IoLimits,
}

/// Block I/O caps on the VE's loop device; 0 means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IoLimits {
    pub read_bytes_per_s: u64,
    pub write_bytes_per_s: u64,
    pub read_ops_per_s: u64,
    pub write_ops_per_s: u64,
}

pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
pub const MIN_DISK_BYTES: u64 = 16 << 20;
pub const MIN_PIDS: u64 = 16;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            swap_bytes: 0,
            cpus: 1.0,
            cpu_weight: 100,
            pids: 1024,
            disk_bytes: 2 << 30,
            io: IoLimits::default(),
        }
    }
}

impl Limits {
    pub fn validate(&self, host_cpus: usize) -> Result<(), SpecError> {
        if self.memory_bytes < MIN_MEMORY_BYTES {
            return Err(SpecError::Limit(format!("memory must be at least {}", format_size(MIN_MEMORY_BYTES))));
        }
        if self.disk_bytes < MIN_DISK_BYTES {
            return Err(SpecError::Limit(format!("disk must be at least {}", format_size(MIN_DISK_BYTES))));
        }
        if !(self.cpus.is_finite() && self.cpus >= 0.01) {
            return Err(SpecError::Limit(format!("cpus must be at least 0.01, got {}", self.cpus)));
        }
        if self.cpus > host_cpus as f64 {
            return Err(SpecError::Limit(format!(
                "cpus {} is more than this node's {host_cpus} CPUs",
                self.cpus
            )));
        }
        if !(1..=10000).contains(&self.cpu_weight) {
            return Err(SpecError::Limit(format!("cpu weight must be 1 to 10000, got {}", self.cpu_weight)));
        }
        if self.pids < MIN_PIDS {
            return Err(SpecError::Limit(format!("pids must be at least {MIN_PIDS}, got {}", self.pids)));
        }
        let io = &self.io;
        for (what, value, minimum) in [
            ("read bandwidth", io.read_bytes_per_s, 1 << 20),
            ("write bandwidth", io.write_bytes_per_s, 1 << 20),
            ("read operations per second", io.read_ops_per_s, 10),
            ("write operations per second", io.write_ops_per_s, 10),
        ] {
            if value != 0 && value < minimum {
                return Err(SpecError::Limit(format!("{what} must be 0 (unlimited) or at least {minimum}, got {value}")));
            }
        }
        Ok(())
    }

    /// CFS quota in microseconds for a period of [`CPU_PERIOD_US`].
    pub fn cpu_quota_us(&self) -> i64 {
        (self.cpus * CPU_PERIOD_US as f64).round() as i64
    }
}

pub const CPU_PERIOD_US: u64 = 100_000;

/// The CPUs a VE may run on: as many as its quota rounded up, so `nproc`
/// inside tells the truth, spread over the host by the VE's uid slot so
/// VEs don't pile onto CPU 0. `None` only if the host count is unknown.
pub fn cpuset_for(cpus: f64, host_cpus: usize, slot: u32) -> Option<String> {
    let wanted = (cpus.ceil() as usize).max(1);
    if host_cpus == 0 {
        return None;
    }
    if wanted >= host_cpus {
        return Some(format!("0-{}", host_cpus - 1));
    }
    let first = (slot as usize * wanted) % host_cpus;
    let mut chosen: Vec<usize> = (0..wanted).map(|i| (first + i) % host_cpus).collect();
    chosen.sort_unstable();
    Some(chosen.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","))
}

/// Everything that defines a VE, as stored in `<state>/ves/<name>/ve.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VeSpec {
    pub name: String,
    pub hostname: String,
    pub template: String,
    #[serde(default)]
    pub ipv4: Vec<Ipv4Cidr>,
    #[serde(default)]
    pub ipv6: Vec<Ipv6Cidr>,
    pub limits: Limits,
    /// Host uid (and gid) that is root inside the VE; 65536 ids from it.
    pub uid_base: u32,
    /// Start the VE when the node agent starts and keep it running.
    #[serde(default)]
    pub autostart: bool,
}

/// Checks a VE name: it becomes a directory, a cgroup and part of interface names.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok { Ok(()) } else { Err(SpecError::Name(name.into())) }
}

pub fn validate_hostname(hostname: &str) -> Result<(), SpecError> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if hostname.len() <= 253 && hostname.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(SpecError::Hostname(hostname.into()))
    }
}

/// Checks an OpenSSH public key line enough to refuse garbage and options.
pub fn validate_ssh_key(key: &str) -> Result<(), SpecError> {
    let mut fields = key.split_whitespace();
    let kind = fields.next().unwrap_or("");
    let body = fields.next().unwrap_or("");
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    if key.contains('\n') || !known || body.len() < 16 || !body.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c)) {
        return Err(SpecError::SshKey(format!(
            "expected one OpenSSH public key line like \"ssh-ed25519 AAAA... comment\", got {:?}",
            key.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

impl VeSpec {
    pub fn validate(&self, host_cpus: usize) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        validate_hostname(&self.hostname)?;
        self.limits.validate(host_cpus)?;
        let mut seen4 = std::collections::HashSet::new();
        for cidr in &self.ipv4 {
            let a = cidr.address;
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
                return Err(SpecError::Address { input: cidr.to_string(), reason: "not a usable unicast address".into() });
            }
            if cidr.prefix < 31 && (a == cidr.network() || a == cidr.broadcast()) {
                return Err(SpecError::Address { input: cidr.to_string(), reason: "is the network or broadcast address of its subnet".into() });
            }
            if !seen4.insert(a) {
                return Err(SpecError::Address { input: cidr.to_string(), reason: "given twice".into() });
            }
        }
        let mut seen6 = std::collections::HashSet::new();
        for cidr in &self.ipv6 {
            let a = cidr.address;
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80 {
                return Err(SpecError::Address { input: cidr.to_string(), reason: "not a usable global or unique-local unicast address".into() });
            }
            if !seen6.insert(a) {
                return Err(SpecError::Address { input: cidr.to_string(), reason: "given twice".into() });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        for bad in ["", "M", "1.5G", "-1G", "12Q", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1500), "1500");
    }

    #[test]
    fn cpusets_spread_and_cover_the_quota() {
        assert_eq!(cpuset_for(1.0, 2, 0).as_deref(), Some("0"));
        assert_eq!(cpuset_for(1.0, 2, 1).as_deref(), Some("1"));
        assert_eq!(cpuset_for(0.5, 4, 3).as_deref(), Some("3"));
        assert_eq!(cpuset_for(1.5, 4, 1).as_deref(), Some("2,3"));
        assert_eq!(cpuset_for(1.5, 3, 1).as_deref(), Some("0,2"));
        assert_eq!(cpuset_for(2.0, 2, 5).as_deref(), Some("0-1"));
        assert_eq!(cpuset_for(1.0, 0, 5), None);
    }

    #[test]
    fn names() {
        for good in ["web1", "a", "mail-server-2"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "1web", "Web", "web_1", "web-", "../x", "a b", &"a".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn hostnames() {
        validate_hostname("web1.example.com").unwrap();
        assert!(validate_hostname("bad_host").is_err());
        assert!(validate_hostname("-x").is_err());
        assert!(validate_hostname("a..b").is_err());
    }

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "10.0.0.5/24".parse().unwrap();
        assert!(c.contains("10.0.0.200".parse().unwrap()));
        assert!(!c.contains("10.0.1.1".parse().unwrap()));
        assert_eq!(c.network(), Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(c.to_string(), "10.0.0.5/24");
        assert_eq!("10.0.0.5".parse::<Ipv4Cidr>().unwrap().prefix, 32);
        assert!("10.0.0.5/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0/24".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::1/129".parse::<Ipv6Cidr>().is_err());
        let v6: Ipv6Cidr = "fd00::5/64".parse().unwrap();
        assert!(v6.contains("fd00::77".parse().unwrap()));
    }

    fn spec() -> VeSpec {
        VeSpec {
            name: "web1".into(),
            hostname: "web1".into(),
            template: "busybox".into(),
            ipv4: vec!["10.0.0.5/24".parse().unwrap()],
            ipv6: vec![],
            limits: Limits::default(),
            uid_base: 1_000_000_000,
            autostart: false,
        }
    }

    #[test]
    fn spec_validation() {
        spec().validate(2).unwrap();
        let mut s = spec();
        s.ipv4.push("10.0.0.5/24".parse().unwrap());
        assert!(s.validate(2).is_err());
        let mut s = spec();
        s.ipv4 = vec!["10.0.0.0/24".parse().unwrap()];
        assert!(s.validate(2).is_err());
        let mut s = spec();
        s.limits.cpus = 3.0;
        assert!(s.validate(2).unwrap_err().to_string().contains("2 CPUs"));
        let mut s = spec();
        s.limits.memory_bytes = 1;
        assert!(s.validate(2).is_err());
        let mut s = spec();
        s.limits.cpus = f64::NAN;
        assert!(s.validate(2).is_err());
    }

    #[test]
    fn spec_round_trips_as_json() {
        let s = spec();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"10.0.0.5/24\""));
        assert_eq!(serde_json::from_str::<VeSpec>(&text).unwrap(), s);
    }

    #[test]
    fn ssh_keys() {
        validate_ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx user@host").unwrap();
        assert!(validate_ssh_key("command=\"rm -rf /\" ssh-ed25519 AAAA").is_err());
        assert!(validate_ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx\nssh-rsa X").is_err());
    }
}

//! Validation of bridge and VE network configurations: pure functions, run
//! before anything touches the kernel so bad input changes nothing.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::identity::MAX_IFNAME_LEN;
use super::{BridgeConfig, VeNetwork};

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConfig {
    #[error("bridge name {0:?} must be 1-15 characters of a-z, A-Z, 0-9, '_' or '-', starting with a letter")]
    BridgeName(String),
    #[error("VE id {0:?} must be 1-64 characters of a-z, A-Z, 0-9, '_', '.' or '-'")]
    VeId(String),
    #[error("prefix /{prefix} of {address} is out of range (allowed: /{min}-/{max})")]
    Prefix {
        address: IpAddr,
        prefix: u8,
        min: u8,
        max: u8,
    },
    #[error("address {0} cannot be assigned to an interface (unspecified, loopback, multicast, broadcast or link-local)")]
    UnusableAddress(IpAddr),
    #[error("address {0} is listed twice")]
    DuplicateAddress(IpAddr),
    #[error("gateway {gateway} is not inside the subnet of any {family} address of the VE ({addresses})")]
    GatewayOutsideSubnet {
        gateway: IpAddr,
        family: &'static str,
        addresses: String,
    },
    #[error("gateway {0} is also one of the VE's own addresses")]
    GatewayIsOwnAddress(IpAddr),
    #[error("mtu {mtu} is out of range ({min}-65535; IPv6 needs at least 1280)")]
    Mtu { mtu: u32, min: u32 },
    #[error("netns path {0:?} must be absolute (e.g. /proc/<pid>/ns/net)")]
    NetnsPath(String),
}

/// Checks a bridge configuration.
pub fn validate_bridge(cfg: &BridgeConfig) -> Result<(), InvalidConfig> {
    validate_bridge_name(&cfg.name)?;
    if let Some((gateway, prefix)) = cfg.ipv4_gateway {
        check_prefix(IpAddr::V4(gateway), prefix, 1, 30)?;
        check_ipv4_usable(gateway)?;
    }
    if let Some((gateway, prefix)) = cfg.ipv6_gateway {
        check_prefix(IpAddr::V6(gateway), prefix, 1, 127)?;
        check_ipv6_usable(gateway)?;
    }
    Ok(())
}

/// Bridge names also name the nft tables, so they must be valid nft
/// identifiers as well as interface names.
pub fn validate_bridge_name(name: &str) -> Result<(), InvalidConfig> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(InvalidConfig::BridgeName(name.to_owned()))
    }
}

/// VE ids appear in log lines and error messages; keep them printable.
pub fn validate_ve_id(ve_id: &str) -> Result<(), InvalidConfig> {
    let valid = !ve_id.is_empty()
        && ve_id.len() <= 64
        && ve_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(InvalidConfig::VeId(ve_id.to_owned()))
    }
}

/// Checks a VE's network configuration.
pub fn validate_ve(ve: &VeNetwork) -> Result<(), InvalidConfig> {
    validate_ve_id(&ve.ve_id)?;
    let mut seen = HashSet::new();
    for &(address, prefix) in &ve.ipv4 {
        check_prefix(IpAddr::V4(address), prefix, 1, 32)?;
        check_ipv4_usable(address)?;
        if !seen.insert(IpAddr::V4(address)) {
            return Err(InvalidConfig::DuplicateAddress(IpAddr::V4(address)));
        }
    }
    for &(address, prefix) in &ve.ipv6 {
        check_prefix(IpAddr::V6(address), prefix, 1, 128)?;
        check_ipv6_usable(address)?;
        if !seen.insert(IpAddr::V6(address)) {
            return Err(InvalidConfig::DuplicateAddress(IpAddr::V6(address)));
        }
    }
    // A gateway for a family the VE has no address in is unused (the node
    // config names both gateways, VEs may be single-stack).
    if let Some(gateway) = ve.ipv4_gateway.filter(|_| !ve.ipv4.is_empty()) {
        if seen.contains(&IpAddr::V4(gateway)) {
            return Err(InvalidConfig::GatewayIsOwnAddress(IpAddr::V4(gateway)));
        }
        if !ve.ipv4.iter().any(|&(a, p)| ipv4_in_subnet(gateway, a, p)) {
            return Err(InvalidConfig::GatewayOutsideSubnet {
                gateway: IpAddr::V4(gateway),
                family: "IPv4",
                addresses: list(ve.ipv4.iter().map(|(a, p)| format!("{a}/{p}"))),
            });
        }
    }
    if let Some(gateway) = ve.ipv6_gateway.filter(|_| !ve.ipv6.is_empty()) {
        if seen.contains(&IpAddr::V6(gateway)) {
            return Err(InvalidConfig::GatewayIsOwnAddress(IpAddr::V6(gateway)));
        }
        if !ve.ipv6.iter().any(|&(a, p)| ipv6_in_subnet(gateway, a, p)) {
            return Err(InvalidConfig::GatewayOutsideSubnet {
                gateway: IpAddr::V6(gateway),
                family: "IPv6",
                addresses: list(ve.ipv6.iter().map(|(a, p)| format!("{a}/{p}"))),
            });
        }
    }
    if let Some(mtu) = ve.mtu {
        let min = if ve.ipv6.is_empty() { 68 } else { 1280 };
        if !(min..=65535).contains(&mtu) {
            return Err(InvalidConfig::Mtu { mtu, min });
        }
    }
    Ok(())
}

/// A relative path would depend on the agent's working directory.
pub fn validate_netns_path(netns: &Path) -> Result<(), InvalidConfig> {
    if netns.is_absolute() {
        Ok(())
    } else {
        Err(InvalidConfig::NetnsPath(
            netns.to_string_lossy().into_owned(),
        ))
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn check_prefix(address: IpAddr, prefix: u8, min: u8, max: u8) -> Result<(), InvalidConfig> {
    if (min..=max).contains(&prefix) {
        Ok(())
    } else {
        Err(InvalidConfig::Prefix {
            address,
            prefix,
            min,
            max,
        })
    }
}

fn check_ipv4_usable(address: Ipv4Addr) -> Result<(), InvalidConfig> {
    if address.is_unspecified()
        || address.is_loopback()
        || address.is_multicast()
        || address.is_broadcast()
        || address.is_link_local()
    {
        return Err(InvalidConfig::UnusableAddress(IpAddr::V4(address)));
    }
    Ok(())
}

fn check_ipv6_usable(address: Ipv6Addr) -> Result<(), InvalidConfig> {
    // Link-local addresses are derived from the MAC, never configured.
    let link_local = address.segments()[0] & 0xffc0 == 0xfe80;
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() || link_local {
        return Err(InvalidConfig::UnusableAddress(IpAddr::V6(address)));
    }
    Ok(())
}

/// True when `candidate` lies in `address/prefix`.
pub fn ipv4_in_subnet(candidate: Ipv4Addr, address: Ipv4Addr, prefix: u8) -> bool {
    let mask = ipv4_mask(prefix);
    u32::from(candidate) & mask == u32::from(address) & mask
}

/// True when `candidate` lies in `address/prefix`.
pub fn ipv6_in_subnet(candidate: Ipv6Addr, address: Ipv6Addr, prefix: u8) -> bool {
    let mask = ipv6_mask(prefix);
    u128::from(candidate) & mask == u128::from(address) & mask
}

/// The network address of `address/prefix`.
pub fn ipv4_network(address: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(address) & ipv4_mask(prefix))
}

/// The network address of `address/prefix`.
pub fn ipv6_network(address: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(address) & ipv6_mask(prefix))
}

fn ipv4_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

fn ipv6_mask(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p.min(128))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ve() -> VeNetwork {
        VeNetwork {
            ve_id: "web1".into(),
            ipv4: vec![("10.0.0.5".parse().unwrap(), 24)],
            ipv6: vec![("fd00::5".parse().unwrap(), 64)],
            ipv4_gateway: Some("10.0.0.1".parse().unwrap()),
            ipv6_gateway: Some("fd00::1".parse().unwrap()),
            mtu: None,
        }
    }

    fn bridge() -> BridgeConfig {
        BridgeConfig {
            name: "vzbr0".into(),
            ipv4_gateway: Some(("10.0.0.1".parse().unwrap(), 24)),
            ipv6_gateway: Some(("fd00::1".parse().unwrap(), 64)),
            nat_outbound: true,
        }
    }

    #[test]
    fn a_normal_ve_is_valid() {
        assert_eq!(validate_ve(&ve()), Ok(()));
    }

    #[test]
    fn a_ve_without_addresses_is_valid() {
        let ve = VeNetwork {
            ipv4: vec![],
            ipv6: vec![],
            ipv4_gateway: None,
            ipv6_gateway: None,
            ..ve()
        };
        assert_eq!(validate_ve(&ve), Ok(()));
    }

    #[test]
    fn prefixes_out_of_range_are_refused() {
        let mut bad = ve();
        bad.ipv4[0].1 = 33;
        assert!(matches!(
            validate_ve(&bad),
            Err(InvalidConfig::Prefix { prefix: 33, .. })
        ));
        let mut bad = ve();
        bad.ipv4[0].1 = 0;
        assert!(matches!(
            validate_ve(&bad),
            Err(InvalidConfig::Prefix { prefix: 0, .. })
        ));
        let mut bad = ve();
        bad.ipv6[0].1 = 129;
        assert!(matches!(
            validate_ve(&bad),
            Err(InvalidConfig::Prefix { prefix: 129, .. })
        ));
    }

    #[test]
    fn duplicates_are_refused() {
        let mut bad = ve();
        bad.ipv4.push(("10.0.0.5".parse().unwrap(), 32));
        assert_eq!(
            validate_ve(&bad),
            Err(InvalidConfig::DuplicateAddress("10.0.0.5".parse().unwrap()))
        );
    }

    #[test]
    fn gateway_must_be_inside_a_subnet_and_not_own() {
        let mut bad = ve();
        bad.ipv4_gateway = Some("10.0.1.1".parse().unwrap());
        assert!(matches!(
            validate_ve(&bad),
            Err(InvalidConfig::GatewayOutsideSubnet { .. })
        ));
        let mut bad = ve();
        bad.ipv6_gateway = Some("fd01::1".parse().unwrap());
        assert!(matches!(
            validate_ve(&bad),
            Err(InvalidConfig::GatewayOutsideSubnet { .. })
        ));
        let mut bad = ve();
        bad.ipv4_gateway = Some("10.0.0.5".parse().unwrap());
        assert!(matches!(
            validate_ve(&bad),
            Err(InvalidConfig::GatewayIsOwnAddress(_))
        ));
    }

    #[test]
    fn a_gateway_of_a_family_without_addresses_is_ignored() {
        let mut single_stack = ve();
        single_stack.ipv6.clear();
        assert_eq!(validate_ve(&single_stack), Ok(()));
    }

    #[test]
    fn unusable_addresses_are_refused() {
        for address in [
            "0.0.0.0",
            "127.0.0.2",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.1.1",
        ] {
            let mut bad = ve();
            bad.ipv4 = vec![(address.parse().unwrap(), 24)];
            bad.ipv4_gateway = None;
            assert!(
                matches!(validate_ve(&bad), Err(InvalidConfig::UnusableAddress(_))),
                "{address}"
            );
        }
        for address in ["::", "::1", "ff02::1", "fe80::1"] {
            let mut bad = ve();
            bad.ipv6 = vec![(address.parse().unwrap(), 64)];
            bad.ipv6_gateway = None;
            assert!(
                matches!(validate_ve(&bad), Err(InvalidConfig::UnusableAddress(_))),
                "{address}"
            );
        }
    }

    #[test]
    fn mtu_bounds_depend_on_ipv6() {
        let mut ve = ve();
        ve.mtu = Some(1000);
        assert!(matches!(
            validate_ve(&ve),
            Err(InvalidConfig::Mtu { min: 1280, .. })
        ));
        ve.ipv6.clear();
        ve.ipv6_gateway = None;
        assert_eq!(validate_ve(&ve), Ok(()));
        ve.mtu = Some(70_000);
        assert!(matches!(validate_ve(&ve), Err(InvalidConfig::Mtu { .. })));
    }

    #[test]
    fn ve_ids_must_be_printable() {
        assert!(validate_ve_id("web-1.example_2").is_ok());
        for bad in ["", "a b", "a\nb", "x\"y", &"a".repeat(65)] {
            assert!(validate_ve_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bridge_names_are_interface_and_nft_names() {
        assert_eq!(validate_bridge(&bridge()), Ok(()));
        for bad in [
            "",
            "0br",
            "br 0",
            "br;flush",
            "averyveryverylongname",
            "-br",
        ] {
            assert!(validate_bridge_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bridge_gateway_prefix_is_checked() {
        let mut bad = bridge();
        bad.ipv4_gateway = Some(("10.0.0.1".parse().unwrap(), 31));
        assert!(validate_bridge(&bad).is_err());
        let mut bad = bridge();
        bad.ipv6_gateway = Some(("ff02::1".parse().unwrap(), 64));
        assert!(validate_bridge(&bad).is_err());
    }

    #[test]
    fn netns_paths_are_checked() {
        assert!(validate_netns_path(Path::new("/proc/123/ns/net")).is_ok());
        assert!(validate_netns_path(Path::new("/run/netns/a b")).is_ok());
        for bad in ["proc/1/ns/net", "net", ""] {
            assert!(validate_netns_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn subnet_arithmetic() {
        let a: Ipv4Addr = "10.1.2.3".parse().unwrap();
        assert!(ipv4_in_subnet("10.1.2.200".parse().unwrap(), a, 24));
        assert!(!ipv4_in_subnet("10.1.3.1".parse().unwrap(), a, 24));
        assert!(ipv4_in_subnet("10.200.0.1".parse().unwrap(), a, 8));
        assert_eq!(ipv4_network(a, 16), "10.1.0.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ipv4_network(a, 32), a);
        let b: Ipv6Addr = "fd00:1::5".parse().unwrap();
        assert!(ipv6_in_subnet("fd00:1::1".parse().unwrap(), b, 64));
        assert!(!ipv6_in_subnet("fd00:2::1".parse().unwrap(), b, 64));
        assert_eq!(ipv6_network(b, 32), "fd00:1::".parse::<Ipv6Addr>().unwrap());
    }
}

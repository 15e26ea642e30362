//! Names and link-layer identities derived from a VE id.
//!
//! Everything here is a pure function of the VE id, so every node computes
//! the same MAC for a VE: when the VE moves, its neighbours only need a
//! gratuitous ARP to learn the new port, never a new MAC.

use std::net::Ipv6Addr;

use sha2::{Digest, Sha256};

/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Name of the VE end of the veth pair inside the VE's network namespace.
pub const VE_IFNAME: &str = "eth0";

fn ve_digest(ve_id: &str) -> [u8; 32] {
    // Domain-separated so the hash is ours alone and stable across releases
    // (std's hasher makes no such promise).
    let mut hasher = Sha256::new();
    hasher.update(b"vz-network-identity\0");
    hasher.update(ve_id.as_bytes());
    hasher.finalize().into()
}

/// The VE's MAC: locally administered unicast `02:xx:xx:xx:xx:xx`, 40 bits
/// of hash, so collisions on one L2 segment are negligible.
pub fn mac_for_ve(ve_id: &str) -> [u8; 6] {
    let digest = ve_digest(ve_id);
    [0x02, digest[4], digest[5], digest[6], digest[7], digest[8]]
}

/// MAC of the host end of the VE's veth: `fe:` prefix (locally
/// administered, unicast), so it never equals a VE MAC.
pub fn host_mac_for_ve(ve_id: &str) -> [u8; 6] {
    let mut mac = mac_for_ve(ve_id);
    mac[0] = 0xfe;
    mac
}

/// The host end of the VE's veth: `vz` + 8 hex chars (11 bytes, under the
/// 15-byte limit whatever the VE id's length).
pub fn host_ifname_for_ve(ve_id: &str) -> String {
    let digest = ve_digest(ve_id);
    format!(
        "vz{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

/// Name of the per-VE nft chain in the bridge table.
pub fn chain_name_for_ifname(host_ifname: &str) -> String {
    format!("ve_{host_ifname}")
}

/// The EUI-64 link-local address the kernel gives an interface with this
/// MAC (addrgenmode eui64, which attach sets explicitly).
pub fn link_local_for_mac(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([mac[0] ^ 0x02, mac[1]]),
        u16::from_be_bytes([mac[2], 0xff]),
        u16::from_be_bytes([0xfe, mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

/// A MAC as `ip`, `bridge` and `nft` spell it: `02:ab:cd:ef:01:23`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Bridge MAC derived from its name: set explicitly so the bridge does not
/// change its address each time the port with the lowest MAC comes or goes.
pub fn mac_for_bridge(bridge_name: &str) -> [u8; 6] {
    let mut mac = mac_for_ve(&format!("bridge:{bridge_name}"));
    mac[0] = 0xfa;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_deterministic_locally_administered_unicast() {
        let mac = mac_for_ve("web1");
        assert_eq!(mac, mac_for_ve("web1"));
        assert_eq!(mac[0], 0x02);
        assert_eq!(mac[0] & 0x01, 0, "multicast bit must be clear");
        assert_ne!(mac, mac_for_ve("web2"));
    }

    #[test]
    fn host_mac_differs_from_ve_mac_and_is_unicast() {
        let host = host_mac_for_ve("web1");
        assert_ne!(host, mac_for_ve("web1"));
        assert_eq!(host[0] & 0x03, 0x02);
        assert_eq!(&host[1..], &mac_for_ve("web1")[1..]);
    }

    #[test]
    fn ifname_fits_the_kernel_limit_for_any_id() {
        let long_id = "x".repeat(500);
        for id in ["a", "web1", long_id.as_str(), "ünïcode-ve"] {
            let name = host_ifname_for_ve(id);
            assert!(name.len() <= MAX_IFNAME_LEN, "{name}");
            assert!(name.starts_with("vz"));
            assert!(name[2..].chars().all(|c| c.is_ascii_hexdigit()));
            assert!(chain_name_for_ifname(&name).len() < 32);
        }
    }

    #[test]
    fn ifnames_do_not_collide_on_a_thousand_ids() {
        let names: std::collections::HashSet<String> = (0..1000)
            .map(|i| host_ifname_for_ve(&format!("ve{i}")))
            .collect();
        assert_eq!(names.len(), 1000);
    }

    #[test]
    fn link_local_follows_eui64() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        assert_eq!(
            link_local_for_mac(mac),
            "fe80::11:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn mac_formats_as_colon_hex() {
        assert_eq!(
            format_mac([0x02, 0x0a, 0xff, 0, 1, 0x10]),
            "02:0a:ff:00:01:10"
        );
    }
}

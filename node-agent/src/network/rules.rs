//! The nftables rulesets, generated as `nft -f -` batches (pure text, so
//! they are unit-tested here and applied atomically by one `nft` call).
//!
//! Per bridge `B`:
//! - `table bridge B`: a `prerouting` base chain that sends every frame
//!   entering from a VE port to that VE's chain through the verdict map
//!   `ports` (ifname -> `jump ve_<ifname>`). Frames from other ports (uplink,
//!   host) pass untouched. Filtering in bridge prerouting happens before the
//!   bridge learns the source MAC, so a spoofed frame cannot poison the FDB.
//! - `table ip B` / `table ip6 B`: masquerade of the bridge subnet leaving
//!   through any other interface, when `nat_outbound` is set.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::identity::{chain_name_for_ifname, format_mac, link_local_for_mac};
use super::validate::{ipv4_network, ipv6_network};
use super::BridgeConfig;

/// The addresses a VE may use as sources: what its chain enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeIdentity<'a> {
    pub host_ifname: &'a str,
    pub mac: [u8; 6],
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

/// Creates or refreshes the node-wide tables of a bridge. Idempotent: the
/// per-VE chains and the `ports` map survive a re-run.
pub fn bridge_tables(cfg: &BridgeConfig) -> String {
    let bridge = &cfg.name;
    let mut script = String::new();
    let _ = writeln!(script, "add table bridge {bridge}");
    let _ = writeln!(
        script,
        "add map bridge {bridge} ports {{ type ifname : verdict; }}"
    );
    // Priority -300: before anything else in the bridge family sees the frame.
    let _ = writeln!(
        script,
        "add chain bridge {bridge} prerouting {{ type filter hook prerouting priority -300; policy accept; }}"
    );
    let _ = writeln!(script, "flush chain bridge {bridge} prerouting");
    let _ = writeln!(
        script,
        "add rule bridge {bridge} prerouting iifname vmap @ports"
    );

    match (cfg.nat_outbound, cfg.ipv4_gateway) {
        (true, Some((gateway, prefix))) => {
            let network = ipv4_network(gateway, prefix);
            nat_table(
                &mut script,
                "ip",
                bridge,
                &format!("ip saddr {network}/{prefix}"),
            );
        }
        _ => remove_table(&mut script, "ip", bridge),
    }
    match (cfg.nat_outbound, cfg.ipv6_gateway) {
        (true, Some((gateway, prefix))) => {
            let network = ipv6_network(gateway, prefix);
            nat_table(
                &mut script,
                "ip6",
                bridge,
                &format!("ip6 saddr {network}/{prefix}"),
            );
        }
        _ => remove_table(&mut script, "ip6", bridge),
    }
    script
}

fn nat_table(script: &mut String, family: &str, bridge: &str, source_match: &str) {
    let _ = writeln!(script, "add table {family} {bridge}");
    let _ = writeln!(
        script,
        "add chain {family} {bridge} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
    );
    let _ = writeln!(script, "flush chain {family} {bridge} postrouting");
    let _ = writeln!(
        script,
        "add rule {family} {bridge} postrouting {source_match} oifname != \"{bridge}\" masquerade"
    );
}

/// `add` then `delete` makes deletion idempotent in one atomic batch (the
/// installed nft 1.0.6 predates `destroy`).
fn remove_table(script: &mut String, family: &str, bridge: &str) {
    let _ = writeln!(script, "add table {family} {bridge}");
    let _ = writeln!(script, "delete table {family} {bridge}");
}

/// Removes every table of a bridge, whether or not it exists.
pub fn remove_bridge_tables(bridge: &str) -> String {
    let mut script = String::new();
    for family in ["bridge", "ip", "ip6"] {
        remove_table(&mut script, family, bridge);
    }
    script
}

/// Installs (or replaces, atomically) the anti-spoofing chain of one VE and
/// hooks it to the VE's port.
pub fn ve_chain(bridge: &str, ve: &VeIdentity<'_>) -> String {
    let chain = chain_name_for_ifname(ve.host_ifname);
    let mac = format_mac(ve.mac);
    let mut rules: Vec<String> = Vec::new();

    // Link layer: only the VE's own MAC, whatever the payload.
    rules.push(format!("ether saddr != {mac} counter drop"));

    // ARP: well-formed Ethernet/IPv4 ARP whose sender is the VE itself, so a
    // VE can neither answer for nor announce another VE's address.
    rules.push("ether type arp arp htype != 1 counter drop".into());
    rules.push("ether type arp arp ptype != ip counter drop".into());
    rules.push("ether type arp arp hlen != 6 counter drop".into());
    rules.push("ether type arp arp plen != 4 counter drop".into());
    rules.push(format!("arp saddr ether != {mac} counter drop"));
    if ve.ipv4.is_empty() {
        rules.push("ether type arp counter drop".into());
        rules.push("ether type ip counter drop".into());
    } else {
        let own = set(&ve.ipv4);
        rules.push(format!("arp saddr ip != {own} counter drop"));
        rules.push(format!("ip saddr != {own} counter drop"));
        // Redirects and DHCP offers would hijack neighbours' routing.
        rules.push("icmp type redirect counter drop".into());
        rules.push("udp sport 67 counter drop".into());
    }

    // IPv6: own addresses, the MAC-derived link-local, and :: (used by DAD).
    let link_local = link_local_for_mac(ve.mac);
    let mut ipv6_sources: Vec<String> = ve.ipv6.iter().map(|a| a.to_string()).collect();
    ipv6_sources.push(link_local.to_string());
    ipv6_sources.push("::".into());
    rules.push(format!(
        "ip6 saddr != {{ {} }} counter drop",
        ipv6_sources.join(", ")
    ));
    // `::` only for what a host sends before it has an address: DAD
    // neighbour solicitations and MLD reports.
    // 58 is ipv6-icmp: by name, libnftables resolves it through NSS
    // (/etc/protocols), loading NSS modules at every VE start.
    rules.push("ip6 saddr :: meta l4proto != 58 counter drop".into());
    rules.push(
        "ip6 saddr :: icmpv6 type != { nd-neighbor-solicit, mld-listener-report, mld2-listener-report } counter drop"
            .into(),
    );
    // Only routers send RAs and redirects; a VE is not one.
    rules.push("icmpv6 type { nd-router-advert, nd-redirect } counter drop".into());
    // Neighbour advertisements only for its own addresses (the ND
    // equivalent of the ARP sender check; the target is ICMPv6 bytes 8-23).
    let targets: Vec<String> = ve
        .ipv6
        .iter()
        .copied()
        .chain(std::iter::once(link_local))
        .map(|a| format!("0x{:032x}", u128::from(a)))
        .collect();
    rules.push(format!(
        "icmpv6 type nd-neighbor-advert @th,64,128 != {{ {} }} counter drop",
        targets.join(", ")
    ));
    // The link-layer address option of NS/NA must carry the VE's MAC.
    // Linux sends it as the only option (ICMPv6 length 32, option at byte
    // 24); longer ND messages are refused rather than parsed.
    rules.push(
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 length > 32 counter drop"
            .into(),
    );
    rules.push(format!(
        "icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} ip6 length 32 @th,192,8 {{ 1, 2 }} @th,208,48 != 0x{} counter drop",
        mac.replace(':', "")
    ));

    // Nothing else: no VLAN tags, no other ethertypes to smuggle frames in.
    rules.push("ether type { arp, ip, ip6 } accept".into());
    rules.push("counter drop".into());

    let mut script = String::new();
    let _ = writeln!(script, "add chain bridge {bridge} {chain}");
    let _ = writeln!(script, "flush chain bridge {bridge} {chain}");
    for rule in rules {
        let _ = writeln!(script, "add rule bridge {bridge} {chain} {rule}");
    }
    let _ = writeln!(
        script,
        "add element bridge {bridge} ports {{ \"{}\" : jump {chain} }}",
        ve.host_ifname
    );
    script
}

/// Removes a VE's chain and map element. Runs against an existing table:
/// the `add`s make the `delete`s succeed whether or not the VE was attached.
pub fn remove_ve_chain(bridge: &str, host_ifname: &str) -> String {
    let chain = chain_name_for_ifname(host_ifname);
    let mut script = String::new();
    let _ = writeln!(script, "add chain bridge {bridge} {chain}");
    let _ = writeln!(
        script,
        "add element bridge {bridge} ports {{ \"{host_ifname}\" : jump {chain} }}"
    );
    let _ = writeln!(
        script,
        "delete element bridge {bridge} ports {{ \"{host_ifname}\" }}"
    );
    let _ = writeln!(script, "delete chain bridge {bridge} {chain}");
    script
}

fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nat: bool) -> BridgeConfig {
        BridgeConfig {
            name: "vzbr0".into(),
            ipv4_gateway: Some(("10.0.0.1".parse().unwrap(), 24)),
            ipv6_gateway: Some(("fd00::1".parse().unwrap(), 64)),
            nat_outbound: nat,
        }
    }

    #[test]
    fn nat_masquerades_the_subnet_leaving_other_interfaces() {
        let script = bridge_tables(&cfg(true));
        assert!(script.contains(
            "add rule ip vzbr0 postrouting ip saddr 10.0.0.0/24 oifname != \"vzbr0\" masquerade"
        ));
        assert!(script.contains("ip6 saddr fd00::/64 oifname != \"vzbr0\" masquerade"));
        assert!(!script.contains("delete table ip vzbr0"));
    }

    #[test]
    fn without_nat_the_nat_tables_are_removed() {
        let script = bridge_tables(&cfg(false));
        assert!(!script.contains("masquerade"));
        assert!(script.contains("delete table ip vzbr0"));
        assert!(script.contains("delete table ip6 vzbr0"));
    }

    #[test]
    fn bridge_table_rerun_keeps_ve_chains() {
        let script = bridge_tables(&cfg(true));
        assert!(!script.contains("delete table bridge"));
        assert!(!script.contains("flush table bridge"));
        assert!(script.contains("iifname vmap @ports"));
    }

    #[test]
    fn ve_chain_allows_only_own_identity() {
        let ve = VeIdentity {
            host_ifname: "vz01020304",
            mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
            ipv4: vec!["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap()],
            ipv6: vec!["fd00::5".parse().unwrap()],
        };
        let script = ve_chain("vzbr0", &ve);
        assert!(script.contains("ether saddr != 02:11:22:33:44:55 counter drop"));
        assert!(script.contains("arp saddr ether != 02:11:22:33:44:55 counter drop"));
        assert!(script.contains("arp saddr ip != { 10.0.0.5, 10.0.0.6 } counter drop"));
        assert!(script.contains("ip saddr != { 10.0.0.5, 10.0.0.6 } counter drop"));
        assert!(
            script.contains("ip6 saddr != { fd00::5, fe80::11:22ff:fe33:4455, :: } counter drop")
        );
        assert!(script
            .contains("0xfd000000000000000000000000000005, 0xfe80000000000000001122fffe334455"));
        assert!(script.contains("@th,208,48 != 0x021122334455"));
        assert!(script.contains("ip6 saddr :: meta l4proto != 58 counter drop"));
        assert!(script
            .ends_with("add element bridge vzbr0 ports { \"vz01020304\" : jump ve_vz01020304 }\n"));
        // Replacing is atomic: flush and refill in the same batch.
        assert!(script.contains("flush chain bridge vzbr0 ve_vz01020304"));
    }

    #[test]
    fn ve_without_ipv4_gets_no_ipv4_at_all() {
        let ve = VeIdentity {
            host_ifname: "vz01020304",
            mac: [0x02, 0, 0, 0, 0, 1],
            ipv4: vec![],
            ipv6: vec![],
        };
        let script = ve_chain("vzbr0", &ve);
        assert!(script.contains("ether type ip counter drop"));
        assert!(script.contains("ether type arp counter drop"));
        assert!(!script.contains("{  }"), "no empty sets: {script}");
    }

    #[test]
    fn removing_a_ve_chain_tolerates_absence() {
        let script = remove_ve_chain("vzbr0", "vz01020304");
        let lines: Vec<&str> = script.lines().collect();
        assert!(lines[0].starts_with("add chain"));
        assert!(lines[1].starts_with("add element"));
        assert!(lines[2].starts_with("delete element"));
        assert!(lines[3].starts_with("delete chain"));
    }

    #[test]
    fn removing_bridge_tables_covers_all_families() {
        let script = remove_bridge_tables("vzbr0");
        for family in ["bridge", "ip", "ip6"] {
            assert!(script.contains(&format!("delete table {family} vzbr0")));
        }
    }
}

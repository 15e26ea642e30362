//! Links, addresses and routes.
//!
//! The attach and detach paths (veth, port flags, FDB entry, the VE side)
//! use in-process rtnetlink requests: they run at every VE start and stop.
//! Bridge setup and address changes of running VEs are rare and use
//! `ip -batch` scripts (pure text, unit-tested).

use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use super::identity::{format_mac, VE_IFNAME};
use super::rtnetlink::{self as rt, Message, RouteSocket};
use super::{BridgeConfig, VeNetwork};

/// Creates a bridge with a fixed MAC.
pub fn create_bridge(name: &str, mac: [u8; 6]) -> String {
    format!(
        "link add name {name} address {} type bridge\n",
        format_mac(mac)
    )
}

/// Gives an existing bridge its gateway addresses and brings it up.
/// `replace` makes it idempotent.
pub fn configure_bridge(cfg: &BridgeConfig) -> String {
    let name = &cfg.name;
    let mut script = String::new();
    if let Some((gateway, prefix)) = cfg.ipv4_gateway {
        let _ = writeln!(script, "addr replace {gateway}/{prefix} dev {name}");
    }
    if let Some((gateway, prefix)) = cfg.ipv6_gateway {
        // nodad: the gateway must answer at once, not after DAD finishes.
        let _ = writeln!(script, "addr replace {gateway}/{prefix} dev {name} nodad");
    }
    let _ = writeln!(script, "link set {name} up");
    script
}

/// What the host side of an attach creates.
pub struct VethPlan<'a> {
    pub bridge_ifindex: u32,
    pub host_ifname: &'a str,
    pub host_mac: [u8; 6],
    pub ve_mac: [u8; 6],
    pub mtu: Option<u32>,
    /// The VE's network namespace, open.
    pub netns: &'a std::fs::File,
}

/// RTM_NEWLINK creating the veth pair, host end already on the bridge,
/// VE end created directly inside the VE's netns as `eth0` (both down).
pub fn create_veth_request(plan: &VethPlan<'_>) -> Message {
    let mut peer = Message::new(0, 0)
        .attr_str(rt::IFLA_IFNAME, VE_IFNAME)
        .attr(rt::IFLA_ADDRESS, &plan.ve_mac)
        .attr_u32(rt::IFLA_NET_NS_FD, plan.netns.as_raw_fd() as u32);
    let mut host = Message::new(rt::RTM_NEWLINK, rt::NLM_F_CREATE | rt::NLM_F_EXCL)
        .ifinfomsg(0, 0, 0, 0)
        .attr_str(rt::IFLA_IFNAME, plan.host_ifname)
        .attr(rt::IFLA_ADDRESS, &plan.host_mac)
        .attr_u32(rt::IFLA_MASTER, plan.bridge_ifindex);
    if let Some(mtu) = plan.mtu {
        host = host.attr_u32(rt::IFLA_MTU, mtu);
        peer = peer.attr_u32(rt::IFLA_MTU, mtu);
    }
    // The peer's attributes follow its own ifinfomsg inside VETH_INFO_PEER.
    let peer_attributes = peer.finish(0)[16..].to_vec();
    host.begin_nested(rt::IFLA_LINKINFO)
        .attr_str(rt::IFLA_INFO_KIND, "veth")
        .begin_nested(rt::IFLA_INFO_DATA)
        .begin_nested(rt::VETH_INFO_PEER)
        .raw(&rt::ifinfomsg(0, 0, 0, 0))
        .raw(&peer_attributes)
        .end_nested()
        .end_nested()
        .end_nested()
}

/// No learning and no unknown-unicast flooding on VE ports: the VE's MAC
/// is a static FDB entry, so a VE never receives unicast meant for another
/// one, even after an FDB entry would have aged out. Also brings the port up.
pub fn port_flags_request(host_ifindex: u32) -> Message {
    Message::new(rt::RTM_NEWLINK, 0)
        .ifinfomsg(0, host_ifindex, libc::IFF_UP as u32, libc::IFF_UP as u32)
        .begin_nested(rt::IFLA_LINKINFO)
        .attr_str(rt::IFLA_INFO_SLAVE_KIND, "bridge")
        .begin_nested(rt::IFLA_INFO_SLAVE_DATA)
        .attr_u8(rt::IFLA_BRPORT_LEARNING, 0)
        .attr_u8(rt::IFLA_BRPORT_UNICAST_FLOOD, 0)
        .end_nested()
        .end_nested()
}

/// Static FDB entry pinning the VE's MAC to its port
/// (`bridge fdb replace <mac> dev <port> master static`).
pub fn static_fdb_request(host_ifindex: u32, ve_mac: [u8; 6]) -> Message {
    Message::new(rt::RTM_NEWNEIGH, rt::NLM_F_CREATE | rt::NLM_F_REPLACE)
        .ndmsg(
            rt::AF_BRIDGE,
            host_ifindex,
            rt::NUD_NOARP | rt::NUD_REACHABLE,
            rt::NTF_MASTER,
        )
        .attr(rt::NDA_LLADDR, &ve_mac)
}

/// The requests configuring the VE side, in order, given the ifindexes of
/// `lo` and `eth0` inside the VE's netns.
pub fn ve_side_requests(ve: &VeNetwork, lo_ifindex: u32, eth0_ifindex: u32) -> Vec<Message> {
    let up = libc::IFF_UP as u32;
    let mut requests = vec![
        Message::new(rt::RTM_NEWLINK, 0).ifinfomsg(0, lo_ifindex, up, up),
        // The anti-spoofing rules allow exactly the EUI-64 link-local,
        // whatever the node's default addr_gen_mode is.
        Message::new(rt::RTM_NEWLINK, 0)
            .ifinfomsg(0, eth0_ifindex, 0, 0)
            .begin_nested(rt::IFLA_AF_SPEC)
            .begin_nested(libc::AF_INET6 as u16)
            .attr_u8(rt::IFLA_INET6_ADDR_GEN_MODE, rt::IN6_ADDR_GEN_MODE_EUI64)
            .end_nested()
            .end_nested(),
    ];
    for &(address, prefix) in &ve.ipv4 {
        requests.push(address_request(IpAddr::V4(address), prefix, eth0_ifindex));
    }
    for &(address, prefix) in &ve.ipv6 {
        requests.push(address_request(IpAddr::V6(address), prefix, eth0_ifindex));
    }
    requests.push(Message::new(rt::RTM_NEWLINK, 0).ifinfomsg(0, eth0_ifindex, up, up));
    // No default route for a family the VE has no address in.
    let gateways = ve
        .ipv4_gateway
        .filter(|_| !ve.ipv4.is_empty())
        .map(IpAddr::V4)
        .into_iter()
        .chain(
            ve.ipv6_gateway
                .filter(|_| !ve.ipv6.is_empty())
                .map(IpAddr::V6),
        );
    for gateway in gateways {
        requests.push(default_route_request(gateway, eth0_ifindex));
    }
    requests
}

fn family(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// `ip addr replace <address>/<prefix> dev eth0` (IPv6 with `nodad`:
/// addresses come from the cluster's pool and are unique; DAD would keep
/// them unusable for a second after start).
fn address_request(address: IpAddr, prefix: u8, ifindex: u32) -> Message {
    let flags = if address.is_ipv6() {
        rt::IFA_F_NODAD
    } else {
        0
    };
    Message::new(rt::RTM_NEWADDR, rt::NLM_F_CREATE | rt::NLM_F_REPLACE)
        .ifaddrmsg(
            family(address),
            prefix,
            flags,
            rt::RT_SCOPE_UNIVERSE,
            ifindex,
        )
        .attr_ip(rt::IFA_LOCAL, address)
        .attr_ip(rt::IFA_ADDRESS, address)
}

/// `ip route replace default via <gateway> dev eth0`.
fn default_route_request(gateway: IpAddr, ifindex: u32) -> Message {
    Message::new(rt::RTM_NEWROUTE, rt::NLM_F_CREATE | rt::NLM_F_REPLACE)
        .rtmsg(family(gateway), 0)
        .attr_ip(rt::RTA_GATEWAY, gateway)
        .attr_u32(rt::RTA_OIF, ifindex)
}

/// `ip link del` by index (deleting one end of a veth deletes both).
/// Sets the MAC address of `ifindex` (to announce its addresses, see
/// [`super::announce`]).
pub fn set_mac_request(ifindex: u32, mac: [u8; 6]) -> Message {
    Message::new(rt::RTM_NEWLINK, 0)
        .ifinfomsg(0, ifindex, 0, 0)
        .attr(rt::IFLA_ADDRESS, &mac)
}

pub fn delete_link_request(ifindex: u32) -> Message {
    Message::new(rt::RTM_DELLINK, 0).ifinfomsg(0, ifindex, 0, 0)
}

/// Sends requests in order, stopping at the first failure.
pub fn apply(socket: &RouteSocket, requests: Vec<Message>) -> io::Result<()> {
    requests
        .into_iter()
        .try_for_each(|request| socket.request(request))
}

/// Replaces the VE's addresses and routes. Bringing eth0 down drops its
/// IPv6 addresses and every route through it; the flush drops the rest.
pub fn reconfigure_ve_side(ve: &VeNetwork) -> String {
    let mut script = String::new();
    let _ = writeln!(script, "link set {VE_IFNAME} down");
    let _ = writeln!(script, "addr flush dev {VE_IFNAME} scope global");
    add_addresses_and_routes(&mut script, ve);
    script
}

fn add_addresses_and_routes(script: &mut String, ve: &VeNetwork) {
    for (address, prefix) in &ve.ipv4 {
        let _ = writeln!(script, "addr add {address}/{prefix} dev {VE_IFNAME}");
    }
    for (address, prefix) in &ve.ipv6 {
        // nodad: addresses come from the cluster's pool and are unique;
        // DAD would keep them unusable for a second after start.
        let _ = writeln!(script, "addr add {address}/{prefix} dev {VE_IFNAME} nodad");
    }
    let _ = writeln!(script, "link set {VE_IFNAME} up");
    // No default route for a family the VE has no address in.
    if let Some(gateway) = ve.ipv4_gateway.filter(|_| !ve.ipv4.is_empty()) {
        let _ = writeln!(
            script,
            "route replace default via {gateway} dev {VE_IFNAME}"
        );
    }
    if let Some(gateway) = ve.ipv6_gateway.filter(|_| !ve.ipv6.is_empty()) {
        let _ = writeln!(
            script,
            "route replace default via {gateway} dev {VE_IFNAME}"
        );
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
            mtu: Some(1400),
        }
    }

    fn payload(message: Message) -> Vec<u8> {
        message.finish(1)
    }

    fn attributes(bytes: &[u8], fixed_header: usize) -> &[u8] {
        &bytes[16 + fixed_header..]
    }

    #[test]
    fn veth_is_created_with_the_ve_end_in_the_netns() {
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let plan = VethPlan {
            bridge_ifindex: 7,
            host_ifname: "vz01020304",
            host_mac: [0xfe, 1, 2, 3, 4, 5],
            ve_mac: [0x02, 1, 2, 3, 4, 5],
            mtu: Some(1400),
            netns: &netns,
        };
        let bytes = payload(create_veth_request(&plan));
        let host = attributes(&bytes, 16);
        assert_eq!(
            rt::find_attribute(host, rt::IFLA_IFNAME),
            Some(&b"vz01020304\0"[..])
        );
        assert_eq!(
            rt::find_attribute(host, rt::IFLA_MASTER),
            Some(&7u32.to_ne_bytes()[..])
        );
        assert_eq!(
            rt::find_attribute(host, rt::IFLA_MTU),
            Some(&1400u32.to_ne_bytes()[..])
        );
        let link_info = rt::find_attribute(host, rt::IFLA_LINKINFO).unwrap();
        assert_eq!(
            rt::find_attribute(link_info, rt::IFLA_INFO_KIND),
            Some(&b"veth\0"[..])
        );
        let data = rt::find_attribute(link_info, rt::IFLA_INFO_DATA).unwrap();
        let peer = &rt::find_attribute(data, rt::VETH_INFO_PEER).unwrap()[16..];
        assert_eq!(
            rt::find_attribute(peer, rt::IFLA_IFNAME),
            Some(&b"eth0\0"[..])
        );
        assert_eq!(
            rt::find_attribute(peer, rt::IFLA_ADDRESS),
            Some(&plan.ve_mac[..])
        );
        assert_eq!(
            rt::find_attribute(peer, rt::IFLA_NET_NS_FD),
            Some(&(netns.as_raw_fd() as u32).to_ne_bytes()[..])
        );
    }

    #[test]
    fn ve_ports_neither_learn_nor_flood() {
        let bytes = payload(port_flags_request(9));
        let link_info = rt::find_attribute(attributes(&bytes, 16), rt::IFLA_LINKINFO).unwrap();
        assert_eq!(
            rt::find_attribute(link_info, rt::IFLA_INFO_SLAVE_KIND),
            Some(&b"bridge\0"[..])
        );
        let data = rt::find_attribute(link_info, rt::IFLA_INFO_SLAVE_DATA).unwrap();
        assert_eq!(
            rt::find_attribute(data, rt::IFLA_BRPORT_LEARNING),
            Some(&[0u8][..])
        );
        assert_eq!(
            rt::find_attribute(data, rt::IFLA_BRPORT_UNICAST_FLOOD),
            Some(&[0u8][..])
        );
    }

    #[test]
    fn ve_side_addresses_then_link_then_routes() {
        let requests: Vec<Vec<u8>> = ve_side_requests(&ve(), 1, 2)
            .into_iter()
            .map(payload)
            .collect();
        let kinds: Vec<u16> = requests
            .iter()
            .map(|r| u16::from_ne_bytes([r[4], r[5]]))
            .collect();
        assert_eq!(
            kinds,
            [
                rt::RTM_NEWLINK,
                rt::RTM_NEWLINK,
                rt::RTM_NEWADDR,
                rt::RTM_NEWADDR,
                rt::RTM_NEWLINK,
                rt::RTM_NEWROUTE,
                rt::RTM_NEWROUTE
            ]
        );
        let ipv6_address = &requests[3];
        assert_eq!(ipv6_address[16], libc::AF_INET6 as u8);
        assert_eq!(ipv6_address[17], 64, "prefix");
        assert_eq!(ipv6_address[18], rt::IFA_F_NODAD);
        let route = &requests[5];
        assert_eq!(
            rt::find_attribute(attributes(route, 12), rt::RTA_GATEWAY),
            Some(&[10, 0, 0, 1][..])
        );
    }

    #[test]
    fn single_stack_ves_get_one_default_route() {
        let mut ve = ve();
        ve.ipv6.clear();
        let requests: Vec<Vec<u8>> = ve_side_requests(&ve, 1, 2)
            .into_iter()
            .map(payload)
            .collect();
        let routes = requests
            .iter()
            .filter(|r| u16::from_ne_bytes([r[4], r[5]]) == rt::RTM_NEWROUTE)
            .count();
        assert_eq!(routes, 1);
        assert!(!reconfigure_ve_side(&ve).contains("fd00::1"));
    }

    #[test]
    fn reconfiguration_script_replaces_addresses() {
        let script = reconfigure_ve_side(&ve());
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "link set eth0 down");
        assert_eq!(lines[1], "addr flush dev eth0 scope global");
        assert!(script.contains("addr add fd00::5/64 dev eth0 nodad"));
        assert!(script.contains("route replace default via 10.0.0.1 dev eth0"));
    }

    #[test]
    fn bridge_configuration_is_idempotent_text() {
        let cfg = BridgeConfig {
            name: "vzbr0".into(),
            ipv4_gateway: Some(("10.0.0.1".parse().unwrap(), 24)),
            ipv6_gateway: None,
            nat_outbound: false,
        };
        assert_eq!(
            configure_bridge(&cfg),
            "addr replace 10.0.0.1/24 dev vzbr0\nlink set vzbr0 up\n"
        );
    }
}

//! Gratuitous ARP and unsolicited neighbour advertisements, sent from
//! inside the VE's netns when its network comes up, so neighbours (and
//! upstream switches) move the VE's addresses to its current port at once
//! instead of waiting for their caches to expire after a migration.
//!
//! Frames are built here (pure, unit-tested) and sent on an `AF_PACKET`
//! socket: no dependency on arping/ndisc6 and no process spawn.

use std::net::{Ipv4Addr, Ipv6Addr};

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet multicast address of ff02::1 (all nodes).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn ethernet_header(frame: &mut Vec<u8>, destination: [u8; 6], source: [u8; 6], ethertype: u16) {
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

/// A gratuitous ARP request (sender IP = target IP = the VE's address):
/// the form Linux neighbours accept to update an existing entry.
pub fn gratuitous_arp(mac: [u8; 6], address: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    ethernet_header(&mut frame, BROADCAST, mac, ETHERTYPE_ARP);
    frame.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame.push(6);
    frame.push(4);
    frame.extend_from_slice(&1u16.to_be_bytes()); // operation: request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&address.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&address.octets());
    frame
}

/// An unsolicited neighbour advertisement (RFC 4861 7.2.6) to all nodes,
/// override flag set, carrying the VE's MAC as target link-layer address.
pub fn unsolicited_neighbor_advertisement(mac: [u8; 6], address: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.push(136); // type: neighbour advertisement
    icmp.push(0); // code
    icmp.extend_from_slice(&[0, 0]); // checksum, filled below
    icmp.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // flags: override
    icmp.extend_from_slice(&address.octets());
    icmp.push(2); // option: target link-layer address
    icmp.push(1); // length in units of 8 bytes
    icmp.extend_from_slice(&mac);
    let checksum = icmpv6_checksum(address, ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + 40 + icmp.len());
    ethernet_header(&mut frame, ALL_NODES_MAC, mac, ETHERTYPE_IPV6);
    frame.extend_from_slice(&0x6000_0000u32.to_be_bytes()); // version 6
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.push(58); // next header: ICMPv6
    frame.push(255); // hop limit: receivers drop ND with anything else
    frame.extend_from_slice(&address.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// The ICMPv6 checksum over the IPv6 pseudo-header and the message.
pub fn icmpv6_checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&(message.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(message);
    internet_checksum(&pseudo)
}

/// RFC 1071 one's-complement sum.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends raw Ethernet frames on `ifname` of the calling thread's netns.
pub fn send_frames(ifname: &str, frames: &[Vec<u8>]) -> std::io::Result<()> {
    let ifname_c = std::ffi::CString::new(ifname)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "nul in ifname"))?;
    // SAFETY: ifname_c is a valid NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(ifname_c.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2) call; the returned fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created socket nobody else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    for frame in frames {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = ifindex as i32;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and address are valid for the lengths passed, and
        // fd is an open AF_PACKET socket.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Closing a packet socket waits for an RCU grace period (milliseconds);
    // let a detached thread pay for it instead of the VE start.
    std::thread::spawn(move || drop(socket));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    #[test]
    fn gratuitous_arp_layout() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(frame.len(), 42);
        assert_eq!(&frame[0..6], &BROADCAST);
        assert_eq!(&frame[6..12], &MAC);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[20..22], &[0, 1], "request");
        assert_eq!(&frame[22..28], &MAC, "sender MAC");
        assert_eq!(&frame[28..32], &[10, 0, 0, 5], "sender IP");
        assert_eq!(&frame[38..42], &[10, 0, 0, 5], "target IP");
    }

    #[test]
    fn neighbor_advertisement_layout_and_checksum() {
        let address: Ipv6Addr = "fd00::5".parse().unwrap();
        let frame = unsolicited_neighbor_advertisement(MAC, address);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(&frame[0..6], &ALL_NODES_MAC);
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        assert_eq!(frame[14 + 7], 255, "hop limit");
        let icmp = &frame[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4] & 0x20, 0x20, "override flag");
        assert_eq!(&icmp[8..24], &address.octets());
        assert_eq!(&icmp[24..26], &[2, 1]);
        assert_eq!(&icmp[26..32], &MAC);
        // A correct checksum makes the sum over everything come out zero.
        assert_eq!(icmpv6_checksum(address, ALL_NODES, icmp), 0);
    }

    #[test]
    fn internet_checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: sum 0xddf2, checksum is its complement.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&bytes), !0xddf2);
        assert_eq!(internet_checksum(&[0xff]), !0xff00);
    }
}

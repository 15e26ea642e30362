//! A minimal synchronous rtnetlink client: just the requests an attach
//! needs (create a veth, set port flags, add an FDB entry, addresses,
//! routes, read a bridge port's state), each answered by one ack.
//!
//! In-process netlink instead of `ip`/`bridge` processes because VE start
//! is benchmarked and each process spawn costs about a millisecond. The
//! socket stays in the netns it was opened in, whichever thread uses it.
//!
//! Why a port state query: when the VE end of the veth comes up, the kernel
//! enables the host end's bridge port asynchronously (linkwatch). Frames
//! sent before that are dropped, so the gratuitous ARP would be lost.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

// From linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
// linux/if_addr.h, linux/neighbour.h and linux/if_bridge.h.
const NLMSG_ERROR: u16 = 2;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_NEWNEIGH: u16 = 28;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_MASTER: u16 = 10;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_AF_SPEC: u16 = 26;
pub const IFLA_NET_NS_FD: u16 = 28;
const IFLA_EXT_MASK: u16 = 29;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
pub const IFLA_INFO_SLAVE_KIND: u16 = 4;
pub const IFLA_INFO_SLAVE_DATA: u16 = 5;
pub const VETH_INFO_PEER: u16 = 1;
pub const IFLA_BRPORT_STATE: u16 = 1;
pub const IFLA_BRPORT_LEARNING: u16 = 8;
pub const IFLA_BRPORT_UNICAST_FLOOD: u16 = 9;
pub const IFLA_INET6_ADDR_GEN_MODE: u16 = 8;
pub const IN6_ADDR_GEN_MODE_EUI64: u8 = 0;
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_F_NODAD: u8 = 0x02;
pub const RTA_OIF: u16 = 4;
pub const RTA_GATEWAY: u16 = 5;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_BOOT: u8 = 3;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RTN_UNICAST: u8 = 1;
pub const NDA_LLADDR: u16 = 2;
pub const NTF_MASTER: u8 = 0x04;
pub const NUD_REACHABLE: u16 = 0x02;
pub const NUD_NOARP: u16 = 0x40;
pub const AF_BRIDGE: u8 = 7;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
/// Attribute type bits that are flags (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HEADER_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// `BR_STATE_FORWARDING`.
pub const FORWARDING: u8 = 3;

/// An rtnetlink request under construction: header, fixed part, attributes.
pub struct Message {
    bytes: Vec<u8>,
    open_nests: Vec<usize>,
}

impl Message {
    /// A request of `kind`; `NLM_F_REQUEST | NLM_F_ACK` are always set.
    pub fn new(kind: u16, flags: u16) -> Message {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Message {
            bytes,
            open_nests: Vec::new(),
        }
    }

    /// `struct ifinfomsg`.
    pub fn ifinfomsg(mut self, family: u8, ifindex: u32, flags: u32, change: u32) -> Message {
        self.bytes
            .extend_from_slice(&ifinfomsg(family, ifindex, flags, change));
        self
    }

    /// `struct ifaddrmsg`.
    pub fn ifaddrmsg(
        mut self,
        family: u8,
        prefix: u8,
        flags: u8,
        scope: u8,
        ifindex: u32,
    ) -> Message {
        self.bytes
            .extend_from_slice(&[family, prefix, flags, scope]);
        self.bytes.extend_from_slice(&ifindex.to_ne_bytes());
        self
    }

    /// `struct rtmsg` for a route with `destination_prefix` bits.
    pub fn rtmsg(mut self, family: u8, destination_prefix: u8) -> Message {
        self.bytes.extend_from_slice(&[
            family,
            destination_prefix,
            0, // source prefix
            0, // tos
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ]);
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        self
    }

    /// `struct nfgenmsg` (netfilter netlink): family, version 0, resource id 0.
    pub fn nfgenmsg(mut self, family: u8) -> Message {
        self.bytes.extend_from_slice(&[family, 0, 0, 0]);
        self
    }

    /// `struct ndmsg`.
    pub fn ndmsg(mut self, family: u8, ifindex: u32, state: u16, flags: u8) -> Message {
        self.bytes.extend_from_slice(&[family, 0, 0, 0]);
        self.bytes.extend_from_slice(&ifindex.to_ne_bytes());
        self.bytes.extend_from_slice(&state.to_ne_bytes());
        self.bytes.extend_from_slice(&[flags, 0]);
        self
    }

    pub fn attr(mut self, kind: u16, payload: &[u8]) -> Message {
        self.bytes
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.pad();
        self
    }

    pub fn attr_u8(self, kind: u16, value: u8) -> Message {
        self.attr(kind, &[value])
    }

    pub fn attr_u32(self, kind: u16, value: u32) -> Message {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn attr_str(self, kind: u16, value: &str) -> Message {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.attr(kind, &payload)
    }

    pub fn attr_ip(self, kind: u16, address: IpAddr) -> Message {
        match address {
            IpAddr::V4(address) => self.attr(kind, &address.octets()),
            IpAddr::V6(address) => self.attr(kind, &address.octets()),
        }
    }

    /// Opens a nested attribute; close it with [`Message::end_nested`].
    pub fn begin_nested(mut self, kind: u16) -> Message {
        self.open_nests.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Raw bytes inside a nested attribute (the peer's ifinfomsg of a veth).
    pub fn raw(mut self, bytes: &[u8]) -> Message {
        self.bytes.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub fn end_nested(mut self) -> Message {
        let start = self
            .open_nests
            .pop()
            .expect("end_nested without begin_nested");
        let length = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        self
    }

    /// The bytes to send, with length and sequence number filled in.
    pub fn finish(mut self, sequence: u32) -> Vec<u8> {
        assert!(self.open_nests.is_empty(), "unclosed nested attribute");
        let length = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        self.bytes
    }

    fn pad(&mut self) {
        while self.bytes.len() & 3 != 0 {
            self.bytes.push(0);
        }
    }
}

/// `struct ifinfomsg` bytes.
pub fn ifinfomsg(family: u8, ifindex: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut bytes = [0u8; IFINFOMSG_LEN];
    bytes[0] = family;
    bytes[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    bytes[8..12].copy_from_slice(&flags.to_ne_bytes());
    bytes[12..16].copy_from_slice(&change.to_ne_bytes());
    bytes
}

/// An RTM_GETLINK request for one interface, statistics skipped.
pub fn getlink_request(ifindex: u32, sequence: u32) -> Vec<u8> {
    let mut message = Message::new(RTM_GETLINK, 0)
        .ifinfomsg(0, ifindex, 0, 0)
        .attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        .finish(sequence);
    // A get answers with the link itself; no separate ack needed.
    let flags = NLM_F_REQUEST.to_ne_bytes();
    message[6..8].copy_from_slice(&flags);
    message
}

/// The errno of an NLMSG_ERROR answer (0 for an ack), if that is what
/// `answer` is.
pub fn parse_ack(answer: &[u8]) -> Option<i32> {
    if read_u16(answer, 4)? != NLMSG_ERROR {
        return None;
    }
    read_u32(answer, NLMSG_HEADER_LEN).map(|code| -(code as i32))
}

/// What an RTM_GETLINK answer said about the bridge port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAnswer {
    /// The interface is a bridge port in this STP state.
    State(u8),
    /// The interface exists but is no bridge port.
    NotAPort,
    /// The kernel answered with this errno.
    Error(i32),
}

/// Parses the answer to [`getlink_request`]; `None` if it is malformed.
pub fn parse_getlink_answer(answer: &[u8]) -> Option<PortAnswer> {
    let length = read_u32(answer, 0)? as usize;
    let kind = read_u16(answer, 4)?;
    let message = answer.get(..length)?;
    match kind {
        NLMSG_ERROR => Some(PortAnswer::Error(
            -(read_u32(message, NLMSG_HEADER_LEN)? as i32),
        )),
        RTM_NEWLINK => {
            let attributes = message.get(NLMSG_HEADER_LEN + IFINFOMSG_LEN..)?;
            let state = find_attribute(attributes, IFLA_LINKINFO)
                .and_then(|link_info| find_attribute(link_info, IFLA_INFO_SLAVE_DATA))
                .and_then(|slave_data| find_attribute(slave_data, IFLA_BRPORT_STATE))
                .and_then(|state| state.first().copied());
            Some(state.map_or(PortAnswer::NotAPort, PortAnswer::State))
        }
        _ => None,
    }
}

/// The payload of the first attribute of type `wanted` in a run of
/// netlink attributes.
pub fn find_attribute(mut attributes: &[u8], wanted: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let length = usize::from(read_u16(attributes, 0)?);
        let kind = read_u16(attributes, 2)? & NLA_TYPE_MASK;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if kind == wanted {
            return Some(&attributes[4..length]);
        }
        let aligned = (length + 3) & !3;
        attributes = attributes.get(aligned.min(attributes.len())..)?;
    }
    None
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        bytes.get(offset..offset + 2)?.try_into().ok()?,
    ))
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

/// An rtnetlink socket; it stays in the netns it was opened in, whichever
/// thread uses it later.
pub struct RouteSocket {
    fd: OwnedFd,
    sequence: std::cell::Cell<u32>,
}

impl RouteSocket {
    pub fn open() -> io::Result<RouteSocket> {
        RouteSocket::open_protocol(libc::NETLINK_ROUTE)
    }

    /// A socket of another netlink family (`NETLINK_NETFILTER` for the
    /// nftables queries that must not go through libnftables' cache).
    pub fn open_protocol(protocol: libc::c_int) -> io::Result<RouteSocket> {
        // SAFETY: plain socket(2) call; the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel answers at once; the timeout only guards against a
        // lost answer blocking an attach forever.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: the fd is open; timeout is a valid timeval of the size passed.
        let status = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if status < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RouteSocket {
            fd,
            sequence: std::cell::Cell::new(0),
        })
    }

    /// Sends one request and waits for its ack.
    pub fn request(&self, message: Message) -> io::Result<()> {
        self.sequence.set(self.sequence.get() + 1);
        let sequence = self.sequence.get();
        self.send(&message.finish(sequence))?;
        let answer = self.receive(sequence)?;
        match parse_ack(&answer) {
            Some(0) => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "netlink answer is not an ack",
            )),
        }
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: bytes is valid for its length; the fd is open. An
        // unconnected netlink socket sends to the kernel (port id 0).
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next answer carrying `sequence`; stale answers are skipped.
    fn receive(&self, sequence: u32) -> io::Result<Vec<u8>> {
        let mut answer = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: answer is valid for writes of its length; the fd is open.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    answer.as_mut_ptr().cast(),
                    answer.len(),
                    0,
                )
            };
            if received < 0 {
                return Err(io::Error::last_os_error());
            }
            if read_u32(&answer, 8) == Some(sequence) {
                answer.truncate(received as usize);
                return Ok(answer);
            }
        }
    }

    /// Sends one query and returns the first answer to it: the object
    /// asked for, or an NLMSG_ERROR (see [`parse_ack`]).
    pub fn query(&self, message: Message) -> io::Result<Vec<u8>> {
        self.sequence.set(self.sequence.get() + 1);
        let sequence = self.sequence.get();
        self.send(&message.finish(sequence))?;
        self.receive(sequence)
    }

    /// Asks the kernel for the bridge port state of `ifindex`.
    pub fn port_state(&self, ifindex: u32) -> io::Result<PortAnswer> {
        self.sequence.set(self.sequence.get() + 1);
        let sequence = self.sequence.get();
        self.send(&getlink_request(ifindex, sequence))?;
        let answer = self.receive(sequence)?;
        parse_getlink_answer(&answer).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "malformed RTM_NEWLINK answer")
        })
    }

    /// Polls until the port forwards; false if it did not within `timeout`.
    pub fn wait_until_forwarding(&self, ifindex: u32, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.port_state(ifindex)? {
                PortAnswer::State(FORWARDING) => return Ok(true),
                PortAnswer::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
                PortAnswer::State(_) | PortAnswer::NotAPort => {}
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(payload);
        while bytes.len() & 3 != 0 {
            bytes.push(0);
        }
        bytes
    }

    fn answer(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut message = Vec::new();
        message.extend_from_slice(&((NLMSG_HEADER_LEN + body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes());
        message.extend_from_slice(&7u32.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(body);
        message
    }

    #[test]
    fn nested_attributes_get_their_length_and_padding() {
        let bytes = Message::new(RTM_NEWLINK, NLM_F_CREATE)
            .ifinfomsg(0, 0, 0, 0)
            .attr_str(IFLA_IFNAME, "vz1")
            .begin_nested(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .end_nested()
            .finish(9);
        assert_eq!(read_u32(&bytes, 0), Some(bytes.len() as u32));
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(
            read_u16(&bytes, 6),
            Some(NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK)
        );
        assert_eq!(read_u32(&bytes, 8), Some(9));
        let attributes = &bytes[NLMSG_HEADER_LEN + IFINFOMSG_LEN..];
        assert_eq!(find_attribute(attributes, IFLA_IFNAME), Some(&b"vz1\0"[..]));
        let link_info = find_attribute(attributes, IFLA_LINKINFO).unwrap();
        assert_eq!(
            link_info.len(),
            12,
            "kind attribute: 4 header + 5 bytes + 3 padding"
        );
        assert_eq!(
            find_attribute(link_info, IFLA_INFO_KIND),
            Some(&b"veth\0"[..])
        );
    }

    #[test]
    fn acks_and_errors() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&[0; 10]);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        assert_eq!(parse_ack(&ack), Some(0));
        ack[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(parse_ack(&ack), Some(17));
        ack[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        assert_eq!(parse_ack(&ack), None);
    }

    #[test]
    fn request_layout() {
        let request = getlink_request(42, 7);
        assert_eq!(request.len(), 40);
        assert_eq!(read_u32(&request, 0), Some(40));
        assert_eq!(read_u16(&request, 4), Some(RTM_GETLINK));
        assert_eq!(read_u16(&request, 6), Some(NLM_F_REQUEST));
        assert_eq!(read_u32(&request, 8), Some(7));
        assert_eq!(read_u32(&request, 20), Some(42));
    }

    #[test]
    fn finds_the_port_state_in_nested_link_info() {
        let slave_data = attribute(
            IFLA_INFO_SLAVE_DATA | 0x8000,
            &attribute(IFLA_BRPORT_STATE, &[3]),
        );
        let mut link_info = attribute(4, b"bridge\0");
        link_info.extend_from_slice(&slave_data);
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend_from_slice(&attribute(3, b"vz01020304\0"));
        body.extend_from_slice(&attribute(IFLA_LINKINFO | 0x8000, &link_info));
        assert_eq!(
            parse_getlink_answer(&answer(RTM_NEWLINK, &body)),
            Some(PortAnswer::State(FORWARDING))
        );
    }

    #[test]
    fn an_interface_without_bridge_data_is_not_a_port() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend_from_slice(&attribute(3, b"eth0\0"));
        assert_eq!(
            parse_getlink_answer(&answer(RTM_NEWLINK, &body)),
            Some(PortAnswer::NotAPort)
        );
    }

    #[test]
    fn errors_and_garbage() {
        let mut body = (-19i32).to_ne_bytes().to_vec();
        body.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse_getlink_answer(&answer(NLMSG_ERROR, &body)),
            Some(PortAnswer::Error(19))
        );
        assert_eq!(parse_getlink_answer(&[1, 2, 3]), None);
        let mut truncated = vec![0u8; IFINFOMSG_LEN];
        truncated.extend_from_slice(&[200, 0, 18, 0]);
        assert_eq!(
            parse_getlink_answer(&answer(RTM_NEWLINK, &truncated)),
            Some(PortAnswer::NotAPort)
        );
    }
}

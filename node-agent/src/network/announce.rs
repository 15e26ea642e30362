//! Gratuitous ARP and unsolicited neighbour advertisements when a VE's
//! network comes up, so neighbours (and upstream switches) move the VE's
//! addresses to its current port at once instead of waiting for their
//! caches to expire after a migration.
//!
//! The VE's own kernel sends them: with `arp_notify` and `ndisc_notify` set
//! on the interface, setting its MAC address (even to the same value) is a
//! NETDEV_CHANGEADDR event, on which Linux sends a gratuitous ARP request
//! for every IPv4 address and an unsolicited neighbour advertisement
//! (override flag, target link-layer address) for every IPv6 address.
//!
//! Not an `AF_PACKET` socket of our own: closing one waits for an RCU grace
//! period (`synchronize_net` in `packet_release`), about 10 ms added to
//! every VE start, paid even at process exit.

use std::io;

use super::links;
use super::rtnetlink::RouteSocket;

/// Makes the kernel of the calling thread's netns announce every address
/// of `ifname` (index `ifindex`, MAC `mac`) on the link.
pub fn announce_addresses(
    socket: &RouteSocket,
    ifname: &str,
    ifindex: u32,
    mac: [u8; 6],
    ipv4: bool,
    ipv6: bool,
) -> io::Result<()> {
    if ipv4 {
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/{ifname}/arp_notify"))?;
    }
    if ipv6 {
        write_sysctl(&format!("/proc/sys/net/ipv6/conf/{ifname}/ndisc_notify"))?;
    }
    socket.request(links::set_mac_request(ifindex, mac))
}

/// Sets a per-interface switch to 1. /proc/sys/net shows the netns of the
/// thread that opens it, so this reaches the VE's interface.
fn write_sysctl(path: &str) -> io::Result<()> {
    std::fs::write(path, "1")
        .map_err(|error| io::Error::new(error.kind(), format!("cannot set {path}: {error}")))
}

/// Sends raw Ethernet frames on `ifname` of the calling thread's netns
/// (the network tests play a malicious VE with it).
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
    // let a detached thread pay for it instead of the caller.
    std::thread::spawn(move || drop(socket));
    Ok(())
}

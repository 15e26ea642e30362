//! Interface byte counters, parsed from `/proc/thread-self/net/dev`.
//!
//! `thread-self` (not `self`, not sysfs) so the numbers come from the
//! network namespace of the calling thread, which is the node's.

/// Byte counters of one interface as the kernel reports them (the host
/// end's point of view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceBytes {
    pub received: u64,
    pub transmitted: u64,
}

/// Finds `ifname` in the text of `/proc/net/dev`.
pub fn parse_net_dev(text: &str, ifname: &str) -> Option<InterfaceBytes> {
    text.lines().skip(2).find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        let fields: Vec<u64> = counters
            .split_whitespace()
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        Some(InterfaceBytes {
            received: *fields.first()?,
            transmitted: *fields.get(8)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     120       2    0    0    0     0          0         0      120       2    0    0    0     0       0          0
vz01020304:    4242      10    0    0    0     0          0         0     9000      20    0    0    0     0       0          0
";

    #[test]
    fn finds_the_counters_of_an_interface() {
        assert_eq!(
            parse_net_dev(SAMPLE, "vz01020304"),
            Some(InterfaceBytes {
                received: 4242,
                transmitted: 9000
            })
        );
        assert_eq!(parse_net_dev(SAMPLE, "vz0102030"), None);
        assert_eq!(parse_net_dev(SAMPLE, "eth0"), None);
    }
}

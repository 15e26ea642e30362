//! VE networking against the real kernel: bridges, veths, nftables and
//! network namespaces. Needs root.
//!
//! Every test runs inside its own "node" network namespace (held by an
//! `unshare -n` process), so its bridge, nft tables and forwarding sysctls
//! never touch the host and tests can run in parallel and twice in a row.
//! VEs and clients are further namespaces plugged into the test's bridge.
//! Drop guards detach VEs, remove the bridge and kill the namespace holders
//! even when an assertion fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use node_agent::network::{
    self, host_ifname_for_ve, mac_for_ve, run_in_netns, BridgeConfig, NetworkError, VeNetwork,
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short name unique across tests and concurrent test processes.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{:x}{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A network namespace kept alive by a sleeping process.
struct Netns {
    holder: Child,
    path: PathBuf,
}

impl Netns {
    fn new() -> Netns {
        let mut holder = Command::new("unshare")
            .args(["-n", "sh", "-c", "echo ready; exec sleep infinity"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn unshare -n");
        // The line arrives once unshare(2) is done, so the path is the new netns.
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read readiness");
        assert_eq!(line.trim(), "ready", "netns holder did not start");
        let path = PathBuf::from(format!("/proc/{}/ns/net", holder.id()));
        Netns { holder, path }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a shell command inside this netns.
    fn sh(&self, script: &str) -> Output {
        run_in_netns(&self.path, || {
            Command::new("sh")
                .args(["-c", script])
                .output()
                .expect("run sh")
        })
        .expect("enter netns")
    }

    fn sh_ok(&self, script: &str) -> String {
        let output = self.sh(script);
        assert!(
            output.status.success(),
            "`{script}` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn ping(&self, address: &str) -> bool {
        self.sh(&format!("ping -c 1 -W 2 {address}"))
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Runs a test body on a thread inside a fresh node netns.
fn on_fresh_node(body: impl FnOnce(&Netns) + Send) {
    let node = Netns::new();
    let outcome = run_in_netns(node.path(), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&node)))
    })
    .expect("enter node netns");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The test's bridge; removed on drop.
struct TestBridge {
    cfg: BridgeConfig,
    subnet: u8,
}

impl TestBridge {
    /// 10.213.<subnet>.0/24 and fd00:213:<subnet>::/64, gateway .1 / ::1.
    fn new(subnet: u8, nat_outbound: bool) -> TestBridge {
        let cfg = BridgeConfig {
            name: unique("vzt"),
            ipv4_gateway: Some((Ipv4Addr::new(10, 213, subnet, 1), 24)),
            ipv6_gateway: Some((
                Ipv6Addr::new(0xfd00, 0x213, subnet.into(), 0, 0, 0, 0, 1),
                64,
            )),
            nat_outbound,
        };
        network::ensure_bridge(&cfg).expect("ensure_bridge");
        TestBridge { cfg, subnet }
    }

    fn ipv4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, host)
    }

    fn ipv6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x213, self.subnet.into(), 0, 0, 0, 0, host.into())
    }

    fn ve_network(&self, ve_id: &str, host: u8) -> VeNetwork {
        VeNetwork {
            ve_id: ve_id.to_owned(),
            ipv4: vec![(self.ipv4(host), 24)],
            ipv6: vec![(self.ipv6(host), 64)],
            ipv4_gateway: Some(self.ipv4(1)),
            ipv6_gateway: Some(self.ipv6(1)),
            mtu: None,
        }
    }

    /// Starts a "VE": a netns attached to the bridge.
    fn attach_ve(&self, host: u8) -> TestVe<'_> {
        self.attach_network(self.ve_network(&unique("ve"), host))
    }

    fn attach_network(&self, ve: VeNetwork) -> TestVe<'_> {
        let netns = Netns::new();
        let started = Instant::now();
        network::attach(&self.cfg, &ve, netns.path()).expect("attach");
        println!("attach of VE {} took {:?}", ve.ve_id, started.elapsed());
        TestVe {
            bridge: self,
            ve,
            netns,
        }
    }

    /// A client netns plugged into the bridge with a plain veth and no
    /// filtering, like a host on the LAN.
    fn client(&self, host: u8) -> Netns {
        let netns = Netns::new();
        let ifname = unique("ct");
        network_script(&format!(
            "link add {ifname} type veth peer name eth0 address {} netns {}\n\
             link set {ifname} master {}\n\
             link set {ifname} up\n",
            mac_text(client_mac(host)),
            netns.path().display(),
            self.cfg.name
        ));
        netns.sh_ok(&format!(
            "ip link set lo up && ip addr add {}/24 dev eth0 && \
             ip addr add {}/64 dev eth0 nodad && ip link set eth0 up",
            self.ipv4(host),
            self.ipv6(host)
        ));
        // The bridge enables the new port asynchronously; wait until it
        // forwards so tests start from a working client.
        let gateway = self.ipv4(1).to_string();
        assert!(
            eventually(|| netns.ping(&gateway)),
            "client cannot reach the gateway"
        );
        netns
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        if let Err(error) = network::remove_bridge(&self.cfg) {
            eprintln!("cleanup: {error}");
        }
    }
}

fn client_mac(host: u8) -> [u8; 6] {
    [0x02, 0xcc, 0, 0, 0, host]
}

fn network_script(script: &str) {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn ip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "ip batch failed:\n{script}"
    );
}

/// An attached VE; detached on drop (before its netns holder dies).
struct TestVe<'a> {
    bridge: &'a TestBridge,
    ve: VeNetwork,
    netns: Netns,
}

impl TestVe<'_> {
    fn ipv4(&self) -> Ipv4Addr {
        self.ve.ipv4[0].0
    }
    fn ipv6(&self) -> Ipv6Addr {
        self.ve.ipv6[0].0
    }
    fn mac(&self) -> [u8; 6] {
        mac_for_ve(&self.ve.ve_id)
    }
    fn ifname(&self) -> String {
        host_ifname_for_ve(&self.ve.ve_id)
    }
}

impl Drop for TestVe<'_> {
    fn drop(&mut self) {
        if let Err(error) = network::detach(&self.bridge.cfg, &self.ve.ve_id) {
            eprintln!("cleanup: {error}");
        }
    }
}

fn interface_exists_here(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn nft_list(args: &[&str]) -> Option<String> {
    let output = Command::new("nft").arg("list").args(args).output().unwrap();
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls a condition that depends on packets in flight (bounded wait, not
/// a timing assertion).
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn two_ves_ping_each_other_over_the_bridge() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(1, false);
        let a = bridge.attach_ve(5);
        let b = bridge.attach_ve(6);
        assert!(a.netns.ping(&b.ipv4().to_string()), "IPv4 VE to VE");
        assert!(b.netns.ping(&a.ipv4().to_string()), "IPv4 VE to VE back");
        assert!(a.netns.ping(&b.ipv6().to_string()), "IPv6 VE to VE");
        assert!(a.netns.ping(&bridge.ipv4(1).to_string()), "VE to gateway");
        assert!(
            a.netns.ping(&bridge.ipv6(1).to_string()),
            "VE to IPv6 gateway"
        );

        let inside = a
            .netns
            .sh_ok("ip -o link show eth0; ip -o addr show dev eth0; ip route; ip -6 route");
        assert!(
            inside.contains(&mac_text(a.mac())),
            "MAC from VE id: {inside}"
        );
        assert!(
            inside.contains(&format!("default via {}", bridge.ipv4(1))),
            "{inside}"
        );
        assert!(
            inside.contains(&format!("default via {}", bridge.ipv6(1))),
            "{inside}"
        );
        let link_local = network::link_local_for_mac(a.mac()).to_string();
        assert!(
            inside.contains(&link_local),
            "EUI-64 link-local {link_local}: {inside}"
        );

        // Normal VE traffic (ARP, ND, DAD, MLD, IPv4, IPv6) never hits a
        // drop rule. Wait for the link-local's DAD to finish so its
        // solicitation from :: has been through the rules.
        for ve in [&a, &b] {
            assert!(eventually(|| !ve
                .netns
                .sh_ok("ip -6 addr show dev eth0")
                .contains("tentative")));
        }
        for ve in [&a, &b] {
            let chain = format!("ve_{}", ve.ifname());
            let rules = nft_list(&["chain", "bridge", &bridge.cfg.name, &chain]).unwrap();
            for line in rules.lines().filter(|l| l.contains("drop")) {
                assert!(
                    line.contains("counter packets 0 "),
                    "legitimate traffic dropped: {line}"
                );
            }
        }

        let (rx_bytes, tx_bytes) = network::interface_stats(&a.ve.ve_id).expect("stats");
        assert!(rx_bytes > 0 && tx_bytes > 0, "rx {rx_bytes} tx {tx_bytes}");
    });
}

#[test]
fn client_reaches_a_tcp_server_in_a_ve() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(2, false);
        // IPv4 only, while the node has an IPv6 gateway too (as the
        // lifecycle passes them): the unused gateway is ignored.
        let mut single_stack = bridge.ve_network(&unique("ve"), 5);
        single_stack.ipv6.clear();
        let ve = bridge.attach_network(single_stack);
        let routes = ve.netns.sh_ok("ip -6 route show default");
        assert!(
            routes.trim().is_empty(),
            "IPv6 default route without IPv6: {routes}"
        );
        let client = bridge.client(100);
        // A socket belongs to the netns it was created in.
        let listener = run_in_netns(ve.netns.path(), || TcpListener::bind("0.0.0.0:8080"))
            .unwrap()
            .expect("listen in VE");
        let server = std::thread::spawn(move || {
            let (mut stream, peer) = listener.accept().expect("accept");
            stream.write_all(b"hello from the VE").unwrap();
            peer
        });
        let address = (ve.ipv4(), 8080).into();
        let received = run_in_netns(client.path(), || {
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
                .expect("connect to VE");
            let mut text = String::new();
            stream.read_to_string(&mut text).expect("read");
            text
        })
        .unwrap();
        assert_eq!(received, "hello from the VE");
        assert_eq!(
            server.join().unwrap().ip(),
            std::net::IpAddr::V4(bridge.ipv4(100))
        );
    });
}

#[test]
fn a_ve_taking_another_ves_address_gets_nothing_through() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(3, false);
        let victim = bridge.attach_ve(5);
        let thief = bridge.attach_ve(6);
        let client = bridge.client(100);
        let victim_ip = victim.ipv4().to_string();
        assert!(
            thief.netns.ping(&bridge.ipv4(100).to_string()),
            "control: own address works"
        );

        // The victim goes away (e.g. stopped); the thief claims its address.
        drop(victim);
        thief
            .netns
            .sh_ok(&format!("ip addr add {victim_ip}/24 dev eth0"));
        assert!(
            !client.ping(&victim_ip),
            "thief answered for the victim's address"
        );
        assert!(
            !thief
                .netns
                .ping(&format!("-I {victim_ip} {}", bridge.ipv4(100))),
            "thief sent from the victim's address"
        );
        // Its ARP replies and announcements never reached the client.
        let neighbours = client.sh_ok("ip neigh show");
        for line in neighbours
            .lines()
            .filter(|l| l.starts_with(&format!("{victim_ip} ")))
        {
            assert!(!line.contains(&mac_text(thief.mac())), "{line}");
        }

        // Same for IPv6.
        thief
            .netns
            .sh_ok(&format!("ip addr add {}/64 dev eth0 nodad", bridge.ipv6(5)));
        assert!(
            !client.ping(&bridge.ipv6(5).to_string()),
            "thief answered for an IPv6 address"
        );
    });
}

#[test]
fn a_ve_taking_another_ves_mac_gets_nothing_through() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(4, false);
        let victim = bridge.attach_ve(5);
        let thief = bridge.attach_ve(6);
        let client = bridge.client(100);
        assert!(thief.netns.ping(&bridge.ipv4(100).to_string()), "control");
        thief.netns.sh_ok(&format!(
            "ip link set eth0 address {} && ip neigh flush all",
            mac_text(victim.mac())
        ));
        assert!(
            !thief.netns.ping(&bridge.ipv4(100).to_string()),
            "frames with a stolen MAC passed"
        );
        assert!(!client.ping(&thief.ipv4().to_string()));
        // The victim is unaffected: the bridge's FDB still points to its port.
        assert!(
            victim.netns.ping(&bridge.ipv4(100).to_string()),
            "victim lost connectivity"
        );
    });
}

/// An Ethernet/IPv4/UDP frame with an arbitrary source address.
fn udp_frame(
    source_mac: [u8; 6],
    destination_mac: [u8; 6],
    source: Ipv4Addr,
    destination: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&destination_mac);
    frame.extend_from_slice(&source_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut header = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&destination.octets());
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    frame.extend_from_slice(payload);
    frame
}

/// Sends a raw frame on eth0 of the calling thread's netns.
fn send_raw(frame: &[u8]) {
    node_agent::network::send_frames("eth0", &[frame.to_vec()]).expect("send a raw frame on eth0");
}

#[test]
fn raw_frames_from_a_foreign_source_address_are_dropped() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(5, false);
        let ve = bridge.attach_ve(5);
        let client = bridge.client(100);
        let receiver = run_in_netns(client.path(), || UdpSocket::bind("0.0.0.0:9999"))
            .unwrap()
            .expect("bind in client");
        receiver
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let receive = || {
            let mut buffer = [0u8; 64];
            receiver
                .recv_from(&mut buffer)
                .ok()
                .map(|(n, from)| (buffer[..n].to_vec(), from))
        };
        let send = |source: Ipv4Addr, payload: &[u8]| {
            let frame = udp_frame(
                ve.mac(),
                client_mac(100),
                source,
                bridge.ipv4(100),
                9999,
                payload,
            );
            run_in_netns(ve.netns.path(), || send_raw(&frame)).unwrap();
        };

        send(ve.ipv4(), b"own");
        let (payload, from) =
            receive().expect("control: a raw frame from the VE's own address arrives");
        assert_eq!(payload, b"own");
        assert_eq!(from.ip(), std::net::IpAddr::V4(ve.ipv4()));

        for foreign in [bridge.ipv4(77), bridge.ipv4(1), Ipv4Addr::new(192, 0, 2, 1)] {
            send(foreign, b"spoofed");
            assert_eq!(receive(), None, "frame from spoofed {foreign} arrived");
        }
        let counters = nft_list(&[
            "chain",
            "bridge",
            &bridge.cfg.name,
            &format!("ve_{}", ve.ifname()),
        ])
        .expect("VE chain");
        assert!(counters.contains("ip saddr != "), "{counters}");
    });
}

#[test]
fn gratuitous_arp_and_na_update_neighbours_on_attach() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(6, false);
        let client = bridge.client(100);
        let ipv4 = bridge.ipv4(5);
        let ipv6 = bridge.ipv6(5);
        // The client still knows the VE at its old place (another node's
        // port, same MAC or not): stale entries with a wrong MAC.
        client.sh_ok(&format!(
            "ip neigh add {ipv4} lladdr 02:de:ad:be:ef:00 dev eth0 nud stale && \
             ip neigh add {ipv6} lladdr 02:de:ad:be:ef:00 dev eth0 nud stale"
        ));
        let ve = bridge.attach_ve(5);
        let mac = mac_text(ve.mac());
        let entry = |address: String| client.sh_ok(&format!("ip neigh show {address} dev eth0"));
        assert!(
            eventually(|| entry(ipv4.to_string()).contains(&mac)),
            "IPv4 neighbour entry not updated: {}",
            entry(ipv4.to_string())
        );
        assert!(
            eventually(|| entry(ipv6.to_string()).contains(&mac)),
            "IPv6 neighbour entry not updated: {}",
            entry(ipv6.to_string())
        );
        // The node itself learned it too (no ARP needed before the first packet).
        let node_entry = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["neigh", "show", &ipv4.to_string()])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        assert!(
            node_entry.is_empty() || node_entry.contains(&mac),
            "{node_entry}"
        );
    });
}

#[test]
fn a_ve_does_not_see_unicast_between_other_ves() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(7, false);
        let a = bridge.attach_ve(5);
        let b = bridge.attach_ve(6);
        let spy = bridge.attach_ve(7);
        spy.netns.sh_ok("ip link set eth0 promisc on");
        let spy_socket = run_in_netns(spy.netns.path(), || {
            let protocol = i32::from((libc::ETH_P_ALL as u16).to_be());
            // SAFETY: plain socket(2) call; the fd is owned right below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: fd is open; timeout is a valid timeval of the size passed.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            // SAFETY: fd is a fresh socket nobody else owns.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .unwrap();
        let b_mac = b.mac();
        let collector = std::thread::spawn(move || {
            let mut socket = std::fs::File::from(spy_socket);
            let mut frames_for_b = 0;
            let mut buffer = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(n) = socket.read(&mut buffer) {
                    if n >= 6 && buffer[..6] == b_mac {
                        frames_for_b += 1;
                    }
                }
            }
            frames_for_b
        });
        // B's MAC is a static FDB entry on B's port and VE ports get no
        // unknown-unicast flooding: A's unicast to B reaches B only.
        assert!(a.netns.ping(&format!("-c 5 -i 0.2 {}", b.ipv4())));
        assert_eq!(
            collector.join().unwrap(),
            0,
            "the spy saw unicast frames addressed to B"
        );
    });
}

#[test]
fn detach_is_idempotent_and_removes_exactly_the_ves_rules() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(8, false);
        let mut keep = bridge.attach_ve(5);
        let gone = bridge.attach_ve(6);
        let table = ["table", "bridge", bridge.cfg.name.as_str()];
        let before = nft_list(&table).expect("bridge table");
        assert!(before.contains(&gone.ifname()) && before.contains(&keep.ifname()));

        network::detach(&bridge.cfg, &gone.ve.ve_id).expect("detach");
        assert!(!interface_exists_here(&gone.ifname()), "veth still there");
        let after = nft_list(&table).expect("bridge table");
        assert!(
            !after.contains(&gone.ifname()),
            "rules of the detached VE remain:\n{after}"
        );
        assert!(
            after.contains(&format!("ve_{}", keep.ifname())),
            "other VE's rules removed"
        );
        network::detach(&bridge.cfg, &gone.ve.ve_id).expect("second detach");
        assert!(
            keep.netns.ping(&bridge.ipv4(1).to_string()),
            "other VE unaffected"
        );

        // A VE whose netns died already: its veth vanished with it.
        let keep_ifname = keep.ifname();
        let keep_id = keep.ve.ve_id.clone();
        let _ = keep.netns.holder.kill();
        let _ = keep.netns.holder.wait();
        assert!(eventually(|| !interface_exists_here(&keep_ifname)));
        network::detach(&bridge.cfg, &keep_id).expect("detach after netns death");
        assert!(!nft_list(&table).unwrap().contains(&keep_ifname));

        // And after the bridge itself is gone.
        network::remove_bridge(&bridge.cfg).expect("remove bridge");
        network::detach(&bridge.cfg, &keep_id).expect("detach without bridge");
    });
}

#[test]
fn reattaching_a_ve_replaces_its_previous_veth() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(13, false);
        let client = bridge.client(100);
        let mut ve = bridge.ve_network(&unique("ve"), 5);
        ve.mtu = Some(1400);
        // The VE's first incarnation, then a restart with a new init (new
        // netns) while the old netns still exists.
        let first = Netns::new();
        network::attach(&bridge.cfg, &ve, first.path()).expect("first attach");
        let second = Netns::new();
        network::attach(&bridge.cfg, &ve, second.path()).expect("second attach");
        let _detach = DetachOnDrop(&bridge.cfg, ve.ve_id.clone());

        assert!(
            !first.sh("ip link show eth0").status.success(),
            "old eth0 survived"
        );
        let link = second.sh_ok("ip -o link show eth0");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(client.ping(&bridge.ipv4(5).to_string()));
        let table = nft_list(&["table", "bridge", &bridge.cfg.name]).unwrap();
        let chain = format!("chain ve_{}", host_ifname_for_ve(&ve.ve_id));
        assert_eq!(table.matches(&chain).count(), 1, "{table}");
    });
}

/// Detaches a VE attached by hand when the test ends.
struct DetachOnDrop<'a>(&'a BridgeConfig, String);

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(error) = network::detach(self.0, &self.1) {
            eprintln!("cleanup: {error}");
        }
    }
}

#[test]
fn bridge_setup_is_idempotent_and_removable() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(9, true);
        network::ensure_bridge(&bridge.cfg).expect("second ensure_bridge");
        let name = bridge.cfg.name.as_str();
        assert!(network::bridge_ready(name), "bridge and its nft table are there");
        let addresses = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["addr", "show", "dev", name])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        assert!(addresses.contains("10.213.9.1/24"), "{addresses}");
        assert!(addresses.contains("fd00:213:9::1/64"), "{addresses}");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap()
                .trim(),
            "1"
        );
        let nat = nft_list(&["table", "ip", name]).expect("NAT table");
        assert!(nat.contains("masquerade"), "{nat}");
        assert!(nft_list(&["table", "ip6", name]).is_some());
        assert_eq!(
            nat.matches("masquerade").count(),
            1,
            "rule duplicated by re-run"
        );

        let without_nat = BridgeConfig {
            nat_outbound: false,
            ..bridge.cfg.clone()
        };
        network::ensure_bridge(&without_nat).expect("ensure without NAT");
        assert!(
            nft_list(&["table", "ip", name]).is_none(),
            "NAT table left behind"
        );

        network::remove_bridge(&bridge.cfg).expect("remove");
        network::remove_bridge(&bridge.cfg).expect("remove again");
        assert!(!interface_exists_here(name));
        assert!(nft_list(&["table", "bridge", name]).is_none());
        assert!(!network::bridge_ready(name));
        // The link without its nft table is not ready either.
        network::ensure_bridge(&bridge.cfg).expect("ensure again");
        assert!(network::bridge_ready(name));
        let deleted = Command::new("nft").args(["delete", "table", "bridge", name]).status();
        assert!(deleted.unwrap().success());
        assert!(interface_exists_here(name));
        assert!(!network::bridge_ready(name));
        network::ensure_bridge(&bridge.cfg).expect("ensure again");
        assert!(network::bridge_ready(name));
    });
}

#[test]
fn nat_lets_ves_reach_beyond_the_node() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(10, true);
        let ve = bridge.attach_ve(5);
        // "The internet": a netns behind the node's uplink that has no
        // route back to the VE subnet, so replies only come via masquerade.
        let internet = Netns::new();
        let uplink = unique("up");
        network_script(&format!(
            "link add {uplink} type veth peer name eth0 netns {}\n\
             addr add 10.214.10.1/24 dev {uplink}\n\
             link set {uplink} up\n",
            internet.path().display()
        ));
        internet.sh_ok(
            "ip link set lo up && ip addr add 10.214.10.2/24 dev eth0 && ip link set eth0 up",
        );
        let listener = run_in_netns(internet.path(), || TcpListener::bind("10.214.10.2:8081"))
            .unwrap()
            .expect("listen");
        let server = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
        ve.netns.sh_ok("nc -w 3 10.214.10.2 8081 </dev/null");
        let peer = server.join().unwrap().expect("accept");
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(Ipv4Addr::new(10, 214, 10, 1)),
            "not masqueraded"
        );
    });
}

#[test]
fn update_addresses_moves_a_running_ve() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(11, false);
        let mut ve = bridge.attach_ve(5);
        let client = bridge.client(100);
        assert!(client.ping(&bridge.ipv4(5).to_string()));
        let mut changed = ve.ve.clone();
        changed.ipv4 = vec![(bridge.ipv4(50), 24)];
        changed.ipv6 = vec![(bridge.ipv6(50), 64)];
        network::update_addresses(&bridge.cfg, &changed, ve.netns.path()).expect("update");
        ve.ve = changed;
        assert!(
            client.ping(&bridge.ipv4(50).to_string()),
            "new IPv4 unreachable"
        );
        assert!(
            client.ping(&bridge.ipv6(50).to_string()),
            "new IPv6 unreachable"
        );
        assert!(
            !client.ping(&bridge.ipv4(5).to_string()),
            "old address still answers"
        );
        // The VE may not reclaim its old address behind our back.
        ve.netns
            .sh_ok(&format!("ip addr add {}/24 dev eth0", bridge.ipv4(5)));
        assert!(
            !client.ping(&bridge.ipv4(5).to_string()),
            "old address passes the rules"
        );
    });
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    on_fresh_node(|_node| {
        let bridge = TestBridge::new(12, false);
        let netns = Netns::new();
        let good = bridge.ve_network(&unique("ve"), 5);
        let ifname = host_ifname_for_ve(&good.ve_id);
        let table = ["table", "bridge", bridge.cfg.name.as_str()];
        let rules_before = nft_list(&table).unwrap();
        let mut messages = Vec::new();

        let mut bad_prefix = good.clone();
        bad_prefix.ipv4[0].1 = 33;
        let mut duplicate = good.clone();
        duplicate.ipv4.push(duplicate.ipv4[0]);
        let mut far_gateway = good.clone();
        far_gateway.ipv4_gateway = Some(Ipv4Addr::new(10, 99, 0, 1));
        let mut bad_id = good.clone();
        bad_id.ve_id = "web 1".into();
        for bad in [bad_prefix, duplicate, far_gateway, bad_id] {
            let error = network::attach(&bridge.cfg, &bad, netns.path()).unwrap_err();
            assert!(matches!(error, NetworkError::InvalidVe { .. }), "{error}");
            messages.push(error.to_string());
        }

        let error =
            network::attach(&bridge.cfg, &good, Path::new("/proc/999999999/ns/net")).unwrap_err();
        assert!(
            matches!(error, NetworkError::NetnsMissing { .. }),
            "{error}"
        );
        messages.push(error.to_string());
        // Exists but is no netns: fails in the kernel, rolled back.
        let error = network::attach(&bridge.cfg, &good, Path::new("/tmp")).unwrap_err();
        assert!(
            error.to_string().contains(&ifname),
            "error names the veth: {error}"
        );
        messages.push(error.to_string());

        let missing = BridgeConfig {
            name: unique("vzx"),
            ..bridge.cfg.clone()
        };
        let error = network::attach(&missing, &good, netns.path()).unwrap_err();
        assert!(
            matches!(error, NetworkError::BridgeMissing { .. }),
            "{error}"
        );
        messages.push(error.to_string());
        let bad_name = BridgeConfig {
            name: "br;flush ruleset".into(),
            ..bridge.cfg.clone()
        };
        let error = network::ensure_bridge(&bad_name).unwrap_err();
        assert!(
            matches!(error, NetworkError::InvalidBridge { .. }),
            "{error}"
        );
        messages.push(error.to_string());
        let error = network::attach(&bad_name, &good, netns.path()).unwrap_err();
        assert!(
            matches!(error, NetworkError::InvalidBridge { .. }),
            "{error}"
        );

        // An interface that is not a bridge is neither reused nor deleted.
        let dummy = unique("dm");
        network_script(&format!("link add {dummy} type veth peer name {dummy}p\n"));
        let not_bridge = BridgeConfig {
            name: dummy.clone(),
            ..bridge.cfg.clone()
        };
        let error = network::ensure_bridge(&not_bridge).unwrap_err();
        assert!(matches!(error, NetworkError::NotABridge { .. }), "{error}");
        messages.push(error.to_string());
        let error = network::remove_bridge(&not_bridge).unwrap_err();
        assert!(matches!(error, NetworkError::NotABridge { .. }), "{error}");
        assert!(interface_exists_here(&dummy));

        let error = network::interface_stats(&good.ve_id).unwrap_err();
        assert!(matches!(error, NetworkError::NotAttached { .. }), "{error}");
        messages.push(error.to_string());

        assert!(
            !interface_exists_here(&ifname),
            "a refused attach left a veth"
        );
        assert_eq!(
            nft_list(&table).unwrap(),
            rules_before,
            "a refused attach changed the rules"
        );
        for message in &messages {
            println!("refused: {message}");
            assert!(message.starts_with(char::is_lowercase), "{message}");
        }
        // The netns stays usable for a correct attach.
        network::attach(&bridge.cfg, &good, netns.path()).expect("attach after refusals");
        network::detach(&bridge.cfg, &good.ve_id).expect("detach");
    });
}

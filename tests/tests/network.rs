//! VE networking on a node: VE to VE over the bridge, clients reach VE
//! services, and a VE can neither take another VE's address or MAC nor
//! sniff its traffic.

use system_tests::TestNode;

#[test]
fn ves_reach_each_other_and_clients_reach_their_services() {
    let mut node = TestNode::new();
    node.busybox_ve("neta", "10.213.0.21/24", &[]);
    node.busybox_ve("netb", "10.213.0.22/24", &[]);
    let (code, out, err) = node.exec("neta", "ping -c 2 -W 2 10.213.0.22");
    assert_eq!(code, 0, "VE to VE: {out}{err}");
    let (code, out, _) = node.exec("netb", "wget -qO- http://10.213.0.21/");
    assert_eq!(code, 0);
    assert!(out.contains("busybox VE"), "{out}");
    // The default gateway is the node's bridge.
    let (code, _, _) = node.exec("neta", "ping -c 1 -W 2 10.213.0.1");
    assert_eq!(code, 0, "gateway unreachable");

    let client = node.client("10.213.0.200/24");
    let out = node.in_client(&client, "wget -qO- -T 5 http://10.213.0.21/ || busybox wget -qO- -T 5 http://10.213.0.21/");
    assert!(String::from_utf8_lossy(&out.stdout).contains("busybox VE"), "client to VE http: {:?}", out);

    // The VE's MAC is the one derived from its name, and stable.
    let (_, mac, _) = node.exec("neta", "cat /sys/class/net/eth0/address");
    let expected = node_agent::network::mac_for_ve("neta");
    let expected = expected.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    assert_eq!(mac.trim(), expected);
}

#[test]
fn a_ve_cannot_take_another_ves_address_or_mac() {
    let mut node = TestNode::new();
    node.busybox_ve("victim", "10.213.0.31/24", &[]);
    node.busybox_ve("thief", "10.213.0.32/24", &[]);
    let client = node.client("10.213.0.201/24");
    let out = node.in_client(&client, "ping -c 1 -W 2 10.213.0.32");
    assert!(out.status.success(), "baseline ping failed");

    // Root in the thief VE switches to the victim's IP.
    let (code, _, err) = node.exec("thief", "ip addr flush dev eth0 && ip addr add 10.213.0.31/24 dev eth0 && ip route add default via 10.213.0.1");
    assert_eq!(code, 0, "root in a VE may change its own interface: {err}");
    let (code, _, _) = node.exec("thief", "ping -c 2 -W 1 10.213.0.201");
    assert_ne!(code, 0, "traffic from a stolen IP got through");
    // The victim still answers from its own address.
    let out = node.in_client(&client, "ip neigh flush all; ping -c 2 -W 2 10.213.0.31");
    assert!(out.status.success(), "victim lost its address");

    // Now the victim's MAC as well.
    let (_, victim_mac, _) = node.exec("victim", "cat /sys/class/net/eth0/address");
    let (code, _, err) = node.exec(
        "thief",
        &format!("ip link set eth0 down; ip link set eth0 address {}; ip link set eth0 up; ip addr add 10.213.0.32/24 dev eth0 2>/dev/null; true", victim_mac.trim()),
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = node.exec("thief", "ping -c 2 -W 1 10.213.0.201");
    assert_ne!(code, 0, "traffic from a stolen MAC got through");
    let out = node.in_client(&client, "ip neigh flush all; ping -c 2 -W 2 10.213.0.31");
    assert!(out.status.success(), "victim unreachable after the MAC theft attempt");
}

#[test]
fn a_ve_cannot_sniff_other_ves_traffic() {
    let mut node = TestNode::new();
    node.busybox_ve("talker", "10.213.0.41/24", &[]);
    node.busybox_ve("sniffer", "10.213.0.42/24", &[]);
    let client = node.client("10.213.0.202/24");
    // Let the bridge learn every address, then go promiscuous.
    node.exec("talker", "ping -c 1 -W 2 10.213.0.202");
    node.exec("sniffer", "ping -c 1 -W 2 10.213.0.202; ip link set eth0 promisc on");
    let rx = |node: &TestNode| -> u64 {
        let (_, out, _) = node.exec("sniffer", "cat /sys/class/net/eth0/statistics/rx_bytes");
        out.trim().parse().unwrap()
    };
    let before = rx(&node);
    // Several MB of unicast between the talker and the client.
    for _ in 0..5 {
        let out = node.in_client(&client, "wget -qO /dev/null http://10.213.0.41/ ; true");
        assert!(out.status.success());
    }
    node.in_client(&client, "(timeout 20 nc -l 9000 >/dev/null 2>&1 &) ; sleep 0.3");
    node.exec("talker", "dd if=/dev/zero bs=1M count=4 2>/dev/null | nc -w 3 10.213.0.202 9000 ; true");
    let after = rx(&node);
    assert!(after - before < 64 * 1024, "the sniffer received {} bytes of others' traffic", after - before);
}

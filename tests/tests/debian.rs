//! A Debian 12 VE as a customer gets it: root over ssh from another machine
//! (a client network namespace), by key and by password, its own limits in
//! `free` and `nproc`, and sshd back after a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{sh, wait_for, NodeAgent, TestNode};

fn ssh(node: &TestNode, client: &str, key: &Path, ip: &str, command: &str) -> std::process::Output {
    node.in_client(
        client,
        &format!(
            "ssh -i {} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o ConnectTimeout=3 -o LogLevel=ERROR root@{ip} '{command}'",
            key.display()
        ),
    )
}

fn wait_for_ssh(node: &TestNode, client: &str, key: &Path, ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = ssh(node, client, key, ip, "true");
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "sshd never answered: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn debian_ve_serves_ssh_to_a_client_and_shows_its_own_limits() {
    let mut node = TestNode::new();
    system_tests::ensure_template("debian12");
    let key = node.dir.join("id_ed25519");
    let out = sh(&format!("ssh-keygen -q -t ed25519 -N '' -C test -f {}", key.display()));
    assert!(out.status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    node.vectl_ok(&[
        "create", "deb1", "--template", "debian12", "--ip", "10.213.0.70/24", "--memory", "512M",
        "--cpus", "1", "--disk", "2G", "--ssh-key", public.trim(), "--start",
    ]);
    let client = node.client("10.213.0.203/24");
    wait_for_ssh(&node, &client, &key, "10.213.0.70");

    let out = ssh(&node, &client, &key, "10.213.0.70", "id -u; hostname; nproc; free -m | awk \"/Mem:/{print \\$2}\"; . /etc/os-release; echo $VERSION_CODENAME");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"0"), "{text}");
    assert_eq!(lines.get(1), Some(&"deb1"));
    assert_eq!(lines.get(2), Some(&"1"), "nproc shows the VE's cpus: {text}");
    let total_mib: u64 = lines.get(3).and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    assert!((500..=512).contains(&total_mib), "free shows the VE's memory: {text}");
    assert_eq!(lines.get(4), Some(&"bookworm"));

    // Every VE gets its own sshd host key, generated at first boot.
    let out = ssh(&node, &client, &key, "10.213.0.70", "cat /etc/ssh/ssh_host_ed25519_key.pub");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ssh-ed25519 "));

    // sshd comes back after a restart.
    node.vectl_ok(&["restart", "deb1", "--timeout", "30"]);
    wait_for_ssh(&node, &client, &key, "10.213.0.70");
    let out = ssh(&node, &client, &key, "10.213.0.70", "pidof sshd >/dev/null && echo up");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "up");

    // The customer reboots and powers off from inside; the node agent obeys.
    let _agent = NodeAgent::start(&node);
    let before = node.init_pid("deb1").expect("running");
    node.exec("deb1", "reboot");
    wait_for("the VE to come back from its reboot", Duration::from_secs(90), || matches!(node.init_pid("deb1"), Some(p) if p != before));
    wait_for_ssh(&node, &client, &key, "10.213.0.70");
    node.exec("deb1", "poweroff");
    wait_for("the VE to power off", Duration::from_secs(90), || node.init_pid("deb1").is_none());
    let info: serde_json::Value = serde_json::from_str(&node.vectl_ok(&["show", "deb1"])).unwrap();
    assert_eq!(info["status"], "stopped");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node.init_pid("deb1"), None, "a powered-off VE came back");
}


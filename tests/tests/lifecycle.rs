//! VE lifecycle through `vectl`, and its error cases: bad input gets a clear
//! error and changes nothing.

use system_tests::TestNode;

fn status_of(node: &TestNode, name: &str) -> String {
    let out = node.vectl_ok(&["show", name]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    info["status"].as_str().unwrap().to_string()
}

#[test]
fn create_start_exec_stop_restart_destroy() {
    let node = TestNode::new();
    node.busybox_ve("life1", "10.213.0.10/24", &["--hostname", "life1.example"]);
    assert_eq!(status_of(&node, "life1"), "running");

    let (code, out, err) = node.exec("life1", "hostname; id -u; cat /etc/hostname; echo $$");
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "life1.example");
    assert_eq!(lines[1], "0", "root inside the VE");
    assert_eq!(lines[2], "life1.example");

    // The VE's init is pid 1 of its own pid namespace.
    let (_, out, _) = node.exec("life1", "cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(out.contains("init"), "pid 1 is the template's init: {out}");

    // Exit codes come back.
    let (code, _, _) = node.exec("life1", "exit 7");
    assert_eq!(code, 7);

    let list = node.vectl_ok(&["list"]);
    assert!(list.contains("life1") && list.contains("running"), "{list}");

    // Data written survives a restart (it lives in the VE's disk image).
    node.exec("life1", "echo kept > /root/data; sync");
    node.vectl_ok(&["stop", "life1", "--timeout", "10"]);
    assert_eq!(status_of(&node, "life1"), "stopped");
    let out = node.vectl(&["exec", "life1", "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));

    node.vectl_ok(&["start", "life1"]);
    let (_, out, _) = node.exec("life1", "cat /root/data");
    assert_eq!(out.trim(), "kept");
    node.vectl_ok(&["restart", "life1", "--timeout", "10"]);
    assert_eq!(status_of(&node, "life1"), "running");
    let (_, out, _) = node.exec("life1", "cat /root/data");
    assert_eq!(out.trim(), "kept");

    node.vectl_ok(&["destroy", "--force", "life1"]);
    let out = node.vectl(&["show", "life1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(!node.dir.join("state/ves/life1").exists());
}

fn assert_fails_with(node: &TestNode, args: &[&str], message: &str) {
    let out = node.vectl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vectl {args:?} should fail");
    assert!(stderr.contains(message), "vectl {args:?}: expected {message:?} in {stderr:?}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let node = TestNode::new();
    system_tests::ensure_template("busybox");
    assert_fails_with(&node, &["start", "ghost"], "VE ghost does not exist");
    assert_fails_with(&node, &["stop", "ghost"], "does not exist");
    assert_fails_with(&node, &["destroy", "ghost"], "does not exist");
    assert_fails_with(&node, &["exec", "ghost", "--", "true"], "does not exist");
    assert_fails_with(&node, &["create", "Bad_Name", "-t", "busybox"], "invalid VE name");
    assert_fails_with(&node, &["create", "x1", "-t", "nosuchtemplate"], "nosuchtemplate");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--memory", "1K"], "memory must be at least");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--memory", "lots"], "invalid size");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--cpus", "1000"], "CPUs");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--pids", "1"], "pids must be at least");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--disk", "1M"], "disk must be at least");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--ip", "10.213.0.300/24"], "invalid address");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--ip", "192.0.2.7/24"], "not in the node's VE subnet");
    assert_fails_with(&node, &["create", "x1", "-t", "busybox", "--ssh-key", "not a key"], "invalid ssh key");
    // Nothing of those attempts was left behind.
    let ves: serde_json::Value = serde_json::from_str(&node.vectl_ok(&["list", "--json"])).unwrap();
    assert_eq!(ves.as_array().unwrap().len(), 0, "{ves}");
    assert!(!node.dir.join("state/ves/x1").exists());

    node.busybox_ve("orig", "10.213.0.20/24", &[]);
    let before = node.vectl_ok(&["show", "orig"]);
    assert_fails_with(&node, &["create", "orig", "-t", "busybox"], "VE orig already exists");
    assert_fails_with(&node, &["create", "other", "-t", "busybox", "--ip", "10.213.0.20/24"], "already used by VE orig");
    assert_fails_with(&node, &["start", "orig"], "is running");
    assert_fails_with(&node, &["destroy", "orig"], "is running");
    assert_fails_with(&node, &["set", "orig", "--memory", "1K"], "memory must be at least");
    assert_fails_with(&node, &["set", "orig", "--disk", "32M"], "cannot shrink");
    let after = node.vectl_ok(&["show", "orig"]);
    let strip = |s: &str| -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["usage"] = serde_json::Value::Null;
        v
    };
    assert_eq!(strip(&before), strip(&after), "failed calls changed the VE");

    // A broken node config is a clear error, not a crash.
    let bad = node.dir.join("bad.toml");
    std::fs::write(&bad, "state_dir = 5\n").unwrap();
    let out = node.vectl(&["--config", bad.to_str().unwrap(), "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is invalid"));
}

#[test]
fn limits_change_on_a_running_ve() {
    let node = TestNode::new();
    node.busybox_ve("lim1", "10.213.0.30/24", &[]);
    let cgroup = format!("/sys/fs/cgroup/memory/{}/lim1/memory.limit_in_bytes", node.cgroup_parent);
    assert_eq!(std::fs::read_to_string(&cgroup).unwrap().trim(), (128u64 << 20).to_string());
    node.vectl_ok(&["set", "lim1", "--memory", "256M", "--pids", "200"]);
    assert_eq!(std::fs::read_to_string(&cgroup).unwrap().trim(), (256u64 << 20).to_string());
    let pids = format!("/sys/fs/cgroup/pids/{}/lim1/pids.max", node.cgroup_parent);
    assert_eq!(std::fs::read_to_string(pids).unwrap().trim(), "200");
    // Disks grow (online ext4 resize needs CAP_SYS_RESOURCE, which this
    // machine's root lacks, so grow it stopped): df inside sees about 128M.
    node.vectl_ok(&["stop", "lim1", "--timeout", "10"]);
    node.vectl_ok(&["set", "lim1", "--disk", "128M"]);
    node.vectl_ok(&["start", "lim1"]);
    let (_, out, _) = node.exec("lim1", "df -k / | tail -1 | awk '{print $2}'");
    let kib: u64 = out.trim().parse().unwrap_or(0);
    assert!(kib > 100 * 1024, "disk did not grow: {out}");
    // The VE's own view of its memory follows the limit.
    let (_, out, _) = node.exec("lim1", "grep MemTotal /proc/meminfo");
    assert!(out.contains(&(256 * 1024).to_string()), "meminfo: {out}");
}

#[test]
fn enter_gives_a_real_terminal_and_root_password_is_set() {
    let node = TestNode::new();
    system_tests::ensure_template("busybox");
    // The root password comes on stdin, never on the command line.
    let mut create = node.vectl_command(&[
        "create", "tty1", "-t", "busybox", "--ip", "10.213.0.80/24", "--ip6", "fd00:213::80/64",
        "--disk", "64M", "--root-password-stdin", "--start",
    ]);
    create.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = create.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"s3cret-Pass\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, shadow, _) = node.exec("tty1", "grep ^root: /etc/shadow");
    assert!(shadow.starts_with("root:$6$"), "{shadow}");
    assert!(!shadow.contains("s3cret"));

    // IPv6 works next to IPv4.
    let (_, addrs, _) = node.exec("tty1", "ip -6 addr show dev eth0");
    assert!(addrs.contains("fd00:213::80/64"), "{addrs}");

    // `vectl enter` under a pseudo-terminal: the shell inside has a tty.
    let vectl = system_tests::workspace_binary("vectl");
    let script = format!(
        "printf 'tty; echo marker-$((6*7)); exit\\n' | VZ_CONFIG={} nsenter --net=/run/netns/{} script -qec '{} enter tty1' /dev/null",
        node.config_path.display(),
        node.netns,
        vectl.display()
    );
    let out = system_tests::sh(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "no tty inside: {text}");
    assert!(text.contains("marker-42"), "{text}");
}

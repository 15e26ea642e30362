//! A VE's limits hold against a root user who tries to exceed them, and
//! exceeding them hurts only that VE.

use system_tests::TestNode;

fn cgroup_file(node: &TestNode, controller: &str, ve: &str, file: &str) -> String {
    let path = format!("/sys/fs/cgroup/{controller}/{}/{ve}/{file}", node.cgroup_parent);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let node = TestNode::new();
    node.busybox_ve("bomb", "10.213.0.11/24", &["--pids", "64"]);
    // Start far more sleepers than allowed; forks past the limit fail.
    let (_, out, _) = node.exec(
        "bomb",
        "ok=0; fail=0; for i in $(seq 150); do if sleep 60 </dev/null >/dev/null 2>&1 & then ok=$((ok+1)); else fail=$((fail+1)); fi; done 2>/dev/null; echo $ok",
    );
    let current: u64 = cgroup_file(&node, "pids", "bomb", "pids.current").trim().parse().unwrap();
    assert!(current <= 64, "pids.current {current} above the limit");
    let events = cgroup_file(&node, "pids", "bomb", "pids.events");
    assert!(!events.contains("max 0"), "the limit was never hit: {events} (started {out})");
    // The VE is still alive and usable once the sleepers are gone.
    node.exec("bomb", "kill $(pidof sleep) 2>/dev/null; true");
    let (code, _, _) = node.exec("bomb", "true");
    assert_eq!(code, 0);
}

#[test]
fn memory_hog_is_oom_killed_inside_its_ve_only() {
    let node = TestNode::new();
    node.busybox_ve("hog", "10.213.0.12/24", &["--memory", "64M"]);
    node.busybox_ve("bystander", "10.213.0.13/24", &[]);
    // A string that doubles forever: it grows until killed.
    let (code, _, _) = node.exec("hog", "awk 'BEGIN { s = \"x\"; for (;;) s = s s }'");
    assert_ne!(code, 0, "the hog was not stopped");
    let oom = cgroup_file(&node, "memory", "hog", "memory.oom_control");
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "no OOM kill recorded: {oom}");
    // The VE itself and its neighbour keep running.
    let (code, _, _) = node.exec("hog", "true");
    assert_eq!(code, 0, "the hog's VE died");
    let (code, _, _) = node.exec("bystander", "true");
    assert_eq!(code, 0);
    let max: u64 = cgroup_file(&node, "memory", "hog", "memory.max_usage_in_bytes").trim().parse().unwrap();
    assert!(max <= 64 << 20, "usage {max} went past the limit");
}

#[test]
fn disk_fill_stops_at_the_quota() {
    let node = TestNode::new();
    node.busybox_ve("filler", "10.213.0.14/24", &["--disk", "64M"]);
    let (code, _, err) = node.exec("filler", "dd if=/dev/zero of=/root/fill bs=1M count=200");
    assert_ne!(code, 0, "writing past the quota succeeded");
    assert!(err.contains("No space left"), "{err}");
    let (_, out, _) = node.exec("filler", "ls -l /root/fill | awk '{print $5}'");
    let written: u64 = out.trim().parse().unwrap();
    assert!(written <= 64 << 20, "wrote {written} bytes into a 64M disk");
    // The image on the host never grows past its size.
    let image = node.dir.join("state/ves/filler/disk.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 << 20);
    // Root inside can free space again: the VE is not broken.
    let (code, _, _) = node.exec("filler", "rm /root/fill && echo ok > /root/after");
    assert_eq!(code, 0);
}

#[test]
fn cpu_quota_caps_usage() {
    let node = TestNode::new();
    node.busybox_ve("spin", "10.213.0.15/24", &["--cpus", "0.2"]);
    assert_eq!(cgroup_file(&node, "cpu", "spin", "cpu.cfs_quota_us").trim(), "20000");
    assert_eq!(cgroup_file(&node, "cpu", "spin", "cpu.cfs_period_us").trim(), "100000");
    // Two busy loops for a while: the kernel throttles the VE.
    node.exec("spin", "(while :; do :; done) & (while :; do :; done) & sleep 2; kill %1 %2");
    let stat = cgroup_file(&node, "cpu", "spin", "cpu.stat");
    let throttled: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(throttled > 0, "the VE was never throttled: {stat}");
}

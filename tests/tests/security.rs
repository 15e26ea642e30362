//! Root inside a VE attacks the host and its neighbours; every attack fails.
//! (Syscall-level attacks on the runtime itself live in ve-runtime/tests.)

use system_tests::TestNode;

/// Runs `script` in the VE and asserts it fails; returns its stderr.
fn must_fail(node: &TestNode, ve: &str, what: &str, script: &str) -> String {
    let (code, out, err) = node.exec(ve, script);
    assert_ne!(code, 0, "{what} succeeded from inside a VE: {out}{err}");
    err
}

#[test]
fn root_in_a_ve_cannot_reach_the_host_or_other_ves() {
    let node = TestNode::new();
    node.busybox_ve("evil", "10.213.0.51/24", &[]);
    node.busybox_ve("good", "10.213.0.52/24", &[]);
    node.exec("good", "echo secret-of-good > /root/secret; (sleep 300 </dev/null >/dev/null 2>&1 &) ; true");

    // Kernel modules.
    must_fail(&node, "evil", "insmod", "echo garbage > /tmp/x.ko; insmod /tmp/x.ko");
    must_fail(&node, "evil", "modprobe", "modprobe -q dummy");
    // Host disks: no block devices, cannot create them, cannot mount.
    must_fail(&node, "evil", "mknod a block device and read it", "mknod /tmp/sda b 8 0 && head -c 512 /tmp/sda > /dev/null");
    must_fail(&node, "evil", "mknod the host's root disk", "mknod /tmp/vda b 253 0 && head -c 512 /tmp/vda > /dev/null");
    must_fail(&node, "evil", "mount a host disk", "mkdir -p /mnt/h && mount -t ext4 /dev/vda /mnt/h");
    must_fail(&node, "evil", "remount /proc/sys writable", "mount -o remount,rw /proc/sys && echo 1 > /proc/sys/kernel/sysrq");
    must_fail(&node, "evil", "write /proc/sys", "echo 65535 > /proc/sys/kernel/pid_max");
    must_fail(&node, "evil", "remount /sys writable", "mount -o remount,rw /sys && touch /sys/kernel/x");
    must_fail(&node, "evil", "mount a fresh sysfs writable", "mkdir -p /mnt/s && mount -t sysfs sysfs /mnt/s && echo 1 > /mnt/s/kernel/profiling");
    must_fail(&node, "evil", "sysrq", "echo b > /proc/sysrq-trigger");
    must_fail(&node, "evil", "read kernel memory", "head -c 16 /proc/kcore >/dev/null && test -s /proc/kcore");
    must_fail(&node, "evil", "read /dev/mem", "head -c 16 /dev/mem > /dev/null");
    // The host's identity and clock.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    node.exec("evil", "hostname pwned");
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(), host_name, "the host's hostname changed");
    // busybox date reports a refused clock change but exits 0: check the clock.
    let (_, out, err) = node.exec("evil", "date -s '2001-01-01 00:00:00' >/dev/null; date +%Y");
    assert_ne!(out.trim(), "2001", "the VE set the clock: {err}");
    assert!(err.contains("can't set date"), "{err}");
    // Host processes and the other VE's processes are invisible and unreachable.
    let host_pid = std::process::id();
    must_fail(&node, "evil", "signal a host process", &format!("kill -0 {host_pid}"));
    let (_, ps, _) = node.exec("evil", "ps -o pid,args");
    assert!(!ps.contains("sleep 300"), "sees the other VE's processes: {ps}");
    assert!(!ps.contains("nsenter") && !ps.contains("cargo"), "sees host processes: {ps}");
    let (_, out, _) = node.exec("evil", "ls /proc | grep -c '^[0-9]'");
    assert!(out.trim().parse::<u32>().unwrap() < 20, "too many processes visible: {out}");
    // The other VE's files.
    let (_, out, _) = node.exec("evil", "grep -rs secret-of-good / --exclude-dir=proc --exclude-dir=sys 2>/dev/null | head -1");
    assert!(out.trim().is_empty(), "read the other VE's file: {out}");
    must_fail(&node, "evil", "escape through /proc/1/root", "ls /proc/1/root/../../../../ | grep -q vzt-");
    // chroot tricks stay inside the VE's root.
    let (_, out, _) = node.exec("evil", "mkdir -p /tmp/c && chroot /tmp/c /bin/sh -c 'cd ../../..; ls /' 2>&1; true");
    assert!(!out.contains("vzt-"), "{out}");
    // Raising its own limits: cgroup files are read-only inside.
    must_fail(&node, "evil", "raise its memory limit", "echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes");
    must_fail(&node, "evil", "raise its pids limit", "for f in /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids/*/pids.max; do echo max > $f || exit 1; done");
    // cgroup release_agent escape (CVE-2022-0492), even from a nested user namespace.
    // A VE may mount its own cgroup subtree (its cgroup namespace makes that
    // the root, as LXC and systemd inside expect), but cannot raise its limits
    // through it nor reach the hierarchy's release_agent.
    node.exec("evil", "mkdir -p /mnt/cg && mount -t cgroup -o memory cgroup /mnt/cg");
    must_fail(&node, "evil", "raise the memory limit through cgroupfs", "echo -1 > /mnt/cg/memory.limit_in_bytes");
    must_fail(&node, "evil", "set release_agent", "echo /tmp/x > /mnt/cg/release_agent");
    must_fail(
        &node,
        "evil",
        "release_agent from a nested namespace",
        "unshare -Urm sh -c 'mkdir -p /tmp/cg && mount -t cgroup -o memory cgroup /tmp/cg && echo /tmp/x > /tmp/cg/release_agent'",
    );
    // The kernel log and kernel memory.
    must_fail(&node, "evil", "read the kernel log", "dmesg | head -1 | grep -q .");
    must_fail(&node, "evil", "read /dev/kmsg", "head -c 1 /dev/kmsg");
    must_fail(&node, "evil", "write core_pattern", "echo '|/tmp/x' > /proc/sys/kernel/core_pattern");
    must_fail(&node, "evil", "write uevent_helper", "echo /tmp/x > /sys/kernel/uevent_helper");
    // Memory through a tmpfs is charged to the VE: the host is not filled.
    let (_, _, _) = node.exec("evil", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=400 2>/dev/null; true");
    let usage: u64 = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/{}/evil/memory.max_usage_in_bytes", node.cgroup_parent))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(usage <= 128 << 20, "tmpfs use escaped the memory limit: {usage}");
    node.exec("evil", "rm -f /dev/shm/fill");
    // Network: cannot take over the host's addresses or see host interfaces.
    let (_, links, _) = node.exec("evil", "ls /sys/class/net");
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["eth0", "lo"], "{links}");
    // Nothing above hurt the neighbour.
    let (code, out, _) = node.exec("good", "cat /root/secret");
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "secret-of-good");
}

//! cgroup limits, uid mapping, hostname, exec and live updates, against the real kernel.

mod common;

use common::{TestVe, ROOT_HOST_ID};
use std::os::unix::fs::MetadataExt;

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn uid_map_is_applied() {
    let ve = TestVe::new("uidmap", |_| {});
    ve.create_and_start();
    let out = ve.sh("id -u; id -g; cat /proc/self/uid_map");
    assert!(out.success, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "0");
    assert_eq!(lines[1], "0");
    // The VE runs in a nested, identity-mapped user namespace (it locks the
    // mounts); 65536 ids are mapped.
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        vec!["0", "0", "65536"]
    );
    // Seen from the host, the container's root is the mapped uid.
    let meta = std::fs::metadata(format!("/proc/{}", ve.init_pid())).unwrap();
    assert_eq!(meta.uid(), ROOT_HOST_ID);
    assert_eq!(meta.gid(), ROOT_HOST_ID);
}

#[test]
fn hostname_is_the_containers_and_the_host_keeps_its_own() {
    let host_before = nix::unistd::gethostname().unwrap();
    let ve = TestVe::new("uts", |_| {});
    ve.create_and_start();
    let out = ve.sh("hostname");
    assert_eq!(out.stdout.trim(), format!("ve-{}", ve.id));
    let out = ve.sh("hostname evil-rename && hostname");
    assert_eq!(out.stdout.trim(), "evil-rename", "{}", out.stderr);
    assert_eq!(nix::unistd::gethostname().unwrap(), host_before);
}

#[test]
fn exec_joins_the_containers_namespaces_and_cgroup() {
    let ve = TestVe::new("exec", |_| {});
    ve.create_and_start();
    let pid = ve.init_pid();
    let out = ve.sh("cat /proc/1/cmdline | tr '\\0' ' '; echo; for n in pid mnt net user uts ipc; do readlink /proc/self/ns/$n; done; echo $$");
    assert!(out.success, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0].trim(), "sleep 100000");
    for (line, ns) in lines[1..7]
        .iter()
        .zip(["pid", "mnt", "net", "user", "uts", "ipc"])
    {
        let init_ns = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_eq!(*line, init_ns.to_str().unwrap(), "{ns} namespace differs");
    }
    // exec'd processes count in the container's pids cgroup: the shell saw a small pid.
    assert!(lines[7].parse::<i32>().unwrap() < 100);
    // Exit codes come back.
    assert_eq!(ve.sh("exit 3").code, Some(3));
    // Env, cwd and user options.
    let out = ve.cli(&[
        "exec",
        "--env",
        "GREETING=hi",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        &ve.id,
        "sh",
        "-c",
        "echo $GREETING $(pwd) $(id -u)",
    ]);
    assert_eq!(out.stdout.trim(), "hi /tmp 1000", "{}", out.stderr);
    // A command that does not exist is a clear error.
    let out = ve.cli(&["exec", &ve.id, "no-such-command"]);
    assert!(
        !out.success && out.stderr.contains("no-such-command"),
        "{}",
        out.stderr
    );
}

#[test]
fn exec_with_a_tty_relays_the_terminal() {
    let ve = TestVe::new("exectty", |_| {});
    ve.create_and_start();
    let out = ve.cli(&["exec", "-t", &ve.id, "/bin/sh", "-c", "tty; echo tty-ok"]);
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("/dev/pts/"), "{}", out.stdout);
    assert!(out.stdout.contains("tty-ok"), "{}", out.stdout);
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let ve = TestVe::new("pids", |c| {
        c["linux"]["resources"]["pids"]["limit"] = serde_json::json!(20)
    });
    ve.create_and_start();
    assert_eq!(read(ve.cgroup_dir("pids").join("pids.max")), "20");
    let out = ve.sh("i=0; while [ $i -lt 60 ]; do sleep 1000 & i=$((i+1)); done 2>&1; echo done");
    assert!(
        out.stdout.contains("can't fork") || out.stderr.contains("can't fork"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    let current: u64 = read(ve.cgroup_dir("pids").join("pids.current"))
        .parse()
        .unwrap();
    assert!(current <= 20, "pids.current {current}");
    // The container still answers once the bomb is gone.
    assert!(ve.sh("pkill -f 'sleep 1000$'; true").success);
    assert_eq!(
        ve.runtime().state(&ve.id).unwrap().status,
        ve_runtime::Status::Running
    );
}

#[test]
fn memory_limit_oom_kills_only_inside() {
    let ve = TestVe::new("oom", |c| {
        c["linux"]["resources"]["memory"] =
            serde_json::json!({"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024});
    });
    ve.create_and_start();
    assert_eq!(
        read(ve.cgroup_dir("memory").join("memory.limit_in_bytes")),
        (32 * 1024 * 1024).to_string()
    );
    // dd fills a 200 MB buffer: far over the limit.
    let out = ve.sh("dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null; echo status=$?");
    assert!(
        out.stdout.contains("status=137"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    // Only the hog died: the init is alive, and so is this test process.
    assert_eq!(
        ve.runtime().state(&ve.id).unwrap().status,
        ve_runtime::Status::Running
    );
    let stats = ve.runtime().stats(&ve.id).unwrap();
    assert_eq!(stats.memory_limit_bytes, Some(32 * 1024 * 1024));
}

#[test]
fn cpu_limits_are_set() {
    let ve = TestVe::new("cpu", |c| {
        c["linux"]["resources"]["cpu"] =
            serde_json::json!({"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"});
    });
    ve.create_and_start();
    assert_eq!(read(ve.cgroup_dir("cpu").join("cpu.cfs_quota_us")), "50000");
    assert_eq!(
        read(ve.cgroup_dir("cpu").join("cpu.cfs_period_us")),
        "100000"
    );
    assert_eq!(read(ve.cgroup_dir("cpu").join("cpu.shares")), "512");
    assert_eq!(read(ve.cgroup_dir("cpuset").join("cpuset.cpus")), "0");
    // Also placed in the unified hierarchy of this hybrid host.
    let unified = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/unified/ve-runtime-test/{}/cgroup.procs",
        ve.id
    ));
    assert!(read(unified)
        .lines()
        .any(|p| p == ve.init_pid().to_string()));
}

#[test]
fn update_changes_limits_live() {
    let ve = TestVe::new("update", |_| {});
    ve.create_and_start();
    let out = ve.cli(&[
        "update",
        "--pids-limit",
        "77",
        "--memory",
        "67108864",
        "--cpu-quota",
        "20000",
        &ve.id,
    ]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(read(ve.cgroup_dir("pids").join("pids.max")), "77");
    assert_eq!(
        read(ve.cgroup_dir("memory").join("memory.limit_in_bytes")),
        "67108864"
    );
    assert_eq!(read(ve.cgroup_dir("cpu").join("cpu.cfs_quota_us")), "20000");
    // A resources file, and an unsupported key refused without changing anything.
    let file = ve.dir.path().join("res.json");
    std::fs::write(&file, r#"{"pids": {"limit": 88}}"#).unwrap();
    assert!(
        ve.cli(&["update", "--resources", file.to_str().unwrap(), &ve.id])
            .success
    );
    assert_eq!(read(ve.cgroup_dir("pids").join("pids.max")), "88");
    std::fs::write(&file, r#"{"pids": {"limit": 99}, "hugepageLimits": []}"#).unwrap();
    let out = ve.cli(&["update", "--resources", file.to_str().unwrap(), &ve.id]);
    assert!(
        !out.success && out.stderr.contains("hugepageLimits"),
        "{}",
        out.stderr
    );
    assert_eq!(read(ve.cgroup_dir("pids").join("pids.max")), "88");
    let stats = ve.runtime().stats(&ve.id).unwrap();
    assert_eq!(stats.pids_limit, Some(88));
    assert!(stats.pids_current >= 1);
}

#[test]
fn sysctl_rlimits_oom_score_and_devices_are_applied() {
    let ve = TestVe::new("settings", |c| {
        c["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
        c["process"]["oomScoreAdj"] = serde_json::json!(500);
        c["linux"]["devices"] =
            serde_json::json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]);
    });
    ve.create_and_start();
    let pid = ve.init_pid();
    assert_eq!(
        ve.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(),
        "1"
    );
    assert_eq!(read(format!("/proc/{pid}/oom_score_adj").into()), "500");
    let limits = read(format!("/proc/{pid}/limits").into());
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().collect::<Vec<_>>()[3..5],
        ["1024", "4096"]
    );
    let out = ve.sh("stat -c '%t:%T' /dev/fuse");
    assert_eq!(out.stdout.trim(), "a:e5", "{}", out.stderr);
}

#[test]
fn readonly_root_stays_readonly() {
    let ve = TestVe::new("roroot", |c| {
        c["root"]["readonly"] = serde_json::json!(true)
    });
    ve.create_and_start();
    assert!(!ve.sh("touch /newfile").success);
    let out = ve.cli(&["exec", &ve.id, "/bin/ve-attack", "remount_rw", "/"]);
    assert_eq!(
        out.code,
        Some(1),
        "the read-only root could be remounted: {}",
        out.stdout
    );
}

/// A network namespace prepared by the node agent (`ip netns add`), joined by path.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn joins_a_network_namespace_by_path() {
    let name = format!("vert-{}", std::process::id());
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success());
    let _netns = NetnsGuard(name.clone());
    let ve = TestVe::new("netns", |c| {
        let namespaces = c["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|n| n["type"] != "network");
        namespaces
            .push(serde_json::json!({"type": "network", "path": format!("/run/netns/{name}")}));
    });
    ve.create_and_start();
    let ours = std::fs::read_link(format!("/proc/{}/ns/net", ve.init_pid())).unwrap();
    let prepared = std::fs::metadata(format!("/run/netns/{name}")).unwrap();
    assert_eq!(ours.to_str().unwrap(), format!("net:[{}]", prepared.ino()));
    // sysfs of a host-owned netns cannot be mounted from the VE: it gets a read-only bind.
    assert!(ve.sh("ls /sys/class/net").success);
}

#[test]
fn a_file_bind_mounted_over_proc_meminfo_after_the_proc_mount() {
    let dir = tempfile::tempdir().unwrap();
    let view = dir.path().join("meminfo");
    std::fs::write(
        &view,
        "MemTotal:       262144 kB\nMemFree:        131072 kB\n",
    )
    .unwrap();
    let source = view.to_str().unwrap().to_string();
    let ve = TestVe::new("meminfo", |c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/proc/meminfo", "type": "bind", "source": source, "options": ["bind", "ro"]
        }));
    });
    ve.create_and_start();
    let out = ve.sh("head -1 /proc/meminfo; free | head -2");
    assert!(
        out.stdout.starts_with("MemTotal:       262144 kB"),
        "{}",
        out.stdout
    );
}

/// A loop device like the VE's disk, detached on drop.
struct LoopGuard(String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn block_io_throttle_applies_to_the_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * 1024 * 1024)
        .unwrap();
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let _loop = LoopGuard(device.clone());
    let rdev = std::fs::metadata(&device).unwrap().rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let ve = TestVe::new("blkio", |c| {
        c["linux"]["resources"]["blockIO"] = serde_json::json!({
            "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1048576}],
            "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 100}]
        });
    });
    ve.create_and_start();
    let read_bps = read(
        ve.cgroup_dir("blkio")
            .join("blkio.throttle.read_bps_device"),
    );
    assert!(
        read_bps.contains(&format!("{major}:{minor} 1048576")),
        "{read_bps}"
    );
    let write_iops = read(
        ve.cgroup_dir("blkio")
            .join("blkio.throttle.write_iops_device"),
    );
    assert!(
        write_iops.contains(&format!("{major}:{minor} 100")),
        "{write_iops}"
    );
}

#[test]
fn blkio_weight_is_refused_on_a_host_without_it() {
    // This host has no blkio.weight (no CFQ/BFQ): an error, never a silent no-op.
    if std::path::Path::new("/sys/fs/cgroup/blkio/blkio.weight").exists() {
        return;
    }
    let ve = TestVe::new("blkweight", |c| {
        c["linux"]["resources"]["blockIO"] = serde_json::json!({"weight": 500})
    });
    let out = ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert!(!out.success);
    assert!(out.stderr.contains("blkio weight"), "{}", out.stderr);
    assert!(!ve.root.join(&ve.id).exists());
    assert!(!ve.cgroup_dir("blkio").exists());
}

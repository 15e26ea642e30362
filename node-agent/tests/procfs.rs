//! The real `ve-procfs` daemon against real cgroup v1 controllers (needs root).
//!
//! Each test creates its own cgroup parent `vz-test-<pid>-<n>`, its own
//! mountpoint and processes; Drop guards kill, unmount and remove them even
//! when an assertion fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use node_agent::procfs::{proc_view_mounts, rebind_views};

const CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "cpuset", "pids", "blkio"];
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const MIB: u64 = 1024 * 1024;
/// Generous bound for the daemon to come up or react; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(20);

static NEXT_TEST: AtomicUsize = AtomicUsize::new(0);

fn unique_parent() -> String {
    format!(
        "vz-test-{}-{}",
        std::process::id(),
        NEXT_TEST.fetch_add(1, Ordering::Relaxed)
    )
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A VE-like cgroup `<parent>/<ve>` in every v1 controller; removed on drop
/// after killing whatever still runs in it.
struct VeCgroup {
    parent: String,
    ve_id: String,
}

impl VeCgroup {
    fn create(parent: &str, ve_id: &str, memory_limit: u64, cpus: &str) -> VeCgroup {
        let cgroup = VeCgroup {
            parent: parent.to_string(),
            ve_id: ve_id.to_string(),
        };
        for controller in CONTROLLERS {
            fs::create_dir_all(cgroup.dir(controller))
                .unwrap_or_else(|e| panic!("cannot create {controller} cgroup: {e}"));
        }
        // cpuset needs cpus and mems on every level before tasks can join.
        let root_cpuset = Path::new(CGROUP_ROOT).join("cpuset");
        let mems = fs::read_to_string(root_cpuset.join("cpuset.mems")).unwrap();
        let all_cpus = fs::read_to_string(root_cpuset.join("cpuset.cpus")).unwrap();
        let parent_cpuset = root_cpuset.join(parent);
        fs::write(parent_cpuset.join("cpuset.cpus"), all_cpus.trim()).unwrap();
        fs::write(parent_cpuset.join("cpuset.mems"), mems.trim()).unwrap();
        fs::write(cgroup.dir("cpuset").join("cpuset.cpus"), cpus).unwrap();
        fs::write(cgroup.dir("cpuset").join("cpuset.mems"), mems.trim()).unwrap();
        fs::write(
            cgroup.dir("memory").join("memory.limit_in_bytes"),
            memory_limit.to_string(),
        )
        .unwrap();
        fs::write(cgroup.dir("cpu").join("cpu.cfs_period_us"), "100000").unwrap();
        fs::write(cgroup.dir("cpu").join("cpu.cfs_quota_us"), "100000").unwrap();
        cgroup
    }

    fn dir(&self, controller: &str) -> PathBuf {
        Path::new(CGROUP_ROOT)
            .join(controller)
            .join(&self.parent)
            .join(&self.ve_id)
    }

    fn add(&self, pid: u32) {
        for controller in CONTROLLERS {
            fs::write(self.dir(controller).join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }

    fn kill_all(&self) {
        let procs = fs::read_to_string(self.dir("memory").join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|line| line.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the VE's cgroups (its processes must be gone).
    fn remove_ve(&self) {
        self.kill_all();
        for controller in CONTROLLERS {
            let dir = self.dir(controller);
            let deadline = Instant::now() + PATIENCE;
            // rmdir fails with EBUSY until killed tasks are reaped.
            while dir.exists() && fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for VeCgroup {
    fn drop(&mut self) {
        self.remove_ve();
        for controller in CONTROLLERS {
            let _ = fs::remove_dir(Path::new(CGROUP_ROOT).join(controller).join(&self.parent));
        }
    }
}

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `ve-procfs --foreground` daemon; stopped (SIGTERM) and its mount removed on drop.
struct Daemon {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl Daemon {
    fn start(mountpoint: &Path, parent: &str) -> Daemon {
        Daemon::start_with(mountpoint, parent, &[])
    }

    fn start_with(mountpoint: &Path, parent: &str, extra_args: &[&str]) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_ve-procfs"))
            .args(extra_args)
            .arg("--mountpoint")
            .arg(mountpoint)
            .arg("--cgroup-parent")
            .arg(parent)
            .arg("--foreground")
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start ve-procfs");
        let mut daemon = Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
        };
        wait_until("ve-procfs to mount", || {
            if let Some(Ok(Some(status))) = daemon.child.as_mut().map(|child| child.try_wait()) {
                panic!("ve-procfs exited early: {status}");
            }
            // Listed and answering: a crashed daemon's stale mount is listed but answers ENOTCONN.
            is_procfs_mount(mountpoint) && fs::metadata(mountpoint).is_ok()
        });
        daemon
    }

    /// Simulates a crash: SIGKILL, leaving the mount behind (ENOTCONN).
    fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + PATIENCE;
            while !matches!(child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_procfs_mount(&self.mountpoint) {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn is_procfs_mount(mountpoint: &Path) -> bool {
    let wanted = mountpoint.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            line.split_whitespace().nth(4) == Some(wanted.as_str()) && line.contains(" ve-procfs ")
        })
}

fn meminfo_field(meminfo: &str, name: &str) -> u64 {
    meminfo
        .lines()
        .find(|line| line.starts_with(&format!("{name}:")))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in meminfo:\n{meminfo}"))
}

fn first_host_cpu() -> String {
    let cpus =
        fs::read_to_string(Path::new(CGROUP_ROOT).join("cpuset").join("cpuset.cpus")).unwrap();
    cpus.trim().split([',', '-']).next().unwrap().to_string()
}

fn start_sleeper(cgroup: &VeCgroup) -> ChildGuard {
    let sleeper = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    cgroup.add(sleeper.pid());
    sleeper
}

#[test]
fn views_show_the_ve_limits_and_vanish_with_its_cgroup() {
    let parent = unique_parent();
    let cgroup = VeCgroup::create(&parent, "ve1", 256 * MIB, &first_host_cpu());
    let _sleeper = start_sleeper(&cgroup);
    let mount_dir = tempfile::tempdir().unwrap();
    let mountpoint = mount_dir.path().join("procfs");
    let daemon = Daemon::start(&mountpoint, &parent);
    let ve_dir = mountpoint.join("ve1");

    let entries: Vec<String> = fs::read_dir(&mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, vec!["ve1".to_string()]);

    let meminfo = fs::read_to_string(ve_dir.join("meminfo")).unwrap();
    assert_eq!(meminfo_field(&meminfo, "MemTotal"), 262_144);
    assert!(meminfo_field(&meminfo, "MemFree") <= 262_144);
    assert!(meminfo_field(&meminfo, "MemAvailable") <= 262_144);

    let cpuinfo = fs::read_to_string(ve_dir.join("cpuinfo")).unwrap();
    assert_eq!(
        cpuinfo
            .lines()
            .filter(|line| line.starts_with("processor"))
            .count(),
        1,
        "{cpuinfo}"
    );
    assert!(cpuinfo.starts_with("processor\t: 0\n"));

    let stat = fs::read_to_string(ve_dir.join("stat")).unwrap();
    assert!(stat.starts_with("cpu  "), "{stat}");
    assert!(
        stat.contains("\ncpu0 ") && !stat.contains("\ncpu1 "),
        "{stat}"
    );
    assert!(
        stat.contains("\nprocesses 1\n"),
        "one sleeper in the VE: {stat}"
    );

    let uptime = fs::read_to_string(ve_dir.join("uptime")).unwrap();
    let ve_uptime: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
    let host_uptime: f64 = fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        ve_uptime < host_uptime && ve_uptime < 600.0,
        "VE uptime {ve_uptime} must be since its sleeper started"
    );

    let loadavg = fs::read_to_string(ve_dir.join("loadavg")).unwrap();
    assert_eq!(loadavg.split_whitespace().count(), 5, "{loadavg}");
    assert!(
        loadavg.split_whitespace().nth(3).unwrap().ends_with("/1"),
        "one thread in the VE: {loadavg}"
    );
    assert!(fs::read_to_string(ve_dir.join("swaps"))
        .unwrap()
        .starts_with("Filename"));
    fs::read_to_string(ve_dir.join("diskstats")).unwrap();
    assert_eq!(
        fs::read_to_string(ve_dir.join("cpu_online")).unwrap(),
        "0\n"
    );

    // Read-only: no writes, no new files.
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(ve_dir.join("meminfo"))
        .is_err());
    assert!(fs::write(ve_dir.join("new"), "x").is_err());
    assert!(fs::read_to_string(mountpoint.join("no-such-ve").join("meminfo")).is_err());

    // A second daemon must refuse the live mountpoint rather than stack on it.
    let second = Command::new(env!("CARGO_BIN_EXE_ve-procfs"))
        .args(["--foreground", "--cgroup-parent", &parent, "--mountpoint"])
        .arg(&mountpoint)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already served"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    // procps free inside a mount namespace where meminfo is bind-mounted over /proc/meminfo.
    let source = proc_view_mounts(&mountpoint, "ve1")
        .into_iter()
        .find(|(_, target)| *target == "/proc/meminfo")
        .unwrap()
        .0;
    let free = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind '{}' /proc/meminfo && free -m",
            source.display()
        ))
        .output()
        .unwrap();
    assert!(
        free.status.success(),
        "free failed: {}",
        String::from_utf8_lossy(&free.stderr)
    );
    let free_out = String::from_utf8_lossy(&free.stdout);
    let total_mib: u64 = free_out
        .lines()
        .find(|line| line.starts_with("Mem:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|total| total.parse().ok())
        .unwrap_or_else(|| panic!("no Mem: line in {free_out}"));
    assert_eq!(total_mib, 256, "{free_out}");

    // The VE's directory exists exactly as long as its cgroup.
    cgroup.remove_ve();
    assert!(!ve_dir.exists());
    assert!(fs::read_dir(&mountpoint).unwrap().next().is_none());
    drop(daemon);
    assert!(!is_procfs_mount(&mountpoint), "SIGTERM must unmount");
}

#[test]
fn open_file_of_vanished_ve_fails_cleanly_and_daemon_survives() {
    let parent = unique_parent();
    let cgroup = VeCgroup::create(&parent, "gone", 64 * MIB, &first_host_cpu());
    let mount_dir = tempfile::tempdir().unwrap();
    let mountpoint = mount_dir.path().join("procfs");
    let _daemon = Daemon::start(&mountpoint, &parent);
    let path = mountpoint.join("gone").join("meminfo");
    let file = fs::File::open(&path).unwrap();
    cgroup.remove_ve();
    let mut content = String::new();
    let error = std::io::Read::read_to_string(&mut &file, &mut content).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT));
    // The daemon still serves a VE created afterwards.
    let again = VeCgroup::create(&parent, "back", 128 * MIB, &first_host_cpu());
    let meminfo = fs::read_to_string(mountpoint.join("back").join("meminfo")).unwrap();
    assert_eq!(meminfo_field(&meminfo, "MemTotal"), 131_072);
    drop(again);
}

#[test]
fn restarted_daemon_recovers_stale_mount_and_rebinds_views() {
    let parent = unique_parent();
    let cgroup = VeCgroup::create(&parent, "ve1", 256 * MIB, &first_host_cpu());
    let mount_dir = tempfile::tempdir().unwrap();
    let mountpoint = mount_dir.path().join("procfs");
    // Started before the "VE" so its mount namespace sees the mount (for the manual /sys bind below).
    let mut first = Daemon::start(&mountpoint, &parent);
    // The "VE": a process in its own mount namespace, inside the VE cgroup.
    let ve_init = ChildGuard(
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sleep", "600"])
            .spawn()
            .unwrap(),
    );
    // unshare execs sleep in place: wait until the pid is in its own namespace.
    wait_until("the VE's mount namespace", || {
        fs::read_link(format!("/proc/{}/ns/mnt", ve_init.pid())).ok()
            != fs::read_link("/proc/self/ns/mnt").ok()
    });
    cgroup.add(ve_init.pid());
    let read_in_ve = |file: &str| {
        Command::new("nsenter")
            .args(["-t", &ve_init.pid().to_string(), "-m", "cat", file])
            .output()
            .unwrap()
    };

    rebind_views(ve_init.pid(), &mountpoint, "ve1").unwrap();
    let meminfo = read_in_ve("/proc/meminfo");
    assert!(meminfo.status.success());
    assert_eq!(
        meminfo_field(&String::from_utf8_lossy(&meminfo.stdout), "MemTotal"),
        262_144
    );
    // The optional /sys view, mounted by hand as a runtime would.
    let cpu_online = mountpoint.join("ve1").join("cpu_online");
    let bound = Command::new("nsenter")
        .args(["-t", &ve_init.pid().to_string(), "-m", "mount", "--bind"])
        .arg(&cpu_online)
        .arg("/sys/devices/system/cpu/online")
        .status()
        .unwrap();
    assert!(bound.success());

    first.crash();
    let dead = read_in_ve("/proc/meminfo");
    assert!(
        !dead.status.success(),
        "a dead daemon's views fail (ENOTCONN)"
    );
    assert_eq!(
        fs::metadata(&mountpoint).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN),
        "the crash leaves a stale mount"
    );

    // The new daemon detaches the stale mount; rebinding revives the VE's views.
    let _second = Daemon::start(&mountpoint, &parent);
    rebind_views(ve_init.pid(), &mountpoint, "ve1").unwrap();
    let revived = read_in_ve("/proc/meminfo");
    assert!(
        revived.status.success(),
        "{}",
        String::from_utf8_lossy(&revived.stderr)
    );
    assert_eq!(
        meminfo_field(&String::from_utf8_lossy(&revived.stdout), "MemTotal"),
        262_144
    );
    let uptime = read_in_ve("/proc/uptime");
    assert!(uptime.status.success());
    let online = read_in_ve("/sys/devices/system/cpu/online");
    assert_eq!(
        String::from_utf8_lossy(&online.stdout),
        "0\n",
        "the mounted /sys view is rebound too"
    );
}

#[test]
fn rebind_reports_a_missing_ve() {
    let mount_dir = tempfile::tempdir().unwrap();
    let error = rebind_views(u32::MAX - 1, mount_dir.path(), "nope").unwrap_err();
    assert!(error.to_string().contains("VE nope"), "{error}");
}

/// A cgroup2-style tree in a temporary directory, to drive the v2 code path and
/// feed garbage through the real FUSE mount (this host's memory controller is v1).
#[test]
fn v2_layout_and_garbage_through_fuse() {
    let cgroup_root = tempfile::tempdir().unwrap();
    fs::write(
        cgroup_root.path().join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    let parent = unique_parent();
    let ve_dir = cgroup_root.path().join(&parent).join("web1");
    fs::create_dir_all(&ve_dir).unwrap();
    let sleeper = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    for (name, content) in [
        ("memory.max", "134217728\n".to_string()),
        ("memory.current", "1048576\n".to_string()),
        ("memory.swap.max", "67108864\n".to_string()),
        ("memory.swap.current", "0\n".to_string()),
        (
            "memory.stat",
            "anon 1048576\nfile 0\nslab_reclaimable 0\nslab_unreclaimable 0\n".to_string(),
        ),
        ("cpu.max", "200000 100000\n".to_string()),
        ("cpuset.cpus.effective", format!("{}\n", first_host_cpu())),
        (
            "cpu.stat",
            "usage_usec 1000\nuser_usec 600\nsystem_usec 400\n".to_string(),
        ),
        ("cgroup.procs", format!("{}\n", sleeper.pid())),
    ] {
        fs::write(ve_dir.join(name), content).unwrap();
    }
    let mount_dir = tempfile::tempdir().unwrap();
    let mountpoint = mount_dir.path().join("procfs");
    let cgroup_root_arg = cgroup_root.path().to_string_lossy().to_string();
    let _daemon = Daemon::start_with(&mountpoint, &parent, &["--cgroup-root", &cgroup_root_arg]);
    let view = |file: &str| fs::read_to_string(mountpoint.join("web1").join(file));

    let meminfo = view("meminfo").unwrap();
    assert_eq!(meminfo_field(&meminfo, "MemTotal"), 131_072);
    assert_eq!(meminfo_field(&meminfo, "MemFree"), 131_072 - 1024);
    let swaps = view("swaps").unwrap();
    // The VE's swap limit, capped by the host's swap.
    let host_swap = meminfo_field(&fs::read_to_string("/proc/meminfo").unwrap(), "SwapTotal");
    assert_eq!(meminfo_field(&meminfo, "SwapTotal"), host_swap.min(65_536));
    assert_eq!(
        swaps.lines().count(),
        if host_swap > 0 { 2 } else { 1 },
        "{swaps}"
    );
    assert_eq!(view("cpuinfo").unwrap().matches("processor").count(), 1);
    assert!(view("stat").unwrap().contains("\nprocesses 1\n"));

    // Garbage: the file answers EIO, the others and the daemon carry on.
    fs::write(ve_dir.join("memory.max"), "a lot\n").unwrap();
    fs::write(ve_dir.join("cpu.max"), "fast\n").unwrap();
    fs::write(ve_dir.join("cpu.stat"), "\0\0garbage").unwrap();
    fs::write(ve_dir.join("cgroup.procs"), "not a pid\n-1\n").unwrap();
    assert_eq!(view("meminfo").unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(view("cpuinfo").unwrap().starts_with("processor\t: 0\n"));
    assert!(view("stat").unwrap().contains("\nprocesses 0\n"));
    assert!(view("uptime").unwrap().starts_with("0.00 "));

    fs::remove_dir_all(&ve_dir).unwrap();
    assert_eq!(
        view("meminfo").unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert!(fs::read_dir(&mountpoint).unwrap().next().is_none());
}

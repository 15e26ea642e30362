//! Attacks from root inside a VE: each must be refused, and the host must
//! be unchanged. The attacks are made by `ve-attack` (src/bin/ve-attack.rs)
//! or busybox applets inside the container.

mod common;

use common::TestVe;
use std::os::unix::fs::MetadataExt;

fn running_ve(name: &str) -> TestVe {
    let ve = TestVe::new(name, |_| {});
    ve.create_and_start();
    ve
}

/// Runs `ve-attack ATTACK [ARG]` in the container and asserts it was refused;
/// returns what it printed.
fn assert_refused(ve: &TestVe, attack: &str, arg: Option<&str>) -> String {
    let mut args = vec!["exec", ve.id.as_str(), "/bin/ve-attack", attack];
    args.extend(arg);
    let out = ve.cli(&args);
    assert_eq!(
        out.code,
        Some(1),
        "attack {attack} {arg:?} was not refused: {} {}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("refused"), "{}", out.stdout);
    out.stdout
}

#[test]
fn seccomp_denies_host_kernel_syscalls_with_eperm() {
    let ve = running_ve("seccomp");
    for attack in [
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "open_by_handle_at",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "settimeofday",
        "clock_settime",
        "swapon",
        "userfaultfd",
        "iopl",
        "syslog",
        "personality",
    ] {
        let out = assert_refused(&ve, attack, None);
        assert!(
            out.contains("errno=1 "),
            "{attack} should be refused by seccomp with EPERM: {out}"
        );
    }
}

#[test]
fn insmod_fails() {
    let ve = running_ve("insmod");
    let module = ve.bundle.join("rootfs/tmp/x.ko");
    std::fs::write(&module, b"\x7fELF not really a module").unwrap();
    let out = ve.sh("insmod /tmp/x.ko");
    assert!(!out.success, "{}", out.stdout);
}

#[test]
fn a_nested_user_namespace_does_not_regain_host_capabilities() {
    let ve = running_ve("nested-userns");
    assert_refused(&ve, "userns_init_module", None);
}

#[test]
fn host_block_devices_cannot_be_made_or_mounted() {
    let ve = running_ve("blockdev");
    let root_dev = std::fs::metadata("/").unwrap().dev();
    let (major, minor) = (
        nix::sys::stat::major(root_dev),
        nix::sys::stat::minor(root_dev),
    );
    assert_refused(&ve, "mknod_block", Some(&format!("{major}:{minor}")));
    assert_refused(&ve, "mknod_block", Some("7:0"));
    // ext4 cannot be mounted from a user namespace at all.
    let out = ve.sh("mount -t ext4 /dev/zero /mnt");
    assert!(!out.success);
    // No host disk node is visible in /dev.
    let out = ve.sh("ls /dev");
    assert!(
        !out.stdout.contains("vda") && !out.stdout.contains("sda") && !out.stdout.contains("loop"),
        "{}",
        out.stdout
    );
}

#[test]
fn proc_and_sys_writes_are_refused_even_after_a_remount() {
    let ve = running_ve("procsys");
    let before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    // The read-only mounts are locked: no remount, no unmount.
    assert_refused(&ve, "remount_rw", Some("/proc/sys"));
    assert_refused(&ve, "remount_rw", Some("/sys"));
    assert_refused(&ve, "umount", Some("/proc/sys"));
    assert_refused(&ve, "umount", Some("/sys"));
    assert_refused(&ve, "write_file", Some("/proc/sys/kernel/core_pattern"));
    assert_refused(&ve, "write_file", Some("/proc/sys/vm/drop_caches"));
    assert_refused(
        &ve,
        "write_file",
        Some("/sys/kernel/mm/transparent_hugepage/enabled"),
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
        before
    );
}

#[test]
fn proc_sys_and_sys_are_mounted_read_only() {
    let ve = running_ve("ro-mounts");
    let out = ve.sh("grep -E ' /proc/sys | /sys ' /proc/self/mountinfo");
    for line in out.stdout.lines() {
        let options = line.split_whitespace().nth(5).unwrap();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "not read-only: {line}"
        );
    }
    assert!(out.stdout.lines().count() >= 2, "{}", out.stdout);
}

#[test]
fn sysrq_trigger_and_kcore_are_out_of_reach() {
    let ve = running_ve("sysrq");
    assert_refused(&ve, "write_file", Some("/proc/sysrq-trigger"));
    assert_refused(&ve, "read_file", Some("/proc/kcore"));
    // The masks are locked in place.
    assert_refused(&ve, "umount", Some("/proc/kcore"));
    assert_refused(&ve, "umount", Some("/proc/sysrq-trigger"));
    assert_refused(&ve, "read_file", Some("/proc/kcore"));
    assert_refused(&ve, "write_file", Some("/proc/sysrq-trigger"));
}

#[test]
fn host_processes_are_invisible_and_unreachable() {
    let ve = running_ve("hostpids");
    let me = std::process::id().to_string();
    let out = ve.sh(&format!("test -e /proc/{me} && echo visible; ps | wc -l"));
    assert!(!out.stdout.contains("visible"), "{}", out.stdout);
    let process_count: usize = out
        .stdout
        .trim()
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_count < 10, "the VE sees {process_count} processes");
    assert_refused(&ve, "kill", Some(&me));
    assert_refused(&ve, "ptrace", Some(&me));
    // And busybox kill of the host's init-reaper fails too (pid 1 is the VE's own init).
    let out = ve.sh(&format!("kill -9 {me}"));
    assert!(!out.success);
    assert!(std::path::Path::new(&format!("/proc/{me}")).exists());
}

#[test]
fn proc_1_root_is_the_containers_root() {
    let ve = running_ve("proc1root");
    let marker = ve.dir.path().join("host-secret");
    std::fs::write(&marker, "secret").unwrap();
    let out = ve.sh(&format!(
        "cat /proc/1/root{} 2>&1; ls /proc/1/root/bin/ve-attack",
        marker.display()
    ));
    assert!(
        !out.stdout.contains("secret\n") && !out.stdout.starts_with("secret"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("/proc/1/root/bin/ve-attack"),
        "{}",
        out.stdout
    );
    let out = ve.sh("cd /proc/1/root/../../..; ls");
    assert!(
        out.stdout.contains("bin") && !out.stdout.contains("work"),
        "{}",
        out.stdout
    );
}

#[test]
fn sethostname_does_not_touch_the_host() {
    let before = nix::unistd::gethostname().unwrap();
    let ve = running_ve("sethostname");
    assert!(ve.sh("hostname attacker").success);
    assert_eq!(nix::unistd::gethostname().unwrap(), before);
}

#[test]
fn capabilities_exclude_host_kernel_ones() {
    let ve = running_ve("caps");
    let out = ve.sh("grep CapBnd /proc/self/status");
    let mask = u64::from_str_radix(out.stdout.split_whitespace().nth(1).unwrap(), 16).unwrap();
    use caps::Capability::*;
    for cap in [
        CAP_SYS_MODULE,
        CAP_SYS_RAWIO,
        CAP_SYS_TIME,
        CAP_SYSLOG,
        CAP_MAC_ADMIN,
        CAP_BPF,
        CAP_PERFMON,
    ] {
        assert_eq!(mask & cap.bitmask(), 0, "{cap} is in the bounding set");
    }
    assert_ne!(mask & CAP_SYS_ADMIN.bitmask(), 0);
}

#[test]
fn the_waiting_init_cannot_be_used_to_reach_the_runtime_binary() {
    // Before `start`, pid 1 is still a fork of the runtime (CVE-2019-5736 shape):
    // the VE must not be able to open its executable for writing.
    let ve = TestVe::new("exe", |_| {});
    let out = ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert!(out.success, "{}", out.stderr);
    assert_refused(&ve, "write_file", Some("/proc/1/exe"));
    assert_refused(&ve, "ptrace", Some("1"));
}

//! The OCI lifecycle through the CLI binary, and error cases that must change nothing.

mod common;

use common::{cli, TestVe};

fn status_of(ve: &TestVe) -> String {
    let out = ve.cli(&["state", &ve.id]);
    assert!(out.success, "state failed: {}", out.stderr);
    let state: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(state["id"], ve.id.as_str());
    assert_eq!(state["ociVersion"], "1.0.2");
    state["status"].as_str().unwrap().to_string()
}

#[test]
fn create_start_state_kill_delete() {
    let ve = TestVe::new("life", |_| {});
    let pid_file = ve.dir.path().join("pid");
    let out = ve.cli(&[
        "create",
        "--bundle",
        ve.bundle.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &ve.id,
    ]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(status_of(&ve), "created");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, ve.init_pid());
    // The init is not a child of any runtime process.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id() as i32);

    assert!(ve.cli(&["start", &ve.id]).success);
    assert_eq!(status_of(&ve), "running");
    let again = ve.cli(&["start", &ve.id]);
    assert!(!again.success);
    assert!(
        again.stderr.contains("is running, it must be created"),
        "{}",
        again.stderr
    );

    let list = ve.cli(&["list", "--format", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(listed[0]["id"], ve.id.as_str());
    let table = ve.cli(&["list"]);
    assert!(table.stdout.contains(&ve.id) && table.stdout.contains("running"));

    let refused = ve.cli(&["delete", &ve.id]);
    assert!(!refused.success);
    assert!(refused.stderr.contains("is running"), "{}", refused.stderr);

    assert!(ve.cli(&["kill", &ve.id, "KILL"]).success);
    // The pidfd turns readable when the init exits; state sees it through /proc.
    for _ in 0..1000 {
        if status_of(&ve) == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(status_of(&ve), "stopped");
    assert!(ve.cli(&["delete", &ve.id]).success);
    assert!(!ve.root.join(&ve.id).exists());
    assert!(!ve.cgroup_dir("memory").exists());
    assert!(!ve.cgroup_dir("pids").exists());
    assert!(!ve.cli(&["state", &ve.id]).success);
}

#[test]
fn kill_accepts_signal_forms_and_delete_force_kills_running() {
    let ve = TestVe::new("sig", |_| {});
    ve.create_and_start();
    for signal in ["18", "SIGCONT", "cont"] {
        let out = ve.cli(&["kill", &ve.id, signal]);
        assert!(out.success, "{signal}: {}", out.stderr);
    }
    let bad = ve.cli(&["kill", &ve.id, "NOPE"]);
    assert!(
        !bad.success && bad.stderr.contains("unknown signal"),
        "{}",
        bad.stderr
    );
    let pid = ve.init_pid();
    assert!(ve.cli(&["delete", "--force", &ve.id]).success);
    assert!(
        ve_runtime::state::read_proc_stat(pid).is_none_or(|s| s.state == 'Z'),
        "init {pid} survived"
    );
    assert!(!ve.cgroup_dir("pids").exists());
}

#[test]
fn delete_of_a_created_container_kills_its_init() {
    let ve = TestVe::new("created-del", |_| {});
    assert!(
        ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id])
            .success
    );
    assert!(ve.cli(&["delete", &ve.id]).success);
    assert!(!ve.root.join(&ve.id).exists());
}

#[test]
fn run_in_foreground_returns_the_exit_code() {
    let ve = TestVe::new("run", |c| {
        c["process"]["args"] = serde_json::json!(["sh", "-c", "exit 7"])
    });
    let out = ve.cli(&["run", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    assert!(
        !ve.root.join(&ve.id).exists(),
        "run deletes the container when it exits"
    );
}

#[test]
fn a_restarted_caller_finds_containers_again() {
    let ve = TestVe::new("restart", |_| {});
    ve.create_and_start();
    // A brand-new Runtime value (as a restarted node agent would build) sees it.
    let fresh = ve_runtime::Runtime::new(&ve.root);
    let states = fresh.list().unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].status, ve_runtime::Status::Running);
    fresh.kill(&ve.id, ve_runtime::Signal::SIGCONT).unwrap();
}

#[test]
fn unknown_id_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in [
        &["state", "nope"][..],
        &["start", "nope"],
        &["kill", "nope"],
        &["delete", "nope"],
        &["exec", "nope", "true"],
    ] {
        let out = cli(dir.path(), cmd);
        assert!(!out.success);
        assert!(
            out.stderr.contains("container nope does not exist"),
            "{cmd:?}: {}",
            out.stderr
        );
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
    let bad_id = cli(dir.path(), &["state", "../etc"]);
    assert!(
        bad_id.stderr.contains("invalid container id"),
        "{}",
        bad_id.stderr
    );
}

#[test]
fn duplicate_id_is_refused_and_the_first_container_is_untouched() {
    let ve = TestVe::new("dup", |_| {});
    ve.create_and_start();
    let pid = ve.init_pid();
    let out = ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert!(!out.success);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(status_of(&ve), "running");
    assert_eq!(ve.init_pid(), pid);
}

fn assert_nothing_created(ve: &TestVe) {
    assert!(!ve.root.join(&ve.id).exists(), "state dir left behind");
    assert!(!ve.cgroup_dir("memory").exists(), "cgroup left behind");
    assert!(!ve.cgroup_dir("pids").exists(), "cgroup left behind");
}

#[test]
fn bad_config_json_changes_nothing() {
    let ve = TestVe::new("badjson", |_| {});
    std::fs::write(ve.bundle.join("config.json"), "{ not json").unwrap();
    let out = ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("is not a valid OCI config"),
        "{}",
        out.stderr
    );
    assert_nothing_created(&ve);
}

#[test]
fn unsupported_field_is_named_and_changes_nothing() {
    let ve = TestVe::new("unsupported", |c| {
        c["linux"]["intelRdt"] = serde_json::json!({"closID": "x"})
    });
    let out = ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert!(!out.success);
    assert_eq!(
        out.stderr.trim(),
        "ve-runtime: config.json: linux.intelRdt is not supported"
    );
    assert_nothing_created(&ve);
}

#[test]
fn failure_inside_the_container_setup_changes_nothing() {
    // The program does not exist in the rootfs: the init fails after the
    // cgroup and namespaces exist; everything must be rolled back.
    let ve = TestVe::new("noexe", |c| {
        c["process"]["args"] = serde_json::json!(["/no/such/program"])
    });
    let out = ve.cli(&["create", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert!(!out.success);
    assert!(out.stderr.contains("/no/such/program"), "{}", out.stderr);
    assert_nothing_created(&ve);
}

#[test]
fn console_socket_receives_a_working_terminal() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let ve = TestVe::new("console", |c| {
        c["process"]["terminal"] = serde_json::json!(true);
        c["process"]["args"] =
            serde_json::json!(["sh", "-c", "tty; echo console-ok; sleep 100000"]);
    });
    let socket_path = ve.dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let out = ve.cli(&[
        "create",
        "--bundle",
        ve.bundle.to_str().unwrap(),
        "--console-socket",
        socket_path.to_str().unwrap(),
        &ve.id,
    ]);
    assert!(out.success, "{}", out.stderr);
    let (conn, _) = listener.accept().unwrap();
    let master = ve_runtime::console::recv_fd(conn.as_raw_fd())
        .unwrap()
        .expect("pty master");
    assert!(ve.cli(&["start", &ve.id]).success);
    let mut file = std::fs::File::from(master);
    let mut text = String::new();
    let mut buf = [0u8; 256];
    while !text.contains("console-ok") {
        let n = file.read(&mut buf).unwrap();
        assert!(n > 0);
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(text.contains("/dev/pts/0"), "{text}");
}

#[test]
fn library_api_with_an_output_file() {
    let ve = TestVe::new("lib", |c| {
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "echo out-line; echo err-line >&2; exec sleep 100000"
        ])
    });
    let runtime = ve.runtime();
    let log = ve.dir.path().join("console.log");
    let opts = ve_runtime::CreateOptions {
        output: Some(log.clone()),
        ..Default::default()
    };
    let state = runtime.create(&ve.id, &ve.bundle, &opts).unwrap();
    assert_eq!(state.status, ve_runtime::Status::Created);
    // Bad input to a second create changes nothing.
    assert!(runtime.create(&ve.id, &ve.bundle, &opts).is_err());
    runtime.start(&ve.id).unwrap();
    let status = runtime
        .exec(
            &ve.id,
            &ve_runtime::ExecOptions {
                args: vec!["true".into()],
                ..Default::default()
            },
        )
        .unwrap();
    assert!(status.success());
    let status = runtime
        .exec(
            &ve.id,
            &ve_runtime::ExecOptions {
                args: vec!["sh".into(), "-c".into(), "exit 4".into()],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(status.code(), Some(4));
    let mut text = String::new();
    for _ in 0..1000 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("err-line") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        text.contains("out-line") && text.contains("err-line"),
        "{text}"
    );
    let stats = runtime.stats(&ve.id).unwrap();
    assert!(stats.memory_usage_bytes > 0);
    assert!(stats.pids_current >= 1);
    runtime.delete(&ve.id, true).unwrap();
    assert!(runtime.list().unwrap().is_empty());
}

#[test]
fn run_in_foreground_with_a_terminal_relays_it() {
    let ve = TestVe::new("runtty", |c| {
        c["process"]["terminal"] = serde_json::json!(true);
        c["process"]["args"] = serde_json::json!(["sh", "-c", "tty; exit 3"]);
    });
    let out = ve.cli(&["run", "--bundle", ve.bundle.to_str().unwrap(), &ve.id]);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(out.stdout.contains("/dev/pts/0"), "{}", out.stdout);
    assert!(!ve.root.join(format!(".{}.console", ve.id)).exists());
}

#[test]
fn the_container_process_starts_with_default_signal_handling() {
    // The runtime (a Rust program) ignores SIGPIPE; the VE's processes must not inherit that.
    let ve = TestVe::new("sigign", |_| {});
    ve.create_and_start();
    let out = ve.sh("grep -E 'SigIgn|SigBlk' /proc/1/status");
    for line in out.stdout.lines() {
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
}

#[test]
fn run_forwards_signals_to_the_container() {
    let ve = TestVe::new("runsig", |c| {
        c["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "trap 'exit 9' TERM; while true; do sleep 1 & wait $!; done"
        ]);
    });
    let mut child = std::process::Command::new(common::RUNTIME)
        .arg("--root")
        .arg(&ve.root)
        .args(["run", "--bundle", ve.bundle.to_str().unwrap(), &ve.id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let runtime = ve.runtime();
    for _ in 0..2000 {
        if runtime
            .state(&ve.id)
            .is_ok_and(|s| s.status == ve_runtime::Status::Running)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Let the shell install its trap.
    for _ in 0..2000 {
        if ve.sh("grep -q sleep /proc/*/cmdline 2>/dev/null").success {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(9));
    assert!(!ve.root.join(&ve.id).exists());
}

#[test]
fn a_corrupt_state_file_is_reported_and_force_delete_clears_it() {
    let ve = TestVe::new("corrupt", |_| {});
    std::fs::create_dir_all(ve.root.join(&ve.id)).unwrap();
    std::fs::write(ve.root.join(&ve.id).join("state.json"), "{").unwrap();
    let out = ve.cli(&["state", &ve.id]);
    assert!(out.stderr.contains("is corrupt"), "{}", out.stderr);
    assert!(!ve.cli(&["delete", &ve.id]).success);
    assert!(ve.cli(&["delete", "--force", &ve.id]).success);
    assert!(!ve.root.join(&ve.id).exists());
}

//! The node side can die and restart without touching running VEs, and the
//! node agent brings back VEs that should run but crashed.

use std::time::Duration;

use system_tests::{wait_for, NodeAgent, TestNode};

#[test]
fn restarting_the_node_side_leaves_ves_running_and_managed() {
    let node = TestNode::new();
    let mut agent = NodeAgent::start(&node);
    node.busybox_ve("keep", "10.213.0.61/24", &[]);
    let pid = node.init_pid("keep").expect("running");
    node.exec("keep", "echo before > /root/mark");

    // The agent dies hard, and comes back.
    agent.kill();
    let (code, _, _) = node.exec("keep", "true");
    assert_eq!(code, 0, "VE unusable without its agent");
    let _agent = NodeAgent::start(&node);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.init_pid("keep"), Some(pid), "the VE was restarted");
    let (_, out, _) = node.exec("keep", "cat /root/mark; grep -c MemTotal /proc/meminfo");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["before", "1"]);
    // The /proc views daemon dies hard: the agent starts a new one and
    // re-binds the running VE's views.
    let mountpoint = node.dir.join("run/procfs");
    system_tests::sh(&format!("pkill -9 -f -- '--mountpoint {}'", mountpoint.display()));
    wait_for("the VE's /proc views to come back", Duration::from_secs(30), || {
        let (code, out, _) = node.exec("keep", "grep MemTotal /proc/meminfo");
        code == 0 && out.contains(&(128 * 1024).to_string())
    });
    assert_eq!(node.init_pid("keep"), Some(pid), "the VE was restarted");
    // And it is still managed: limits and stop work.
    node.vectl_ok(&["set", "keep", "--memory", "200M"]);
    node.vectl_ok(&["stop", "keep", "--timeout", "10"]);
    // A VE stopped on purpose stays stopped.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.init_pid("keep"), None, "the agent restarted a VE stopped on purpose");
}

#[test]
fn the_agent_restarts_a_crashed_ve() {
    let node = TestNode::new();
    node.busybox_ve("crashy", "10.213.0.62/24", &[]);
    let _agent = NodeAgent::start(&node);
    let pid = node.init_pid("crashy").expect("running");
    // The VE's init dies from outside (as if it crashed).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("the agent to restart the VE", Duration::from_secs(30), || {
        matches!(node.init_pid("crashy"), Some(new) if new != pid)
    });
    let (code, out, _) = node.exec("crashy", "wget -qO- http://127.0.0.1/");
    assert_eq!(code, 0);
    assert!(out.contains("busybox VE"));
}

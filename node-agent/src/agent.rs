//! The node agent's reconcile loop: VEs that should run, run.
//!
//! It compares each VE's desired state (written by `start` and `stop`) with
//! what the kernel runs, and starts VEs that should run but do not (their
//! init crashed or the node rebooted). It never restarts a running VE: the
//! agent can itself be killed and restarted at any time, and VEs don't notice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::NodeConfig;
use crate::lifecycle::{Node, ShutdownRequest, VeStatus};

/// What the agent knows of one VE at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub name: String,
    pub desired: VeStatus,
    pub actual: VeStatus,
    pub autostart: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the VE.
    Start(String),
    /// Record that the VE should not run (it is not autostart and the node rebooted).
    ForgetDesired(String),
}

/// Decides what to do. `first_since_boot`: the node just booted, so only
/// autostart VEs should come back.
pub fn plan(observed: &[Observed], first_since_boot: bool) -> Vec<Action> {
    let mut actions = Vec::new();
    for ve in observed {
        if ve.actual == VeStatus::Running {
            continue;
        }
        let should_run = if first_since_boot { ve.autostart } else { ve.desired == VeStatus::Running };
        if should_run {
            actions.push(Action::Start(ve.name.clone()));
        } else if first_since_boot && ve.desired == VeStatus::Running {
            actions.push(Action::ForgetDesired(ve.name.clone()));
        }
    }
    actions
}

/// Delay before retrying a VE whose start failed `failures` times in a row.
pub fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(Duration::from_secs(60))
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

fn boot_record(config: &NodeConfig) -> PathBuf {
    config.state_dir.join("last-boot-id")
}

/// Records that the node side ran during this boot; every VE start calls it.
pub fn record_boot(config: &NodeConfig) {
    let Some(current) = boot_id() else { return };
    let path = boot_record(config);
    if std::fs::read_to_string(&path).ok().as_deref().map(str::trim) != Some(current.as_str()) {
        if let Err(error) = std::fs::write(&path, format!("{current}\n")) {
            tracing::warn!(%error, path = %path.display(), "cannot record the boot id");
        }
    }
}

/// Whether the node rebooted since the node side last ran: then only
/// autostart VEs come back. A node that never recorded a boot did not.
pub fn rebooted_since_last_record(config: &NodeConfig) -> bool {
    match (std::fs::read_to_string(boot_record(config)), boot_id()) {
        (Ok(recorded), Some(current)) => recorded.trim() != current,
        _ => false,
    }
}

/// Remounts the host's cgroup2 hierarchy with `favordynmods`: the kernel
/// then keeps its cgroup threadgroup lock in slow-path mode, so moving a
/// VE's init into its cgroups (every start) no longer waits for an RCU
/// grace period (10-25 ms here), at a small cost to fork and exit. Applies
/// to the v1 hierarchies of a hybrid host too: the lock is shared.
pub fn favor_cgroup_moves() {
    const CGROUP2: &str = "/sys/fs/cgroup/unified";
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(line) = mounts.lines().find(|l| l.split(' ').nth(1) == Some(CGROUP2) && l.split(' ').nth(2) == Some("cgroup2"))
    else {
        return;
    };
    if line.contains("favordynmods") {
        return;
    }
    match nix::mount::mount(
        None::<&str>,
        CGROUP2,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT,
        Some("favordynmods"),
    ) {
        Ok(()) => tracing::info!("cgroup2 remounted with favordynmods: faster VE starts"),
        Err(error) => tracing::warn!(%error, "cannot remount cgroup2 with favordynmods"),
    }
}

pub struct Agent {
    node: Node,
    interval: Duration,
    failures: HashMap<String, (u32, Instant)>,
}

impl Agent {
    pub fn new(node: Node, interval: Duration) -> Agent {
        Agent { node, interval, failures: HashMap::new() }
    }


    fn observe(&self) -> Vec<Observed> {
        let names = match self.node.names() {
            Ok(names) => names,
            Err(error) => {
                tracing::warn!(%error, "cannot list VEs");
                return Vec::new();
            }
        };
        names
            .into_iter()
            .filter_map(|name| {
                let spec = self.node.spec(&name).ok()?;
                let actual = self.node.status(&name).ok()?;
                Some(Observed { desired: self.node.desired(&name), actual, autostart: spec.autostart, name })
            })
            .collect()
    }

    /// Carries out halts and reboots the VEs' own OSes asked for.
    fn handle_shutdown_requests(&self) {
        for name in self.node.names().unwrap_or_default() {
            let result = match self.node.shutdown_request(&name) {
                Some(ShutdownRequest::Halt) => {
                    tracing::info!(ve = %name, "halted from inside");
                    self.node.stop(&name, Duration::ZERO)
                }
                Some(ShutdownRequest::Reboot) => {
                    tracing::info!(ve = %name, "rebooted from inside");
                    self.node.restart(&name, Duration::ZERO)
                }
                None => Ok(()),
            };
            if let Err(error) = result {
                tracing::warn!(ve = %name, %error, "cannot carry out the VE's shutdown request");
            }
        }
    }

    /// One pass of the loop.
    pub fn reconcile_once(&mut self) {
        self.handle_shutdown_requests();
        if !rebooted_since_last_record(&self.node.config) && self.node.names().map(|n| !n.is_empty()).unwrap_or(false) {
            record_boot(&self.node.config);
        }
        let first_since_boot = rebooted_since_last_record(&self.node.config);
        let actions = plan(&self.observe(), first_since_boot);
        for action in actions {
            match action {
                Action::ForgetDesired(name) => {
                    if let Err(error) = self.node.set_desired(&name, VeStatus::Stopped) {
                        tracing::warn!(ve = %name, %error, "cannot record desired state");
                    }
                }
                Action::Start(name) => {
                    if let Some((failures, at)) = self.failures.get(&name) {
                        if at.elapsed() < retry_delay(*failures) {
                            continue;
                        }
                    }
                    tracing::info!(ve = %name, "starting VE that should run");
                    match self.node.start(&name) {
                        Ok(()) => {
                            self.failures.remove(&name);
                        }
                        Err(crate::lifecycle::LifecycleError::Running(_)) => {}
                        Err(error) => {
                            tracing::warn!(ve = %name, %error, "start failed");
                            let entry = self.failures.entry(name).or_insert((0, Instant::now()));
                            *entry = (entry.0 + 1, Instant::now());
                        }
                    }
                }
            }
        }
        if first_since_boot {
            record_boot(&self.node.config);
        }
    }

    /// Keeps `ve-procfs` serving: if it died, starts it again and gives
    /// every running VE fresh bind mounts of its views (the old ones point
    /// at the dead connection and answer ENOTCONN).
    pub fn ensure_proc_views(&self) {
        let config = &self.node.config;
        if crate::daemons::fuse_mounted(&config.procfs_mountpoint) {
            return;
        }
        if let Err(error) = crate::daemons::ensure_procfs(config) {
            tracing::warn!(%error, "VEs run without /proc views");
            return;
        }
        for name in self.node.names().unwrap_or_default() {
            if let Some(pid) = self.node.running_pid(&name) {
                match crate::procfs::rebind_views(pid as u32, &config.procfs_mountpoint, &name) {
                    Ok(()) => tracing::info!(ve = %name, "/proc views re-bound"),
                    Err(error) => tracing::warn!(ve = %name, %error, "cannot re-bind /proc views"),
                }
            }
        }
    }

    /// Runs until the process is killed.
    pub fn run(&mut self) -> ! {
        favor_cgroup_moves();
        if let Err(error) = self.node.ensure_network() {
            tracing::warn!(%error, "cannot set up the node's bridge");
        }
        loop {
            self.ensure_proc_views();
            self.reconcile_once();
            std::thread::sleep(self.interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ve(name: &str, desired: VeStatus, actual: VeStatus, autostart: bool) -> Observed {
        Observed { name: name.into(), desired, actual, autostart }
    }

    #[test]
    fn crashed_ves_that_should_run_are_started() {
        let observed = [
            ve("crashed", VeStatus::Running, VeStatus::Stopped, false),
            ve("stopped", VeStatus::Stopped, VeStatus::Stopped, true),
            ve("fine", VeStatus::Running, VeStatus::Running, false),
        ];
        assert_eq!(plan(&observed, false), vec![Action::Start("crashed".into())]);
    }

    #[test]
    fn after_boot_only_autostart_ves_come_back() {
        let observed = [
            ve("auto", VeStatus::Stopped, VeStatus::Stopped, true),
            ve("manual", VeStatus::Running, VeStatus::Stopped, false),
            ve("off", VeStatus::Stopped, VeStatus::Stopped, false),
        ];
        assert_eq!(
            plan(&observed, true),
            vec![Action::Start("auto".into()), Action::ForgetDesired("manual".into())]
        );
    }

    #[test]
    fn running_ves_are_never_touched() {
        let observed = [ve("a", VeStatus::Stopped, VeStatus::Running, true)];
        assert!(plan(&observed, true).is_empty());
        assert!(plan(&observed, false).is_empty());
    }

    #[test]
    fn retries_back_off() {
        assert_eq!(retry_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(8));
        assert_eq!(retry_delay(30), Duration::from_secs(60));
    }
}

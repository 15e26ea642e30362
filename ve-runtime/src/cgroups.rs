//! The container's cgroup, driven through cgroups-rs.
//!
//! On a hybrid host (v1 controllers + cgroup2 at /sys/fs/cgroup/unified) the
//! limits go to the v1 controllers and the container is also placed at the
//! same path in the unified hierarchy, so v2-aware tools see it. On a pure v2
//! host cgroups-rs drives cgroup2 directly.

use std::path::{Path, PathBuf};

use cgroups_rs::blkio::BlkIoController;
use cgroups_rs::cpu::CpuController;
use cgroups_rs::cpuacct::CpuAcctController;
use cgroups_rs::cpuset::CpuSetController;
use cgroups_rs::devices::{DevicePermissions, DeviceType, DevicesController};
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{Cgroup, CgroupPid, MaxValue};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources};
use serde::{Deserialize, Serialize};

const HYBRID_UNIFIED: &str = "/sys/fs/cgroup/unified";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroups path {0:?}: use an absolute path like /ve-runtime/<id> (systemd slices are not supported)")]
    InvalidPath(String),
    #[error("cannot create cgroup {path}: {reason}")]
    Create { path: String, reason: String },
    #[error("cgroup {path}: cannot set {what}: {reason}")]
    Set {
        path: String,
        what: &'static str,
        reason: String,
    },
    #[error("cgroup {path}: {what} is not available on this host ({hint})")]
    Unavailable {
        path: String,
        what: &'static str,
        hint: &'static str,
    },
    #[error("cannot move pid {pid} into cgroup {path}: {reason}")]
    AddTask {
        path: String,
        pid: i32,
        reason: String,
    },
    #[error("cannot remove cgroup {path}: {reason}")]
    Remove { path: String, reason: String },
    #[error("cgroup {path} still has processes after SIGKILL: {pids:?}")]
    NotEmpty { path: String, pids: Vec<u64> },
}

/// Resource usage of a container, read from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_usage_bytes: u64,
    /// None means unlimited.
    pub memory_limit_bytes: Option<u64>,
    pub swap_usage_bytes: u64,
    pub cpu_usage_ns: u64,
    pub pids_current: u64,
    /// None means unlimited.
    pub pids_limit: Option<u64>,
}

/// The cgroup path for a container: linux.cgroupsPath or /ve-runtime/<id>,
/// returned relative to the hierarchy roots (pure).
pub fn cgroup_path(configured: Option<&Path>, id: &str) -> Result<String, CgroupError> {
    let text = match configured {
        Some(p) => p.to_string_lossy().into_owned(),
        None => format!("/ve-runtime/{id}"),
    };
    let relative = text.trim_start_matches('/').trim_end_matches('/');
    let bad = relative.is_empty()
        || text.contains(':')
        || relative
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CgroupError::InvalidPath(text));
    }
    Ok(relative.to_string())
}

/// A container's cgroup (all v1 controllers, plus the hybrid unified dir).
pub struct ContainerCgroup {
    path: String,
    cgroup: Cgroup,
}

fn reason(e: impl std::fmt::Display) -> String {
    let mut text = e.to_string();
    // cgroups-rs errors carry their cause separately; include it.
    if text.is_empty() {
        text = "unknown error".into();
    }
    text
}

fn cgroup_error_text(e: &cgroups_rs::error::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => reason(e),
    }
}

impl ContainerCgroup {
    /// Opens a cgroup handle without creating anything.
    pub fn load(path: &str) -> Self {
        Self {
            path: path.to_string(),
            cgroup: Cgroup::load(cgroups_rs::hierarchies::auto(), path),
        }
    }

    /// Creates the cgroup and applies the limits; on failure removes what it created.
    pub fn create(path: &str, resources: Option<&LinuxResources>) -> Result<Self, CgroupError> {
        let hierarchy = cgroups_rs::hierarchies::auto();
        if !hierarchy.v2() {
            prepare_cpuset_ancestors(path)?;
        }
        let cgroup = Cgroup::new(cgroups_rs::hierarchies::auto(), path).map_err(|e| {
            CgroupError::Create {
                path: path.to_string(),
                reason: cgroup_error_text(&e),
            }
        })?;
        let this = Self {
            path: path.to_string(),
            cgroup,
        };
        let result = (|| {
            if !this.cgroup.v2() && Path::new(HYBRID_UNIFIED).join("cgroup.procs").exists() {
                let dir = this.unified_dir();
                std::fs::create_dir_all(&dir).map_err(|e| CgroupError::Create {
                    path: dir.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
            if let Some(resources) = resources {
                this.apply(resources)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = this.remove();
            return Err(e);
        }
        Ok(this)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn unified_dir(&self) -> PathBuf {
        Path::new(HYBRID_UNIFIED).join(&self.path)
    }

    fn set_error(
        &self,
        what: &'static str,
    ) -> impl Fn(cgroups_rs::error::Error) -> CgroupError + '_ {
        move |e| CgroupError::Set {
            path: self.path.clone(),
            what,
            reason: cgroup_error_text(&e),
        }
    }

    fn unavailable(&self, what: &'static str, hint: &'static str) -> CgroupError {
        CgroupError::Unavailable {
            path: self.path.clone(),
            what,
            hint,
        }
    }

    /// Moves a process (and its future children) into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        self.cgroup
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(|e| CgroupError::AddTask {
                path: self.path.clone(),
                pid,
                reason: cgroup_error_text(&e),
            })?;
        let unified = self.unified_dir().join("cgroup.procs");
        if !self.cgroup.v2() && unified.exists() {
            std::fs::write(&unified, pid.to_string()).map_err(|e| CgroupError::AddTask {
                path: unified.display().to_string(),
                pid,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Applies linux.resources; every field given is applied or is an error.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(memory) = resources.memory() {
            let mem: &MemController = self
                .cgroup
                .controller_of()
                .ok_or_else(|| self.unavailable("memory", "no memory controller"))?;
            if let Some(reservation) = memory.reservation() {
                mem.set_soft_limit(reservation)
                    .map_err(self.set_error("memory reservation"))?;
            }
            let swap = memory.swap().map(|total| {
                // OCI swap is memory+swap; cgroup2's swap.max counts swap only.
                if self.cgroup.v2() && total > 0 {
                    total - memory.limit().unwrap_or(0).max(0)
                } else {
                    total
                }
            });
            match (memory.limit(), swap) {
                (Some(limit), Some(swap)) if !self.cgroup.v2() => {
                    // v1 requires memory <= memsw at every step: order the writes.
                    if mem.set_limit(limit).is_err() {
                        mem.set_memswap_limit(swap)
                            .map_err(self.set_error("memory+swap limit"))?;
                        mem.set_limit(limit)
                            .map_err(self.set_error("memory limit"))?;
                    } else {
                        mem.set_memswap_limit(swap)
                            .map_err(self.set_error("memory+swap limit"))?;
                    }
                }
                (limit, swap) => {
                    if let Some(limit) = limit {
                        mem.set_limit(limit)
                            .map_err(self.set_error("memory limit"))?;
                    }
                    if let Some(swap) = swap {
                        mem.set_memswap_limit(swap)
                            .map_err(self.set_error("memory+swap limit"))?;
                    }
                }
            }
            if let Some(swappiness) = memory.swappiness() {
                mem.set_swappiness(swappiness)
                    .map_err(self.set_error("swappiness"))?;
            }
            if memory.disable_oom_killer() == Some(true) {
                mem.disable_oom_killer()
                    .map_err(self.set_error("oom killer"))?;
            }
        }
        if let Some(cpu) = resources.cpu() {
            if cpu.shares().is_some() || cpu.quota().is_some() || cpu.period().is_some() {
                let ctl: &CpuController = self
                    .cgroup
                    .controller_of()
                    .ok_or_else(|| self.unavailable("cpu", "no cpu controller"))?;
                if let Some(shares) = cpu.shares() {
                    let value = if self.cgroup.v2() {
                        shares_to_weight(shares)
                    } else {
                        shares
                    };
                    ctl.set_shares(value)
                        .map_err(self.set_error("cpu shares"))?;
                }
                if cpu.quota().is_some() || cpu.period().is_some() {
                    if self.cgroup.v2() {
                        ctl.set_cfs_quota_and_period(cpu.quota(), cpu.period())
                            .map_err(self.set_error("cpu quota/period"))?;
                    } else {
                        if let Some(period) = cpu.period() {
                            ctl.set_cfs_period(period)
                                .map_err(self.set_error("cpu period"))?;
                        }
                        if let Some(quota) = cpu.quota() {
                            ctl.set_cfs_quota(quota)
                                .map_err(self.set_error("cpu quota"))?;
                        }
                    }
                }
            }
            if cpu.cpus().is_some() || cpu.mems().is_some() {
                let ctl: &CpuSetController = self
                    .cgroup
                    .controller_of()
                    .ok_or_else(|| self.unavailable("cpuset", "no cpuset controller"))?;
                if let Some(cpus) = cpu.cpus() {
                    ctl.set_cpus(cpus).map_err(self.set_error("cpuset cpus"))?;
                }
                if let Some(mems) = cpu.mems() {
                    ctl.set_mems(mems).map_err(self.set_error("cpuset mems"))?;
                }
            }
        }
        if let Some(pids) = resources.pids() {
            let ctl: &PidController = self
                .cgroup
                .controller_of()
                .ok_or_else(|| self.unavailable("pids", "no pids controller"))?;
            let value = if pids.limit() > 0 {
                MaxValue::Value(pids.limit())
            } else {
                MaxValue::Max
            };
            ctl.set_pid_max(value)
                .map_err(self.set_error("pids limit"))?;
        }
        if let Some(block_io) = resources.block_io() {
            let ctl: &BlkIoController = self
                .cgroup
                .controller_of()
                .ok_or_else(|| self.unavailable("blkio", "no blkio/io controller"))?;
            if let Some(weight) = block_io.weight() {
                ctl.set_weight(weight as u64)
                    .map_err(self.set_error("blkio weight"))?;
            }
            for d in block_io.throttle_read_bps_device().iter().flatten() {
                ctl.throttle_read_bps_for_device(d.major() as u64, d.minor() as u64, d.rate())
                    .map_err(self.set_error("read bps throttle"))?;
            }
            for d in block_io.throttle_write_bps_device().iter().flatten() {
                ctl.throttle_write_bps_for_device(d.major() as u64, d.minor() as u64, d.rate())
                    .map_err(self.set_error("write bps throttle"))?;
            }
            for d in block_io.throttle_read_iops_device().iter().flatten() {
                ctl.throttle_read_iops_for_device(d.major() as u64, d.minor() as u64, d.rate())
                    .map_err(self.set_error("read iops throttle"))?;
            }
            for d in block_io.throttle_write_iops_device().iter().flatten() {
                ctl.throttle_write_iops_for_device(d.major() as u64, d.minor() as u64, d.rate())
                    .map_err(self.set_error("write iops throttle"))?;
            }
        }
        if let Some(rules) = resources.devices() {
            if !rules.is_empty() {
                if self.cgroup.v2() {
                    return Err(self.unavailable(
                        "device rules",
                        "cgroup2 device control needs eBPF, not implemented",
                    ));
                }
                let ctl: &DevicesController = self
                    .cgroup
                    .controller_of()
                    .ok_or_else(|| self.unavailable("devices", "no devices controller"))?;
                for rule in rules {
                    apply_device_rule(ctl, rule).map_err(self.set_error("device rule"))?;
                }
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let mut stats = Stats::default();
        if let Some(mem) = self.cgroup.controller_of::<MemController>() {
            let m = mem.memory_stat();
            stats.memory_usage_bytes = m.usage_in_bytes;
            stats.memory_limit_bytes = limit_value(m.limit_in_bytes);
            let sw = mem.memswap();
            stats.swap_usage_bytes = if self.cgroup.v2() {
                sw.usage_in_bytes
            } else {
                sw.usage_in_bytes.saturating_sub(m.usage_in_bytes)
            };
        }
        if self.cgroup.v2() {
            if let Some(cpu) = self.cgroup.controller_of::<CpuController>() {
                let text = cpu.cpu().stat;
                stats.cpu_usage_ns = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1000;
            }
        } else if let Some(acct) = self.cgroup.controller_of::<CpuAcctController>() {
            stats.cpu_usage_ns = acct.cpuacct().usage;
        }
        if let Some(pids) = self.cgroup.controller_of::<PidController>() {
            stats.pids_current = pids.get_pid_current().unwrap_or(0);
            stats.pids_limit = match pids.get_pid_max() {
                Ok(MaxValue::Value(v)) if v >= 0 => Some(v as u64),
                _ => None,
            };
        }
        Ok(stats)
    }

    /// Pids (host view) of every process in the cgroup.
    pub fn processes(&self) -> Vec<u64> {
        let mut pids: Vec<u64> = self.cgroup.procs().into_iter().map(|p| p.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything in the cgroup until it is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        // New processes can appear while we kill (a fork bomb); repeat until
        // the cgroup stays empty, with a bound so a stuck task is reported.
        for _ in 0..2000 {
            let pids = self.processes();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Err(CgroupError::NotEmpty {
            path: self.path.clone(),
            pids: self.processes(),
        })
    }

    /// Removes the cgroup directories (they must be empty of processes).
    pub fn remove(&self) -> Result<(), CgroupError> {
        let unified = self.unified_dir();
        if !self.cgroup.v2() && unified.exists() {
            std::fs::remove_dir(&unified).map_err(|e| CgroupError::Remove {
                path: unified.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        // A dying task can keep the directory busy for a moment after it left
        // cgroup.procs (cgroups-rs also retries with a growing delay).
        let mut last_error = None;
        for _ in 0..3 {
            match self.cgroup.delete() {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(cgroup_error_text(&e)),
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Err(CgroupError::Remove {
            path: self.path.clone(),
            reason: last_error.unwrap_or_default(),
        })
    }
}

/// A v1 cpuset cgroup accepts tasks only once cpuset.cpus and cpuset.mems are
/// set; cgroups-rs fills them for the leaf only, so fill the ancestors we create.
fn prepare_cpuset_ancestors(path: &str) -> Result<(), CgroupError> {
    let v1 = cgroups_rs::hierarchies::V1::new();
    let Some(mut dir) = v1.get_mount_point(cgroups_rs::Controllers::CpuSet) else {
        return Ok(());
    };
    let components: Vec<&str> = path.split('/').collect();
    for component in &components[..components.len().saturating_sub(1)] {
        let parent = dir.clone();
        dir.push(component);
        let create_error = |e: std::io::Error| CgroupError::Create {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(create_error(e)),
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let current = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            if current.trim().is_empty() {
                let inherited = std::fs::read_to_string(parent.join(file)).map_err(create_error)?;
                std::fs::write(dir.join(file), inherited.trim()).map_err(create_error)?;
            }
        }
    }
    Ok(())
}

fn limit_value(limit: i64) -> Option<u64> {
    // v1 reports "unlimited" as a huge page-aligned number.
    if !(0..(i64::MAX / 4096) * 4096).contains(&limit) {
        None
    } else {
        Some(limit as u64)
    }
}

/// cpu.shares (2..262144) to cgroup2 cpu.weight (1..10000), the formula runc uses.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + ((shares.clamp(2, 262144) - 2) * 9999) / 262142
}

fn apply_device_rule(
    ctl: &DevicesController,
    rule: &LinuxDeviceCgroup,
) -> cgroups_rs::error::Result<()> {
    let devtype = match rule.typ() {
        Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => DeviceType::Char,
        Some(LinuxDeviceType::B) => DeviceType::Block,
        _ => DeviceType::All,
    };
    let access = rule.access().clone().unwrap_or_else(|| "rwm".to_string());
    let perms: Vec<DevicePermissions> = access
        .chars()
        .filter_map(|c| match c {
            'r' => Some(DevicePermissions::Read),
            'w' => Some(DevicePermissions::Write),
            'm' => Some(DevicePermissions::MkNod),
            _ => None,
        })
        .collect();
    let major = rule.major().unwrap_or(-1);
    let minor = rule.minor().unwrap_or(-1);
    if rule.allow() {
        ctl.allow_device(devtype, major, minor, &perms)
    } else {
        ctl.deny_device(devtype, major, minor, &perms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths() {
        assert_eq!(cgroup_path(None, "web1").unwrap(), "ve-runtime/web1");
        assert_eq!(
            cgroup_path(Some(Path::new("/ves/web1")), "x").unwrap(),
            "ves/web1"
        );
        assert!(cgroup_path(Some(Path::new("system.slice:ve:web1")), "x").is_err());
        assert!(cgroup_path(Some(Path::new("/a/../b")), "x").is_err());
        assert!(cgroup_path(Some(Path::new("/")), "x").is_err());
    }

    #[test]
    fn shares_convert_to_weight() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262144), 10000);
        assert_eq!(shares_to_weight(1024), 39);
    }
}

//! Reads what the views are computed from: a VE's cgroup (v1 or v2) and the
//! host's /proc files.
//!
//! The thin I/O layer: file reads go through [`CgroupFiles`]; turning file
//! contents into the renderer's inputs is done by pure functions
//! ([`memory_from_v1`], [`memory_from_v2`], [`cpu_usage_from_v2`]) tested from samples.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::cgroup_files::{self, CgroupParseError, CpuQuota, CpuTimeNs, DeviceIo};
use super::host_files::{self, HostCpuinfo, HostDisk, HostMeminfo, HostParseError, HostStat};
use super::render::{VeCpuUsage, VeMemory, VeMemoryStat, VeSwap, VeTasks};

/// Deepest cgroup nesting walked when collecting a VE's tasks (systemd in a VE nests).
const MAX_CGROUP_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("VE {ve_id} has no cgroup under {parent_path}: it is not running on this node")]
    VeGone { ve_id: String, parent_path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("unexpected content in {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: CgroupParseError,
    },
    #[error("unexpected content in {path}: {source}")]
    Host {
        path: PathBuf,
        source: HostParseError,
    },
    #[error("no cgroup filesystem found at {root}: expected v1 controllers (memory/, cpuacct/...) or a cgroup2 mount")]
    NoCgroupFs { root: PathBuf },
    #[error("invalid VE id {ve_id:?}: use letters, digits, '-', '_' and '.', not starting with '.', at most 64 characters")]
    InvalidVeId { ve_id: String },
}

/// A VE id usable as a cgroup directory and a path component.
pub fn validate_ve_id(ve_id: &str) -> Result<(), SourceError> {
    let valid = !ve_id.is_empty()
        && ve_id.len() <= 64
        && !ve_id.starts_with('.')
        && ve_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(SourceError::InvalidVeId {
            ve_id: ve_id.to_string(),
        })
    }
}

/// Which cgroup hierarchy the host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Controllers mounted separately under `<root>/<controller>` (hybrid hosts too).
    V1 { root: PathBuf },
    /// One unified hierarchy at `<root>`.
    V2 { root: PathBuf },
}

impl CgroupLayout {
    /// Detects the layout under `root` (normally /sys/fs/cgroup). v1 wins on
    /// hybrid hosts because the memory and cpu controllers live there.
    pub fn detect(root: &Path) -> Result<Self, SourceError> {
        if root.join("memory").join("memory.limit_in_bytes").exists() {
            Ok(CgroupLayout::V1 {
                root: root.to_path_buf(),
            })
        } else if root.join("cgroup.controllers").exists() {
            Ok(CgroupLayout::V2 {
                root: root.to_path_buf(),
            })
        } else {
            Err(SourceError::NoCgroupFs {
                root: root.to_path_buf(),
            })
        }
    }
}

/// Access to the cgroups of the VEs under one parent (`<parent>/<ve-id>`).
#[derive(Debug, Clone)]
pub struct CgroupFiles {
    layout: CgroupLayout,
    parent: String,
}

/// A VE's cpu configuration and usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeCpu {
    pub cpuset: Vec<u32>,
    pub quota: Option<CpuQuota>,
    pub usage: VeCpuUsage,
}

fn read_text(path: &Path) -> Result<String, SourceError> {
    fs::read_to_string(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_optional(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn cgroup_value<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, CgroupParseError>,
) -> Result<T, SourceError> {
    let text = read_text(path)?;
    parse(&text).map_err(|source| SourceError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

impl CgroupFiles {
    pub fn new(layout: CgroupLayout, parent: &str) -> Self {
        CgroupFiles {
            layout,
            parent: parent.trim_matches('/').to_string(),
        }
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// The directory holding all VE cgroups, in the controller that decides whether a VE exists.
    pub fn parent_dir(&self) -> PathBuf {
        match &self.layout {
            CgroupLayout::V1 { root } => root.join("memory").join(&self.parent),
            CgroupLayout::V2 { root } => root.join(&self.parent),
        }
    }

    /// A VE's cgroup directory in a v1 controller (ignored on v2: one directory).
    fn ve_dir(&self, controller: &str, ve_id: &str) -> PathBuf {
        match &self.layout {
            CgroupLayout::V1 { root } => root.join(controller).join(&self.parent).join(ve_id),
            CgroupLayout::V2 { root } => root.join(&self.parent).join(ve_id),
        }
    }

    /// Whether the VE's cgroup exists: its /proc views exist iff it does.
    pub fn exists(&self, ve_id: &str) -> bool {
        validate_ve_id(ve_id).is_ok() && self.parent_dir().join(ve_id).is_dir()
    }

    /// Ids of all VEs with a cgroup under the parent, sorted.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.parent_dir()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false))
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|id| validate_ve_id(id).is_ok())
            .collect();
        ids.sort();
        ids
    }

    /// Turns a failed read into VeGone when the VE's cgroup vanished meanwhile.
    fn check_gone(&self, ve_id: &str, error: SourceError) -> SourceError {
        if self.exists(ve_id) {
            error
        } else {
            SourceError::VeGone {
                ve_id: ve_id.to_string(),
                parent_path: self.parent_dir(),
            }
        }
    }

    pub fn memory(&self, ve_id: &str) -> Result<VeMemory, SourceError> {
        self.read_memory(ve_id)
            .map_err(|error| self.check_gone(ve_id, error))
    }

    fn read_memory(&self, ve_id: &str) -> Result<VeMemory, SourceError> {
        let dir = self.ve_dir("memory", ve_id);
        match self.layout {
            CgroupLayout::V1 { .. } => {
                let limit = cgroup_value(&dir.join("memory.limit_in_bytes"), |t| {
                    cgroup_files::parse_limit("memory.limit_in_bytes", t)
                })?;
                let usage = cgroup_value(&dir.join("memory.usage_in_bytes"), |t| {
                    cgroup_files::parse_counter("memory.usage_in_bytes", t)
                })?;
                let stat = read_text(&dir.join("memory.stat"))?;
                let memsw_limit = read_optional(&dir.join("memory.memsw.limit_in_bytes"));
                let memsw_usage = read_optional(&dir.join("memory.memsw.usage_in_bytes"));
                Ok(memory_from_v1(
                    limit,
                    usage,
                    memsw_limit.as_deref(),
                    memsw_usage.as_deref(),
                    &stat,
                ))
            }
            CgroupLayout::V2 { .. } => {
                let max = read_text(&dir.join("memory.max"))?;
                let current = read_text(&dir.join("memory.current"))?;
                let stat = read_text(&dir.join("memory.stat"))?;
                let swap_max = read_optional(&dir.join("memory.swap.max"));
                let swap_current = read_optional(&dir.join("memory.swap.current"));
                let mut memory = memory_from_v2(
                    &max,
                    &current,
                    swap_max.as_deref(),
                    swap_current.as_deref(),
                    &stat,
                )
                .map_err(|source| SourceError::Cgroup {
                    path: dir.clone(),
                    source,
                })?;
                // v2 has no hierarchical_memory_limit: a limit on the parent caps each VE too.
                let parent_max = dir
                    .parent()
                    .and_then(|parent| read_optional(&parent.join("memory.max")))
                    .and_then(|text| cgroup_files::parse_limit("memory.max", &text).ok())
                    .flatten();
                memory.limit_bytes = min_limit(memory.limit_bytes, parent_max);
                Ok(memory)
            }
        }
    }

    pub fn cpu(&self, ve_id: &str) -> Result<VeCpu, SourceError> {
        self.read_cpu(ve_id)
            .map_err(|error| self.check_gone(ve_id, error))
    }

    fn read_cpu(&self, ve_id: &str) -> Result<VeCpu, SourceError> {
        match &self.layout {
            CgroupLayout::V1 { root } => {
                let cpuset_dir = self.ve_dir("cpuset", ve_id);
                let cpuset = first_cpu_list(&[
                    cpuset_dir.join("cpuset.effective_cpus"),
                    cpuset_dir.join("cpuset.cpus"),
                    root.join("cpuset").join("cpuset.effective_cpus"),
                    PathBuf::from("/sys/devices/system/cpu/online"),
                ]);
                let cpu_dir = self.ve_dir("cpu", ve_id);
                // A quota on the parent (all VEs together) caps each VE too.
                let quota = tightest_quota([cpu_dir.as_path(), cpu_dir.parent().unwrap_or(&cpu_dir)].into_iter().map(|dir| {
                    match (read_optional(&dir.join("cpu.cfs_quota_us")), read_optional(&dir.join("cpu.cfs_period_us"))) {
                        (Some(quota), Some(period)) => cgroup_files::parse_cfs_quota(&quota, &period).unwrap_or_else(|error| {
                            tracing::warn!(ve_id, path = %dir.display(), %error, "ignoring unreadable cpu quota");
                            None
                        }),
                        _ => None,
                    }
                }));
                let cpuacct_dir = self.ve_dir("cpuacct", ve_id);
                let usage = match read_optional(&cpuacct_dir.join("cpuacct.usage_all"))
                    .map(|t| cgroup_files::parse_cpuacct_usage_all(&t))
                {
                    Some(Ok(per_cpu)) => VeCpuUsage::PerHostCpu(per_cpu),
                    _ => {
                        // Older kernels: cpuacct.stat counts USER_HZ ticks.
                        let stat = cgroup_files::parse_flat_keyed(
                            &read_optional(&cpuacct_dir.join("cpuacct.stat")).unwrap_or_default(),
                        );
                        let tick_ns = 1_000_000_000 / clock_ticks_per_second();
                        VeCpuUsage::Total(CpuTimeNs {
                            user_ns: stat
                                .get("user")
                                .copied()
                                .unwrap_or(0)
                                .saturating_mul(tick_ns),
                            system_ns: stat
                                .get("system")
                                .copied()
                                .unwrap_or(0)
                                .saturating_mul(tick_ns),
                        })
                    }
                };
                Ok(VeCpu {
                    cpuset,
                    quota,
                    usage,
                })
            }
            CgroupLayout::V2 { root } => {
                let dir = self.ve_dir("", ve_id);
                let cpuset = first_cpu_list(&[
                    dir.join("cpuset.cpus.effective"),
                    root.join("cpuset.cpus.effective"),
                    PathBuf::from("/sys/devices/system/cpu/online"),
                ]);
                let quota = tightest_quota(
                    [dir.as_path(), dir.parent().unwrap_or(&dir)]
                        .into_iter()
                        .map(|dir| {
                            read_optional(&dir.join("cpu.max"))
                                .and_then(|text| cgroup_files::parse_cpu_max(&text).ok())
                                .flatten()
                        }),
                );
                let usage = cpu_usage_from_v2(&read_text(&dir.join("cpu.stat"))?);
                Ok(VeCpu {
                    cpuset,
                    quota,
                    usage,
                })
            }
        }
    }

    /// Counts the VE's tasks, walking its cgroup subtree.
    pub fn tasks(&self, ve_id: &str) -> Result<VeTasks, SourceError> {
        let dir = self.ve_dir("memory", ve_id);
        let mut pids = Vec::new();
        collect_pids(&dir, 0, &mut pids).map_err(|error| self.check_gone(ve_id, error))?;
        let mut tasks = VeTasks::default();
        for pid in pids {
            // Tasks exit while we look: skip those that vanished.
            let Some(process) = read_optional(Path::new(&format!("/proc/{pid}/stat")))
                .and_then(|text| host_files::parse_task_stat(&text).ok())
            else {
                continue;
            };
            tasks.processes += 1;
            tasks.oldest_start_ticks = Some(
                tasks
                    .oldest_start_ticks
                    .map_or(process.start_ticks, |oldest| {
                        oldest.min(process.start_ticks)
                    }),
            );
            let Ok(threads) = fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for thread in threads.filter_map(Result::ok) {
                let Some(stat) = read_optional(&thread.path().join("stat"))
                    .and_then(|text| host_files::parse_task_stat(&text).ok())
                else {
                    continue;
                };
                tasks.threads += 1;
                match stat.state {
                    'R' => tasks.running += 1,
                    'D' => tasks.blocked += 1,
                    _ => {}
                }
            }
        }
        Ok(tasks)
    }

    /// Block I/O done by the VE, per device.
    pub fn block_io(&self, ve_id: &str) -> Vec<DeviceIo> {
        match self.layout {
            CgroupLayout::V1 { .. } => {
                let dir = self.ve_dir("blkio", ve_id);
                let bytes = read_optional(&dir.join("blkio.throttle.io_service_bytes_recursive"))
                    .unwrap_or_default();
                let ios = read_optional(&dir.join("blkio.throttle.io_serviced_recursive"))
                    .unwrap_or_default();
                cgroup_files::parse_blkio_v1(&bytes, &ios)
            }
            CgroupLayout::V2 { .. } => cgroup_files::parse_io_stat_v2(
                &read_optional(&self.ve_dir("", ve_id).join("io.stat")).unwrap_or_default(),
            ),
        }
    }
}

fn first_cpu_list(candidates: &[PathBuf]) -> Vec<u32> {
    for path in candidates {
        if let Some(text) = read_optional(path) {
            match cgroup_files::parse_cpu_list(&text) {
                Ok(cpus) if !cpus.is_empty() => return cpus,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "ignoring unreadable cpu list")
                }
            }
        }
    }
    vec![0]
}

fn collect_pids(dir: &Path, depth: usize, pids: &mut Vec<u32>) -> Result<(), SourceError> {
    pids.extend(cgroup_files::parse_pid_list(&read_text(
        &dir.join("cgroup.procs"),
    )?));
    if depth >= MAX_CGROUP_DEPTH {
        return Ok(());
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false) {
            // A child removed meanwhile is not an error of the VE.
            let _ = collect_pids(&entry.path(), depth + 1, pids);
        }
    }
    Ok(())
}

/// Clock ticks per second (USER_HZ), the unit of /proc/<pid>/stat times.
pub fn clock_ticks_per_second() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => 100,
    }
}

/// The quota allowing the least cpu time per second; None if none limits.
pub fn tightest_quota(quotas: impl IntoIterator<Item = Option<CpuQuota>>) -> Option<CpuQuota> {
    quotas.into_iter().flatten().min_by(|a, b| {
        // Compare quota/period ratios without division.
        (a.quota_us as u128 * b.period_us as u128).cmp(&(b.quota_us as u128 * a.period_us as u128))
    })
}

fn min_limit(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Builds [`VeMemory`] from v1 memory controller files. `hierarchical_*` fields of
/// memory.stat bring in limits set on ancestors (e.g. on the whole `vz` parent).
pub fn memory_from_v1(
    limit: Option<u64>,
    usage: u64,
    memsw_limit: Option<&str>,
    memsw_usage: Option<&str>,
    stat_text: &str,
) -> VeMemory {
    let stat = cgroup_files::parse_flat_keyed(stat_text);
    let field = |name: &str| stat.get(name).copied().unwrap_or(0);
    let unlimited_sentinel = |value: u64| (value < (1 << 62)).then_some(value);
    let limit = min_limit(
        limit,
        stat.get("hierarchical_memory_limit")
            .copied()
            .and_then(unlimited_sentinel),
    );
    let swap = match (
        memsw_limit.and_then(|t| cgroup_files::parse_limit("memory.memsw.limit_in_bytes", t).ok()),
        memsw_usage
            .and_then(|t| cgroup_files::parse_counter("memory.memsw.usage_in_bytes", t).ok()),
    ) {
        (Some(memsw_limit), Some(memsw_usage)) => {
            let memsw_limit = min_limit(
                memsw_limit,
                stat.get("hierarchical_memsw_limit")
                    .copied()
                    .and_then(unlimited_sentinel),
            );
            let limit_bytes = match (memsw_limit, limit) {
                (Some(memsw), Some(memory)) => Some(memsw.saturating_sub(memory)),
                (Some(memsw), None) => Some(memsw),
                (None, _) => None,
            };
            VeSwap::Accounted {
                limit_bytes,
                usage_bytes: memsw_usage.saturating_sub(usage),
            }
        }
        _ => VeSwap::NotAccounted,
    };
    VeMemory {
        limit_bytes: limit,
        usage_bytes: usage,
        swap,
        stat: VeMemoryStat {
            cache: field("total_cache"),
            anon: field("total_rss"),
            shmem: field("total_shmem"),
            mapped_file: field("total_mapped_file"),
            dirty: field("total_dirty"),
            writeback: field("total_writeback"),
            active_anon: field("total_active_anon"),
            inactive_anon: field("total_inactive_anon"),
            active_file: field("total_active_file"),
            inactive_file: field("total_inactive_file"),
            unevictable: field("total_unevictable"),
            slab_reclaimable: None,
            slab_unreclaimable: None,
            kernel_stack: None,
            page_tables: None,
        },
    }
}

/// Builds [`VeMemory`] from v2 files (memory.max, memory.current, memory.swap.*, memory.stat).
pub fn memory_from_v2(
    max: &str,
    current: &str,
    swap_max: Option<&str>,
    swap_current: Option<&str>,
    stat_text: &str,
) -> Result<VeMemory, CgroupParseError> {
    let stat = cgroup_files::parse_flat_keyed(stat_text);
    let field = |name: &str| stat.get(name).copied().unwrap_or(0);
    let swap = match (swap_max, swap_current) {
        (Some(max), Some(current)) => VeSwap::Accounted {
            limit_bytes: cgroup_files::parse_limit("memory.swap.max", max)?,
            usage_bytes: cgroup_files::parse_counter("memory.swap.current", current)?,
        },
        _ => VeSwap::NotAccounted,
    };
    Ok(VeMemory {
        limit_bytes: cgroup_files::parse_limit("memory.max", max)?,
        usage_bytes: cgroup_files::parse_counter("memory.current", current)?,
        swap,
        stat: VeMemoryStat {
            cache: field("file"),
            anon: field("anon"),
            shmem: field("shmem"),
            mapped_file: field("file_mapped"),
            dirty: field("file_dirty"),
            writeback: field("file_writeback"),
            active_anon: field("active_anon"),
            inactive_anon: field("inactive_anon"),
            active_file: field("active_file"),
            inactive_file: field("inactive_file"),
            unevictable: field("unevictable"),
            slab_reclaimable: stat.get("slab_reclaimable").copied(),
            slab_unreclaimable: stat.get("slab_unreclaimable").copied(),
            kernel_stack: stat.get("kernel_stack").copied(),
            page_tables: stat.get("pagetables").copied(),
        },
    })
}

/// v2 cpu.stat: usage in microseconds, split into user and system.
pub fn cpu_usage_from_v2(stat_text: &str) -> VeCpuUsage {
    let stat = cgroup_files::parse_flat_keyed(stat_text);
    let micros = |name: &str| stat.get(name).copied().unwrap_or(0).saturating_mul(1000);
    let (user_ns, system_ns) = match (stat.get("user_usec"), stat.get("system_usec")) {
        (Some(_), Some(_)) => (micros("user_usec"), micros("system_usec")),
        _ => (micros("usage_usec"), 0),
    };
    VeCpuUsage::Total(CpuTimeNs { user_ns, system_ns })
}

/// The host's /proc files, read per request (they change all the time).
#[derive(Debug, Clone)]
pub struct HostProc {
    root: PathBuf,
}

impl Default for HostProc {
    fn default() -> Self {
        HostProc {
            root: PathBuf::from("/proc"),
        }
    }
}

impl HostProc {
    fn read(&self, name: &str) -> Result<(PathBuf, String), SourceError> {
        let path = self.root.join(name);
        let text = read_text(&path)?;
        Ok((path, text))
    }

    pub fn meminfo(&self) -> Result<HostMeminfo, SourceError> {
        let (path, text) = self.read("meminfo")?;
        HostMeminfo::parse(&text).map_err(|source| SourceError::Host { path, source })
    }

    pub fn cpuinfo(&self) -> Result<HostCpuinfo, SourceError> {
        Ok(HostCpuinfo::parse(&self.read("cpuinfo")?.1))
    }

    pub fn stat(&self) -> Result<HostStat, SourceError> {
        let (path, text) = self.read("stat")?;
        HostStat::parse(&text).map_err(|source| SourceError::Host { path, source })
    }

    pub fn uptime_seconds(&self) -> Result<f64, SourceError> {
        let (path, text) = self.read("uptime")?;
        host_files::parse_uptime_seconds(&text).map_err(|source| SourceError::Host { path, source })
    }

    pub fn disks(&self) -> Result<Vec<HostDisk>, SourceError> {
        Ok(host_files::parse_diskstats_devices(
            &self.read("diskstats")?.1,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn ve_ids() {
        assert!(validate_ve_id("web1").is_ok());
        assert!(validate_ve_id("ve-42_a.b").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_ve_id(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn v1_memory_with_swap_and_hierarchy() {
        let stat = format!(
            "cache 1\ntotal_cache {}\ntotal_rss {}\ntotal_shmem 4096\ntotal_active_file {}\nhierarchical_memory_limit {}\nhierarchical_memsw_limit {}\n",
            10 * MIB,
            20 * MIB,
            8 * MIB,
            128 * MIB,
            9_223_372_036_854_771_712u64
        );
        let memsw_limit = format!("{}\n", 384 * MIB);
        let memsw_usage = format!("{}\n", 40 * MIB);
        let memory = memory_from_v1(
            Some(256 * MIB),
            30 * MIB,
            Some(&memsw_limit),
            Some(&memsw_usage),
            &stat,
        );
        assert_eq!(memory.limit_bytes, Some(128 * MIB), "parent limit is lower");
        assert_eq!(
            memory.swap,
            VeSwap::Accounted {
                limit_bytes: Some(256 * MIB),
                usage_bytes: 10 * MIB
            }
        );
        assert_eq!(memory.stat.cache, 10 * MIB);
        assert_eq!(memory.stat.anon, 20 * MIB);
        assert_eq!(memory.stat.active_file, 8 * MIB);
        assert_eq!(memory.stat.slab_reclaimable, None);
    }

    #[test]
    fn v1_memory_without_swap_accounting_or_with_garbage() {
        let memory = memory_from_v1(None, 5, None, None, "garbage\n");
        assert_eq!(memory.limit_bytes, None);
        assert_eq!(memory.swap, VeSwap::NotAccounted);
        let memory = memory_from_v1(Some(100), 5, Some("nonsense"), Some("7"), "");
        assert_eq!(memory.swap, VeSwap::NotAccounted);
        let memory = memory_from_v1(Some(100), 5, Some("9223372036854771712"), Some("7"), "");
        assert_eq!(
            memory.swap,
            VeSwap::Accounted {
                limit_bytes: None,
                usage_bytes: 2
            }
        );
    }

    #[test]
    fn v2_memory() {
        let stat = "anon 1048576\nfile 2097152\nshmem 4096\nfile_mapped 8192\nactive_file 1048576\ninactive_file 524288\nslab_reclaimable 65536\nslab_unreclaimable 32768\nkernel_stack 16384\npagetables 8192\n";
        let memory =
            memory_from_v2("268435456\n", "3145728\n", Some("max\n"), Some("0\n"), stat).unwrap();
        assert_eq!(memory.limit_bytes, Some(256 * MIB));
        assert_eq!(memory.usage_bytes, 3 * MIB);
        assert_eq!(
            memory.swap,
            VeSwap::Accounted {
                limit_bytes: None,
                usage_bytes: 0
            }
        );
        assert_eq!(memory.stat.anon, MIB);
        assert_eq!(memory.stat.cache, 2 * MIB);
        assert_eq!(memory.stat.slab_reclaimable, Some(65536));
        assert_eq!(memory.stat.kernel_stack, Some(16384));
        assert_eq!(memory.stat.page_tables, Some(8192));
        let unlimited = memory_from_v2("max\n", "0\n", None, None, "").unwrap();
        assert_eq!(unlimited.limit_bytes, None);
        assert_eq!(unlimited.swap, VeSwap::NotAccounted);
        assert!(memory_from_v2("lots\n", "0\n", None, None, "").is_err());
        assert!(memory_from_v2("max\n", "-5\n", None, None, "").is_err());
    }

    #[test]
    fn tightest_quota_compares_ratios() {
        let quota = |quota_us, period_us| {
            Some(CpuQuota {
                quota_us,
                period_us,
            })
        };
        assert_eq!(tightest_quota([None, None]), None);
        assert_eq!(
            tightest_quota([quota(200_000, 100_000), None]),
            quota(200_000, 100_000)
        );
        assert_eq!(
            tightest_quota([quota(200_000, 100_000), quota(50_000, 10_000)]),
            quota(200_000, 100_000)
        );
        assert_eq!(
            tightest_quota([quota(300_000, 100_000), quota(20_000, 10_000)]),
            quota(20_000, 10_000)
        );
    }

    #[test]
    fn v2_cpu_stat() {
        let usage =
            cpu_usage_from_v2("usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\nnr_periods 0\n");
        assert_eq!(
            usage,
            VeCpuUsage::Total(CpuTimeNs {
                user_ns: 2_000_000,
                system_ns: 1_000_000
            })
        );
        let only_total = cpu_usage_from_v2("usage_usec 5\n");
        assert_eq!(
            only_total,
            VeCpuUsage::Total(CpuTimeNs {
                user_ns: 5000,
                system_ns: 0
            })
        );
        assert_eq!(
            cpu_usage_from_v2("junk"),
            VeCpuUsage::Total(CpuTimeNs::default())
        );
    }

    #[test]
    fn layout_detection_on_sample_trees() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            CgroupLayout::detect(dir.path()),
            Err(SourceError::NoCgroupFs { .. })
        ));
        fs::write(dir.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        assert_eq!(
            CgroupLayout::detect(dir.path()).unwrap(),
            CgroupLayout::V2 {
                root: dir.path().to_path_buf()
            }
        );
        fs::create_dir(dir.path().join("memory")).unwrap();
        fs::write(
            dir.path().join("memory").join("memory.limit_in_bytes"),
            "1\n",
        )
        .unwrap();
        assert_eq!(
            CgroupLayout::detect(dir.path()).unwrap(),
            CgroupLayout::V1 {
                root: dir.path().to_path_buf()
            }
        );
    }

    #[test]
    fn v2_tree_from_sample_files() {
        // A fake cgroup2 tree: the reading layer resolves paths and parses the samples.
        let dir = tempfile::tempdir().unwrap();
        let ve = dir.path().join("vz").join("web1");
        fs::create_dir_all(&ve).unwrap();
        fs::create_dir_all(dir.path().join("vz").join(".hidden")).unwrap();
        for (name, content) in [
            ("memory.max", "268435456\n"),
            ("memory.current", "1048576\n"),
            ("memory.stat", "anon 1048576\nfile 0\n"),
            ("cpu.max", "100000 100000\n"),
            ("cpuset.cpus.effective", "0-3\n"),
            ("cpu.stat", "usage_usec 10\nuser_usec 6\nsystem_usec 4\n"),
            ("io.stat", "7:3 rbytes=512 wbytes=0 rios=1 wios=0\n"),
            ("cgroup.procs", ""),
        ] {
            fs::write(ve.join(name), content).unwrap();
        }
        fs::write(dir.path().join("vz").join("memory.max"), "max\n").unwrap();
        let cgroups = CgroupFiles::new(
            CgroupLayout::V2 {
                root: dir.path().to_path_buf(),
            },
            "vz",
        );
        assert_eq!(cgroups.list(), vec!["web1".to_string()]);
        assert!(cgroups.exists("web1"));
        assert!(!cgroups.exists("web2"));
        assert!(!cgroups.exists("../vz"));
        assert_eq!(cgroups.memory("web1").unwrap().limit_bytes, Some(256 * MIB));
        let cpu = cgroups.cpu("web1").unwrap();
        assert_eq!(cpu.cpuset, vec![0, 1, 2, 3]);
        assert_eq!(
            cpu.quota,
            Some(CpuQuota {
                quota_us: 100_000,
                period_us: 100_000
            })
        );
        assert_eq!(
            cpu.usage,
            VeCpuUsage::Total(CpuTimeNs {
                user_ns: 6000,
                system_ns: 4000
            })
        );
        assert_eq!(cgroups.block_io("web1")[0].read_bytes, 512);
        // Limits on the parent cap the VE.
        fs::write(dir.path().join("vz").join("memory.max"), "134217728\n").unwrap();
        fs::write(dir.path().join("vz").join("cpu.max"), "50000 100000\n").unwrap();
        assert_eq!(cgroups.memory("web1").unwrap().limit_bytes, Some(128 * MIB));
        assert_eq!(
            cgroups.cpu("web1").unwrap().quota,
            Some(CpuQuota {
                quota_us: 50_000,
                period_us: 100_000
            })
        );
        assert_eq!(cgroups.tasks("web1").unwrap(), VeTasks::default());
        assert!(matches!(
            cgroups.memory("web2"),
            Err(SourceError::VeGone { .. })
        ));
        fs::write(ve.join("memory.max"), "garbage\n").unwrap();
        assert!(matches!(
            cgroups.memory("web1"),
            Err(SourceError::Cgroup { .. })
        ));
    }
}

//! Renders each per-VE /proc file from parsed inputs.
//!
//! Everything here is pure: the inputs are the host's own files (parsed) and
//! the VE's cgroup numbers, so the views are tested exhaustively without root.
//! The formats follow the kernel's, field for field, so procps and busybox
//! tools parse them unchanged.

use super::cgroup_files::{CpuQuota, CpuTimeNs, DeviceIo};
use super::host_files::{HostCpuinfo, HostDisk, HostMeminfo, HostStat};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The VE's memory cgroup numbers, all in bytes, normalized across v1 and v2.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VeMemory {
    /// None: no limit (the view shows the host's total).
    pub limit_bytes: Option<u64>,
    /// Charged memory, page cache included (v1 memory.usage_in_bytes, v2 memory.current).
    pub usage_bytes: u64,
    pub swap: VeSwap,
    pub stat: VeMemoryStat,
}

/// Swap as the VE sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VeSwap {
    /// The kernel does not account swap per cgroup: the VE is shown no swap.
    #[default]
    NotAccounted,
    /// `limit_bytes` of swap on top of memory (None: unlimited, capped by the host's swap).
    Accounted {
        limit_bytes: Option<u64>,
        usage_bytes: u64,
    },
}

/// Breakdown from memory.stat (v1 total_* fields, v2 plain fields), in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VeMemoryStat {
    /// Page cache (v1 total_cache, v2 file).
    pub cache: u64,
    /// Anonymous memory (v1 total_rss, v2 anon).
    pub anon: u64,
    pub shmem: u64,
    pub mapped_file: u64,
    pub dirty: u64,
    pub writeback: u64,
    pub active_anon: u64,
    pub inactive_anon: u64,
    pub active_file: u64,
    pub inactive_file: u64,
    pub unevictable: u64,
    /// Only v2 reports these; v1 leaves them None and the host value is scaled.
    pub slab_reclaimable: Option<u64>,
    pub slab_unreclaimable: Option<u64>,
    pub kernel_stack: Option<u64>,
    pub page_tables: Option<u64>,
}

/// Host fields that describe hardware or address space, not amounts of memory in use:
/// shown as the host has them.
fn is_passthrough_meminfo_field(name: &str) -> bool {
    name.starts_with("HugePages_")
        || name.starts_with("DirectMap")
        || name.starts_with("Vmalloc")
        || name == "Hugepagesize"
        || name == "Hugetlb"
}

fn kb(bytes: u64) -> u64 {
    bytes / 1024
}

/// Renders the VE's /proc/meminfo, keeping the host's field order.
///
/// MemTotal is the limit (capped by the host's RAM), MemFree is what the VE may still
/// charge, MemAvailable adds its reclaimable page cache and slab. Host-wide amounts
/// the cgroup does not break down are scaled by MemTotal(VE)/MemTotal(host).
pub fn render_meminfo(host: &HostMeminfo, ve: &VeMemory) -> String {
    let host_total = host.get("MemTotal").unwrap_or(0);
    let total = ve
        .limit_bytes
        .map_or(host_total, |limit| kb(limit).min(host_total));
    let used = kb(ve.usage_bytes).min(total);
    let free = total - used;
    let stat = &ve.stat;
    let reclaimable = stat.active_file + stat.inactive_file + stat.slab_reclaimable.unwrap_or(0);
    let available = (free + kb(reclaimable)).min(total);
    let host_swap_total = host.get("SwapTotal").unwrap_or(0);
    let (swap_total, swap_free) = match ve.swap {
        VeSwap::NotAccounted => (0, 0),
        VeSwap::Accounted {
            limit_bytes,
            usage_bytes,
        } => {
            let swap_total =
                limit_bytes.map_or(host_swap_total, |limit| kb(limit).min(host_swap_total));
            (swap_total, swap_total - kb(usage_bytes).min(swap_total))
        }
    };
    let scale = |value: u64| -> u64 {
        if host_total == 0 {
            return value.min(total);
        }
        ((value as u128 * total as u128) / host_total as u128) as u64
    };
    let cap = |value: u64| kb(value).min(total);
    let slab_reclaimable = stat.slab_reclaimable.map(cap);
    let slab_unreclaimable = stat.slab_unreclaimable.map(cap);

    let mut out = String::with_capacity(host.entries.len() * 32);
    for entry in &host.entries {
        let value = match entry.name.as_str() {
            "MemTotal" => total,
            "MemFree" => free,
            "MemAvailable" => available,
            "Buffers" | "SwapCached" => 0,
            "Cached" => cap(stat.cache).min(used),
            "Active" => cap(stat.active_anon + stat.active_file),
            "Inactive" => cap(stat.inactive_anon + stat.inactive_file),
            "Active(anon)" => cap(stat.active_anon),
            "Inactive(anon)" => cap(stat.inactive_anon),
            "Active(file)" => cap(stat.active_file),
            "Inactive(file)" => cap(stat.inactive_file),
            "Unevictable" => cap(stat.unevictable),
            "SwapTotal" => swap_total,
            "SwapFree" => swap_free,
            "Dirty" => cap(stat.dirty),
            "Writeback" => cap(stat.writeback),
            "AnonPages" => cap(stat.anon),
            "Mapped" => cap(stat.mapped_file),
            "Shmem" => cap(stat.shmem),
            "Slab" => match (slab_reclaimable, slab_unreclaimable) {
                (Some(reclaimable), Some(unreclaimable)) => {
                    (reclaimable + unreclaimable).min(total)
                }
                _ => scale(entry.value),
            },
            "SReclaimable" => slab_reclaimable.unwrap_or_else(|| scale(entry.value)),
            "SUnreclaim" => slab_unreclaimable.unwrap_or_else(|| scale(entry.value)),
            "KernelStack" => stat
                .kernel_stack
                .map(cap)
                .unwrap_or_else(|| scale(entry.value)),
            "PageTables" => stat
                .page_tables
                .map(cap)
                .unwrap_or_else(|| scale(entry.value)),
            name if is_passthrough_meminfo_field(name) || !entry.in_kb => entry.value,
            _ => scale(entry.value),
        };
        let label = format!("{}:", entry.name);
        if entry.in_kb {
            out.push_str(&format!("{label:<16}{value:>8} kB\n"));
        } else {
            out.push_str(&format!("{label:<16}{value:>8}\n"));
        }
    }
    out
}

/// How many cpus the VE sees: its cpuset, cut down to its quota rounded up.
pub fn visible_cpu_count(cpuset_size: usize, quota: Option<CpuQuota>) -> usize {
    let by_quota = quota.map_or(usize::MAX, |quota| quota.cpus_rounded_up());
    cpuset_size.min(by_quota).max(1)
}

/// The VE's cpus: the first [`visible_cpu_count`] host cpus of its cpuset.
/// An empty cpuset (garbage or not yet configured) falls back to host cpu 0.
pub fn visible_host_cpus(cpuset: &[u32], quota: Option<CpuQuota>) -> Vec<u32> {
    if cpuset.is_empty() {
        return vec![0];
    }
    cpuset[..visible_cpu_count(cpuset.len(), quota)].to_vec()
}

fn replace_value(line: &str, key: &str, value: impl std::fmt::Display) -> Option<String> {
    let (raw_key, _) = line.split_once(':')?;
    (raw_key.trim() == key).then(|| format!("{raw_key}: {value}"))
}

/// Renders /proc/cpuinfo with one block per visible cpu, renumbered 0..n-1, each
/// copied from the host block of the cpu it stands for.
pub fn render_cpuinfo(host: &HostCpuinfo, visible: &[u32]) -> String {
    let count = visible.len();
    let mut out = String::new();
    for (index, host_cpu) in visible.iter().enumerate() {
        let Some(block) = host
            .processors
            .iter()
            .find(|block| block.processor == *host_cpu)
            .or_else(|| host.processors.first())
        else {
            break;
        };
        for line in &block.lines {
            let rewritten = replace_value(line, "processor", index)
                .or_else(|| replace_value(line, "siblings", count))
                .or_else(|| replace_value(line, "cpu cores", count))
                .or_else(|| replace_value(line, "core id", index))
                .or_else(|| replace_value(line, "physical id", 0))
                .unwrap_or_else(|| line.clone());
            out.push_str(&rewritten);
            out.push('\n');
        }
        out.push('\n');
    }
    for block in &host.other_blocks {
        for line in block {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// Renders /sys/devices/system/cpu/online for `count` visible cpus: "0-3".
pub fn render_cpu_online(count: usize) -> String {
    match count {
        0 | 1 => "0\n".to_string(),
        count => format!("0-{}\n", count - 1),
    }
}

/// CPU usage of a VE as its cgroup reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VeCpuUsage {
    /// Per host cpu (v1 cpuacct.usage_all).
    PerHostCpu(Vec<(u32, CpuTimeNs)>),
    /// Only a total (v2 cpu.stat, or v1 without per-cpu files).
    Total(CpuTimeNs),
}

/// Time of one virtual cpu in USER_HZ ticks, as /proc/stat counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
    pub idle: u64,
}

impl CpuTicks {
    pub fn busy(&self) -> u64 {
        self.user + self.system
    }
}

fn ns_to_ticks(ns: u64, user_hz: u64) -> u64 {
    ((ns as u128 * user_hz as u128) / NANOS_PER_SECOND as u128) as u64
}

/// Splits the VE's cpu usage over its visible cpus.
///
/// When every cpu of the cpuset is visible, each virtual cpu shows its host cpu's
/// usage; when the quota hides some, the total is spread evenly (the VE cannot
/// run more than the quota anyway). Idle is the VE's uptime minus busy time.
pub fn virtual_cpu_times(
    usage: &VeCpuUsage,
    cpuset: &[u32],
    visible: &[u32],
    ve_uptime_seconds: f64,
    user_hz: u64,
) -> Vec<CpuTicks> {
    let uptime_ticks = (ve_uptime_seconds.max(0.0) * user_hz as f64) as u64;
    let with_idle = |user: u64, system: u64| CpuTicks {
        user,
        system,
        idle: uptime_ticks.saturating_sub(user + system),
    };
    if let VeCpuUsage::PerHostCpu(per_cpu) = usage {
        if visible.len() == cpuset.len() {
            return visible
                .iter()
                .map(|cpu| {
                    let time = per_cpu
                        .iter()
                        .find(|(id, _)| id == cpu)
                        .map(|(_, time)| *time)
                        .unwrap_or_default();
                    with_idle(
                        ns_to_ticks(time.user_ns, user_hz),
                        ns_to_ticks(time.system_ns, user_hz),
                    )
                })
                .collect();
        }
    }
    let total = match usage {
        VeCpuUsage::PerHostCpu(per_cpu) => {
            per_cpu
                .iter()
                .fold(CpuTimeNs::default(), |sum, (_, time)| CpuTimeNs {
                    user_ns: sum.user_ns.saturating_add(time.user_ns),
                    system_ns: sum.system_ns.saturating_add(time.system_ns),
                })
        }
        VeCpuUsage::Total(total) => *total,
    };
    let count = visible.len().max(1) as u64;
    let user = ns_to_ticks(total.user_ns, user_hz);
    let system = ns_to_ticks(total.system_ns, user_hz);
    (0..count)
        .map(|index| {
            // The remainder goes to cpu 0 so the sum stays exact.
            let share = |value: u64| value / count + if index == 0 { value % count } else { 0 };
            with_idle(share(user), share(system))
        })
        .collect()
}

/// Task counts of a VE, from the tasks of its cgroup subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VeTasks {
    /// Processes (thread group leaders).
    pub processes: u64,
    /// Threads, all states.
    pub threads: u64,
    /// Threads in state R.
    pub running: u64,
    /// Threads in state D.
    pub blocked: u64,
    /// Start of the VE's oldest process, clock ticks after host boot; None if empty.
    pub oldest_start_ticks: Option<u64>,
}

fn cpu_line(label: &str, ticks: &CpuTicks) -> String {
    format!(
        "{label} {} 0 {} {} 0 0 0 0 0 0\n",
        ticks.user, ticks.system, ticks.idle
    )
}

/// Renders /proc/stat: cpu lines of the virtual cpus, the VE's boot time and task
/// counts; interrupt and context-switch lines are the host's.
pub fn render_stat(cpus: &[CpuTicks], host: &HostStat, ve_btime: u64, tasks: &VeTasks) -> String {
    let total = cpus.iter().fold(CpuTicks::default(), |sum, cpu| CpuTicks {
        user: sum.user + cpu.user,
        system: sum.system + cpu.system,
        idle: sum.idle + cpu.idle,
    });
    let mut out = cpu_line("cpu ", &total);
    for (index, cpu) in cpus.iter().enumerate() {
        out.push_str(&cpu_line(&format!("cpu{index}"), cpu));
    }
    for line in host
        .passthrough_lines
        .iter()
        .filter(|line| !line.starts_with("softirq"))
    {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "btime {ve_btime}\nprocesses {}\nprocs_running {}\nprocs_blocked {}\n",
        tasks.processes, tasks.running, tasks.blocked
    ));
    for line in host
        .passthrough_lines
        .iter()
        .filter(|line| line.starts_with("softirq"))
    {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Seconds the VE has been up: host uptime minus its oldest process's start.
pub fn ve_uptime_seconds(
    host_uptime_seconds: f64,
    oldest_start_ticks: Option<u64>,
    clock_ticks_per_second: u64,
) -> f64 {
    match oldest_start_ticks {
        Some(start) => {
            (host_uptime_seconds - start as f64 / clock_ticks_per_second.max(1) as f64).max(0.0)
        }
        None => 0.0,
    }
}

/// Renders /proc/uptime: VE uptime and idle time summed over its cpus, as the kernel does.
pub fn render_uptime(ve_uptime_seconds: f64, cpus: &[CpuTicks], user_hz: u64) -> String {
    let busy_seconds = cpus.iter().map(CpuTicks::busy).sum::<u64>() as f64 / user_hz.max(1) as f64;
    let idle_seconds = (ve_uptime_seconds * cpus.len().max(1) as f64 - busy_seconds).max(0.0);
    format!("{ve_uptime_seconds:.2} {idle_seconds:.2}\n")
}

/// Renders /proc/loadavg. The last field (last pid) is 0: host pids mean nothing in the VE.
pub fn render_loadavg(averages: [f64; 3], tasks: &VeTasks) -> String {
    format!(
        "{:.2} {:.2} {:.2} {}/{} 0\n",
        averages[0], averages[1], averages[2], tasks.running, tasks.threads
    )
}

/// Renders /proc/swaps: one virtual device sized as the VE's swap, or none.
pub fn render_swaps(swap_total_kb: u64, swap_used_kb: u64) -> String {
    let mut out = String::from("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n");
    if swap_total_kb > 0 {
        out.push_str(&format!(
            "{:<40}virtual\t\t{swap_total_kb}\t\t{swap_used_kb}\t\t0\n",
            "none"
        ));
    }
    out
}

/// The VE's swap (total, used) in kB, computed as [`render_meminfo`] does.
pub fn ve_swap_kb(host: &HostMeminfo, ve: &VeMemory) -> (u64, u64) {
    let host_swap_total = host.get("SwapTotal").unwrap_or(0);
    match ve.swap {
        VeSwap::NotAccounted => (0, 0),
        VeSwap::Accounted {
            limit_bytes,
            usage_bytes,
        } => {
            let total = limit_bytes.map_or(host_swap_total, |limit| kb(limit).min(host_swap_total));
            (total, kb(usage_bytes).min(total))
        }
    }
}

/// Renders /proc/diskstats with only the devices the VE did I/O on, counting its I/O.
/// Timing and merge fields are 0: the cgroup does not track them.
pub fn render_diskstats(host_disks: &[HostDisk], ve_io: &[DeviceIo]) -> String {
    let mut out = String::new();
    for disk in host_disks {
        let Some(io) = ve_io
            .iter()
            .find(|io| io.major == disk.major && io.minor == disk.minor)
        else {
            continue;
        };
        out.push_str(&format!(
            "{:>4} {:>7} {} {} 0 {} 0 {} 0 {} 0 0 0 0 0 0 0 0 0 0\n",
            disk.major,
            disk.minor,
            disk.name,
            io.read_ios,
            io.read_bytes / 512,
            io.write_ios,
            io.write_bytes / 512
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn host_meminfo() -> HostMeminfo {
        HostMeminfo::parse(
            "MemTotal:        8388608 kB\nMemFree:         4194304 kB\nMemAvailable:    6000000 kB\nBuffers:          100000 kB\nCached:          1000000 kB\nSwapCached:            0 kB\nActive:           500000 kB\nInactive:         500000 kB\nSwapTotal:       2097152 kB\nSwapFree:        2097152 kB\nShmem:             10000 kB\nSlab:             200000 kB\nSReclaimable:     100000 kB\nSUnreclaim:       100000 kB\nCommitLimit:     4194304 kB\nVmallocTotal:   34359738367 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\nDirectMap4k:      200000 kB\n",
        )
        .unwrap()
    }

    fn field(rendered: &str, name: &str) -> u64 {
        rendered
            .lines()
            .find(|line| line.starts_with(&format!("{name}:")))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {rendered}"))
    }

    fn limited_ve() -> VeMemory {
        VeMemory {
            limit_bytes: Some(256 * MIB),
            usage_bytes: 100 * MIB,
            swap: VeSwap::Accounted {
                limit_bytes: Some(64 * MIB),
                usage_bytes: 16 * MIB,
            },
            stat: VeMemoryStat {
                cache: 40 * MIB,
                anon: 60 * MIB,
                shmem: 4 * MIB,
                active_file: 20 * MIB,
                inactive_file: 16 * MIB,
                active_anon: 50 * MIB,
                inactive_anon: 10 * MIB,
                ..VeMemoryStat::default()
            },
        }
    }

    #[test]
    fn meminfo_shows_the_limit() {
        let rendered = render_meminfo(&host_meminfo(), &limited_ve());
        assert_eq!(field(&rendered, "MemTotal"), 262_144);
        assert_eq!(field(&rendered, "MemFree"), 262_144 - 102_400);
        assert_eq!(
            field(&rendered, "MemAvailable"),
            262_144 - 102_400 + 36 * 1024
        );
        assert_eq!(field(&rendered, "Buffers"), 0);
        assert_eq!(field(&rendered, "Cached"), 40 * 1024);
        assert_eq!(field(&rendered, "Active"), 70 * 1024);
        assert_eq!(field(&rendered, "SwapTotal"), 65_536);
        assert_eq!(field(&rendered, "SwapFree"), 65_536 - 16_384);
        assert_eq!(field(&rendered, "Shmem"), 4096);
        // v1 has no slab breakdown: scaled from the host by 256 MiB / 8 GiB.
        assert_eq!(field(&rendered, "Slab"), 200_000 / 32);
        assert_eq!(field(&rendered, "CommitLimit"), 4_194_304 / 32);
        // Hardware and address-space fields pass through.
        assert_eq!(field(&rendered, "VmallocTotal"), 34_359_738_367);
        assert_eq!(field(&rendered, "Hugepagesize"), 2048);
        assert_eq!(field(&rendered, "DirectMap4k"), 200_000);
        assert!(rendered.contains("HugePages_Total:       0\n"));
        assert!(rendered.starts_with("MemTotal:         262144 kB\n"));
        assert_eq!(rendered.lines().count(), host_meminfo().entries.len());
    }

    #[test]
    fn meminfo_without_limit_shows_host_total() {
        let ve = VeMemory {
            limit_bytes: None,
            usage_bytes: 2 * 1024 * MIB,
            ..VeMemory::default()
        };
        let rendered = render_meminfo(&host_meminfo(), &ve);
        assert_eq!(field(&rendered, "MemTotal"), 8_388_608);
        assert_eq!(field(&rendered, "MemFree"), 8_388_608 - 2 * 1024 * 1024);
        assert_eq!(
            field(&rendered, "SwapTotal"),
            0,
            "swap not accounted: no swap shown"
        );
        assert_eq!(
            field(&rendered, "CommitLimit"),
            4_194_304,
            "ratio 1 keeps host values"
        );
    }

    #[test]
    fn meminfo_limit_above_host_is_capped_and_usage_above_limit_is_clamped() {
        let ve = VeMemory {
            limit_bytes: Some(64 * 1024 * MIB),
            usage_bytes: 128 * 1024 * MIB,
            swap: VeSwap::Accounted {
                limit_bytes: None,
                usage_bytes: 100 * 1024 * MIB,
            },
            stat: VeMemoryStat {
                active_file: 100 * 1024 * MIB,
                ..VeMemoryStat::default()
            },
        };
        let rendered = render_meminfo(&host_meminfo(), &ve);
        assert_eq!(field(&rendered, "MemTotal"), 8_388_608);
        assert_eq!(field(&rendered, "MemFree"), 0);
        assert_eq!(field(&rendered, "MemAvailable"), 8_388_608);
        assert_eq!(field(&rendered, "SwapTotal"), 2_097_152);
        assert_eq!(field(&rendered, "SwapFree"), 0);
    }

    #[test]
    fn meminfo_uses_v2_slab_breakdown() {
        let mut ve = limited_ve();
        ve.stat.slab_reclaimable = Some(2 * MIB);
        ve.stat.slab_unreclaimable = Some(MIB);
        ve.stat.kernel_stack = Some(MIB);
        let rendered = render_meminfo(&host_meminfo(), &ve);
        assert_eq!(field(&rendered, "SReclaimable"), 2048);
        assert_eq!(field(&rendered, "SUnreclaim"), 1024);
        assert_eq!(field(&rendered, "Slab"), 3072);
        assert_eq!(
            field(&rendered, "MemAvailable"),
            262_144 - 102_400 + 38 * 1024
        );
    }

    #[test]
    fn meminfo_with_empty_host_still_renders() {
        let host = HostMeminfo::parse("MemTotal: 0 kB\n").unwrap();
        assert_eq!(
            render_meminfo(&host, &limited_ve()),
            "MemTotal:              0 kB\n"
        );
    }

    #[test]
    fn visible_cpus_follow_cpuset_and_quota() {
        let quota = |q| {
            Some(CpuQuota {
                quota_us: q,
                period_us: 100_000,
            })
        };
        assert_eq!(visible_host_cpus(&[2, 3, 5], None), vec![2, 3, 5]);
        assert_eq!(visible_host_cpus(&[2, 3, 5], quota(150_000)), vec![2, 3]);
        assert_eq!(visible_host_cpus(&[2, 3, 5], quota(1_000)), vec![2]);
        assert_eq!(visible_host_cpus(&[2, 3, 5], quota(900_000)), vec![2, 3, 5]);
        assert_eq!(visible_host_cpus(&[], None), vec![0]);
    }

    const HOST_CPUINFO: &str = "processor\t: 0\nmodel name\t: Test CPU\nphysical id\t: 0\nsiblings\t: 4\ncore id\t\t: 0\ncpu cores\t: 4\n\nprocessor\t: 1\nmodel name\t: Test CPU\nphysical id\t: 0\nsiblings\t: 4\ncore id\t\t: 1\ncpu cores\t: 4\n\nprocessor\t: 2\nmodel name\t: Other CPU\nphysical id\t: 0\nsiblings\t: 4\ncore id\t\t: 2\ncpu cores\t: 4\n\n";

    #[test]
    fn cpu_online_lists_visible_cpus() {
        assert_eq!(render_cpu_online(1), "0\n");
        assert_eq!(render_cpu_online(0), "0\n");
        assert_eq!(render_cpu_online(4), "0-3\n");
    }

    #[test]
    fn cpuinfo_renumbers_visible_cpus() {
        let rendered = render_cpuinfo(&HostCpuinfo::parse(HOST_CPUINFO), &[2]);
        assert_eq!(
            rendered,
            "processor\t: 0\nmodel name\t: Other CPU\nphysical id\t: 0\nsiblings\t: 1\ncore id\t\t: 0\ncpu cores\t: 1\n\n"
        );
        let two = render_cpuinfo(&HostCpuinfo::parse(HOST_CPUINFO), &[1, 2]);
        assert_eq!(two.matches("processor").count(), 2);
        assert!(two.contains("processor\t: 1\nmodel name\t: Other CPU"));
    }

    #[test]
    fn cpuinfo_survives_unknown_cpus_and_garbage() {
        let rendered = render_cpuinfo(&HostCpuinfo::parse(HOST_CPUINFO), &[7]);
        assert!(rendered.starts_with("processor\t: 0\nmodel name\t: Test CPU"));
        assert_eq!(render_cpuinfo(&HostCpuinfo::parse(""), &[0]), "");
    }

    #[test]
    fn cpu_times_per_cpu_when_all_visible() {
        let usage = VeCpuUsage::PerHostCpu(vec![
            (
                0,
                CpuTimeNs {
                    user_ns: 5 * NANOS_PER_SECOND,
                    system_ns: NANOS_PER_SECOND,
                },
            ),
            (
                1,
                CpuTimeNs {
                    user_ns: 2 * NANOS_PER_SECOND,
                    system_ns: 0,
                },
            ),
            (
                2,
                CpuTimeNs {
                    user_ns: 9 * NANOS_PER_SECOND,
                    system_ns: 0,
                },
            ),
        ]);
        let times = virtual_cpu_times(&usage, &[0, 1], &[0, 1], 10.0, 100);
        assert_eq!(
            times,
            vec![
                CpuTicks {
                    user: 500,
                    system: 100,
                    idle: 400
                },
                CpuTicks {
                    user: 200,
                    system: 0,
                    idle: 800
                }
            ]
        );
    }

    #[test]
    fn cpu_times_spread_when_quota_hides_cpus() {
        let usage = VeCpuUsage::PerHostCpu(vec![
            (
                0,
                CpuTimeNs {
                    user_ns: 3 * NANOS_PER_SECOND,
                    system_ns: 0,
                },
            ),
            (
                1,
                CpuTimeNs {
                    user_ns: 2 * NANOS_PER_SECOND,
                    system_ns: NANOS_PER_SECOND,
                },
            ),
        ]);
        let times = virtual_cpu_times(&usage, &[0, 1], &[0], 4.0, 100);
        assert_eq!(
            times,
            vec![CpuTicks {
                user: 500,
                system: 100,
                idle: 0
            }]
        );
        let total = VeCpuUsage::Total(CpuTimeNs {
            user_ns: 3 * NANOS_PER_SECOND + 10_000_000,
            system_ns: 0,
        });
        let times = virtual_cpu_times(&total, &[0, 1, 2], &[0, 1, 2], 100.0, 100);
        assert_eq!(
            times.iter().map(|t| t.user).collect::<Vec<_>>(),
            vec![101, 100, 100]
        );
        assert_eq!(times[1].idle, 9_900);
    }

    #[test]
    fn stat_layout() {
        let host =
            HostStat::parse("cpu 1 1 1 1\nintr 10 1\nctxt 20\nbtime 1000\nsoftirq 3 1\n").unwrap();
        let cpus = [
            CpuTicks {
                user: 1,
                system: 2,
                idle: 3,
            },
            CpuTicks {
                user: 4,
                system: 5,
                idle: 6,
            },
        ];
        let tasks = VeTasks {
            processes: 7,
            threads: 9,
            running: 2,
            blocked: 1,
            oldest_start_ticks: Some(5),
        };
        assert_eq!(
            render_stat(&cpus, &host, 1234, &tasks),
            "cpu  5 0 7 9 0 0 0 0 0 0\ncpu0 1 0 2 3 0 0 0 0 0 0\ncpu1 4 0 5 6 0 0 0 0 0 0\nintr 10 1\nctxt 20\nbtime 1234\nprocesses 7\nprocs_running 2\nprocs_blocked 1\nsoftirq 3 1\n"
        );
    }

    #[test]
    fn uptime_of_a_ve() {
        assert_eq!(ve_uptime_seconds(1000.0, Some(90_000), 100), 100.0);
        assert_eq!(
            ve_uptime_seconds(1000.0, Some(200_000), 100),
            0.0,
            "clock skew clamps to 0"
        );
        assert_eq!(ve_uptime_seconds(1000.0, None, 100), 0.0);
        let cpus = [
            CpuTicks {
                user: 1000,
                system: 500,
                idle: 0,
            },
            CpuTicks::default(),
        ];
        assert_eq!(render_uptime(100.0, &cpus, 100), "100.00 185.00\n");
        assert_eq!(
            render_uptime(
                1.0,
                &[CpuTicks {
                    user: 1000,
                    system: 0,
                    idle: 0
                }],
                100
            ),
            "1.00 0.00\n"
        );
    }

    #[test]
    fn loadavg_and_swaps() {
        let tasks = VeTasks {
            processes: 3,
            threads: 12,
            running: 2,
            ..VeTasks::default()
        };
        assert_eq!(
            render_loadavg([1.0, 0.5, 0.25], &tasks),
            "1.00 0.50 0.25 2/12 0\n"
        );
        assert_eq!(
            render_swaps(0, 0),
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        );
        let swaps = render_swaps(65536, 100);
        assert_eq!(
            swaps
                .lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            vec!["none", "virtual", "65536", "100", "0"]
        );
        assert_eq!(ve_swap_kb(&host_meminfo(), &limited_ve()), (65_536, 16_384));
    }

    #[test]
    fn diskstats_only_for_devices_used() {
        let disks = [
            HostDisk {
                major: 7,
                minor: 0,
                name: "loop0".into(),
            },
            HostDisk {
                major: 8,
                minor: 0,
                name: "sda".into(),
            },
        ];
        let io = [DeviceIo {
            major: 7,
            minor: 0,
            read_bytes: 4096,
            write_bytes: 1024,
            read_ios: 2,
            write_ios: 1,
        }];
        let rendered = render_diskstats(&disks, &io);
        assert_eq!(
            rendered,
            "   7       0 loop0 2 0 8 0 1 0 2 0 0 0 0 0 0 0 0 0 0\n"
        );
        assert_eq!(rendered.split_whitespace().count(), 3 + 17);
        assert_eq!(render_diskstats(&disks, &[]), "");
    }
}

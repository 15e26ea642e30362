//! Parsers for the cgroup (v1 and v2) files a VE's /proc views are computed from.
//!
//! Pure functions on file contents: no I/O, so every format quirk is unit-tested
//! from sample text. Garbage yields a [`CgroupParseError`], never a panic.

use std::collections::HashMap;

/// Upper bound on cpu ids we accept in a cpu list: larger numbers are garbage.
const MAX_CPU_ID: u32 = 8191;

/// v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX pages);
/// anything at or above this is treated as unlimited.
const V1_UNLIMITED_THRESHOLD: u64 = 1 << 62;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupParseError {
    #[error("expected a number in {what}, found {found:?}")]
    NotANumber { what: &'static str, found: String },
    #[error("malformed cpu list {found:?}: expected ranges like \"0-3,5\"")]
    BadCpuList { found: String },
    #[error("malformed {what} line {line:?}")]
    BadLine { what: &'static str, line: String },
}

fn excerpt(text: &str) -> String {
    text.chars().take(64).collect()
}

fn parse_number(what: &'static str, text: &str) -> Result<u64, CgroupParseError> {
    let trimmed = text.trim();
    trimmed
        .parse::<u64>()
        .map_err(|_| CgroupParseError::NotANumber {
            what,
            found: excerpt(trimmed),
        })
}

/// A limit in bytes: `None` means unlimited.
/// Accepts v2's `max` and v1's huge "unlimited" sentinel (and -1).
pub fn parse_limit(what: &'static str, text: &str) -> Result<Option<u64>, CgroupParseError> {
    let trimmed = text.trim();
    if trimmed == "max" || trimmed == "-1" {
        return Ok(None);
    }
    let value = parse_number(what, trimmed)?;
    Ok((value < V1_UNLIMITED_THRESHOLD).then_some(value))
}

/// A single counter such as memory.usage_in_bytes or pids.current.
pub fn parse_counter(what: &'static str, text: &str) -> Result<u64, CgroupParseError> {
    parse_number(what, text)
}

/// Flat keyed files: memory.stat, cpu.stat, cpuacct.stat ("key value" per line).
/// Lines whose value is not a number are skipped (new kernels add fields).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse::<u64>().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// A cpu list as in cpuset.cpus: "0-3,8,10-11" (empty means no cpus).
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, CgroupParseError> {
    let trimmed = text.trim();
    let bad = || CgroupParseError::BadCpuList {
        found: excerpt(trimmed),
    };
    let mut cpus = Vec::new();
    if trimmed.is_empty() {
        return Ok(cpus);
    }
    for part in trimmed.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part.trim(), part.trim()),
        };
        let first: u32 = first.parse().map_err(|_| bad())?;
        let last: u32 = last.parse().map_err(|_| bad())?;
        if first > last || last > MAX_CPU_ID {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// CPU bandwidth limit: `quota_us` of cpu time per `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuQuota {
    /// How many whole cpus the quota amounts to, rounded up (at least 1).
    pub fn cpus_rounded_up(&self) -> usize {
        if self.period_us == 0 {
            return usize::MAX;
        }
        (self.quota_us.div_ceil(self.period_us)).max(1) as usize
    }
}

/// v1: cpu.cfs_quota_us (-1 = unlimited) and cpu.cfs_period_us.
pub fn parse_cfs_quota(
    quota_text: &str,
    period_text: &str,
) -> Result<Option<CpuQuota>, CgroupParseError> {
    let quota = quota_text.trim();
    if quota == "-1" || quota == "max" {
        return Ok(None);
    }
    let quota_us = parse_number("cpu.cfs_quota_us", quota)?;
    let period_us = parse_number("cpu.cfs_period_us", period_text)?;
    Ok((period_us > 0).then_some(CpuQuota {
        quota_us,
        period_us,
    }))
}

/// v2: cpu.max, "max 100000" or "50000 100000".
pub fn parse_cpu_max(text: &str) -> Result<Option<CpuQuota>, CgroupParseError> {
    let mut words = text.split_whitespace();
    let bad = || CgroupParseError::BadLine {
        what: "cpu.max",
        line: excerpt(text.trim()),
    };
    let quota = words.next().ok_or_else(bad)?;
    let period_us = match words.next() {
        Some(period) => period.parse::<u64>().map_err(|_| bad())?,
        None => 100_000,
    };
    if quota == "max" {
        return Ok(None);
    }
    let quota_us = quota.parse::<u64>().map_err(|_| bad())?;
    Ok((period_us > 0).then_some(CpuQuota {
        quota_us,
        period_us,
    }))
}

/// CPU time used by one host cpu, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimeNs {
    pub user_ns: u64,
    pub system_ns: u64,
}

impl CpuTimeNs {
    pub fn total_ns(&self) -> u64 {
        self.user_ns.saturating_add(self.system_ns)
    }
}

/// v1 cpuacct.usage_all:
/// ```text
/// cpu user system
/// 0 123 456
/// 1 789 10
/// ```
/// Returns per host cpu id.
pub fn parse_cpuacct_usage_all(text: &str) -> Result<Vec<(u32, CpuTimeNs)>, CgroupParseError> {
    let mut result = Vec::new();
    for line in text.lines().skip(1).filter(|line| !line.trim().is_empty()) {
        let bad = || CgroupParseError::BadLine {
            what: "cpuacct.usage_all",
            line: excerpt(line),
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 3 {
            return Err(bad());
        }
        let cpu = fields[0].parse::<u32>().map_err(|_| bad())?;
        let user_ns = fields[1].parse::<u64>().map_err(|_| bad())?;
        let system_ns = fields[2].parse::<u64>().map_err(|_| bad())?;
        result.push((cpu, CpuTimeNs { user_ns, system_ns }));
    }
    Ok(result)
}

/// v1 cpuacct.usage_percpu: space-separated nanoseconds, indexed by host cpu id.
pub fn parse_cpuacct_usage_percpu(text: &str) -> Result<Vec<u64>, CgroupParseError> {
    text.split_whitespace()
        .map(|word| parse_number("cpuacct.usage_percpu", word))
        .collect()
}

/// Per-device block I/O counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceIo {
    pub major: u32,
    pub minor: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
}

fn parse_device(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn device_entry(devices: &mut Vec<DeviceIo>, major: u32, minor: u32) -> &mut DeviceIo {
    let index = match devices
        .iter()
        .position(|d| d.major == major && d.minor == minor)
    {
        Some(index) => index,
        None => {
            devices.push(DeviceIo {
                major,
                minor,
                ..DeviceIo::default()
            });
            devices.len() - 1
        }
    };
    &mut devices[index]
}

/// v1 blkio.throttle.io_service_bytes(_recursive) and io_serviced(_recursive):
/// "8:0 Read 4096" lines plus a "Total N" line.
pub fn parse_blkio_v1(service_bytes: &str, serviced: &str) -> Vec<DeviceIo> {
    let mut devices = Vec::new();
    for (text, is_bytes) in [(service_bytes, true), (serviced, false)] {
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [device, op, value] = fields[..] else {
                continue;
            };
            let (Some((major, minor)), Ok(value)) = (parse_device(device), value.parse::<u64>())
            else {
                continue;
            };
            let entry = device_entry(&mut devices, major, minor);
            match (op, is_bytes) {
                ("Read", true) => entry.read_bytes = value,
                ("Write", true) => entry.write_bytes = value,
                ("Read", false) => entry.read_ios = value,
                ("Write", false) => entry.write_ios = value,
                _ => {}
            }
        }
    }
    devices
}

/// v2 io.stat: "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0".
pub fn parse_io_stat_v2(text: &str) -> Vec<DeviceIo> {
    let mut devices = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some((major, minor)) = words.next().and_then(parse_device) else {
            continue;
        };
        let entry = device_entry(&mut devices, major, minor);
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "rbytes" => entry.read_bytes = value,
                "wbytes" => entry.write_bytes = value,
                "rios" => entry.read_ios = value,
                "wios" => entry.write_ios = value,
                _ => {}
            }
        }
    }
    devices
}

/// Process ids from cgroup.procs (one per line); garbage lines are skipped.
pub fn parse_pid_list(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_understand_max_and_v1_sentinel() {
        assert_eq!(parse_limit("memory.max", "max\n"), Ok(None));
        assert_eq!(
            parse_limit("memory.limit_in_bytes", "9223372036854771712\n"),
            Ok(None)
        );
        assert_eq!(parse_limit("memory.limit_in_bytes", "-1"), Ok(None));
        assert_eq!(
            parse_limit("memory.max", "268435456\n"),
            Ok(Some(268_435_456))
        );
        assert!(matches!(
            parse_limit("memory.max", "lots"),
            Err(CgroupParseError::NotANumber {
                what: "memory.max",
                ..
            })
        ));
        assert!(parse_limit("memory.max", "").is_err());
    }

    #[test]
    fn flat_keyed_skips_garbage() {
        let stat = parse_flat_keyed("cache 4096\ntotal_rss 8192\nbogus\nweird x\n\n");
        assert_eq!(stat.get("cache"), Some(&4096));
        assert_eq!(stat.get("total_rss"), Some(&8192));
        assert_eq!(stat.len(), 2);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("3,1-2,2").unwrap(), vec![1, 2, 3]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a-b").is_err());
        assert!(parse_cpu_list("0-99999999").is_err());
        assert!(parse_cpu_list("0,,1").is_err());
    }

    #[test]
    fn cfs_quota_v1() {
        assert_eq!(parse_cfs_quota("-1\n", "100000\n"), Ok(None));
        assert_eq!(
            parse_cfs_quota("150000\n", "100000\n"),
            Ok(Some(CpuQuota {
                quota_us: 150_000,
                period_us: 100_000
            }))
        );
        assert_eq!(parse_cfs_quota("150000", "0"), Ok(None));
        assert!(parse_cfs_quota("x", "100000").is_err());
    }

    #[test]
    fn cpu_max_v2() {
        assert_eq!(parse_cpu_max("max 100000\n"), Ok(None));
        assert_eq!(
            parse_cpu_max("50000 100000\n"),
            Ok(Some(CpuQuota {
                quota_us: 50_000,
                period_us: 100_000
            }))
        );
        assert_eq!(
            parse_cpu_max("200000"),
            Ok(Some(CpuQuota {
                quota_us: 200_000,
                period_us: 100_000
            }))
        );
        assert!(parse_cpu_max("").is_err());
        assert!(parse_cpu_max("fast 100000").is_err());
    }

    #[test]
    fn quota_rounds_up_to_whole_cpus() {
        let quota = |q| CpuQuota {
            quota_us: q,
            period_us: 100_000,
        };
        assert_eq!(quota(50_000).cpus_rounded_up(), 1);
        assert_eq!(quota(100_000).cpus_rounded_up(), 1);
        assert_eq!(quota(100_001).cpus_rounded_up(), 2);
        assert_eq!(quota(0).cpus_rounded_up(), 1);
    }

    #[test]
    fn usage_all_and_percpu() {
        let all = parse_cpuacct_usage_all("cpu user system\n0 100 20\n1 300 40\n").unwrap();
        assert_eq!(
            all,
            vec![
                (
                    0,
                    CpuTimeNs {
                        user_ns: 100,
                        system_ns: 20
                    }
                ),
                (
                    1,
                    CpuTimeNs {
                        user_ns: 300,
                        system_ns: 40
                    }
                )
            ]
        );
        assert!(parse_cpuacct_usage_all("cpu user system\n0 1\n").is_err());
        assert_eq!(
            parse_cpuacct_usage_percpu("10 20 30 \n").unwrap(),
            vec![10, 20, 30]
        );
        assert!(parse_cpuacct_usage_percpu("10 x").is_err());
    }

    #[test]
    fn blkio_v1_merges_bytes_and_ios() {
        let bytes = "7:0 Read 4096\n7:0 Write 8192\n7:0 Sync 1\n7:0 Total 12288\n8:0 Read 512\nTotal 12800\n";
        let ios = "7:0 Read 1\n7:0 Write 2\n7:0 Total 3\ngarbage line here\nTotal 3\n";
        let devices = parse_blkio_v1(bytes, ios);
        assert_eq!(
            devices,
            vec![
                DeviceIo {
                    major: 7,
                    minor: 0,
                    read_bytes: 4096,
                    write_bytes: 8192,
                    read_ios: 1,
                    write_ios: 2
                },
                DeviceIo {
                    major: 8,
                    minor: 0,
                    read_bytes: 512,
                    ..DeviceIo::default()
                },
            ]
        );
    }

    #[test]
    fn io_stat_v2() {
        let devices = parse_io_stat_v2(
            "259:0 rbytes=1024 wbytes=2048 rios=3 wios=4 dbytes=0 dios=0\nnonsense\n",
        );
        assert_eq!(
            devices,
            vec![DeviceIo {
                major: 259,
                minor: 0,
                read_bytes: 1024,
                write_bytes: 2048,
                read_ios: 3,
                write_ios: 4
            }]
        );
    }

    #[test]
    fn pid_lists_skip_garbage() {
        assert_eq!(parse_pid_list("1\n42\nx\n\n7\n"), vec![1, 42, 7]);
    }
}

//! Parsers for the host's own /proc files, the templates the VE views are cut from.
//!
//! Pure functions on file contents; garbage yields a [`HostParseError`] or is skipped.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostParseError {
    #[error("malformed {what}: {found:?}")]
    Malformed { what: &'static str, found: String },
}

fn malformed(what: &'static str, text: &str) -> HostParseError {
    HostParseError::Malformed {
        what,
        found: text.chars().take(64).collect(),
    }
}

/// One /proc/meminfo line: name, value, and whether it carried a "kB" unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeminfoEntry {
    pub name: String,
    pub value: u64,
    pub in_kb: bool,
}

/// The host's /proc/meminfo in file order, so the VE view keeps the same layout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostMeminfo {
    pub entries: Vec<MeminfoEntry>,
}

impl HostMeminfo {
    pub fn parse(text: &str) -> Result<Self, HostParseError> {
        let mut entries = Vec::new();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let (name, rest) = line
                .split_once(':')
                .ok_or_else(|| malformed("/proc/meminfo line", line))?;
            let mut words = rest.split_whitespace();
            let value = words
                .next()
                .and_then(|word| word.parse::<u64>().ok())
                .ok_or_else(|| malformed("/proc/meminfo line", line))?;
            entries.push(MeminfoEntry {
                name: name.trim().to_string(),
                value,
                in_kb: words.next() == Some("kB"),
            });
        }
        if entries.is_empty() {
            return Err(malformed("/proc/meminfo", text));
        }
        Ok(HostMeminfo { entries })
    }

    /// A field's value (kB for sizes), if present.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|entry| entry.name == name)
            .map(|entry| entry.value)
    }
}

/// One processor's block of /proc/cpuinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuinfoBlock {
    /// The host cpu id from the "processor" line.
    pub processor: u32,
    /// The block's lines, the "processor" line included, without trailing newline.
    pub lines: Vec<String>,
}

/// The host's /proc/cpuinfo split into per-processor blocks plus any
/// architecture-specific trailer (arm64 and others print one after the cpus).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostCpuinfo {
    pub processors: Vec<CpuinfoBlock>,
    pub other_blocks: Vec<Vec<String>>,
}

impl HostCpuinfo {
    pub fn parse(text: &str) -> Self {
        let mut cpuinfo = HostCpuinfo::default();
        for block in text.split("\n\n") {
            let lines: Vec<String> = block
                .lines()
                .map(str::to_string)
                .filter(|line| !line.is_empty())
                .collect();
            if lines.is_empty() {
                continue;
            }
            let processor = lines.iter().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "processor")
                    .then(|| value.trim().parse::<u32>().ok())
                    .flatten()
            });
            match processor {
                Some(processor) => cpuinfo.processors.push(CpuinfoBlock { processor, lines }),
                None => cpuinfo.other_blocks.push(lines),
            }
        }
        cpuinfo
    }
}

/// The parts of the host's /proc/stat the VE view reuses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostStat {
    /// Boot time of the host, seconds since the epoch.
    pub btime: u64,
    /// Lines passed through unchanged (intr, ctxt, softirq).
    pub passthrough_lines: Vec<String>,
}

impl HostStat {
    pub fn parse(text: &str) -> Result<Self, HostParseError> {
        let mut stat = HostStat::default();
        let mut found_btime = false;
        for line in text.lines() {
            let key = line.split_whitespace().next().unwrap_or("");
            match key {
                "btime" => {
                    stat.btime = line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|value| value.parse().ok())
                        .ok_or_else(|| malformed("/proc/stat btime", line))?;
                    found_btime = true;
                }
                "intr" | "ctxt" | "softirq" => stat.passthrough_lines.push(line.to_string()),
                _ => {}
            }
        }
        if !found_btime {
            return Err(malformed("/proc/stat (no btime)", text));
        }
        Ok(stat)
    }
}

/// /proc/uptime: seconds since boot (first field).
pub fn parse_uptime_seconds(text: &str) -> Result<f64, HostParseError> {
    text.split_whitespace()
        .next()
        .and_then(|word| word.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .ok_or_else(|| malformed("/proc/uptime", text))
}

/// What the views need from /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskStat {
    /// R, S, D, Z, ...
    pub state: char,
    /// Start time in clock ticks after host boot.
    pub start_ticks: u64,
}

/// Parses /proc/<pid>/stat. The command name may contain spaces and parentheses,
/// so fields are counted from the last ')'.
pub fn parse_task_stat(text: &str) -> Result<TaskStat, HostParseError> {
    let after_comm = text
        .rfind(')')
        .map(|index| &text[index + 1..])
        .ok_or_else(|| malformed("/proc/<pid>/stat", text))?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3 (state); starttime is field 22.
    let state = fields
        .first()
        .and_then(|word| word.chars().next())
        .ok_or_else(|| malformed("/proc/<pid>/stat", text))?;
    let start_ticks = fields
        .get(22 - 3)
        .and_then(|word| word.parse::<u64>().ok())
        .ok_or_else(|| malformed("/proc/<pid>/stat", text))?;
    Ok(TaskStat { state, start_ticks })
}

/// A block device known to the host: (major, minor, name) from /proc/diskstats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDisk {
    pub major: u32,
    pub minor: u32,
    pub name: String,
}

pub fn parse_diskstats_devices(text: &str) -> Vec<HostDisk> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let major = words.next()?.parse().ok()?;
            let minor = words.next()?.parse().ok()?;
            let name = words.next()?.to_string();
            Some(HostDisk { major, minor, name })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:         4000000 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\n";

    #[test]
    fn meminfo_keeps_order_and_units() {
        let meminfo = HostMeminfo::parse(MEMINFO).unwrap();
        assert_eq!(meminfo.entries.len(), 4);
        assert_eq!(meminfo.get("MemTotal"), Some(8_000_000));
        assert_eq!(
            meminfo.entries[2],
            MeminfoEntry {
                name: "HugePages_Total".into(),
                value: 0,
                in_kb: false
            }
        );
        assert!(meminfo.entries[3].in_kb);
        assert!(HostMeminfo::parse("").is_err());
        assert!(HostMeminfo::parse("MemTotal: lots kB\n").is_err());
        assert!(HostMeminfo::parse("no colon\n").is_err());
    }

    #[test]
    fn cpuinfo_blocks_and_trailer() {
        let text = "processor\t: 0\nmodel name\t: X\n\nprocessor\t: 1\nmodel name\t: X\n\nHardware\t: BCM\n\n";
        let cpuinfo = HostCpuinfo::parse(text);
        assert_eq!(cpuinfo.processors.len(), 2);
        assert_eq!(cpuinfo.processors[1].processor, 1);
        assert_eq!(
            cpuinfo.processors[1].lines,
            vec!["processor\t: 1", "model name\t: X"]
        );
        assert_eq!(
            cpuinfo.other_blocks,
            vec![vec!["Hardware\t: BCM".to_string()]]
        );
        assert_eq!(
            HostCpuinfo::parse("garbage"),
            HostCpuinfo {
                processors: vec![],
                other_blocks: vec![vec!["garbage".into()]]
            }
        );
    }

    #[test]
    fn stat_btime_and_passthrough() {
        let text = "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 5 0 1\nctxt 99\nbtime 1700000000\nprocesses 12\nprocs_running 1\nsoftirq 1 2\n";
        let stat = HostStat::parse(text).unwrap();
        assert_eq!(stat.btime, 1_700_000_000);
        assert_eq!(
            stat.passthrough_lines,
            vec!["intr 5 0 1", "ctxt 99", "softirq 1 2"]
        );
        assert!(HostStat::parse("cpu 1 2\n").is_err());
        assert!(HostStat::parse("btime soon\n").is_err());
    }

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_seconds("12345.67 999.00\n"), Ok(12345.67));
        assert!(parse_uptime_seconds("").is_err());
        assert!(parse_uptime_seconds("-1 0").is_err());
        assert!(parse_uptime_seconds("NaN 0").is_err());
    }

    #[test]
    fn task_stat_with_tricky_command_names() {
        let text = "1234 (my (weird) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 98765 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(
            parse_task_stat(text),
            Ok(TaskStat {
                state: 'S',
                start_ticks: 98765
            })
        );
        assert!(parse_task_stat("1234 (x) R 1 2").is_err());
        assert!(parse_task_stat("no parens").is_err());
    }

    #[test]
    fn diskstats_devices() {
        let text = "   7       0 loop0 1 0 2 0 0 0 0 0 0 0 0\n 259 0 nvme0n1 5 0 0 0\nbad\n";
        assert_eq!(
            parse_diskstats_devices(text),
            vec![
                HostDisk {
                    major: 7,
                    minor: 0,
                    name: "loop0".into()
                },
                HostDisk {
                    major: 259,
                    minor: 0,
                    name: "nvme0n1".into()
                }
            ]
        );
    }
}

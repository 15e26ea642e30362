//! The files served per VE and how each is assembled from its sources.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::loadavg::LoadTracker;
use super::render;
use super::sources::{clock_ticks_per_second, CgroupFiles, HostProc, SourceError};

/// One virtualized file, served at `<mountpoint>/<ve-id>/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViewFile {
    Meminfo,
    Cpuinfo,
    Stat,
    Uptime,
    Loadavg,
    Swaps,
    Diskstats,
    /// /sys/devices/system/cpu/online: what glibc's sysconf(_SC_NPROCESSORS_ONLN) counts.
    CpuOnline,
}

impl ViewFile {
    pub const ALL: [ViewFile; 8] = [
        ViewFile::Meminfo,
        ViewFile::Cpuinfo,
        ViewFile::Stat,
        ViewFile::Uptime,
        ViewFile::Loadavg,
        ViewFile::Swaps,
        ViewFile::Diskstats,
        ViewFile::CpuOnline,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            ViewFile::Meminfo => "meminfo",
            ViewFile::Cpuinfo => "cpuinfo",
            ViewFile::Stat => "stat",
            ViewFile::Uptime => "uptime",
            ViewFile::Loadavg => "loadavg",
            ViewFile::Swaps => "swaps",
            ViewFile::Diskstats => "diskstats",
            ViewFile::CpuOnline => "cpu_online",
        }
    }

    /// Where the file is bind-mounted inside the VE.
    pub fn target_in_ve(self) -> &'static str {
        match self {
            ViewFile::Meminfo => "/proc/meminfo",
            ViewFile::Cpuinfo => "/proc/cpuinfo",
            ViewFile::Stat => "/proc/stat",
            ViewFile::Uptime => "/proc/uptime",
            ViewFile::Loadavg => "/proc/loadavg",
            ViewFile::Swaps => "/proc/swaps",
            ViewFile::Diskstats => "/proc/diskstats",
            ViewFile::CpuOnline => "/sys/devices/system/cpu/online",
        }
    }

    pub fn from_file_name(name: &str) -> Option<ViewFile> {
        ViewFile::ALL
            .into_iter()
            .find(|file| file.file_name() == name)
    }

    /// Position in [`ViewFile::ALL`], used to number inodes.
    pub fn index(self) -> usize {
        ViewFile::ALL
            .iter()
            .position(|file| *file == self)
            .unwrap_or(0)
    }
}

/// Renders the views of every VE under one cgroup parent.
pub struct ProcViews {
    cgroups: CgroupFiles,
    host: HostProc,
    load: LoadTracker,
}

impl ProcViews {
    pub fn new(cgroups: CgroupFiles) -> Self {
        ProcViews {
            cgroups,
            host: HostProc::default(),
            load: LoadTracker::default(),
        }
    }

    pub fn cgroups(&self) -> &CgroupFiles {
        &self.cgroups
    }

    /// Drops per-VE state of a VE whose cgroup is gone.
    pub fn forget(&self, ve_id: &str) {
        self.load.forget(ve_id);
    }

    /// Renders `file` for `ve_id` from the current cgroup and host state.
    pub fn render(&self, ve_id: &str, file: ViewFile) -> Result<String, SourceError> {
        if !self.cgroups.exists(ve_id) {
            self.forget(ve_id);
            return Err(SourceError::VeGone {
                ve_id: ve_id.to_string(),
                parent_path: self.cgroups.parent_dir(),
            });
        }
        let user_hz = clock_ticks_per_second();
        match file {
            ViewFile::Meminfo => Ok(render::render_meminfo(
                &self.host.meminfo()?,
                &self.cgroups.memory(ve_id)?,
            )),
            ViewFile::Swaps => {
                let (total, used) =
                    render::ve_swap_kb(&self.host.meminfo()?, &self.cgroups.memory(ve_id)?);
                Ok(render::render_swaps(total, used))
            }
            ViewFile::CpuOnline => {
                let cpu = self.cgroups.cpu(ve_id)?;
                Ok(render::render_cpu_online(
                    render::visible_host_cpus(&cpu.cpuset, cpu.quota).len(),
                ))
            }
            ViewFile::Cpuinfo => {
                let cpu = self.cgroups.cpu(ve_id)?;
                let visible = render::visible_host_cpus(&cpu.cpuset, cpu.quota);
                Ok(render::render_cpuinfo(&self.host.cpuinfo()?, &visible))
            }
            ViewFile::Stat | ViewFile::Uptime => {
                let cpu = self.cgroups.cpu(ve_id)?;
                let tasks = self.cgroups.tasks(ve_id)?;
                let host_uptime = self.host.uptime_seconds()?;
                let uptime =
                    render::ve_uptime_seconds(host_uptime, tasks.oldest_start_ticks, user_hz);
                let visible = render::visible_host_cpus(&cpu.cpuset, cpu.quota);
                let cpus =
                    render::virtual_cpu_times(&cpu.usage, &cpu.cpuset, &visible, uptime, user_hz);
                if file == ViewFile::Uptime {
                    return Ok(render::render_uptime(uptime, &cpus, user_hz));
                }
                let host_stat = self.host.stat()?;
                let btime = match tasks.oldest_start_ticks {
                    Some(start) => host_stat.btime + start / user_hz.max(1),
                    None => SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|since| since.as_secs())
                        .unwrap_or(0),
                };
                Ok(render::render_stat(&cpus, &host_stat, btime, &tasks))
            }
            ViewFile::Loadavg => {
                let tasks = self.cgroups.tasks(ve_id)?;
                let averages =
                    self.load
                        .observe(ve_id, tasks.running + tasks.blocked, Instant::now());
                Ok(render::render_loadavg(averages, &tasks))
            }
            ViewFile::Diskstats => Ok(render::render_diskstats(
                &self.host.disks()?,
                &self.cgroups.block_io(ve_id),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        for file in ViewFile::ALL {
            assert_eq!(ViewFile::from_file_name(file.file_name()), Some(file));
            if file != ViewFile::CpuOnline {
                assert_eq!(file.target_in_ve(), format!("/proc/{}", file.file_name()));
            }
            assert_eq!(ViewFile::ALL[file.index()], file);
        }
        assert_eq!(ViewFile::from_file_name("version"), None);
    }
}

//! The container process: user, capabilities, no_new_privs, seccomp, rlimits,
//! and the final execve. Prepared before fork (allocations, parsing), applied
//! in the child with plain syscalls.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimit, PosixRlimitType, Process};

use crate::capabilities::{CapabilityError, CapabilityPlan};
use crate::seccomp::{CompiledSeccomp, SeccompError};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("config.json: process.{field} contains a NUL byte")]
    NulByte { field: &'static str },
    #[error("config.json: process.rlimits: {0} is not supported on linux")]
    UnsupportedRlimit(String),
    #[error("cannot {action}: {errno}")]
    Sys { action: String, errno: Errno },
    #[error("executable {0:?} not found in the container (searched PATH)")]
    NotFound(String),
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// One rlimit ready for setrlimit/prlimit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub soft: u64,
    pub hard: u64,
}

/// The process to run, prepared before fork.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub capabilities: Option<CapabilityPlan>,
    pub no_new_privileges: bool,
    pub seccomp: CompiledSeccomp,
    pub rlimits: Vec<Rlimit>,
    pub terminal: bool,
    /// The PATH from `env`, used to find args[0] inside the container.
    path_env: Option<String>,
}

fn to_cstrings(field: &'static str, items: &[String]) -> Result<Vec<CString>, ProcessError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| ProcessError::NulByte { field }))
        .collect()
}

fn rlimit_resource(typ: PosixRlimitType) -> Result<libc::__rlimit_resource_t, ProcessError> {
    Ok(match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
        #[allow(unreachable_patterns)]
        other => return Err(ProcessError::UnsupportedRlimit(format!("{other:?}"))),
    })
}

pub fn convert_rlimits(rlimits: &[PosixRlimit]) -> Result<Vec<Rlimit>, ProcessError> {
    rlimits
        .iter()
        .map(|r| {
            Ok(Rlimit {
                resource: rlimit_resource(r.typ())?,
                soft: r.soft(),
                hard: r.hard(),
            })
        })
        .collect()
}

impl ProcessPlan {
    pub fn from_spec(process: &Process, seccomp: CompiledSeccomp) -> Result<Self, ProcessError> {
        let args = to_cstrings("args", process.args().as_deref().unwrap_or_default())?;
        let env_strings = process.env().clone().unwrap_or_default();
        let path_env = env_strings
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .map(str::to_string);
        let env = to_cstrings("env", &env_strings)?;
        let capabilities = process
            .capabilities()
            .as_ref()
            .map(CapabilityPlan::from_spec)
            .transpose()?;
        Ok(Self {
            args,
            env,
            cwd: process.cwd().clone(),
            uid: process.user().uid(),
            gid: process.user().gid(),
            additional_gids: process.user().additional_gids().clone().unwrap_or_default(),
            umask: process.user().umask(),
            capabilities,
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            seccomp,
            rlimits: convert_rlimits(process.rlimits().as_deref().unwrap_or_default())?,
            terminal: process.terminal().unwrap_or(false),
            path_env,
        })
    }

    /// Replaces args/env/cwd/user (for exec), re-deriving the PATH.
    pub fn with_overrides(
        mut self,
        args: &[String],
        env: Option<&[String]>,
        cwd: Option<&Path>,
        user: Option<(u32, u32)>,
        terminal: bool,
    ) -> Result<Self, ProcessError> {
        self.args = to_cstrings("args", args)?;
        if let Some(env) = env {
            // Exec's variables override the container's, name by name.
            let mut merged: Vec<String> = self
                .env
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            for var in env {
                let name = var.split('=').next().unwrap_or_default();
                merged.retain(|e| e.split('=').next() != Some(name));
                merged.push(var.clone());
            }
            self.path_env = merged
                .iter()
                .rev()
                .find_map(|e| e.strip_prefix("PATH="))
                .map(str::to_string);
            self.env = to_cstrings("env", &merged)?;
        }
        if let Some(cwd) = cwd {
            self.cwd = cwd.to_path_buf();
        }
        if let Some((uid, gid)) = user {
            self.uid = uid;
            self.gid = gid;
            self.additional_gids.clear();
        }
        self.terminal = terminal;
        Ok(self)
    }

    /// Finds args[0] inside the container (call after pivot_root / joining the mount namespace).
    pub fn resolve_executable(&self) -> Result<CString, ProcessError> {
        let name = self
            .args
            .first()
            .ok_or_else(|| ProcessError::NotFound(String::new()))?;
        let name_text = name.to_string_lossy().into_owned();
        let executable = |p: &Path| {
            nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok() && !p.is_dir()
        };
        if name_text.contains('/') {
            return match nix::unistd::access(Path::new(&name_text), nix::unistd::AccessFlags::X_OK)
            {
                Ok(()) => Ok(name.clone()),
                Err(errno) => Err(ProcessError::Sys {
                    action: format!("execute {name_text}"),
                    errno,
                }),
            };
        }
        let path = self
            .path_env
            .as_deref()
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        for dir in path.split(':').filter(|d| !d.is_empty()) {
            let candidate = Path::new(dir).join(&name_text);
            if executable(&candidate) {
                return CString::new(candidate.as_os_str().as_bytes())
                    .map_err(|_| ProcessError::NotFound(name_text));
            }
        }
        Err(ProcessError::NotFound(name_text))
    }

    /// Sets the rlimits of another process (the container's init) from outside,
    /// with the host's privileges: raising a hard limit needs them.
    pub fn apply_rlimits_to(&self, pid: i32) -> Result<(), ProcessError> {
        for r in &self.rlimits {
            let limit = libc::rlimit64 {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            };
            // SAFETY: `limit` is a valid rlimit64 that outlives the call; the old-limit pointer is null.
            let rc = unsafe { libc::prlimit64(pid, r.resource, &limit, std::ptr::null_mut()) };
            if rc != 0 {
                return Err(ProcessError::Sys {
                    action: format!("set rlimit {} of pid {pid}", r.resource),
                    errno: Errno::last(),
                });
            }
        }
        Ok(())
    }

    /// Applies security settings in the child, in the only order that works:
    /// seccomp while CAP_SYS_ADMIN is still held, the bounding set while
    /// CAP_SETPCAP is, then the ids, then the remaining capability sets.
    pub fn apply_security(&self) -> Result<(), ProcessError> {
        let sys = |action: &str| {
            let action = action.to_string();
            move |errno| ProcessError::Sys { action, errno }
        };
        nix::unistd::chdir(&self.cwd).map_err(sys(&format!(
            "enter the working directory {}",
            self.cwd.display()
        )))?;
        if let Some(mask) = self.umask {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
        }
        if self.no_new_privileges {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(sys("set no_new_privs")(Errno::last()));
            }
        }
        if !self.seccomp.is_empty() {
            self.seccomp.install()?;
        }
        if let Some(caps) = &self.capabilities {
            caps.drop_bounding()?;
        }
        let groups: Vec<Gid> = self
            .additional_gids
            .iter()
            .map(|g| Gid::from_raw(*g))
            .collect();
        nix::unistd::setgroups(&groups).map_err(sys("set supplementary groups"))?;
        let gid = Gid::from_raw(self.gid);
        nix::unistd::setresgid(gid, gid, gid)
            .map_err(sys(&format!("switch to gid {}", self.gid)))?;
        // Keep the permitted set across the uid change; the sets are set explicitly below.
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
            return Err(sys("set keepcaps")(Errno::last()));
        }
        let uid = Uid::from_raw(self.uid);
        nix::unistd::setresuid(uid, uid, uid)
            .map_err(sys(&format!("switch to uid {}", self.uid)))?;
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
        if let Some(caps) = &self.capabilities {
            caps.apply_sets()?;
        }
        Ok(())
    }

    /// Replaces the process image. Returns only on failure.
    pub fn exec(&self, executable: &CString) -> ProcessError {
        match nix::unistd::execve(executable, &self.args, &self.env) {
            Err(errno) => ProcessError::Sys {
                action: format!("execute {}", executable.to_string_lossy()),
                errno,
            },
            Ok(never) => match never {},
        }
    }
}

/// Gives the container process default signal handling: ignored signals stay
/// ignored across execve (Rust ignores SIGPIPE, a node agent may ignore more)
/// and so does the blocked mask of the forking thread.
pub fn reset_signals() {
    // The kernel's struct sigaction; the raw syscall also reaches the
    // real-time signals glibc reserves (32, 33), which may arrive ignored.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signal in 1..=64 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: rt_sigaction reads a valid struct for an 8-byte mask; the
            // old-action pointer is null. Invalid numbers just fail.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default as *const KernelSigaction,
                    std::ptr::null::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

/// Marks every descriptor above stderr close-on-exec except `keep`, so nothing
/// of the caller (sockets, files of the node agent) leaks into the container.
pub fn close_on_exec_all_except(keep: &[i32]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: F_SETFD on a descriptor number; a stale number (the read_dir fd) just fails.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_env_overrides_by_name() {
        let process: Process = serde_json::from_value(serde_json::json!({
            "args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin", "HOME=/root"]
        }))
        .unwrap();
        let plan = ProcessPlan::from_spec(&process, CompiledSeccomp::default()).unwrap();
        let plan = plan
            .with_overrides(
                &["ls".into()],
                Some(&["HOME=/tmp".into(), "X=1".into()]),
                None,
                None,
                false,
            )
            .unwrap();
        let env: Vec<String> = plan
            .env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        assert_eq!(env, vec!["PATH=/bin", "HOME=/tmp", "X=1"]);
    }

    #[test]
    fn rlimits_convert() {
        let limits: Vec<PosixRlimit> = serde_json::from_value(
            serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]),
        )
        .unwrap();
        assert_eq!(
            convert_rlimits(&limits).unwrap(),
            vec![Rlimit {
                resource: libc::RLIMIT_NOFILE,
                soft: 1024,
                hard: 4096
            }]
        );
    }
}

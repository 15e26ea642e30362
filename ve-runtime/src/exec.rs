//! `exec`: a new process inside a running container. It joins every
//! namespace and the cgroup of the container's init and gets the same
//! capabilities, seccomp filter and no_new_privs.
//!
//! The runtime forks a helper that joins the namespaces (the pid namespace
//! only applies to children), which forks the process itself and relays its
//! exit status; with a tty the process opens a pty inside the container and
//! sends the master back, and the runtime relays the caller's terminal.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::unistd::{ForkResult, Gid, Uid};

use crate::cgroups::ContainerCgroup;
use crate::console;
use crate::init::exit_child;
use crate::namespaces::JOIN_ORDER;
use crate::pidfd;
use crate::process::ProcessPlan;
use crate::runtime::{wait_status, RuntimeError};
use crate::state::{StateRecord, Status};
use crate::sync::{self, Channel, Message, SyncError};

/// The init's namespaces that differ from ours, opened now (before fork) so a
/// dying container fails here with a clear error.
fn open_namespaces(id: &str, pid: i32) -> Result<(Vec<(File, CloneFlags)>, bool), RuntimeError> {
    let mut out = Vec::new();
    let mut joins_user = false;
    for (name, flag) in JOIN_ORDER {
        let theirs = format!("/proc/{pid}/ns/{name}");
        let ours = format!("/proc/self/ns/{name}");
        let same = match (std::fs::metadata(&theirs), std::fs::metadata(&ours)) {
            (Ok(a), Ok(b)) => {
                use std::os::unix::fs::MetadataExt;
                a.ino() == b.ino() && a.dev() == b.dev()
            }
            _ => false,
        };
        if same {
            continue;
        }
        let file = File::open(&theirs).map_err(|e| RuntimeError::Sys {
            id: id.into(),
            action: format!("open namespace {theirs}"),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
        if *flag == CloneFlags::CLONE_NEWUSER {
            joins_user = true;
        }
        out.push((file, *flag));
    }
    Ok((out, joins_user))
}

pub(crate) fn run(
    id: &str,
    record: &StateRecord,
    plan: ProcessPlan,
) -> Result<ExitStatus, RuntimeError> {
    let sys = |action: &str| {
        let (id, action) = (id.to_string(), action.to_string());
        move |errno| RuntimeError::Sys { id, action, errno }
    };
    // Holding a verified pidfd while opening /proc/PID/ns makes sure the
    // namespaces are the container's, not those of a process that reused its pid.
    let pidfd = pidfd::open_verified(record.state.pid, record.init_start_time)
        .map_err(sys("open a pidfd for the init"))?
        .ok_or(RuntimeError::WrongStatus {
            id: id.into(),
            status: Status::Stopped,
            wanted: "running",
            action: "exec",
        })?;
    let (namespaces, joins_user) = open_namespaces(id, record.state.pid)?;
    if !crate::state::is_same_live_process(record.state.pid, record.init_start_time) {
        return Err(RuntimeError::WrongStatus {
            id: id.into(),
            status: Status::Stopped,
            wanted: "running",
            action: "exec",
        });
    }
    drop(pidfd);
    let cgroup = ContainerCgroup::load(&record.cgroup_path);
    let (parent_end, child_end) = sync::channel().map_err(|source| RuntimeError::Sync {
        id: id.into(),
        source,
    })?;
    let tty = plan.terminal;

    // SAFETY: the child only makes syscalls and allocates before exec/_exit (see init.rs).
    let helper = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => {
            drop(parent_end);
            run_helper(namespaces, joins_user, plan, child_end)
        }
        Ok(ForkResult::Parent { child }) => child.as_raw(),
        Err(e) => return Err(sys("fork")(e)),
    };
    drop(child_end);
    drop(namespaces);

    let result = (|| -> Result<Option<OwnedFd>, RuntimeError> {
        cgroup
            .add_process(helper)
            .map_err(|source| RuntimeError::Cgroup {
                id: id.into(),
                source,
            })?;
        parent_end
            .send(&Message::Continue)
            .map_err(|source| RuntimeError::Sync {
                id: id.into(),
                source,
            })?;
        if tty {
            match console::recv_fd(parent_end.raw_fd()) {
                Ok(Some(master)) => return Ok(Some(master)),
                Ok(None) => {}
                // The helper sent an error message instead of a descriptor.
                Err(console::ConsoleError::NoFd) => {}
                Err(source) => {
                    return Err(RuntimeError::Console {
                        id: id.into(),
                        source,
                    })
                }
            }
        }
        match parent_end.recv() {
            Ok(Message::Error(message)) => Err(RuntimeError::Setup {
                id: id.into(),
                message,
            }),
            Ok(other) => Err(RuntimeError::Sync {
                id: id.into(),
                source: SyncError::Unexpected(other),
            }),
            Err(SyncError::PeerGone) if !tty => Ok(None), // exec succeeded: close-on-exec closed the channel
            Err(SyncError::PeerGone) => Err(RuntimeError::Setup {
                id: id.into(),
                message: "the exec process exited before opening its terminal".into(),
            }),
            Err(source) => Err(RuntimeError::Sync {
                id: id.into(),
                source,
            }),
        }
    })();
    let master = match result {
        Ok(master) => master,
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(helper),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = wait_status(helper);
            return Err(e);
        }
    };
    if let Some(master) = master {
        let stdin = std::io::stdin();
        console::copy_window_size(stdin.as_fd(), master.as_fd());
        let _raw = console::RawMode::enter(stdin.as_fd());
        console::relay(&master);
    }
    let status = wait_status(helper).map_err(sys("wait for the exec process"))?;
    Ok(ExitStatus::from_raw(status))
}

fn run_helper(
    namespaces: Vec<(File, CloneFlags)>,
    joins_user: bool,
    plan: ProcessPlan,
    channel: Channel,
) -> ! {
    let fail = |channel: &Channel, text: String| -> ! {
        let _ = channel.send(&Message::Error(text));
        exit_child(126)
    };
    match channel.recv() {
        Ok(Message::Continue) => {}
        Ok(other) => fail(&channel, format!("unexpected setup message {other:?}")),
        Err(e) => fail(&channel, e.to_string()),
    }
    // Raising rlimits needs the host's privileges: before the user namespace.
    if let Err(e) = plan.apply_rlimits_to(0) {
        fail(&channel, e.to_string());
    }
    for (file, flag) in &namespaces {
        if let Err(e) = setns(file, *flag) {
            fail(
                &channel,
                format!("cannot join the container's {flag:?} namespace: {e}"),
            );
        }
    }
    drop(namespaces);
    // SAFETY: single-threaded fork child.
    let child = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => run_process(joins_user, plan, channel),
        Ok(ForkResult::Parent { child }) => child.as_raw(),
        Err(e) => fail(&channel, format!("cannot fork the exec process: {e}")),
    };
    drop(channel);
    let status = match wait_status(child) {
        Ok(status) => status,
        Err(_) => exit_child(126),
    };
    if libc::WIFSIGNALED(status) {
        // Die the same way so the caller sees the signal.
        let signal = libc::WTERMSIG(status);
        // SAFETY: resetting a disposition and raising a signal on ourselves.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
        exit_child(128 + signal)
    }
    exit_child(libc::WEXITSTATUS(status))
}

fn run_process(joins_user: bool, plan: ProcessPlan, channel: Channel) -> ! {
    let result = (|| -> Result<std::ffi::CString, String> {
        // Not inspectable from the VE until execve (see init.rs).
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        crate::process::reset_signals();
        if joins_user {
            nix::unistd::setgroups(&[]).map_err(|e| format!("cannot clear groups: {e}"))?;
            nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
                .map_err(|e| format!("cannot become gid 0 in the container: {e}"))?;
            nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
                .map_err(|e| format!("cannot become uid 0 in the container: {e}"))?;
        }
        if plan.terminal {
            let _ = nix::unistd::setsid();
            let (master, slave, path) = console::open_pty().map_err(|e| e.to_string())?;
            console::send_fd(
                channel.raw_fd(),
                master.as_raw_fd(),
                &path.to_string_lossy(),
            )
            .map_err(|e| e.to_string())?;
            drop(master);
            console::become_terminal_owner(&slave).map_err(|e| e.to_string())?;
        }
        let executable = plan.resolve_executable().map_err(|e| e.to_string())?;
        crate::process::close_on_exec_all_except(&[channel.raw_fd()]);
        plan.apply_security().map_err(|e| e.to_string())?;
        Ok(executable)
    })();
    match result {
        Ok(executable) => {
            let error = plan.exec(&executable);
            let _ = channel.send(&Message::Error(error.to_string()));
            exit_child(127)
        }
        Err(text) => {
            let _ = channel.send(&Message::Error(text));
            exit_child(126)
        }
    }
}

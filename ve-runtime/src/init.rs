//! The processes `create` forks: an intermediate child that enters the
//! namespaces, and the container's init, which builds the container and
//! waits on the exec fifo until `start`.
//!
//! The intermediate exits as soon as the init exists, so the init is
//! reparented to the nearest subreaper (or the host's init) and no runtime
//! process stays resident. Both run Rust code after fork; that is sound
//! because the caller's other threads do not exist in the child, glibc makes
//! malloc fork-safe, and nothing here takes a lock another thread could hold
//! (no logging, no stdout).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{ForkResult, Gid, Uid};

use crate::console;
use crate::namespaces::{NamespacePlan, UserNamespace};
use crate::process::ProcessPlan;
use crate::rootfs::{self, RootfsPlan};
use crate::sync::{Channel, Message};

/// Everything the forked processes need, prepared before fork.
pub struct InitPlan {
    pub namespaces: NamespacePlan,
    pub rootfs: RootfsPlan,
    pub process: ProcessPlan,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub sysctl: Vec<(String, String)>,
    pub console_socket: Option<OwnedFd>,
    /// Where stdout/stderr go (stdin becomes /dev/null); None keeps the caller's.
    pub output: Option<OwnedFd>,
    pub console_size: Option<(u16, u16)>,
    pub exec_fifo: PathBuf,
}

/// Ends a forked child without running the parent's atexit handlers or
/// flushing its stdio buffers.
pub fn exit_child(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

fn become_namespace_root() -> Result<(), String> {
    nix::unistd::setgroups(&[])
        .map_err(|e| format!("cannot clear groups in the user namespace: {e}"))?;
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| format!("cannot become gid 0 in the user namespace: {e}"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| format!("cannot become uid 0 in the user namespace: {e}"))?;
    Ok(())
}

fn join(path: &PathBuf, flag: CloneFlags) -> Result<(), String> {
    let file =
        File::open(path).map_err(|e| format!("cannot open namespace {}: {e}", path.display()))?;
    setns(&file, flag).map_err(|e| format!("cannot join namespace {}: {e}", path.display()))
}

/// The intermediate child. Never returns.
pub fn run_intermediate(plan: InitPlan, channel: Channel) -> ! {
    let locking_namespace = match enter_namespaces(&plan, &channel) {
        Ok(fd) => fd,
        Err(text) => {
            let _ = channel.send(&Message::Error(text));
            exit_child(1)
        }
    };
    // SAFETY: this process is single-threaded (a fork child); see the module comment.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => run_init(plan, channel, locking_namespace),
        Ok(ForkResult::Parent { child }) => {
            let sent = channel.send(&Message::InitPid(child.as_raw()));
            exit_child(if sent.is_ok() { 0 } else { 1 })
        }
        Err(e) => {
            let _ = channel.send(&Message::Error(format!(
                "cannot fork the container init: {e}"
            )));
            exit_child(1)
        }
    }
}

/// Enters the VE's namespaces. With a new user and mount namespace, returns
/// the nested user namespace the init moves into once its mounts are made
/// (see [`create_owner_namespaces`]).
fn enter_namespaces(plan: &InitPlan, channel: &Channel) -> Result<Option<OwnedFd>, String> {
    // Namespaces given by path are joined first, with the host's privileges
    // (e.g. a network namespace the node agent prepared).
    for (flag, path) in &plan.namespaces.join {
        join(path, *flag)?;
    }
    match &plan.namespaces.user {
        UserNamespace::New { .. } => {
            unshare(CloneFlags::CLONE_NEWUSER)
                .map_err(|e| format!("cannot create the user namespace: {e}"))?;
            channel
                .send(&Message::UserNamespaceReady)
                .map_err(|e| e.to_string())?;
        }
        UserNamespace::Join(path) => join(path, CloneFlags::CLONE_NEWUSER)?,
        UserNamespace::Host => {}
    }
    // The parent writes the maps and moves us into the cgroup, then says go.
    match channel.recv().map_err(|e| e.to_string())? {
        Message::Continue => {}
        other => return Err(format!("unexpected setup message {other:?}")),
    }
    if !matches!(plan.namespaces.user, UserNamespace::Host) {
        become_namespace_root()?;
        // The uid change made us non-dumpable, which gives our /proc files to
        // the host's root; the nested namespace's maps are written through them.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    }
    let new = plan.namespaces.new;
    if let UserNamespace::New {
        uid_map, gid_map, ..
    } = &plan.namespaces.user
    {
        if new.contains(CloneFlags::CLONE_NEWNS) {
            // The pid namespace must have its init before anyone can join it,
            // so it is created here, owned by the outer user namespace, after
            // the helper is gone (it would become the namespace's pid 1).
            let ours = new & (CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID);
            unshare(CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("cannot create the mount namespace: {e}"))?;
            let nested = create_owner_namespaces(new - ours, uid_map, gid_map)?;
            let pid = ours & CloneFlags::CLONE_NEWPID;
            unshare(pid).map_err(|e| format!("cannot create the pid namespace: {e}"))?;
            return Ok(Some(nested));
        }
    }
    // Created now, so the new user namespace owns them.
    unshare(new).map_err(|e| format!("cannot create namespaces {new:?}: {e}"))?;
    Ok(None)
}

/// Locks the VE's mounts. Mounts are locked (cannot be unmounted, nor made
/// writable again) only when a mount namespace is copied into a namespace
/// owned by a different user namespace. So: the mounts are made in a mount
/// namespace owned by the outer user namespace, and the VE runs in a nested
/// one (identity-mapped) that owns the uts, ipc, net and cgroup namespaces
/// (so the VE's root administers them) and copies the mount namespace when
/// it enters. A helper child creates the nested user namespace and those;
/// we join them now (the outer root has every capability over them) and
/// return the user namespace for the init to enter after its mounts.
fn create_owner_namespaces(
    new: CloneFlags,
    uid_map: &str,
    gid_map: &str,
) -> Result<OwnedFd, String> {
    let (ours, theirs) = crate::sync::channel().map_err(|e| e.to_string())?;
    // SAFETY: single-threaded fork child; the helper only makes syscalls.
    let helper = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => {
            drop(ours);
            let result = (|| -> Result<(), String> {
                unshare(CloneFlags::CLONE_NEWUSER)
                    .map_err(|e| format!("cannot create the nested user namespace: {e}"))?;
                theirs
                    .send(&Message::UserNamespaceReady)
                    .map_err(|e| e.to_string())?;
                match theirs.recv().map_err(|e| e.to_string())? {
                    Message::Continue => {}
                    other => return Err(format!("unexpected setup message {other:?}")),
                }
                become_namespace_root()?;
                unshare(new).map_err(|e| format!("cannot create namespaces {new:?}: {e}"))?;
                theirs.send(&Message::Ready).map_err(|e| e.to_string())?;
                // Stay until the namespaces are joined (the parent closes the channel).
                let _ = theirs.recv();
                Ok(())
            })();
            if let Err(text) = result {
                let _ = theirs.send(&Message::Error(text));
                exit_child(1)
            }
            exit_child(0)
        }
        Ok(ForkResult::Parent { child }) => child.as_raw(),
        Err(e) => return Err(format!("cannot fork the namespace helper: {e}")),
    };
    drop(theirs);
    let result = (|| -> Result<OwnedFd, String> {
        let expect = |wanted: Message| match ours.expect(wanted) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(text)) => Err(text),
            Err(e) => Err(e.to_string()),
        };
        expect(Message::UserNamespaceReady)?;
        crate::namespaces::write_id_maps(
            helper,
            &crate::namespaces::nested_identity_map(uid_map),
            &crate::namespaces::nested_identity_map(gid_map),
        )
        .map_err(|e| e.to_string())?;
        ours.send(&Message::Continue).map_err(|e| e.to_string())?;
        expect(Message::Ready)?;
        for (name, flag) in [
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ] {
            if new.contains(flag) {
                join(&PathBuf::from(format!("/proc/{helper}/ns/{name}")), flag)?;
            }
        }
        let user = File::open(format!("/proc/{helper}/ns/user"))
            .map_err(|e| format!("cannot open the nested user namespace: {e}"))?;
        Ok(OwnedFd::from(user))
    })();
    drop(ours);
    let mut status = 0;
    // SAFETY: waitpid writes into a local integer.
    unsafe { libc::waitpid(helper, &mut status, 0) };
    result
}

/// The container's init (pid 1 of a new pid namespace). Never returns.
fn run_init(plan: InitPlan, channel: Channel, locking_namespace: Option<OwnedFd>) -> ! {
    let result = (|| -> Result<(File, std::ffi::CString), String> {
        // Until execve, nothing in the VE may ptrace or open /proc/<init>/exe
        // (a fork of the runtime or of the node agent); execve resets this.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        crate::process::reset_signals();
        let _ = nix::unistd::setsid();
        if let Some(output) = &plan.output {
            let null =
                File::open("/dev/null").map_err(|e| format!("cannot open /dev/null: {e}"))?;
            nix::unistd::dup2(null.as_raw_fd(), 0)
                .map_err(|e| format!("cannot redirect stdin: {e}"))?;
            for target in [1, 2] {
                nix::unistd::dup2(output.as_raw_fd(), target)
                    .map_err(|e| format!("cannot redirect output: {e}"))?;
            }
        }
        rootfs::prepare(&plan.rootfs).map_err(|e| e.to_string())?;
        if let Some(hostname) = &plan.hostname {
            nix::unistd::sethostname(hostname)
                .map_err(|e| format!("cannot set hostname {hostname:?}: {e}"))?;
        }
        if let Some(domainname) = &plan.domainname {
            // SAFETY: the pointer and length describe a live byte slice.
            let rc = unsafe { libc::setdomainname(domainname.as_ptr().cast(), domainname.len()) };
            if rc != 0 {
                return Err(format!(
                    "cannot set domainname {domainname:?}: {}",
                    nix::errno::Errno::last()
                ));
            }
        }
        // Opened before pivot_root hides the state dir; reopened for writing
        // through /proc/self/fd when it is time to wait for `start`.
        let fifo = nix::fcntl::open(
            &plan.exec_fifo,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("cannot open exec fifo {}: {e}", plan.exec_fifo.display()))?;
        rootfs::pivot(&plan.rootfs.rootfs).map_err(|e| e.to_string())?;
        for (key, value) in &plan.sysctl {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value)
                .map_err(|e| format!("cannot set sysctl {key}={value}: {e}"))?;
        }
        if plan.process.terminal {
            let socket = plan
                .console_socket
                .as_ref()
                .ok_or("process.terminal needs a console socket")?;
            let (master, slave, slave_path) = console::open_pty().map_err(|e| e.to_string())?;
            if let Some((rows, cols)) = plan.console_size {
                console::set_window_size(std::os::fd::AsFd::as_fd(&master), rows, cols);
            }
            // /dev/console is the pty, as a VE's getty and init expect.
            let console_path = std::path::Path::new("/dev/console");
            if !console_path.exists() {
                File::create(console_path)
                    .map_err(|e| format!("cannot create /dev/console: {e}"))?;
            }
            nix::mount::mount(
                Some(&slave_path),
                console_path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("cannot bind the pty onto /dev/console: {e}"))?;
            console::send_fd(
                socket.as_raw_fd(),
                master.as_raw_fd(),
                &slave_path.to_string_lossy(),
            )
            .map_err(|e| e.to_string())?;
            console::become_terminal_owner(&slave).map_err(|e| e.to_string())?;
        }
        drop(plan.console_socket);
        rootfs::finish(&plan.rootfs).map_err(|e| e.to_string())?;
        if let Some(user_namespace) = &locking_namespace {
            setns(user_namespace, CloneFlags::CLONE_NEWUSER)
                .map_err(|e| format!("cannot enter the nested user namespace: {e}"))?;
            // The copy into a namespace owned by the nested user namespace locks every mount.
            unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("cannot lock the mounts: {e}"))?;
            nix::unistd::chdir("/").map_err(|e| format!("cannot enter /: {e}"))?;
        }
        drop(locking_namespace);
        let executable = plan
            .process
            .resolve_executable()
            .map_err(|e| e.to_string())?;
        crate::process::close_on_exec_all_except(&[fifo, channel.raw_fd()]);
        plan.process.apply_security().map_err(|e| e.to_string())?;
        // SAFETY: `fifo` is a descriptor we opened above and own from here on.
        let fifo = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fifo) };
        Ok((fifo, executable))
    })();
    let (fifo, executable) = match result {
        Ok(v) => v,
        Err(text) => {
            let _ = channel.send(&Message::Error(text));
            exit_child(1)
        }
    };
    if channel.send(&Message::Ready).is_err() {
        exit_child(1);
    }
    drop(channel);
    // Blocks until `start` opens the fifo for reading.
    let fifo_path = format!("/proc/self/fd/{}", fifo.as_raw_fd());
    match std::fs::OpenOptions::new().write(true).open(&fifo_path) {
        Ok(mut writer) => {
            use std::io::Write;
            if writer.write_all(b"0").is_err() {
                exit_child(1);
            }
        }
        Err(_) => exit_child(1),
    }
    drop(fifo);
    let error = plan.process.exec(&executable);
    // Nobody listens any more; stderr is the container's.
    let message = format!("ve-runtime: {error}\n");
    let _ = nix::unistd::write(std::io::stderr(), message.as_bytes());
    exit_child(127)
}

//! The runtime API the node agent calls in-process, and the CLI wraps.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::ForkResult;
use oci_spec::runtime::{LinuxResources, Spec};

use crate::cgroups::{self, CgroupError, ContainerCgroup, Stats};
use crate::console::{self, ConsoleError};
use crate::init::{self, InitPlan};
use crate::mounts::{self, MountSpec};
use crate::namespaces::{self, NamespaceError, NamespacePlan, UserNamespace};
use crate::pidfd;
use crate::process::{ProcessError, ProcessPlan};
use crate::rootfs::{self, RootfsPlan};
use crate::seccomp::{self, CompiledSeccomp};
use crate::spec::{self, SpecError};
use crate::state::{self, ContainerState, StateError, StateRecord, StateRoot, Status};
use crate::sync::{self, Message, SyncError};

pub const DEFAULT_ROOT: &str = "/run/ve-runtime";
const OCI_VERSION: &str = "1.0.2";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("container {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("container {id}: {source}")]
    Namespace { id: String, source: NamespaceError },
    #[error("container {id}: {source}")]
    Console { id: String, source: ConsoleError },
    #[error("container {id}: {source}")]
    Process { id: String, source: ProcessError },
    #[error("container {id}: setup failed: {source}")]
    Sync { id: String, source: SyncError },
    #[error("container {id}: setup failed: {message}")]
    Setup { id: String, message: String },
    #[error("container {id}: cannot {action}: {errno}")]
    Sys {
        id: String,
        action: String,
        errno: Errno,
    },
    #[error("container {id} is {status}, it must be {wanted} to {action}")]
    WrongStatus {
        id: String,
        status: Status,
        wanted: &'static str,
        action: &'static str,
    },
    #[error("container {0} is running; stop it first or delete with --force")]
    StillRunning(String),
    #[error("container {0}: the init did not exit after SIGKILL")]
    KillTimeout(String),
    #[error("container {id}: {message}")]
    Invalid { id: String, message: String },
}

/// Options of `create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Where to write the init's host pid.
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master when process.terminal is true.
    pub console_socket: Option<PathBuf>,
    /// File the init's stdout and stderr are appended to, with stdin from
    /// /dev/null (e.g. the VE's console log). Default: the caller's stdio, as runc.
    pub output: Option<PathBuf>,
}

/// Options of `exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub args: Vec<String>,
    /// Variables added to (or replacing) the container's process.env.
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub tty: bool,
    /// uid and gid inside the container; default: the container's process.user.
    pub user: Option<(u32, u32)>,
}

/// The runtime, rooted at a state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    states: StateRoot,
}

/// Undoes a half-done create: no process, no cgroup, no state dir is left.
struct CreateCleanup<'a> {
    runtime: &'a Runtime,
    id: String,
    armed: bool,
    cgroup: Option<ContainerCgroup>,
    children: Vec<i32>,
}

impl Drop for CreateCleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for pid in &self.children {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.kill_all();
            let _ = cgroup.remove();
        }
        let _ = self.runtime.states.remove(&self.id);
    }
}

fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn wait_status(pid: i32) -> Result<i32, Errno> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local integer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc >= 0 {
            return Ok(status);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

impl Runtime {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            states: StateRoot::new(root.into()),
        }
    }

    pub fn root(&self) -> &Path {
        self.states.path()
    }

    fn state_dir(&self, id: &str) -> PathBuf {
        self.states.container_dir(id)
    }

    /// Creates the container: its init is set up and waits for `start`.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CreateOptions,
    ) -> Result<ContainerState, RuntimeError> {
        state::validate_id(id)?;
        let bundle = std::fs::canonicalize(bundle).map_err(|source| SpecError::Read {
            path: bundle.to_path_buf(),
            source,
        })?;
        let spec = spec::load(&bundle)?;
        // Everything that can be checked without side effects is checked first.
        let (mut plan, resources, cgroup_path, root_ids) = self.plan(id, &bundle, &spec)?;
        if plan.process.terminal && opts.console_socket.is_none() {
            return Err(RuntimeError::Invalid {
                id: id.into(),
                message: "process.terminal is true: pass --console-socket to receive the terminal"
                    .into(),
            });
        }
        if !plan.process.terminal && opts.console_socket.is_some() {
            return Err(RuntimeError::Invalid {
                id: id.into(),
                message: "--console-socket given but process.terminal is false".into(),
            });
        }
        if let Some(path) = &opts.output {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| RuntimeError::Invalid {
                    id: id.into(),
                    message: format!("cannot open output file {}: {e}", path.display()),
                })?;
            plan.output = Some(OwnedFd::from(file));
        }
        if let Some(path) = &opts.console_socket {
            plan.console_socket =
                Some(console::connect_console_socket(path).map_err(|source| {
                    RuntimeError::Console {
                        id: id.into(),
                        source,
                    }
                })?);
        }

        let dir = self.states.create_dir(id)?;
        let mut cleanup = CreateCleanup {
            runtime: self,
            id: id.to_string(),
            armed: true,
            cgroup: None,
            children: vec![],
        };
        let sys = |action: &str| {
            let (id, action) = (id.to_string(), action.to_string());
            move |errno| RuntimeError::Sys { id, action, errno }
        };
        std::fs::copy(bundle.join("config.json"), dir.join(state::CONFIG_FILE)).map_err(|e| {
            sys("copy config.json into the state dir")(Errno::from_raw(
                e.raw_os_error().unwrap_or(0),
            ))
        })?;
        let fifo = dir.join(state::EXEC_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o622))
            .map_err(sys("create the exec fifo"))?;
        // mkfifo honours the umask; the container's root must be able to write it.
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o622)).map_err(|e| {
            sys("chmod the exec fifo")(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        })?;
        nix::unistd::chown(
            &fifo,
            Some(nix::unistd::Uid::from_raw(root_ids.0)),
            Some(nix::unistd::Gid::from_raw(root_ids.1)),
        )
        .map_err(sys("chown the exec fifo"))?;
        plan.exec_fifo = fifo;

        let cgroup =
            ContainerCgroup::create(&cgroup_path, resources.as_ref()).map_err(|source| {
                RuntimeError::Cgroup {
                    id: id.into(),
                    source,
                }
            })?;
        cleanup.cgroup = Some(cgroup);

        let (parent_end, child_end) = sync::channel().map_err(|source| RuntimeError::Sync {
            id: id.into(),
            source,
        })?;
        let uid_gid_maps = match &plan.namespaces.user {
            UserNamespace::New {
                uid_map, gid_map, ..
            } => Some((uid_map.clone(), gid_map.clone())),
            _ => None,
        };
        let process_for_limits = plan.process.clone();
        let oom_score_adj = spec.process().as_ref().and_then(|p| p.oom_score_adj());
        // SAFETY: the child runs init::run_intermediate, which only makes syscalls
        // and allocates (fork-safe with glibc); it never returns into our code.
        let intermediate = match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Child) => {
                drop(parent_end);
                init::run_intermediate(plan, child_end)
            }
            Ok(ForkResult::Parent { child }) => child.as_raw(),
            Err(e) => return Err(sys("fork")(e)),
        };
        drop(child_end);
        drop(plan);
        cleanup.children.push(intermediate);
        let setup_error = |message: String| RuntimeError::Setup {
            id: id.into(),
            message,
        };
        let sync_error = |source: SyncError| RuntimeError::Sync {
            id: id.into(),
            source,
        };

        let result = (|| -> Result<i32, RuntimeError> {
            let cgroup = cleanup.cgroup.as_ref().expect("created above");
            cgroup
                .add_process(intermediate)
                .map_err(|source| RuntimeError::Cgroup {
                    id: id.into(),
                    source,
                })?;
            if let Some((uid_map, gid_map)) = &uid_gid_maps {
                parent_end
                    .expect(Message::UserNamespaceReady)
                    .map_err(sync_error)?
                    .map_err(setup_error)?;
                namespaces::write_id_maps(intermediate, uid_map, gid_map).map_err(|source| {
                    RuntimeError::Namespace {
                        id: id.into(),
                        source,
                    }
                })?;
            }
            parent_end.send(&Message::Continue).map_err(sync_error)?;
            let init_pid = match parent_end.recv().map_err(sync_error)? {
                Message::InitPid(pid) => pid,
                Message::Error(text) => return Err(setup_error(text)),
                other => return Err(sync_error(SyncError::Unexpected(other))),
            };
            Ok(init_pid)
        })();
        let _ = wait_status(intermediate);
        let init_pid = result?;
        cleanup.children.push(init_pid);

        // Host-side settings of the init, made with the host's privileges
        // before it can exec: raising rlimits and lowering oom_score_adj.
        process_for_limits
            .apply_rlimits_to(init_pid)
            .map_err(|source| RuntimeError::Process {
                id: id.into(),
                source,
            })?;
        if let Some(score) = oom_score_adj {
            std::fs::write(format!("/proc/{init_pid}/oom_score_adj"), score.to_string()).map_err(
                |e| sys("set oom_score_adj")(Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            )?;
        }
        parent_end
            .expect(Message::Ready)
            .map_err(sync_error)?
            .map_err(setup_error)?;
        drop(parent_end);

        let start_time = state::read_proc_stat(init_pid)
            .ok_or_else(|| setup_error("the container init exited right after setup".into()))?
            .start_time;
        let container_state = ContainerState {
            oci_version: OCI_VERSION.into(),
            id: id.into(),
            status: Status::Created,
            pid: init_pid,
            bundle: bundle.clone(),
            annotations: spec.annotations().clone().unwrap_or_default(),
        };
        let record = StateRecord {
            state: container_state.clone(),
            init_start_time: start_time,
            cgroup_path,
            created: now_rfc3339(),
            root_host_uid: root_ids.0,
        };
        self.states.save(&record)?;
        if let Some(pid_file) = &opts.pid_file {
            std::fs::write(pid_file, init_pid.to_string()).map_err(|e| {
                sys(&format!("write pid file {}", pid_file.display()))(Errno::from_raw(
                    e.raw_os_error().unwrap_or(0),
                ))
            })?;
        }
        cleanup.armed = false;
        tracing::info!(container = id, pid = init_pid, "created");
        Ok(container_state)
    }

    /// Turns a validated spec into the plans the forked processes follow (no side effects).
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        id: &str,
        bundle: &Path,
        spec: &Spec,
    ) -> Result<(InitPlan, Option<LinuxResources>, String, (u32, u32)), RuntimeError> {
        let linux = spec.linux().as_ref().expect("validated");
        let process = spec.process().as_ref().expect("validated");
        let root = spec.root().as_ref().expect("validated");
        let namespaces = NamespacePlan::from_spec(linux).map_err(SpecError::from)?;
        if !namespaces.new.contains(nix::sched::CloneFlags::CLONE_NEWNS) {
            return Err(SpecError::Invalid(
                "linux.namespaces must include a new mount namespace".into(),
            )
            .into());
        }
        let seccomp = match linux.seccomp() {
            Some(profile) => seccomp::compile(profile).map_err(SpecError::from)?,
            None => CompiledSeccomp::default(),
        };
        let process_plan =
            ProcessPlan::from_spec(process, seccomp).map_err(|source| RuntimeError::Process {
                id: id.into(),
                source,
            })?;
        let mounts: Vec<MountSpec> = spec
            .mounts()
            .iter()
            .flatten()
            .map(MountSpec::from_oci)
            .collect::<Result<_, _>>()
            .map_err(SpecError::from)?;
        let propagation =
            mounts::parse_propagation(linux.rootfs_propagation().as_deref().unwrap_or(""))
                .map_err(SpecError::from)?;
        let rootfs_path = rootfs::absolute_rootfs(bundle, root.path());
        if !rootfs_path.is_dir() {
            return Err(SpecError::Invalid(format!(
                "root.path {} is not a directory",
                rootfs_path.display()
            ))
            .into());
        }
        let rootfs_plan = RootfsPlan {
            rootfs: rootfs_path,
            readonly: root.readonly().unwrap_or(false),
            propagation,
            mounts,
            devices: linux.devices().clone().unwrap_or_default(),
            masked_paths: linux.masked_paths().clone().unwrap_or_default(),
            readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
        };
        let cgroup_path =
            cgroups::cgroup_path(linux.cgroups_path().as_deref(), id).map_err(|source| {
                RuntimeError::Cgroup {
                    id: id.into(),
                    source,
                }
            })?;
        let mut sysctl: Vec<(String, String)> = linux
            .sysctl()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        sysctl.sort();
        for (key, _) in &sysctl {
            if key.contains('/') || key.split('.').any(|c| c.is_empty() || c == "..") {
                return Err(
                    SpecError::Invalid(format!("linux.sysctl: invalid key {key:?}")).into(),
                );
            }
        }
        let root_ids = namespaces.root_host_ids();
        let plan = InitPlan {
            namespaces,
            rootfs: rootfs_plan,
            process: process_plan,
            hostname: spec.hostname().clone(),
            domainname: spec.domainname().clone(),
            sysctl,
            console_socket: None,
            output: None,
            console_size: process
                .console_size()
                .as_ref()
                .map(|b| (b.height() as u16, b.width() as u16)),
            exec_fifo: PathBuf::new(),
        };
        Ok((plan, linux.resources().clone(), cgroup_path, root_ids))
    }

    fn status_of(&self, record: &StateRecord) -> Status {
        if !state::is_same_live_process(record.state.pid, record.init_start_time) {
            Status::Stopped
        } else if self
            .state_dir(&record.state.id)
            .join(state::EXEC_FIFO)
            .exists()
        {
            Status::Created
        } else {
            Status::Running
        }
    }

    fn load(&self, id: &str) -> Result<(StateRecord, Status), RuntimeError> {
        let record = self.states.load(id)?;
        let status = self.status_of(&record);
        Ok((record, status))
    }

    /// Releases the init waiting on the exec fifo: the container's process runs.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let (mut record, status) = self.load(id)?;
        if status != Status::Created {
            return Err(RuntimeError::WrongStatus {
                id: id.into(),
                status,
                wanted: "created",
                action: "start",
            });
        }
        let sys = |action: &str| {
            let (id, action) = (id.to_string(), action.to_string());
            move |errno| RuntimeError::Sys { id, action, errno }
        };
        let fifo_path = self.state_dir(id).join(state::EXEC_FIFO);
        let pidfd = pidfd::open_verified(record.state.pid, record.init_start_time)
            .map_err(sys("open a pidfd for the init"))?
            .ok_or(RuntimeError::WrongStatus {
                id: id.into(),
                status: Status::Stopped,
                wanted: "created",
                action: "start",
            })?;
        let fifo = nix::fcntl::open(
            &fifo_path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(sys("open the exec fifo"))?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let fifo: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fifo) };
        // The init writes one byte once it sees a reader; if it dies instead,
        // the pidfd turns readable and we report that rather than hang.
        loop {
            let mut fds = [
                nix::poll::PollFd::new(fifo.as_fd(), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(sys("wait for the init")(e)),
            }
            let fifo_ready = fds[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN));
            if fifo_ready {
                let mut byte = [0u8; 1];
                match nix::unistd::read(fifo.as_raw_fd(), &mut byte) {
                    Ok(1) => break,
                    Ok(_) | Err(Errno::EAGAIN) => {}
                    Err(e) => return Err(sys("read the exec fifo")(e)),
                }
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return Err(RuntimeError::Setup {
                    id: id.into(),
                    message: "the container init exited before start".into(),
                });
            }
        }
        std::fs::remove_file(&fifo_path).map_err(|e| {
            sys("remove the exec fifo")(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        })?;
        record.state.status = Status::Running;
        self.states.save(&record)?;
        tracing::info!(container = id, "started");
        Ok(())
    }

    /// The OCI state, with the status checked against the live process.
    pub fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let (record, status) = self.load(id)?;
        let mut state = record.state;
        state.status = status;
        if status == Status::Stopped {
            state.pid = 0;
        }
        Ok(state)
    }

    /// Signals the container's init through a pidfd.
    pub fn kill(&self, id: &str, signal: Signal) -> Result<(), RuntimeError> {
        let (record, status) = self.load(id)?;
        if status == Status::Stopped {
            return Err(RuntimeError::WrongStatus {
                id: id.into(),
                status,
                wanted: "created or running",
                action: "kill",
            });
        }
        let sys = |action: &'static str| {
            let id = id.to_string();
            move |errno| RuntimeError::Sys {
                id,
                action: action.into(),
                errno,
            }
        };
        match pidfd::open_verified(record.state.pid, record.init_start_time)
            .map_err(sys("open a pidfd for the init"))?
        {
            Some(fd) => pidfd::send_signal(&fd, signal).map_err(sys("signal the init")),
            None => Err(RuntimeError::WrongStatus {
                id: id.into(),
                status: Status::Stopped,
                wanted: "created or running",
                action: "kill",
            }),
        }
    }

    /// Deletes a stopped (or created) container; a running one only with `force`,
    /// which SIGKILLs everything in its cgroup. Removes the cgroup and the state.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let (record, status) = match self.load(id) {
            Ok(loaded) => loaded,
            // An unreadable state cannot say where the process and cgroup are:
            // with --force, drop the state so the id can be reused.
            Err(RuntimeError::State(StateError::Corrupt { path, source })) if force => {
                tracing::warn!(container = id, path = %path.display(), error = %source, "removing corrupt state");
                self.states.remove(id)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if status == Status::Running && !force {
            return Err(RuntimeError::StillRunning(id.into()));
        }
        if status != Status::Stopped {
            let pidfd = pidfd::open_verified(record.state.pid, record.init_start_time)
                .ok()
                .flatten();
            if let Some(fd) = pidfd {
                let _ = pidfd::send_signal(&fd, Signal::SIGKILL);
                if !pidfd::wait_exit(&fd, Duration::from_secs(10)) {
                    return Err(RuntimeError::KillTimeout(id.into()));
                }
            }
        }
        let cgroup = ContainerCgroup::load(&record.cgroup_path);
        cgroup.kill_all().map_err(|source| RuntimeError::Cgroup {
            id: id.into(),
            source,
        })?;
        cgroup.remove().map_err(|source| RuntimeError::Cgroup {
            id: id.into(),
            source,
        })?;
        self.states.remove(id)?;
        tracing::info!(container = id, "deleted");
        Ok(())
    }

    /// All containers in the state root.
    pub fn list(&self) -> Result<Vec<ContainerState>, RuntimeError> {
        let mut out = Vec::new();
        for id in self.states.ids()? {
            match self.state(&id) {
                Ok(state) => out.push(state),
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "skipping unreadable container state")
                }
            }
        }
        Ok(out)
    }

    /// Creation time and host uid of root, for `list`.
    pub fn details(&self, id: &str) -> Result<(String, u32), RuntimeError> {
        let record = self.states.load(id)?;
        Ok((record.created, record.root_host_uid))
    }

    /// Resource usage from the container's cgroup.
    pub fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        let (record, _) = self.load(id)?;
        ContainerCgroup::load(&record.cgroup_path)
            .stats()
            .map_err(|source| RuntimeError::Cgroup {
                id: id.into(),
                source,
            })
    }

    /// Changes the limits of a created or running container.
    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        let (record, status) = self.load(id)?;
        if status == Status::Stopped {
            return Err(RuntimeError::WrongStatus {
                id: id.into(),
                status,
                wanted: "created or running",
                action: "update",
            });
        }
        let raw = serde_json::to_value(resources).unwrap_or_default();
        spec::check_resource_keys(&raw)?;
        ContainerCgroup::load(&record.cgroup_path)
            .apply(resources)
            .map_err(|source| RuntimeError::Cgroup {
                id: id.into(),
                source,
            })
    }

    /// Runs a process inside a created or running container and waits for it.
    pub fn exec(&self, id: &str, opts: &ExecOptions) -> Result<ExitStatus, RuntimeError> {
        let (record, status) = self.load(id)?;
        if status == Status::Stopped {
            return Err(RuntimeError::WrongStatus {
                id: id.into(),
                status,
                wanted: "created or running",
                action: "exec",
            });
        }
        if opts.args.is_empty() {
            return Err(RuntimeError::Invalid {
                id: id.into(),
                message: "exec needs a command to run".into(),
            });
        }
        let config =
            std::fs::read(self.state_dir(id).join(state::CONFIG_FILE)).map_err(|source| {
                SpecError::Read {
                    path: self.state_dir(id).join(state::CONFIG_FILE),
                    source,
                }
            })?;
        let spec = spec::parse(&config)?;
        let linux = spec.linux().as_ref().expect("validated");
        let seccomp = match linux.seccomp() {
            Some(profile) => seccomp::compile(profile).map_err(SpecError::from)?,
            None => CompiledSeccomp::default(),
        };
        let process = spec.process().as_ref().expect("validated");
        let plan = ProcessPlan::from_spec(process, seccomp)
            .and_then(|p| {
                p.with_overrides(
                    &opts.args,
                    Some(&opts.env),
                    opts.cwd.as_deref(),
                    opts.user,
                    opts.tty,
                )
            })
            .map_err(|source| RuntimeError::Process {
                id: id.into(),
                source,
            })?;
        crate::exec::run(id, &record, plan)
    }
}

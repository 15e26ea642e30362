//! `ve-runtime`: the OCI runtime command line (as runc accepts it) over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use ve_runtime::{CreateOptions, ExecOptions, LinuxResources, Runtime, Signal};

#[derive(Parser)]
#[command(
    name = "ve-runtime",
    version,
    about = "OCI runtime for virtual environments"
)]
struct Cli {
    /// Directory holding container state.
    #[arg(long, global = true, default_value = ve_runtime::DEFAULT_ROOT)]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long = "log-format", global = true, default_value = "text")]
    log_format: String,
    /// Verbose logging.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a container from a bundle; its process waits for `start`.
    Create {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        id: String,
    },
    /// Start a created container.
    Start { id: String },
    /// Print the OCI state as JSON.
    State { id: String },
    /// Send a signal to the container's init (default SIGTERM).
    Kill {
        id: String,
        signal: Option<String>,
        #[arg(long = "signal", short = 's')]
        signal_flag: Option<String>,
    },
    /// Delete a container (a running one only with --force).
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start; without --detach wait for the container and delete it.
    Run {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[arg(short, long)]
        detach: bool,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        id: String,
    },
    /// Run a process in a container.
    Exec {
        #[arg(short, long)]
        tty: bool,
        #[arg(long)]
        cwd: Option<PathBuf>,
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// uid[:gid] inside the container.
        #[arg(short, long)]
        user: Option<String>,
        /// An OCI process.json instead of the command line.
        #[arg(short, long)]
        process: Option<PathBuf>,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Change the limits of a running container.
    Update {
        /// linux.resources as JSON ("-" for stdin).
        #[arg(short, long)]
        resources: Option<PathBuf>,
        #[arg(long)]
        memory: Option<i64>,
        #[arg(long = "memory-swap")]
        memory_swap: Option<i64>,
        #[arg(long = "cpu-shares")]
        cpu_shares: Option<u64>,
        #[arg(long = "cpu-quota")]
        cpu_quota: Option<i64>,
        #[arg(long = "cpu-period")]
        cpu_period: Option<u64>,
        #[arg(long = "cpuset-cpus")]
        cpuset_cpus: Option<String>,
        #[arg(long = "pids-limit")]
        pids_limit: Option<i64>,
        id: String,
    },
    /// Print resource usage as JSON.
    Stats { id: String },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Runtime(#[from] ve_runtime::RuntimeError),
    #[error("{0}")]
    Usage(String),
}

fn parse_signal(text: &str) -> Result<Signal, CliError> {
    let bad = || {
        CliError::Usage(format!(
            "unknown signal {text:?}: use a name like KILL, SIGTERM or a number"
        ))
    };
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| bad());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| bad())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf, what: &str) -> Result<T, CliError> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::Usage(format!("cannot read {what} from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read {what} {}: {e}", path.display())))?
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{what} {} is invalid: {e}", path.display())))
}

fn init_logging(cli: &Cli) {
    let level = if cli.debug { "debug" } else { "warn" };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = cli.log.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    match (file, cli.log_format.as_str()) {
        (Some(f), "json") => builder.json().with_writer(std::sync::Mutex::new(f)).init(),
        (Some(f), _) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        (None, "json") => builder.json().with_writer(std::io::stderr).init(),
        (None, _) => builder.with_writer(std::io::stderr).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ve-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let runtime = Runtime::new(&cli.root);
    match cli.command {
        Command::Create {
            bundle,
            pid_file,
            console_socket,
            id,
        } => {
            runtime.create(
                &id,
                &bundle,
                &CreateOptions {
                    pid_file,
                    console_socket,
                    output: None,
                },
            )?;
        }
        Command::Start { id } => runtime.start(&id)?,
        Command::State { id } => {
            let state = runtime.state(&id)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&state).expect("state serializes")
            );
        }
        Command::Kill {
            id,
            signal,
            signal_flag,
        } => {
            let text = signal_flag.or(signal).unwrap_or_else(|| "TERM".into());
            runtime.kill(&id, parse_signal(&text)?)?;
        }
        Command::Delete { force, id } => runtime.delete(&id, force)?,
        Command::Run {
            bundle,
            detach,
            pid_file,
            console_socket,
            id,
        } => {
            if !detach {
                // Become the subreaper so the container's init, orphaned by the
                // runtime's intermediate process, is our child and we get its status.
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            }
            // In the foreground with process.terminal and no socket of the
            // caller's, we receive the terminal ourselves and relay it, as runc does.
            let wants_terminal = ve_runtime::spec::load(&bundle)
                .map(|s| {
                    s.process()
                        .as_ref()
                        .and_then(|p| p.terminal())
                        .unwrap_or(false)
                })
                .unwrap_or(false);
            let own_console = (!detach && wants_terminal && console_socket.is_none())
                .then(|| ForegroundConsole::listen(&cli.root, &id))
                .transpose()?;
            let console_socket =
                console_socket.or_else(|| own_console.as_ref().map(|c| c.path.clone()));
            let state = runtime.create(
                &id,
                &bundle,
                &CreateOptions {
                    pid_file,
                    console_socket,
                    output: None,
                },
            )?;
            let master = match own_console.map(ForegroundConsole::receive).transpose() {
                Ok(master) => master,
                Err(e) => {
                    let _ = runtime.delete(&id, true);
                    return Err(e);
                }
            };
            if let Err(e) = runtime.start(&id) {
                let _ = runtime.delete(&id, true);
                return Err(e.into());
            }
            if !detach {
                if let Some(master) = master {
                    use std::os::fd::AsFd;
                    let stdin = std::io::stdin();
                    ve_runtime::console::copy_window_size(stdin.as_fd(), master.as_fd());
                    let _raw = ve_runtime::console::RawMode::enter(stdin.as_fd());
                    ve_runtime::console::relay(&master);
                }
                let code = wait_for(state.pid);
                runtime.delete(&id, true)?;
                return Ok(ExitCode::from(code));
            }
        }
        Command::Exec {
            tty,
            cwd,
            env,
            user,
            process,
            id,
            command,
        } => {
            let mut opts = ExecOptions {
                args: command,
                env,
                cwd,
                tty,
                user: None,
            };
            if let Some(path) = process {
                let p: oci_spec::runtime::Process = read_json(&path, "process file")?;
                opts.args = p.args().clone().unwrap_or_default();
                opts.env.extend(p.env().clone().unwrap_or_default());
                opts.cwd = Some(p.cwd().clone());
                opts.tty = p.terminal().unwrap_or(false) || tty;
                opts.user = Some((p.user().uid(), p.user().gid()));
            }
            if let Some(user) = user {
                let mut parts = user.splitn(2, ':');
                let parse = |s: Option<&str>| s.and_then(|v| v.parse::<u32>().ok());
                let uid = parse(parts.next()).ok_or_else(|| {
                    CliError::Usage(format!("bad --user {user:?}: use uid[:gid]"))
                })?;
                let gid = match parts.next() {
                    Some(g) => g.parse().map_err(|_| {
                        CliError::Usage(format!("bad --user {user:?}: use uid[:gid]"))
                    })?,
                    None => uid,
                };
                opts.user = Some((uid, gid));
            }
            if opts.args.is_empty() {
                return Err(CliError::Usage(
                    "exec needs a command: ve-runtime exec ID CMD [ARGS...]".into(),
                ));
            }
            let status = runtime.exec(&id, &opts)?;
            let code = status.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
            });
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Command::List { format, quiet } => {
            let states = runtime.list()?;
            if format == "json" {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&states).expect("states serialize")
                );
            } else if quiet {
                states.iter().for_each(|s| println!("{}", s.id));
            } else {
                println!(
                    "{:<24} {:<8} {:<8} {:<22} BUNDLE",
                    "ID", "PID", "STATUS", "CREATED"
                );
                for s in states {
                    let created = runtime.details(&s.id).map(|d| d.0).unwrap_or_default();
                    println!(
                        "{:<24} {:<8} {:<8} {:<22} {}",
                        s.id,
                        s.pid,
                        s.status,
                        created,
                        s.bundle.display()
                    );
                }
            }
        }
        Command::Update {
            resources,
            memory,
            memory_swap,
            cpu_shares,
            cpu_quota,
            cpu_period,
            cpuset_cpus,
            pids_limit,
            id,
        } => {
            let mut value: serde_json::Value = match &resources {
                Some(path) => read_json(path, "resources file")?,
                None => serde_json::json!({}),
            };
            let mut set = |section: &str, key: &str, v: serde_json::Value| {
                value[section][key] = v;
            };
            if let Some(v) = memory {
                set("memory", "limit", v.into())
            }
            if let Some(v) = memory_swap {
                set("memory", "swap", v.into())
            }
            if let Some(v) = cpu_shares {
                set("cpu", "shares", v.into())
            }
            if let Some(v) = cpu_quota {
                set("cpu", "quota", v.into())
            }
            if let Some(v) = cpu_period {
                set("cpu", "period", v.into())
            }
            if let Some(v) = cpuset_cpus {
                set("cpu", "cpus", v.into())
            }
            if let Some(v) = pids_limit {
                set("pids", "limit", v.into())
            }
            ve_runtime::spec::check_resource_keys(&value)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            ve_runtime::spec::normalize_resources(&mut value);
            let resources: LinuxResources = serde_json::from_value(value)
                .map_err(|e| CliError::Usage(format!("invalid resources: {e}")))?;
            runtime.update(&id, &resources)?;
        }
        Command::Stats { id } => {
            let stats = runtime.stats(&id)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&stats).expect("stats serialize")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A console socket of our own for `run` in the foreground.
struct ForegroundConsole {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl ForegroundConsole {
    fn listen(root: &std::path::Path, id: &str) -> Result<Self, CliError> {
        std::fs::create_dir_all(root)
            .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", root.display())))?;
        let path = root.join(format!(".{id}.console"));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| CliError::Usage(format!("cannot listen on {}: {e}", path.display())))?;
        Ok(Self { path, listener })
    }

    /// The pty master the container's init sent (it connects during create).
    fn receive(self) -> Result<std::os::fd::OwnedFd, CliError> {
        use std::os::fd::AsRawFd;
        let result = (|| {
            let (stream, _) = self
                .listener
                .accept()
                .map_err(|e| CliError::Usage(format!("console socket: {e}")))?;
            ve_runtime::console::recv_fd(stream.as_raw_fd())
                .map_err(|e| CliError::Usage(e.to_string()))?
                .ok_or_else(|| CliError::Usage("the container sent no terminal".into()))
        })();
        result
    }
}

impl Drop for ForegroundConsole {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits for the container's init (our child since we are its subreaper),
/// reaping other orphans on the way; returns its exit code as a shell would.
/// Signals `run` passes on to the container's init instead of dying of them.
const FORWARDED: &[Signal] = &[
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Waits for the container's init (our child since we are its subreaper),
/// reaping other orphans on the way and forwarding signals to it; returns its
/// exit code as a shell would.
fn wait_for(pid: i32) -> u8 {
    use nix::sys::signal::{SigSet, SigmaskHow};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut set = SigSet::empty();
    FORWARDED.iter().for_each(|s| set.add(*s));
    set.add(Signal::SIGCHLD);
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    let signals = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).ok();
    loop {
        // Reap whatever has exited; the init may already be gone.
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a local integer.
            let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if reaped <= 0 {
                if reaped < 0 && nix::errno::Errno::last() == nix::errno::Errno::ECHILD {
                    return 255;
                }
                break;
            }
            if reaped == pid {
                return if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status) as u8
                } else {
                    (128 + libc::WTERMSIG(status)) as u8
                };
            }
        }
        match signals.as_ref().map(|s| s.read_signal()) {
            Some(Ok(Some(info))) => {
                let number = info.ssi_signo as i32;
                if number != libc::SIGCHLD {
                    // SAFETY: sending a signal number we received to the init's pid,
                    // which is our child (not yet reaped), so it cannot be reused.
                    unsafe { libc::kill(pid, number) };
                }
            }
            Some(Err(nix::errno::Errno::EINTR)) | Some(Ok(None)) => {}
            // No signalfd: fall back to a blocking wait.
            _ => {
                let mut status = 0;
                // SAFETY: waitpid writes the status into a local integer.
                let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
                if reaped == pid {
                    return if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status) as u8
                    } else {
                        (128 + libc::WTERMSIG(status)) as u8
                    };
                }
                return 255;
            }
        }
    }
}

//! `ve-procfs`: the node's daemon serving per-VE /proc views over FUSE.
//!
//! ```text
//! ve-procfs --mountpoint /run/vz/procfs --cgroup-parent vz [--foreground]
//! ```
//! Without `--foreground` it detaches and returns once the mount is live
//! (exit status 0), or fails with the daemon's error (exit status 1).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nix::unistd::{fork, pipe, setsid, ForkResult};
use node_agent::procfs::{self, DaemonOptions};

#[derive(Parser, Debug)]
#[command(
    name = "ve-procfs",
    about = "Serve per-VE /proc views (meminfo, cpuinfo, stat, uptime, loadavg, swaps, diskstats) over FUSE"
)]
struct Args {
    /// Directory to mount the views on.
    #[arg(long, default_value = procfs::DEFAULT_MOUNTPOINT)]
    mountpoint: PathBuf,
    /// Cgroup directory holding one child per VE (<parent>/<ve-id> in each controller).
    #[arg(long, default_value = procfs::DEFAULT_CGROUP_PARENT)]
    cgroup_parent: String,
    /// Where the cgroup filesystems are mounted.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Stay in the foreground instead of detaching.
    #[arg(long)]
    foreground: bool,
}

fn serve(options: &DaemonOptions, ready: Option<OwnedFd>) -> ExitCode {
    let result = procfs::run(options, move || {
        if let Some(ready) = ready {
            let _ = std::fs::File::from(ready).write_all(b"1");
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("ve-procfs: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fuser=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = node_agent::procfs::sources::validate_ve_id(&args.cgroup_parent) {
        eprintln!("ve-procfs: invalid --cgroup-parent: {error}");
        return ExitCode::FAILURE;
    }
    let options = DaemonOptions {
        mountpoint: args.mountpoint,
        cgroup_parent: args.cgroup_parent,
        cgroup_root: args.cgroup_root,
        threads: args.threads,
    };
    if args.foreground {
        return serve(&options, None);
    }
    let (ready_read, ready_write) = match pipe() {
        Ok(pair) => pair,
        Err(errno) => {
            eprintln!("ve-procfs: cannot create readiness pipe: {errno}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: no other thread exists yet (the tracing subscriber spawns none), so the
    // child may continue running ordinary Rust code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(ready_read);
            let _ = setsid();
            serve(&options, Some(ready_write))
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(ready_write);
            // EOF without a byte: the daemon failed (it printed why).
            let mut byte = [0u8; 1];
            match std::fs::File::from(ready_read).read(&mut byte) {
                Ok(1) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            }
        }
        Err(errno) => {
            eprintln!("ve-procfs: cannot detach: {errno}");
            ExitCode::FAILURE
        }
    }
}

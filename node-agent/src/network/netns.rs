//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` switches only the calling thread, so the work runs
//! on a short-lived thread and the caller's threads never change namespace.
//! Processes spawned and sockets opened on that thread belong to the target
//! namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Entering a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open netns {path}: {source} (is the VE's init still running?)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter netns {path}: {source} (is it a network namespace file?)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("thread working in netns {path} panicked")]
    Panicked { path: PathBuf },
}

/// Runs `work` on a thread inside the network namespace at `netns`
/// (e.g. `/proc/<pid>/ns/net` or `/run/netns/<name>`).
pub fn run_in_netns<T, F>(netns: &Path, work: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = File::open(netns).map_err(|source| NetnsError::Open {
        path: netns.to_owned(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: netns.to_owned(),
                    source,
                })?;
                Ok(work())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetnsError::Panicked {
                    path: netns.to_owned(),
                })
            })
    })
}

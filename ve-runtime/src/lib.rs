//! OCI runtime for VEs: namespaces (user, mount, pid, uts, ipc, net, cgroup),
//! cgroups v1/v2 through cgroups-rs, seccomp through seccompiler, capabilities,
//! masked paths, a minimal /dev, console sockets, and exec with a tty.
//!
//! The node agent calls [`Runtime`] in-process; the `ve-runtime` binary exposes
//! the same operations with runc's command line. See docs/ve-runtime.md.

pub mod capabilities;
pub mod cgroups;
pub mod console;
mod exec;
mod init;
pub mod mounts;
pub mod namespaces;
mod pidfd;
pub mod policy;
pub mod process;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod spec;
pub mod state;
mod sync;
mod syscall_table;

pub use cgroups::Stats;
pub use nix::sys::signal::Signal;
pub use oci_spec::runtime::LinuxResources;
pub use runtime::{CreateOptions, ExecOptions, Runtime, RuntimeError, DEFAULT_ROOT};
pub use state::{ContainerState, Status};

//! Runs `ip` with a batch script on stdin: one process per batch. Used off
//! the VE start path (bridge setup, address changes, deleting links). The
//! children inherit the network namespace of the calling thread (see
//! [`super::netns`]).

use std::io::Write as _;
use std::process::{Command, Stdio};

/// A tool invocation that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {tool}: {source} (is it installed? see scripts/install-deps.sh)")]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: &'static str, stderr: String },
}

/// `ip -batch -`: stops at the first failing line.
pub fn ip_batch(script: &str) -> Result<(), ToolError> {
    run("ip", &["-batch", "-"], script).map(drop)
}

/// Runs a tool and returns its stdout.
pub fn run(tool: &'static str, args: &[&str], stdin: &str) -> Result<String, ToolError> {
    tracing::trace!(tool, ?args, stdin, "running network tool");
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ToolError::Spawn { tool, source })?;
    if let Some(mut input) = child.stdin.take() {
        // Scripts are far smaller than a pipe buffer, so this never blocks.
        // A write error means the tool exited early; its status says why.
        let _ = input.write_all(stdin.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| ToolError::Spawn { tool, source })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        Err(ToolError::Failed {
            tool,
            stderr: if stderr.is_empty() {
                format!("exited with {}", output.status)
            } else {
                stderr.replace('\n', "; ")
            },
        })
    }
}

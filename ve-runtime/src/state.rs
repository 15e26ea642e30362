//! Container state on disk (`<root>/<id>/state.json`) and liveness of its init.
//!
//! The state file is what lets a restarted caller find its containers again;
//! the init's start time (field 22 of /proc/PID/stat) makes sure a reused pid
//! is never mistaken for the container.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.json";
pub const EXEC_FIFO: &str = "exec.fifo";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid container id {0:?}: use 1 to 64 characters from a-z A-Z 0-9 . _ - (not starting with . or -)")]
    InvalidId(String),
    #[error("container {0} already exists (state dir {1}); delete it first")]
    AlreadyExists(String, PathBuf),
    #[error("container {0} does not exist (no state in {1})")]
    NotFound(String, PathBuf),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}; delete the container with --force")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The OCI status of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        };
        f.write_str(text)
    }
}

/// The OCI state of a container, as `ve-runtime state` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pid: i32,
    pub bundle: PathBuf,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

fn is_zero(pid: &i32) -> bool {
    *pid == 0
}

/// What the runtime records about a container beyond the OCI state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: ContainerState,
    /// Field 22 of /proc/PID/stat of the init when it was created.
    pub init_start_time: u64,
    /// The cgroup path (relative to each hierarchy's root).
    pub cgroup_path: String,
    /// RFC 3339 creation time, for `list`.
    pub created: String,
    /// Host uid of the container's root, for `list` and ownership of files.
    #[serde(default)]
    pub root_host_uid: u32,
}

/// Checks a container id: it becomes a directory name and part of a cgroup path.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_string()))
    }
}

/// The directory holding all containers' state.
#[derive(Debug, Clone)]
pub struct StateRoot {
    root: PathBuf,
}

impl StateRoot {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates the container's state dir; fails if it exists (duplicate id).
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        fs::create_dir_all(&self.root).map_err(io("create state root", &self.root))?;
        let dir = self.container_dir(id);
        use std::os::unix::fs::DirBuilderExt;
        match fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::AlreadyExists(id.to_string(), dir))
            }
            Err(e) => Err(io("create state dir", &dir)(e)),
        }
    }

    /// Writes the record atomically (write + rename), so a crash never leaves half a file.
    pub fn save(&self, record: &StateRecord) -> Result<(), StateError> {
        let dir = self.container_dir(&record.state.id);
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(record).expect("state serializes");
        let mut file = fs::File::create(&tmp).map_err(io("write", &tmp))?;
        file.write_all(&json).map_err(io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename into place", &path))
    }

    pub fn load(&self, id: &str) -> Result<StateRecord, StateError> {
        validate_id(id)?;
        let path = self.container_dir(id).join(STATE_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_string(), self.root.clone()))
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        serde_json::from_slice(&text).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Ids of all containers with a state dir, sorted.
    pub fn ids(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.root)(e)),
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(STATE_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.container_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove state dir", &dir)(e)),
        }
    }
}

/// What /proc/PID/stat says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub start_time: u64,
}

/// Parses /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let after_comm = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

pub fn read_proc_stat(pid: i32) -> Option<ProcStat> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_proc_stat(&t))
}

/// Whether `pid` is still the process that had `start_time`, and alive (not a zombie).
pub fn is_same_live_process(pid: i32, start_time: u64) -> bool {
    pid > 0
        && matches!(read_proc_stat(pid), Some(stat) if stat.start_time == start_time && stat.state != 'Z' && stat.state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_and_parens_in_comm() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000000 200 18446744073709551615";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let stat = read_proc_stat(me).unwrap();
        assert!(is_same_live_process(me, stat.start_time));
        assert!(!is_same_live_process(me, stat.start_time + 1));
    }

    #[test]
    fn ids_are_validated() {
        for good in ["web1", "a.b_c-d", "VE42"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_dir_is_refused_and_state_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::new(tmp.path().join("state"));
        root.create_dir("c1").unwrap();
        assert!(matches!(
            root.create_dir("c1"),
            Err(StateError::AlreadyExists(..))
        ));
        let record = StateRecord {
            state: ContainerState {
                oci_version: "1.0.2".into(),
                id: "c1".into(),
                status: Status::Created,
                pid: 42,
                bundle: "/b".into(),
                annotations: HashMap::new(),
            },
            init_start_time: 7,
            cgroup_path: "/ve-runtime/c1".into(),
            created: "now".into(),
            root_host_uid: 100000,
        };
        root.save(&record).unwrap();
        assert_eq!(root.load("c1").unwrap().state, record.state);
        assert_eq!(root.ids().unwrap(), vec!["c1".to_string()]);
        assert!(matches!(root.load("nope"), Err(StateError::NotFound(..))));
    }
}

//! The durable Raft log: hard state, entries and the latest snapshot on disk.
//!
//! Layout of a member's data directory:
//! - `raft.log`: append-only records, each `[u32 len][u32 crc32c][payload]` (little endian),
//!   payload = bincode of [`LogRecord`]. Appends are fdatasync'd before `persist` returns, so
//!   nothing is acknowledged or voted for before it is on disk. A torn record at the tail (a
//!   crash mid-write) fails its crc and is cut off at the next open: it was never acknowledged.
//! - `snapshot`: the latest snapshot (same framing), replaced atomically (write, fsync, rename,
//!   fsync dir). After a snapshot the log file is rewritten with only the entries after it.
//!
//! The in-memory copy ([`LogCore`]) answers raft-rs's `Storage` queries.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use serde::{Deserialize, Serialize};

const LOG_FILE: &str = "raft.log";
const SNAPSHOT_FILE: &str = "snapshot";
/// Refuse records larger than this at read: a corrupt length must not allocate gigabytes.
const MAX_RECORD_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt at byte {offset}: {reason}; restore the member from a backup or remove its data directory and re-join it as a new member")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("data directory {0} already holds a Raft log: refusing to initialize it again")]
    AlreadyInitialized(PathBuf),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RaftLogError + 'a {
    move |source| RaftLogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum LogRecord {
    /// Protobuf-encoded entries; they replace any entries at and after the first one's index.
    Entries(Vec<Vec<u8>>),
    HardState(Vec<u8>),
    ConfState(Vec<u8>),
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    metadata: Vec<u8>,
    data: Vec<u8>,
}

/// Frames one payload: `[len][crc32c][payload]`.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits framed records; returns them and the length of the valid prefix (a torn or corrupt
/// tail is excluded).
pub fn unframe(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut records = Vec::new();
    let mut offset = 0;
    while bytes.len() - offset >= 8 {
        let len =
            u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD_BYTES || bytes.len() - offset - 8 < len {
            break;
        }
        let payload = &bytes[offset + 8..offset + 8 + len];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        records.push(payload);
        offset += 8 + len;
    }
    (records, offset)
}

/// In-memory Raft log: the entries after the snapshot, the hard state and the conf state.
#[derive(Debug, Default, Clone)]
pub struct LogCore {
    snapshot_metadata: SnapshotMetadata,
    entries: Vec<Entry>,
    hard_state: HardState,
    conf_state: ConfState,
}

impl LogCore {
    pub fn first_index(&self) -> u64 {
        self.snapshot_metadata.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.index)
            .unwrap_or(self.snapshot_metadata.index)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_metadata.index
    }

    pub fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot_metadata.index {
            return Ok(self.snapshot_metadata.term);
        }
        if index < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(index - self.first_index()) as usize].term)
    }

    /// Appends entries, dropping any conflicting suffix; entries at or before the snapshot are skipped.
    pub fn append(&mut self, entries: &[Entry]) {
        let entries: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.index > self.snapshot_metadata.index)
            .collect();
        let Some(first) = entries.first() else { return };
        assert!(
            first.index <= self.last_index() + 1,
            "raft log gap: last index {}, appending from {}",
            self.last_index(),
            first.index
        );
        let keep = (first.index - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend(entries.into_iter().cloned());
    }

    /// Makes `metadata` the snapshot and drops the entries it covers. Entries after it are kept
    /// only if they agree with it (same term at its index).
    pub fn apply_snapshot_metadata(&mut self, metadata: SnapshotMetadata) {
        let index = metadata.index;
        let agrees = self
            .term(index)
            .map(|t| t == metadata.term)
            .unwrap_or(false)
            && index <= self.last_index();
        if agrees {
            let drop = (index + 1 - self.first_index()) as usize;
            self.entries.drain(..drop);
        } else {
            self.entries.clear();
        }
        self.hard_state.term = self.hard_state.term.max(metadata.term);
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.conf_state = metadata.get_conf_state().clone();
        self.snapshot_metadata = metadata;
    }

    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last_index() + 1,
            "entries up to {high} asked, last index {}",
            self.last_index()
        );
        let offset = self.first_index();
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in &self.entries[(low - offset) as usize..(high - offset) as usize] {
            size += e.compute_size() as u64;
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }
}

/// The durable log, owned by the Raft node (raft-rs's `Storage`).
pub struct DiskStorage {
    dir: PathBuf,
    log_file: File,
    core: LogCore,
    snapshot_data: Vec<u8>,
    /// fsync on every persist; only benchmarks of the fsync cost itself turn it off.
    sync: bool,
}

impl DiskStorage {
    /// True if `dir` already holds a log or snapshot.
    pub fn exists(dir: &Path) -> bool {
        dir.join(LOG_FILE).exists() || dir.join(SNAPSHOT_FILE).exists()
    }

    /// Writes the initial snapshot of a new cluster member: index 0, the initial voters and the
    /// initial state machine (with the members' addresses).
    pub fn bootstrap(dir: &Path, voters: Vec<u64>, state: Vec<u8>) -> Result<(), RaftLogError> {
        if Self::exists(dir) {
            return Err(RaftLogError::AlreadyInitialized(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let mut metadata = SnapshotMetadata::default();
        metadata.mut_conf_state().voters = voters;
        write_snapshot_file(dir, &metadata, &state)?;
        Ok(())
    }

    /// Opens (or creates empty) the log in `dir`, replaying snapshot and records.
    pub fn open(dir: &Path, sync: bool) -> Result<Self, RaftLogError> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let mut core = LogCore::default();
        let mut snapshot_data = Vec::new();
        let snap_path = dir.join(SNAPSHOT_FILE);
        if snap_path.exists() {
            let bytes = std::fs::read(&snap_path).map_err(io_err("read", &snap_path))?;
            let (records, _) = unframe(&bytes);
            let corrupt = |reason: String| RaftLogError::Corrupt {
                path: snap_path.clone(),
                offset: 0,
                reason,
            };
            let record = records
                .first()
                .ok_or_else(|| corrupt("no valid record".into()))?;
            let file: SnapshotFile =
                bincode::deserialize(record).map_err(|e| corrupt(e.to_string()))?;
            let metadata = SnapshotMetadata::parse_from_bytes(&file.metadata)
                .map_err(|e| corrupt(e.to_string()))?;
            core.apply_snapshot_metadata(metadata);
            snapshot_data = file.data;
        }
        let log_path = dir.join(LOG_FILE);
        let mut log_file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        let mut bytes = Vec::new();
        log_file
            .read_to_end(&mut bytes)
            .map_err(io_err("read", &log_path))?;
        let (records, valid) = unframe(&bytes);
        for (n, payload) in records.iter().enumerate() {
            let corrupt = |reason: String| RaftLogError::Corrupt {
                path: log_path.clone(),
                offset: n as u64,
                reason,
            };
            let record: LogRecord =
                bincode::deserialize(payload).map_err(|e| corrupt(e.to_string()))?;
            match record {
                LogRecord::Entries(raw) => {
                    let entries = raw
                        .iter()
                        .map(|b| Entry::parse_from_bytes(b))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| corrupt(e.to_string()))?;
                    core.append(&entries);
                }
                LogRecord::HardState(b) => {
                    let mut hs =
                        HardState::parse_from_bytes(&b).map_err(|e| corrupt(e.to_string()))?;
                    // A hard state written before the snapshot must not move commit back.
                    hs.commit = hs.commit.max(core.snapshot_index());
                    core.hard_state = hs;
                }
                LogRecord::ConfState(b) => {
                    core.conf_state =
                        ConfState::parse_from_bytes(&b).map_err(|e| corrupt(e.to_string()))?;
                }
            }
        }
        if valid < bytes.len() {
            tracing::warn!(path = %log_path.display(), valid, total = bytes.len(), "cutting a torn record off the log tail");
            log_file
                .set_len(valid as u64)
                .map_err(io_err("truncate", &log_path))?;
            log_file.sync_all().map_err(io_err("fsync", &log_path))?;
        }
        // Commit can never be past what the log holds (a lost unsynced tail).
        let last = core.last_index();
        if core.hard_state.commit > last {
            core.hard_state.commit = last;
        }
        Ok(DiskStorage {
            dir: dir.to_path_buf(),
            log_file,
            core,
            snapshot_data,
            sync,
        })
    }

    pub fn core(&self) -> &LogCore {
        &self.core
    }

    /// The latest snapshot's state-machine bytes.
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snapshot_data
    }

    fn write_records(&mut self, records: &[LogRecord], sync: bool) -> Result<(), RaftLogError> {
        let mut buf = Vec::new();
        for r in records {
            frame(
                &bincode::serialize(r).expect("log record serializes"),
                &mut buf,
            );
        }
        let path = self.dir.join(LOG_FILE);
        self.log_file
            .write_all(&buf)
            .map_err(io_err("append to", &path))?;
        if sync && self.sync {
            self.log_file.sync_data().map_err(io_err("fsync", &path))?;
        }
        Ok(())
    }

    /// Appends entries and hard state durably (one fsync) before anything depending on them is sent.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), RaftLogError> {
        let mut records = Vec::new();
        if !entries.is_empty() {
            records.push(LogRecord::Entries(
                entries
                    .iter()
                    .map(|e| e.write_to_bytes().expect("entry encodes"))
                    .collect(),
            ));
        }
        if let Some(hs) = hard_state {
            records.push(LogRecord::HardState(
                hs.write_to_bytes().expect("hard state encodes"),
            ));
        }
        if records.is_empty() {
            return Ok(());
        }
        self.write_records(&records, true)?;
        self.core.append(entries);
        if let Some(hs) = hard_state {
            self.core.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a newer commit index. Not fsync'd on its own: a lost commit index is relearned
    /// from the leader, and the next persist syncs it anyway.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), RaftLogError> {
        let mut hs = self.core.hard_state.clone();
        hs.commit = commit;
        self.write_records(
            &[LogRecord::HardState(
                hs.write_to_bytes().expect("hard state encodes"),
            )],
            false,
        )?;
        self.core.hard_state = hs;
        Ok(())
    }

    /// Persists a configuration change as soon as it is applied.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), RaftLogError> {
        let hs = self.core.hard_state.clone();
        self.write_records(
            &[
                LogRecord::HardState(hs.write_to_bytes().expect("hard state encodes")),
                LogRecord::ConfState(conf_state.write_to_bytes().expect("conf state encodes")),
            ],
            true,
        )?;
        self.core.conf_state = conf_state;
        Ok(())
    }

    /// Installs a snapshot received from the leader, or taken locally at an applied index, and
    /// compacts the log behind it (rewriting the log file with what remains).
    pub fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), RaftLogError> {
        let metadata = snapshot.get_metadata().clone();
        write_snapshot_file(&self.dir, &metadata, &snapshot.data)?;
        self.core.apply_snapshot_metadata(metadata);
        self.snapshot_data = snapshot.data.to_vec();
        self.rewrite_log()
    }

    /// Takes a snapshot of the state machine at `applied_index` (which must be applied here).
    pub fn compact(&mut self, applied_index: u64, state: Vec<u8>) -> Result<(), RaftLogError> {
        if applied_index <= self.core.snapshot_index() {
            return Ok(());
        }
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = applied_index;
        metadata.term = self
            .core
            .term(applied_index)
            .expect("applied entries are in the log");
        metadata.set_conf_state(self.core.conf_state.clone());
        snapshot.data = state.into();
        self.install_snapshot(&snapshot)
    }

    fn rewrite_log(&mut self) -> Result<(), RaftLogError> {
        let path = self.dir.join(LOG_FILE);
        let tmp = self.dir.join("raft.log.tmp");
        let mut buf = Vec::new();
        let records = [
            LogRecord::HardState(self.core.hard_state.write_to_bytes().expect("encodes")),
            LogRecord::ConfState(self.core.conf_state.write_to_bytes().expect("encodes")),
            LogRecord::Entries(
                self.core
                    .entries
                    .iter()
                    .map(|e| e.write_to_bytes().expect("encodes"))
                    .collect(),
            ),
        ];
        for r in &records {
            frame(
                &bincode::serialize(r).expect("log record serializes"),
                &mut buf,
            );
        }
        write_atomically(&self.dir, &tmp, &path, &buf)?;
        self.log_file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(())
    }
}

fn write_snapshot_file(
    dir: &Path,
    metadata: &SnapshotMetadata,
    data: &[u8],
) -> Result<(), RaftLogError> {
    let file = SnapshotFile {
        metadata: metadata.write_to_bytes().expect("metadata encodes"),
        data: data.to_vec(),
    };
    let mut buf = Vec::new();
    frame(
        &bincode::serialize(&file).expect("snapshot serializes"),
        &mut buf,
    );
    write_atomically(
        dir,
        &dir.join("snapshot.tmp"),
        &dir.join(SNAPSHOT_FILE),
        &buf,
    )
}

/// Write to `tmp`, fsync, rename over `path`, fsync the directory: readers see old or new, whole.
fn write_atomically(dir: &Path, tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), RaftLogError> {
    let mut f = File::create(tmp).map_err(io_err("create", tmp))?;
    f.write_all(bytes).map_err(io_err("write", tmp))?;
    f.sync_all().map_err(io_err("fsync", tmp))?;
    std::fs::rename(tmp, path).map_err(io_err("rename into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    Ok(())
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.core.hard_state.clone(),
            self.core.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.core.entries(low, high, max_size.into())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.core.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.core.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.core.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.core.snapshot_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(self.core.snapshot_metadata.clone());
        snapshot.data = self.snapshot_data.clone().into();
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry {
            index,
            term,
            data: data.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn unframe_stops_at_torn_or_corrupt_tail() {
        let mut buf = Vec::new();
        frame(b"one", &mut buf);
        frame(b"two", &mut buf);
        let whole = buf.len();
        frame(b"three", &mut buf);
        buf.truncate(buf.len() - 2);
        let (records, valid) = unframe(&buf);
        assert_eq!(records, vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(valid, whole);
        let mut flipped = buf[..whole].to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(unframe(&flipped).0.len(), 1);
    }

    #[test]
    fn core_append_replaces_conflicting_suffix() {
        let mut core = LogCore::default();
        core.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")]);
        core.append(&[entry(2, 2, "x")]);
        assert_eq!(core.last_index(), 2);
        assert_eq!(core.term(2).unwrap(), 2);
    }

    #[test]
    fn log_survives_reopen_compaction_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        DiskStorage::bootstrap(dir.path(), vec![1, 2, 3], b"init".to_vec()).unwrap();
        assert!(matches!(
            DiskStorage::bootstrap(dir.path(), vec![1], vec![]),
            Err(RaftLogError::AlreadyInitialized(_))
        ));
        {
            let mut s = DiskStorage::open(dir.path(), true).unwrap();
            assert_eq!(s.core().conf_state().voters, vec![1, 2, 3]);
            let hs = HardState {
                term: 1,
                vote: 2,
                commit: 3,
                ..Default::default()
            };
            s.persist(
                &[
                    entry(1, 1, "a"),
                    entry(2, 1, "b"),
                    entry(3, 1, "c"),
                    entry(4, 1, "d"),
                ],
                Some(&hs),
            )
            .unwrap();
            s.compact(2, b"state@2".to_vec()).unwrap();
            s.persist(&[entry(5, 1, "e")], None).unwrap();
        }
        // A crash in the middle of an append leaves a torn record: it is cut off.
        let log = dir.path().join(LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let s = DiskStorage::open(dir.path(), true).unwrap();
        assert_eq!(s.core().first_index(), 3);
        assert_eq!(s.core().last_index(), 5);
        assert_eq!(s.core().hard_state().vote, 2);
        assert_eq!(s.core().hard_state().commit, 3);
        assert_eq!(s.snapshot_data(), b"state@2");
        assert_eq!(s.term(2).unwrap(), 1);
        assert!(matches!(
            s.term(1),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let ents = s
            .entries(3, 6, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            ents.iter().map(|e| e.data.to_vec()).collect::<Vec<_>>(),
            vec![b"c".to_vec(), b"d".to_vec(), b"e".to_vec()]
        );
    }
}

//! The filesystem metadata on a [`MetadataStore`]: inodes, directory entries, the chunk map
//! and per-file write leases with epochs. Every change is one atomic commit conditioned on the
//! revisions it read, retried on conflict, so concurrent mounts never lose each other's updates.
//!
//! Keys (all under `/fs/`, see docs/cluster-store.md):
//! - `/fs/inodes/<ino>`: [`Inode`] (JSON)
//! - `/fs/dirents/<parent ino>/<name>`: [`DirEntry`] (JSON)
//! - `/fs/chunks/<ino>/<chunk index>`: [`ChunkInfo`] (JSON)
//! - `/fs/leases/<ino>`: [`WriteLease`] (JSON)
//! - `/fs/shared/<chunk id>`: [`SharedChunk`] (JSON), the chunk records of a chunk shared by
//!   several files after a clone; absent for a chunk only one record points at
//! - `/fs/next_ino`: the next inode number (decimal)
//! - `/fs/servers/<addr>`: a registered chunk server (see [`crate::servers`], which also keeps
//!   `/fs/draining/` and `/fs/dead/`)
//!
//! Numbers in keys are 16 hex digits so keys sort numerically.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::metadata_store::{Condition, MetadataError, MetadataStore, Mutation, Versioned};

pub const ROOT_INO: u64 = 1;
/// Longest name of a directory entry, in bytes (as Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;
const MAX_RETRIES: usize = 64;
/// Most chunk records one commit adds or drops: each costs up to five operations (record and
/// sharing record, changed and conditioned), and the store takes 1024 per transaction.
pub const MAX_CHUNKS_PER_COMMIT: usize = 150;

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("{what} does not exist")]
    NotFound { what: String },
    #[error("{name:?} already exists in directory {parent}")]
    Exists { parent: u64, name: String },
    #[error("directory {what} is not empty")]
    NotEmpty { what: String },
    #[error("{what} is a directory")]
    IsDirectory { what: String },
    #[error("{what} is not a directory")]
    NotDirectory { what: String },
    #[error("name {name:?} is {len} bytes long; the limit is {NAME_MAX}")]
    NameTooLong { name: String, len: usize },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("file {ino} is being written by {holder} (lease epoch {epoch}); take the lease over only if that writer is dead")]
    LeaseBusy { ino: u64, holder: String, epoch: u64 },
    #[error("file {ino}: this writer's lease (epoch {epoch}) was taken over by another writer; its writes are refused")]
    Fenced { ino: u64, epoch: u64 },
    #[error("inode {ino} has no extended attribute {name:?}")]
    NoAttribute { ino: u64, name: String },
    #[error("extended attribute {name:?} is not supported here (system.* attributes such as ACLs are not stored)")]
    AttributeNotSupported { name: String },
    #[error("file {ino}: the range is locked by process {pid} on node {node}")]
    LockConflict { ino: u64, node: String, pid: u32 },
    #[error("too many concurrent changes to {what}; retry")]
    Contended { what: String },
    #[error(transparent)]
    Store(#[from] MetadataError),
}

impl NamespaceError {
    /// The errno a POSIX caller sees.
    pub fn errno(&self) -> i32 {
        match self {
            NamespaceError::NotFound { .. } => libc::ENOENT,
            NamespaceError::Exists { .. } => libc::EEXIST,
            NamespaceError::NotEmpty { .. } => libc::ENOTEMPTY,
            NamespaceError::IsDirectory { .. } => libc::EISDIR,
            NamespaceError::NotDirectory { .. } => libc::ENOTDIR,
            NamespaceError::NameTooLong { .. } => libc::ENAMETOOLONG,
            NamespaceError::InvalidName { .. } | NamespaceError::Invalid(_) => libc::EINVAL,
            NamespaceError::LeaseBusy { .. } => libc::EBUSY,
            NamespaceError::Fenced { .. } => libc::EIO,
            NamespaceError::Contended { .. } | NamespaceError::LockConflict { .. } => libc::EAGAIN,
            NamespaceError::NoAttribute { .. } => libc::ENODATA,
            NamespaceError::AttributeNotSupported { .. } => libc::EOPNOTSUPP,
            NamespaceError::Store(_) => libc::EIO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeKind {
    Directory,
    File,
    Symlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                Timestamp { secs: -(d.as_secs() as i64), nanos: 0 }
            }
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> SystemTime {
        if t.secs >= 0 {
            UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: u64,
    pub kind: InodeKind,
    /// Permission bits (0o7777), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub nlink: u32,
    pub symlink_target: Option<String>,
    /// Copies of each chunk to keep.
    pub replicas: u32,
    /// The directory holding it (for a directory: its only parent; for a file: the one it
    /// was created in). 0 when unknown.
    #[serde(default)]
    pub parent: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: InodeKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub server: String,
    /// The chunk version this replica is known to hold; below the chunk's version = stale.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub chunk_id: u64,
    pub version: u64,
    pub replicas: Vec<Replica>,
}

impl ChunkInfo {
    /// Servers holding the current version: the only ones read or written.
    pub fn current_servers(&self) -> Vec<String> {
        self.replicas.iter().filter(|r| r.version == self.version).map(|r| r.server.clone()).collect()
    }

    /// The chunk after a write that reached only `succeeded`: the version moves on and every
    /// other replica keeps its old version, so it is stale and never read again.
    pub fn after_partial_write(&self, succeeded: &[String]) -> ChunkInfo {
        let version = self.version + 1;
        let replicas = self
            .replicas
            .iter()
            .map(|r| Replica {
                server: r.server.clone(),
                version: if r.version == self.version && succeeded.contains(&r.server) { version } else { r.version },
            })
            .collect();
        ChunkInfo { chunk_id: self.chunk_id, version, replicas }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteLease {
    /// The writer holding the lease; `None` once released (the epoch stays).
    pub holder: Option<String>,
    pub epoch: u64,
}

/// A write lease this writer holds: `revision` guards every metadata change it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease {
    pub ino: u64,
    pub epoch: u64,
    pub revision: u64,
}

/// A chunk record: chunk `index` of file `ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkOwner {
    pub ino: u64,
    pub index: u64,
}

/// The chunk records pointing at a chunk that several files share (copy-on-write clones).
/// It exists only while two or more records do: a chunk without one belongs to one record,
/// which may write it in place and deletes it when it lets go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedChunk {
    pub owners: Vec<ChunkOwner>,
}

/// Reference changes to chunks gathered for one commit: each chunk's sharing record is read
/// once, changed in memory, then written (or deleted) once, and the commit is conditioned on
/// the revision read (0: absent, so a clone sharing the chunk meanwhile makes it retry).
#[derive(Debug, Default)]
struct SharingChanges {
    /// Chunk id → (revision read; its records now, `None` while untouched and unshared).
    chunks: BTreeMap<u64, (u64, Option<Vec<ChunkOwner>>)>,
}

impl SharingChanges {
    fn load(&mut self, ns: &Namespace, chunk_ids: impl IntoIterator<Item = u64>) -> Result<(), NamespaceError> {
        let missing: Vec<u64> = chunk_ids.into_iter().filter(|id| !self.chunks.contains_key(id)).collect();
        let mut found = ns.shared_chunks(&missing)?;
        for id in missing {
            let entry = found.remove(&id).map(|(shared, rev)| (rev, Some(shared.owners))).unwrap_or((0, None));
            self.chunks.insert(id, entry);
        }
        Ok(())
    }

    fn is_shared(&self, chunk_id: u64) -> bool {
        matches!(self.chunks.get(&chunk_id), Some((_, Some(owners))) if owners.len() > 1)
    }

    /// `new` points at the chunk that `holder` points at, too.
    fn add_reference(&mut self, chunk_id: u64, holder: ChunkOwner, new: ChunkOwner) {
        let (_, owners) = self.chunks.entry(chunk_id).or_insert((0, None));
        owners.get_or_insert_with(|| vec![holder]).push(new);
    }

    /// `owner` no longer points at the chunk. Returns whether that was its last record: its
    /// replicas are deleted once the commit went through.
    fn drop_reference(&mut self, chunk_id: u64, owner: ChunkOwner) -> Result<bool, NamespaceError> {
        let (_, owners) = self.chunks.entry(chunk_id).or_insert((0, None));
        match owners {
            None => {
                *owners = Some(Vec::new());
                Ok(true)
            }
            Some(list) => {
                let Some(position) = list.iter().position(|o| *o == owner) else {
                    let reason = format!("does not list chunk {} of inode {} which points at it", owner.index, owner.ino);
                    return Err(MetadataError::Malformed { key: shared_key(chunk_id), reason }.into());
                };
                list.remove(position);
                Ok(list.is_empty())
            }
        }
    }

    fn finish(self, conditions: &mut Vec<Condition>, mutations: &mut Vec<Mutation>) {
        for (chunk_id, (revision, owners)) in self.chunks {
            conditions.push(cond(shared_key(chunk_id), revision));
            match owners {
                Some(owners) if owners.len() > 1 => mutations.push(put(shared_key(chunk_id), &SharedChunk { owners })),
                Some(_) if revision != 0 => mutations.push(Mutation::Delete { key: shared_key(chunk_id) }),
                _ => {}
            }
        }
    }
}

/// Attribute changes of a setattr (size is handled by the data path: it needs the lease).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttrChanges {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
    /// Clear the setuid bit, and the setgid bit if group-executable, of a non-directory (a
    /// chown, or a write or truncate by an unprivileged process), unless `mode` sets the mode.
    pub kill_suidgid: bool,
}

impl AttrChanges {
    /// Applies the changes to `inode` (not its ctime).
    pub fn apply(&self, inode: &mut Inode) {
        if self.kill_suidgid && self.mode.is_none() && inode.kind != InodeKind::Directory {
            inode.mode = mode_without_suidgid(inode.mode);
        }
        if let Some(mode) = self.mode {
            inode.mode = mode & 0o7777;
        }
        if let Some(uid) = self.uid {
            inode.uid = uid;
        }
        if let Some(gid) = self.gid {
            inode.gid = gid;
        }
        if let Some(t) = self.atime {
            inode.atime = t;
        }
        if let Some(t) = self.mtime {
            inode.mtime = t;
        }
    }
}

const INODE_PREFIX: &str = "/fs/inodes/";

pub fn inode_key(ino: u64) -> String {
    format!("{INODE_PREFIX}{ino:016x}")
}
pub fn dirent_prefix(parent: u64) -> String {
    format!("/fs/dirents/{parent:016x}/")
}
pub fn dirent_key(parent: u64, name: &str) -> String {
    format!("/fs/dirents/{parent:016x}/{name}")
}
pub fn chunk_prefix(ino: u64) -> String {
    format!("/fs/chunks/{ino:016x}/")
}
pub fn chunk_key(ino: u64, index: u64) -> String {
    format!("/fs/chunks/{ino:016x}/{index:016x}")
}
pub fn xattr_prefix(ino: u64) -> String {
    format!("/fs/xattrs/{ino:016x}/")
}
pub fn xattr_key(ino: u64, name: &str) -> String {
    format!("/fs/xattrs/{ino:016x}/{name}")
}
/// Largest extended attribute value, as Linux's XATTR_SIZE_MAX.
pub const XATTR_VALUE_MAX: usize = 64 * 1024;

/// How setxattr treats an existing attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    CreateOrReplace,
    /// XATTR_CREATE: fail with EEXIST if it exists.
    CreateOnly,
    /// XATTR_REPLACE: fail with ENODATA if it does not.
    ReplaceOnly,
}

pub fn locks_key(ino: u64) -> String {
    format!("/fs/locks/{ino:016x}")
}
pub const LOCKS_PREFIX: &str = "/fs/locks/";

pub fn shared_key(chunk_id: u64) -> String {
    format!("/fs/shared/{chunk_id:016x}")
}
pub const SHARED_PREFIX: &str = "/fs/shared/";

pub fn lease_key(ino: u64) -> String {
    format!("/fs/leases/{ino:016x}")
}
pub const NEXT_INO_KEY: &str = "/fs/next_ino";
pub const CONFIG_KEY: &str = "/fs/config";

/// Settings fixed when the filesystem is created, shared by every mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub chunk_size: u64,
}
pub const SERVERS_PREFIX: &str = "/fs/servers/";

/// `mode` as a chown, or a write by an unprivileged process, leaves it: without the setuid
/// bit, and without the setgid bit if the group may execute (otherwise it marks mandatory
/// locking, and stays).
pub fn mode_without_suidgid(mode: u32) -> u32 {
    let mut mode = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode &= !libc::S_ISGID;
    }
    mode
}

/// ENOTDIR when a directory was expected and `name` is none, EISDIR the other way round.
fn expect_kind(directory_expected: bool, is_dir: bool, name: &str) -> Result<(), NamespaceError> {
    match (directory_expected, is_dir) {
        (true, false) => Err(NamespaceError::NotDirectory { what: name.to_string() }),
        (false, true) => Err(NamespaceError::IsDirectory { what: name.to_string() }),
        _ => Ok(()),
    }
}

/// Checks a directory entry name: bad input gets a clear error before anything changes.
pub fn validate_name(name: &str) -> Result<(), NamespaceError> {
    if name.len() > NAME_MAX {
        return Err(NamespaceError::NameTooLong { name: name.chars().take(32).collect::<String>() + "...", len: name.len() });
    }
    let reason = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "reserved"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(NamespaceError::InvalidName { name: name.to_string(), reason })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("metadata records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, NamespaceError> {
    serde_json::from_slice(bytes).map_err(|e| MetadataError::Malformed { key: key.to_string(), reason: e.to_string() }.into())
}

fn put<T: Serialize>(key: String, value: &T) -> Mutation {
    Mutation::Put { key, value: encode(value) }
}

fn cond(key: String, revision: u64) -> Condition {
    Condition { key, revision }
}

/// Runs `attempt` until it commits (`Some`), up to [`MAX_RETRIES`] conflicts.
fn retry<T>(what: &str, mut attempt: impl FnMut() -> Result<Option<T>, NamespaceError>) -> Result<T, NamespaceError> {
    for _ in 0..MAX_RETRIES {
        if let Some(done) = attempt()? {
            return Ok(done);
        }
    }
    Err(NamespaceError::Contended { what: what.to_string() })
}

/// What removing a name left to clean up on the chunk servers.
#[derive(Debug, Default)]
pub struct Removed {
    /// Chunks no file points at any more (an inode whose last link went away held the last
    /// reference): delete their replicas.
    pub chunks: Vec<ChunkInfo>,
    /// An inode with too many chunks for one commit, left as an orphan by the removal and
    /// deleted in steps after it.
    unfinished: Option<u64>,
}

/// Resolves an absolute path (from the filesystem root) to its inode, without following symlinks.
pub fn resolve_path(ns: &Namespace, path: &str) -> Result<Inode, NamespaceError> {
    let mut inode = ns.inode(ROOT_INO)?;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        inode = ns.lookup(inode.ino, part)?;
    }
    Ok(inode)
}

pub struct Namespace {
    store: Arc<dyn MetadataStore>,
    /// Inodes as this client last committed or read them (see [`KnownInode`]).
    known: Mutex<HashMap<u64, KnownInode>>,
    /// Inode numbers reserved for this client and not used yet (see [`INO_BATCH`]).
    free_inos: Mutex<std::ops::Range<u64>>,
}

/// An inode as this client last committed or read it, at `revision`.
///
/// A change starts from it instead of reading the inode first: its commit is conditioned on
/// `revision`, so a stale entry (another node changed the inode since) only costs a failed
/// commit, after which the change reads the inode and tries again. `getattr` answers from an
/// entry younger than the attribute TTL, as the kernel itself would from its own cache.
/// Every commit of this client that changes an inode drops its entry first; the change puts
/// back what it committed.
#[derive(Clone)]
struct KnownInode {
    inode: Inode,
    revision: u64,
    at: Instant,
}

/// Entries kept at most in [`Namespace::known`]; past it the table starts over.
const KNOWN_INODES_KEPT: usize = 65_536;

/// Inode numbers a client reserves at once: one commit of the counter serves this many
/// creations, which then need no read of it and no condition on it.
const INO_BATCH: u64 = 1024;

impl Namespace {
    pub fn new(store: Arc<dyn MetadataStore>) -> Namespace {
        Namespace { store, known: Mutex::new(HashMap::new()), free_inos: Mutex::new(0..0) }
    }

    /// Commits `mutations` if every condition holds, first forgetting the known inodes they
    /// change (see [`KnownInode`]). Every commit of the namespace goes through here.
    fn commit_at(&self, conditions: &[Condition], mutations: &[Mutation]) -> Result<Option<u64>, NamespaceError> {
        self.forget_changed_inodes(mutations);
        Ok(self.store.commit_at(conditions, mutations)?)
    }

    fn commit(&self, conditions: &[Condition], mutations: &[Mutation]) -> Result<bool, NamespaceError> {
        Ok(self.commit_at(conditions, mutations)?.is_some())
    }

    fn forget_changed_inodes(&self, mutations: &[Mutation]) {
        let mut known = self.known.lock().expect("known inodes");
        if known.is_empty() {
            return;
        }
        for mutation in mutations {
            let key = match mutation {
                Mutation::Put { key, .. } | Mutation::Delete { key } => key,
            };
            if let Some(ino) = key.strip_prefix(INODE_PREFIX).and_then(|hex| u64::from_str_radix(hex, 16).ok()) {
                known.remove(&ino);
            }
        }
    }

    /// Keeps `inode` as committed or read at `revision`, unless a newer one is known.
    fn remember(&self, inode: &Inode, revision: u64) {
        let mut known = self.known.lock().expect("known inodes");
        if known.len() >= KNOWN_INODES_KEPT {
            known.clear();
        }
        match known.get(&inode.ino) {
            Some(kept) if kept.revision > revision => {}
            _ => {
                known.insert(inode.ino, KnownInode { inode: inode.clone(), revision, at: Instant::now() });
            }
        }
    }

    fn forget(&self, ino: u64) {
        self.known.lock().expect("known inodes").remove(&ino);
    }

    /// The inode a change starts from: as known (any age: the change's commit is conditioned
    /// on its revision, and a change whose commit fails calls [`Namespace::forget`] and
    /// comes back here, which then reads), or read now.
    fn inode_for_change(&self, ino: u64) -> Result<(Inode, u64), NamespaceError> {
        if let Some(kept) = self.known.lock().expect("known inodes").get(&ino) {
            return Ok((kept.inode.clone(), kept.revision));
        }
        self.inode_with_revision(ino)
    }

    /// [`Namespace::inode_for_change`] of a directory.
    fn directory_for_change(&self, ino: u64) -> Result<(Inode, u64), NamespaceError> {
        let (inode, rev) = self.inode_for_change(ino)?;
        if inode.kind != InodeKind::Directory {
            return Err(NamespaceError::NotDirectory { what: format!("inode {ino}") });
        }
        Ok((inode, rev))
    }

    /// The inode as this client committed or read it less than `max_age` ago, else read now:
    /// for `getattr`, whose answers the kernel keeps that long anyway.
    pub fn inode_at_most(&self, ino: u64, max_age: Duration) -> Result<Inode, NamespaceError> {
        if let Some(kept) = self.known.lock().expect("known inodes").get(&ino) {
            if kept.at.elapsed() < max_age {
                return Ok(kept.inode.clone());
            }
        }
        let (inode, revision) = self.inode_with_revision(ino)?;
        self.remember(&inode, revision);
        Ok(inode)
    }

    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    /// Creates the root directory if this is a new filesystem; returns the filesystem's
    /// settings (those of its creation if it existed).
    pub fn init(&self, default_replicas: u32, config: FsConfig) -> Result<FsConfig, NamespaceError> {
        if config.chunk_size == 0 || !config.chunk_size.is_multiple_of(crate::chunk_store::BLOCK_SIZE) {
            return Err(NamespaceError::Invalid(format!("chunk size {} must be a positive multiple of {}", config.chunk_size, crate::chunk_store::BLOCK_SIZE)));
        }
        let now = Timestamp::now();
        let root = Inode {
            ino: ROOT_INO,
            kind: InodeKind::Directory,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            nlink: 2,
            symlink_target: None,
            replicas: default_replicas,
            parent: ROOT_INO,
        };
        self.commit(
            &[cond(inode_key(ROOT_INO), 0), cond(NEXT_INO_KEY.to_string(), 0)],
            &[put(inode_key(ROOT_INO), &root), Mutation::Put { key: NEXT_INO_KEY.to_string(), value: b"2".to_vec() }, put(CONFIG_KEY.to_string(), &config)],
        )?;
        match self.read::<FsConfig>(CONFIG_KEY)? {
            Some((config, _)) => Ok(config),
            None => Err(NamespaceError::NotFound { what: format!("{CONFIG_KEY} (the filesystem metadata is incomplete)") }),
        }
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<(T, u64)>, NamespaceError> {
        match self.store.get(key)? {
            Some(Versioned { value, revision }) => Ok(Some((decode(key, &value)?, revision))),
            None => Ok(None),
        }
    }

    pub fn inode_with_revision(&self, ino: u64) -> Result<(Inode, u64), NamespaceError> {
        self.read(&inode_key(ino))?.ok_or_else(|| NamespaceError::NotFound { what: format!("inode {ino}") })
    }

    pub fn inode(&self, ino: u64) -> Result<Inode, NamespaceError> {
        Ok(self.inode_with_revision(ino)?.0)
    }

    fn directory(&self, ino: u64) -> Result<(Inode, u64), NamespaceError> {
        let (inode, rev) = self.inode_with_revision(ino)?;
        if inode.kind != InodeKind::Directory {
            return Err(NamespaceError::NotDirectory { what: format!("inode {ino}") });
        }
        Ok((inode, rev))
    }

    fn entry(&self, parent: u64, name: &str) -> Result<Option<(DirEntry, u64)>, NamespaceError> {
        self.read(&dirent_key(parent, name))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Inode, NamespaceError> {
        validate_name(name)?;
        // Only directories hold entries: the parent is looked at only when there is none.
        let Some((entry, _)) = self.entry(parent, name)? else {
            // An inode's kind never changes: a directory known as one still is one (or is gone,
            // and then the name is not found either).
            self.directory_for_change(parent)?;
            return Err(NamespaceError::NotFound { what: format!("{name:?} in directory {parent}") });
        };
        self.inode(entry.ino)
    }

    pub fn read_dir(&self, ino: u64) -> Result<Vec<(String, DirEntry)>, NamespaceError> {
        self.directory(ino)?;
        let prefix = dirent_prefix(ino);
        self.store
            .list_prefix(&prefix)?
            .into_iter()
            .map(|(key, v)| Ok((key[prefix.len()..].to_string(), decode(&key, &v.value)?)))
            .collect()
    }

    /// An inode number for a new inode: from this client's reserved batch, reserving the next
    /// [`INO_BATCH`] numbers of the filesystem's counter when it is used up. Numbers a client
    /// reserved and never used (it stopped) are simply skipped.
    fn allocate_ino(&self) -> Result<u64, NamespaceError> {
        let mut free = self.free_inos.lock().expect("free inode numbers");
        if free.is_empty() {
            *free = retry("the inode number counter", || {
                let next = self.store.get(NEXT_INO_KEY)?.ok_or_else(|| NamespaceError::NotFound { what: "the filesystem (run mount once to create it)".into() })?;
                let first: u64 = String::from_utf8_lossy(&next.value).parse().map_err(|_| MetadataError::Malformed { key: NEXT_INO_KEY.into(), reason: "not a number".into() })?;
                let end = first.checked_add(INO_BATCH).ok_or_else(|| NamespaceError::Invalid("inode numbers are used up".into()))?;
                let reserved = self.commit(&[cond(NEXT_INO_KEY.into(), next.revision)], &[Mutation::Put { key: NEXT_INO_KEY.into(), value: end.to_string().into_bytes() }])?;
                Ok(reserved.then_some(first..end))
            })?;
        }
        Ok(free.next().expect("a reserved inode number"))
    }

    /// Creates a file, directory or symlink `name` in `parent`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(&self, parent: u64, name: &str, kind: InodeKind, mode: u32, uid: u32, gid: u32, symlink_target: Option<String>) -> Result<Inode, NamespaceError> {
        Ok(self.create_inode(parent, name, kind, mode, uid, gid, symlink_target, None)?.0)
    }

    /// Creates the file `name` in `parent` with its write lease held by `holder` (epoch 1), in
    /// one commit: what an open with O_CREAT for writing needs. Nothing can have been written
    /// under an older epoch, so no fence is needed.
    pub fn create_leased_file(&self, parent: u64, name: &str, mode: u32, uid: u32, gid: u32, holder: &str) -> Result<(Inode, HeldLease), NamespaceError> {
        let (inode, lease) = self.create_inode(parent, name, InodeKind::File, mode, uid, gid, None, Some(holder))?;
        let lease = lease.ok_or(NamespaceError::Fenced { ino: inode.ino, epoch: 1 })?;
        Ok((inode, lease))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_inode(
        &self,
        parent: u64,
        name: &str,
        kind: InodeKind,
        mode: u32,
        uid: u32,
        gid: u32,
        symlink_target: Option<String>,
        lease_holder: Option<&str>,
    ) -> Result<(Inode, Option<HeldLease>), NamespaceError> {
        validate_name(name)?;
        if kind == InodeKind::Symlink && symlink_target.as_deref().is_none_or(|t| t.is_empty() || t.len() > 4095) {
            return Err(NamespaceError::Invalid("a symlink target must be 1 to 4095 bytes".into()));
        }
        retry(name, || {
            let (mut dir, dir_rev) = self.directory_for_change(parent)?;
            // The name must be free: the commit is conditioned on it, and looks only if it fails.
            let ino = self.allocate_ino()?;
            let now = Timestamp::now();
            let inode = Inode {
                ino,
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                size: symlink_target.as_ref().map(|t| t.len() as u64).unwrap_or(0),
                atime: now,
                mtime: now,
                ctime: now,
                nlink: if kind == InodeKind::Directory { 2 } else { 1 },
                symlink_target: symlink_target.clone(),
                replicas: dir.replicas,
                parent,
            };
            dir.mtime = now;
            dir.ctime = now;
            if kind == InodeKind::Directory {
                dir.nlink += 1;
            }
            let mut conditions = vec![cond(inode_key(parent), dir_rev), cond(dirent_key(parent, name), 0)];
            let mut mutations = vec![
                put(inode_key(ino), &inode),
                put(dirent_key(parent, name), &DirEntry { ino, kind }),
                put(inode_key(parent), &dir),
            ];
            let lease = lease_holder.map(|holder| WriteLease { holder: Some(holder.to_string()), epoch: 1 });
            if let Some(lease) = &lease {
                conditions.push(cond(lease_key(ino), 0));
                mutations.push(put(lease_key(ino), lease));
            }
            let Some(revision) = self.commit_at(&conditions, &mutations)? else {
                if self.entry(parent, name)?.is_some() {
                    return Err(NamespaceError::Exists { parent, name: name.to_string() });
                }
                self.forget(parent);
                return Ok(None);
            };
            self.remember(&dir, revision);
            self.remember(&inode, revision);
            // The lease's revision (the commit's) guards this writer's later changes.
            let held = lease.map(|lease| HeldLease { ino, epoch: lease.epoch, revision });
            Ok(Some((inode.clone(), held)))
        })
    }

    /// Adds a hard link `newparent/newname` to file `ino`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &str) -> Result<Inode, NamespaceError> {
        validate_name(newname)?;
        retry(newname, || {
            let (mut inode, rev) = self.inode_with_revision(ino)?;
            if inode.kind == InodeKind::Directory {
                return Err(NamespaceError::Invalid(format!("inode {ino} is a directory; directories cannot be hard-linked")));
            }
            let (mut dir, dir_rev) = self.directory(newparent)?;
            if self.entry(newparent, newname)?.is_some() {
                return Err(NamespaceError::Exists { parent: newparent, name: newname.to_string() });
            }
            let now = Timestamp::now();
            inode.nlink += 1;
            inode.ctime = now;
            dir.mtime = now;
            dir.ctime = now;
            let committed = self.commit(
                &[cond(inode_key(ino), rev), cond(inode_key(newparent), dir_rev), cond(dirent_key(newparent, newname), 0)],
                &[put(inode_key(ino), &inode), put(inode_key(newparent), &dir), put(dirent_key(newparent, newname), &DirEntry { ino, kind: inode.kind })],
            )?;
            Ok(committed.then_some(inode.clone()))
        })
    }

    /// Adds to a commit what dropping one link of `inode` changes: at its last link, the inode
    /// goes with its chunk records, and the chunks nobody else points at are listed in
    /// `removed` for deletion. `keep_open(ino)`: the caller still has the file open, so its last
    /// link going away leaves an orphan (nlink 0, data kept) for [`Namespace::remove_orphan`] at
    /// last close. A file with more chunks than one commit takes becomes an orphan too, which
    /// [`Namespace::finish_removal`] then deletes in steps.
    #[allow(clippy::too_many_arguments)]
    fn unlink_changes(
        &self,
        inode: &Inode,
        now: Timestamp,
        removed: &mut Removed,
        keep_open: &dyn Fn(u64) -> bool,
        conditions: &mut Vec<Condition>,
        mutations: &mut Vec<Mutation>,
    ) -> Result<(), NamespaceError> {
        let last_link = inode.kind == InodeKind::Directory || inode.nlink <= 1;
        let orphan = || {
            let mut orphan = inode.clone();
            orphan.nlink = 0;
            orphan.ctime = now;
            put(inode_key(inode.ino), &orphan)
        };
        if last_link && inode.kind == InodeKind::File && keep_open(inode.ino) {
            mutations.push(orphan());
            return Ok(());
        }
        if !last_link {
            let mut inode = inode.clone();
            inode.nlink -= 1;
            inode.ctime = now;
            mutations.push(put(inode_key(inode.ino), &inode));
            return Ok(());
        }
        let chunks = self.chunks(inode.ino)?;
        if chunks.len() > MAX_CHUNKS_PER_COMMIT {
            mutations.push(orphan());
            removed.unfinished = Some(inode.ino);
            return Ok(());
        }
        mutations.extend([
            Mutation::Delete { key: inode_key(inode.ino) },
            Mutation::Delete { key: lease_key(inode.ino) },
            Mutation::Delete { key: locks_key(inode.ino) },
        ]);
        for (key, _) in self.store.list_prefix(&xattr_prefix(inode.ino))? {
            mutations.push(Mutation::Delete { key });
        }
        removed.chunks.extend(self.release_chunk_records(inode.ino, &chunks, conditions, mutations)?);
        Ok(())
    }

    /// Adds to a commit the deletion of the chunk records `(index, chunk, revision)` of `ino`,
    /// each chunk losing a reference. Returns the chunks whose last reference this was.
    fn release_chunk_records(
        &self,
        ino: u64,
        records: &[(u64, ChunkInfo, u64)],
        conditions: &mut Vec<Condition>,
        mutations: &mut Vec<Mutation>,
    ) -> Result<Vec<ChunkInfo>, NamespaceError> {
        let mut sharing = SharingChanges::default();
        sharing.load(self, records.iter().map(|(_, c, _)| c.chunk_id))?;
        let mut freed = Vec::new();
        for (index, chunk, revision) in records {
            conditions.push(cond(chunk_key(ino, *index), *revision));
            mutations.push(Mutation::Delete { key: chunk_key(ino, *index) });
            if sharing.drop_reference(chunk.chunk_id, ChunkOwner { ino, index: *index })? {
                freed.push(chunk.clone());
            }
        }
        sharing.finish(conditions, mutations);
        Ok(freed)
    }

    /// Completes a removal whose commit left an orphan to delete in steps (a large file).
    /// The name is gone already, so a failure here only leaves the orphan behind.
    fn finish_removal(&self, mut removed: Removed) -> Removed {
        if let Some(ino) = removed.unfinished.take() {
            match self.remove_orphan(ino) {
                Ok(rest) => removed.chunks.extend(rest.chunks),
                Err(e) => tracing::warn!(ino, "cannot delete the chunks of a removed file; it stays as an orphan: {e}"),
            }
        }
        removed
    }

    /// Removes the non-directory `name` from `parent`.
    pub fn unlink(&self, parent: u64, name: &str) -> Result<Removed, NamespaceError> {
        self.remove(parent, name, false, &|_| false)
    }

    /// [`Namespace::unlink`], keeping the data of a file `keep_open` says is still open.
    pub fn unlink_keeping(&self, parent: u64, name: &str, keep_open: &dyn Fn(u64) -> bool) -> Result<Removed, NamespaceError> {
        self.remove(parent, name, false, keep_open)
    }

    /// Deletes an orphan (a file unlinked while open) once its last descriptor is closed. The
    /// chunk records of a large one go in steps of one commit each, the last ones first.
    pub fn remove_orphan(&self, ino: u64) -> Result<Removed, NamespaceError> {
        let mut removed = Removed::default();
        loop {
            let finished = retry(&format!("inode {ino}"), || {
                let (inode, rev) = match self.inode_with_revision(ino) {
                    Ok(found) => found,
                    Err(NamespaceError::NotFound { .. }) => return Ok(Some(true)),
                    Err(e) => return Err(e),
                };
                if inode.nlink > 0 {
                    return Ok(Some(true)); // linked again meanwhile (or never orphaned)
                }
                let mut conditions = vec![cond(inode_key(ino), rev)];
                let mut mutations = Vec::new();
                let chunks = self.chunks(ino)?;
                let mut step = Removed::default();
                let last_step = chunks.len() <= MAX_CHUNKS_PER_COMMIT;
                if last_step {
                    self.unlink_changes(&inode, Timestamp::now(), &mut step, &|_| false, &mut conditions, &mut mutations)?;
                } else {
                    step.chunks = self.release_chunk_records(ino, &chunks[chunks.len() - MAX_CHUNKS_PER_COMMIT..], &mut conditions, &mut mutations)?;
                }
                if !self.commit(&conditions, &mutations)? {
                    return Ok(None);
                }
                removed.chunks.extend(step.chunks);
                Ok(Some(last_step))
            })?;
            if finished {
                return Ok(removed);
            }
        }
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&self, parent: u64, name: &str) -> Result<Removed, NamespaceError> {
        self.remove(parent, name, true, &|_| false)
    }

    fn remove(&self, parent: u64, name: &str, directory: bool, keep_open: &dyn Fn(u64) -> bool) -> Result<Removed, NamespaceError> {
        validate_name(name)?;
        retry(name, || {
            let (mut dir, dir_rev) = self.directory(parent)?;
            let (entry, entry_rev) = self.entry(parent, name)?.ok_or_else(|| NamespaceError::NotFound { what: format!("{name:?} in directory {parent}") })?;
            let (inode, inode_rev) = self.inode_with_revision(entry.ino)?;
            let is_dir = inode.kind == InodeKind::Directory;
            expect_kind(directory, is_dir, name)?;
            let mut conditions = vec![cond(inode_key(parent), dir_rev), cond(dirent_key(parent, name), entry_rev), cond(inode_key(inode.ino), inode_rev)];
            if is_dir {
                let children = self.store.list_prefix(&dirent_prefix(inode.ino))?;
                if !children.is_empty() {
                    return Err(NamespaceError::NotEmpty { what: name.to_string() });
                }
                // No child can appear unseen: creating one changes the directory's revision,
                // which the commit is conditioned on.
                dir.nlink -= 1;
            }
            let now = Timestamp::now();
            dir.mtime = now;
            dir.ctime = now;
            let mut removed = Removed::default();
            let mut mutations = Vec::new();
            self.unlink_changes(&inode, now, &mut removed, keep_open, &mut conditions, &mut mutations)?;
            mutations.push(Mutation::Delete { key: dirent_key(parent, name) });
            mutations.push(put(inode_key(parent), &dir));
            Ok(self.commit(&conditions, &mutations)?.then_some(removed))
        })
        .map(|removed| self.finish_removal(removed))
    }

    /// Renames `parent/name` to `newparent/newname`, replacing a compatible target.
    pub fn rename(&self, parent: u64, name: &str, newparent: u64, newname: &str, no_replace: bool) -> Result<Removed, NamespaceError> {
        self.rename_keeping(parent, name, newparent, newname, no_replace, &|_| false)
    }

    /// [`Namespace::rename`], keeping the data of a replaced file `keep_open` says is open.
    pub fn rename_keeping(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        no_replace: bool,
        keep_open: &dyn Fn(u64) -> bool,
    ) -> Result<Removed, NamespaceError> {
        validate_name(name)?;
        validate_name(newname)?;
        retry(name, || {
            let (mut src_dir, src_dir_rev) = self.directory(parent)?;
            let (entry, entry_rev) = self.entry(parent, name)?.ok_or_else(|| NamespaceError::NotFound { what: format!("{name:?} in directory {parent}") })?;
            let (mut dst_dir, dst_dir_rev) = if newparent == parent { (src_dir.clone(), src_dir_rev) } else { self.directory(newparent)? };
            let moving_dir = entry.kind == InodeKind::Directory;
            if moving_dir && self.is_ancestor(entry.ino, newparent)? {
                return Err(NamespaceError::Invalid(format!("cannot move directory {name:?} into itself")));
            }
            let target = self.entry(newparent, newname)?;
            let mut conditions = vec![
                cond(inode_key(parent), src_dir_rev),
                cond(inode_key(newparent), dst_dir_rev),
                cond(dirent_key(parent, name), entry_rev),
                cond(dirent_key(newparent, newname), target.map(|(_, r)| r).unwrap_or(0)),
            ];
            let now = Timestamp::now();
            let mut mutations = Vec::new();
            let mut removed = Removed::default();
            if let Some((target_entry, _)) = target {
                if target_entry.ino == entry.ino {
                    return Ok(Some(removed)); // same inode: POSIX says do nothing
                }
                if no_replace {
                    return Err(NamespaceError::Exists { parent: newparent, name: newname.to_string() });
                }
                let (target_inode, target_rev) = self.inode_with_revision(target_entry.ino)?;
                let target_is_dir = target_inode.kind == InodeKind::Directory;
                expect_kind(moving_dir, target_is_dir, newname)?;
                if target_is_dir {
                    if !self.store.list_prefix(&dirent_prefix(target_inode.ino))?.is_empty() {
                        return Err(NamespaceError::NotEmpty { what: newname.to_string() });
                    }
                    dst_dir.nlink -= 1;
                }
                conditions.push(cond(inode_key(target_inode.ino), target_rev));
                self.unlink_changes(&target_inode, now, &mut removed, keep_open, &mut conditions, &mut mutations)?;
            }
            if moving_dir && parent != newparent {
                src_dir.nlink -= 1;
                dst_dir.nlink += 1;
                let (mut moved, moved_rev) = self.inode_with_revision(entry.ino)?;
                moved.parent = newparent;
                moved.ctime = now;
                conditions.push(cond(inode_key(entry.ino), moved_rev));
                mutations.push(put(inode_key(entry.ino), &moved));
            }
            src_dir.mtime = now;
            src_dir.ctime = now;
            dst_dir.mtime = now;
            dst_dir.ctime = now;
            if parent == newparent {
                mutations.push(put(inode_key(parent), &dst_dir));
            } else {
                mutations.push(put(inode_key(parent), &src_dir));
                mutations.push(put(inode_key(newparent), &dst_dir));
            }
            mutations.push(Mutation::Delete { key: dirent_key(parent, name) });
            mutations.push(put(dirent_key(newparent, newname), &entry));
            Ok(self.commit(&conditions, &mutations)?.then_some(removed))
        })
        .map(|removed| self.finish_removal(removed))
    }

    /// Whether directory `ancestor` is `ino` or one of its ancestors (walks `..` upwards).
    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> Result<bool, NamespaceError> {
        for _ in 0..4096 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            match self.parent_of(ino)? {
                Some(p) => ino = p,
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    fn parent_of(&self, dir_ino: u64) -> Result<Option<u64>, NamespaceError> {
        let inode = self.inode(dir_ino)?;
        if inode.parent != 0 {
            return Ok(Some(inode.parent));
        }
        // Records written before parents were kept: scan the directory entries.
        for (key, v) in self.store.list_prefix("/fs/dirents/")? {
            let entry: DirEntry = decode(&key, &v.value)?;
            if entry.ino == dir_ino {
                let parent_hex = key["/fs/dirents/".len()..].split('/').next().unwrap_or("");
                return Ok(u64::from_str_radix(parent_hex, 16).ok());
            }
        }
        Ok(None)
    }

    /// chmod, chown, utimes.
    pub fn set_attributes(&self, ino: u64, changes: &AttrChanges) -> Result<Inode, NamespaceError> {
        retry(&format!("inode {ino}"), || {
            let (mut inode, rev) = self.inode_for_change(ino)?;
            changes.apply(&mut inode);
            inode.ctime = Timestamp::now();
            let Some(revision) = self.commit_at(&[cond(inode_key(ino), rev)], &[put(inode_key(ino), &inode)])? else {
                self.forget(ino);
                return Ok(None);
            };
            self.remember(&inode, revision);
            Ok(Some(inode.clone()))
        })
    }

    /// Sets how many copies `ino` keeps; new files and directories inside a directory
    /// inherit it. Existing chunks get more copies at the next heal.
    pub fn set_copies(&self, ino: u64, copies: u32) -> Result<Inode, NamespaceError> {
        if !(1..=16).contains(&copies) {
            return Err(NamespaceError::Invalid(format!("copies must be between 1 and 16, not {copies}")));
        }
        retry(&format!("inode {ino}"), || {
            let (mut inode, rev) = self.inode_with_revision(ino)?;
            inode.replicas = copies;
            inode.ctime = Timestamp::now();
            Ok(self.commit(&[cond(inode_key(ino), rev)], &[put(inode_key(ino), &inode)])?.then_some(inode.clone()))
        })
    }

    /// Sets a file's size (and its mtime to now), only while `lease` is still this writer's.
    pub fn set_size(&self, lease: &HeldLease, size: u64) -> Result<Inode, NamespaceError> {
        self.commit_writer_changes(lease, Some(size), &[], false)
    }

    /// Sets the file's size (if `size`), applies `changes` (see
    /// [`Namespace::commit_writer_changes`]) and gives the lease up, in one commit, only while
    /// `lease` is still this writer's: the last close of a writer. With nothing to change it
    /// only gives the lease up.
    pub fn set_size_and_release(&self, lease: &HeldLease, size: Option<u64>, changes: &[AttrChanges]) -> Result<(), NamespaceError> {
        if size.is_none() && changes.is_empty() {
            return self.release_lease(lease);
        }
        self.commit_writer_changes(lease, size, changes, true).map(|_| ())
    }

    /// What the lease holder of a file kept to commit, in one commit conditioned on `lease`:
    /// the size (if `size`, with the mtime now: it was written), then `changes` in the order
    /// they were made (attributes set while the file was open for writing), and the lease
    /// given up if `release`.
    pub fn commit_writer_changes(&self, lease: &HeldLease, size: Option<u64>, changes: &[AttrChanges], release: bool) -> Result<Inode, NamespaceError> {
        let ino = lease.ino;
        retry(&format!("inode {ino}"), || {
            let (mut inode, rev) = self.inode_for_change(ino)?;
            let now = Timestamp::now();
            if let Some(size) = size {
                inode.size = size;
                inode.mtime = now;
            }
            for change in changes {
                change.apply(&mut inode);
            }
            inode.ctime = now;
            let mut mutations = vec![put(inode_key(ino), &inode)];
            if release {
                mutations.push(put(lease_key(ino), &WriteLease { holder: None, epoch: lease.epoch }));
            }
            let Some(revision) = self.commit_at(&[cond(inode_key(ino), rev), cond(lease_key(ino), lease.revision)], &mutations)? else {
                self.forget(ino);
                self.check_lease(lease)?;
                return Ok(None);
            };
            self.remember(&inode, revision);
            Ok(Some(inode.clone()))
        })
    }

    /// Errors with `Fenced` if `lease` is no longer this writer's.
    pub fn check_lease(&self, lease: &HeldLease) -> Result<(), NamespaceError> {
        match self.store.get(&lease_key(lease.ino))? {
            Some(v) if v.revision == lease.revision => Ok(()),
            _ => Err(NamespaceError::Fenced { ino: lease.ino, epoch: lease.epoch }),
        }
    }

    /// Takes the exclusive write lease of file `ino` for `holder`. A lease held by another
    /// writer is refused unless `take_over`, which bumps the epoch so the old writer is fenced.
    pub fn acquire_lease(&self, ino: u64, holder: &str, take_over: bool) -> Result<HeldLease, NamespaceError> {
        retry(&format!("lease of inode {ino}"), || {
            let inode = self.inode(ino)?;
            if inode.kind != InodeKind::File {
                return Err(NamespaceError::IsDirectory { what: format!("inode {ino}") });
            }
            let current: Option<(WriteLease, u64)> = self.read(&lease_key(ino))?;
            let (lease, rev) = current.unwrap_or((WriteLease { holder: None, epoch: 0 }, 0));
            match &lease.holder {
                Some(h) if h == holder => return Ok(Some(HeldLease { ino, epoch: lease.epoch, revision: rev })),
                Some(h) if !take_over => return Err(NamespaceError::LeaseBusy { ino, holder: h.clone(), epoch: lease.epoch }),
                _ => {}
            }
            let new = WriteLease { holder: Some(holder.to_string()), epoch: lease.epoch + 1 };
            let committed = self.commit_at(&[cond(lease_key(ino), rev), cond(inode_key(ino), self.inode_with_revision(ino)?.1)], &[put(lease_key(ino), &new)])?;
            Ok(committed.map(|revision| HeldLease { ino, epoch: new.epoch, revision }))
        })
    }

    /// Gives the lease up (keeping its epoch), if it is still ours.
    pub fn release_lease(&self, lease: &HeldLease) -> Result<(), NamespaceError> {
        let released = WriteLease { holder: None, epoch: lease.epoch };
        self.commit(&[cond(lease_key(lease.ino), lease.revision)], &[put(lease_key(lease.ino), &released)])?;
        Ok(())
    }

    pub fn chunk(&self, ino: u64, index: u64) -> Result<Option<(ChunkInfo, u64)>, NamespaceError> {
        self.read(&chunk_key(ino, index))
    }

    pub fn chunks(&self, ino: u64) -> Result<Vec<(u64, ChunkInfo, u64)>, NamespaceError> {
        let prefix = chunk_prefix(ino);
        self.store
            .list_prefix(&prefix)?
            .into_iter()
            .map(|(key, v)| {
                let index = u64::from_str_radix(&key[prefix.len()..], 16).map_err(|_| MetadataError::Malformed { key: key.clone(), reason: "bad chunk index".into() })?;
                Ok((index, decode(&key, &v.value)?, v.revision))
            })
            .collect()
    }

    /// Records `chunk` as chunk `index` of the leased file if its record is still at
    /// `expected_revision` (0: absent). Returns the new record revision, or `None` on a conflict.
    pub fn put_chunk(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, expected_revision: u64) -> Result<Option<u64>, NamespaceError> {
        self.put_chunk_unless(lease, index, chunk, expected_revision, &[], None)
    }

    /// [`Namespace::put_chunk`], also conditioned on every key of `absent_keys` being absent
    /// (a new chunk's servers not marked draining meanwhile), and with `size` the file's new
    /// size (and mtime now) in the same commit: a write that extends a file into a new chunk
    /// records both at once. `None` also when the file's inode changed since this client knew
    /// it; the caller then tries again.
    pub fn put_chunk_unless(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, expected_revision: u64, absent_keys: &[String], size: Option<u64>) -> Result<Option<u64>, NamespaceError> {
        let key = chunk_key(lease.ino, index);
        let mut conditions = vec![cond(key.clone(), expected_revision), cond(lease_key(lease.ino), lease.revision)];
        conditions.extend(absent_keys.iter().map(|k| cond(k.clone(), 0)));
        let mut mutations = vec![put(key, chunk)];
        let sized = match size {
            Some(size) => {
                let (mut inode, rev) = self.inode_for_change(lease.ino)?;
                inode.size = size;
                let now = Timestamp::now();
                inode.mtime = now;
                inode.ctime = now;
                conditions.push(cond(inode_key(lease.ino), rev));
                mutations.push(put(inode_key(lease.ino), &inode));
                Some(inode)
            }
            None => None,
        };
        let committed = self.commit_at(&conditions, &mutations)?;
        match (committed, sized) {
            (Some(revision), Some(inode)) => self.remember(&inode, revision),
            (None, sized) => {
                if sized.is_some() {
                    self.forget(lease.ino);
                }
                self.check_lease(lease)?;
            }
            _ => {}
        }
        Ok(committed)
    }

    /// Drops the chunk records of the leased file from index `from` on (truncate), the last
    /// ones first, [`MAX_CHUNKS_PER_COMMIT`] per commit. Returns the chunks no other file
    /// points at, whose replicas the caller deletes.
    pub fn delete_chunks_from(&self, lease: &HeldLease, from: u64) -> Result<Vec<ChunkInfo>, NamespaceError> {
        let mut freed = Vec::new();
        loop {
            let step = retry(&format!("chunks of inode {}", lease.ino), || {
                let doomed: Vec<(u64, ChunkInfo, u64)> = self.chunks(lease.ino)?.into_iter().filter(|(i, _, _)| *i >= from).collect();
                if doomed.is_empty() {
                    return Ok(Some(None));
                }
                let mut conditions = vec![cond(lease_key(lease.ino), lease.revision)];
                let mut mutations = Vec::new();
                let batch = &doomed[doomed.len().saturating_sub(MAX_CHUNKS_PER_COMMIT)..];
                let step_freed = self.release_chunk_records(lease.ino, batch, &mut conditions, &mut mutations)?;
                if !self.commit(&conditions, &mutations)? {
                    self.check_lease(lease)?;
                    return Ok(None);
                }
                Ok(Some(Some(step_freed)))
            })?;
            match step {
                Some(step_freed) => freed.extend(step_freed),
                None => return Ok(freed),
            }
        }
    }

    /// The sharing record of a chunk, if several files share it.
    pub fn shared_chunk(&self, chunk_id: u64) -> Result<Option<(SharedChunk, u64)>, NamespaceError> {
        self.read(&shared_key(chunk_id))
    }

    /// The sharing records of those of `chunk_ids` that several files share (one listing
    /// rather than a read each when there are many).
    pub fn shared_chunks(&self, chunk_ids: &[u64]) -> Result<HashMap<u64, (SharedChunk, u64)>, NamespaceError> {
        let mut found = HashMap::new();
        if chunk_ids.len() > 16 {
            for (key, v) in self.store.list_prefix(SHARED_PREFIX)? {
                let Ok(chunk_id) = u64::from_str_radix(&key[SHARED_PREFIX.len()..], 16) else { continue };
                if chunk_ids.contains(&chunk_id) {
                    found.insert(chunk_id, (decode(&key, &v.value)?, v.revision));
                }
            }
        } else {
            for &chunk_id in chunk_ids {
                if let Some(shared) = self.shared_chunk(chunk_id)? {
                    found.insert(chunk_id, shared);
                }
            }
        }
        Ok(found)
    }

    /// Adds to a commit: records of `target` pointing at the chunks of `source`'s records
    /// `(index, chunk, revision)`, source index `i` becoming target index `i + shift`, each
    /// chunk gaining a reference. Conditioned on the source records and on the target's
    /// records being absent.
    #[allow(clippy::too_many_arguments)]
    fn share_chunk_records(
        &self,
        source: u64,
        records: &[(u64, ChunkInfo, u64)],
        target: u64,
        shift: i64,
        conditions: &mut Vec<Condition>,
        mutations: &mut Vec<Mutation>,
    ) -> Result<(), NamespaceError> {
        let mut sharing = SharingChanges::default();
        sharing.load(self, records.iter().map(|(_, c, _)| c.chunk_id))?;
        for (index, chunk, revision) in records {
            let target_index = index.checked_add_signed(shift).ok_or_else(|| NamespaceError::Invalid(format!("chunk index {index} moved by {shift}")))?;
            conditions.push(cond(chunk_key(source, *index), *revision));
            conditions.push(cond(chunk_key(target, target_index), 0));
            mutations.push(put(chunk_key(target, target_index), chunk));
            sharing.add_reference(chunk.chunk_id, ChunkOwner { ino: source, index: *index }, ChunkOwner { ino: target, index: target_index });
        }
        sharing.finish(conditions, mutations);
        Ok(())
    }

    /// Creates `newparent/newname` as a copy-on-write clone of the leased file: a new file with
    /// the source's mode, owner and size whose chunk records point at the source's chunks (at
    /// their current versions), each chunk's sharing record gaining the new file, in the same
    /// commit as the new name. A source with more chunks than one commit takes is cloned into
    /// a nameless inode in steps, and named last. The caller holds the source's write lease, so
    /// nothing writes the source meanwhile.
    pub fn clone_file(&self, source: &HeldLease, newparent: u64, newname: &str) -> Result<Inode, NamespaceError> {
        validate_name(newname)?;
        let src = self.inode(source.ino)?;
        match src.kind {
            InodeKind::File => {}
            InodeKind::Directory => return Err(NamespaceError::IsDirectory { what: format!("inode {}", source.ino) }),
            InodeKind::Symlink => return Err(NamespaceError::Invalid(format!("inode {} is a symlink; only regular files are cloned", source.ino))),
        }
        self.check_lease(source)?;
        self.directory(newparent)?;
        if self.entry(newparent, newname)?.is_some() {
            return Err(NamespaceError::Exists { parent: newparent, name: newname.to_string() });
        }
        let new_inode = |src: &Inode, dir: &Inode, ino: u64, nlink: u32| {
            let now = Timestamp::now();
            Inode { ino, nlink, atime: now, mtime: now, ctime: now, replicas: dir.replicas, parent: newparent, symlink_target: None, ..src.clone() }
        };
        if self.chunks(source.ino)?.len() <= MAX_CHUNKS_PER_COMMIT {
            return retry(newname, || {
                let (src, src_rev) = self.inode_with_revision(source.ino)?;
                let (mut dir, dir_rev) = self.directory(newparent)?;
                if self.entry(newparent, newname)?.is_some() {
                    return Err(NamespaceError::Exists { parent: newparent, name: newname.to_string() });
                }
                let ino = self.allocate_ino()?;
                let inode = new_inode(&src, &dir, ino, 1);
                dir.mtime = inode.ctime;
                dir.ctime = inode.ctime;
                let mut conditions = vec![
                    cond(inode_key(newparent), dir_rev),
                    cond(dirent_key(newparent, newname), 0),
                    cond(inode_key(source.ino), src_rev),
                    cond(lease_key(source.ino), source.revision),
                ];
                let mut mutations = vec![
                    put(inode_key(ino), &inode),
                    put(dirent_key(newparent, newname), &DirEntry { ino, kind: InodeKind::File }),
                    put(inode_key(newparent), &dir),
                ];
                let chunks = self.chunks(source.ino)?;
                if chunks.len() > MAX_CHUNKS_PER_COMMIT {
                    return Err(NamespaceError::Contended { what: format!("chunks of inode {}", source.ino) });
                }
                self.share_chunk_records(source.ino, &chunks, ino, 0, &mut conditions, &mut mutations)?;
                if !self.commit(&conditions, &mutations)? {
                    self.check_lease(source)?;
                    return Ok(None);
                }
                Ok(Some(inode.clone()))
            });
        }
        // Too large for one commit: a nameless inode (an orphan until named) gets the records
        // in steps; if anything fails it is removed again, which drops its references.
        let unnamed = retry(newname, || {
            let src = self.inode(source.ino)?;
            let (dir, _) = self.directory(newparent)?;
            let ino = self.allocate_ino()?;
            let inode = new_inode(&src, &dir, ino, 0);
            let committed = self.commit(&[cond(lease_key(source.ino), source.revision)], &[put(inode_key(ino), &inode)])?;
            if !committed {
                self.check_lease(source)?;
            }
            Ok(committed.then_some(inode.clone()))
        })?;
        let filled = self.clone_chunks_in_steps(source, unnamed.ino).and_then(|()| {
            retry(newname, || {
                let (mut dir, dir_rev) = self.directory(newparent)?;
                if self.entry(newparent, newname)?.is_some() {
                    return Err(NamespaceError::Exists { parent: newparent, name: newname.to_string() });
                }
                let (mut inode, inode_rev) = self.inode_with_revision(unnamed.ino)?;
                inode.nlink = 1;
                dir.mtime = inode.ctime;
                dir.ctime = inode.ctime;
                let committed = self.commit(
                    &[cond(inode_key(newparent), dir_rev), cond(dirent_key(newparent, newname), 0), cond(inode_key(inode.ino), inode_rev)],
                    &[put(inode_key(inode.ino), &inode), put(dirent_key(newparent, newname), &DirEntry { ino: inode.ino, kind: InodeKind::File }), put(inode_key(newparent), &dir)],
                )?;
                Ok(committed.then_some(inode.clone()))
            })
        });
        if filled.is_err() {
            if let Err(e) = self.remove_orphan(unnamed.ino) {
                tracing::warn!(ino = unnamed.ino, "cannot remove an unfinished clone; it stays as an orphan: {e}");
            }
        }
        filled
    }

    fn clone_chunks_in_steps(&self, source: &HeldLease, target: u64) -> Result<(), NamespaceError> {
        let indexes: Vec<u64> = self.chunks(source.ino)?.into_iter().map(|(i, _, _)| i).collect();
        for step in indexes.chunks(MAX_CHUNKS_PER_COMMIT) {
            retry(&format!("chunks of inode {}", source.ino), || {
                let mut records = Vec::new();
                for &index in step {
                    if let Some((chunk, rev)) = self.chunk(source.ino, index)? {
                        records.push((index, chunk, rev));
                    }
                }
                let mut conditions = vec![cond(lease_key(source.ino), source.revision)];
                let mut mutations = Vec::new();
                self.share_chunk_records(source.ino, &records, target, 0, &mut conditions, &mut mutations)?;
                if !self.commit(&conditions, &mutations)? {
                    self.check_lease(source)?;
                    return Ok(None);
                }
                Ok(Some(()))
            })?;
        }
        Ok(())
    }

    /// Makes chunks `first..first + count` of the leased `source` also chunks `target_first..`
    /// of the leased `target`, shared as a clone shares them (`copy_file_range` of whole
    /// chunks). Returns `false`, changing nothing, if the target holds chunks in that range.
    pub fn share_chunks(&self, source: &HeldLease, first: u64, count: u64, target: &HeldLease, target_first: u64) -> Result<bool, NamespaceError> {
        if source.ino == target.ino {
            return Err(NamespaceError::Invalid(format!("inode {}: chunks are shared between two files, not within one", source.ino)));
        }
        if count as usize > MAX_CHUNKS_PER_COMMIT {
            return Err(NamespaceError::Invalid(format!("{count} chunks at once; the limit is {MAX_CHUNKS_PER_COMMIT}")));
        }
        let shift = target_first as i64 - first as i64;
        retry(&format!("chunks of inode {}", target.ino), || {
            if self.chunks(target.ino)?.iter().any(|(i, _, _)| (target_first..target_first + count).contains(i)) {
                return Ok(Some(false));
            }
            let records: Vec<(u64, ChunkInfo, u64)> = self.chunks(source.ino)?.into_iter().filter(|(i, _, _)| (first..first + count).contains(i)).collect();
            let mut conditions = vec![cond(lease_key(source.ino), source.revision), cond(lease_key(target.ino), target.revision)];
            let mut mutations = Vec::new();
            self.share_chunk_records(source.ino, &records, target.ino, shift, &mut conditions, &mut mutations)?;
            if !self.commit(&conditions, &mutations)? {
                self.check_lease(source)?;
                self.check_lease(target)?;
                return Ok(None);
            }
            Ok(Some(true))
        })
    }

    /// The commit of a copy-on-write: chunk `index` of the leased file (its record at
    /// `expected_revision`) now points at `copy`, its own copy of the shared chunk `shared_id`,
    /// which loses this reference. Returns the record's new revision, or `None` on a conflict,
    /// also when the chunk is no longer shared (the others let go of it: write it in place).
    pub fn unshare_chunk(&self, lease: &HeldLease, index: u64, copy: &ChunkInfo, expected_revision: u64, shared_id: u64) -> Result<Option<u64>, NamespaceError> {
        let key = chunk_key(lease.ino, index);
        let mut sharing = SharingChanges::default();
        sharing.load(self, [shared_id])?;
        if !sharing.is_shared(shared_id) {
            return Ok(None);
        }
        sharing.drop_reference(shared_id, ChunkOwner { ino: lease.ino, index })?;
        let mut conditions = vec![cond(key.clone(), expected_revision), cond(lease_key(lease.ino), lease.revision)];
        let mut mutations = vec![put(key, copy)];
        sharing.finish(&mut conditions, &mut mutations);
        let committed = self.commit_at(&conditions, &mutations)?;
        if committed.is_none() {
            self.check_lease(lease)?;
        }
        Ok(committed)
    }

    /// [`Namespace::put_chunk`] for a change of the chunk's replicas or version (healing, stale
    /// replicas): when other files share the chunk, their records of it change in the same
    /// commit, since they describe the same replicas.
    pub fn put_chunk_everywhere(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, expected_revision: u64) -> Result<Option<u64>, NamespaceError> {
        let Some((shared, shared_rev)) = self.shared_chunk(chunk.chunk_id)? else {
            return self.put_chunk(lease, index, chunk, expected_revision);
        };
        let key = chunk_key(lease.ino, index);
        let mut conditions = vec![cond(key.clone(), expected_revision), cond(lease_key(lease.ino), lease.revision), cond(shared_key(chunk.chunk_id), shared_rev)];
        let mut mutations = vec![put(key, chunk)];
        for owner in shared.owners.iter().filter(|o| **o != ChunkOwner { ino: lease.ino, index }) {
            match self.chunk(owner.ino, owner.index)? {
                Some((theirs, rev)) if theirs.chunk_id == chunk.chunk_id => {
                    conditions.push(cond(chunk_key(owner.ino, owner.index), rev));
                    mutations.push(put(chunk_key(owner.ino, owner.index), chunk));
                }
                _ => return Ok(None), // changed meanwhile
            }
        }
        let committed = self.commit_at(&conditions, &mutations)?;
        if committed.is_none() {
            self.check_lease(lease)?;
        }
        Ok(committed)
    }

    fn check_xattr_name(name: &str) -> Result<(), NamespaceError> {
        if name.is_empty() || name.len() > NAME_MAX || name.contains('\0') {
            return Err(NamespaceError::Invalid(format!("extended attribute name {name:?} must be 1 to {NAME_MAX} bytes without NUL")));
        }
        if name.starts_with("system.") {
            return Err(NamespaceError::AttributeNotSupported { name: name.to_string() });
        }
        Ok(())
    }

    pub fn set_xattr(&self, ino: u64, name: &str, value: &[u8], mode: XattrMode) -> Result<(), NamespaceError> {
        Self::check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_MAX {
            return Err(NamespaceError::Invalid(format!("extended attribute value of {} bytes exceeds {XATTR_VALUE_MAX}", value.len())));
        }
        retry(name, || {
            let (mut inode, inode_rev) = self.inode_with_revision(ino)?;
            let key = xattr_key(ino, name);
            let existing = self.store.get(&key)?;
            match (mode, &existing) {
                (XattrMode::CreateOnly, Some(_)) => return Err(NamespaceError::Exists { parent: ino, name: name.to_string() }),
                (XattrMode::ReplaceOnly, None) => return Err(NamespaceError::NoAttribute { ino, name: name.to_string() }),
                _ => {}
            }
            inode.ctime = Timestamp::now();
            let committed = self.commit(
                &[cond(inode_key(ino), inode_rev), cond(key.clone(), existing.map(|v| v.revision).unwrap_or(0))],
                &[Mutation::Put { key, value: value.to_vec() }, put(inode_key(ino), &inode)],
            )?;
            Ok(committed.then_some(()))
        })
    }

    pub fn get_xattr(&self, ino: u64, name: &str) -> Result<Vec<u8>, NamespaceError> {
        Self::check_xattr_name(name)?;
        self.inode(ino)?;
        match self.store.get(&xattr_key(ino, name))? {
            Some(v) => Ok(v.value),
            None => Err(NamespaceError::NoAttribute { ino, name: name.to_string() }),
        }
    }

    pub fn list_xattrs(&self, ino: u64) -> Result<Vec<String>, NamespaceError> {
        self.inode(ino)?;
        let prefix = xattr_prefix(ino);
        Ok(self.store.list_prefix(&prefix)?.into_iter().map(|(k, _)| k[prefix.len()..].to_string()).collect())
    }

    pub fn remove_xattr(&self, ino: u64, name: &str) -> Result<(), NamespaceError> {
        Self::check_xattr_name(name)?;
        retry(name, || {
            let (mut inode, inode_rev) = self.inode_with_revision(ino)?;
            let key = xattr_key(ino, name);
            let Some(existing) = self.store.get(&key)? else { return Err(NamespaceError::NoAttribute { ino, name: name.to_string() }) };
            inode.ctime = Timestamp::now();
            let committed = self.commit(
                &[cond(inode_key(ino), inode_rev), cond(key.clone(), existing.revision)],
                &[Mutation::Delete { key }, put(inode_key(ino), &inode)],
            )?;
            Ok(committed.then_some(()))
        })
    }

    /// The byte-range locks on file `ino`.
    pub fn locks(&self, ino: u64) -> Result<Vec<crate::locks::RangeLock>, NamespaceError> {
        Ok(self.read(&locks_key(ino))?.map(|(l, _)| l).unwrap_or_default())
    }

    /// Changes the locks of `ino` with `change` (which may refuse with an error), atomically.
    pub fn update_locks(
        &self,
        ino: u64,
        change: impl Fn(Vec<crate::locks::RangeLock>) -> Result<Vec<crate::locks::RangeLock>, NamespaceError>,
    ) -> Result<(), NamespaceError> {
        retry(&format!("locks of inode {ino}"), || {
            let (current, rev) = self.read(&locks_key(ino))?.unwrap_or((Vec::new(), 0));
            let next = change(current.clone())?;
            if next == current {
                return Ok(Some(()));
            }
            let mutation = if next.is_empty() { Mutation::Delete { key: locks_key(ino) } } else { put(locks_key(ino), &next) };
            Ok(self.commit(&[cond(locks_key(ino), rev)], &[mutation])?.then_some(()))
        })
    }

    /// Drops every lock held by `node` (its processes are gone: the mount restarted).
    pub fn drop_node_locks(&self, node: &str) -> Result<(), NamespaceError> {
        for (key, _) in self.store.list_prefix(LOCKS_PREFIX)? {
            let Ok(ino) = u64::from_str_radix(&key[LOCKS_PREFIX.len()..], 16) else { continue };
            self.update_locks(ino, |locks| Ok(locks.into_iter().filter(|l| l.node != node).collect()))?;
        }
        Ok(())
    }

    /// Registers a chunk server so mounts place replicas on it.
    pub fn servers(&self) -> Result<Vec<String>, NamespaceError> {
        Ok(self.store.list_prefix(SERVERS_PREFIX)?.into_iter().map(|(k, _)| k[SERVERS_PREFIX.len()..].to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata_store::MemoryMetadata;

    fn ns() -> Namespace {
        let ns = Namespace::new(Arc::new(MemoryMetadata::new()));
        ns.init(3, FsConfig { chunk_size: 1 << 20 }).unwrap();
        ns
    }

    fn file(ns: &Namespace, parent: u64, name: &str) -> Inode {
        ns.create(parent, name, InodeKind::File, 0o644, 0, 0, None).unwrap()
    }

    /// Two clients of one store, as two nodes.
    fn two_clients() -> (Namespace, Namespace) {
        let store: Arc<dyn MetadataStore> = Arc::new(MemoryMetadata::new());
        let a = Namespace::new(store.clone());
        a.init(3, FsConfig { chunk_size: 1 << 20 }).unwrap();
        (a, Namespace::new(store))
    }

    #[test]
    fn a_change_from_a_stale_known_inode_is_redone_on_the_current_one() {
        let (a, b) = two_clients();
        let f = file(&a, ROOT_INO, "f");
        // `a` knows f from its creation; `b` changes it behind its back.
        b.set_attributes(f.ino, &AttrChanges { mode: Some(0o600), ..AttrChanges::default() }).unwrap();
        let t = Timestamp { secs: 1_000_000, nanos: 0 };
        let changed = a.set_attributes(f.ino, &AttrChanges { mtime: Some(t), ..AttrChanges::default() }).unwrap();
        assert_eq!((changed.mode, changed.mtime), (0o600, t), "a's change lost b's");
        let stored = b.inode(f.ino).unwrap();
        assert_eq!((stored.mode, stored.mtime), (0o600, t));
        // A directory `a` knows from an earlier create still takes a's next create after `b`
        // created a file in it.
        file(&b, ROOT_INO, "g");
        file(&a, ROOT_INO, "h");
        let names: Vec<String> = a.read_dir(ROOT_INO).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["f", "g", "h"]);
    }

    #[test]
    fn clients_take_inode_numbers_from_batches_of_their_own() {
        let (a, b) = two_clients();
        let mut inos: Vec<u64> = (0..5).flat_map(|i| [file(&a, ROOT_INO, &format!("a{i}")).ino, file(&b, ROOT_INO, &format!("b{i}")).ino]).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), 10, "two clients handed out one inode number twice");
        assert!(!inos.contains(&ROOT_INO));
    }

    #[test]
    fn getattr_answers_from_what_this_client_committed_within_the_ttl() {
        let (a, b) = two_clients();
        let f = file(&a, ROOT_INO, "f");
        b.set_attributes(f.ino, &AttrChanges { mode: Some(0o600), ..AttrChanges::default() }).unwrap();
        // Within the TTL `a` answers from its own commit, as the kernel's cache would.
        assert_eq!(a.inode_at_most(f.ino, Duration::from_secs(3600)).unwrap().mode, 0o644);
        // Past it, `a` reads.
        assert_eq!(a.inode_at_most(f.ino, Duration::ZERO).unwrap().mode, 0o600);
    }

    #[test]
    fn create_lookup_and_exists() {
        let ns = ns();
        let f = file(&ns, ROOT_INO, "a");
        assert_eq!(ns.lookup(ROOT_INO, "a").unwrap().ino, f.ino);
        assert_eq!(ns.create(ROOT_INO, "a", InodeKind::File, 0o644, 0, 0, None).unwrap_err().errno(), libc::EEXIST);
        assert_eq!(ns.lookup(ROOT_INO, "b").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(ns.lookup(f.ino, "x").unwrap_err().errno(), libc::ENOTDIR);
    }

    #[test]
    fn bad_names_change_nothing() {
        let ns = ns();
        assert_eq!(ns.create(ROOT_INO, &"x".repeat(256), InodeKind::File, 0o644, 0, 0, None).unwrap_err().errno(), libc::ENAMETOOLONG);
        assert_eq!(ns.create(ROOT_INO, "a/b", InodeKind::File, 0o644, 0, 0, None).unwrap_err().errno(), libc::EINVAL);
        assert!(ns.read_dir(ROOT_INO).unwrap().is_empty());
        assert!(ns.create(ROOT_INO, &"x".repeat(255), InodeKind::File, 0o644, 0, 0, None).is_ok());
    }

    #[test]
    fn rmdir_refuses_non_empty_and_counts_links() {
        let ns = ns();
        let d = ns.create(ROOT_INO, "d", InodeKind::Directory, 0o755, 0, 0, None).unwrap();
        assert_eq!(ns.inode(ROOT_INO).unwrap().nlink, 3);
        file(&ns, d.ino, "f");
        assert_eq!(ns.rmdir(ROOT_INO, "d").unwrap_err().errno(), libc::ENOTEMPTY);
        assert_eq!(ns.unlink(ROOT_INO, "d").unwrap_err().errno(), libc::EISDIR);
        assert_eq!(ns.rmdir(d.ino, "f").unwrap_err().errno(), libc::ENOTDIR);
        ns.unlink(d.ino, "f").unwrap();
        ns.rmdir(ROOT_INO, "d").unwrap();
        assert_eq!(ns.inode(ROOT_INO).unwrap().nlink, 2);
    }

    #[test]
    fn rename_over_file_and_across_directories() {
        let ns = ns();
        let a = file(&ns, ROOT_INO, "a");
        let b = file(&ns, ROOT_INO, "b");
        ns.rename(ROOT_INO, "a", ROOT_INO, "b", false).unwrap();
        assert_eq!(ns.lookup(ROOT_INO, "b").unwrap().ino, a.ino);
        assert_eq!(ns.inode(b.ino).unwrap_err().errno(), libc::ENOENT);
        let d = ns.create(ROOT_INO, "d", InodeKind::Directory, 0o755, 0, 0, None).unwrap();
        ns.rename(ROOT_INO, "b", d.ino, "c", false).unwrap();
        assert_eq!(ns.lookup(d.ino, "c").unwrap().ino, a.ino);
        let e = ns.create(ROOT_INO, "e", InodeKind::Directory, 0o755, 0, 0, None).unwrap();
        assert_eq!(ns.rename(ROOT_INO, "e", d.ino, "c", false).unwrap_err().errno(), libc::ENOTDIR);
        assert_eq!(ns.rename(d.ino, "c", ROOT_INO, "e", false).unwrap_err().errno(), libc::EISDIR);
        assert_eq!(ns.rename(ROOT_INO, "d", d.ino, "sub", false).unwrap_err().errno(), libc::EINVAL);
        ns.rename(ROOT_INO, "e", d.ino, "e2", false).unwrap();
        assert_eq!(ns.inode(e.ino).unwrap().parent, d.ino);
        assert_eq!(ns.rename(d.ino, "e2", e.ino, "loop", false).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(ns.inode(ROOT_INO).unwrap().nlink, 3);
        assert_eq!(ns.inode(d.ino).unwrap().nlink, 3);
        assert_eq!(ns.inode(e.ino).unwrap().nlink, 2);
    }

    #[test]
    fn an_open_file_unlinked_lives_until_its_orphan_is_removed() {
        let ns = ns();
        let f = file(&ns, ROOT_INO, "f");
        ns.unlink_keeping(ROOT_INO, "f", &|ino| ino == f.ino).unwrap();
        assert_eq!(ns.lookup(ROOT_INO, "f").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(ns.inode(f.ino).unwrap().nlink, 0);
        ns.remove_orphan(f.ino).unwrap();
        assert!(ns.inode(f.ino).is_err());
    }

    #[test]
    fn copies_are_set_per_directory_and_inherited() {
        let ns = ns();
        let d = ns.create(ROOT_INO, "d", InodeKind::Directory, 0o755, 0, 0, None).unwrap();
        assert_eq!(ns.set_copies(d.ino, 0).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(ns.inode(d.ino).unwrap().replicas, 3, "a refused change changes nothing");
        ns.set_copies(d.ino, 2).unwrap();
        assert_eq!(file(&ns, d.ino, "f").replicas, 2);
        assert_eq!(file(&ns, ROOT_INO, "g").replicas, 3);
    }

    #[test]
    fn hard_links_keep_the_inode_until_the_last() {
        let ns = ns();
        let a = file(&ns, ROOT_INO, "a");
        ns.link(a.ino, ROOT_INO, "b").unwrap();
        assert_eq!(ns.inode(a.ino).unwrap().nlink, 2);
        ns.unlink(ROOT_INO, "a").unwrap();
        assert_eq!(ns.lookup(ROOT_INO, "b").unwrap().nlink, 1);
        ns.unlink(ROOT_INO, "b").unwrap();
        assert!(ns.inode(a.ino).is_err());
    }

    #[test]
    fn xattrs_honour_create_and_replace_and_go_with_the_inode() {
        let ns = ns();
        let f = file(&ns, ROOT_INO, "f");
        assert_eq!(ns.set_xattr(f.ino, "user.a", b"1", XattrMode::ReplaceOnly).unwrap_err().errno(), libc::ENODATA);
        ns.set_xattr(f.ino, "user.a", b"1", XattrMode::CreateOnly).unwrap();
        assert_eq!(ns.set_xattr(f.ino, "user.a", b"2", XattrMode::CreateOnly).unwrap_err().errno(), libc::EEXIST);
        ns.set_xattr(f.ino, "user.a", b"2", XattrMode::ReplaceOnly).unwrap();
        assert_eq!(ns.get_xattr(f.ino, "user.a").unwrap(), b"2");
        assert_eq!(ns.list_xattrs(f.ino).unwrap(), vec!["user.a".to_string()]);
        assert_eq!(ns.set_xattr(f.ino, "system.posix_acl_access", b"", XattrMode::CreateOrReplace).unwrap_err().errno(), libc::EOPNOTSUPP);
        ns.unlink(ROOT_INO, "f").unwrap();
        assert!(ns.store().list_prefix(&xattr_prefix(f.ino)).unwrap().is_empty());
    }

    #[test]
    fn lease_takeover_bumps_epoch_and_fences_the_old_holder() {
        let ns = ns();
        let f = file(&ns, ROOT_INO, "f");
        let first = ns.acquire_lease(f.ino, "node-a", false).unwrap();
        assert_eq!(first.epoch, 1);
        assert_eq!(ns.acquire_lease(f.ino, "node-b", false).unwrap_err().errno(), libc::EBUSY);
        let second = ns.acquire_lease(f.ino, "node-b", true).unwrap();
        assert_eq!(second.epoch, 2);
        assert!(matches!(ns.set_size(&first, 10), Err(NamespaceError::Fenced { .. })));
        let chunk = ChunkInfo { chunk_id: 1, version: 1, replicas: vec![] };
        assert!(matches!(ns.put_chunk(&first, 0, &chunk, 0), Err(NamespaceError::Fenced { .. })));
        ns.set_size(&second, 10).unwrap();
        ns.release_lease(&second).unwrap();
        assert_eq!(ns.acquire_lease(f.ino, "node-a", false).unwrap().epoch, 3);
    }

    #[test]
    fn a_file_created_leased_is_written_and_released_in_one_commit_each() {
        let ns = ns();
        let (f, lease) = ns.create_leased_file(ROOT_INO, "f", 0o644, 0, 0, "node-a").unwrap();
        assert_eq!(lease.epoch, 1);
        assert_eq!(ns.lookup(ROOT_INO, "f").unwrap().ino, f.ino);
        assert_eq!(ns.acquire_lease(f.ino, "node-b", false).unwrap_err().errno(), libc::EBUSY);
        assert_eq!(ns.acquire_lease(f.ino, "node-a", false).unwrap(), lease, "the holder gets it back as is");
        ns.put_chunk(&lease, 0, &ChunkInfo { chunk_id: 1, version: 1, replicas: vec![] }, 0).unwrap().unwrap();
        ns.set_size_and_release(&lease, Some(4096), &[]).unwrap();
        assert_eq!(ns.inode(f.ino).unwrap().size, 4096);
        let next = ns.acquire_lease(f.ino, "node-b", false).unwrap();
        assert_eq!(next.epoch, 2);
        // The released lease guards nothing any more.
        assert!(matches!(ns.set_size_and_release(&lease, Some(1), &[]), Err(NamespaceError::Fenced { .. })));
        assert_eq!(ns.inode(f.ino).unwrap().size, 4096);
        assert!(ns.create_leased_file(ROOT_INO, "f", 0o644, 0, 0, "node-a").is_err());
    }

    #[test]
    fn setuid_and_setgid_go_at_a_chown() {
        assert_eq!(mode_without_suidgid(0o6755), 0o0755);
        assert_eq!(mode_without_suidgid(0o2644), 0o2644, "setgid without group execute stays");
        assert_eq!(mode_without_suidgid(0o4644), 0o0644);
        let ns = ns();
        let f = ns.create(ROOT_INO, "f", InodeKind::File, 0o6755, 0, 0, None).unwrap();
        let chown = AttrChanges { uid: Some(7), kill_suidgid: true, ..AttrChanges::default() };
        assert_eq!(ns.set_attributes(f.ino, &chown).unwrap().mode, 0o755);
        let chown_and_chmod = AttrChanges { uid: Some(8), mode: Some(0o4755), kill_suidgid: true, ..AttrChanges::default() };
        assert_eq!(ns.set_attributes(f.ino, &chown_and_chmod).unwrap().mode, 0o4755, "an explicit mode wins");
        let d = ns.create(ROOT_INO, "d", InodeKind::Directory, 0o2755, 0, 0, None).unwrap();
        assert_eq!(ns.set_attributes(d.ino, &chown).unwrap().mode, 0o2755, "directories keep theirs");
    }

    fn chunk(chunk_id: u64) -> ChunkInfo {
        ChunkInfo { chunk_id, version: 1, replicas: ["a", "b", "c"].iter().map(|s| Replica { server: s.to_string(), version: 1 }).collect() }
    }

    /// A file `name` in the root with `count` chunks, ids `first_id..`.
    fn file_with_chunks(ns: &Namespace, name: &str, first_id: u64, count: u64) -> Inode {
        let f = file(ns, ROOT_INO, name);
        let lease = ns.acquire_lease(f.ino, "writer", false).unwrap();
        for index in 0..count {
            ns.put_chunk(&lease, index, &chunk(first_id + index), 0).unwrap().unwrap();
        }
        ns.set_size(&lease, count * (1 << 20)).unwrap();
        ns.release_lease(&lease).unwrap();
        ns.inode(f.ino).unwrap()
    }

    fn owners(ns: &Namespace, chunk_id: u64) -> Vec<(u64, u64)> {
        ns.shared_chunk(chunk_id).unwrap().map(|(s, _)| s.owners.iter().map(|o| (o.ino, o.index)).collect()).unwrap_or_default()
    }

    fn clone(ns: &Namespace, src: u64, name: &str) -> Inode {
        let lease = ns.acquire_lease(src, "cloner", false).unwrap();
        let cloned = ns.clone_file(&lease, ROOT_INO, name).unwrap();
        ns.release_lease(&lease).unwrap();
        cloned
    }

    fn freed_ids(removed: &Removed) -> Vec<u64> {
        let mut ids: Vec<u64> = removed.chunks.iter().map(|c| c.chunk_id).collect();
        ids.sort();
        ids
    }

    #[test]
    fn sharing_changes_count_references() {
        let (a, b, c) = (ChunkOwner { ino: 2, index: 0 }, ChunkOwner { ino: 3, index: 0 }, ChunkOwner { ino: 4, index: 5 });
        let mut changes = SharingChanges::default();
        changes.chunks.insert(7, (0, None));
        assert!(!changes.is_shared(7));
        changes.add_reference(7, a, b);
        changes.add_reference(7, a, c);
        assert!(changes.is_shared(7));
        assert!(!changes.drop_reference(7, a).unwrap());
        assert!(changes.drop_reference(7, c).is_ok_and(|last| !last));
        assert!(changes.drop_reference(7, a).is_err(), "a record the sharing does not list is an inconsistency");
        assert!(changes.drop_reference(7, b).unwrap(), "the last reference frees the chunk");
        // A chunk no sharing record lists has one reference: dropping it frees the chunk.
        changes.chunks.insert(8, (0, None));
        assert!(changes.drop_reference(8, a).unwrap());
        let (mut conditions, mut mutations) = (vec![], vec![]);
        changes.finish(&mut conditions, &mut mutations);
        assert_eq!(conditions, vec![cond(shared_key(7), 0), cond(shared_key(8), 0)]);
        assert!(mutations.is_empty(), "nothing was written for chunks that were never shared");
    }

    #[test]
    fn a_clone_shares_every_chunk_and_the_last_reference_frees_it() {
        let ns = ns();
        let src = file_with_chunks(&ns, "template", 100, 3);
        let copy = clone(&ns, src.ino, "disk");
        assert_eq!((copy.size, copy.nlink, copy.mode), (src.size, 1, src.mode));
        assert_eq!(ns.lookup(ROOT_INO, "disk").unwrap().ino, copy.ino);
        let records = |ino| ns.chunks(ino).unwrap().into_iter().map(|(i, c, _)| (i, c)).collect::<Vec<_>>();
        assert_eq!(records(copy.ino), records(src.ino));
        assert_eq!(owners(&ns, 101), vec![(src.ino, 1), (copy.ino, 1)]);
        let third = clone(&ns, copy.ino, "disk2");
        assert_eq!(owners(&ns, 101), vec![(src.ino, 1), (copy.ino, 1), (third.ino, 1)]);

        assert!(ns.unlink(ROOT_INO, "template").unwrap().chunks.is_empty(), "shared chunks stay");
        assert_eq!(owners(&ns, 100), vec![(copy.ino, 0), (third.ino, 0)]);
        assert!(ns.unlink(ROOT_INO, "disk2").unwrap().chunks.is_empty());
        assert!(ns.shared_chunk(100).unwrap().is_none(), "one reference left: not shared any more");
        assert_eq!(freed_ids(&ns.unlink(ROOT_INO, "disk").unwrap()), vec![100, 101, 102]);
    }

    #[test]
    fn copy_on_write_moves_one_file_to_its_copy() {
        let ns = ns();
        let src = file_with_chunks(&ns, "src", 100, 2);
        let copy = clone(&ns, src.ino, "copy");
        let lease = ns.acquire_lease(copy.ino, "writer", false).unwrap();
        let (shared, rev) = ns.chunk(copy.ino, 1).unwrap().unwrap();
        assert_eq!(ns.unshare_chunk(&lease, 1, &chunk(500), rev + 1, shared.chunk_id).unwrap(), None, "a stale record revision is a conflict");
        ns.unshare_chunk(&lease, 1, &chunk(500), rev, shared.chunk_id).unwrap().unwrap();
        assert_eq!(ns.chunk(copy.ino, 1).unwrap().unwrap().0.chunk_id, 500);
        assert_eq!(ns.chunk(src.ino, 1).unwrap().unwrap().0.chunk_id, 101, "the other file keeps the original");
        assert!(ns.shared_chunk(101).unwrap().is_none());
        assert_eq!(owners(&ns, 100), vec![(src.ino, 0), (copy.ino, 0)]);
        // Not shared any more: nothing to copy, the caller writes in place.
        assert_eq!(ns.unshare_chunk(&lease, 1, &chunk(501), ns.chunk(copy.ino, 1).unwrap().unwrap().1, 500).unwrap(), None);
        // Truncating the copy drops its reference to the shared chunk and frees its own.
        let mut dropped: Vec<u64> = ns.delete_chunks_from(&lease, 0).unwrap().iter().map(|c| c.chunk_id).collect();
        dropped.sort();
        assert_eq!(dropped, vec![500]);
        assert!(ns.shared_chunk(100).unwrap().is_none());
        ns.release_lease(&lease).unwrap();
        assert_eq!(freed_ids(&ns.unlink(ROOT_INO, "src").unwrap()), vec![100, 101]);
        // A fenced writer's copy-on-write is refused.
        let other = clone(&ns, file_with_chunks(&ns, "f", 200, 1).ino, "g");
        let old = ns.acquire_lease(other.ino, "a", false).unwrap();
        ns.acquire_lease(other.ino, "b", true).unwrap();
        let rev = ns.chunk(other.ino, 0).unwrap().unwrap().1;
        assert!(matches!(ns.unshare_chunk(&old, 0, &chunk(600), rev, 200), Err(NamespaceError::Fenced { .. })));
        assert_eq!(owners(&ns, 200).len(), 2);
    }

    #[test]
    fn clone_refuses_bad_requests_and_changes_nothing() {
        let ns = ns();
        let src = file_with_chunks(&ns, "src", 100, 1);
        let d = ns.create(ROOT_INO, "d", InodeKind::Directory, 0o755, 0, 0, None).unwrap();
        let lease = ns.acquire_lease(src.ino, "cloner", false).unwrap();
        let before = ns.store().list_prefix("/fs/").unwrap();
        assert_eq!(ns.clone_file(&lease, ROOT_INO, "d").unwrap_err().errno(), libc::EEXIST);
        assert_eq!(ns.clone_file(&lease, ROOT_INO, "src").unwrap_err().errno(), libc::EEXIST);
        assert_eq!(ns.clone_file(&lease, src.ino, "x").unwrap_err().errno(), libc::ENOTDIR);
        assert_eq!(ns.clone_file(&lease, 999, "x").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(ns.clone_file(&lease, ROOT_INO, "a/b").unwrap_err().errno(), libc::EINVAL);
        let dir_lease = HeldLease { ino: d.ino, epoch: 1, revision: 0 };
        assert_eq!(ns.clone_file(&dir_lease, ROOT_INO, "x").unwrap_err().errno(), libc::EISDIR);
        assert_eq!(ns.store().list_prefix("/fs/").unwrap(), before, "a refused clone changes nothing");
        // The source's writer keeps the lease: a clone cannot take it, and a lost lease fences.
        ns.release_lease(&lease).unwrap();
        let writer = ns.acquire_lease(src.ino, "node-a", false).unwrap();
        assert_eq!(ns.acquire_lease(src.ino, "cloner", false).unwrap_err().errno(), libc::EBUSY);
        ns.acquire_lease(src.ino, "node-b", true).unwrap();
        assert!(matches!(ns.clone_file(&writer, ROOT_INO, "x"), Err(NamespaceError::Fenced { .. })));
        assert!(ns.lookup(ROOT_INO, "x").is_err());
    }

    #[test]
    fn large_files_clone_and_delete_in_steps() {
        let ns = ns();
        let count = MAX_CHUNKS_PER_COMMIT as u64 * 2 + 7;
        let src = file_with_chunks(&ns, "big", 1000, count);
        let copy = clone(&ns, src.ino, "big2");
        assert_eq!(ns.chunks(copy.ino).unwrap().len() as u64, count);
        assert_eq!(owners(&ns, 1000 + count - 1), vec![(src.ino, count - 1), (copy.ino, count - 1)]);
        let lease = ns.acquire_lease(src.ino, "writer", false).unwrap();
        assert!(ns.delete_chunks_from(&lease, 3).unwrap().is_empty(), "every dropped chunk is still the clone's");
        ns.release_lease(&lease).unwrap();
        assert_eq!(owners(&ns, 1003), vec![]);
        assert_eq!(ns.unlink(ROOT_INO, "big").unwrap().chunks.len(), 0);
        let removed = ns.unlink(ROOT_INO, "big2").unwrap();
        assert_eq!(removed.chunks.len() as u64, count);
        assert!(ns.inode(copy.ino).is_err());
        assert!(ns.store().list_prefix("/fs/chunks/").unwrap().is_empty());
        assert!(ns.store().list_prefix(SHARED_PREFIX).unwrap().is_empty());
    }

    #[test]
    fn healing_a_shared_chunk_changes_every_record_of_it() {
        let ns = ns();
        let src = file_with_chunks(&ns, "src", 100, 1);
        let copy = clone(&ns, src.ino, "copy");
        let lease = ns.acquire_lease(copy.ino, "healer", false).unwrap();
        let (record, rev) = ns.chunk(copy.ino, 0).unwrap().unwrap();
        let mut healed = record.clone();
        healed.replicas.push(Replica { server: "d".into(), version: 1 });
        ns.put_chunk_everywhere(&lease, 0, &healed, rev).unwrap().unwrap();
        assert_eq!(ns.chunk(src.ino, 0).unwrap().unwrap().0, healed);
        assert_eq!(ns.chunk(copy.ino, 0).unwrap().unwrap().0, healed);
    }

    #[test]
    fn chunks_shared_into_a_range_need_it_empty() {
        let ns = ns();
        let src = file_with_chunks(&ns, "src", 100, 3);
        let dst = file_with_chunks(&ns, "dst", 200, 1);
        let (a, b) = (ns.acquire_lease(src.ino, "n", false).unwrap(), ns.acquire_lease(dst.ino, "n", false).unwrap());
        assert!(!ns.share_chunks(&a, 0, 2, &b, 0).unwrap(), "the target holds chunk 0");
        assert!(ns.share_chunks(&a, 1, 2, &b, 4).unwrap());
        assert_eq!(ns.chunk(dst.ino, 5).unwrap().unwrap().0.chunk_id, 102);
        assert_eq!(owners(&ns, 101), vec![(src.ino, 1), (dst.ino, 4)]);
        assert_eq!(ns.share_chunks(&a, 0, 1, &a, 9).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn partial_write_makes_missing_replicas_stale() {
        let chunk = ChunkInfo {
            chunk_id: 1,
            version: 4,
            replicas: vec![
                Replica { server: "a".into(), version: 4 },
                Replica { server: "b".into(), version: 4 },
                Replica { server: "c".into(), version: 3 },
            ],
        };
        let after = chunk.after_partial_write(&["a".to_string(), "c".to_string()]);
        assert_eq!(after.version, 5);
        assert_eq!(after.current_servers(), vec!["a".to_string()]);
    }
}

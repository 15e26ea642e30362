//! The FUSE mount: POSIX operations translated to [`Namespace`] (metadata) and [`FileData`]
//! (replicated chunks). Permission checks are the kernel's (`default_permissions`), on the
//! mode and ownership stored in the metadata.
//!
//! A file opened for writing takes the file's exclusive write lease; its size lives in memory
//! while the lease is held and is committed on flush, fsync and close. If another writer took
//! the lease over, every later write, flush and fsync of this mount fails with EIO.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyLock, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::chunk_protocol::{ChunkRequest, ChunkResponse};
use crate::file_data::{DataError, FileData};
use crate::aligned_buffer::AlignedBuffer;
use crate::namespace::{mode_without_suidgid, AttrChanges, HeldLease, Inode, InodeKind, NamespaceError, Removed, Timestamp, XattrMode, MAX_CHUNKS_PER_COMMIT};

/// How long the kernel may cache attributes and entries: short, since other nodes change them.
const ATTR_TTL: Duration = Duration::from_secs(1);
/// Asynchronous requests (readahead, asynchronous direct I/O) the kernel keeps in flight at
/// most (fuser's default is 16); a quarter less marks the mount congested.
const MAX_BACKGROUND_REQUESTS: u16 = 64;

thread_local! {
    /// The read buffer of each FUSE thread (see `read`).
    static READ_BUFFER: std::cell::RefCell<AlignedBuffer> = std::cell::RefCell::new(AlignedBuffer::zeroed(0));
}

/// Per-file state of files open on this mount.
#[derive(Default)]
struct OpenFile {
    handles: u32,
    writers: u32,
    lease: Option<HeldLease>,
    /// The size while we hold the lease (authoritative; committed on flush/fsync/close).
    size: u64,
    size_dirty: bool,
    dirty_chunks: BTreeSet<u64>,
    copies: u32,
    /// The file's permission bits as of the lease's taking (and this mount's own changes):
    /// whether a write must clear setuid and setgid.
    mode: u32,
    /// Set once a write was fenced: the lease is gone, every later write fails.
    fenced: bool,
    /// Attribute changes (chmod, chown, utimes) made while we hold the lease, in order, not
    /// committed yet: they go with the next size commit (flush, fsync, the last close).
    /// Until then this mount's answers show them; other nodes see them after the close, as
    /// they see the size.
    pending_attrs: Vec<AttrChanges>,
}

struct Handle {
    ino: u64,
    writable: bool,
    sync_writes: bool,
}

pub struct SharedFs {
    data: Arc<FileData>,
    /// Who we are in write leases: unique per mount process.
    holder: String,
    open_files: Arc<Mutex<HashMap<u64, Arc<Mutex<OpenFile>>>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    /// Files where processes of this node took byte-range locks (released on close).
    locked_files: Mutex<std::collections::HashSet<u64>>,
    /// Files found without a `security.capability` attribute, and when: the kernel asks for it
    /// before writes, and the answer holds for [`ATTR_TTL`], as attributes do.
    without_capability: Mutex<HashMap<u64, Instant>>,
    /// Open files whose last link this mount may have removed: their last close looks.
    maybe_orphans: Mutex<std::collections::HashSet<u64>>,
}

/// The extended attribute the kernel looks up before writes (file capabilities).
const CAPABILITY_XATTR: &str = "security.capability";

fn errno_of(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn ns_err(e: NamespaceError) -> Errno {
    if matches!(e, NamespaceError::Store(_) | NamespaceError::Fenced { .. }) {
        tracing::error!("{e}");
    }
    errno_of(e.errno())
}

fn data_err(e: DataError) -> Errno {
    tracing::error!("{e}");
    errno_of(e.errno())
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    // Keys of the store are UTF-8: other names get a clear EINVAL rather than a mangled name.
    name.to_str().ok_or(Errno::EINVAL)
}

fn time_of(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(t) => Timestamp::from(t),
        TimeOrNow::Now => Timestamp::now(),
    }
}

impl SharedFs {
    /// `node_id` names this writer in write leases. A restarted agent with the same id gets
    /// its leases back (same epoch); another node must take them over (new epoch).
    pub fn new(data: FileData, node_id: &str) -> SharedFs {
        let holder = node_id.to_string();
        SharedFs {
            data: Arc::new(data),
            holder,
            open_files: Arc::new(Mutex::new(HashMap::new())),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            locked_files: Mutex::new(Default::default()),
            without_capability: Mutex::new(HashMap::new()),
            maybe_orphans: Mutex::new(Default::default()),
        }
    }

    /// Every `interval`, brings the files this mount holds the write lease of back to their
    /// copies (nobody else may heal them while we write). Each file's writes wait during its
    /// heal, which is what keeps a copy from missing a write.
    pub fn spawn_healer(&self, interval: Duration) {
        let data = self.data.clone();
        let open_files = self.open_files.clone();
        std::thread::Builder::new()
            .name("fs-heal".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let files: Vec<(u64, Arc<Mutex<OpenFile>>)> = open_files.lock().expect("open files").iter().map(|(i, f)| (*i, f.clone())).collect();
                for (ino, file) in files {
                    let copies = file.lock().expect("open file").copies;
                    let Ok(degraded) = data.chunks_to_heal(ino, copies) else { continue };
                    // One chunk at a time under the file's lock: writes wait for one chunk's copy only.
                    for index in degraded {
                        let state = file.lock().expect("open file");
                        let (Some(lease), false) = (state.lease, state.fenced) else { break };
                        match data.heal_file(&lease, state.copies, state.size, Some(index)) {
                            Ok(outcome) => tracing::info!(ino, index, ?outcome, "healed a chunk of an open file"),
                            Err(e) => tracing::warn!(ino, index, "cannot heal a chunk of an open file: {e}"),
                        }
                    }
                }
            })
            .expect("spawn the healer thread");
    }

    fn attr(&self, inode: &Inode) -> FileAttr {
        let mut size = inode.size;
        let mut pending = None;
        // Clone out of the table first: a file's lock may be held by a long write or heal.
        let open = self.open_files.lock().expect("open files").get(&inode.ino).cloned();
        if let Some(file) = open {
            let file = file.lock().expect("open file");
            if file.lease.is_some() {
                size = file.size;
                if !file.pending_attrs.is_empty() {
                    let mut changed = inode.clone();
                    file.pending_attrs.iter().for_each(|change| change.apply(&mut changed));
                    pending = Some(changed);
                }
            }
        }
        let inode = pending.as_ref().unwrap_or(inode);
        let kind = match inode.kind {
            InodeKind::Directory => FileType::Directory,
            InodeKind::File => FileType::RegularFile,
            InodeKind::Symlink => FileType::Symlink,
        };
        FileAttr {
            ino: INodeNo(inode.ino),
            size,
            blocks: size.div_ceil(512),
            atime: inode.atime.into(),
            mtime: inode.mtime.into(),
            ctime: inode.ctime.into(),
            crtime: inode.ctime.into(),
            kind,
            perm: inode.mode as u16,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: 64 * 1024,
            flags: 0,
        }
    }

    fn open_file(&self, ino: u64) -> Arc<Mutex<OpenFile>> {
        self.open_files.lock().expect("open files").entry(ino).or_default().clone()
    }

    /// Takes the file's write lease and fences older epochs on the chunk servers, before our
    /// first write lands.
    fn take_lease(&self, ino: u64) -> Result<(HeldLease, Inode), Errno> {
        let lease = self.data.namespace().acquire_lease(ino, &self.holder, false).map_err(ns_err)?;
        let ready = self.data.fence(&lease).map_err(data_err).and_then(|()| self.data.namespace().inode(ino).map_err(ns_err));
        match ready {
            Ok(inode) => Ok((lease, inode)),
            Err(e) => {
                let _ = self.data.namespace().release_lease(&lease);
                Err(e)
            }
        }
    }

    fn hold_lease(state: &mut OpenFile, lease: HeldLease, inode: &Inode) {
        state.size = inode.size;
        state.copies = inode.replicas;
        state.mode = inode.mode;
        state.lease = Some(lease);
        state.fenced = false;
    }

    /// The lease a write of an open file needs: EBADF without one, EIO once fenced.
    fn lease_for_write(state: &OpenFile) -> Result<HeldLease, Errno> {
        let Some(lease) = state.lease else { return Err(Errno::EBADF) };
        if state.fenced {
            return Err(Errno::EIO);
        }
        Ok(lease)
    }

    /// Registers an open handle; a writable one takes the file's write lease.
    fn open_handle(&self, ino: u64, flags: i32) -> Result<u64, Errno> {
        self.open_handle_leased(ino, flags, None)
    }

    /// [`SharedFs::open_handle`]; `created`: the lease was taken with the file's creation.
    fn open_handle_leased(&self, ino: u64, flags: i32, created: Option<(HeldLease, &Inode)>) -> Result<u64, Errno> {
        let accmode = flags & libc::O_ACCMODE;
        let writable = accmode == libc::O_WRONLY || accmode == libc::O_RDWR;
        let file = self.open_file(ino);
        let mut state = file.lock().expect("open file");
        if let (Some((lease, inode)), None) = (created, state.lease) {
            Self::hold_lease(&mut state, lease, inode);
        }
        if writable && state.lease.is_none() {
            match self.take_lease(ino) {
                Ok((lease, inode)) => Self::hold_lease(&mut state, lease, &inode),
                Err(e) => {
                    drop(state);
                    drop(file);
                    self.drop_if_unused(ino);
                    return Err(e);
                }
            }
        }
        state.handles += 1;
        if writable {
            state.writers += 1;
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let sync_writes = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.handles.lock().expect("handles").insert(fh, Handle { ino, writable, sync_writes });
        Ok(fh)
    }

    /// Forgets a file's state once nothing uses it. Callers drop their own `Arc` first: an
    /// entry someone else still holds (an open in progress, a heal) is kept, so two states
    /// for one file can never exist.
    fn drop_if_unused(&self, ino: u64) {
        let mut files = self.open_files.lock().expect("open files");
        if let Some(file) = files.get(&ino) {
            if Arc::strong_count(file) > 1 {
                return;
            }
            let state = file.lock().expect("open file");
            if state.handles == 0 && state.lease.is_none() {
                drop(state);
                files.remove(&ino);
            }
        }
    }

    /// Commits the in-memory size of a leased file (flush, fsync, close).
    fn commit_size(&self, state: &mut OpenFile) -> Result<(), Errno> {
        if state.fenced {
            return Err(Errno::EIO);
        }
        if let (Some(lease), true) = (state.lease, state.size_dirty || !state.pending_attrs.is_empty()) {
            let size = state.size_dirty.then_some(state.size);
            match self.data.namespace().commit_writer_changes(&lease, size, &state.pending_attrs, false) {
                Ok(inode) => {
                    state.size_dirty = false;
                    state.pending_attrs.clear();
                    state.mode = inode.mode;
                }
                Err(e) => {
                    if matches!(e, NamespaceError::Fenced { .. }) {
                        state.fenced = true;
                    }
                    return Err(ns_err(e));
                }
            }
        }
        Ok(())
    }

    /// Whether the removal of the last link of `ino` must leave it as an orphan (it is open
    /// here); such a file is checked at its last close.
    fn keep_if_open(&self, ino: u64) -> bool {
        let open = self.open_files.lock().expect("open files").contains_key(&ino);
        if open {
            self.maybe_orphans.lock().expect("orphans").insert(ino);
        }
        open
    }

    /// File `ino` has no `security.capability` attribute, as of now.
    fn remember_without_capability(&self, ino: u64) {
        let mut known = self.without_capability.lock().expect("xattr cache");
        // Entries older than the TTL serve nothing: they go, so the table stays small.
        if known.len() > 4096 {
            known.retain(|_, at| at.elapsed() < ATTR_TTL);
        }
        known.insert(ino, Instant::now());
    }

    /// Keeps `changes` with the open file to commit with its size, if this mount holds the
    /// file's write lease (`None` if not: the caller commits them now). Answers the inode as
    /// committed so far; [`SharedFs::attr`] shows the kept changes on it.
    fn defer_attributes(&self, ino: u64, changes: &AttrChanges) -> Option<Result<Inode, Errno>> {
        let file = self.open_files.lock().expect("open files").get(&ino).cloned()?;
        let mut state = file.lock().expect("open file");
        if state.lease.is_none() || state.fenced {
            return None;
        }
        let inode = match self.data.namespace().inode_at_most(ino, Duration::MAX) {
            Ok(inode) => inode,
            Err(e) => return Some(Err(ns_err(e))),
        };
        state.pending_attrs.push(changes.clone());
        let mut changed = inode.clone();
        state.pending_attrs.iter().for_each(|change| change.apply(&mut changed));
        state.mode = changed.mode;
        Some(Ok(inode))
    }

    fn sync_file(&self, ino: u64) -> Result<(), Errno> {
        let file = self.open_file(ino);
        let mut state = file.lock().expect("open file");
        if state.fenced {
            return Err(Errno::EIO);
        }
        if let Some(lease) = state.lease {
            let dirty: Vec<u64> = state.dirty_chunks.iter().copied().collect();
            self.data.sync(&lease, &dirty).map_err(data_err)?;
            state.dirty_chunks.clear();
        }
        self.commit_size(&mut state)
    }

    fn cleanup_removed(&self, removed: Removed) {
        if !removed.chunks.is_empty() {
            self.data.delete_replicas(&removed.chunks);
        }
    }

    fn set_size(&self, ino: u64, size: u64) -> Result<(), Errno> {
        let file = self.open_file(ino);
        let mut state = file.lock().expect("open file");
        let temporary = state.lease.is_none();
        let lease = match state.lease {
            Some(l) => l,
            None => self.data.namespace().acquire_lease(ino, &self.holder, false).map_err(ns_err)?,
        };
        if temporary {
            if let Err(e) = self.data.fence(&lease) {
                let _ = self.data.namespace().release_lease(&lease);
                return Err(data_err(e));
            }
        }
        let result = self.data.truncate(&lease, size);
        if temporary {
            self.data.forget_file(ino);
            let _ = self.data.namespace().release_lease(&lease);
        }
        match result {
            Ok(()) => {
                state.size = size;
                state.size_dirty = false;
                Ok(())
            }
            Err(e) => {
                if !temporary && matches!(e, DataError::Fenced { .. } | DataError::Namespace(NamespaceError::Fenced { .. })) {
                    state.fenced = true;
                }
                Err(data_err(e))
            }
        }
    }

    /// `copy_file_range` as a copy-on-write clone where it can be one: whole chunks at chunk
    /// boundaries of both files (the last one may end where the source ends), into a range of
    /// the target that holds no chunks. `None`: not such a range, or the source is being
    /// written on another node; the kernel then copies the bytes itself.
    #[allow(clippy::too_many_arguments)]
    fn clone_range(&self, ino_in: u64, fh_in: u64, offset_in: u64, ino_out: u64, fh_out: u64, offset_out: u64, len: u64) -> Result<Option<u64>, Errno> {
        {
            let handles = self.handles.lock().expect("handles");
            let readable = handles.get(&fh_in).is_some_and(|h| h.ino == ino_in);
            let writable = handles.get(&fh_out).is_some_and(|h| h.ino == ino_out && h.writable);
            if !readable || !writable {
                return Err(Errno::EBADF);
            }
        }
        // The kernel asks for at most this much at once: the answer is a u32.
        let len = len.min(u32::MAX as u64 & !0xfff);
        let chunk_size = self.data.chunk_size();
        if ino_in == ino_out || !offset_in.is_multiple_of(chunk_size) || !offset_out.is_multiple_of(chunk_size) {
            return Ok(None);
        }
        let (source, target) = (self.open_file(ino_in), self.open_file(ino_out));
        let result = {
            // Two files' states: always locked in inode order.
            let (first, second) = if ino_in < ino_out { (&source, &target) } else { (&target, &source) };
            let (first, second) = (first.lock().expect("open file"), second.lock().expect("open file"));
            let (mut source_state, mut target_state) = if ino_in < ino_out { (first, second) } else { (second, first) };
            self.clone_range_locked(&mut source_state, &mut target_state, ino_in, offset_in, offset_out, len)
        };
        drop(source);
        drop(target);
        self.drop_if_unused(ino_in);
        self.drop_if_unused(ino_out);
        result
    }

    fn clone_range_locked(&self, source: &mut OpenFile, target: &mut OpenFile, ino_in: u64, offset_in: u64, offset_out: u64, len: u64) -> Result<Option<u64>, Errno> {
        let Some(target_lease) = target.lease else { return Err(Errno::EBADF) };
        if target.fenced {
            return Err(Errno::EIO);
        }
        // The source must not be written meanwhile: this mount's own lease (its size flushed
        // first), or a lease taken for the clone.
        let (source_lease, source_size, temporary) = match source.lease {
            Some(_) if source.fenced => return Ok(None),
            Some(lease) => {
                self.commit_size(source)?;
                (lease, source.size, false)
            }
            None => match self.data.namespace().acquire_lease(ino_in, &self.holder, false) {
                Ok(lease) => match self.data.namespace().inode(ino_in) {
                    Ok(inode) => (lease, inode.size, true),
                    Err(e) => {
                        let _ = self.data.namespace().release_lease(&lease);
                        return Err(ns_err(e));
                    }
                },
                Err(NamespaceError::LeaseBusy { .. }) => return Ok(None),
                Err(e) => return Err(ns_err(e)),
            },
        };
        let chunk_size = self.data.chunk_size();
        let plan = (offset_in < source_size).then(|| {
            let end = source_size.min(offset_in.saturating_add(len));
            let whole = (end - offset_in) / chunk_size;
            if whole as usize >= MAX_CHUNKS_PER_COMMIT {
                (MAX_CHUNKS_PER_COMMIT as u64, MAX_CHUNKS_PER_COMMIT as u64 * chunk_size)
            } else if end == source_size && !(end - offset_in).is_multiple_of(chunk_size) && offset_out + (end - offset_in) >= target.size {
                // The source's last, partial chunk, when no byte of the target follows it.
                (whole + 1, end - offset_in)
            } else {
                (whole, whole * chunk_size)
            }
        });
        let result = match plan {
            Some((count, bytes)) if count > 0 => {
                match self.data.namespace().share_chunks(&source_lease, offset_in / chunk_size, count, &target_lease, offset_out / chunk_size) {
                    Ok(true) => Ok(Some((count, bytes))),
                    Ok(false) => Ok(None),
                    Err(e) => Err(ns_err(e)),
                }
            }
            _ => Ok(None),
        };
        // Cached records of the source may be shared now, and the target holds new ones:
        // their next writes must look again.
        self.data.forget_file(ino_in);
        self.data.forget_file(target_lease.ino);
        if temporary {
            let _ = self.data.namespace().release_lease(&source_lease);
        }
        let Some((count, bytes)) = result? else { return Ok(None) };
        tracing::info!(from = ino_in, to = target_lease.ino, chunks = count, bytes, "cloned chunks (copy-on-write)");
        let first = offset_out / chunk_size;
        // The shared chunks may not be on disk yet: the target's fsync syncs them.
        target.dirty_chunks.extend(first..first + count);
        if offset_out + bytes > target.size {
            target.size = offset_out + bytes;
            target.size_dirty = true;
            self.commit_size(target)?;
        }
        Ok(Some(bytes))
    }

    /// Takes or releases a byte-range lock; `Err(LockConflict)` if another owner holds it.
    fn set_lock(&self, ino: u64, owner: u64, pid: u32, start: u64, end: u64, typ: i32) -> Result<(), NamespaceError> {
        let node = self.holder.as_str();
        if typ == libc::F_UNLCK {
            return self.data.namespace().update_locks(ino, |locks| Ok(crate::locks::unlock(locks, node, owner, start, end)));
        }
        let exclusive = typ == libc::F_WRLCK;
        self.locked_files.lock().expect("locked files").insert(ino);
        self.data.namespace().update_locks(ino, |locks| {
            if let Some(held) = crate::locks::find_conflict(&locks, node, owner, start, end, exclusive) {
                return Err(NamespaceError::LockConflict { ino, node: held.node.clone(), pid: held.pid });
            }
            Ok(crate::locks::lock(locks, node, owner, pid, start, end, exclusive))
        })
    }

    /// Forgets this node's locks from an earlier run: its processes are gone.
    pub fn drop_stale_locks(&self) -> Result<(), NamespaceError> {
        self.data.namespace().drop_node_locks(&self.holder)
    }

    fn statfs_totals(&self) -> (u64, u64) {
        let servers = self.data.namespace().servers().unwrap_or_default();
        let client = self.data.chunk_client();
        let (mut free, mut total) = (0u64, 0u64);
        for server in &servers {
            if let Ok(ChunkResponse::Capacity { free: f, total: t }) = client.call(server, &ChunkRequest::Capacity) {
                free += f;
                total += t;
            }
        }
        // Every byte is stored on (by default) 3 servers.
        (free / 3, total / 3)
    }
}

impl fuser::Filesystem for SharedFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Byte-range locks come to us (and so hold across nodes) only with FUSE_POSIX_LOCKS.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_POSIX_LOCKS) {
            tracing::warn!(?missing, "the kernel offers no POSIX lock support: fcntl locks stay local to this node");
        }
        // Without FUSE_ASYNC_DIO the kernel sends a file's O_DIRECT requests (a loop device's,
        // so every VE disk's) one at a time and waits for each; with it, they are in flight
        // together, up to `max_background`, and the worker threads serve them in parallel.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(?missing, "the kernel offers no asynchronous direct I/O: O_DIRECT requests are served one at a time");
        }
        let _ = config.set_max_background(MAX_BACKGROUND_REQUESTS);
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel marks the superblock SB_NOSEC: it stops
        // asking for security.capability before every write (a metadata read each), and
        // leaves clearing setuid and setgid at writes, truncates and chowns to us.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2) {
            tracing::warn!(?missing, "the kernel cannot leave setuid clearing to the filesystem: it looks up security.capability before every write");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = name_str(name).and_then(|name| self.data.namespace().lookup(parent.0, name).map_err(ns_err));
        match result {
            Ok(inode) => reply.entry(&ATTR_TTL, &self.attr(&inode), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // As this mount committed or read them less than the TTL ago: a directory it just
        // created a file in is asked for again at once (the kernel drops its attributes).
        match self.data.namespace().inode_at_most(ino.0, ATTR_TTL) {
            Ok(inode) => reply.attr(&ATTR_TTL, &self.attr(&inode)),
            Err(e) => reply.error(ns_err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(size) = size {
            match self.data.namespace().inode(ino.0) {
                Ok(inode) if inode.kind == InodeKind::Directory => return reply.error(Errno::EISDIR),
                Ok(_) => {}
                Err(e) => return reply.error(ns_err(e)),
            }
            // Attribute changes kept by an open writer go first, in the order they were made.
            let open = self.open_files.lock().expect("open files").get(&ino.0).cloned();
            if let Some(file) = open {
                let mut state = file.lock().expect("open file");
                if !state.pending_attrs.is_empty() {
                    if let Err(e) = self.commit_size(&mut state) {
                        return reply.error(e);
                    }
                }
            }
            if let Err(e) = self.set_size(ino.0, size) {
                return reply.error(e);
            }
        }
        // FUSE_HANDLE_KILLPRIV_V2: setuid and setgid go at a chown, and at a truncate by an
        // unprivileged process, as the kernel would otherwise do itself.
        let kill_suidgid = uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0);
        let changes = AttrChanges { mode, uid, gid, atime: atime.map(time_of), mtime: mtime.map(time_of), kill_suidgid };
        if size.is_none() {
            if let Some(deferred) = self.defer_attributes(ino.0, &changes) {
                return match deferred {
                    Ok(inode) => reply.attr(&ATTR_TTL, &self.attr(&inode)),
                    Err(e) => reply.error(e),
                };
            }
        }
        match self.data.namespace().set_attributes(ino.0, &changes) {
            Ok(inode) => {
                let open = self.open_files.lock().expect("open files").get(&ino.0).cloned();
                if let Some(file) = open {
                    file.lock().expect("open file").mode = inode.mode;
                }
                reply.attr(&ATTR_TTL, &self.attr(&inode))
            }
            Err(e) => reply.error(ns_err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.data.namespace().inode(ino.0) {
            Ok(Inode { symlink_target: Some(target), .. }) => reply.data(target.as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(ns_err(e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = name_str(name).and_then(|name| {
            self.data.namespace().create(parent.0, name, InodeKind::Directory, mode & !umask, req.uid(), req.gid(), None).map_err(ns_err)
        });
        match result {
            Ok(inode) => reply.entry(&ATTR_TTL, &self.attr(&inode), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let is_open = |ino: u64| self.keep_if_open(ino);
        match name_str(name).and_then(|name| self.data.namespace().unlink_keeping(parent.0, name, &is_open).map_err(ns_err)) {
            Ok(removed) => {
                self.cleanup_removed(removed);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match name_str(name).and_then(|name| self.data.namespace().rmdir(parent.0, name).map_err(ns_err)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = name_str(link_name).and_then(|name| {
            let target = target.to_str().ok_or(Errno::EINVAL)?.to_string();
            self.data.namespace().create(parent.0, name, InodeKind::Symlink, 0o777, req.uid(), req.gid(), Some(target)).map_err(ns_err)
        });
        match result {
            Ok(inode) => reply.entry(&ATTR_TTL, &self.attr(&inode), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let result = name_str(name).and_then(|name| {
            let newname = name_str(newname)?;
            let is_open = |ino: u64| self.keep_if_open(ino);
            self.data.namespace().rename_keeping(parent.0, name, newparent.0, newname, no_replace, &is_open).map_err(ns_err)
        });
        match result {
            Ok(removed) => {
                self.cleanup_removed(removed);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match name_str(newname).and_then(|newname| self.data.namespace().link(ino.0, newparent.0, newname).map_err(ns_err)) {
            Ok(inode) => reply.entry(&ATTR_TTL, &self.attr(&inode), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_handle(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let accmode = flags & libc::O_ACCMODE;
        let writable = accmode == libc::O_WRONLY || accmode == libc::O_RDWR;
        let result = name_str(name).and_then(|name| {
            let (inode, lease) = if writable {
                // The file and its write lease in one commit.
                let (inode, lease) = self.data.namespace().create_leased_file(parent.0, name, mode & !umask, req.uid(), req.gid(), &self.holder).map_err(ns_err)?;
                self.data.created_file(inode.ino);
                (inode, Some(lease))
            } else {
                (self.data.namespace().create(parent.0, name, InodeKind::File, mode & !umask, req.uid(), req.gid(), None).map_err(ns_err)?, None)
            };
            // A new file has no capability: the kernel's look-up before its first write is answered here.
            self.remember_without_capability(inode.ino);
            let fh = self.open_handle_leased(inode.ino, flags, lease.map(|lease| (lease, &inode)))?;
            Ok((inode, fh))
        });
        match result {
            Ok((inode, fh)) => reply.created(&ATTR_TTL, &self.attr(&inode), Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let open = self.open_files.lock().expect("open files").get(&ino.0).cloned();
        let (lease, local_size) = match open {
            Some(file) => {
                let state = file.lock().expect("open file");
                (state.lease, state.lease.map(|_| state.size))
            }
            None => (None, None),
        };
        let file_size = match local_size {
            Some(s) => s,
            None => match self.data.namespace().inode(ino.0) {
                Ok(inode) => inode.size,
                Err(e) => return reply.error(ns_err(e)),
            },
        };
        // Each FUSE thread reuses one buffer aligned for direct I/O: no allocation and no
        // zeroing per read (every byte of a read is written, holes as zeros).
        READ_BUFFER.with_borrow_mut(|buffer| {
            if buffer.len() < size as usize {
                *buffer = AlignedBuffer::zeroed(size as usize);
            }
            match self.data.read(ino.0, file_size, offset, &mut buffer[..size as usize], lease.as_ref()) {
                Ok(read) => reply.data(&buffer[..read]),
                Err(e) => reply.error(data_err(e)),
            }
        })
    }

    fn write(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, data: &[u8], write_flags: WriteFlags, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyWrite) {
        let sync = match self.handles.lock().expect("handles").get(&fh.0) {
            Some(h) if h.writable && h.ino == ino.0 => h.sync_writes,
            _ => return reply.error(Errno::EBADF),
        };
        let file = self.open_file(ino.0);
        let mut state = file.lock().expect("open file");
        let lease = match Self::lease_for_write(&state) {
            Ok(lease) => lease,
            Err(e) => return reply.error(e),
        };
        // FUSE_HANDLE_KILLPRIV_V2: the kernel leaves it to us to clear setuid and setgid
        // when a process without CAP_FSETID writes.
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) && mode_without_suidgid(state.mode) != state.mode {
            // Kept with the attribute changes this writer has not committed yet, after them.
            state.pending_attrs.push(AttrChanges { kill_suidgid: true, ..AttrChanges::default() });
            state.mode = mode_without_suidgid(state.mode);
        }
        let end = offset + data.len() as u64;
        // A write growing the file into a new chunk records the new size with the chunk.
        let new_size = (end > state.size).then_some(end);
        let size_recorded = match self.data.write(&lease, state.copies, offset, data, sync, new_size) {
            Ok(recorded) => recorded,
            Err(e) => {
                if matches!(e, DataError::Fenced { .. } | DataError::Namespace(NamespaceError::Fenced { .. })) {
                    state.fenced = true;
                } else if new_size.is_some() {
                    // The failed write may have recorded its size: the file keeps the one it had.
                    state.size_dirty = true;
                    let _ = self.commit_size(&mut state);
                }
                return reply.error(data_err(e));
            }
        };
        let chunk_size = self.data.chunk_size();
        for index in offset / chunk_size..=(end.max(1) - 1) / chunk_size {
            state.dirty_chunks.insert(index);
        }
        if !state.pending_attrs.is_empty() {
            // Written after a utimes: the mtime is this write's again when they are committed.
            // An entry that sets only the mtime (an earlier write's, or a utimes of the mtime
            // alone) is replaced, since this write comes after it: a run of writes keeps one.
            let written = AttrChanges { mtime: Some(Timestamp::now()), ..AttrChanges::default() };
            match state.pending_attrs.last_mut() {
                Some(last) if *last == AttrChanges { mtime: last.mtime, ..AttrChanges::default() } => *last = written,
                _ => state.pending_attrs.push(written),
            }
        }
        if end > state.size {
            state.size = end;
            state.size_dirty = !size_recorded;
        }
        if sync {
            if let Err(e) = self.commit_size(&mut state) {
                return reply.error(e);
            }
        }
        reply.written(data.len() as u32)
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // POSIX: closing any descriptor of a file releases the process's locks on it.
        if self.locked_files.lock().expect("locked files").contains(&ino.0) {
            if let Err(e) = self.set_lock(ino.0, lock_owner.0, 0, 0, u64::MAX, libc::F_UNLCK) {
                tracing::warn!(ino = ino.0, "cannot release byte-range locks at close: {e}");
            }
        }
        let writable = self.handles.lock().expect("handles").get(&fh.0).is_some_and(|h| h.writable);
        if !writable {
            return reply.ok();
        }
        let file = self.open_file(ino.0);
        let mut state = file.lock().expect("open file");
        match self.commit_size(&mut state) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.sync_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        let Some(handle) = self.handles.lock().expect("handles").remove(&fh.0) else { return reply.ok() };
        let file = self.open_file(ino.0);
        let mut result = Ok(());
        {
            let mut state = file.lock().expect("open file");
            state.handles = state.handles.saturating_sub(1);
            if handle.writable {
                state.writers = state.writers.saturating_sub(1);
                if state.writers == 0 {
                    if state.fenced {
                        result = Err(Errno::EIO);
                    }
                    if let Some(lease) = state.lease.take() {
                        if !state.fenced {
                            // What is left to commit (the size if written since the flush,
                            // attributes set since) and the release in one commit.
                            let size = state.size_dirty.then_some(state.size);
                            let changed = size.is_some() || !state.pending_attrs.is_empty();
                            match self.data.namespace().set_size_and_release(&lease, size, &state.pending_attrs) {
                                Ok(()) => state.size_dirty = false,
                                Err(e) => {
                                    tracing::warn!(ino = ino.0, "cannot release the write lease: {e}");
                                    if changed {
                                        result = Err(ns_err(e));
                                    }
                                }
                            }
                        }
                        state.pending_attrs.clear();
                        self.data.forget_file(ino.0);
                    }
                    state.dirty_chunks.clear();
                }
            }
        }
        let last_close = file.lock().expect("open file").handles == 0;
        drop(file);
        // Only this mount's unlinks leave orphans (another node's delete the file at once).
        if last_close && self.maybe_orphans.lock().expect("orphans").remove(&ino.0) {
            match self.data.namespace().inode(ino.0) {
                Ok(inode) if inode.nlink == 0 && inode.kind == InodeKind::File => match self.data.namespace().remove_orphan(ino.0) {
                    Ok(removed) => self.cleanup_removed(removed),
                    Err(e) => tracing::warn!(ino = ino.0, "cannot delete an unlinked file at its last close: {e}"),
                },
                _ => {}
            }
        }
        self.drop_if_unused(ino.0);
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getlk(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, start: u64, end: u64, typ: i32, _pid: u32, reply: ReplyLock) {
        match self.data.namespace().locks(ino.0) {
            Ok(locks) => match crate::locks::find_conflict(&locks, &self.holder, lock_owner.0, start, end, typ == libc::F_WRLCK) {
                Some(l) => reply.locked(l.start, l.end, if l.exclusive { libc::F_WRLCK } else { libc::F_RDLCK }, l.pid),
                None => reply.locked(start, end, libc::F_UNLCK, 0),
            },
            Err(e) => reply.error(ns_err(e)),
        }
    }

    fn setlk(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, start: u64, end: u64, typ: i32, pid: u32, sleep: bool, reply: ReplyEmpty) {
        let mut wait = Duration::from_millis(20);
        loop {
            match self.set_lock(ino.0, lock_owner.0, pid, start, end, typ) {
                Ok(()) => return reply.ok(),
                // F_SETLKW: wait for the holder, wherever it runs (this holds a worker thread).
                Err(NamespaceError::LockConflict { .. }) if sleep => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(e) => return reply.error(errno_of(e.errno())),
            }
        }
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let writable = self.handles.lock().expect("handles").get(&fh.0).is_some_and(|h| h.writable && h.ino == ino.0);
        if !writable {
            return reply.error(Errno::EBADF);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 || (punch && !keep_size) || (punch && zero) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let file = self.open_file(ino.0);
        let mut state = file.lock().expect("open file");
        let lease = match Self::lease_for_write(&state) {
            Ok(lease) => lease,
            Err(e) => return reply.error(e),
        };
        if punch || zero {
            if let Err(e) = self.data.punch_hole(&lease, offset, length) {
                if matches!(e, DataError::Fenced { .. } | DataError::Namespace(NamespaceError::Fenced { .. })) {
                    state.fenced = true;
                }
                return reply.error(data_err(e));
            }
        }
        // Plain allocation reserves no space (chunks are sparse); it only extends the size.
        let end = offset.saturating_add(length);
        if !keep_size && end > state.size {
            state.size = end;
            state.size_dirty = true;
            if let Err(e) = self.commit_size(&mut state) {
                return reply.error(e);
            }
        }
        reply.ok()
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        match self.clone_range(ino_in.0, fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len) {
            // At most the kernel's request, which fits in a u32.
            Ok(Some(bytes)) => reply.written(bytes as u32),
            // The kernel falls back to copying the bytes through read and write.
            Ok(None) => reply.error(Errno::EOPNOTSUPP),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, position: u32, reply: ReplyEmpty) {
        if position != 0 {
            return reply.error(Errno::EINVAL);
        }
        let mode = match flags {
            0 => XattrMode::CreateOrReplace,
            libc::XATTR_CREATE => XattrMode::CreateOnly,
            libc::XATTR_REPLACE => XattrMode::ReplaceOnly,
            _ => return reply.error(Errno::EINVAL),
        };
        self.without_capability.lock().expect("xattr cache").remove(&ino.0);
        match name_str(name).and_then(|name| self.data.namespace().set_xattr(ino.0, name, value, mode).map_err(ns_err)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let capability = name == CAPABILITY_XATTR;
        if capability && self.without_capability.lock().expect("xattr cache").get(&ino.0).is_some_and(|at| at.elapsed() < ATTR_TTL) {
            return reply.error(Errno::ENODATA);
        }
        let value = name_str(name).and_then(|name| match self.data.namespace().get_xattr(ino.0, name) {
            Err(e @ NamespaceError::NoAttribute { .. }) if capability => {
                self.remember_without_capability(ino.0);
                Err(ns_err(e))
            }
            other => other.map_err(ns_err),
        });
        match value {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(value) => reply.data(&value),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.data.namespace().list_xattrs(ino.0) {
            Ok(names) => {
                let mut list = Vec::new();
                for name in names {
                    list.extend_from_slice(name.as_bytes());
                    list.push(0);
                }
                if size == 0 {
                    reply.size(list.len() as u32)
                } else if list.len() > size as usize {
                    reply.error(Errno::ERANGE)
                } else {
                    reply.data(&list)
                }
            }
            Err(e) => reply.error(ns_err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.without_capability.lock().expect("xattr cache").remove(&ino.0);
        match name_str(name).and_then(|name| self.data.namespace().remove_xattr(ino.0, name).map_err(ns_err)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.data.namespace().inode(ino.0) {
            Ok(inode) if inode.kind == InodeKind::Directory => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(ns_err(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.data.namespace().read_dir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(ns_err(e)),
        };
        let mut all: Vec<(u64, FileType, String)> = vec![(ino.0, FileType::Directory, ".".into()), (ino.0, FileType::Directory, "..".into())];
        for (name, entry) in entries {
            let kind = match entry.kind {
                InodeKind::Directory => FileType::Directory,
                InodeKind::File => FileType::RegularFile,
                InodeKind::Symlink => FileType::Symlink,
            };
            all.push((entry.ino, kind, name));
        }
        for (i, (entry_ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry_ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (free, total) = self.statfs_totals();
        let block = 4096u64;
        reply.statfs(total / block, free / block, free / block, 1 << 32, 1 << 31, block as u32, crate::namespace::NAME_MAX as u32, block as u32);
    }
}

/// Mounts the filesystem at `mountpoint` and serves it until unmounted (or SIGTERM/SIGINT,
/// which unmount it).
pub fn mount(fs: SharedFs, mountpoint: &Path, threads: usize) -> std::io::Result<()> {
    use fuser::{Config, MountOption, SessionACL};
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("fs-agent".into()), MountOption::Subtype("fs-agent".into()), MountOption::DefaultPermissions];
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    // The kernel reads the ceiling when the filesystem is mounted: raised for this mount(2)
    // only, and put back right after.
    let raised = RaisedRequestCeiling::raise();
    let session = fuser::Session::new(fs, mountpoint, &config);
    drop(raised);
    let session = session?;
    spawn_unmount_on_signal(mountpoint);
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    session.run()
}

/// Linux's PR_SET_IO_FLUSHER (not in the libc crate for Linux yet).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks this thread, and the threads it starts later, as part of the block I/O path (a loop
/// device over the mount writes back through us): the kernel then neither throttles us nor
/// makes our allocations wait for writeback, which would deadlock under memory pressure.
pub fn become_io_flusher() {
    // SAFETY: prctl(PR_SET_IO_FLUSHER, 1) takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if rc != 0 {
        tracing::warn!("PR_SET_IO_FLUSHER failed: {}; a loop device on this mount may deadlock under memory pressure", std::io::Error::last_os_error());
    }
}

/// The kernel's ceiling on a FUSE request's pages (Linux 6.13 and later; 256 pages, 1 MiB,
/// by default).
const FUSE_MAX_PAGES_LIMIT: &str = "/proc/sys/fs/fuse/max_pages_limit";
/// Pages a request may carry for a loop device's requests to reach the mount whole: a loop
/// device sends up to 1.25 MiB (its max_sectors_kb, 1280), which a 1 MiB ceiling splits in two
/// (a 1 MiB and a 256 KiB request, each a read of the replica of its own). Measured: 1 GiB
/// read sequentially from an ext4 image on the mount went from about 1250 to about 1700 MB/s.
const WANTED_MAX_PAGES: u32 = 512;

/// The kernel's ceiling on FUSE request sizes raised to [`WANTED_MAX_PAGES`] (if it was lower)
/// while this value lives; dropping it puts the old ceiling back. The kernel takes the ceiling
/// into a connection when the filesystem is mounted, so a mount made meanwhile keeps it, and
/// nothing else on the machine changes.
struct RaisedRequestCeiling {
    previous: u32,
}

impl RaisedRequestCeiling {
    fn raise() -> Option<RaisedRequestCeiling> {
        let current: u32 = std::fs::read_to_string(FUSE_MAX_PAGES_LIMIT).ok()?.trim().parse().ok()?;
        if current >= WANTED_MAX_PAGES {
            return None;
        }
        match std::fs::write(FUSE_MAX_PAGES_LIMIT, WANTED_MAX_PAGES.to_string()) {
            Ok(()) => {
                tracing::info!("FUSE requests of up to {WANTED_MAX_PAGES} pages for this mount ({FUSE_MAX_PAGES_LIMIT} is {current}, raised for the mount only): a loop device's requests reach it whole");
                Some(RaisedRequestCeiling { previous: current })
            }
            Err(e) => {
                tracing::warn!("cannot raise {FUSE_MAX_PAGES_LIMIT} from {current} to {WANTED_MAX_PAGES} ({e}): a loop device's large requests come in two pieces");
                None
            }
        }
    }
}

impl Drop for RaisedRequestCeiling {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(FUSE_MAX_PAGES_LIMIT, self.previous.to_string()) {
            tracing::warn!("cannot put {FUSE_MAX_PAGES_LIMIT} back to {}: {e}", self.previous);
        }
    }
}

fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts later: call it
/// first thing in `main`, so only [`mount`]'s waiter thread receives them and unmounts.
pub fn block_termination_signals() {
    if let Err(e) = termination_signals().thread_block() {
        tracing::warn!("cannot block termination signals: {e}");
    }
}

fn spawn_unmount_on_signal(mountpoint: &Path) {
    let signals = termination_signals();
    let mountpoint = mountpoint.to_path_buf();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            tracing::info!(mountpoint = %mountpoint.display(), "signal received: unmounting");
            let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
            std::process::exit(0);
        }
    });
}

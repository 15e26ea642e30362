//! Chunks as local files on a chunk server, with a crc32c per block verified on every read.
//!
//! Layout under the data directory:
//! - `chunks/<chunk_id>.data`: a crc area of [`CRC_AREA`] bytes, then the chunk's bytes (chunk
//!   byte X at file offset `CRC_AREA + X`, see [`ChunkStore::disk_offset`]). The crc area holds
//!   one little-endian u32 crc32c per [`BLOCK_SIZE`] block of data (block i at byte `4 * i`),
//!   computed over the block padded with zeros to the full block size; entries past the data
//!   are meaningless. The data length is the file length minus the crc area (a file no longer
//!   than the crc area holds no data). The file is sparse: bytes past the end read as zeros,
//!   and a punched block is deallocated. Since a chunk's bytes and crcs share one file, one
//!   fdatasync of it makes both durable together;
//! - `chunks/<chunk_id>.version`: the chunk version (decimal), the newest this replica holds;
//!   absent for a replica still at its first version (1), whose data file is enough;
//! - `epochs/<file_id>`: the newest write-lease epoch seen for that file (fencing), once it is
//!   above the first (1).
//!
//! Pure block arithmetic lives in [`block_span`] and [`block_crc`]; the rest is thin file I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LockResult, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// A read of at least this many bytes makes the kernel read ahead [`PREFETCH_READS`] times as
/// much after it (see [`ChunkStore::read_blocks_verified`]).
const PREFETCH_AFTER_READS_OF: u64 = 256 * 1024;
const PREFETCH_READS: u64 = 4;
/// Reads of at least this many bytes into a buffer aligned for it bypass the page cache.
const DIRECT_READS_OF: u64 = 256 * 1024;

/// The epoch of a file's first write lease, which a chunk server never needs to record.
const FIRST_EPOCH: u64 = 1;
/// The version of a new chunk, which a replica's data file has without a `.version` file.
const FIRST_VERSION: u64 = 1;

/// Size of a checksummed block: a page, so a 4 KiB write (a VE's filesystem block) replaces
/// whole blocks and needs no read of the block around it.
pub const BLOCK_SIZE: u64 = 4 * 1024;

/// Bytes at the start of every data file holding its block crcs (4 bytes per block); the
/// chunk's bytes follow. Sparse like the data: a 64 MiB chunk uses 64 KiB of it.
pub const CRC_AREA: u64 = 1024 * 1024;

/// The largest chunk the crc area covers: 262144 blocks, 1 GiB.
pub const MAX_CHUNK_SIZE: u64 = CRC_AREA / 4 * BLOCK_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum ChunkStoreError {
    #[error("chunk {chunk_id:016x}: block {block} fails its crc32c check (stored {stored:08x}, computed {computed:08x}); the replica is corrupt, read another one")]
    Corrupt { chunk_id: u64, block: u64, stored: u32, computed: u32 },
    #[error("file {file_id:016x}: write lease epoch {epoch} is older than epoch {newest} already seen; another writer took the file's lease")]
    StaleEpoch { file_id: u64, epoch: u64, newest: u64 },
    #[error("chunk {chunk_id:016x}: this replica has version {local}, the request expects {expected}")]
    VersionMismatch { chunk_id: u64, local: u64, expected: u64 },
    #[error("chunk {chunk_id:016x}: range {offset}+{len} exceeds the chunk size {chunk_size}")]
    OutOfRange { chunk_id: u64, offset: u64, len: u64, chunk_size: u64 },
    #[error("chunk {chunk_id:016x}: cannot copy a chunk onto itself")]
    CopyOntoItself { chunk_id: u64 },
    #[error("chunk size {chunk_size} exceeds {max}, the largest a chunk store supports (the crcs of its blocks must fit the {CRC_AREA} bytes at the start of each data file)")]
    ChunkSizeTooLarge { chunk_size: u64, max: u64 },
    #[error("chunk store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ChunkStoreError + '_ {
    move |source| ChunkStoreError::Io { path: path.to_path_buf(), source }
}

/// The blocks `[first, last]` touched by `len > 0` bytes at `offset`.
pub fn block_span(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / BLOCK_SIZE;
    let last = (offset + len.max(1) - 1) / BLOCK_SIZE;
    (first, last)
}

/// crc32c of a block, padded with zeros to the full block size (so a short last block and a
/// later zero-extension of it have the same crc).
pub fn block_crc(block: &[u8]) -> u32 {
    debug_assert!(block.len() as u64 <= BLOCK_SIZE);
    let crc = crc32c::crc32c(block);
    let padding = BLOCK_SIZE as usize - block.len();
    if padding == 0 {
        crc
    } else {
        crc32c::crc32c_append(crc, &vec![0u8; padding])
    }
}

/// What the background scrub found in its last complete pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubReport {
    /// Complete passes since the server started.
    pub passes: u64,
    pub chunks_checked: u64,
    /// `(chunk id, block)` of every block failing its crc in the last pass.
    pub corrupt_blocks: Vec<(u64, u64)>,
}

/// The local chunk replicas of one chunk server.
pub struct ChunkStore {
    scrub: Mutex<ScrubReport>,
    root: PathBuf,
    chunk_size: u64,
    /// One lock per chunk: a write is a read-modify-write of whole blocks and their crcs.
    chunk_locks: Mutex<HashMap<u64, Arc<ChunkLock>>>,
    /// Newest epoch per file, cached from `epochs/`.
    epochs: Mutex<HashMap<u64, u64>>,
    /// The chunks whose replica reads keep open, oldest first (see [`ChunkLock`]).
    kept_open_for_reads: Mutex<VecDeque<Weak<ChunkLock>>>,
    /// What writes keep between requests: open files, versions, what is not durable yet.
    write_side: Mutex<WriteSide>,
    /// Held while version and epoch files are made durable, so a sync that finds nothing left
    /// to do never answers before another sync finished making it durable.
    persisting: Mutex<()>,
    prefetcher: Prefetcher,
}

/// Reads ahead for sequential readers off their path: asking the kernel to read ahead
/// (`POSIX_FADV_WILLNEED`) allocates the pages and submits the reads before it returns, about
/// as long as the read itself, so a thread of its own does it.
#[derive(Default)]
struct Prefetcher {
    queue: Mutex<Option<std::sync::mpsc::SyncSender<(File, u64, u64)>>>,
}

/// Hints waiting at most; past it new ones are dropped (they are only hints).
const PREFETCH_QUEUE: usize = 16;

impl Prefetcher {
    /// Asks for `len` bytes at `offset` of `file` to be read into the page cache soon.
    fn hint(&self, file: &File, offset: u64, len: u64) {
        let Ok(file) = file.try_clone() else { return };
        let mut queue = self.queue.lock().expect("prefetch queue");
        let sender = queue.get_or_insert_with(|| {
            let (sender, receiver) = std::sync::mpsc::sync_channel::<(File, u64, u64)>(PREFETCH_QUEUE);
            let spawned = std::thread::Builder::new().name("chunk-prefetch".into()).spawn(move || {
                for (file, offset, len) in receiver {
                    let _ = nix::fcntl::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), offset as i64, len as i64, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED);
                }
            });
            if spawned.is_err() {
                tracing::warn!("cannot start the prefetch thread: sequential reads will not read ahead");
            }
            sender
        });
        let _ = sender.try_send((file, offset, len));
    }
}

/// Replicas whose data files writes keep open at most.
const REPLICAS_KEPT_OPEN_FOR_WRITES: usize = 128;

/// The write path's state, kept apart from the reads' [`ChunkLock`] cache.
///
/// Lazy durability: a write that raises a file's epoch or a replica's version replaces the
/// `epochs/<file>` or `.version` file at once (write and rename, so it survives a crash of this
/// process) but fsyncs it only at the next `Sync` of that chunk (or a write with `sync`),
/// together with the data. That is sound because:
/// - a write is not durable before the writer's fsync anyway: until then a crash of the machine
///   may lose its bytes, and losing the version with them only makes this replica refuse reads
///   of that version (a stale replica), never serve bytes older than its version;
/// - versions only go up, so a lost version file is lower, never higher, than what the chunk
///   record says: the replica looks stale, which is the safe side;
/// - an epoch raised by a write (not a `Fence`) is only ever the first contact of a new lease
///   holder with this server for a chunk it allocated after its fence; a `Fence` is still
///   durable before its answer, so a server never accepts an older epoch after acknowledging
///   a fence with a newer one, even across a machine crash;
/// - every `Sync` of a chunk makes its version and the epoch of the files that wrote it durable
///   before it answers, so after the writer's fsync all of it survives any crash.
#[derive(Default)]
struct WriteSide {
    files: HashMap<u64, Arc<WriteFiles>>,
    /// Replica versions, cached from the `.version` files.
    versions: HashMap<u64, u64>,
    /// Chunks whose `.version` file was replaced and not fsynced since.
    unsynced_versions: HashSet<u64>,
    /// Files whose `epochs/` file a write replaced and did not fsync since.
    unsynced_epochs: HashSet<u64>,
    /// Chunk → the file with an unsynced epoch that wrote it.
    epoch_writers: HashMap<u64, u64>,
}

/// The replica's data file (bytes and crcs), kept open between writes.
struct WriteFiles {
    data: File,
}

/// Replicas whose version and data length reads keep at most.
const REPLICAS_KEPT_OPEN_FOR_READS: usize = 128;

/// The lock of one chunk, and what reads keep of its replica between requests (version, data
/// length).
///
/// Reads share the lock; every other request takes it exclusively (`lock`). Taking it
/// exclusively forgets what reads kept (version, length), since that request may
/// change any of it: a read therefore never uses a version or a length older than the last
/// change. This read-side cache is kept apart from the write path's ([`WriteSide`]) on
/// purpose, so each could change alone; merging them would need this invalidation kept.
#[derive(Default)]
struct ChunkLock {
    rw: RwLock<()>,
    open_for_reads: Mutex<Option<Arc<ReplicaForReads>>>,
}

impl ChunkLock {
    /// Exclusive: for every request that may change the replica.
    fn lock(&self) -> LockResult<RwLockWriteGuard<'_, ()>> {
        let guard = self.rw.write();
        *self.open_for_reads.lock().expect("replica kept for reads") = None;
        guard
    }

    /// Shared: reads, which change nothing.
    fn read(&self) -> LockResult<RwLockReadGuard<'_, ()>> {
        self.rw.read()
    }
}

/// A replica as reads see it, valid until the next exclusive holder of its [`ChunkLock`].
///
/// No file is kept: the data file is opened again by every read. The kernel keeps its
/// readahead state per open file, and concurrent reads of one chunk through one open file
/// confuse it (measured: sequential reads of a chunk at half the speed). Each read on a file of
/// its own, the kernel recognizes the sequential stream from the pages in the cache and reads
/// ahead.
struct ReplicaForReads {
    version: u64,
    /// The chunk's data length; `None`: no data file, every byte reads as zeros.
    data_len: Option<u64>,
}

impl ChunkStore {
    /// Opens the store under `root` for chunks of at most `chunk_size` bytes, which must not
    /// exceed [`MAX_CHUNK_SIZE`].
    pub fn open(root: &Path, chunk_size: u64) -> Result<ChunkStore, ChunkStoreError> {
        if chunk_size > MAX_CHUNK_SIZE {
            return Err(ChunkStoreError::ChunkSizeTooLarge { chunk_size, max: MAX_CHUNK_SIZE });
        }
        for sub in ["chunks", "epochs"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        let mut epochs = HashMap::new();
        let epoch_dir = root.join("epochs");
        for entry in fs::read_dir(&epoch_dir).map_err(io_at(&epoch_dir))? {
            let entry = entry.map_err(io_at(&epoch_dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Ok(file_id) = u64::from_str_radix(&name, 16) {
                let text = fs::read_to_string(entry.path()).map_err(io_at(&entry.path()))?;
                epochs.insert(file_id, text.trim().parse().unwrap_or(0));
            }
        }
        Ok(ChunkStore {
            scrub: Mutex::new(ScrubReport::default()),
            root: root.to_path_buf(),
            chunk_size,
            chunk_locks: Mutex::new(HashMap::new()),
            epochs: Mutex::new(epochs),
            kept_open_for_reads: Mutex::default(),
            write_side: Mutex::default(),
            persisting: Mutex::default(),
            prefetcher: Prefetcher::default(),
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, chunk_id: u64, ext: &str) -> PathBuf {
        self.root.join("chunks").join(format!("{chunk_id:016x}.{ext}"))
    }

    fn lock_chunk(&self, chunk_id: u64) -> Arc<ChunkLock> {
        self.chunk_locks.lock().expect("chunk lock table").entry(chunk_id).or_default().clone()
    }

    /// Records `epoch` for `file_id` if it is the newest, durably; refuses an older one.
    pub fn check_epoch(&self, file_id: u64, epoch: u64) -> Result<(), ChunkStoreError> {
        let mut epochs = self.epochs.lock().expect("epoch table");
        let newest = epochs.get(&file_id).copied().unwrap_or(0);
        if epoch < newest {
            return Err(ChunkStoreError::StaleEpoch { file_id, epoch, newest });
        }
        let lazily_recorded = self.write_side.lock().expect("write side").unsynced_epochs.contains(&file_id);
        if epoch > newest || lazily_recorded {
            // Durable before the fence is answered: after a restart, even of the machine, the
            // server must still refuse the fenced writer.
            write_durably(&self.epoch_path(file_id), epoch.to_string().as_bytes())?;
            epochs.insert(file_id, epoch);
            self.write_side.lock().expect("write side").unsynced_epochs.remove(&file_id);
        }
        Ok(())
    }

    fn epoch_path(&self, file_id: u64) -> PathBuf {
        self.root.join("epochs").join(format!("{file_id:016x}"))
    }

    /// The epoch check of a write to `chunk_id`: refuses an older epoch; a newer one is
    /// recorded at once but made durable only by the chunk's next sync (see [`WriteSide`]).
    fn check_write_epoch(&self, file_id: u64, epoch: u64, chunk_id: u64) -> Result<(), ChunkStoreError> {
        let mut epochs = self.epochs.lock().expect("epoch table");
        let newest = epochs.get(&file_id).copied().unwrap_or(0);
        if epoch < newest {
            return Err(ChunkStoreError::StaleEpoch { file_id, epoch, newest });
        }
        // A file's first lease has epoch 1 and no write carries a lower one, so epoch 1 needs
        // no record: an unrecorded file already refuses nothing. (A new file's first write
        // thus creates no epoch file.)
        if epoch > newest && epoch > FIRST_EPOCH {
            write_replacing(&self.epoch_path(file_id), epoch.to_string().as_bytes())?;
            epochs.insert(file_id, epoch);
            self.write_side.lock().expect("write side").unsynced_epochs.insert(file_id);
        }
        let mut side = self.write_side.lock().expect("write side");
        if side.unsynced_epochs.contains(&file_id) {
            side.epoch_writers.insert(chunk_id, file_id);
        }
        Ok(())
    }

    /// Sets the replica's version, durable only at the chunk's next sync (see [`WriteSide`]).
    /// The caller holds the chunk's lock exclusively.
    fn set_version(&self, chunk_id: u64, version: u64) -> Result<(), ChunkStoreError> {
        // Version 1 is what a data file without a `.version` file has (see
        // [`ChunkStore::version`]): a new chunk's first write creates no version file. It is
        // still listed unsynced, so its sync makes the new data file's name durable.
        if version != FIRST_VERSION || self.path(chunk_id, "version").exists() {
            write_replacing(&self.path(chunk_id, "version"), version.to_string().as_bytes())?;
        }
        let mut side = self.write_side.lock().expect("write side");
        side.versions.insert(chunk_id, version);
        side.unsynced_versions.insert(chunk_id);
        Ok(())
    }

    /// Sets the replica's version durably. The caller holds the chunk's lock exclusively.
    fn set_version_durably(&self, chunk_id: u64, version: u64) -> Result<(), ChunkStoreError> {
        write_durably(&self.path(chunk_id, "version"), version.to_string().as_bytes())?;
        let mut side = self.write_side.lock().expect("write side");
        side.versions.insert(chunk_id, version);
        side.unsynced_versions.remove(&chunk_id);
        Ok(())
    }

    /// The replica's data file, kept open between writes. The caller holds the chunk's lock
    /// exclusively.
    fn write_files(&self, chunk_id: u64) -> Result<Arc<WriteFiles>, ChunkStoreError> {
        if let Some(files) = self.write_side.lock().expect("write side").files.get(&chunk_id) {
            return Ok(files.clone());
        }
        let path = self.path(chunk_id, "data");
        let data = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_at(&path))?;
        let files = Arc::new(WriteFiles { data });
        let mut side = self.write_side.lock().expect("write side");
        if side.files.len() >= REPLICAS_KEPT_OPEN_FOR_WRITES {
            // Any one goes: a write using it holds its own reference.
            if let Some(&victim) = side.files.keys().next() {
                side.files.remove(&victim);
            }
        }
        side.files.insert(chunk_id, files.clone());
        Ok(files)
    }

    /// Makes durable the versions of `chunk_ids` and the epochs of the files that wrote them
    /// that writes only replaced (see [`WriteSide`]).
    fn persist_unsynced(&self, chunk_ids: &[u64]) -> Result<(), ChunkStoreError> {
        let _one_at_a_time = self.persisting.lock().expect("persisting");
        let (versions, writers, epochs) = {
            let mut side = self.write_side.lock().expect("write side");
            let versions: Vec<u64> = chunk_ids.iter().copied().filter(|id| side.unsynced_versions.remove(id)).collect();
            let writers: Vec<(u64, u64)> = chunk_ids.iter().filter_map(|id| side.epoch_writers.remove(id).map(|file| (*id, file))).collect();
            let mut epochs: Vec<u64> = writers.iter().map(|(_, file)| *file).collect();
            epochs.sort_unstable();
            epochs.dedup();
            epochs.retain(|file| side.unsynced_epochs.remove(file));
            (versions, writers, epochs)
        };
        let fsync_all = |paths: Vec<PathBuf>, dir: PathBuf| -> Result<(), ChunkStoreError> {
            if paths.is_empty() {
                return Ok(());
            }
            for path in &paths {
                match File::open(path) {
                    Ok(f) => f.sync_all().map_err(io_at(path))?,
                    // Deleted meanwhile: nothing to keep.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(path)(e)),
                }
            }
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io_at(&dir))
        };
        let result = fsync_all(versions.iter().map(|id| self.path(*id, "version")).collect(), self.root.join("chunks"))
            .and_then(|()| fsync_all(epochs.iter().map(|file| self.epoch_path(*file)).collect(), self.root.join("epochs")));
        if result.is_err() {
            // Still not durable: the next sync tries again.
            let mut side = self.write_side.lock().expect("write side");
            side.unsynced_versions.extend(versions);
            side.unsynced_epochs.extend(epochs);
            side.epoch_writers.extend(writers);
        }
        result
    }

    /// The replica's version (cached). The caller holds the chunk's lock, shared or exclusive,
    /// so a delete cannot leave a cached version behind.
    pub fn version(&self, chunk_id: u64) -> Result<u64, ChunkStoreError> {
        if let Some(version) = self.write_side.lock().expect("write side").versions.get(&chunk_id) {
            return Ok(*version);
        }
        let path = self.path(chunk_id, "version");
        let version = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().unwrap_or(0),
            // No version file: a chunk's first version if it has data (its first write
            // created none), no replica at all if not.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.path(chunk_id, "data").exists() {
                    FIRST_VERSION
                } else {
                    0
                }
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        Ok(*self.write_side.lock().expect("write side").versions.entry(chunk_id).or_insert(version))
    }

    /// [`ChunkStore::version`] for a caller that holds no lock (the `Version` request).
    pub fn replica_version(&self, chunk_id: u64) -> Result<u64, ChunkStoreError> {
        let lock = self.lock_chunk(chunk_id);
        let _shared = lock.read().expect("chunk lock");
        self.version(chunk_id)
    }

    fn check_range(&self, chunk_id: u64, offset: u64, len: u64) -> Result<(), ChunkStoreError> {
        if offset.checked_add(len).is_none_or(|end| end > self.chunk_size) {
            return Err(ChunkStoreError::OutOfRange { chunk_id, offset, len, chunk_size: self.chunk_size });
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the chunk under lease `epoch` of `file_id`, and sets the
    /// replica's version to `version` (refusing to go back to an older one).
    #[allow(clippy::too_many_arguments)]
    pub fn write(&self, file_id: u64, epoch: u64, chunk_id: u64, version: u64, offset: u64, data: &[u8], sync: bool) -> Result<(), ChunkStoreError> {
        self.check_range(chunk_id, offset, data.len() as u64)?;
        self.check_write_epoch(file_id, epoch, chunk_id)?;
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if version < local {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        let files = self.write_files(chunk_id)?;
        let data_file = &files.data;
        if !data.is_empty() {
            let old_len = data_length(data_file, &data_path)?;
            let (first, last) = block_span(offset, data.len() as u64);
            // Blocks between the old end and the write are holes: give them the zero crc.
            let old_blocks = old_len.div_ceil(BLOCK_SIZE);
            if old_blocks < first {
                let zero_crcs = block_crc(&[]).to_le_bytes().repeat((first - old_blocks) as usize);
                data_file.write_all_at(&zero_crcs, old_blocks * 4).map_err(io_at(&data_path))?;
            }
            // The touched blocks as they will be: old bytes kept where the write covers a
            // first or last block only in part, then one write of them and one of their crcs.
            let span_start = first * BLOCK_SIZE;
            let new_end = offset + data.len() as u64;
            let span_end = ((last + 1) * BLOCK_SIZE).min(new_end.max(old_len));
            let mut span = vec![0u8; (span_end - span_start) as usize];
            let keep_old = |block: u64, span: &mut [u8]| -> Result<(), ChunkStoreError> {
                let old = self.read_block(chunk_id, data_file, block, old_len)?;
                let at = ((block - first) * BLOCK_SIZE) as usize;
                span[at..at + old.len()].copy_from_slice(&old);
                Ok(())
            };
            if offset > span_start {
                keep_old(first, &mut span)?;
            }
            if new_end < span_end && (last > first || offset == span_start) {
                keep_old(last, &mut span)?;
            }
            span[(offset - span_start) as usize..(new_end - span_start) as usize].copy_from_slice(data);
            let crcs: Vec<u8> = span.chunks(BLOCK_SIZE as usize).flat_map(|block| block_crc(block).to_le_bytes()).collect();
            // Data first, then crcs: a write that fails between them leaves blocks that fail
            // their check (never wrong bytes served); the writer then marks this replica stale.
            data_file.write_all_at(&span, Self::disk_offset(span_start)).map_err(io_at(&data_path))?;
            data_file.write_all_at(&crcs, first * 4).map_err(io_at(&data_path))?;
        }
        if version > local {
            self.set_version(chunk_id, version)?;
        }
        if sync {
            data_file.sync_data().map_err(io_at(&data_path))?;
            self.persist_unsynced(&[chunk_id])?;
        }
        Ok(())
    }

    /// The bytes of `block` that exist on disk (up to the data length `data_len`), verified
    /// against its crc.
    fn read_block(&self, chunk_id: u64, data_file: &File, block: u64, data_len: u64) -> Result<Vec<u8>, ChunkStoreError> {
        let block_start = block * BLOCK_SIZE;
        if block_start >= data_len {
            return Ok(Vec::new());
        }
        let len = (data_len - block_start).min(BLOCK_SIZE) as usize;
        let mut buf = vec![0u8; len];
        let data_path = self.path(chunk_id, "data");
        data_file.read_exact_at(&mut buf, Self::disk_offset(block_start)).map_err(io_at(&data_path))?;
        let mut stored = [0u8; 4];
        data_file.read_exact_at(&mut stored, block * 4).map_err(io_at(&data_path))?;
        let stored = u32::from_le_bytes(stored);
        let computed = block_crc(&buf);
        if stored != computed {
            tracing::error!(chunk_id, block, "crc32c mismatch: replica block is corrupt");
            return Err(ChunkStoreError::Corrupt { chunk_id, block, stored, computed });
        }
        Ok(buf)
    }

    /// Reads `len` bytes at `offset`, every block verified; bytes never written read as zeros.
    /// `expected_version` must equal this replica's version, so a stale replica never serves.
    pub fn read(&self, chunk_id: u64, expected_version: u64, offset: u64, len: u64) -> Result<Vec<u8>, ChunkStoreError> {
        let mut buf = Vec::new();
        let range = self.read_into(chunk_id, expected_version, offset, len, &mut buf)?;
        buf.truncate(range.end);
        buf.drain(..range.start);
        Ok(buf)
    }

    /// [`ChunkStore::read`] into `buf` (grown as needed, never shrunk, so a connection reuses
    /// it): `buf` gets the whole blocks the range touches, each checked against its crc, and
    /// the returned range of `buf` holds the `len` bytes asked for. Reads share the chunk's
    /// lock and keep the replica's version and data length between requests (see
    /// [`ChunkLock`]).
    pub fn read_into(&self, chunk_id: u64, expected_version: u64, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<Range<usize>, ChunkStoreError> {
        self.check_range(chunk_id, offset, len)?;
        if len == 0 {
            return self.read_blocks(chunk_id, expected_version, 0, &mut []).map(|()| 0..0);
        }
        let (first, last) = block_span(offset, len);
        let span_len = ((last + 1 - first) * BLOCK_SIZE) as usize;
        if buf.len() < span_len {
            buf.resize(span_len, 0);
        }
        self.read_blocks(chunk_id, expected_version, first, &mut buf[..span_len])?;
        let head = (offset - first * BLOCK_SIZE) as usize;
        Ok(head..head + len as usize)
    }

    /// [`ChunkStore::read`] into `out`: straight into it when the range is whole blocks (the
    /// reads of a loop device), else through `buf` (as [`ChunkStore::read_into`]).
    pub fn read_to(&self, chunk_id: u64, expected_version: u64, offset: u64, out: &mut [u8], buf: &mut Vec<u8>) -> Result<(), ChunkStoreError> {
        let len = out.len() as u64;
        if offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE) {
            self.check_range(chunk_id, offset, len)?;
            return self.read_blocks(chunk_id, expected_version, offset / BLOCK_SIZE, out);
        }
        let range = self.read_into(chunk_id, expected_version, offset, len, buf)?;
        out.copy_from_slice(&buf[range]);
        Ok(())
    }

    /// Fills `span` (whole blocks) with the blocks from `first_block` on, checked, if this
    /// replica has `expected_version`. Reads share the chunk's lock and keep the replica's
    /// version and length between requests (see [`ChunkLock`]).
    fn read_blocks(&self, chunk_id: u64, expected_version: u64, first_block: u64, span: &mut [u8]) -> Result<(), ChunkStoreError> {
        let lock = self.lock_chunk(chunk_id);
        let _shared = lock.read().expect("chunk lock");
        let replica = self.replica_for_reads(chunk_id, &lock)?;
        if replica.version != expected_version {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local: replica.version, expected: expected_version });
        }
        if span.is_empty() {
            return Ok(());
        }
        match replica.data_len {
            Some(data_len) => self.read_blocks_verified(chunk_id, data_len, first_block, span),
            None => {
                span.fill(0);
                Ok(())
            }
        }
    }

    /// The replica's version and data length, as kept since the last exclusive holder of the
    /// chunk's lock, or looked up now (the caller holds the lock shared).
    fn replica_for_reads(&self, chunk_id: u64, lock: &Arc<ChunkLock>) -> Result<Arc<ReplicaForReads>, ChunkStoreError> {
        if let Some(kept) = lock.open_for_reads.lock().expect("replica kept for reads").clone() {
            return Ok(kept);
        }
        let version = self.version(chunk_id)?;
        let data_path = self.path(chunk_id, "data");
        let data_len = match fs::metadata(&data_path) {
            Ok(metadata) => Some(metadata.len().saturating_sub(CRC_AREA)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at(&data_path)(e)),
        };
        let replica = Arc::new(ReplicaForReads { version, data_len });
        *lock.open_for_reads.lock().expect("replica kept for reads") = Some(replica.clone());
        let mut kept = self.kept_open_for_reads.lock().expect("replicas kept for reads");
        kept.push_back(Arc::downgrade(lock));
        while kept.len() > REPLICAS_KEPT_OPEN_FOR_READS {
            if let Some(oldest) = kept.pop_front().and_then(|weak| weak.upgrade()) {
                *oldest.open_for_reads.lock().expect("replica kept for reads") = None;
            }
        }
        Ok(replica)
    }

    /// Fills `span` with the blocks from `first_block` on of a replica holding `data_len`
    /// bytes: the data file opened for this read (see [`ReplicaForReads`]), one read of the
    /// data, then one of their crcs, then every block on disk checked (a block padded with
    /// zeros past the end of the data has the crc of its bytes, see [`block_crc`]). Blocks past
    /// the end read as zeros. The crcs are read after the data, so that the data read alone
    /// sets the readahead state of the fresh file.
    fn read_blocks_verified(&self, chunk_id: u64, data_len: u64, first_block: u64, span: &mut [u8]) -> Result<(), ChunkStoreError> {
        let start = first_block * BLOCK_SIZE;
        let on_disk = data_len.saturating_sub(start).min(span.len() as u64) as usize;
        span[on_disk..].fill(0);
        if on_disk == 0 {
            return Ok(());
        }
        let data_path = self.path(chunk_id, "data");
        let data = File::open(&data_path).map_err(io_at(&data_path))?;
        let blocks = on_disk.div_ceil(BLOCK_SIZE as usize);
        if on_disk as u64 >= DIRECT_READS_OF && crate::aligned_buffer::is_direct_io_aligned(&span[..on_disk]) {
            // A large read (of a sequential stream) goes from the disk into `span` directly:
            // no copy through the page cache, and the disk gets the reads in flight at once.
            // (The crcs, a small read, still go through the page cache.)
            let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&data_path);
            if let Ok(direct) = direct {
                if direct.read_exact_at(&mut span[..on_disk], Self::disk_offset(start)).is_ok() {
                    return self.check_blocks(chunk_id, &data, first_block, &span[..blocks * BLOCK_SIZE as usize]);
                }
            }
            // A filesystem without O_DIRECT: through the page cache, as small reads.
        }
        if on_disk as u64 >= PREFETCH_AFTER_READS_OF {
            // A large read is one of a sequential stream (a loop device reading its image):
            // the disk starts on what comes next while this read is checked and sent.
            let next = Self::disk_offset(start) + on_disk as u64;
            self.prefetcher.hint(&data, next, on_disk as u64 * PREFETCH_READS);
        }
        data.read_exact_at(&mut span[..on_disk], Self::disk_offset(start)).map_err(io_at(&data_path))?;
        self.check_blocks(chunk_id, &data, first_block, &span[..blocks * BLOCK_SIZE as usize])
    }

    /// Checks the whole blocks of `span`, from `first_block` on, against their crcs in `data`.
    fn check_blocks(&self, chunk_id: u64, data: &File, first_block: u64, span: &[u8]) -> Result<(), ChunkStoreError> {
        let blocks = span.len().div_ceil(BLOCK_SIZE as usize);
        let mut crcs = vec![0u8; blocks * 4];
        data.read_exact_at(&mut crcs, first_block * 4).map_err(io_at(&self.path(chunk_id, "data")))?;
        for (i, (block, stored)) in span.chunks(BLOCK_SIZE as usize).zip(crcs.chunks_exact(4)).enumerate() {
            let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
            let computed = crc32c::crc32c(block);
            if stored != computed {
                let block = first_block + i as u64;
                tracing::error!(chunk_id, block, "crc32c mismatch: replica block is corrupt");
                return Err(ChunkStoreError::Corrupt { chunk_id, block, stored, computed });
            }
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` (they read as zeros afterwards); whole blocks are
    /// deallocated on disk, so a punched file stays sparse.
    #[allow(clippy::too_many_arguments)]
    pub fn punch_hole(&self, file_id: u64, epoch: u64, chunk_id: u64, version: u64, offset: u64, len: u64) -> Result<(), ChunkStoreError> {
        self.check_range(chunk_id, offset, len)?;
        self.change_existing(file_id, epoch, chunk_id, version, |data_file, data_len| {
            let data_path = self.path(chunk_id, "data");
            // Past the end everything reads as zeros already.
            let end = (offset + len).min(data_len);
            if end > offset {
                let (first, last) = block_span(offset, end - offset);
                for block in first..=last {
                    let block_start = block * BLOCK_SIZE;
                    let block_end = (block_start + BLOCK_SIZE).min(data_len);
                    let mut buf = self.read_block(chunk_id, data_file, block, data_len)?;
                    let (from, to) = (offset.max(block_start), end.min(block_end));
                    buf[(from - block_start) as usize..(to - block_start) as usize].fill(0);
                    if from == block_start && to == block_end {
                        let mode = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
                        use std::os::fd::AsRawFd;
                        nix::fcntl::fallocate(data_file.as_raw_fd(), mode, Self::disk_offset(block_start) as i64, (block_end - block_start) as i64)
                            .map_err(|e| io_at(&data_path)(io::Error::from(e)))?;
                    } else {
                        data_file.write_all_at(&buf, Self::disk_offset(block_start)).map_err(io_at(&data_path))?;
                    }
                    data_file.write_all_at(&block_crc(&buf).to_le_bytes(), block * 4).map_err(io_at(&data_path))?;
                }
            }
            Ok(())
        })
    }

    /// Cuts the chunk to `len` bytes (the tail reads as zeros afterwards).
    pub fn truncate(&self, file_id: u64, epoch: u64, chunk_id: u64, version: u64, len: u64) -> Result<(), ChunkStoreError> {
        self.check_range(chunk_id, len, 0)?;
        self.change_existing(file_id, epoch, chunk_id, version, |data_file, data_len| {
            let data_path = self.path(chunk_id, "data");
            if len < data_len {
                let last_block = len / BLOCK_SIZE;
                let mut buf = self.read_block(chunk_id, data_file, last_block, data_len)?;
                buf.truncate((len - last_block * BLOCK_SIZE) as usize);
                // The crcs of the blocks cut off stay in the crc area, past the data: never
                // read, and rewritten by any write extending the data again.
                data_file.set_len(Self::disk_offset(len)).map_err(io_at(&data_path))?;
                if !buf.is_empty() {
                    data_file.write_all_at(&block_crc(&buf).to_le_bytes(), last_block * 4).map_err(io_at(&data_path))?;
                }
                data_file.sync_data().map_err(io_at(&data_path))?;
            }
            Ok(())
        })
    }

    /// The frame of a change to a replica's existing bytes (punch, truncate): the writer's
    /// epoch is checked, the chunk locked, an older version refused. `change` gets the data
    /// file and the data length, if the replica has a data file; a newer version is then
    /// recorded durably.
    fn change_existing(
        &self,
        file_id: u64,
        epoch: u64,
        chunk_id: u64,
        version: u64,
        change: impl FnOnce(&File, u64) -> Result<(), ChunkStoreError>,
    ) -> Result<(), ChunkStoreError> {
        self.check_epoch(file_id, epoch)?;
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if version < local {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        if let Ok(data_file) = OpenOptions::new().read(true).write(true).open(&data_path) {
            let data_len = data_length(&data_file, &data_path)?;
            change(&data_file, data_len)?;
        }
        if version > local {
            self.set_version_durably(chunk_id, version)?;
        }
        Ok(())
    }

    /// Copies replica `from` (which must be at `from_version`) to the new chunk `to` at
    /// `version`, under lease `epoch` of `file_id`, the file `to` belongs to: the copy-on-write
    /// of a chunk shared by several files. Every block is checked against its crc on the way and
    /// holes stay holes. The copy is fsynced before its version is written, so after a crash
    /// `to` is either absent (version 0, never read) or complete. An earlier copy to `to`
    /// (a retried request) is replaced.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_chunk(&self, file_id: u64, epoch: u64, from: u64, from_version: u64, to: u64, version: u64) -> Result<(), ChunkStoreError> {
        if from == to {
            return Err(ChunkStoreError::CopyOntoItself { chunk_id: from });
        }
        self.check_epoch(file_id, epoch)?;
        // Two chunk locks, always taken in id order.
        let (first, second) = (self.lock_chunk(from.min(to)), self.lock_chunk(from.max(to)));
        let _first = first.lock().expect("chunk lock");
        let _second = second.lock().expect("chunk lock");
        let local = self.version(from)?;
        if local != from_version {
            return Err(ChunkStoreError::VersionMismatch { chunk_id: from, local, expected: from_version });
        }
        let to_data_path = self.path(to, "data");
        let copied = self.copy_data(from, &to_data_path);
        if copied.is_err() {
            // A data file alone reads as a replica at the first version: none of a failed copy.
            let _ = fs::remove_file(&to_data_path);
        }
        copied?;
        self.set_version_durably(to, version)
    }

    /// Copies the data file of `from` (its non-zero blocks, checked) to `to_data_path`, durably.
    fn copy_data(&self, from: u64, to_data_path: &Path) -> Result<(), ChunkStoreError> {
        let to_data = File::create(to_data_path).map_err(io_at(to_data_path))?;
        let from_data_path = self.path(from, "data");
        match File::open(&from_data_path) {
            Ok(from_data) => {
                let data_len = data_length(&from_data, &from_data_path)?;
                let mut crcs = Vec::new();
                for block in 0..data_len.div_ceil(BLOCK_SIZE) {
                    let buf = self.read_block(from, &from_data, block, data_len)?;
                    if buf.iter().any(|b| *b != 0) {
                        to_data.write_all_at(&buf, Self::disk_offset(block * BLOCK_SIZE)).map_err(io_at(to_data_path))?;
                    }
                    crcs.extend_from_slice(&block_crc(&buf).to_le_bytes());
                }
                if data_len > 0 {
                    to_data.write_all_at(&crcs, 0).map_err(io_at(to_data_path))?;
                    to_data.set_len(Self::disk_offset(data_len)).map_err(io_at(to_data_path))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&from_data_path)(e)),
        }
        to_data.sync_data().map_err(io_at(to_data_path))
    }

    /// Rewrites `block` of the chunk with `data` (a good replica's copy of the same version),
    /// only if the block currently fails its crc: a healthy block is never overwritten this way.
    /// Returns whether it repaired anything.
    pub fn repair_block(&self, chunk_id: u64, version: u64, block: u64, data: &[u8]) -> Result<bool, ChunkStoreError> {
        let block_start = block * BLOCK_SIZE;
        self.check_range(chunk_id, block_start, data.len() as u64)?;
        if data.len() as u64 > BLOCK_SIZE {
            return Err(ChunkStoreError::OutOfRange { chunk_id, offset: block_start, len: data.len() as u64, chunk_size: BLOCK_SIZE });
        }
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if local != version {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        let Ok(data_file) = OpenOptions::new().read(true).write(true).open(&data_path) else { return Ok(false) };
        let data_len = data_length(&data_file, &data_path)?;
        match self.read_block(chunk_id, &data_file, block, data_len) {
            Ok(_) => return Ok(false),
            Err(ChunkStoreError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        data_file.write_all_at(data, Self::disk_offset(block_start)).map_err(io_at(&data_path))?;
        data_file.write_all_at(&block_crc(data).to_le_bytes(), block * 4).map_err(io_at(&data_path))?;
        data_file.sync_data().map_err(io_at(&data_path))?;
        tracing::info!(chunk_id, block, "corrupt block repaired from another replica");
        Ok(true)
    }

    /// Verifies every block of every chunk (one chunk locked at a time) and records the result.
    pub fn scrub_once(&self) -> Result<ScrubReport, ChunkStoreError> {
        let dir = self.root.join("chunks");
        let mut ids: Vec<u64> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let name = entry.map_err(io_at(&dir))?.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".data").and_then(|h| u64::from_str_radix(h, 16).ok()) {
                ids.push(id);
            }
        }
        ids.sort();
        let mut corrupt_blocks = Vec::new();
        for &chunk_id in &ids {
            let lock = self.lock_chunk(chunk_id);
            let _guard = lock.lock().expect("chunk lock");
            let data_path = self.path(chunk_id, "data");
            // Deleted meanwhile: nothing to check.
            let Ok(data_file) = File::open(&data_path) else { continue };
            let data_len = data_length(&data_file, &data_path)?;
            for block in 0..data_len.div_ceil(BLOCK_SIZE) {
                match self.read_block(chunk_id, &data_file, block, data_len) {
                    Ok(_) => {}
                    Err(ChunkStoreError::Corrupt { .. }) => corrupt_blocks.push((chunk_id, block)),
                    Err(e) => return Err(e),
                }
            }
        }
        let mut report = self.scrub.lock().expect("scrub report");
        report.passes += 1;
        report.chunks_checked = ids.len() as u64;
        report.corrupt_blocks = corrupt_blocks;
        if !report.corrupt_blocks.is_empty() {
            tracing::error!(corrupt = ?report.corrupt_blocks, "scrub found corrupt blocks");
        }
        Ok(report.clone())
    }

    pub fn scrub_report(&self) -> ScrubReport {
        self.scrub.lock().expect("scrub report").clone()
    }

    /// A digest of the replica's content at `version` and its data length, computed from the
    /// stored block crcs (trailing all-zero blocks ignored, so a copy that wrote zeros where
    /// another has nothing compares equal). Replicas with equal digests hold the same bytes.
    pub fn content_digest(&self, chunk_id: u64, version: u64) -> Result<(u64, u64), ChunkStoreError> {
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if local != version {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        let (crcs, data_len) = match File::open(&data_path) {
            Ok(data_file) => {
                let data_len = data_length(&data_file, &data_path)?;
                let mut crcs = vec![0u8; (data_len.div_ceil(BLOCK_SIZE) * 4) as usize];
                data_file.read_exact_at(&mut crcs, 0).map_err(io_at(&data_path))?;
                (crcs, data_len)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(e) => return Err(io_at(&data_path)(e)),
        };
        Ok((digest_of_crcs(&crcs, data_len.div_ceil(BLOCK_SIZE)), data_len))
    }

    /// fdatasync of the chunk's data file (its bytes and crcs).
    pub fn sync(&self, chunk_id: u64) -> Result<(), ChunkStoreError> {
        self.sync_chunks(&[chunk_id])
    }

    /// fdatasync of the data file (bytes and crcs together) of every chunk of `chunk_ids`, all
    /// at once (the disk then merges their cache flushes; a single file is synced on the
    /// calling thread), then their versions and the epochs of the files that wrote them made
    /// durable (see [`WriteSide`]).
    pub fn sync_chunks(&self, chunk_ids: &[u64]) -> Result<(), ChunkStoreError> {
        // The files writes keep open, or else opened now (a chunk never written has none).
        let mut kept: Vec<(u64, Arc<WriteFiles>)> = Vec::new();
        let mut opened: Vec<(PathBuf, File)> = Vec::new();
        for &chunk_id in chunk_ids {
            if let Some(files) = self.write_side.lock().expect("write side").files.get(&chunk_id).cloned() {
                kept.push((chunk_id, files));
                continue;
            }
            let path = self.path(chunk_id, "data");
            match File::open(&path) {
                Ok(f) => opened.push((path, f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        let mut files: Vec<(PathBuf, &File)> = opened.iter().map(|(path, f)| (path.clone(), f)).collect();
        for (chunk_id, kept) in &kept {
            files.push((self.path(*chunk_id, "data"), &kept.data));
        }
        let results: Vec<Result<(), ChunkStoreError>> = match files.as_slice() {
            [] => Vec::new(),
            [(path, file)] => vec![file.sync_data().map_err(io_at(path))],
            _ => std::thread::scope(|scope| {
                let Some(((last_path, last_file), rest)) = files.split_last() else { return Vec::new() };
                let handles: Vec<_> = rest.iter().map(|(path, file)| scope.spawn(move || file.sync_data().map_err(io_at(path)))).collect();
                let mut results = vec![last_file.sync_data().map_err(io_at(last_path))];
                results.extend(handles.into_iter().map(|h| h.join().expect("fdatasync thread")));
                results
            }),
        };
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        self.persist_unsynced(chunk_ids)
    }

    /// Removes the replica (the file was deleted).
    pub fn delete(&self, chunk_id: u64) -> Result<(), ChunkStoreError> {
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        for ext in ["data", "version"] {
            let path = self.path(chunk_id, ext);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        {
            let mut side = self.write_side.lock().expect("write side");
            side.files.remove(&chunk_id);
            side.versions.remove(&chunk_id);
            side.unsynced_versions.remove(&chunk_id);
            side.epoch_writers.remove(&chunk_id);
        }
        self.chunk_locks.lock().expect("chunk lock table").remove(&chunk_id);
        Ok(())
    }

    /// Path of a chunk's data file (operators and tests inspect replicas with it).
    pub fn data_path(root: &Path, chunk_id: u64) -> PathBuf {
        root.join("chunks").join(format!("{chunk_id:016x}.data"))
    }

    /// Where chunk byte `chunk_offset` is in the chunk's data file: past the crc area.
    pub const fn disk_offset(chunk_offset: u64) -> u64 {
        CRC_AREA + chunk_offset
    }

    /// Free and total bytes of the filesystem holding the data directory.
    pub fn capacity(&self) -> Result<(u64, u64), ChunkStoreError> {
        let stat = nix::sys::statvfs::statvfs(&self.root).map_err(|e| io_at(&self.root)(io::Error::from(e)))?;
        let block = stat.fragment_size() as u64;
        Ok((stat.blocks_available() as u64 * block, stat.blocks() as u64 * block))
    }
}

/// Digest of the first `blocks` little-endian block crcs, trailing zero-block crcs dropped.
pub fn digest_of_crcs(crcs: &[u8], blocks: u64) -> u64 {
    let zero = block_crc(&[]).to_le_bytes();
    let mut entries: Vec<&[u8]> = crcs.chunks_exact(4).take(blocks as usize).collect();
    while entries.last().is_some_and(|e| *e == zero) {
        entries.pop();
    }
    let crc = entries.iter().fold(0u32, |acc, e| crc32c::crc32c_append(acc, e));
    ((entries.len() as u64) << 32) | crc as u64
}

/// The data length of a chunk's data file: its length past the crc area.
fn data_length(data_file: &File, path: &Path) -> Result<u64, ChunkStoreError> {
    Ok(data_file.metadata().map_err(io_at(path))?.len().saturating_sub(CRC_AREA))
}

/// Write and rename, no fsync: the file holds either the old or the new content, and keeps
/// it across a crash of this process; a crash of the machine may lose it (see [`WriteSide`]).
fn write_replacing(path: &Path, content: &[u8]) -> Result<(), ChunkStoreError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content).map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))
}

/// Write, fsync, rename, fsync dir: the file holds either the old or the new content.
fn write_durably(path: &Path, content: &[u8]) -> Result<(), ChunkStoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(content).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        (dir, store)
    }

    #[test]
    fn block_span_covers_touched_blocks() {
        assert_eq!(block_span(0, 1), (0, 0));
        assert_eq!(block_span(0, BLOCK_SIZE), (0, 0));
        assert_eq!(block_span(BLOCK_SIZE - 1, 2), (0, 1));
        assert_eq!(block_span(3 * BLOCK_SIZE, 1), (3, 3));
    }

    #[test]
    fn padded_crc_equals_full_zero_block_crc() {
        assert_eq!(block_crc(&[1, 2]), block_crc(&{
            let mut b = vec![0u8; BLOCK_SIZE as usize];
            b[0] = 1;
            b[1] = 2;
            b
        }));
    }

    #[test]
    fn write_read_back_across_blocks_and_holes() {
        let (_dir, store) = store();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        store.write(7, 1, 1, 1, BLOCK_SIZE + 10, &data, true).unwrap();
        let back = store.read(1, 1, BLOCK_SIZE + 10, data.len() as u64).unwrap();
        assert_eq!(back, data);
        let hole = store.read(1, 1, 0, 100).unwrap();
        assert!(hole.iter().all(|b| *b == 0));
        let past_end = store.read(1, 1, BLOCK_SIZE + 10 + 100_000, 10).unwrap();
        assert!(past_end.iter().all(|b| *b == 0));
    }

    #[test]
    fn unaligned_overwrites_keep_the_bytes_around_them() {
        let (_dir, store) = store();
        let mut model = vec![0u8; 0];
        // Each write: (offset, length), some inside one block, some across several, some
        // extending the chunk, some leaving a hole before them.
        let writes = [(0, 10_000), (100, 50), (4000, 200), (8191, 2), (3 * BLOCK_SIZE + 5, 9000), (20_000, 1), (50_000, 10), (0, 4096), (4095, 8194)];
        for (i, (offset, len)) in writes.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|b| (b as usize * 7 + i * 13 + 1) as u8).collect();
            store.write(1, 1, 9, 1, offset, &data, false).unwrap();
            let end = (offset + len) as usize;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[offset as usize..end].copy_from_slice(&data);
            assert_eq!(store.read(9, 1, 0, model.len() as u64).unwrap(), model, "after write {i} ({offset}+{len})");
        }
        assert!(store.scrub_once().unwrap().corrupt_blocks.is_empty());
    }

    #[test]
    fn corrupt_block_is_an_error_never_data() {
        let (dir, store) = store();
        store.write(7, 1, 2, 1, 0, &[5u8; 1000], false).unwrap();
        let path = ChunkStore::data_path(dir.path(), 2);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[6u8], ChunkStore::disk_offset(500)).unwrap();
        assert!(matches!(store.read(2, 1, 0, 10), Err(ChunkStoreError::Corrupt { block: 0, .. })));
    }

    #[test]
    fn repair_rewrites_only_a_corrupt_block() {
        let (dir, store) = store();
        store.write(7, 1, 3, 1, 0, &[5u8; 1000], false).unwrap();
        assert!(!store.repair_block(3, 1, 0, &[6u8; 1000]).unwrap(), "a healthy block is left alone");
        let f = OpenOptions::new().write(true).open(ChunkStore::data_path(dir.path(), 3)).unwrap();
        f.write_all_at(&[0u8], ChunkStore::disk_offset(10)).unwrap();
        assert!(store.repair_block(3, 2, 0, &[5u8; 1000]).is_err(), "a repair of another version is refused");
        assert!(store.repair_block(3, 1, 0, &[5u8; 1000]).unwrap());
        assert_eq!(store.read(3, 1, 0, 1000).unwrap(), vec![5u8; 1000]);
    }

    #[test]
    fn scrub_lists_corrupt_blocks() {
        let (dir, store) = store();
        store.write(7, 1, 10, 1, 0, &[1u8; 200_000], false).unwrap();
        store.write(7, 1, 11, 1, 0, &[2u8; 1000], false).unwrap();
        assert!(store.scrub_once().unwrap().corrupt_blocks.is_empty());
        let f = OpenOptions::new().write(true).open(ChunkStore::data_path(dir.path(), 10)).unwrap();
        f.write_all_at(&[0u8], ChunkStore::disk_offset(2 * BLOCK_SIZE + 5)).unwrap();
        let report = store.scrub_once().unwrap();
        assert_eq!(report, ScrubReport { passes: 2, chunks_checked: 2, corrupt_blocks: vec![(10, 2)] });
    }

    #[test]
    fn older_epoch_is_fenced_even_after_reopen() {
        let (dir, store) = store();
        store.write(9, 3, 4, 1, 0, b"new writer", false).unwrap();
        assert!(matches!(store.write(9, 2, 4, 1, 0, b"old", false), Err(ChunkStoreError::StaleEpoch { epoch: 2, newest: 3, .. })));
        drop(store);
        let store = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        assert!(store.write(9, 2, 4, 1, 0, b"old", false).is_err());
        assert_eq!(store.read(4, 1, 0, 10).unwrap(), b"new writer");
    }

    #[test]
    fn versions_and_epochs_of_writes_survive_a_restart_and_a_sync_makes_them_durable() {
        let (dir, store) = store();
        store.write(9, 4, 40, 2, 0, b"lazy", false).unwrap();
        store.write(9, 4, 41, 1, 0, b"other", false).unwrap();
        {
            let side = store.write_side.lock().unwrap();
            assert!(side.unsynced_versions.contains(&40) && side.unsynced_epochs.contains(&9));
            assert_eq!(side.epoch_writers.get(&40), Some(&9));
        }
        store.sync_chunks(&[40]).unwrap();
        {
            let side = store.write_side.lock().unwrap();
            assert!(!side.unsynced_versions.contains(&40) && side.unsynced_versions.contains(&41));
            assert!(!side.unsynced_epochs.contains(&9), "the epoch went with the first chunk synced");
        }
        // Replaced at once on disk: a restarted server (a crash of the process) still has them.
        drop(store);
        let store = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.version(40).unwrap(), 2);
        assert_eq!(store.version(41).unwrap(), 1);
        assert!(matches!(store.write(9, 3, 41, 1, 0, b"old", false), Err(ChunkStoreError::StaleEpoch { newest: 4, .. })));
        assert_eq!(store.read(41, 1, 0, 5).unwrap(), b"other");
        // A fence of the epoch a write recorded makes it durable before answering.
        store.write(10, 2, 42, 1, 0, b"x", false).unwrap();
        assert!(store.write_side.lock().unwrap().unsynced_epochs.contains(&10));
        store.check_epoch(10, 2).unwrap();
        assert!(!store.write_side.lock().unwrap().unsynced_epochs.contains(&10));
        // A deleted chunk leaves nothing cached behind.
        store.delete(42).unwrap();
        assert_eq!(store.version(42).unwrap(), 0);
        assert_eq!(store.read(42, 0, 0, 1).unwrap(), [0u8]);
    }

    #[test]
    fn stale_version_is_never_served() {
        let (_dir, store) = store();
        store.write(1, 1, 5, 2, 0, b"abc", false).unwrap();
        assert!(matches!(store.read(5, 3, 0, 3), Err(ChunkStoreError::VersionMismatch { local: 2, expected: 3, .. })));
        assert!(store.write(1, 1, 5, 1, 0, b"x", false).is_err());
    }

    #[test]
    fn truncate_zeroes_the_tail() {
        let (_dir, store) = store();
        store.write(1, 1, 6, 1, 0, &[9u8; 70_000], false).unwrap();
        store.truncate(1, 1, 6, 1, 10).unwrap();
        store.write(1, 1, 6, 1, 69_999, &[1u8], false).unwrap();
        let back = store.read(6, 1, 0, 70_000).unwrap();
        assert_eq!(&back[..10], &[9u8; 10]);
        assert!(back[10..69_999].iter().all(|b| *b == 0));
        assert_eq!(back[69_999], 1);
    }

    #[test]
    fn punched_ranges_read_as_zeros_and_crcs_stay_valid() {
        let (dir, store) = store();
        let data = vec![7u8; (16 * BLOCK_SIZE) as usize];
        store.write(1, 1, 12, 1, 0, &data, false).unwrap();
        store.punch_hole(1, 1, 12, 1, 100, 8 * BLOCK_SIZE).unwrap();
        let back = store.read(12, 1, 0, 16 * BLOCK_SIZE).unwrap();
        assert!(back[..100].iter().all(|b| *b == 7));
        assert!(back[100..(100 + 8 * BLOCK_SIZE) as usize].iter().all(|b| *b == 0));
        assert!(back[(100 + 8 * BLOCK_SIZE) as usize..].iter().all(|b| *b == 7));
        assert!(store.scrub_once().unwrap().corrupt_blocks.is_empty());
        // The 7 fully covered blocks are deallocated (9 data blocks and a page of crcs stay).
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(ChunkStore::data_path(dir.path(), 12)).unwrap().blocks() * 512;
        assert!(allocated <= 9 * BLOCK_SIZE + 4096, "{allocated}");
    }

    #[test]
    fn equal_content_gives_equal_digests() {
        let (_dir, store) = store();
        store.write(1, 1, 20, 1, 0, &[3u8; 1000], false).unwrap();
        store.write(1, 1, 21, 1, 0, &[3u8; 1000], false).unwrap();
        store.write(1, 1, 21, 1, 2 * BLOCK_SIZE, &[0u8; 10], false).unwrap(); // zeros past the end
        assert_eq!(store.content_digest(20, 1).unwrap().0, store.content_digest(21, 1).unwrap().0);
        store.write(1, 1, 21, 1, 5, &[4u8], false).unwrap();
        assert_ne!(store.content_digest(20, 1).unwrap().0, store.content_digest(21, 1).unwrap().0);
        assert_eq!(store.content_digest(22, 0).unwrap(), (0, 0));
    }

    #[test]
    fn a_copied_chunk_has_the_same_bytes_and_stays_sparse() {
        let (dir, store) = store();
        store.write(1, 1, 30, 3, 0, &[8u8; 1000], false).unwrap();
        store.write(1, 1, 30, 3, 30 * BLOCK_SIZE, &[9u8; 10], false).unwrap();
        assert!(matches!(store.copy_chunk(2, 1, 30, 2, 31, 1), Err(ChunkStoreError::VersionMismatch { .. })));
        store.copy_chunk(2, 1, 30, 3, 31, 1).unwrap();
        assert_eq!(store.version(31).unwrap(), 1);
        assert_eq!(store.read(31, 1, 0, 31 * BLOCK_SIZE).unwrap(), store.read(30, 3, 0, 31 * BLOCK_SIZE).unwrap());
        assert_eq!(store.content_digest(31, 1).unwrap().0, store.content_digest(30, 3).unwrap().0);
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(ChunkStore::data_path(dir.path(), 31)).unwrap().blocks() * 512;
        // Two data blocks and a page of the crc area, not the 29 blocks between them.
        assert!(allocated <= 2 * BLOCK_SIZE + 4096, "the holes between the blocks stay holes: {allocated}");
        // Writing the copy leaves the original alone.
        store.write(2, 1, 31, 1, 0, b"changed", false).unwrap();
        assert_eq!(store.read(30, 3, 0, 7).unwrap(), [8u8; 7]);
        // The copy is a write of file 2: its fenced writers cannot make one.
        store.check_epoch(2, 5).unwrap();
        assert!(matches!(store.copy_chunk(2, 4, 30, 3, 32, 1), Err(ChunkStoreError::StaleEpoch { .. })));
        assert_eq!(store.version(32).unwrap(), 0);
        // A corrupt block fails the copy rather than spreading.
        let f = OpenOptions::new().write(true).open(ChunkStore::data_path(dir.path(), 30)).unwrap();
        f.write_all_at(&[0u8], ChunkStore::disk_offset(10)).unwrap();
        assert!(matches!(store.copy_chunk(2, 5, 30, 3, 33, 1), Err(ChunkStoreError::Corrupt { .. })));
        assert_eq!(store.version(33).unwrap(), 0);
    }

    #[test]
    fn reads_never_see_a_replica_older_than_the_last_change() {
        let (dir, store) = store();
        store.write(1, 1, 40, 1, 0, &[1u8; 100_000], false).unwrap();
        assert_eq!(store.read(40, 1, 99_990, 10).unwrap(), [1u8; 10]);
        // Every kind of change after a read (which kept the files open) shows at the next read.
        store.write(1, 1, 40, 2, 99_995, &[2u8; 10], false).unwrap();
        assert!(matches!(store.read(40, 1, 0, 1), Err(ChunkStoreError::VersionMismatch { local: 2, .. })));
        assert_eq!(store.read(40, 2, 99_990, 20).unwrap(), [[1u8; 5], [2u8; 5], [2u8; 5], [0u8; 5]].concat());
        store.truncate(1, 1, 40, 2, 10).unwrap();
        assert_eq!(store.read(40, 2, 0, 20).unwrap(), [[1u8; 10], [0u8; 10]].concat());
        store.punch_hole(1, 1, 40, 3, 0, 5).unwrap();
        assert_eq!(store.read(40, 3, 0, 12).unwrap(), [&[0u8; 5][..], &[1u8; 5], &[0u8; 2]].concat());
        store.delete(40).unwrap();
        assert!(matches!(store.read(40, 3, 0, 1), Err(ChunkStoreError::VersionMismatch { local: 0, .. })));
        // A block corrupted on disk under a kept-open file is still caught.
        store.write(1, 1, 41, 1, 0, &[3u8; 3 * BLOCK_SIZE as usize], false).unwrap();
        assert_eq!(store.read(41, 1, 10, 2 * BLOCK_SIZE).unwrap(), vec![3u8; 2 * BLOCK_SIZE as usize]);
        let f = OpenOptions::new().write(true).open(ChunkStore::data_path(dir.path(), 41)).unwrap();
        f.write_all_at(&[4u8], ChunkStore::disk_offset(2 * BLOCK_SIZE + 1)).unwrap();
        assert!(matches!(store.read(41, 1, 10, 2 * BLOCK_SIZE), Err(ChunkStoreError::Corrupt { block: 2, .. })));
        assert_eq!(store.read(41, 1, 0, BLOCK_SIZE).unwrap(), vec![3u8; BLOCK_SIZE as usize], "the other blocks still read");
    }

    #[test]
    fn reads_into_a_reused_buffer_return_the_asked_range() {
        let (_dir, store) = store();
        let data: Vec<u8> = (0..(3 * BLOCK_SIZE as u32 + 100)).map(|i| (i % 253) as u8).collect();
        store.write(1, 1, 50, 1, 0, &data, false).unwrap();
        let mut buf = vec![0xffu8; 8 * BLOCK_SIZE as usize];
        for (offset, len) in [(0u64, 1u64), (BLOCK_SIZE - 1, 2), (5, 3 * BLOCK_SIZE + 95), (3 * BLOCK_SIZE + 50, 200), (100, 0)] {
            let range = store.read_into(50, 1, offset, len, &mut buf).unwrap();
            let expected: Vec<u8> = (offset..offset + len).map(|i| data.get(i as usize).copied().unwrap_or(0)).collect();
            assert_eq!(&buf[range], expected.as_slice(), "{offset}+{len}");
        }
        // More chunks read than reads keep open: all still read right.
        for id in 100..100 + 2 * REPLICAS_KEPT_OPEN_FOR_READS as u64 {
            store.write(1, 1, id, 1, 0, &id.to_le_bytes(), false).unwrap();
            assert_eq!(store.read(id, 1, 0, 8).unwrap(), id.to_le_bytes());
        }
        for id in 100..100 + 2 * REPLICAS_KEPT_OPEN_FOR_READS as u64 {
            assert_eq!(store.read(id, 1, 0, 8).unwrap(), id.to_le_bytes());
        }
        assert!(store.kept_open_for_reads.lock().unwrap().len() <= REPLICAS_KEPT_OPEN_FOR_READS);
    }

    #[test]
    fn crcs_live_at_the_start_of_the_data_file() {
        let (dir, store) = store();
        let data: Vec<u8> = (0..(BLOCK_SIZE + 100) as u32).map(|i| (i % 249) as u8).collect();
        store.write(1, 1, 60, 1, 2 * BLOCK_SIZE, &data, false).unwrap();
        let path = ChunkStore::data_path(dir.path(), 60);
        let disk = fs::read(&path).unwrap();
        assert_eq!(disk.len() as u64, ChunkStore::disk_offset(2 * BLOCK_SIZE) + data.len() as u64);
        assert_eq!(&disk[ChunkStore::disk_offset(2 * BLOCK_SIZE) as usize..], data.as_slice());
        let crc = |block: usize| u32::from_le_bytes(disk[4 * block..4 * block + 4].try_into().unwrap());
        assert_eq!((crc(0), crc(1)), (block_crc(&[]), block_crc(&[])), "the holes before the write");
        assert_eq!(crc(2), block_crc(&data[..BLOCK_SIZE as usize]));
        assert_eq!(crc(3), block_crc(&data[BLOCK_SIZE as usize..]));
        assert!(!dir.path().join("chunks").join(format!("{:016x}.crc", 60)).exists());
        // Cut and extended again: the crcs past the cut are rewritten, not reused.
        store.truncate(1, 1, 60, 1, BLOCK_SIZE + 10).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), ChunkStore::disk_offset(BLOCK_SIZE + 10));
        store.write(1, 1, 60, 1, 3 * BLOCK_SIZE + 5, b"x", true).unwrap();
        let back = store.read(60, 1, 0, 4 * BLOCK_SIZE).unwrap();
        assert!(back[..(3 * BLOCK_SIZE + 5) as usize].iter().all(|b| *b == 0));
        assert_eq!(back[(3 * BLOCK_SIZE + 5) as usize], b'x');
        assert!(store.scrub_once().unwrap().corrupt_blocks.is_empty());
    }

    #[test]
    fn a_chunk_size_past_what_the_crc_area_covers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(MAX_CHUNK_SIZE, 1 << 30);
        assert!(ChunkStore::open(dir.path(), MAX_CHUNK_SIZE).is_ok());
        assert!(matches!(ChunkStore::open(dir.path(), MAX_CHUNK_SIZE + BLOCK_SIZE), Err(ChunkStoreError::ChunkSizeTooLarge { .. })));
    }

    #[test]
    fn out_of_range_changes_nothing() {
        let (_dir, store) = store();
        assert!(matches!(store.write(1, 1, 8, 1, store.chunk_size() - 1, b"ab", false), Err(ChunkStoreError::OutOfRange { .. })));
        assert_eq!(store.version(8).unwrap(), 0);
    }
}

//! Chunks as local files on a chunk server, with a crc32c per block verified on every read.
//!
//! Layout under the data directory:
//! - `chunks/<chunk_id>.data`: the chunk's bytes (sparse; bytes past the end read as zeros);
//! - `chunks/<chunk_id>.crc`: one little-endian u32 crc32c per [`BLOCK_SIZE`] block of data,
//!   computed over the block padded with zeros to the full block size;
//! - `chunks/<chunk_id>.version`: the chunk version (decimal), the newest this replica holds;
//! - `epochs/<file_id>`: the newest write-lease epoch seen for that file (fencing).
//!
//! Pure block arithmetic lives in [`block_span`] and [`block_crc`]; the rest is thin file I/O.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Size of a checksummed block.
pub const BLOCK_SIZE: u64 = 64 * 1024;

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
    chunk_locks: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Newest epoch per file, cached from `epochs/`.
    epochs: Mutex<HashMap<u64, u64>>,
}

impl ChunkStore {
    pub fn open(root: &Path, chunk_size: u64) -> Result<ChunkStore, ChunkStoreError> {
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
        Ok(ChunkStore { scrub: Mutex::new(ScrubReport::default()), root: root.to_path_buf(), chunk_size, chunk_locks: Mutex::new(HashMap::new()), epochs: Mutex::new(epochs) })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn path(&self, chunk_id: u64, ext: &str) -> PathBuf {
        self.root.join("chunks").join(format!("{chunk_id:016x}.{ext}"))
    }

    fn lock_chunk(&self, chunk_id: u64) -> Arc<Mutex<()>> {
        self.chunk_locks.lock().expect("chunk lock table").entry(chunk_id).or_default().clone()
    }

    /// Records `epoch` for `file_id` if it is the newest, durably; refuses an older one.
    pub fn check_epoch(&self, file_id: u64, epoch: u64) -> Result<(), ChunkStoreError> {
        let mut epochs = self.epochs.lock().expect("epoch table");
        let newest = epochs.get(&file_id).copied().unwrap_or(0);
        if epoch < newest {
            return Err(ChunkStoreError::StaleEpoch { file_id, epoch, newest });
        }
        if epoch > newest {
            // Durable before any write under this epoch is acknowledged: after a restart the
            // server must still refuse the fenced writer.
            let path = self.root.join("epochs").join(format!("{file_id:016x}"));
            write_durably(&path, epoch.to_string().as_bytes())?;
            epochs.insert(file_id, epoch);
        }
        Ok(())
    }

    pub fn version(&self, chunk_id: u64) -> Result<u64, ChunkStoreError> {
        let path = self.path(chunk_id, "version");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_at(&path)(e)),
        }
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
        self.check_epoch(file_id, epoch)?;
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if version < local {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        let crc_path = self.path(chunk_id, "crc");
        let data_file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&data_path).map_err(io_at(&data_path))?;
        let crc_file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&crc_path).map_err(io_at(&crc_path))?;
        if !data.is_empty() {
            let old_len = data_file.metadata().map_err(io_at(&data_path))?.len();
            let (first, last) = block_span(offset, data.len() as u64);
            // Blocks between the old end and the write are holes: give them the zero crc.
            let old_blocks = old_len.div_ceil(BLOCK_SIZE);
            let zero_crc = block_crc(&[]);
            for block in old_blocks..first {
                crc_file.write_all_at(&zero_crc.to_le_bytes(), block * 4).map_err(io_at(&crc_path))?;
            }
            for block in first..=last {
                let block_start = block * BLOCK_SIZE;
                let mut buf = self.read_block(chunk_id, &data_file, &crc_file, block, old_len)?;
                let new_end = (offset + data.len() as u64).min(block_start + BLOCK_SIZE);
                let copy_from = offset.max(block_start);
                if buf.len() < (new_end - block_start) as usize {
                    buf.resize((new_end - block_start) as usize, 0);
                }
                let src = &data[(copy_from - offset) as usize..(new_end - offset) as usize];
                buf[(copy_from - block_start) as usize..(new_end - block_start) as usize].copy_from_slice(src);
                data_file.write_all_at(&buf, block_start).map_err(io_at(&data_path))?;
                crc_file.write_all_at(&block_crc(&buf).to_le_bytes(), block * 4).map_err(io_at(&crc_path))?;
            }
        }
        if version > local {
            write_durably(&self.path(chunk_id, "version"), version.to_string().as_bytes())?;
        }
        if sync {
            data_file.sync_data().map_err(io_at(&data_path))?;
            crc_file.sync_data().map_err(io_at(&crc_path))?;
        }
        Ok(())
    }

    /// The bytes of `block` that exist on disk (up to `file_len`), verified against its crc.
    fn read_block(&self, chunk_id: u64, data_file: &File, crc_file: &File, block: u64, file_len: u64) -> Result<Vec<u8>, ChunkStoreError> {
        let block_start = block * BLOCK_SIZE;
        if block_start >= file_len {
            return Ok(Vec::new());
        }
        let len = (file_len - block_start).min(BLOCK_SIZE) as usize;
        let mut buf = vec![0u8; len];
        data_file.read_exact_at(&mut buf, block_start).map_err(io_at(&self.path(chunk_id, "data")))?;
        let mut stored = [0u8; 4];
        crc_file.read_exact_at(&mut stored, block * 4).map_err(io_at(&self.path(chunk_id, "crc")))?;
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
        self.check_range(chunk_id, offset, len)?;
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if local != expected_version {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: expected_version });
        }
        let mut out = vec![0u8; len as usize];
        if len == 0 {
            return Ok(out);
        }
        let data_path = self.path(chunk_id, "data");
        let data_file = match File::open(&data_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_at(&data_path)(e)),
        };
        let crc_path = self.path(chunk_id, "crc");
        let crc_file = File::open(&crc_path).map_err(io_at(&crc_path))?;
        let file_len = data_file.metadata().map_err(io_at(&data_path))?.len();
        let (first, last) = block_span(offset, len);
        for block in first..=last {
            let buf = self.read_block(chunk_id, &data_file, &crc_file, block, file_len)?;
            let block_start = block * BLOCK_SIZE;
            let from = offset.max(block_start);
            let to = (offset + len).min(block_start + buf.len() as u64);
            if to > from {
                out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(&buf[(from - block_start) as usize..(to - block_start) as usize]);
            }
        }
        Ok(out)
    }

    /// Zeroes `len` bytes at `offset` (they read as zeros afterwards); whole blocks are
    /// deallocated on disk, so a punched file stays sparse.
    #[allow(clippy::too_many_arguments)]
    pub fn punch_hole(&self, file_id: u64, epoch: u64, chunk_id: u64, version: u64, offset: u64, len: u64) -> Result<(), ChunkStoreError> {
        self.check_range(chunk_id, offset, len)?;
        self.check_epoch(file_id, epoch)?;
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if version < local {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        let crc_path = self.path(chunk_id, "crc");
        if let Ok(data_file) = OpenOptions::new().read(true).write(true).open(&data_path) {
            let crc_file = OpenOptions::new().read(true).write(true).open(&crc_path).map_err(io_at(&crc_path))?;
            let file_len = data_file.metadata().map_err(io_at(&data_path))?.len();
            // Past the end everything reads as zeros already.
            let end = (offset + len).min(file_len);
            if end > offset {
                let (first, last) = block_span(offset, end - offset);
                for block in first..=last {
                    let block_start = block * BLOCK_SIZE;
                    let block_end = (block_start + BLOCK_SIZE).min(file_len);
                    let mut buf = self.read_block(chunk_id, &data_file, &crc_file, block, file_len)?;
                    let (from, to) = (offset.max(block_start), end.min(block_end));
                    buf[(from - block_start) as usize..(to - block_start) as usize].fill(0);
                    if from == block_start && to == block_end {
                        let mode = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
                        use std::os::fd::AsRawFd;
                        nix::fcntl::fallocate(data_file.as_raw_fd(), mode, block_start as i64, (block_end - block_start) as i64)
                            .map_err(|e| io_at(&data_path)(io::Error::from(e)))?;
                    } else {
                        data_file.write_all_at(&buf, block_start).map_err(io_at(&data_path))?;
                    }
                    crc_file.write_all_at(&block_crc(&buf).to_le_bytes(), block * 4).map_err(io_at(&crc_path))?;
                }
            }
        }
        if version > local {
            write_durably(&self.path(chunk_id, "version"), version.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Cuts the chunk to `len` bytes (the tail reads as zeros afterwards).
    pub fn truncate(&self, file_id: u64, epoch: u64, chunk_id: u64, version: u64, len: u64) -> Result<(), ChunkStoreError> {
        self.check_range(chunk_id, len, 0)?;
        self.check_epoch(file_id, epoch)?;
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        let local = self.version(chunk_id)?;
        if version < local {
            return Err(ChunkStoreError::VersionMismatch { chunk_id, local, expected: version });
        }
        let data_path = self.path(chunk_id, "data");
        let crc_path = self.path(chunk_id, "crc");
        if let Ok(data_file) = OpenOptions::new().read(true).write(true).open(&data_path) {
            let crc_file = OpenOptions::new().read(true).write(true).open(&crc_path).map_err(io_at(&crc_path))?;
            let file_len = data_file.metadata().map_err(io_at(&data_path))?.len();
            if len < file_len {
                let last_block = len / BLOCK_SIZE;
                let mut buf = self.read_block(chunk_id, &data_file, &crc_file, last_block, file_len)?;
                buf.truncate((len - last_block * BLOCK_SIZE) as usize);
                data_file.set_len(len).map_err(io_at(&data_path))?;
                crc_file.set_len(len.div_ceil(BLOCK_SIZE) * 4).map_err(io_at(&crc_path))?;
                if !buf.is_empty() {
                    crc_file.write_all_at(&block_crc(&buf).to_le_bytes(), last_block * 4).map_err(io_at(&crc_path))?;
                }
                data_file.sync_data().map_err(io_at(&data_path))?;
                crc_file.sync_data().map_err(io_at(&crc_path))?;
            }
        }
        if version > local {
            write_durably(&self.path(chunk_id, "version"), version.to_string().as_bytes())?;
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
        let (to_data_path, to_crc_path) = (self.path(to, "data"), self.path(to, "crc"));
        let to_data = File::create(&to_data_path).map_err(io_at(&to_data_path))?;
        let mut crcs = Vec::new();
        let from_data_path = self.path(from, "data");
        match File::open(&from_data_path) {
            Ok(from_data) => {
                let from_crc_path = self.path(from, "crc");
                let from_crc = File::open(&from_crc_path).map_err(io_at(&from_crc_path))?;
                let file_len = from_data.metadata().map_err(io_at(&from_data_path))?.len();
                for block in 0..file_len.div_ceil(BLOCK_SIZE) {
                    let buf = self.read_block(from, &from_data, &from_crc, block, file_len)?;
                    if buf.iter().any(|b| *b != 0) {
                        to_data.write_all_at(&buf, block * BLOCK_SIZE).map_err(io_at(&to_data_path))?;
                    }
                    crcs.extend_from_slice(&block_crc(&buf).to_le_bytes());
                }
                to_data.set_len(file_len).map_err(io_at(&to_data_path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&from_data_path)(e)),
        }
        let mut to_crc = File::create(&to_crc_path).map_err(io_at(&to_crc_path))?;
        to_crc.write_all(&crcs).map_err(io_at(&to_crc_path))?;
        to_data.sync_data().map_err(io_at(&to_data_path))?;
        to_crc.sync_data().map_err(io_at(&to_crc_path))?;
        write_durably(&self.path(to, "version"), version.to_string().as_bytes())
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
        let crc_path = self.path(chunk_id, "crc");
        let Ok(data_file) = OpenOptions::new().read(true).write(true).open(&data_path) else { return Ok(false) };
        let crc_file = OpenOptions::new().read(true).write(true).open(&crc_path).map_err(io_at(&crc_path))?;
        let file_len = data_file.metadata().map_err(io_at(&data_path))?.len();
        match self.read_block(chunk_id, &data_file, &crc_file, block, file_len) {
            Ok(_) => return Ok(false),
            Err(ChunkStoreError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        data_file.write_all_at(data, block_start).map_err(io_at(&data_path))?;
        crc_file.write_all_at(&block_crc(data).to_le_bytes(), block * 4).map_err(io_at(&crc_path))?;
        data_file.sync_data().map_err(io_at(&data_path))?;
        crc_file.sync_data().map_err(io_at(&crc_path))?;
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
            let crc_path = self.path(chunk_id, "crc");
            // Deleted meanwhile: nothing to check.
            let (Ok(data_file), Ok(crc_file)) = (File::open(&data_path), File::open(&crc_path)) else { continue };
            let file_len = data_file.metadata().map_err(io_at(&data_path))?.len();
            for block in 0..file_len.div_ceil(BLOCK_SIZE) {
                match self.read_block(chunk_id, &data_file, &crc_file, block, file_len) {
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
        let data_len = match fs::metadata(self.path(chunk_id, "data")) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_at(&self.path(chunk_id, "data"))(e)),
        };
        let crc_path = self.path(chunk_id, "crc");
        let crcs = match fs::read(&crc_path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_at(&crc_path)(e)),
        };
        Ok((digest_of_crcs(&crcs, data_len.div_ceil(BLOCK_SIZE)), data_len))
    }

    /// fdatasync of the chunk's data and crcs.
    pub fn sync(&self, chunk_id: u64) -> Result<(), ChunkStoreError> {
        for ext in ["data", "crc"] {
            let path = self.path(chunk_id, ext);
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(io_at(&path))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        Ok(())
    }

    /// Removes the replica (the file was deleted).
    pub fn delete(&self, chunk_id: u64) -> Result<(), ChunkStoreError> {
        let lock = self.lock_chunk(chunk_id);
        let _guard = lock.lock().expect("chunk lock");
        for ext in ["data", "crc", "version"] {
            let path = self.path(chunk_id, ext);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        self.chunk_locks.lock().expect("chunk lock table").remove(&chunk_id);
        Ok(())
    }

    /// Path of a chunk's data file (operators and tests inspect replicas with it).
    pub fn data_path(root: &Path, chunk_id: u64) -> PathBuf {
        root.join("chunks").join(format!("{chunk_id:016x}.data"))
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
        let store = ChunkStore::open(dir.path(), 4 * BLOCK_SIZE).unwrap();
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
        let past_end = store.read(1, 1, 3 * BLOCK_SIZE, 10).unwrap();
        assert!(past_end.iter().all(|b| *b == 0));
    }

    #[test]
    fn corrupt_block_is_an_error_never_data() {
        let (dir, store) = store();
        store.write(7, 1, 2, 1, 0, &[5u8; 1000], false).unwrap();
        let path = ChunkStore::data_path(dir.path(), 2);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[6u8], 500).unwrap();
        assert!(matches!(store.read(2, 1, 0, 10), Err(ChunkStoreError::Corrupt { block: 0, .. })));
    }

    #[test]
    fn repair_rewrites_only_a_corrupt_block() {
        let (dir, store) = store();
        store.write(7, 1, 3, 1, 0, &[5u8; 1000], false).unwrap();
        assert!(!store.repair_block(3, 1, 0, &[6u8; 1000]).unwrap(), "a healthy block is left alone");
        let f = OpenOptions::new().write(true).open(ChunkStore::data_path(dir.path(), 3)).unwrap();
        f.write_all_at(&[0u8], 10).unwrap();
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
        f.write_all_at(&[0u8], 2 * BLOCK_SIZE + 5).unwrap();
        let report = store.scrub_once().unwrap();
        assert_eq!(report, ScrubReport { passes: 2, chunks_checked: 2, corrupt_blocks: vec![(10, 2)] });
    }

    #[test]
    fn older_epoch_is_fenced_even_after_reopen() {
        let (dir, store) = store();
        store.write(9, 3, 4, 1, 0, b"new writer", false).unwrap();
        assert!(matches!(store.write(9, 2, 4, 1, 0, b"old", false), Err(ChunkStoreError::StaleEpoch { epoch: 2, newest: 3, .. })));
        drop(store);
        let store = ChunkStore::open(dir.path(), 4 * BLOCK_SIZE).unwrap();
        assert!(store.write(9, 2, 4, 1, 0, b"old", false).is_err());
        assert_eq!(store.read(4, 1, 0, 10).unwrap(), b"new writer");
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
        let data = vec![7u8; (3 * BLOCK_SIZE) as usize];
        store.write(1, 1, 12, 1, 0, &data, false).unwrap();
        store.punch_hole(1, 1, 12, 1, 100, 2 * BLOCK_SIZE).unwrap();
        let back = store.read(12, 1, 0, 3 * BLOCK_SIZE).unwrap();
        assert!(back[..100].iter().all(|b| *b == 7));
        assert!(back[100..(100 + 2 * BLOCK_SIZE) as usize].iter().all(|b| *b == 0));
        assert!(back[(100 + 2 * BLOCK_SIZE) as usize..].iter().all(|b| *b == 7));
        assert!(store.scrub_once().unwrap().corrupt_blocks.is_empty());
        // The fully covered block is deallocated.
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(ChunkStore::data_path(dir.path(), 12)).unwrap().blocks() * 512;
        assert!(allocated < 3 * BLOCK_SIZE, "{allocated}");
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
        store.write(1, 1, 30, 3, 3 * BLOCK_SIZE, &[9u8; 10], false).unwrap();
        assert!(matches!(store.copy_chunk(2, 1, 30, 2, 31, 1), Err(ChunkStoreError::VersionMismatch { .. })));
        store.copy_chunk(2, 1, 30, 3, 31, 1).unwrap();
        assert_eq!(store.version(31).unwrap(), 1);
        assert_eq!(store.read(31, 1, 0, 4 * BLOCK_SIZE).unwrap(), store.read(30, 3, 0, 4 * BLOCK_SIZE).unwrap());
        assert_eq!(store.content_digest(31, 1).unwrap().0, store.content_digest(30, 3).unwrap().0);
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(ChunkStore::data_path(dir.path(), 31)).unwrap().blocks() * 512;
        assert!(allocated <= 2 * BLOCK_SIZE, "the holes between the blocks stay holes: {allocated}");
        // Writing the copy leaves the original alone.
        store.write(2, 1, 31, 1, 0, b"changed", false).unwrap();
        assert_eq!(store.read(30, 3, 0, 7).unwrap(), [8u8; 7]);
        // The copy is a write of file 2: its fenced writers cannot make one.
        store.check_epoch(2, 5).unwrap();
        assert!(matches!(store.copy_chunk(2, 4, 30, 3, 32, 1), Err(ChunkStoreError::StaleEpoch { .. })));
        assert_eq!(store.version(32).unwrap(), 0);
        // A corrupt block fails the copy rather than spreading.
        let f = OpenOptions::new().write(true).open(ChunkStore::data_path(dir.path(), 30)).unwrap();
        f.write_all_at(&[0u8], 10).unwrap();
        assert!(matches!(store.copy_chunk(2, 5, 30, 3, 33, 1), Err(ChunkStoreError::Corrupt { .. })));
        assert_eq!(store.version(33).unwrap(), 0);
    }

    #[test]
    fn out_of_range_changes_nothing() {
        let (_dir, store) = store();
        assert!(matches!(store.write(1, 1, 8, 1, 4 * BLOCK_SIZE - 1, b"ab", false), Err(ChunkStoreError::OutOfRange { .. })));
        assert_eq!(store.version(8).unwrap(), 0);
    }
}

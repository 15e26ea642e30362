//! The replicated data path: a file is a sequence of chunks, each chunk replicated on several
//! chunk servers. Writes go to every current replica in parallel and are acknowledged only when
//! all answered, or, if some failed, after those are marked stale in the chunk map and at least
//! `min_copies` hold the data. Reads go to one current replica (version checked by the server,
//! every block's crc verified) and move to the next one on any failure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::chunk_client::{ChunkClient, ChunkClientError};
use crate::chunk_protocol::{ChunkFailure, ChunkRequest, ChunkResponse};
use crate::chunk_store::BLOCK_SIZE;
use crate::healer;
use crate::namespace::{ChunkInfo, HeldLease, Namespace, NamespaceError, Replica};
use crate::placement::place_replicas;
use crate::servers::ServerStates;

/// Default chunk size: 64 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
const MAX_CONFLICT_RETRIES: usize = 16;
/// Each registered server, with its free space or why it did not answer.
type PlacementAnswers = Vec<(String, Result<u64, String>)>;

/// How long the servers' answers to `Capacity` serve new chunks' placement before they are
/// asked again (sooner after a write to a new chunk failed somewhere, or found no room).
const PLACEMENT_ANSWERS_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("file {ino}: chunk server {server} refused the write because a newer writer holds the file's lease (this writer had epoch {epoch})")]
    Fenced { ino: u64, epoch: u64, server: String },
    #[error("file {ino} chunk {index}: only {reached} of the required {min_copies} copies were written ({failures}); the write is not acknowledged")]
    TooFewCopies { ino: u64, index: u64, reached: usize, min_copies: usize, failures: String },
    #[error("file {ino} chunk {index}: no current replica could be read ({failures})")]
    NoReadableReplica { ino: u64, index: u64, failures: String },
    #[error("no chunk server is registered: start `fs-agent chunkserver --meta ...` on the storage nodes")]
    NoServers,
    #[error("file {ino} chunk {index}: only {usable:?} of the chunk servers answer with free space, fewer than the {min_copies} copies a write needs; free space or add servers{unanswered}")]
    NoSpace { ino: u64, index: u64, usable: Vec<String>, min_copies: usize, unanswered: String },
}

impl DataError {
    pub fn errno(&self) -> i32 {
        match self {
            DataError::Namespace(e) => e.errno(),
            DataError::TooFewCopies { failures, .. } if failures.contains("NoSpace") => libc::ENOSPC,
            DataError::NoServers | DataError::NoSpace { .. } => libc::ENOSPC,
            DataError::Fenced { .. } | DataError::TooFewCopies { .. } | DataError::NoReadableReplica { .. } => libc::EIO,
        }
    }
}

/// What one heal pass over a file did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HealOutcome {
    /// New replicas copied.
    pub copied: u64,
    /// Chunks still short of copies (not enough servers up).
    pub still_under_replicated: u64,
    /// Chunks with no current replica to copy from.
    pub unavailable: u64,
    /// Bytes copied to new replicas.
    pub bytes_copied: u64,
}

pub struct FileData {
    namespace: Arc<Namespace>,
    chunks: ChunkClient,
    chunk_size: u64,
    min_copies: usize,
    /// Chunk records of files this client holds the write lease of: while it holds the lease
    /// nobody else changes them, so the cache is authoritative. Readers without the lease
    /// always ask the store, so they never use a replica that became stale.
    leased_chunks: Mutex<HashMap<(u64, u64), (ChunkInfo, u64)>>,
    /// This node's own chunk server: read first when it holds a current replica.
    local_server: Option<String>,
    /// The servers new chunks may go to, with their free space or why they did not answer,
    /// and when they were asked ([`PLACEMENT_ANSWERS_TTL`]).
    placement_answers: Mutex<Option<(Instant, PlacementAnswers)>>,
    /// The servers marked draining, and when that was looked up ([`FileData::draining`]).
    draining: Mutex<Option<(Instant, BTreeSet<String>)>>,
    /// Files this client created and holds the lease of since: they have no chunk records
    /// but those in `leased_chunks`, so allocating one needs no look in the store first.
    new_files: Mutex<std::collections::HashSet<u64>>,
    /// Chunks `(ino, index)` just allocated from answers kept from earlier: if their first
    /// write reaches too few servers (some went away meanwhile), they are placed again.
    placed_from_old_answers: Mutex<std::collections::HashSet<(u64, u64)>>,
}

/// What a write finds for a chunk of its file ([`FileData::chunk_for_write`]).
enum ChunkForWrite {
    /// The file's own chunk, recorded at this revision.
    Recorded(ChunkInfo, u64),
    /// A new chunk placed for a hole, not recorded yet: the servers take its first write
    /// while [`FileData::record_new_chunk`] records it.
    Placed { chunk: ChunkInfo, from_kept_answers: bool },
}

/// Result of sending one request to several replicas.
struct Fanout {
    succeeded: Vec<String>,
    failures: Vec<(String, ChunkClientError)>,
}

impl Fanout {
    fn fenced_by(&self) -> Option<&str> {
        self.failures.iter().find_map(|(s, e)| matches!(e, ChunkClientError::Refused { failure: ChunkFailure::StaleEpoch(_), .. }).then_some(s.as_str()))
    }

    fn describe_failures(&self) -> String {
        self.failures.iter().map(|(s, e)| format!("{s}: {e}")).collect::<Vec<_>>().join("; ")
    }
}

impl FileData {
    pub fn new(namespace: Arc<Namespace>, chunk_size: u64, min_copies: usize) -> FileData {
        FileData {
            namespace,
            chunks: ChunkClient::new(),
            chunk_size,
            min_copies: min_copies.max(1),
            leased_chunks: Mutex::new(HashMap::new()),
            local_server: None,
            placement_answers: Mutex::new(None),
            draining: Mutex::new(None),
            new_files: Mutex::new(Default::default()),
            placed_from_old_answers: Mutex::new(Default::default()),
        }
    }

    /// Talk to the chunk servers through `chunks` (mutual TLS when it has TLS material).
    pub fn with_chunk_client(mut self, chunks: ChunkClient) -> FileData {
        self.chunks = chunks;
        self
    }

    pub fn chunk_client(&self) -> &ChunkClient {
        &self.chunks
    }

    /// Reads prefer `server` (this node's chunk server) when it holds a current replica.
    pub fn with_local_server(mut self, server: Option<String>) -> FileData {
        self.local_server = server;
        self
    }

    /// Current replicas in read order: the local one first.
    fn read_order(&self, chunk: &ChunkInfo) -> Vec<String> {
        let mut servers = chunk.current_servers();
        if let Some(local) = &self.local_server {
            if let Some(i) = servers.iter().position(|s| s == local) {
                let mine = servers.remove(i);
                servers.insert(0, mine);
            }
        }
        servers
    }

    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.namespace
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Sends `request` to every server of `servers` at once and collects who did it.
    fn fanout(&self, servers: &[String], request: &ChunkRequest) -> Fanout {
        self.fanout_while(servers, request, || ()).0
    }

    /// [`FileData::fanout`], running `during` while the servers work on the request.
    fn fanout_while<R>(&self, servers: &[String], request: &ChunkRequest, during: impl FnOnce() -> R) -> (Fanout, R) {
        let calls: Vec<(&str, &ChunkRequest)> = servers.iter().map(|s| (s.as_str(), request)).collect();
        let (answers, during) = self.chunks.call_all_while(&calls, during);
        let results = servers.iter().cloned().zip(answers);
        let mut fanout = Fanout { succeeded: vec![], failures: vec![] };
        for (server, result) in results {
            match result {
                Ok(_) => fanout.succeeded.push(server),
                Err(e) => {
                    tracing::warn!(%server, "replica failed: {e}");
                    if e.is_unavailable() {
                        self.chunks.forget(&server);
                    }
                    fanout.failures.push((server, e));
                }
            }
        }
        (fanout, during)
    }

    /// The record of chunk `index` of the leased file, for changing it: a chunk shared with
    /// clones is copied first (copy-on-write), so the record returned is this file's alone.
    /// A hole gets a new chunk with `allocate` copies, or is `None` without `allocate`.
    fn exclusive_chunk(&self, lease: &HeldLease, index: u64) -> Result<Option<(ChunkInfo, u64)>, DataError> {
        match self.chunk_for_write(lease, index, None)? {
            Some(ChunkForWrite::Recorded(chunk, revision)) => Ok(Some((chunk, revision))),
            _ => Ok(None),
        }
    }

    /// [`FileData::exclusive_chunk`], placing a new chunk for a hole with `allocate` copies:
    /// that one is not recorded yet (see [`ChunkForWrite::Placed`]).
    fn chunk_for_write(&self, lease: &HeldLease, index: u64, allocate: Option<u32>) -> Result<Option<ChunkForWrite>, DataError> {
        // The cache holds exclusive records only. One stays exclusive while we hold the lease:
        // only a clone of this file could share it, and a clone needs the lease.
        if let Some((chunk, revision)) = self.leased_chunks.lock().expect("chunk cache").get(&(lease.ino, index)) {
            return Ok(Some(ChunkForWrite::Recorded(chunk.clone(), *revision)));
        }
        for _ in 0..MAX_CONFLICT_RETRIES {
            let known_absent = self.new_files.lock().expect("new files").contains(&lease.ino);
            let record = if known_absent { None } else { self.namespace.chunk(lease.ino, index)? };
            let found = match record {
                Some((chunk, revision)) => {
                    if self.namespace.shared_chunk(chunk.chunk_id)?.is_none() {
                        (chunk, revision)
                    } else {
                        match self.copy_on_write(lease, index, &chunk, revision)? {
                            Some(copied) => copied,
                            None => continue,
                        }
                    }
                }
                None => {
                    let Some(copies) = allocate else { return Ok(None) };
                    let chunk_id: u64 = rand::random();
                    let answers_were_kept = self.placement_answers.lock().expect("placement answers").as_ref().is_some_and(|(asked, _)| asked.elapsed() < PLACEMENT_ANSWERS_TTL);
                    let (mut candidates, mut unanswered) = self.placement_candidates(copies)?;
                    if place_replicas(&candidates, copies as usize, chunk_id).len() < self.min_copies {
                        // The answers may be old: ask the servers again before giving up.
                        self.forget_placement_answers();
                        (candidates, unanswered) = self.placement_candidates(copies)?;
                    }
                    let placed = place_replicas(&candidates, copies as usize, chunk_id);
                    if placed.len() < self.min_copies {
                        let unanswered = if unanswered.is_empty() { String::new() } else { format!(" (not answering: {})", unanswered.join("; ")) };
                        return Err(DataError::NoSpace { ino: lease.ino, index, usable: placed, min_copies: self.min_copies, unanswered });
                    }
                    self.reserve_chunk_on(&placed);
                    let chunk = ChunkInfo { chunk_id, version: 1, replicas: placed.into_iter().map(|server| Replica { server, version: 1 }).collect() };
                    return Ok(Some(ChunkForWrite::Placed { chunk, from_kept_answers: answers_were_kept }));
                }
            };
            self.leased_chunks.lock().expect("chunk cache").insert((lease.ino, index), found.clone());
            return Ok(Some(ChunkForWrite::Recorded(found.0, found.1)));
        }
        Err(NamespaceError::Contended { what: format!("chunk {index} of inode {}", lease.ino) }.into())
    }

    /// Records the chunk placed for `index` (see [`ChunkForWrite::Placed`]): its revision, or
    /// `None` if another thread of this client recorded one first (or a clone put chunks into
    /// this new file, or one of its servers is draining now); the caller then looks again,
    /// in the store from now on, and places again if it is still a hole.
    fn record_new_chunk(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, from_kept_answers: bool, size: Option<u64>) -> Result<Option<u64>, DataError> {
        match self.put_new_chunk(lease, index, chunk, 0, size)? {
            Some(revision) => {
                if from_kept_answers {
                    self.placed_from_old_answers.lock().expect("placed chunks").insert((lease.ino, index));
                }
                self.leased_chunks.lock().expect("chunk cache").insert((lease.ino, index), (chunk.clone(), revision));
                Ok(Some(revision))
            }
            None => {
                self.new_files.lock().expect("new files").remove(&lease.ino);
                Ok(None)
            }
        }
    }

    /// Gives chunk `index` of the leased file its own copy of the shared `chunk`: each current
    /// replica server copies it locally to a new chunk id (under this file's epoch, so a fenced
    /// writer cannot), then the record moves to the copy and the shared chunk loses this
    /// reference, conditioned on the lease and the record. `None`: the record or the sharing
    /// changed meanwhile; the copy is deleted and the caller looks again.
    fn copy_on_write(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, revision: u64) -> Result<Option<(ChunkInfo, u64)>, DataError> {
        let servers = chunk.current_servers();
        if servers.is_empty() {
            return Err(DataError::NoReadableReplica { ino: lease.ino, index, failures: "no current replica to copy the shared chunk from".into() });
        }
        let copy_id: u64 = rand::random();
        let request = ChunkRequest::CopyChunk { file_id: lease.ino, epoch: lease.epoch, from_chunk_id: chunk.chunk_id, from_version: chunk.version, to_chunk_id: copy_id, version: 1 };
        let fanout = self.fanout(&servers, &request);
        let copy = ChunkInfo { chunk_id: copy_id, version: 1, replicas: fanout.succeeded.iter().map(|server| Replica { server: server.clone(), version: 1 }).collect() };
        let discard = |copy: &ChunkInfo| self.delete_replicas(std::slice::from_ref(copy));
        if let Some(server) = fanout.fenced_by() {
            discard(&copy);
            self.forget_file(lease.ino);
            return Err(DataError::Fenced { ino: lease.ino, epoch: lease.epoch, server: server.to_string() });
        }
        if fanout.succeeded.len() < self.min_copies {
            discard(&copy);
            // A heal or a stale-marking of the shared chunk meanwhile moves its version on.
            if self.namespace.chunk(lease.ino, index)?.is_some_and(|(_, now)| now != revision) {
                return Ok(None);
            }
            return Err(DataError::TooFewCopies { ino: lease.ino, index, reached: fanout.succeeded.len(), min_copies: self.min_copies, failures: fanout.describe_failures() });
        }
        match self.namespace.unshare_chunk(lease, index, &copy, revision, chunk.chunk_id)? {
            Some(new_revision) => {
                tracing::debug!(ino = lease.ino, index, from = chunk.chunk_id, to = copy_id, "copied a shared chunk before writing it");
                Ok(Some((copy, new_revision)))
            }
            None => {
                discard(&copy);
                Ok(None)
            }
        }
    }

    /// Servers a new chunk may go to: those that answer and have room for a whole chunk; if
    /// that is fewer than `copies`, those that answer at all (their writes may then fail
    /// with ENOSPC, which marks them stale). Draining servers get no new chunks. Also returns
    /// why the others did not answer.
    fn placement_candidates(&self, copies: u32) -> Result<(Vec<String>, Vec<String>), DataError> {
        // Draining servers as looked up with the answers: a server drained since is caught
        // by the condition of the new chunk's commit (see `put_new_chunk`).
        let draining = self.draining()?;
        let answers: PlacementAnswers = self.placement_answers()?.into_iter().filter(|(s, _)| !draining.contains(s)).collect();
        if answers.is_empty() {
            return Err(DataError::NoServers);
        }
        let unanswered: Vec<String> = answers.iter().filter_map(|(_, free)| free.as_ref().err().cloned()).collect();
        let with_room: Vec<String> = answers.iter().filter(|(_, free)| free.as_ref().is_ok_and(|f| *f >= self.chunk_size)).map(|(s, _)| s.clone()).collect();
        if with_room.len() >= copies as usize {
            return Ok((with_room, unanswered));
        }
        Ok((answers.into_iter().filter(|(_, free)| free.is_ok()).map(|(s, _)| s).collect(), unanswered))
    }

    /// The registered servers, with their free space or why they did not answer: asked at most
    /// every [`PLACEMENT_ANSWERS_TTL`], so allocating a chunk does not cost a round trip to
    /// every server.
    fn placement_answers(&self) -> Result<PlacementAnswers, DataError> {
        if let Some((asked, answers)) = &*self.placement_answers.lock().expect("placement answers") {
            if asked.elapsed() < PLACEMENT_ANSWERS_TTL {
                return Ok(answers.clone());
            }
        }
        let servers: Vec<String> = self.namespace.servers()?;
        if servers.is_empty() {
            return Err(DataError::NoServers);
        }
        let calls: Vec<(&str, &ChunkRequest)> = servers.iter().map(|s| (s.as_str(), &ChunkRequest::Capacity)).collect();
        let answers: Vec<(String, Result<u64, String>)> = servers
            .iter()
            .cloned()
            .zip(self.chunks.call_all(&calls))
            .map(|(s, answer)| match answer {
                Ok(ChunkResponse::Capacity { free, .. }) => (s, Ok(free)),
                Ok(other) => (s, Err(format!("unexpected answer {other:?}"))),
                Err(e) => (s, Err(e.to_string())),
            })
            .collect();
        *self.placement_answers.lock().expect("placement answers") = Some((Instant::now(), answers.clone()));
        Ok(answers)
    }

    /// Counts a whole new chunk against the kept free space of `servers`, as their next
    /// answer would once it is written: a server that is filling up stops getting chunks
    /// before it is full.
    fn reserve_chunk_on(&self, servers: &[String]) {
        if let Some((_, answers)) = &mut *self.placement_answers.lock().expect("placement answers") {
            for (server, free) in answers.iter_mut() {
                if let (true, Ok(free)) = (servers.contains(server), free) {
                    *free = free.saturating_sub(self.chunk_size);
                }
            }
        }
    }

    /// The servers marked draining, looked up at most every [`PLACEMENT_ANSWERS_TTL`].
    fn draining(&self) -> Result<BTreeSet<String>, DataError> {
        if let Some((asked, draining)) = &*self.draining.lock().expect("draining servers") {
            if asked.elapsed() < PLACEMENT_ANSWERS_TTL {
                return Ok(draining.clone());
            }
        }
        let draining = crate::servers::draining(&self.namespace)?;
        *self.draining.lock().expect("draining servers") = Some((Instant::now(), draining.clone()));
        Ok(draining)
    }

    /// Records the newly placed `chunk` as chunk `index` (at `expected_revision`) unless one of
    /// its servers was marked draining since [`FileData::draining`] looked: a drained server
    /// gets no new chunk, even from a client that looked before the drain. `None`: the record
    /// changed or a server is draining now; the answers are forgotten and the caller places
    /// again.
    fn put_new_chunk(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, expected_revision: u64, size: Option<u64>) -> Result<Option<u64>, DataError> {
        let guards: Vec<String> = chunk.replicas.iter().map(|r| crate::servers::draining_key(&r.server)).collect();
        let recorded = self.namespace.put_chunk_unless(lease, index, chunk, expected_revision, &guards, size)?;
        if recorded.is_none() {
            self.forget_placement_answers();
        }
        Ok(recorded)
    }

    /// The next chunk allocation asks the servers again (one failed or was full), and looks
    /// up which are draining.
    fn forget_placement_answers(&self) {
        *self.draining.lock().expect("draining servers") = None;
        *self.placement_answers.lock().expect("placement answers") = None;
    }

    fn forget_cached(&self, ino: u64, index: u64) {
        self.leased_chunks.lock().expect("chunk cache").remove(&(ino, index));
    }

    /// Forgets every cached chunk record of `ino` (its lease was released or lost).
    pub fn forget_file(&self, ino: u64) {
        self.leased_chunks.lock().expect("chunk cache").retain(|(i, _), _| *i != ino);
        self.new_files.lock().expect("new files").remove(&ino);
    }

    /// `ino` was just created with its lease held by this client: it has no chunk records.
    pub fn created_file(&self, ino: u64) {
        self.new_files.lock().expect("new files").insert(ino);
    }

    /// After a request to every current replica of chunk `index`: done (`Ok(true)`) when all
    /// answered; an error when fewer than `min_copies` did; otherwise the failed replicas are
    /// dropped as [`Self::drop_failed_replicas`] does (`Ok(false)`: the record changed, retry).
    fn settle_replicas(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, revision: u64, fanout: &Fanout) -> Result<bool, DataError> {
        if fanout.failures.is_empty() {
            return Ok(true);
        }
        if fanout.succeeded.len() < self.min_copies {
            return Err(DataError::TooFewCopies { ino: lease.ino, index, reached: fanout.succeeded.len(), min_copies: self.min_copies, failures: fanout.describe_failures() });
        }
        self.drop_failed_replicas(lease, index, chunk, revision, fanout)
    }

    /// After a request reached only `fanout.succeeded` of the current replicas: record the
    /// others as stale (new chunk version), then move the survivors to that version.
    /// Returns `Ok(false)` if the chunk record changed meanwhile (the caller retries).
    fn drop_failed_replicas(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, revision: u64, fanout: &Fanout) -> Result<bool, DataError> {
        let after = chunk.after_partial_write(&fanout.succeeded);
        // A chunk shared with clones moves on in every file's record at once.
        let recorded = self.namespace.put_chunk_everywhere(lease, index, &after, revision)?;
        self.forget_cached(lease.ino, index);
        if recorded.is_none() {
            return Ok(false);
        }
        tracing::warn!(ino = lease.ino, index, stale = ?fanout.failures.iter().map(|(s, _)| s).collect::<Vec<_>>(), version = after.version, "replicas marked stale");
        // A zero-length write moves a replica to the new version. One that misses this bump
        // stays behind the record and the servers refuse to serve it: safe, just one fewer copy.
        let bump = ChunkRequest::Write { file_id: lease.ino, epoch: lease.epoch, chunk_id: chunk.chunk_id, version: after.version, offset: 0, data: vec![], sync: false };
        let bumped = self.fanout(&fanout.succeeded, &bump);
        if let Some(server) = bumped.fenced_by() {
            return Err(DataError::Fenced { ino: lease.ino, epoch: lease.epoch, server: server.to_string() });
        }
        Ok(true)
    }

    /// Writes `data` at `offset` of the leased file, every chunk to all of its current replicas.
    ///
    /// `new_size`: the file's size after this write, if it grows the file. When the write's
    /// last chunk is new, that size is recorded in the same commit as the chunk, and the
    /// answer is `true`: the caller has no size left to commit. (A failed write may have
    /// recorded it: the caller then records its size again.)
    pub fn write(&self, lease: &HeldLease, copies: u32, offset: u64, data: &[u8], sync: bool, new_size: Option<u64>) -> Result<bool, DataError> {
        let mut done = 0usize;
        let mut size_recorded = false;
        while done < data.len() {
            let position = offset + done as u64;
            let index = position / self.chunk_size;
            let in_chunk = position % self.chunk_size;
            let len = ((self.chunk_size - in_chunk) as usize).min(data.len() - done);
            let last = done + len == data.len();
            size_recorded = self.write_chunk(lease, copies, index, in_chunk, &data[done..done + len], sync, new_size.filter(|_| last))?;
            done += len;
        }
        Ok(size_recorded)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_chunk(&self, lease: &HeldLease, copies: u32, index: u64, offset: u64, data: &[u8], sync: bool, new_size: Option<u64>) -> Result<bool, DataError> {
        self.update_replicas(lease, index, |chunk| ChunkRequest::Write {
            file_id: lease.ino,
            epoch: lease.epoch,
            chunk_id: chunk.chunk_id,
            version: chunk.version,
            offset,
            data: data.to_vec(),
            sync,
        }, Some(copies), new_size)
    }

    /// Zeroes `len` bytes at `offset` of the leased file (fallocate punch hole); chunks never
    /// written are holes already.
    pub fn punch_hole(&self, lease: &HeldLease, offset: u64, len: u64) -> Result<(), DataError> {
        let end = offset.saturating_add(len);
        let mut position = offset;
        while position < end {
            let index = position / self.chunk_size;
            let in_chunk = position % self.chunk_size;
            let piece = (self.chunk_size - in_chunk).min(end - position);
            if self.cached_or_stored(lease, index)?.is_some() {
                self.update_replicas(lease, index, |chunk| ChunkRequest::PunchHole {
                    file_id: lease.ino,
                    epoch: lease.epoch,
                    chunk_id: chunk.chunk_id,
                    version: chunk.version,
                    offset: in_chunk,
                    len: piece,
                }, None, None)?;
            }
            position += piece;
        }
        Ok(())
    }

    /// Sends `make_request(chunk)` to every current replica of chunk `index` (allocating the
    /// chunk with `allocate` copies if it is new), with the write path's failure handling.
    /// A new chunk's record carries `new_size` too (see [`FileData::write`]): `Ok(true)` then.
    fn update_replicas(&self, lease: &HeldLease, index: u64, make_request: impl Fn(&ChunkInfo) -> ChunkRequest, allocate: Option<u32>, new_size: Option<u64>) -> Result<bool, DataError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut size_recorded = false;
            let (chunk, revision, fanout) = match self.chunk_for_write(lease, index, allocate)? {
                None => return Ok(false),
                Some(ChunkForWrite::Recorded(chunk, revision)) => {
                    let fanout = self.fanout(&chunk.current_servers(), &make_request(&chunk));
                    (chunk, revision, fanout)
                }
                Some(ChunkForWrite::Placed { chunk, from_kept_answers }) => {
                    // The servers take the new chunk's first write while its record commits;
                    // the write is acknowledged only once both are done.
                    let (fanout, recorded) = self.fanout_while(&chunk.current_servers(), &make_request(&chunk), || self.record_new_chunk(lease, index, &chunk, from_kept_answers, new_size));
                    match recorded {
                        Ok(Some(revision)) => {
                            size_recorded = new_size.is_some();
                            (chunk, revision, fanout)
                        }
                        unrecorded => {
                            // Its replicas belong to no file: gone again.
                            self.delete_replicas(std::slice::from_ref(&chunk));
                            unrecorded?;
                            continue;
                        }
                    }
                }
            };
            let current = chunk.current_servers();
            if let Some(server) = fanout.fenced_by() {
                self.forget_file(lease.ino);
                return Err(DataError::Fenced { ino: lease.ino, epoch: lease.epoch, server: server.to_string() });
            }
            let placed_from_old_answers = self.placed_from_old_answers.lock().expect("placed chunks").remove(&(lease.ino, index));
            if fanout.failures.is_empty() && current.len() >= self.min_copies {
                return Ok(size_recorded);
            }
            self.forget_placement_answers();
            if placed_from_old_answers && fanout.succeeded.len() < self.min_copies {
                // Placed on servers that went away since they last answered: nothing was
                // acknowledged there, so the chunk moves to servers that answer now.
                self.place_again(lease, index, &chunk, revision, allocate.unwrap_or(1))?;
                continue;
            }
            if fanout.succeeded.is_empty() || fanout.succeeded.len() < self.min_copies {
                // Not acknowledged. If some replicas took it, the others are now behind them.
                if !fanout.succeeded.is_empty() && !fanout.failures.is_empty() {
                    self.drop_failed_replicas(lease, index, &chunk, revision, &fanout)?;
                }
                return Err(DataError::TooFewCopies {
                    ino: lease.ino,
                    index,
                    reached: fanout.succeeded.len(),
                    min_copies: self.min_copies,
                    failures: fanout.describe_failures(),
                });
            }
            if self.drop_failed_replicas(lease, index, &chunk, revision, &fanout)? {
                return Ok(size_recorded);
            }
        }
        Err(NamespaceError::Contended { what: format!("chunk {index} of inode {}", lease.ino) }.into())
    }

    /// Records chunk `index` of the leased file (at `revision`, never acknowledged a write) as a
    /// new chunk on servers that answer now, and deletes what the first placement holds.
    fn place_again(&self, lease: &HeldLease, index: u64, chunk: &ChunkInfo, revision: u64, copies: u32) -> Result<(), DataError> {
        let chunk_id: u64 = rand::random();
        let (candidates, unanswered) = self.placement_candidates(copies)?;
        let placed = place_replicas(&candidates, copies as usize, chunk_id);
        if placed.len() < self.min_copies {
            let unanswered = if unanswered.is_empty() { String::new() } else { format!(" (not answering: {})", unanswered.join("; ")) };
            return Err(DataError::NoSpace { ino: lease.ino, index, usable: placed, min_copies: self.min_copies, unanswered });
        }
        self.reserve_chunk_on(&placed);
        let moved = ChunkInfo { chunk_id, version: 1, replicas: placed.into_iter().map(|server| Replica { server, version: 1 }).collect() };
        self.forget_cached(lease.ino, index);
        if let Some(rev) = self.put_new_chunk(lease, index, &moved, revision, None)? {
            self.leased_chunks.lock().expect("chunk cache").insert((lease.ino, index), (moved, rev));
            self.delete_replicas(std::slice::from_ref(chunk));
        }
        Ok(())
    }

    /// Reads up to `out.len()` bytes at `offset` of a file of `size` bytes into `out`, and
    /// answers how many. An `out` aligned for direct I/O ([`AlignedBuffer`]) lets a large read
    /// of the local replica go from the disk straight into it.
    pub fn read(&self, ino: u64, size: u64, offset: u64, out: &mut [u8], lease: Option<&HeldLease>) -> Result<usize, DataError> {
        if offset >= size {
            return Ok(0);
        }
        let len = (out.len() as u64).min(size - offset);
        let mut done = 0u64;
        while done < len {
            let position = offset + done;
            let index = position / self.chunk_size;
            let in_chunk = position % self.chunk_size;
            let piece = (self.chunk_size - in_chunk).min(len - done);
            self.read_chunk(ino, index, in_chunk, &mut out[done as usize..(done + piece) as usize], lease)?;
            done += piece;
        }
        Ok(len as usize)
    }

    /// Fills `out` from `offset` of chunk `index`, from one current replica (the local one
    /// first), moving to the next on any failure. A block some replica found corrupt is
    /// repaired from the one that then served it.
    ///
    /// One replica serves the whole read on purpose: each replica's chunk file then sees a
    /// sequential stream the kernel reads ahead on. Splitting a read across replicas (tried)
    /// showed each server a strided pattern with no readahead, and sequential reads were
    /// slower with it.
    fn read_chunk(&self, ino: u64, index: u64, offset: u64, out: &mut [u8], lease: Option<&HeldLease>) -> Result<(), DataError> {
        let mut failures = Vec::new();
        for attempt in 0..2 {
            let cached = if attempt == 0 && lease.is_some() { self.leased_chunks.lock().expect("chunk cache").get(&(ino, index)).cloned() } else { None };
            let chunk = match cached {
                Some((c, _)) => c,
                None => match self.namespace.chunk(ino, index)? {
                    Some((c, _)) => c,
                    None => {
                        out.fill(0); // a hole
                        return Ok(());
                    }
                },
            };
            let request = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset, len: out.len() as u64 };
            let mut corrupt: Vec<(String, u64)> = Vec::new();
            for server in self.read_order(&chunk) {
                // The answer's bytes land in `out` as they come off the connection.
                match self.chunks.read_into(&server, &request, out) {
                    Ok(()) => {
                        for (bad_server, block) in corrupt {
                            let _ = self.repair_block(&chunk, &server, &bad_server, block);
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        if let ChunkClientError::Refused { failure: ChunkFailure::Corrupt { block, .. }, .. } = &e {
                            corrupt.push((server.clone(), *block));
                        }
                        tracing::warn!(ino, index, %server, "replica read failed, trying the next one: {e}");
                        failures.push(format!("{server}: {e}"));
                    }
                }
            }
        }
        Err(DataError::NoReadableReplica { ino, index, failures: failures.join("; ") })
    }

    /// Copies `block` from the replica `good` over the corrupt one on `bad` (same version):
    /// `Ok(true)` if it did, `Ok(false)` if the block on `bad` is not corrupt (any more). Best
    /// effort: a failed repair leaves the block detected as corrupt.
    pub fn repair_block(&self, chunk: &ChunkInfo, good: &str, bad: &str, block: u64) -> Result<bool, ChunkClientError> {
        let block_start = block * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(self.chunk_size - block_start);
        let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: block_start, len };
        let result = match self.chunks.call(good, &read) {
            Ok(ChunkResponse::Data(data)) => {
                self.chunks.call(bad, &ChunkRequest::RepairBlock { chunk_id: chunk.chunk_id, version: chunk.version, block, data })
            }
            Ok(other) => Ok(other),
            Err(e) => Err(e),
        };
        match result {
            Ok(ChunkResponse::Repaired(repaired)) => {
                if repaired {
                    tracing::info!(chunk_id = chunk.chunk_id, block, %bad, from = %good, "repaired a corrupt block");
                }
                Ok(repaired)
            }
            Ok(other) => Err(ChunkClientError::Protocol { server: bad.to_string(), answer: format!("{other:?}") }),
            Err(e) => {
                tracing::warn!(chunk_id = chunk.chunk_id, block, %bad, "could not repair a corrupt block: {e}");
                Err(e)
            }
        }
    }

    /// Makes the written chunks `indexes` of the leased file durable on their current replicas.
    /// One `SyncChunks` per server, for all of that server's chunks, every server at once; a
    /// chunk with a replica that failed it goes through [`FileData::sync_chunk`], which marks
    /// the failed replicas stale.
    pub fn sync(&self, lease: &HeldLease, indexes: &[u64]) -> Result<(), DataError> {
        let mut chunks = Vec::new();
        for &index in indexes {
            if let Some((chunk, _)) = self.cached_or_stored(lease, index)? {
                chunks.push((index, chunk));
            }
        }
        let mut per_server: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (_, chunk) in &chunks {
            for server in chunk.current_servers() {
                per_server.entry(server).or_default().push(chunk.chunk_id);
            }
        }
        let requests: Vec<(String, ChunkRequest)> = per_server.into_iter().map(|(server, chunk_ids)| (server, ChunkRequest::SyncChunks { chunk_ids })).collect();
        let calls: Vec<(&str, &ChunkRequest)> = requests.iter().map(|(server, request)| (server.as_str(), request)).collect();
        let failed: Vec<&str> = calls
            .iter()
            .zip(self.chunks.call_all(&calls))
            .filter_map(|((server, _), answer)| {
                let e = answer.err()?;
                tracing::warn!(%server, "replica sync failed: {e}");
                if e.is_unavailable() {
                    self.chunks.forget(server);
                }
                Some(*server)
            })
            .collect();
        for (index, chunk) in chunks {
            if chunk.current_servers().iter().any(|s| failed.contains(&s.as_str())) {
                self.sync_chunk(lease, index)?;
            }
        }
        Ok(())
    }

    /// Makes chunk `index` of the leased file durable on its current replicas, marking those
    /// that fail stale.
    fn sync_chunk(&self, lease: &HeldLease, index: u64) -> Result<(), DataError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let Some((chunk, revision)) = self.cached_or_stored(lease, index)? else { break };
            let fanout = self.fanout(&chunk.current_servers(), &ChunkRequest::Sync { chunk_id: chunk.chunk_id });
            if self.settle_replicas(lease, index, &chunk, revision, &fanout)? {
                break;
            }
        }
        Ok(())
    }

    fn cached_or_stored(&self, lease: &HeldLease, index: u64) -> Result<Option<(ChunkInfo, u64)>, DataError> {
        if let Some(c) = self.leased_chunks.lock().expect("chunk cache").get(&(lease.ino, index)) {
            return Ok(Some(c.clone()));
        }
        Ok(self.namespace.chunk(lease.ino, index)?)
    }

    /// Sets the leased file's size to `new_size`: chunks past it are dropped, the one it ends
    /// in is cut, so a later extension reads zeros there.
    pub fn truncate(&self, lease: &HeldLease, new_size: u64) -> Result<(), DataError> {
        let first_dropped = new_size.div_ceil(self.chunk_size);
        let dropped = self.namespace.delete_chunks_from(lease, first_dropped)?;
        for index in first_dropped..first_dropped + dropped.len() as u64 + 1 {
            self.forget_cached(lease.ino, index);
        }
        self.forget_file(lease.ino);
        self.delete_replicas(&dropped);
        if !new_size.is_multiple_of(self.chunk_size) {
            let index = new_size / self.chunk_size;
            for _ in 0..MAX_CONFLICT_RETRIES {
                let Some((chunk, revision)) = self.exclusive_chunk(lease, index)? else { break };
                let request = ChunkRequest::Truncate { file_id: lease.ino, epoch: lease.epoch, chunk_id: chunk.chunk_id, version: chunk.version, len: new_size % self.chunk_size };
                let fanout = self.fanout(&chunk.current_servers(), &request);
                if let Some(server) = fanout.fenced_by() {
                    return Err(DataError::Fenced { ino: lease.ino, epoch: lease.epoch, server: server.to_string() });
                }
                if self.settle_replicas(lease, index, &chunk, revision, &fanout)? {
                    break;
                }
            }
        }
        self.namespace.set_size(lease, new_size)?;
        Ok(())
    }

    /// Tells every server holding a replica of the leased file about the lease's epoch, so a
    /// writer with an older epoch is refused from now on. A server that cannot be told is
    /// marked stale for the file's chunks: whatever a fenced writer still puts there is never read.
    pub fn fence(&self, lease: &HeldLease) -> Result<(), DataError> {
        self.forget_file(lease.ino);
        let chunks = self.namespace.chunks(lease.ino)?;
        let mut servers: Vec<String> = chunks.iter().flat_map(|(_, c, _)| c.replicas.iter().map(|r| r.server.clone())).collect();
        servers.sort();
        servers.dedup();
        let fanout = self.fanout(&servers, &ChunkRequest::Fence { file_id: lease.ino, epoch: lease.epoch });
        if let Some(server) = fanout.fenced_by() {
            return Err(DataError::Fenced { ino: lease.ino, epoch: lease.epoch, server: server.to_string() });
        }
        if !fanout.failures.is_empty() {
            self.mark_unreachable_stale(lease, chunks, &fanout)?;
        }
        self.resync_diverged(lease)
    }

    /// A writer that died mid-write may have left current replicas of a chunk different
    /// (a write that reached some of them, never acknowledged). After a takeover any one of
    /// them is a valid outcome: copy the first over the others, so reads never flip.
    fn resync_diverged(&self, lease: &HeldLease) -> Result<(), DataError> {
        for (index, chunk, _) in self.namespace.chunks(lease.ino)? {
            let current = chunk.current_servers();
            if current.len() < 2 {
                continue;
            }
            let digests: Vec<(String, Option<(u64, u64)>)> = current
                .iter()
                .map(|s| {
                    let answer = match self.chunks.call(s, &ChunkRequest::Digest { chunk_id: chunk.chunk_id, version: chunk.version }) {
                        Ok(ChunkResponse::Digest { digest, len }) => Some((digest, len)),
                        _ => None,
                    };
                    (s.clone(), answer)
                })
                .collect();
            let Some((source, (source_digest, source_len))) = digests.iter().find_map(|(s, d)| d.map(|d| (s.clone(), d))) else { continue };
            for (server, digest) in &digests {
                if digest.is_some_and(|(d, _)| d != source_digest) {
                    tracing::warn!(ino = lease.ino, index, %server, from = %source, "replica differs after a takeover: resyncing it");
                    if let Err(e) = self.copy_chunk(lease, &chunk, &source, server, source_len, true) {
                        tracing::warn!(ino = lease.ino, index, %server, "resync failed, the replica stays different: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    fn mark_unreachable_stale(&self, lease: &HeldLease, chunks: Vec<(u64, ChunkInfo, u64)>, fanout: &Fanout) -> Result<(), DataError> {
        let unreachable: Vec<&String> = fanout.failures.iter().map(|(s, _)| s).collect();
        for (index, chunk, revision) in chunks {
            let current = chunk.current_servers();
            if !current.iter().any(|s| unreachable.contains(&s)) {
                continue;
            }
            let survivors: Vec<String> = current.into_iter().filter(|s| !unreachable.contains(&s)).collect();
            let partial = Fanout { succeeded: survivors, failures: vec![] };
            if !self.drop_failed_replicas(lease, index, &chunk, revision, &partial)? {
                return Err(NamespaceError::Contended { what: format!("chunk {index} of inode {}", lease.ino) }.into());
            }
        }
        Ok(())
    }

    /// Indexes of the chunks of file `ino` that [`FileData::heal_file`] would change: short of
    /// `copies`, with stale entries, or with replicas on servers that are leaving (draining,
    /// declared dead, removed).
    pub fn chunks_to_heal(&self, ino: u64, copies: u32) -> Result<Vec<u64>, DataError> {
        let states = ServerStates::load(&self.namespace)?;
        Ok(self.namespace.chunks(ino)?.into_iter().filter(|(_, c, _)| healer::needs_healing(c, copies, &states)).map(|(i, _, _)| i).collect())
    }

    /// Brings every chunk of the leased file back to `copies` current replicas on servers that
    /// stay: copies a current replica to registered servers that answer and hold none, then
    /// records them, dropping stale entries and, once enough copies stay, the replicas on
    /// servers that are leaving (see [`crate::servers`]). The caller must keep writes to this
    /// file out meanwhile (it holds the lease and does not write), since a copy racing a write
    /// would miss it. `only`: heal just that chunk index (so a writer can let writes through
    /// between chunks).
    pub fn heal_file(&self, lease: &HeldLease, copies: u32, file_size: u64, only: Option<u64>) -> Result<HealOutcome, DataError> {
        let mut outcome = HealOutcome::default();
        let states = ServerStates::load(&self.namespace)?;
        let servers = self.namespace.servers()?;
        let up: Vec<String> = servers.into_iter().filter(|s| matches!(self.chunks.call(s, &ChunkRequest::Capacity), Ok(ChunkResponse::Capacity { .. }))).collect();
        // A chunk this file points at twice is healed once: that changes both records.
        let mut healed_ids = std::collections::HashSet::new();
        for (index, chunk, revision) in self.namespace.chunks(lease.ino)? {
            if only.is_some_and(|i| i != index) || !healer::needs_healing(&chunk, copies, &states) || !healed_ids.insert(chunk.chunk_id) {
                continue;
            }
            let current = chunk.current_servers();
            // Any current replica that answers is a source, a draining one too.
            let Some(source) = current.iter().find(|s| up.contains(s)).cloned() else {
                outcome.unavailable += 1;
                continue;
            };
            let staying = current.iter().filter(|s| !states.retiring(s)).count();
            let wanted = (copies as usize).saturating_sub(staying);
            let candidates: Vec<String> = up.iter().filter(|s| states.placeable(s) && !current.contains(s)).cloned().collect();
            let chunk_start = index * self.chunk_size;
            let extent = file_size.saturating_sub(chunk_start).min(self.chunk_size);
            let mut added = Vec::new();
            for target in candidates {
                if added.len() >= wanted {
                    break;
                }
                match self.copy_chunk(lease, &chunk, &source, &target, extent, false) {
                    Ok(()) => added.push(target),
                    Err(e) => tracing::warn!(chunk_id = chunk.chunk_id, %target, "cannot copy a replica there: {e}"),
                }
            }
            let (healed, dropped) = healer::healed_replicas(&chunk, copies, &states, &added);
            if added.is_empty() && dropped.is_empty() {
                if staying < copies as usize {
                    outcome.still_under_replicated += 1;
                }
                continue;
            }
            // A shared chunk is healed once for every file sharing it: all their records change.
            if self.namespace.put_chunk_everywhere(lease, index, &healed, revision)?.is_none() {
                return Err(NamespaceError::Contended { what: format!("chunk {index} of inode {}", lease.ino) }.into());
            }
            // Dropped replicas are garbage now; servers that do not answer keep theirs.
            let garbage = ChunkInfo { chunk_id: chunk.chunk_id, version: chunk.version, replicas: dropped.into_iter().filter(|r| up.contains(&r.server)).collect() };
            self.delete_replicas(std::slice::from_ref(&garbage));
            outcome.copied += added.len() as u64;
            outcome.bytes_copied += extent * added.len() as u64;
            if healed.current_servers().iter().filter(|s| !states.retiring(s)).count() < copies as usize {
                outcome.still_under_replicated += 1;
            }
        }
        self.forget_file(lease.ino);
        Ok(outcome)
    }

    /// Copies the first `extent` bytes of `chunk` from `source` to `target` at the same version.
    /// `target_is_current`: the target is read meanwhile, so it is overwritten in place and
    /// cut afterwards (readers see old or new bytes, never a truncated chunk); otherwise it is
    /// emptied first, so a leftover stale copy cannot show through.
    fn copy_chunk(&self, lease: &HeldLease, chunk: &ChunkInfo, source: &str, target: &str, extent: u64, target_is_current: bool) -> Result<(), ChunkClientError> {
        let cut = |len| ChunkRequest::Truncate { file_id: lease.ino, epoch: lease.epoch, chunk_id: chunk.chunk_id, version: chunk.version, len };
        if !target_is_current {
            self.chunks.call(target, &cut(0))?;
        }
        let piece = 1024 * 1024;
        let mut offset = 0;
        while offset < extent {
            let len = piece.min(extent - offset);
            let data = match self.chunks.call(source, &ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset, len })? {
                ChunkResponse::Data(d) => d,
                other => return Err(ChunkClientError::Protocol { server: source.to_string(), answer: format!("{other:?}") }),
            };
            let write = ChunkRequest::Write { file_id: lease.ino, epoch: lease.epoch, chunk_id: chunk.chunk_id, version: chunk.version, offset, data, sync: false };
            self.chunks.call(target, &write)?;
            offset += len;
        }
        if target_is_current {
            self.chunks.call(target, &cut(extent))?;
        }
        // An empty extent still leaves the target at the chunk's version.
        let bump = ChunkRequest::Write { file_id: lease.ino, epoch: lease.epoch, chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, data: vec![], sync: false };
        self.chunks.call(target, &bump)?;
        self.chunks.call(target, &ChunkRequest::Sync { chunk_id: chunk.chunk_id })?;
        Ok(())
    }

    /// Best-effort removal of deleted chunks from their servers (leftovers are garbage only).
    pub fn delete_replicas(&self, chunks: &[ChunkInfo]) {
        for chunk in chunks {
            let servers: Vec<String> = chunk.replicas.iter().map(|r| r.server.clone()).collect();
            let fanout = self.fanout(&servers, &ChunkRequest::Delete { chunk_id: chunk.chunk_id });
            if !fanout.failures.is_empty() {
                tracing::warn!(chunk_id = chunk.chunk_id, "could not delete every replica: {}", fanout.describe_failures());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata_store::MemoryMetadata;

    #[test]
    fn reads_prefer_the_local_current_replica() {
        let ns = Arc::new(Namespace::new(Arc::new(MemoryMetadata::new())));
        let chunk = ChunkInfo {
            chunk_id: 1,
            version: 2,
            replicas: ["a", "b", "c"].iter().map(|s| Replica { server: s.to_string(), version: 2 }).collect(),
        };
        let data = FileData::new(ns.clone(), 1 << 20, 2).with_local_server(Some("c".into()));
        assert_eq!(data.read_order(&chunk), vec!["c", "a", "b"]);
        let mut stale_local = chunk.clone();
        stale_local.replicas[2].version = 1;
        assert_eq!(data.read_order(&stale_local), vec!["a", "b"], "a stale local replica is never read");
    }
}

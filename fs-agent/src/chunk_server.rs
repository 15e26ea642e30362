//! The chunk server process: serves a [`ChunkStore`] over TCP or mutual TLS
//! ([`crate::chunk_transport`]), one thread per connection.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::chunk_protocol::{read_frame, write_data_frame, write_frame, ChunkFailure, ChunkRequest, ChunkResponse, FrameError};
use crate::chunk_store::{ChunkStore, ChunkStoreError};
use crate::chunk_transport::{self, Accepted};

#[derive(Debug, thiserror::Error)]
pub enum ChunkServerError {
    #[error("cannot listen on {addr}: {source}; is another chunk server using that port?")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] ChunkStoreError),
}

fn failure(error: ChunkStoreError) -> ChunkFailure {
    let text = error.to_string();
    match error {
        ChunkStoreError::Corrupt { block, .. } => ChunkFailure::Corrupt { block, message: text },
        ChunkStoreError::StaleEpoch { .. } => ChunkFailure::StaleEpoch(text),
        ChunkStoreError::VersionMismatch { .. } => ChunkFailure::VersionMismatch(text),
        ChunkStoreError::OutOfRange { .. } | ChunkStoreError::CopyOntoItself { .. } | ChunkStoreError::ChunkSizeTooLarge { .. } => ChunkFailure::BadRequest(text),
        ChunkStoreError::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ChunkFailure::NoSpace(text),
        ChunkStoreError::Io { .. } => ChunkFailure::Io(text),
    }
}

/// Serves one request from `store`: over a connection, or called directly by a mount running
/// this chunk server in its own process.
pub fn handle(store: &ChunkStore, request: &ChunkRequest) -> ChunkResponse {
    let result = match *request {
        ChunkRequest::Write { file_id, epoch, chunk_id, version, offset, ref data, sync } => {
            store.write(file_id, epoch, chunk_id, version, offset, data, sync).map(|()| ChunkResponse::Done)
        }
        ChunkRequest::Read { chunk_id, version, offset, len } => store.read(chunk_id, version, offset, len).map(ChunkResponse::Data),
        ChunkRequest::Truncate { file_id, epoch, chunk_id, version, len } => {
            store.truncate(file_id, epoch, chunk_id, version, len).map(|()| ChunkResponse::Done)
        }
        ChunkRequest::PunchHole { file_id, epoch, chunk_id, version, offset, len } => {
            store.punch_hole(file_id, epoch, chunk_id, version, offset, len).map(|()| ChunkResponse::Done)
        }
        ChunkRequest::Sync { chunk_id } => store.sync(chunk_id).map(|()| ChunkResponse::Done),
        ChunkRequest::SyncChunks { ref chunk_ids } => store.sync_chunks(chunk_ids).map(|()| ChunkResponse::Done),
        ChunkRequest::Fence { file_id, epoch } => store.check_epoch(file_id, epoch).map(|()| ChunkResponse::Done),
        ChunkRequest::Delete { chunk_id } => store.delete(chunk_id).map(|()| ChunkResponse::Done),
        ChunkRequest::RepairBlock { chunk_id, version, block, ref data } => store.repair_block(chunk_id, version, block, data).map(ChunkResponse::Repaired),
        ChunkRequest::Version { chunk_id } => store.replica_version(chunk_id).map(ChunkResponse::Version),
        ChunkRequest::Digest { chunk_id, version } => store.content_digest(chunk_id, version).map(|(digest, len)| ChunkResponse::Digest { digest, len }),
        ChunkRequest::ScrubReport => Ok(ChunkResponse::Scrub(store.scrub_report())),
        ChunkRequest::Capacity => store.capacity().map(|(free, total)| ChunkResponse::Capacity { free, total }),
        ChunkRequest::CopyChunk { file_id, epoch, from_chunk_id, from_version, to_chunk_id, version } => {
            store.copy_chunk(file_id, epoch, from_chunk_id, from_version, to_chunk_id, version).map(|()| ChunkResponse::Done)
        }
    };
    result.unwrap_or_else(|e| {
        tracing::warn!("request refused: {e}");
        ChunkResponse::Failed(failure(e))
    })
}

thread_local! {
    /// The blocks of the last direct read of this thread (see [`read_local`]).
    static LOCAL_READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A `Read` of `out.len()` bytes at `offset` served from `store` in this process, into `out`:
/// what a mount running the chunk server itself does for its local replica.
pub fn read_local(store: &ChunkStore, chunk_id: u64, version: u64, offset: u64, out: &mut [u8]) -> Result<(), ChunkFailure> {
    LOCAL_READ_BUFFER.with_borrow_mut(|buffer| {
        let result = store.read_to(chunk_id, version, offset, out, buffer);
        forget_if_large(buffer);
        result.map_err(|e| {
            tracing::warn!("local read refused: {e}");
            failure(e)
        })
    })
}

fn serve_connection(store: &ChunkStore, stream: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let mut stream = match chunk_transport::accept(&peer, stream, tls) {
        Accepted::Serve(stream) => stream,
        Accepted::RefusePlain(mut socket, reason) => {
            let _ = write_frame(&mut socket, &ChunkResponse::Failed(ChunkFailure::BadRequest(reason)));
            socket.close_gracefully();
            return;
        }
        Accepted::Dropped => return,
    };
    let mut read_buffer = Vec::new();
    loop {
        let request: ChunkRequest = match read_frame(&mut stream) {
            Ok(r) => r,
            Err(FrameError::Io(e)) => {
                if let Some(reason) = chunk_transport::tls_failure(&e) {
                    tracing::warn!(%peer, "TLS connection failed: {reason}");
                }
                return;
            }
            Err(e) => {
                // A malformed frame leaves the stream unsynchronized: answer once and hang up.
                tracing::warn!(%peer, "bad frame: {e}");
                let _ = write_frame(&mut stream, &ChunkResponse::Failed(ChunkFailure::BadRequest(e.to_string())));
                return;
            }
        };
        let sent = match request {
            ChunkRequest::Read { chunk_id, version, offset, len } => serve_read(store, &mut stream, &mut read_buffer, chunk_id, version, offset, len),
            request => write_frame(&mut stream, &handle(store, &request)),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Buffers of reads larger than this are not kept for the connection's next read.
const READ_BUFFER_KEPT_BYTES: usize = 2 * 1024 * 1024;

/// Drops a read buffer grown past [`READ_BUFFER_KEPT_BYTES`] instead of keeping it.
fn forget_if_large(buffer: &mut Vec<u8>) {
    if buffer.len() > READ_BUFFER_KEPT_BYTES {
        *buffer = Vec::new();
    }
}

/// Answers a `Read` from `buffer`, which the connection reuses: the blocks are read and
/// checked into it, and the answer's payload is sent from it without another copy.
fn serve_read(store: &ChunkStore, stream: &mut chunk_transport::Stream, buffer: &mut Vec<u8>, chunk_id: u64, version: u64, offset: u64, len: u64) -> Result<(), FrameError> {
    let sent = match store.read_into(chunk_id, version, offset, len, buffer) {
        Ok(range) => write_data_frame(stream, &buffer[range]),
        Err(e) => {
            tracing::warn!("request refused: {e}");
            write_frame(stream, &ChunkResponse::Failed(failure(e)))
        }
    };
    forget_if_large(buffer);
    sent
}

/// Opens the store in `data_dir` (chunks up to `chunk_size` bytes).
pub fn open_store(data_dir: &Path, chunk_size: u64) -> Result<Arc<ChunkStore>, ChunkServerError> {
    Ok(Arc::new(ChunkStore::open(data_dir, chunk_size)?))
}

/// Serves `store` on `listener` until the process ends, to TLS clients only with `tls` (mutual
/// TLS), to plain TCP clients only without; scrubs every replica every `scrub_interval` (never
/// if `None`).
pub fn serve(listener: TcpListener, store: Arc<ChunkStore>, scrub_interval: Option<Duration>, tls: Option<Arc<rustls::ServerConfig>>) {
    if let Some(interval) = scrub_interval {
        let store = store.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(interval);
            if let Err(e) = store.scrub_once() {
                tracing::warn!("scrub pass failed: {e}");
            }
        });
    }
    tracing::info!(addr = ?listener.local_addr().ok(), data = %store.root().display(), tls = tls.is_some(), "chunk server ready");
    if tls.is_none() {
        tracing::warn!("serving plain TCP: anyone on the storage network can read and write replicas; production needs --tls-dir");
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let store = store.clone();
        let tls = tls.clone();
        std::thread::spawn(move || serve_connection(&store, stream, tls.as_ref()));
    }
}

pub fn bind(addr: &str) -> Result<TcpListener, ChunkServerError> {
    TcpListener::bind(addr).map_err(|source| ChunkServerError::Listen { addr: addr.to_string(), source })
}

//! The chunk server protocol: `[u32 len (big endian)][bincode payload]` frames over TCP, one
//! request then one response at a time per connection.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Frames larger than this are refused (a 1 MiB request plus headers fits easily).
pub const MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ChunkRequest {
    /// Write `data` at `offset` of a chunk of file `file_id`, under that file's lease `epoch`,
    /// leaving the replica at `version`; `sync` asks for fdatasync before the answer.
    Write {
        file_id: u64,
        epoch: u64,
        chunk_id: u64,
        version: u64,
        offset: u64,
        #[serde(with = "bytes_field")]
        data: Vec<u8>,
        sync: bool,
    },
    /// Read from a replica that must be at `version`.
    Read { chunk_id: u64, version: u64, offset: u64, len: u64 },
    Truncate { file_id: u64, epoch: u64, chunk_id: u64, version: u64, len: u64 },
    /// Zero a range, deallocating whole blocks.
    PunchHole { file_id: u64, epoch: u64, chunk_id: u64, version: u64, offset: u64, len: u64 },
    Sync { chunk_id: u64 },
    /// Record a new lease epoch for the file, so older writers are refused from now on.
    Fence { file_id: u64, epoch: u64 },
    Delete { chunk_id: u64 },
    /// Replace a block that fails its crc with a good replica's copy (same version).
    RepairBlock {
        chunk_id: u64,
        version: u64,
        block: u64,
        #[serde(with = "bytes_field")]
        data: Vec<u8>,
    },
    Version { chunk_id: u64 },
    /// The replica's content digest and data length at `version` (compares replicas).
    Digest { chunk_id: u64, version: u64 },
    Capacity,
    /// The background scrub's last report.
    ScrubReport,
    /// Copy this server's replica of `from_chunk_id` (at `from_version`) to the new chunk
    /// `to_chunk_id` at `version`, locally and fsynced: the copy-on-write of a chunk shared by
    /// several files, a write of file `file_id` under its lease `epoch`.
    CopyChunk { file_id: u64, epoch: u64, from_chunk_id: u64, from_version: u64, to_chunk_id: u64, version: u64 },
}

/// Why a chunk server refused a request; the client decides what each means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkFailure {
    Corrupt { block: u64, message: String },
    StaleEpoch(String),
    VersionMismatch(String),
    BadRequest(String),
    NoSpace(String),
    Io(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ChunkResponse {
    Done,
    Repaired(bool),
    Data(#[serde(with = "bytes_field")] Vec<u8>),
    Version(u64),
    Digest { digest: u64, len: u64 },
    Capacity { free: u64, total: u64 },
    Scrub(crate::chunk_store::ScrubReport),
    Failed(ChunkFailure),
}

/// Payloads as one byte string (a length and a memcpy) rather than serde's default sequence
/// of single bytes, which costs a call per byte.
mod bytes_field {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct BytesVisitor;
        impl<'de> serde::de::Visitor<'de> for BytesVisitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES} byte limit")]
    TooLarge(u32),
    #[error("malformed frame: {0}")]
    Malformed(#[from] bincode::Error),
}

pub fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> Result<(), FrameError> {
    let payload = bincode::serialize(message)?;
    if payload.len() > MAX_FRAME_BYTES as usize {
        return Err(FrameError::TooLarge(payload.len() as u32));
    }
    let mut frame = Vec::with_capacity(payload.len() + 4);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    stream.write_all(&frame)?;
    stream.flush()?;
    Ok(())
}

pub fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok(bincode::deserialize(&payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversize_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ChunkRequest::Read { chunk_id: 1, version: 2, offset: 3, len: 4 }).unwrap();
        let back: ChunkRequest = read_frame(&mut buf.as_slice()).unwrap();
        assert!(matches!(back, ChunkRequest::Read { chunk_id: 1, version: 2, offset: 3, len: 4 }));
        let huge = (MAX_FRAME_BYTES + 1).to_be_bytes();
        assert!(matches!(read_frame::<ChunkRequest>(&mut huge.as_slice()), Err(FrameError::TooLarge(_))));
        let mut buf = Vec::new();
        write_frame(&mut buf, &ChunkResponse::Data(vec![1, 2, 3])).unwrap();
        assert!(matches!(read_frame::<ChunkResponse>(&mut buf.as_slice()).unwrap(), ChunkResponse::Data(d) if d == [1, 2, 3]));
        let garbage = [0u8, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(read_frame::<ChunkRequest>(&mut garbage.as_slice()), Err(FrameError::Malformed(_))));
    }
}

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

/// Serializes `message` straight after its length prefix: one buffer, one copy of a payload.
pub fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> Result<(), FrameError> {
    let size = bincode::serialized_size(message)?;
    if size > MAX_FRAME_BYTES as u64 {
        return Err(FrameError::TooLarge(size.min(u32::MAX as u64) as u32));
    }
    let mut frame = Vec::with_capacity(size as usize + 4);
    frame.extend_from_slice(&(size as u32).to_be_bytes());
    bincode::serialize_into(&mut frame, message)?;
    stream.write_all(&frame)?;
    stream.flush()?;
    Ok(())
}

/// Deserializes a frame's payload straight from the stream, so a data payload is read into
/// its own buffer once. The frame's length bounds what it may allocate.
pub fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut impl Read) -> Result<T, FrameError> {
    use bincode::Options;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    // The encoding of `bincode::serialize`, limited to this frame.
    let options = bincode::options().with_fixint_encoding().allow_trailing_bytes().with_limit(len as u64);
    let mut payload = stream.take(len as u64);
    let message = options.deserialize_from(&mut payload).map_err(|e| match *e {
        // Running out of the frame is a malformed message; out of the stream, a broken connection.
        bincode::ErrorKind::Io(io) if payload.limit() > 0 || io.kind() != io::ErrorKind::UnexpectedEof => FrameError::Io(io),
        other => FrameError::Malformed(Box::new(other)),
    })?;
    // Bytes the message did not use, so the next frame starts where it should.
    io::copy(&mut payload, &mut io::sink())?;
    Ok(message)
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
        // A payload claiming more bytes than its frame holds is malformed, and allocates nothing.
        let mut lying = vec![0u8, 0, 0, 12];
        lying.extend_from_slice(&2u32.to_le_bytes());
        lying.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read_frame::<ChunkResponse>(&mut lying.as_slice()), Err(FrameError::Malformed(_))));
        // A connection that ends inside a frame is a connection error.
        let mut cut = Vec::new();
        write_frame(&mut cut, &ChunkResponse::Data(vec![7; 100])).unwrap();
        cut.truncate(50);
        assert!(matches!(read_frame::<ChunkResponse>(&mut cut.as_slice()), Err(FrameError::Io(_))));
        // Bytes a message does not use are skipped: the next frame reads fine.
        let mut padded = Vec::new();
        write_frame(&mut padded, &ChunkResponse::Done).unwrap();
        padded[3] += 3;
        padded.extend_from_slice(&[9, 9, 9]);
        write_frame(&mut padded, &ChunkResponse::Version(5)).unwrap();
        let mut stream = padded.as_slice();
        assert!(matches!(read_frame::<ChunkResponse>(&mut stream).unwrap(), ChunkResponse::Done));
        assert!(matches!(read_frame::<ChunkResponse>(&mut stream).unwrap(), ChunkResponse::Version(5)));
    }
}

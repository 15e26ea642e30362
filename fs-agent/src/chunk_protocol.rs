//! The chunk server protocol: `[u32 len (big endian)][bincode payload]` frames over TCP, one
//! request then one response at a time per connection.

use std::io::{self, IoSlice, Read, Write};

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
    /// `Sync` of several chunks at once: one answer once all are durable (an fsync of a file
    /// whose dirty chunks are on this server).
    SyncChunks { chunk_ids: Vec<u64> },
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

/// bincode's index of [`ChunkResponse::Data`] (the frames below are pinned to
/// [`write_frame`]'s by a test).
const DATA_VARIANT: u32 = 2;
/// A `Data` frame's payload before its bytes: the variant index and the byte count.
const DATA_HEADER_BYTES: usize = 4 + 8;

/// Writes the frame of `ChunkResponse::Data(data)` straight from `data`: a 16-byte header
/// and the bytes, in one vectored write where the stream allows, and no copy into a frame
/// buffer (reads are most of the bytes a chunk server sends).
pub fn write_data_frame(stream: &mut impl Write, data: &[u8]) -> Result<(), FrameError> {
    let size = (DATA_HEADER_BYTES + data.len()) as u64;
    if size > MAX_FRAME_BYTES as u64 {
        return Err(FrameError::TooLarge(size.min(u32::MAX as u64) as u32));
    }
    let mut header = [0u8; 4 + DATA_HEADER_BYTES];
    header[..4].copy_from_slice(&(size as u32).to_be_bytes());
    header[4..8].copy_from_slice(&DATA_VARIANT.to_le_bytes());
    header[8..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    let mut slices = [IoSlice::new(&header), IoSlice::new(data)];
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    stream.flush()?;
    Ok(())
}

/// Reads an answer to a `Read`: a `Data` answer of exactly `out.len()` bytes goes straight
/// into `out` (`None`); any other answer (a refusal, a wrong length) is returned as is.
pub fn read_data_frame_into(stream: &mut impl Read, out: &mut [u8]) -> Result<Option<ChunkResponse>, FrameError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    if len as usize == DATA_HEADER_BYTES + out.len() {
        let mut header = [0u8; DATA_HEADER_BYTES];
        stream.read_exact(&mut header)?;
        let variant = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let count = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
        if variant == DATA_VARIANT && count == out.len() as u64 {
            stream.read_exact(out)?;
            return Ok(None);
        }
        // Another answer of that size: decode it whole.
        let mut payload = header.to_vec();
        payload.resize(len as usize, 0);
        stream.read_exact(&mut payload[DATA_HEADER_BYTES..])?;
        return Ok(Some(read_frame(&mut framed(&payload).as_slice())?));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok(Some(read_frame(&mut framed(&payload).as_slice())?))
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 4);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
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

    #[test]
    fn data_frames_match_write_frame_and_read_into_place() {
        for data in [vec![], vec![7u8; 5], (0..70_000u32).map(|i| i as u8).collect::<Vec<u8>>()] {
            let (mut direct, mut framed) = (Vec::new(), Vec::new());
            write_data_frame(&mut direct, &data).unwrap();
            write_frame(&mut framed, &ChunkResponse::Data(data.clone())).unwrap();
            assert_eq!(direct, framed);
            let mut out = vec![0u8; data.len()];
            assert!(read_data_frame_into(&mut direct.as_slice(), &mut out).unwrap().is_none());
            assert_eq!(out, data);
        }
        // A refusal, and data of another length, come back as answers; out is left alone.
        let mut out = [1u8; 3];
        let mut refusal = Vec::new();
        write_frame(&mut refusal, &ChunkResponse::Failed(ChunkFailure::VersionMismatch("old".into()))).unwrap();
        write_data_frame(&mut refusal, &[9u8; 4]).unwrap();
        write_frame(&mut refusal, &ChunkResponse::Version(3)).unwrap();
        let mut stream = refusal.as_slice();
        assert!(matches!(read_data_frame_into(&mut stream, &mut out).unwrap(), Some(ChunkResponse::Failed(ChunkFailure::VersionMismatch(_)))));
        assert!(matches!(read_data_frame_into(&mut stream, &mut out).unwrap(), Some(ChunkResponse::Data(d)) if d == [9u8; 4]));
        // An answer exactly as long as the data expected is decoded, not taken for data.
        let mut out = [1u8; 0];
        assert!(matches!(read_data_frame_into(&mut stream, &mut out).unwrap(), Some(ChunkResponse::Version(3))));
        assert_eq!(out, [1u8; 0]);
        let huge = (MAX_FRAME_BYTES + 1).to_be_bytes();
        assert!(matches!(read_data_frame_into(&mut huge.as_slice(), &mut []), Err(FrameError::TooLarge(_))));
    }
}

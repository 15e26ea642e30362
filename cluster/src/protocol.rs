//! Wire format of the client API: length-prefixed bincode frames over TCP.
//!
//! Every request carries an id chosen by the client and every response echoes it, so one
//! connection carries many requests at once (pipelining) and answers may come out of order.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::state_machine::{
    ApplyError, Command, CommandResult, Event, MemberId, MemberInfo, Op, OpResult, Revision,
    MAX_VALUE_BYTES,
};

/// Largest client frame accepted: one maximal value plus room for the envelope.
pub const MAX_CLIENT_FRAME_BYTES: usize = MAX_VALUE_BYTES * 2 + 64 * 1024;
/// Largest answer a client accepts (a range read of many large values).
pub const MAX_RESPONSE_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// Largest peer frame accepted: snapshots travel in one message.
pub const MAX_PEER_FRAME_BYTES: usize = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Appends a frame to `out` (callers batch several frames into one write).
pub fn encode_frame<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    bincode::serialize_into(&mut *out, value).expect("wire types serialize");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(value, &mut buf);
    writer.write_all(&buf).await?;
    Ok(())
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, FrameError> {
    bincode::deserialize(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    pub response: Result<Response, StoreError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// A command through the Raft log; (client_id, seq) makes retries exactly-once.
    Write {
        client_id: u64,
        seq: u64,
        first_unacknowledged: u64,
        command: Command,
    },
    /// Linearizable read (ReadIndex) of Get/Range operations, on the leader.
    Read {
        ops: Vec<Op>,
    },
    /// Events with revision >= `from_revision` under `prefix`; waits up to `max_wait_ms` for one.
    Watch {
        prefix: String,
        from_revision: Revision,
        max_wait_ms: u64,
        limit: usize,
    },
    Status,
    AddLearner {
        member: MemberInfo,
    },
    Promote {
        id: MemberId,
    },
    RemoveMember {
        id: MemberId,
    },
    /// The cluster CA certificate (public), or None for a cluster without TLS.
    CaCertificate,
    /// A one-time token for a new member of a TLS cluster, valid for `ttl_ms`.
    CreateJoinToken {
        ttl_ms: u64,
    },
    /// A new member presents a join token and a certificate request; it gets its certificate
    /// and the CA, and is added as a learner.
    Join {
        token: String,
        member: MemberInfo,
        csr_pem: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Written(CommandResult),
    Read {
        revision: Revision,
        results: Vec<OpResult>,
    },
    Events {
        events: Vec<Event>,
        revision: Revision,
    },
    Status(StatusReport),
    MembershipChanged {
        members: Vec<MemberStatus>,
    },
    JoinToken {
        token: String,
    },
    CaCertificate {
        pem: Option<String>,
    },
    Joined {
        cert_pem: String,
        ca_pem: String,
        members: Vec<MemberStatus>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    #[error("member {member} is not the leader (leader: {leader:?}): retry there")]
    NotLeader {
        member: MemberId,
        leader: Option<MemberInfo>,
    },
    #[error("timed out waiting for the cluster (no quorum, or a leader change): retry")]
    Timeout,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Rejected(ApplyError),
    #[error("watch from revision {from} is too old: events before {oldest} are compacted; re-read the keys and watch from the revision of that read")]
    Compacted { from: Revision, oldest: Revision },
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub info: MemberInfo,
    pub voter: bool,
    /// Highest log index known replicated to this member (known on the leader only).
    pub matched: Option<u64>,
    /// How many entries this member is behind the leader's last index (leader only).
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub id: MemberId,
    pub role: Role,
    pub leader: Option<MemberId>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub revision: Revision,
    pub members: Vec<MemberStatus>,
}

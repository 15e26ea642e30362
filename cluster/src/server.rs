//! A store member process: the node thread, the peer transport and the client API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::node::{MembershipChange, Node, NodeConfig, NodeInput, NodeShared};
use crate::protocol::{
    decode, encode_frame, read_frame, FrameError, Request, RequestFrame, Response, ResponseFrame,
    StoreError, MAX_CLIENT_FRAME_BYTES,
};
use crate::raft_log::DiskStorage;
use crate::state_machine::{Command, CommandResult, Compare, Op, OpResult, SessionCommand, Txn};
use crate::state_machine::{MemberId, MemberInfo, StateMachine};
use crate::tls::{self, CaMaterial, MemberTls, RESERVED_PREFIX};
use crate::transport::{serve_peers, TcpTransport};

const MEMBER_FILE: &str = "member.json";
/// How long a request waits for the cluster before answering Timeout (the client retries).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_WATCH_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid member file: {reason}")]
    BadMemberFile { path: PathBuf, reason: String },
    #[error(
        "{0} holds no member of a cluster: run `cluster-store init` or `cluster-store join` first"
    )]
    NotInitialized(PathBuf),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        addr: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("member {id} is not among the initial members {members:?}")]
    NotAMember {
        id: MemberId,
        members: Vec<MemberId>,
    },
    #[error("duplicate member id {0} in the initial members")]
    DuplicateMember(MemberId),
    #[error(transparent)]
    Log(#[from] crate::raft_log::RaftLogError),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// This member's identity and addresses, kept in its data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberFile {
    pub member: MemberInfo,
}

fn member_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MEMBER_FILE)
}

fn write_member_file(data_dir: &Path, member: &MemberInfo) -> Result<(), ServerError> {
    let path = member_path(data_dir);
    std::fs::create_dir_all(data_dir).map_err(|source| ServerError::Io {
        action: "create",
        path: data_dir.to_path_buf(),
        source,
    })?;
    let json = serde_json::to_vec_pretty(&MemberFile {
        member: member.clone(),
    })
    .expect("serializes");
    std::fs::write(&path, json).map_err(|source| ServerError::Io {
        action: "write",
        path,
        source,
    })
}

pub fn read_member_file(data_dir: &Path) -> Result<MemberInfo, ServerError> {
    let path = member_path(data_dir);
    if !path.exists() {
        return Err(ServerError::NotInitialized(data_dir.to_path_buf()));
    }
    let bytes = std::fs::read(&path).map_err(|source| ServerError::Io {
        action: "read",
        path: path.clone(),
        source,
    })?;
    let file: MemberFile =
        serde_json::from_slice(&bytes).map_err(|e| ServerError::BadMemberFile {
            path,
            reason: e.to_string(),
        })?;
    Ok(file.member)
}

/// Initializes member `id` of a new cluster whose initial voters are `members` (every initial
/// member runs this with the same list, and the same CA for a TLS cluster).
pub fn init_member(
    data_dir: &Path,
    id: MemberId,
    members: Vec<MemberInfo>,
    ca: Option<&CaMaterial>,
) -> Result<(), ServerError> {
    let mut ids: Vec<MemberId> = members.iter().map(|m| m.id).collect();
    ids.sort();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(ServerError::DuplicateMember(w[0]));
    }
    let me = members
        .iter()
        .find(|m| m.id == id)
        .cloned()
        .ok_or_else(|| ServerError::NotAMember {
            id,
            members: ids.clone(),
        })?;
    let keys = match ca {
        Some(ca) => vec![
            (
                tls::CA_CERT_KEY.to_string(),
                ca.cert_pem.clone().into_bytes(),
            ),
            (tls::CA_KEY_KEY.to_string(), ca.key_pem.clone().into_bytes()),
        ],
        None => vec![],
    };
    if let Some(ca) = ca {
        ca.issue(id, &[&me.peer_addr, &me.client_addr])?
            .write(data_dir)?;
    }
    let state = StateMachine::bootstrap(members, keys);
    DiskStorage::bootstrap(data_dir, ids, state.to_bytes())?;
    write_member_file(data_dir, &me)
}

/// Prepares the data directory of a member joining an existing cluster (it starts empty and
/// receives the log or a snapshot from the leader once added as a learner).
pub fn prepare_join(data_dir: &Path, member: &MemberInfo) -> Result<(), ServerError> {
    if DiskStorage::exists(data_dir) {
        return Err(ServerError::Log(
            crate::raft_log::RaftLogError::AlreadyInitialized(data_dir.to_path_buf()),
        ));
    }
    write_member_file(data_dir, member)
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub snapshot_every: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub fsync: bool,
}

impl ServeOptions {
    pub fn new(data_dir: PathBuf) -> Self {
        let defaults = NodeConfig::new(0, data_dir.clone());
        ServeOptions {
            data_dir,
            snapshot_every: defaults.snapshot_every,
            tick: defaults.tick,
            election_ticks: defaults.election_ticks,
            fsync: true,
        }
    }
}

/// Runs a member until the node thread stops (disk failure) — normally until killed.
pub async fn serve(options: ServeOptions) -> Result<(), ServerError> {
    let me = read_member_file(&options.data_dir)?;
    let peer_listener =
        TcpListener::bind(&me.peer_addr)
            .await
            .map_err(|source| ServerError::Listen {
                addr: me.peer_addr.clone(),
                what: "peers",
                source,
            })?;
    let client_listener =
        TcpListener::bind(&me.client_addr)
            .await
            .map_err(|source| ServerError::Listen {
                addr: me.client_addr.clone(),
                what: "clients",
                source,
            })?;
    let config = NodeConfig {
        id: me.id,
        data_dir: options.data_dir.clone(),
        tick: options.tick,
        election_ticks: options.election_ticks,
        snapshot_every: options.snapshot_every,
        fsync: options.fsync,
    };
    let (inputs, receiver) = std::sync::mpsc::channel::<NodeInput>();
    let member_tls = MemberTls::read(&options.data_dir)?;
    let peer_tls = match &member_tls {
        Some(files) => Some(files.peer_configs()?),
        None => None,
    };
    let client_tls = match &member_tls {
        Some(files) => Some(files.client_api_acceptor()?),
        None => None,
    };
    tracing::info!(tls = peer_tls.is_some(), "peer transport");
    let transport = TcpTransport::new(
        me.id,
        me.peer_addr.clone(),
        tokio::runtime::Handle::current(),
        inputs.clone(),
        peer_tls,
    );
    let (node, shared) = Node::open(config, transport.clone(), (inputs, receiver))?;
    tokio::spawn(serve_peers(peer_listener, transport, shared.inputs.clone()));
    let api = Arc::new(ClientApi {
        shared: shared.clone(),
        ca_pem: member_tls.map(|t| t.ca_pem),
        acceptor: client_tls,
    });
    tokio::spawn(serve_clients(client_listener, api));
    tracing::info!(id = me.id, peer = %me.peer_addr, client = %me.client_addr, "member serving");
    let node_thread = std::thread::Builder::new()
        .name(format!("raft-{}", me.id))
        .spawn(move || node.run())
        .expect("spawn");
    let result = tokio::task::spawn_blocking(move || node_thread.join()).await;
    match result {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.into()),
        _ => panic!("raft node thread panicked"),
    }
}

/// What the client API serves with.
struct ClientApi {
    shared: NodeShared,
    /// The cluster CA, in a TLS cluster.
    ca_pem: Option<String>,
    /// TLS for clients that ask for it (server authentication), in a TLS cluster.
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

async fn serve_clients(listener: TcpListener, api: Arc<ClientApi>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle_connection(stream, api.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "client accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// TLS record type of a handshake: how a TLS client's first byte looks.
const TLS_HANDSHAKE: u8 = 0x16;

async fn handle_connection(stream: TcpStream, api: Arc<ClientApi>) {
    // A TLS cluster serves TLS and plain clients on one port, told apart by the first byte.
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first)).await
    {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE && api.acceptor.is_some(),
        _ => return,
    };
    let (read_half, write_half): (
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ) = if is_tls {
        let acceptor = api.acceptor.clone().expect("checked above");
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
            _ => return,
        }
    } else {
        let (r, w) = stream.into_split();
        (Box::new(r), Box::new(w))
    };
    // Secrets (join tokens) travel only over TLS; a cluster without TLS has none to give.
    let secure = is_tls || api.acceptor.is_none();
    let mut write_half = write_half;
    let (tx, mut rx) = mpsc::unbounded_channel::<ResponseFrame>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(first) = rx.recv().await {
            buf.clear();
            encode_frame(&first, &mut buf);
            while let Ok(next) = rx.try_recv() {
                encode_frame(&next, &mut buf);
            }
            if write_half.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    loop {
        let bytes = match read_frame(&mut reader, MAX_CLIENT_FRAME_BYTES).await {
            Ok(b) => b,
            Err(FrameError::Closed) => break,
            Err(e) => {
                // The stream is out of sync after a bad frame: say why, then close.
                let _ = tx.send(ResponseFrame {
                    id: 0,
                    response: Err(StoreError::BadRequest(e.to_string())),
                });
                break;
            }
        };
        let frame: RequestFrame = match decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(ResponseFrame {
                    id: 0,
                    response: Err(StoreError::BadRequest(e.to_string())),
                });
                break;
            }
        };
        let api = api.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let response = match frame.request {
                Request::CaCertificate => Ok(Response::CaCertificate { pem: api.ca_pem.clone() }),
                Request::CreateJoinToken { .. } | Request::Join { .. } if !secure => Err(StoreError::BadRequest(
                    "join tokens travel only over TLS: connect with the cluster CA (--ca-file, or `join --token`, which fetches and checks it)".into(),
                )),
                request => handle_request(request, &api.shared).await,
            };
            let _ = tx.send(ResponseFrame {
                id: frame.id,
                response,
            });
        });
    }
    drop(tx);
    let _ = writer.await;
}

async fn ask<T>(
    shared: &NodeShared,
    make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> NodeInput,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    shared
        .inputs
        .send(make(reply))
        .map_err(|_| StoreError::Unavailable("raft node stopped".into()))?;
    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(StoreError::Timeout),
        Err(_) => Err(StoreError::Timeout),
    }
}

pub async fn handle_request(request: Request, shared: &NodeShared) -> Result<Response, StoreError> {
    match request {
        Request::Write {
            client_id,
            seq,
            first_unacknowledged,
            command,
        } => {
            if client_id == 0 {
                return Err(StoreError::BadRequest(
                    "client id 0 is reserved for the store itself".into(),
                ));
            }
            command.validate().map_err(StoreError::Rejected)?;
            refuse_reserved(&command)?;
            let command = SessionCommand {
                client_id,
                seq,
                first_unacknowledged,
                command,
            };
            ask(shared, |reply| NodeInput::Propose { command, reply })
                .await
                .map(Response::Written)
        }
        Request::Read { ops } => {
            for op in &ops {
                if !op.is_read_only() {
                    return Err(StoreError::BadRequest(format!(
                        "{op:?} is not a read: send it as a write"
                    )));
                }
                crate::state_machine::validate_op(op).map_err(StoreError::Rejected)?;
                if let Op::Get { key } = op {
                    if key.starts_with(RESERVED_PREFIX) {
                        return Err(reserved_error(key));
                    }
                }
            }
            let (revision, mut results) =
                ask(shared, |reply| NodeInput::Read { ops, reply }).await?;
            for result in &mut results {
                if let OpResult::Range { kvs, .. } = result {
                    kvs.retain(|kv| !kv.key.starts_with(RESERVED_PREFIX));
                }
            }
            Ok(Response::Read { revision, results })
        }
        Request::Watch {
            prefix,
            from_revision,
            max_wait_ms,
            limit,
        } => {
            let deadline = Instant::now() + Duration::from_millis(max_wait_ms).min(MAX_WATCH_WAIT);
            let mut changes = shared.history.subscribe();
            loop {
                let (mut events, revision) = shared.history.since(&prefix, from_revision, limit)?;
                events.retain(|e| !e.kv.key.starts_with(RESERVED_PREFIX));
                if !events.is_empty() || Instant::now() >= deadline {
                    return Ok(Response::Events { events, revision });
                }
                if tokio::time::timeout_at(deadline.into(), changes.changed())
                    .await
                    .is_err()
                {
                    let (mut events, revision) =
                        shared.history.since(&prefix, from_revision, limit)?;
                    events.retain(|e| !e.kv.key.starts_with(RESERVED_PREFIX));
                    return Ok(Response::Events { events, revision });
                }
            }
        }
        Request::Status => {
            let (reply, answer) = oneshot::channel();
            shared
                .inputs
                .send(NodeInput::Status { reply })
                .map_err(|_| StoreError::Unavailable("raft node stopped".into()))?;
            match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                Ok(Ok(status)) => Ok(Response::Status(status)),
                _ => Err(StoreError::Timeout),
            }
        }
        Request::AddLearner { member } => {
            if member.id == 0 || member.peer_addr.is_empty() || member.client_addr.is_empty() {
                return Err(StoreError::BadRequest(
                    "a member needs a non-zero id, a peer address and a client address".into(),
                ));
            }
            membership(shared, MembershipChange::AddLearner(member)).await
        }
        Request::Promote { id } => membership(shared, MembershipChange::Promote(id)).await,
        Request::RemoveMember { id } => membership(shared, MembershipChange::Remove(id)).await,
        Request::CaCertificate => Err(StoreError::BadRequest(
            "the CA certificate is served by the client API only".into(),
        )),
        Request::CreateJoinToken { ttl_ms } => create_join_token(shared, ttl_ms).await,
        Request::Join {
            token,
            member,
            csr_pem,
        } => join(shared, token, member, csr_pem).await,
    }
}

fn reserved_error(key: &str) -> StoreError {
    StoreError::BadRequest(format!("key {key:?} is under {RESERVED_PREFIX}, which is reserved for the store itself: pick another key"))
}

/// Clients may not touch the store's own keys (CA, join tokens).
fn refuse_reserved(command: &Command) -> Result<(), StoreError> {
    let Command::Txn(txn) = command else {
        return Ok(());
    };
    for compare in &txn.compare {
        let key = match compare {
            Compare::ModRevision { key, .. }
            | Compare::Value { key, .. }
            | Compare::Exists { key }
            | Compare::Missing { key } => key,
        };
        if key.starts_with(RESERVED_PREFIX) {
            return Err(reserved_error(key));
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key }
                if key.starts_with(RESERVED_PREFIX) =>
            {
                return Err(reserved_error(key))
            }
            Op::DeleteRange { start, end } | Op::Range { start, end, .. } => {
                let reaches = end.as_deref().is_none_or(|e| e > RESERVED_PREFIX);
                let starts_before_end = start.as_str() < "/_store0";
                if reaches && starts_before_end && matches!(op, Op::DeleteRange { .. }) {
                    return Err(reserved_error(start));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

async fn internal_write(
    shared: &NodeShared,
    command: Command,
) -> Result<CommandResult, StoreError> {
    let seq = shared
        .next_internal_seq
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    // first_unacknowledged 0: internal writes may overlap, so none of their answers is dropped.
    let command = SessionCommand {
        client_id: shared.internal_client_id,
        seq,
        first_unacknowledged: 0,
        command,
    };
    ask(shared, |reply| NodeInput::Propose { command, reply }).await
}

async fn internal_get(shared: &NodeShared, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let ops = vec![Op::Get {
        key: key.to_string(),
    }];
    let (_, mut results) = ask(shared, |reply| NodeInput::Read { ops, reply }).await?;
    match results.pop() {
        Some(OpResult::Get(kv)) => Ok(kv.map(|kv| kv.value)),
        _ => Err(StoreError::Unavailable("unexpected read result".into())),
    }
}

async fn cluster_ca(shared: &NodeShared) -> Result<CaMaterial, StoreError> {
    let cert = internal_get(shared, tls::CA_CERT_KEY).await?;
    let key = internal_get(shared, tls::CA_KEY_KEY).await?;
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(CaMaterial {
            cert_pem: String::from_utf8_lossy(&cert).into_owned(),
            key_pem: String::from_utf8_lossy(&key).into_owned(),
        }),
        _ => Err(StoreError::BadRequest(
            "this cluster was initialized without a CA (no TLS): join it with `cluster-store join` without --token".into(),
        )),
    }
}

async fn create_join_token(shared: &NodeShared, ttl_ms: u64) -> Result<Response, StoreError> {
    let ca = cluster_ca(shared).await?;
    let fingerprint =
        tls::fingerprint(&ca.cert_pem).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let secret = tls::hex(&rand::random::<[u8; 32]>());
    let lease = match internal_write(shared, Command::LeaseGrant { ttl_ms }).await? {
        CommandResult::LeaseGranted { id, .. } => id,
        other => {
            return Err(StoreError::Unavailable(format!(
                "unexpected answer {other:?}"
            )))
        }
    };
    let key = format!(
        "{}{}",
        tls::JOIN_TOKEN_PREFIX,
        tls::sha256_hex(secret.as_bytes())
    );
    let put = Op::Put {
        key,
        value: vec![],
        lease: Some(lease),
    };
    internal_write(
        shared,
        Command::Txn(Txn {
            compare: vec![],
            success: vec![put],
            failure: vec![],
        }),
    )
    .await?;
    Ok(Response::JoinToken {
        token: format!("{secret}.{fingerprint}"),
    })
}

async fn join(
    shared: &NodeShared,
    token: String,
    member: MemberInfo,
    csr_pem: String,
) -> Result<Response, StoreError> {
    let Some((secret, fingerprint)) = token.split_once('.') else {
        return Err(StoreError::BadRequest("malformed join token: expected SECRET.CA_FINGERPRINT from `cluster-store token-create`".into()));
    };
    let ca = cluster_ca(shared).await?;
    if tls::fingerprint(&ca.cert_pem).ok().as_deref() != Some(fingerprint) {
        return Err(StoreError::BadRequest(
            "this join token was made for another cluster (CA fingerprint differs)".into(),
        ));
    }
    // Sign before consuming the token, so a bad request does not burn it.
    let cert_pem = ca
        .sign_request(
            member.id,
            &[&member.peer_addr, &member.client_addr],
            &csr_pem,
        )
        .map_err(|e| {
            StoreError::BadRequest(format!(
                "cannot issue a certificate to member {}: {e}",
                member.id
            ))
        })?;
    let key = format!(
        "{}{}",
        tls::JOIN_TOKEN_PREFIX,
        tls::sha256_hex(secret.as_bytes())
    );
    let consume = Txn {
        compare: vec![Compare::Exists { key: key.clone() }],
        success: vec![Op::Delete { key }],
        failure: vec![],
    };
    match internal_write(shared, Command::Txn(consume)).await? {
        CommandResult::Txn(result) if result.succeeded => {}
        _ => {
            return Err(StoreError::BadRequest(
                "join token is unknown, already used or expired: create a new one with `cluster-store token-create`".into(),
            ))
        }
    }
    let members = match membership(shared, MembershipChange::AddLearner(member)).await? {
        Response::MembershipChanged { members } => members,
        other => {
            return Err(StoreError::Unavailable(format!(
                "unexpected answer {other:?}"
            )))
        }
    };
    Ok(Response::Joined {
        cert_pem,
        ca_pem: ca.cert_pem,
        members,
    })
}

async fn membership(shared: &NodeShared, change: MembershipChange) -> Result<Response, StoreError> {
    ask(shared, |reply| NodeInput::Membership { change, reply })
        .await
        .map(|members| Response::MembershipChanged { members })
}

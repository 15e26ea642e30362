//! Raft messages between members over TCP: one outgoing connection per peer, frames of
//! `[u32 len][protobuf Message]`. A lost message is fine (Raft resends), so on any error the
//! link drops its connection and queue and reconnects on the next message.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::tls::PeerTls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::node::{NodeInput, PeerTransport};
use crate::protocol::{read_frame, FrameError, MAX_PEER_FRAME_BYTES};
use crate::state_machine::{MemberId, MemberInfo};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A peer that does not drain its socket (paused, partitioned) for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

struct Link {
    addr: String,
    queue: mpsc::UnboundedSender<Message>,
}

/// Outgoing side of the transport, driven from the node thread. Clones share the links.
#[derive(Clone)]
pub struct TcpTransport {
    self_id: MemberId,
    self_peer_addr: String,
    runtime: tokio::runtime::Handle,
    links: Arc<Mutex<BTreeMap<MemberId, Link>>>,
    node_inputs: std::sync::mpsc::Sender<NodeInput>,
    /// Mutual TLS between members, when the cluster was initialized with a CA.
    tls: Option<PeerTls>,
}

impl TcpTransport {
    pub fn new(
        self_id: MemberId,
        self_peer_addr: String,
        runtime: tokio::runtime::Handle,
        node_inputs: std::sync::mpsc::Sender<NodeInput>,
        tls: Option<PeerTls>,
    ) -> Self {
        TcpTransport {
            self_id,
            self_peer_addr,
            runtime,
            links: Arc::default(),
            node_inputs,
            tls,
        }
    }

    fn add_link(&self, links: &mut BTreeMap<MemberId, Link>, id: MemberId, addr: &str) {
        let (tx, rx) = mpsc::unbounded_channel();
        links.insert(
            id,
            Link {
                addr: addr.to_string(),
                queue: tx,
            },
        );
        let hello = Hello {
            from: self.self_id,
            peer_addr: self.self_peer_addr.clone(),
        };
        self.runtime.spawn(run_link(
            id,
            addr.to_string(),
            hello,
            rx,
            self.node_inputs.clone(),
            self.tls.clone(),
        ));
    }

    /// A peer said hello: a member that does not know the cluster yet (a new member before its
    /// first snapshot) learns where to answer.
    fn learn(&self, hello: &Hello) {
        if hello.from == self.self_id || hello.from == 0 {
            return;
        }
        let mut links = self.links.lock().expect("links lock");
        if !links.contains_key(&hello.from) {
            tracing::debug!(peer = hello.from, addr = %hello.peer_addr, "learned peer address from its hello");
            self.add_link(&mut links, hello.from, &hello.peer_addr);
        }
    }
}

/// First frame on every peer connection: who is calling, and where to call back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Hello {
    from: MemberId,
    peer_addr: String,
}

impl PeerTransport for TcpTransport {
    fn send(&self, messages: Vec<Message>) {
        let links = self.links.lock().expect("links lock");
        for message in messages {
            let to = message.to;
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let sent = links
                .get(&to)
                .map(|l| l.queue.send(message).is_ok())
                .unwrap_or(false);
            if !sent {
                if is_snapshot {
                    let _ = self
                        .node_inputs
                        .send(NodeInput::SnapshotSent { to, ok: false });
                }
                tracing::trace!(to, "no link to member, message dropped");
            }
        }
    }

    fn set_members(&self, members: &BTreeMap<MemberId, MemberInfo>) {
        let mut links = self.links.lock().expect("links lock");
        // An empty member list means "not known yet": keep the links learned from hellos.
        if !members.is_empty() {
            links.retain(|id, link| members.get(id).is_some_and(|m| m.peer_addr == link.addr));
        }
        for (id, member) in members {
            if *id == self.self_id || links.contains_key(id) {
                continue;
            }
            self.add_link(&mut links, *id, &member.peer_addr);
        }
    }
}

async fn run_link(
    to: MemberId,
    addr: String,
    hello: Hello,
    mut queue: mpsc::UnboundedReceiver<Message>,
    node_inputs: std::sync::mpsc::Sender<NodeInput>,
    tls: Option<PeerTls>,
) {
    let mut connection: Option<Box<dyn AsyncWrite + Unpin + Send>> = None;
    let mut buf = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match queue.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots: Vec<MemberId> = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        let connected_now = connection.is_none();
        if connection.is_none() {
            match tokio::time::timeout(
                CONNECT_TIMEOUT,
                connect(&hello.peer_addr, &addr, tls.as_ref()),
            )
            .await
            {
                Ok(Ok(stream)) => connection = Some(stream),
                outcome => {
                    let reason = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::debug!(to, %addr, %reason, "cannot connect to peer");
                    fail(&node_inputs, to, &snapshots);
                    // Drop what piled up meanwhile: Raft resends what still matters.
                    while queue.try_recv().is_ok() {}
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        buf.clear();
        if connected_now {
            crate::protocol::encode_frame(&hello, &mut buf);
        }
        for message in &batch {
            let bytes = message.write_to_bytes().expect("raft message encodes");
            buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(&bytes);
        }
        let stream = connection.as_mut().expect("connected above");
        match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&buf)).await {
            Ok(Ok(())) => {
                for to in snapshots {
                    let _ = node_inputs.send(NodeInput::SnapshotSent { to, ok: true });
                }
            }
            _ => {
                tracing::debug!(to, %addr, "peer connection failed, dropping it");
                connection = None;
                fail(&node_inputs, to, &snapshots);
                while queue.try_recv().is_ok() {}
            }
        }
    }
}

/// The member id in a member certificate's common name (`member-<id>`).
fn certificate_member_id(der: &rustls::pki_types::CertificateDer<'_>) -> Option<MemberId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix("member-")?.parse().ok()
}

/// Connects (and, in a TLS cluster, shakes hands presenting this member's certificate).
async fn connect(
    own_addr: &str,
    addr: &str,
    tls: Option<&PeerTls>,
) -> std::io::Result<Box<dyn AsyncWrite + Unpin + Send>> {
    let stream = connect_from(own_addr, addr).await?;
    stream.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(stream)),
        Some(tls) => {
            let name = crate::tls::server_name(addr)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            Ok(Box::new(tls.connector.connect(name, stream).await?))
        }
    }
}

/// Connects from this member's own peer IP, so that a member's traffic can be told apart (and
/// cut, in partition tests) by address even when all members share one loopback.
async fn connect_from(own_addr: &str, addr: &str) -> std::io::Result<TcpStream> {
    let remote: std::net::SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => return TcpStream::connect(addr).await,
    };
    let socket = match remote {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Ok(own) = own_addr.parse::<std::net::SocketAddr>() {
        if own.is_ipv4() == remote.is_ipv4() && !own.ip().is_unspecified() {
            socket.bind(std::net::SocketAddr::new(own.ip(), 0))?;
        }
    }
    socket.connect(remote).await
}

fn fail(node_inputs: &std::sync::mpsc::Sender<NodeInput>, to: MemberId, snapshots: &[MemberId]) {
    let _ = node_inputs.send(NodeInput::Unreachable(to));
    for to in snapshots {
        let _ = node_inputs.send(NodeInput::SnapshotSent { to: *to, ok: false });
    }
}

/// Accepts peer connections and feeds their messages to the node.
pub async fn serve_peers(
    listener: TcpListener,
    transport: TcpTransport,
    node_inputs: std::sync::mpsc::Sender<NodeInput>,
) {
    let tls = transport.tls.clone();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inputs = node_inputs.clone();
        let transport = transport.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // In a TLS cluster: the member id its certificate was issued to.
            let mut certified_id = None;
            let stream: Box<dyn AsyncRead + Unpin + Send> = match tls {
                None => Box::new(stream),
                Some(tls) => {
                    match tokio::time::timeout(CONNECT_TIMEOUT * 4, tls.acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => {
                            certified_id = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| certificate_member_id(c));
                            if certified_id.is_none() {
                                tracing::warn!(%remote, "peer certificate names no member, closing");
                                return;
                            }
                            Box::new(s)
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%remote, error = %e, "peer TLS handshake refused (certificate not from this cluster's CA?)");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            let mut reader = BufReader::with_capacity(256 * 1024, stream);
            let hello = match read_frame(&mut reader, 64 * 1024)
                .await
                .map(|b| crate::protocol::decode::<Hello>(&b))
            {
                Ok(Ok(hello)) => hello,
                _ => {
                    tracing::warn!(%remote, "peer connection without a valid hello, closing");
                    return;
                }
            };
            if certified_id.is_some() && certified_id != Some(hello.from) {
                tracing::warn!(%remote, claimed = hello.from, certified = ?certified_id, "peer claims another member's id, closing");
                return;
            }
            transport.learn(&hello);
            loop {
                match read_frame(&mut reader, MAX_PEER_FRAME_BYTES).await {
                    Ok(bytes) => match Message::parse_from_bytes(&bytes) {
                        Ok(message) => {
                            if inputs.send(NodeInput::Raft(Box::new(message))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%remote, error = %e, "malformed raft message from peer, closing");
                            return;
                        }
                    },
                    Err(FrameError::Closed) => return,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "peer connection closed");
                        return;
                    }
                }
            }
        });
    }
}

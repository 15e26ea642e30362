//! Client library: finds the leader, retries through failures, and never applies a write twice.
//!
//! Each `Client` has a random client id; each write gets the next sequence number and keeps it
//! across retries, and the state machine answers a retried (client id, seq) from its session
//! instead of applying it again. One TCP connection per member carries any number of
//! concurrent requests (clone the `Client` freely: clones share connections and the session).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::{
    decode, encode_frame, read_frame, MemberStatus, Request, RequestFrame, Response, ResponseFrame,
    StatusReport, StoreError, MAX_RESPONSE_FRAME_BYTES,
};
use crate::state_machine::{
    prefix_end, ApplyError, Command, CommandResult, Compare, Event, KeyValue, LeaseId, MemberId,
    MemberInfo, Op, OpResult, Revision, Txn, TxnResult,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A definite answer from the store (bad input, failed precondition...): retrying won't help.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No member answered in time; a write's outcome is unknown (it may still apply, once).
    #[error("no member of {endpoints:?} answered within {waited:?} (last error: {last_error}); is a majority of the cluster up?")]
    Unavailable {
        endpoints: Vec<String>,
        waited: Duration,
        last_error: String,
    },
    #[error("no endpoints given: pass the client address of at least one member")]
    NoEndpoints,
    #[error("unexpected answer from the store: {0}")]
    Protocol(String),
    #[error("bad cluster CA certificate: {0}")]
    Tls(String),
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long one attempt waits for an answer.
    pub attempt_timeout: Duration,
    /// How long a call keeps retrying before giving up.
    pub total_timeout: Duration,
    /// Talk only to the given endpoints, never to a leader they point at (tests use this to
    /// address one member).
    pub pinned: bool,
    /// The cluster CA (PEM): when set, every connection is TLS and checks the member's
    /// certificate against it.
    pub tls_ca_pem: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            attempt_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(30),
            pinned: false,
            tls_ca_pem: None,
        }
    }
}

/// Exactly-once bookkeeping: the client id, its next sequence number, the ones awaiting answers.
struct Session {
    client_id: u64,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
}

impl Session {
    fn new(client_id: u64) -> Self {
        Session {
            client_id,
            next_seq: 1,
            in_flight: BTreeSet::new(),
        }
    }
}

fn new_client_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Response, StoreError>>>>>;

struct Connection {
    next_id: AtomicU64,
    pending: Pending,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    alive: Arc<AtomicBool>,
}

impl Connection {
    async fn open(
        addr: &str,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> std::io::Result<Connection> {
        let stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        let (read_half, mut write_half): (
            Box<dyn AsyncRead + Unpin + Send>,
            Box<dyn AsyncWrite + Unpin + Send>,
        ) = match tls {
            None => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(connector) => {
                let name = crate::tls::server_name(addr).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                })?;
                let tls =
                    tokio::time::timeout(Duration::from_secs(2), connector.connect(name, stream))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "TLS handshake timed out",
                            )
                        })??;
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        };
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (writer, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer_alive = alive.clone();
        tokio::spawn(async move {
            while let Some(mut buf) = outgoing.recv().await {
                while let Ok(more) = outgoing.try_recv() {
                    buf.extend_from_slice(&more);
                }
                if write_half.write_all(&buf).await.is_err() {
                    writer_alive.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
        let reader_pending = pending.clone();
        let reader_alive = alive.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(64 * 1024, read_half);
            while let Ok(bytes) = read_frame(&mut reader, MAX_RESPONSE_FRAME_BYTES).await {
                let Ok(frame) = decode::<ResponseFrame>(&bytes) else {
                    break;
                };
                if let Some(reply) = reader_pending
                    .lock()
                    .expect("pending lock")
                    .remove(&frame.id)
                {
                    let _ = reply.send(frame.response);
                }
            }
            reader_alive.store(false, Ordering::SeqCst);
            // Dropping the senders fails every waiting call.
            reader_pending.lock().expect("pending lock").clear();
        });
        Ok(Connection {
            next_id: AtomicU64::new(1),
            pending,
            writer,
            alive,
        })
    }

    /// Ok(answer) or Err(reason the connection failed / timed out).
    async fn call(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Result<Response, StoreError>, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, reply);
        let mut buf = Vec::new();
        encode_frame(&RequestFrame { id, request }, &mut buf);
        if self.writer.send(buf).is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err("connection closed".into());
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err("connection closed".into()),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}

struct Inner {
    endpoints: Mutex<Vec<String>>,
    target: Mutex<usize>,
    connections: tokio::sync::Mutex<HashMap<String, Arc<Connection>>>,
    session: Mutex<Session>,
    options: ClientOptions,
    tls: Option<tokio_rustls::TlsConnector>,
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A client of the cluster reachable at any of `endpoints` (members' client addresses).
    /// Connects lazily: this never fails for an unreachable cluster, the first call does.
    pub fn new(endpoints: Vec<String>) -> Result<Client, ClientError> {
        Self::with_options(endpoints, ClientOptions::default())
    }

    pub fn with_options(
        endpoints: Vec<String>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let client_id = new_client_id();
        let tls = match &options.tls_ca_pem {
            Some(pem) => Some(tokio_rustls::TlsConnector::from(
                crate::tls::client_config(pem).map_err(|e| ClientError::Tls(e.to_string()))?,
            )),
            None => None,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: Mutex::new(endpoints),
                target: Mutex::new(0),
                connections: Default::default(),
                session: Mutex::new(Session::new(client_id)),
                options,
                tls,
            }),
        })
    }

    pub fn client_id(&self) -> u64 {
        self.inner.session.lock().expect("session lock").client_id
    }

    fn current_endpoint(&self) -> String {
        let endpoints = self.inner.endpoints.lock().expect("endpoints lock");
        let target = *self.inner.target.lock().expect("target lock");
        endpoints[target % endpoints.len()].clone()
    }

    fn rotate(&self) {
        let n = self.inner.endpoints.lock().expect("endpoints lock").len();
        let mut target = self.inner.target.lock().expect("target lock");
        *target = (*target + 1) % n;
    }

    /// Adds members' client addresses to the endpoints, so the client still finds the cluster
    /// after the members it was given are gone.
    fn learn_members(&self, members: &[MemberStatus]) {
        if self.inner.options.pinned {
            return;
        }
        let mut endpoints = self.inner.endpoints.lock().expect("endpoints lock");
        for m in members {
            if !m.info.client_addr.is_empty() && !endpoints.contains(&m.info.client_addr) {
                endpoints.push(m.info.client_addr.clone());
            }
        }
    }

    fn prefer(&self, addr: &str) {
        let mut endpoints = self.inner.endpoints.lock().expect("endpoints lock");
        let index = match endpoints.iter().position(|e| e == addr) {
            Some(i) => i,
            None => {
                endpoints.push(addr.to_string());
                endpoints.len() - 1
            }
        };
        *self.inner.target.lock().expect("target lock") = index;
    }

    async fn connection(&self, addr: &str) -> Result<Arc<Connection>, String> {
        let mut connections = self.inner.connections.lock().await;
        if let Some(c) = connections.get(addr) {
            if c.alive.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(
            Connection::open(addr, self.inner.tls.as_ref())
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?,
        );
        connections.insert(addr.to_string(), c.clone());
        // Learn the current members from each newly reached member, in the background.
        let client = self.clone();
        let probe = c.clone();
        let timeout = self.inner.options.attempt_timeout;
        tokio::spawn(async move {
            if let Ok(Ok(Response::Status(status))) = probe.call(Request::Status, timeout).await {
                client.learn_members(&status.members);
            }
        });
        Ok(c)
    }

    async fn drop_connection(&self, addr: &str) {
        self.inner.connections.lock().await.remove(addr);
    }

    /// Sends `request` (rebuilt per attempt) to the leader, following hints and retrying.
    async fn call(&self, make: impl Fn() -> Request) -> Result<Response, ClientError> {
        let started = Instant::now();
        let mut last_error = String::new();
        let mut attempt = 0u32;
        loop {
            if started.elapsed() >= self.inner.options.total_timeout {
                return Err(ClientError::Unavailable {
                    endpoints: self.inner.endpoints.lock().expect("endpoints lock").clone(),
                    waited: started.elapsed(),
                    last_error,
                });
            }
            if attempt > 0 {
                let backoff = Duration::from_millis((10u64 << attempt.min(5)).min(200));
                tokio::time::sleep(backoff).await;
            }
            attempt += 1;
            let addr = self.current_endpoint();
            let connection = match self.connection(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    last_error = e;
                    self.rotate();
                    continue;
                }
            };
            match connection
                .call(make(), self.inner.options.attempt_timeout)
                .await
            {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(StoreError::NotLeader { leader, member })) => {
                    last_error = format!("member {member} at {addr} is not the leader");
                    match leader {
                        Some(info) if info.client_addr != addr && !self.inner.options.pinned => {
                            self.prefer(&info.client_addr);
                            attempt = 0; // a fresh hint: no backoff
                        }
                        _ => self.rotate(),
                    }
                }
                Ok(Err(e @ (StoreError::Timeout | StoreError::Unavailable(_)))) => {
                    last_error = format!("{addr}: {e}");
                    self.rotate();
                }
                Ok(Err(e)) => return Err(ClientError::Store(e)),
                Err(e) => {
                    last_error = format!("{addr}: {e}");
                    self.drop_connection(&addr).await;
                    self.rotate();
                }
            }
        }
    }

    /// Runs a command through the log exactly once, whatever the retries.
    pub async fn write(&self, command: Command) -> Result<CommandResult, ClientError> {
        match self.write_once(&command).await {
            Err(ClientError::Store(StoreError::Rejected(ApplyError::SessionExpired {
                client_id,
                ..
            }))) => {
                // The store forgot this idle client and applied nothing: start a new session.
                {
                    let mut session = self.inner.session.lock().expect("session lock");
                    if session.client_id == client_id {
                        *session = Session::new(new_client_id());
                    }
                }
                self.write_once(&command).await
            }
            other => other,
        }
    }

    async fn write_once(&self, command: &Command) -> Result<CommandResult, ClientError> {
        let (client_id, seq) = {
            let mut session = self.inner.session.lock().expect("session lock");
            let seq = session.next_seq;
            session.next_seq += 1;
            session.in_flight.insert(seq);
            (session.client_id, seq)
        };
        let result = self
            .call(|| {
                let session = self.inner.session.lock().expect("session lock");
                // A request of a replaced session only vouches for itself.
                let first_unacknowledged = match session.client_id == client_id {
                    true => *session.in_flight.first().unwrap_or(&seq),
                    false => seq,
                };
                Request::Write {
                    client_id,
                    seq,
                    first_unacknowledged,
                    command: command.clone(),
                }
            })
            .await;
        {
            let mut session = self.inner.session.lock().expect("session lock");
            if session.client_id == client_id {
                session.in_flight.remove(&seq);
            }
        }
        match result? {
            Response::Written(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResult, ClientError> {
        match self.write(Command::Txn(txn)).await? {
            CommandResult::Txn(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Puts a value; returns the new store revision.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<Revision, ClientError> {
        self.put_with_lease(key, value, None).await
    }

    pub async fn put_with_lease(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, ClientError> {
        let op = Op::Put {
            key: key.to_string(),
            value: value.into(),
            lease,
        };
        Ok(self
            .txn(Txn {
                compare: vec![],
                success: vec![op],
                failure: vec![],
            })
            .await?
            .revision)
    }

    /// Deletes a key; true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, ClientError> {
        let r = self
            .txn(Txn {
                compare: vec![],
                success: vec![Op::Delete { key: key.into() }],
                failure: vec![],
            })
            .await?;
        Ok(matches!(r.results.first(), Some(OpResult::Delete { deleted }) if !deleted.is_empty()))
    }

    /// Sets `key` to `new` only if it currently holds `expected` (`None` = does not exist).
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: impl Into<Vec<u8>>,
    ) -> Result<bool, ClientError> {
        let compare = match expected {
            Some(v) => Compare::Value {
                key: key.into(),
                equals: v.to_vec(),
            },
            None => Compare::Missing { key: key.into() },
        };
        let op = Op::Put {
            key: key.into(),
            value: new.into(),
            lease: None,
        };
        Ok(self
            .txn(Txn {
                compare: vec![compare],
                success: vec![op],
                failure: vec![],
            })
            .await?
            .succeeded)
    }

    /// Linearizable reads (ReadIndex on the leader); returns the revision they saw.
    pub async fn read(&self, ops: Vec<Op>) -> Result<(Revision, Vec<OpResult>), ClientError> {
        match self.call(|| Request::Read { ops: ops.clone() }).await? {
            Response::Read { revision, results } => Ok((revision, results)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, ClientError> {
        match self.read(vec![Op::Get { key: key.into() }]).await?.1.pop() {
            Some(OpResult::Get(kv)) => Ok(kv),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Every key under `prefix` (at most `limit`, 0 = all) and the revision of the read.
    pub async fn list_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<(Revision, Vec<KeyValue>), ClientError> {
        let op = Op::Range {
            start: prefix.into(),
            end: prefix_end(prefix),
            limit,
        };
        let (revision, mut results) = self.read(vec![op]).await?;
        match results.pop() {
            Some(OpResult::Range { kvs, .. }) => Ok((revision, kvs)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, ClientError> {
        match self
            .write(Command::LeaseGrant {
                ttl_ms: ttl.as_millis() as u64,
            })
            .await?
        {
            CommandResult::LeaseGranted { id, .. } => Ok(id),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), ClientError> {
        self.write(Command::LeaseKeepAlive { id }).await.map(|_| ())
    }

    pub async fn lease_revoke(&self, id: LeaseId) -> Result<(), ClientError> {
        self.write(Command::LeaseRevoke { id }).await.map(|_| ())
    }

    /// Events under `prefix` from `from_revision` (0 = from now), waiting up to `max_wait` for
    /// one; returns them and the revision to pass next time (last seen + 1).
    pub async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
        max_wait: Duration,
    ) -> Result<(Vec<Event>, Revision), ClientError> {
        let request = || Request::Watch {
            prefix: prefix.into(),
            from_revision,
            max_wait_ms: max_wait.as_millis() as u64,
            limit: 1000,
        };
        match self.call(request).await? {
            Response::Events { events, revision } => {
                let next = match events.last() {
                    Some(e) => e.revision + 1,
                    None if from_revision == 0 => revision + 1,
                    None => from_revision,
                };
                Ok((events, next))
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Status of the member at `addr` (not necessarily the leader).
    pub async fn status_of(&self, addr: &str) -> Result<StatusReport, ClientError> {
        let connection = self
            .connection(addr)
            .await
            .map_err(|e| ClientError::Unavailable {
                endpoints: vec![addr.into()],
                waited: Duration::ZERO,
                last_error: e,
            })?;
        match connection
            .call(Request::Status, self.inner.options.attempt_timeout)
            .await
        {
            Ok(Ok(Response::Status(s))) => {
                self.learn_members(&s.members);
                Ok(s)
            }
            Ok(Ok(other)) => Err(ClientError::Protocol(format!("{other:?}"))),
            Ok(Err(e)) => Err(ClientError::Store(e)),
            Err(e) => {
                self.drop_connection(addr).await;
                Err(ClientError::Unavailable {
                    endpoints: vec![addr.into()],
                    waited: Duration::ZERO,
                    last_error: e,
                })
            }
        }
    }

    /// Status as the leader sees it (with each member's lag).
    pub async fn leader_status(&self) -> Result<StatusReport, ClientError> {
        let started = Instant::now();
        loop {
            let addr = self.current_endpoint();
            match self.status_of(&addr).await {
                Ok(s) if s.role == crate::protocol::Role::Leader => return Ok(s),
                Ok(s) => {
                    let hint = s
                        .leader
                        .and_then(|l| s.members.iter().find(|m| m.info.id == l))
                        .map(|m| m.info.client_addr.clone());
                    match hint {
                        Some(h) if h != addr => self.prefer(&h),
                        _ => self.rotate(),
                    }
                }
                Err(_) => self.rotate(),
            }
            if started.elapsed() > self.inner.options.total_timeout {
                return Err(ClientError::Unavailable {
                    endpoints: self.inner.endpoints.lock().expect("endpoints lock").clone(),
                    waited: started.elapsed(),
                    last_error: "no leader found".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn add_learner(&self, member: MemberInfo) -> Result<Vec<MemberStatus>, ClientError> {
        self.membership(|| Request::AddLearner {
            member: member.clone(),
        })
        .await
    }

    pub async fn promote(&self, id: MemberId) -> Result<Vec<MemberStatus>, ClientError> {
        self.membership(|| Request::Promote { id }).await
    }

    pub async fn remove_member(&self, id: MemberId) -> Result<Vec<MemberStatus>, ClientError> {
        self.membership(|| Request::RemoveMember { id }).await
    }

    /// The cluster CA certificate as served by the member at `addr` (None: no TLS). Public
    /// information: check it against a fingerprint you trust before relying on it.
    pub async fn ca_certificate(&self, addr: &str) -> Result<Option<String>, ClientError> {
        let unavailable = |e: String| ClientError::Unavailable {
            endpoints: vec![addr.into()],
            waited: Duration::ZERO,
            last_error: e,
        };
        let connection = Connection::open(addr, None)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        match connection
            .call(Request::CaCertificate, self.inner.options.attempt_timeout)
            .await
        {
            Ok(Ok(Response::CaCertificate { pem })) => Ok(pem),
            Ok(Ok(other)) => Err(ClientError::Protocol(format!("{other:?}"))),
            Ok(Err(e)) => Err(ClientError::Store(e)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A one-time join token for a new member of a TLS cluster (expires after `ttl`).
    pub async fn create_join_token(&self, ttl: Duration) -> Result<String, ClientError> {
        let ttl_ms = ttl.as_millis() as u64;
        match self.call(|| Request::CreateJoinToken { ttl_ms }).await? {
            Response::JoinToken { token } => Ok(token),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Presents a join token and a certificate request; returns (certificate, CA certificate).
    /// The caller must check the CA against the fingerprint in the token.
    pub async fn join_with_token(
        &self,
        token: &str,
        member: MemberInfo,
        csr_pem: &str,
    ) -> Result<(String, String), ClientError> {
        let request = || Request::Join {
            token: token.to_string(),
            member: member.clone(),
            csr_pem: csr_pem.to_string(),
        };
        match self.call(request).await? {
            Response::Joined {
                cert_pem, ca_pem, ..
            } => Ok((cert_pem, ca_pem)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn membership(
        &self,
        make: impl Fn() -> Request,
    ) -> Result<Vec<MemberStatus>, ClientError> {
        match self.call(make).await? {
            Response::MembershipChanged { members } => {
                self.learn_members(&members);
                Ok(members)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

//! Talking to chunk servers: a small pool of connections per server, with timeouts so a
//! stopped server turns into an error instead of a hang, over TCP or mutual TLS
//! ([`crate::chunk_transport`]). A chunk server running in this process (`fs-agent mount
//! --chunk-data`) is called directly, with no connection.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::chunk_protocol::{read_data_frame_into, read_frame, write_frame, ChunkFailure, ChunkRequest, ChunkResponse, FrameError};
use crate::chunk_store::ChunkStore;
use crate::chunk_transport::{self, ConnectFailure, Stream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ChunkClientError {
    /// The server could not be reached or the connection broke: the replica is unavailable.
    #[error("chunk server {server} unreachable: {reason}")]
    Unreachable { server: String, reason: String },
    /// Connected, but TLS failed: a certificate problem, or one side does not talk TLS. The
    /// replica is unavailable to this client and nothing was sent.
    #[error("chunk server {server}: TLS refused: {reason}")]
    Tls { server: String, reason: String },
    /// The server answered with a refusal.
    #[error("chunk server {server} refused: {failure:?}")]
    Refused { server: String, failure: ChunkFailure },
    #[error("chunk server {server} sent an unexpected answer: {answer}")]
    Protocol { server: String, answer: String },
}

impl ChunkClientError {
    /// The server cannot be used by this client at all (as opposed to refusing one request).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ChunkClientError::Unreachable { .. } | ChunkClientError::Tls { .. })
    }
}

#[derive(Default)]
pub struct ChunkClient {
    idle: Mutex<HashMap<String, Vec<Stream>>>,
    /// Mutual TLS to every server; plain TCP without.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The chunk server of this process (its address, its store): requests to it are calls.
    local: Option<(String, Arc<ChunkStore>)>,
}

/// A request sent on a connection, its answer not read yet (see [`ChunkClient::call_all`]).
enum Sent {
    /// On a pooled connection, which a restarted server may have closed: the exchange is
    /// tried once more on a fresh one if reading the answer fails.
    Pooled(Stream),
    Fresh(Stream),
    Failed(ChunkClientError),
    /// For this process's own chunk server: served when the others are working.
    Local,
}

impl ChunkClient {
    /// A client talking plain TCP (tests and single-machine setups).
    pub fn new() -> ChunkClient {
        ChunkClient::default()
    }

    /// A client talking mutual TLS with `tls` (see [`crate::chunk_transport::ChunkTls`]), or
    /// plain TCP without.
    pub fn with_tls(tls: Option<Arc<rustls::ClientConfig>>) -> ChunkClient {
        ChunkClient { idle: Mutex::default(), tls, local: None }
    }

    /// Requests to `server` go straight to `store`: the chunk server runs in this process.
    pub fn with_local_store(mut self, server: String, store: Arc<ChunkStore>) -> ChunkClient {
        self.local = Some((server, store));
        self
    }

    fn local_store(&self, server: &str) -> Option<&ChunkStore> {
        self.local.as_ref().filter(|(addr, _)| addr == server).map(|(_, store)| &**store)
    }

    fn connect(&self, server: &str) -> Result<Stream, ChunkClientError> {
        let unreachable = |reason: String| ChunkClientError::Unreachable { server: server.to_string(), reason };
        let addr = server
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("address resolves to nothing".into()))?;
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| unreachable(e.to_string()))?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| unreachable(e.to_string()))?;
        chunk_transport::client(server, stream, self.tls.as_ref()).map_err(|failure| match failure {
            ConnectFailure::Unreachable(reason) => unreachable(reason),
            ConnectFailure::Tls(reason) => ChunkClientError::Tls { server: server.to_string(), reason },
        })
    }

    /// Sends one request and waits for its answer; `Failed` answers become `Refused`.
    pub fn call(&self, server: &str, request: &ChunkRequest) -> Result<ChunkResponse, ChunkClientError> {
        let answer = match self.local_store(server) {
            Some(store) => crate::chunk_server::handle(store, request),
            None => self.exchange(server, request, read_frame::<ChunkResponse>)?,
        };
        refused_if_failed(server, answer)
    }

    /// Sends every request to its server before waiting for any answer, so the servers work on
    /// them at once without a thread per request; the answers come back in the order of
    /// `calls`. A request to this process's own chunk server is served while the others work.
    pub fn call_all(&self, calls: &[(&str, &ChunkRequest)]) -> Vec<Result<ChunkResponse, ChunkClientError>> {
        self.call_all_while(calls, || ()).0
    }

    /// [`ChunkClient::call_all`], running `during` once every request is out and this
    /// process's own chunk server served its part, while the others work. (Serving the own
    /// part on a thread of its own, beside `during`, was measured slower: the thread costs
    /// more than it overlaps.)
    pub fn call_all_while<R>(&self, calls: &[(&str, &ChunkRequest)], during: impl FnOnce() -> R) -> (Vec<Result<ChunkResponse, ChunkClientError>>, R) {
        let sent: Vec<Sent> = calls.iter().map(|(server, request)| self.send(server, request)).collect();
        let mut local_answers: Vec<Option<ChunkResponse>> = calls
            .iter()
            .zip(&sent)
            .map(|((server, request), sent)| match (sent, self.local_store(server)) {
                (Sent::Local, Some(store)) => Some(crate::chunk_server::handle(store, request)),
                _ => None,
            })
            .collect();
        let during = during();
        let answers = calls
            .iter()
            .zip(sent)
            .zip(local_answers.iter_mut())
            .map(|(((server, request), sent), local)| {
                let answer = match sent {
                    Sent::Local => Ok(local.take().expect("local answer")),
                    Sent::Failed(e) => Err(e),
                    Sent::Fresh(conn) => self.receive(server, conn, read_frame::<ChunkResponse>),
                    Sent::Pooled(conn) => match self.receive(server, conn, read_frame::<ChunkResponse>) {
                        Err(ChunkClientError::Unreachable { .. }) => self.exchange(server, request, read_frame::<ChunkResponse>),
                        other => other,
                    },
                };
                answer.and_then(|a| refused_if_failed(server, a))
            })
            .collect();
        (answers, during)
    }

    /// Writes `request` on a pooled connection to `server` (or a fresh one if that fails).
    fn send(&self, server: &str, request: &ChunkRequest) -> Sent {
        if self.local_store(server).is_some() {
            return Sent::Local;
        }
        let pooled = self.idle.lock().expect("pool").get_mut(server).and_then(|v| v.pop());
        if let Some(mut conn) = pooled {
            if write_frame(&mut conn, request).is_ok() {
                return Sent::Pooled(conn);
            }
        }
        let mut conn = match self.connect(server) {
            Ok(conn) => conn,
            Err(e) => return Sent::Failed(e),
        };
        match write_frame(&mut conn, request) {
            Ok(()) => Sent::Fresh(conn),
            Err(e) => Sent::Failed(self.frame_error(server, e)),
        }
    }

    /// Reads the answer on `conn` with `receive`; the connection goes back to the pool once
    /// an answer was read.
    fn receive<T>(&self, server: &str, mut conn: Stream, receive: impl FnOnce(&mut Stream) -> Result<T, FrameError>) -> Result<T, ChunkClientError> {
        let answer = receive(&mut conn).map_err(|e| self.frame_error(server, e))?;
        self.idle.lock().expect("pool").entry(server.to_string()).or_default().push(conn);
        Ok(answer)
    }

    fn frame_error(&self, server: &str, error: FrameError) -> ChunkClientError {
        match error {
            // A server refusing this client's certificate says so after the handshake, with an
            // alert in place of the first answer.
            FrameError::Io(e) => match chunk_transport::tls_failure(&e) {
                Some(reason) => ChunkClientError::Tls { server: server.to_string(), reason },
                None => ChunkClientError::Unreachable { server: server.to_string(), reason: e.to_string() },
            },
            e => ChunkClientError::Protocol { server: server.to_string(), answer: e.to_string() },
        }
    }

    /// Sends a `Read` of `out.len()` bytes and reads the answer's bytes straight into `out`.
    /// A refusal is `Refused`; any other answer (data of another length) is `Protocol`.
    pub fn read_into(&self, server: &str, request: &ChunkRequest, out: &mut [u8]) -> Result<(), ChunkClientError> {
        if let (Some(store), ChunkRequest::Read { chunk_id, version, offset, .. }) = (self.local_store(server), request) {
            return crate::chunk_server::read_local(store, *chunk_id, *version, *offset, out).map_err(|failure| ChunkClientError::Refused { server: server.to_string(), failure });
        }
        match self.exchange(server, request, |conn| read_data_frame_into(conn, out))? {
            None => Ok(()),
            Some(ChunkResponse::Failed(failure)) => Err(ChunkClientError::Refused { server: server.to_string(), failure }),
            Some(other) => Err(ChunkClientError::Protocol { server: server.to_string(), answer: format!("{other:?}") }),
        }
    }

    /// Sends `request` on a pooled connection (or a new one) and reads the answer with
    /// `receive`; the connection goes back to the pool once an answer was read.
    fn exchange<T>(&self, server: &str, request: &ChunkRequest, mut receive: impl FnMut(&mut Stream) -> Result<T, FrameError>) -> Result<T, ChunkClientError> {
        match self.send(server, request) {
            // A pooled connection may have been closed by a restarted server: once more on a fresh one.
            Sent::Pooled(conn) => match self.receive(server, conn, &mut receive) {
                Err(ChunkClientError::Unreachable { .. }) => {}
                answer => return answer,
            },
            Sent::Fresh(conn) => return self.receive(server, conn, receive),
            Sent::Failed(e) => return Err(e),
            Sent::Local => return Err(ChunkClientError::Protocol { server: server.to_string(), answer: "this process's own chunk server has no connection".into() }),
        }
        let mut conn = self.connect(server)?;
        write_frame(&mut conn, request).map_err(|e| self.frame_error(server, e))?;
        self.receive(server, conn, receive)
    }

    /// Forgets pooled connections to `server` (after it failed).
    pub fn forget(&self, server: &str) {
        self.idle.lock().expect("pool").remove(server);
    }
}

fn refused_if_failed(server: &str, answer: ChunkResponse) -> Result<ChunkResponse, ChunkClientError> {
    match answer {
        ChunkResponse::Failed(failure) => Err(ChunkClientError::Refused { server: server.to_string(), failure }),
        answer => Ok(answer),
    }
}

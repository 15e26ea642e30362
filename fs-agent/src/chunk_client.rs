//! Talking to chunk servers: a small pool of connections per server, with timeouts so a
//! stopped server turns into an error instead of a hang, over TCP or mutual TLS
//! ([`crate::chunk_transport`]).

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::chunk_protocol::{read_data_frame_into, read_frame, write_frame, ChunkFailure, ChunkRequest, ChunkResponse, FrameError};
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
}

impl ChunkClient {
    /// A client talking plain TCP (tests and single-machine setups).
    pub fn new() -> ChunkClient {
        ChunkClient::default()
    }

    /// A client talking mutual TLS with `tls` (see [`crate::chunk_transport::ChunkTls`]), or
    /// plain TCP without.
    pub fn with_tls(tls: Option<Arc<rustls::ClientConfig>>) -> ChunkClient {
        ChunkClient { idle: Mutex::default(), tls }
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
        match self.exchange(server, request, read_frame::<ChunkResponse>)? {
            ChunkResponse::Failed(failure) => Err(ChunkClientError::Refused { server: server.to_string(), failure }),
            answer => Ok(answer),
        }
    }

    /// Sends a `Read` of `out.len()` bytes and reads the answer's bytes straight into `out`.
    /// A refusal is `Refused`; any other answer (data of another length) is `Protocol`.
    pub fn read_into(&self, server: &str, request: &ChunkRequest, out: &mut [u8]) -> Result<(), ChunkClientError> {
        match self.exchange(server, request, |conn| read_data_frame_into(conn, out))? {
            None => Ok(()),
            Some(ChunkResponse::Failed(failure)) => Err(ChunkClientError::Refused { server: server.to_string(), failure }),
            Some(other) => Err(ChunkClientError::Protocol { server: server.to_string(), answer: format!("{other:?}") }),
        }
    }

    /// Sends `request` on a pooled connection (or a new one) and reads the answer with
    /// `receive`; the connection goes back to the pool once an answer was read.
    fn exchange<T>(&self, server: &str, request: &ChunkRequest, mut receive: impl FnMut(&mut Stream) -> Result<T, FrameError>) -> Result<T, ChunkClientError> {
        let pooled = self.idle.lock().expect("pool").get_mut(server).and_then(|v| v.pop());
        // A pooled connection may have been closed by a restarted server: retry once on a fresh one.
        let attempts: Vec<Option<Stream>> = match pooled {
            Some(c) => vec![Some(c), None],
            None => vec![None],
        };
        let mut last_error = None;
        for conn in attempts {
            let mut conn = match conn {
                Some(c) => c,
                None => self.connect(server)?,
            };
            let result = write_frame(&mut conn, request).and_then(|()| receive(&mut conn));
            match result {
                Ok(answer) => {
                    self.idle.lock().expect("pool").entry(server.to_string()).or_default().push(conn);
                    return Ok(answer);
                }
                // A server refusing this client's certificate says so after the handshake,
                // with an alert in place of the first answer.
                Err(FrameError::Io(e)) => match chunk_transport::tls_failure(&e) {
                    Some(reason) => return Err(ChunkClientError::Tls { server: server.to_string(), reason }),
                    None => last_error = Some(e.to_string()),
                },
                Err(e) => return Err(ChunkClientError::Protocol { server: server.to_string(), answer: e.to_string() }),
            }
        }
        Err(ChunkClientError::Unreachable { server: server.to_string(), reason: last_error.unwrap_or_default() })
    }

    /// Forgets pooled connections to `server` (after it failed).
    pub fn forget(&self, server: &str) {
        self.idle.lock().expect("pool").remove(server);
    }
}

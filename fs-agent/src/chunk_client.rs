//! Talking to chunk servers: a small pool of connections per server, with timeouts so a
//! stopped server turns into an error instead of a hang.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use crate::chunk_protocol::{read_frame, write_frame, ChunkFailure, ChunkRequest, ChunkResponse, FrameError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ChunkClientError {
    /// The server could not be reached or the connection broke: the replica is unavailable.
    #[error("chunk server {server} unreachable: {reason}")]
    Unreachable { server: String, reason: String },
    /// The server answered with a refusal.
    #[error("chunk server {server} refused: {failure:?}")]
    Refused { server: String, failure: ChunkFailure },
    #[error("chunk server {server} sent an unexpected answer: {answer}")]
    Protocol { server: String, answer: String },
}

struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

#[derive(Default)]
pub struct ChunkClient {
    idle: Mutex<HashMap<String, Vec<Connection>>>,
}

impl ChunkClient {
    pub fn new() -> ChunkClient {
        ChunkClient::default()
    }

    fn connect(server: &str) -> Result<Connection, ChunkClientError> {
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
        let writer = stream.try_clone().map_err(|e| unreachable(e.to_string()))?;
        Ok(Connection { reader: BufReader::new(stream), writer })
    }

    /// Sends one request and waits for its answer; `Failed` answers become `Refused`.
    pub fn call(&self, server: &str, request: &ChunkRequest) -> Result<ChunkResponse, ChunkClientError> {
        let pooled = self.idle.lock().expect("pool").get_mut(server).and_then(|v| v.pop());
        // A pooled connection may have been closed by a restarted server: retry once on a fresh one.
        let attempts: Vec<Option<Connection>> = match pooled {
            Some(c) => vec![Some(c), None],
            None => vec![None],
        };
        let mut last_error = None;
        for conn in attempts {
            let mut conn = match conn {
                Some(c) => c,
                None => Self::connect(server)?,
            };
            let result = write_frame(&mut conn.writer, request).and_then(|()| read_frame::<ChunkResponse>(&mut conn.reader));
            match result {
                Ok(ChunkResponse::Failed(failure)) => {
                    self.idle.lock().expect("pool").entry(server.to_string()).or_default().push(conn);
                    return Err(ChunkClientError::Refused { server: server.to_string(), failure });
                }
                Ok(answer) => {
                    self.idle.lock().expect("pool").entry(server.to_string()).or_default().push(conn);
                    return Ok(answer);
                }
                Err(FrameError::Io(e)) => last_error = Some(e.to_string()),
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

//! How bytes move between chunk servers and their clients (mounts, operator commands): TCP, or
//! mutual TLS when TLS material is configured.
//!
//! With TLS, both ends hold a certificate signed by the cluster CA (`cluster-store ca-create`),
//! in a directory laid out as a store member's `tls/`: `ca.pem`, `member.pem`, `member.key`
//! (`fs-agent cert-create` makes one; a store member's own directory works as is). A server
//! accepts only clients whose certificate the CA signed, and a client checks that the server's
//! certificate is signed by the CA and names the address it dialed. Without TLS material
//! everything is plain TCP: for tests and single-machine demos, never for a storage network
//! that others can reach.
//!
//! Throughput matters here (every byte of every replica goes through it), hence TLS 1.3 with
//! AES-GCM first (ring uses the CPU's AES and carry-less multiply instructions), TLS buffers
//! large enough for a whole frame, and a large read buffer under rustls, which otherwise reads
//! the socket 4 KiB at a time.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cluster::tls::{MemberTls, TlsError};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::client::danger::ServerCertVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

/// The read buffer under each connection: one recv serves many TLS records.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Ciphertext rustls may hold before it writes to the socket: a whole frame, so a 1 MiB write
/// is encrypted in one go and sent with a few vectored writes.
const TLS_BUFFER_BYTES: usize = crate::chunk_protocol::MAX_FRAME_BYTES as usize + 64 * 1024;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS record carrying a handshake (a ClientHello). A plain frame never
/// starts with it: that would announce a frame of over 350 MiB.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot load the chunk TLS material from {dir}: {source}")]
    Load { dir: PathBuf, source: TlsError },
    #[error("the certificate in {path} is not valid for {addr}, the address clients reach this chunk server at: {reason}")]
    NotValidFor { path: PathBuf, addr: String, reason: String },
    #[error("{0}")]
    Tls(String),
}

/// The rustls configurations of one process's chunk connections.
pub struct ChunkTls {
    dir: PathBuf,
    material: MemberTls,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for ChunkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkTls").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// ring's suites, TLS 1.3 only, AES-GCM first: clients propose them in this order and servers
/// follow the client's order. ChaCha20 stays for peers without AES instructions.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

impl ChunkTls {
    /// Loads `ca.pem`, `member.pem` and `member.key` from `dir`.
    pub fn load(dir: &Path) -> Result<ChunkTls, TransportError> {
        let load = |source| TransportError::Load { dir: dir.to_path_buf(), source };
        let material = MemberTls::read_from(dir).map_err(load)?;
        let (server, client) = material.mutual_configs(provider()).map_err(load)?;
        Ok(ChunkTls { dir: dir.to_path_buf(), material, client, server })
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// Checks this certificate as a client dialing `addr` would (signed by the CA, in its
    /// validity period, naming `addr`'s host), so a chunk server with the wrong certificate
    /// fails at start rather than at every client's handshake.
    pub fn check_serves(&self, addr: &str) -> Result<(), TransportError> {
        let path = self.dir.join("member.pem");
        let not_valid = |reason: String| TransportError::NotValidFor { path: path.clone(), addr: addr.to_string(), reason };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.material.ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| not_valid(format!("bad ca.pem: {e}")))?).map_err(|e| not_valid(e.to_string()))?;
        }
        let chain = CertificateDer::pem_slice_iter(self.material.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| not_valid(e.to_string()))?;
        let (end_entity, intermediates) = chain.split_first().ok_or_else(|| not_valid("no certificate in it".into()))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| not_valid(e.to_string()))?;
        verifier
            .verify_server_cert(end_entity, intermediates, &server_name(addr)?, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| not_valid(describe(&e)))
    }
}

/// The TLS name a client checks for `addr` (HOST:PORT): its IP address, or its DNS name.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TransportError> {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).map_err(|_| TransportError::Tls(format!("{addr:?} has no host name or IP address a certificate could name")))
}

/// A rustls error, with what it means for chunk connections when that is not obvious.
pub fn describe(error: &rustls::Error) -> String {
    let hint = match error {
        // Another CA with the same name as ours shows as a bad signature.
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the chunk server's certificate is not signed by the cluster CA in this side's ca.pem"
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => "the certificate has expired: issue a new one",
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => {
            "the certificate does not name the address it is used at: issue it with that --ip or --dns"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => "the chunk server requires a client certificate: give this command --tls-dir",
        rustls::Error::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::DecryptError) => {
            "the other side does not trust this side's certificate: it is not signed by its cluster CA"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => "the other side says this side's certificate has expired",
        rustls::Error::NoCertificatesPresented => "the client presented no certificate",
        _ => "",
    };
    if hint.is_empty() {
        error.to_string()
    } else {
        format!("{hint} ({error})")
    }
}

/// The rustls error inside an I/O error from a TLS stream, described.
pub fn tls_failure(error: &io::Error) -> Option<String> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(describe)
}

/// A TCP connection with a large read buffer. Writes go straight to the socket (BufReader only
/// buffers reads, so writing beside it is fine).
pub struct BufferedSocket {
    reader: BufReader<TcpStream>,
}

impl BufferedSocket {
    pub fn new(stream: TcpStream) -> BufferedSocket {
        BufferedSocket { reader: BufReader::with_capacity(READ_BUFFER_BYTES, stream) }
    }

    fn socket(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Closes after the peer has read what was sent: stops sending, then reads and drops what
    /// the peer still sends until it closes (a few seconds at most). Closing with unread bytes
    /// would reset the connection, and the peer could lose the refusal it is about to read.
    pub fn close_gracefully(mut self) {
        let _ = self.socket().shutdown(std::net::Shutdown::Write);
        let _ = self.socket().set_read_timeout(Some(Duration::from_secs(2)));
        let mut sink = [0u8; 16 * 1024];
        let mut left: usize = 64 * 1024 * 1024;
        while left > 0 {
            match self.reader.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
}

impl Read for BufferedSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for BufferedSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.reader.get_mut().write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.reader.get_mut().write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.reader.get_mut().flush()
    }
}

/// One connection to or from a chunk server: request and answer frames go through it.
pub enum Stream {
    Plain(BufferedSocket),
    Client(Box<StreamOwned<ClientConnection, BufferedSocket>>),
    Server(Box<StreamOwned<ServerConnection, BufferedSocket>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Client(s) => s.write_vectored(bufs),
            Stream::Server(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

/// How a connection attempt failed.
#[derive(Debug)]
pub enum ConnectFailure {
    /// No connection (refused, timed out, reset): the server is down or unreachable.
    Unreachable(String),
    /// Connected, but TLS failed (a certificate problem, or one side does not talk TLS).
    Tls(String),
}

/// Starts a client connection on `stream` (already connected to `server`, with timeouts set):
/// plain without `tls`, else a TLS handshake, finished here so certificate problems show now.
pub fn client(server: &str, stream: TcpStream, tls: Option<&Arc<ClientConfig>>) -> Result<Stream, ConnectFailure> {
    let mut socket = BufferedSocket::new(stream);
    let Some(config) = tls else { return Ok(Stream::Plain(socket)) };
    let name = server_name(server).map_err(|e| ConnectFailure::Tls(e.to_string()))?;
    let mut conn = ClientConnection::new(config.clone(), name).map_err(|e| ConnectFailure::Tls(describe(&e)))?;
    conn.set_buffer_limit(Some(TLS_BUFFER_BYTES));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut socket) {
            return Err(match tls_failure(&e) {
                Some(reason) => ConnectFailure::Tls(reason),
                None if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::ConnectionReset => {
                    ConnectFailure::Tls(format!("the server closed the connection during the TLS handshake: does it run without --tls-dir? ({e})"))
                }
                None => ConnectFailure::Unreachable(e.to_string()),
            });
        }
    }
    tracing::debug!(%server, suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()), "TLS connection to a chunk server");
    Ok(Stream::Client(Box::new(StreamOwned::new(conn, socket))))
}

/// What a chunk server makes of a new connection.
pub enum Accepted {
    Serve(Stream),
    /// A plain client at a TLS server: answer it this refusal in a plain frame, then hang up.
    RefusePlain(Box<BufferedSocket>, String),
    /// Dropped (logged): a failed handshake, a TLS client at a plain server, or nothing sent.
    Dropped,
}

/// Accepts a client connection on `stream` from `peer`: the first byte tells a TLS client
/// from a plain one, and a server with `tls` serves only TLS clients with a certificate the CA
/// signed (the handshake is done here, so a refused client gets no further).
pub fn accept(peer: &str, stream: TcpStream, tls: Option<&Arc<ServerConfig>>) -> Accepted {
    let mut first = [0u8; 1];
    let speaks_tls = match stream.peek(&mut first) {
        Ok(1) => first[0] == TLS_HANDSHAKE_RECORD,
        _ => return Accepted::Dropped,
    };
    let mut socket = BufferedSocket::new(stream);
    match (tls, speaks_tls) {
        (None, false) => Accepted::Serve(Stream::Plain(socket)),
        (None, true) => {
            tracing::warn!(%peer, "refused a TLS client: this chunk server runs without TLS (--tls-dir)");
            socket.close_gracefully();
            Accepted::Dropped
        }
        (Some(_), false) => {
            tracing::warn!(%peer, "refused a plain TCP client: this chunk server accepts only TLS");
            Accepted::RefusePlain(
                Box::new(socket),
                "this chunk server accepts only TLS clients with a certificate signed by the cluster CA: give the client --tls-dir".into(),
            )
        }
        (Some(config), true) => {
            let mut conn = match ServerConnection::new(config.clone()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%peer, "cannot start TLS: {e}");
                    return Accepted::Dropped;
                }
            };
            conn.set_buffer_limit(Some(TLS_BUFFER_BYTES));
            let _ = socket.socket().set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut socket) {
                    let reason = tls_failure(&e).unwrap_or_else(|| e.to_string());
                    tracing::warn!(%peer, "refused a TLS client: {reason}");
                    // The alert saying why is sent; let the client read it.
                    socket.close_gracefully();
                    return Accepted::Dropped;
                }
            }
            // Pooled connections idle between requests: no read timeout from here on.
            let _ = socket.socket().set_read_timeout(None);
            Accepted::Serve(Stream::Server(Box::new(StreamOwned::new(conn, socket))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::tls::CaMaterial;

    /// A certificate of `ca` for 127.0.0.1 that expired in 2021.
    fn expired(ca: &CaMaterial) -> MemberTls {
        let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).unwrap();
        let ca_cert = rcgen::CertificateParams::from_ca_cert_pem(&ca.cert_pem).unwrap().self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        MemberTls { ca_pem: ca.cert_pem.clone(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    fn load(material: &MemberTls) -> (tempfile::TempDir, ChunkTls) {
        let dir = tempfile::tempdir().unwrap();
        material.write_to(dir.path()).unwrap();
        let tls = ChunkTls::load(dir.path()).unwrap();
        (dir, tls)
    }

    #[test]
    fn server_names_are_ips_or_host_names() {
        assert!(matches!(server_name("127.0.0.1:7001").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:7001").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("storage-a.example:7001").unwrap(), ServerName::DnsName(_)));
        assert!(server_name("bad name:7001").is_err());
    }

    #[test]
    fn a_certificate_is_checked_against_the_address_it_serves() {
        let ca = CaMaterial::create().unwrap();
        let (_dir, good) = load(&ca.issue_service("chunk-a", &["127.0.0.1".parse().unwrap()], &["storage-a.example".into()]).unwrap());
        good.check_serves("127.0.0.1:7001").unwrap();
        good.check_serves("storage-a.example:7001").unwrap();
        let wrong_name = good.check_serves("10.0.0.9:7001").unwrap_err().to_string();
        assert!(wrong_name.contains("does not name the address"), "{wrong_name}");
        let (_dir, old) = load(&expired(&ca));
        let expired = old.check_serves("127.0.0.1:7001").unwrap_err().to_string();
        assert!(expired.contains("has expired"), "{expired}");
        let missing = ChunkTls::load(Path::new("/nonexistent/tls")).unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/tls") && missing.contains("ca.pem"), "{missing}");
    }

    #[test]
    fn a_client_refuses_a_server_with_an_expired_certificate() {
        let ca = CaMaterial::create().unwrap();
        let (_server_dir, server) = load(&expired(&ca));
        let (_client_dir, client) = load(&ca.issue_service("client", &[], &[]).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = server.server_config();
        let acceptor = std::thread::spawn(move || {
            let (stream, peer) = listener.accept().unwrap();
            matches!(accept(&peer.to_string(), stream, Some(&config)), Accepted::Serve(_))
        });
        let stream = TcpStream::connect(&addr).unwrap();
        match super::client(&addr, stream, Some(&client.client_config())) {
            Err(ConnectFailure::Tls(reason)) => assert!(reason.contains("has expired"), "{reason}"),
            Err(ConnectFailure::Unreachable(reason)) => panic!("unreachable: {reason}"),
            Ok(_) => panic!("a server with an expired certificate was accepted"),
        }
        assert!(!acceptor.join().unwrap(), "the server served a client that refused it");
    }

    #[test]
    fn a_tls_client_of_a_plain_server_is_told_what_is_wrong() {
        let ca = CaMaterial::create().unwrap();
        let (_client_dir, client) = load(&ca.issue_service("client", &[], &[]).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = std::thread::spawn(move || {
            let (stream, peer) = listener.accept().unwrap();
            matches!(accept(&peer.to_string(), stream, None), Accepted::Serve(_))
        });
        let stream = TcpStream::connect(&addr).unwrap();
        match super::client(&addr, stream, Some(&client.client_config())) {
            Err(ConnectFailure::Tls(reason)) => assert!(reason.contains("without --tls-dir"), "{reason}"),
            Err(ConnectFailure::Unreachable(reason)) => panic!("unreachable: {reason}"),
            Ok(_) => panic!("a plain server finished a TLS handshake"),
        }
        assert!(!acceptor.join().unwrap());
    }
}

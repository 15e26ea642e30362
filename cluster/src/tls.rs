//! Mutual TLS between members: a cluster CA, member certificates, rustls configurations.
//!
//! The CA is made once (`cluster-store ca create`) and given to every initial member at `init`,
//! which puts it into the replicated store under [`CA_CERT_KEY`] / [`CA_KEY_KEY`] (keys of the
//! reserved `/_store/` prefix that clients can neither read nor write). So whichever member
//! leads can issue a certificate to a new member that presents a one-time join token. A member
//! keeps its own certificate and key in `<data-dir>/tls/`.
//!
//! Peers accept only a client certificate signed by the cluster CA, and check that a server's
//! certificate is signed by it and names the peer's IP address.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Reserved prefix: the store's own keys, hidden from clients.
pub const RESERVED_PREFIX: &str = "/_store/";
pub const CA_CERT_KEY: &str = "/_store/tls/ca.pem";
pub const CA_KEY_KEY: &str = "/_store/tls/ca.key";
/// Join tokens live here, by SHA-256 of their secret, attached to a lease (their expiry).
pub const JOIN_TOKEN_PREFIX: &str = "/_store/join-tokens/";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("bad TLS material in {what}: {reason}")]
    Bad { what: String, reason: String },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("peer address {0:?} has no IP address: members of a TLS cluster are addressed by IP")]
    NotAnIp(String),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The CA's certificate and key, in PEM.
#[derive(Debug, Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CaMaterial {
    pub fn create() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "vz cluster store CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key)?;
        Ok(CaMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        write_private(&dir.join("ca.key"), &self.key_pem)?;
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.cert_pem).map_err(io_err("write", &path))
    }

    pub fn read(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        Ok(CaMaterial {
            cert_pem: std::fs::read_to_string(&cert_path).map_err(io_err("read", &cert_path))?,
            key_pem: std::fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?,
        })
    }

    /// Signs a certificate for member `member_id` at `ips` (its peer and client addresses) over
    /// `public_key`. Only the key is taken from a request: names and usages are decided here.
    fn sign(
        &self,
        member_id: u64,
        ips: Vec<IpAddr>,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, TlsError> {
        let names = ips.into_iter().map(SanType::IpAddress).collect();
        self.sign_named(&format!("member-{member_id}"), names, public_key)
    }

    /// Signs a certificate named `common_name`, valid for `subject_alt_names`, for both ends
    /// of a mutual TLS connection.
    fn sign_named(
        &self,
        common_name: &str,
        subject_alt_names: Vec<SanType>,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, TlsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let ca_params = CertificateParams::from_ca_cert_pem(&self.cert_pem)?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.subject_alt_names = subject_alt_names;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        Ok(params.signed_by(public_key, &ca_cert, &ca_key)?.pem())
    }

    /// Issues a certificate and key for a member reachable at `addrs` (used at `init`, where
    /// the CA is at hand).
    pub fn issue(&self, member_id: u64, addrs: &[&str]) -> Result<MemberTls, TlsError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.sign(member_id, ips_of(addrs)?, &key)?;
        Ok(MemberTls {
            ca_pem: self.cert_pem.clone(),
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate and key for a service that is not a store member (a chunk server,
    /// a mount), named `common_name` and valid for the addresses `ips` and host names
    /// `dns_names` it is reached at (none for a pure client).
    pub fn issue_service(
        &self,
        common_name: &str,
        ips: &[IpAddr],
        dns_names: &[String],
    ) -> Result<MemberTls, TlsError> {
        let mut names: Vec<SanType> = ips.iter().copied().map(SanType::IpAddress).collect();
        for dns in dns_names {
            let name = rcgen::Ia5String::try_from(dns.as_str()).map_err(|e| TlsError::Bad {
                what: format!("host name {dns:?}"),
                reason: e.to_string(),
            })?;
            names.push(SanType::DnsName(name));
        }
        let key = KeyPair::generate()?;
        let cert_pem = self.sign_named(common_name, names, &key)?;
        Ok(MemberTls {
            ca_pem: self.cert_pem.clone(),
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a joining member's certificate request (used by the leader).
    pub fn sign_request(
        &self,
        member_id: u64,
        addrs: &[&str],
        csr_pem: &str,
    ) -> Result<String, TlsError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TlsError::Bad {
                what: "certificate request".into(),
                reason: e.to_string(),
            })?;
        self.sign(member_id, ips_of(addrs)?, &csr.public_key)
    }
}

fn ips_of(addrs: &[&str]) -> Result<Vec<IpAddr>, TlsError> {
    let mut ips = Vec::new();
    for addr in addrs {
        let ip = peer_ip(addr)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// rustls configuration of a client that trusts only the cluster CA (server authentication).
pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.map_err(|e| TlsError::Bad {
            what: "CA certificate".into(),
            reason: e.to_string(),
        })?)?;
    }
    if roots.is_empty() {
        return Err(TlsError::Bad {
            what: "CA certificate".into(),
            reason: "no certificate in it".into(),
        });
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

pub fn peer_ip(peer_addr: &str) -> Result<IpAddr, TlsError> {
    peer_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .map_err(|_| TlsError::NotAnIp(peer_addr.to_string()))
}

/// A new key and a certificate request for it (the key never leaves the joining member).
pub fn certificate_request() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// SHA-256 of the CA certificate (DER), hex: carried in join tokens so a joining member can
/// check it talks to the right cluster.
pub fn fingerprint(ca_pem: &str) -> Result<String, TlsError> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::Bad {
        what: "CA certificate".into(),
        reason: e.to_string(),
    })?;
    Ok(hex(
        ring::digest::digest(&ring::digest::SHA256, &der).as_ref()
    ))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(contents.as_bytes())
        .map_err(io_err("write", path))
}

/// A member's own TLS files (`<data-dir>/tls/`).
#[derive(Debug, Clone)]
pub struct MemberTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl MemberTls {
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("tls")
    }

    pub fn write(&self, data_dir: &Path) -> Result<(), TlsError> {
        self.write_to(&Self::dir(data_dir))
    }

    /// Writes `ca.pem`, `member.pem` and `member.key` (mode 0600) into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        write_private(&dir.join("member.key"), &self.key_pem)?;
        for (name, text) in [("ca.pem", &self.ca_pem), ("member.pem", &self.cert_pem)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io_err("write", &path))?;
        }
        Ok(())
    }

    /// The member's TLS files, or None if it runs without TLS.
    pub fn read(data_dir: &Path) -> Result<Option<Self>, TlsError> {
        let dir = Self::dir(data_dir);
        if !dir.exists() {
            return Ok(None);
        }
        Self::read_from(&dir).map(Some)
    }

    /// Reads `ca.pem`, `member.pem` and `member.key` from `dir`.
    pub fn read_from(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io_err("read", &path))
        };
        Ok(MemberTls {
            ca_pem: read("ca.pem")?,
            cert_pem: read("member.pem")?,
            key_pem: read("member.key")?,
        })
    }

    fn parts(
        &self,
    ) -> Result<
        (
            rustls::RootCertStore,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        let bad = |what: &str, e: rustls::pki_types::pem::Error| TlsError::Bad {
            what: what.into(),
            reason: e.to_string(),
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| bad("ca.pem", e))?)?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("member.pem", e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad("member.key", e))?;
        Ok((roots, chain, key))
    }

    /// rustls configuration of the client API: server authentication only (clients that trust
    /// the cluster CA can check they talk to a member).
    pub fn client_api_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (_, chain, key) = self.parts()?;
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
    }

    /// rustls configurations for the peer transport.
    pub fn peer_configs(&self) -> Result<PeerTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (server, client) = self.mutual_configs(provider)?;
        Ok(PeerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            connector: tokio_rustls::TlsConnector::from(client),
        })
    }

    /// rustls configurations of mutual TLS with `provider`'s cipher suites: a server that
    /// accepts only client certificates signed by the CA, and a client that presents this
    /// certificate and checks the server's against the CA.
    pub fn mutual_configs(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), TlsError> {
        let (roots, chain, key) = self.parts()?;
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Bad {
            what: "ca.pem".into(),
            reason: e.to_string(),
        })?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok((Arc::new(server), Arc::new(client)))
    }
}

/// What the peer transport needs to speak mutual TLS.
#[derive(Clone)]
pub struct PeerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

/// The TLS server name of a peer address (its IP).
pub fn server_name(peer_addr: &str) -> Result<ServerName<'static>, TlsError> {
    Ok(ServerName::IpAddress(peer_ip(peer_addr)?.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_verify_against_the_ca_only() {
        let ca = CaMaterial::create().unwrap();
        let member = ca.issue(1, &["127.0.0.1:7000", "127.0.0.1:8000"]).unwrap();
        member.peer_configs().unwrap();
        let (csr, key) = certificate_request().unwrap();
        let cert = ca.sign_request(2, &["127.0.0.2:7000"], &csr).unwrap();
        MemberTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: cert,
            key_pem: key,
        }
        .peer_configs()
        .unwrap();
        assert_eq!(fingerprint(&ca.cert_pem).unwrap().len(), 64);
        assert_ne!(
            fingerprint(&ca.cert_pem).unwrap(),
            fingerprint(&CaMaterial::create().unwrap().cert_pem).unwrap()
        );
        assert!(matches!(
            ca.sign_request(3, &["127.0.0.3:7000"], "not a csr"),
            Err(TlsError::Bad { .. })
        ));
        assert!(matches!(
            ca.issue(4, &["host-without-ip:7000"]),
            Err(TlsError::NotAnIp(_))
        ));
        client_config(&ca.cert_pem).unwrap();
        assert!(client_config("garbage").is_err());
    }

    #[test]
    fn service_certificates_name_their_addresses() {
        let ca = CaMaterial::create().unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let service = ca
            .issue_service("chunk-server-a", &[ip], &["storage-a.example".into()])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        service.write_to(dir.path()).unwrap();
        let back = MemberTls::read_from(dir.path()).unwrap();
        assert_eq!(back.cert_pem, service.cert_pem);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        back.mutual_configs(provider).unwrap();
        ca.issue_service("client-only", &[], &[]).unwrap();
        assert!(matches!(
            ca.issue_service("bad", &[], &["not a host name\u{e9}".into()]),
            Err(TlsError::Bad { .. })
        ));
    }
}

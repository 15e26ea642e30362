//! Mutual TLS between mounts and chunk servers: data goes through, and a peer whose
//! certificate the cluster CA did not sign (or a peer without one) is refused with an error
//! naming the certificate problem, and nothing is written.

mod common;

use std::fs;
use std::path::Path;

use common::{pattern, TestFs, TlsOptions, CHUNK_SIZE};
use fs_agent::chunk_client::{ChunkClient, ChunkClientError};
use fs_agent::chunk_protocol::{ChunkFailure, ChunkRequest, ChunkResponse};
use fs_agent::chunk_transport::ChunkTls;
use fs_agent::namespace::resolve_path;

const CHUNKS_TLS: TlsOptions = TlsOptions { store: false, chunks: true };

fn chunk_files(data: &Path) -> Vec<String> {
    match fs::read_dir(data.join("chunks")) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.ends_with(".data")).collect(),
        Err(_) => vec![],
    }
}

fn a_write(chunk_id: u64) -> ChunkRequest {
    ChunkRequest::Write { file_id: 99, epoch: 1, chunk_id, version: 1, offset: 0, data: b"must not land".to_vec(), sync: true }
}

fn output(command: &mut std::process::Command) -> (bool, String) {
    let out = command.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn mounts_and_commands_talk_tls_to_chunk_servers() {
    let mut fs = TestFs::start_tls("tls-chunks", 3, CHUNKS_TLS);
    let mnt = fs.mount();
    let data = pattern(21, (CHUNK_SIZE * 5 + 4321) as usize);
    fs::write(mnt.join("f"), &data).unwrap();
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data);

    // Every replica holds the bytes, read back over TLS with the filesystem's client certificate.
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    let client = fs.chunk_client();
    for (index, chunk, _) in ns.chunks(inode.ino).unwrap() {
        let start = (index * CHUNK_SIZE) as usize;
        let expected = &data[start..(start + CHUNK_SIZE as usize).min(data.len())];
        for server in chunk.current_servers() {
            let read = ChunkRequest::Read { chunk_id: chunk.chunk_id, version: chunk.version, offset: 0, len: expected.len() as u64 };
            match client.call(&server, &read) {
                Ok(ChunkResponse::Data(back)) => assert!(back == expected, "chunk {index} on {server} differs"),
                other => panic!("chunk {index} on {server}: {other:?}"),
            }
        }
    }
    let (ok, text) = output(fs.command().args(["status", "--meta", &fs.meta]));
    assert!(ok && text.matches(" up, ").count() == 3, "{text}");

    // A plain TCP client is told the server wants TLS, and its write changes nothing.
    let server = fs.servers[0].addr.clone();
    match ChunkClient::new().call(&server, &a_write(0x5eed)) {
        Err(ChunkClientError::Refused { failure: ChunkFailure::BadRequest(reason), .. }) => assert!(reason.contains("accepts only TLS"), "{reason}"),
        other => panic!("a plain client got {other:?}"),
    }
    let (ok, text) = output(fs_agent_without_tls(&fs).args(["status", "--meta", &fs.meta]));
    assert!(ok && text.matches("DOWN").count() == 3 && text.contains("accepts only TLS"), "{text}");

    // A TLS client that trusts the CA but has no certificate is refused at the handshake.
    let ca_pem = fs::read_to_string(fs.ca_dir.as_ref().unwrap().join("ca.pem")).unwrap();
    let anonymous = ChunkClient::with_tls(Some(cluster::tls::client_config(&ca_pem).unwrap()));
    match anonymous.call(&server, &a_write(0x5eed)) {
        Err(ChunkClientError::Tls { reason, .. }) => assert!(reason.contains("requires a client certificate"), "{reason}"),
        other => panic!("a client without a certificate got {other:?}"),
    }
    // A client whose certificate another CA signed is refused too.
    let stranger_dir = fs.dir.path().join("tls-stranger");
    let stranger = cluster::tls::CaMaterial::create().unwrap().issue_service("stranger", &[], &[]).unwrap();
    cluster::tls::MemberTls { ca_pem: ca_pem.clone(), ..stranger }.write_to(&stranger_dir).unwrap();
    let stranger = ChunkClient::with_tls(Some(ChunkTls::load(&stranger_dir).unwrap().client_config()));
    match stranger.call(&server, &a_write(0x5eed)) {
        Err(ChunkClientError::Tls { reason, .. }) => assert!(reason.contains("does not trust this side's certificate"), "{reason}"),
        other => panic!("a client with another CA's certificate got {other:?}"),
    }
    assert!(!fs.servers[0].data.join("chunks").join(format!("{:016x}.data", 0x5eed)).exists(), "a refused client's write landed");
    let log = fs.log("chunkserver-0.log");
    assert!(log.contains("refused a plain TCP client") && log.contains("refused a TLS client"), "{log}");
}

/// An fs-agent command given no TLS material at all.
fn fs_agent_without_tls(fs: &TestFs) -> std::process::Command {
    let mut command = fs.command();
    command.env_remove("FS_AGENT_TLS_DIR");
    command
}

#[test]
fn a_chunk_server_with_another_cas_certificate_gets_no_data() {
    let mut fs = TestFs::start_tls("tls-stranger", 4, CHUNKS_TLS);
    // Server 3 comes back with a certificate from another CA (and that CA in its ca.pem).
    fs.kill_server(3);
    let stranger_dir = fs.servers[3].tls_dir.clone().unwrap();
    cluster::tls::CaMaterial::create().unwrap().issue_service("chunk-server-3", &["127.0.0.1".parse().unwrap()], &[]).unwrap().write_to(&stranger_dir).unwrap();
    fs.start_server(3);
    let stranger = fs.servers[3].addr.clone();
    let client = fs.chunk_client();
    common::wait_until("server 3 to listen", std::time::Duration::from_secs(30), || {
        !matches!(client.call(&stranger, &ChunkRequest::Capacity), Err(ChunkClientError::Unreachable { .. }))
    });
    match client.call(&stranger, &a_write(0x5eed)) {
        Err(ChunkClientError::Tls { reason, .. }) => assert!(reason.contains("not signed by the cluster CA"), "{reason}"),
        other => panic!("a server with another CA's certificate answered {other:?}"),
    }

    // The mount treats it as down: every chunk goes to the three others.
    let mnt = fs.mount();
    let data = pattern(22, (CHUNK_SIZE * 4) as usize);
    fs::write(mnt.join("f"), &data).unwrap();
    let other = fs.mount();
    assert_eq!(fs::read(other.join("f")).unwrap(), data);
    let ns = fs.namespace();
    let inode = resolve_path(&ns, "/f").unwrap();
    for (index, chunk, _) in ns.chunks(inode.ino).unwrap() {
        assert!(!chunk.replicas.iter().any(|r| r.server == stranger), "chunk {index} placed on the server with the wrong certificate");
        assert_eq!(chunk.current_servers().len(), 3, "chunk {index}");
    }
    assert!(chunk_files(&fs.servers[3].data).is_empty(), "data landed on the server with the wrong certificate");
    let (ok, text) = output(fs.command().args(["status", "--meta", &fs.meta]));
    assert!(ok, "{text}");
    let line = text.lines().find(|l| l.contains(&stranger)).unwrap_or_default().to_string();
    assert!(line.contains("DOWN") && line.contains("not signed by the cluster CA"), "{text}");
    assert!(fs.log("chunkserver-3.log").contains("refused a TLS client"), "{}", fs.log("chunkserver-3.log"));
}

#[test]
fn a_chunk_server_refuses_to_start_with_a_certificate_not_naming_its_address() {
    let fs = TestFs::start_tls("tls-name", 1, CHUNKS_TLS);
    let wrong_dir = fs.dir.path().join("tls-wrong-name");
    fs.issue_certificate("elsewhere", &["10.200.0.1".parse().unwrap()], &wrong_dir);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let data = fs.dir.path().join("chunks-wrong");
    let (ok, text) = output(
        fs.command()
            .env("FS_AGENT_TLS_DIR", &wrong_dir)
            .args(["chunkserver", "--listen", &addr, "--data", data.to_str().unwrap(), "--meta", &fs.meta]),
    );
    assert!(!ok && text.contains("not valid for 127.0.0.1") && text.contains("10.200.0.1"), "{text}");
    assert_eq!(fs.namespace().servers().unwrap().len(), 1, "a refused server registered");
}

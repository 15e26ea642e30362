//! A cluster whose members talk mutual TLS: a CA made up front, members issued certificates at
//! init, a new member joining with a one-time token, strangers refused.

mod common;

use std::process::Command;
use std::time::Duration;

use cluster::client::ClientOptions;
use cluster::protocol::StoreError;
use cluster::tls::CaMaterial;
use cluster::ClientError;
use common::{free_port, Member, TestCluster, BINARY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_talk_mutual_tls_and_join_with_one_time_tokens() {
    let ca_dir = tempfile::tempdir().unwrap();
    let out = Command::new(BINARY)
        .args(["ca-create", "--out"])
        .arg(ca_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cluster = TestCluster::start_with_ca(3, ca_dir.path());
    cluster.wait_for_leader().await;
    let client = cluster.client();
    client.put("/tls/a", "1").await.unwrap();
    assert_eq!(client.get("/tls/a").await.unwrap().unwrap().value, b"1");

    // The CA lives in the store, out of clients' reach.
    let err = client.get("/_store/tls/ca.key").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Store(StoreError::BadRequest(_))),
        "{err}"
    );
    let err = client
        .put("/_store/join-tokens/x", "forged")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Store(StoreError::BadRequest(_))),
        "{err}"
    );
    let (_, all) = client.list_prefix("", 0).await.unwrap();
    assert!(all.iter().all(|kv| !kv.key.starts_with("/_store/")));

    // Tokens are secrets: only a client speaking TLS (checking the members against the CA) gets one.
    let err = client
        .create_join_token(Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Store(StoreError::BadRequest(_))),
        "{err}"
    );
    let ca_pem = std::fs::read_to_string(ca_dir.path().join("ca.pem")).unwrap();
    let options = ClientOptions {
        tls_ca_pem: Some(ca_pem),
        ..Default::default()
    };
    let tls_client = cluster::Client::with_options(cluster.endpoints(), options).unwrap();
    assert_eq!(tls_client.get("/tls/a").await.unwrap().unwrap().value, b"1");
    // A client trusting another CA cannot talk to this cluster over TLS.
    let wrong = ClientOptions {
        tls_ca_pem: Some(CaMaterial::create().unwrap().cert_pem),
        total_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    assert!(cluster::Client::with_options(cluster.endpoints(), wrong)
        .unwrap()
        .get("/tls/a")
        .await
        .is_err());

    // A new member joins with a token through the CLI.
    let token = tls_client
        .create_join_token(Duration::from_secs(600))
        .await
        .unwrap();
    let peer_addr = format!("127.0.0.1:{}", free_port());
    let client_addr = format!("127.0.0.1:{}", free_port());
    let data_dir = cluster.dir.path().join("member-4");
    let endpoints = cluster.endpoints().join(",");
    let scratch = cluster.dir.path().to_path_buf();
    let join = |token: &str, data_dir: &std::path::Path| {
        Command::new(BINARY)
            .args([
                "join",
                "--id",
                "4",
                "--peer-addr",
                &peer_addr,
                "--client-addr",
                &client_addr,
                "--token",
                token,
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--endpoints")
            .arg(&endpoints)
            .output()
            .unwrap()
    };
    let out = join(&token, &data_dir);
    assert!(
        out.status.success(),
        "join failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data_dir.join("tls/member.pem").exists());
    cluster.members.push(Member {
        info: cluster::state_machine::MemberInfo {
            id: 4,
            peer_addr: peer_addr.clone(),
            client_addr: client_addr.clone(),
        },
        data_dir,
        process: None,
        paused: false,
    });
    cluster.start_member(4);
    let leader = cluster.wait_for_leader().await;
    cluster.wait_applied(4, leader.commit_index).await;
    let members = client.promote(4).await.unwrap();
    assert!(members.iter().any(|m| m.info.id == 4 && m.voter));
    client.put("/tls/b", "2").await.unwrap();

    // The token was one-time; a made-up one fails too. Neither changes the membership.
    let again = join(&token, &scratch.join("member-5"));
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let fingerprint = token.split_once('.').unwrap().1;
    let forged = join(
        &format!("{}.{fingerprint}", "00".repeat(32)),
        &scratch.join("member-6"),
    );
    assert!(!forged.status.success());
    let status = cluster.wait_for_leader().await;
    assert_eq!(status.members.len(), 4);

    // A peer with a certificate from another CA is refused at the handshake.
    let stranger = CaMaterial::create()
        .unwrap()
        .issue(9, &["127.0.0.1:1"])
        .unwrap();
    let tls = stranger.peer_configs().unwrap();
    let target = cluster.members[0].info.peer_addr.clone();
    let tcp = tokio::net::TcpStream::connect(&target).await.unwrap();
    let name = cluster::tls::server_name(&target).unwrap();
    // Our side rejects their server certificate, or they reject ours: either way no session.
    if let Ok(mut stream) = tls.connector.connect(name, tcp).await {
        let _ = stream.write_all(b"hello").await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a stranger's connection was served"
        );
    }
    // Plain TCP on a TLS peer port gets nowhere either.
    let mut plain = tokio::net::TcpStream::connect(&target).await.unwrap();
    plain.write_all(&[1, 0, 0, 0, 0]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf))
        .await
        .unwrap();
    // A certificate of this cluster for member 9 cannot speak as member 2.
    let impostor = CaMaterial::read(ca_dir.path())
        .unwrap()
        .issue(9, &["127.0.0.1:1"])
        .unwrap()
        .peer_configs()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(&target).await.unwrap();
    let mut stream = impostor
        .connector
        .connect(cluster::tls::server_name(&target).unwrap(), tcp)
        .await
        .unwrap();
    let mut hello = Vec::new();
    cluster::protocol::encode_frame(&(2u64, "127.0.0.1:1".to_string()), &mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "an impostor's connection was served"
    );

    assert_eq!(client.get("/tls/b").await.unwrap().unwrap().value, b"2");
    let log_path = cluster.dir.path().join("member-1.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            log.contains("peer transport tls=true"),
            "member 1 runs its peer transport over TLS"
        );
        if log.contains("peer TLS handshake refused")
            && log.contains("peer claims another member's id")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member 1 never refused the stranger:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

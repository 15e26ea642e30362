//! Real member processes on loopback: crashes, restarts, pauses, bad input.

mod common;

use std::time::Duration;

use cluster::client::ClientOptions;
use cluster::protocol::StoreError;
use cluster::state_machine::{ApplyError, EventKind, MemberInfo, MAX_VALUE_BYTES};
use cluster::{Client, ClientError};
use common::{free_port, TestCluster};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn write_keys(client: &Client, prefix: &str, range: std::ops::Range<u32>) {
    for i in range {
        client
            .put(&format!("{prefix}{i:05}"), format!("v{i}"))
            .await
            .unwrap();
    }
}

async fn assert_keys(client: &Client, prefix: &str, count: usize) {
    let (_, kvs) = client.list_prefix(prefix, 0).await.unwrap();
    assert_eq!(kvs.len(), count, "keys under {prefix}");
    for (i, kv) in kvs.iter().enumerate() {
        assert_eq!(kv.value, format!("v{i}").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_elects_a_new_leader_and_loses_nothing() {
    let mut cluster = TestCluster::start(3, 10_000);
    let first = cluster.wait_for_leader().await;
    let client = cluster.client();
    write_keys(&client, "/a/", 0..20).await;
    cluster.kill_member(first.id);
    // Writes go on through the new leader; the client finds it by itself.
    write_keys(&client, "/b/", 0..20).await;
    let second = cluster.wait_for_leader().await;
    assert_ne!(second.id, first.id);
    assert!(second.term > first.term);
    assert_keys(&client, "/a/", 20).await;
    // The old leader comes back as a follower and catches up.
    cluster.start_member(first.id);
    let leader = cluster.wait_for_leader().await;
    let caught_up = cluster.wait_applied(first.id, leader.commit_index).await;
    assert_eq!(caught_up.revision, leader.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_catches_up_by_snapshot_after_compaction() {
    let mut cluster = TestCluster::start(3, 25);
    let leader = cluster.wait_for_leader().await;
    let follower = (1..=3).find(|id| *id != leader.id).unwrap();
    cluster.kill_member(follower);
    let client = cluster.client();
    write_keys(&client, "/k/", 0..150).await;
    let leader = cluster.wait_for_leader().await;
    assert!(leader.snapshot_index > 0, "the leader compacted its log");
    cluster.start_member(follower);
    let status = cluster.wait_applied(follower, leader.commit_index).await;
    assert!(
        status.snapshot_index > 0,
        "the follower was brought up to date by a snapshot"
    );
    assert_eq!(status.revision, leader.revision);
    // With the old leader gone, the caught-up follower's data serves reads.
    cluster.kill_member(leader.id);
    assert_keys(&client, "/k/", 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_loses_nothing() {
    let mut cluster = TestCluster::start(3, 40);
    cluster.wait_for_leader().await;
    let client = cluster.client();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move { write_keys(&client, &format!("/w{w}/"), 0..30).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let before = cluster.wait_for_leader().await;
    for id in 1..=3 {
        cluster.kill_member(id);
    }
    for id in 1..=3 {
        cluster.start_member(id);
    }
    cluster.wait_for_leader().await;
    let client = cluster.client();
    for w in 0..4 {
        assert_keys(&client, &format!("/w{w}/"), 30).await;
    }
    let after = cluster.wait_for_leader().await;
    assert!(after.revision >= before.revision, "revisions never go back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_replaced_and_rejoins_as_follower() {
    let mut cluster = TestCluster::start(3, 10_000);
    let first = cluster.wait_for_leader().await;
    let client = cluster.client();
    client.put("/x", "before").await.unwrap();
    cluster.signal(first.id, Signal::SIGSTOP);
    client.put("/x", "during").await.unwrap();
    let second = cluster.wait_for_leader().await;
    assert_ne!(second.id, first.id);
    cluster.signal(first.id, Signal::SIGCONT);
    // Right after resuming, the old leader still believes it leads: a read pinned to it must
    // fail or see the new value, never the stale "before".
    let options = ClientOptions {
        attempt_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(4),
        pinned: true,
        tls_ca_pem: None,
    };
    let pinned = Client::with_options(
        vec![cluster.member(first.id).info.client_addr.clone()],
        options,
    )
    .unwrap();
    if let Ok(kv) = pinned.get("/x").await {
        assert_eq!(
            kv.unwrap().value,
            b"during",
            "the resumed old leader served a stale read"
        );
    }
    let caught_up = cluster.wait_applied(first.id, second.commit_index).await;
    assert_ne!(caught_up.role, cluster::protocol::Role::Leader);
    assert_eq!(client.get("/x").await.unwrap().unwrap().value, b"during");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = TestCluster::start(1, 10_000);
    cluster.wait_for_leader().await;
    let client = cluster.client();
    client.put("/ok", "1").await.unwrap();
    let before = cluster.wait_for_leader().await;

    let err = client
        .put("/big", vec![0u8; MAX_VALUE_BYTES + 1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Store(StoreError::Rejected(ApplyError::ValueTooLarge { .. }))
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("/big"),
        "the error names the key: {err}"
    );
    let err = client.put("", "x").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Store(StoreError::Rejected(ApplyError::EmptyKey))
        ),
        "{err}"
    );
    let err = client
        .put_with_lease("/leased", "x", Some(4242))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Store(StoreError::Rejected(ApplyError::LeaseNotFound(4242)))
        ),
        "{err}"
    );
    let err = client.promote(77).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Store(StoreError::BadRequest(_))),
        "{err}"
    );

    // Garbage on the client port: an error frame, then the connection closes.
    let mut raw = tokio::net::TcpStream::connect(&cluster.members[0].info.client_addr)
        .await
        .unwrap();
    raw.write_all(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !answer.is_empty(),
        "the server answers malformed input before closing"
    );
    // An absurd frame length is refused without allocating it.
    let mut raw = tokio::net::TcpStream::connect(&cluster.members[0].info.client_addr)
        .await
        .unwrap();
    raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();

    let after = cluster.wait_for_leader().await;
    assert_eq!(
        after.revision, before.revision,
        "no bad request changed the store"
    );
    assert_eq!(client.get("/ok").await.unwrap().unwrap().value, b"1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_writes_apply_once_and_watches_see_every_change() {
    let cluster = TestCluster::start(3, 10_000);
    cluster.wait_for_leader().await;
    let client = cluster.client();
    let start = client.put("/w/a", "1").await.unwrap();
    // Increments through compare-and-swap from many tasks: any double apply would show.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    loop {
                        let current = client.get("/w/counter").await.unwrap();
                        let value: u64 = current
                            .as_ref()
                            .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap())
                            .unwrap_or(0);
                        let expected = current.as_ref().map(|kv| kv.value.clone());
                        if client
                            .compare_and_swap(
                                "/w/counter",
                                expected.as_deref(),
                                (value + 1).to_string(),
                            )
                            .await
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        client.get("/w/counter").await.unwrap().unwrap().value,
        b"80"
    );
    client.delete("/w/a").await.unwrap();
    let (events, _) = client
        .watch("/w/", start, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(events.first().unwrap().revision, start);
    assert_eq!(
        events.iter().filter(|e| e.kv.key == "/w/counter").count(),
        80
    );
    assert_eq!(events.last().unwrap().kind, EventKind::Delete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_deletes_its_keys_with_an_event() {
    let cluster = TestCluster::start(3, 10_000);
    cluster.wait_for_leader().await;
    let client = cluster.client();
    let lease = client
        .lease_grant(Duration::from_millis(600))
        .await
        .unwrap();
    let kept = client
        .lease_grant(Duration::from_millis(600))
        .await
        .unwrap();
    let from = client
        .put_with_lease("/nodes/n1", "alive", Some(lease))
        .await
        .unwrap();
    client
        .put_with_lease("/nodes/n2", "alive", Some(kept))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut next = from;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen
        .iter()
        .any(|e: &cluster::Event| e.kind == EventKind::Delete)
    {
        assert!(std::time::Instant::now() < deadline, "lease never expired");
        client.lease_keep_alive(kept).await.unwrap();
        let (events, n) = client
            .watch("/nodes/", next, Duration::from_millis(200))
            .await
            .unwrap();
        next = n;
        seen.extend(events);
    }
    let delete = seen.iter().find(|e| e.kind == EventKind::Delete).unwrap();
    assert_eq!(delete.kv.key, "/nodes/n1");
    assert_eq!(delete.expired_lease, Some(lease));
    assert!(client.get("/nodes/n1").await.unwrap().is_none());
    assert!(
        client.get("/nodes/n2").await.unwrap().is_some(),
        "a lease kept alive keeps its keys"
    );
    let err = client.lease_keep_alive(lease).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Store(StoreError::Rejected(ApplyError::LeaseNotFound(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_member_is_replaced_by_a_new_one() {
    let mut cluster = TestCluster::start(3, 30);
    let leader = cluster.wait_for_leader().await;
    let client = cluster.client();
    write_keys(&client, "/m/", 0..60).await;
    // Membership changes happen under load: a writer runs throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut written = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                client
                    .put(&format!("/load/{written:05}"), format!("v{written}"))
                    .await
                    .unwrap();
                written += 1;
            }
            written
        })
    };
    let dead = (1..=3).find(|id| *id != leader.id).unwrap();
    cluster.kill_member(dead);
    client.remove_member(dead).await.unwrap();
    // A new member with a fresh disk joins as a learner, catches up, and is promoted.
    let info = MemberInfo {
        id: 4,
        peer_addr: format!("127.0.0.1:{}", free_port()),
        client_addr: format!("127.0.0.1:{}", free_port()),
    };
    let data_dir = cluster.dir.path().join("member-4");
    cluster::server::prepare_join(&data_dir, &info).unwrap();
    client.add_learner(info.clone()).await.unwrap();
    cluster.members.push(common::Member {
        info: info.clone(),
        data_dir,
        process: None,
        paused: false,
    });
    cluster.start_member(4);
    let leader = cluster.wait_for_leader().await;
    cluster.wait_applied(4, leader.commit_index).await;
    let members = client.promote(4).await.unwrap();
    assert!(members.iter().any(|m| m.info.id == 4 && m.voter));
    assert!(!members.iter().any(|m| m.info.id == dead));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await.unwrap();
    assert_keys(&client, "/load/", written as usize).await;
    write_keys(&client, "/n/", 0..10).await;
    // The new member now counts for the quorum: lose another old one and keep serving.
    let leader = cluster.wait_for_leader().await;
    let other = (1..=3).find(|id| *id != leader.id && *id != dead).unwrap();
    cluster.kill_member(other);
    write_keys(&client, "/o/", 0..5).await;
    assert_keys(&client, "/m/", 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_kept_alive_survives_leader_failover_then_expires() {
    let mut cluster = TestCluster::start(3, 10_000);
    let leader = cluster.wait_for_leader().await;
    let client = cluster.client();
    let lease = client.lease_grant(Duration::from_secs(5)).await.unwrap();
    let from = client
        .put_with_lease("/nodes/n7", "alive", Some(lease))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                client.lease_keep_alive(lease).await.unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    // The leader that measured the lease dies; its successor restarts the TTL, keep-alives go on.
    cluster.kill_member(leader.id);
    let successor = cluster.wait_for_leader().await;
    assert_ne!(successor.id, leader.id);
    client.put("/after-failover", "x").await.unwrap();
    assert!(
        client.get("/nodes/n7").await.unwrap().is_some(),
        "a lease kept alive must not expire at failover"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    keeper.await.unwrap();
    // Without keep-alives the new leader expires it and the delete is watched.
    let mut next = from;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (events, n) = client
            .watch("/nodes/", next, Duration::from_millis(500))
            .await
            .unwrap();
        next = n;
        if let Some(e) = events.iter().find(|e| e.kind == EventKind::Delete) {
            assert_eq!(e.expired_lease, Some(lease));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lease never expired after keep-alives stopped"
        );
    }
    assert!(client.get("/nodes/n7").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restores_into_a_new_cluster_only() {
    let source = TestCluster::start(1, 10_000);
    source.wait_for_leader().await;
    write_keys(&source.client(), "/backup/", 0..25).await;
    let file = source.dir.path().join("backup.json");
    let cli = |args: &[&str], endpoints: Vec<String>| {
        std::process::Command::new(common::BINARY)
            .args(args)
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .output()
            .unwrap()
    };
    let out = cli(
        &["backup", "--out", file.to_str().unwrap()],
        source.endpoints(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let target = TestCluster::start(3, 10_000);
    target.wait_for_leader().await;
    let out = cli(
        &["restore", "--file", file.to_str().unwrap()],
        target.endpoints(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_keys(&target.client(), "/backup/", 25).await;
    // A second restore would mix two states: refused, nothing written.
    let revision = target.wait_for_leader().await.revision;
    let out = cli(
        &["restore", "--file", file.to_str().unwrap()],
        target.endpoints(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds keys"));
    assert_eq!(target.wait_for_leader().await.revision, revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_grows_to_three_and_survives_losing_the_first() {
    let mut cluster = TestCluster::start(1, 10_000);
    cluster.wait_for_leader().await;
    let client = cluster.client();
    write_keys(&client, "/g/", 0..10).await;
    for id in [2, 3] {
        let info = MemberInfo {
            id,
            peer_addr: format!("127.0.0.1:{}", free_port()),
            client_addr: format!("127.0.0.1:{}", free_port()),
        };
        let data_dir = cluster.dir.path().join(format!("member-{id}"));
        cluster::server::prepare_join(&data_dir, &info).unwrap();
        client.add_learner(info.clone()).await.unwrap();
        cluster.members.push(common::Member {
            info,
            data_dir,
            process: None,
            paused: false,
        });
        cluster.start_member(id);
        let leader = cluster.wait_for_leader().await;
        cluster.wait_applied(id, leader.commit_index).await;
        client.promote(id).await.unwrap();
    }
    let status = cluster.wait_for_leader().await;
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3);
    cluster.kill_member(1);
    write_keys(&client, "/g/", 10..20).await;
    assert_keys(&client, "/g/", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_hands_over_leadership_first() {
    let mut cluster = TestCluster::start(3, 10_000);
    let leader = cluster.wait_for_leader().await;
    let client = cluster.client();
    client.put("/r", "1").await.unwrap();
    let members = client.remove_member(leader.id).await.unwrap();
    assert_eq!(members.len(), 2);
    assert!(!members.iter().any(|m| m.info.id == leader.id));
    cluster.kill_member(leader.id);
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader.id, leader.id);
    client.put("/r", "2").await.unwrap();
    assert_eq!(client.get("/r").await.unwrap().unwrap().value, b"2");
}

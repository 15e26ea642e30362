//! Partitions: members in a network namespace of the test's own, links cut with nft rules there.

mod common;

use std::time::Duration;

use cluster::client::ClientOptions;
use cluster::Client;
use common::{in_netns, TestCluster};

fn pinned_client(addr: &str) -> Client {
    let options = ClientOptions {
        attempt_timeout: Duration::from_millis(800),
        total_timeout: Duration::from_secs(3),
        pinned: true,
        tls_ca_pem: None,
    };
    Client::with_options(vec![addr.to_string()], options).unwrap()
}

#[test]
fn isolated_leader_neither_writes_nor_serves_stale_reads() {
    in_netns("partition", |netns| async move {
        let mut cluster = TestCluster::start_in_netns(&netns, 3, 10_000);
        let old = cluster.wait_for_leader().await;
        let client = cluster.client();
        client.put("/p", "1").await.unwrap();
        cluster.isolate(old.id);

        // The majority elects a leader and keeps serving.
        client.put("/p", "2").await.unwrap();
        let new = cluster.wait_for_leader().await;
        assert_ne!(new.id, old.id);
        assert_eq!(client.get("/p").await.unwrap().unwrap().value, b"2");

        // The isolated member accepts no write and serves no read (it cannot confirm leadership).
        let isolated = pinned_client(&cluster.member(old.id).info.client_addr.clone());
        assert!(isolated.put("/p", "from-the-minority").await.is_err());
        assert!(
            isolated.get("/p").await.is_err(),
            "a read from the minority must fail, not return stale data"
        );

        cluster.heal();
        let leader = cluster.wait_for_leader().await;
        cluster.wait_applied(old.id, leader.commit_index).await;
        assert_eq!(
            client.get("/p").await.unwrap().unwrap().value,
            b"2",
            "the minority's write never applied"
        );
        client.put("/p", "3").await.unwrap();
        assert_eq!(client.get("/p").await.unwrap().unwrap().value, b"3");
    });
}

#[test]
fn isolated_follower_catches_up_after_heal() {
    in_netns("follower-cut", |netns| async move {
        let mut cluster = TestCluster::start_in_netns(&netns, 3, 20);
        let leader = cluster.wait_for_leader().await;
        let follower = (1..=3).find(|id| *id != leader.id).unwrap();
        cluster.isolate(follower);
        let client = cluster.client();
        for i in 0..60 {
            client
                .put(&format!("/f/{i:03}"), i.to_string())
                .await
                .unwrap();
        }
        cluster.heal();
        let leader = cluster.wait_for_leader().await;
        let status = cluster.wait_applied(follower, leader.commit_index).await;
        assert_eq!(status.revision, leader.revision);
    });
}

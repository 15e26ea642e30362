//! A randomized fault schedule (kill, restart, pause, resume, partition of one member or of
//! every member, heal) under concurrent
//! clients, with the members in a network namespace of the test's own; the
//! recorded history must be linearizable and keep every acknowledged write.
//!
//! CI runs the seeds in `CLUSTER_STORE_SEEDS` (default "1,2"), each for
//! `CLUSTER_STORE_FAULT_SECS` seconds (default 6). More seeds:
//! `CLUSTER_STORE_SEEDS=$(seq -s, 1 50) cargo test -p cluster --release --test linearizable_under_faults`

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::client::ClientOptions;
use cluster::linearizability::{check, Operation, RegisterOp};
use cluster::{Client, ClientError};
use common::{in_netns, TestCluster};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: usize = 3;
const CLIENTS: u64 = 4;

fn seeds() -> Vec<u64> {
    std::env::var("CLUSTER_STORE_SEEDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .expect("CLUSTER_STORE_SEEDS is a comma-separated list of numbers")
        })
        .collect()
}

fn fault_duration() -> Duration {
    Duration::from_secs(
        std::env::var("CLUSTER_STORE_FAULT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(6),
    )
}

fn parse(value: &[u8]) -> u64 {
    String::from_utf8_lossy(value)
        .parse()
        .expect("values are numbers")
}

struct Recorder {
    started: Instant,
    history: Mutex<Vec<Operation>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

async fn run_client(
    index: u64,
    seed: u64,
    endpoints: Vec<String>,
    recorder: Arc<Recorder>,
    until: Instant,
) {
    let options = ClientOptions {
        attempt_timeout: Duration::from_millis(700),
        total_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let client = Client::with_options(endpoints, options).unwrap();
    let mut rng = StdRng::seed_from_u64(seed * 1000 + index);
    let mut counter = 0u64;
    let mut last_seen: Option<u64> = None;
    while Instant::now() < until {
        let key = format!("/reg/{}", rng.gen_range(0..KEYS));
        counter += 1;
        let fresh = index * 1_000_000_000 + counter;
        let called = recorder.now();
        let (op, returned) = match rng.gen_range(0..10) {
            0..=3 => match client.put(&key, fresh.to_string()).await {
                Ok(_) => (RegisterOp::Write { value: fresh }, Some(recorder.now())),
                Err(ClientError::Unavailable { .. }) => (RegisterOp::Write { value: fresh }, None),
                Err(e) => panic!("write failed definitely: {e}"),
            },
            4..=7 => match client.get(&key).await {
                Ok(kv) => {
                    let value = kv.map(|kv| parse(&kv.value));
                    last_seen = value;
                    (RegisterOp::Read { value }, Some(recorder.now()))
                }
                Err(ClientError::Unavailable { .. }) => continue,
                Err(e) => panic!("read failed definitely: {e}"),
            },
            _ => {
                let expected = if rng.gen_bool(0.5) { last_seen } else { None };
                let bytes = expected.map(|v| v.to_string().into_bytes());
                match client
                    .compare_and_swap(&key, bytes.as_deref(), fresh.to_string())
                    .await
                {
                    Ok(succeeded) => (
                        RegisterOp::Cas {
                            expected,
                            new: fresh,
                            succeeded,
                        },
                        Some(recorder.now()),
                    ),
                    Err(ClientError::Unavailable { .. }) => (
                        RegisterOp::Cas {
                            expected,
                            new: fresh,
                            succeeded: false,
                        },
                        None,
                    ),
                    Err(e) => panic!("cas failed definitely: {e}"),
                }
            }
        };
        recorder.history.lock().unwrap().push(Operation {
            key,
            op,
            called,
            returned,
            client: index,
        });
    }
}

async fn nemesis(cluster: &mut TestCluster, seed: u64, until: Instant) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    let mut partitioned = false;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..900))).await;
        if partitioned {
            cluster.heal();
            partitioned = false;
            log.push("heal".into());
            continue;
        }
        let down: Vec<u64> = cluster
            .members
            .iter()
            .filter(|m| m.process.is_none() || m.paused)
            .map(|m| m.info.id)
            .collect();
        // At most one member down at a time keeps a majority; faults still hit the leader often.
        if let Some(&id) = down.first() {
            if cluster.member(id).paused {
                cluster.signal(id, Signal::SIGCONT);
                cluster.member(id).paused = false;
                log.push(format!("resume {id}"));
            } else {
                cluster.start_member(id);
                log.push(format!("restart {id}"));
            }
            continue;
        }
        let target = if rng.gen_bool(0.5) {
            match cluster.status_of(1).await.and_then(|s| s.leader) {
                Some(l) => l,
                None => rng.gen_range(1..=3),
            }
        } else {
            rng.gen_range(1..=3)
        };
        let fault = rng.gen_range(0..4);
        if fault == 3 {
            // No majority anywhere for a while: writes must fail or stay unknown, never be lost.
            let other = (1..=3).find(|id| *id != target).unwrap();
            cluster.isolate(target);
            cluster.isolate(other);
            partitioned = true;
            log.push(format!("isolate {target} and {other} (no majority)"));
            // Longer than the clients' patience: some operations end with an unknown outcome.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        } else if fault == 0 {
            cluster.kill_member(target);
            log.push(format!("kill {target}"));
        } else if fault == 1 {
            cluster.isolate(target);
            partitioned = true;
            log.push(format!("isolate {target}"));
        } else {
            cluster.signal(target, Signal::SIGSTOP);
            log.push(format!("pause {target}"));
        }
    }
    if partitioned {
        cluster.heal();
    }
    for id in 1..=3 {
        if cluster.member(id).paused {
            cluster.signal(id, Signal::SIGCONT);
            cluster.member(id).paused = false;
        } else if cluster.member(id).process.is_none() {
            cluster.start_member(id);
        }
    }
    log
}

#[test]
fn random_faults_keep_history_linearizable() {
    for seed in seeds() {
        in_netns(&format!("faults-{seed}"), move |netns| {
            run_seed(netns, seed)
        });
    }
}

async fn run_seed(netns: String, seed: u64) {
    {
        let mut cluster = TestCluster::start_in_netns(&netns, 3, 50);
        cluster.wait_for_leader().await;
        let recorder = Arc::new(Recorder {
            started: Instant::now(),
            history: Mutex::new(Vec::new()),
        });
        let until = Instant::now() + fault_duration();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                tokio::spawn(run_client(
                    i + 1,
                    seed,
                    cluster.endpoints(),
                    recorder.clone(),
                    until,
                ))
            })
            .collect();
        let faults = nemesis(&mut cluster, seed, until).await;
        for c in clients {
            c.await.unwrap();
        }
        // Healed: final reads of every key join the history, so a lost acknowledged write shows.
        cluster.wait_for_leader().await;
        let reader = cluster.client();
        for k in 0..KEYS {
            let key = format!("/reg/{k}");
            let called = recorder.now();
            let value = reader.get(&key).await.unwrap().map(|kv| parse(&kv.value));
            recorder.history.lock().unwrap().push(Operation {
                key,
                op: RegisterOp::Read { value },
                called,
                returned: Some(recorder.now()),
                client: 0,
            });
        }
        let history = recorder.history.lock().unwrap().clone();
        let acknowledged = history.iter().filter(|o| o.returned.is_some()).count();
        eprintln!(
            "seed {seed}: {} operations ({acknowledged} answered, {} outcome unknown), faults: {faults:?}",
            history.len(),
            history.len() - acknowledged
        );
        assert!(
            acknowledged > 20,
            "seed {seed}: too few operations completed to mean anything"
        );
        if let Err(e) = check(&history) {
            panic!("seed {seed}: {e}; faults: {faults:?}");
        }
    }
}

//! A cluster of real `cluster-store` processes on loopback, with its own ports and temporary
//! directory; every process it started is killed when it is dropped.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::protocol::{Role, StatusReport};
use cluster::state_machine::MemberInfo;
use cluster::Client;

pub const BINARY: &str = env!("CARGO_BIN_EXE_cluster-store");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Member {
    pub info: MemberInfo,
    pub data_dir: PathBuf,
    pub process: Option<Child>,
    pub paused: bool,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    pub snapshot_every: u64,
    /// Set when the members run inside a network namespace of the test's own.
    pub netns: Option<String>,
}

/// The loopback address of member `id` inside a test network namespace.
pub fn member_ip(id: u64) -> String {
    format!("127.0.0.{}", 10 + id)
}

impl TestCluster {
    /// Initializes and starts `n` members on 127.0.0.1 (random free ports).
    pub fn start(n: u64, snapshot_every: u64) -> TestCluster {
        let infos: Vec<MemberInfo> = (1..=n)
            .map(|id| MemberInfo {
                id,
                peer_addr: format!("127.0.0.1:{}", free_port()),
                client_addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        Self::start_members(infos, snapshot_every, None, &[])
    }

    /// Like [`start`], for a cluster whose members talk mutual TLS with the CA in `ca_dir`.
    pub fn start_with_ca(n: u64, ca_dir: &std::path::Path) -> TestCluster {
        let infos: Vec<MemberInfo> = (1..=n)
            .map(|id| MemberInfo {
                id,
                peer_addr: format!("127.0.0.1:{}", free_port()),
                client_addr: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        Self::start_members(
            infos,
            10_000,
            None,
            &["--ca-dir".into(), ca_dir.display().to_string()],
        )
    }

    /// Initializes and starts `n` members inside network namespace `netns` (see [`in_netns`]),
    /// member `id` on address [`member_ip`], so links can be cut with nft rules there.
    pub fn start_in_netns(netns: &str, n: u64, snapshot_every: u64) -> TestCluster {
        let infos: Vec<MemberInfo> = (1..=n)
            .map(|id| MemberInfo {
                id,
                peer_addr: format!("{}:7000", member_ip(id)),
                client_addr: format!("{}:8000", member_ip(id)),
            })
            .collect();
        Self::start_members(infos, snapshot_every, Some(netns.to_string()), &[])
    }

    fn start_members(
        infos: Vec<MemberInfo>,
        snapshot_every: u64,
        netns: Option<String>,
        init_args: &[String],
    ) -> TestCluster {
        let n = infos.len() as u64;
        let dir = tempfile::Builder::new()
            .prefix(&format!("cluster-test-{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let mut cluster = TestCluster {
            dir,
            members: vec![],
            snapshot_every,
            netns,
        };
        for info in &infos {
            let data_dir = cluster.dir.path().join(format!("member-{}", info.id));
            let mut cmd = Command::new(BINARY);
            cmd.arg("init")
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--id")
                .arg(info.id.to_string())
                .args(init_args);
            for m in &infos {
                cmd.arg("--member")
                    .arg(format!("{}={}/{}", m.id, m.peer_addr, m.client_addr));
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            cluster.members.push(Member {
                info: info.clone(),
                data_dir,
                process: None,
                paused: false,
            });
        }
        for id in 1..=n {
            cluster.start_member(id);
        }
        cluster
    }

    pub fn member(&mut self, id: u64) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.info.id == id)
            .expect("member exists")
    }

    pub fn start_member(&mut self, id: u64) {
        let snapshot_every = self.snapshot_every;
        let log_path = self.dir.path().join(format!("member-{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let netns = self.netns.clone();
        let member = self.member(id);
        assert!(member.process.is_none(), "member {id} already running");
        let mut command = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BINARY]);
                c
            }
            None => Command::new(BINARY),
        };
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--snapshot-every")
            .arg(snapshot_every.to_string())
            .arg("--tick-ms")
            .arg("20")
            .env(
                "CLUSTER_STORE_LOG",
                std::env::var("TEST_STORE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        member.process = Some(child);
        member.paused = false;
    }

    /// Cuts every link between member `id` and the other members (clients still reach it).
    pub fn isolate(&mut self, id: u64) {
        let ns = self
            .netns
            .clone()
            .expect("partitions need a cluster started in a netns");
        let own = member_ip(id);
        let others: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.info.id != id)
            .map(|m| member_ip(m.info.id))
            .collect();
        let others = others.join(", ");
        let rules = format!(
            "table inet partition {{\n chain output {{\n type filter hook output priority 0; policy accept;\n \
             ip saddr {own} ip daddr {{ {others} }} drop\n ip daddr {own} ip saddr {{ {others} }} drop\n }}\n}}\n"
        );
        nft(&ns, &rules);
    }

    /// Removes every cut.
    pub fn heal(&mut self) {
        let ns = self
            .netns
            .clone()
            .expect("partitions need a cluster started in a netns");
        nft(&ns, "table inet partition\ndelete table inet partition\n");
    }

    /// SIGKILL: the process dies with no chance to flush anything.
    pub fn kill_member(&mut self, id: u64) {
        let member = self.member(id);
        if let Some(mut child) = member.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        member.paused = false;
    }

    pub fn signal(&mut self, id: u64, signal: nix::sys::signal::Signal) {
        let member = self.member(id);
        let pid = member.process.as_ref().expect("member running").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
        member.paused = signal == nix::sys::signal::Signal::SIGSTOP;
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.info.client_addr.clone())
            .collect()
    }

    pub fn client(&self) -> Client {
        Client::new(self.endpoints()).unwrap()
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| m.process.is_some() && !m.paused)
            .map(|m| m.info.id)
            .collect()
    }

    /// Waits until a running member is leader and answers, and returns its status.
    pub async fn wait_for_leader(&self) -> StatusReport {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for id in self.running_ids() {
                let addr = &self
                    .members
                    .iter()
                    .find(|m| m.info.id == id)
                    .unwrap()
                    .info
                    .client_addr;
                if let Ok(s) = client.status_of(addr).await {
                    if s.role == Role::Leader && s.commit_index >= s.last_index.min(s.commit_index)
                    {
                        return s;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader within 30 s; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status_of(&self, id: u64) -> Option<StatusReport> {
        let addr = self
            .members
            .iter()
            .find(|m| m.info.id == id)
            .unwrap()
            .info
            .client_addr
            .clone();
        self.client().status_of(&addr).await.ok()
    }

    /// Waits until member `id` applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) -> StatusReport {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.status_of(id).await {
                if s.applied_index >= index {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "member {id} did not apply index {index} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn nft(netns: &str, rules: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "nft rejected rules:\n{rules}");
}

/// A network namespace of the test's own, deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Netns {
        let name = format!("cst-{tag}-{}", std::process::id());
        if std::path::Path::new(&format!("/run/netns/{name}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot create network namespace {name}");
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot bring lo up in {name}");
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `body` on a thread that entered a fresh network namespace, with a single-threaded tokio
/// runtime there, so every socket the test opens lives in that namespace.
pub fn in_netns<F, Fut>(tag: &str, body: F)
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let netns = Netns::create(tag);
    let name = netns.name.clone();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter netns");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(body(name));
    });
    let result = thread.join();
    drop(netns);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test for whoever reads its output.
            let path = self.dir.path().to_path_buf();
            for member in &self.members {
                let log = path.join(format!("member-{}.log", member.info.id));
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("--- last lines of member {} ---", member.info.id);
                    for line in tail.into_iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}

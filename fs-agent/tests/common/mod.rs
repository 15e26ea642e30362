//! A whole filesystem on this machine for tests: a metadata store process, chunk server
//! processes and FUSE mounts, on loopback, in a fresh temporary directory. Dropping it unmounts
//! every mount and kills every process, also when the test panics.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fs_agent::chunk_client::ChunkClient;
use fs_agent::chunk_transport::ChunkTls;
use fs_agent::file_data::FileData;
use fs_agent::metadata_store::ClusterMetadata;
use fs_agent::namespace::Namespace;

pub const BINARY: &str = env!("CARGO_BIN_EXE_fs-agent");
/// Small chunks so tests cross chunk boundaries with little data.
pub const CHUNK_SIZE: u64 = 1024 * 1024;
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(args: &[&str], log: &Path) -> Child {
    spawn_with(args, log, None, None)
}

/// Spawns fs-agent with the store's CA (`FS_AGENT_META_CA`) and chunk TLS material
/// (`FS_AGENT_TLS_DIR`) when given.
fn spawn_with(args: &[&str], log: &Path, ca: Option<&Path>, tls_dir: Option<&Path>) -> Child {
    let log = std::fs::File::create(log).unwrap();
    let mut command = Command::new(BINARY);
    if let Some(ca) = ca {
        command.env("FS_AGENT_META_CA", ca);
    }
    if let Some(dir) = tls_dir {
        command.env("FS_AGENT_TLS_DIR", dir);
    }
    command.args(args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub struct ChunkServer {
    pub addr: String,
    pub data: PathBuf,
    /// Its certificate, when chunk connections talk TLS.
    pub tls_dir: Option<PathBuf>,
    /// Extra arguments of its `chunkserver` command.
    pub extra_args: Vec<String>,
    process: Option<Child>,
}

pub struct Mount {
    pub path: PathBuf,
    pub node_id: String,
    /// Extra arguments of its `mount` command.
    pub extra_args: Vec<String>,
    process: Option<Child>,
}

pub struct TestFs {
    pub dir: tempfile::TempDir,
    pub meta: String,
    /// The store's CA certificate when it talks TLS.
    pub meta_ca: Option<PathBuf>,
    meta_process: Option<Child>,
    /// The cluster CA directory (ca.pem, ca.key) when the store or the chunk servers talk TLS.
    pub ca_dir: Option<PathBuf>,
    /// The client certificate of mounts and commands when chunk servers talk TLS.
    pub client_tls_dir: Option<PathBuf>,
    pub servers: Vec<ChunkServer>,
    pub mounts: Vec<Mount>,
    /// Other long-running fs-agent processes (healers), killed on drop.
    services: Vec<Child>,
    /// `--heal-interval-secs` of mounts started from now on (1 by default;
    /// a test that watches under-replication before a heal raises it, or
    /// the writer's mount would heal first).
    pub mount_heal_interval_secs: u64,
}

/// What talks TLS in a test filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct TlsOptions {
    /// The metadata store (`--meta-ca`).
    pub store: bool,
    /// Chunk servers and their clients (`--tls-dir`).
    pub chunks: bool,
}

pub fn is_fuse_mount(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == FUSE_SUPER_MAGIC).unwrap_or(false)
}

impl TestFs {
    /// A metadata store and `servers` chunk servers, all registered.
    pub fn start(tag: &str, servers: usize) -> TestFs {
        Self::start_with(tag, servers, false)
    }

    /// Like [`start`], with `tls`: the store talks TLS with a fresh cluster CA, which every
    /// process is given (`--meta-ca`).
    pub fn start_with(tag: &str, servers: usize, tls: bool) -> TestFs {
        Self::start_tls(tag, servers, TlsOptions { store: tls, chunks: false })
    }

    /// Like [`start`], with the store and/or the chunk servers talking TLS with one fresh
    /// cluster CA: each chunk server gets a certificate for 127.0.0.1, mounts and commands a
    /// client certificate.
    pub fn start_tls(tag: &str, servers: usize, tls: TlsOptions) -> TestFs {
        let dir = tempfile::Builder::new().prefix(&format!("fs-agent-{tag}-{}-", std::process::id())).tempdir().unwrap();
        let meta = format!("127.0.0.1:{}", free_port());
        let peer = format!("127.0.0.1:{}", free_port());
        let meta_dir = dir.path().join("meta");
        let mut args: Vec<String> =
            ["meta-server", "--data-dir", meta_dir.to_str().unwrap(), "--client-addr", &meta, "--peer-addr", &peer].iter().map(|s| s.to_string()).collect();
        let ca_dir = (tls.store || tls.chunks).then(|| {
            let ca_dir = dir.path().join("ca");
            cluster::tls::CaMaterial::create().unwrap().write(&ca_dir).unwrap();
            ca_dir
        });
        let meta_ca = match (&ca_dir, tls.store) {
            (Some(ca_dir), true) => {
                args.extend(["--ca-dir".to_string(), ca_dir.display().to_string()]);
                Some(ca_dir.join("ca.pem"))
            }
            _ => None,
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let meta_process = spawn(&args, &dir.path().join("meta.log"));
        let mut fs = TestFs { dir, meta, meta_ca, meta_process: Some(meta_process), ca_dir, client_tls_dir: None, servers: vec![], mounts: vec![], services: vec![], mount_heal_interval_secs: 1 };
        if tls.chunks {
            let client_dir = fs.dir.path().join("tls-client");
            fs.issue_certificate("client", &[], &client_dir);
            fs.client_tls_dir = Some(client_dir);
        }
        for i in 0..servers {
            let addr = format!("127.0.0.1:{}", free_port());
            let data = fs.dir.path().join(format!("chunks-{i}"));
            let tls_dir = tls.chunks.then(|| {
                let tls_dir = fs.dir.path().join(format!("tls-server-{i}"));
                fs.issue_certificate(&format!("chunk-server-{i}"), &["127.0.0.1".parse().unwrap()], &tls_dir);
                tls_dir
            });
            fs.servers.push(ChunkServer { addr, data, tls_dir, extra_args: vec![], process: None });
            fs.start_server(i);
        }
        let ns = fs.namespace();
        wait_until("chunk servers to register", Duration::from_secs(60), || {
            fs.assert_running();
            ns.servers().map(|s| s.len() == servers).unwrap_or(false)
        });
        fs
    }

    /// Panics with its log if the metadata store or a chunk server exited (a port another
    /// test took meanwhile, say), rather than letting a wait run into its timeout.
    fn assert_running(&mut self) {
        let dir = self.dir.path().to_path_buf();
        let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if let Some(status) = self.meta_process.as_mut().and_then(|p| p.try_wait().ok().flatten()) {
            panic!("the metadata store exited ({status}): {}", log("meta.log"));
        }
        for (i, server) in self.servers.iter_mut().enumerate() {
            if let Some(status) = server.process.as_mut().and_then(|p| p.try_wait().ok().flatten()) {
                panic!("chunk server {i} exited ({status}): {}", log(&format!("chunkserver-{i}.log")));
            }
        }
    }

    /// Writes a certificate of this filesystem's CA named `name`, valid for `ips`, into `out`.
    pub fn issue_certificate(&self, name: &str, ips: &[std::net::IpAddr], out: &Path) {
        let ca = cluster::tls::CaMaterial::read(self.ca_dir.as_ref().expect("a TLS test filesystem")).unwrap();
        ca.issue_service(name, ips, &[]).unwrap().write_to(out).unwrap();
    }

    pub fn start_server(&mut self, i: usize) {
        let log = self.dir.path().join(format!("chunkserver-{i}.log"));
        let server = &mut self.servers[i];
        let mut args = vec!["chunkserver", "--listen", &server.addr, "--data", server.data.to_str().unwrap(), "--meta", &self.meta, "--scrub-interval-secs", "1", "--heartbeat-secs", "1"];
        args.extend(server.extra_args.iter().map(String::as_str));
        let child = spawn_with(&args, &log, self.meta_ca.as_deref(), server.tls_dir.as_deref());
        server.process = Some(child);
    }

    /// SIGKILL, as a crash or a node loss.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].process.take() {
            kill(&mut child);
        }
    }

    /// Mounts the filesystem on a new mount point, as a new node, and waits until it serves.
    pub fn mount(&mut self) -> PathBuf {
        self.mount_with(&[])
    }

    /// [`TestFs::mount`] with extra arguments for `fs-agent mount`.
    pub fn mount_with(&mut self, extra_args: &[&str]) -> PathBuf {
        let i = self.mounts.len();
        let path = self.dir.path().join(format!("mnt-{i}"));
        std::fs::create_dir_all(&path).unwrap();
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        self.mounts.push(Mount { path: path.clone(), node_id: format!("node-{i}"), extra_args, process: None });
        self.start_mount(i);
        path
    }

    /// Kills mount `i` with SIGKILL (a crashed fs-agent), then starts it again on the same
    /// mount point with the same node id.
    pub fn restart_mount(&mut self, i: usize) {
        if let Some(mut child) = self.mounts[i].process.take() {
            kill(&mut child);
        }
        nix::mount::umount2(&self.mounts[i].path, nix::mount::MntFlags::MNT_DETACH).unwrap();
        self.start_mount(i);
    }

    fn start_mount(&mut self, i: usize) {
        let log = self.dir.path().join(format!("mount-{i}.log"));
        let heal_interval = self.mount_heal_interval_secs.to_string();
        let mount = &mut self.mounts[i];
        let path = mount.path.clone();
        let chunk_size = CHUNK_SIZE.to_string();
        let mut args = vec!["mount", "--meta", &self.meta, "--chunk-size", &chunk_size, "--threads", "4", "--heal-interval-secs", &heal_interval, "--node-id", &mount.node_id];
        args.extend(mount.extra_args.iter().map(String::as_str));
        args.push(path.to_str().unwrap());
        let child = spawn_with(
            &args,
            &log,
            self.meta_ca.as_deref(),
            self.client_tls_dir.as_deref(),
        );
        mount.process = Some(child);
        let start = Instant::now();
        while !is_fuse_mount(&path) {
            if let Some(status) = mount.process.as_mut().unwrap().try_wait().unwrap() {
                panic!("mount exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(start.elapsed() < Duration::from_secs(60), "mount did not come up: {}", std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `fs-agent ARGS --meta STORE` as a long-running process (a healer), logging to
    /// `<name>.log`.
    pub fn start_service(&mut self, name: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--meta", &self.meta]);
        let child = spawn_with(&all, &log, self.meta_ca.as_deref(), self.client_tls_dir.as_deref());
        self.services.push(child);
    }

    /// Sends `signal` to mount `i`'s process (SIGSTOP: a node frozen past its self-fence).
    /// A SIGSTOP returns once every thread of the mount has stopped: kill(2) returns when the
    /// signal is sent, and a thread could otherwise still take a request meanwhile.
    pub fn signal_mount(&self, i: usize, signal: nix::sys::signal::Signal) {
        let pid = self.mounts[i].process.as_ref().expect("mount running").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
        if signal == nix::sys::signal::Signal::SIGSTOP {
            let all_stopped = || {
                std::fs::read_dir(format!("/proc/{pid}/task")).map(|tasks| {
                    tasks.filter_map(Result::ok).all(|task| {
                        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                        // The state follows the parenthesized command name.
                        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
                    })
                })
                .unwrap_or(false)
            };
            wait_until("every thread of the mount to stop", Duration::from_secs(10), all_stopped);
        }
    }

    /// A metadata client of this filesystem, as another node would have.
    pub fn namespace(&self) -> Arc<Namespace> {
        let ca_pem = self.meta_ca.as_ref().map(|p| std::fs::read_to_string(p).unwrap());
        let store = ClusterMetadata::connect(vec![self.meta.clone()], ca_pem).unwrap();
        Arc::new(Namespace::new(Arc::new(store)))
    }

    pub fn file_data(&self, min_copies: usize) -> FileData {
        FileData::new(self.namespace(), CHUNK_SIZE, min_copies).with_chunk_client(self.chunk_client())
    }

    /// A chunk client as mounts of this filesystem have (with the client certificate when
    /// chunk servers talk TLS).
    pub fn chunk_client(&self) -> ChunkClient {
        ChunkClient::with_tls(self.client_tls_dir.as_ref().map(|dir| ChunkTls::load(dir).unwrap().client_config()))
    }

    /// An fs-agent command as an operator of this filesystem runs it: given the store's CA and
    /// the client certificate when they talk TLS.
    pub fn command(&self) -> Command {
        let mut command = Command::new(BINARY);
        if let Some(ca) = &self.meta_ca {
            command.env("FS_AGENT_META_CA", ca);
        }
        if let Some(dir) = &self.client_tls_dir {
            command.env("FS_AGENT_TLS_DIR", dir);
        }
        command
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        for mount in &mut self.mounts {
            let _ = nix::mount::umount2(&mount.path, nix::mount::MntFlags::MNT_DETACH);
            if let Some(mut child) = mount.process.take() {
                kill(&mut child);
            }
        }
        for child in &mut self.services {
            kill(child);
        }
        for server in &mut self.servers {
            if let Some(mut child) = server.process.take() {
                kill(&mut child);
            }
        }
        if let Some(mut child) = self.meta_process.take() {
            kill(&mut child);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a test can check what it wrote.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs a command that must succeed, showing its output if it does not.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// A loop device over an image file, detached on drop.
pub struct LoopDevice(pub String);

impl LoopDevice {
    pub fn attach(image: &Path) -> LoopDevice {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(image).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// An ext4 filesystem mounted from a device, unmounted on drop.
pub struct Ext4Mount(pub PathBuf);

impl Ext4Mount {
    pub fn mount(device: &str, at: &Path) -> Ext4Mount {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount").args(["-t", "ext4", device]).arg(at).status().unwrap().success();
        assert!(ok, "mount {device}");
        Ext4Mount(at.to_path_buf())
    }
}

impl Drop for Ext4Mount {
    fn drop(&mut self) {
        if Command::new("umount").arg(&self.0).status().map(|s| !s.success()).unwrap_or(true) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

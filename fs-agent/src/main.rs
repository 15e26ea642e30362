//! `fs-agent`: chunk server, FUSE mount and operator commands of the shared filesystem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use fs_agent::chunk_client::ChunkClient;
use fs_agent::chunk_store::ChunkStore;
use fs_agent::chunk_transport::ChunkTls;
use fs_agent::file_data::{FileData, DEFAULT_CHUNK_SIZE};
use fs_agent::fuse_mount::{self, SharedFs};
use fs_agent::healer::{self, HealerOptions, HealerStatus};
use fs_agent::metadata_store::ClusterMetadata;
use fs_agent::namespace::{resolve_path, FsConfig, Inode, InodeKind, Namespace};
use fs_agent::servers;

#[derive(Parser)]
#[command(name = "fs-agent", about = "Shared replicated filesystem: chunk server and FUSE mount")]
struct Cli {
    /// The cluster store's CA certificate (PEM file): talk TLS to the store and check it.
    #[arg(long, global = true, env = "FS_AGENT_META_CA")]
    meta_ca: Option<PathBuf>,
    /// Mutual TLS to chunk servers: a directory with ca.pem (the cluster CA), member.pem and
    /// member.key (this process's certificate, from `fs-agent cert-create`). A chunk server
    /// given one serves TLS clients only. Without it, plain TCP (trusted networks only).
    #[arg(long, global = true, env = "FS_AGENT_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve chunk replicas stored in DATA on ADDR.
    Chunkserver {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        data: PathBuf,
        /// Cluster store endpoints (comma separated): register this server so mounts use it.
        #[arg(long, env = "FS_AGENT_META")]
        meta: Option<String>,
        /// Address mounts should use to reach this server (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Largest chunk this server accepts, in bytes.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        max_chunk_size: u64,
        /// Seconds between background scrub passes over every replica (0: never).
        #[arg(long, env = "FS_AGENT_SCRUB_INTERVAL_SECS", default_value_t = DEFAULT_SCRUB_INTERVAL_SECS)]
        scrub_interval_secs: u64,
        /// Seconds between heartbeats in the metadata store (the healer declares a server dead
        /// after --dead-after-secs without one).
        #[arg(long, default_value_t = DEFAULT_HEARTBEAT_SECS)]
        heartbeat_secs: u64,
    },
    /// Issue a certificate signed by the cluster CA for a chunk server or a client (mount,
    /// operator commands), into OUT (ca.pem, member.pem, member.key): pass OUT as --tls-dir.
    CertCreate {
        /// The cluster CA directory (ca.pem, ca.key), from `cluster-store ca-create`.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The certificate's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// An IP address clients reach this chunk server at (repeat for several). Not needed
        /// for a certificate used only as a client.
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// A host name clients reach this chunk server at (repeat for several).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
    },
    /// Mount the filesystem whose metadata lives in the cluster store at META.
    Mount {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        /// Copies of each chunk for new files (used when the filesystem is created).
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// A write fails unless at least this many copies hold it.
        #[arg(long, default_value_t = 2)]
        min_copies: usize,
        /// Chunk size for a new filesystem, in bytes (an existing one keeps its own).
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// FUSE worker threads: each serves one request at a time, so this bounds the reads
        /// and writes served in parallel.
        #[arg(long, default_value_t = 16)]
        threads: usize,
        /// This node's name in write leases (default: the host name). A restarted mount with
        /// the same id gets its files' leases back.
        #[arg(long)]
        node_id: Option<String>,
        /// This node's chunk server address: reads use its replicas first when they are current.
        /// Implied by --chunk-data.
        #[arg(long)]
        local_server: Option<String>,
        /// Run this node's chunk server in the mount process, its replicas in this directory
        /// (as `chunkserver --data`): the mount then reads and writes its local replicas
        /// directly, and serves them to other nodes on --chunk-listen.
        #[arg(long, requires = "chunk_listen", conflicts_with = "local_server")]
        chunk_data: Option<PathBuf>,
        /// Address the in-process chunk server listens on (as `chunkserver --listen`).
        #[arg(long, requires = "chunk_data")]
        chunk_listen: Option<String>,
        /// Address other nodes reach the in-process chunk server at (default: --chunk-listen).
        #[arg(long, requires = "chunk_data")]
        chunk_advertise: Option<String>,
        /// Seconds between scrub passes of the in-process chunk server (0: never).
        #[arg(long, env = "FS_AGENT_SCRUB_INTERVAL_SECS", default_value_t = DEFAULT_SCRUB_INTERVAL_SECS)]
        chunk_scrub_interval_secs: u64,
        /// Seconds between heal passes over the files this mount is writing (0: never).
        #[arg(long, default_value_t = 30)]
        heal_interval_secs: u64,
        mountpoint: PathBuf,
    },
    /// Chunk servers with their capacity, and replica health: chunks, stale and missing copies.
    Status {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
    },
    /// Take over the write lease of PATH (from the filesystem root): bumps its epoch and fences
    /// the previous writer on every chunk server. For a writer known to be dead.
    LeaseTakeover {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        path: String,
    },
    /// One healing pass: re-replicate every under-replicated chunk of files nobody is writing
    /// (files with a held write lease are skipped and reported), as one pass of `healer`.
    Heal {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        /// A server not answering is dead (its replicas are copied elsewhere) once it has sent
        /// no heartbeat for this long; 0: at once.
        #[arg(long, default_value_t = 0)]
        dead_after_secs: u64,
        /// Also repair the corrupt blocks the servers' scrubs found, from good replicas.
        #[arg(long)]
        scrub: bool,
    },
    /// Heal continuously: every --interval-secs, declare dead the servers silent for
    /// --dead-after-secs, re-replicate what lacks copies, repair the corrupt blocks scrubs
    /// found. Progress goes to the log and to `fs-agent status`.
    Healer {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        #[arg(long, default_value_t = 30)]
        interval_secs: u64,
        /// Grace period of a server that neither answers nor sends heartbeats (a restart
        /// shorter than this costs no copies).
        #[arg(long, default_value_t = 60)]
        dead_after_secs: u64,
        /// This healer's name in write leases (default: healer-<host name>). A restarted
        /// healer with the same name gets back the leases it held.
        #[arg(long)]
        name: Option<String>,
    },
    /// Drain a chunk server before removing it: it gets no new chunks, and healing copies its
    /// replicas to other servers, then drops them. `--cancel` ends the draining.
    DrainServer {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        addr: String,
        #[arg(long)]
        cancel: bool,
    },
    /// Remove a stopped chunk server from the registry. Refused while it answers, or while it
    /// holds current replicas unless --force (its disk is lost: healing copies them from the
    /// other replicas).
    RemoveServer {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        addr: String,
        #[arg(long)]
        force: bool,
    },
    /// Clone the file SRC to the new file DST (paths from the filesystem root), copy-on-write:
    /// DST shares SRC's chunks until either file writes them. SRC must not be open for writing.
    Clone {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        src: String,
        dst: String,
    },
    /// Set how many copies PATH keeps (a directory: what new files in it inherit).
    SetCopies {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        path: String,
        copies: u32,
    },
    /// Print where the chunks of PATH are stored and which replicas are current.
    Placement {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
        path: String,
    },
    /// Run a single-member cluster store for the metadata (tests and one-node setups; a
    /// cluster uses `cluster-store` members instead).
    MetaServer {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        client_addr: String,
        #[arg(long)]
        peer_addr: String,
        /// A cluster CA directory (`cluster-store ca-create`): serve TLS with a certificate it signs.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
}

fn endpoints(meta: &str) -> Vec<String> {
    meta.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn namespace(meta: &str, ca: Option<&PathBuf>) -> Result<Arc<Namespace>> {
    let ca_pem = ca.map(|path| std::fs::read_to_string(path).with_context(|| format!("cannot read the cluster CA {}", path.display()))).transpose()?;
    let store = ClusterMetadata::connect(endpoints(meta), ca_pem).context("cannot reach the metadata store")?;
    Ok(Arc::new(Namespace::new(Arc::new(store))))
}

/// This process's TLS material for chunk connections, if it has any.
fn chunk_tls(dir: Option<&PathBuf>) -> Result<Option<ChunkTls>> {
    Ok(dir.map(|dir| ChunkTls::load(dir)).transpose()?)
}

const DEFAULT_SCRUB_INTERVAL_SECS: u64 = 3600;
const DEFAULT_HEARTBEAT_SECS: u64 = 10;

/// A chunk server to start: a `chunkserver` process, or one inside a mount (`--chunk-data`).
struct ChunkServerSetup {
    listen: String,
    data: PathBuf,
    advertise: Option<String>,
    max_chunk_size: u64,
    scrub_interval_secs: u64,
    heartbeat_secs: u64,
}

impl ChunkServerSetup {
    /// Binds the listener first (the address is taken, or this fails at once), then opens the
    /// store and, with a metadata store (from `ns`), registers the server and keeps its
    /// heartbeat going: returns the listener, the address mounts use and the store.
    fn prepare(&self, ns: impl FnOnce() -> Result<Option<Arc<Namespace>>>, tls: Option<&ChunkTls>) -> Result<(std::net::TcpListener, String, Arc<ChunkStore>)> {
        let listener = fs_agent::chunk_server::bind(&self.listen)?;
        let ns = ns()?;
        let addr = self.advertise.clone().unwrap_or_else(|| listener.local_addr().map(|a| a.to_string()).unwrap_or(self.listen.clone()));
        if let Some(tls) = tls {
            tls.check_serves(&addr)?;
        }
        if let Some(ns) = ns {
            if !self.data.join("chunks").exists() {
                refuse_new_disk_at_known_address(&ns, &addr, &self.data)?;
            }
            servers::heartbeat(&ns, &addr, self.heartbeat_secs).with_context(|| format!("cannot register chunk server {addr}"))?;
            spawn_heartbeat(ns, addr.clone(), Duration::from_secs(self.heartbeat_secs.max(1)));
        }
        let store = fs_agent::chunk_server::open_store(&self.data, self.max_chunk_size)?;
        Ok((listener, addr, store))
    }

    fn scrub_interval(&self) -> Option<Duration> {
        (self.scrub_interval_secs > 0).then(|| Duration::from_secs(self.scrub_interval_secs))
    }
}

/// A chunk client speaking TLS when this process has TLS material.
fn chunk_client(tls: Option<&ChunkTls>) -> ChunkClient {
    ChunkClient::with_tls(tls.map(ChunkTls::client_config))
}

/// A new (empty) data directory at an address chunk records still list would answer for
/// replicas it does not have: refused, with what to do instead.
fn refuse_new_disk_at_known_address(ns: &Namespace, addr: &str, data: &std::path::Path) -> Result<()> {
    let held = current_replicas_on(ns, addr)?;
    if held > 0 {
        bail!(
            "{} is a new data directory, but {held} chunks still list {addr} as holding a current replica: start the new disk under a new address (another port) and `fs-agent remove-server --force {addr}`, or wait until the healer has copied them elsewhere (`fs-agent status` shows 0 replicas on {addr})",
            data.display()
        );
    }
    Ok(())
}

/// How many distinct chunks list `addr` as a current replica.
fn current_replicas_on(ns: &Namespace, addr: &str) -> Result<usize> {
    let mut chunks: Vec<u64> = fs_agent::status::chunk_records(ns)?.into_iter().filter(|(_, c)| c.current_servers().iter().any(|s| s == addr)).map(|(_, c)| c.chunk_id).collect();
    chunks.sort();
    chunks.dedup();
    Ok(chunks.len())
}

/// Renews the chunk server's registration every `interval`, so the healer knows it is alive.
fn spawn_heartbeat(ns: Arc<Namespace>, addr: String, interval: Duration) {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            if let Err(e) = servers::heartbeat(&ns, &addr, interval.as_secs()) {
                tracing::warn!("cannot renew this chunk server's heartbeat: {e}");
            }
        })
        .expect("spawn the heartbeat thread");
}

/// `fs-agent clone`: takes SRC's write lease for the clone (refused while another writer
/// holds it), so SRC cannot change meanwhile.
fn clone(ns: &Namespace, src: &str, dst: &str) -> Result<Inode> {
    let source = resolve_path(ns, src).with_context(|| format!("cannot clone {src}"))?;
    if source.kind != InodeKind::File {
        let what = if source.kind == InodeKind::Directory { "a directory" } else { "a symlink" };
        bail!("cannot clone {src}: it is {what}; only regular files are cloned");
    }
    let (parent_path, name) = match dst.trim_end_matches('/').rsplit_once('/') {
        Some((parent, name)) if !name.is_empty() => (parent, name),
        _ => bail!("cannot clone to {dst:?}: give the new file's path from the filesystem root, such as /ves/web1/disk.img"),
    };
    let parent = resolve_path(ns, parent_path).with_context(|| format!("cannot clone to {dst}"))?;
    let holder = format!("clone-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let lease = ns.acquire_lease(source.ino, &holder, false).with_context(|| format!("cannot clone {src}"))?;
    let cloned = ns.clone_file(&lease, parent.ino, name);
    if let Err(e) = ns.release_lease(&lease) {
        tracing::warn!("cannot release the write lease of {src}: {e}");
    }
    cloned.with_context(|| format!("cannot clone {src} to {dst}"))
}

fn run(cli: Cli) -> Result<()> {
    let ca = cli.meta_ca.as_ref();
    let tls = chunk_tls(cli.tls_dir.as_ref())?;
    let tls = tls.as_ref();
    match cli.command {
        Cmd::Chunkserver { listen, data, meta, advertise, max_chunk_size, scrub_interval_secs, heartbeat_secs } => {
            let server = ChunkServerSetup { listen, data, advertise, max_chunk_size, scrub_interval_secs, heartbeat_secs };
            let (listener, _, store) = server.prepare(|| meta.map(|meta| namespace(&meta, ca)).transpose(), tls)?;
            fs_agent::chunk_server::serve(listener, store, server.scrub_interval(), tls.map(ChunkTls::server_config));
        }
        Cmd::CertCreate { ca_dir, out, name, ips, dns_names } => {
            let name = match name {
                Some(name) => name,
                None => nix::unistd::gethostname()?.to_string_lossy().to_string(),
            };
            let ca = cluster::tls::CaMaterial::read(&ca_dir).with_context(|| format!("cannot read the cluster CA in {}", ca_dir.display()))?;
            let issued = ca.issue_service(&format!("fs-agent {name}"), &ips, &dns_names)?;
            issued.write_to(&out)?;
            let names: Vec<String> = ips.iter().map(|ip| ip.to_string()).chain(dns_names).collect();
            let serves = if names.is_empty() { "a client only (it names no address a chunk server could use)".to_string() } else { format!("{} (client, and chunk server at those addresses)", names.join(", ")) };
            println!("certificate for {name} written to {}: {serves}; pass --tls-dir {}", out.display(), out.display());
        }
        Cmd::Mount { meta, replicas, min_copies, chunk_size, threads, node_id, local_server, chunk_data, chunk_listen, chunk_advertise, chunk_scrub_interval_secs, heal_interval_secs, mountpoint } => {
            fuse_mount::block_termination_signals();
            fuse_mount::become_io_flusher();
            let node_id = match node_id {
                Some(id) if !id.is_empty() => id,
                Some(_) => bail!("--node-id must not be empty"),
                None => nix::unistd::gethostname()?.to_string_lossy().to_string(),
            };
            if replicas == 0 || min_copies == 0 || min_copies > replicas as usize {
                bail!("need 1 <= --min-copies ({min_copies}) <= --replicas ({replicas})");
            }
            if !mountpoint.is_dir() {
                bail!("mount point {} is not a directory", mountpoint.display());
            }
            let ns = namespace(&meta, ca)?;
            let config = ns.init(replicas, FsConfig { chunk_size }).context("cannot open the filesystem metadata")?;
            let (local_server, chunks) = match (chunk_data, chunk_listen) {
                (Some(data), Some(listen)) => {
                    let server = ChunkServerSetup { listen, data, advertise: chunk_advertise, max_chunk_size: config.chunk_size.max(DEFAULT_CHUNK_SIZE), scrub_interval_secs: chunk_scrub_interval_secs, heartbeat_secs: DEFAULT_HEARTBEAT_SECS };
                    let (listener, addr, store) = server.prepare(|| Ok(Some(ns.clone())), tls)?;
                    let (scrub_interval, server_tls) = (server.scrub_interval(), tls.map(ChunkTls::server_config));
                    let serving = store.clone();
                    std::thread::Builder::new().name("chunk-server".into()).spawn(move || fs_agent::chunk_server::serve(listener, serving, scrub_interval, server_tls))?;
                    (Some(addr.clone()), chunk_client(tls).with_local_store(addr, store))
                }
                _ => (local_server, chunk_client(tls)),
            };
            let data = FileData::new(ns, config.chunk_size, min_copies).with_local_server(local_server).with_chunk_client(chunks);
            let fs = SharedFs::new(data, &node_id);
            fs.drop_stale_locks().context("cannot clear this node's byte-range locks from an earlier run")?;
            if heal_interval_secs > 0 {
                fs.spawn_healer(Duration::from_secs(heal_interval_secs));
            }
            fuse_mount::mount(fs, &mountpoint, threads).with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
        }
        Cmd::LeaseTakeover { meta, path } => {
            let ns = namespace(&meta, ca)?;
            let inode = resolve_path(&ns, &path)?;
            let holder = format!("takeover-{}-{:08x}", std::process::id(), rand::random::<u32>());
            let lease = ns.acquire_lease(inode.ino, &holder, true)?;
            let config = ns.init(inode.replicas, FsConfig { chunk_size: DEFAULT_CHUNK_SIZE })?;
            let data = FileData::new(ns.clone(), config.chunk_size, 1).with_chunk_client(chunk_client(tls));
            data.fence(&lease)?;
            ns.release_lease(&lease)?;
            println!("{path}: write lease taken over, epoch {}; older writers are fenced", lease.epoch);
        }
        Cmd::Status { meta } => {
            let ns = namespace(&meta, ca)?;
            let report = fs_agent::status::collect(&ns, &chunk_client(tls))?;
            print!("{}", report.render());
        }
        Cmd::Heal { meta, dead_after_secs, scrub } => {
            let ns = namespace(&meta, ca)?;
            let config = ns.init(3, FsConfig { chunk_size: DEFAULT_CHUNK_SIZE })?;
            let data = FileData::new(ns.clone(), config.chunk_size, 1).with_chunk_client(chunk_client(tls));
            let holder = format!("heal-{}-{:08x}", std::process::id(), rand::random::<u32>());
            let options = HealerOptions { holder, dead_after_secs, repair_scrubbed: scrub };
            let previous = HealerStatus::read(&ns)?.unwrap_or_default();
            let done = healer::pass(&data, &options, &HealerStatus { passes: previous.passes, ..HealerStatus::default() })?;
            println!(
                "healed: {} replicas copied; {} chunks still under-replicated; {} chunks unavailable; {} files skipped (being written); {} MiB copied; {} corrupt blocks repaired",
                done.replicas_copied,
                done.under_replicated,
                done.unavailable,
                done.files_busy,
                done.bytes_copied >> 20,
                done.blocks_repaired
            );
            for error in &done.errors {
                eprintln!("fs-agent: {error}");
            }
            if !done.errors.is_empty() {
                bail!("{} files could not be healed", done.errors.len());
            }
        }
        Cmd::Healer { meta, interval_secs, dead_after_secs, name } => {
            let ns = namespace(&meta, ca)?;
            let config = ns.init(3, FsConfig { chunk_size: DEFAULT_CHUNK_SIZE })?;
            let data = FileData::new(ns.clone(), config.chunk_size, 1).with_chunk_client(chunk_client(tls));
            let holder = match name {
                Some(name) => name,
                None => format!("healer-{}", nix::unistd::gethostname()?.to_string_lossy()),
            };
            let options = HealerOptions { holder, dead_after_secs, repair_scrubbed: true };
            healer::run(&data, &options, Duration::from_secs(interval_secs.max(1)));
        }
        Cmd::DrainServer { meta, addr, cancel } => {
            let ns = namespace(&meta, ca)?;
            if !ns.servers()?.contains(&addr) {
                bail!("{addr} is not a registered chunk server (see `fs-agent status`)");
            }
            servers::set_draining(&ns, &addr, !cancel)?;
            if cancel {
                println!("{addr}: no longer draining; new chunks may go there again");
            } else {
                let held = current_replicas_on(&ns, &addr)?;
                println!("{addr}: draining; it gets no new chunks, and the healer moves its {held} current replicas to other servers. Remove it once `fs-agent status` shows 0 replicas on it");
            }
        }
        Cmd::RemoveServer { meta, addr, force } => {
            let ns = namespace(&meta, ca)?;
            let registered = ns.servers()?.contains(&addr);
            let held = current_replicas_on(&ns, &addr)?;
            if !registered && held == 0 {
                bail!("{addr} is not a registered chunk server, and no chunk lists it");
            }
            // Any answer, a refusal or a failed TLS handshake too, means something listens there.
            match chunk_client(tls).call(&addr, &fs_agent::chunk_protocol::ChunkRequest::Capacity) {
                Err(fs_agent::chunk_client::ChunkClientError::Unreachable { .. }) => {}
                _ => bail!("{addr} still answers: stop its chunk server first (a running server registers itself again at its next heartbeat)"),
            }
            if held > 0 && !force {
                bail!(
                    "{addr} still holds {held} current replicas: drain it (`fs-agent drain-server {addr}`) and wait for `fs-agent status` to show 0 replicas on it before stopping it, or, if its disk is lost, pass --force and the healer copies them from the other replicas"
                );
            }
            servers::remove(&ns, &addr)?;
            println!("{addr}: removed; {held} current replicas there no longer count, and the healer copies them to other servers");
        }
        Cmd::Clone { meta, src, dst } => {
            let ns = namespace(&meta, ca)?;
            let inode = clone(&ns, &src, &dst)?;
            println!("{dst}: cloned from {src} (inode {}, {} bytes, {} chunks shared)", inode.ino, inode.size, ns.chunks(inode.ino)?.len());
        }
        Cmd::SetCopies { meta, path, copies } => {
            let ns = namespace(&meta, ca)?;
            let inode = resolve_path(&ns, &path)?;
            ns.set_copies(inode.ino, copies)?;
            println!("{path}: {copies} copies; run `fs-agent heal` to add copies to existing chunks");
        }
        Cmd::Placement { meta, path } => {
            let ns = namespace(&meta, ca)?;
            let inode = resolve_path(&ns, &path)?;
            println!("{path}: inode {} size {} copies {}", inode.ino, inode.size, inode.replicas);
            let chunks = ns.chunks(inode.ino)?;
            let shared = ns.shared_chunks(&chunks.iter().map(|(_, c, _)| c.chunk_id).collect::<Vec<_>>())?;
            for (index, chunk, _) in chunks {
                let replicas: Vec<String> =
                    chunk.replicas.iter().map(|r| format!("{}{}", r.server, if r.version == chunk.version { "" } else { " (stale)" })).collect();
                let sharing = shared.get(&chunk.chunk_id).map(|(s, _)| format!(" (shared by {} chunk records)", s.owners.len())).unwrap_or_default();
                println!("  chunk {index} id {:016x} version {}{sharing}: {}", chunk.chunk_id, chunk.version, replicas.join(", "));
            }
        }
        Cmd::MetaServer { data_dir, client_addr, peer_addr, ca_dir } => {
            if !data_dir.join("member.json").exists() {
                let me = cluster::state_machine::MemberInfo { id: 1, peer_addr, client_addr };
                let ca = ca_dir.map(|dir| cluster::tls::CaMaterial::read(&dir)).transpose()?;
                cluster::server::init_member(&data_dir, 1, vec![me], ca.as_ref())?;
            }
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cluster::server::serve(cluster::server::ServeOptions::new(data_dir)))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FS_AGENT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fs-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

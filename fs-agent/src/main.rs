//! `fs-agent`: chunk server, FUSE mount and operator commands of the shared filesystem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use fs_agent::file_data::{FileData, DEFAULT_CHUNK_SIZE};
use fs_agent::fuse_mount::{self, SharedFs};
use fs_agent::metadata_store::ClusterMetadata;
use fs_agent::namespace::{resolve_path, FsConfig, Inode, InodeKind, Namespace};

#[derive(Parser)]
#[command(name = "fs-agent", about = "Shared replicated filesystem: chunk server and FUSE mount")]
struct Cli {
    /// The cluster store's CA certificate (PEM file): talk TLS to the store and check it.
    #[arg(long, global = true, env = "FS_AGENT_META_CA")]
    meta_ca: Option<PathBuf>,
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
        #[arg(long, env = "FS_AGENT_SCRUB_INTERVAL_SECS", default_value_t = 3600)]
        scrub_interval_secs: u64,
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
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// This node's name in write leases (default: the host name). A restarted mount with
        /// the same id gets its files' leases back.
        #[arg(long)]
        node_id: Option<String>,
        /// This node's chunk server address: reads use its replicas first when they are current.
        #[arg(long)]
        local_server: Option<String>,
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
    /// (files with a held write lease are skipped and reported).
    Heal {
        #[arg(long, env = "FS_AGENT_META")]
        meta: String,
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
    match cli.command {
        Cmd::Chunkserver { listen, data, meta, advertise, max_chunk_size, scrub_interval_secs } => {
            let listener = fs_agent::chunk_server::bind(&listen)?;
            if let Some(meta) = meta {
                let addr = advertise.unwrap_or_else(|| listener.local_addr().map(|a| a.to_string()).unwrap_or(listen.clone()));
                namespace(&meta, ca)?.register_server(&addr).with_context(|| format!("cannot register chunk server {addr}"))?;
            }
            let scrub_interval = (scrub_interval_secs > 0).then(|| std::time::Duration::from_secs(scrub_interval_secs));
            fs_agent::chunk_server::serve(listener, &data, max_chunk_size, scrub_interval)?;
        }
        Cmd::Mount { meta, replicas, min_copies, chunk_size, threads, node_id, local_server, heal_interval_secs, mountpoint } => {
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
            let data = FileData::new(ns, config.chunk_size, min_copies).with_local_server(local_server);
            let fs = SharedFs::new(data, &node_id);
            fs.drop_stale_locks().context("cannot clear this node's byte-range locks from an earlier run")?;
            if heal_interval_secs > 0 {
                fs.spawn_healer(std::time::Duration::from_secs(heal_interval_secs));
            }
            fuse_mount::mount(fs, &mountpoint, threads).with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
        }
        Cmd::LeaseTakeover { meta, path } => {
            let ns = namespace(&meta, ca)?;
            let inode = resolve_path(&ns, &path)?;
            let holder = format!("takeover-{}-{:08x}", std::process::id(), rand::random::<u32>());
            let lease = ns.acquire_lease(inode.ino, &holder, true)?;
            let config = ns.init(inode.replicas, FsConfig { chunk_size: DEFAULT_CHUNK_SIZE })?;
            let data = FileData::new(ns.clone(), config.chunk_size, 1);
            data.fence(&lease)?;
            ns.release_lease(&lease)?;
            println!("{path}: write lease taken over, epoch {}; older writers are fenced", lease.epoch);
        }
        Cmd::Status { meta } => {
            let ns = namespace(&meta, ca)?;
            let report = fs_agent::status::collect(&ns)?;
            print!("{}", report.render());
        }
        Cmd::Heal { meta } => {
            let ns = namespace(&meta, ca)?;
            let config = ns.init(3, FsConfig { chunk_size: DEFAULT_CHUNK_SIZE })?;
            let data = FileData::new(ns.clone(), config.chunk_size, 1);
            let holder = format!("healer-{}-{:08x}", std::process::id(), rand::random::<u32>());
            let (mut copied, mut short, mut skipped, mut unavailable) = (0, 0, 0, 0);
            for inode in fs_agent::status::files(&ns)? {
                let lease = match ns.acquire_lease(inode.ino, &holder, false) {
                    Ok(lease) => lease,
                    Err(fs_agent::namespace::NamespaceError::LeaseBusy { .. }) => {
                        skipped += 1;
                        continue;
                    }
                    Err(fs_agent::namespace::NamespaceError::NotFound { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                let result = data.fence(&lease).and_then(|()| data.heal_file(&lease, inode.replicas, inode.size, None));
                ns.release_lease(&lease)?;
                let outcome = result?;
                copied += outcome.copied;
                short += outcome.still_under_replicated;
                unavailable += outcome.unavailable;
            }
            println!("healed: {copied} replicas copied; {short} chunks still under-replicated; {unavailable} chunks unavailable; {skipped} files skipped (being written)");
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

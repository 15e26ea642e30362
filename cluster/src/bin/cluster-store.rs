//! `cluster-store`: run a member of the Raft cluster store, or talk to one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cluster::protocol::StatusReport;
use cluster::server::{self, ServeOptions};
use cluster::state_machine::MemberInfo;
use cluster::Client;

#[derive(Parser)]
#[command(
    name = "cluster-store",
    about = "Raft cluster store: the replicated source of truth"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Endpoints {
    /// Client addresses of members, comma separated (any member will do).
    #[arg(
        long,
        env = "CLUSTER_STORE_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2479"
    )]
    endpoints: Vec<String>,
    /// The cluster CA certificate (e.g. <data-dir>/tls/ca.pem): talk TLS and check the members.
    #[arg(long, env = "CLUSTER_STORE_CA")]
    ca_file: Option<PathBuf>,
}

impl Endpoints {
    fn client(&self) -> Result<Client> {
        let tls_ca_pem = match &self.ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("read CA certificate {}", path.display()))?,
            ),
            None => None,
        };
        let options = cluster::client::ClientOptions {
            tls_ca_pem,
            ..Default::default()
        };
        Ok(Client::with_options(self.endpoints.clone(), options)?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Initialize this member of a new cluster (run on every initial member with the same --member list).
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// ID=PEER_ADDR/CLIENT_ADDR, once per initial member (1, 3 or 5 members).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        /// Directory of the cluster CA (from `ca create`): members then talk mutual TLS.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
    /// Create a cluster CA (ca.pem, ca.key) for `init --ca-dir`.
    CaCreate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a one-time join token for a new member of a TLS cluster.
    TokenCreate {
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Run a member from its data directory.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        /// Take a snapshot and compact the log every N applied entries.
        #[arg(long, default_value_t = 10_000)]
        snapshot_every: u64,
        #[arg(long, default_value_t = 50)]
        tick_ms: u64,
        /// Election timeout in ticks.
        #[arg(long, default_value_t = 10)]
        election_ticks: usize,
    },
    /// Prepare a new member's data directory and add it to a running cluster as a learner.
    Join {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        peer_addr: String,
        #[arg(long)]
        client_addr: String,
        /// Join token (from `token-create`) of a TLS cluster: gets this member its certificate.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Leader, term, commit index, members and their lag.
    Status {
        #[command(flatten)]
        endpoints: Endpoints,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set KEY to VALUE (optionally attached to a lease); prints the new revision.
    Put {
        key: String,
        value: String,
        /// Lease id (from `lease-grant`): the key goes when the lease expires.
        #[arg(long)]
        lease: Option<u64>,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Print KEY's value (linearizable read), or every key under a prefix.
    Get {
        key: String,
        /// Treat KEY as a prefix and list every key under it.
        #[arg(long)]
        prefix: bool,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Delete KEY.
    Del {
        key: String,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Print events under PREFIX as they happen (from --from-revision, default: now).
    Watch {
        prefix: String,
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Grant a lease with a TTL in milliseconds; prints its id.
    LeaseGrant {
        ttl_ms: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Write every key (a linearizable read at one revision) to a JSON file.
    Backup {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Load a backup into an empty cluster (keys only: leases are not restored).
    Restore {
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Membership changes: promote a caught-up learner, remove a member.
    Member {
        #[command(subcommand)]
        action: MemberCmd,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Make a caught-up learner a voter.
    Promote {
        id: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Remove a member (the leader hands over leadership first).
    Remove {
        id: u64,
        #[command(flatten)]
        endpoints: Endpoints,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Backup {
    revision: u64,
    keys: Vec<cluster::KeyValue>,
}

fn parse_member(spec: &str) -> Result<MemberInfo> {
    let (id, addrs) = spec
        .split_once('=')
        .with_context(|| format!("member {spec:?} is not ID=PEER_ADDR/CLIENT_ADDR"))?;
    let (peer, client) = addrs
        .split_once('/')
        .with_context(|| format!("member {spec:?} is not ID=PEER_ADDR/CLIENT_ADDR"))?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("member id {id:?} is not a number"))?;
    if id == 0 {
        bail!("member id 0 is reserved: use 1 and up");
    }
    Ok(MemberInfo {
        id,
        peer_addr: peer.into(),
        client_addr: client.into(),
    })
}

fn print_status(s: &StatusReport) {
    println!(
        "member {} is {:?}; leader {}; term {}; commit {}; applied {}; last index {}; snapshot {}; revision {}",
        s.id,
        s.role,
        s.leader.map(|l| l.to_string()).unwrap_or_else(|| "unknown".into()),
        s.term,
        s.commit_index,
        s.applied_index,
        s.last_index,
        s.snapshot_index,
        s.revision
    );
    for m in &s.members {
        println!(
            "  {} {:8} peer {} client {} matched {} lag {}",
            m.info.id,
            if m.voter { "voter" } else { "learner" },
            m.info.peer_addr,
            m.info.client_addr,
            m.matched
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into()),
            m.lag.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
        );
    }
}

fn print_kv(kv: &cluster::KeyValue) {
    println!(
        "{}\t{}\t(rev {}, version {})",
        kv.key,
        String::from_utf8_lossy(&kv.value),
        kv.mod_revision,
        kv.version
    );
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Init {
            data_dir,
            id,
            members,
            ca_dir,
        } => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<Result<Vec<_>>>()?;
            let ca = ca_dir
                .map(|dir| cluster::tls::CaMaterial::read(&dir))
                .transpose()?;
            server::init_member(&data_dir, id, members, ca.as_ref())?;
            println!(
                "initialized member {id} in {}; start it with `cluster-store serve --data-dir {}`",
                data_dir.display(),
                data_dir.display()
            );
        }
        Cmd::Serve {
            data_dir,
            snapshot_every,
            tick_ms,
            election_ticks,
        } => {
            let mut options = ServeOptions::new(data_dir);
            options.snapshot_every = snapshot_every.max(1);
            options.tick = Duration::from_millis(tick_ms.max(1));
            options.election_ticks = election_ticks.max(2);
            server::serve(options).await?;
        }
        Cmd::CaCreate { out } => {
            cluster::tls::CaMaterial::create()?.write(&out)?;
            println!("cluster CA written to {}; pass --ca-dir {} to `init` on every initial member, then keep ca.key offline", out.display(), out.display());
        }
        Cmd::TokenCreate {
            ttl_secs,
            endpoints,
        } => {
            let token = endpoints
                .client()?
                .create_join_token(Duration::from_secs(ttl_secs))
                .await?;
            println!("{token}");
        }
        Cmd::Join {
            data_dir,
            id,
            peer_addr,
            client_addr,
            token,
            endpoints,
        } => {
            let member = MemberInfo {
                id,
                peer_addr,
                client_addr,
            };
            server::prepare_join(&data_dir, &member)?;
            match token {
                Some(token) => {
                    let fingerprint = token
                        .split_once('.')
                        .map(|(_, f)| f.to_string())
                        .context("malformed join token")?;
                    // Fetch the CA in the clear, trust it only if it matches the token, then
                    // send the token over TLS checked against it.
                    let probe = Client::new(endpoints.endpoints.clone())?;
                    let mut ca_pem = None;
                    for addr in &endpoints.endpoints {
                        if let Ok(Some(pem)) = probe.ca_certificate(addr).await {
                            ca_pem = Some(pem);
                            break;
                        }
                    }
                    let ca_pem = ca_pem.context("no endpoint served a cluster CA: is this a TLS cluster, and is a member up?")?;
                    if cluster::tls::fingerprint(&ca_pem)? != fingerprint {
                        bail!("the cluster's CA does not match the token's fingerprint: wrong cluster, or someone in between; refusing it");
                    }
                    let options = cluster::client::ClientOptions {
                        tls_ca_pem: Some(ca_pem.clone()),
                        ..Default::default()
                    };
                    let client = Client::with_options(endpoints.endpoints.clone(), options)?;
                    let (csr_pem, key_pem) = cluster::tls::certificate_request()?;
                    let (cert_pem, _) = client.join_with_token(&token, member, &csr_pem).await?;
                    cluster::tls::MemberTls {
                        ca_pem,
                        cert_pem,
                        key_pem,
                    }
                    .write(&data_dir)?;
                }
                None => {
                    endpoints.client()?.add_learner(member).await?;
                }
            }
            println!(
                "member {id} added as a learner; start it with `cluster-store serve --data-dir {}`, then `cluster-store member promote {id}` once `status` shows its lag near 0",
                data_dir.display()
            );
        }
        Cmd::Status { endpoints, json } => {
            let client = endpoints.client()?;
            let status = match client.leader_status().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("no leader reachable ({e}); status of each endpoint:");
                    for addr in &endpoints.endpoints {
                        match client.status_of(addr).await {
                            Ok(s) => print_status(&s),
                            Err(e) => println!("{addr}: {e}"),
                        }
                    }
                    bail!("no leader");
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Cmd::Put {
            key,
            value,
            lease,
            endpoints,
        } => {
            let revision = endpoints
                .client()?
                .put_with_lease(&key, value, lease)
                .await?;
            println!("revision {revision}");
        }
        Cmd::Get {
            key,
            prefix,
            endpoints,
        } => {
            let client = endpoints.client()?;
            if prefix {
                let (_, kvs) = client.list_prefix(&key, 0).await?;
                kvs.iter().for_each(print_kv);
            } else {
                match client.get(&key).await? {
                    Some(kv) => print_kv(&kv),
                    None => bail!("key {key:?} not found"),
                }
            }
        }
        Cmd::Del { key, endpoints } => {
            let existed = endpoints.client()?.delete(&key).await?;
            println!("{}", if existed { "deleted" } else { "not found" });
        }
        Cmd::Watch {
            prefix,
            from_revision,
            endpoints,
        } => {
            let client = endpoints.client()?;
            let mut from = from_revision;
            loop {
                let (events, next) = client.watch(&prefix, from, Duration::from_secs(30)).await?;
                for e in events {
                    println!(
                        "{} {:?} {} {}{}",
                        e.revision,
                        e.kind,
                        e.kv.key,
                        String::from_utf8_lossy(&e.kv.value),
                        e.expired_lease
                            .map(|l| format!(" (lease {l} expired)"))
                            .unwrap_or_default()
                    );
                }
                from = next;
            }
        }
        Cmd::LeaseGrant { ttl_ms, endpoints } => {
            let id = endpoints
                .client()?
                .lease_grant(Duration::from_millis(ttl_ms))
                .await?;
            println!("{id}");
        }
        Cmd::Backup { out, endpoints } => {
            let (revision, keys) = endpoints.client()?.list_prefix("", 0).await?;
            let backup = Backup { revision, keys };
            let tmp = out.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&backup)?)
                .with_context(|| format!("write {}", tmp.display()))?;
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("rename into {}", out.display()))?;
            println!(
                "backed up {} keys at revision {revision} to {}",
                backup.keys.len(),
                out.display()
            );
        }
        Cmd::Restore { file, endpoints } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("read backup {}", file.display()))?;
            let backup: Backup = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a backup file", file.display()))?;
            let client = endpoints.client()?;
            let (_, existing) = client.list_prefix("", 1).await?;
            if !existing.is_empty() {
                bail!("the cluster already holds keys (e.g. {:?}): restore only into a new, empty cluster", existing[0].key);
            }
            for chunk in backup.keys.chunks(256) {
                let ops = chunk
                    .iter()
                    .map(|kv| cluster::Op::Put {
                        key: kv.key.clone(),
                        value: kv.value.clone(),
                        lease: None,
                    })
                    .collect();
                client
                    .txn(cluster::Txn {
                        compare: vec![],
                        success: ops,
                        failure: vec![],
                    })
                    .await?;
            }
            println!(
                "restored {} keys from revision {} of the backup",
                backup.keys.len(),
                backup.revision
            );
        }
        Cmd::Member { action } => match action {
            MemberCmd::Promote { id, endpoints } => {
                endpoints.client()?.promote(id).await?;
                println!("member {id} is now a voter");
            }
            MemberCmd::Remove { id, endpoints } => {
                endpoints.client()?.remove_member(id).await?;
                println!("member {id} removed");
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLUSTER_STORE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

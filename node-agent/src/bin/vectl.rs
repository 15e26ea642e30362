//! `vectl`: drive the VEs of this node. (Later the same commands go through
//! the control center's API; for now they act on the local node directly.)

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use node_agent::config::NodeConfig;
use node_agent::lifecycle::{CreateRequest, Node, VeInfo, VeStatus};
use node_agent::spec::{format_size, parse_size, Ipv4Cidr, Ipv6Cidr, Limits};

#[derive(Parser)]
#[command(name = "vectl", version, about = "Create, run and manage the virtual environments (VEs) of this node")]
struct Cli {
    /// Node configuration file [default: $VZ_CONFIG, else /etc/vz/node.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a VE from a template
    Create(CreateArgs),
    /// Start a stopped VE
    Start { name: String },
    /// Stop a VE: its init shuts down, what remains is killed after the timeout
    Stop {
        name: String,
        /// Seconds to wait for a clean shutdown (0: kill at once)
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Stop then start a VE
    Restart {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Destroy a VE and its disk
    Destroy {
        name: String,
        /// Stop it first if it is running
        #[arg(long)]
        force: bool,
    },
    /// List VEs with their state and live usage
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one VE in JSON
    Show { name: String },
    /// Run a command inside a running VE as its root
    Exec {
        name: String,
        /// Allocate a terminal
        #[arg(short, long)]
        tty: bool,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Open an interactive root shell inside a running VE
    Enter { name: String },
    /// Change a VE's limits (a running VE gets them at once; disks only grow)
    Set {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Start the VE with the node
        #[arg(long)]
        autostart: Option<bool>,
    },
    /// List the templates VEs can be created from
    Templates,
    /// Start every VE marked autostart
    Autostart,
}

#[derive(Args)]
struct CreateArgs {
    name: String,
    /// Template name (see `vectl templates`)
    #[arg(long, short)]
    template: String,
    #[arg(long)]
    hostname: Option<String>,
    /// IPv4 address with prefix, e.g. 10.213.0.10/16 (repeatable); none: one is allocated
    #[arg(long = "ip")]
    ipv4: Vec<Ipv4Cidr>,
    /// IPv6 address with prefix (repeatable)
    #[arg(long = "ip6")]
    ipv6: Vec<Ipv6Cidr>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Read root's password from standard input
    #[arg(long)]
    root_password_stdin: bool,
    /// Authorize this SSH public key for root (repeatable)
    #[arg(long = "ssh-key")]
    ssh_keys: Vec<String>,
    /// Authorize the SSH public keys in this file for root
    #[arg(long)]
    ssh_key_file: Option<PathBuf>,
    /// Start the VE with the node
    #[arg(long)]
    autostart: bool,
    /// Start the VE once created
    #[arg(long)]
    start: bool,
}

#[derive(Args, Default)]
struct LimitArgs {
    /// RAM, e.g. 512M
    #[arg(long, value_parser = size)]
    memory: Option<u64>,
    /// Swap beyond RAM, e.g. 256M
    #[arg(long, value_parser = size)]
    swap: Option<u64>,
    /// CPU quota in CPUs, e.g. 0.5 or 2
    #[arg(long)]
    cpus: Option<f64>,
    /// CPU weight under contention, 1 to 10000 (default 100)
    #[arg(long)]
    cpu_weight: Option<u64>,
    /// Maximum processes and threads
    #[arg(long)]
    pids: Option<u64>,
    /// Disk quota, e.g. 10G
    #[arg(long, value_parser = size)]
    disk: Option<u64>,
    /// Disk read bandwidth cap, e.g. 50M (per second; 0: unlimited)
    #[arg(long, value_parser = size)]
    io_read_bps: Option<u64>,
    /// Disk write bandwidth cap, e.g. 50M (per second; 0: unlimited)
    #[arg(long, value_parser = size)]
    io_write_bps: Option<u64>,
    /// Disk read operations per second cap (0: unlimited)
    #[arg(long)]
    io_read_iops: Option<u64>,
    /// Disk write operations per second cap (0: unlimited)
    #[arg(long)]
    io_write_iops: Option<u64>,
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

impl LimitArgs {
    fn apply(&self, mut limits: Limits) -> Limits {
        if let Some(v) = self.memory { limits.memory_bytes = v; }
        if let Some(v) = self.swap { limits.swap_bytes = v; }
        if let Some(v) = self.cpus { limits.cpus = v; }
        if let Some(v) = self.cpu_weight { limits.cpu_weight = v; }
        if let Some(v) = self.pids { limits.pids = v; }
        if let Some(v) = self.disk { limits.disk_bytes = v; }
        if let Some(v) = self.io_read_bps { limits.io.read_bytes_per_s = v; }
        if let Some(v) = self.io_write_bps { limits.io.write_bytes_per_s = v; }
        if let Some(v) = self.io_read_iops { limits.io.read_ops_per_s = v; }
        if let Some(v) = self.io_write_iops { limits.io.write_ops_per_s = v; }
        limits
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VZ_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("vectl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load_from(cli.config.as_deref())?;
    let node = Node::new(config);
    match cli.command {
        Command::Create(args) => {
            let mut ssh_keys = args.ssh_keys.clone();
            if let Some(file) = &args.ssh_key_file {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("cannot read ssh key file {}: {e}", file.display()))?;
                ssh_keys.extend(text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(String::from));
            }
            let root_password = if args.root_password_stdin {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                let password = text.trim_end_matches(['\n', '\r']).to_string();
                anyhow::ensure!(!password.is_empty(), "the root password read from standard input is empty");
                Some(password)
            } else {
                None
            };
            let spec = node.create(CreateRequest {
                name: args.name.clone(),
                template: args.template.clone(),
                hostname: args.hostname.clone(),
                ipv4: args.ipv4.clone(),
                ipv6: args.ipv6.clone(),
                limits: args.limits.apply(Limits::default()),
                root_password,
                ssh_keys,
                autostart: args.autostart,
            })?;
            let addresses: Vec<String> = spec.ipv4.iter().map(|c| c.to_string()).chain(spec.ipv6.iter().map(|c| c.to_string())).collect();
            println!("created VE {} ({})", spec.name, addresses.join(", "));
            if args.start {
                node.start(&spec.name)?;
                println!("started VE {}", spec.name);
            }
        }
        Command::Start { name } => {
            node.start(&name)?;
            println!("started VE {name}");
        }
        Command::Stop { name, timeout } => {
            node.stop(&name, Duration::from_secs(timeout))?;
            println!("stopped VE {name}");
        }
        Command::Restart { name, timeout } => {
            node.restart(&name, Duration::from_secs(timeout))?;
            println!("restarted VE {name}");
        }
        Command::Destroy { name, force } => {
            node.destroy(&name, force)?;
            println!("destroyed VE {name}");
        }
        Command::List { json } => {
            let ves = node.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ves)?);
            } else {
                print_table(&ves);
            }
        }
        Command::Show { name } => println!("{}", serde_json::to_string_pretty(&node.info(&name)?)?),
        Command::Exec { name, tty, command } => {
            let code = node.exec(&name, command, tty)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Command::Enter { name } => {
            let shell = "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi";
            let code = node.exec(&name, vec!["/bin/sh".into(), "-c".into(), shell.into()], true)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Command::Set { name, limits, autostart } => {
            let spec = node.spec(&name)?;
            let mut spec = node.set_limits(&name, limits.apply(spec.limits))?;
            if let Some(autostart) = autostart {
                spec = node.set_autostart(&name, autostart)?;
            }
            println!(
                "VE {}: memory {}, swap {}, cpus {}, pids {}, disk {}",
                spec.name,
                format_size(spec.limits.memory_bytes),
                format_size(spec.limits.swap_bytes),
                spec.limits.cpus,
                spec.limits.pids,
                format_size(spec.limits.disk_bytes)
            );
        }
        Command::Templates => {
            for template in node_agent::template::list_templates(&node.config.templates_dir)? {
                println!("{:<12} {}", template.name, template.meta.description);
            }
        }
        Command::Autostart => {
            let failures = node.start_autostart();
            for (name, error) in &failures {
                eprintln!("vectl: cannot start VE {name}: {error}");
            }
            if !failures.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(ves: &[VeInfo]) {
    println!("{:<16} {:<8} {:<18} {:>10} {:>10} {:>6} {:>12}", "NAME", "STATUS", "ADDRESS", "MEMORY", "LIMIT", "PIDS", "DISK");
    for ve in ves {
        let address = ve.spec.ipv4.first().map(|c| c.address.to_string())
            .or_else(|| ve.spec.ipv6.first().map(|c| c.address.to_string()))
            .unwrap_or_else(|| "-".into());
        let status = match ve.status { VeStatus::Running => "running", VeStatus::Stopped => "stopped" };
        let (memory, pids, disk) = match &ve.usage {
            Some(u) => (format_mib(u.memory_bytes), u.pids.to_string(), format!("{}/{}", format_mib(u.disk_used_bytes), format_mib(u.disk_total_bytes))),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<16} {:<8} {:<18} {:>10} {:>10} {:>6} {:>12}",
            ve.spec.name, status, address, memory, format_mib(ve.spec.limits.memory_bytes), pids, disk
        );
    }
}

fn format_mib(bytes: u64) -> String {
    format!("{}M", bytes / (1 << 20))
}

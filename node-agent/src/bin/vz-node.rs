//! `vz-node`: the node agent. Keeps the VEs that should run running, and the
//! node's helper daemons up. Holds no VE: killing or restarting it never
//! touches a running VE.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use node_agent::agent::Agent;
use node_agent::config::NodeConfig;
use node_agent::lifecycle::Node;

#[derive(Parser)]
#[command(name = "vz-node", version, about = "The node agent of the VE platform")]
struct Cli {
    /// Node configuration file [default: $VZ_CONFIG, else /etc/vz/node.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground
    Run {
        /// Seconds between two reconcile passes
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Do one reconcile pass and exit
    Reconcile,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VZ_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = match NodeConfig::load_from(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("vz-node: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run { interval } => {
            if !(interval.is_finite() && interval >= 0.05) {
                eprintln!("vz-node: --interval must be at least 0.05 seconds");
                return ExitCode::FAILURE;
            }
            Agent::new(Node::new(config), Duration::from_secs_f64(interval)).run()
        }
        Command::Reconcile => {
            Agent::new(Node::new(config), Duration::ZERO).reconcile_once();
            ExitCode::SUCCESS
        }
    }
}

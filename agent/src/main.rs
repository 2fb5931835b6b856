//! `warren`: the node agent and its command-line tools.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use warren_agent::{
    agent::Agent,
    config::Config,
    logging::{self, Chain, LogFormat},
};

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "eBPF-accelerated node tunnel for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent {
        /// The agent's config file (YAML; see README.md).
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Log filter, in RUST_LOG syntax (e.g. `debug`, `info,warren_ebpf=debug`).
        #[arg(long, env = "RUST_LOG", default_value = "info")]
        log_level: String,
    },
    /// Check a config file and print what it describes.
    CheckConfig { config: PathBuf },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Agent {
            config,
            log_format,
            log_level,
        } => {
            if let Err(e) = logging::init(log_format, &log_level) {
                eprintln!("warren: {e}");
                return ExitCode::FAILURE;
            }
            run_agent(config)
        }
        Command::CheckConfig { config: path } => match Config::load(&path) {
            Ok(config) => {
                println!(
                    "{}: ok: node {}, trust domain {}, {} workloads",
                    path.display(),
                    config.node,
                    config.trust_domain,
                    config.workloads.len()
                );
                for w in &config.workloads {
                    let place = if w.local.is_some() { "local" } else { "remote" };
                    println!(
                        "  {} {} on {} ({place}) as {}",
                        w.qualified_name(),
                        w.ip,
                        w.node,
                        w.identity
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warren: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

#[tokio::main]
async fn run_agent(config: PathBuf) -> ExitCode {
    let result = match Agent::start(&config) {
        Ok(agent) => agent.run().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %Chain(&error), "warren agent failed");
            eprintln!("warren: {}", Chain(&error));
            ExitCode::FAILURE
        }
    }
}

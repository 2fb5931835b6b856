//! `warren`: the node agent and its command-line tools.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use warren_agent::{
    agent::Agent,
    ca,
    config::Config,
    identity::TrustDomain,
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
    /// The mesh CA's tools.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make the CA's signing certificate: for a lab, a root and an
    /// intermediate; with --csr, an intermediate key and a certificate signing
    /// request for your organisation's root to sign.
    Init {
        /// Where to write the files (existing key files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = warren_agent::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Plug into your organisation's PKI instead of making a lab root.
        #[arg(long)]
        csr: bool,
    },
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
        Command::Ca {
            command:
                CaCommand::Init {
                    dir,
                    trust_domain,
                    csr,
                },
        } => {
            let made = TrustDomain::new(&trust_domain)
                .map_err(|e| e.to_string())
                .and_then(|td| {
                    let made = if csr {
                        ca::init::csr(&dir, &td)
                    } else {
                        ca::init::lab(&dir, &td)
                    };
                    made.map_err(|e| Chain(&e).to_string())
                });
            match made {
                Ok(summary) => {
                    println!("{summary}");
                    println!(
                        "(The CA service, `warren ca serve`, and agents that request their \
                         certificates from it come in the next step; until then agents use \
                         their development CA.)"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("warren: {e}");
                    ExitCode::FAILURE
                }
            }
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
            // Logged (stderr, in the chosen format), not also printed.
            tracing::error!(error = %Chain(&error), "warren agent failed");
            ExitCode::FAILURE
        }
    }
}

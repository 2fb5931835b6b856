//! `warren`: the node agent and its command-line tools.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use warren_agent::{
    config::{CaCredential, Config, Issuer},
    daemon::Daemon,
};
use warren_daemon::logging::{self, Chain, LogControl, LogFormat};
use warren_pki::{tls::TrustBundle, transport::NodeCredential};

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
    /// Take warren off this node: detach the programs a stopped agent left
    /// on its pods (they keep failing closed until then) and remove its pins.
    Uninstall {
        /// The agent's config file (for its bpfPinDir).
        #[arg(long, short)]
        config: PathBuf,
        /// Then stay until SIGTERM: for a DaemonSet that cleans every node
        /// and is ready once its node is clean.
        #[arg(long)]
        wait: bool,
    },
}

/// Takes the CNI plugin out of the node's configuration and removes its
/// binary, if the agent installed it.
fn uninstall_cni(config: &Config) -> Result<(), String> {
    let Some(install) = config.cni.as_ref().and_then(|c| c.install.as_ref()) else {
        return Ok(());
    };
    let changed = warren_agent::cni::install::uninstall(&install.conf_dir)
        .map_err(|e| Chain(&e).to_string())?;
    for file in changed {
        println!("removed warren-cni from {}", file.display());
    }
    if warren_agent::cni::install::remove_binary(&install.bin_dir)
        .map_err(|e| Chain(&e).to_string())?
    {
        println!("removed {}", install.bin_dir.join("warren-cni").display());
    }
    Ok(())
}

/// Sets up the agent's logs; says why on stderr if it cannot. Records from
/// the eBPF programs (via aya-log) arrive at debug level under the
/// `warren_ebpf` target.
fn init_logging(format: LogFormat, filter: &str) -> Option<LogControl> {
    match logging::init_with_control(format, filter) {
        Ok(control) => Some(control),
        Err(e) => {
            eprintln!("warren: {e}");
            None
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Agent {
            config,
            log_format,
            log_level,
        } => {
            let Some(logging) = init_logging(log_format, &log_level) else {
                return ExitCode::FAILURE;
            };
            warren_daemon::limits::raise_open_files();
            run_agent(config, logging)
        }
        Command::Uninstall { config, wait } => {
            let released = Config::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|config| {
                    // The plugin first: from then on new pods start
                    // uncaptured rather than wait for an agent.
                    uninstall_cni(&config)?;
                    warren_agent::redirect::uninstall(&config.bpf_pin_dir)
                        .map(|n| (n, config.bpf_pin_dir))
                        .map_err(|e| Chain(&e).to_string())
                });
            match released {
                Ok((pods, dir)) => {
                    println!(
                        "released {pods} pod(s) and removed the pins in {}: their traffic is no \
                         longer captured",
                        dir.display()
                    );
                    if wait {
                        println!("waiting for SIGTERM");
                        wait_for_termination();
                    }
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
                let certificates = match check_certificate_files(&config) {
                    Ok(lines) => lines,
                    Err(e) => {
                        eprintln!("warren: {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                };
                let source = match &config.kubernetes {
                    Some(k) => format!(
                        "workloads and policies from the API server ({})",
                        k.kubeconfig.as_ref().map_or_else(
                            || "in-cluster credentials".to_owned(),
                            |path| format!("kubeconfig {}", path.display())
                        )
                    ),
                    None => format!("{} workloads", config.workloads.len()),
                };
                println!(
                    "{}: ok: node {}, trust domain {}, {source}",
                    path.display(),
                    config.node,
                    config.trust_domain,
                );
                for line in certificates {
                    println!("  {line}");
                }
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

/// Checks the files the config names for certificates (node credential,
/// trust bundle) as the agent will at start; says what it found.
fn check_certificate_files(config: &Config) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    match &config.issuer {
        Issuer::DevCa { dir } => found.push(format!(
            "certificates from the development CA in {} (labs only)",
            dir.display()
        )),
        Issuer::Ca(ca) => match &ca.credential {
            CaCredential::Node(dir) => {
                let node = config.node_id().map_err(|e| e.to_string())?;
                NodeCredential::load_for(dir, &node)
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                found.push(format!(
                    "certificates from the CA at {}, with the node credential of {node} in {}",
                    ca.address,
                    dir.display()
                ));
            }
            CaCredential::Token(file) => {
                // Only whether there is one: the token itself is never shown.
                let token = std::fs::read_to_string(file)
                    .map_err(|e| format!("{}: cannot read the token: {e}", file.display()))?;
                if token.trim().is_empty() {
                    return Err(format!("{}: the token file is empty", file.display()));
                }
                found.push(format!(
                    "certificates from the CA at {}, with the service-account token in {}",
                    ca.address,
                    file.display()
                ));
            }
        },
    }
    if let Some(bundle) = config.trust_bundle_path() {
        let roots = TrustBundle::from_pem_file(&bundle).map_err(|e| Chain(&e).to_string())?;
        found.push(format!(
            "trusting the {} root(s) in {}",
            roots.roots().len(),
            bundle.display()
        ));
    }
    Ok(found)
}

/// Blocks until SIGTERM or SIGINT.
#[tokio::main(flavor = "current_thread")]
async fn wait_for_termination() {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn run_agent(config: PathBuf, logging: LogControl) -> ExitCode {
    let result = match Daemon::start(&config, logging).await {
        Ok(daemon) => daemon.run().await,
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

//! `warren`: the node agent and its command-line tools.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use warren_agent::{
    ca::{self, Authority, Policy},
    config::{Config, Issuer},
    daemon::Daemon,
    identity::{NodeId, TrustDomain},
    logging::{self, Chain, LogFormat},
    tls::TrustBundle,
    watch,
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
    /// Take warren off this node: detach the programs a stopped agent left
    /// on its pods (they keep failing closed until then) and remove its pins.
    Uninstall {
        /// The agent's config file (for its bpfPinDir).
        #[arg(long, short)]
        config: PathBuf,
    },
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
    /// Serve Istio's certificate API (gRPC over mutual TLS): sign workload
    /// CSRs for the nodes that run those workloads.
    Serve {
        #[command(flatten)]
        signing: SigningFiles,
        /// The workloads config (the agent's file format): which node runs
        /// which identities, and the trust domain.
        #[arg(long)]
        workloads: PathBuf,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: String,
        /// Longest certificate lifetime granted; longer requests get this.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        max_ttl: Duration,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        #[arg(long, env = "RUST_LOG", default_value = "info")]
        log_level: String,
    },
    /// Issue a node's credential for talking to `warren ca serve`: writes
    /// node.pem, node-key.pem (mode 0600) and ca-roots.pem to --out.
    NodeCredential {
        #[command(flatten)]
        signing: SigningFiles,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = warren_agent::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the credential is valid.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Replace the credential in --out (to renew it, or after a CA
        /// rotation); the agent uses the new one from its next connection to
        /// the CA.
        #[arg(long)]
        replace: bool,
    },
}

/// The CA's signing certificate and key: files (normally an intermediate of
/// your organisation's root), or a self-signed root for labs.
#[derive(clap::Args)]
struct SigningFiles {
    /// The CA's certificate (PEM; then any intermediates above it).
    #[arg(long, required_unless_present = "self_signed", requires_all = ["ca_key", "roots"])]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM; must not be readable by group or others).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The root bundle that workloads trust (PEM).
    #[arg(long, requires = "ca_cert")]
    roots: Option<PathBuf>,
    /// Labs and tests only: a self-signed root kept in DIR (made on first use).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ca_cert", "ca_key", "roots"])]
    self_signed: Option<PathBuf>,
}

impl SigningFiles {
    fn load(&self, policy: Policy) -> Result<Authority, String> {
        let loaded = match (&self.self_signed, &self.ca_cert, &self.ca_key, &self.roots) {
            (Some(dir), ..) => Authority::self_signed(dir, policy),
            (None, Some(cert), Some(key), Some(roots)) => Authority::load(cert, key, roots, policy),
            // clap's rules above make this unreachable; say what is missing anyway.
            _ => return Err("give --ca-cert, --ca-key and --roots, or --self-signed DIR".into()),
        };
        loaded.map_err(|e| Chain(&e).to_string())
    }
}

/// Sets up the daemons' logs; says why on stderr if it cannot.
fn init_logging(format: LogFormat, filter: &str) -> bool {
    match logging::init(format, filter) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("warren: {e}");
            false
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
            if !init_logging(log_format, &log_level) {
                return ExitCode::FAILURE;
            }
            run_agent(config)
        }
        Command::Ca {
            command:
                CaCommand::Serve {
                    signing,
                    workloads,
                    listen,
                    max_ttl,
                    log_format,
                    log_level,
                },
        } => {
            if !init_logging(log_format, &log_level) {
                return ExitCode::FAILURE;
            }
            match run_ca(&signing, &workloads, &listen, max_ttl) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Logged (stderr, in the chosen format), not also printed.
                    tracing::error!(error = %e, "warren ca serve failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca {
            command:
                CaCommand::NodeCredential {
                    signing,
                    node,
                    out,
                    trust_domain,
                    ttl,
                    replace,
                },
        } => match node_credential(&signing, &node, &out, &trust_domain, ttl, replace) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warren: {e}");
                ExitCode::FAILURE
            }
        },
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
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("warren: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Uninstall { config } => {
            let released = Config::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|config| {
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
        Issuer::Ca(ca) => {
            let node = config.node_id().map_err(|e| e.to_string())?;
            ca::transport::NodeCredential::load_for(&ca.node_credential, &node)
                .map_err(|e| format!("{}: {e}", ca.node_credential.display()))?;
            found.push(format!(
                "certificates from the CA at {}, with the node credential of {node} in {}",
                ca.address,
                ca.node_credential.display()
            ));
        }
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

#[tokio::main]
async fn run_agent(config: PathBuf) -> ExitCode {
    let result = match Daemon::start(&config).await {
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

/// The policy for `serve`: lifetimes capped at `max_ttl`, the default a day
/// or less.
fn policy(trust_domain: TrustDomain, max_ttl: Duration) -> Result<Policy, String> {
    if max_ttl.is_zero() {
        return Err("--max-ttl must be longer than zero".into());
    }
    let mut policy = Policy::new(trust_domain);
    policy.max_ttl = max_ttl;
    policy.default_ttl = policy.default_ttl.min(max_ttl);
    Ok(policy)
}

#[tokio::main]
async fn run_ca(
    signing: &SigningFiles,
    workloads: &std::path::Path,
    listen: &str,
    max_ttl: Duration,
) -> Result<(), String> {
    let config = Config::load(workloads).map_err(|e| e.to_string())?;
    let authority = signing.load(policy(config.trust_domain.clone(), max_ttl)?)?;
    if authority.is_self_signed() {
        tracing::warn!(
            "the CA signs with a SELF-SIGNED root: fine for a lab, not for production; \
             give it an intermediate of your organisation's root (--ca-cert, --ca-key, --roots)"
        );
    }
    let server = ca::service::CaServer::new(authority, &config.trust_domain, &config.workloads)
        .map_err(|e| Chain(&e).to_string())?;
    let placements = server.placements();
    let (tx, changed) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = watch::watch_files(&[workloads.to_owned()], tx).map_err(|e| e.to_string())?;
    tokio::spawn(reload_workloads(workloads.to_owned(), placements, changed));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        listen = %local,
        trust_domain = %config.trust_domain,
        workloads = config.workloads.len(),
        max_ttl = %humantime::format_duration(max_ttl),
        "warren CA serving istio.v1.auth.IstioCertificateService"
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("warren CA stopping");
    };
    server
        .serve(listener, shutdown)
        .await
        .map_err(|e| Chain(&e).to_string())
}

/// Keeps the CA's view of the cluster in step with its workloads file: on
/// change, and on SIGHUP. A file that does not load is refused, and the view
/// in force stays.
async fn reload_workloads(
    path: std::path::PathBuf,
    placements: ca::service::Placements,
    mut changed: tokio::sync::mpsc::UnboundedReceiver<std::path::PathBuf>,
) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("a SIGHUP handler can be installed");
    loop {
        let why = tokio::select! {
            Some(_) = changed.recv() => "file changed",
            _ = hangup.recv() => "SIGHUP",
        };
        // Editors write in several steps; let them finish.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while changed.try_recv().is_ok() {}
        let loaded = Config::load(&path).map_err(|e| Chain(&e).to_string());
        match loaded.and_then(|config| {
            placements
                .update(&config.trust_domain, &config.workloads)
                .map(|()| config.workloads.len())
                .map_err(|e| Chain(&e).to_string())
        }) {
            Ok(workloads) => tracing::info!(%why, workloads, "CA workloads reloaded"),
            Err(error) => tracing::error!(
                %why,
                %error,
                "CA workloads reload failed; keeping the previous ones"
            ),
        }
    }
}

fn node_credential(
    signing: &SigningFiles,
    node: &str,
    out: &std::path::Path,
    trust_domain: &str,
    ttl: Duration,
    replace: bool,
) -> Result<String, String> {
    let trust_domain = TrustDomain::new(trust_domain).map_err(|e| e.to_string())?;
    let node = NodeId::new(trust_domain.clone(), node).map_err(|e| e.to_string())?;
    let authority = signing.load(Policy::new(trust_domain))?;
    let credential = authority
        .issue_credential(&node.to_string(), ttl)
        .map_err(|e| Chain(&e).to_string())?;
    ca::write_node_credential(out, &credential, authority.roots(), replace).map_err(|e| {
        let hint = match e {
            ca::CaError::Exists(_) => "; or renew it with --replace",
            _ => "",
        };
        format!("{}{hint}", Chain(&e))
    })?;
    Ok(format!(
        "Wrote the credential of {node} to {}: {}, {} (private key, mode 0600), {}.\n\
         Give them to that node's agent, and to no one else.",
        out.display(),
        ca::transport::NODE_CERT,
        ca::transport::NODE_KEY,
        ca::transport::NODE_ROOTS,
    ))
}

//! `warren-ca`: the mesh CA and its tools.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use warren_ca::{
    service::{CaServer, Placements},
    workloads::Workloads,
};
use warren_pki::{
    ca::{self, Authority, CaError, Policy},
    identity::{DEFAULT_TRUST_DOMAIN, NodeId, TrustDomain},
    logging::{self, Chain, LogFormat},
    transport::{NODE_CERT, NODE_KEY, NODE_ROOTS},
    watch,
};

#[derive(Parser)]
#[command(
    name = "warren-ca",
    version,
    about = "warren's mesh CA: signs workload certificates for the nodes that run them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make the CA's signing certificate: for a lab, a root and an
    /// intermediate; with --csr, an intermediate key and a certificate signing
    /// request for your organisation's root to sign.
    Init {
        /// Where to write the files (existing key files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Plug into your organisation's PKI instead of making a lab root.
        #[arg(long)]
        csr: bool,
    },
    /// Serve Istio's certificate API (gRPC over mutual TLS): sign workload
    /// CSRs for the nodes that run those workloads.
    Serve(Serve),
    /// Issue a node's credential for talking to `warren-ca serve`: writes
    /// node.pem, node-key.pem (mode 0600) and ca-roots.pem to --out.
    NodeCredential {
        #[command(flatten)]
        signing: SigningFiles,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
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

/// `serve`'s options: what it signs with, how it learns which node runs
/// which identities, where it listens.
#[derive(clap::Args)]
struct Serve {
    #[command(flatten)]
    signing: SigningFiles,
    /// The workloads file, in the agent's config file format: which node
    /// runs which identities, and the trust domain.
    #[arg(long)]
    workloads: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: String,
    /// Longest certificate lifetime granted; longer requests get this.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter, in RUST_LOG syntax (e.g. `debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
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

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(serve) => {
            if let Err(e) = logging::init(serve.log_format, &serve.log_level) {
                eprintln!("warren-ca: {e}");
                return ExitCode::FAILURE;
            }
            match run_ca(&serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Logged (stderr, in the chosen format), not also printed.
                    tracing::error!(error = %e, "warren-ca serve failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::NodeCredential {
            signing,
            node,
            out,
            trust_domain,
            ttl,
            replace,
        } => report(node_credential(
            &signing,
            &node,
            &out,
            &trust_domain,
            ttl,
            replace,
        )),
        Command::Init {
            dir,
            trust_domain,
            csr,
        } => report(init(&dir, &trust_domain, csr)),
    }
}

/// Prints a tool's summary, or its error on stderr.
fn report(outcome: Result<String, String>) -> ExitCode {
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren-ca: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init(dir: &Path, trust_domain: &str, csr: bool) -> Result<String, String> {
    let trust_domain = TrustDomain::new(trust_domain).map_err(|e| e.to_string())?;
    let made = if csr {
        ca::init::csr(dir, &trust_domain)
    } else {
        ca::init::lab(dir, &trust_domain)
    };
    made.map_err(|e| Chain(&e).to_string())
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
async fn run_ca(serve: &Serve) -> Result<(), String> {
    let workloads = Workloads::load(&serve.workloads).map_err(|e| e.to_string())?;
    let trust_domain = workloads.trust_domain.clone();
    let authority = serve
        .signing
        .load(policy(trust_domain.clone(), serve.max_ttl)?)?;
    if authority.is_self_signed() {
        tracing::warn!(
            "the CA signs with a SELF-SIGNED root: fine for a lab, not for production; \
             give it an intermediate of your organisation's root (--ca-cert, --ca-key, --roots)"
        );
    }
    let server = CaServer::new(authority, &trust_domain, &workloads.placements)
        .map_err(|e| Chain(&e).to_string())?;

    // How the CA learns which node runs which identities: the workloads
    // file, followed as it changes.
    let (tx, changed) = mpsc::unbounded_channel();
    let _watcher = watch::watch_files(std::slice::from_ref(&serve.workloads), tx)
        .map_err(|e| e.to_string())?;
    tokio::spawn(reload_workloads(
        serve.workloads.clone(),
        server.placements(),
        changed,
    ));

    let listener = tokio::net::TcpListener::bind(&serve.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", serve.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        listen = %local,
        trust_domain = %trust_domain,
        workloads = workloads.placements.len(),
        max_ttl = %humantime::format_duration(serve.max_ttl),
        "warren CA serving istio.v1.auth.IstioCertificateService"
    );
    server
        .serve(listener, stop_signal())
        .await
        .map_err(|e| Chain(&e).to_string())
}

/// Completes at SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("warren CA stopping");
}

/// Keeps the CA's view of the cluster in step with its workloads file: on
/// change, and on SIGHUP. A file that does not load is refused, and the view
/// in force stays.
async fn reload_workloads(
    path: PathBuf,
    placements: Placements,
    mut changed: mpsc::UnboundedReceiver<PathBuf>,
) {
    let mut hangup = signal(SignalKind::hangup()).expect("a SIGHUP handler can be installed");
    loop {
        let why = tokio::select! {
            Some(_) = changed.recv() => "file changed",
            _ = hangup.recv() => "SIGHUP",
        };
        // Editors write in several steps; let them finish.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while changed.try_recv().is_ok() {}
        let loaded = Workloads::load(&path).map_err(|e| Chain(&e).to_string());
        match loaded.and_then(|workloads| {
            placements
                .update(&workloads.trust_domain, &workloads.placements)
                .map(|()| workloads.placements.len())
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
    out: &Path,
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
            CaError::Exists(_) => "; or renew it with --replace",
            _ => "",
        };
        format!("{}{hint}", Chain(&e))
    })?;
    Ok(format!(
        "Wrote the credential of {node} to {}: {NODE_CERT}, {NODE_KEY} (private key, mode \
         0600), {NODE_ROOTS}.\nGive them to that node's agent, and to no one else.",
        out.display(),
    ))
}

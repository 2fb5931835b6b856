//! `warren-ca`: the mesh CA and its tools.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use warren_ca::{
    kubernetes::{self, Authenticator, ObjectRef, Pods, Settings},
    metrics::Metrics,
    service::{CaServer, ConnectionLimits, Placements},
    workloads::Workloads,
};
use warren_daemon::{
    health::{self, Readiness},
    logging::{self, Chain, LogFormat},
    metrics as endpoint, watch,
};
use warren_pki::{
    ca::{self, Authority, CaError, Policy},
    identity::{DEFAULT_TRUST_DOMAIN, NodeId, TrustDomain},
    transport::{NODE_CERT, NODE_KEY, NODE_ROOTS},
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
    Serve(Box<Serve>),
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

/// `serve`'s options: what it signs with, how it knows its callers and
/// which node runs which identities, where it listens.
#[derive(clap::Args)]
struct Serve {
    #[command(flatten)]
    signing: SigningFiles,
    /// Hosts without Kubernetes: agents present node credentials (mutual
    /// TLS), and this file (in the agent's config format) says which node
    /// runs which identities, and the trust domain.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    workloads: Option<PathBuf>,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: String,
    /// Serve GET /healthz/ready and /healthz/live here (plain HTTP, for the
    /// kubelet's probes).
    #[arg(long, value_name = "ADDRESS")]
    health_listen: Option<String>,
    /// Serve the CA's metrics here, for Prometheus: GET /metrics (or
    /// /stats/prometheus), plain HTTP. Off unless given.
    #[arg(long, value_name = "ADDRESS")]
    metrics_listen: Option<String>,
    /// Connections held open at most, in all: one per node is what agents
    /// need.
    #[arg(long, default_value_t = ConnectionLimits::default().total)]
    max_connections: usize,
    /// Connections held open at most from one address (agents behind one
    /// NAT share it).
    #[arg(long, default_value_t = ConnectionLimits::default().per_address)]
    max_connections_per_address: usize,
    /// Longest certificate lifetime granted; longer requests get this.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter, in RUST_LOG syntax (e.g. `debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

/// On Kubernetes: agents present their Pod's projected service-account
/// token, which the API server reviews; the CA watches Pods to know which
/// node runs which identities.
#[derive(clap::Args)]
struct KubernetesArgs {
    /// Authenticate agents by service-account tokens (TokenReview) and place
    /// them by the CA's own watch of Pods.
    #[arg(long)]
    kubernetes: bool,
    /// The API server's kubeconfig (default: the Pod's in-cluster credentials).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The trust domain of the identities signed (with --workloads, the file
    /// says).
    #[arg(long, requires = "kubernetes", default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The agents' service account: only its tokens are accepted.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = "warren-system/warren-agent"
    )]
    agent_service_account: String,
    /// The audience agents' tokens must be for.
    #[arg(long, default_value = "warren-ca")]
    token_audience: String,
    /// How long the API server's review of a token is trusted (never past
    /// the token's expiry): while the API server is away, agents reviewed
    /// this recently still get certificates.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    review_lifetime: Duration,
    /// Publish the CA's roots in this ConfigMap (key roots.pem), which the
    /// agents mount as their trust bundle.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "kubernetes")]
    trust_bundle_configmap: Option<String>,
}

/// The CA's signing certificate and key: files (normally an intermediate of
/// your organisation's root), or a self-signed root for labs.
#[derive(clap::Args)]
struct SigningFiles {
    /// The CA's certificate (PEM; then any intermediates above it).
    #[arg(
        long,
        required_unless_present_any = ["self_signed", "cacerts"],
        requires_all = ["ca_key", "roots"]
    )]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM; must not be readable by group or others).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The root bundle that workloads trust (PEM).
    #[arg(long, requires = "ca_cert")]
    roots: Option<PathBuf>,
    /// A directory in Istio's plug-in CA layout, e.g. the `cacerts` Secret
    /// mounted: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ca_cert", "ca_key", "roots", "self_signed"])]
    cacerts: Option<PathBuf>,
    /// Labs and tests only: a self-signed root kept in DIR (made on first use).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ca_cert", "ca_key", "roots"])]
    self_signed: Option<PathBuf>,
}

impl SigningFiles {
    fn load(&self, policy: Policy) -> Result<Authority, String> {
        let loaded = match (
            &self.self_signed,
            &self.cacerts,
            &self.ca_cert,
            &self.ca_key,
            &self.roots,
        ) {
            (Some(dir), ..) => Authority::self_signed(dir, policy),
            (None, Some(dir), ..) => Authority::load_cacerts(dir, policy),
            (None, None, Some(cert), Some(key), Some(roots)) => {
                Authority::load(cert, key, roots, policy)
            }
            // clap's rules above make this unreachable; say what is missing anyway.
            _ => {
                return Err(
                    "give --cacerts DIR, or --ca-cert, --ca-key and --roots, or --self-signed DIR"
                        .into(),
                );
            }
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
            warren_daemon::limits::raise_open_files();
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
    let serving = Arc::new(AtomicBool::new(false));
    // Counted whether or not they are served: it costs next to nothing.
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (server, trust_domain, ready) = match &serve.workloads {
        Some(workloads) => file_mode(serve, workloads)?,
        None => kubernetes_mode(serve, &metrics).await?,
    };
    let server = server.with_metrics(metrics);
    if let Some(address) = &serve.metrics_listen {
        let bound = endpoint::spawn(address, Arc::new(registry))
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(listen = %bound, "metrics serving");
    }
    if let Some(address) = &serve.health_listen {
        let serving = serving.clone();
        let readiness: Readiness = Arc::new(move || {
            if !serving.load(Ordering::Acquire) {
                return Err("not serving yet".into());
            }
            ready()
        });
        let bound = health::spawn(address, readiness)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(listen = %bound, "health endpoints serving");
    }

    let sane = 1..=MAX_CONNECTIONS_FLAG;
    if !sane.contains(&serve.max_connections) || !sane.contains(&serve.max_connections_per_address)
    {
        return Err(format!(
            "--max-connections and --max-connections-per-address must be from 1 to \
             {MAX_CONNECTIONS_FLAG}"
        ));
    }
    let server = server.with_limits(ConnectionLimits {
        total: serve.max_connections,
        per_address: serve.max_connections_per_address,
    });
    let listener = tokio::net::TcpListener::bind(&serve.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", serve.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        listen = %local,
        trust_domain = %trust_domain,
        callers = if serve.workloads.is_some() { "node credentials" } else { "service-account tokens" },
        max_ttl = %humantime::format_duration(serve.max_ttl),
        "warren CA serving istio.v1.auth.IstioCertificateService"
    );
    serving.store(true, Ordering::Release);
    server
        .serve(listener, stop_signal())
        .await
        .map_err(|e| Chain(&e).to_string())
}

/// The most connections the flags may allow: far above what a CA needs, and
/// within what the process can count.
const MAX_CONNECTIONS_FLAG: usize = 1 << 20;

/// Whether the CA is ready besides serving, and if not, why.
type Ready = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Loads the signing material for `trust_domain`, warning about a
/// self-signed root.
fn authority(serve: &Serve, trust_domain: &TrustDomain) -> Result<Authority, String> {
    let authority = serve
        .signing
        .load(policy(trust_domain.clone(), serve.max_ttl)?)?;
    if authority.is_self_signed() {
        tracing::warn!(
            "the CA signs with a SELF-SIGNED root: fine for a lab, not for production; \
             give it an intermediate of your organisation's root (--cacerts, or --ca-cert, \
             --ca-key, --roots)"
        );
    }
    Ok(authority)
}

/// Node credentials, and the workloads file followed as it changes.
fn file_mode(serve: &Serve, path: &Path) -> Result<(CaServer, TrustDomain, Ready), String> {
    let workloads = Workloads::load(path).map_err(|e| e.to_string())?;
    let trust_domain = workloads.trust_domain.clone();
    let server = CaServer::new(
        authority(serve, &trust_domain)?,
        &trust_domain,
        &workloads.placements,
    )
    .map_err(|e| Chain(&e).to_string())?;
    tracing::info!(workloads = workloads.placements.len(), path = %path.display(), "workloads loaded");
    let placements = server
        .placements()
        .expect("a CA with node credentials has placements");
    let (tx, changed) = mpsc::unbounded_channel();
    let path = path.to_owned();
    let watcher = watch::watch_files(std::slice::from_ref(&path), tx).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // The watch lasts as long as the reloads.
        let _watcher = watcher;
        reload_workloads(path, placements, changed).await;
    });
    Ok((server, trust_domain, Box::new(|| Ok(()))))
}

/// Service-account tokens and the Pod watch; the roots published in a
/// ConfigMap if asked.
async fn kubernetes_mode(
    serve: &Serve,
    metrics: &Metrics,
) -> Result<(CaServer, TrustDomain, Ready), String> {
    let args = &serve.kubernetes;
    let trust_domain = TrustDomain::new(&args.trust_domain).map_err(|e| e.to_string())?;
    let agent = ObjectRef::parse("--agent-service-account", &args.agent_service_account)
        .map_err(|e| e.to_string())?;
    let configmap = args
        .trust_bundle_configmap
        .as_deref()
        .map(|c| ObjectRef::parse("--trust-bundle-configmap", c))
        .transpose()
        .map_err(|e| e.to_string())?;
    if args.token_audience.is_empty() {
        return Err("--token-audience must not be empty".into());
    }
    let authority = authority(serve, &trust_domain)?;
    let roots_pem: String = authority.roots().roots().iter().map(ca::to_pem).collect();
    let client = warren_daemon::kubernetes::client(args.kubeconfig.as_deref())
        .await
        .map_err(|e| Chain(&e).to_string())?;

    let pods = Arc::new(Pods::default());
    let watching = pods.clone();
    let watch_client = client.clone();
    tokio::spawn(async move { watching.watch(watch_client).await });
    let published = Arc::new(AtomicBool::new(configmap.is_none()));
    if let Some(configmap) = configmap {
        tokio::spawn(kubernetes::publish_roots(
            client.clone(),
            configmap,
            roots_pem,
            published.clone(),
        ));
    }
    let settings = Settings {
        agent,
        audience: args.token_audience.clone(),
        review_lifetime: args.review_lifetime,
    };
    tracing::info!(
        agents = %settings.agent,
        audience = %settings.audience,
        review_lifetime = %humantime::format_duration(settings.review_lifetime),
        "agents authenticate with service-account tokens (TokenReview)"
    );
    let authenticator = Arc::new(Authenticator::new(
        client,
        settings,
        pods.clone(),
        metrics.clone(),
    ));
    let server =
        CaServer::with_tokens(authority, authenticator).map_err(|e| Chain(&e).to_string())?;
    let ready: Ready = Box::new(move || {
        if !pods.synced() {
            Err("the pods are not listed yet".into())
        } else if !published.load(Ordering::Acquire) {
            Err("the trust bundle is not published yet".into())
        } else {
            Ok(())
        }
    });
    Ok((server, trust_domain, ready))
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

//! The node daemon: reads the config, enrolls the pods of this node, and keeps
//! enrollment in step with the config until told to stop.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use notify::Watcher as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigError, LocalPod, Workload},
    hbone::pool::{self, Pool},
    logging::Chain,
    netns::{NetNs, NetnsError},
    proxy::{
        PodProxy,
        inbound::{self, InboundError, PodInbound},
        outbound::{self, OutboundError},
    },
    redirect::{Attachment, RedirectError, Redirector},
    state::Store,
    tls::{CertificateSource, DevCa, TlsError, TrustBundle},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("certificates: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error("no certificate: {0}")]
    Certificate(#[from] TlsError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

/// A pod this agent is capturing and serving.
struct Enrolled {
    workload: Workload,
    attachment: Attachment,
    proxy: Arc<PodProxy>,
    /// Outbound listener, HBONE listener, certificate renewal.
    tasks: [JoinHandle<()>; 3],
}

pub struct Agent {
    config_path: PathBuf,
    store: Store,
    redirector: Redirector,
    certificates: Arc<dyn CertificateSource>,
    trust: TrustBundle,
    pool: Arc<Pool>,
    enrolled: HashMap<String, Enrolled>,
}

impl Agent {
    /// Loads the config and the eBPF programs. Fails, and nothing is
    /// attached, if either is unusable.
    pub fn start(config_path: &Path) -> Result<Self, AgentError> {
        let config = Config::load(config_path)?;
        info!(
            node = %config.node,
            trust_domain = %config.trust_domain,
            workloads = config.workloads.len(),
            local = config.local_workloads().count(),
            config = %config_path.display(),
            "warren agent starting"
        );
        let certificates =
            DevCa::load_or_create(&config.dev_ca_dir)?.with_validity(config.certificate_ttl);
        warn!(
            dir = %config.dev_ca_dir.display(),
            "USING THE DEVELOPMENT CA: workload certificates are issued by a self-signed root kept \
             on this machine. Fine for a lab, not for production"
        );
        let mut trust = certificates.trust_bundle();
        if let Some(path) = &config.trust_bundle {
            let extra = TrustBundle::from_pem_file(path)?;
            info!(bundle = %path.display(), roots = extra.roots().len(), "trusting the roots of the trust bundle too");
            trust = trust.merged(&extra);
        }
        let redirector = Redirector::load()?;
        let pool = Arc::new(Pool::new(pool::Settings::default()));
        pool.spawn_reaper();
        Ok(Self {
            config_path: config_path.to_owned(),
            store: Store::new(config),
            redirector,
            certificates: Arc::new(certificates),
            trust,
            pool,
            enrolled: HashMap::new(),
        })
    }

    /// Serves until SIGTERM or SIGINT, reloading the config when the file
    /// changes or on SIGHUP; then withdraws from every pod.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut hangup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
        let (_watcher, mut changed) = watch_file(&self.config_path)?;

        self.reconcile().await;
        info!("warren agent ready");
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload("SIGHUP").await,
                Some(()) = changed.recv() => {
                    // Editors write in several steps; let them finish.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while changed.try_recv().is_ok() {}
                    self.reload("file changed").await;
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        info!("warren agent stopping");
        self.withdraw_all().await;
        Ok(())
    }

    async fn reload(&mut self, why: &str) {
        match Config::load(&self.config_path) {
            Ok(config) if config.node != self.store.current().config().node => {
                error!(
                    %why,
                    old = %self.store.current().config().node,
                    new = %config.node,
                    "config reload refused: the node name cannot change while the agent runs; keeping the previous config"
                );
            }
            Ok(config) if config == *self.store.current().config() => {
                // Unchanged, but a pod that failed to enroll earlier may
                // enroll now (its namespace has appeared, say).
                self.reconcile().await;
            }
            Ok(config) => {
                let current = self.store.current();
                if config.dev_ca_dir != current.config().dev_ca_dir
                    || config.trust_bundle != current.config().trust_bundle
                    || config.certificate_ttl != current.config().certificate_ttl
                {
                    warn!(%why, "devCaDir, trustBundle and certificateTtl changes take effect when the agent restarts");
                }
                info!(%why, "config reloaded");
                self.store.publish(config);
                self.reconcile().await;
            }
            Err(error) => {
                error!(%why, error = %Chain(&error), "config reload failed; keeping the previous config");
            }
        }
    }

    /// Brings enrollment in line with the current snapshot: withdraws pods
    /// that left (or changed), enrolls pods that are new.
    async fn reconcile(&mut self) {
        let snapshot = self.store.current();
        let wanted: HashMap<String, (&Workload, &LocalPod)> = snapshot
            .config()
            .local_workloads()
            .map(|(w, pod)| (w.qualified_name(), (w, pod)))
            .collect();

        let stale: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(name, e)| wanted.get(*name).is_none_or(|(w, _)| **w != e.workload))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(enrolled) = self.enrolled.remove(&name) {
                self.withdraw(enrolled).await;
            }
        }

        for (name, (workload, pod)) in wanted {
            if self.enrolled.contains_key(&name) {
                continue;
            }
            match self.enroll(workload, pod).await {
                Ok(enrolled) => {
                    info!(
                        workload = %name,
                        identity = %workload.identity,
                        hbone = %std::net::SocketAddr::new(workload.ip.into(), crate::hbone::PORT),
                        ip = %workload.ip,
                        netns = %pod.netns.display(),
                        cgroup = %pod.cgroup.display(),
                        "enrolled pod: capturing its outbound TCP connections, serving HBONE"
                    );
                    self.enrolled.insert(name, enrolled);
                }
                Err(error) => error!(
                    workload = %name,
                    error = %Chain(&error),
                    "cannot enroll pod; its traffic is not captured (retried on the next config reload)"
                ),
            }
        }
    }

    async fn enroll(
        &mut self,
        workload: &Workload,
        pod: &LocalPod,
    ) -> Result<Enrolled, EnrollError> {
        let netns = Arc::new(NetNs::open(&pod.netns).await?);
        let certificate = self.certificates.certificate(&workload.identity).await?;
        let proxy = Arc::new(PodProxy::new(
            workload.clone(),
            netns.clone(),
            certificate,
            self.trust.clone(),
            self.redirector.original_dsts(),
            self.store.subscribe(),
            self.pool.clone(),
        ));
        let inbound = Arc::new(PodInbound::new(proxy.clone()).await?);
        // Listeners first: capture must never point at a closed port.
        let hbone_listener = inbound.bind().await?;
        let outbound_listener = outbound::bind(&proxy).await?;
        let attachment = self
            .redirector
            .enroll(&pod.cgroup, netns.cookie(), workload.ip)?;
        Ok(Enrolled {
            workload: workload.clone(),
            attachment,
            proxy: proxy.clone(),
            tasks: [
                tokio::spawn(outbound::serve(outbound_listener, proxy)),
                tokio::spawn(inbound::serve(hbone_listener, inbound.clone())),
                tokio::spawn(renew_certificates(inbound, self.certificates.clone())),
            ],
        })
    }

    async fn withdraw(&mut self, enrolled: Enrolled) {
        let name = enrolled.workload.qualified_name();
        // Capture stops before the listeners close, so no new connection is
        // sent to a port nobody serves. Connections in flight finish.
        if let Err(error) = self.redirector.withdraw(enrolled.attachment) {
            warn!(workload = %name, error = %Chain(&error), "detaching from pod failed");
        }
        for task in &enrolled.tasks {
            task.abort();
        }
        // Wait until the listeners are closed, so that a pod enrolled again
        // right away (its config changed) can bind the same addresses.
        for task in enrolled.tasks {
            let _ = task.await;
        }
        enrolled.proxy.retire_connections().await;
        info!(workload = %name, "withdrew from pod: its traffic is no longer captured");
    }

    async fn withdraw_all(&mut self) {
        let all: Vec<Enrolled> = self.enrolled.drain().map(|(_, e)| e).collect();
        for enrolled in all {
            self.withdraw(enrolled).await;
        }
    }
}

/// Keeps a pod's certificate fresh: renews it at about half its lifetime
/// (with jitter, so that pods enrolled together do not renew together), and
/// retries with backoff when that fails, while the old one stays in use.
async fn renew_certificates(inbound: Arc<PodInbound>, source: Arc<dyn CertificateSource>) {
    let pod = &inbound.pod;
    let name = pod.workload.qualified_name();
    let mut backoff = RETRY_MIN;
    loop {
        let current = pod.certificate();
        let lifetime = current
            .not_after()
            .duration_since(current.not_before())
            .unwrap_or_default();
        let jitter = lifetime.mul_f64(rand::random::<f64>() * 0.05);
        let wait = current
            .refresh_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(jitter);
        tokio::time::sleep(wait).await;
        let renewed = match source.certificate(&pod.workload.identity).await {
            Ok(certificate) => inbound.renew(certificate).await,
            Err(error) => Err(error),
        };
        match renewed {
            Ok(()) => {
                backoff = RETRY_MIN;
                let certificate = pod.certificate();
                let valid_for = certificate
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                info!(
                    workload = %name,
                    identity = %certificate.identity(),
                    valid_for_s = valid_for.as_secs(),
                    "certificate renewed"
                );
            }
            Err(error) => {
                warn!(workload = %name, error = %Chain(&error), retry_in = ?backoff, "certificate renewal failed; keeping the current one");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Reports changes to `path`. Watches the directory, since editors and
/// config management replace files rather than write them in place.
fn watch_file(
    path: &Path,
) -> Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>), AgentError> {
    let watch_error = |source| AgentError::Watch {
        path: path.to_owned(),
        source,
    };
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
    let (tx, rx) = mpsc::unbounded_channel();
    let target = path.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event.paths.iter().any(|p| p == &target)
        {
            let _ = tx.send(());
        }
    })
    .map_err(watch_error)?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    Ok((watcher, rx))
}

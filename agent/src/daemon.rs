//! The node daemon: starts the sources of the mesh (the config file, or the
//! API server; the trust bundle and policy files), keeps the pods of this
//! node enrolled as the mesh changes, and stops on SIGTERM/SIGINT.
//!
//! ```text
//!  config file ─┐                         ┌─► proxies (read the snapshot)
//!  API server  ─┼─► mesh::Store (Snapshot)┤
//!  trust, policy┘                         └─► Reconciler ─► NodePods (eBPF, listeners)
//! ```

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use warren_daemon::{
    health,
    logging::{Chain, LogControl},
    watch::{WatchError, watch_files},
};
use warren_pki::{
    ca::CaError,
    client::{CaClient, ClientError},
    tls::{TlsError, TrustBundle},
    transport::{self, NodeCredential, TransportError},
};

use warren_cni::{KnownPod, MEMBERSHIP_FILE, Membership, Others};

use prometheus_client::registry::Registry;

use crate::{
    admin::{self, Admin, CertificateInfo},
    ca::CsrSource,
    cni::{self, Directory},
    config::{CaCredential, CaSettings, Config, ConfigError, Issuer},
    fastpath::FastPath,
    hbone::pool::{self, Pool},
    kubernetes,
    limits::{Limits, NodeBudget},
    mesh::{Policies, Snapshot, Store, Workloads},
    metrics::{CountedSource, Metrics, Scraped, gauge},
    pod::{NodePods, Serving},
    reconcile::{Reconciler, States},
    redirect::{OriginalDsts, RedirectError, Redirector},
    sandbox::HostRoots,
    time::sleep_until,
    tls::{CertificateSource, DevCa},
};

/// How often kubelet pods' sandboxes are checked for having been recreated.
const SANDBOX_CHECK: Duration = Duration::from_secs(10);

/// A node credential closer than this to its expiry is warned about at start.
const CREDENTIAL_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("certificates: {0}")]
    Tls(#[from] TlsError),
    #[error("development CA: {0}")]
    DevCa(#[from] CaError),
    #[error("{}: {source}", dir.display())]
    NodeCredential {
        dir: PathBuf,
        source: TransportError,
    },
    #[error("CA client: {0}")]
    CaClient(#[from] ClientError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("cannot read the policy directory {} (see the log)", .0.display())]
    Policies(PathBuf),
    #[error(transparent)]
    Kubernetes(#[from] warren_daemon::kubernetes::ClientError),
    #[error(
        "the Kubernetes source stopped (see the log): the agent exits rather than serve a view \
         that no longer follows the cluster; its pods stay pinned, failing closed, until it is \
         restarted"
    )]
    KubernetesStopped,
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("health endpoints: {0}")]
    Health(std::io::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("admin endpoint: {0}")]
    Admin(std::io::Error),
    #[error("serving the CNI plugin: {0}")]
    Cni(std::io::Error),
    #[error("installing the CNI plugin: {0}")]
    CniInstall(#[from] cni::install::InstallError),
}

/// A count as a gauge's value.
/// A certificate's metric labels: which workload, under which identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct CertificateLabels {
    workload: String,
    workload_namespace: String,
    identity: String,
}

/// A kernel drop counter's label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// What the readiness probe answers, from the daemon loop.
#[derive(Clone)]
struct Readiness(Arc<AtomicU8>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(AtomicU8::new(Self::WAITING)))
    }
}

impl Readiness {
    const WAITING: u8 = 0;
    const NONE_SERVING: u8 = 1;
    const READY: u8 = 2;

    /// Whether the probe answers ready.
    fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::READY
    }

    /// After a reconcile of the synced mesh, with `local` pods on this node
    /// of which `serving` are enrolled with their certificate. Ready once
    /// this node's pods have each been tried; not while it has pods and none
    /// serves (a CA that refuses every certificate, say): a rollout then
    /// stops at this node. One pod that keeps failing does not hold up the
    /// rest; it is retried and logged. (A node whose only mesh pod keeps
    /// failing does stay unready.)
    fn set(&self, local: usize, serving: usize) {
        let state = if local > 0 && serving == 0 {
            Self::NONE_SERVING
        } else {
            Self::READY
        };
        self.0.store(state, Ordering::Release);
    }

    /// What the probes (and the admin endpoint) answer.
    fn probe(&self) -> health::Readiness {
        let state = self.0.clone();
        Arc::new(move || match state.load(Ordering::Acquire) {
            Self::READY => Ok(()),
            Self::NONE_SERVING => Err("none of this node's pods is enrolled with a certificate \
                                       (see the log: can the agent get certificates?)"
                .into()),
            _ => Err("waiting for the view of the mesh".into()),
        })
    }
}

pub struct Daemon {
    config_path: PathBuf,
    /// The config in force (the last one that loaded).
    config: Config,
    store: Store,
    reconciler: Reconciler<NodePods>,
    /// The development CA's root, trusted besides the trust bundle file.
    dev_root: Option<TrustBundle>,
    pool: Arc<Pool>,
    /// The Kubernetes source, when the mesh comes from the API server.
    kubernetes: Option<JoinHandle<()>>,
    /// What the CNI server asks the Kubernetes source.
    kubernetes_source: Option<kubernetes::Source>,
    /// For removing the node's not-ready taint.
    kubernetes_client: Option<kube::Client>,
    metrics: Arc<Metrics>,
    /// Served once the collectors read at scrape time are added.
    registry: Option<Registry>,
    /// The pods being served, seen from outside the loop.
    serving: Serving,
    /// The log filter, which the admin endpoint changes.
    logging: LogControl,
    /// The same-node fast path, and its task (grants, lease, accounting).
    fast_path: FastPath,
    fast_path_task: JoinHandle<()>,
    /// Keeps the counts of original destinations awaiting the agent true.
    records_task: JoinHandle<()>,
}

/// How often what the kernel's table of original destinations holds is
/// counted again (`OriginalDsts::reconcile`).
const RECORDS_RECONCILED: Duration = Duration::from_secs(10);

/// Counts the table every [`RECORDS_RECONCILED`], from now: entries the
/// agent never took stop counting against their pods.
async fn keep_records(records: OriginalDsts) {
    let mut every = tokio::time::interval(RECORDS_RECONCILED);
    loop {
        every.tick().await;
        let records = records.clone();
        // Up to a table's worth of syscalls: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || records.reconcile()).await;
    }
}

impl Daemon {
    /// Loads the config and the eBPF programs and starts the sources. Fails,
    /// and nothing is attached, if any is unusable.
    pub async fn start(config_path: &Path, logging: LogControl) -> Result<Self, DaemonError> {
        let config = Config::load(config_path)?;
        info!(
            node = %config.node,
            trust_domain = %config.trust_domain,
            source = if config.kubernetes.is_some() { "kubernetes" } else { "config file" },
            workloads = config.workloads.len(),
            local = config.local_workloads().count(),
            config = %config_path.display(),
            "warren agent starting"
        );
        let dev_ca = match &config.issuer {
            Issuer::DevCa { dir } => {
                warn!(
                    dir = %dir.display(),
                    "USING THE DEVELOPMENT CA: workload certificates are issued by a self-signed \
                     root kept on this machine. Fine for a lab, not for production"
                );
                Some(
                    DevCa::load_or_create(dir, &config.trust_domain)?
                        .with_validity(config.certificate_ttl),
                )
            }
            Issuer::Ca(_) => None,
        };
        let dev_root = dev_ca.as_ref().map(DevCa::trust_bundle);
        let trust = load_trust(&config, dev_root.as_ref())?;
        let policies = load_policies(&config, "start")
            .ok_or_else(|| DaemonError::Policies(config.policy_dir.clone().unwrap_or_default()))?;
        let mut snapshot = Snapshot::new(trust, policies);
        if config.kubernetes.is_none() {
            snapshot.set_workloads(Workloads::new(config.workloads.iter().cloned()));
            snapshot.set_synced();
        }
        let store = Store::new(snapshot);
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, config.cluster.clone());
        let certificates: Arc<dyn CertificateSource> = match (dev_ca, &config.issuer) {
            (Some(dev_ca), _) => Arc::new(dev_ca),
            (None, Issuer::Ca(ca)) => Arc::new(ca_source(&config, ca, &store)?),
            (None, Issuer::DevCa { .. }) => unreachable!("the development CA was loaded above"),
        };
        let certificates = Arc::new(CountedSource {
            inner: certificates,
            metrics: metrics.clone(),
        });
        if let Some(cni) = &config.cni {
            // Before the source reads the reports kept there.
            cni::prepare_dir(&cni.socket).map_err(DaemonError::Cni)?;
        }
        let (kubernetes, kubernetes_source, kubernetes_client) = match &config.kubernetes {
            Some(settings) => {
                let client =
                    warren_daemon::kubernetes::client(settings.kubeconfig.as_deref()).await?;
                let (task, source) = kubernetes::spawn(
                    client.clone(),
                    kubernetes::Context {
                        node: config.node.clone(),
                        trust_domain: config.trust_domain.clone(),
                        root_namespace: config.root_namespace.clone(),
                        membership_file: config.cni.as_ref().map(|c| membership_file(&c.socket)),
                        reports_file: config
                            .cni
                            .as_ref()
                            .map(|c| c.socket.with_file_name(REPORTS_FILE)),
                    },
                    store.clone(),
                    metrics.clone(),
                );
                (Some(task), Some(source), Some(client))
            }
            None => (None, None, None),
        };
        let mut redirector = Redirector::load(&config.bpf_pin_dir)?;
        let records_task = tokio::spawn(keep_records(redirector.original_dsts()));
        let maps = redirector
            .take_fast_path()
            .expect("the fast path's maps are taken once, here");
        let fast_path_on = config.fast_path
            && match FastPath::kernel_can_cut() {
                Ok(()) => true,
                Err(error) => {
                    warn!(
                        error = %Chain(&error),
                        "same-node fast path off: this kernel cannot cut the connections a \
                         policy change would refuse"
                    );
                    false
                }
            };
        info!(
            fast_path = fast_path_on,
            "same-node fast path {}",
            if fast_path_on { "on" } else { "off" }
        );
        let (fast_path, shortcuts, fast_path_task) =
            FastPath::new(maps, fast_path_on, store.subscribe(), metrics.clone());
        let fast_path_task = tokio::spawn(fast_path_task.run());
        let pool = Arc::new(Pool::new(pool::Settings::default()).with_gauges(
            metrics.pool_connections.clone(),
            metrics.pool_streams.clone(),
        ));
        pool.spawn_reaper();
        let budget = NodeBudget::new(node_limits(&config.limits));
        let host = config
            .kubernetes
            .as_ref()
            .map(|k| HostRoots {
                proc: k.host_proc.clone(),
                cgroup: k.host_cgroup.clone(),
            })
            .unwrap_or_default();
        let serving = Serving::default();
        let pods = NodePods {
            redirector,
            state: store.subscribe(),
            certificates,
            pool: pool.clone(),
            metrics: metrics.clone(),
            serving: serving.clone(),
            host,
            fast_path: fast_path.clone(),
            shortcuts,
            budget,
        };
        Ok(Self {
            config_path: config_path.to_owned(),
            config,
            store,
            reconciler: Reconciler::new(pods),
            dev_root,
            pool,
            kubernetes,
            kubernetes_source,
            kubernetes_client,
            metrics,
            registry: Some(registry),
            serving,
            logging,
            fast_path,
            fast_path_task,
            records_task,
        })
    }

    /// Serves until SIGTERM or SIGINT: enrolls and withdraws pods as the
    /// mesh changes, retries pods that failed, reloads the files when they
    /// change or on SIGHUP. Pods stay pinned (failing closed) when it stops.
    pub async fn run(mut self) -> Result<(), DaemonError> {
        let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
        let (tx, mut changed) = mpsc::unbounded_channel();
        let mut watched = self.watched_files();
        let mut watcher = watch_files(&watched, tx.clone())?;
        let mut mesh = self.store.subscribe();
        let mut kubernetes = self.kubernetes.take();
        let mut sandbox_check = tokio::time::interval(SANDBOX_CHECK);
        let readiness = Readiness::default();
        if let Some(address) = &self.config.health_listen {
            let bound = health::spawn(address, readiness.probe())
                .await
                .map_err(DaemonError::Health)?;
            info!(listen = %bound, "health endpoints serving");
        }
        self.serve_metrics().await?;
        // Where each pod stands, for the CNI plugin's requests and the admin
        // endpoint; whether the agent is ready, for the node's taint.
        let (states, states_rx) = tokio::sync::watch::channel(Arc::new(States::new()));
        self.serve_admin(states_rx.clone(), readiness.probe())
            .await?;
        let (ready, ready_rx) = tokio::sync::watch::channel(false);
        // The taint stays until the plugin is in the node's CNI config too:
        // pods scheduled here before that would start uncaptured.
        let (installed_tx, mut installed) = tokio::sync::watch::channel(true);
        // The CNI server's wake-up: a runtime waits for a pod.
        let nudge = Arc::new(tokio::sync::Notify::new());
        let mut helpers = self
            .start_cni(states_rx, installed_tx, nudge.clone())
            .await?;
        if let Some(client) = self.kubernetes_client.take() {
            helpers.push(tokio::spawn(kubernetes::taint::remove_when_ready(
                client,
                self.config.node.clone(),
                ready_rx,
            )));
        }
        // Pins of pods that went away while no agent ran are released once
        // the mesh is fully known, never from a partial view.
        let mut released = false;
        if kubernetes.is_some() {
            info!("waiting for the API server's view of the mesh before enrolling pods");
        }
        loop {
            let snapshot = mesh.borrow_and_update().clone();
            self.metrics
                .discovery_synced
                .set(i64::from(snapshot.synced()));
            if snapshot.synced() {
                let local = snapshot.workloads().local().cloned();
                self.reconciler.reconcile(local, Instant::now()).await;
                self.metrics
                    .enrolled_pods
                    .set(gauge(self.reconciler.enrolled().count()));
                self.metrics
                    .failing_pods
                    .set(gauge(self.reconciler.failing().count()));
                // Certificates arrive after enrollment: this runs again at
                // every change and every SANDBOX_CHECK.
                readiness.set(
                    snapshot.workloads().local().count(),
                    self.reconciler
                        .enrolled()
                        .filter(|(_, pod)| pod.has_certificate())
                        .count(),
                );
                ready.send_if_modified(|ready| {
                    let now = readiness.is_ready() && *installed.borrow();
                    std::mem::replace(ready, now) != now
                });
                states.send_if_modified(|states| {
                    let now = self.reconciler.states();
                    let changed = **states != now;
                    if changed {
                        *states = Arc::new(now);
                    }
                    changed
                });
                if !released {
                    released = true;
                    self.release_departed(&snapshot);
                    self.fast_path.settle();
                    info!(
                        pods = self.reconciler.enrolled().count(),
                        "warren agent ready"
                    );
                } else if self.reconciler.take_departed_failures() {
                    // A pod that kept a previous agent's pins (failing
                    // closed) while it could not be enrolled has left.
                    self.release_departed(&snapshot);
                }
            }
            let retry = self.reconciler.next_retry();
            tokio::select! {
                _ = hangup.recv() => {
                    self.reload("SIGHUP");
                    self.reload_trust("SIGHUP").await;
                    self.reload_policies("SIGHUP");
                }
                Some(path) = changed.recv() => {
                    // Editors write in several steps; let them finish.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut paths = vec![path];
                    while let Ok(path) = changed.try_recv() {
                        paths.push(path);
                    }
                    if paths.contains(&watched[0]) {
                        self.reload("file changed");
                    }
                    // The config may name another trust bundle or policy
                    // directory now; both reloads do nothing if unchanged.
                    self.reload_trust("file changed").await;
                    self.reload_policies("file changed");
                }
                Ok(()) = mesh.changed() => {}
                // Without `cni.install` the sender is dropped, which ends
                // this arm; `installed` stays true.
                Ok(()) = installed.changed() => {}
                () = nudge.notified() => {
                    self.reconciler.recheck().await;
                    self.reconciler.hurry(Instant::now());
                }
                () = sleep_until(retry) => {}
                _ = sandbox_check.tick() => {
                    // Those withdrawn are enrolled where they are now, below.
                    self.reconciler.recheck().await;
                    // Pins kept for pods of the mesh without an address (a
                    // restart before the API server had it) whose pod went.
                    if released && self.kubernetes_source.is_some() {
                        self.release_departed(&mesh.borrow().clone());
                    }
                }
                () = stopped(&mut kubernetes) => return Err(DaemonError::KubernetesStopped),
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
            if self.watched_files() != watched {
                // A trust bundle in a directory that does not exist (yet)
                // cannot be watched; its reload failed and was logged. The
                // old watch stays, and this is tried again after the next
                // change or SIGHUP.
                match watch_files(&self.watched_files(), tx.clone()) {
                    Ok(new) => {
                        watched = self.watched_files();
                        watcher = new;
                    }
                    Err(error) => {
                        warn!(error = %Chain(&error), "cannot watch the trust bundle file")
                    }
                }
            }
        }
        drop(watcher);
        if let Some(kubernetes) = kubernetes {
            kubernetes.abort();
        }
        // The plugin stays in the node's configuration: while no agent
        // answers, it holds new pods of the mesh (fail closed).
        for helper in helpers {
            helper.abort();
        }
        // The pods' programs stay (pinned): until an agent takes over, their
        // outbound connections fail and STRICT ports drop plaintext, rather
        // than traffic leaving in clear. `warren uninstall` releases them.
        info!(
            pods = self.reconciler.enrolled().count(),
            pin_dir = %self.config.bpf_pin_dir.display(),
            "warren agent stopping; its pods stay captured and fail closed until an agent takes \
             over (`warren uninstall` releases them)"
        );
        // No grant outlives the agent's service: new connections of its pods
        // go to the agent (nowhere, now), not straight on a stale decision.
        // Stopped first (and waited for), so that it cannot extend the
        // lease after it was voided.
        self.fast_path_task.abort();
        let _ = (&mut self.fast_path_task).await;
        self.fast_path.stop();
        self.records_task.abort();
        // Dropping a pod's runtime stops its listeners, not its programs.
        drop(self.reconciler);
        Ok(())
    }

    /// Serves the CNI plugin, if the config says so, and installs it into
    /// the node's CNI configuration once it is served.
    /// Serves the metrics, if the config says where, with the values read
    /// at each scrape: each served pod's certificate expiry, and the kernel
    /// programs' drop counters (summed over CPUs).
    async fn serve_metrics(&mut self) -> Result<(), DaemonError> {
        let Some(mut registry) = self.registry.take() else {
            return Ok(());
        };
        let Some(address) = &self.config.metrics_listen else {
            return Ok(());
        };
        let serving = self.serving.clone();
        registry.register_collector(Box::new(Scraped::gauge(
            "warren_workload_certificate_expiry_seconds",
            "Seconds until each served workload's certificate expires (negative: expired)",
            move || {
                let now = SystemTime::now();
                serving
                    .certificates()
                    .into_iter()
                    .map(|(workload, certificate)| {
                        let left = match certificate.not_after().duration_since(now) {
                            Ok(left) => left.as_secs_f64(),
                            Err(past) => -past.duration().as_secs_f64(),
                        };
                        let labels = CertificateLabels {
                            workload: workload.name.clone(),
                            workload_namespace: workload.namespace.clone(),
                            identity: certificate.identity().to_string(),
                        };
                        (labels, left)
                    })
                    .collect()
            },
        )));
        let drops = self.reconciler.enroller().redirector.drop_counter();
        registry.register_collector(Box::new(Scraped::counter(
            "warren_kernel_drops",
            "Packets and connects the kernel programs refused, by reason, since the node's \
             first agent (the counters are pinned with the maps)",
            move || match drops.read() {
                Ok(counts) => counts
                    .iter()
                    .map(|(reason, n)| {
                        let labels = DropLabels {
                            reason: reason.name(),
                        };
                        (labels, n as f64)
                    })
                    .collect(),
                Err(error) => {
                    warn!(error = %Chain(&error), "cannot read the kernel drop counters");
                    Vec::new()
                }
            },
        )));
        let bound = warren_daemon::metrics::spawn(address, Arc::new(registry))
            .await
            .map_err(DaemonError::Metrics)?;
        info!(listen = %bound, "metrics serving");
        Ok(())
    }

    /// Serves the admin endpoint (`adminListen`, loopback).
    async fn serve_admin(
        &self,
        pods: tokio::sync::watch::Receiver<Arc<States>>,
        ready: health::Readiness,
    ) -> Result<(), DaemonError> {
        let serving = self.serving.clone();
        let admin = Admin {
            node: self.config.node.clone(),
            mesh: self.store.subscribe(),
            pods,
            certificates: Arc::new(move || {
                serving
                    .certificates()
                    .iter()
                    .map(|(workload, certificate)| {
                        CertificateInfo::of(workload.qualified_name(), certificate)
                    })
                    .collect()
            }),
            logging: self.logging.clone(),
            ready,
        };
        let bound = admin::spawn(&self.config.admin_listen, admin)
            .await
            .map_err(DaemonError::Admin)?;
        info!(listen = %bound, "admin endpoint serving");
        Ok(())
    }

    async fn start_cni(
        &self,
        states: tokio::sync::watch::Receiver<Arc<States>>,
        installed: tokio::sync::watch::Sender<bool>,
        nudge: Arc<tokio::sync::Notify>,
    ) -> Result<Vec<JoinHandle<()>>, DaemonError> {
        let Some(settings) = &self.config.cni else {
            return Ok(Vec::new());
        };
        let directory = match &self.kubernetes_source {
            Some(source) => Directory::Kubernetes(source.clone()),
            None => {
                self.write_file_membership().map_err(DaemonError::Cni)?;
                Directory::File(self.store.subscribe())
            }
        };
        let mut tasks = vec![
            cni::serve(
                settings.socket.clone(),
                directory,
                states,
                self.store.subscribe(),
                nudge,
                self.fast_path.clone(),
            )
            .await
            .map_err(DaemonError::Cni)?,
        ];
        if let Some(install) = &settings.install {
            let copied = cni::install::copy_binary(&install.binary, &install.bin_dir)?;
            info!(plugin = %copied.display(), "CNI plugin binary in place");
            let mut entry = serde_json::Map::new();
            entry.insert("type".into(), cni::install::PLUGIN_TYPE.into());
            entry.insert(
                "socket".into(),
                install.host_socket.display().to_string().into(),
            );
            let conf_dir = install.conf_dir.clone();
            installed.send_replace(false);
            tasks.push(tokio::spawn(cni::install::keep_installed(
                conf_dir, entry, installed,
            )));
        }
        Ok(tasks)
    }

    /// Without Kubernetes, what the CNI plugin decides from while the agent
    /// is away: the config file lists every pod of the mesh.
    fn write_file_membership(&self) -> std::io::Result<()> {
        let Some(settings) = &self.config.cni else {
            return Ok(());
        };
        let membership = Membership {
            pods: self
                .config
                .local_workloads()
                .map(|w| {
                    let known = KnownPod {
                        uid: None,
                        in_mesh: true,
                    };
                    (w.qualified_name(), known)
                })
                .collect(),
            namespaces: Default::default(),
            others: Others::Pass,
        };
        cni::write_json(&membership_file(&settings.socket), &membership)
    }

    /// Releases what was pinned for pods that are no longer this node's
    /// (or are in another network namespace now). Pods of the mesh that
    /// could not be enrolled keep their pins: they go on failing closed.
    fn release_departed(&mut self, snapshot: &Snapshot) {
        let enrolled: HashMap<String, u64> = self
            .reconciler
            .enrolled()
            .map(|(w, pod)| (w.qualified_name(), pod.netns_cookie()))
            .collect();
        let mut local: HashMap<String, Option<u64>> = snapshot
            .workloads()
            .local()
            .map(|w| {
                let name = w.qualified_name();
                let cookie = enrolled.get(&name).copied();
                (name, cookie)
            })
            .collect();
        // Pods of the mesh whose address the API server does not have yet
        // (enrolled through the CNI plugin before a restart): not gone.
        if let Some(source) = &self.kubernetes_source {
            for name in source.mesh_pods_here() {
                local.entry(name).or_insert(None);
            }
        }
        // Nor is a pod enrolled now that the reconciler has yet to withdraw:
        // withdrawing releases it.
        for (name, cookie) in enrolled {
            local.entry(name).or_insert(Some(cookie));
        }
        for pod in self.reconciler.enroller().redirector.release_others(&local) {
            info!(%pod, "released the programs of a pod that is gone");
        }
    }

    /// Reads the config file again and applies it: in file mode its
    /// workloads become the mesh's (the reconciler follows).
    fn reload(&mut self, why: &str) {
        let config = match Config::load(&self.config_path) {
            Ok(config) => self.keep_running_settings(config, why),
            Err(error) => {
                error!(%why, error = %Chain(&error), "config reload failed; keeping the previous config");
                return;
            }
        };
        if config.node != self.config.node {
            error!(
                %why,
                old = %self.config.node,
                new = %config.node,
                "config reload refused: the node name cannot change while the agent runs; keeping the previous config"
            );
            return;
        }
        if config == self.config {
            return;
        }
        info!(%why, "config reloaded");
        let workloads_changed =
            config.kubernetes.is_none() && config.workloads != self.config.workloads;
        if workloads_changed {
            let workloads = Workloads::new(config.workloads.iter().cloned());
            self.store.publish(|s| s.set_workloads(workloads));
        }
        self.config = config;
        if workloads_changed && let Err(error) = self.write_file_membership() {
            error!(%why, %error, "cannot leave the CNI plugin the new membership");
        }
    }

    /// `config` with the settings the agent runs with where they cannot
    /// change live: where certificates come from and their lifetime (the CA
    /// client, its credential and the pods' certificates were made from
    /// them), and the source of the mesh. Says so whenever the file asks for
    /// something else.
    fn keep_running_settings(&self, mut config: Config, why: &str) -> Config {
        let running = &self.config;
        if config.issuer != running.issuer
            || config.certificate_ttl != running.certificate_ttl
            || config.health_listen != running.health_listen
            || config.cni != running.cni
            || config.metrics_listen != running.metrics_listen
            || config.admin_listen != running.admin_listen
            || config.cluster != running.cluster
            || config.fast_path != running.fast_path
        {
            warn!(
                %why,
                "devCaDir, ca, certificateTtl, healthListen, cni, metricsListen, adminListen, \
                 clusterId, clusterDomain and fastPath changes take effect when the agent \
                 restarts; until then it keeps the ones it started with"
            );
            config.issuer = running.issuer.clone();
            config.certificate_ttl = running.certificate_ttl;
            config.health_listen = running.health_listen.clone();
            config.cni = running.cni.clone();
            config.metrics_listen = running.metrics_listen.clone();
            config.admin_listen = running.admin_listen.clone();
            config.cluster = running.cluster.clone();
            config.fast_path = running.fast_path;
        }
        if running.kubernetes.is_some()
            && (config.trust_domain != running.trust_domain
                || config.root_namespace != running.root_namespace)
        {
            warn!(
                %why,
                "with kubernetes, trustDomain and rootNamespace changes take effect when the \
                 agent restarts; until then it keeps the ones it started with"
            );
            config.trust_domain = running.trust_domain.clone();
            config.root_namespace = running.root_namespace.clone();
        }
        if config.kubernetes != running.kubernetes {
            warn!(
                %why,
                "kubernetes changes take effect when the agent restarts; until then it keeps the \
                 source of the mesh it started with"
            );
            config.kubernetes = running.kubernetes.clone();
            if config.kubernetes.is_some() {
                config.workloads.clear();
                config.policy_dir = None;
            }
        }
        config
    }

    /// Reads the trust bundle again and, if its roots changed, publishes
    /// them. Tunnels stay up; if a root was removed, connections checked
    /// against the old roots are retired (their streams finish).
    async fn reload_trust(&mut self, why: &str) {
        let trust = match load_trust(&self.config, self.dev_root.as_ref()) {
            Ok(trust) => trust,
            Err(error) => {
                error!(%why, error = %Chain(&error), "trust bundle reload failed; keeping the previous roots");
                return;
            }
        };
        let current = self.store.current();
        let old = current.trust();
        if trust.roots() == old.roots() {
            return;
        }
        let added = trust
            .roots()
            .iter()
            .filter(|r| !old.roots().contains(r))
            .count();
        let removed = old
            .roots()
            .iter()
            .filter(|r| !trust.roots().contains(r))
            .count();
        info!(%why, roots = trust.roots().len(), added, removed, "trust bundle reloaded");
        self.store.publish(|s| s.set_trust(trust));
        if removed > 0 {
            self.pool.retire(|_| true).await;
        }
    }

    /// Reads the policy directory again and, if the policies changed,
    /// publishes them: new connections follow them at once, and the
    /// reconciler brings the kernel's modes in line. Documents that do not
    /// validate are left out (and logged); a directory that cannot be read
    /// leaves the policies in force. With Kubernetes, policies come from the
    /// API server instead.
    fn reload_policies(&mut self, why: &str) {
        if self.config.kubernetes.is_some() {
            return;
        }
        let Some(policies) = load_policies(&self.config, why) else {
            error!(%why, "policy reload failed; keeping the policies in force");
            return;
        };
        if policies != *self.store.current().policies() {
            self.store.publish(|s| s.set_policies(policies));
        }
    }

    /// The config file, then the trust bundle file and the policy directory
    /// if there are.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config_path.clone()];
        files.extend(self.config.trust_bundle_path());
        files.extend(self.config.policy_dir.clone());
        files
    }
}

/// The runtime's sandbox reports, kept beside the socket so that an agent
/// restarted before the API server has a pod's address still knows where
/// the pod is.
const REPORTS_FILE: &str = "sandboxes.json";

/// Where the CNI plugin finds the membership: beside the socket.
/// The limits in force: as configured, the rest derived from the open-files
/// limit (raised to the hard one at start).
fn node_limits(configured: &crate::config::LimitSettings) -> Limits {
    let open_files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let limits = Limits::resolve(configured, open_files);
    info!(
        open_files,
        per_pod = limits.per_pod,
        per_peer = limits.per_peer,
        per_node = limits.per_node,
        reserve_per_pod = limits.reserve,
        drain_deadline = ?limits.drain,
        "connection limits (file descriptors the agent may hold)"
    );
    limits
}

fn membership_file(socket: &Path) -> PathBuf {
    socket.with_file_name(MEMBERSHIP_FILE)
}

/// Returns when the task `source` ends, never without one.
async fn stopped(source: &mut Option<JoinHandle<()>>) {
    match source {
        Some(task) => {
            let _ = task.await;
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever without one.
/// The policies of the config's policy directory (none without one),
/// logging the documents refused and the warnings; None if the directory or
/// one of its files cannot be read or parsed (then what it holds is unknown).
fn load_policies(config: &Config, why: &str) -> Option<Policies> {
    let Some(dir) = &config.policy_dir else {
        return Some(Policies::none(&config.root_namespace));
    };
    let loaded = Policies::load_dir(dir, &config.root_namespace);
    for error in &loaded.errors {
        error!(
            %why,
            error = %error,
            "policy refused; the workloads it was meant for fail closed, the other policies apply"
        );
    }
    for warning in &loaded.warnings {
        warn!(%why, "{warning}");
    }
    if !loaded.complete {
        return None;
    }
    let (peer_authentications, authorization_policies) = loaded.policies.counts();
    info!(
        %why,
        dir = %dir.display(),
        peer_authentications,
        authorization_policies,
        refused = loaded.errors.len(),
        "policies loaded"
    );
    Some(loaded.policies)
}

/// The roots to trust: the trust bundle file's, and the development CA's.
fn load_trust(config: &Config, dev_root: Option<&TrustBundle>) -> Result<TrustBundle, TlsError> {
    let file = config
        .trust_bundle_path()
        .map(|path| TrustBundle::from_pem_file(&path))
        .transpose()?;
    Ok(match (file, dev_root) {
        (Some(file), Some(dev_root)) => dev_root.merged(&file),
        (Some(file), None) => file,
        (None, Some(dev_root)) => dev_root.clone(),
        // The config always names a bundle with a CA service, and the
        // issuer stays the one the agent started with.
        (None, None) => {
            return Err(TlsError::NoCertificate {
                what: "trust bundle",
            });
        }
    })
}

/// Certificates from the CA service, asked for as this node. The node
/// credential is read now, to fail at start if it is unusable, and again
/// at each connection to the CA, so that a renewed one needs no restart;
/// the CA must chain to the current trust bundle.
fn ca_source(config: &Config, ca: &CaSettings, store: &Store) -> Result<CsrSource, DaemonError> {
    let state = store.subscribe();
    let client = match &ca.credential {
        CaCredential::Node(dir) => {
            let dir = dir.clone();
            let node = config.node_id().map_err(|e| DaemonError::NodeCredential {
                dir: dir.clone(),
                source: TransportError::Credential(e.to_string()),
            })?;
            let credential = NodeCredential::load_for(&dir, &node).map_err(|source| {
                DaemonError::NodeCredential {
                    dir: dir.clone(),
                    source,
                }
            })?;
            let left = credential
                .not_after()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left < CREDENTIAL_WARNING {
                warn!(
                    dir = %dir.display(),
                    expires_in_h = left.as_secs() / 3600,
                    "the node credential expires soon; renew it with `warren-ca node-credential \
                     --replace`"
                );
            }
            info!(ca = %ca.address, node = %node, "workload certificates come from the CA service, as this node");
            let tls = move || {
                let credential = NodeCredential::load_for(&dir, &node)?;
                transport::client_config(&credential, state.borrow().trust())
            };
            CaClient::lazy(&ca.address, Arc::new(tls))?
        }
        CaCredential::Token(file) => {
            info!(
                ca = %ca.address,
                token = %file.display(),
                "workload certificates come from the CA service, with this pod's service-account token"
            );
            let trust_domain = config.trust_domain.clone();
            let tls = move || transport::token_client_config(state.borrow().trust(), &trust_domain);
            CaClient::lazy(&ca.address, Arc::new(tls))?.with_token(file)
        }
    };
    Ok(CsrSource::new(client, config.certificate_ttl))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Readiness;

    async fn ready(address: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: probe\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn ready_once_this_nodes_pods_are_tried_and_not_while_none_is_enrolled() {
        let readiness = Readiness::default();
        let address = warren_daemon::health::spawn("127.0.0.1:0", readiness.probe())
            .await
            .unwrap();
        let response = ready(address).await;
        assert!(response.contains("503") && response.contains("waiting for the view"));

        // Pods, none enrolled: a CA that refuses every certificate, say.
        readiness.set(3, 0);
        let response = ready(address).await;
        assert!(response.contains("503") && response.contains("none of this node's pods"));

        // One of three that keeps failing does not hold up a rollout.
        readiness.set(3, 2);
        assert!(ready(address).await.starts_with("HTTP/1.1 200"));
        // A node without mesh pods is ready.
        readiness.set(0, 0);
        assert!(ready(address).await.starts_with("HTTP/1.1 200"));
    }
}

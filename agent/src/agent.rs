//! The node daemon: reads the config, enrolls the pods of this node, and keeps
//! enrollment in step with the config until told to stop.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    ca::{
        client::{CaClient, ClientError, CsrSource},
        transport::{self, NodeCredential, TransportError},
    },
    config::{CaSettings, Config, ConfigError, Issuer, LocalPod, Workload},
    hbone::pool::{self, Pool},
    logging::Chain,
    netns::{NetNs, NetnsError},
    policy::{MtlsMode, Policies},
    proxy::{
        PodProxy,
        inbound::{self, InboundError, PodInbound},
        outbound::{self, OutboundError},
    },
    redirect::{Attachment, InboundModes, RedirectError, Redirector},
    renewal,
    state::Store,
    tls::{CertificateSource, DevCa, TlsError, TrustBundle, WorkloadCertificate},
    watch::{WatchError, watch_files},
};

/// A node credential closer than this to its expiry is warned about at start.
const CREDENTIAL_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long enrollment waits for a pod's first certificate before going on
/// without it (the pod then gets no tunnels until one is issued).
const FIRST_CERTIFICATE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("certificates: {0}")]
    Tls(#[from] TlsError),
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
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

/// A pod this agent is capturing and serving.
struct Enrolled {
    workload: Workload,
    attachment: Attachment,
    proxy: Arc<PodProxy>,
    /// The mTLS modes the ingress program applies to it.
    modes: InboundModes,
    /// Outbound listener, HBONE listener, plaintext listener, certificate
    /// renewal.
    tasks: [JoinHandle<()>; 4],
}

pub struct Agent {
    config_path: PathBuf,
    store: Store,
    redirector: Redirector,
    certificates: Arc<dyn CertificateSource>,
    /// The development CA's root, trusted besides the trust bundle file.
    dev_root: Option<TrustBundle>,
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
        let dev_ca = match &config.issuer {
            Issuer::DevCa { dir } => {
                warn!(
                    dir = %dir.display(),
                    "USING THE DEVELOPMENT CA: workload certificates are issued by a self-signed \
                     root kept on this machine. Fine for a lab, not for production"
                );
                Some(DevCa::load_or_create(dir)?.with_validity(config.certificate_ttl))
            }
            Issuer::Ca(_) => None,
        };
        let dev_root = dev_ca.as_ref().map(DevCa::trust_bundle);
        let trust = load_trust(&config, dev_root.as_ref())?;
        let policies = load_policies(&config, "start")
            .ok_or_else(|| AgentError::Policies(config.policy_dir.clone().unwrap_or_default()))?;
        let store = Store::new(config.clone(), trust, policies);
        let certificates: Arc<dyn CertificateSource> = match (dev_ca, &config.issuer) {
            (Some(dev_ca), _) => Arc::new(dev_ca),
            (None, Issuer::Ca(ca)) => Arc::new(ca_source(&config, ca, &store)?),
            (None, Issuer::DevCa { .. }) => unreachable!("the development CA was loaded above"),
        };
        let redirector = Redirector::load(&config.bpf_pin_dir)?;
        let pool = Arc::new(Pool::new(pool::Settings::default()));
        pool.spawn_reaper();
        Ok(Self {
            config_path: config_path.to_owned(),
            store,
            redirector,
            certificates,
            dev_root,
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
        let (tx, mut changed) = mpsc::unbounded_channel();
        let mut watched = self.watched_files();
        let mut watcher = watch_files(&watched, tx.clone())?;

        self.reconcile().await;
        // Pods that went away while no agent ran: release what was pinned
        // for them.
        let local: HashMap<String, Option<u64>> = self
            .store
            .current()
            .config()
            .local_workloads()
            .map(|(w, _)| {
                let name = w.qualified_name();
                let cookie = self.enrolled.get(&name).map(|e| e.proxy.netns.cookie());
                (name, cookie)
            })
            .collect();
        for pod in self.redirector.release_others(&local) {
            info!(%pod, "released the programs of a pod that is gone");
        }
        info!("warren agent ready");
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    self.reload("SIGHUP").await;
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
                        self.reload("file changed").await;
                    }
                    // The config may name another trust bundle or policy
                    // directory now; both reloads do nothing if unchanged.
                    self.reload_trust("file changed").await;
                    self.reload_policies("file changed");
                }
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
        // The pods' programs stay (pinned): until an agent takes over, their
        // outbound connections fail and STRICT ports drop plaintext, rather
        // than traffic leaving in clear. `warren uninstall` releases them.
        info!(
            pods = self.enrolled.len(),
            pin_dir = %self.store.current().config().bpf_pin_dir.display(),
            "warren agent stopping; its pods stay captured and fail closed until an agent takes \
             over (`warren uninstall` releases them)"
        );
        for enrolled in self.enrolled.values() {
            for task in &enrolled.tasks {
                task.abort();
            }
        }
        Ok(())
    }

    async fn reload(&mut self, why: &str) {
        match Config::load(&self.config_path).map(|c| self.keep_running_issuer(c, why)) {
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
                info!(%why, "config reloaded");
                self.store.publish(config);
                self.reconcile().await;
            }
            Err(error) => {
                error!(%why, error = %Chain(&error), "config reload failed; keeping the previous config");
            }
        }
    }

    /// `config` with the certificate settings the agent runs with: where
    /// certificates come from, and their lifetime, change only at a restart
    /// (the CA client, its credential and the pods' certificates were made
    /// from them). Says so whenever the file asks for something else.
    fn keep_running_issuer(&self, mut config: Config, why: &str) -> Config {
        let running = self.store.current();
        let running = running.config();
        if config.issuer != running.issuer || config.certificate_ttl != running.certificate_ttl {
            warn!(
                %why,
                "devCaDir, ca and certificateTtl changes take effect when the agent restarts; \
                 until then it keeps the ones it started with"
            );
            config.issuer = running.issuer.clone();
            config.certificate_ttl = running.certificate_ttl;
        }
        config
    }

    /// Reads the trust bundle again and, if its roots changed, publishes
    /// them. Tunnels stay up; if a root was removed, connections checked
    /// against the old roots are retired (their streams finish).
    async fn reload_trust(&mut self, why: &str) {
        let current = self.store.current();
        let trust = match load_trust(current.config(), self.dev_root.as_ref()) {
            Ok(trust) => trust,
            Err(error) => {
                error!(%why, error = %Chain(&error), "trust bundle reload failed; keeping the previous roots");
                return;
            }
        };
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
        self.store.publish_trust(trust);
        if removed > 0 {
            self.pool.retire(|_| true).await;
        }
    }

    /// Reads the policy directory again and, if the policies changed,
    /// publishes them: new connections follow them at once. Documents that
    /// do not validate are left out (and logged); a directory that cannot be
    /// read leaves the policies in force.
    fn reload_policies(&mut self, why: &str) {
        let current = self.store.current();
        let Some(policies) = load_policies(current.config(), why) else {
            error!(%why, "policy reload failed; keeping the policies in force");
            return;
        };
        if policies != *current.policies() {
            self.store.publish_policies(policies);
            self.sync_modes();
        }
    }

    /// Brings the modes the ingress programs apply in line with the
    /// policies: a mode change holds for new connections at once.
    fn sync_modes(&mut self) {
        let snapshot = self.store.current();
        for (name, enrolled) in &mut self.enrolled {
            let modes = inbound_modes(snapshot.policies(), &enrolled.workload);
            if modes == enrolled.modes {
                continue;
            }
            match self.redirector.set_modes(enrolled.workload.ip, &modes) {
                Ok(()) => {
                    info!(workload = %name, modes = ?modes, "mTLS modes changed");
                    enrolled.modes = modes;
                }
                Err(error) => {
                    error!(workload = %name, error = %Chain(&error), "cannot change the pod's mTLS modes")
                }
            }
        }
    }

    /// The config file, then the trust bundle file and the policy directory
    /// if there are.
    fn watched_files(&self) -> Vec<PathBuf> {
        let current = self.store.current();
        let mut files = vec![self.config_path.clone()];
        files.extend(current.config().trust_bundle_path());
        files.extend(current.config().policy_dir.clone());
        files
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

        // New labels are only new policy: the pod stays enrolled (a
        // re-enrollment would leave it unenforced for a moment).
        let mut relabelled = false;
        for (name, enrolled) in &mut self.enrolled {
            if let Some((w, _)) = wanted.get(name)
                && w.labels != enrolled.workload.labels
                && same_but_labels(w, &enrolled.workload)
            {
                enrolled.workload.labels = w.labels.clone();
                relabelled = true;
            }
        }
        if relabelled {
            self.sync_modes();
        }
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

        let new: Vec<(String, &Workload, &LocalPod)> = wanted
            .into_iter()
            .filter(|(name, _)| !self.enrolled.contains_key(name))
            .map(|(name, (workload, pod))| (name, workload, pod))
            .collect();
        // Asked for together: a slow CA delays enrollment once, not per pod.
        let certificates = futures_util::future::join_all(
            new.iter()
                .map(|(_, workload, _)| first_certificate(&*self.certificates, workload)),
        )
        .await;
        for ((name, workload, pod), certificate) in new.into_iter().zip(certificates) {
            match self.enroll(workload, pod, certificate).await {
                Ok(enrolled) => {
                    info!(
                        workload = %name,
                        identity = %workload.identity,
                        certificate = if enrolled.proxy.certificate().is_some() { "issued" } else { "none yet" },
                        taken_over = enrolled.attachment.taken_over,
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

    /// Captures the pod and serves it; with no `certificate` (the CA did not
    /// answer in time), it gets no tunnels until renewal obtains one.
    async fn enroll(
        &mut self,
        workload: &Workload,
        pod: &LocalPod,
        certificate: Option<WorkloadCertificate>,
    ) -> Result<Enrolled, EnrollError> {
        let netns = Arc::new(NetNs::open(&pod.netns).await?);
        let proxy = Arc::new(PodProxy::new(
            workload.clone(),
            netns.clone(),
            self.redirector.original_dsts(),
            self.store.subscribe(),
            self.pool.clone(),
        ));
        let inbound = Arc::new(PodInbound::new(proxy.clone()).await?);
        if let Some(certificate) = certificate
            && let Err(error) = inbound.renew(certificate).await
        {
            // Captured all the same, so its traffic cannot leave in clear;
            // renewal asks again.
            error!(
                workload = %workload.qualified_name(),
                error = %Chain(&error),
                "certificate unusable: the workload gets no tunnels until the CA issues another"
            );
        }
        // Listeners first: capture must never point at a closed port.
        let hbone_listener = inbound.bind().await?;
        let plaintext_listener = inbound.bind_plaintext().await?;
        let outbound_listener = outbound::bind(&proxy).await?;
        let modes = inbound_modes(self.store.current().policies(), workload);
        let attachment = self.redirector.enroll(
            &workload.qualified_name(),
            &pod.cgroup,
            &pod.netns,
            netns.cookie(),
            workload.ip,
            &modes,
            &plaintext_listener,
        )?;
        Ok(Enrolled {
            workload: workload.clone(),
            attachment,
            proxy: proxy.clone(),
            modes,
            tasks: [
                tokio::spawn(outbound::serve(outbound_listener, proxy)),
                tokio::spawn(inbound::serve(hbone_listener, inbound.clone())),
                tokio::spawn(inbound::serve_plaintext(
                    plaintext_listener,
                    inbound.clone(),
                )),
                tokio::spawn(renewal::keep_fresh(inbound, self.certificates.clone())),
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
        enrolled.proxy.withdraw().await;
        info!(workload = %name, "withdrew from pod: its traffic is no longer captured");
    }
}

/// A workload's first certificate, if the CA gives one in time; a failure
/// is logged, and renewal keeps asking.
async fn first_certificate(
    source: &dyn CertificateSource,
    workload: &Workload,
) -> Option<WorkloadCertificate> {
    let error = match tokio::time::timeout(
        FIRST_CERTIFICATE_WAIT,
        source.certificate(&workload.identity),
    )
    .await
    {
        Ok(Ok(certificate)) => return Some(certificate),
        Ok(Err(error)) => Chain(&error).to_string(),
        Err(_) => format!("no answer within {FIRST_CERTIFICATE_WAIT:?}"),
    };
    error!(
        workload = %workload.qualified_name(),
        identity = %workload.identity,
        %error,
        "no certificate for the workload: it gets no tunnels until the CA issues one"
    );
    None
}

/// Whether `a` and `b` are the same pod, labels aside.
fn same_but_labels(a: &Workload, b: &Workload) -> bool {
    Workload {
        labels: b.labels.clone(),
        ..a.clone()
    } == *b
}

/// A workload's mTLS modes, as the ingress program takes them.
fn inbound_modes(policies: &Policies, workload: &Workload) -> InboundModes {
    use warren_common::mode;
    // DISABLE pods' plaintext goes through the agent too: authorization
    // applies to it. And if authorization applies, plaintext must not get
    // past while no agent listens.
    let flags = if policies.authorization_applies(workload) {
        mode::AUTHORIZED
    } else {
        0
    };
    let code = |m| match m {
        MtlsMode::Strict => mode::STRICT,
        MtlsMode::Permissive | MtlsMode::Disable => mode::PERMISSIVE | flags,
    };
    let (default, ports) = policies.mtls_modes(workload);
    InboundModes {
        default: code(default),
        ports: ports.into_iter().map(|(p, m)| (p, code(m))).collect(),
    }
}

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
fn ca_source(config: &Config, ca: &CaSettings, store: &Store) -> Result<CsrSource, AgentError> {
    let dir = ca.node_credential.clone();
    let node = config.node_id().map_err(|e| AgentError::NodeCredential {
        dir: dir.clone(),
        source: TransportError::Credential(e.to_string()),
    })?;
    let credential =
        NodeCredential::load_for(&dir, &node).map_err(|source| AgentError::NodeCredential {
            dir: dir.clone(),
            source,
        })?;
    let left = credential
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    if left < CREDENTIAL_WARNING {
        warn!(
            dir = %dir.display(),
            expires_in_h = left.as_secs() / 3600,
            "the node credential expires soon; renew it with `warren ca node-credential --replace`"
        );
    }
    info!(ca = %ca.address, node = %node, "workload certificates come from the CA service");
    let state = store.subscribe();
    let tls = move || {
        let credential = NodeCredential::load_for(&dir, &node)?;
        transport::client_config(&credential, state.borrow().trust())
    };
    let client = CaClient::lazy(&ca.address, Arc::new(tls))?;
    Ok(CsrSource::new(client, config.certificate_ttl))
}

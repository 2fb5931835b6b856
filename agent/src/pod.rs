//! One enrolled pod at run time, and the [`Enroller`] that makes them.
//!
//! Enrolling a pod: find its sandbox (given by the config file, or found
//! from the kubelet's cgroup layout), ask for its certificate, open its
//! listeners inside its network namespace, then attach the kernel programs
//! (listeners first: capture must never point at a closed port). A
//! [`PodRuntime`] owns the pod's listeners and tasks; dropping it stops them
//! and leaves the pod's pinned programs in place (failing closed), while
//! [`Enroller::withdraw`] also releases the pod.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use warren_daemon::logging::Chain;
use warren_pki::tls::WorkloadCertificate;

use crate::{
    fastpath::FastPath,
    hbone::pool::Pool,
    limits::NodeBudget,
    mesh::{LocalPod, Policies, Snapshot, Workload, policy::MtlsMode},
    metrics::Metrics,
    netns::{NetNs, NetnsError},
    node_route::{self, RouteError},
    proxy::{
        PodProxy, Shortcut,
        inbound::{self, InboundError, PodInbound},
        outbound::{self, OutboundError},
    },
    reconcile::Enroller,
    redirect::{Attachment, InboundModes, RedirectError, Redirector},
    renewal,
    sandbox::{self, HostRoots, NsId, Sandbox, SandboxError},
    tls::CertificateSource,
};

/// How long enrollment waits for a pod's first certificate before going on
/// without it (the pod then gets no tunnels until one is issued).
const FIRST_CERTIFICATE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("finding the pod's sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("finding the node's address towards the pod: {0}")]
    Route(#[from] RouteError),
}

/// A pod this agent is capturing and serving.
pub struct PodRuntime {
    workload: Arc<Workload>,
    /// Taken when the pod is withdrawn.
    attachment: Option<Attachment>,
    proxy: Arc<PodProxy>,
    /// The mTLS modes the ingress program applies to it.
    modes: InboundModes,
    /// The node's address as the pod sees it, the one source the kubelet's
    /// probes may come from.
    node_address: Ipv4Addr,
    probe_ports: BTreeSet<u16>,
    /// The namespace file the pod was found through, and the namespace it
    /// held: if the file holds another one now, the sandbox was recreated
    /// (or, for a pod of the config file, its namespace made again).
    sandbox: (PathBuf, NsId),
    /// Outbound listener, HBONE listener, plaintext listener, certificate
    /// renewal.
    tasks: Vec<JoinHandle<()>>,
}

impl PodRuntime {
    pub fn netns_cookie(&self) -> u64 {
        self.proxy.netns.cookie()
    }

    /// Whether the pod has its certificate (until then it is captured but
    /// gets no tunnels).
    pub fn has_certificate(&self) -> bool {
        self.proxy.certificate().is_some()
    }
}

impl Drop for PodRuntime {
    /// Stops serving; the pinned programs stay, so the pod fails closed
    /// until an agent serves it again.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The pods this agent serves, as seen from outside the daemon loop (which
/// owns them): their certificates, for the metrics and the admin endpoint.
/// Holds no pod alive.
#[derive(Clone, Default)]
pub struct Serving(Arc<Mutex<Vec<Weak<PodProxy>>>>);

impl Serving {
    fn add(&self, pod: &Arc<PodProxy>) {
        let mut pods = self.0.lock().unwrap_or_else(|p| p.into_inner());
        pods.retain(|p| p.strong_count() > 0);
        pods.push(Arc::downgrade(pod));
    }

    /// Each served pod that has a certificate, with it (expired or not).
    pub fn certificates(&self) -> Vec<(Workload, Arc<WorkloadCertificate>)> {
        let pods = self.0.lock().unwrap_or_else(|p| p.into_inner());
        pods.iter()
            .filter_map(Weak::upgrade)
            .filter_map(|pod| Some((pod.workload.clone(), pod.certificate()?)))
            .collect()
    }
}

/// Enrolls this node's pods: the kernel programs, the proxies, the
/// certificates.
pub struct NodePods {
    pub redirector: Redirector,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub certificates: Arc<dyn CertificateSource>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// The pods being served, for the metrics and the admin endpoint.
    pub serving: Serving,
    /// Where the host's `/proc` and cgroups are, for kubelet pods.
    pub host: HostRoots,
    /// The same-node fast path, which learns of each pod served, and where
    /// pods' proxies offer it pairs (none when it is off).
    pub fast_path: FastPath,
    pub shortcuts: Option<mpsc::Sender<Shortcut>>,
    /// What all pods' connections may hold; each pod gets a share.
    pub budget: Arc<NodeBudget>,
}

impl Enroller for NodePods {
    type Pod = PodRuntime;
    type Error = EnrollError;

    async fn enroll(
        &mut self,
        workloads: &[Arc<Workload>],
    ) -> Vec<Result<PodRuntime, EnrollError>> {
        let mut located = Vec::with_capacity(workloads.len());
        for workload in workloads {
            located.push(self.locate(workload).await);
        }
        // Asked for together: a slow CA delays enrollment once, not per pod.
        let certificates = futures_util::future::join_all(workloads.iter().zip(&located).map(
            |(workload, located)| async {
                match located {
                    Ok(_) => first_certificate(&*self.certificates, workload).await,
                    Err(_) => None,
                }
            },
        ))
        .await;
        let mut results = Vec::with_capacity(workloads.len());
        for ((workload, located), certificate) in workloads.iter().zip(located).zip(certificates) {
            let result = match located {
                Ok(located) => self.enroll_one(workload, located, certificate).await,
                Err(error) => Err(error),
            };
            results.push(result);
        }
        results
    }

    async fn withdraw(&mut self, mut pod: PodRuntime) {
        let name = pod.workload.qualified_name();
        // Its fast-path grants go first, both ways: from then on its
        // connections (and those to it) are the agent's to decide.
        self.fast_path.unregister(&pod.proxy);
        // Capture stops before the listeners close, so no new connection is
        // sent to a port nobody serves. Connections in flight finish.
        if let Some(attachment) = pod.attachment.take()
            && let Err(error) = self.redirector.withdraw(attachment)
        {
            warn!(workload = %name, error = %Chain(&error), "detaching from pod failed");
        }
        for task in &pod.tasks {
            task.abort();
        }
        // Wait until the listeners are closed, so that a pod enrolled again
        // right away (its sandbox changed) can bind the same addresses.
        for task in std::mem::take(&mut pod.tasks) {
            let _ = task.await;
        }
        pod.proxy.withdraw().await;
        // Its connections in flight stay counted; its reserve is for the
        // pods to come.
        pod.proxy.budget.retire();
        info!(workload = %name, "withdrew from pod: its traffic is no longer captured");
    }

    fn namespace(pod: &PodRuntime) -> Option<NsId> {
        Some(pod.sandbox.1)
    }

    async fn still_there(&mut self, pod: &mut PodRuntime) -> bool {
        let (netns, id) = &pod.sandbox;
        let now = NsId::of_path(netns);
        if now.as_ref().is_ok_and(|now| now == id) {
            return true;
        }
        let uid = match &pod.workload.local {
            Some(LocalPod::Kubelet { uid, netns: None }) => uid,
            // The config file's path, or the runtime's file for the
            // sandbox. Holding another namespace, it was made again: the
            // pod is enrolled again where it is now. Gone or unreadable, it
            // says nothing of where the pod's processes are (`ip netns del`
            // leaves them running; a runtime removes the file after it has
            // killed them, and DEL follows): the pod stays held.
            _ => return now.is_err(),
        };
        // The process it was found through is gone. Without an infra
        // container (CRI-O's drop_infra_ctr) that is any container that
        // ended; the namespace may well be there, held by another process.
        let id = *id;
        match self.locate_kubelet_pod(uid, pod.workload.ip, None).await {
            Ok(found) if found.netns_id == id => {
                pod.sandbox = (found.netns, found.netns_id);
                true
            }
            // Another namespace holds the pod's address: a new sandbox.
            Ok(_) => false,
            // None holds it now: the pod is going away, or its sandbox is
            // being remade (the next check finds the new one).
            Err(_) => true,
        }
    }

    fn refresh(&mut self, pod: &mut PodRuntime, workload: &Arc<Workload>) {
        pod.workload = workload.clone();
        let name = workload.qualified_name();
        let modes = inbound_modes(self.state.borrow().policies(), workload);
        if modes != pod.modes {
            match self.redirector.set_modes(workload.ip, &modes) {
                Ok(()) => {
                    info!(workload = %name, modes = ?modes, "mTLS modes changed");
                    pod.modes = modes;
                }
                Err(error) => {
                    error!(workload = %name, error = %Chain(&error), "cannot change the pod's mTLS modes")
                }
            }
        }
        if workload.probe_ports != pod.probe_ports {
            match self.redirector.set_probes(
                workload.ip,
                &[pod.node_address],
                &workload.probe_ports,
            ) {
                Ok(()) => {
                    info!(workload = %name, ports = ?workload.probe_ports, "probe ports changed");
                    pod.probe_ports = workload.probe_ports.clone();
                }
                Err(error) => {
                    error!(workload = %name, error = %Chain(&error), "cannot change the pod's probe ports")
                }
            }
        }
    }
}

impl NodePods {
    /// The pod's network namespace file and cgroup directory, and for a
    /// kubelet pod what identifies its sandbox.
    async fn locate(&self, workload: &Workload) -> Result<Located, EnrollError> {
        match &workload.local {
            Some(LocalPod::Paths { netns, cgroup }) => Ok(Located {
                netns: netns.clone(),
                cgroup: cgroup.clone(),
                sandbox: None,
            }),
            Some(LocalPod::Kubelet { uid, netns }) => {
                let found = self
                    .locate_kubelet_pod(uid, workload.ip, netns.as_deref())
                    .await?;
                Ok(Located {
                    sandbox: Some((found.netns.clone(), found.netns_id)),
                    netns: found.netns,
                    cgroup: found.cgroup,
                })
            }
            None => unreachable!("only this node's workloads are enrolled"),
        }
    }

    /// Finds the kubelet pod `uid` whose address is `ip` on this node, in
    /// the namespace file `netns` where the runtime reported one.
    async fn locate_kubelet_pod(
        &self,
        uid: &str,
        ip: Ipv4Addr,
        netns: Option<&std::path::Path>,
    ) -> Result<Sandbox, SandboxError> {
        let (host, task_uid) = (self.host.clone(), uid.to_owned());
        let netns = netns.map(ToOwned::to_owned);
        // Reads /proc and cgroupfs, and enters namespaces: not for the
        // runtime's threads.
        tokio::task::spawn_blocking(move || match netns {
            Some(netns) => sandbox::locate_reported(&host, &task_uid, ip, &netns),
            None => sandbox::locate(&host, &task_uid, ip),
        })
        .await
        .unwrap_or_else(|e| {
            Err(SandboxError::NotYet {
                uid: uid.to_owned(),
                problem: format!("looking for it failed: {e}"),
            })
        })
    }

    /// Captures the pod and serves it; with no `certificate` (the CA did not
    /// answer in time), it gets no tunnels until renewal obtains one.
    async fn enroll_one(
        &mut self,
        workload: &Arc<Workload>,
        located: Located,
        certificate: Option<WorkloadCertificate>,
    ) -> Result<PodRuntime, EnrollError> {
        let Located {
            netns: netns_path,
            cgroup,
            sandbox,
        } = located;
        let name = workload.qualified_name();
        let netns = Arc::new(NetNs::open(&netns_path).await?);
        // The file is opened again here: it must still be the namespace
        // that was checked to hold the pod's address. (A pod of the config
        // file is where its file is now.)
        let sandbox = sandbox.unwrap_or_else(|| (netns_path.clone(), netns.id()));
        if netns.id() != sandbox.1 {
            return Err(SandboxError::NotYet {
                uid: name.clone(),
                problem: format!(
                    "{} changed namespace while the pod was being enrolled",
                    netns_path.display()
                ),
            }
            .into());
        }
        // The kubelet (and anything else on the node) reaches the pod from
        // this address: its probes are let through from it alone.
        let node_address = node_route::source_address_for(workload.ip).await?;
        let budget = self.budget.pod();
        if budget.reserve() < self.budget.limits().reserve {
            warn!(
                workload = %name,
                reserve = budget.reserve(),
                configured = self.budget.limits().reserve,
                "the pod's reserve of descriptors is smaller than configured: the reserves of \
                 this node's pods take half of its limit already (README, Limits)"
            );
        }
        let proxy = Arc::new(PodProxy::new(
            (**workload).clone(),
            netns.clone(),
            self.redirector.original_dsts(),
            self.state.clone(),
            self.pool.clone(),
            self.metrics.clone(),
            self.shortcuts.clone(),
            budget,
        ));
        let inbound = Arc::new(PodInbound::new(proxy.clone()).await?);
        self.serving.add(&proxy);
        if let Some(certificate) = certificate
            && let Err(error) = inbound.renew(certificate).await
        {
            // Captured all the same, so its traffic cannot leave in clear;
            // renewal asks again.
            error!(
                workload = %name,
                error = %Chain(&error),
                "certificate unusable: the workload gets no tunnels until the CA issues another"
            );
        }
        // Listeners first: capture must never point at a closed port.
        let hbone_listener = inbound.bind().await?;
        let plaintext_listener = inbound.bind_plaintext().await?;
        let outbound_listener = outbound::bind(&proxy).await?;
        let modes = inbound_modes(self.state.borrow().policies(), workload);
        let attachment = self.redirector.enroll(
            &name,
            &cgroup,
            &netns_path,
            netns.cookie(),
            workload.ip,
            &modes,
            &plaintext_listener,
        )?;
        self.fast_path.register(&proxy, attachment.current_programs);
        let mut probe_ports = workload.probe_ports.clone();
        if let Err(error) =
            self.redirector
                .set_probes(workload.ip, &[node_address], &workload.probe_ports)
        {
            // Enforced all the same (fail closed): its probes fail until a
            // refresh manages to set them.
            error!(workload = %name, error = %Chain(&error), "cannot let the pod's probes in");
            probe_ports.clear();
        }
        info!(
            workload = %name,
            identity = %workload.identity,
            certificate = if proxy.certificate().is_some() { "issued" } else { "none yet" },
            taken_over = attachment.taken_over,
            hbone = %SocketAddr::new(workload.ip.into(), crate::hbone::PORT),
            ip = %workload.ip,
            netns = %netns_path.display(),
            cgroup = %cgroup.display(),
            probe_ports = ?workload.probe_ports,
            %node_address,
            "enrolled pod: capturing its outbound TCP connections, serving HBONE"
        );
        Ok(PodRuntime {
            workload: workload.clone(),
            attachment: Some(attachment),
            proxy: proxy.clone(),
            modes,
            node_address,
            probe_ports,
            sandbox,
            tasks: vec![
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
}

/// Where a pod was found.
struct Located {
    netns: PathBuf,
    cgroup: PathBuf,
    /// A kubelet pod's sandbox: the namespace file of its process and the
    /// namespace it held.
    sandbox: Option<(PathBuf, NsId)>,
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

/// A workload's mTLS modes, as the ingress program takes them.
pub fn inbound_modes(policies: &Policies, workload: &Workload) -> InboundModes {
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

//! The data plane in user space, per enrolled pod:
//!
//! - [`outbound`]: what the kernel programs capture inside the pod: HBONE to
//!   mesh destinations, passthrough to the rest.
//! - [`inbound`]: HBONE streams arriving at the pod, delivered to the
//!   application ([`transparent`]ly: it sees the client's address).

pub mod inbound;
pub mod outbound;
pub mod transparent;

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio::sync::{mpsc, watch};
use tracing::info;

use warren_pki::{
    identity::SpiffeId,
    tls::{TrustBundle, WorkloadCertificate},
};

use crate::{
    hbone::pool::Pool,
    limits::PodBudget,
    mesh::{
        Policies, Snapshot, Workload,
        policy::{Connection, Decision},
    },
    metrics::Metrics,
    netns::NetNs,
    redirect::OriginalDsts,
};

/// A new id for a connection, unique in this agent's life: its span and
/// its access log line carry it.
pub(crate) fn connection_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What the outbound side tells the same-node fast path: the pod of
/// `netns_cookie` connected to `dst`, a pod of this node, through the agent.
/// If policy allows the pair, its next connections may go straight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortcut {
    pub netns_cookie: u64,
    pub dst: SocketAddrV4,
}

/// Everything the proxies of one enrolled pod need.
pub struct PodProxy {
    pub workload: Workload,
    pub netns: Arc<NetNs>,
    pub original_dsts: OriginalDsts,
    /// The mesh and the roots to trust.
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// Where to offer the fast path pairs it could take; none when it is off.
    pub shortcuts: Option<mpsc::Sender<Shortcut>>,
    /// What the pod's connections may hold in the agent.
    pub budget: Arc<PodBudget>,
    /// The pod's certificate, none until the CA has issued one; replaced when
    /// renewed, and watched by the inbound side to retire connections made
    /// with the old one.
    certificate: watch::Sender<Option<Arc<WorkloadCertificate>>>,
}

impl PodProxy {
    /// A pod without a certificate yet: it gets no tunnels until
    /// [`renew`](Self::renew) gives it one.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is one thing of the node's that the pod's proxies use"
    )]
    pub fn new(
        workload: Workload,
        netns: Arc<NetNs>,
        original_dsts: OriginalDsts,
        state: watch::Receiver<Arc<Snapshot>>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        shortcuts: Option<mpsc::Sender<Shortcut>>,
        budget: Arc<PodBudget>,
    ) -> Self {
        Self {
            workload,
            netns,
            original_dsts,
            state,
            pool,
            metrics,
            shortcuts,
            budget,
            certificate: watch::Sender::new(None),
        }
    }

    /// The pod's latest certificate, valid or not (to decide when to renew it).
    pub fn certificate(&self) -> Option<Arc<WorkloadCertificate>> {
        self.certificate.borrow().clone()
    }

    /// Notified when the certificate is replaced.
    pub fn certificate_changes(&self) -> watch::Receiver<Option<Arc<WorkloadCertificate>>> {
        self.certificate.subscribe()
    }

    /// The pod's certificate, if it is valid now: a workload without one
    /// gets no tunnels (fail closed).
    pub fn valid_certificate(&self) -> Option<Arc<WorkloadCertificate>> {
        self.certificate()
            .filter(|c| c.is_valid_at(SystemTime::now()))
    }

    /// The roots peers must chain to, as of now.
    pub fn trust(&self) -> Arc<TrustBundle> {
        self.state.borrow().trust().clone()
    }

    /// Puts a renewed certificate in place. New connections, both ways, use
    /// it; pooled outbound connections opened with the old one are retired
    /// (their streams finish), and inbound ones are asked to wind down.
    pub async fn renew(&self, certificate: Arc<WorkloadCertificate>) {
        self.certificate.send_replace(Some(certificate));
        let (cookie, identity) = (self.netns.cookie(), &self.workload.identity);
        self.pool
            .retire(|key| key.src_netns == cookie && &key.src == identity)
            .await;
    }

    /// The pod is leaving: it has no certificate from now on (its inbound
    /// connections wind down), and its pooled connections are retired.
    pub async fn withdraw(&self) {
        self.certificate.send_replace(None);
        self.retire_connections().await;
    }

    /// Retires this pod's pooled outbound connections (its certificate
    /// expired).
    pub async fn retire_connections(&self) {
        let cookie = self.netns.cookie();
        self.pool.retire(|key| key.src_netns == cookie).await;
    }

    /// Asks the policies in force whether a connection from `source` (an
    /// identity, or None for plaintext) at `source_ip` to `dst` of this pod
    /// is allowed. Audit and dry-run results are logged here; the caller
    /// logs the decision with the rest of what it knows.
    pub fn authorize(
        &self,
        source: Option<&SpiffeId>,
        source_ip: IpAddr,
        dst: SocketAddr,
    ) -> Decision {
        let decision = self.decide(source, source_ip, dst);
        let workload = self.workload.qualified_name();
        let source = source.map_or_else(|| "-".to_owned(), ToString::to_string);
        for policy in &decision.audited {
            info!(%workload, %source, %source_ip, %dst, %policy, "AUDIT policy matched");
        }
        for result in &decision.dry_run {
            info!(%workload, %source, %source_ip, %dst, %result, "dry-run policy");
        }
        self.metrics.decided(&decision);
        decision
    }

    /// What the policies in force say of a connection, with nothing logged
    /// or counted: for connections decided before, asked again.
    pub fn decide(
        &self,
        source: Option<&SpiffeId>,
        source_ip: IpAddr,
        dst: SocketAddr,
    ) -> Decision {
        self.with_policies(|policies, workload| {
            policies.authorize(
                workload,
                &Connection {
                    source,
                    source_ip,
                    destination_ip: self.workload.ip,
                    destination_port: dst.port(),
                },
            )
        })
    }

    /// Runs `f` with the policies in force and this pod as the config has it
    /// now (its labels, which policies select on, may have changed since it
    /// was enrolled).
    pub fn with_policies<R>(&self, f: impl FnOnce(&Policies, &Workload) -> R) -> R {
        let state = self.state.borrow();
        let workload = state
            .workload_by_ip(self.workload.ip)
            .map_or(&self.workload, |w| &**w);
        f(state.policies(), workload)
    }

    /// This pod as the mesh has it now: its labels, which the metrics
    /// report, may have changed since it was enrolled.
    pub(crate) fn current(&self) -> Arc<Workload> {
        self.state
            .borrow()
            .workload_by_ip(self.workload.ip)
            .filter(|w| w.same_pod(&self.workload))
            .cloned()
            .unwrap_or_else(|| Arc::new(self.workload.clone()))
    }

    fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::new(self.workload.ip.into(), crate::hbone::PORT)
    }
}

//! The data plane in user space, per enrolled pod:
//!
//! - [`outbound`]: what the kernel programs capture inside the pod: HBONE to
//!   mesh destinations, passthrough to the rest.
//! - [`inbound`]: HBONE streams arriving at the pod, delivered to the
//!   application ([`transparent`]ly: it sees the client's address).

pub mod inbound;
pub mod outbound;
pub mod transparent;

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use tokio::sync::watch;

use crate::{
    config::Workload,
    hbone::pool::Pool,
    netns::NetNs,
    redirect::OriginalDsts,
    state::Snapshot,
    tls::{TrustBundle, WorkloadCertificate},
};

/// Everything the proxies of one enrolled pod need.
pub struct PodProxy {
    pub workload: Workload,
    pub netns: Arc<NetNs>,
    pub trust: TrustBundle,
    pub original_dsts: OriginalDsts,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub pool: Arc<Pool>,
    /// The pod's current certificate; replaced when renewed, and watched by
    /// the inbound side to retire connections made with the old one.
    certificate: watch::Sender<Arc<WorkloadCertificate>>,
}

impl PodProxy {
    pub fn new(
        workload: Workload,
        netns: Arc<NetNs>,
        certificate: WorkloadCertificate,
        trust: TrustBundle,
        original_dsts: OriginalDsts,
        state: watch::Receiver<Arc<Snapshot>>,
        pool: Arc<Pool>,
    ) -> Self {
        Self {
            workload,
            netns,
            trust,
            original_dsts,
            state,
            pool,
            certificate: watch::Sender::new(Arc::new(certificate)),
        }
    }

    /// The pod's certificate, valid or not (to decide when to renew it).
    pub fn certificate(&self) -> Arc<WorkloadCertificate> {
        self.certificate.borrow().clone()
    }

    /// Notified when the certificate is replaced.
    pub fn certificate_changes(&self) -> watch::Receiver<Arc<WorkloadCertificate>> {
        self.certificate.subscribe()
    }

    /// The pod's certificate, if it is valid now: a workload without one
    /// gets no tunnels (fail closed).
    fn valid_certificate(&self) -> Option<Arc<WorkloadCertificate>> {
        let certificate = self.certificate();
        let now = SystemTime::now();
        (certificate.not_before() <= now && now < certificate.not_after()).then_some(certificate)
    }

    /// Puts a renewed certificate in place. New connections, both ways, use
    /// it; pooled outbound connections opened with the old one are retired
    /// (their streams finish), and inbound ones are asked to wind down.
    pub async fn renew(&self, certificate: WorkloadCertificate) {
        self.certificate.send_replace(Arc::new(certificate));
        let (cookie, identity) = (self.netns.cookie(), &self.workload.identity);
        self.pool
            .retire(|key| key.src_netns == cookie && &key.src == identity)
            .await;
    }

    /// Retires this pod's pooled outbound connections (it is leaving).
    pub async fn retire_connections(&self) {
        let cookie = self.netns.cookie();
        self.pool.retire(|key| key.src_netns == cookie).await;
    }

    fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::new(self.workload.ip.into(), crate::hbone::PORT)
    }
}

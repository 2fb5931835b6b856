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
    pub certificate: Arc<WorkloadCertificate>,
    pub trust: TrustBundle,
    pub original_dsts: OriginalDsts,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub pool: Arc<Pool>,
}

impl PodProxy {
    /// The pod's certificate, if it is still valid: a workload without one
    /// gets no tunnels (fail closed).
    fn valid_certificate(&self) -> Option<&Arc<WorkloadCertificate>> {
        let now = SystemTime::now();
        (self.certificate.not_before() <= now && now < self.certificate.not_after())
            .then_some(&self.certificate)
    }

    fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::new(self.workload.ip.into(), crate::hbone::PORT)
    }
}

//! One immutable snapshot of the mesh at a time, published by whoever learns
//! something (the config file, the API server, the trust bundle file) and
//! read by the proxies and the reconciler.

use std::{net::Ipv4Addr, net::SocketAddrV4, sync::Arc};

use tokio::sync::watch;

use warren_pki::tls::TrustBundle;

use super::{Policies, ServicePort, Services, Workload, Workloads};

/// What the agent knows of the mesh at one moment. Cheap to clone: every
/// part is shared, and a source replaces only the parts it feeds.
#[derive(Debug, Clone)]
pub struct Snapshot {
    workloads: Arc<Workloads>,
    services: Arc<Services>,
    /// The roots peers' certificates must chain to.
    trust: Arc<TrustBundle>,
    policies: Arc<Policies>,
    /// Whether the source of workloads has given a complete view yet (the
    /// API server's first lists); until then nothing is enrolled or
    /// released.
    synced: bool,
}

impl Snapshot {
    pub fn new(trust: TrustBundle, policies: Policies) -> Self {
        Self {
            workloads: Arc::default(),
            services: Arc::default(),
            trust: Arc::new(trust),
            policies: Arc::new(policies),
            synced: false,
        }
    }

    /// Whether a connection to the pod at `pod_ip` is decided alike in this
    /// snapshot and in `other`: the same policies, the same pod. (Sources
    /// replace only what changed, so the parts are compared as pointers.)
    pub fn decides_alike(&self, other: &Snapshot, pod_ip: Ipv4Addr) -> bool {
        let same_pod = match (self.workload_by_ip(pod_ip), other.workload_by_ip(pod_ip)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        Arc::ptr_eq(&self.policies, &other.policies) && same_pod
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn set_synced(&mut self) {
        self.synced = true;
    }

    pub fn workloads(&self) -> &Workloads {
        &self.workloads
    }

    /// The mesh workload with address `ip`, if any.
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.workloads.by_ip(ip)
    }

    /// The service port at `vip`, if any.
    pub fn service(&self, vip: SocketAddrV4) -> Option<&Arc<ServicePort>> {
        self.services.get(vip)
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// The current trust bundle; a new `Arc` whenever it changes.
    pub fn trust(&self) -> &Arc<TrustBundle> {
        &self.trust
    }

    /// The security policies in force.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    pub fn set_workloads(&mut self, workloads: Workloads) {
        self.workloads = Arc::new(workloads);
    }

    pub fn set_services(&mut self, services: Services) {
        self.services = Arc::new(services);
    }

    pub fn set_trust(&mut self, trust: TrustBundle) {
        self.trust = Arc::new(trust);
    }

    pub fn set_policies(&mut self, policies: Policies) {
        self.policies = Arc::new(policies);
    }
}

/// Holds the current snapshot; readers get a [`watch::Receiver`]. Clones
/// share it (each source holds one).
#[derive(Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Store {
    pub fn new(snapshot: Snapshot) -> Self {
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Self { tx: Arc::new(tx) }
    }

    /// Publishes the current snapshot as changed by `change`. Readers see
    /// either the old snapshot or the new one, never a mix. Sources publish
    /// from several tasks: the change is applied under the channel's lock,
    /// so that none undoes another's.
    pub fn publish(&self, change: impl FnOnce(&mut Snapshot)) {
        self.tx.send_modify(|current| {
            let mut next = (**current).clone();
            change(&mut next);
            *current = Arc::new(next);
        });
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use warren_pki::identity::{SpiffeId, TrustDomain};

    use crate::tls::testing::TempCa;

    fn workload(ip: [u8; 4]) -> Workload {
        Workload {
            name: "a".into(),
            namespace: "ns".into(),
            workload_name: "w".into(),
            service_account: "sa".into(),
            identity: SpiffeId::new(TrustDomain::new("cluster.local").unwrap(), "ns", "sa")
                .unwrap(),
            ip: ip.into(),
            node: "n2".into(),
            labels: Default::default(),
            local: None,
            probe_ports: BTreeSet::new(),
        }
    }

    #[test]
    fn readers_see_the_latest_snapshot_and_untouched_parts_stay() {
        let store = Store::new(Snapshot::new(
            TempCa::new().trust_bundle(),
            Policies::default(),
        ));
        let reader = store.subscribe();
        let trust = store.current().trust().clone();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        store.publish(|s| s.set_workloads(Workloads::new([workload([10, 0, 0, 1])])));
        assert_eq!(reader.borrow().workload_by_ip(a).unwrap().name, "a");
        store.publish(|s| s.set_workloads(Workloads::new([workload([10, 0, 0, 2])])));
        assert!(reader.borrow().workload_by_ip(a).is_none());
        assert!(
            reader
                .borrow()
                .workload_by_ip(Ipv4Addr::new(10, 0, 0, 2))
                .is_some()
        );
        assert!(Arc::ptr_eq(reader.borrow().trust(), &trust));
    }
}

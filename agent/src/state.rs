//! The agent's view of the mesh: one immutable snapshot at a time, published
//! by whoever learns about workloads (the config file today, Kubernetes
//! discovery later) or roots (the trust bundle file), and read by the proxy
//! and the eBPF loader.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use tokio::sync::watch;

use crate::{
    config::{Config, Workload},
    policy::Policies,
    tls::TrustBundle,
};

#[derive(Debug)]
pub struct Snapshot {
    config: Config,
    by_ip: HashMap<Ipv4Addr, usize>,
    /// The roots peers' certificates must chain to.
    trust: Arc<TrustBundle>,
    policies: Arc<Policies>,
}

impl Snapshot {
    fn new(config: Config, trust: Arc<TrustBundle>, policies: Arc<Policies>) -> Self {
        let by_ip = config
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (w.ip, i))
            .collect();
        Self {
            config,
            by_ip,
            trust,
            policies,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current trust bundle; a new `Arc` whenever it changes.
    pub fn trust(&self) -> &Arc<TrustBundle> {
        &self.trust
    }

    /// The security policies in force.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The mesh workload with address `ip`, if any.
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.config.workloads[i])
    }
}

/// Holds the current snapshot; readers get a [`watch::Receiver`].
pub struct Store {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Store {
    pub fn new(config: Config, trust: TrustBundle, policies: Policies) -> Self {
        let snapshot = Snapshot::new(config, Arc::new(trust), Arc::new(policies));
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Self { tx }
    }

    /// A new config; trust bundle and policies stay.
    pub fn publish(&self, config: Config) {
        let current = self.current();
        let (trust, policies) = (current.trust.clone(), current.policies.clone());
        self.tx
            .send_replace(Arc::new(Snapshot::new(config, trust, policies)));
    }

    /// A new trust bundle; the rest stays.
    pub fn publish_trust(&self, trust: TrustBundle) {
        let current = self.current();
        let (config, policies) = (current.config.clone(), current.policies.clone());
        self.tx
            .send_replace(Arc::new(Snapshot::new(config, Arc::new(trust), policies)));
    }

    /// New policies; the rest stays.
    pub fn publish_policies(&self, policies: Policies) {
        let current = self.current();
        let (config, trust) = (current.config.clone(), current.trust.clone());
        self.tx
            .send_replace(Arc::new(Snapshot::new(config, trust, Arc::new(policies))));
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
    use std::path::Path;

    use super::*;
    use crate::tls::testing::TempCa;

    #[test]
    fn finds_workloads_by_ip_in_the_latest_snapshot() {
        let config = |ip| {
            Config::parse(
                Path::new("t.yaml"),
                &format!(
                    "node: n1\nworkloads:\n- {{name: a, namespace: ns, serviceAccount: sa, ip: {ip}, node: n2}}\n"
                ),
            )
            .unwrap()
        };
        let store = Store::new(
            config("10.0.0.1"),
            TempCa::new().trust_bundle(),
            Policies::default(),
        );
        let reader = store.subscribe();
        let a = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(store.current().workload_by_ip(a).unwrap().name, "a");
        store.publish(config("10.0.0.2"));
        assert!(reader.borrow().workload_by_ip(a).is_none());
        assert!(
            reader
                .borrow()
                .workload_by_ip(Ipv4Addr::new(10, 0, 0, 2))
                .is_some()
        );
    }
}

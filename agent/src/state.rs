//! The agent's view of the mesh: one immutable snapshot at a time, published
//! by whoever learns about workloads (the config file today, Kubernetes
//! discovery later) or roots (the trust bundle file), and read by the proxy
//! and the eBPF loader.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use tokio::sync::watch;

use crate::{
    config::{Config, Workload},
    tls::TrustBundle,
};

#[derive(Debug)]
pub struct Snapshot {
    config: Config,
    by_ip: HashMap<Ipv4Addr, usize>,
    /// The roots peers' certificates must chain to.
    trust: Arc<TrustBundle>,
}

impl Snapshot {
    fn new(config: Config, trust: Arc<TrustBundle>) -> Self {
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
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current trust bundle; a new `Arc` whenever it changes.
    pub fn trust(&self) -> &Arc<TrustBundle> {
        &self.trust
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
    pub fn new(config: Config, trust: TrustBundle) -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::new(config, Arc::new(trust))));
        Self { tx }
    }

    /// A new config; the trust bundle stays.
    pub fn publish(&self, config: Config) {
        let trust = self.current().trust.clone();
        self.tx.send_replace(Arc::new(Snapshot::new(config, trust)));
    }

    /// A new trust bundle; the config stays.
    pub fn publish_trust(&self, trust: TrustBundle) {
        let config = self.current().config.clone();
        self.tx
            .send_replace(Arc::new(Snapshot::new(config, Arc::new(trust))));
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
        let store = Store::new(config("10.0.0.1"), TempCa::new().trust_bundle());
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

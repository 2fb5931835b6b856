//! Workloads: the pods of the mesh, on any node.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
};

use warren_pki::identity::SpiffeId;

/// Pod labels, as policy selectors match them.
pub type Labels = BTreeMap<String, String>;

/// A pod of the mesh: it speaks HBONE, under its own identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// Pod name, unique within its namespace.
    pub name: String,
    pub namespace: String,
    /// What Istio calls the pod's workload: the Deployment (or other
    /// owner) it belongs to, else the pod itself. Metrics are labelled by
    /// it, so that a workload's pods add up.
    pub workload_name: String,
    pub service_account: String,
    pub identity: SpiffeId,
    pub ip: Ipv4Addr,
    pub node: String,
    /// The pod's labels, which policy selectors match.
    pub labels: Labels,
    /// Present exactly for the workloads on this agent's node: how to find
    /// the pod to enroll it.
    pub local: Option<LocalPod>,
    /// Ports that plaintext from this node may reach whatever the pod's mTLS
    /// mode (the kubelet's probes).
    pub probe_ports: BTreeSet<u16>,
}

/// Where a pod on this node lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LocalPod {
    /// Given by the config file.
    Paths {
        /// Network namespace file, e.g. `/run/netns/<name>`.
        netns: PathBuf,
        /// The pod's cgroup v2 directory.
        cgroup: PathBuf,
    },
    /// A kubelet's pod: its cgroup is found from its UID, its network
    /// namespace from a process in that cgroup (see [`crate::sandbox`]), or
    /// given by the container runtime through the CNI plugin (`netns`).
    Kubelet {
        uid: String,
        /// The sandbox's namespace file as the runtime reported it.
        netns: Option<PathBuf>,
    },
}

impl Workload {
    /// `namespace/name`, how operators refer to a pod.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The canonical service, as Istio names it: the
    /// `service.istio.io/canonical-name` label, else the
    /// `app.kubernetes.io/name` or `app` label, else the workload name.
    pub fn canonical_service(&self) -> &str {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|key| self.labels.get(*key))
        .map_or(&self.workload_name, |v| v)
    }

    /// The canonical revision, as Istio names it: the
    /// `service.istio.io/canonical-revision` label, else the
    /// `app.kubernetes.io/version` or `version` label, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|key| self.labels.get(*key))
        .map_or("latest", |v| v)
    }

    /// Whether `other` is the same pod in the same place, so that it needs
    /// no re-enrollment: only what policy reads (labels) or the probe ports
    /// may differ.
    pub fn same_pod(&self, other: &Workload) -> bool {
        self.name == other.name
            && self.namespace == other.namespace
            && self.identity == other.identity
            && self.ip == other.ip
            && self.node == other.node
            && self.local == other.local
    }
}

/// Every workload of the mesh, by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workloads {
    by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    /// Addresses several pods claim, none believed: connections to them
    /// are refused (neither identity can be expected, and plaintext would
    /// leak).
    conflicted: BTreeSet<Ipv4Addr>,
}

impl Workloads {
    /// Addresses must be unique: the sources resolve clashes before (a later
    /// workload with the same address replaces an earlier one here).
    pub fn new(workloads: impl IntoIterator<Item = Workload>) -> Self {
        Self {
            by_ip: workloads.into_iter().map(|w| (w.ip, Arc::new(w))).collect(),
            conflicted: BTreeSet::new(),
        }
    }

    /// With `ips` marked as claimed by several pods.
    pub fn with_conflicts(mut self, ips: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        self.conflicted.extend(ips);
        self
    }

    pub fn is_conflicted(&self, ip: Ipv4Addr) -> bool {
        self.conflicted.contains(&ip)
    }

    pub fn conflicts(&self) -> impl Iterator<Item = &Ipv4Addr> {
        self.conflicted.iter()
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// Every workload, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_ip.values()
    }

    /// The workloads of this node, which the agent enrolls.
    pub fn local(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_ip.values().filter(|w| w.local.is_some())
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

#[cfg(test)]
impl Workload {
    /// A pod of the workload `sa` (named after its service account) in
    /// `namespace`, at `ip`, on another node.
    pub(crate) fn for_tests(
        namespace: &str,
        sa: &str,
        ip: [u8; 4],
        labels: &[(&str, &str)],
    ) -> Self {
        Workload {
            name: format!("{sa}-5d4f8b7c9-x2x7q"),
            namespace: namespace.into(),
            workload_name: sa.into(),
            service_account: sa.into(),
            identity: format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}")
                .parse()
                .expect("a valid SPIFFE ID"),
            ip: ip.into(),
            node: "node-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            local: None,
            probe_ports: BTreeSet::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(labels: &[(&str, &str)]) -> Workload {
        Workload::for_tests("shop", "web", [10, 244, 1, 2], labels)
    }

    #[test]
    fn canonical_service_and_revision_follow_istios_labels_in_order() {
        let bare = workload(&[]);
        assert_eq!(
            (bare.canonical_service(), bare.canonical_revision()),
            ("web", "latest")
        );
        let app = workload(&[("app", "shop-web"), ("version", "v2")]);
        assert_eq!(
            (app.canonical_service(), app.canonical_revision()),
            ("shop-web", "v2")
        );
        let recommended = workload(&[
            ("app", "shop-web"),
            ("app.kubernetes.io/name", "web-ui"),
            ("version", "v2"),
            ("app.kubernetes.io/version", "2.1"),
        ]);
        assert_eq!(
            (
                recommended.canonical_service(),
                recommended.canonical_revision()
            ),
            ("web-ui", "2.1")
        );
        let istio = workload(&[
            ("app", "shop-web"),
            ("service.istio.io/canonical-name", "storefront"),
            ("version", "v2"),
            ("service.istio.io/canonical-revision", "canary"),
        ]);
        assert_eq!(
            (istio.canonical_service(), istio.canonical_revision()),
            ("storefront", "canary")
        );
    }
}

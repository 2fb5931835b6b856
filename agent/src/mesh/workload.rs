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

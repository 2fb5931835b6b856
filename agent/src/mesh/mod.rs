//! The mesh as the agent knows it: workloads, services, security policies
//! and the roots to trust, one immutable [`Snapshot`] at a time.
//!
//! This is the middle of the agent's dependency graph. Sources feed it (the
//! config file in [`crate::config`], the API server in [`crate::kubernetes`],
//! the trust bundle file); consumers read it (the proxies, the reconciler of
//! enrolled pods, the kernel loader's modes). It depends on neither.

pub mod policy;
mod service;
mod store;
mod workload;

pub use policy::Policies;

/// The cluster the mesh is in, as Istio's metrics and Services' names
/// refer to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Istio's cluster ID (`Kubernetes` unless set otherwise).
    pub id: String,
    /// The cluster's DNS domain.
    pub domain: String,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            id: "Kubernetes".into(),
            domain: "cluster.local".into(),
        }
    }
}
pub use service::{ServicePort, Services};
pub use store::{Snapshot, Store};
pub use workload::{Labels, LocalPod, Workload, Workloads};

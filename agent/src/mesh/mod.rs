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
pub use service::{ServicePort, Services};
pub use store::{Snapshot, Store};
pub use workload::{Labels, LocalPod, Workload, Workloads};

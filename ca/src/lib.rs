//! warren's mesh CA (`warren-ca`): signs workload certificates, over Istio's
//! certificate API, for the nodes that run those workloads. The signing core,
//! the API and the transport are `warren-pki`'s, shared with the agent; this
//! crate is the service around them and what it learns the mesh from.

pub mod kubernetes;
pub mod metrics;
pub mod service;
pub mod workloads;

#[cfg(test)]
mod service_tests;

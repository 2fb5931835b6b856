//! End-to-end test support for warren: a Kubernetes-like lab topology built from network
//! namespaces, veths and cgroups (`lab`), the `labpod` TCP tool that runs inside its pods,
//! and `harness`, which runs agents, servers and clients in a lab.

pub mod harness;
pub mod lab;

pub use lab::{Lab, LabSpec, Node, Pod, build_labpod};

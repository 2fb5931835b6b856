//! End-to-end test support for warren: a Kubernetes-like lab topology built from network
//! namespaces, veths and cgroups (`lab`), the `labpod` TCP tool that runs inside its pods,
//! `harness`, which runs agents, servers and clients in a lab, and a real Kubernetes
//! control plane (`controlplane`) whose Pods the lab realizes (`kubelet`), and readers of
//! what the agents expose (`telemetry`: metrics scraped and parsed, the admin endpoint).

pub mod audit;
pub mod cluster;
pub mod cni;
pub mod controlplane;
pub mod harness;
pub mod kubelet;
pub mod lab;
pub mod telemetry;

pub use lab::{Lab, LabSpec, Node, Pod, build_labpod};

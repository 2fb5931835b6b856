//! warren's node agent. See ARCHITECTURE.md for the data path and how these
//! modules fit together. Identities, certificates and the CA's API are
//! `warren-pki`'s, shared with the CA (`warren-ca`).

pub mod admin;
pub mod ca;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod fastpath;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hbone;
pub mod kubernetes;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod node_route;
pub mod pod;
pub mod proxy;
pub mod reconcile;
pub mod redirect;
pub mod renewal;
pub mod sandbox;
pub mod time;
pub mod tls;

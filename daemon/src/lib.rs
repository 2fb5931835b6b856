//! The plumbing both of warren's daemons run on (the node agent `warren`
//! and the mesh CA `warren-ca`), kept apart from their jobs:
//!
//! - [`logging`]: log setup (text or JSON) and error chains in one line.
//! - [`watch`]: noticing that a file was replaced (config, trust bundle,
//!   a kubelet-projected volume).
//! - [`http`]: the small HTTP server under the local endpoints (bounded).
//! - [`health`]: the readiness and liveness endpoints the kubelet probes.
//! - [`metrics`]: the Prometheus endpoint (`/metrics`, `/stats/prometheus`).
//! - [`kubernetes`]: a client for the API server, and RBAC refusals told
//!   from outages.
//! - [`limits`]: the process's own (open files), and connections per
//!   client address.

pub mod health;
pub mod http;
pub mod kubernetes;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod watch;

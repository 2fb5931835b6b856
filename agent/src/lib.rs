//! warren's node agent. See ARCHITECTURE.md for the data path and how these
//! modules fit together.

pub mod agent;
pub mod ca;
pub mod config;
pub mod files;
pub mod hbone;
pub mod identity;
pub mod logging;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod renewal;
pub mod state;
pub mod tls;
pub mod watch;

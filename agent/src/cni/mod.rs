//! The agent's side of the CNI plugin (`warren-cni`): a Unix socket on
//! which the plugin, run by the container runtime for each new sandbox,
//! asks the agent to enroll the pod, and waits until it is captured.
//!
//! ```text
//!  warren-cni ADD ─► server: in the mesh? ─ no ──────────────► "not-in-mesh"
//!                            │ yes (labels, from the source)
//!                            ▼
//!                   the source learns the sandbox (netns, address) ─► mesh snapshot
//!                            ─► daemon's reconciler enrolls it ─► States ─► "enrolled"
//! ```
//!
//! The runtime's report goes through the mesh model like any other fact, so
//! the reconciler enrolls, refreshes and withdraws these pods as it does
//! every other; the server only waits for the outcome. Nothing here trusts
//! the report beyond enrolling the pod it names where the runtime says:
//! the socket is root's, and enrollment checks the namespace file holds the
//! address.

pub mod install;
mod server;

use std::path::Path;

pub use server::{Directory, prepare_dir, serve};

/// Whether a pod the runtime names is in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    InMesh,
    NotInMesh,
    /// The source does not know the pod (yet): not listed, another UID,
    /// or not on this node as far as it knows.
    Unknown,
}

/// Writes `value` at `path` as JSON, replaced whole as the installer writes
/// the CNI config (a reader never sees half a file), root's alone: the
/// membership the plugin reads, the sandboxes the runtime reported.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value)?;
    bytes.push(b'\n');
    // The whole chain in the message: callers show io errors plainly.
    install::write_atomic(path, &bytes, 0o600, None)
        .map(drop)
        .map_err(|e| std::io::Error::other(warren_daemon::logging::Chain(&e).to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_write_says_why_with_the_systems_own_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone/membership.json");
        let error = super::write_json(&path, &serde_json::json!({})).unwrap_err();
        let said = error.to_string();
        assert!(said.contains("membership.json"), "{said}");
        assert!(said.contains("No such file or directory"), "{said}");
    }
}

//! The process's own limits.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Lifts the soft limit on open files to the hard one, and says so when it
/// cannot: each daemon holds a socket per client (the CA) or two per proxied
/// connection and listeners for every pod (the agent), and a container
/// runtime's soft default (often 1024) is too few for a busy node or CA.
pub fn raise_open_files() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(error) => tracing::warn!(%error, soft, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
    }
}

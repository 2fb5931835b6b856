//! Limits: the process's own (open files), and a listener's share per
//! client address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Lifts the soft limit on open files to the hard one, and says so when it
/// cannot: each daemon holds a socket per client (the CA) or two per proxied
/// connection and listeners for every pod (the agent), and a container
/// runtime's soft default (often 1024) is too few for a busy node or CA.
pub fn raise_open_files() {
    match try_raise_open_files() {
        Ok(Some((from, to))) => tracing::debug!(from, to, "raised the open files limit"),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
}

/// Lifts the soft limit on open files to the hard one: the limits it was
/// raised from and to, none if it already was there.
pub fn try_raise_open_files() -> Result<Option<(u64, u64)>, OpenFilesError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(OpenFilesError::Read)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|source| OpenFilesError::Raise {
        soft,
        hard,
        source,
    })?;
    Ok(Some((soft, hard)))
}

#[derive(Debug, thiserror::Error)]
pub enum OpenFilesError {
    #[error("reading the open files limit: {0}")]
    Read(nix::Error),
    #[error("raising the open files limit from {soft} to {hard}: {source}")]
    Raise {
        soft: u64,
        hard: u64,
        source: nix::Error,
    },
}

/// Connections counted by source address, so that no one address takes all
/// that a listener allows. Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct PerAddress {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

impl PerAddress {
    /// At most `limit` connections from one address at a time.
    pub fn new(limit: usize) -> Self {
        Self {
            counts: Arc::default(),
            limit,
        }
    }

    /// A place for one more connection from `addr`, held until the slot is
    /// dropped; None if `addr` has its share already.
    pub fn take(&self, addr: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(addr).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.counts.clone(),
            addr,
        })
    }
}

/// One connection's place under a [`PerAddress`] limit, given back on drop.
pub struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    addr: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PerAddress, try_raise_open_files};

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one_once() {
        try_raise_open_files().unwrap();
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(try_raise_open_files().unwrap(), None, "already there");
    }

    #[test]
    fn each_address_gets_its_share_back_when_its_connections_end() {
        let limit = PerAddress::new(2);
        let a = "10.0.0.1".parse().unwrap();
        let b = "10.0.0.2".parse().unwrap();
        let first = limit.take(a).unwrap();
        let _second = limit.take(a).unwrap();
        assert!(limit.take(a).is_none());
        assert!(limit.take(b).is_some(), "another address has its own share");
        drop(first);
        assert!(limit.take(a).is_some());
    }
}

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
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(error) => tracing::warn!(%error, soft, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
    }
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
    use super::PerAddress;

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

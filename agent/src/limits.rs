//! What one pod, one peer and the whole node may hold in the agent.
//!
//! Every connection the agent relays holds file descriptors and memory that
//! all pods of the node share. A budget counts descriptors: a captured
//! connection tunnelled over HBONE holds one (the client's socket), a pooled
//! tunnel one, a passthrough or a plaintext inbound connection two, an HBONE
//! connection accepted for a pod one, and each stream it delivers one (its
//! socket to the application). Each is charged to its pod, one way
//! (outbound: what the pod opens; inbound: what it is sent), to the node,
//! and, for what arrives over HBONE, to the peer that sent it (its
//! namespace), both at the pod (at most half the pod's inbound budget) and
//! across the node; and given back when it ends. Over any limit the
//! connection is refused at once (a reset, or a 503 for a stream): a pod
//! that sprays connections, or a peer that opens streams by the thousand,
//! meets its own limit while every other pod, and the pod's other peers,
//! keep their share.
//!
//! The node's limit leaves room under the process's open-files limit for
//! what is not a connection (listeners, tunnels, the API server's watches,
//! files being reloaded), so that the agent never reaches `EMFILE` itself.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use warren_pki::identity::SpiffeId;

/// Descriptors per pod unless the config says otherwise, and at most a
/// quarter of the node's.
pub const DEFAULT_PER_POD: usize = 16_384;
/// Streams one peer identity may hold across the node's pods.
pub const DEFAULT_PER_PEER: usize = 16_384;
/// Descriptors kept out of the node's budget, for what is not a connection.
pub const RESERVED: usize = 1_024;
/// How long the streams of a peer that is no longer trusted (its
/// certificate expired, its root removed) may go on before they are cut.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// The limits in force, as configured or derived from the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_pod: usize,
    pub per_peer: usize,
    pub per_node: usize,
    pub drain: Duration,
}

impl Limits {
    /// Fills in what the config leaves out (`None`): the node's budget from
    /// `open_files` (the process's limit, raised to its hard limit at start),
    /// the pod's and the peer's from the node's.
    pub fn resolve(
        per_pod: Option<usize>,
        per_peer: Option<usize>,
        per_node: Option<usize>,
        drain: Option<Duration>,
        open_files: u64,
    ) -> Self {
        let open_files = usize::try_from(open_files).unwrap_or(usize::MAX);
        let per_node =
            per_node.unwrap_or_else(|| open_files.saturating_sub(RESERVED).max(open_files / 2));
        let share = (per_node / 4).max(1);
        Self {
            per_pod: per_pod.unwrap_or(DEFAULT_PER_POD.min(share)),
            per_peer: per_peer.unwrap_or(DEFAULT_PER_PEER.min(share)),
            per_node,
            drain: drain.unwrap_or(DEFAULT_DRAIN),
        }
    }
}

/// Whose limit a connection would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    #[error(
        "the pod holds its limit of {limit} descriptors in the agent for its {direction} connections"
    )]
    Pod { direction: Direction, limit: usize },
    #[error("the peer's namespace holds its limit of {limit} streams on this node")]
    Peer { limit: usize },
    #[error("the peer's namespace holds its limit of {limit} streams to this pod")]
    PeerAtPod { limit: usize },
    #[error("the agent holds the node's limit of {limit} descriptors")]
    Node { limit: usize },
}

impl OverLimit {
    /// For logs and metrics: `pod`, `peer`, `peer_at_pod` or `node`.
    pub fn scope(self) -> &'static str {
        match self {
            OverLimit::Pod { .. } => "pod",
            OverLimit::Peer { .. } => "peer",
            OverLimit::PeerAtPod { .. } => "peer_at_pod",
            OverLimit::Node { .. } => "node",
        }
    }
}

/// Which of a pod's two budgets a connection is charged to: what it opens
/// (captured) and what it is sent (HBONE, plaintext). Apart, so that peers
/// flooding a pod do not take from what the pod may open, nor the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

/// A peer as the limits count it: the namespace of its identity, in its
/// trust domain. Service accounts cost a tenant nothing to make;
/// namespaces are what a cluster hands out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer(Arc<str>);

impl Peer {
    pub fn of(identity: &SpiffeId) -> Self {
        Self(format!("{}/ns/{}", identity.trust_domain(), identity.namespace()).into())
    }
}

/// Counts per peer under a mutex, each up to a limit; an entry goes when
/// its count is back to zero.
#[derive(Default)]
struct PerPeer(Mutex<HashMap<Peer, usize>>);

impl PerPeer {
    fn take(&self, peer: &Peer, n: usize, limit: usize) -> Result<(), ()> {
        let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = peers.get(peer).copied().unwrap_or(0);
        if held + n > limit {
            return Err(());
        }
        peers.insert(peer.clone(), held + n);
        Ok(())
    }

    fn give(&self, peer: &Peer, n: usize) {
        let mut peers = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = peers.get_mut(peer) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                peers.remove(peer);
            }
        }
    }
}

/// The node's budget, shared by its pods' budgets.
pub struct NodeBudget {
    limits: Limits,
    used: AtomicUsize,
    peers: PerPeer,
}

impl NodeBudget {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            used: AtomicUsize::new(0),
            peers: PerPeer::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Descriptors held for connections, on all pods.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// A budget for one pod, out of this node's.
    pub fn pod(self: &Arc<Self>) -> Arc<PodBudget> {
        Arc::new(PodBudget {
            node: self.clone(),
            outbound: AtomicUsize::new(0),
            inbound: AtomicUsize::new(0),
            peers: PerPeer::default(),
            refusals: Throttle::default(),
        })
    }
}

/// One pod's budget.
pub struct PodBudget {
    node: Arc<NodeBudget>,
    outbound: AtomicUsize,
    inbound: AtomicUsize,
    /// What each peer holds of `inbound`.
    peers: PerPeer,
    /// Refusals are logged once in a while, not one line each: a pod over
    /// its limit is usually a pod trying thousands of connections.
    pub refusals: Throttle,
}

impl PodBudget {
    pub fn limits(&self) -> Limits {
        self.node.limits
    }

    /// Descriptors held for this pod's connections one way.
    pub fn used(&self, direction: Direction) -> usize {
        self.counter(direction).load(Ordering::Acquire)
    }

    /// The most one peer may hold of the pod's inbound budget: half, so
    /// that it cannot take it all.
    pub fn per_peer_at_pod(&self) -> usize {
        (self.node.limits.per_pod / 2).max(1)
    }

    /// Room for `n` more descriptors for this pod's connections one way,
    /// held until the permit is dropped.
    pub fn admit(self: &Arc<Self>, direction: Direction, n: usize) -> Result<Permit, OverLimit> {
        self.take(direction, n)?;
        Ok(Permit {
            pod: self.clone(),
            direction,
            peer: None,
            held: n,
        })
    }

    /// As [`admit`](Self::admit) inbound, for something `peer` sent: charged
    /// to it too, here and node-wide.
    pub fn admit_from(self: &Arc<Self>, peer: &Peer, n: usize) -> Result<Permit, OverLimit> {
        let mut permit = self.admit(Direction::Inbound, n)?;
        self.take_peer(peer, n)?;
        permit.peer = Some(peer.clone());
        Ok(permit)
    }

    fn counter(&self, direction: Direction) -> &AtomicUsize {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    fn take(&self, direction: Direction, n: usize) -> Result<(), OverLimit> {
        let limits = self.node.limits;
        let counter = self.counter(direction);
        take(counter, n, limits.per_pod).map_err(|()| OverLimit::Pod {
            direction,
            limit: limits.per_pod,
        })?;
        take(&self.node.used, n, limits.per_node).map_err(|()| {
            counter.fetch_sub(n, Ordering::AcqRel);
            OverLimit::Node {
                limit: limits.per_node,
            }
        })
    }

    fn give(&self, direction: Direction, n: usize) {
        self.counter(direction).fetch_sub(n, Ordering::AcqRel);
        self.node.used.fetch_sub(n, Ordering::AcqRel);
    }

    fn take_peer(&self, peer: &Peer, n: usize) -> Result<(), OverLimit> {
        let per_peer = self.node.limits.per_peer;
        self.node
            .peers
            .take(peer, n, per_peer)
            .map_err(|()| OverLimit::Peer { limit: per_peer })?;
        let at_pod = self.per_peer_at_pod();
        self.peers.take(peer, n, at_pod).map_err(|()| {
            self.node.peers.give(peer, n);
            OverLimit::PeerAtPod { limit: at_pod }
        })
    }

    fn give_peer(&self, peer: &Peer, n: usize) {
        self.node.peers.give(peer, n);
        self.peers.give(peer, n);
    }
}

/// Adds `n` to `counter` unless that would take it over `limit`.
fn take(counter: &AtomicUsize, n: usize, limit: usize) -> Result<(), ()> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            (used + n <= limit).then_some(used + n)
        })
        .map(drop)
        .map_err(drop)
}

/// Descriptors held for one connection; given back when dropped. A permit
/// whose peer is refused gives back what it held.
pub struct Permit {
    pod: Arc<PodBudget>,
    direction: Direction,
    peer: Option<Peer>,
    held: usize,
}

impl Permit {
    /// One more descriptor for the same connection (its second socket).
    pub fn grow(&mut self) -> Result<(), OverLimit> {
        self.pod.take(self.direction, 1)?;
        if let Some(peer) = &self.peer
            && let Err(over) = self.pod.take_peer(peer, 1)
        {
            self.pod.give(self.direction, 1);
            return Err(over);
        }
        self.held += 1;
        Ok(())
    }

    /// Grows the permit to hold `n` descriptors, if it holds fewer.
    pub fn hold(&mut self, n: usize) -> Result<(), OverLimit> {
        while self.held < n {
            self.grow()?;
        }
        Ok(())
    }

    /// Charges what this permit holds to `peer` as well, now that it is
    /// known (an HBONE connection, once its client has authenticated).
    pub fn charge_peer(&mut self, peer: &Peer) -> Result<(), OverLimit> {
        if self.peer.is_none() {
            self.pod.take_peer(peer, self.held)?;
            self.peer = Some(peer.clone());
        }
        Ok(())
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("direction", &self.direction)
            .field("peer", &self.peer)
            .field("held", &self.held)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pod.give(self.direction, self.held);
        if let Some(peer) = &self.peer {
            self.pod.give_peer(peer, self.held);
        }
    }
}

/// Says when to log the next of a run of like events: the first at once,
/// then at most one line per [`Throttle::PERIOD`], with how many were not
/// logged in between.
#[derive(Default)]
pub struct Throttle {
    unlogged: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    pub const PERIOD: Duration = Duration::from_secs(10);

    /// `Some(n)`: log this one, saying that `n` more happened since the last
    /// line; `None`: count it and stay quiet.
    pub fn tick(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < Self::PERIOD) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(per_pod: usize, per_peer: usize, per_node: usize) -> Arc<NodeBudget> {
        NodeBudget::new(Limits {
            per_pod,
            per_peer,
            per_node,
            drain: DEFAULT_DRAIN,
        })
    }

    fn peer(text: &str) -> Peer {
        Peer::of(&text.parse().unwrap())
    }

    use Direction::{Inbound, Outbound};

    #[test]
    fn a_pod_over_its_limit_is_refused_and_its_neighbour_is_not() {
        let node = node(3, 100, 10);
        let (greedy, neighbour) = (node.pod(), node.pod());
        let held: Vec<Permit> = (0..3).map(|_| greedy.admit(Outbound, 1).unwrap()).collect();
        assert_eq!(
            greedy.admit(Outbound, 1).err(),
            Some(OverLimit::Pod {
                direction: Outbound,
                limit: 3
            })
        );
        assert!(neighbour.admit(Outbound, 2).is_ok());
        assert_eq!(node.used(), 3, "the neighbour's permit was dropped");
        drop(held);
        assert_eq!((greedy.used(Outbound), node.used()), (0, 0));
        assert!(
            greedy.admit(Outbound, 3).is_ok(),
            "given back when the connections end"
        );
    }

    #[test]
    fn what_a_pod_is_sent_does_not_take_from_what_it_may_open() {
        let node = node(2, 100, 10);
        let pod = node.pod();
        let _flooded = pod.admit(Inbound, 2).unwrap();
        assert!(pod.admit(Inbound, 1).is_err());
        assert!(pod.admit(Outbound, 2).is_ok());
    }

    #[test]
    fn the_node_limit_holds_across_pods() {
        let node = node(4, 100, 6);
        let (a, b) = (node.pod(), node.pod());
        let _a = a.admit(Outbound, 4).unwrap();
        let _b = b.admit(Outbound, 2).unwrap();
        assert_eq!(
            b.admit(Inbound, 1).err(),
            Some(OverLimit::Node { limit: 6 })
        );
        assert_eq!(b.used(Inbound), 0, "a refusal takes nothing");
    }

    #[test]
    fn a_peer_namespace_is_bounded_at_each_pod_and_across_the_node() {
        let node = node(8, 6, 100);
        let (a, b, c) = (node.pod(), node.pod(), node.pod());
        // Two service accounts of one namespace count as one peer.
        let (evil, evil2) = (
            peer("spiffe://cluster.local/ns/evil/sa/default"),
            peer("spiffe://cluster.local/ns/evil/sa/other"),
        );
        assert_eq!(evil, evil2);
        let other = peer("spiffe://cluster.local/ns/shop/sa/web");
        // Half a pod's inbound budget at most...
        let _at_a = a.admit_from(&evil, 4).unwrap();
        assert_eq!(
            a.admit_from(&evil2, 1).err(),
            Some(OverLimit::PeerAtPod { limit: 4 })
        );
        assert_eq!(a.used(Inbound), 4, "the pod's share was given back");
        assert!(
            a.admit_from(&other, 4).is_ok(),
            "the other half is for others"
        );
        // ...and its limit across the node's pods.
        let _at_b = b.admit_from(&evil, 2).unwrap();
        assert_eq!(
            c.admit_from(&evil, 1).err(),
            Some(OverLimit::Peer { limit: 6 })
        );
    }

    #[test]
    fn a_permit_grows_for_a_second_socket_and_takes_its_peer_later() {
        let node = node(4, 100, 100);
        let pod = node.pod();
        let mut permit = pod.admit(Outbound, 1).unwrap();
        permit.grow().unwrap();
        assert_eq!(pod.used(Outbound), 2);
        drop(permit);
        assert_eq!(pod.used(Outbound), 0);

        let web = peer("spiffe://cluster.local/ns/shop/sa/web");
        let mut connection = pod.admit(Inbound, 1).unwrap();
        connection.charge_peer(&web).unwrap();
        let _stream = pod.admit_from(&web, 1).unwrap();
        assert_eq!(
            pod.admit_from(&web, 1).err(),
            Some(OverLimit::PeerAtPod { limit: 2 }),
            "the connection counts for its peer"
        );
        drop(connection);
        assert!(pod.admit_from(&web, 1).is_ok());
    }

    #[test]
    fn limits_follow_the_open_files_limit_unless_configured() {
        let derived = Limits::resolve(None, None, None, None, 20_000);
        assert_eq!(derived.per_node, 18_976);
        assert_eq!(derived.per_pod, 18_976 / 4, "a quarter of the node's");
        let big = Limits::resolve(None, None, None, None, 1 << 20);
        assert_eq!(big.per_pod, DEFAULT_PER_POD);
        assert_eq!(
            Limits::resolve(Some(100), Some(50), Some(1000), None, 20_000),
            Limits {
                per_pod: 100,
                per_peer: 50,
                per_node: 1000,
                drain: DEFAULT_DRAIN,
            }
        );
    }

    #[test]
    fn refusals_are_logged_once_a_period_with_a_count() {
        let throttle = Throttle::default();
        assert_eq!(throttle.tick(), Some(0));
        assert_eq!(throttle.tick(), None);
        assert_eq!(throttle.tick(), None);
        *throttle.last.lock().unwrap() = Some(Instant::now() - Throttle::PERIOD);
        assert_eq!(throttle.tick(), Some(2));
    }
}

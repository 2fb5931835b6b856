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
//! meets its own limit.
//!
//! Several of them together could still take the whole node's budget, and
//! then every pod would be refused. So each pod has a reserve each way that
//! no other pod can take: set aside in the node's budget when the pod's is
//! made, and given back when the pod is withdrawn. Nothing is held beyond a
//! reserve while that would leave less than the reserves free, so however
//! busy its neighbours, a pod can always hold its reserve. A pod that comes
//! while the others hold all the rest is owed its reserve, and what they
//! let go pays it before they may take more. Reserves together take at
//! most half of the node's budget (a node with more pods than that allows
//! gives its last ones less). Within a pod, its reserve is its peers' as
//! the rest of its inbound budget is (one peer namespace at most half).
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

use crate::config::LimitSettings;

/// Descriptors per pod unless the config says otherwise, and at most a
/// quarter of the node's.
pub const DEFAULT_PER_POD: usize = 16_384;
/// Streams one peer identity may hold across the node's pods.
pub const DEFAULT_PER_PEER: usize = 16_384;
/// Descriptors kept out of the node's budget, for what is not a connection.
pub const RESERVED: usize = 1_024;
/// Descriptors each pod keeps for itself each way unless the config says
/// otherwise: room for a pod's ordinary traffic (its HTTP clients' pools,
/// its database connections) whatever its neighbours do.
pub const DEFAULT_RESERVE: usize = 256;
/// How long the streams of a peer that is no longer trusted (its
/// certificate expired, its root removed) may go on before they are cut.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// The limits in force, as configured or derived from the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_pod: usize,
    pub per_peer: usize,
    pub per_node: usize,
    /// What each pod keeps for itself each way (at most `per_pod`).
    pub reserve: usize,
    pub drain: Duration,
}

impl Limits {
    /// Fills in what the config leaves out (`None`): the node's budget from
    /// `open_files` (the process's limit, raised to its hard limit at start),
    /// the pod's and the peer's from the node's.
    pub fn resolve(configured: &LimitSettings, open_files: u64) -> Self {
        let open_files = usize::try_from(open_files).unwrap_or(usize::MAX);
        let per_node = configured
            .connections_per_node
            .unwrap_or_else(|| open_files.saturating_sub(RESERVED).max(open_files / 2));
        let share = (per_node / 4).max(1);
        let per_pod = configured
            .connections_per_pod
            .unwrap_or(DEFAULT_PER_POD.min(share));
        Self {
            per_pod,
            per_peer: configured
                .streams_per_peer_namespace
                .unwrap_or(DEFAULT_PER_PEER.min(share)),
            per_node,
            reserve: configured
                .reserved_per_pod
                .unwrap_or(DEFAULT_RESERVE)
                .min(per_pod),
            drain: configured.drain_deadline.unwrap_or(DEFAULT_DRAIN),
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
    /// Descriptors held for connections, all pods (`within + beyond`, read
    /// without the lock for reports).
    used: AtomicUsize,
    shared: Mutex<Shared>,
    peers: PerPeer,
}

/// The node's limit, as its pods take it. `paid + beyond <= per_node`
/// always, and pods hold at most their reserves within them (`within <=
/// paid`): so every pod can take what is paid of its reserve, and the node
/// never holds more than `per_node`. Nothing more is taken beyond a reserve
/// while `paid + owed + beyond` would pass `per_node`: what pods let go
/// pays the reserves still owed first.
#[derive(Debug, Default)]
struct Shared {
    /// The reserves set aside, both ways, of all pods.
    paid: usize,
    /// The reserves promised but not set aside yet (a pod that came while
    /// the others held all the rest).
    owed: usize,
    /// What pods hold within their reserves.
    within: usize,
    /// What pods hold beyond their reserves.
    beyond: usize,
}

impl NodeBudget {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            used: AtomicUsize::new(0),
            shared: Mutex::new(Shared::default()),
            peers: PerPeer::default(),
        })
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `within` descriptors of a pod's (paid) reserve and `beyond`
    /// more.
    fn take(&self, within: usize, beyond: usize) -> Result<(), OverLimit> {
        let per_node = self.limits.per_node;
        let mut shared = self.shared();
        let committed = shared.paid + shared.owed + shared.beyond;
        // The second test never fails while the invariants hold: kept, as
        // the one that must never be passed.
        if (beyond > 0 && committed + beyond > per_node)
            || shared.within + shared.beyond + within + beyond > per_node
        {
            return Err(OverLimit::Node { limit: per_node });
        }
        shared.within += within;
        shared.beyond += beyond;
        self.used.fetch_add(within + beyond, Ordering::AcqRel);
        Ok(())
    }

    fn give(&self, within: usize, beyond: usize) {
        let mut shared = self.shared();
        shared.within -= within;
        shared.beyond -= beyond;
        self.used.fetch_sub(within + beyond, Ordering::AcqRel);
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Descriptors held for connections, on all pods.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Pays what it can of `held`'s owed reserve out of what is free of
    /// the reserves and of what pods hold beyond them; what the pod holds
    /// beyond its reserve then partly counts within it.
    fn pay(&self, held: &mut Held) {
        let mut shared = self.shared();
        let free = self.limits.per_node - shared.paid - shared.beyond;
        let pay = held.owed.min(free / 2);
        if pay == 0 {
            return;
        }
        for direction in [Direction::Outbound, Direction::Inbound] {
            let count = held.get(direction);
            let now_within = count.min(held.reserve + pay) - count.min(held.reserve);
            shared.beyond -= now_within;
            shared.within += now_within;
        }
        shared.paid += 2 * pay;
        shared.owed -= 2 * pay;
        held.reserve += pay;
        held.owed -= pay;
    }

    /// A budget for one pod, out of this node's, with its reserve: the
    /// configured one, or less once the reserves take half of the node's
    /// limit; set aside now as far as the node has it free, owed the rest.
    pub fn pod(self: &Arc<Self>) -> Arc<PodBudget> {
        let (reserve, owed) = {
            let mut shared = self.shared();
            let per_node = self.limits.per_node;
            let room = (per_node / 2).saturating_sub(shared.paid + shared.owed);
            let promised = self.limits.reserve.min(room / 2);
            // What is free is for the pods owed already, first.
            let spare = (per_node - shared.paid - shared.beyond).saturating_sub(shared.owed);
            let paid = promised.min(spare / 2);
            shared.paid += 2 * paid;
            shared.owed += 2 * (promised - paid);
            (paid, promised - paid)
        };
        Arc::new(PodBudget {
            node: self.clone(),
            held: Mutex::new(Held {
                reserve,
                owed,
                ..Held::default()
            }),
            peers: PerPeer::default(),
            refusals: Throttle::default(),
        })
    }
}

/// One pod's budget.
pub struct PodBudget {
    node: Arc<NodeBudget>,
    held: Mutex<Held>,
    /// What each peer holds of its inbound budget.
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
        self.held().get(direction)
    }

    /// What this pod keeps for itself each way, set aside or owed.
    pub fn reserve(&self) -> usize {
        let held = self.held();
        held.reserve + held.owed
    }

    /// What is set aside of its reserve.
    #[cfg(test)]
    fn paid(&self) -> usize {
        self.held().reserve
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
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

    /// The pod is withdrawn: its reserve goes back to the node now, not
    /// when its last connection ends (one left open would keep it set aside
    /// for good, and a pod made again and again would use up the reserves
    /// of those to come). What it still holds counts as beyond.
    pub fn retire(&self) {
        let mut held = self.held();
        let mut shared = self.node.shared();
        for direction in [Direction::Outbound, Direction::Inbound] {
            let within = held.get(direction).min(held.reserve);
            shared.within -= within;
            shared.beyond += within;
        }
        shared.paid -= 2 * held.reserve;
        shared.owed -= 2 * held.owed;
        held.reserve = 0;
        held.owed = 0;
    }

    fn take(&self, direction: Direction, n: usize) -> Result<(), OverLimit> {
        let per_pod = self.node.limits.per_pod;
        let mut held = self.held();
        let was = held.get(direction);
        if was + n > per_pod {
            return Err(OverLimit::Pod {
                direction,
                limit: per_pod,
            });
        }
        if held.owed > 0 {
            self.node.pay(&mut held);
        }
        let within = (was + n).min(held.reserve) - was.min(held.reserve);
        self.node.take(within, n - within)?;
        *held.get_mut(direction) = was + n;
        Ok(())
    }

    /// Gives back `n` of what one permit holds (never more than it took).
    fn give(&self, direction: Direction, n: usize) {
        let mut held = self.held();
        let was = held.get(direction);
        let within = was.min(held.reserve) - (was - n).min(held.reserve);
        self.node.give(within, n - within);
        *held.get_mut(direction) = was - n;
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

impl Drop for PodBudget {
    /// Its connections are gone (each permit holds its budget): its
    /// reserve, unless retired already, goes back to the node, as on
    /// withdrawal (with nothing held, there is nothing to move beyond).
    fn drop(&mut self) {
        self.retire();
    }
}

/// Descriptors a pod holds each way, and its reserve.
#[derive(Debug, Default)]
struct Held {
    outbound: usize,
    inbound: usize,
    /// What it keeps for itself each way, set aside in the node's budget
    /// (zero once retired).
    reserve: usize,
    /// What it is promised besides, set aside as others let go.
    owed: usize,
}

impl Held {
    fn get(&self, direction: Direction) -> usize {
        match direction {
            Direction::Outbound => self.outbound,
            Direction::Inbound => self.inbound,
        }
    }

    fn get_mut(&mut self, direction: Direction) -> &mut usize {
        match direction {
            Direction::Outbound => &mut self.outbound,
            Direction::Inbound => &mut self.inbound,
        }
    }
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

    /// A node whose pods have no reserve.
    fn node(per_pod: usize, per_peer: usize, per_node: usize) -> Arc<NodeBudget> {
        node_with_reserve(per_pod, per_peer, per_node, 0)
    }

    fn node_with_reserve(
        per_pod: usize,
        per_peer: usize,
        per_node: usize,
        reserve: usize,
    ) -> Arc<NodeBudget> {
        NodeBudget::new(Limits {
            per_pod,
            per_peer,
            per_node,
            reserve,
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
    fn greedy_pods_together_cannot_take_a_neighbours_reserve() {
        // Three pods reserve 2 each way: 12 of the node's 30 set aside.
        let node = node_with_reserve(20, 100, 30, 2);
        let (a, b, quiet) = (node.pod(), node.pod(), node.pod());
        let a_out = a.admit(Outbound, 14).unwrap();
        let _b = b.admit(Outbound, 8).unwrap();
        let _b_in = b.admit(Inbound, 2).unwrap();
        // a and b hold 12 and 6 beyond their reserves: with the 12 reserved,
        // the node's 30 are all spoken for.
        assert_eq!(
            a.admit(Inbound, 3).err(),
            Some(OverLimit::Node { limit: 30 }),
            "beyond its inbound reserve"
        );
        let _a_in = a.admit(Inbound, 2).expect("its own inbound reserve");
        let (_out, _in) = (
            quiet.admit(Outbound, 2).expect("the quiet pod's reserve"),
            quiet.admit(Inbound, 2).expect("both ways"),
        );
        assert_eq!(
            quiet.admit(Outbound, 1).err(),
            Some(OverLimit::Node { limit: 30 })
        );
        assert_eq!(node.used(), 30);
        drop(a_out);
        assert!(quiet.admit(Outbound, 5).is_ok(), "a let go: room again");
    }

    #[test]
    fn reserves_take_at_most_half_the_node_and_go_back_with_their_pod() {
        let node = node_with_reserve(10, 100, 20, 3);
        let first = node.pod();
        assert_eq!(first.reserve(), 3, "6 of the node's 20");
        let second = node.pod();
        assert_eq!(second.reserve(), 2, "what is left of half the node, 4");
        assert_eq!(node.pod().reserve(), 0, "half the node is reserved");
        drop(first);
        assert_eq!(node.pod().reserve(), 3, "the first pod's reserve came back");
    }

    #[test]
    fn a_pod_that_comes_to_a_full_node_is_paid_first_and_takes_no_ones_reserve() {
        let node = node_with_reserve(40, 100, 40, 3);
        let (quiet, greedy) = (node.pod(), node.pod());
        // Its outbound reserve and all not reserved: 3 + (40 - 12).
        let mut held: Vec<Permit> = (0..31)
            .map(|_| greedy.admit(Outbound, 1).unwrap())
            .collect();
        assert!(greedy.admit(Outbound, 1).is_err());
        // Another pod comes: promised its reserve, owed it for now.
        let late = node.pod();
        assert_eq!((late.reserve(), late.paid()), (3, 0));
        assert_eq!(
            late.admit(Outbound, 1).err(),
            Some(OverLimit::Node { limit: 40 })
        );
        // The 3 free are the quiet pod's inbound reserve, and stay its own.
        let _quiet = (
            quiet.admit(Outbound, 3).unwrap(),
            quiet
                .admit(Inbound, 3)
                .expect("the quiet pod's reserve, whoever came"),
        );
        // The greedy pod lets go of 6: they pay the late pod's reserve, and
        // do not go back to the greedy pod, nor to a pod that came after.
        held.truncate(25);
        assert_eq!(
            greedy.admit(Outbound, 1).err(),
            Some(OverLimit::Node { limit: 40 })
        );
        let later = node.pod();
        assert_eq!(
            (later.reserve(), later.paid()),
            (1, 0),
            "the reserves' last 2, owed behind the late pod's"
        );
        let _late = (
            late.admit(Outbound, 3).expect("its reserve, paid"),
            late.admit(Inbound, 3).expect("both ways"),
        );
        assert_eq!(late.paid(), 3);
        assert_eq!(node.used(), 6 + 25 + 6);
        assert!(
            greedy.admit(Outbound, 1).is_err(),
            "the node's all committed"
        );
        // Withdrawn while owed: what it was owed is no one's any more.
        later.retire();
        assert_eq!(later.reserve(), 0);
        drop(held);
        let _again = greedy
            .admit(Outbound, 4)
            .expect("its reserve and one beyond it, now free");
    }

    #[test]
    fn a_withdrawn_pod_gives_its_reserve_back_though_a_connection_lingers() {
        let node = node_with_reserve(20, 100, 20, 3);
        let gone = node.pod();
        let lingering = gone.admit(Outbound, 5).unwrap();
        let _second = node.pod();
        assert_eq!(node.pod().reserve(), 0, "half of the node reserved");
        gone.retire();
        assert_eq!(gone.reserve(), 0);
        let next = node.pod();
        assert_eq!(next.reserve(), 3, "the withdrawn pod's reserve, at once");
        // What lingers still counts, and goes back when it ends.
        assert_eq!(node.used(), 5);
        drop(lingering);
        assert_eq!(node.used(), 0);
        drop(gone);
        let everything: Vec<Permit> = (0..13).map(|_| next.admit(Outbound, 1).unwrap()).collect();
        assert_eq!(node.used(), 13, "3 of its reserve and the 10 not reserved");
        assert!(next.admit(Outbound, 1).is_err());
        drop(everything);
    }

    #[test]
    fn a_refusal_takes_nothing_from_pod_or_node() {
        let node = node_with_reserve(10, 100, 16, 2);
        let (a, b) = (node.pod(), node.pod());
        let _a = a.admit(Outbound, 10).unwrap();
        assert!(b.admit(Outbound, 3).is_err());
        assert_eq!((b.used(Outbound), node.used()), (0, 10));
        assert!(b.admit(Outbound, 2).is_ok(), "its reserve is still whole");
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
        let derived = Limits::resolve(&LimitSettings::default(), 20_000);
        assert_eq!(derived.per_node, 18_976);
        assert_eq!(derived.per_pod, 18_976 / 4, "a quarter of the node's");
        assert_eq!(derived.reserve, DEFAULT_RESERVE);
        let big = Limits::resolve(&LimitSettings::default(), 1 << 20);
        assert_eq!(big.per_pod, DEFAULT_PER_POD);
        let configured = LimitSettings {
            connections_per_pod: Some(100),
            streams_per_peer_namespace: Some(50),
            connections_per_node: Some(1000),
            ..LimitSettings::default()
        };
        assert_eq!(
            Limits::resolve(&configured, 20_000),
            Limits {
                per_pod: 100,
                per_peer: 50,
                per_node: 1000,
                reserve: 100,
                drain: DEFAULT_DRAIN,
            },
            "a reserve no larger than what a pod may hold"
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

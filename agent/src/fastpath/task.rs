//! The fast path's task: grants offered and taken back, the lease, the
//! kernel's events turned into authorization, metrics and access lines, and
//! connections cut.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};
use warren_common::{
    FAST_OPEN_PER_NODE, FAST_OPEN_PER_POD, FastEvent, FlowInfo, GrantKey, Tuple, fast_event,
};
use warren_daemon::logging::Chain;

use super::{
    GRANT_IDLE, Grant, Refusal, Shared,
    destroy::{self, DestroyError, Destroyer},
    endpoints, lock, monotonic_ns, payload, tcp_state,
};
use crate::{
    mesh::Snapshot,
    metrics::{
        CutReason, Metrics, gauge,
        traffic::{Connection, Outcome, Path, Reporter, ResponseFlag, Tracked},
    },
    proxy::{PodProxy, Shortcut},
    time::sleep_until,
};

/// How often the kernel's events are read: they wake nobody (a wake-up per
/// connection halved the connection rate), so metrics and access lines lag
/// connections by up to this.
const EVENT_INTERVAL: Duration = Duration::from_millis(50);
/// How often the lease is extended, and the grants checked against the
/// clock (certificates expire).
const LEASE_INTERVAL: Duration = Duration::from_secs(1);
/// How long grants hold past the last extension: an agent that stops (or
/// hangs) stops the fast path within this.
const LEASE: Duration = Duration::from_secs(3);
/// After a revocation, the kernel's records are searched once more this much
/// later: a connect() let go just before the revocation may be recorded just
/// after the first search.
const RESCAN_AFTER: Duration = Duration::from_millis(100);
/// How often the connections accounted for are checked against the kernel's
/// records: one whose close was lost (the ring was full) is closed then.
const RECONCILE_EVERY: u32 = 10;

/// A fast-path connection the agent is accounting for.
struct Open {
    source: Tracked,
    destination: Tracked,
    /// The policy that allowed it.
    policy: String,
    grant: GrantKey,
    since: Instant,
}

/// The connections accounted for, and how many each client pod has.
#[derive(Default)]
struct OpenSet {
    by_tuple: HashMap<Tuple, Open>,
    by_pod: HashMap<u64, usize>,
}

impl OpenSet {
    fn insert(&mut self, tuple: Tuple, open: Open) {
        *self.by_pod.entry(open.grant.netns_cookie).or_default() += 1;
        if let Some(replaced) = self.by_tuple.insert(tuple, open) {
            self.count_out(&replaced);
        }
    }

    fn remove(&mut self, tuple: &Tuple) -> Option<Open> {
        let open = self.by_tuple.remove(tuple)?;
        self.count_out(&open);
        Some(open)
    }

    fn count_out(&mut self, open: &Open) {
        let pod = open.grant.netns_cookie;
        if let Some(n) = self.by_pod.get_mut(&pod) {
            *n -= 1;
            if *n == 0 {
                self.by_pod.remove(&pod);
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(&Tuple, &Open) -> bool) {
        let gone: Vec<Tuple> = self
            .by_tuple
            .iter()
            .filter(|(tuple, open)| !keep(tuple, open))
            .map(|(tuple, _)| *tuple)
            .collect();
        for tuple in gone {
            self.remove(&tuple);
        }
    }
}

/// One end of a connection to cut, in its pod's namespace.
struct Socket {
    connection: Tuple,
    /// Its addresses as that end sees them.
    ends: destroy::Tuple,
    /// Whether it is the client's end (whose close the kernel reports).
    client: bool,
}

/// The fast path's work: run it with [`Task::run`].
pub struct Task {
    shared: Arc<Shared>,
    shortcuts: mpsc::Receiver<Shortcut>,
    state: watch::Receiver<Arc<Snapshot>>,
    open: OpenSet,
    /// Connections cut, and why, until their close is read.
    cut: HashMap<Tuple, String>,
    rescan_at: Option<Instant>,
    ticks: u32,
    metrics: Arc<Metrics>,
    /// The last search of the records left some without a grant though
    /// allowed (an old source's, a pod at its grants' limit, the fast path
    /// off): no revocation would find them, so a mesh change searches again.
    ungranted: bool,
}

impl Task {
    pub(super) fn new(
        shared: Arc<Shared>,
        shortcuts: mpsc::Receiver<Shortcut>,
        state: watch::Receiver<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared,
            shortcuts,
            state,
            open: OpenSet::default(),
            cut: HashMap::new(),
            rescan_at: None,
            ticks: 0,
            metrics,
            ungranted: false,
        }
    }

    pub async fn run(mut self) {
        let mut events = tokio::time::interval(EVENT_INTERVAL);
        events.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut lease = tokio::time::interval(LEASE_INTERVAL);
        lease.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        loop {
            let rescan = self.rescan_at;
            tokio::select! {
                Some(shortcut) = self.shortcuts.recv() => self.offer(shortcut),
                Ok(()) = self.state.changed() => {
                    lock(&shared.registry).refused.clear();
                    self.revalidate(self.ungranted).await;
                }
                // Pods came or went, or all were tried: records without a
                // grant may now be decidable, and a record made as a pod
                // left is searched for once more.
                () = shared.changed.notified() => {
                    self.revalidate(true).await;
                    self.rescan_at = Some(Instant::now() + RESCAN_AFTER);
                }
                _ = events.tick() => self.read_events().await,
                _ = lease.tick() => self.every_second().await,
                () = sleep_until(rescan) => {
                    self.rescan_at = None;
                    self.revalidate(true).await;
                }
            }
        }
    }

    async fn every_second(&mut self) {
        let until = if self.shared.enabled {
            monotonic_ns().saturating_add(LEASE.as_nanos() as u64)
        } else {
            0
        };
        if let Err(error) = lock(&self.shared.kernel).set_lease(until) {
            warn!(error = %Chain(&error), "cannot extend the fast path's lease: its grants lapse");
        }
        // Refusals for want of a certificate end when it comes.
        lock(&self.shared.registry).refused.clear();
        self.expire_idle_grants();
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(RECONCILE_EVERY) {
            self.reconcile_open().await;
        }
        self.revalidate(false).await;
        self.report_limits();
        let grants = lock(&self.shared.registry).grants.len();
        self.metrics.fast_path_grants.set(gauge(grants));
        self.metrics
            .fast_path_connections
            .set(gauge(self.open.by_tuple.len()));
    }

    /// Grants the pair if policy allows it.
    fn offer(&mut self, shortcut: Shortcut) {
        let key = GrantKey::new(
            shortcut.netns_cookie,
            u32::from(*shortcut.dst.ip()),
            shortcut.dst.port(),
        );
        let mut registry = lock(&self.shared.registry);
        if registry.grants.contains_key(&key) || registry.refused.contains(&key) {
            return;
        }
        if !registry.may_grant(&key) {
            return;
        }
        match registry.decide(&key) {
            Ok(policy) => {
                if let Err(error) = lock(&self.shared.kernel).grant(key) {
                    // Full: this pair keeps the agent's path.
                    debug!(dst = %shortcut.dst, error = %Chain(&error), "fast path not granted");
                    return;
                }
                debug!(dst = %shortcut.dst, %policy, "fast path granted");
                registry.grants.insert(
                    key,
                    Grant {
                        policy,
                        open: 0,
                        used: Instant::now(),
                    },
                );
            }
            Err(refusal) => {
                debug!(dst = %shortcut.dst, %refusal, "fast path not granted");
                registry.refused.insert(key);
            }
        }
    }

    /// Takes back grants nobody used for [`GRANT_IDLE`]: a pod's grants are
    /// bounded by the pairs it uses, not by every pair it ever reached.
    fn expire_idle_grants(&mut self) {
        let mut registry = lock(&self.shared.registry);
        let now = Instant::now();
        let mut kernel = lock(&self.shared.kernel);
        let idle: BTreeSet<GrantKey> = registry
            .grants
            .iter()
            .filter(|(_, grant)| grant.open == 0 && now.duration_since(grant.used) > GRANT_IDLE)
            .map(|(key, _)| *key)
            .collect();
        registry.revoke(&mut kernel, |key| idle.contains(key));
    }

    /// Decides every grant again, revoking those no longer allowed, and cuts
    /// the connections they allowed. With `search`, also checks each
    /// connection the kernel recorded without a grant in force (an earlier
    /// agent's, one let go as its grant went), which otherwise only a
    /// revocation looks for.
    async fn revalidate(&mut self, search: bool) {
        let mut doomed: Vec<(Tuple, FlowInfo, Refusal)> = Vec::new();
        let (revoked, settled) = {
            let mut registry = lock(&self.shared.registry);
            let mut revoked: BTreeMap<GrantKey, Refusal> = BTreeMap::new();
            for key in registry.grants.keys() {
                if let Err(refusal) = registry.decide(key) {
                    revoked.insert(*key, refusal);
                }
            }
            let mut kernel = lock(&self.shared.kernel);
            registry.revoke(&mut kernel, |key| revoked.contains_key(key));
            if !revoked.is_empty() || search {
                let mut ungranted = false;
                for (tuple, info) in kernel.flows() {
                    let key = GrantKey::new(info.netns_cookie, tuple.daddr, tuple.dport);
                    if let Some(why) = revoked.get(&key) {
                        doomed.push((tuple, info, why.clone()));
                    } else if !registry.grants.contains_key(&key) && registry.settled {
                        // Recorded without a grant in force: an earlier
                        // agent's, or one that raced a revocation.
                        match registry.decide(&key) {
                            Ok(policy) if self.shared.enabled && registry.may_grant(&key) => {
                                if kernel.grant(key).is_ok() {
                                    let grant = Grant {
                                        policy,
                                        open: 0,
                                        used: Instant::now(),
                                    };
                                    registry.grants.insert(key, grant);
                                }
                            }
                            // Allowed: left open, without a grant (an old
                            // source's connect programs would not count
                            // the grant's connections).
                            Ok(_) | Err(Refusal::OldSourcePrograms(_)) => ungranted = true,
                            Err(refusal) => doomed.push((tuple, info, refusal)),
                        }
                    }
                }
                self.ungranted = ungranted;
            }
            (revoked, registry.settled)
        };
        if !revoked.is_empty() {
            self.rescan_at = Some(Instant::now() + RESCAN_AFTER);
            for (key, why) in &revoked {
                info!(
                    src_netns = key.netns_cookie,
                    dst = %SocketAddrV4::new(key.ip.into(), key.port),
                    reason = %why,
                    "fast path revoked: new connections of the pair go through the agent"
                );
            }
        }
        if settled {
            self.forget_departed();
        }
        self.cut(doomed).await;
    }

    /// Accounted connections whose pods are no longer served: their close
    /// will not be reported (the pod's programs are detached). Dropped, each
    /// is logged as cut short.
    fn forget_departed(&mut self) {
        let registry = lock(&self.shared.registry);
        let served = |tuple: &Tuple| {
            registry.pod_at(Ipv4Addr::from(tuple.saddr)).is_some()
                && registry.pod_at(Ipv4Addr::from(tuple.daddr)).is_some()
        };
        self.open.retain(|tuple, _| served(tuple));
        self.cut.retain(|tuple, _| served(tuple));
    }

    /// Connections accounted for that the kernel no longer records, for a
    /// while: their close was lost (the ring was full when it came). Closed
    /// now, with what is known. The kernel's counts are set to its records
    /// on the way, and those of pods no longer served dropped.
    async fn reconcile_open(&mut self) {
        let recount = {
            let registry = lock(&self.shared.registry);
            lock(&self.shared.kernel)
                .recount(|netns| registry.settled && !registry.pods.contains_key(&netns))
        };
        for (netns, over) in recount.corrected {
            info!(
                counted = %netns.map_or_else(|| "node".to_owned(), |n| format!("pod of netns {n}")),
                over,
                "fast path: a count of open connections had drifted from the kernel's records; \
                 set to them"
            );
        }
        let flows = recount.flows;
        // Closes reported since the records were read are taken first, so
        // that a connection just closed is not taken for one whose close
        // was lost.
        self.read_events().await;
        let recorded: HashSet<Tuple> = flows.into_iter().map(|(tuple, _)| tuple).collect();
        let now = Instant::now();
        let lost: Vec<Tuple> = self
            .open
            .by_tuple
            .iter()
            .filter(|(tuple, open)| {
                !recorded.contains(tuple) && now.duration_since(open.since) > EVENT_INTERVAL * 20
            })
            .map(|(tuple, _)| *tuple)
            .collect();
        // Cut connections whose close was lost are not waited for either.
        let open = &self.open.by_tuple;
        self.cut
            .retain(|tuple, _| recorded.contains(tuple) || open.contains_key(tuple));
        for tuple in lost {
            self.cut.remove(&tuple);
            if let Some(open) = self.open.remove(&tuple) {
                self.finish(
                    open,
                    0,
                    0,
                    ResponseFlag::None,
                    "its close was not reported (fast_path_event_lost): bytes unknown",
                );
            }
        }
    }

    /// Closes `open` with counts known elsewhere (none, where the kernel's
    /// report is lost), and the error `why`.
    fn finish(&mut self, open: Open, request: u64, response: u64, flag: ResponseFlag, why: &str) {
        self.ungrant(&open.grant);
        let lasted = open.since.elapsed();
        let outcome = || Outcome::failed(flag, Some(open.policy.clone()), why.to_owned());
        let (source, destination) = (outcome(), outcome());
        open.source.close_counted(request, response, lasted, source);
        open.destination
            .close_counted(request, response, lasted, destination);
    }

    /// One connection of `key` fewer open.
    fn ungrant(&self, key: &GrantKey) {
        if let Some(grant) = lock(&self.shared.registry).grants.get_mut(key) {
            grant.open = grant.open.saturating_sub(1);
            grant.used = Instant::now();
        }
    }

    /// Destroys the connections' sockets in both pods, then their records.
    async fn cut(&mut self, doomed: Vec<(Tuple, FlowInfo, Refusal)>) {
        if doomed.is_empty() {
            return;
        }
        // By namespace: each pod's sockets are destroyed from inside it.
        let mut by_netns: HashMap<u64, (Arc<PodProxy>, Vec<Socket>)> = HashMap::new();
        {
            let registry = lock(&self.shared.registry);
            for (tuple, info, _) in &doomed {
                let (src, dst) = endpoints(tuple);
                let client = destroy::Tuple {
                    local: src,
                    remote: dst,
                };
                if let Some(pod) = registry.pods.get(&info.netns_cookie) {
                    by_netns
                        .entry(info.netns_cookie)
                        .or_insert_with(|| (pod.proxy.clone(), Vec::new()))
                        .1
                        .push(Socket {
                            connection: *tuple,
                            ends: client,
                            client: true,
                        });
                }
                if let Some(&cookie) = registry.by_ip.get(dst.ip())
                    && let Some(pod) = registry.pods.get(&cookie)
                {
                    by_netns
                        .entry(cookie)
                        .or_insert_with(|| (pod.proxy.clone(), Vec::new()))
                        .1
                        .push(Socket {
                            connection: *tuple,
                            ends: client.reversed(),
                            client: false,
                        });
                }
            }
        }
        for (tuple, _, why) in &doomed {
            let (src, dst) = endpoints(tuple);
            warn!(%src, %dst, reason = %why, "fast-path connection cut: {why}");
            self.metrics
                .fast_path_cuts
                .get_or_create(&CutReason {
                    reason: why.reason(),
                })
                .inc();
            self.cut.insert(*tuple, why.to_string());
        }
        // The connections whose client socket is gone, destroyed here or
        // closed already: the kernel reports (or has reported) its close.
        let mut reported: BTreeSet<Tuple> = BTreeSet::new();
        // Those a socket of which could not be destroyed: still open, they
        // keep their record, and are tried again at the next search.
        let mut failed_cuts: BTreeSet<Tuple> = BTreeSet::new();
        for (pod, sockets) in by_netns.into_values() {
            let name = pod.workload.qualified_name();
            let destroyed = pod
                .netns
                .run(move || {
                    let mut destroyer = Destroyer::new()?;
                    // One socket that cannot be destroyed does not spare
                    // the others.
                    let (mut gone, mut failed) = (Vec::new(), Vec::new());
                    for socket in sockets {
                        match destroyer.destroy(socket.ends) {
                            Ok(_) => gone.push(socket),
                            Err(error) => failed.push((socket.connection, error)),
                        }
                    }
                    Ok::<_, DestroyError>((gone, failed))
                })
                .await;
            let failed = match destroyed {
                Ok(Ok((gone, failed))) => {
                    reported.extend(
                        gone.into_iter()
                            .filter(|socket| socket.client)
                            .map(|socket| socket.connection),
                    );
                    failed
                        .into_iter()
                        .map(|(connection, e)| {
                            failed_cuts.insert(connection);
                            Chain(&e).to_string()
                        })
                        .collect()
                }
                Ok(Err(error)) => {
                    failed_cuts.extend(doomed.iter().map(|(tuple, _, _)| *tuple));
                    vec![Chain(&error).to_string()]
                }
                Err(error) => {
                    failed_cuts.extend(doomed.iter().map(|(tuple, _, _)| *tuple));
                    vec![Chain(&error).to_string()]
                }
            };
            for error in failed {
                warn!(workload = %name, %error, "cannot cut a fast-path connection");
            }
        }
        // Records left (the client's pod is not served, or its socket could
        // not be destroyed) go here, so that their SYN is refused from now
        // on; the close of those, which will not be reported, is accounted
        // for now.
        if !failed_cuts.is_empty() {
            self.rescan_at = Some(Instant::now() + RESCAN_AFTER);
        }
        let mut kernel = lock(&self.shared.kernel);
        for (tuple, _, _) in &doomed {
            if !failed_cuts.contains(tuple) {
                kernel.forget_flow(tuple);
            }
        }
        drop(kernel);
        for (tuple, _, why) in &doomed {
            if reported.contains(tuple) || failed_cuts.contains(tuple) {
                continue;
            }
            self.cut.remove(tuple);
            if let Some(open) = self.open.remove(tuple) {
                // What it carried is unknown without its client's socket.
                self.finish(open, 0, 0, ResponseFlag::Denied, &why.to_string());
            }
        }
    }

    /// Accounts for the connections the kernel opened and closed since the
    /// last read.
    async fn read_events(&mut self) {
        let events = lock(&self.shared.kernel).events();
        if events.is_empty() {
            return;
        }
        let mut doomed = Vec::new();
        for event in events {
            match event.kind {
                fast_event::OPENED => {
                    if let Some(refused) = self.opened(&event) {
                        doomed.push((event.tuple, event.info, refused));
                    }
                }
                fast_event::CLOSED => self.closed(&event),
                _ => {}
            }
        }
        self.metrics
            .fast_path_connections
            .set(gauge(self.open.by_tuple.len()));
        self.cut(doomed).await;
    }

    /// Says when a pod, or the node, has as many fast-path connections open
    /// as it may ([`FAST_OPEN_PER_POD`], [`FAST_OPEN_PER_NODE`]), as the
    /// kernel counts them (connect4 sends the next ones to the agent
    /// meanwhile), and when it is well under again (three quarters): a line
    /// each way, not one per connection. Once a second: the kernel enforces
    /// the limits; this only reads its counts.
    fn report_limits(&mut self) {
        let open = lock(&self.shared.kernel).open();
        let mut registry = lock(&self.shared.registry);
        let full = open.node >= FAST_OPEN_PER_NODE;
        if full != registry.at_limit && (full || open.node < FAST_OPEN_PER_NODE * 3 / 4) {
            registry.at_limit = full;
            if full {
                warn!(
                    open = open.node,
                    limit = FAST_OPEN_PER_NODE,
                    "fast path: the node has as many connections open as it may; new ones go \
                     through the agent until some close"
                );
            } else {
                info!(
                    open = open.node,
                    "fast path: open connections back under the node's limit"
                );
            }
        }
        for (cookie, pod) in registry.pods.iter_mut() {
            let open = open.by_pod.get(cookie).copied().unwrap_or(0);
            let full = open >= FAST_OPEN_PER_POD;
            if full == pod.at_limit || (!full && open >= FAST_OPEN_PER_POD * 3 / 4) {
                continue;
            }
            pod.at_limit = full;
            let workload = pod.proxy.workload.qualified_name();
            if full {
                warn!(
                    %workload, open, limit = FAST_OPEN_PER_POD,
                    "fast path: the pod has as many connections open as it may; its new ones go \
                     through the agent until some close"
                );
            } else {
                info!(%workload, open, "fast path: the pod's open connections back under its limit");
            }
        }
    }

    /// A connection opened: the destination authorizes it as its inbound
    /// side authorizes a stream (logging AUDIT and dry-run results, counting
    /// the decision), and both ends' metrics count it. Returns why it must
    /// be cut, if the decision now denies it (a policy changed as it was
    /// let go).
    fn opened(&mut self, event: &FastEvent) -> Option<Refusal> {
        let (src, dst) = endpoints(&event.tuple);
        let grant = GrantKey::new(
            event.info.netns_cookie,
            event.tuple.daddr,
            event.tuple.dport,
        );
        let (src_pod, dst_pod) = {
            let mut registry = lock(&self.shared.registry);
            let src_pod = registry.pods.get(&event.info.netns_cookie)?.proxy.clone();
            let dst_pod = registry.pod_at(*dst.ip())?.proxy.clone();
            if let Some(grant) = registry.grants.get_mut(&grant) {
                grant.open += 1;
                grant.used = Instant::now();
            }
            (src_pod, dst_pod)
        };
        let decision = dst_pod.authorize(
            Some(&src_pod.workload.identity),
            IpAddr::V4(*src.ip()),
            dst.into(),
        );
        let open = track(&src_pod, &dst_pod, src, dst, decision.reason.clone(), grant);
        self.open.insert(event.tuple, open);
        (!decision.allowed).then_some(Refusal::Denied(decision.reason))
    }

    /// A connection closed: its bytes and how it ended, from both ends.
    fn closed(&mut self, event: &FastEvent) {
        let (src, dst) = endpoints(&event.tuple);
        let grant = GrantKey::new(
            event.info.netns_cookie,
            event.tuple.daddr,
            event.tuple.dport,
        );
        let open = match self.open.remove(&event.tuple) {
            Some(open) => {
                self.ungrant(&grant);
                open
            }
            // Opened before this agent started (or its open record was
            // lost): accounted for now.
            None => {
                let registry = lock(&self.shared.registry);
                let (Some(src_pod), Some(dst_pod)) = (
                    registry.pods.get(&event.info.netns_cookie),
                    registry.pod_at(*dst.ip()),
                ) else {
                    return;
                };
                let policy = registry
                    .grants
                    .get(&grant)
                    .map(|grant| grant.policy.clone())
                    .unwrap_or_default();
                track(&src_pod.proxy, &dst_pod.proxy, src, dst, policy, grant)
            }
        };
        let duration = Duration::from_nanos(event.closed_ns.saturating_sub(event.info.opened_ns));
        let outcome = || match self.cut.get(&event.tuple) {
            Some(why) => {
                Outcome::failed(ResponseFlag::Denied, Some(open.policy.clone()), why.clone())
            }
            None if event.old_state == tcp_state::SYN_SENT => Outcome::failed(
                ResponseFlag::ConnectFailed,
                Some(open.policy.clone()),
                "the destination did not accept the connection".into(),
            ),
            None => Outcome::completed(Some(open.policy.clone())),
        };
        let (request, response) = payload(event.old_state, event.bytes_acked, event.bytes_received);
        let (source_outcome, destination_outcome) = (outcome(), outcome());
        self.cut.remove(&event.tuple);
        open.source
            .close_counted(request, response, duration, source_outcome);
        open.destination
            .close_counted(request, response, duration, destination_outcome);
    }
}

impl Drop for Task {
    /// The agent is stopping: the connections live on (they are the pods'
    /// own), and the next agent accounts for their close.
    fn drop(&mut self) {
        for (_, open) in self.open.by_tuple.drain() {
            open.source.abandon();
            open.destination.abandon();
        }
    }
}

/// The metrics of a fast-path connection from `src` to `dst`, from both
/// ends, as for an HBONE stream.
fn track(
    src_pod: &PodProxy,
    dst_pod: &PodProxy,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    policy: String,
    grant: GrantKey,
) -> Open {
    let (source, destination) = (src_pod.current(), dst_pod.current());
    let connection = |reporter| Connection {
        reporter,
        path: Path::FastPath,
        id: crate::proxy::connection_id(),
        trace: None,
        src: src.into(),
        dst: dst.into(),
        source: Some(&source),
        source_identity: Some(&src_pod.workload.identity),
        destination: Some(&destination),
        service: None,
    };
    Open {
        source: src_pod.metrics.traffic.open(&connection(Reporter::source)),
        destination: dst_pod
            .metrics
            .traffic
            .open(&connection(Reporter::destination)),
        policy,
        grant,
        since: Instant::now(),
    }
}

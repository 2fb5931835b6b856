//! Sharing HBONE client connections between streams.
//!
//! Connections are keyed by who speaks to whom, from where: (source
//! namespace and address, source identity, destination identity, destination
//! address). Streams of
//! different source workloads never share a connection, since each presents
//! its own client certificate. A connection takes up to
//! [`Settings::max_streams`] streams at once; the next one opens another
//! connection. Connections idle for [`Settings::idle_timeout`] are closed;
//! dead ones (closed, failed, PING unanswered) are never handed out.
//!
//! While a connection is being opened, the streams that want it wait for
//! it; when opening it fails, they all fail with its error (one failing
//! attempt after another, each waiting its turn, once held thousands of
//! captured connections for hours behind an unreachable destination).

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::gauge::Gauge;
use warren_daemon::metrics::Live;
use warren_pki::identity::SpiffeId;

use super::client::{Connection, Keepalive};
use crate::limits::OverLimit;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The network namespace the connection's socket lives in: a pod that is
    /// replaced under the same address must not reuse the old pod's sockets.
    pub src_netns: u64,
    pub src_ip: IpAddr,
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub dst_addr: SocketAddr,
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    pub keepalive: Keepalive,
}

impl Default for Settings {
    /// ztunnel's: 100 streams a connection, 5 minutes idle.
    fn default() -> Self {
        Self {
            max_streams: 100,
            idle_timeout: Duration::from_secs(300),
            keepalive: Keepalive::default(),
        }
    }
}

/// Connections of one key. Its lock is held while a new connection is being
/// opened, so that a burst of streams waits for that one connection instead
/// of each opening its own.
type Slot = Arc<SlotState>;

#[derive(Default)]
struct SlotState {
    connections: tokio::sync::Mutex<Vec<Arc<Pooled>>>,
    /// Attempts to open a connection that failed, and the last attempt's
    /// error if it failed: a stream that waited while an attempt failed
    /// fails with it, unless a later one succeeded.
    failures: AtomicU64,
    last_failure: Mutex<Option<SharedFailure>>,
}

/// Why [`Pool::checkout`] gave no stream slot.
#[derive(Debug)]
pub enum CheckoutError<E> {
    /// This caller's attempt to open a connection failed.
    Connect(E),
    /// Another caller's attempt, which this one waited for, failed.
    Shared(SharedFailure),
}

/// Why an attempt that others waited for failed, as they are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedFailure {
    /// The pod had no room for the connection's socket: the streams that
    /// waited are refused as over that limit too, not as a broken tunnel.
    OverLimit(OverLimit),
    Failed(Arc<str>),
}

/// The error of an attempt to open a connection.
pub trait AttemptError: std::fmt::Display {
    /// What the streams that waited for the attempt are told.
    fn shared(&self) -> SharedFailure {
        SharedFailure::Failed(self.to_string().into())
    }
}

pub struct Pool {
    settings: Settings,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    next_id: AtomicU64,
    /// Connections alive (in the pool, or retired and finishing their
    /// streams), and streams checked out.
    connections: Gauge,
    streams: Gauge,
}

#[derive(Debug)]
struct Pooled {
    id: u64,
    connection: Connection,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    _alive: Live,
}

impl Pooled {
    /// Claims a stream slot if there is one.
    fn try_claim(&self, max: usize) -> bool {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A claim on one stream of a pooled connection, held for the stream's life.
#[derive(Debug)]
pub struct Checkout {
    pooled: Arc<Pooled>,
    reused: bool,
    _alive: Live,
}

impl Checkout {
    pub fn connection(&self) -> &Connection {
        &self.pooled.connection
    }

    /// Identifies the connection in logs.
    pub fn connection_id(&self) -> u64 {
        self.pooled.id
    }

    /// Whether the connection already existed.
    pub fn reused(&self) -> bool {
        self.reused
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.pooled.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.pooled.idle_since) = Instant::now();
        }
    }
}

impl Pool {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            connections: Gauge::default(),
            streams: Gauge::default(),
        }
    }

    /// Counts the pool's live connections and streams in these gauges.
    pub fn with_gauges(mut self, connections: Gauge, streams: Gauge) -> Self {
        self.connections = connections;
        self.streams = streams;
        self
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// A stream slot on a live connection for `key`, opening a connection
    /// with `connect` when none has room. Fails without trying when an
    /// attempt made while this one waited failed.
    pub async fn checkout<F, Fut, E>(
        &self,
        key: &PoolKey,
        connect: F,
    ) -> Result<Checkout, CheckoutError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, E>>,
        E: AttemptError,
    {
        let slot = lock(&self.slots).entry(key.clone()).or_default().clone();
        let failures = slot.failures.load(Ordering::Acquire);
        let mut connections = slot.connections.lock().await;
        connections.retain(|c| !c.connection.is_closed());
        if let Some(pooled) = connections
            .iter()
            .find(|c| c.try_claim(self.settings.max_streams))
        {
            return Ok(Checkout {
                pooled: pooled.clone(),
                reused: true,
                _alive: Live::new(&self.streams),
            });
        }
        if slot.failures.load(Ordering::Acquire) != failures
            && let Some(error) = lock(&slot.last_failure).clone()
        {
            return Err(CheckoutError::Shared(error));
        }
        let connection = match connect().await {
            Ok(connection) => {
                *lock(&slot.last_failure) = None;
                connection
            }
            Err(error) => {
                // Both under the connections' lock, which the waiters take
                // before they look.
                *lock(&slot.last_failure) = Some(error.shared());
                slot.failures.fetch_add(1, Ordering::AcqRel);
                return Err(CheckoutError::Connect(error));
            }
        };
        let pooled = Arc::new(Pooled {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            connection,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            _alive: Live::new(&self.connections),
        });
        connections.push(pooled.clone());
        Ok(Checkout {
            pooled,
            reused: false,
            _alive: Live::new(&self.streams),
        })
    }

    /// Closes connections that have carried no stream for the idle timeout,
    /// and forgets dead ones. Streams in flight keep their connection.
    pub fn evict_idle(&self) {
        let slots: Vec<(PoolKey, Slot)> = lock(&self.slots)
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let now = Instant::now();
        for (key, slot) in slots {
            // A key whose lock is held is opening a connection: it is busy,
            // not idle, and waiting for it would stall the reaper.
            let Ok(mut connections) = slot.connections.try_lock() else {
                continue;
            };
            connections.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*lock(&c.idle_since)) >= self.settings.idle_timeout;
                !idle && !c.connection.is_closed()
            });
            if connections.is_empty() {
                drop(connections);
                let mut slots = lock(&self.slots);
                // Only if nobody came along in between.
                if slots
                    .get(&key)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && Arc::strong_count(s) == 2)
                {
                    slots.remove(&key);
                }
            }
        }
    }

    /// Closes every connection whose key matches `retire` (e.g. those opened
    /// with a certificate that has been replaced). Streams in flight finish.
    pub async fn retire(&self, retire: impl Fn(&PoolKey) -> bool) {
        let retired: Vec<Slot> = lock(&self.slots)
            .extract_if(|k, _| retire(k))
            .map(|(_, s)| s)
            .collect();
        for slot in retired {
            slot.connections.lock().await.clear();
        }
    }

    /// Open connections, for logs and tests.
    pub async fn connection_count(&self) -> usize {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        let mut n = 0;
        for slot in slots {
            n += slot
                .connections
                .lock()
                .await
                .iter()
                .filter(|c| !c.connection.is_closed())
                .count();
        }
        n
    }

    /// Runs [`Pool::evict_idle`] periodically while the pool lives.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let period = (self.settings.idle_timeout / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match pool.upgrade() {
                    Some(pool) => pool.evict_idle(),
                    None => return,
                }
            }
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here can be left half-updated by a panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

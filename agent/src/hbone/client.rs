//! The sending end of HBONE: one HTTP/2 client connection over an
//! established (TLS) stream, kept alive with PINGs.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinHandle,
};
use tracing::debug;

use super::{
    CLIENT_MAX_HEADER_LIST, CONNECTION_WINDOW, MAX_FRAME_SIZE, PING_INTERVAL, PING_TIMEOUT,
    SEND_BUFFER, STREAM_WINDOW,
};
use crate::limits::Permit;

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: PING_INTERVAL,
            timeout: PING_TIMEOUT,
        }
    }
}

/// A client connection. Dropping it closes the connection; streams still
/// open on it fail.
#[derive(Debug)]
pub struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    driver: JoinHandle<()>,
    /// When the certificates it was made with (either end's) expire; it
    /// takes no new streams from then on.
    valid_until: Option<SystemTime>,
    /// Its socket, counted against the pod that opened it until the socket
    /// is closed: by the driver when the connection ends, or on drop.
    charge: Arc<Mutex<Charge>>,
}

#[derive(Debug)]
enum Charge {
    None,
    Held(#[expect(dead_code, reason = "held for its drop, which gives the charge back")] Permit),
    /// The socket is closed: nothing to charge any more.
    Ended,
}

impl Connection {
    /// Performs the HTTP/2 handshake on `io` and starts driving the
    /// connection (and its keepalive) on a task.
    pub async fn handshake<IO>(io: IO, keepalive: Keepalive) -> Result<Self, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(CLIENT_MAX_HEADER_LIST)
            .max_send_buffer_size(SEND_BUFFER)
            .enable_push(false)
            .handshake(io)
            .await?;
        let mut ping = connection
            .ping_pong()
            .expect("ping_pong is taken once, here");
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let charge = Arc::new(Mutex::new(Charge::None));
        // One value, so that whichever way the task ends (done, aborted,
        // panicked, or dropped before it ever ran) the socket is closed
        // first, then its charge given back: now, rather than when the pool
        // next looks at this key (a dead tunnel would hold its pod's budget
        // for minutes).
        let driven = Driven {
            connection,
            _release: EndCharge(charge.clone()),
        };
        let driver = tokio::spawn(async move {
            // The whole of it moves in (a use of one field alone would take
            // only that field, and leave the guard behind, dropped at once).
            let mut driven = driven;
            let alive = async {
                loop {
                    tokio::time::sleep(keepalive.interval).await;
                    match tokio::time::timeout(keepalive.timeout, ping.ping(h2::Ping::opaque()))
                        .await
                    {
                        Ok(Ok(_pong)) => {}
                        Ok(Err(e)) => return format!("PING failed: {e}"),
                        Err(_) => return format!("no PING reply in {:?}", keepalive.timeout),
                    }
                }
            };
            let why = tokio::select! {
                result = &mut driven.connection => match result {
                    Ok(()) => "closed by peer".to_owned(),
                    Err(e) => e.to_string(),
                },
                why = alive => why,
            };
            flag.store(true, Ordering::Release);
            debug!(%why, "HBONE client connection ended");
        });
        Ok(Self {
            send,
            closed,
            driver,
            valid_until: None,
            charge,
        })
    }

    /// Holds `permit` (its socket, counted against a pod's budget) while the
    /// connection lives.
    pub fn charged(self, permit: Permit) -> Self {
        let mut charge = lock(&self.charge);
        // Already ended, the permit is dropped at once.
        if !matches!(*charge, Charge::Ended) {
            *charge = Charge::Held(permit);
        }
        drop(charge);
        self
    }

    /// Takes no new streams after `time` (when a certificate it was made with
    /// expires).
    pub fn valid_until(mut self, time: SystemTime) -> Self {
        self.valid_until = Some(time);
        self
    }

    /// Whether the connection has ended (closed, failed, or its keepalive
    /// went unanswered) or outlived its certificates. Such a connection takes
    /// no new streams.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self
                .valid_until
                .is_some_and(|until| SystemTime::now() >= until)
    }

    /// Sends `request` (a CONNECT) and waits for the response headers.
    pub async fn send(
        &self,
        request: http::Request<()>,
    ) -> Result<(http::Response<RecvStream>, SendStream<Bytes>), h2::Error> {
        let result: Result<_, h2::Error> = async {
            let mut send = self.send.clone().ready().await?;
            let (response, stream) = send.send_request(request, false)?;
            Ok((response.await?, stream))
        }
        .await;
        if let Err(e) = &result
            && (e.is_go_away() || e.is_io())
        {
            // The peer is going away (a GOAWAY, say after renewing its
            // certificate) or the connection broke: it takes no new streams,
            // though its driver runs on until the old ones finish.
            self.closed.store(true, Ordering::Release);
        }
        result
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The driver, dropped, gives the charge back.
        self.driver.abort();
    }
}

fn lock(charge: &Mutex<Charge>) -> std::sync::MutexGuard<'_, Charge> {
    charge.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection its driver task drives, and what its end gives back.
/// Fields drop in order: the connection (its socket) first.
struct Driven<IO> {
    connection: h2::client::Connection<IO, Bytes>,
    _release: EndCharge,
}

/// Dropped once the socket is closed: its charge, if it held one, is given
/// back.
struct EndCharge(Arc<Mutex<Charge>>);

impl Drop for EndCharge {
    fn drop(&mut self) {
        let ended = std::mem::replace(&mut *lock(&self.0), Charge::Ended);
        drop(ended);
    }
}

#[cfg(test)]
impl Connection {
    /// Whether the connection still holds a charge.
    pub(crate) fn is_charged(&self) -> bool {
        matches!(*lock(&self.charge), Charge::Held(_))
    }
}

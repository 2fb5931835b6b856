//! The sending end of HBONE: one HTTP/2 client connection over an
//! established (TLS) stream, kept alive with PINGs.

use std::{
    sync::{
        Arc,
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
    /// Its socket, counted against the pod that opened it, until dropped.
    _charge: Option<Permit>,
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
        let driver = tokio::spawn(async move {
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
                result = &mut connection => match result {
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
            _charge: None,
        })
    }

    /// Holds `permit` (its socket, counted against a pod's budget) while it
    /// lives.
    pub fn charged(mut self, permit: Permit) -> Self {
        self._charge = Some(permit);
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
        self.driver.abort();
    }
}

//! The small plain-HTTP/1.1 server under warren's local endpoints (health
//! probes, metrics, the agent's admin endpoint): one request per
//! connection, answered synchronously from what the daemon already holds.
//!
//! Every endpoint built on it is bounded the same way, because a scraper or
//! a probe is a client like any other: a request must arrive within
//! [`REQUEST_TIMEOUT`], and connections are limited in all and per client
//! address, so one client cannot hold the endpoint or the daemon's file
//! descriptors.

use std::{convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::limits::PerAddress;

/// A client that takes longer than this to send its request, or to take
/// its answer, is dropped. Probes and scrapers send theirs at once.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once, in all and from one address; more are closed
/// at once. The kubelet and a scraper each open one at a time, from one
/// address, so this is far above what they need, and far below what would
/// cost the daemon its file descriptors; the share per address keeps one
/// client from taking them all and failing the others.
pub const MAX_CONNECTIONS: usize = 1024;
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 4;

/// Answers one request. Called on the runtime's threads: it must not block.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = PerAddress::new(MAX_CONNECTIONS_PER_ADDRESS);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause, not spin.
                    tracing::warn!(%error, "HTTP endpoint cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        // Dropping the stream closes it.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue;
        };
        let Some(slot) = per_address.take(peer.ip()) else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let service = service_fn(move |request| {
                let response = handler(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(REQUEST_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // A client that hangs up early is not worth a log line.
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, connection).await;
        });
    }
}

/// Binds `address` and serves `handler` there in a task of its own, which
/// ends with the runtime. Returns the address bound (a port of 0 picks one).
/// `what` names the endpoint in the error.
pub async fn spawn(address: &str, what: &str, handler: Handler) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {address} for {what}: {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, handler, std::future::pending()));
    Ok(local)
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

/// An answer of `content_type`.
pub fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends one raw request and returns the whole response.
    pub async fn get(address: SocketAddr, request: &str) -> String {
        try_get(address, request).await.unwrap()
    }

    pub async fn try_get(address: SocketAddr, request: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    pub fn request(method: &str, path: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n")
    }
}

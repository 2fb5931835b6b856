//! The health endpoints of warren's daemons, for the kubelet's probes, on
//! the paths ztunnel uses:
//!
//! - `GET /healthz/ready`: 200 when the daemon says it is ready, else 503
//!   with its reason in the body (what `kubectl describe` shows).
//! - `GET /healthz/live`: 200 whenever the daemon's runtime answers at all.
//!   Liveness asks nothing of the daemon's state on purpose: a slow or absent
//!   API server makes a daemon unready, never a candidate for a restart that
//!   would not help.
//!
//! Plain HTTP/1.1 without TLS, as kubelet probes are; nothing secret is served.

use std::{io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::http::{self as server, text};

pub const READY_PATH: &str = "/healthz/ready";
pub const LIVE_PATH: &str = "/healthz/live";

/// Whether the daemon is ready, asked at each probe: `Err` says why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Binds `address` and serves the endpoints there in a task of its own,
/// which ends with the runtime. Returns the address bound (a port of 0
/// picks one).
pub async fn spawn(address: &str, ready: Readiness) -> io::Result<SocketAddr> {
    server::spawn(
        address,
        "health probes",
        Arc::new(move |request| answer(request, &ready)),
    )
    .await
}

/// The readiness endpoint alone, as an answer to `request`, for servers
/// that serve it beside other paths (the agent's admin endpoint).
pub fn readiness(ready: &Readiness) -> Response<Full<Bytes>> {
    match ready() {
        Ok(()) => text(StatusCode::OK, "ready\n".into()),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

fn answer(request: &Request<Incoming>, ready: &Readiness) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match request.uri().path() {
        READY_PATH => readiness(ready),
        LIVE_PATH => text(StatusCode::OK, "live\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint; try {READY_PATH} or {LIVE_PATH}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    };

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::{
        MAX_CONNECTIONS_PER_ADDRESS,
        testing::{get, try_get},
    };

    fn probe(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n")
    }

    #[tokio::test]
    async fn readiness_follows_the_daemon_and_liveness_does_not() {
        let state = Arc::new(Mutex::new(Err::<(), _>("pods not listed yet".to_owned())));
        let asked = state.clone();
        let address = spawn(
            "127.0.0.1:0",
            Arc::new(move || asked.lock().unwrap().clone()),
        )
        .await
        .unwrap();

        let response = get(address, &probe(READY_PATH)).await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(
            response.ends_with("not ready: pods not listed yet\n"),
            "{response}"
        );
        let response = get(address, &probe(LIVE_PATH)).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        *state.lock().unwrap() = Ok(());
        let response = get(address, &probe(READY_PATH)).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ready\n"), "{response}");
    }

    #[tokio::test]
    async fn other_paths_methods_and_garbage_are_refused() {
        let address = spawn("127.0.0.1:0", Arc::new(|| Ok(()))).await.unwrap();
        let response = get(address, &probe("/metrics")).await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        let response = get(address, "POST /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        let response = get(address, "\x16\x03\x01garbage\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        // Still serving after all that.
        let response = get(address, &probe(LIVE_PATH)).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test]
    async fn connections_beyond_an_addresss_share_are_closed_until_others_end() {
        let address = spawn("127.0.0.1:0", Arc::new(|| Ok(()))).await.unwrap();
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
            silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        // Let the server take them all in.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Closed unanswered (an empty response, or a reset).
        let refused = try_get(address, &probe(LIVE_PATH)).await;
        assert!(
            refused.as_deref().is_ok_and(str::is_empty) || refused.is_err(),
            "{refused:?}"
        );
        // Another address still gets its answer.
        let other = SocketAddr::new("127.0.0.2".parse().unwrap(), 0);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(other).unwrap();
        let mut stream = socket.connect(address).await.unwrap();
        stream.write_all(probe(LIVE_PATH).as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let refused = try_get(address, &probe(LIVE_PATH)).await;
        assert!(
            refused.as_deref().is_ok_and(str::is_empty) || refused.is_err(),
            "{refused:?}"
        );
        drop(silent);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let response = try_get(address, &probe(LIVE_PATH))
                .await
                .unwrap_or_default();
            if response.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still refused: {response:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_the_others() {
        let called = Arc::new(AtomicBool::new(false));
        let seen = called.clone();
        let address = spawn(
            "127.0.0.1:0",
            Arc::new(move || {
                seen.store(true, Ordering::Relaxed);
                Ok(())
            }),
        )
        .await
        .unwrap();
        let _silent = tokio::net::TcpStream::connect(address).await.unwrap();
        let response = get(address, &probe(READY_PATH)).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(called.load(Ordering::Relaxed));
    }
}

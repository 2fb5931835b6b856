//! HBONE: TCP connections carried as HTTP/2 CONNECT streams inside mutual-TLS
//! connections between node agents, as Istio's ztunnel speaks it
//! (see shared/notes/hbone-wire.md).
//!
//! This module knows HTTP/2 and the HBONE conventions, not pods or eBPF: it is
//! used, and tested, over any TLS stream.
//!
//! - [`server`]: accept CONNECT streams on one TLS connection.
//! - [`client`]: open a TLS + HTTP/2 connection and send CONNECTs on it.
//! - [`pool`]: share client connections between streams.
//! - [`copy`]: relay bytes between a TCP socket and a stream.

pub mod client;
pub mod copy;
pub mod pool;
pub mod server;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

/// The HBONE port, on every pod address.
pub const PORT: u16 = warren_common::HBONE_PORT;
/// ztunnel's own ports. A CONNECT to one of them would loop back into the
/// proxy ("recursive call"), so it is refused.
pub const PROXY_PORTS: [u16; 3] = [
    warren_common::OUTBOUND_PORT,
    warren_common::INBOUND_PLAINTEXT_PORT,
    PORT,
];

/// HTTP/2 settings, matching ztunnel's (flow-control windows sized for
/// bulk transfer, frames up to 1 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub const SERVER_MAX_STREAMS: u32 = 200;
pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
/// Opening a tunnel connection (TCP, TLS and HTTP/2 handshakes), and
/// waiting for the answer to a CONNECT, take at most this long: a peer that
/// stalls must not hold up the streams queued behind it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive: a connection whose PING is not answered in time is dead.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a CONNECT request is refused, and the status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error("authority {0:?} is not <ip>:<port>")]
    BadAuthority(String),
    #[error("destination {dst} is not the pod this connection arrived at ({pod})")]
    WrongPod { dst: IpAddr, pod: IpAddr },
    #[error("destination port {0} is one of the proxy's own ports")]
    ProxyPort(u16),
    /// Authorization policy said no.
    #[error("denied by policy: {0}")]
    Denied(String),
    #[error("connecting to the application at {dst} failed: {reason}")]
    Unreachable { dst: SocketAddr, reason: String },
}

impl Refusal {
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::NotConnect(_)
            | Self::BadAuthority(_)
            | Self::WrongPod { .. }
            | Self::ProxyPort(_) => StatusCode::BAD_REQUEST,
            Self::Denied(_) => StatusCode::UNAUTHORIZED,
            Self::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks a CONNECT request that arrived at the pod `pod_ip`: method,
/// authority, that it targets this very pod, and not a proxy port.
pub fn check_request<B>(request: &http::Request<B>, pod_ip: IpAddr) -> Result<SocketAddr, Refusal> {
    if request.method() != http::Method::CONNECT {
        return Err(Refusal::NotConnect(request.method().to_string()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let dst: SocketAddr = authority
        .parse()
        .map_err(|_| Refusal::BadAuthority(authority.to_owned()))?;
    if dst.ip() != pod_ip {
        return Err(Refusal::WrongPod {
            dst: dst.ip(),
            pod: pod_ip,
        });
    }
    if PROXY_PORTS.contains(&dst.port()) {
        return Err(Refusal::ProxyPort(dst.port()));
    }
    Ok(dst)
}

/// The CONNECT request for `dst`, on behalf of a client at `src`.
pub fn connect_request(dst: SocketAddr, src: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .header("forwarded", format!("for=\"{src}\""))
        .header("traceparent", traceparent())
        .body(())
        .expect("a CONNECT request from valid addresses is well-formed")
}

/// The original client address from a `forwarded: for="ip:port"` header.
pub fn forwarded_for<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let value = request.headers().get("forwarded")?.to_str().ok()?;
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

/// A fresh W3C trace context (version 00, not sampled): a new trace per
/// proxied connection, so logs on both nodes can be joined.
fn traceparent() -> String {
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    format!("00-{trace:032x}-{span:016x}-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, authority: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri(authority)
            .body(())
            .unwrap()
    }

    #[test]
    fn accepts_a_connect_to_this_pod() {
        let pod: IpAddr = "10.244.2.2".parse().unwrap();
        let dst = check_request(&request("CONNECT", "10.244.2.2:8080"), pod).unwrap();
        assert_eq!(dst, "10.244.2.2:8080".parse().unwrap());
    }

    #[test]
    fn refuses_what_ztunnel_refuses() {
        let pod: IpAddr = "10.244.2.2".parse().unwrap();
        let cases = [
            (request("GET", "http://10.244.2.2:8080/"), 400),
            (request("CONNECT", "web.shop:8080"), 400),
            (request("CONNECT", "10.244.2.3:8080"), 400),
            (request("CONNECT", "10.244.2.2:15008"), 400),
            (request("CONNECT", "10.244.2.2:15001"), 400),
        ];
        for (req, status) in cases {
            let refusal = check_request(&req, pod).unwrap_err();
            assert_eq!(refusal.status().as_u16(), status, "{refusal}");
        }
        assert_eq!(Refusal::Denied("x".into()).status().as_u16(), 401);
        let unreachable = Refusal::Unreachable {
            dst: "10.244.2.2:8080".parse().unwrap(),
            reason: "connection refused".into(),
        };
        assert_eq!(unreachable.status().as_u16(), 503);
    }

    #[test]
    fn connect_request_carries_forwarded_and_traceparent() {
        let req = connect_request(
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.1:4000".parse().unwrap(),
        );
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.2:80");
        assert_eq!(forwarded_for(&req), Some("10.0.0.1:4000".parse().unwrap()));
        let tp = req.headers()["traceparent"].to_str().unwrap();
        let parts: Vec<_> = tp.split('-').collect();
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
    }
}

#[cfg(test)]
mod loopback_tests;

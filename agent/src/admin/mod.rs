//! The agent's admin endpoint, like ztunnel's admin port: plain HTTP on
//! loopback (`adminListen`, by default
//! [`DEFAULT_ADMIN_LISTEN`](crate::config::DEFAULT_ADMIN_LISTEN)), for an
//! operator on the node (`curl`,
//! `kubectl port-forward`).
//!
//! - `GET /config_dump`: the agent's view as one JSON object (see
//!   [`config_dump`] for its fields).
//! - `GET /logging`: the log filter in force, `RUST_LOG` syntax.
//!   `POST /logging?level=<filter>` replaces it and answers the new one; a
//!   filter that does not parse is refused with 400 and the old one stays.
//! - `GET /healthz/ready`: the agent's readiness, as the health endpoint
//!   answers it.
//!
//! Nothing secret is served (certificates are public, private keys never
//! appear), but the endpoint is unauthenticated and can change the log
//! level: it belongs on loopback.

mod dump;
#[cfg(test)]
mod tests;

use std::{io, net::SocketAddr, sync::Arc, time::SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::watch;
use tracing::warn;
use warren_daemon::{
    health::{self, Readiness},
    http::{self as server, reply, text},
    logging::LogControl,
};
use warren_pki::tls::WorkloadCertificate;

pub use dump::config_dump;

use crate::{mesh::Snapshot, reconcile::States};

pub const CONFIG_DUMP_PATH: &str = "/config_dump";
pub const LOGGING_PATH: &str = "/logging";
pub const READY_PATH: &str = health::READY_PATH;

/// The paths served and the methods each takes (HEAD goes with GET).
const PATHS: [(&str, &[Method]); 3] = [
    (CONFIG_DUMP_PATH, &[Method::GET]),
    (LOGGING_PATH, &[Method::GET, Method::POST]),
    (READY_PATH, &[Method::GET]),
];

/// One workload certificate the agent holds, as the dump shows it. Never
/// carries the private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The pod it serves, `namespace/name`.
    pub workload: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// The leaf's serial number in lowercase hex, as
    /// [`WorkloadCertificate::serial`] shows it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertificateInfo {
    /// What the dump shows of `certificate`, held for `workload`
    /// (`namespace/name`).
    pub fn of(workload: String, certificate: &WorkloadCertificate) -> Self {
        Self {
            workload,
            identity: certificate.identity().to_string(),
            serial: certificate.serial(),
            not_before: certificate.not_before(),
            not_after: certificate.not_after(),
        }
    }
}

/// The workload certificates held now, asked at each dump.
pub type Certificates = Arc<dyn Fn() -> Vec<CertificateInfo> + Send + Sync>;

/// What the endpoint reads. Everything is read at each request; nothing is
/// cached.
#[derive(Clone)]
pub struct Admin {
    /// This node's name.
    pub node: String,
    pub mesh: watch::Receiver<Arc<Snapshot>>,
    /// Where this node's pods stand, after each reconcile.
    pub pods: watch::Receiver<Arc<States>>,
    pub certificates: Certificates,
    pub logging: LogControl,
    pub ready: Readiness,
}

/// Binds `address` and serves the endpoint there in a task of its own,
/// which ends with the runtime. Returns the address bound (a port of 0
/// picks one). An address off loopback is served, with a warning: the
/// endpoint has no authentication.
pub async fn spawn(address: &str, admin: Admin) -> io::Result<SocketAddr> {
    let admin = Arc::new(admin);
    let bound = server::spawn(
        address,
        "the admin endpoint",
        Arc::new(move |request| answer(&admin, request)),
    )
    .await?;
    if !bound.ip().is_loopback() {
        warn!(
            address = %bound,
            "the admin endpoint listens beyond loopback; anyone who reaches it can read the \
             agent's view of the mesh and change its log level"
        );
    }
    Ok(bound)
}

fn answer(admin: &Admin, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(why) = from_the_node(request) {
        return text(StatusCode::FORBIDDEN, format!("{why}\n"));
    }
    let path = request.uri().path();
    let Some((_, methods)) = PATHS.iter().find(|(p, _)| *p == path) else {
        let paths: Vec<&str> = PATHS.iter().map(|(p, _)| *p).collect();
        return text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint; try {}\n", paths.join(", ")),
        );
    };
    let method = match request.method() {
        &Method::HEAD => &Method::GET,
        method => method,
    };
    if !methods.contains(method) {
        return not_allowed(methods);
    }
    match (path, method) {
        (CONFIG_DUMP_PATH, _) => json(&config_dump(admin)),
        (LOGGING_PATH, &Method::POST) => set_logging(admin, request.uri().query()),
        (LOGGING_PATH, _) => text(StatusCode::OK, format!("{}\n", admin.logging.filter())),
        _ => health::readiness(&admin.ready),
    }
}

/// Whether `request` comes from a client on this node asking as one. A web
/// page in a browser on the node could otherwise reach loopback: by a
/// cross-origin POST (browsers send `Origin` with it), or through a name it
/// controls that resolves to 127.0.0.1 (DNS rebinding: `Host` names it).
fn from_the_node<B>(request: &Request<B>) -> Result<(), &'static str> {
    if request.headers().contains_key(header::ORIGIN) {
        return Err("requests from web pages (with an Origin header) are refused");
    }
    // HTTP/1.1 clients all send one; an HTTP/1.0 client (no browser) may not.
    let Some(host) = request.headers().get(header::HOST) else {
        return Ok(());
    };
    let host = host.to_str().unwrap_or_default();
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err("the Host header must name this node's loopback (127.0.0.1, [::1] or localhost)")
    }
}

fn not_allowed(methods: &[Method]) -> Response<Full<Bytes>> {
    let allowed: Vec<&str> = methods
        .iter()
        .flat_map(|m| {
            if m == Method::GET {
                vec!["GET", "HEAD"]
            } else {
                vec![m.as_str()]
            }
        })
        .collect();
    let allowed = allowed.join(", ");
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("use {allowed} on this path\n"),
    );
    if let Ok(value) = HeaderValue::from_str(&allowed) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            reply(StatusCode::OK, "application/json", body.into())
        }
        // A Value always serializes; this is for the impossible case only.
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the dump: {e}\n"),
        ),
    }
}

/// `POST /logging?level=<filter>`, ztunnel's form.
fn set_logging(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
    let level = match level_parameter(query.unwrap_or_default()) {
        Ok(level) => level,
        Err(problem) => return text(StatusCode::BAD_REQUEST, format!("{problem}\n")),
    };
    match admin.logging.set_filter(&level) {
        // The change is logged by `set_filter`, before it takes effect.
        Ok(()) => text(StatusCode::OK, format!("{}\n", admin.logging.filter())),
        Err(problem) => text(
            StatusCode::BAD_REQUEST,
            format!("{problem}; the filter stays {:?}\n", admin.logging.filter()),
        ),
    }
}

/// The one `level` parameter of `query` (`application/x-www-form-urlencoded`,
/// as curl and browsers write it).
fn level_parameter(query: &str) -> Result<String, String> {
    let mut level = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != "level" {
            return Err(format!(
                "unknown parameter {name:?}; give the filter as ?level=<RUST_LOG filter>"
            ));
        }
        if level.is_some() {
            return Err("give the level parameter once".into());
        }
        level = Some(value.into_owned());
    }
    level.ok_or_else(|| "give the filter as ?level=<RUST_LOG filter>, e.g. ?level=debug".into())
}

//! The CA's metrics, under `warren_ca_`, for Prometheus (served by
//! `warren-ca serve --metrics-listen`, on warren-daemon's endpoint):
//!
//! - `warren_ca_certificates_signed_total{authentication}`: workload
//!   certificates signed, by how the node authenticated (`node_credential`
//!   or `token`).
//! - `warren_ca_requests_refused_total{reason}`: certificate requests
//!   refused, by [`RefusalReason`].
//! - `warren_ca_token_reviews_total{outcome}`: TokenReviews, by
//!   [`ReviewOutcome`] (on Kubernetes only).
//! - `warren_ca_connections_refused_total{reason}`: connections closed
//!   before any request, by [`ConnectionRefusal`].
//! - `warren_ca_open_connections`: connections holding a place under the
//!   connection limits (handshaking or serving).
//! - `warren_ca_certificate_expiry_seconds`: time left until the signing
//!   certificate, or one above it up to its root, expires (negative once it
//!   has), computed at each scrape; and
//!   `warren_ca_certificate_expiry_timestamp_seconds`, that moment.
//! - `warren_ca_build_info{version}`.
//!
//! Every label value is one of a closed set named here, never anything a
//! caller sent: a caller must not be able to add series (each costs the
//! monitoring system memory) or put words into an operator's dashboards.
//! Who was refused and why in full is in the CA's log. Each series of the
//! CA's mode exists, at zero, from the start, so that `rate()` and `increase()`
//! see the first refusal.

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};
use warren_daemon::metrics::Live;
use warren_pki::ca::CaError;

use crate::kubernetes::Refusal;

/// What every metric of the CA's name starts with.
pub const PREFIX: &str = "warren_ca";

/// Defines a closed set of label values: an enum, its members in order and
/// their names as Prometheus shows them.
macro_rules! label_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The label value: stable, snake_case.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $value,)+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_values! {
    /// How the CA's callers prove their node (the CA's `--workloads` or
    /// `--kubernetes` mode).
    pub enum Authentication {
        /// A node credential (mutual TLS).
        NodeCredential => "node_credential",
        /// The agent Pod's service-account token, reviewed by the API server.
        Token => "token",
    }
}

label_values! {
    /// Why a certificate request was refused, from the CA's typed errors.
    pub enum RefusalReason {
        /// No `authorization: Bearer <token>` header (Kubernetes).
        TokenMissing => "token_missing",
        /// The token is not valid: not a JWT, expired, for another audience,
        /// refused by the API server, or claiming an agent Pod that does not
        /// run.
        TokenInvalid => "token_invalid",
        /// A valid token, but not an agent's, not bound to a Pod, or its Pod
        /// gone, replaced, unscheduled or on another node than it claims.
        TokenDenied => "token_denied",
        /// The token could not be reviewed: the API server unreachable or
        /// forbidding the review (RBAC), or the CA's reviews all busy.
        TokenReviewUnavailable => "token_review_unavailable",
        /// The node credential expired while its connection was open.
        NodeCredentialExpired => "node_credential_expired",
        /// A negative validity_duration.
        InvalidValidity => "invalid_validity",
        /// A CSR over the policy's size limit.
        CsrTooLarge => "csr_too_large",
        /// A CSR that is not PEM, not PKCS#10, or whose signature fails.
        CsrMalformed => "csr_malformed",
        /// A CSR key the CA does not sign (weak RSA, an unsupported curve).
        CsrKeyRejected => "csr_key_rejected",
        /// A CSR that does not ask for exactly one workload SPIFFE ID.
        CsrIdentityInvalid => "csr_identity_invalid",
        /// A CSR for another trust domain (an agent configured for another
        /// one than the CA's).
        CsrForeignTrustDomain => "csr_foreign_trust_domain",
        /// The node runs no workload with the identity it asked for.
        NotAuthorized => "not_authorized",
        /// The CA failed: it cannot sign (its certificate expired, say), or
        /// lost a connection's identity.
        InternalError => "internal_error",
    }
}

impl RefusalReason {
    /// The refusal of `error`, which [`Authority::sign`] returned.
    ///
    /// [`Authority::sign`]: warren_pki::ca::Authority::sign
    pub fn of_ca_error(error: &CaError) -> Self {
        match error {
            CaError::Unauthorized { .. } => Self::NotAuthorized,
            CaError::CsrTooLarge { .. } => Self::CsrTooLarge,
            CaError::CsrNotPem(_) | CaError::CsrMalformed(_) | CaError::CsrSignature(_) => {
                Self::CsrMalformed
            }
            CaError::CsrKey(_) => Self::CsrKeyRejected,
            CaError::CsrNoSan
            | CaError::CsrExtraSan(_)
            | CaError::CsrSeveralUris(_)
            | CaError::CsrNotSpiffe { .. } => Self::CsrIdentityInvalid,
            CaError::CsrForeignTrustDomain { .. } => Self::CsrForeignTrustDomain,
            // A request's fault that pki learns to tell later is still one.
            error if error.is_bad_request() => Self::CsrMalformed,
            _ => Self::InternalError,
        }
    }

    /// The refusal of a caller the [`Authenticator`] did not authenticate.
    ///
    /// [`Authenticator`]: crate::kubernetes::Authenticator
    pub fn of_refusal(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::Unauthenticated(_) => Self::TokenInvalid,
            Refusal::Denied(_) => Self::TokenDenied,
            Refusal::Unavailable(_) => Self::TokenReviewUnavailable,
        }
    }

    /// The mode this reason can happen in; None: either.
    pub(crate) fn only_with(self) -> Option<Authentication> {
        match self {
            Self::TokenMissing
            | Self::TokenInvalid
            | Self::TokenDenied
            | Self::TokenReviewUnavailable => Some(Authentication::Token),
            Self::NodeCredentialExpired => Some(Authentication::NodeCredential),
            _ => None,
        }
    }
}

label_values! {
    /// What became of a token the CA meant to have reviewed.
    pub enum ReviewOutcome {
        /// The API server vouched for an agent's Pod-bound token.
        Accepted => "accepted",
        /// The API server did not accept the token, or it is not an agent's
        /// Pod-bound token for the CA's audience.
        Refused => "refused",
        /// The CA's service account may not create TokenReviews (RBAC).
        Forbidden => "forbidden",
        /// The API server could not be asked, or answered without a status.
        Error => "error",
        /// Not asked: the CA's reviews in flight were at their limit for too
        /// long (a flood of tokens, or a slow API server).
        Throttled => "throttled",
    }
}

label_values! {
    /// Why a connection was closed before it could carry a request.
    pub enum ConnectionRefusal {
        /// `--max-connections` reached.
        TooManyConnections => "too_many_connections",
        /// `--max-connections-per-address` reached for the client's address.
        TooManyFromAddress => "too_many_from_address",
        /// The TLS handshake failed (no or a foreign node credential, an old
        /// TLS version, not TLS at all), or left no node identity.
        HandshakeFailed => "handshake_failed",
        /// The client did not finish its handshake in time.
        HandshakeTimeout => "handshake_timeout",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SignedLabels {
    authentication: Authentication,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    reason: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReviewLabels {
    outcome: ReviewOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLabels {
    reason: ConnectionRefusal,
}

/// The CA's metrics. Cheap to clone; clones count together. The default
/// counts into no registry (tests, and the CA without `--metrics-listen`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    signed: Family<SignedLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    reviews: Family<ReviewLabels, Counter>,
    connections_refused: Family<ConnectionLabels, Counter>,
    open_connections: Gauge,
    /// When the CA's signing chain expires, once a server is made.
    expiry: Arc<RwLock<Option<SystemTime>>>,
}

impl Metrics {
    /// Metrics registered in `registry`, under [`PREFIX`].
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        for &reason in RefusalReason::ALL {
            if reason.only_with().is_none() {
                show(&metrics.refused, RefusedLabels { reason });
            }
        }
        for &reason in ConnectionRefusal::ALL {
            show(&metrics.connections_refused, ConnectionLabels { reason });
        }
        let registry = registry.sub_registry_with_prefix(PREFIX);
        registry.register(
            "certificates_signed",
            "Workload certificates signed, by how the node authenticated",
            metrics.signed.clone(),
        );
        registry.register(
            "requests_refused",
            "Certificate requests refused, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "token_reviews",
            "TokenReviews of agents' tokens, by outcome (throttled: not asked, too many in flight)",
            metrics.reviews.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before any request (connection limits, TLS handshake), by reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "open_connections",
            "Connections holding a place under the connection limits (handshaking or serving)",
            metrics.open_connections.clone(),
        );
        registry.register(
            "build",
            "The CA's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(Expiry(metrics.expiry.clone())));
        metrics
    }

    /// A server is about to serve callers who authenticate `how`, signing
    /// with a chain that expires at `not_after`: makes that mode's series.
    pub(crate) fn serving(&self, how: Authentication, not_after: SystemTime) {
        *self.expiry.write().unwrap_or_else(|p| p.into_inner()) = Some(not_after);
        show(
            &self.signed,
            SignedLabels {
                authentication: how,
            },
        );
        for &reason in RefusalReason::ALL {
            if reason.only_with() == Some(how) {
                show(&self.refused, RefusedLabels { reason });
            }
        }
        if how == Authentication::Token {
            for &outcome in ReviewOutcome::ALL {
                show(&self.reviews, ReviewLabels { outcome });
            }
        }
    }

    pub fn signed(&self, how: Authentication) {
        self.signed
            .get_or_create(&SignedLabels {
                authentication: how,
            })
            .inc();
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    pub fn reviewed(&self, outcome: ReviewOutcome) {
        self.reviews.get_or_create(&ReviewLabels { outcome }).inc();
    }

    pub fn connection_refused(&self, reason: ConnectionRefusal) {
        self.connections_refused
            .get_or_create(&ConnectionLabels { reason })
            .inc();
    }

    /// Counts a connection open until the guard is dropped.
    pub fn connection_opened(&self) -> Live {
        Live::new(&self.open_connections)
    }
}

/// Makes the series of `labels` in `family`, at zero.
fn show<S: Clone + Eq + std::hash::Hash>(family: &Family<S, Counter>, labels: S) {
    // The guard holds the family's lock: let it go at once.
    drop(family.get_or_create(&labels));
}

/// The signing chain's expiry, read at each scrape so that the time left is
/// current (the CA loads its certificates once, at start).
#[derive(Debug)]
struct Expiry(Arc<RwLock<Option<SystemTime>>>);

impl Collector for Expiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(not_after) = *self.0.read().unwrap_or_else(|p| p.into_inner()) else {
            return Ok(());
        };
        let at = unix_seconds(not_after);
        let left = at.saturating_sub(unix_seconds(SystemTime::now()));
        for (name, help, value) in [
            (
                "certificate_expiry",
                "Time left until the CA's signing certificate, or one above it, expires \
                 (negative once it has): give the CA new signing material before then",
                left,
            ),
            (
                "certificate_expiry_timestamp",
                "When the CA's signing certificate, or one above it, expires (Unix time)",
                at,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            let metric =
                encoder.encode_descriptor(name, help, Some(&Unit::Seconds), gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch, negative before it.
fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Reading metrics back as a scraper does, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use prometheus_client::registry::Registry;
    use prometheus_parse::{Scrape, Value};

    use super::{Authentication, RefusalReason};

    /// Every sample of `registry`'s exposition, parsed: value by metric name
    /// and labels (`name="value"`, sorted, comma-separated).
    pub fn samples(registry: &Registry) -> BTreeMap<(String, String), f64> {
        parse(&warren_daemon::metrics::exposition(registry).unwrap())
    }

    pub fn parse(text: &str) -> BTreeMap<(String, String), f64> {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        scrape
            .samples
            .into_iter()
            .map(|sample| {
                let value = match sample.value {
                    Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                    other => panic!("{}: unexpected {other:?}", sample.metric),
                };
                ((sample.metric, sample.labels.to_string()), value)
            })
            .collect()
    }

    /// The series of `metric` in `samples`, by their labels.
    pub fn series(
        samples: &BTreeMap<(String, String), f64>,
        metric: &str,
    ) -> BTreeMap<String, f64> {
        samples
            .iter()
            .filter(|((name, _), _)| name == metric)
            .map(|((_, labels), value)| (labels.clone(), *value))
            .collect()
    }

    /// The refusal reasons of a CA whose callers authenticate `how`.
    pub fn reasons_of(how: Authentication) -> impl Iterator<Item = &'static str> {
        RefusalReason::ALL
            .iter()
            .filter(move |r| r.only_with().is_none_or(|only| only == how))
            .map(|r| r.as_str())
    }

    /// `series` of a counter by one label: every value of the set at zero
    /// but `nonzero`.
    pub fn expected(
        label: &str,
        all: impl IntoIterator<Item = &'static str>,
        nonzero: &[(&str, f64)],
    ) -> BTreeMap<String, f64> {
        all.into_iter()
            .map(|value| {
                let count = nonzero
                    .iter()
                    .find(|(v, _)| *v == value)
                    .map_or(0.0, |(_, count)| *count);
                (format!("{label}=\"{value}\""), count)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use super::*;

    /// The signing chain's time left, as a scrape shows it.
    fn expiry_seconds(text: &str) -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix("warren_ca_certificate_expiry_seconds "))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn scrape(registry: &Registry) -> String {
        warren_daemon::metrics::exposition(registry).unwrap()
    }

    #[test]
    fn label_values_are_distinct_snake_case_names() {
        let all: Vec<&str> = (RefusalReason::ALL.iter().map(|r| r.as_str()))
            .chain(ConnectionRefusal::ALL.iter().map(|r| r.as_str()))
            .chain(ReviewOutcome::ALL.iter().map(|r| r.as_str()))
            .chain(Authentication::ALL.iter().map(|r| r.as_str()))
            .collect();
        for value in &all {
            assert!(
                !value.is_empty()
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                "{value:?}"
            );
        }
        let reasons: BTreeSet<_> = RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(reasons.len(), RefusalReason::ALL.len());
    }

    #[test]
    fn ca_errors_map_to_their_reasons() {
        let cases = [
            (
                CaError::CsrTooLarge {
                    size: 20_000,
                    max: 16_384,
                },
                "csr_too_large",
            ),
            (CaError::CsrNotPem("x".into()), "csr_malformed"),
            (CaError::CsrSignature("x".into()), "csr_malformed"),
            (
                CaError::CsrKey("RSA of 1024 bits".into()),
                "csr_key_rejected",
            ),
            (CaError::CsrNoSan, "csr_identity_invalid"),
            (CaError::CsrSeveralUris(2), "csr_identity_invalid"),
            (
                CaError::Unauthorized {
                    id: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
                    reason: "node-1 runs none".into(),
                },
                "not_authorized",
            ),
            (CaError::IssuerExpired, "internal_error"),
        ];
        for (error, reason) in cases {
            assert_eq!(
                RefusalReason::of_ca_error(&error).as_str(),
                reason,
                "{error}"
            );
        }
        // Whatever a token refusal says, its label is its kind's.
        for (refusal, reason) in [
            (
                Refusal::Unauthenticated("a \"quoted\" claim".into()),
                "token_invalid",
            ),
            (Refusal::Denied("pod x on node y".into()), "token_denied"),
            (
                Refusal::Unavailable("down".into()),
                "token_review_unavailable",
            ),
        ] {
            assert_eq!(RefusalReason::of_refusal(&refusal).as_str(), reason);
        }
    }

    #[test]
    fn each_mode_shows_its_series_from_the_start() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let text = scrape(&registry);
        assert!(
            text.contains("warren_ca_requests_refused_total{reason=\"not_authorized\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("token_missing"), "{text}");
        assert!(!text.contains("certificates_signed_total{"), "{text}");
        assert!(!text.contains("certificate_expiry"), "{text}");
        assert!(
            text.contains(&format!(
                "warren_ca_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );

        let expires = SystemTime::now() + Duration::from_secs(3600);
        metrics.serving(Authentication::Token, expires);
        let text = scrape(&registry);
        for series in [
            "warren_ca_certificates_signed_total{authentication=\"token\"} 0\n",
            "warren_ca_requests_refused_total{reason=\"token_missing\"} 0\n",
            "warren_ca_token_reviews_total{outcome=\"throttled\"} 0\n",
            "# UNIT warren_ca_certificate_expiry_seconds seconds\n",
        ] {
            assert!(text.contains(series), "{series:?} not in {text}");
        }
        assert!(!text.contains("node_credential"), "{text}");
        let left = expiry_seconds(&text);
        assert!((3590..=3600).contains(&left), "{left}");
        assert!(
            text.contains(&format!(
                "warren_ca_certificate_expiry_timestamp_seconds {}\n",
                unix_seconds(expires)
            )),
            "{text}"
        );

        // Past expiry, the time left goes negative rather than stopping at 0.
        metrics.serving(
            Authentication::Token,
            SystemTime::now() - Duration::from_secs(60),
        );
        let text = scrape(&registry);
        let left = expiry_seconds(&text);
        assert!((-70..=-60).contains(&left), "{left}");
    }

    #[test]
    fn open_connections_count_until_dropped() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let first = metrics.connection_opened();
        let second = metrics.connection_opened();
        assert!(scrape(&registry).contains("warren_ca_open_connections 2\n"));
        drop(first);
        assert!(scrape(&registry).contains("warren_ca_open_connections 1\n"));
        drop(second);
        assert!(scrape(&registry).contains("warren_ca_open_connections 0\n"));
    }
}

//! TokenReview: the API server says whose a token is, for which audience,
//! and which Pod it is bound to. Answers are remembered briefly, by the
//! token's SHA-256 (never the token itself): a positive one for the review
//! lifetime or until the token expires, whichever is first; a refusal for a
//! few seconds, so that a flood of bad tokens costs the API server little.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;

use super::{ObjectRef, Refusal, Settings};
use crate::metrics::{Metrics, ReviewOutcome};

/// A service-account token is about a kilobyte; anything much larger is not
/// one, and is refused before it is hashed or sent anywhere.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// How long a refusal by the API server is remembered.
const REFUSAL_LIFETIME: Duration = Duration::from_secs(10);
/// Accepted tokens remembered at most: a few per agent. When full, expired
/// ones go; if none has expired, the new answer is simply not remembered.
const MAX_ACCEPTED: usize = 16 * 1024;
/// Refused tokens remembered at most, apart from the accepted ones, so that
/// a flood of bad tokens cannot push agents' reviews out.
const MAX_REFUSED: usize = 1024;
/// Reviews in flight at most: whoever can reach the CA can send tokens, and
/// the CA must not turn a flood of them into a flood on the API server.
const MAX_REVIEWING: usize = 16;
/// How long a request waits for a review slot before it is answered
/// UNAVAILABLE (the agent retries), rather than queueing without bound.
const REVIEW_QUEUE_WAIT: Duration = Duration::from_secs(2);

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Given by API servers from 1.32 on; older ones tell the node only through
/// the Pod.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// What a reviewed token says of its holder, once it is known to be the
/// agents' service account's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub pod_name: String,
    pub pod_uid: String,
    /// The node claim, where the API server gives one.
    pub node_name: Option<String>,
}

struct Remembered {
    outcome: Result<Bound, Refusal>,
    until: Instant,
}

pub struct Reviewer {
    api: Api<TokenReview>,
    settings: Settings,
    accepted: Mutex<HashMap<[u8; 32], Remembered>>,
    refused: Mutex<HashMap<[u8; 32], Remembered>>,
    reviewing: Semaphore,
    metrics: Metrics,
}

impl Reviewer {
    pub fn new(client: Client, settings: Settings, metrics: Metrics) -> Self {
        Self {
            api: Api::all(client),
            settings,
            accepted: Mutex::default(),
            refused: Mutex::default(),
            reviewing: Semaphore::new(MAX_REVIEWING),
            metrics,
        }
    }

    /// Reviews `token` (or recalls a recent review of it).
    pub async fn review(&self, token: &str) -> Result<Bound, Refusal> {
        if token.is_empty() {
            return Err(Refusal::Unauthenticated(
                "no service-account token: send `authorization: Bearer <token>`".into(),
            ));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Unauthenticated(format!(
                "the token is {} bytes, more than a service-account token's {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        // A service-account token is a JWT: three base64url parts. Anything
        // else is refused here, without asking the API server.
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3
            || parts.iter().any(|part| {
                part.is_empty()
                    || !part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
        {
            return Err(Refusal::Unauthenticated(
                "the token is not a JWT, as service-account tokens are".into(),
            ));
        }
        let key = digest(token);
        let now = Instant::now();
        for remembered in [&self.accepted, &self.refused] {
            if let Some(remembered) = lock(remembered).get(&key)
                && remembered.until > now
            {
                return remembered.outcome.clone();
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.settings.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let Ok(Ok(_permit)) =
            tokio::time::timeout(REVIEW_QUEUE_WAIT, self.reviewing.acquire()).await
        else {
            self.metrics.reviewed(ReviewOutcome::Throttled);
            return Err(Refusal::Unavailable(
                "the CA is busy reviewing other tokens; try again".into(),
            ));
        };
        let answer = match self.api.create(&PostParams::default(), &review).await {
            Ok(answer) => answer,
            Err(kube::Error::Api(status)) if status.is_forbidden() => {
                self.metrics.reviewed(ReviewOutcome::Forbidden);
                return Err(Refusal::Unavailable(format!(
                    "the CA's service account may not create TokenReviews (RBAC, see deploy/): \
                     {}",
                    status.message
                )));
            }
            Err(error) => {
                self.metrics.reviewed(ReviewOutcome::Error);
                return Err(Refusal::Unavailable(format!(
                    "cannot review the token with the API server, and no recent review of it \
                     is remembered: {error}"
                )));
            }
        };
        let outcome = interpret(answer.status.as_ref(), &self.settings);
        self.metrics.reviewed(match &outcome {
            Ok(_) => ReviewOutcome::Accepted,
            Err(Refusal::Unavailable(_)) => ReviewOutcome::Error,
            Err(_) => ReviewOutcome::Refused,
        });
        let until = match &outcome {
            Ok(_) => {
                let expires_in = expiry(token)
                    .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::ZERO);
                now + self.settings.review_lifetime.min(expires_in)
            }
            Err(_) => now + REFUSAL_LIFETIME,
        };
        self.remember(key, outcome.clone(), until, now);
        outcome
    }

    fn remember(
        &self,
        key: [u8; 32],
        outcome: Result<Bound, Refusal>,
        until: Instant,
        now: Instant,
    ) {
        if until <= now {
            return;
        }
        let (table, max) = match outcome {
            Ok(_) => (&self.accepted, MAX_ACCEPTED),
            Err(_) => (&self.refused, MAX_REFUSED),
        };
        let mut remembered = lock(table);
        if remembered.len() >= max {
            remembered.retain(|_, r| r.until > now);
        }
        if remembered.len() < max {
            remembered.insert(key, Remembered { outcome, until });
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the API server's answer means for a caller that must be an agent
/// with a Pod-bound token for our audience.
pub fn interpret(
    status: Option<&TokenReviewStatus>,
    settings: &Settings,
) -> Result<Bound, Refusal> {
    let Some(status) = status else {
        return Err(Refusal::Unavailable(
            "the API server answered the TokenReview without a status".into(),
        ));
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("no reason given");
        return Err(Refusal::Unauthenticated(format!(
            "the API server does not accept the token: {why}"
        )));
    }
    let audience = &settings.audience;
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(Refusal::Unauthenticated(format!(
            "the token is not for audience {audience}"
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let agent: &ObjectRef = &settings.agent;
    if username != agent.service_account_user() {
        return Err(Refusal::Denied(format!(
            "the token is {username:?}'s, not the agents' service account {agent}'s"
        )));
    }
    let extra = |key: &str| -> Option<String> {
        match user?.extra.as_ref()?.get(key)?.as_slice() {
            [one] if !one.is_empty() => Some(one.clone()),
            _ => None,
        }
    };
    let (Some(pod_name), Some(pod_uid)) = (extra(POD_NAME), extra(POD_UID)) else {
        return Err(Refusal::Denied(
            "the token is not bound to a pod: agents present the projected token of their \
             pod (a serviceAccountToken volume), not a long-lived one"
                .into(),
        ));
    };
    Ok(Bound {
        pod_name,
        pod_uid,
        node_name: extra(NODE_NAME),
    })
}

/// How long past `exp` a token is still taken for unexpired, as the API
/// server does.
const EXPIRY_LEEWAY: Duration = Duration::from_secs(60);

/// A Pod's name: a DNS subdomain (RFC 1123), as Kubernetes requires.
fn is_pod_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// A Kubernetes UID: a UUID's hex digits and dashes.
fn is_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// A JWT's claims, read without checking its signature: never a reason to
/// accept a token, only to refuse one early or to bound how long a review
/// the API server gave is remembered.
pub fn claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// When a JWT says it expires (`exp`), unchecked (see [`claims`]). None if
/// it cannot be read.
pub fn expiry(token: &str) -> Option<SystemTime> {
    let seconds = claims(token)?.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// What an agent's token must claim, unchecked (see [`claims`]): the agents'
/// service account, our audience, not expired, and bound to the Pod `pod`
/// with UID `uid` — which the caller looks up among running agent Pods. A
/// token that claims otherwise would be refused by the review anyway, so it
/// is refused without one: forging tokens costs the API server nothing.
/// Returns the Pod's name and UID the token claims.
pub fn claimed_agent_pod(token: &str, settings: &Settings) -> Result<(String, String), Refusal> {
    let unlike = |why: &str| {
        Refusal::Unauthenticated(format!(
            "the token is not an agent's pod-bound token: {why}"
        ))
    };
    let claims = claims(token).ok_or_else(|| unlike("its claims cannot be read"))?;
    if claims["sub"] != settings.agent.service_account_user() {
        return Err(unlike("another subject"));
    }
    let audience = settings.audience.as_str();
    let for_us = match &claims["aud"] {
        serde_json::Value::String(one) => one == audience,
        serde_json::Value::Array(all) => all.iter().any(|a| a == audience),
        _ => false,
    };
    if !for_us {
        return Err(unlike(&format!("not for audience {audience}")));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The API server allows for clock skew past `exp`: so do we, or a CA
    // whose clock runs ahead would refuse tokens the review accepts.
    if claims["exp"]
        .as_u64()
        .is_none_or(|exp| exp.saturating_add(EXPIRY_LEEWAY.as_secs()) <= now)
    {
        return Err(unlike("expired"));
    }
    let pod = &claims["kubernetes.io"]["pod"];
    match (pod["name"].as_str(), pod["uid"].as_str()) {
        (Some(name), Some(uid)) if is_pod_name(name) && is_uid(uid) => {
            Ok((name.to_owned(), uid.to_owned()))
        }
        // Also keeps whatever a forger puts there out of the refusal's log
        // line.
        (Some(_), Some(_)) => Err(unlike("its pod's name or UID is malformed")),
        _ => Err(unlike("not bound to a pod")),
    }
}

fn digest(token: &str) -> [u8; 32] {
    let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(hash.as_ref());
    key
}

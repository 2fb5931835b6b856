//! The parts that need no API server: what a review's answer means, the Pod
//! table, token expiry; and, against a fake API server that gives one
//! answer to everything, what reviews are counted as. The end-to-end suite
//! (tests/tests/kubernetes_ca.rs) runs the whole path against a real API
//! server with real tokens. The service's tests use the helpers here.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::Engine;
use k8s_openapi::{
    api::{
        authentication::v1::{TokenReview, TokenReviewStatus, UserInfo},
        core::v1::{Pod, PodSpec, PodStatus},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher::Event;

use super::{ObjectRef, Pods, Refusal, Settings, reviews};
use crate::metrics::{Metrics, testing};

pub(crate) fn settings() -> Settings {
    Settings {
        agent: ObjectRef::parse("--agent-service-account", "warren-system/warren-agent").unwrap(),
        audience: "warren-ca".into(),
        review_lifetime: Duration::from_secs(300),
    }
}

fn status(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        user: Some(UserInfo {
            username: Some(username.into()),
            extra: Some(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..UserInfo::default()
        }),
        error: None,
    }
}

const AGENT: &str = "system:serviceaccount:warren-system:warren-agent";
const POD: (&str, &str) = (
    "authentication.kubernetes.io/pod-name",
    "warren-agent-abcde",
);
const UID: (&str, &str) = ("authentication.kubernetes.io/pod-uid", "1234");

#[test]
fn an_agents_pod_bound_token_is_accepted() {
    let bound = reviews::interpret(
        Some(&status(AGENT, &["warren-ca"], &[POD, UID])),
        &settings(),
    )
    .unwrap();
    assert_eq!(bound.pod_name, "warren-agent-abcde");
    assert_eq!(bound.pod_uid, "1234");
    assert_eq!(bound.node_name, None);
    let with_node = status(
        AGENT,
        &["warren-ca"],
        &[
            POD,
            UID,
            ("authentication.kubernetes.io/node-name", "node-1"),
        ],
    );
    let bound = reviews::interpret(Some(&with_node), &settings()).unwrap();
    assert_eq!(bound.node_name.as_deref(), Some("node-1"));
}

#[test]
fn refusals_say_why() {
    let settings = settings();
    let refused =
        |status: TokenReviewStatus| reviews::interpret(Some(&status), &settings).unwrap_err();

    let mut invalid = status(AGENT, &["warren-ca"], &[POD, UID]);
    invalid.authenticated = Some(false);
    invalid.error = Some("token has expired".into());
    assert_eq!(
        refused(invalid),
        Refusal::Unauthenticated(
            "the API server does not accept the token: token has expired".into()
        )
    );
    assert!(matches!(
        refused(status(AGENT, &["kubernetes"], &[POD, UID])),
        Refusal::Unauthenticated(why) if why.contains("not for audience warren-ca")
    ));
    assert!(matches!(
        refused(status("system:serviceaccount:default:default", &["warren-ca"], &[POD, UID])),
        Refusal::Denied(why) if why.contains("not the agents' service account warren-system/warren-agent")
    ));
    // Same name in another namespace is another service account.
    assert!(matches!(
        refused(status(
            "system:serviceaccount:other:warren-agent",
            &["warren-ca"],
            &[POD, UID]
        )),
        Refusal::Denied(_)
    ));
    assert!(matches!(
        refused(status(AGENT, &["warren-ca"], &[])),
        Refusal::Denied(why) if why.contains("not bound to a pod")
    ));
    assert!(matches!(
        reviews::interpret(None, &settings).unwrap_err(),
        Refusal::Unavailable(_)
    ));
}

#[test]
fn expiry_is_read_from_the_claims() {
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"aud":["warren-ca"],"exp":2000000000,"sub":"x"}"#);
    let token = format!("e30.{claims}.c2ln");
    assert_eq!(
        reviews::expiry(&token),
        Some(std::time::UNIX_EPOCH + Duration::from_secs(2_000_000_000))
    );
    assert_eq!(reviews::expiry("not a jwt"), None);
    assert_eq!(reviews::expiry("a.!!!.c"), None);
}

pub(crate) fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    sa: Option<&str>,
    node: Option<&str>,
    phase: &str,
) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: sa.map(Into::into),
            node_name: node.map(Into::into),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        }),
    }
}

#[test]
fn pods_place_service_accounts_on_nodes() {
    let pods = Pods::default();
    assert!(!pods.synced());
    pods.apply(Event::Init);
    pods.apply(Event::InitApply(pod(
        "shop",
        "web-1",
        "u1",
        Some("web"),
        Some("node-1"),
        "Running",
    )));
    pods.apply(Event::InitApply(pod(
        "shop",
        "web-2",
        "u2",
        Some("web"),
        Some("node-1"),
        "Running",
    )));
    pods.apply(Event::InitApply(pod(
        "shop",
        "batch",
        "u3",
        Some("default"),
        Some("node-2"),
        "Succeeded",
    )));
    pods.apply(Event::InitApply(pod(
        "shop",
        "pending",
        "u4",
        Some("db"),
        None,
        "Pending",
    )));
    assert!(
        !pods.runs_on("node-1", "shop", "web"),
        "not before the list completes"
    );
    pods.apply(Event::InitDone);
    assert!(pods.synced());
    assert!(pods.runs_on("node-1", "shop", "web"));
    assert!(!pods.runs_on("node-2", "shop", "web"));
    assert!(
        !pods.runs_on("node-2", "shop", "default"),
        "finished pods run nothing"
    );
    assert!(
        !pods.runs_on("node-1", "shop", "db"),
        "unscheduled pods run nowhere"
    );

    // One of two pods goes: the placement stays; the second goes: it is gone.
    pods.apply(Event::Delete(pod(
        "shop",
        "web-1",
        "u1",
        Some("web"),
        Some("node-1"),
        "Running",
    )));
    assert!(pods.runs_on("node-1", "shop", "web"));
    pods.apply(Event::Apply(pod(
        "shop",
        "web-2",
        "u2",
        Some("web"),
        Some("node-1"),
        "Failed",
    )));
    assert!(!pods.runs_on("node-1", "shop", "web"));

    // Scheduling places it.
    pods.apply(Event::Apply(pod(
        "shop",
        "pending",
        "u4",
        Some("default"),
        Some("node-2"),
        "Running",
    )));
    assert!(pods.runs_on("node-2", "shop", "default"));
    let agent = ObjectRef::parse("pod", "shop/pending").unwrap();
    assert_eq!(pods.agent_pod(&agent).unwrap().uid, "u4");

    // A relist replaces the view whole, and only when complete.
    pods.apply(Event::Init);
    pods.apply(Event::InitApply(pod(
        "shop",
        "web-3",
        "u5",
        Some("web"),
        Some("node-3"),
        "Running",
    )));
    assert!(
        pods.runs_on("node-2", "shop", "default"),
        "old view in force during a relist"
    );
    pods.apply(Event::InitDone);
    assert!(!pods.runs_on("node-2", "shop", "default"));
    assert!(pods.agent_pod(&agent).is_none());
    assert!(pods.runs_on("node-3", "shop", "web"));
}

#[test]
fn object_refs_are_namespace_slash_name() {
    assert!(ObjectRef::parse("x", "warren-system/warren-agent").is_ok());
    for bad in ["warren-agent", "/a", "a/", "a/b/c", ""] {
        let error = ObjectRef::parse("--agent-service-account", bad).unwrap_err();
        assert!(
            error.to_string().contains("--agent-service-account"),
            "{error}"
        );
    }
}

/// Tokens that are not JWTs, empty or huge are refused before the API server
/// is asked: this reviewer's API server does not exist, and asking it would
/// answer Unavailable.
#[tokio::test]
async fn obvious_garbage_never_reaches_the_api_server() {
    let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
    let mut registry = prometheus_client::registry::Registry::default();
    let reviewer = super::Reviewer::new(
        kube::Client::try_from(config).unwrap(),
        settings(),
        Metrics::new(&mut registry),
    );
    let reviews = || {
        testing::series(
            &testing::samples(&registry),
            "warren_ca_token_reviews_total",
        )
    };
    let huge = format!("a.{}.c", "b".repeat(reviews::MAX_TOKEN_BYTES));
    for token in [
        "",
        "garbage",
        "a.b",
        "a..c",
        "a.b.c.d",
        "a.b!.c",
        huge.as_str(),
    ] {
        let refusal = reviewer.review(token).await.unwrap_err();
        assert!(
            matches!(refusal, Refusal::Unauthenticated(_)),
            "{token:.20}: {refusal:?}"
        );
    }
    assert!(reviews().is_empty(), "{:?}", reviews());
    // A well-formed token does go to the (absent) API server.
    let refusal = reviewer.review("a.b.c").await.unwrap_err();
    assert!(matches!(refusal, Refusal::Unavailable(_)), "{refusal:?}");
    assert_eq!(reviews()["outcome=\"error\""], 1.0);
}

/// What a node's kubelet can make on its own (a mirror Pod, in any
/// namespace, without a service account) places no identity on its node; a
/// Pod without a service account is not taken for `default`.
#[test]
fn mirror_pods_and_pods_without_service_account_vouch_for_nothing() {
    let pods = Pods::default();
    pods.apply(Event::Init);
    pods.apply(Event::InitDone);
    let mut mirror = pod(
        "payments",
        "x-node-a",
        "m1",
        Some("api"),
        Some("node-a"),
        "Running",
    );
    mirror.metadata.annotations = Some(
        [("kubernetes.io/config.mirror".to_owned(), "abc".to_owned())]
            .into_iter()
            .collect(),
    );
    pods.apply(Event::Apply(mirror));
    assert!(!pods.runs_on("node-a", "payments", "api"));
    assert!(
        pods.agent_pod(&ObjectRef::parse("pod", "payments/x-node-a").unwrap())
            .is_none()
    );
    for sa in [None, Some("")] {
        pods.apply(Event::Apply(pod(
            "payments",
            "y",
            "y1",
            sa,
            Some("node-a"),
            "Pending",
        )));
        assert!(!pods.runs_on("node-a", "payments", "default"), "{sa:?}");
        assert!(!pods.runs_on("node-a", "payments", ""), "{sa:?}");
    }
}

/// An agent Pod being deleted no longer vouches for its token, even while
/// its node has not confirmed the deletion; the workloads of a Terminating
/// pod still run meanwhile.
#[test]
fn a_terminating_agent_pod_is_gone_for_authentication() {
    let pods = Pods::default();
    pods.apply(Event::Init);
    pods.apply(Event::InitDone);
    let mut agent = pod(
        "warren-system",
        "warren-agent-a",
        "a1",
        Some("warren-agent"),
        Some("node-a"),
        "Running",
    );
    pods.apply(Event::Apply(agent.clone()));
    let key = ObjectRef::parse("pod", "warren-system/warren-agent-a").unwrap();
    assert!(pods.agent_pod(&key).is_some());
    agent.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    pods.apply(Event::Apply(agent));
    assert!(pods.agent_pod(&key).is_none());
    assert!(pods.runs_on("node-a", "warren-system", "warren-agent"));
}

pub(crate) fn jwt(claims: serde_json::Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!("{}.{}.c2ln", b64(b"{}"), b64(claims.to_string().as_bytes()))
}

/// Only a token whose claims could pass the review is reviewed.
#[test]
fn claims_that_could_not_pass_are_refused_before_any_review() {
    let settings = settings();
    let good = serde_json::json!({
        "sub": AGENT,
        "aud": ["warren-ca"],
        "exp": 4_000_000_000u64,
        "kubernetes.io": {"pod": {"name": "warren-agent-abcde", "uid": "1234"}},
    });
    assert_eq!(
        reviews::claimed_agent_pod(&jwt(good.clone()), &settings).unwrap(),
        ("warren-agent-abcde".to_owned(), "1234".to_owned())
    );
    // Within the API server's leeway past `exp`, as it would accept it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut just_expired = good.clone();
    just_expired["exp"] = (now - 10).into();
    assert!(reviews::claimed_agent_pod(&jwt(just_expired), &settings).is_ok());
    let mut one_audience = good.clone();
    one_audience["aud"] = "warren-ca".into();
    assert!(reviews::claimed_agent_pod(&jwt(one_audience), &settings).is_ok());
    let cases = [
        (
            "sub",
            serde_json::json!("system:serviceaccount:default:default"),
            "another subject",
        ),
        ("aud", serde_json::json!(["kubernetes"]), "not for audience"),
        ("exp", serde_json::json!(1000), "expired"),
        ("kubernetes.io", serde_json::json!({}), "not bound to a pod"),
        (
            "kubernetes.io",
            serde_json::json!({"pod": {"name": "Not A Name\n", "uid": "1234"}}),
            "malformed",
        ),
        (
            "kubernetes.io",
            serde_json::json!({"pod": {"name": "warren-agent-abcde", "uid": "x".repeat(5000)}}),
            "malformed",
        ),
    ];
    for (claim, value, why) in cases {
        let mut claims = good.clone();
        claims[claim] = value;
        let refusal = reviews::claimed_agent_pod(&jwt(claims), &settings).unwrap_err();
        assert!(
            matches!(&refusal, Refusal::Unauthenticated(reason) if reason.contains(why)),
            "{claim}: {refusal:?}"
        );
    }
}

/// A projected token of the agent Pod `name` (UID `uid`), unsigned: only
/// the (fake) API server's review vouches for it.
pub(crate) fn agent_token(name: &str, uid: &str) -> String {
    jwt(serde_json::json!({
        "sub": AGENT,
        "aud": ["warren-ca"],
        "exp": 4_000_000_000u64,
        "kubernetes.io": {"pod": {"name": name, "uid": uid}},
    }))
}

/// The API server's answer to a review of `agent_token(name, uid)`.
pub(crate) fn review_of_agent(name: &str, uid: &str) -> String {
    let review = TokenReview {
        status: Some(status(
            AGENT,
            &["warren-ca"],
            &[(POD.0, name), (UID.0, uid)],
        )),
        ..TokenReview::default()
    };
    serde_json::to_string(&review).unwrap()
}

/// An API server that answers every request with `status` and `body`, and
/// a client of it. It cannot tell one token from another: each test asks it
/// the one question it has the answer to.
pub(crate) async fn fake_api_server(status: u16, body: String) -> kube::Client {
    let status = http::StatusCode::from_u16(status).unwrap();
    let address = warren_daemon::http::spawn(
        "127.0.0.1:0",
        "a fake API server",
        Arc::new(move |_| {
            warren_daemon::http::reply(status, "application/json", body.clone().into())
        }),
    )
    .await
    .unwrap();
    let config = kube::Config::new(format!("http://{address}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn reviews_are_counted_by_outcome_and_recalled_ones_not_at_all() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let reviewer = |client| reviews::Reviewer::new(client, settings(), metrics.clone());
    let token = agent_token("warren-agent-a", "a1");

    let accepting = reviewer(fake_api_server(201, review_of_agent("warren-agent-a", "a1")).await);
    for _ in 0..3 {
        let bound = accepting.review(&token).await.unwrap();
        assert_eq!(bound.pod_uid, "a1");
    }

    let mut refusal = TokenReview {
        status: Some(status(AGENT, &["warren-ca"], &[POD, UID])),
        ..TokenReview::default()
    };
    let answer = refusal.status.as_mut().unwrap();
    answer.authenticated = Some(false);
    answer.error = Some("token has expired".into());
    let refusing = reviewer(fake_api_server(201, serde_json::to_string(&refusal).unwrap()).await);
    for _ in 0..2 {
        let refused = refusing.review(&token).await.unwrap_err();
        assert!(
            matches!(refused, Refusal::Unauthenticated(_)),
            "{refused:?}"
        );
    }

    let forbidden = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "tokenreviews.authentication.k8s.io is forbidden", "reason": "Forbidden",
        "code": 403,
    });
    let forbidding = reviewer(fake_api_server(403, forbidden.to_string()).await);
    let refused = forbidding.review(&token).await.unwrap_err();
    assert!(
        matches!(&refused, Refusal::Unavailable(why) if why.contains("RBAC")),
        "{refused:?}"
    );

    let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
    let unreachable = reviewer(kube::Client::try_from(config).unwrap());
    let refused = unreachable.review(&token).await.unwrap_err();
    assert!(matches!(refused, Refusal::Unavailable(_)), "{refused:?}");

    // Remembered answers are not reviews: one of each.
    assert_eq!(
        testing::series(
            &testing::samples(&registry),
            "warren_ca_token_reviews_total"
        ),
        [
            ("accepted", 1.0),
            ("refused", 1.0),
            ("forbidden", 1.0),
            ("error", 1.0)
        ]
        .into_iter()
        .map(|(outcome, n)| (format!("outcome=\"{outcome}\""), n))
        .collect()
    );
}

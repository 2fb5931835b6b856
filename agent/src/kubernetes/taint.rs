//! The node taint that keeps pods off a node until its agent is ready:
//! [`NOT_READY_TAINT`]. The operator puts it on nodes as they register
//! (kubelet `--register-with-taints=warren.io/agent-not-ready=:NoSchedule`)
//! or by hand; the agent removes it from its own node once it is ready
//! ([`remove_when_ready`]), and never puts it back.
//!
//! The removal is race-safe: a JSON patch that first tests the Node's
//! `resourceVersion`, so that a taint someone else adds or changes between
//! the agent's read and its write is never lost. Only taints with this key
//! are removed; every other one stays, as it was and where it was.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use warren_daemon::logging::Chain;

/// The taint's key. Any effect counts: the agent removes it whether it was
/// registered `NoSchedule` (the documented way) or `NoExecute`.
pub const NOT_READY_TAINT: &str = "warren.io/agent-not-ready";

/// How many times [`remove_not_ready_taint`] reads the Node again when it
/// changed between the read and the patch. Nodes change often (the kubelet's
/// status updates do not touch `spec`, but they do bump `resourceVersion`),
/// so one conflict is ordinary; five in a row means something rewrites the
/// node continuously, and the caller's backoff is the better pace.
const CONFLICT_ATTEMPTS: usize = 5;

/// [`remove_when_ready`]'s first pause after a failure, doubled on each
/// failure up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What [`remove_not_ready_taint`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The node carried the taint; it no longer does.
    Removed,
    /// The node did not carry it (never registered with it, or removed
    /// before): nothing was written.
    WasAbsent,
}

#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    #[error("reading node {node}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("removing the {NOT_READY_TAINT} taint from node {node}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
    /// A 403: retrying helps only once someone fixes the role.
    #[error(
        "{verb} node {node}: forbidden (403); the agent's RBAC lacks `nodes get/patch` (see \
         deploy/kustomize/base/agent/rbac.yaml)"
    )]
    Forbidden {
        node: String,
        /// `get` or `patch`.
        verb: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("node {node} has no metadata.resourceVersion, so it cannot be patched race-safely")]
    NoResourceVersion { node: String },
    /// The last refusal is kept: a 422 that was not a failed `test` (the
    /// Node refused as invalid) shows there.
    #[error(
        "patching node {node} was refused {attempts} times in a row as the node had changed \
         since it was read (409, or 422 from the resourceVersion test); the {NOT_READY_TAINT} \
         taint is still there"
    )]
    Conflicts {
        node: String,
        attempts: usize,
        /// The last refusal (409 or 422).
        #[source]
        source: kube::Error,
    },
}

impl TaintError {
    /// Whether RBAC refused the request (403).
    pub fn forbidden(&self) -> bool {
        matches!(self, Self::Forbidden { .. })
    }
}

/// Removes every taint keyed [`NOT_READY_TAINT`] (whatever its effect) from
/// the Node `node`, leaving its other taints as they were and in their
/// order. Reads the Node, then patches it only if it has not changed since
/// (a JSON patch testing `metadata.resourceVersion`); if it has, reads it
/// again, up to [`CONFLICT_ATTEMPTS`] times.
pub async fn remove_not_ready_taint(client: &Client, node: &str) -> Result<Removed, TaintError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = nodes.get(node).await.map_err(|source| {
            refusal(node, "get", source, |node, source| TaintError::Get {
                node,
                source,
            })
        })?;
        let resource_version = current
            .metadata
            .resource_version
            .as_deref()
            .ok_or_else(|| TaintError::NoResourceVersion {
                node: node.to_owned(),
            })?;
        let taints = current
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_deref())
            .unwrap_or_default();
        let Some(patch) = removal_patch(resource_version, taints) else {
            return Ok(Removed::WasAbsent);
        };
        // The patch is built here as JSON: kube takes json-patch's type,
        // which deserializes from exactly this shape.
        let patch = serde_json::from_value(patch).expect("removal_patch makes a valid JSON patch");
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => return Ok(Removed::Removed),
            // The `test` of the resourceVersion failed (422), or the node
            // changed while the server applied the patch (409): read again.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                let source = kube::Error::Api(status);
                if attempt >= CONFLICT_ATTEMPTS {
                    return Err(TaintError::Conflicts {
                        node: node.to_owned(),
                        attempts: attempt,
                        source,
                    });
                }
                debug!(
                    node,
                    error = %source,
                    "the node changed before the taint was removed; reading it again"
                );
            }
            Err(source) => {
                return Err(refusal(node, "patch", source, |node, source| {
                    TaintError::Patch { node, source }
                }));
            }
        }
    }
}

/// A 403 as [`TaintError::Forbidden`], anything else as `other`.
fn refusal(
    node: &str,
    verb: &'static str,
    source: kube::Error,
    other: fn(String, kube::Error) -> TaintError,
) -> TaintError {
    let node = node.to_owned();
    match &source {
        kube::Error::Api(status) if status.is_forbidden() => {
            TaintError::Forbidden { node, verb, source }
        }
        _ => other(node, source),
    }
}

/// The JSON patch (RFC 6902) that removes every taint keyed
/// [`NOT_READY_TAINT`] from `taints`, a Node's `spec.taints` at
/// `resource_version`, and applies only to that version; `None` if no taint
/// has that key.
///
/// The whole list is replaced by what remains (or removed, when nothing
/// does), rather than entries removed by index: with the version tested the
/// two are equally safe, and the replacement says in one operation what the
/// node ends up with.
fn removal_patch(resource_version: &str, taints: &[Taint]) -> Option<Value> {
    if !taints.iter().any(|taint| taint.key == NOT_READY_TAINT) {
        return None;
    }
    let kept: Vec<&Taint> = taints
        .iter()
        .filter(|taint| taint.key != NOT_READY_TAINT)
        .collect();
    let test =
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": resource_version});
    let change = if kept.is_empty() {
        json!({"op": "remove", "path": "/spec/taints"})
    } else {
        json!({"op": "replace", "path": "/spec/taints", "value": kept})
    };
    Some(json!([test, change]))
}

/// Once `ready` says true, removes [`NOT_READY_TAINT`] from the Node `node`
/// ([`remove_not_ready_taint`]), retrying forever with backoff (from 1 s,
/// doubling, up to 30 s): an API server that is away comes back, and a role
/// that lacks the grant may be fixed. Returns once the taint is gone, or if
/// `ready`'s sender goes before the agent was ever ready (it is stopping).
///
/// It never puts the taint back, not when the agent becomes unready later
/// nor when it stops: pods already on the node stay pinned by their eBPF
/// programs and fail closed while their agent is away, so a restart needs
/// no taint; and tainting a node whose agent is gone is the node
/// lifecycle's job (the operator's, or registration's), which does not
/// depend on the agent being alive to do it.
pub async fn remove_when_ready(client: Client, node: String, mut ready: watch::Receiver<bool>) {
    if ready.wait_for(|ready| *ready).await.is_err() {
        debug!(
            node,
            "the agent stopped before it was ready; the {NOT_READY_TAINT} taint is left as it is"
        );
        return;
    }
    let mut retry = FIRST_RETRY;
    loop {
        match remove_not_ready_taint(&client, &node).await {
            Ok(Removed::Removed) => {
                info!(
                    node,
                    "removed the warren.io/agent-not-ready taint: pods may be scheduled here"
                );
                return;
            }
            Ok(Removed::WasAbsent) => {
                debug!(
                    node,
                    "the node does not carry the warren.io/agent-not-ready taint"
                );
                return;
            }
            // The error says which grant is missing; this says why it
            // matters. Retried all the same: roles get fixed.
            Err(error) if error.forbidden() => warn!(
                node,
                error = %Chain(&error),
                "the agent may not remove the warren.io/agent-not-ready taint (RBAC lacks `nodes \
                 get/patch`); no new pod is scheduled here until it can, retrying"
            ),
            Err(error) => warn!(
                node,
                error = %Chain(&error),
                "cannot remove the warren.io/agent-not-ready taint yet; no new pod is scheduled \
                 here until it is, retrying"
            ),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Taint::default()
        }
    }

    #[test]
    fn nothing_to_patch_without_the_taint() {
        assert_eq!(removal_patch("7", &[]), None);
        let others = [
            taint("node.kubernetes.io/not-ready", "NoExecute"),
            // A key that merely starts like ours is not ours.
            taint("warren.io/agent-not-ready-soon", "NoSchedule"),
        ];
        assert_eq!(removal_patch("7", &others), None);
    }

    #[test]
    fn the_only_taint_removes_the_list() {
        assert_eq!(
            removal_patch("42", &[taint(NOT_READY_TAINT, "NoSchedule")]),
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "remove", "path": "/spec/taints"},
            ]))
        );
    }

    #[test]
    fn others_are_kept_whole_and_in_order() {
        let mut dedicated = taint("dedicated", "NoSchedule");
        dedicated.value = Some("gpu".into());
        let mut unreachable = taint("node.kubernetes.io/unreachable", "NoExecute");
        unreachable.time_added = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2024-05-01T10:00:00Z".parse().unwrap(),
        ));
        let taints = [dedicated, taint(NOT_READY_TAINT, "NoSchedule"), unreachable];
        assert_eq!(
            removal_patch("9", &taints),
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "9"},
                {"op": "replace", "path": "/spec/taints", "value": [
                    {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                    {
                        "key": "node.kubernetes.io/unreachable",
                        "effect": "NoExecute",
                        "timeAdded": "2024-05-01T10:00:00Z",
                    },
                ]},
            ]))
        );
    }

    #[test]
    fn every_effect_of_ours_goes() {
        let taints = [
            taint(NOT_READY_TAINT, "NoSchedule"),
            taint("b", "PreferNoSchedule"),
            taint(NOT_READY_TAINT, "NoExecute"),
        ];
        assert_eq!(
            removal_patch("1", &taints),
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "replace", "path": "/spec/taints", "value": [
                    {"key": "b", "effect": "PreferNoSchedule"},
                ]},
            ]))
        );
        let only_ours = [
            taint(NOT_READY_TAINT, "NoSchedule"),
            taint(NOT_READY_TAINT, "NoExecute"),
        ];
        assert_eq!(
            removal_patch("1", &only_ours),
            Some(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "remove", "path": "/spec/taints"},
            ]))
        );
    }

    /// A request as the scripted API server saw it.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path: String,
        content_type: String,
        body: String,
    }

    /// A client of an API server (plain HTTP on loopback) that answers each
    /// request with the next of `answers` (status code, JSON body), and what
    /// it was asked.
    async fn scripted_api(answers: Vec<(u16, Value)>) -> (Client, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (log, answers) = (log.clone(), answers.clone());
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut words = line.split_whitespace();
                        let method = words.next().unwrap().to_owned();
                        let path = words.next().unwrap().to_owned();
                        let (mut length, mut content_type) = (0, String::new());
                        loop {
                            let mut header = String::new();
                            stream.read_line(&mut header).await.unwrap();
                            if header == "\r\n" {
                                break;
                            }
                            let (name, value) = header.split_once(':').unwrap();
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            } else if name.eq_ignore_ascii_case("content-type") {
                                content_type = value.trim().to_owned();
                            }
                        }
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        log.lock().unwrap().push(Seen {
                            method,
                            path,
                            content_type,
                            body: String::from_utf8(body).unwrap(),
                        });
                        let next = answers.lock().unwrap().pop_front();
                        let (code, answer) = next.expect("more requests than scripted");
                        let answer = answer.to_string();
                        let response = format!(
                            "HTTP/1.1 {code} Scripted\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        stream
                            .get_mut()
                            .write_all(response.as_bytes())
                            .await
                            .unwrap();
                    }
                });
            }
        });
        let config = kube::Config::new(format!("http://{address}").parse().unwrap());
        (Client::try_from(config).unwrap(), seen)
    }

    fn node(resource_version: &str, taints: &[Taint]) -> (u16, Value) {
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-1", "resourceVersion": resource_version},
            "spec": {"taints": taints},
        });
        (200, node)
    }

    fn status(code: u16, reason: &str) -> (u16, Value) {
        let status = json!({
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "message": format!("scripted {reason}"),
            "reason": reason,
            "code": code,
        });
        (code, status)
    }

    fn methods(seen: &Mutex<Vec<Seen>>) -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|s| s.method.clone())
            .collect()
    }

    /// What 1.20 answers when the `test` of the resourceVersion fails
    /// (measured): 422, reason Invalid.
    fn stale() -> (u16, Value) {
        status(422, "Invalid")
    }

    #[tokio::test]
    async fn a_node_changed_meanwhile_is_read_again_and_its_new_taint_kept() {
        let ours = taint(NOT_READY_TAINT, "NoSchedule");
        let added = taint("added-meanwhile", "NoExecute");
        let (client, seen) = scripted_api(vec![
            node("1", std::slice::from_ref(&ours)),
            stale(),
            node("2", &[ours.clone(), added.clone()]),
            node("3", std::slice::from_ref(&added)),
        ])
        .await;
        let removed = remove_not_ready_taint(&client, "node-1").await.unwrap();
        assert_eq!(removed, Removed::Removed);
        let seen = seen.lock().unwrap();
        let calls: Vec<(&str, &str)> = seen
            .iter()
            .map(|s| {
                (
                    s.method.as_str(),
                    s.path.as_str().split('?').next().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("GET", "/api/v1/nodes/node-1"),
                ("PATCH", "/api/v1/nodes/node-1"),
                ("GET", "/api/v1/nodes/node-1"),
                ("PATCH", "/api/v1/nodes/node-1"),
            ]
        );
        assert_eq!(seen[3].content_type, "application/json-patch+json");
        let sent: Value = serde_json::from_str(&seen[3].body).unwrap();
        assert_eq!(
            sent,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "2"},
                {"op": "replace", "path": "/spec/taints", "value": [
                    {"key": "added-meanwhile", "effect": "NoExecute"},
                ]},
            ])
        );
    }

    #[tokio::test]
    async fn conflicts_are_retried_five_times_then_reported() {
        let ours = [taint(NOT_READY_TAINT, "NoSchedule")];
        let mut answers = Vec::new();
        for version in 1..=5 {
            answers.push(node(&version.to_string(), &ours));
            // 409 as the server says when the node changes while it
            // applies the patch; 422 when the test fails.
            answers.push(if version % 2 == 0 {
                status(409, "Conflict")
            } else {
                stale()
            });
        }
        let (client, seen) = scripted_api(answers).await;
        let error = remove_not_ready_taint(&client, "node-1").await.unwrap_err();
        assert!(
            matches!(error, TaintError::Conflicts { attempts: 5, .. }),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("patching node node-1 was refused 5 times in a row"),
            "{error}"
        );
        assert_eq!(methods(&seen).len(), 10);
    }

    #[tokio::test]
    async fn a_refused_patch_names_the_missing_grant() {
        let (client, _seen) = scripted_api(vec![
            node("1", &[taint(NOT_READY_TAINT, "NoSchedule")]),
            status(403, "Forbidden"),
        ])
        .await;
        let error = remove_not_ready_taint(&client, "node-1").await.unwrap_err();
        assert!(error.forbidden(), "{error:?}");
        assert!(
            error.to_string().starts_with(
                "patch node node-1: forbidden (403); the agent's RBAC lacks `nodes get/patch`"
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn nothing_is_asked_before_ready_and_failures_are_retried() {
        let (client, seen) = scripted_api(vec![
            // Not 503, 429 or 504, which kube's client retries by itself.
            status(500, "InternalError"),
            node("1", &[taint(NOT_READY_TAINT, "NoSchedule")]),
            node("2", &[]),
        ])
        .await;
        let (ready, ready_rx) = watch::channel(false);
        let task = tokio::spawn(remove_when_ready(client, "node-1".into(), ready_rx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(methods(&seen), Vec::<String>::new(), "asked before ready");
        ready.send(true).unwrap();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the taint is removed and the task ends")
            .unwrap();
        assert_eq!(methods(&seen), ["GET", "GET", "PATCH"]);
        assert!(started.elapsed() >= FIRST_RETRY, "retried without a pause");
    }

    #[tokio::test]
    async fn an_agent_stopping_before_ready_asks_nothing() {
        let (client, seen) = scripted_api(Vec::new()).await;
        let (ready, ready_rx) = watch::channel(false);
        let task = tokio::spawn(remove_when_ready(client, "node-1".into(), ready_rx));
        drop(ready);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ends")
            .unwrap();
        assert_eq!(methods(&seen), Vec::<String>::new());
    }
}

//! The protocol between `warren-cni` (the chained CNI plugin the container
//! runtime executes for each pod sandbox) and the node's warren agent.
//!
//! One request per connection on the agent's Unix socket, one answer: each a
//! single line of JSON. The socket lives in a directory only root may enter,
//! so whoever connects is the runtime (or root, who could do anything
//! anyway); the agent still checks what it is told against the node (the
//! namespace file must be a network namespace holding the address).
//!
//! ```text
//!  runtime ─ exec ─► warren-cni ADD ── {"command":"add", pod, netns, ips} ──► agent
//!                                   ◄── {"outcome":"enrolled"} ─────────────  (capture attached,
//!  pod's containers start only now                                              listeners bound,
//!                                                                               modes in the kernel)
//! ```

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The spec versions whose results the plugin reads and passes on. Chaining
/// (`prevResult`) came with 0.3.0. The agent installs the plugin only into a
/// list of one of these.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The longest request or answer either side reads: a pod has a handful of
/// addresses, names are at most 253 bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The pod a runtime's request is about, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`: containerd sends it, dockershim did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the plugin asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// A new sandbox: enroll the pod if it belongs to the mesh, and answer
    /// only once it is captured.
    Add {
        pod: PodRef,
        container_id: String,
        /// `CNI_NETNS`: the sandbox's network namespace file, as the host
        /// names it.
        netns: PathBuf,
        /// The pod's IPv4 addresses, from the previous plugin's result (the
        /// API server does not know them yet).
        ips: Vec<Ipv4Addr>,
    },
    /// Is the pod still held as the runtime set it up?
    Check {
        pod: PodRef,
        container_id: String,
        netns: PathBuf,
    },
    /// The sandbox is going away: stop holding it.
    Del {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<PodRef>,
        container_id: String,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Response {
    /// ADD, CHECK: the pod is captured and served.
    Enrolled,
    /// ADD, CHECK: the pod is not in the mesh; the agent leaves it alone.
    NotInMesh,
    /// DEL: done (also when there was nothing to do).
    Released,
    /// The pod must be in the mesh and is not (yet): ADD fails, and the
    /// runtime tries the sandbox again later.
    Refused { reason: String },
}

/// What the agent leaves on the node for the plugin to decide alone while
/// the agent cannot be reached (restarting, crashed): which pods must be
/// held. Written next to the socket, replaced whole at each change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    /// This node's pods the agent knew of, by `namespace/name`.
    #[serde(default)]
    pub pods: std::collections::BTreeMap<String, KnownPod>,
    /// Whether each namespace the agent knew puts its pods in the mesh.
    #[serde(default)]
    pub namespaces: std::collections::BTreeMap<String, bool>,
    /// What a pod in neither list is.
    #[serde(default)]
    pub others: Others,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KnownPod {
    /// The pod's UID where the agent knows it (a pod of the same name made
    /// later is another pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub in_mesh: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Others {
    /// Unknown: held (fail closed). The Kubernetes source: a namespace made
    /// while the agent was away may be in the mesh.
    #[default]
    Hold,
    /// Not in the mesh: the config file lists every mesh pod.
    Pass,
}

/// The file's name in the socket's directory.
pub const MEMBERSHIP_FILE: &str = "membership.json";

impl Membership {
    /// Whether `pod` must be held while the agent is away. A pod opting in
    /// by its own label, in a namespace outside the mesh, made while the
    /// agent is away, is not known to be in the mesh: it passes, and is
    /// enrolled when the agent is back (discovery).
    pub fn must_hold(&self, pod: &PodRef) -> bool {
        if let Some(known) = self.pods.get(&pod.to_string()) {
            // A pod of the mesh re-made under its name (a StatefulSet's) is
            // held all the same; only the very pod known to be outside the
            // mesh passes on its own say.
            if known.in_mesh {
                return true;
            }
            if pod.uid.is_none() || known.uid.is_none() || pod.uid == known.uid {
                return false;
            }
        }
        match self.namespaces.get(&pod.namespace) {
            Some(in_mesh) => *in_mesh,
            None => self.others == Others::Hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str, uid: Option<&str>) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.map(Into::into),
        }
    }

    #[test]
    fn while_the_agent_is_away_known_pods_then_namespaces_decide() {
        let membership: Membership = serde_json::from_str(
            r#"{"pods": {"shop/web": {"uid": "u1", "inMesh": true},
                         "shop/batch": {"uid": "u2", "inMesh": false},
                         "plain/opted-in": {"uid": "u3", "inMesh": true}},
                "namespaces": {"shop": true, "plain": false},
                "others": "hold"}"#,
        )
        .unwrap();
        assert!(membership.must_hold(&pod("shop", "web", Some("u1"))));
        assert!(!membership.must_hold(&pod("shop", "batch", None)));
        assert!(membership.must_hold(&pod("plain", "opted-in", Some("u3"))));
        // A new pod under a known mesh pod's name: held all the same.
        assert!(membership.must_hold(&pod("plain", "opted-in", Some("u9"))));
        // Under a known outside pod's name: its namespace decides.
        assert!(membership.must_hold(&pod("shop", "batch", Some("u8"))));
        assert!(membership.must_hold(&pod("shop", "new", None)));
        assert!(!membership.must_hold(&pod("plain", "new", None)));
        // A namespace the agent never saw.
        assert!(membership.must_hold(&pod("new-ns", "p", None)));
        let file_mode = Membership {
            others: Others::Pass,
            ..Membership::default()
        };
        assert!(!file_mode.must_hold(&pod("new-ns", "p", None)));
    }

    #[test]
    fn requests_and_answers_are_one_json_object_each() {
        let request = Request::Add {
            pod: pod("shop", "web", Some("u1")),
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec![Ipv4Addr::new(10, 0, 0, 2)],
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.starts_with(r#"{"command":"add","#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        let answer = Response::Refused {
            reason: "no".into(),
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(text, r#"{"outcome":"refused","reason":"no"}"#);
    }
}

//! Agents on Kubernetes, as Istio's CA knows them: each agent presents its
//! projected service-account token, which the API server reviews
//! (TokenReview); the token must be the agent service account's and bound to
//! a Pod, and that Pod (UID included) tells the agent's node. The CA then
//! signs an identity for that node only if its own watch of Pods shows a Pod
//! of that namespace and service account on the node.
//!
//! - [`reviews`]: TokenReview and a small cache of its answers. A review is
//!   trusted for a bounded time (never past the token's expiry), so the CA
//!   keeps serving agents it has seen while the API server is briefly away.
//! - [`pods`]: the CA's view of Pods: who runs where, and the agents' own
//!   Pods.
//! - [`bundle`]: publishes the CA's roots in a ConfigMap the agents mount.
//!
//! Revoking an agent is deleting its Pod: the Pod check runs on every request
//! against the live watch, cache or not.

mod bundle;
mod pods;
mod reviews;
#[cfg(test)]
pub(crate) mod tests;

use std::{fmt, sync::Arc, time::Duration};

use kube::Client;

use crate::metrics::Metrics;

pub use bundle::publish_roots;
pub use pods::Pods;
pub use reviews::Reviewer;

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("{what} {given:?} is not of the form <namespace>/<name>")]
    NotNamespaced { what: &'static str, given: String },
}

/// A namespaced object's name: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// Parses `namespace/name`; `what` names the flag in errors.
    pub fn parse(what: &'static str, given: &str) -> Result<Self, KubernetesError> {
        match given.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(KubernetesError::NotNamespaced {
                what,
                given: given.to_owned(),
            }),
        }
    }

    /// The user name the API server gives this service account's tokens.
    fn service_account_user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who may ask, and how their tokens are checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The agents' service account: only its tokens are accepted.
    pub agent: ObjectRef,
    /// The audience agents' tokens must be for (and that reviews ask for), so
    /// that a token meant for another service is useless here.
    pub audience: String,
    /// How long a positive review is trusted (never past the token's expiry).
    pub review_lifetime: Duration,
}

/// An agent the CA has authenticated: its node, and the Pod that tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
    pub pod: ObjectRef,
}

/// Why a caller was not authenticated. The gRPC status follows the kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The token is not valid (expired, wrong audience, forged, no token).
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token, but not an agent's, or its Pod does not check out.
    #[error("{0}")]
    Denied(String),
    /// The token could not be reviewed now (the API server is unreachable
    /// and no review of it is remembered).
    #[error("{0}")]
    Unavailable(String),
}

/// Authenticates agents by their tokens and places them on nodes.
pub struct Authenticator {
    reviewer: Reviewer,
    pods: Arc<Pods>,
    settings: Settings,
}

impl Authenticator {
    /// Counts its TokenReviews in `metrics`.
    pub fn new(client: Client, settings: Settings, pods: Arc<Pods>, metrics: Metrics) -> Self {
        Self {
            reviewer: Reviewer::new(client, settings.clone(), metrics),
            settings,
            pods,
        }
    }

    /// The agent presenting `token`, if the API server vouches for the token
    /// and the Pod it is bound to runs, with that UID, on a node.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        self.claims_a_running_agent(token)?;
        let bound = self.reviewer.review(token).await?;
        let pod = ObjectRef {
            namespace: self.settings.agent.namespace.clone(),
            name: bound.pod_name.clone(),
        };
        let Some(running) = self.pods.agent_pod(&pod) else {
            return Err(Refusal::Denied(format!(
                "the token is bound to pod {pod}, which is not running (deleted or being \
                 deleted, finished, or not yet seen by the CA)"
            )));
        };
        if running.uid != bound.pod_uid {
            return Err(Refusal::Denied(format!(
                "the token is bound to pod {pod} with UID {}, but that pod is now UID {} (the \
                 pod was deleted and another made with its name)",
                bound.pod_uid, running.uid
            )));
        }
        if running.service_account != self.settings.agent.name {
            return Err(Refusal::Denied(format!(
                "pod {pod} runs as service account {}, not {}",
                running.service_account, self.settings.agent
            )));
        }
        let Some(node) = running.node else {
            return Err(Refusal::Denied(format!(
                "pod {pod} is not scheduled to a node"
            )));
        };
        if let Some(claimed) = &bound.node_name
            && *claimed != node
        {
            return Err(Refusal::Denied(format!(
                "the token names node {claimed}, but its pod {pod} runs on {node}"
            )));
        }
        Ok(Caller { node, pod })
    }

    /// Refuses, without asking the API server, a token whose (unchecked)
    /// claims cannot be read or do not name a running agent Pod with its
    /// UID: only tokens that could pass are reviewed, so a flood of forged
    /// ones costs a lookup each.
    fn claims_a_running_agent(&self, token: &str) -> Result<(), Refusal> {
        let (name, uid) = reviews::claimed_agent_pod(token, &self.settings)?;
        let pod = ObjectRef {
            namespace: self.settings.agent.namespace.clone(),
            name,
        };
        match self.pods.agent_pod(&pod) {
            Some(running) if running.uid == uid => Ok(()),
            _ => Err(Refusal::Unauthenticated(format!(
                "the token claims agent pod {pod} (UID {uid}), which is not running"
            ))),
        }
    }

    /// Whether `caller`'s node runs a Pod of `namespace` and
    /// `service_account`; if not, why, in words that name the node.
    pub fn authorize(
        &self,
        caller: &Caller,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), String> {
        if self.pods.runs_on(&caller.node, namespace, service_account) {
            Ok(())
        } else {
            Err(format!(
                "node {} runs no pod of namespace {namespace} with service account \
                 {service_account}",
                caller.node
            ))
        }
    }
}

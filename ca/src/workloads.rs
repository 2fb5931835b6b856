//! The CA's view of a workloads file (`warren-ca serve --workloads`), which
//! is in **the agent's config file format** (README.md, "Config file"): the
//! same file an agent reads, or one written for the CA alone.
//!
//! The CA reads only what node authorization needs: the trust domain and,
//! for each workload, its namespace and service account (its identity) and
//! the node it runs on. Every other field (`node` at the top, addresses,
//! labels, `netns`, `cgroup`, the agent's settings) is the agent's business
//! and ignored, as are fields this view does not know: an agent config that
//! gains a field still loads here. What it reads is validated as the agent
//! validates it, and errors name the file, the field and the problem.
//!
//! Being tolerant, this view accepts files the agent would refuse (two pods
//! at one address, say); it never reads a placement differently from the
//! agent.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use warren_pki::identity::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, TrustDomain};

use crate::service::Placement;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    #[error("cannot read workloads file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("workloads file {}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("workloads file {}: {field}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// Which node runs which identities, and the trust domain they are of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workloads {
    pub trust_domain: TrustDomain,
    /// One per workload of the file, in its order.
    pub placements: Vec<Placement>,
}

impl Workloads {
    pub fn load(path: &Path) -> Result<Self, WorkloadsError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (which only appears in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, WorkloadsError> {
        let raw: RawFile = serde_yaml::from_str(text).map_err(|source| WorkloadsError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        raw.validate()
            .map_err(|(field, problem)| WorkloadsError::Invalid {
                path: path.to_owned(),
                field,
                problem,
            })
    }
}

/// The fields of the agent's config that the CA reads. No
/// `deny_unknown_fields`: everything else is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFile {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawWorkload {
    namespace: String,
    service_account: String,
    node: String,
}

type Invalid = (String, String);

impl RawFile {
    fn validate(self) -> Result<Workloads, Invalid> {
        let trust_domain =
            TrustDomain::new(self.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))
                .map_err(|e| ("trustDomain".to_owned(), e.to_string()))?;
        let placements = self
            .workloads
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let at = |field: &str| format!("workloads[{i}].{field}");
                let identity =
                    SpiffeId::new(trust_domain.clone(), &raw.namespace, &raw.service_account)
                        .map_err(|e| {
                            let field = match e {
                                IdentityError::Namespace(..) => "namespace",
                                _ => "serviceAccount",
                            };
                            (at(field), e.to_string())
                        })?;
                if raw.node.trim().is_empty() {
                    return Err((at("node"), "must name the node the pod runs on".into()));
                }
                Ok(Placement {
                    identity,
                    node: raw.node,
                })
            })
            .collect::<Result<_, Invalid>>()?;
        Ok(Workloads {
            trust_domain,
            placements,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's config file, as an agent of a lab reads it: every field of
    /// the format, most of them none of the CA's business.
    const AGENT_CONFIG: &str = include_str!("../testdata/agent-config.yaml");

    fn parse(text: &str) -> Result<Workloads, WorkloadsError> {
        Workloads::parse(Path::new("/etc/warren/mesh.yaml"), text)
    }

    fn placed(workloads: &Workloads) -> Vec<(String, &str)> {
        workloads
            .placements
            .iter()
            .map(|p| (p.identity.to_string(), p.node.as_str()))
            .collect()
    }

    #[test]
    fn reads_who_runs_where_from_an_agent_config() {
        let workloads = parse(AGENT_CONFIG).unwrap();
        assert_eq!(workloads.trust_domain.as_str(), "example.org");
        assert_eq!(
            placed(&workloads),
            [
                ("spiffe://example.org/ns/default/sa/sleep".into(), "node-1"),
                ("spiffe://example.org/ns/shop/sa/web".into(), "node-2"),
                ("spiffe://example.org/ns/default/sa/sleep".into(), "node-2"),
            ]
        );
    }

    #[test]
    fn a_file_for_the_ca_alone_needs_no_node_of_its_own() {
        let text = "workloads:\n  - {namespace: default, serviceAccount: sleep, node: node-1}\n";
        let workloads = parse(text).unwrap();
        assert_eq!(workloads.trust_domain.as_str(), "cluster.local");
        assert_eq!(
            placed(&workloads),
            [(
                "spiffe://cluster.local/ns/default/sa/sleep".into(),
                "node-1"
            )]
        );
        assert!(
            parse("trustDomain: cluster.local\n")
                .unwrap()
                .placements
                .is_empty()
        );
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let workload = "{name: a, namespace: default, serviceAccount: sleep, node: node-1}";
        let cases = [
            (
                format!(
                    "workloads:\n  - {workload}\n  - {{namespace: Shop, serviceAccount: web, node: n}}\n"
                ),
                "workloads[1].namespace: namespace \"Shop\"",
            ),
            (
                format!(
                    "workloads:\n  - {{namespace: shop, serviceAccount: \"\", node: n}}\n  - {workload}\n"
                ),
                "workloads[0].serviceAccount",
            ),
            (
                "workloads:\n  - {namespace: shop, serviceAccount: web, node: \" \"}\n".into(),
                "workloads[0].node: must name the node",
            ),
            (
                format!("trustDomain: Example.org\nworkloads:\n  - {workload}\n"),
                "trustDomain: trust domain \"Example.org\"",
            ),
            (
                "workloads:\n  - {namespace: shop, serviceAccount: web}\n".into(),
                "missing field `node`",
            ),
            ("workloads: [\n".into(), "line"),
        ];
        for (text, expected) in cases {
            let message = parse(&text).unwrap_err().to_string();
            assert!(
                message.starts_with("workloads file /etc/warren/mesh.yaml: "),
                "no file name in {message:?}"
            );
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn unreadable_file_is_reported_with_its_path() {
        let err = Workloads::load(Path::new("/nonexistent/mesh.yaml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/mesh.yaml"), "{err}");
    }
}

//! The agent's local configuration file: which node this is, the trust domain,
//! and the workloads of the mesh. This is how warren runs without Kubernetes
//! (tests, the demo, small installations); discovery from a cluster will feed
//! the same [`Config`].
//!
//! Every error names the file, the field and what is wrong with it; a config
//! that does not validate is never partially applied.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::identity::{SpiffeId, TrustDomain};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_DEV_CA_DIR: &str = "/var/lib/warren/dev-ca";
pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shorter lifetimes would renew faster than connections can be set up.
pub const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config file {}: {field}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The node this agent runs on.
    pub node: String,
    pub trust_domain: TrustDomain,
    /// Where the development CA keeps its root (created on first use). Every
    /// agent of a mesh must share it, or they will not trust each other.
    pub dev_ca_dir: PathBuf,
    /// Extra roots to trust, besides the CA's own (PEM, one or more).
    pub trust_bundle: Option<PathBuf>,
    /// How long workload certificates live; they are renewed at about half.
    pub certificate_ttl: Duration,
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// Pod name, unique within its namespace.
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
    pub ip: Ipv4Addr,
    pub node: String,
    /// Present exactly for the workloads on this agent's node.
    pub local: Option<LocalPod>,
}

/// Where a pod on this node lives, so the agent can enroll it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalPod {
    /// Network namespace file, e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
}

impl Workload {
    /// `namespace/name`, how operators refer to a pod.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (which only appears in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        raw.validate()
            .map_err(|(field, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                problem,
            })
    }

    /// The workloads running on this node.
    pub fn local_workloads(&self) -> impl Iterator<Item = (&Workload, &LocalPod)> {
        self.workloads
            .iter()
            .filter_map(|w| w.local.as_ref().map(|local| (w, local)))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    node: String,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    dev_ca_dir: Option<PathBuf>,
    #[serde(default)]
    trust_bundle: Option<PathBuf>,
    #[serde(default)]
    certificate_ttl: Option<String>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkload {
    name: String,
    namespace: String,
    service_account: String,
    ip: Ipv4Addr,
    node: String,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
}

type Invalid = (String, String);

impl RawConfig {
    fn validate(self) -> Result<Config, Invalid> {
        if self.node.trim().is_empty() {
            return Err(("node".into(), "must name this agent's node".into()));
        }
        let trust_domain =
            TrustDomain::new(self.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))
                .map_err(|e| ("trustDomain".into(), e.to_string()))?;

        let certificate_ttl = match &self.certificate_ttl {
            None => DEFAULT_CERTIFICATE_TTL,
            Some(text) => {
                let ttl = humantime::parse_duration(text).map_err(|e| {
                    (
                        "certificateTtl".to_owned(),
                        format!("{text:?} is not a duration like 24h or 90s: {e}"),
                    )
                })?;
                if ttl < MIN_CERTIFICATE_TTL {
                    return Err((
                        "certificateTtl".into(),
                        format!("{text} is shorter than the minimum, {MIN_CERTIFICATE_TTL:?}"),
                    ));
                }
                ttl
            }
        };
        let mut by_name = HashMap::new();
        let mut by_ip = HashMap::new();
        let mut workloads = Vec::with_capacity(self.workloads.len());
        for (i, raw) in self.workloads.into_iter().enumerate() {
            let at = |field: &str| format!("workloads[{i}].{field}");
            let workload = raw.validate(&self.node, &trust_domain, at)?;
            if let Some(first) = by_name.insert(workload.qualified_name(), i) {
                return Err((
                    at("name"),
                    format!(
                        "{} is also workloads[{first}]; pod names must be unique in a namespace",
                        workload.qualified_name()
                    ),
                ));
            }
            if let Some(first) = by_ip.insert(workload.ip, i) {
                return Err((
                    at("ip"),
                    format!("{} is also the address of workloads[{first}]", workload.ip),
                ));
            }
            workloads.push(workload);
        }
        Ok(Config {
            node: self.node,
            trust_domain,
            dev_ca_dir: self
                .dev_ca_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_CA_DIR)),
            trust_bundle: self.trust_bundle,
            certificate_ttl,
            workloads,
        })
    }
}

impl RawWorkload {
    fn validate(
        self,
        this_node: &str,
        trust_domain: &TrustDomain,
        at: impl Fn(&str) -> String,
    ) -> Result<Workload, Invalid> {
        if self.name.trim().is_empty() {
            return Err((at("name"), "must not be empty".into()));
        }
        let identity = SpiffeId::new(trust_domain.clone(), &self.namespace, &self.service_account)
            .map_err(|e| {
                let field = match e {
                    crate::identity::IdentityError::Namespace(..) => "namespace",
                    _ => "serviceAccount",
                };
                (at(field), e.to_string())
            })?;
        if self.ip.is_unspecified()
            || self.ip.is_loopback()
            || self.ip.is_multicast()
            || self.ip.is_broadcast()
        {
            return Err((at("ip"), format!("{} cannot be a pod address", self.ip)));
        }
        if self.node.trim().is_empty() {
            return Err((at("node"), "must name the node the pod runs on".into()));
        }
        let local = if self.node == this_node {
            let netns = self.netns.ok_or_else(|| {
                (
                    at("netns"),
                    format!("required for a pod on this node ({this_node}): the path of its network namespace"),
                )
            })?;
            let cgroup = self.cgroup.ok_or_else(|| {
                (
                    at("cgroup"),
                    format!(
                        "required for a pod on this node ({this_node}): its cgroup v2 directory"
                    ),
                )
            })?;
            Some(LocalPod { netns, cgroup })
        } else {
            for (field, value) in [("netns", &self.netns), ("cgroup", &self.cgroup)] {
                if value.is_some() {
                    return Err((
                        at(field),
                        format!(
                            "only allowed for pods on this node ({this_node}); this pod runs on {}",
                            self.node
                        ),
                    ));
                }
            }
            None
        };
        Ok(Workload {
            name: self.name,
            namespace: self.namespace,
            service_account: self.service_account,
            identity,
            ip: self.ip,
            node: self.node,
            local,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: node-1
trustDomain: example.org
devCaDir: /tmp/dev-ca
trustBundle: /etc/warren/roots.pem
certificateTtl: 1h 30m
workloads:
  - name: client
    namespace: default
    serviceAccount: sleep
    ip: 10.244.1.2
    node: node-1
    netns: /run/netns/client
    cgroup: /sys/fs/cgroup/pods/client
  - name: server
    namespace: backend
    serviceAccount: httpbin
    ip: 10.244.2.2
    node: node-2
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/warren/agent.yaml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_full_config() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.node, "node-1");
        assert_eq!(config.trust_domain.as_str(), "example.org");
        assert_eq!(config.dev_ca_dir, Path::new("/tmp/dev-ca"));
        assert_eq!(
            config.trust_bundle.as_deref(),
            Some(Path::new("/etc/warren/roots.pem"))
        );
        assert_eq!(config.workloads.len(), 2);
        let local: Vec<_> = config
            .local_workloads()
            .map(|(w, _)| w.name.as_str())
            .collect();
        assert_eq!(local, ["client"]);
        assert_eq!(
            config.workloads[1].identity.to_string(),
            "spiffe://example.org/ns/backend/sa/httpbin"
        );
        assert!(config.workloads[1].local.is_none());
    }

    #[test]
    fn trust_domain_defaults_to_cluster_local() {
        let config = parse("node: n\n").unwrap();
        assert_eq!(config.trust_domain.as_str(), "cluster.local");
        assert_eq!(config.dev_ca_dir, Path::new(DEFAULT_DEV_CA_DIR));
        assert!(config.trust_bundle.is_none());
        assert!(config.workloads.is_empty());
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let cases = [
            (
                GOOD.replace("10.244.2.2", "10.244.2.300"),
                "workloads[1].ip",
            ),
            (
                GOOD.replace("    netns: /run/netns/client\n", ""),
                "workloads[0].netns: required",
            ),
            (
                GOOD.replace("    cgroup: /sys/fs/cgroup/pods/client\n", ""),
                "workloads[0].cgroup: required",
            ),
            (
                GOOD.replace("namespace: backend", "namespace: Back_End"),
                "workloads[1].namespace",
            ),
            (
                GOOD.replace("serviceAccount: httpbin", "serviceAccount: \"\""),
                "workloads[1].serviceAccount",
            ),
            (
                GOOD.replace("10.244.2.2", "10.244.1.2"),
                "workloads[1].ip: 10.244.1.2 is also the address of workloads[0]",
            ),
            (
                GOOD.replace("10.244.2.2", "127.0.0.1"),
                "workloads[1].ip: 127.0.0.1 cannot be a pod address",
            ),
            (
                GOOD.replace(
                    "name: server\n    namespace: backend",
                    "name: client\n    namespace: default",
                ),
                "workloads[1].name: default/client is also workloads[0]",
            ),
            (
                GOOD.replace("trustDomain: example.org", "trustDomain: Example.org"),
                "trustDomain: trust domain",
            ),
            (
                GOOD.replace("node: node-2", "node: node-2\n    netns: /run/netns/x"),
                "workloads[1].netns: only allowed for pods on this node",
            ),
            (
                GOOD.replace(
                    "serviceAccount: sleep",
                    "serviceAccount: sleep\n    colour: red",
                ),
                "unknown field `colour`",
            ),
            (
                GOOD.replace("node: node-1\ntrustDomain", "trustDomain"),
                "missing field `node`",
            ),
            ("node: [\n".to_string(), "agent.yaml"),
        ];
        for (text, expected) in cases {
            let message = error(&text);
            assert!(
                message.starts_with("config file /etc/warren/agent.yaml: "),
                "no file name in {message:?}"
            );
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let message = error(&GOOD.replace("ip: 10.244.2.2", "ip: [oops"));
        assert!(message.contains("line"), "{message}");
    }

    #[test]
    fn unreadable_file_is_reported_with_its_path() {
        let err = Config::load(Path::new("/nonexistent/warren.yaml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/warren.yaml"),
            "{err}"
        );
    }
}

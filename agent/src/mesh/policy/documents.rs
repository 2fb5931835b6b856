//! Istio's policy documents as YAML: PeerAuthentication and
//! AuthorizationPolicy (`security.istio.io/v1` and `v1beta1`), read from files
//! and validated one document at a time into the types of [`super`].
//!
//! Unknown fields are errors: a misspelt field in a security policy must not
//! be silently ignored. Fields that only an L7 proxy can evaluate are kept as
//! names, so that the rules can be read the safe way at L4 (see
//! [`super::Rule::l7`]).

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    Action, AuthorizationPolicy, Condition, ConditionKey, Labels, MtlsMode, Operation,
    PeerAuthentication, PolicyError, Rule, Source, StringMatch,
};

const GROUP: &str = "security.istio.io";
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];
const DRY_RUN: &str = "istio.io/dry-run";
/// Ports a PeerAuthentication's `portLevelMtls` may list (see its check).
pub const MAX_PORT_LEVEL_MODES: usize = 64;

/// One parsed document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
}

/// A document that was refused, and what stands in for it: an invalid
/// security policy fails closed over the workloads it was meant for (its
/// namespace, or its selector if that much is valid): a refused
/// AuthorizationPolicy denies them everything, a refused PeerAuthentication
/// makes them STRICT. None when even its name or kind is unknown.
pub struct Refused {
    pub error: PolicyError,
    pub fallback: Option<Document>,
}

/// What a file held.
pub enum Parsed {
    Document(Document),
    Refused(Refused),
    /// The file is not YAML: nothing in it can be trusted to be complete.
    Unreadable(PolicyError),
}

/// Every document of the YAML `text` (read from `origin`, a file), each
/// either parsed or refused with the reason.
pub fn parse_file(origin: &str, text: &str) -> Vec<Parsed> {
    let mut documents = Vec::new();
    for (index, yaml) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let error = |policy: String, field: String, problem: String| PolicyError {
            origin: origin.to_owned(),
            policy,
            field,
            problem,
        };
        let value = match serde_yaml::Value::deserialize(yaml) {
            Ok(serde_yaml::Value::Null) => continue, // an empty document (`---` at the end)
            Ok(value) => value,
            Err(e) => {
                documents.push(Parsed::Unreadable(error(
                    format!("document #{}", index + 1),
                    String::new(),
                    e.to_string(),
                )));
                // The rest of the file cannot be parsed past a syntax error.
                break;
            }
        };
        // `kubectl get -o yaml` writes a `kind: List` of the documents.
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List") => match value.get("items").and_then(|i| i.as_sequence()) {
                Some(items) => items.clone(),
                None => Vec::new(),
            },
            _ => vec![value],
        };
        for item in items {
            documents.push(parse_object(
                origin,
                &format!("document #{}", index + 1),
                item,
            ));
        }
    }
    documents
}

/// One policy object (from a file, or from the API server), parsed or
/// refused with the reason; `unnamed` stands for its name in errors if it
/// has none.
pub fn parse_object(origin: &str, unnamed: &str, value: serde_yaml::Value) -> Parsed {
    let fallback = fallback(&value);
    match parse_document(value) {
        Ok(document) => Parsed::Document(document),
        Err((policy, field, problem)) => Parsed::Refused(Refused {
            error: PolicyError {
                origin: origin.to_owned(),
                policy: policy.unwrap_or_else(|| unnamed.to_owned()),
                field,
                problem,
            },
            fallback,
        }),
    }
}

/// What stands in for `value` if it is refused (see [`Refused`]).
fn fallback(value: &serde_yaml::Value) -> Option<Document> {
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str()?.to_owned();
    let namespace = metadata
        .get("namespace")
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_owned();
    let selector = value
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(|s| serde_yaml::from_value::<RawSelector>(s.clone()).ok())
        .map(|s| s.match_labels)
        .filter(|labels| !labels.is_empty());
    let name = format!("{name} (refused: fails closed)");
    match value.get("kind")?.as_str()? {
        "AuthorizationPolicy" => {
            if value
                .get("spec")
                .and_then(|s| s.get("action"))
                .and_then(|a| a.as_str())
                == Some("AUDIT")
            {
                return None; // an audit that cannot run denies nothing
            }
            Some(Document::AuthorizationPolicy(AuthorizationPolicy {
                name,
                namespace,
                selector,
                action: Action::Deny,
                rules: vec![Rule {
                    from: Vec::new(),
                    to: Vec::new(),
                    when: Vec::new(),
                    l7: Vec::new(),
                }],
                dry_run: false,
            }))
        }
        "PeerAuthentication" => Some(Document::PeerAuthentication(PeerAuthentication {
            name,
            namespace,
            // Where the refused policy stood among several at its scope,
            // its stand-in stands: a newer, valid policy must not win.
            created: metadata
                .get("creationTimestamp")
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            selector,
            mode: Some(MtlsMode::Strict),
            ports: BTreeMap::new(),
        })),
        _ => None,
    }
}

/// (policy name if known, field path, problem).
type Invalid = (Option<String>, String, String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// RFC 3339, as Kubernetes writes it: orders policies of one scope.
    #[serde(default)]
    creation_timestamp: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

fn parse_document(value: serde_yaml::Value) -> Result<Document, Invalid> {
    let envelope: Envelope = serde_path_to_error::deserialize(value)
        .map_err(|e| (None, e.path().to_string(), e.inner().to_string()))?;
    let Metadata {
        name,
        namespace,
        annotations,
        creation_timestamp,
    } = envelope.metadata;
    let qualified = format!("{namespace}/{name}");
    let at = |field: &str, problem: String| (Some(qualified.clone()), field.to_owned(), problem);
    let version_ok = envelope
        .api_version
        .split_once('/')
        .is_some_and(|(group, version)| group == GROUP && VERSIONS.contains(&version));
    if !version_ok {
        return Err(at(
            "apiVersion",
            format!(
                "{:?} is not security.istio.io/v1 or security.istio.io/v1beta1",
                envelope.api_version
            ),
        ));
    }
    let dry_run = match annotations.get(DRY_RUN).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(at(
                "metadata.annotations",
                format!("{DRY_RUN} must be \"true\" or \"false\", not {other:?}"),
            ));
        }
    };
    let spec = |e: serde_path_to_error::Error<serde_yaml::Error>| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".into()
        } else {
            format!("spec.{path}")
        };
        (Some(qualified.clone()), field, e.inner().to_string())
    };
    match envelope.kind.as_str() {
        "PeerAuthentication" => {
            let raw: RawPeerAuthentication =
                serde_path_to_error::deserialize(envelope.spec).map_err(spec)?;
            raw.validate(name, namespace, creation_timestamp)
                .map(Document::PeerAuthentication)
                .map_err(|(field, problem)| at(&field, problem))
        }
        "AuthorizationPolicy" => {
            let raw: RawAuthorizationPolicy =
                serde_path_to_error::deserialize(envelope.spec).map_err(spec)?;
            raw.validate(name, namespace, dry_run)
                .map(Document::AuthorizationPolicy)
                .map_err(|(field, problem)| at(&field, problem))
        }
        other => Err(at(
            "kind",
            format!("{other:?} is not PeerAuthentication or AuthorizationPolicy"),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSelector {
    #[serde(default)]
    match_labels: Labels,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeerAuthentication {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    mtls: Option<RawMtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, RawMtls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default)]
    mode: Option<String>,
}

type Problem = (String, String);

fn parse_mode(raw: Option<&RawMtls>, field: &str) -> Result<Option<MtlsMode>, Problem> {
    match raw.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => Err((
            field.to_owned(),
            format!("{other:?} is not UNSET, DISABLE, PERMISSIVE or STRICT"),
        )),
    }
}

impl RawPeerAuthentication {
    fn validate(
        self,
        name: String,
        namespace: String,
        created: Option<String>,
    ) -> Result<PeerAuthentication, Problem> {
        // An empty selector selects nothing in particular: namespace-wide.
        let selector = self
            .selector
            .map(|s| s.match_labels)
            .filter(|labels| !labels.is_empty());
        let mode = parse_mode(self.mtls.as_ref(), "spec.mtls.mode")?;
        if !self.port_level_mtls.is_empty() && selector.is_none() {
            return Err((
                "spec.portLevelMtls".into(),
                "applies only with a selector (as in Istio)".into(),
            ));
        }
        // Each port is an entry in the kernel's map on every node running a
        // selected pod; the map is shared by the node's pods, so one policy
        // must not be able to fill it.
        if self.port_level_mtls.len() > MAX_PORT_LEVEL_MODES {
            return Err((
                "spec.portLevelMtls".into(),
                format!(
                    "{} ports; at most {MAX_PORT_LEVEL_MODES} are accepted",
                    self.port_level_mtls.len()
                ),
            ));
        }
        let mut ports = BTreeMap::new();
        for (port, mtls) in &self.port_level_mtls {
            let field = format!("spec.portLevelMtls.{port}");
            let number = parse_port(port).map_err(|p| (field.clone(), p))?;
            ports.insert(number, parse_mode(Some(mtls), &format!("{field}.mode"))?);
        }
        Ok(PeerAuthentication {
            name,
            namespace,
            created,
            selector,
            mode,
            ports,
        })
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port number (1-65535)")),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAuthorizationPolicy {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
    #[serde(default)]
    when: Vec<RawCondition>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    #[serde(default)]
    source: RawSource,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSource {
    principals: Option<Vec<String>>,
    not_principals: Option<Vec<String>>,
    request_principals: Option<Vec<String>>,
    not_request_principals: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
    not_namespaces: Option<Vec<String>>,
    ip_blocks: Option<Vec<String>>,
    not_ip_blocks: Option<Vec<String>>,
    remote_ip_blocks: Option<Vec<String>>,
    not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTo {
    #[serde(default)]
    operation: RawOperation,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOperation {
    ports: Option<Vec<String>>,
    not_ports: Option<Vec<String>>,
    hosts: Option<Vec<String>>,
    not_hosts: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    not_methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    not_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCondition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

impl RawAuthorizationPolicy {
    fn validate(
        self,
        name: String,
        namespace: String,
        dry_run: bool,
    ) -> Result<AuthorizationPolicy, Problem> {
        let action = match self.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some("CUSTOM") => {
                return Err((
                    "spec.action".into(),
                    "CUSTOM (an external authorizer) is not supported".into(),
                ));
            }
            Some(other) => {
                return Err((
                    "spec.action".into(),
                    format!("{other:?} is not ALLOW, DENY or AUDIT"),
                ));
            }
        };
        let rules = self
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| rule.validate(&format!("spec.rules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(AuthorizationPolicy {
            name,
            namespace,
            selector: self
                .selector
                .map(|s| s.match_labels)
                .filter(|labels| !labels.is_empty()),
            action,
            rules,
            dry_run,
        })
    }
}

impl RawRule {
    fn validate(self, at: &str) -> Result<Rule, Problem> {
        let mut l7 = Vec::new();
        let from = self
            .from
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                f.source
                    .validate(&format!("{at}.from[{i}].source"), &mut l7)
            })
            .collect::<Result<_, _>>()?;
        let to = self
            .to
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.operation
                    .validate(&format!("{at}.to[{i}].operation"), &mut l7)
            })
            .collect::<Result<_, _>>()?;
        let mut when = Vec::new();
        for (i, condition) in self.when.into_iter().enumerate() {
            let field = format!("{at}.when[{i}]");
            if let Some(condition) = condition.validate(&field, &mut l7)? {
                when.push(condition);
            }
        }
        Ok(Rule { from, to, when, l7 })
    }
}

impl RawSource {
    fn validate(self, at: &str, l7: &mut Vec<String>) -> Result<Source, Problem> {
        for (field, value) in [
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
        ] {
            if value.is_some() {
                l7.push(format!("{at}.{field}"));
            }
        }
        // An empty list is unset, as in Istio's protobuf.
        let strings = |v: Option<Vec<String>>| {
            v.filter(|v| !v.is_empty())
                .map(|v| v.iter().map(|s| StringMatch::new(s)).collect())
        };
        let blocks = |field: &str, v: Option<Vec<String>>| -> Result<Option<Vec<IpNet>>, Problem> {
            v.filter(|v| !v.is_empty())
                .map(|v| {
                    v.iter()
                        .enumerate()
                        .map(|(i, text)| {
                            parse_block(text).map_err(|p| (format!("{at}.{field}[{i}]"), p))
                        })
                        .collect()
                })
                .transpose()
        };
        Ok(Source {
            principals: strings(self.principals),
            not_principals: strings(self.not_principals),
            namespaces: strings(self.namespaces),
            not_namespaces: strings(self.not_namespaces),
            ip_blocks: blocks("ipBlocks", self.ip_blocks)?,
            not_ip_blocks: blocks("notIpBlocks", self.not_ip_blocks)?,
            // At L4 the remote address is the connection's source.
            remote_ip_blocks: blocks("remoteIpBlocks", self.remote_ip_blocks)?,
            not_remote_ip_blocks: blocks("notRemoteIpBlocks", self.not_remote_ip_blocks)?,
        })
    }
}

impl RawOperation {
    fn validate(self, at: &str, l7: &mut Vec<String>) -> Result<Operation, Problem> {
        for (field, value) in [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ] {
            if value.is_some() {
                l7.push(format!("{at}.{field}"));
            }
        }
        let ports = |field: &str, v: Option<Vec<String>>| -> Result<Option<Vec<u16>>, Problem> {
            v.filter(|v| !v.is_empty())
                .map(|v| {
                    v.iter()
                        .enumerate()
                        .map(|(i, text)| {
                            parse_port(text).map_err(|p| (format!("{at}.{field}[{i}]"), p))
                        })
                        .collect()
                })
                .transpose()
        };
        Ok(Operation {
            ports: ports("ports", self.ports)?,
            not_ports: ports("notPorts", self.not_ports)?,
        })
    }
}

impl RawCondition {
    /// The condition, or None if it needs L7 (then named in `l7`).
    fn validate(self, at: &str, l7: &mut Vec<String>) -> Result<Option<Condition>, Problem> {
        let key = match self.key.as_str() {
            "source.ip" | "remote.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            key if key.starts_with("request.")
                || key.starts_with("experimental.")
                || key == "connection.sni"
                || key == "destination.namespace" =>
            {
                l7.push(format!("{at}.key ({key})"));
                return Ok(None);
            }
            other => {
                return Err((
                    format!("{at}.key"),
                    format!("{other:?} is not a condition key Istio defines"),
                ));
            }
        };
        if self.values.is_empty() && self.not_values.is_empty() {
            return Err((at.to_owned(), "needs values or notValues".into()));
        }
        // Addresses and ports are checked now, so that a typo is an error
        // rather than a condition that never matches.
        for (field, list) in [("values", &self.values), ("notValues", &self.not_values)] {
            for (i, value) in list.iter().enumerate() {
                let checked = match key {
                    ConditionKey::SourceIp | ConditionKey::DestinationIp => {
                        parse_block(value).map(drop)
                    }
                    ConditionKey::DestinationPort => parse_port(value).map(drop),
                    _ => Ok(()),
                };
                checked.map_err(|p| (format!("{at}.{field}[{i}]"), p))?;
            }
        }
        Ok(Some(Condition {
            key,
            values: self.values,
            not_values: self.not_values,
        }))
    }
}

/// An address or a CIDR block.
pub(super) fn parse_block(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))
}

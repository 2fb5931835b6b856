//! Istio's security policies, read the way Istio reads them, at L4:
//!
//! - PeerAuthentication decides a workload's mTLS mode per port: mesh-wide
//!   (the root namespace, no selector), then namespace, then workload
//!   (selector), then `portLevelMtls`; UNSET inherits; no policy at all means
//!   PERMISSIVE.
//! - AuthorizationPolicy decides whether a connection is allowed: any
//!   matching DENY denies; else, if no ALLOW policy applies to the workload,
//!   allow; else allow only if one matches. AUDIT policies are logged,
//!   dry-run policies evaluated and logged but not enforced.
//!
//! L7 fields (request principals, hosts, methods, paths, request.* keys)
//! cannot be checked on a TCP connection. Following Istio's safe reading, an
//! ALLOW rule that has any never matches, and a DENY (or AUDIT) rule is
//! applied on its L4 parts alone; each such rule is reported when loaded.

mod documents;
#[cfg(test)]
mod tests;

pub use documents::{Document, Parsed, Refused, parse_object};

use std::{
    collections::BTreeMap,
    fmt, fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;

use super::{Labels, Workload};
use warren_pki::identity::SpiffeId;

/// Istio's default root namespace, where mesh-wide policies live.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// A document that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {policy}: {}{problem}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct PolicyError {
    /// Where it came from: a file's path, or the API server's resource.
    pub origin: String,
    /// `namespace/name`, or `document #n` when the document has no name.
    pub policy: String,
    pub field: String,
    pub problem: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Only HBONE is accepted.
    Strict,
    /// HBONE and plaintext are accepted.
    Permissive,
    /// Plaintext: peers send to the workload without HBONE.
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// `metadata.creationTimestamp` (RFC 3339), if the file has one.
    pub created: Option<String>,
    pub selector: Option<Labels>,
    /// None: UNSET (inherit).
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u16, Option<MtlsMode>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Option<Labels>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, not enforced.
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Any of these (or none given).
    pub from: Vec<Source>,
    /// Any of these (or none given).
    pub to: Vec<Operation>,
    /// All of these.
    pub when: Vec<Condition>,
    /// The rule's fields that need L7, by path; not empty means an ALLOW
    /// rule never matches.
    pub l7: Vec<String>,
}

/// Every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Option<Vec<StringMatch>>,
    pub not_principals: Option<Vec<StringMatch>>,
    pub namespaces: Option<Vec<StringMatch>>,
    pub not_namespaces: Option<Vec<StringMatch>>,
    pub ip_blocks: Option<Vec<IpNet>>,
    pub not_ip_blocks: Option<Vec<IpNet>>,
    pub remote_ip_blocks: Option<Vec<IpNet>>,
    pub not_remote_ip_blocks: Option<Vec<IpNet>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Option<Vec<u16>>,
    pub not_ports: Option<Vec<u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

/// Istio's string matching: exact, `prefix*`, `*suffix`, or `*` (any
/// non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringMatch {
    fn new(pattern: &str) -> Self {
        if pattern == "*" {
            Self::Any
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else {
            Self::Exact(pattern.to_owned())
        }
    }

    /// No value (a plaintext peer has no principal) matches nothing.
    fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return false;
        };
        match self {
            Self::Exact(exact) => value == exact,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Self::Any => true,
        }
    }
}

/// A connection arriving at a workload, as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's identity; None for plaintext.
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: Ipv4Addr,
    pub destination_port: u16,
}

impl Connection<'_> {
    /// Istio's principal form: the SPIFFE ID without `spiffe://`.
    fn principal(&self) -> Option<String> {
        self.source.map(|id| {
            let text = id.to_string();
            text.strip_prefix("spiffe://").unwrap_or(&text).to_owned()
        })
    }

    fn namespace(&self) -> Option<&str> {
        self.source.map(SpiffeId::namespace)
    }
}

/// The outcome of authorizing a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// What decided it: `DENY ns/name`, `ALLOW ns/name`, `no ALLOW policy
    /// matched`, or `no policy`.
    pub reason: String,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Dry-run policies, with what they would have decided.
    pub dry_run: Vec<String>,
}

/// A validated set of policies, ready to answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    root_namespace: String,
    peer_authentications: Vec<PeerAuthentication>,
    authorization_policies: Vec<AuthorizationPolicy>,
}

/// What loading a directory produced: the policies that are valid (and the
/// fail-closed stand-ins of those that are not), the documents refused, and
/// warnings about valid ones.
#[derive(Debug, Default)]
pub struct Loaded {
    pub policies: Policies,
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<String>,
    /// False if a file could not be read or parsed as YAML: what it holds is
    /// unknown, so these policies must not replace complete ones.
    pub complete: bool,
}

impl Policies {
    /// No policies: every workload PERMISSIVE, every connection allowed.
    pub fn none(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            ..Self::default()
        }
    }

    /// Reads every `*.yaml` and `*.yml` file in `dir` (not recursing),
    /// keeping the valid documents. A directory that cannot be read is one
    /// error, and no policies.
    pub fn load_dir(dir: &Path, root_namespace: &str) -> Loaded {
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|ext| ext == "yaml" || ext == "yml")
                })
                .collect(),
            Err(e) => {
                return Loaded {
                    policies: Self::none(root_namespace),
                    errors: vec![PolicyError {
                        origin: dir.display().to_string(),
                        policy: "policy directory".into(),
                        field: String::new(),
                        problem: format!("cannot read it: {e}"),
                    }],
                    warnings: Vec::new(),
                    complete: false,
                };
            }
        };
        files.sort();
        let texts = files.into_iter().map(|file| {
            let text = fs::read_to_string(&file);
            (file, text)
        });
        Self::from_texts(texts, root_namespace)
    }

    /// Like [`load_dir`](Self::load_dir), from (file name, contents) pairs.
    pub fn from_texts(
        texts: impl IntoIterator<Item = (PathBuf, std::io::Result<String>)>,
        root_namespace: &str,
    ) -> Loaded {
        let mut loaded = Loaded {
            policies: Self::none(root_namespace),
            complete: true,
            ..Loaded::default()
        };
        let mut documents = Vec::new();
        for (file, text) in texts {
            let origin = file.display().to_string();
            let text = match text {
                Ok(text) => text,
                Err(e) => {
                    loaded.errors.push(PolicyError {
                        origin,
                        policy: "file".into(),
                        field: String::new(),
                        problem: format!("cannot read it: {e}"),
                    });
                    loaded.complete = false;
                    continue;
                }
            };
            for parsed in documents::parse_file(&origin, &text) {
                if let Parsed::Unreadable(error) = parsed {
                    loaded.errors.push(error);
                    loaded.complete = false;
                    continue;
                }
                let reviewed = review(&origin, parsed, root_namespace);
                loaded.errors.extend(reviewed.error);
                loaded.warnings.extend(reviewed.warnings);
                documents.extend(reviewed.document);
            }
        }
        loaded.policies = Self::from_documents(root_namespace, documents);
        loaded
    }

    /// The policy set of these documents (already reviewed, see [`review`]).
    pub fn from_documents(
        root_namespace: &str,
        documents: impl IntoIterator<Item = Document>,
    ) -> Self {
        let mut policies = Self::none(root_namespace);
        for document in documents {
            match document {
                Document::PeerAuthentication(pa) => policies.peer_authentications.push(pa),
                Document::AuthorizationPolicy(ap) => policies.authorization_policies.push(ap),
            }
        }
        // Istio takes the oldest of several policies at one scope: by
        // creation time where the documents have one (exported from a
        // cluster), then by name. RFC 3339 times in UTC sort as text.
        policies.peer_authentications.sort_by(|a, b| {
            let key = |pa: &PeerAuthentication| {
                (
                    pa.namespace.clone(),
                    pa.created.is_none(),
                    pa.created.clone(),
                    pa.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        // Their order decides nothing (any matching DENY denies, any
        // matching ALLOW allows) but which one a log line names; sorted, the
        // same documents make equal sets whatever order they came in (the
        // API server's watches deliver them in any order).
        policies
            .authorization_policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        policies
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The PeerAuthentications in force, by namespace then age.
    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.peer_authentications
    }

    /// The AuthorizationPolicies in force (dry-run ones included), by
    /// namespace then name.
    pub fn authorization_policies(&self) -> &[AuthorizationPolicy] {
        &self.authorization_policies
    }

    /// The mTLS mode of `workload`: for any port, and for the ports that
    /// have a mode of their own (`portLevelMtls`).
    pub fn mtls_modes(&self, workload: &Workload) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
        let ports = self
            .workload_peer_authentication(workload)
            .map(|pa| {
                pa.ports
                    .keys()
                    .map(|&p| (p, self.mtls_mode(workload, p)))
                    .collect()
            })
            .unwrap_or_default();
        // Port 0 is never in portLevelMtls: this is the mode of the others.
        (self.mtls_mode(workload, 0), ports)
    }

    /// The workload-specific PeerAuthentication (a selector in its namespace
    /// matching its labels), if any.
    fn workload_peer_authentication(&self, workload: &Workload) -> Option<&PeerAuthentication> {
        self.peer_authentications.iter().find(|pa| {
            pa.namespace == workload.namespace
                && pa
                    .selector
                    .as_ref()
                    .is_some_and(|s| selects(s, &workload.labels))
        })
    }

    /// The mTLS mode of `workload` for connections to `port`.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        let mut mode = MtlsMode::Permissive;
        let without_selector = |ns: &str| {
            self.peer_authentications
                .iter()
                .find(|pa| pa.namespace == ns && pa.selector.is_none())
        };
        if let Some(mesh) = without_selector(&self.root_namespace) {
            mode = mesh.mode.unwrap_or(mode);
        }
        if workload.namespace != self.root_namespace
            && let Some(namespace) = without_selector(&workload.namespace)
        {
            mode = namespace.mode.unwrap_or(mode);
        }
        if let Some(specific) = self.workload_peer_authentication(workload) {
            mode = specific.mode.unwrap_or(mode);
            if let Some(Some(port_mode)) = specific.ports.get(&port) {
                mode = *port_mode;
            }
        }
        mode
    }

    /// Whether `connection` to `workload` is allowed.
    pub fn authorize(&self, workload: &Workload, connection: &Connection<'_>) -> Decision {
        let applicable: Vec<&AuthorizationPolicy> = self
            .authorization_policies
            .iter()
            .filter(|ap| self.applies(ap, workload))
            .collect();
        let matched =
            |ap: &AuthorizationPolicy| ap.rules.iter().any(|r| r.matches(ap.action, connection));
        let mut decision = Decision {
            allowed: true,
            reason: "no policy".into(),
            audited: Vec::new(),
            dry_run: Vec::new(),
        };
        for ap in &applicable {
            let name = format!("{}/{}", ap.namespace, ap.name);
            let hit = matched(ap);
            if ap.dry_run {
                let would = match (ap.action, hit) {
                    (Action::Deny, true) => "would deny",
                    (Action::Allow, true) => "would allow",
                    (Action::Audit, true) => "would audit",
                    (_, false) => "would not match",
                };
                decision
                    .dry_run
                    .push(format!("{} {name}: {would}", ap.action));
            } else if hit && ap.action == Action::Audit {
                decision.audited.push(name);
            }
        }
        let enforced = || applicable.iter().filter(|ap| !ap.dry_run);
        if let Some(deny) = enforced().find(|ap| ap.action == Action::Deny && matched(ap)) {
            decision.allowed = false;
            decision.reason = format!("DENY {}/{}", deny.namespace, deny.name);
        } else if enforced().any(|ap| ap.action == Action::Allow) {
            match enforced().find(|ap| ap.action == Action::Allow && matched(ap)) {
                Some(allow) => {
                    decision.reason = format!("ALLOW {}/{}", allow.namespace, allow.name);
                }
                None => {
                    decision.allowed = false;
                    decision.reason = "no ALLOW policy matched".into();
                }
            }
        }
        decision
    }

    /// Whether enforced (not dry-run) ALLOW or DENY policies apply to
    /// `workload`: then its plaintext must never bypass the agent.
    pub fn authorization_applies(&self, workload: &Workload) -> bool {
        self.authorization_policies
            .iter()
            .any(|ap| !ap.dry_run && ap.action != Action::Audit && self.applies(ap, workload))
    }

    /// Whether `ap` applies to `workload`: policies in the root namespace
    /// apply across namespaces, others in their own; a selector narrows
    /// either to the workloads whose labels it matches.
    fn applies(&self, ap: &AuthorizationPolicy, workload: &Workload) -> bool {
        (ap.namespace == self.root_namespace || ap.namespace == workload.namespace)
            && ap
                .selector
                .as_ref()
                .is_none_or(|s| selects(s, &workload.labels))
    }

    /// How many documents of each kind are in force (for logs).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.peer_authentications.len(),
            self.authorization_policies.len(),
        )
    }
}

/// What one parsed policy object contributes: the document to apply (the
/// object itself, or the fail-closed stand-in of a refused one), the reason
/// it was refused, and warnings about how it is read.
#[derive(Default)]
pub struct Reviewed {
    pub document: Option<Document>,
    pub error: Option<PolicyError>,
    pub warnings: Vec<String>,
}

/// Reviews one parsed object from `origin` the same way wherever it came
/// from: a refused one is replaced by its fail-closed stand-in, a
/// PeerAuthentication with a selector in the root namespace is ignored (as
/// Istio does), and rules needing L7 are reported.
pub fn review(origin: &str, parsed: Parsed, root_namespace: &str) -> Reviewed {
    let mut reviewed = Reviewed::default();
    let document = match parsed {
        Parsed::Document(document) => document,
        Parsed::Refused(refused) => {
            reviewed.error = Some(refused.error);
            match refused.fallback {
                Some(fallback) => fallback,
                None => return reviewed,
            }
        }
        Parsed::Unreadable(error) => {
            reviewed.error = Some(error);
            return reviewed;
        }
    };
    match &document {
        Document::PeerAuthentication(pa) => {
            if pa.namespace == root_namespace && pa.selector.is_some() {
                reviewed.warnings.push(format!(
                    "{origin}: policy {}/{}: a PeerAuthentication with a selector in the root \
                     namespace is ignored, as in Istio",
                    pa.namespace, pa.name
                ));
                return reviewed;
            }
        }
        Document::AuthorizationPolicy(ap) => {
            for (i, rule) in ap.rules.iter().enumerate() {
                if rule.l7.is_empty() {
                    continue;
                }
                let reading = match ap.action {
                    Action::Allow => "this ALLOW rule never matches",
                    _ => "this rule is applied on its other fields alone",
                };
                reviewed.warnings.push(format!(
                    "{origin}: policy {}/{}: spec.rules[{i}] uses {}, which needs L7; at L4 \
                     {reading}",
                    ap.namespace,
                    ap.name,
                    rule.l7.join(", ")
                ));
            }
        }
    }
    reviewed.document = Some(document);
    reviewed
}

/// `matchLabels`: every label given, with that value.
fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Rule {
    fn matches(&self, action: Action, connection: &Connection<'_>) -> bool {
        if !self.l7.is_empty() && action == Action::Allow {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(connection)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(connection)))
            && self.when.iter().all(|c| c.matches(connection))
    }
}

fn any_string(patterns: &[StringMatch], value: Option<&str>) -> bool {
    patterns.iter().any(|p| p.matches(value))
}

fn in_blocks(blocks: &[IpNet], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(&ip))
}

impl Source {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        let principal = connection.principal();
        let principal = principal.as_deref();
        let namespace = connection.namespace();
        let ip = connection.source_ip;
        let positive = |list: &Option<Vec<StringMatch>>, value| {
            list.as_ref().is_none_or(|l| any_string(l, value))
        };
        let negative = |list: &Option<Vec<StringMatch>>, value| {
            list.as_ref().is_none_or(|l| !any_string(l, value))
        };
        let in_any = |list: &Option<Vec<IpNet>>| list.as_ref().is_none_or(|l| in_blocks(l, ip));
        let in_none = |list: &Option<Vec<IpNet>>| list.as_ref().is_none_or(|l| !in_blocks(l, ip));
        positive(&self.principals, principal)
            && negative(&self.not_principals, principal)
            && positive(&self.namespaces, namespace)
            && negative(&self.not_namespaces, namespace)
            && in_any(&self.ip_blocks)
            && in_none(&self.not_ip_blocks)
            && in_any(&self.remote_ip_blocks)
            && in_none(&self.not_remote_ip_blocks)
    }
}

impl Operation {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        let port = connection.destination_port;
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
            && self.not_ports.as_ref().is_none_or(|p| !p.contains(&port))
    }
}

impl Condition {
    fn matches(&self, connection: &Connection<'_>) -> bool {
        let matches_one = |value: &str| -> bool {
            match self.key {
                ConditionKey::SourceIp => {
                    documents::parse_block(value).is_ok_and(|b| b.contains(&connection.source_ip))
                }
                ConditionKey::DestinationIp => documents::parse_block(value)
                    .is_ok_and(|b| b.contains(&IpAddr::V4(connection.destination_ip))),
                ConditionKey::DestinationPort => {
                    value.parse::<u16>() == Ok(connection.destination_port)
                }
                ConditionKey::SourceNamespace => {
                    StringMatch::new(value).matches(connection.namespace())
                }
                ConditionKey::SourcePrincipal => {
                    StringMatch::new(value).matches(connection.principal().as_deref())
                }
            }
        };
        (self.values.is_empty() || self.values.iter().any(|v| matches_one(v)))
            && !self.not_values.iter().any(|v| matches_one(v))
    }
}

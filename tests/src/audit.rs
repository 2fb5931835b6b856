//! The API server's audit log read back, and RBAC checked against it both ways: every
//! grant a service account has was used ([`unused_grants`]), and nothing it asked for was
//! refused ([`denied`]).
//!
//! The control plane logs the metadata of service accounts' requests
//! ([`crate::controlplane::AUDIT_POLICY`]); a test runs warren's components with their own
//! service accounts' tokens, then holds what they asked for against what the manifests
//! grant. Requests match grants as Kubernetes' RBAC authorizer matches them: verbs,
//! API groups, `resource/subresource` (and `*`, `*/subresource`), resource names, and a
//! RoleBinding's namespace.

use std::collections::{BTreeSet, HashMap, hash_map::Entry};

use anyhow::{Context, Result};
use serde::Deserialize;

/// One request as the audit log has it (level Metadata). An empty string stands for what
/// the request does not have, as in Kubernetes' own request attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who asked: `system:serviceaccount:<namespace>:<name>` for a service account.
    pub user: String,
    /// get, list, watch, create, update, patch, delete, deletecollection; for a
    /// non-resource request (`/api`, `/healthz`), the lowercase HTTP method.
    pub verb: String,
    /// "" for the core group.
    pub api_group: String,
    /// "" for a non-resource request: see `path`.
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    /// The object's name: in the URL, in a `metadata.name=` field selector of a list or
    /// watch, or, for a create, in the object sent.
    pub name: String,
    /// The request's path, without its query.
    pub path: String,
    /// The response's HTTP status; 0 while the request is open (RequestReceived).
    pub code: u16,
    /// The authorizer's decision: "allow", "forbid", or "" if it has not decided yet
    /// (RequestReceived) or never will (the request was not authenticated, say).
    pub decision: String,
    /// The request's latest stage logged: RequestReceived while it is open (a watch,
    /// until it ends), then ResponseStarted, ResponseComplete or Panic.
    pub stage: String,
}

impl AuditEvent {
    /// Whether the request got past RequestReceived, that is, has a response code and
    /// the authorizer's decision.
    pub fn answered(&self) -> bool {
        self.stage != "RequestReceived"
    }

    /// Whether the authorizer let the request through, whatever came of it then (a get
    /// of a missing object is answered 404, and still used its grant).
    pub fn allowed(&self) -> bool {
        self.decision == "allow"
    }

    /// Whether the authorizer refused the request (403): a grant the caller lacks.
    pub fn forbidden(&self) -> bool {
        self.decision == "forbid"
    }

    /// What was asked, as a line: `create configmaps in namespace shop`,
    /// `patch configmaps named warren-trust-bundle in namespace warren-system`,
    /// `create tokenreviews.authentication.k8s.io`, `get /version`.
    pub fn describe(&self) -> String {
        if self.resource.is_empty() {
            return format!("{} {}", self.verb, self.path);
        }
        let mut resource = self.resource.clone();
        if !self.subresource.is_empty() {
            resource = format!("{resource}/{}", self.subresource);
        }
        let mut line = format!(
            "{} {}",
            self.verb,
            resource_phrase(&resource, &self.api_group)
        );
        if !self.name.is_empty() {
            line += &format!(" named {}", self.name);
        }
        if !self.namespace.is_empty() {
            line += &format!(" in namespace {}", self.namespace);
        }
        line
    }
}

/// Parses an audit log in JSON lines (`--audit-log-format=json`), one event per request
/// in the order the requests arrived, at its latest stage (see [`AuditEvent::stage`]).
/// A last line without its newline is still being written, and left out.
pub fn parse_log(text: &str) -> Result<Vec<AuditEvent>> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut events: Vec<AuditEvent> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (number, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawEvent = serde_json::from_str(line)
            .with_context(|| format!("line {} is not an audit event: {line}", number + 1))?;
        let (id, event) = raw.into_event();
        match by_id.entry(id) {
            Entry::Occupied(seen) => events[*seen.get()] = event,
            Entry::Vacant(new) => {
                new.insert(events.len());
                events.push(event);
            }
        }
    }
    Ok(events)
}

/// Every grant that RBAC objects in `rbac_yaml` (multi-document YAML, as the manifests
/// ship it) give `user` (`system:serviceaccount:<namespace>:<name>`) and that none of
/// `user`'s allowed requests in `events` used, one line each, in the YAML's order:
/// `ClusterRole warren-ca: create tokenreviews.authentication.k8s.io never used`.
///
/// A grant is one (verb, API group, resource, resource name or any) of a rule, through
/// one binding whose subject is `user` (its ServiceAccount, the User itself, or a group
/// every service account or those of its namespace are in). Through a RoleBinding it
/// holds in the binding's namespace only, and its line names the namespace. A binding
/// of `user` to a role that `rbac_yaml` lacks is a line too: its grants cannot be checked.
///
/// # Panics
/// If `rbac_yaml` is not YAML or an RBAC object in it is malformed: a bug in the test.
pub fn unused_grants(rbac_yaml: &str, events: &[AuditEvent], user: &str) -> Vec<String> {
    let objects = parse_rbac(rbac_yaml)
        .unwrap_or_else(|err| panic!("the RBAC YAML given to unused_grants: {err:#}"));
    let used: Vec<&AuditEvent> = events
        .iter()
        .filter(|event| event.user == user && event.allowed())
        .collect();
    let mut lines = Vec::new();
    let mut seen = BTreeSet::new();
    for binding in objects.iter().filter(|o| binds(o, user)) {
        let grants = match grants_of(binding, &objects) {
            Ok(grants) => grants,
            Err(line) => {
                lines.push(line);
                continue;
            }
        };
        for grant in grants {
            if !used.iter().any(|event| grant.matches(event)) {
                let line = format!("{}: {} never used", grant.holder, grant.describe());
                if seen.insert(line.clone()) {
                    lines.push(line);
                }
            }
        }
    }
    lines
}

/// Every distinct request of `user` that the authorizer refused (403), as
/// [`AuditEvent::describe`] has it: grants the code needs and lacks.
pub fn denied(events: &[AuditEvent], user: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    events
        .iter()
        .filter(|event| event.user == user && event.forbidden())
        .map(AuditEvent::describe)
        .filter(|line| seen.insert(line.clone()))
        .collect()
}

/// `pods`, `pods/status`, `tokenreviews.authentication.k8s.io`, `deployments.apps/scale`.
fn resource_phrase(resource: &str, group: &str) -> String {
    let (base, subresource) = match resource.split_once('/') {
        Some((base, sub)) => (base, Some(sub)),
        None => (resource, None),
    };
    let mut phrase = base.to_owned();
    if !group.is_empty() {
        phrase = format!("{phrase}.{group}");
    }
    if let Some(sub) = subresource {
        phrase = format!("{phrase}/{sub}");
    }
    phrase
}

/// One event line of the log, as much of it as the checks need.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent {
    #[serde(rename = "auditID")]
    audit_id: String,
    stage: String,
    #[serde(rename = "requestURI", default)]
    request_uri: String,
    #[serde(default)]
    verb: String,
    #[serde(default)]
    user: RawUser,
    object_ref: Option<RawObjectRef>,
    response_status: Option<RawStatus>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawUser {
    username: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawObjectRef {
    resource: String,
    subresource: String,
    namespace: String,
    name: String,
    api_group: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawStatus {
    code: u16,
}

impl RawEvent {
    fn into_event(self) -> (String, AuditEvent) {
        let object = self.object_ref.unwrap_or_default();
        let path = match self.request_uri.split_once('?') {
            Some((path, _query)) => path.to_owned(),
            None => self.request_uri,
        };
        let decision = self
            .annotations
            .get("authorization.k8s.io/decision")
            .cloned()
            .unwrap_or_default();
        let event = AuditEvent {
            user: self.user.username,
            verb: self.verb,
            api_group: object.api_group,
            resource: object.resource,
            subresource: object.subresource,
            namespace: object.namespace,
            name: object.name,
            path,
            code: self.response_status.map_or(0, |status| status.code),
            decision,
            stage: self.stage,
        };
        (self.audit_id, event)
    }
}

/// An RBAC object: a (Cluster)Role's rules or a (Cluster)RoleBinding's role and subjects.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RbacObject {
    kind: String,
    metadata: Metadata,
    rules: Vec<Rule>,
    role_ref: Option<RoleRef>,
    subjects: Vec<Subject>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Metadata {
    name: String,
    namespace: String,
}

impl RbacObject {
    /// Its namespace, `default` when the YAML says none (where `apply` puts it).
    fn namespace(&self) -> &str {
        match self.metadata.namespace.as_str() {
            "" => "default",
            namespace => namespace,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
    #[serde(rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoleRef {
    kind: String,
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Subject {
    kind: String,
    name: String,
    namespace: String,
}

/// The RBAC objects of a multi-document YAML text; other kinds are skipped.
fn parse_rbac(yaml: &str) -> Result<Vec<RbacObject>> {
    let mut objects = Vec::new();
    for (number, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("document {} is not YAML", number + 1))?;
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        if !api_version.is_some_and(|v| v.starts_with("rbac.authorization.k8s.io/")) {
            continue;
        }
        let object: RbacObject = serde_yaml::from_value(value)
            .with_context(|| format!("document {} is not an RBAC object", number + 1))?;
        objects.push(object);
    }
    Ok(objects)
}

/// Whether `object` is a binding with `user` among its subjects.
fn binds(object: &RbacObject, user: &str) -> bool {
    let is_role_binding = match object.kind.as_str() {
        "RoleBinding" => true,
        "ClusterRoleBinding" => false,
        _ => return false,
    };
    let account = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'));
    object.subjects.iter().any(|subject| {
        match (subject.kind.as_str(), account) {
            ("User", _) => subject.name == user,
            ("ServiceAccount", Some((namespace, name))) => {
                // A RoleBinding's subject may leave out its own namespace.
                let subject_namespace = match subject.namespace.as_str() {
                    "" if is_role_binding => object.namespace(),
                    other => other,
                };
                subject.name == name && subject_namespace == namespace
            }
            ("Group", Some((namespace, _))) => {
                subject.name == "system:serviceaccounts"
                    || subject.name == format!("system:serviceaccounts:{namespace}")
                    || subject.name == "system:authenticated"
            }
            ("Group", None) => subject.name == "system:authenticated",
            _ => false,
        }
    })
}

/// The grants of `binding`'s role, or a line saying the role is not in `objects`.
fn grants_of(binding: &RbacObject, objects: &[RbacObject]) -> Result<Vec<Grant>, String> {
    let role_ref = binding.role_ref.as_ref();
    let (role_kind, role_name) = role_ref.map_or(("", ""), |r| (r.kind.as_str(), &r.name));
    let (holder, namespace, role) = match (binding.kind.as_str(), role_kind) {
        ("ClusterRoleBinding", "ClusterRole") => (
            format!("ClusterRole {role_name}"),
            None,
            objects
                .iter()
                .find(|o| o.kind == "ClusterRole" && o.metadata.name == role_name),
        ),
        ("RoleBinding", "ClusterRole") => {
            let namespace = binding.namespace();
            (
                format!(
                    "ClusterRole {role_name} in namespace {namespace} (RoleBinding {})",
                    binding.metadata.name
                ),
                Some(namespace.to_owned()),
                objects
                    .iter()
                    .find(|o| o.kind == "ClusterRole" && o.metadata.name == role_name),
            )
        }
        ("RoleBinding", "Role") => {
            let namespace = binding.namespace();
            (
                format!("Role {namespace}/{role_name}"),
                Some(namespace.to_owned()),
                objects.iter().find(|o| {
                    o.kind == "Role" && o.metadata.name == role_name && o.namespace() == namespace
                }),
            )
        }
        (kind, role_kind) => {
            return Err(format!(
                "{kind} {}: a roleRef of kind {role_kind:?}, which RBAC does not take",
                binding.metadata.name
            ));
        }
    };
    let Some(role) = role else {
        return Err(format!(
            "{} {}: binds {role_kind} {role_name:?}, which the YAML lacks: its grants are \
             not checked",
            binding.kind, binding.metadata.name
        ));
    };
    let mut grants = Vec::new();
    for rule in &role.rules {
        for url in &rule.non_resource_urls {
            for verb in &rule.verbs {
                grants.push(Grant {
                    holder: holder.clone(),
                    verb: verb.clone(),
                    target: Target::NonResource(url.clone()),
                    namespace: namespace.clone(),
                });
            }
        }
        let names: Vec<Option<&String>> = if rule.resource_names.is_empty() {
            vec![None]
        } else {
            rule.resource_names.iter().map(Some).collect()
        };
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    for name in &names {
                        grants.push(Grant {
                            holder: holder.clone(),
                            verb: verb.clone(),
                            target: Target::Resource {
                                group: group.clone(),
                                resource: resource.clone(),
                                name: name.cloned(),
                            },
                            namespace: namespace.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(grants)
}

/// One thing a binding lets its subject do: a verb on a resource (maybe one object of
/// it) or a non-resource URL, anywhere or in one namespace.
struct Grant {
    /// The role it comes from, as the line names it.
    holder: String,
    verb: String,
    target: Target,
    /// Some for a RoleBinding's grants.
    namespace: Option<String>,
}

enum Target {
    Resource {
        group: String,
        /// `resource` or `resource/subresource`, either part maybe `*`.
        resource: String,
        name: Option<String>,
    },
    NonResource(String),
}

impl Grant {
    /// Whether the authorizer would have let `event` through by this grant.
    fn matches(&self, event: &AuditEvent) -> bool {
        if self.verb != "*" && self.verb != event.verb {
            return false;
        }
        if let Some(namespace) = &self.namespace
            && *namespace != event.namespace
        {
            return false;
        }
        match &self.target {
            Target::NonResource(url) => {
                event.resource.is_empty()
                    && (url == "*"
                        || *url == event.path
                        || url
                            .strip_suffix('*')
                            .is_some_and(|prefix| event.path.starts_with(prefix)))
            }
            Target::Resource {
                group,
                resource,
                name,
            } => {
                if event.resource.is_empty() || (group != "*" && *group != event.api_group) {
                    return false;
                }
                let requested = if event.subresource.is_empty() {
                    event.resource.clone()
                } else {
                    format!("{}/{}", event.resource, event.subresource)
                };
                let resource_matches = resource == "*"
                    || *resource == requested
                    || (!event.subresource.is_empty()
                        && *resource == format!("*/{}", event.subresource));
                let name_matches = match name {
                    None => true,
                    // A create names no object when it is authorized (the name is in the
                    // body, which the log has), so resource names never allow one.
                    Some(_) if event.verb == "create" && event.subresource.is_empty() => false,
                    Some(name) => *name == event.name,
                };
                resource_matches && name_matches
            }
        }
    }

    /// `create tokenreviews.authentication.k8s.io`, `patch configmaps named x`, `get /version`.
    fn describe(&self) -> String {
        match &self.target {
            Target::NonResource(url) => format!("{} {url}", self.verb),
            Target::Resource {
                group,
                resource,
                name,
            } => {
                let mut line = format!("{} {}", self.verb, resource_phrase(resource, group));
                if let Some(name) = name {
                    line += &format!(" named {name}");
                }
                line
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA_RBAC: &str = include_str!("../../deploy/kustomize/base/ca/rbac.yaml");
    const CA: &str = "system:serviceaccount:warren-system:warren-ca";
    const AGENT: &str = "system:serviceaccount:warren-system:warren-agent";

    /// An allowed, answered request of `user`: `verb` on `resource` (maybe
    /// `resource/subresource`) of `group`, in `namespace`, naming `name`.
    fn request(user: &str, verb: &str, group: &str, resource: &str) -> AuditEvent {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        AuditEvent {
            user: user.to_owned(),
            verb: verb.to_owned(),
            api_group: group.to_owned(),
            resource: resource.to_owned(),
            subresource: subresource.to_owned(),
            path: "/apis/whatever".to_owned(),
            code: 200,
            decision: "allow".to_owned(),
            stage: "ResponseComplete".to_owned(),
            ..AuditEvent::default()
        }
    }

    fn at(mut event: AuditEvent, namespace: &str, name: &str) -> AuditEvent {
        event.namespace = namespace.to_owned();
        event.name = name.to_owned();
        event
    }

    /// Everything the CA's RBAC lets it do, done once.
    fn ca_at_work() -> Vec<AuditEvent> {
        vec![
            request(CA, "create", "authentication.k8s.io", "tokenreviews"),
            request(CA, "list", "", "pods"),
            request(CA, "watch", "", "pods"),
            at(
                request(CA, "patch", "", "configmaps"),
                "warren-system",
                "warren-trust-bundle",
            ),
        ]
    }

    #[test]
    fn grants_used_are_not_reported() {
        assert!(unused_grants(CA_RBAC, &ca_at_work(), CA).is_empty());
    }

    #[test]
    fn a_verb_never_asked_for_is_reported() {
        let mut events = ca_at_work();
        events.retain(|e| !(e.verb == "watch" || e.verb == "create"));
        assert_eq!(
            unused_grants(CA_RBAC, &events, CA),
            [
                "ClusterRole warren-ca: create tokenreviews.authentication.k8s.io never used",
                "ClusterRole warren-ca: watch pods never used",
            ]
        );
    }

    #[test]
    fn resource_names_limit_the_grant_to_those_objects() {
        let unused =
            ["Role warren-system/warren-ca: patch configmaps named warren-trust-bundle never used"];
        let mut events = ca_at_work();
        events[3].name = "another-map".to_owned();
        assert_eq!(unused_grants(CA_RBAC, &events, CA), unused);
        // A create names its object only in the body: RBAC never sees the name.
        events[3].verb = "create".to_owned();
        events[3].name = "warren-trust-bundle".to_owned();
        let created = unused_grants(
            &CA_RBAC.replace("verbs: [patch]", "verbs: [create]"),
            &events,
            CA,
        );
        assert_eq!(
            created,
            [
                "Role warren-system/warren-ca: create configmaps named warren-trust-bundle never used"
            ]
        );
    }

    #[test]
    fn a_role_holds_in_its_namespace_only() {
        let mut events = ca_at_work();
        events[3].namespace = "default".to_owned();
        assert_eq!(
            unused_grants(CA_RBAC, &events, CA),
            ["Role warren-system/warren-ca: patch configmaps named warren-trust-bundle never used"]
        );
    }

    #[test]
    fn only_the_users_own_allowed_requests_count() {
        // Nothing in the CA's RBAC is bound to the agent: nothing to report for it.
        assert!(unused_grants(CA_RBAC, &[], AGENT).is_empty());
        // The agent's requests do not use the CA's grants.
        let mut events = ca_at_work();
        for event in &mut events {
            event.user = AGENT.to_owned();
        }
        assert_eq!(unused_grants(CA_RBAC, &events, CA).len(), 4);
        // Refused, or still open: not used.
        let mut events = ca_at_work();
        events[0].decision = "forbid".to_owned();
        events[0].code = 403;
        events[2].decision = String::new();
        events[2].stage = "RequestReceived".to_owned();
        assert_eq!(unused_grants(CA_RBAC, &events, CA).len(), 2);
        // Allowed then not found (the ConfigMap is missing): the grant was used.
        let mut events = ca_at_work();
        events[3].code = 404;
        assert!(unused_grants(CA_RBAC, &events, CA).is_empty());
    }

    #[test]
    fn cluster_roles_bound_in_a_namespace_wildcards_and_subresources() {
        let rbac = "\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: scaler}
rules:
  - apiGroups: [apps]
    resources: ['*/scale']
    verbs: ['*']
  - apiGroups: ['']
    resources: [pods/status]
    verbs: [patch]
  - nonResourceURLs: [/version, /healthz/*]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: scaler, namespace: shop}
roleRef: {kind: ClusterRole, name: scaler}
subjects: [{kind: Group, name: 'system:serviceaccounts:warren-system'}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: someone-else}
roleRef: {kind: ClusterRole, name: scaler}
subjects: [{kind: ServiceAccount, name: warren-ca, namespace: shop}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: missing, namespace: warren-system}
roleRef: {kind: Role, name: missing}
subjects: [{kind: ServiceAccount, name: warren-ca}]
";
        let health = AuditEvent {
            path: "/healthz/etcd".to_owned(),
            ..request(CA, "get", "", "")
        };
        let events = [
            at(
                request(CA, "update", "apps", "deployments/scale"),
                "shop",
                "web",
            ),
            at(request(CA, "patch", "", "pods/status"), "default", "web-1"),
            health,
        ];
        let scaler = "ClusterRole scaler in namespace shop (RoleBinding scaler)";
        assert_eq!(
            unused_grants(rbac, &events, CA),
            [
                format!("{scaler}: patch pods/status never used"),
                format!("{scaler}: get /version never used"),
                format!("{scaler}: get /healthz/* never used"),
                "RoleBinding missing: binds Role \"missing\", which the YAML lacks: its grants \
                 are not checked"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn denied_lists_each_refused_request_once() {
        let mut refused = at(request(CA, "create", "", "configmaps"), "shop", "");
        refused.decision = "forbid".to_owned();
        refused.code = 403;
        let mut watch = request(CA, "watch", "discovery.k8s.io", "endpointslices");
        watch.decision = "forbid".to_owned();
        let mut others = refused.clone();
        others.user = AGENT.to_owned();
        let events = [
            refused.clone(),
            ca_at_work()[0].clone(),
            watch,
            refused,
            others,
        ];
        assert_eq!(
            denied(&events, CA),
            [
                "create configmaps in namespace shop",
                "watch endpointslices.discovery.k8s.io",
            ]
        );
    }

    /// A line of the log as 1.20 writes it (fields the checks do not read left out).
    fn line(id: &str, stage: &str, uri: &str, verb: &str, decision: Option<&str>) -> String {
        let mut event = serde_json::json!({
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": id,
            "stage": stage,
            "requestURI": uri,
            "verb": verb,
            "user": {"username": CA, "groups": ["system:serviceaccounts"]},
            "objectRef": {"resource": "pods", "apiVersion": "v1"},
        });
        if let Some(decision) = decision {
            event["responseStatus"] = serde_json::json!({"metadata": {}, "code": 200});
            event["annotations"] = serde_json::json!({"authorization.k8s.io/decision": decision});
        }
        format!("{event}\n")
    }

    #[test]
    fn the_log_gives_one_event_per_request_at_its_latest_stage() {
        let watch = "/api/v1/pods?&watch=true&resourceVersion=0";
        let log = [
            line("a", "RequestReceived", watch, "watch", None),
            line("b", "RequestReceived", "/api/v1/pods?", "list", None),
            line(
                "b",
                "ResponseComplete",
                "/api/v1/pods?",
                "list",
                Some("allow"),
            ),
            line("a", "ResponseStarted", watch, "watch", Some("allow")),
            line("a", "ResponseComplete", watch, "watch", Some("allow")),
            line("c", "RequestReceived", "/api/v1/pods?", "list", None),
        ]
        .concat();
        let events = parse_log(&log).unwrap();
        let summary: Vec<_> = events
            .iter()
            .map(|e| (e.verb.as_str(), e.stage.as_str(), e.answered(), e.allowed()))
            .collect();
        assert_eq!(
            summary,
            [
                ("watch", "ResponseComplete", true, true),
                ("list", "ResponseComplete", true, true),
                ("list", "RequestReceived", false, false),
            ]
        );
        assert_eq!(events[0].path, "/api/v1/pods");
        assert_eq!(events[0].code, 200);
        assert_eq!(events[0].user, CA);

        // A line being written is not there yet; a line that is not an event is an error.
        let partial = format!("{log}{{\"kind\":\"Event\",\"auditID\":\"d\"");
        assert_eq!(parse_log(&partial).unwrap(), events);
        let err = parse_log(&format!("{log}not json\n")).unwrap_err();
        assert!(format!("{err:#}").contains("line 7"), "{err:#}");
    }
}

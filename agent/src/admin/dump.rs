//! `GET /config_dump`: the agent's view as one JSON object.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use warren_pki::tls::{TrustBundle, serial_of, subject_of, validity_of};

use super::{Admin, CertificateInfo};
use crate::{
    mesh::{
        LocalPod, Policies, Snapshot, Workload,
        policy::{
            AuthorizationPolicy, Condition, ConditionKey, MtlsMode, Operation, PeerAuthentication,
            Rule, Source, StringMatch,
        },
    },
    reconcile::{PodState, States},
};

/// The agent's view now, as one JSON object. Field names are snake_case and
/// stable; lists are sorted, so two dumps of the same view are equal. Times
/// are RFC 3339 in UTC (null outside the years 1970 to 9999).
///
/// - `node`: this node's name.
/// - `synced`: whether the source of workloads has given a complete view.
/// - `workloads`: every workload of the mesh, by `namespace` then `name`:
///   `name`, `namespace`, `workload_name`, `service_account`, `identity`
///   (SPIFFE ID), `address`, `node`, `labels`, `probe_ports`, `local` (null
///   on other nodes; else `{"source": "config", "netns", "cgroup"}` or
///   `{"source": "kubelet", "uid", "netns"}`, `netns` null until the runtime
///   names it), `mtls` (`{"mode", "port_modes"}`, the PeerAuthentication
///   modes in force for it) and `authorization_enforced` (whether enforced
///   ALLOW or DENY policies apply to it).
/// - `conflicted_addresses`: addresses several pods claim; connections to
///   them are refused.
/// - `services`: by `address` (virtual `ip:port`): `service`
///   (`namespace/name`) and `endpoints` (`ip:port`).
/// - `policies`: `root_namespace`, `peer_authentications` (`namespace`,
///   `name`, `created`, `selector`, `mode`, `port_modes`; `UNSET`
///   inherits) and `authorization_policies` (`namespace`, `name`,
///   `selector`, `action`, `dry_run`, `rules`: each `from`, `to`, `when` as
///   in Istio's spec, in snake_case, and `l7`, the fields that need L7).
///   A null `selector` selects the whole namespace.
/// - `trust_bundle.roots`: `subject`, `serial` (hex), `not_before`,
///   `not_after`; or `error` for a root that cannot be read.
/// - `pods`: this node's pods the agent enrolls or tries to: `pod`
///   (`namespace/name`), `address`, `state` (`enrolled` with `netns`
///   `{"dev", "ino"}`, or `failing` with the last `error`).
/// - `certificates`: the workload certificates held: `workload`,
///   `identity`, `serial` (hex), `not_before`, `not_after`. Never a key.
pub fn config_dump(admin: &Admin) -> Value {
    // Each held only while copying out: the senders wait on these locks.
    let snapshot = admin.mesh.borrow().clone();
    let pods = admin.pods.borrow().clone();
    json!({
        "node": admin.node,
        "synced": snapshot.synced(),
        "workloads": workloads(&snapshot),
        "conflicted_addresses": snapshot
            .workloads()
            .conflicts()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        "services": services(&snapshot),
        "policies": policies(snapshot.policies()),
        "trust_bundle": { "roots": roots(snapshot.trust()) },
        "pods": pod_states(&pods),
        "certificates": certificates((admin.certificates)()),
    })
}

fn workloads(snapshot: &Snapshot) -> Vec<Value> {
    let mut workloads: Vec<_> = snapshot.workloads().iter().collect();
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let policies = snapshot.policies();
    workloads
        .into_iter()
        .map(|w| {
            let (mode, port_modes) = policies.mtls_modes(w);
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "workload_name": w.workload_name,
                "service_account": w.service_account,
                "identity": w.identity.to_string(),
                "address": w.ip.to_string(),
                "node": w.node,
                "labels": w.labels,
                "probe_ports": w.probe_ports,
                "local": local(w),
                "mtls": {
                    "mode": mode.to_string(),
                    "port_modes": port_modes
                        .into_iter()
                        .map(|(port, mode)| (port.to_string(), Value::from(mode.to_string())))
                        .collect::<Map<_, _>>(),
                },
                "authorization_enforced": policies.authorization_applies(w),
            })
        })
        .collect()
}

fn local(workload: &Workload) -> Value {
    match &workload.local {
        None => Value::Null,
        Some(LocalPod::Paths { netns, cgroup }) => json!({
            "source": "config",
            "netns": netns.display().to_string(),
            "cgroup": cgroup.display().to_string(),
        }),
        Some(LocalPod::Kubelet { uid, netns }) => json!({
            "source": "kubelet",
            "uid": uid,
            "netns": netns.as_ref().map(|n| n.display().to_string()),
        }),
    }
}

fn services(snapshot: &Snapshot) -> Vec<Value> {
    let mut services: Vec<_> = snapshot.services().iter().collect();
    services.sort_by_key(|(vip, _)| **vip);
    services
        .into_iter()
        .map(|(vip, port)| {
            json!({
                "address": vip.to_string(),
                "service": port.qualified_name(),
                "endpoints": port
                    .endpoints
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn policies(policies: &Policies) -> Value {
    json!({
        "root_namespace": policies.root_namespace(),
        "peer_authentications": policies
            .peer_authentications()
            .iter()
            .map(peer_authentication)
            .collect::<Vec<_>>(),
        "authorization_policies": policies
            .authorization_policies()
            .iter()
            .map(authorization_policy)
            .collect::<Vec<_>>(),
    })
}

fn mode(mode: Option<MtlsMode>) -> String {
    mode.map_or_else(|| "UNSET".to_owned(), |m| m.to_string())
}

fn peer_authentication(pa: &PeerAuthentication) -> Value {
    json!({
        "namespace": pa.namespace,
        "name": pa.name,
        "created": pa.created,
        "selector": pa.selector,
        "mode": mode(pa.mode),
        "port_modes": pa
            .ports
            .iter()
            .map(|(port, m)| (port.to_string(), Value::from(mode(*m))))
            .collect::<Map<_, _>>(),
    })
}

fn authorization_policy(ap: &AuthorizationPolicy) -> Value {
    json!({
        "namespace": ap.namespace,
        "name": ap.name,
        "selector": ap.selector,
        "action": ap.action.to_string(),
        "dry_run": ap.dry_run,
        "rules": ap.rules.iter().map(rule).collect::<Vec<_>>(),
    })
}

fn rule(rule: &Rule) -> Value {
    json!({
        "from": rule.from.iter().map(source).collect::<Vec<_>>(),
        "to": rule.to.iter().map(operation).collect::<Vec<_>>(),
        "when": rule.when.iter().map(condition).collect::<Vec<_>>(),
        "l7": rule.l7,
    })
}

/// The fields given, as in the policy (absent ones left out).
fn source(source: &Source) -> Value {
    let mut fields = Map::new();
    let patterns = [
        ("principals", &source.principals),
        ("not_principals", &source.not_principals),
        ("namespaces", &source.namespaces),
        ("not_namespaces", &source.not_namespaces),
    ];
    for (name, list) in patterns {
        if let Some(list) = list {
            fields.insert(name.into(), list.iter().map(pattern).collect());
        }
    }
    let blocks = [
        ("ip_blocks", &source.ip_blocks),
        ("not_ip_blocks", &source.not_ip_blocks),
        ("remote_ip_blocks", &source.remote_ip_blocks),
        ("not_remote_ip_blocks", &source.not_remote_ip_blocks),
    ];
    for (name, list) in blocks {
        if let Some(list) = list {
            fields.insert(name.into(), list.iter().map(|b| b.to_string()).collect());
        }
    }
    Value::Object(fields)
}

/// Istio's pattern text: `exact`, `prefix*`, `*suffix`, `*`.
fn pattern(pattern: &StringMatch) -> Value {
    Value::from(match pattern {
        StringMatch::Exact(exact) => exact.clone(),
        StringMatch::Prefix(prefix) => format!("{prefix}*"),
        StringMatch::Suffix(suffix) => format!("*{suffix}"),
        StringMatch::Any => "*".to_owned(),
    })
}

fn operation(operation: &Operation) -> Value {
    let mut fields = Map::new();
    for (name, list) in [
        ("ports", &operation.ports),
        ("not_ports", &operation.not_ports),
    ] {
        if let Some(list) = list {
            fields.insert(name.into(), json!(list));
        }
    }
    Value::Object(fields)
}

fn condition(condition: &Condition) -> Value {
    let key = match condition.key {
        ConditionKey::SourceIp => "source.ip",
        ConditionKey::SourceNamespace => "source.namespace",
        ConditionKey::SourcePrincipal => "source.principal",
        ConditionKey::DestinationIp => "destination.ip",
        ConditionKey::DestinationPort => "destination.port",
    };
    json!({
        "key": key,
        "values": condition.values,
        "not_values": condition.not_values,
    })
}

fn roots(trust: &TrustBundle) -> Vec<Value> {
    trust
        .roots()
        .iter()
        .map(|root| {
            let read = || -> Result<Value, String> {
                let subject = subject_of(root).map_err(|e| e.to_string())?;
                let serial = serial_of(root).map_err(|e| e.to_string())?;
                let (not_before, not_after) = validity_of(root).map_err(|e| e.to_string())?;
                Ok(json!({
                    "subject": subject,
                    "serial": serial,
                    "not_before": timestamp(not_before),
                    "not_after": timestamp(not_after),
                }))
            };
            read().unwrap_or_else(|error| json!({ "error": error }))
        })
        .collect()
}

fn pod_states(states: &States) -> Vec<Value> {
    let mut states: Vec<_> = states.iter().collect();
    states.sort_by(|a, b| a.0.cmp(b.0));
    states
        .into_iter()
        .map(|(pod, state)| match state {
            PodState::Enrolled { workload, netns } => json!({
                "pod": pod,
                "address": workload.ip.to_string(),
                "state": "enrolled",
                "netns": netns,
            }),
            PodState::Failing { workload, error } => json!({
                "pod": pod,
                "address": workload.ip.to_string(),
                "state": "failing",
                "error": error,
            }),
        })
        .collect()
}

fn certificates(mut held: Vec<CertificateInfo>) -> Vec<Value> {
    held.sort_by(|a, b| (&a.workload, &a.identity).cmp(&(&b.workload, &b.identity)));
    held.into_iter()
        .map(|c| {
            json!({
                "workload": c.workload,
                "identity": c.identity,
                "serial": c.serial,
                "not_before": timestamp(c.not_before),
                "not_after": timestamp(c.not_after),
            })
        })
        .collect()
}

/// RFC 3339 in UTC, to the second; null outside the years 1970 to 9999,
/// which the formatter cannot show.
fn timestamp(time: SystemTime) -> Value {
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    if time < UNIX_EPOCH || time >= UNIX_EPOCH + YEAR_10000 {
        return Value::Null;
    }
    Value::from(humantime::format_rfc3339_seconds(time).to_string())
}

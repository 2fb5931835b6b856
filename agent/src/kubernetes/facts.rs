//! The facts warren keeps of each Kubernetes object: only what it uses, so
//! that a large cluster costs little memory. Everything here is read from
//! fields that Kubernetes 1.20 has too.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::core::v1::{Container, Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{ResourceExt, api::DynamicObject, discovery::ApiResource};
use serde::Deserialize;
use tracing::{error, warn};

use crate::mesh::{
    Labels,
    policy::{self, Document},
};

/// On a static pod's mirror Pod (the kubelet's UID for the pod).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// On pods that Istio injected with a sidecar.
const SIDECAR_ANNOTATION: &str = "sidecar.istio.io/status";

pub fn namespace(namespace: &Namespace) -> Option<Labels> {
    Some(namespace.labels().clone())
}

/// A pod, on any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Istio's workload name: see [`workload_name`].
    pub workload_name: String,
    pub labels: Labels,
    /// `spec.nodeName`: none until scheduled.
    pub node: Option<String>,
    pub service_account: String,
    pub host_network: bool,
    /// Injected with Istio's sidecar: its own proxy does mTLS (Istio's
    /// ambient mode leaves such pods alone too).
    pub has_sidecar: bool,
    /// A static pod's mirror: a node's kubelet may create one in any
    /// namespace, without a service account, so it has no identity the CA
    /// will sign (nor does Istio's); it stays out of the mesh.
    pub mirror: bool,
    /// Its IPv4 address, once it has one.
    pub ip: Option<Ipv4Addr>,
    /// Succeeded or Failed: its address may already be another pod's.
    pub finished: bool,
    /// Being deleted (it may still serve for its grace period).
    pub terminating: bool,
    /// `metadata.creationTimestamp`: of two pods claiming one address, the
    /// older one is believed.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    /// The ports the kubelet probes (numeric; named ports resolved against
    /// the containers' ports).
    pub probe_ports: BTreeSet<u16>,
}

pub fn pod(pod: &Pod) -> Option<PodFacts> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref();
    let ip = status.and_then(|s| {
        // podIPs lists every family; podIP is the first. The mesh is IPv4.
        let listed = s.pod_ips.iter().flatten().map(|p| p.ip.as_str());
        s.pod_ip
            .as_deref()
            .into_iter()
            .chain(listed)
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
    });
    let phase = status.and_then(|s| s.phase.as_deref());
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let annotations = pod.annotations();
    Some(PodFacts {
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        uid: pod.uid().unwrap_or_default(),
        workload_name: workload_name(pod),
        has_sidecar: annotations.contains_key(SIDECAR_ANNOTATION),
        mirror: annotations.contains_key(MIRROR_ANNOTATION),
        labels: pod.labels().clone(),
        node: spec.node_name.clone(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".into()),
        host_network: spec.host_network == Some(true),
        ip,
        finished: matches!(phase, Some("Succeeded" | "Failed")),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        probe_ports: probe_ports(containers),
    })
}

/// The workload a pod belongs to, named as Istio names it in metrics: its
/// controller's name, and for the controllers that make pods through
/// another the outer one's (a Deployment's ReplicaSet `web-5d4f8b7c9`
/// gives `web`; a CronJob's Job `backup-28735200` gives `backup`); a pod
/// without a controller is its own workload.
fn workload_name(pod: &Pod) -> String {
    let name = pod.name_any();
    let Some(owner) = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
    else {
        return name;
    };
    let labels = pod.labels();
    let trimmed = |suffix: &str| {
        owner
            .name
            .strip_suffix(suffix)
            .and_then(|rest| rest.strip_suffix('-'))
            .filter(|rest| !rest.is_empty())
            .map(str::to_owned)
    };
    match owner.kind.as_str() {
        // The ReplicaSet's suffix is the pod template's hash, which the
        // Deployment also puts on the pod as a label.
        "ReplicaSet" => labels
            .get("pod-template-hash")
            .and_then(|hash| trimmed(hash)),
        // A CronJob names its Jobs `<cronjob>-<scheduled minute>`.
        "Job" => owner
            .name
            .rsplit_once('-')
            .filter(|(cron, time)| {
                !cron.is_empty() && time.len() >= 8 && time.bytes().all(|b| b.is_ascii_digit())
            })
            .map(|(cron, _)| cron.to_owned()),
        // OpenShift's DeploymentConfig labels its pods with its name.
        "ReplicationController" => labels.get("deploymentconfig").cloned(),
        _ => None,
    }
    .unwrap_or_else(|| owner.name.clone())
}

/// Probe ports a pod may have let through: each is an entry in a kernel map
/// that the node's pods share.
pub const MAX_PROBE_PORTS: usize = 16;

/// The ports of the containers' httpGet, tcpSocket and grpc probes
/// (readiness, liveness, startup), a named port resolved against the
/// probing container's own ports, as the kubelet does. A name that the
/// container does not declare is left out: the kubelet could not probe it
/// either. At most [`MAX_PROBE_PORTS`] (the lowest).
fn probe_ports<'a>(containers: impl Iterator<Item = &'a Container>) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for container in containers {
        let named: BTreeMap<&str, u16> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.as_deref()?, u16::try_from(p.container_port).ok()?)))
            .collect();
        let resolve = |port: &IntOrString| match port {
            IntOrString::Int(port) => u16::try_from(*port).ok(),
            IntOrString::String(name) => named.get(name.as_str()).copied(),
        };
        let probes = [
            &container.readiness_probe,
            &container.liveness_probe,
            &container.startup_probe,
        ];
        for probe in probes.into_iter().flatten() {
            ports.extend(
                [
                    probe.http_get.as_ref().and_then(|h| resolve(&h.port)),
                    probe.tcp_socket.as_ref().and_then(|t| resolve(&t.port)),
                    probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()),
                ]
                .into_iter()
                .flatten()
                .filter(|&port| port != 0),
            );
        }
    }
    ports.into_iter().take(MAX_PROBE_PORTS).collect()
}

/// A Service's virtual addresses and TCP ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<Ipv4Addr>,
    /// (port, name): the name is how EndpointSlices refer to it.
    pub ports: Vec<(u16, String)>,
}

pub fn service(service: &Service) -> Option<ServiceFacts> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    // clusterIPs lists every family (1.20 has it); clusterIP is the first.
    // "None": headless, no virtual address.
    let vips: BTreeSet<Ipv4Addr> = spec
        .cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if vips.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                u16::try_from(p.port).ok()?,
                p.name.clone().unwrap_or_default(),
            ))
        })
        .collect();
    Some(ServiceFacts {
        namespace: service.namespace().unwrap_or_default(),
        name: service.name_any(),
        vips: vips.into_iter().collect(),
        ports,
    })
}

/// An EndpointSlice (`discovery.k8s.io` `v1` or `v1beta1`: the fields read
/// here are the same in both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub namespace: String,
    /// The Service it belongs to.
    pub service: String,
    /// (name, port): the Service port of that name leads to this port on
    /// each of the slice's endpoints.
    pub ports: Vec<(String, u16)>,
    /// The ready endpoints' addresses.
    pub ready: Vec<Ipv4Addr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceBody {
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<SlicePort>>,
}

#[derive(Deserialize)]
struct SliceEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<SliceConditions>,
}

#[derive(Deserialize)]
struct SliceConditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct SlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i32>,
    #[serde(default)]
    protocol: Option<String>,
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn endpoint_slice(resource: &ApiResource, slice: &DynamicObject) -> Option<SliceFacts> {
    let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
    let body: SliceBody = match serde_json::from_value(slice.data.clone()) {
        Ok(body) => body,
        Err(e) => {
            warn!(
                kind = %resource.kind, version = %resource.version,
                slice = %format!("{}/{}", slice.namespace().unwrap_or_default(), slice.name_any()),
                error = %e,
                "EndpointSlice not understood; ignored"
            );
            return None;
        }
    };
    if body.address_type != "IPv4" {
        return None;
    }
    let ports = body
        .ports
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.unwrap_or_default(), u16::try_from(p.port?).ok()?)))
        .collect();
    let ready = body
        .endpoints
        .into_iter()
        .flatten()
        // No condition means unknown, which the API says to take as ready.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.addresses.first()?.parse::<Ipv4Addr>().ok())
        // Whoever writes EndpointSlices could otherwise send clients to
        // their own namespace's loopback, or nowhere that is a pod.
        .filter(|ip| {
            !(ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_broadcast())
        })
        .collect();
    Some(SliceFacts {
        namespace: slice.namespace().unwrap_or_default(),
        service,
        ports,
        ready,
    })
}

/// A PeerAuthentication or AuthorizationPolicy: the document in force for
/// it (itself, or its fail-closed stand-in if refused), validated exactly as
/// the policy files are.
pub type PolicyFacts = Option<Document>;

pub fn policy(
    resource: &ApiResource,
    object: &DynamicObject,
    root_namespace: &str,
) -> Option<PolicyFacts> {
    let name = format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    );
    let origin = format!("API server ({} {})", resource.api_version, resource.kind);
    // Lists carry no apiVersion or kind per item; the resource tells.
    let mut value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => {
            error!(%origin, policy = %name, error = %e, "policy cannot be read; ignored");
            return None;
        }
    };
    value["apiVersion"] = resource.api_version.clone().into();
    value["kind"] = resource.kind.clone().into();
    let parsed = match serde_yaml::to_value(&value) {
        Ok(yaml) => policy::parse_object(&origin, &name, yaml),
        Err(e) => {
            error!(%origin, policy = %name, error = %e, "policy cannot be read; ignored");
            return None;
        }
    };
    let reviewed = policy::review(&origin, parsed, root_namespace);
    if let Some(error) = &reviewed.error {
        error!(
            error = %error,
            "policy refused; the workloads it was meant for fail closed, the other policies apply"
        );
    }
    for warning in &reviewed.warnings {
        warn!("{warning}");
    }
    Some(reviewed.document)
}

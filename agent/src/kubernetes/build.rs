//! From the facts of the watched objects to the mesh model.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use tracing::{debug, error, info, warn};

use super::{
    Context, DATAPLANE_MODE, SETTLE,
    facts::{PodFacts, SliceFacts},
    watch::{Reported, Shared, Tables},
};
use warren_cni::{KnownPod, Membership, Others, PodRef};
use warren_pki::identity::SpiffeId;

use crate::cni::Decision;
use crate::mesh::{LocalPod, Policies, ServicePort, Services, Store, Workload, Workloads};

/// The parts of the mesh the API server feeds.
#[derive(Debug, PartialEq, Eq)]
pub struct Built {
    pub workloads: Workloads,
    pub services: Services,
    pub policies: Policies,
    /// Pods ignored for claiming a Service's virtual address.
    pub vip_claims: BTreeSet<(String, Ipv4Addr)>,
}

/// Publishes the mesh whenever the watches change it, once every kind has
/// been listed; never returns.
pub async fn publish_loop(shared: &Shared, context: &Context, store: &Store) {
    let mut first = true;
    let mut vip_claims = BTreeSet::new();
    let mut written_membership = None;
    loop {
        shared.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        let (built, membership) = {
            let mut tables = shared.tables();
            if !tables.synced() {
                continue;
            }
            // Reports of pods that are gone.
            let uids: HashSet<&str> = tables
                .pods
                .objects
                .values()
                .map(|p| p.uid.as_str())
                .collect();
            let gone: Vec<String> = tables
                .sandboxes
                .keys()
                .filter(|uid| !uids.contains(uid.as_str()))
                .cloned()
                .collect();
            for uid in &gone {
                tables.sandboxes.remove(uid);
            }
            if !gone.is_empty() {
                super::save_reports(&tables.sandboxes, context);
            }
            (build(&tables, context), membership(&tables, context))
        };
        if let Some(path) = &context.membership_file
            && written_membership.as_ref() != Some(&membership)
        {
            match crate::cni::write_json(path, &membership) {
                Ok(()) => written_membership = Some(membership),
                Err(error) => error!(
                    path = %path.display(),
                    error = %warren_daemon::logging::Chain(&error),
                    "cannot leave the CNI plugin the mesh's membership; while the agent is away \
                     it holds every new pod"
                ),
            }
        }
        for (pod, ip) in built.vip_claims.difference(&vip_claims) {
            warn!(%pod, %ip, "pod claims a Service's virtual address; ignored");
        }
        vip_claims = built.vip_claims;
        let current = store.current();
        for ip in built.workloads.conflicts() {
            if !current.workloads().is_conflicted(*ip) {
                warn!(
                    %ip,
                    "several live pods claim this address; connections to it are refused until \
                     only one does"
                );
            }
        }
        if current.synced()
            && built.workloads == *current.workloads()
            && built.services == *current.services()
            && built.policies == *current.policies()
        {
            continue;
        }
        if first {
            first = false;
            let (peer_authentications, authorization_policies) = built.policies.counts();
            info!(
                workloads = built.workloads.len(),
                local = built.workloads.local().count(),
                service_ports = built.services.len(),
                peer_authentications,
                authorization_policies,
                "learnt the mesh from the API server"
            );
        }
        debug!(
            workloads = built.workloads.len(),
            local = built.workloads.local().count(),
            service_ports = built.services.len(),
            policies = built.policies.counts().0 + built.policies.counts().1,
            "published the mesh"
        );
        store.publish(|s| {
            s.set_workloads(built.workloads);
            s.set_services(built.services);
            s.set_policies(built.policies);
            s.set_synced();
        });
    }
}

/// The mesh as the tables describe it.
pub fn build(tables: &Tables, context: &Context) -> Built {
    let services = services(tables);
    let (workloads, vip_claims) = workloads(tables, context, &services);
    let policies = Policies::from_documents(
        &context.root_namespace,
        tables
            .peer_authentications
            .objects
            .values()
            .chain(tables.authorization_policies.objects.values())
            .flatten()
            .cloned(),
    );
    Built {
        workloads,
        services,
        policies,
        vip_claims,
    }
}

/// Whether the pod of `namespace/name` (and `uid`, where the runtime
/// gave it) on this node is in the mesh, as far as the tables tell.
pub fn decide(tables: &Tables, context: &Context, pod: &PodRef) -> Decision {
    if !(tables.pods.synced && tables.namespaces.synced) {
        return Decision::Unknown;
    }
    let Some(facts) = tables.pods.objects.get(&pod.to_string()) else {
        return Decision::Unknown;
    };
    // Another pod of that name (the watch lags a re-creation), or not
    // scheduled here as far as the watch knows.
    if pod.uid.as_ref().is_some_and(|uid| *uid != facts.uid)
        || facts.node.as_deref() != Some(context.node.as_str())
    {
        return Decision::Unknown;
    }
    // A namespace not seen yet (its watch lags the pods') may put the pod
    // in the mesh: not "no".
    let Some(namespace) = tables.namespaces.objects.get(&pod.namespace) else {
        return Decision::Unknown;
    };
    if in_mesh(facts, Some(namespace)) {
        Decision::InMesh
    } else {
        Decision::NotInMesh
    }
}

/// This node's pods that the labels put in the mesh, by `namespace/name`,
/// with an address or not yet.
pub fn mesh_pods_here(tables: &Tables, context: &Context) -> Vec<String> {
    tables
        .pods
        .objects
        .values()
        .filter(|pod| pod.node.as_deref() == Some(context.node.as_str()) && !pod.finished)
        .filter(|pod| in_mesh(pod, tables.namespaces.objects.get(&pod.namespace)))
        .map(|pod| format!("{}/{}", pod.namespace, pod.name))
        .collect()
}

/// What the CNI plugin needs to decide alone while the agent is away: this
/// node's pods and every namespace.
pub fn membership(tables: &Tables, context: &Context) -> Membership {
    let pods = tables
        .pods
        .objects
        .values()
        .filter(|pod| pod.node.as_deref() == Some(context.node.as_str()))
        .map(|pod| {
            let known = KnownPod {
                uid: Some(pod.uid.clone()),
                in_mesh: in_mesh(pod, tables.namespaces.objects.get(&pod.namespace)),
            };
            (format!("{}/{}", pod.namespace, pod.name), known)
        })
        .collect();
    let namespaces = tables
        .namespaces
        .objects
        .iter()
        .map(|(name, labels)| {
            let ambient = labels.get(DATAPLANE_MODE).is_some_and(|m| m == "ambient");
            (name.clone(), ambient)
        })
        .collect();
    Membership {
        pods,
        namespaces,
        // A namespace made while the agent is away may be in the mesh.
        others: Others::Hold,
    }
}

/// Whether Istio's labels put `pod` in the mesh: the pod's own
/// `istio.io/dataplane-mode` (`none` opts out, `ambient` opts in), else its
/// namespace's (`ambient`). Host-network pods never: they are the node; nor
/// pods with Istio's sidecar, which does their mTLS.
pub fn in_mesh(pod: &PodFacts, namespace_labels: Option<&crate::mesh::Labels>) -> bool {
    if pod.host_network || pod.has_sidecar || pod.mirror {
        return false;
    }
    match pod.labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace_labels
            .and_then(|labels| labels.get(DATAPLANE_MODE))
            .is_some_and(|mode| mode == "ambient"),
    }
}

/// The workloads, and the pods ignored for claiming a Service's virtual
/// address.
fn workloads(
    tables: &Tables,
    context: &Context,
    services: &Services,
) -> (Workloads, BTreeSet<(String, Ipv4Addr)>) {
    let mut vip_claims = BTreeSet::new();
    // Every pod with an address claims it, in the mesh or not: a pod outside
    // the mesh that holds an address must not be taken for the mesh pod that
    // held it before.
    let mut by_ip: HashMap<Ipv4Addr, Vec<(&PodFacts, Option<Workload>)>> = HashMap::new();
    for pod in tables.pods.objects.values() {
        let Some(node) = &pod.node else {
            continue; // not scheduled
        };
        // The runtime's report is newer than the API server's address.
        let reported = (*node == context.node)
            .then(|| tables.sandboxes.get(&pod.uid))
            .flatten();
        let Some(ip) = reported.map(|r| r.ip).or(pod.ip) else {
            continue; // no address yet
        };
        if pod.finished || pod.host_network {
            continue;
        }
        if services.is_vip(ip) {
            // A pod claiming a Service's virtual address would take its
            // clients; kubelets never write one. Reported when published.
            vip_claims.insert((format!("{}/{}", pod.namespace, pod.name), ip));
            continue;
        }
        let workload = in_mesh(pod, tables.namespaces.objects.get(&pod.namespace))
            .then(|| workload(pod, ip, node, reported, context))
            .flatten();
        by_ip.entry(ip).or_default().push((pod, workload));
    }
    let mut workloads = Vec::with_capacity(by_ip.len());
    let mut conflicted = Vec::new();
    for (ip, claims) in by_ip {
        match believed(claims, &context.node) {
            Believed::Pod(Some(workload)) => workloads.push(*workload),
            Believed::Pod(None) => {} // a pod outside the mesh
            Believed::Nobody => conflicted.push(ip),
        }
    }
    (
        Workloads::new(workloads).with_conflicts(conflicted),
        vip_claims,
    )
}

/// The workload a mesh pod is, if its identity is valid.
fn workload(
    pod: &PodFacts,
    ip: Ipv4Addr,
    node: &str,
    reported: Option<&Reported>,
    context: &Context,
) -> Option<Workload> {
    let identity = match SpiffeId::new(
        context.trust_domain.clone(),
        &pod.namespace,
        &pod.service_account,
    ) {
        Ok(identity) => identity,
        Err(error) => {
            warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %error, "pod left out of the mesh");
            return None;
        }
    };
    let local = (node == context.node).then(|| LocalPod::Kubelet {
        uid: pod.uid.clone(),
        netns: reported.map(|r| r.netns.clone()),
    });
    Some(Workload {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        workload_name: pod.workload_name.clone(),
        service_account: pod.service_account.clone(),
        identity,
        ip,
        node: node.to_owned(),
        labels: pod.labels.clone(),
        probe_ports: if local.is_some() {
            pod.probe_ports.clone()
        } else {
            Default::default()
        },
        local,
    })
}

/// Who holds an address several pods claim.
#[derive(Debug)]
enum Believed {
    /// This pod (a mesh workload, or None for a pod outside the mesh).
    Pod(Option<Box<Workload>>),
    /// Nobody can be believed: connections to the address are refused.
    Nobody,
}

/// Which of the pods claiming one address holds it. An address passes
/// from a pod to a newer one, never back, so where claims are otherwise
/// equal the newest is believed: a pod lingering in deletion gives way to
/// the pod that got its address. Kubelets write addresses, but a
/// compromised node could write any:
///
/// - a pod of this node is believed first (live before terminating, then
///   the newest): enrolling it checks that its sandbox holds the address;
/// - otherwise, among pods of one other node, a single live pod is
///   believed, and with none live the newest terminating one;
/// - several live pods elsewhere, or pods of several other nodes (an
///   address is reused within its node's range; a node claiming another's
///   is not believed): nobody. Connections to the address are refused
///   rather than sent to either identity, or in clear.
///
/// The same on every node but for its own pods, whatever the order claims
/// come in.
fn believed(mut claims: Vec<(&PodFacts, Option<Workload>)>, this_node: &str) -> Believed {
    // Newest first, then by name.
    claims.sort_by(|(a, _), (b, _)| {
        (b.created, &b.namespace, &b.name).cmp(&(a.created, &a.namespace, &a.name))
    });
    let local = |p: &PodFacts| p.node.as_deref() == Some(this_node);
    let pick = claims
        .iter()
        .position(|(p, _)| local(p) && !p.terminating)
        .or_else(|| claims.iter().position(|(p, _)| local(p)))
        .or_else(|| {
            let node = claims[0].0.node.as_deref();
            if claims.iter().any(|(p, _)| p.node.as_deref() != node) {
                return None;
            }
            let live: Vec<usize> = (0..claims.len())
                .filter(|&i| !claims[i].0.terminating)
                .collect();
            match live.as_slice() {
                [] => Some(0),
                [one] => Some(*one),
                _ => None,
            }
        });
    match pick {
        Some(i) => Believed::Pod(claims.swap_remove(i).1.map(Box::new)),
        None => Believed::Nobody,
    }
}

fn services(tables: &Tables) -> Services {
    let mut slices: HashMap<(&str, &str), Vec<&SliceFacts>> = HashMap::new();
    for slice in tables.slices.objects.values() {
        slices
            .entry((&slice.namespace, &slice.service))
            .or_default()
            .push(slice);
    }
    let mut ports = Vec::new();
    for service in tables.services.objects.values() {
        let slices = slices
            .get(&(service.namespace.as_str(), service.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (port, name) in &service.ports {
            // Each slice says which port this Service port is on its
            // endpoints (a named targetPort may differ between pods).
            let mut endpoints: Vec<SocketAddrV4> = slices
                .iter()
                .filter_map(|s| {
                    let (_, target) = s.ports.iter().find(|(n, _)| n == name)?;
                    Some(
                        s.ready
                            .iter()
                            .map(move |ip| SocketAddrV4::new(*ip, *target)),
                    )
                })
                .flatten()
                .collect();
            endpoints.sort();
            endpoints.dedup();
            for vip in &service.vips {
                ports.push((
                    SocketAddrV4::new(*vip, *port),
                    ServicePort {
                        name: service.name.clone(),
                        namespace: service.namespace.clone(),
                        endpoints: endpoints.clone(),
                    },
                ));
            }
        }
    }
    Services::new(ports)
}

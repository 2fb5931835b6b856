//! From the facts of the watched objects to the mesh model.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use tracing::{debug, info, warn};

use super::{
    Context, DATAPLANE_MODE, SETTLE,
    facts::{PodFacts, SliceFacts},
    watch::{Shared, Tables},
};
use crate::{
    identity::SpiffeId,
    mesh::{LocalPod, Policies, ServicePort, Services, Store, Workload, Workloads},
};

/// The parts of the mesh the API server feeds.
#[derive(Debug, PartialEq, Eq)]
pub struct Built {
    pub workloads: Workloads,
    pub services: Services,
    pub policies: Policies,
}

/// Publishes the mesh whenever the watches change it, once every kind has
/// been listed; never returns.
pub async fn publish_loop(shared: &Shared, context: &Context, store: &Store) {
    let mut first = true;
    loop {
        shared.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        let built = {
            let tables = shared.tables();
            if !tables.synced() {
                continue;
            }
            build(&tables, context)
        };
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
    let workloads = workloads(tables, context);
    let services = services(tables);
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
    }
}

/// Whether Istio's labels put `pod` in the mesh: the pod's own
/// `istio.io/dataplane-mode` (`none` opts out, `ambient` opts in), else its
/// namespace's (`ambient`). Host-network pods never: they are the node; nor
/// pods with Istio's sidecar, which does their mTLS.
pub fn in_mesh(pod: &PodFacts, namespace_labels: Option<&crate::mesh::Labels>) -> bool {
    if pod.host_network || pod.has_sidecar {
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

fn workloads(tables: &Tables, context: &Context) -> Workloads {
    let mut by_ip: HashMap<Ipv4Addr, Vec<(&PodFacts, Workload)>> = HashMap::new();
    for pod in tables.pods.objects.values() {
        let (Some(ip), Some(node)) = (pod.ip, &pod.node) else {
            continue; // not scheduled, or no address yet
        };
        if pod.finished || !in_mesh(pod, tables.namespaces.objects.get(&pod.namespace)) {
            continue;
        }
        let identity = match SpiffeId::new(
            context.trust_domain.clone(),
            &pod.namespace,
            &pod.service_account,
        ) {
            Ok(identity) => identity,
            Err(error) => {
                warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %error, "pod left out of the mesh");
                continue;
            }
        };
        let local = (*node == context.node).then(|| LocalPod::Kubelet {
            uid: pod.uid.clone(),
        });
        let workload = Workload {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            identity,
            ip,
            node: node.clone(),
            labels: pod.labels.clone(),
            probe_ports: if local.is_some() {
                pod.probe_ports.clone()
            } else {
                Default::default()
            },
            local,
        };
        by_ip.entry(ip).or_default().push((pod, workload));
    }
    let mut workloads = Vec::with_capacity(by_ip.len());
    let mut conflicted = Vec::new();
    for (ip, claims) in by_ip {
        match believed(claims) {
            Some(workload) => workloads.push(workload),
            None => conflicted.push(ip),
        }
    }
    Workloads::new(workloads).with_conflicts(conflicted)
}

/// Which of the pods claiming one address is the workload there. A pod
/// being deleted gives way to the pod that got its address. Two live pods
/// should never claim one address (kubelets write addresses), but a
/// compromised node could write any: a pod of this node is believed (its
/// sandbox is checked to hold the address when it is enrolled); between
/// others, nobody is, and connections to the address are refused rather
/// than sent to either identity or in clear.
fn believed(mut claims: Vec<(&PodFacts, Workload)>) -> Option<Workload> {
    if claims.len() == 1 {
        return claims.pop().map(|(_, w)| w);
    }
    // The oldest first, then by name: the same choice on every node.
    claims.sort_by(|(a, _), (b, _)| {
        (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name))
    });
    let live: Vec<usize> = (0..claims.len())
        .filter(|&i| !claims[i].0.terminating)
        .collect();
    let chosen = match live.as_slice() {
        [] => 0,
        [one] => *one,
        several => *several.iter().find(|&&i| claims[i].1.local.is_some())?,
    };
    Some(claims.swap_remove(chosen).1)
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
                        service: format!("{}/{}", service.namespace, service.name),
                        endpoints: endpoints.clone(),
                    },
                ));
            }
        }
    }
    Services::new(ports)
}

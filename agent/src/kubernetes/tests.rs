//! The rules that turn Kubernetes objects into the mesh, without an API
//! server (the lab's end-to-end tests run a real one).

use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{api::DynamicObject, discovery::ApiResource};
use serde_json::json;

use super::{
    Context,
    build::build,
    facts,
    watch::{Table, Tables},
};
use warren_pki::identity::TrustDomain;

use crate::mesh::LocalPod;

fn context() -> Context {
    Context {
        node: "node-1".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        root_namespace: "istio-system".into(),
        membership_file: None,
        reports_file: None,
    }
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "labels": labels},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "web",
            "containers": [{
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9901}],
                "readinessProbe": {"httpGet": {"port": "http"}},
                "livenessProbe": {"tcpSocket": {"port": 9000}},
                "startupProbe": {"exec": {"command": ["true"]}}
            }, {
                "name": "b",
                "readinessProbe": {"httpGet": {"port": "admin"}}
            }],
            "initContainers": [{"name": "sidecar", "readinessProbe": {"grpc": {"port": 7070}}}]
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn insert<F>(table: &mut Table<F>, key: &str, facts: Option<F>) {
    table.objects.insert(key.into(), facts.unwrap());
}

fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

#[test]
fn istio_labels_decide_who_is_in_the_mesh() {
    let mut tables = Tables::default();
    let ns = |name, labels| facts::namespace(&namespace(name, labels));
    insert(
        &mut tables.namespaces,
        "ambient",
        ns("ambient", json!({"istio.io/dataplane-mode": "ambient"})),
    );
    insert(&mut tables.namespaces, "plain", ns("plain", json!({})));
    let cases = [
        ("ambient", "in-ns", json!({}), true),
        (
            "ambient",
            "opted-out",
            json!({"istio.io/dataplane-mode": "none"}),
            false,
        ),
        (
            "plain",
            "opted-in",
            json!({"istio.io/dataplane-mode": "ambient"}),
            true,
        ),
        ("plain", "plain", json!({}), false),
        (
            "ambient",
            "odd-value",
            json!({"istio.io/dataplane-mode": "sidecar"}),
            true,
        ),
    ];
    for (i, (ns, name, labels, _)) in cases.iter().enumerate() {
        let ip = format!("10.244.1.{}", i + 2);
        insert(
            &mut tables.pods,
            &format!("{ns}/{name}"),
            facts::pod(&pod(ns, name, "node-1", &ip, labels.clone())),
        );
    }
    let mut host: Pod = pod("ambient", "host", "node-1", "10.10.0.1", json!({}));
    host.spec.as_mut().unwrap().host_network = Some(true);
    insert(&mut tables.pods, "ambient/host", facts::pod(&host));
    let built = build(&tables, &context());
    for (i, (ns, name, _, expected)) in cases.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 244, 1, i as u8 + 2);
        assert_eq!(
            built.workloads.by_ip(ip).is_some(),
            *expected,
            "{ns}/{name}"
        );
    }
    assert!(
        built.workloads.by_ip(Ipv4Addr::new(10, 10, 0, 1)).is_none(),
        "host network"
    );
}

#[test]
fn a_workload_has_its_service_account_identity_and_this_nodes_pods_are_local() {
    let mut tables = Tables::default();
    let labels = json!({"istio.io/dataplane-mode": "ambient", "app": "web"});
    insert(
        &mut tables.pods,
        "shop/here",
        facts::pod(&pod("shop", "here", "node-1", "10.244.1.2", labels.clone())),
    );
    insert(
        &mut tables.pods,
        "shop/there",
        facts::pod(&pod(
            "shop",
            "there",
            "node-2",
            "10.244.2.2",
            labels.clone(),
        )),
    );
    // No address yet, finished: not workloads.
    insert(
        &mut tables.pods,
        "shop/new",
        facts::pod(&pod("shop", "new", "node-1", "", labels.clone())),
    );
    let mut done = pod("shop", "done", "node-1", "10.244.1.9", labels);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    insert(&mut tables.pods, "shop/done", facts::pod(&done));
    let built = build(&tables, &context());
    assert_eq!(built.workloads.len(), 2);
    let here = built.workloads.by_ip(Ipv4Addr::new(10, 244, 1, 2)).unwrap();
    assert_eq!(
        here.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(here.labels["app"], "web");
    assert_eq!(
        here.local,
        Some(LocalPod::Kubelet {
            uid: "uid-here".into(),
            netns: None,
        })
    );
    // Probes: a named httpGet port, a numeric tcpSocket port, an init
    // container's grpc port; exec probes have none, and a name another
    // container declares is not the probing container's port.
    assert_eq!(
        here.probe_ports.iter().copied().collect::<Vec<_>>(),
        [7070, 8080, 9000]
    );
    let there = built.workloads.by_ip(Ipv4Addr::new(10, 244, 2, 2)).unwrap();
    assert_eq!(there.local, None);
    assert!(there.probe_ports.is_empty());
    assert_eq!(built.workloads.local().count(), 1);
}

#[test]
fn static_pods_and_sidecar_pods_are_left_alone() {
    let mut tables = Tables::default();
    let labels = json!({"istio.io/dataplane-mode": "ambient"});
    let mut mirror = pod(
        "kube-system",
        "static",
        "node-1",
        "10.244.1.5",
        labels.clone(),
    );
    mirror.metadata.annotations = Some(
        [(
            "kubernetes.io/config.mirror".to_owned(),
            "0123456789abcdef0123456789abcdef".to_owned(),
        )]
        .into(),
    );
    insert(&mut tables.pods, "kube-system/static", facts::pod(&mirror));
    let mut injected = pod("shop", "injected", "node-1", "10.244.1.6", labels);
    injected.metadata.annotations =
        Some([("sidecar.istio.io/status".to_owned(), "{}".to_owned())].into());
    insert(&mut tables.pods, "shop/injected", facts::pod(&injected));
    let built = build(&tables, &context());
    // A mirror Pod has no identity the CA signs: it is not in the mesh,
    // labels or not.
    assert!(
        built
            .workloads
            .by_ip(Ipv4Addr::new(10, 244, 1, 5))
            .is_none()
    );
    assert!(
        built
            .workloads
            .by_ip(Ipv4Addr::new(10, 244, 1, 6))
            .is_none()
    );
}

#[test]
fn a_pod_being_deleted_gives_way_to_the_pod_that_got_its_address() {
    let mut tables = Tables::default();
    let labels = json!({"istio.io/dataplane-mode": "ambient"});
    let mut old = pod("shop", "old", "node-1", "10.244.1.2", labels.clone());
    old.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-01T00:00:00Z".parse().unwrap(),
    ));
    insert(&mut tables.pods, "shop/old", facts::pod(&old));
    insert(
        &mut tables.pods,
        "shop/new",
        facts::pod(&pod("shop", "new", "node-1", "10.244.1.2", labels)),
    );
    let built = build(&tables, &context());
    assert_eq!(
        built
            .workloads
            .by_ip(Ipv4Addr::new(10, 244, 1, 2))
            .unwrap()
            .name,
        "new"
    );
}

#[test]
fn of_pods_claiming_one_address_a_local_one_is_believed_and_remote_ones_are_not() {
    let labels = json!({"istio.io/dataplane-mode": "ambient"});
    let at = |pod: &mut Pod, time: &str| {
        pod.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(time.parse().unwrap()),
        );
    };
    let ip = Ipv4Addr::new(10, 244, 1, 2);
    // A pod of this node, and an older pod of another node whose status
    // claims the same address (a compromised node can write that).
    let mut here = pod("shop", "here", "node-1", "10.244.1.2", labels.clone());
    at(&mut here, "2026-12-01T00:00:00Z");
    let mut impostor = pod("evil", "old", "node-2", "10.244.1.2", labels.clone());
    at(&mut impostor, "2026-01-01T00:00:00Z");
    for keys in [["a", "b"], ["b", "a"]] {
        let mut tables = Tables::default();
        insert(&mut tables.pods, keys[0], facts::pod(&here));
        insert(&mut tables.pods, keys[1], facts::pod(&impostor));
        let built = build(&tables, &context());
        assert_eq!(
            built.workloads.by_ip(ip).unwrap().qualified_name(),
            "shop/here"
        );
        assert!(!built.workloads.is_conflicted(ip));
    }
    // Seen from a third node, neither is believed, and the address is
    // marked so that connections to it are refused.
    let mut tables = Tables::default();
    insert(&mut tables.pods, "a", facts::pod(&here));
    insert(&mut tables.pods, "b", facts::pod(&impostor));
    let elsewhere = Context {
        node: "node-3".into(),
        ..context()
    };
    let built = build(&tables, &elsewhere);
    assert!(built.workloads.by_ip(ip).is_none());
    assert!(built.workloads.is_conflicted(ip));
}

/// Pod facts with a creation time and, if `terminating`, a deletion time.
fn claim(ns: &str, name: &str, node: &str, mesh: bool, created: &str, terminating: bool) -> Pod {
    let labels = if mesh {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    let mut pod = pod(ns, name, node, "10.244.1.2", labels);
    let time = |t: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.parse().unwrap());
    pod.metadata.creation_timestamp = Some(time(created));
    if terminating {
        pod.metadata.deletion_timestamp = Some(time("2026-12-01T12:00:00Z"));
    }
    pod
}

/// Who holds 10.244.1.2 as `node` sees it, given `pods` in every order:
/// `Some(name)` for a workload, `None` for nobody in the mesh, and
/// `"conflict"` for refused.
fn holder(node: &str, pods: &[Pod]) -> String {
    let ip = Ipv4Addr::new(10, 244, 1, 2);
    let mut seen = std::collections::BTreeSet::new();
    for rotation in 0..pods.len() {
        let mut tables = Tables::default();
        for (i, pod) in pods
            .iter()
            .cycle()
            .skip(rotation)
            .take(pods.len())
            .enumerate()
        {
            insert(&mut tables.pods, &format!("k{i}"), facts::pod(pod));
        }
        let built = build(
            &tables,
            &Context {
                node: node.into(),
                ..context()
            },
        );
        seen.insert(match built.workloads.by_ip(ip) {
            Some(w) => w.qualified_name(),
            None if built.workloads.is_conflicted(ip) => "conflict".into(),
            None => "-".into(),
        });
    }
    assert_eq!(seen.len(), 1, "depends on the order: {seen:?}");
    seen.pop_first().unwrap()
}

#[test]
fn claims_on_one_address_are_settled_the_same_whatever_their_order() {
    let jan = "2026-01-01T00:00:00Z";
    let feb = "2026-02-01T00:00:00Z";
    // Lingering in deletion, both: the newer got the address from the older.
    let old = claim("a", "old", "node-1", true, jan, true);
    let new = claim("a", "new", "node-1", true, feb, true);
    assert_eq!(holder("node-1", &[old.clone(), new.clone()]), "a/new");
    assert_eq!(holder("node-3", &[old.clone(), new]), "a/new");
    // A pod of this node, even terminating, over a live claim from elsewhere.
    let here = claim("a", "here", "node-1", true, feb, true);
    let there = claim("evil", "there", "node-2", true, jan, false);
    assert_eq!(holder("node-1", &[here.clone(), there.clone()]), "a/here");
    // Elsewhere: claims from two nodes, neither believed.
    assert_eq!(holder("node-3", &[here, there]), "conflict");
    // A lingering mesh pod of one node against a live pod outside the mesh
    // on another (a compromised node's claim): nobody, not plaintext.
    let victim = claim("a", "victim", "node-2", true, feb, true);
    let claimant = claim("evil", "claimant", "node-4", false, jan, false);
    assert_eq!(holder("node-3", &[victim, claimant]), "conflict");
    // A live pod outside the mesh holds it, not a lingering mesh pod.
    let outside = claim("b", "outside", "node-2", false, feb, false);
    let lingering = claim("a", "lingering", "node-2", true, jan, true);
    assert_eq!(holder("node-3", &[outside.clone(), lingering]), "-");
    // Two live pods elsewhere, in the mesh or not: nobody.
    let live = claim("a", "live", "node-2", true, jan, false);
    assert_eq!(holder("node-3", &[outside, live]), "conflict");
}

#[test]
fn a_pod_claiming_a_services_virtual_address_is_ignored() {
    let mut tables = Tables::default();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    }))
    .unwrap();
    insert(&mut tables.services, "shop/web", facts::service(&service));
    let labels = json!({"istio.io/dataplane-mode": "ambient"});
    insert(
        &mut tables.pods,
        "evil/p",
        facts::pod(&pod("evil", "p", "node-2", "10.96.0.10", labels)),
    );
    let built = build(&tables, &context());
    assert!(
        built
            .workloads
            .by_ip(Ipv4Addr::new(10, 96, 0, 10))
            .is_none()
    );
    assert!(built.services.is_vip(Ipv4Addr::new(10, 96, 0, 10)));
}

fn slice(
    version: &str,
    service: &str,
    ports: serde_json::Value,
    endpoints: serde_json::Value,
) -> (ApiResource, DynamicObject) {
    let resource = ApiResource {
        group: "discovery.k8s.io".into(),
        version: version.into(),
        api_version: format!("discovery.k8s.io/{version}"),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    };
    let object = serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-{}", ports.to_string().len()), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap();
    (resource, object)
}

#[test]
fn service_ports_lead_to_ready_endpoints_with_target_ports_resolved_per_slice() {
    let mut tables = Tables::default();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))
    .unwrap();
    insert(&mut tables.services, "shop/web", facts::service(&service));
    // Pods whose named port `http` is 8080, and one whose is 8081.
    let (r, a) = slice(
        "v1",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([
            {"addresses": ["10.244.1.2"], "conditions": {"ready": true}},
            {"addresses": ["10.244.1.3"], "conditions": {"ready": false}},
            {"addresses": ["10.244.2.2"]},
        ]),
    );
    insert(&mut tables.slices, "shop/a", facts::endpoint_slice(&r, &a));
    let (r, b) = slice(
        "v1beta1",
        "web",
        json!([{"name": "http", "port": 8081, "protocol": "TCP"}]),
        json!([
            {"addresses": ["10.244.2.3"], "conditions": {"ready": true}},
        ]),
    );
    insert(&mut tables.slices, "shop/b", facts::endpoint_slice(&r, &b));
    let built = build(&tables, &context());
    let vip = |port| SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), port);
    let http = built.services.get(vip(80)).unwrap();
    assert_eq!(http.qualified_name(), "shop/web");
    let expected: Vec<SocketAddrV4> = ["10.244.1.2:8080", "10.244.2.2:8080", "10.244.2.3:8081"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(http.endpoints, expected);
    assert!(built.services.get(vip(53)).is_none(), "UDP is not warren's");
    assert_eq!(built.services.len(), 1);
}

#[test]
fn headless_and_external_name_services_have_no_virtual_address() {
    for spec in [
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        json!({"type": "ExternalName", "externalName": "example.com"}),
    ] {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "shop"}, "spec": spec
        }))
        .unwrap();
        assert!(facts::service(&service).is_none(), "{spec}");
    }
}

#[test]
fn policies_from_the_api_server_are_validated_as_files_are_and_fail_closed() {
    let resource = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    let object = |spec: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "u", "resourceVersion": "7",
                         "creationTimestamp": "2026-12-01T00:00:00Z", "managedFields": []},
            "spec": spec
        }))
        .unwrap()
    };
    let good = facts::policy(
        &resource,
        &object(json!({"action": "DENY", "rules": [{}]})),
        "istio-system",
    );
    assert!(
        matches!(good, Some(Some(crate::mesh::policy::Document::AuthorizationPolicy(ref ap))) if ap.name == "p")
    );
    // A misspelt field: refused, and a deny-all stands in for it.
    let bad = facts::policy(
        &resource,
        &object(json!({"action": "ALLOW", "rulez": []})),
        "istio-system",
    );
    let Some(Some(crate::mesh::policy::Document::AuthorizationPolicy(stand_in))) = bad else {
        panic!("no stand-in: {bad:?}");
    };
    assert_eq!(stand_in.name, "p (refused: fails closed)");
    assert_eq!(stand_in.action, crate::mesh::policy::Action::Deny);
}

fn pod_ref(namespace: &str, name: &str, uid: Option<&str>) -> warren_cni::PodRef {
    warren_cni::PodRef {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.map(Into::into),
    }
}

#[test]
fn the_cni_plugin_hears_in_the_mesh_only_for_a_pod_known_here_and_unknown_when_unsure() {
    use super::build::decide;
    use crate::cni::Decision;
    let mut tables = Tables::default();
    let here = pod("shop", "new", "node-1", "", json!({}));
    insert(&mut tables.pods, "shop/new", facts::pod(&here));
    let there = pod("shop", "far", "node-2", "", json!({}));
    insert(&mut tables.pods, "shop/far", facts::pod(&there));
    tables.pods.synced = true;
    tables.namespaces.synced = true;
    let context = context();
    // Its namespace not seen yet: not "no".
    assert_eq!(
        decide(&tables, &context, &pod_ref("shop", "new", None)),
        Decision::Unknown
    );
    insert(
        &mut tables.namespaces,
        "shop",
        facts::namespace(&namespace(
            "shop",
            json!({"istio.io/dataplane-mode": "ambient"}),
        )),
    );
    assert_eq!(
        decide(&tables, &context, &pod_ref("shop", "new", Some("uid-new"))),
        Decision::InMesh
    );
    // Another pod under that name (the watch lags a re-creation), a pod of
    // another node, a pod not listed: unknown.
    for unsure in [
        pod_ref("shop", "new", Some("uid-other")),
        pod_ref("shop", "far", None),
        pod_ref("shop", "nobody", None),
    ] {
        assert_eq!(decide(&tables, &context, &unsure), Decision::Unknown);
    }
    let out = pod(
        "shop",
        "out",
        "node-1",
        "",
        json!({"istio.io/dataplane-mode": "none"}),
    );
    insert(&mut tables.pods, "shop/out", facts::pod(&out));
    assert_eq!(
        decide(&tables, &context, &pod_ref("shop", "out", None)),
        Decision::NotInMesh
    );
    // Nothing is decided before the first lists.
    tables.pods.synced = false;
    assert_eq!(
        decide(&tables, &context, &pod_ref("shop", "out", None)),
        Decision::Unknown
    );

    // What the plugin is left for while the agent is away: this node's
    // pods and every namespace; unseen namespaces are held.
    let membership = super::build::membership(&tables, &context);
    assert_eq!(
        membership.pods.keys().collect::<Vec<_>>(),
        ["shop/new", "shop/out"]
    );
    assert!(membership.pods["shop/new"].in_mesh);
    assert!(!membership.pods["shop/out"].in_mesh);
    assert!(membership.namespaces["shop"]);
    assert_eq!(membership.others, warren_cni::Others::Hold);
}

#[test]
fn a_reported_sandbox_makes_a_workload_before_the_api_server_has_its_address() {
    let mut tables = Tables::default();
    let labels = json!({"istio.io/dataplane-mode": "ambient"});
    // No status yet: the kubelet writes the address after the sandbox runs.
    let mut new = pod("shop", "new", "node-1", "", labels.clone());
    new.status = None;
    insert(&mut tables.pods, "shop/new", facts::pod(&new));
    assert!(build(&tables, &context()).workloads.is_empty());
    let reported = super::Reported {
        container_id: "c1".into(),
        netns: "/var/run/netns/cni-1".into(),
        netns_id: crate::sandbox::NsId {
            dev: 4,
            ino: 4026532999,
        },
        ip: Ipv4Addr::new(10, 244, 1, 9),
    };
    tables.sandboxes.insert("uid-new".into(), reported.clone());
    let built = build(&tables, &context());
    let workload = built.workloads.by_ip(reported.ip).expect("a workload");
    assert_eq!(
        workload.local,
        Some(LocalPod::Kubelet {
            uid: "uid-new".into(),
            netns: Some(reported.netns.clone()),
        })
    );
    // The API server's address arrives, or lags a new sandbox: the report,
    // newer, wins.
    let old = pod("shop", "new", "node-1", "10.244.1.3", labels.clone());
    insert(&mut tables.pods, "shop/new", facts::pod(&old));
    let built = build(&tables, &context());
    assert!(built.workloads.by_ip(reported.ip).is_some());
    assert!(
        built
            .workloads
            .by_ip(Ipv4Addr::new(10, 244, 1, 3))
            .is_none()
    );
    // A report for a pod of another node is not used.
    let far = pod("shop", "far", "node-2", "10.244.2.3", labels);
    insert(&mut tables.pods, "shop/far", facts::pod(&far));
    tables.sandboxes.insert("uid-far".into(), reported);
    let built = build(&tables, &context());
    assert!(
        built
            .workloads
            .by_ip(Ipv4Addr::new(10, 244, 2, 3))
            .is_some()
    );
}

#[test]
fn a_pods_workload_is_named_as_istio_names_it() {
    let owned = |kind: &str, owner: &str, labels: serde_json::Value| {
        let mut pod = pod(
            "shop",
            "web-5d4f8b7c9-x2x7q",
            "node-1",
            "10.244.1.2",
            labels,
        );
        pod.metadata.owner_references = Some(vec![
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "u", "controller": true
            }))
            .unwrap(),
        ]);
        facts::pod(&pod).unwrap().workload_name
    };
    let hash = json!({"pod-template-hash": "5d4f8b7c9"});
    assert_eq!(owned("ReplicaSet", "web-5d4f8b7c9", hash.clone()), "web");
    // A ReplicaSet of its own (no Deployment's hash): itself.
    assert_eq!(
        owned("ReplicaSet", "web-5d4f8b7c9", json!({})),
        "web-5d4f8b7c9"
    );
    assert_eq!(owned("ReplicaSet", "5d4f8b7c9", hash), "5d4f8b7c9");
    assert_eq!(owned("Job", "backup-28735200", json!({})), "backup");
    assert_eq!(owned("Job", "migrate-v2", json!({})), "migrate-v2");
    assert_eq!(owned("StatefulSet", "db", json!({})), "db");
    assert_eq!(
        owned(
            "ReplicationController",
            "shop-3",
            json!({"deploymentconfig": "shop"})
        ),
        "shop"
    );
    // No controller: the pod is its own workload.
    let bare = pod("shop", "debug", "node-1", "10.244.1.3", json!({}));
    assert_eq!(facts::pod(&bare).unwrap().workload_name, "debug");
}

//! The agent on Kubernetes: a real API server and controller manager (1.20),
//! the lab playing the kubelet, agents that talk to the API server with their
//! own service account's token (RBAC as deployed), real eBPF and real mTLS.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod as KubePod;
use serde_json::json;
use warren_tests::{
    cluster::{Cluster, PodSpec, RBAC, addr, cluster_ip, count, enrolled, withdrawn},
    harness::{Agent, Call, PATIENCE, Server},
    lab::Pod,
};

const PORT: u16 = 8080;

#[test]
fn istio_labels_enroll_and_withdraw_pods_live() {
    let mut cluster = Cluster::up(2);
    cluster.namespace("shop", false, &["web", "sleep"]);
    let sleep = cluster.pod(&PodSpec::new("shop", "sleep", 0, "sleep"));
    let web1 = cluster.pod(&PodSpec::new("shop", "web-1", 0, "web").label("app", "web"));
    let web2 = cluster.pod(&PodSpec::new("shop", "web-2", 1, "web").label("app", "web"));
    let mut server = Server::start(&web2, PORT).unwrap();

    // Not in the mesh: the call goes directly.
    Call::default().run(&sleep, addr(&web2, PORT)).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), sleep.ip);
    assert!(cluster.agents[0].captures().is_empty());

    // The namespace joins ambient mode: its running pods are enrolled, on
    // both nodes.
    let labelled = Instant::now();
    cluster.label_namespace("shop", Some("ambient"));
    for name in ["shop/sleep", "shop/web-1"] {
        cluster.agents[0]
            .wait_for(PATIENCE, enrolled(name))
            .unwrap();
    }
    cluster.agents[1]
        .wait_for(PATIENCE, enrolled("shop/web-2"))
        .unwrap();
    eprintln!(
        "namespace labelled: 3 pods enrolled in {:?}",
        labelled.elapsed()
    );

    // Now over HBONE, as the pods' own identities; the server sees the
    // client pod's address.
    Call::default().run(&sleep, addr(&web2, PORT)).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), sleep.ip);
    let capture = cluster.agents[0].captures().pop().expect("captured");
    assert_eq!(
        (capture.path.as_str(), capture.dst_workload.as_str()),
        ("hbone", "shop/web-2")
    );
    let accepted = cluster.agents[1]
        .wait_for(PATIENCE, |l| l.message() == "accepted HBONE stream")
        .unwrap();
    assert_eq!(
        accepted.field("peer_identity"),
        "spiffe://cluster.local/ns/shop/sa/sleep"
    );

    // web-2 opts out: withdrawn; calls to it are passed through.
    cluster.patch_labels::<KubePod>(
        Some("shop"),
        "web-2",
        json!({"istio.io/dataplane-mode": "none"}),
    );
    cluster.agents[1]
        .wait_for(PATIENCE, withdrawn("shop/web-2"))
        .unwrap();
    // The client's agent learns it too (its own view of the mesh). Until
    // then it may still tunnel to web-2, whose agent no longer answers for
    // it: such a call fails, and is tried again.
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Err(error) = Call::default().run(&sleep, addr(&web2, PORT)) {
            assert!(Instant::now() < deadline, "{error:#}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert_eq!(server.next_served().unwrap().peer.ip(), sleep.ip);
        let capture = cluster.agents[0].captures().pop().unwrap();
        if capture.path == "passthrough" {
            assert_eq!(capture.dst_workload, "-");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web-2 still taken for a mesh workload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The namespace leaves ambient mode: its pods are withdrawn and talk
    // directly again.
    cluster.label_namespace("shop", None);
    for name in ["shop/sleep", "shop/web-1"] {
        cluster.agents[0]
            .wait_for(PATIENCE, withdrawn(name))
            .unwrap();
    }
    let captured = cluster.agents[0].captures().len();
    Call::default().run(&sleep, addr(&web2, PORT)).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), sleep.ip);
    assert_eq!(
        cluster.agents[0].captures().len(),
        captured,
        "still captured"
    );

    // Back in; a pod created later in the namespace is enrolled too, and a
    // deleted pod is withdrawn.
    cluster.label_namespace("shop", Some("ambient"));
    cluster.agents[0]
        .wait_for_count(PATIENCE, 2, enrolled("shop/sleep"))
        .unwrap();
    let created = Instant::now();
    let late = cluster.pod(&PodSpec::new("shop", "late", 0, "web"));
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/late"))
        .unwrap();
    eprintln!(
        "pod created: running and enrolled in {:?}",
        created.elapsed()
    );
    let mut late_server = Server::start(&late, PORT).unwrap();
    Call::default().run(&sleep, addr(&late, PORT)).unwrap();
    assert_eq!(late_server.next_served().unwrap().peer.ip(), sleep.ip);
    assert_eq!(cluster.agents[0].captures().pop().unwrap().path, "hbone");

    cluster.delete_pod("shop", "web-1");
    cluster.agents[0]
        .wait_for(PATIENCE, withdrawn("shop/web-1"))
        .unwrap();
    drop(web1);

    // Nothing failed to enroll along the way.
    for agent in &cluster.agents {
        assert_eq!(
            count(agent, |l| l.message().starts_with("cannot enroll pod")),
            0
        );
    }
}

#[test]
fn a_pod_labelled_ambient_is_enrolled_in_a_plain_namespace_and_host_network_pods_never() {
    let mut cluster = Cluster::up(1);
    cluster.namespace("plain", false, &["app"]);
    cluster.pod(&PodSpec::new("plain", "in", 0, "app").label("istio.io/dataplane-mode", "ambient"));
    cluster.pod(&PodSpec::new("plain", "out", 0, "app"));
    cluster.namespace("ambient", true, &["app"]);
    cluster.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: ambient}\n\
         spec:\n  nodeName: node-1\n  serviceAccountName: app\n  hostNetwork: true\n  \
         containers: [{name: app, image: labpod}]\n",
    );
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("plain/in"))
        .unwrap();
    // A pod created after both: once it is enrolled, the others would have been.
    cluster.pod(&PodSpec::new("ambient", "marker", 0, "app"));
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("ambient/marker"))
        .unwrap();
    assert_eq!(count(&cluster.agents[0], enrolled("plain/out")), 0);
    assert_eq!(count(&cluster.agents[0], enrolled("ambient/host")), 0);
}

#[test]
fn without_istios_crds_there_are_no_policies_and_pods_are_enrolled_all_the_same() {
    let mut cluster = Cluster::start(1, false);
    for kind in ["PeerAuthentication", "AuthorizationPolicy"] {
        let said = cluster.agents[0]
            .wait_for(PATIENCE, |l| {
                l.message()
                    .starts_with("the API server does not serve this kind")
                    && l.field("kind") == kind
            })
            .unwrap();
        assert_eq!(said.field("group"), "security.istio.io");
    }
    cluster.namespace("shop", true, &["web"]);
    let web = cluster.pod(&PodSpec::new("shop", "web", 0, "web"));
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/web"))
        .unwrap();
    let other = cluster.pod(&PodSpec::new("shop", "other", 0, "web"));
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/other"))
        .unwrap();
    let mut server = Server::start(&web, PORT).unwrap();
    Call::default().run(&other, addr(&web, PORT)).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), other.ip);
    assert_eq!(cluster.agents[0].captures().pop().unwrap().path, "hbone");
}

#[test]
fn an_agent_refused_the_policies_by_rbac_enrolls_nothing_until_it_may_read_them() {
    // The deployed RBAC but for Istio's kinds.
    let without_policies = RBAC.replace(
        "resources: [peerauthentications, authorizationpolicies]",
        "resources: [authorizationpolicies]",
    );
    assert_ne!(without_policies, RBAC, "the RBAC file changed shape");
    let mut cluster = Cluster::start_with(1, true, &without_policies, false);
    cluster.namespace("shop", true, &["web"]);
    cluster.pod(&PodSpec::new("shop", "web", 0, "web"));
    let refused = cluster.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message()
                .starts_with("the agent's service account may not list or watch this kind")
        })
        .unwrap();
    assert_eq!(refused.field("kind"), "PeerAuthentication");
    // Policies unknown: nothing enrolled (not even as PERMISSIVE).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&cluster.agents[0], enrolled("shop/web")), 0);
    assert_eq!(
        count(&cluster.agents[0], |l| l.message() == "warren agent ready"),
        0
    );
    // Granted: the watch's retry lists them, and the pod is enrolled.
    cluster.apply(RBAC);
    cluster.agents[0]
        .wait_for(Duration::from_secs(60), enrolled("shop/web"))
        .unwrap();
}

/// Servers on `ports` in `pod`, one per port.
fn servers(pod: &Pod, ports: &[u16]) -> Vec<Server> {
    ports
        .iter()
        .map(|&p| Server::start(pod, p).unwrap())
        .collect()
}

#[test]
fn services_reach_their_ready_mesh_endpoints_over_hbone() {
    let mut cluster = Cluster::up(2);
    cluster.namespace("shop", true, &["web", "sleep"]);
    cluster.namespace("legacy", false, &["old"]);
    let sleep = cluster.pod(&PodSpec::new("shop", "sleep", 0, "sleep"));
    // The same named target port is 8080 on one pod and 8081 on the other.
    let port = |n| format!("    ports: [{{name: http, containerPort: {n}}}]\n");
    let web1 = cluster.pod(
        &PodSpec::new("shop", "web-1", 0, "web")
            .label("app", "web")
            .container(&port(8080)),
    );
    let web2 = cluster.pod(
        &PodSpec::new("shop", "web-2", 1, "web")
            .label("app", "web")
            .container(&port(8081)),
    );
    let old = cluster.pod(
        &PodSpec::new("legacy", "old", 1, "old")
            .label("app", "old")
            .container(&port(8080)),
    );
    let mut s1 = servers(&web1, &[8080]);
    let mut s2 = servers(&web2, &[8081]);
    let _old_server = servers(&old, &[8080]);
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: old, namespace: legacy}\n\
         spec: {selector: {app: old}, ports: [{port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: nobody, namespace: shop}\n\
         spec: {selector: {app: nobody}, ports: [{port: 80}]}\n",
    );
    let vip = SocketAddrV4::new(cluster_ip(&cluster, "shop", "web"), 80);

    // Calls to the virtual address are spread over both endpoints, each
    // over HBONE to the endpoint's own target port; the servers see the
    // client pod. The first calls may precede the endpoints' slices.
    let deadline = Instant::now() + PATIENCE;
    let (mut to1, mut to2) = (0, 0);
    while to1 == 0 || to2 == 0 {
        assert!(
            Instant::now() < deadline,
            "calls not spread: {to1} and {to2}"
        );
        if Call::quick().run(&sleep, vip).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let capture = cluster.agents[0].captures().pop().unwrap();
        assert_eq!(capture.path, "hbone", "{capture:?}");
        match capture.dst_workload.as_str() {
            "shop/web-1" => {
                assert_eq!(capture.dst, addr(&web1, 8080));
                assert_eq!(s1[0].next_served().unwrap().peer.ip(), sleep.ip);
                to1 += 1;
            }
            "shop/web-2" => {
                assert_eq!(capture.dst, addr(&web2, 8081));
                assert_eq!(s2[0].next_served().unwrap().peer.ip(), sleep.ip);
                to2 += 1;
            }
            other => panic!("went to {other}"),
        }
    }
    let service_lines = cluster.agents[0]
        .lines()
        .into_iter()
        .filter(|l| {
            l.message() == "captured outbound connection" && l.field("service") == "shop/web"
        })
        .count();
    assert!(service_lines >= 2);

    // web-1's application stops listening: its agent answers 503, and the
    // client's agent takes web-2 instead, before the client sees a failure.
    drop(s1);
    for _ in 0..6 {
        let called = Call::quick().run(&sleep, vip).unwrap();
        assert!(called.ok);
        assert_eq!(s2[0].next_served().unwrap().peer.ip(), sleep.ip);
    }
    let unreachable = cluster.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message() == "service endpoint unreachable; trying another"
                && l.field("endpoint") == addr(&web1, 8080).to_string()
        })
        .unwrap();
    // Refused by web-1's agent at once: the kernel's RST for the closed port
    // reached its delivery socket (not a CONNECT left to time out).
    assert!(
        !unreachable.field("error").contains("timed out"),
        "{unreachable:?}"
    );

    // Endpoints come and go: a new pod behind the Service gets calls once
    // its EndpointSlice says it is ready.
    let web3 = cluster.pod(
        &PodSpec::new("shop", "web-3", 1, "web")
            .label("app", "web")
            .container(&port(8082)),
    );
    let mut s3 = servers(&web3, &[8082]);
    let deadline = Instant::now() + 3 * PATIENCE;
    loop {
        assert!(
            Instant::now() < deadline,
            "web-3 never got a call; client's agent:\n{}",
            cluster.agents[0].log_text()
        );
        Call::quick().run(&sleep, vip).unwrap();
        let capture = cluster.agents[0].captures().pop().unwrap();
        if capture.dst_workload == "shop/web-3" {
            assert_eq!(capture.dst, addr(&web3, 8082));
            assert_eq!(s3[0].next_served().unwrap().peer.ip(), sleep.ip);
            break;
        }
        s2[0].next_served().unwrap();
    }

    // A Service of endpoints outside the mesh: passed through to the
    // virtual address (no kube-proxy in the lab, so the call itself fails).
    let old_vip = SocketAddrV4::new(cluster_ip(&cluster, "legacy", "old"), 80);
    let _ = Call::quick().run(&sleep, old_vip);
    let capture = cluster.agents[0]
        .captures()
        .into_iter()
        .rfind(|c| c.dst == old_vip)
        .expect("captured");
    assert_eq!(
        (capture.path.as_str(), capture.dst_workload.as_str()),
        ("passthrough", "-")
    );

    // A Service with no ready endpoint: the client's connection fails at
    // once, and the agent says why.
    let nobody = SocketAddrV4::new(cluster_ip(&cluster, "shop", "nobody"), 80);
    let started = Instant::now();
    let error = Call::quick().run(&sleep, nobody).unwrap_err();
    eprintln!("no endpoint: failed in {:?}: {error:#}", started.elapsed());
    cluster.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message() == "outbound connection failed"
                && l.field("error") == "service shop/nobody: no ready endpoint"
        })
        .unwrap();
}

#[test]
fn policies_created_through_the_api_are_enforced_and_probes_get_through_strict() {
    let mut cluster = Cluster::up(2);
    cluster.namespace("shop", true, &["web", "sleep", "admin"]);
    cluster.namespace("outside", false, &["x"]);
    let sleep = cluster.pod(&PodSpec::new("shop", "sleep", 0, "sleep"));
    let admin = cluster.pod(&PodSpec::new("shop", "admin", 0, "admin"));
    let attacker = cluster.pod(&PodSpec::new("outside", "attacker", 1, "x"));
    // Probed on its named port http (8080); 9090 is not probed.
    let web = cluster.pod(
        &PodSpec::new("shop", "web", 1, "web").label("app", "web").container(
            "    ports: [{name: http, containerPort: 8080}]\n    readinessProbe: {httpGet: {port: http}}\n",
        ),
    );
    let mut servers = servers(&web, &[8080, 9090]);
    let web_log = |agent: &Agent| {
        agent
            .lines()
            .into_iter()
            .find(|l| enrolled("shop/web")(l))
            .map(|l| l.0["probe_ports"].to_string())
    };
    cluster.agents[1]
        .wait_for(PATIENCE, enrolled("shop/web"))
        .unwrap();
    assert_eq!(web_log(&cluster.agents[1]).as_deref(), Some("\"{8080}\""));

    cluster.apply(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: no-admin, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  \
         rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/admin]}}]}]\n",
    );
    cluster.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message() == "mTLS modes changed" && l.field("workload") == "shop/web"
        })
        .unwrap();

    // Plaintext from a pod outside the mesh: dropped in the kernel.
    assert!(Call::quick().run(&attacker, addr(&web, 8080)).is_err());
    assert!(servers[0].saw_nothing());
    cluster.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message().contains("dropped plaintext SYN to port 8080")
        })
        .unwrap();

    // The node (as the kubelet probes): the probed port gets through, from
    // the node's address towards the pod; another port does not.
    let node2 = cluster.lab.node(1);
    let probe = Call::quick().run_from_node(node2, addr(&web, 8080));
    let served = servers[0].next_served().unwrap();
    assert!(probe.is_ok(), "{probe:?}");
    let gateway = Ipv4Addr::new(10, 244, 2, 1);
    assert_eq!(served.peer.ip(), gateway);
    assert!(
        Call::quick()
            .run_from_node(node2, addr(&web, 9090))
            .is_err()
    );
    assert!(servers[1].saw_nothing());

    // The mesh client gets in, by name; admin is denied by the policy from
    // the API, with the same log line as from files.
    Call::default().run(&sleep, addr(&web, 9090)).unwrap();
    assert_eq!(servers[1].next_served().unwrap().peer.ip(), sleep.ip);
    assert!(Call::quick().run(&admin, addr(&web, 8080)).is_err());
    let refused = cluster.agents[1]
        .wait_for(PATIENCE, |l| l.message() == "HBONE stream refused")
        .unwrap();
    assert_eq!(
        refused.field("reason"),
        "denied by policy: DENY shop/no-admin"
    );
    assert_eq!(refused.0["status"], 401);
    assert!(servers[0].saw_nothing());
}

#[test]
fn the_agent_rides_out_an_api_server_outage_and_relists_after_compaction() {
    let mut cluster = Cluster::up(2);
    cluster.namespace("shop", true, &["web", "sleep"]);
    let sleep = cluster.pod(&PodSpec::new("shop", "sleep", 0, "sleep"));
    let web = cluster.pod(&PodSpec::new("shop", "web", 1, "web"));
    let mut server = Server::start(&web, PORT).unwrap();
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/sleep"))
        .unwrap();
    cluster.agents[1]
        .wait_for(PATIENCE, enrolled("shop/web"))
        .unwrap();
    Call::default().run(&sleep, addr(&web, PORT)).unwrap();
    server.next_served().unwrap();

    // Something the agents do not watch moves etcd's revision past theirs,
    // so that after compaction their watches must list again.
    cluster.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bump, namespace: shop}\n");
    cluster.cp.kill_apiserver().unwrap();
    for agent in &mut cluster.agents {
        agent
            .wait_for(Duration::from_secs(30), |l| {
                l.message()
                    == "cannot watch the API server; serving the last view of the mesh, retrying"
            })
            .unwrap();
    }
    // Traffic goes on with the last view.
    for _ in 0..3 {
        Call::default().run(&sleep, addr(&web, PORT)).unwrap();
        server.next_served().unwrap();
        assert_eq!(cluster.agents[0].captures().pop().unwrap().path, "hbone");
    }
    cluster.cp.compact_etcd().unwrap();
    cluster.cp.restart_apiserver().unwrap();

    // The agents list again and converge: a change made now is followed.
    for agent in &mut cluster.agents {
        agent
            .wait_for(Duration::from_secs(60), |l| {
                l.message() == "listed again" && l.field("kind") == "pods"
            })
            .unwrap();
    }
    let late = cluster.pod(&PodSpec::new("shop", "late", 0, "sleep"));
    cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/late"))
        .unwrap();
    Call::default().run(&late, addr(&web, PORT)).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), late.ip);

    // Nothing enrolled was withdrawn along the way.
    for agent in &cluster.agents {
        assert_eq!(
            count(agent, |l| l.message().starts_with("withdrew from pod")),
            0,
            "{}",
            agent.log_text()
        );
    }
    let names: BTreeSet<String> = cluster.agents[0]
        .lines()
        .iter()
        .filter(|l| l.message().starts_with("enrolled pod"))
        .map(|l| l.field("workload").to_owned())
        .collect();
    assert_eq!(names, ["shop/late", "shop/sleep"].map(String::from).into());
}

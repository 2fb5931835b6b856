//! The tests' Kubernetes: a real API server and controller manager (1.20, built by
//! `cargo xtask setup`) with the lab playing the kubelet. These check the pieces the
//! agent's Kubernetes tests stand on: RBAC as deployed, reachability from node
//! namespaces, Pods realized as lab pods with kubelet-shaped cgroups, EndpointSlices
//! from the controller manager, 410 Gone after etcd compaction, and the audit log that
//! checks RBAC both ways.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod as KubePod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams};
use kube::core::GroupVersionKind;
use warren_tests::audit::{denied, unused_grants};
use warren_tests::cluster::{ISTIO_CRDS, RBAC};
use warren_tests::controlplane::{
    ControlPlane, block_on_in_netns, kubeconfig_client, write_kubeconfig,
};
use warren_tests::harness::{Call, Server, test_lab};
use warren_tests::kubelet::Kubelet;
use warren_tests::lab;

const WAIT: Duration = Duration::from_secs(15);

fn peer_authentications() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
    ))
}

/// What 1.20 serves (discovery.k8s.io/v1 came in 1.21).
fn endpoint_slices_v1beta1() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "discovery.k8s.io",
        "v1beta1",
        "EndpointSlice",
    ))
}

#[test]
fn agent_token_from_a_node_reads_pods_and_policies_but_not_secrets() {
    let lab = test_lab(1, 0);
    let cp = ControlPlane::start(&lab).expect("control plane");
    cp.apply(RBAC).expect("agent RBAC");
    cp.apply(ISTIO_CRDS).expect("Istio CRDs");
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .expect("namespace and policy");
    // Applying again replaces: the second version is what is stored.
    let replaced = cp
        .apply(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        )
        .expect("policy update");
    assert_eq!(replaced[0].data["spec"]["mtls"]["mode"], "PERMISSIVE");

    let kubeconfig = lab::files_dir(lab.prefix()).join("agent.kubeconfig");
    cp.agent_kubeconfig("warren-system", "warren-agent", &kubeconfig)
        .expect("agent kubeconfig");
    let text = fs::read_to_string(&kubeconfig).unwrap();
    assert!(text.contains("https://10.10.0.254:6443"), "{text}");

    let node = lab.node(0);
    let (pods, policies, secrets) = block_on_in_netns(&node.netns_path(), || async {
        let client = kubeconfig_client(&kubeconfig).await.expect("agent client");
        let pods = Api::<KubePod>::all(client.clone())
            .list(&ListParams::default())
            .await;
        let policies =
            Api::<DynamicObject>::namespaced_with(client.clone(), "shop", &peer_authentications())
                .list(&ListParams::default())
                .await;
        let secrets = Api::<Secret>::namespaced(client, "shop")
            .list(&ListParams::default())
            .await;
        (pods, policies, secrets)
    })
    .expect("a client in node-1's netns");

    pods.expect("the agent may list pods");
    let policies = policies.expect("the agent may list PeerAuthentications");
    let names: Vec<_> = policies
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["strict"]);
    assert_eq!(policies.items[0].data["spec"]["mtls"]["mode"], "PERMISSIVE");
    match secrets {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("system:serviceaccount:warren-system:warren-agent"),
                "refused for another reason: {}",
                status.message
            );
        }
        other => panic!("the agent read secrets: {other:?}"),
    }
}

/// A service account that may get and list ConfigMaps in its namespace and list and
/// watch Pods everywhere.
const READER_RBAC: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: shop}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: shop}
rules:
  - apiGroups: ['']
    resources: [configmaps]
    verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: shop}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: shop}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader-pods}
rules:
  - apiGroups: ['']
    resources: [pods]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader-pods}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader-pods}
subjects: [{kind: ServiceAccount, name: reader, namespace: shop}]
";

#[test]
fn audit_log_shows_unused_grants_and_denied_requests() {
    let lab = test_lab(1, 0);
    let mut cp = ControlPlane::start(&lab).expect("control plane");
    cp.apply(READER_RBAC).expect("reader RBAC");
    let token = cp.service_account_token("shop", "reader").unwrap();
    let kubeconfig = cp.dir().join("reader.kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &cp.url(),
        cp.ca_pem(),
        "reader",
        &token,
        "shop",
    )
    .unwrap();
    let user = "system:serviceaccount:shop:reader";

    let (maps, pods, created, watch) = cp.block_on(async {
        let client = kubeconfig_client(&kubeconfig).await.expect("reader client");
        let maps = Api::<ConfigMap>::namespaced(client.clone(), "shop");
        let listed = maps.list(&ListParams::default()).await;
        let pods = Api::<KubePod>::all(client.clone());
        let listed_pods = pods.list(&ListParams::default()).await;
        let mut map = ConfigMap::default();
        map.metadata.name = Some("mine".into());
        let created = maps.create(&PostParams::default(), &map).await;
        // Left open while the log is read.
        let watch = pods.watch(&WatchParams::default(), "0").await;
        (listed, listed_pods, created, watch)
    });
    maps.expect("the reader may list configmaps");
    pods.expect("the reader may list pods");
    match created {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("creating a configmap: {other:?}, not 403"),
    }
    let watch = watch.expect("the reader may watch pods");

    // 1.20 logs a watch only when it ends: while it is open, its grant cannot be told
    // used, and the log says so rather than have `watch pods` reported unused.
    let open = cp
        .audit_events_within(Duration::from_millis(300))
        .expect_err("the watch is open");
    assert!(
        format!("{open:#}").contains("watch pods by system:serviceaccount:shop:reader"),
        "{open:#}"
    );
    drop(watch);
    let events = cp.audit_events().expect("audit events");
    assert_eq!(
        unused_grants(READER_RBAC, &events, user),
        ["Role shop/reader: get configmaps never used"]
    );
    assert_eq!(
        denied(&events, user),
        ["create configmaps in namespace shop"]
    );

    // A watch open when the API server is killed never ends in the log: it is not
    // waited for, and the restarted server's requests follow in the same log.
    let client = cp.block_on(kubeconfig_client(&kubeconfig)).unwrap();
    let maps = Api::<ConfigMap>::namespaced(client.clone(), "shop");
    let pods = Api::<KubePod>::all(client);
    let cut = cp
        .block_on(pods.watch(&WatchParams::default(), "0"))
        .unwrap();
    cp.kill_apiserver().unwrap();
    drop(cut);
    cp.restart_apiserver().unwrap();
    cp.block_on(maps.list(&ListParams::default())).unwrap();
    let after = cp.audit_events().expect("audit events after a restart");
    let new: Vec<_> = after[events.len()..]
        .iter()
        .map(|e| (e.verb.as_str(), e.resource.as_str(), e.answered()))
        .collect();
    assert_eq!(
        new,
        [("watch", "pods", false), ("list", "configmaps", true)]
    );
    assert_eq!(after[..events.len()], events);
}

#[test]
fn pods_become_lab_pods_and_services_get_their_endpoints() {
    // One pod made at lab-up on each node: Pods from the API take the next addresses.
    let lab = test_lab(2, 1);
    let cp = ControlPlane::start(&lab).expect("control plane");
    let kubelet = Kubelet::start(&lab, &cp).expect("kubelet");
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\n\
         spec: {nodeName: node-2, containers: [{name: web, image: web}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: db-1, namespace: shop}\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: db\n    image: db\n    \
         resources: {limits: {cpu: 100m, memory: 64Mi}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: shop}\n\
         spec: {nodeName: node-1, hostNetwork: true, containers: [{name: a, image: a}]}\n",
    )
    .expect("service and pods");

    let web = kubelet.wait_pod("shop", "web-1", WAIT).expect("web-1");
    let db = kubelet.wait_pod("shop", "db-1", WAIT).expect("db-1");
    assert_eq!(web.ip, Ipv4Addr::new(10, 244, 2, 3));
    assert_eq!(db.ip, Ipv4Addr::new(10, 244, 1, 3));

    // The API server's view, as the kubelet reported it.
    let pods: Api<KubePod> = Api::namespaced(cp.client(), "shop");
    let uid_of = |name: &str| {
        let pod = cp.block_on(pods.get(name)).unwrap();
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"), "{name}");
        (pod.metadata.uid.unwrap(), status.pod_ip, status.qos_class)
    };
    // Nothing tells when a hostNetwork Pod is reported: no sandbox to wait for.
    wait_until("the hostNetwork pod runs", || {
        let pod = cp.block_on(pods.get("agent")).unwrap();
        pod.status.and_then(|s| s.phase).as_deref() == Some("Running")
    });
    let (web_uid, web_ip, web_qos) = uid_of("web-1");
    assert_eq!(web_ip.as_deref(), Some("10.244.2.3"));
    assert_eq!(web_qos.as_deref(), Some("BestEffort"));
    let (db_uid, _, db_qos) = uid_of("db-1");
    assert_eq!(db_qos.as_deref(), Some("Guaranteed"));
    let (_, agent_ip, _) = uid_of("agent");
    assert_eq!(agent_ip.as_deref(), Some("10.10.0.1"));
    assert!(
        kubelet.pod("shop", "agent").is_none(),
        "a hostNetwork pod got a sandbox"
    );

    // Kubelet-shaped cgroups: cgroupfs on node-2, systemd on node-1.
    let web_root = lab.node(1).kubelet_cgroup_root();
    let web_pod_cgroup = web_root.join(format!("kubepods/besteffort/pod{web_uid}"));
    assert_eq!(web.cgroup.parent(), Some(web_pod_cgroup.as_path()));
    assert_container_id(web.cgroup.file_name().unwrap().to_str().unwrap());
    let db_slice = format!("kubepods-pod{}.slice", db_uid.replace('-', "_"));
    let db_pod_cgroup = lab
        .node(0)
        .kubelet_cgroup_root()
        .join("kubepods.slice")
        .join(db_slice);
    assert_eq!(db.cgroup.parent(), Some(db_pod_cgroup.as_path()));
    let scope = db.cgroup.file_name().unwrap().to_str().unwrap();
    assert_container_id(
        scope
            .strip_prefix("cri-containerd-")
            .and_then(|s| s.strip_suffix(".scope"))
            .unwrap_or_else(|| panic!("not a containerd scope: {scope}")),
    );
    assert_pause_in(&web);

    // The sandbox is wired: a lab-up pod on the other node reaches it.
    let mut server = Server::start(&web, 8080).expect("server in web-1");
    let called = Call::default()
        .run(lab.pod(0, 0), SocketAddrV4::new(web.ip, 8080))
        .expect("call into web-1");
    assert_eq!(called.server, "web-1");
    assert_eq!(server.next_served().unwrap().peer, called.local);

    let slices =
        Api::<DynamicObject>::namespaced_with(cp.client(), "shop", &endpoint_slices_v1beta1());
    let ready_addresses = || -> Vec<String> {
        let params = ListParams::default().labels("kubernetes.io/service-name=web");
        let list = cp.block_on(slices.list(&params)).expect("EndpointSlices");
        list.iter()
            .flat_map(|slice| {
                slice.data["endpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|endpoint| endpoint["conditions"]["ready"] == true)
            .flat_map(|endpoint| {
                endpoint["addresses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|address| address.as_str().map(str::to_owned))
            .collect()
    };
    wait_until("web's EndpointSlice lists web-1", || {
        ready_addresses() == ["10.244.2.3"]
    });

    // Deletion: the kubelet removes the sandbox and confirms, and the Pod is gone.
    drop(server);
    assert!(cp.delete("v1", "Pod", Some("shop"), "web-1").unwrap());
    wait_until("web-1 is deleted", || {
        cp.block_on(pods.get_opt("web-1")).unwrap().is_none()
    });
    assert!(kubelet.pod("shop", "web-1").is_none());
    assert!(!web.netns_path().exists(), "{} survived", web.netns);
    assert!(
        !web_pod_cgroup.exists(),
        "{} survived",
        web_pod_cgroup.display()
    );
    wait_until("web's EndpointSlice is empty", || {
        ready_addresses().is_empty()
    });

    drop(kubelet);
    let cgroup = lab.cgroup().to_owned();
    let db_netns = db.netns_path();
    drop(cp);
    drop(lab);
    assert!(!cgroup.exists(), "{} survived teardown", cgroup.display());
    assert!(
        !db_netns.exists(),
        "{} survived teardown",
        db_netns.display()
    );
}

#[test]
fn watch_from_before_a_compaction_gets_410_gone() {
    let lab = test_lab(1, 0);
    let mut cp = ControlPlane::start(&lab).expect("control plane");
    let kubelet = Kubelet::start(&lab, &cp).expect("kubelet");
    let maps: Api<ConfigMap> = Api::namespaced(cp.client(), "default");
    let old = cp
        .apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v1}\n")
        .unwrap()[0]
        .metadata
        .resource_version
        .clone()
        .unwrap();
    cp.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v2}\n")
        .unwrap();

    cp.kill_apiserver().unwrap();
    let revision = cp.compact_etcd().unwrap();
    assert!(revision > old.parse::<i64>().unwrap());
    cp.restart_apiserver().unwrap();

    let first_event = |version: &str| {
        cp.block_on(async {
            let stream = maps
                .watch(&WatchParams::default().timeout(5), version)
                .await?;
            let mut stream = stream.boxed();
            tokio::time::timeout(Duration::from_secs(10), stream.try_next())
                .await
                .expect("a watch event within 10 s")
        })
    };
    match first_event(&old) {
        Ok(Some(WatchEvent::Error(status))) => assert_eq!(status.code, 410, "{status:?}"),
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 410, "{status:?}"),
        other => panic!("a watch from compacted resourceVersion {old} got {other:?}"),
    }

    // From now on, the same watch works: the 410 was about the version.
    let now = cp
        .block_on(maps.list(&ListParams::default()))
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut b = ConfigMap::default();
    b.metadata.name = Some("b".into());
    cp.block_on(maps.create(&PostParams::default(), &b))
        .unwrap();
    match first_event(&now) {
        Ok(Some(WatchEvent::Added(map))) => assert_eq!(map.metadata.name.as_deref(), Some("b")),
        other => panic!("a watch from the current resourceVersion got {other:?}"),
    }

    // The kubelet's watch recovered from the outage too.
    cp.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late}\n\
         spec: {nodeName: node-1, containers: [{name: c, image: c}]}\n",
    )
    .unwrap();
    let late = kubelet
        .wait_pod("default", "late", WAIT)
        .expect("a pod after the restart");
    assert_eq!(late.ip, Ipv4Addr::new(10, 244, 1, 2));
}

fn assert_container_id(id: &str) {
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a container id: {id}"
    );
}

/// A process sits in the pod's container cgroup, in the pod's netns, as a sandbox's pause.
fn assert_pause_in(pod: &lab::Pod) {
    let procs = fs::read_to_string(pod.cgroup.join("cgroup.procs")).unwrap();
    let pid = procs
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no process in {}", pod.cgroup.display()));
    let inode = |path: PathBuf| fs::metadata(path).unwrap().ino();
    assert_eq!(
        inode(Path::new("/proc").join(pid).join("ns/net")),
        inode(pod.netns_path()),
        "the pause process is not in the pod's netns"
    );
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

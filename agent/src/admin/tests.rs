use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::pki_types::PrivateKeyDer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_daemon::logging::{self, LogFormat};
use warren_pki::tls::serial_of;

use super::*;
use crate::{
    mesh::{
        LocalPod, Policies, ServicePort, Services, Store, Workload, Workloads,
        policy::DEFAULT_ROOT_NAMESPACE,
    },
    reconcile::PodState,
    sandbox::NsId,
    tls::testing::{TempCa, spiffe_id},
};

fn workload(name: &str, ip: [u8; 4], local: Option<LocalPod>) -> Workload {
    Workload {
        name: name.into(),
        namespace: "shop".into(),
        workload_name: format!("{name}-deploy"),
        service_account: "web".into(),
        identity: spiffe_id("spiffe://cluster.local/ns/shop/sa/web"),
        ip: ip.into(),
        node: if local.is_some() { "node-1" } else { "node-2" }.into(),
        labels: [("app".to_owned(), name.to_owned())].into(),
        local,
        probe_ports: BTreeSet::from([8081]),
    }
}

const POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
  selector: {matchLabels: {app: front}}
  portLevelMtls: {\"8081\": {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/shop/*\"], notIpBlocks: [10.9.0.0/16]}}]
    to: [{operation: {ports: [\"8080\"]}}]
    when: [{key: source.namespace, values: [shop]}]
";

fn policies() -> Policies {
    let loaded = Policies::from_texts(
        [(PathBuf::from("p.yaml"), Ok(POLICIES.to_owned()))],
        DEFAULT_ROOT_NAMESPACE,
    );
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.policies
}

struct Fixture {
    ca: TempCa,
    store: Store,
    pods: tokio::sync::watch::Sender<Arc<States>>,
    held: Arc<Mutex<Vec<CertificateInfo>>>,
    ready: Arc<Mutex<Result<(), String>>>,
    admin: Admin,
    /// The subscriber `admin.logging` changes: made for the test and never
    /// installed (the global one belongs to no test), kept alive here since
    /// the control holds it weakly.
    _logs: tracing::Dispatch,
}

fn fixture() -> Fixture {
    let ca = TempCa::new();
    let store = Store::new(Snapshot::new(ca.trust_bundle(), Policies::default()));
    let (pods, pods_rx) = tokio::sync::watch::channel(Arc::new(States::new()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(Mutex::new(Err("pods not listed yet".to_owned())));
    let (certificates, readiness) = (held.clone(), ready.clone());
    let (logs, logging) = logging::subscriber(LogFormat::Text, "info", std::io::sink).unwrap();
    let admin = Admin {
        node: "node-1".into(),
        mesh: store.subscribe(),
        pods: pods_rx,
        certificates: Arc::new(move || certificates.lock().unwrap().clone()),
        logging,
        ready: Arc::new(move || readiness.lock().unwrap().clone()),
    };
    Fixture {
        ca,
        store,
        pods,
        held,
        ready,
        admin,
        _logs: logs,
    }
}

#[test]
fn the_dump_follows_the_published_snapshot_and_pod_states() {
    let f = fixture();
    let empty = config_dump(&f.admin);
    assert_eq!(empty["node"], "node-1");
    assert_eq!(empty["synced"], false);
    assert_eq!(empty["workloads"], json!([]));
    assert_eq!(empty["pods"], json!([]));

    let front = workload(
        "front",
        [10, 244, 1, 5],
        Some(LocalPod::Kubelet {
            uid: "0b5c1bd2-4d3b-4f3a-9a6c-1f4f0c1e2d3a".into(),
            netns: Some("/var/run/netns/cni-1".into()),
        }),
    );
    let cart = workload(
        "cart",
        [10, 244, 1, 6],
        Some(LocalPod::Paths {
            netns: "/run/netns/cart".into(),
            cgroup: "/sys/fs/cgroup/cart".into(),
        }),
    );
    let remote = workload("db", [10, 244, 2, 7], None);
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    f.store.publish(|s| {
        s.set_workloads(
            Workloads::new([front.clone(), cart.clone(), remote.clone()])
                .with_conflicts([Ipv4Addr::new(10, 244, 1, 9)]),
        );
        s.set_services(Services::new([(
            vip,
            ServicePort {
                name: "front".into(),
                namespace: "shop".into(),
                endpoints: vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 8080)],
            },
        )]));
        s.set_policies(policies());
        s.set_synced();
    });
    let states: States = HashMap::from([
        (
            front.qualified_name(),
            PodState::Enrolled {
                workload: Arc::new(front),
                netns: Some(NsId {
                    dev: 4,
                    ino: 4026532,
                }),
            },
        ),
        (
            cart.qualified_name(),
            PodState::Failing {
                workload: Arc::new(cart),
                error: "pod not there yet".into(),
            },
        ),
    ]);
    f.pods.send_replace(Arc::new(states));

    let dump = config_dump(&f.admin);
    assert_eq!(dump["synced"], true);
    let workloads = dump["workloads"].as_array().unwrap();
    let names: Vec<&str> = workloads
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cart", "db", "front"]);
    assert_eq!(
        workloads[2],
        json!({
            "name": "front",
            "namespace": "shop",
            "workload_name": "front-deploy",
            "service_account": "web",
            "identity": "spiffe://cluster.local/ns/shop/sa/web",
            "address": "10.244.1.5",
            "node": "node-1",
            "labels": {"app": "front"},
            "probe_ports": [8081],
            "local": {
                "source": "kubelet",
                "uid": "0b5c1bd2-4d3b-4f3a-9a6c-1f4f0c1e2d3a",
                "netns": "/var/run/netns/cni-1",
            },
            "mtls": {"mode": "STRICT", "port_modes": {"8081": "PERMISSIVE"}},
            "authorization_enforced": true,
        })
    );
    assert_eq!(
        workloads[0]["local"],
        json!({"source": "config", "netns": "/run/netns/cart", "cgroup": "/sys/fs/cgroup/cart"})
    );
    assert_eq!(workloads[1]["local"], Value::Null);
    assert_eq!(workloads[1]["mtls"]["mode"], "PERMISSIVE");
    assert_eq!(dump["conflicted_addresses"], json!(["10.244.1.9"]));
    assert_eq!(
        dump["services"],
        json!([{
            "address": "10.96.0.10:80",
            "service": "shop/front",
            "endpoints": ["10.244.1.5:8080"],
        }])
    );
    assert_eq!(
        dump["policies"]["peer_authentications"],
        json!([{
            "namespace": "shop",
            "name": "strict",
            "created": null,
            "selector": {"app": "front"},
            "mode": "STRICT",
            "port_modes": {"8081": "PERMISSIVE"},
        }])
    );
    assert_eq!(
        dump["policies"]["authorization_policies"],
        json!([{
            "namespace": "shop",
            "name": "only-web",
            "selector": null,
            "action": "ALLOW",
            "dry_run": false,
            "rules": [{
                "from": [{
                    "principals": ["cluster.local/ns/shop/*"],
                    "not_ip_blocks": ["10.9.0.0/16"],
                }],
                "to": [{"ports": [8080]}],
                "when": [{"key": "source.namespace", "values": ["shop"], "not_values": []}],
                "l7": [],
            }],
        }])
    );
    assert_eq!(
        dump["pods"],
        json!([
            {
                "pod": "shop/cart",
                "address": "10.244.1.6",
                "state": "failing",
                "error": "pod not there yet",
            },
            {
                "pod": "shop/front",
                "address": "10.244.1.5",
                "state": "enrolled",
                "netns": {"dev": 4, "ino": 4026532},
            },
        ])
    );
    let roots = dump["trust_bundle"]["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    let root = f.ca.root();
    assert_eq!(roots[0]["serial"], serial_of(&root).unwrap());
    assert_eq!(
        roots[0]["subject"],
        warren_pki::tls::subject_of(&root).unwrap()
    );
    assert!(roots[0]["not_after"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn certificates_are_shown_without_their_keys() {
    let f = fixture();
    let id = spiffe_id("spiffe://cluster.local/ns/shop/sa/web");
    let certificate = f.ca.issue(&id).unwrap();
    let info = CertificateInfo::of("shop/front".into(), &certificate);
    f.held.lock().unwrap().push(info.clone());

    let dump = config_dump(&f.admin);
    assert_eq!(
        dump["certificates"],
        json!([{
            "workload": "shop/front",
            "identity": "spiffe://cluster.local/ns/shop/sa/web",
            "serial": info.serial,
            "not_before": humantime::format_rfc3339_seconds(certificate.not_before()).to_string(),
            "not_after": humantime::format_rfc3339_seconds(certificate.not_after()).to_string(),
        }])
    );
    assert!(!info.serial.is_empty() && info.serial.chars().all(|c| c.is_ascii_hexdigit()));

    let text = serde_json::to_string(&dump).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let PrivateKeyDer::Pkcs8(key) = certificate.key() else {
        panic!("the development CA issues PKCS#8 keys");
    };
    let key = key.secret_pkcs8_der();
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", key.to_vec()));
    // Every base64 line of the key, and its bytes in hex.
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line.trim()), "key base64 in the dump");
    }
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    for window in hex.as_bytes().chunks(32) {
        let window = std::str::from_utf8(window).unwrap();
        assert!(
            window.len() < 16 || !text.to_lowercase().contains(window),
            "key hex in the dump"
        );
    }
}

// --- over HTTP ---

async fn send(address: SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    send_with(address, method, target, "Host: localhost\r\n").await
}

/// Sends one request with `headers` (each ending in CRLF).
async fn send_with(
    address: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("{method} {target} HTTP/1.1\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn the_endpoint_serves_the_dump_the_filter_and_readiness() {
    let f = fixture();
    let address = spawn("127.0.0.1:0", f.admin.clone()).await.unwrap();

    let (status, head, body) = send(address, "GET", CONFIG_DUMP_PATH).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let dump: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump, config_dump(&f.admin));
    f.store
        .publish(|s| s.set_workloads(Workloads::new([workload("db", [10, 0, 0, 1], None)])));
    let (_, _, body) = send(address, "GET", CONFIG_DUMP_PATH).await;
    let dump: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["workloads"][0]["address"], "10.0.0.1");

    let (status, _, body) = send(address, "GET", READY_PATH).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: pods not listed yet\n")
    );
    *f.ready.lock().unwrap() = Ok(());
    let (status, _, _) = send(address, "GET", READY_PATH).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_log_filter_changes_and_a_bad_one_is_refused() {
    let f = fixture();
    let address = spawn("127.0.0.1:0", f.admin.clone()).await.unwrap();

    let (status, _, body) = send(address, "GET", LOGGING_PATH).await;
    assert_eq!((status, body.as_str()), (200, "info\n"));

    let (status, _, body) = send(
        address,
        "POST",
        "/logging?level=info,warren_agent%3A%3Aproxy%3Ddebug",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "info,warren_agent::proxy=debug\n")
    );
    assert_eq!(f.admin.logging.filter(), "info,warren_agent::proxy=debug");

    for bad in [
        "/logging?level=warren_agent=chatty",
        "/logging?level=",
        "/logging?level=%zz",
        "/logging",
        "/logging?verbose=1",
    ] {
        let (status, _, body) = send(address, "POST", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(!body.is_empty(), "{bad}: the problem is named");
    }
    let (_, _, body) = send(address, "POST", "/logging?level=warren_agent=chatty").await;
    assert!(body.contains("warren_agent=chatty"), "{body}");
    assert!(
        body.contains("stays \"info,warren_agent::proxy=debug\""),
        "{body}"
    );
    let (_, _, body) = send(address, "GET", LOGGING_PATH).await;
    assert_eq!(body, "info,warren_agent::proxy=debug\n");
}

#[tokio::test]
async fn other_paths_are_not_found_and_other_methods_not_allowed() {
    let f = fixture();
    let address = spawn("127.0.0.1:0", f.admin.clone()).await.unwrap();

    let (status, _, body) = send(address, "GET", "/stats").await;
    assert_eq!(status, 404);
    for path in [CONFIG_DUMP_PATH, LOGGING_PATH, READY_PATH] {
        assert!(body.contains(path), "{body}");
    }
    let (status, head, _) = send(address, "POST", CONFIG_DUMP_PATH).await;
    assert_eq!(status, 405);
    assert!(head.to_lowercase().contains("allow: get, head"), "{head}");
    let (status, head, _) = send(address, "DELETE", LOGGING_PATH).await;
    assert_eq!(status, 405);
    assert!(
        head.to_lowercase().contains("allow: get, head, post"),
        "{head}"
    );
    let (status, _, body) = send(address, "HEAD", CONFIG_DUMP_PATH).await;
    assert_eq!((status, body.as_str()), (200, ""));
}

#[test]
fn certificate_times_out_of_range_show_as_null() {
    let f = fixture();
    let id = spiffe_id("spiffe://cluster.local/ns/shop/sa/web");
    f.held.lock().unwrap().push(CertificateInfo {
        workload: "shop/old".into(),
        identity: id.to_string(),
        serial: "01".into(),
        not_before: SystemTime::UNIX_EPOCH - Duration::from_secs(1),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800),
    });
    let dump = config_dump(&f.admin);
    assert_eq!(dump["certificates"][0]["not_before"], Value::Null);
    assert_eq!(dump["certificates"][0]["not_after"], Value::Null);
}

#[tokio::test]
async fn web_pages_cannot_use_the_endpoint_through_a_browser_on_the_node() {
    let f = fixture();
    let address = spawn("127.0.0.1:0", f.admin.clone()).await.unwrap();
    let before = f.admin.logging.filter();
    // A page's cross-origin POST: refused, and the filter stays.
    let (status, _, body) = send_with(
        address,
        "POST",
        "/logging?level=off",
        "Host: 127.0.0.1:15000\r\nOrigin: http://evil.example\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Origin"), "{body}");
    assert_eq!(f.admin.logging.filter(), before);
    // DNS rebinding: a name of the attacker's that resolves to loopback.
    let (status, _, body) = send_with(
        address,
        "GET",
        CONFIG_DUMP_PATH,
        "Host: rebind.evil.example:15000\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Host"), "{body}");
    // What curl on the node sends, in each form.
    for host in [
        "127.0.0.1:15000",
        "localhost",
        "[::1]:15000",
        "LOCALHOST:15000",
    ] {
        let (status, head, _) =
            send_with(address, "GET", READY_PATH, &format!("Host: {host}\r\n")).await;
        assert_ne!(status, 403, "{host}: {head}");
    }
}

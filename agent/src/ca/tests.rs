//! [`CsrSource`] against a real CA service (`warren-ca`'s, in-process, over
//! TLS and gRPC on loopback): its certificates work for HBONE.

use std::{path::Path, time::Duration};

use rustls::pki_types::ServerName;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use warren_ca::{service::CaServer, workloads::Workloads};
use warren_pki::{
    ca::{Authority, Policy, init},
    client::CaClient,
    identity::{NodeId, SpiffeId, TrustDomain},
    transport::NodeCredential,
};

use super::CsrSource;
use crate::tls::{self, CertificateSource};

const HOUR: Duration = Duration::from_secs(3600);

/// `sleep` and `httpbin` run on node-1, `web` on node-2.
const WORKLOADS: &str = "
trustDomain: cluster.local
workloads:
  - {name: sleep-1, namespace: default, serviceAccount: sleep, ip: 10.244.1.2, node: node-1}
  - {name: httpbin-1, namespace: default, serviceAccount: httpbin, ip: 10.244.1.3, node: node-1}
  - {name: web-1, namespace: shop, serviceAccount: web, ip: 10.244.2.2, node: node-2}
";

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn load_lab(dir: &Path) -> Authority {
    let td = TrustDomain::new("cluster.local").unwrap();
    Authority::load(
        &dir.join("ca-cert.pem"),
        &dir.join("ca-key.pem"),
        &dir.join("root.pem"),
        Policy::new(td),
    )
    .unwrap()
}

#[tokio::test]
async fn csr_source_certificates_work_for_hbone() {
    // A lab CA, as `warren-ca init` makes it, served on a loopback port.
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    init::lab(dir.path(), &td).unwrap();
    let workloads = Workloads::parse(Path::new("workloads.yaml"), WORKLOADS).unwrap();
    let server = CaServer::new(
        load_lab(dir.path()),
        &workloads.trust_domain,
        &workloads.placements,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));

    // node-1's credential, as `warren-ca node-credential` issues it.
    let issuer = load_lab(dir.path());
    let node = NodeId::new(td, "node-1").unwrap();
    let credential = issuer.issue_credential(&node.to_string(), HOUR).unwrap();
    let credential = NodeCredential::from_pem(
        credential.chain_pem().as_bytes(),
        credential.key_pem().as_bytes(),
    )
    .unwrap();
    let client = CaClient::connect(&addr.to_string(), &credential, issuer.roots())
        .await
        .unwrap();

    let source = CsrSource::new(client, HOUR);
    let sleep = id("spiffe://cluster.local/ns/default/sa/sleep");
    let httpbin = id("spiffe://cluster.local/ns/default/sa/httpbin");
    let client_cert = source.certificate(&sleep).await.unwrap();
    let server_cert = source.certificate(&httpbin).await.unwrap();
    assert_eq!(client_cert.identity(), &sleep);
    // The root is dropped: peers have it.
    assert_eq!(client_cert.chain().len(), 2);
    // A workload of another node is refused through the source too.
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let refused = source.certificate(&web).await.unwrap_err();
    assert!(
        refused.to_string().contains("not authorized to obtain"),
        "{refused}"
    );

    let trust = issuer.roots().clone();
    let server = tls::server_config(&server_cert, &trust).unwrap();
    let client = tls::client_config(&client_cert, &trust, std::slice::from_ref(&httpbin)).unwrap();
    let (near, far) = tokio::io::duplex(64 * 1024);
    let accept = tokio::spawn(async move { TlsAcceptor::from(server).accept(far).await });
    let name = ServerName::try_from("unused").unwrap();
    let connected = TlsConnector::from(client)
        .connect(name, near)
        .await
        .unwrap();
    let accepted = accept.await.unwrap().unwrap();
    assert_eq!(tls::peer_identity(accepted.get_ref().1), Some(sleep));
    assert_eq!(tls::peer_identity(connected.get_ref().1), Some(httpbin));
}

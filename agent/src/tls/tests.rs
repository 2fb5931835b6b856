//! Real handshakes over loopback TCP between configs built by this module.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, SystemTime},
};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String};
use rustls::{
    CipherSuite, ClientConfig, CommonState, ProtocolVersion, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    version::{TLS12, TLS13},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use warren_pki::{
    ca::{Authority, Policy, init},
    identity::SpiffeId,
    tls::{TlsError, TrustBundle, WorkloadCertificate, provider::provider, spiffe_id_of, verify},
};

use super::{
    testing::{TempCa, expired, signed_leaf, spiffe_id, to_pem, trust_domain},
    *,
};

fn sleep() -> SpiffeId {
    spiffe_id("spiffe://cluster.local/ns/default/sa/sleep")
}

fn httpbin() -> SpiffeId {
    spiffe_id("spiffe://cluster.local/ns/default/sa/httpbin")
}

/// What one side saw of an established connection.
#[derive(Debug)]
struct Seen {
    peer: Option<SpiffeId>,
    alpn: Option<Vec<u8>>,
    version: Option<ProtocolVersion>,
    suite: Option<CipherSuite>,
    sni: Option<String>,
}

fn seen(conn: &CommonState) -> Seen {
    Seen {
        peer: peer_identity(conn),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version(),
        suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
        sni: None,
    }
}

/// One connection over loopback TCP. After the handshake the server sends a
/// byte and the client answers: in TLS 1.3 the client finishes its handshake
/// before the server has checked the client's certificate, so a refusal of
/// the client shows up only when the client next reads.
async fn exchange(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (io::Result<Seen>, io::Result<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let conn = tls.get_ref().1;
        let seen = Seen {
            sni: conn.server_name().map(str::to_owned),
            ..seen(conn)
        };
        tls.write_all(b"s").await?;
        tls.flush().await?;
        tls.read_exact(&mut [0]).await?;
        Ok(seen)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        tls.read_exact(&mut [0]).await?;
        tls.write_all(b"c").await?;
        tls.flush().await?;
        Ok(seen(tls.get_ref().1))
    };
    let limit = Duration::from_secs(10);
    let client = timeout(limit, client_side).await.expect("client hung");
    let server = timeout(limit, server_side).await.expect("server hung");
    (server.expect("server task panicked"), client)
}

/// Asserts that both sides failed, and that each error says why.
fn assert_refused(
    (server, client): (io::Result<Seen>, io::Result<Seen>),
    server_says: &str,
    client_says: &str,
) {
    let server = server.expect_err("server accepted").to_string();
    let client = client.expect_err("client got through").to_string();
    assert!(server.contains(server_says), "server error: {server}");
    assert!(client.contains(client_says), "client error: {client}");
}

/// A client config like `client_config` but presenting any chain, or none.
fn raw_client(
    trust: &TrustBundle,
    expected: SpiffeId,
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = verify::CheckedServer::new(
        trust.store(),
        provider.signature_verification_algorithms,
        verify::OneOf(vec![expected]),
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

fn day() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (now, now + Duration::from_secs(86400))
}

#[tokio::test]
async fn workloads_of_one_ca_see_each_others_identity() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    let client = client_config(&ca.issue(&sleep()).unwrap(), &trust, &[httpbin()]).unwrap();

    let (server, client) = exchange(server, client).await;
    let (server, client) = (server.unwrap(), client.unwrap());
    assert_eq!(server.peer, Some(sleep()));
    assert_eq!(client.peer, Some(httpbin()));
    assert_eq!(server.sni, None, "the client must not send SNI");
    for side in [&server, &client] {
        assert_eq!(side.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(side.version, Some(ProtocolVersion::TLSv1_3));
        assert!(
            matches!(
                side.suite,
                Some(CipherSuite::TLS13_AES_256_GCM_SHA384 | CipherSuite::TLS13_AES_128_GCM_SHA256)
            ),
            "{:?}",
            side.suite
        );
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    let client = raw_client(&trust, httpbin(), None);
    assert_refused(
        exchange(server, client).await,
        "peer sent no certificates",
        "CertificateRequired",
    );
}

#[tokio::test]
async fn client_from_another_root_is_refused() {
    let (ca, other) = (TempCa::new(), TempCa::new());
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &ca.trust_bundle()).unwrap();
    let stranger = other.issue(&sleep()).unwrap();
    let client = client_config(&stranger, &ca.trust_bundle(), &[httpbin()]).unwrap();
    assert_refused(exchange(server, client).await, "UnknownIssuer", "UnknownCA");
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    let foreign = ca
        .issue(&spiffe_id("spiffe://example.org/ns/default/sa/sleep"))
        .unwrap();
    let client = client_config(&foreign, &trust, &[httpbin()]).unwrap();
    assert_refused(
        exchange(server, client).await,
        "is from trust domain example.org, not ours (cluster.local)",
        "CertificateUnknown",
    );
}

#[tokio::test]
async fn client_without_spiffe_id_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    let dns_only = SanType::DnsName(Ia5String::try_from("sleep.default").unwrap());
    let (from, to) = day();
    let cert = signed_leaf(&ca, vec![dns_only], from, to);
    let client = raw_client(&trust, httpbin(), Some(cert));
    assert_refused(
        exchange(server, client).await,
        "no spiffe:// URI SAN",
        "CertificateUnknown",
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    let client = client_config(&expired(&ca, &sleep()), &trust, &[httpbin()]).unwrap();
    assert_refused(
        exchange(server, client).await,
        "certificate expired",
        "CertificateExpired",
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&expired(&ca, &httpbin()), &trust).unwrap();
    let client = client_config(&ca.issue(&sleep()).unwrap(), &trust, &[httpbin()]).unwrap();
    assert_refused(
        exchange(server, client).await,
        "CertificateExpired",
        "certificate expired",
    );
}

#[tokio::test]
async fn server_with_unexpected_identity_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    let wanted = spiffe_id("spiffe://cluster.local/ns/default/sa/reviews");
    let client = client_config(&ca.issue(&sleep()).unwrap(), &trust, &[wanted]).unwrap();
    assert_refused(
        exchange(server, client).await,
        "CertificateUnknown",
        "peer presented spiffe://cluster.local/ns/default/sa/httpbin, \
         but expected spiffe://cluster.local/ns/default/sa/reviews",
    );
}

#[tokio::test]
async fn server_from_another_root_is_refused() {
    let (ca, other) = (TempCa::new(), TempCa::new());
    let server = server_config(&other.issue(&httpbin()).unwrap(), &ca.trust_bundle()).unwrap();
    let client = client_config(
        &ca.issue(&sleep()).unwrap(),
        &ca.trust_bundle(),
        &[httpbin()],
    )
    .unwrap();
    assert_refused(exchange(server, client).await, "UnknownCA", "UnknownIssuer");
}

#[tokio::test]
async fn tls12_client_is_refused() {
    let ca = TempCa::new();
    let trust = ca.trust_bundle();
    let server = server_config(&ca.issue(&httpbin()).unwrap(), &trust).unwrap();
    // Stock ring with its TLS 1.2 suites, offering nothing newer.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verify::CheckedServer::new(
        trust.store(),
        provider.signature_verification_algorithms,
        verify::OneOf(vec![httpbin()]),
    );
    let cert = ca.issue(&sleep()).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.key())
        .unwrap();
    assert_refused(
        exchange(server, Arc::new(client)).await,
        "peer is incompatible",
        "ProtocolVersion",
    );
}

#[tokio::test]
async fn bundle_with_two_roots_trusts_both() {
    let (ca, other) = (TempCa::new(), TempCa::new());
    let mut pem = fs::read(ca.dir().join("root.pem")).unwrap();
    pem.extend(fs::read(other.dir().join("root.pem")).unwrap());
    let both = TrustBundle::from_pem(&pem).unwrap();
    assert_eq!(both.roots(), &[ca.root(), other.root()]);
    assert_eq!(
        ca.trust_bundle().merged(&other.trust_bundle()).roots(),
        both.roots()
    );

    let server = server_config(&ca.issue(&httpbin()).unwrap(), &both).unwrap();
    for issuer in [&ca, &other] {
        let cert = issuer.issue(&sleep()).unwrap();
        let client = client_config(&cert, &ca.trust_bundle(), &[httpbin()]).unwrap();
        let (server, client) = exchange(Arc::clone(&server), client).await;
        assert_eq!(server.unwrap().peer, Some(sleep()));
        client.unwrap();
    }
}

#[test]
fn merging_a_bundle_with_itself_changes_nothing() {
    let ca = TempCa::new();
    let bundle = ca.trust_bundle();
    assert_eq!(bundle.merged(&bundle).roots(), &[ca.root()]);
}

#[test]
fn dev_ca_reloads_its_root() {
    let ca = TempCa::new();
    let again = DevCa::load_or_create(ca.dir(), &trust_domain()).unwrap();
    assert_eq!(again.root(), ca.root());
    // The reloaded key signs certificates the first root vouches for.
    let cert = again.issue(&sleep()).unwrap();
    let server = server_config(&cert, &ca.trust_bundle());
    assert!(server.is_ok());
}

#[test]
fn agents_starting_together_share_one_root() {
    let dir = tempfile::tempdir().unwrap();
    let agents = 8;
    let start = Arc::new(Barrier::new(agents));
    let roots: Vec<_> = (0..agents)
        .map(|_| {
            let (dir, start) = (dir.path().to_owned(), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                DevCa::load_or_create(&dir, &trust_domain()).unwrap().root()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|agent| agent.join().unwrap())
        .collect();
    assert!(roots.iter().all(|root| *root == roots[0]));
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "temporary files left behind: {left:?}");
}

#[test]
fn dev_ca_key_is_private() {
    let ca = TempCa::new();
    let mode = |name| {
        fs::metadata(ca.dir().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("root-key.pem"), 0o600);
    assert_eq!(mode("root.pem"), 0o644);
}

#[test]
fn issued_certificate_round_trips_through_pem() {
    let ca = TempCa::new();
    let cert = ca.issue(&sleep()).unwrap();
    let (chain, key) = to_pem(&cert);
    let back = WorkloadCertificate::from_pem(chain.as_bytes(), key.as_bytes()).unwrap();
    assert_eq!(back.identity(), &sleep());
    assert_eq!(back.chain(), cert.chain());
    assert_eq!(back.not_after(), cert.not_after());
    assert_eq!(spiffe_id_of(&back.chain()[0]).unwrap(), sleep());
}

#[test]
fn renewal_is_due_half_way_from_receipt_however_far_backdated() {
    let ca = TempCa::new();
    let ten_seconds = DevCa::load_or_create(ca.dir(), &trust_domain())
        .unwrap()
        .with_validity(Duration::from_secs(10));
    let cert = ten_seconds.issue(&sleep()).unwrap();
    // Backdated by minutes, yet due in about 5 s, not at once.
    assert!(cert.not_before() + Duration::from_secs(60) < SystemTime::now());
    let due = cert.refresh_at().duration_since(SystemTime::now()).unwrap();
    assert!(
        (Duration::from_secs(4)..=Duration::from_secs(5)).contains(&due),
        "{due:?}"
    );
    assert!(cert.lifetime() <= Duration::from_secs(10));
}

#[test]
fn issued_certificates_last_the_validity() {
    let ca = TempCa::new();
    let cert = ca.issue(&sleep()).unwrap();
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    // A day, plus the backdating, give or take the clock ticking meanwhile.
    assert!(
        (86400..86400 + 3600).contains(&lifetime.as_secs()),
        "{lifetime:?}"
    );
    assert!(cert.refresh_at() > SystemTime::now());

    let hour = DevCa::load_or_create(ca.dir(), &trust_domain())
        .unwrap()
        .with_validity(Duration::from_secs(3600));
    let short = hour.issue(&sleep()).unwrap();
    assert!(short.not_after() <= SystemTime::now() + Duration::from_secs(3600));
}

#[tokio::test]
async fn dev_ca_is_a_certificate_source() {
    let ca = TempCa::new();
    let source: &dyn CertificateSource = &*ca;
    let cert = source.certificate(&sleep()).await.unwrap();
    assert_eq!(cert.identity(), &sleep());
    assert_eq!(ca.trust_bundle().roots(), &[ca.root()]);
}

#[test]
fn garbage_pem_is_refused_clearly() {
    let err = TrustBundle::from_pem(b"garbage").unwrap_err();
    assert_eq!(err.to_string(), "trust bundle: no PEM certificate found");

    let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    let err = TrustBundle::from_pem(broken).unwrap_err();
    assert!(err.to_string().starts_with("trust bundle: "), "{err}");

    let err = WorkloadCertificate::from_pem(b"garbage", b"garbage").unwrap_err();
    assert_eq!(
        err.to_string(),
        "certificate chain: no PEM certificate found"
    );

    let ca = TempCa::new();
    let (chain, _) = to_pem(&ca.issue(&sleep()).unwrap());
    let err = WorkloadCertificate::from_pem(chain.as_bytes(), b"garbage").unwrap_err();
    assert!(err.to_string().starts_with("private key: "), "{err}");
}

#[test]
fn trust_bundle_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = TrustBundle::from_pem_file(&missing).unwrap_err();
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );

    let garbage = dir.path().join("garbage.pem");
    fs::write(&garbage, "garbage").unwrap();
    let err = TrustBundle::from_pem_file(&garbage).unwrap_err();
    assert!(
        err.to_string().contains(&*garbage.to_string_lossy()),
        "{err}"
    );
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}

#[test]
fn key_of_another_certificate_is_refused() {
    let ca = TempCa::new();
    let (chain, _) = to_pem(&ca.issue(&sleep()).unwrap());
    let (_, other_key) = to_pem(&ca.issue(&sleep()).unwrap());
    let err = WorkloadCertificate::from_pem(chain.as_bytes(), other_key.as_bytes()).unwrap_err();
    assert!(
        err.to_string().contains("private key does not suit"),
        "{err}"
    );
}

#[test]
fn spiffe_id_must_be_the_one_uri_san() {
    let ca = TempCa::new();
    let (from, to) = day();
    let uri = |s: &str| SanType::URI(Ia5String::try_from(s).unwrap());
    let (two, _) = signed_leaf(
        &ca,
        vec![uri(&sleep().to_string()), uri(&httpbin().to_string())],
        from,
        to,
    );
    assert!(matches!(
        spiffe_id_of(&two),
        Err(TlsError::SeveralSpiffeIds)
    ));
    let (none, _) = signed_leaf(&ca, vec![uri("https://example.org/")], from, to);
    assert!(matches!(spiffe_id_of(&none), Err(TlsError::NoSpiffeId)));
    let (bad, _) = signed_leaf(&ca, vec![uri("spiffe://cluster.local/x")], from, to);
    assert!(matches!(spiffe_id_of(&bad), Err(TlsError::BadSpiffeId(_))));
    assert!(spiffe_id_of(&CertificateDer::from(vec![1, 2, 3])).is_err());
}

#[test]
fn client_config_needs_an_expected_identity() {
    let ca = TempCa::new();
    let cert = ca.issue(&sleep()).unwrap();
    let err = client_config(&cert, &ca.trust_bundle(), &[]).unwrap_err();
    assert!(matches!(err, TlsError::NoExpectedIdentity));
}

#[test]
fn debug_output_leaves_the_key_out() {
    let ca = TempCa::new();
    let shown = format!("{:?}", ca.issue(&sleep()).unwrap());
    assert!(
        shown.contains("spiffe") || shown.contains("sleep"),
        "{shown}"
    );
    assert!(!shown.to_lowercase().contains("key"), "{shown}");
}

/// Certificates the CA service signs (as an intermediate of a lab root, from
/// workloads' CSRs) carry identities both ends of HBONE accept.
#[tokio::test]
async fn ca_signed_certificates_work_for_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    init::lab(dir.path(), &trust_domain()).unwrap();
    let authority = Authority::load(
        &dir.path().join("ca-cert.pem"),
        &dir.path().join("ca-key.pem"),
        &dir.path().join("root.pem"),
        Policy::new(trust_domain()),
    )
    .unwrap();
    let roots = authority.roots();
    let workload = |id: &SpiffeId| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string()).unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let chain = authority.sign(&csr, Duration::ZERO, |_| Ok(())).unwrap();
        WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap()
    };
    let client = workload(&sleep());
    let server = workload(&httpbin());
    assert_eq!(client.identity(), &sleep());
    assert_eq!(client.chain().len(), 2);

    let (server_saw, client_saw) = exchange(
        server_config(&server, roots).unwrap(),
        client_config(&client, roots, &[httpbin()]).unwrap(),
    )
    .await;
    assert_eq!(client_saw.unwrap().peer, Some(httpbin()));
    assert_eq!(server_saw.unwrap().peer, Some(sleep()));
}

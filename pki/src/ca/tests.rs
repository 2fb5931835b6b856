//! The CA's signing core, end to end through files as `warren-ca` will use
//! them: certificates it issues are checked with rustls' own verifiers and in
//! real (in-memory) handshakes, not only by parsing them back.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    PublicKeyData, SanType, string::Ia5String,
};
use rustls::{
    RootCertStore,
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::ring,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use tempfile::TempDir;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::{init::OPENSSL_SIGNING_SCRIPT, *};
use crate::{
    identity::{SpiffeId, TrustDomain},
    tls::{TrustBundle, WorkloadCertificate, spiffe_id_of},
};

const RSA_1024_CSR: &str = include_str!("testdata/rsa1024.csr");
const RSA_2048_CSR: &str = include_str!("testdata/rsa2048.csr");
const RSA_2048_KEY: &str = include_str!("testdata/rsa2048-key.pem");
const P521_CSR: &str = include_str!("testdata/p521.csr");

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn sleep() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/sleep")
}

fn httpbin() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/httpbin")
}

fn allow(_: &SpiffeId) -> Result<(), String> {
    Ok(())
}

/// A CA made by `init::lab` in a temporary directory, loaded as
/// `warren-ca serve` will load it.
struct Lab {
    dir: TempDir,
    authority: Authority,
}

impl Lab {
    fn new() -> Self {
        Self::with_policy(Policy::new(td()))
    }

    fn with_policy(policy: Policy) -> Self {
        let dir = tempfile::tempdir().unwrap();
        init::lab(dir.path(), &td()).unwrap();
        let authority = Authority::load(
            &dir.path().join("ca-cert.pem"),
            &dir.path().join("ca-key.pem"),
            &dir.path().join("root.pem"),
            policy,
        )
        .unwrap();
        Self { dir, authority }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A CSR with these SANs, made with a fresh key of `alg`.
fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> (String, KeyPair) {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (csr, key)
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

/// A P-256 CSR for `id` alone, as an agent would send it.
fn csr_for(id: &SpiffeId) -> (String, KeyPair) {
    csr_with(&PKCS_ECDSA_P256_SHA256, vec![uri(&id.to_string())])
}

fn ders(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect()
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

/// Checks the chain (leaf first) as peers will, with rustls' webpki
/// verifiers for servers and for clients.
fn verify(chain: &[String], roots: &TrustBundle) -> Result<(), rustls::Error> {
    let ders = ders(chain);
    let mut store = RootCertStore::empty();
    for root in roots.roots() {
        store.add(root.clone()).unwrap();
    }
    let store = Arc::new(store);
    let provider = Arc::new(ring::default_provider());
    let now = UnixTime::now();
    verify_server_cert_signed_by_trust_anchor(
        &ParsedCertificate::try_from(&ders[0])?,
        &store,
        &ders[1..],
        now,
        provider.signature_verification_algorithms.all,
    )?;
    WebPkiClientVerifier::builder_with_provider(store, provider)
        .build()
        .unwrap()
        .verify_client_cert(&ders[0], &ders[1..], now)?;
    Ok(())
}

fn not_after(der: &CertificateDer<'_>) -> SystemTime {
    system_time(parse(der).validity().not_after.timestamp()).unwrap()
}

fn not_before(der: &CertificateDer<'_>) -> SystemTime {
    system_time(parse(der).validity().not_before.timestamp()).unwrap()
}

/// The error for a CSR that must be refused before anyone is asked whether
/// the requester may have the identity.
fn refused(authority: &Authority, csr: &str) -> CaError {
    let err = authority
        .sign(csr, Duration::ZERO, |id| {
            panic!("authorization asked about {id} for an invalid CSR")
        })
        .expect_err("the CSR was signed");
    assert!(err.is_bad_request(), "not classed as a bad request: {err}");
    err
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|out| out.status.success())
}

// Signing.

#[test]
fn signs_a_p256_csr_with_the_intermediate() {
    let lab = Lab::new();
    let (csr, key) = csr_for(&sleep());
    let mut asked = None;
    let chain = lab
        .authority
        .sign(&csr, Duration::ZERO, |id| {
            asked = Some(id.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(asked, Some(sleep()));

    assert_eq!(chain.len(), 2, "leaf and intermediate");
    let ders = ders(&chain);
    let intermediate = fs::read(lab.path("ca-cert.pem")).unwrap();
    assert_eq!(
        ders[1],
        CertificateDer::from_pem_slice(&intermediate).unwrap()
    );
    verify(&chain, lab.authority.roots()).unwrap();
    assert_eq!(spiffe_id_of(&ders[0]).unwrap(), sleep());

    let leaf = parse(&ders[0]);
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert_eq!(leaf.issuer(), parse(&ders[1]).subject());
    assert_eq!(leaf.subject().iter().count(), 0, "subject should be empty");
    let sans = &leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        sans.general_names,
        [GeneralName::URI(
            "spiffe://cluster.local/ns/default/sa/sleep"
        )]
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && eku.other.is_empty());
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && !usage.key_encipherment() && !usage.key_cert_sign());
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    assert!(!lab.authority.is_self_signed());
}

#[test]
fn signs_p384_csrs() {
    let lab = Lab::new();
    let (csr, key) = csr_with(&PKCS_ECDSA_P384_SHA384, vec![uri(&sleep().to_string())]);
    let chain = lab.authority.sign(&csr, Duration::ZERO, allow).unwrap();
    verify(&chain, lab.authority.roots()).unwrap();
    WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.serialize_pem().as_bytes())
        .unwrap();
}

#[test]
fn signs_rsa_2048_csrs_for_encipherment_too() {
    let lab = Lab::new();
    let chain = lab
        .authority
        .sign(RSA_2048_CSR, Duration::ZERO, allow)
        .unwrap();
    verify(&chain, lab.authority.roots()).unwrap();
    let ders = ders(&chain);
    let leaf = parse(&ders[0]);
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && usage.key_encipherment());
    let cert =
        WorkloadCertificate::from_pem(chain.concat().as_bytes(), RSA_2048_KEY.as_bytes()).unwrap();
    assert_eq!(cert.identity(), &sleep());
}

#[test]
fn each_certificate_gets_its_own_serial() {
    let lab = Lab::new();
    let (csr, _key) = csr_for(&sleep());
    let serial = || {
        let chain = lab.authority.sign(&csr, Duration::ZERO, allow).unwrap();
        parse(&ders(&chain)[0]).raw_serial().to_vec()
    };
    assert_ne!(serial(), serial(), "same key, same serial");
}

// Refusals.

#[test]
fn refuses_an_extra_dns_san() {
    let lab = Lab::new();
    let (csr, _) = csr_with(
        &PKCS_ECDSA_P256_SHA256,
        vec![
            uri(&sleep().to_string()),
            SanType::DnsName(Ia5String::try_from("sleep.default.svc").unwrap()),
        ],
    );
    let err = refused(&lab.authority, &csr);
    assert!(matches!(err, CaError::CsrExtraSan(_)), "{err:?}");
    assert!(
        err.to_string().contains("DNS name \"sleep.default.svc\""),
        "{err}"
    );
}

#[test]
fn refuses_an_ip_san() {
    let lab = Lab::new();
    let (csr, _) = csr_with(
        &PKCS_ECDSA_P256_SHA256,
        vec![
            uri(&sleep().to_string()),
            SanType::IpAddress("10.244.1.2".parse().unwrap()),
        ],
    );
    let err = refused(&lab.authority, &csr);
    assert!(matches!(err, CaError::CsrExtraSan(_)), "{err:?}");
    assert!(err.to_string().contains("IP address 10.244.1.2"), "{err}");
}

#[test]
fn refuses_an_email_san() {
    let lab = Lab::new();
    let (csr, _) = csr_with(
        &PKCS_ECDSA_P256_SHA256,
        vec![
            SanType::Rfc822Name(Ia5String::try_from("ops@example.com").unwrap()),
            uri(&sleep().to_string()),
        ],
    );
    let err = refused(&lab.authority, &csr);
    assert!(err.to_string().contains("email address"), "{err}");
}

#[test]
fn refuses_two_uri_sans() {
    let lab = Lab::new();
    let (csr, _) = csr_with(
        &PKCS_ECDSA_P256_SHA256,
        vec![uri(&sleep().to_string()), uri(&httpbin().to_string())],
    );
    let err = refused(&lab.authority, &csr);
    assert!(matches!(err, CaError::CsrSeveralUris(2)), "{err:?}");
}

#[test]
fn refuses_a_csr_without_san() {
    let lab = Lab::new();
    let (csr, _) = csr_with(&PKCS_ECDSA_P256_SHA256, vec![]);
    let err = refused(&lab.authority, &csr);
    assert!(matches!(err, CaError::CsrNoSan), "{err:?}");
}

#[test]
fn refuses_another_trust_domain() {
    let lab = Lab::new();
    let (csr, _) = csr_for(&id("spiffe://example.org/ns/default/sa/sleep"));
    let err = refused(&lab.authority, &csr);
    assert!(
        matches!(err, CaError::CsrForeignTrustDomain { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("cluster.local"), "{err}");
}

#[test]
fn refuses_uris_that_are_not_workload_spiffe_ids() {
    let lab = Lab::new();
    for bad in [
        "https://sleep.default.svc/",
        "spiffe://cluster.local/sleep",
        "spiffe://cluster.local/ns/default/sa/sleep/extra",
    ] {
        let (csr, _) = csr_with(&PKCS_ECDSA_P256_SHA256, vec![uri(bad)]);
        let err = refused(&lab.authority, &csr);
        assert!(
            matches!(err, CaError::CsrNotSpiffe { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn refuses_weak_rsa_keys() {
    let lab = Lab::new();
    let err = refused(&lab.authority, RSA_1024_CSR);
    assert!(matches!(err, CaError::CsrKey(_)), "{err:?}");
    assert!(err.to_string().contains("RSA of 1024 bits"), "{err}");
}

#[test]
fn refuses_other_key_types() {
    let lab = Lab::new();
    let (ed25519, _) = csr_with(&PKCS_ED25519, vec![uri(&sleep().to_string())]);
    for (csr, named) in [(ed25519.as_str(), "Ed25519"), (P521_CSR, "P-521")] {
        let err = refused(&lab.authority, csr);
        assert!(matches!(err, CaError::CsrKey(_)), "{err:?}");
        assert!(err.to_string().contains(named), "{err}");
    }
}

#[test]
fn refuses_a_tampered_csr() {
    let lab = Lab::new();
    let (csr, _) = csr_for(&sleep());
    // Ask for another identity than the one the requester signed.
    let mut der = pem::parse(&csr).unwrap().contents().to_vec();
    let at = der
        .windows(5)
        .position(|w| w == b"sleep")
        .expect("identity in the CSR");
    der[at + 4] = b'q';
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let err = refused(&lab.authority, &tampered);
    assert!(matches!(err, CaError::CsrSignature(_)), "{err:?}");
}

#[test]
fn refuses_garbage() {
    let lab = Lab::new();
    let (csr, _) = csr_for(&sleep());
    let certificate = fs::read_to_string(lab.path("ca-cert.pem")).unwrap();
    let mut with_trailer = pem::parse(&csr).unwrap().contents().to_vec();
    with_trailer.extend_from_slice(b"trailer");
    let with_trailer = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", with_trailer));
    let garbage_pem =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    for (input, what) in [
        ("", "nothing"),
        ("hello, CA", "no PEM"),
        ("\u{0}\u{7f}\u{fffd}-----BEGIN", "binary junk"),
        (certificate.as_str(), "a certificate"),
        (&format!("{csr}{csr}"), "two CSRs"),
    ] {
        let err = refused(&lab.authority, input);
        assert!(matches!(err, CaError::CsrNotPem(_)), "{what}: {err:?}");
    }
    for (input, what) in [
        (garbage_pem, "garbage DER"),
        (with_trailer.as_str(), "bytes after the request"),
    ] {
        let err = refused(&lab.authority, input);
        assert!(matches!(err, CaError::CsrMalformed(_)), "{what}: {err:?}");
    }
}

#[test]
fn no_damaged_csr_gets_through_or_panics() {
    let lab = Lab::new();
    let (csr, _) = csr_for(&sleep());
    let der = pem::parse(&csr).unwrap().contents().to_vec();
    let encode = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()));
    for len in 0..der.len() {
        refused(&lab.authority, &encode(&der[..len]));
    }
    for at in 0..der.len() {
        let mut flipped = der.clone();
        flipped[at] ^= 0xff;
        refused(&lab.authority, &encode(&flipped));
    }
}

#[test]
fn refuses_oversized_input_before_parsing_it() {
    let lab = Lab::new();
    let huge = "A".repeat(DEFAULT_MAX_CSR_BYTES + 1);
    let err = refused(&lab.authority, &huge);
    assert!(
        matches!(err, CaError::CsrTooLarge { size, max: DEFAULT_MAX_CSR_BYTES } if size == huge.len()),
        "{err:?}"
    );

    let strict = Lab::with_policy(Policy {
        max_csr_bytes: 100,
        ..Policy::new(td())
    });
    let (csr, _) = csr_for(&sleep());
    let err = refused(&strict.authority, &csr);
    assert!(
        matches!(err, CaError::CsrTooLarge { max: 100, .. }),
        "{err:?}"
    );
}

#[test]
fn passes_the_authorization_refusal_through() {
    let lab = Lab::new();
    let (csr, _) = csr_for(&sleep());
    let err = lab
        .authority
        .sign(&csr, Duration::ZERO, |id| {
            Err(format!("{id} does not run on node node-1"))
        })
        .unwrap_err();
    assert!(
        matches!(&err, CaError::Unauthorized { id, .. } if *id == sleep()),
        "{err:?}"
    );
    assert!(!err.is_bad_request());
    assert_eq!(
        err.to_string(),
        "not authorized to obtain spiffe://cluster.local/ns/default/sa/sleep: \
         spiffe://cluster.local/ns/default/sa/sleep does not run on node node-1"
    );
}

// Lifetimes.

/// Signs a CSR asking for `ttl`, and returns the leaf with the time just
/// before signing.
fn leaf_for_ttl(authority: &Authority, ttl: Duration) -> (CertificateDer<'static>, SystemTime) {
    let (csr, _) = csr_for(&sleep());
    let before = SystemTime::now();
    let chain = authority.sign(&csr, ttl, allow).unwrap();
    (ders(&chain).swap_remove(0), before)
}

/// Asserts that `leaf` lives `ttl` from `issued` (give or take the second
/// that certificates round to) and starts a few minutes earlier.
fn assert_lifetime(leaf: &CertificateDer<'_>, issued: SystemTime, ttl: Duration) {
    let slack = Duration::from_secs(2);
    let end = not_after(leaf);
    assert!(
        end + slack >= issued + ttl && end <= issued + ttl + slack,
        "lifetime {:?}, expected {ttl:?}",
        end.duration_since(issued)
    );
    let start = not_before(leaf);
    assert!(start + BACKDATE <= issued + slack && start + BACKDATE + slack >= issued);
}

fn short_policy() -> Policy {
    Policy {
        default_ttl: HOUR,
        max_ttl: 2 * HOUR,
        ..Policy::new(td())
    }
}

#[test]
fn ttl_zero_gets_the_default() {
    let lab = Lab::with_policy(short_policy());
    let (leaf, issued) = leaf_for_ttl(&lab.authority, Duration::ZERO);
    assert_lifetime(&leaf, issued, HOUR);
}

#[test]
fn ttl_above_the_maximum_is_capped() {
    let lab = Lab::with_policy(short_policy());
    let (leaf, issued) = leaf_for_ttl(&lab.authority, 10 * HOUR);
    assert_lifetime(&leaf, issued, 2 * HOUR);
}

#[test]
fn ttl_within_the_maximum_is_granted() {
    let lab = Lab::with_policy(short_policy());
    let (leaf, issued) = leaf_for_ttl(&lab.authority, Duration::from_secs(90));
    assert_lifetime(&leaf, issued, Duration::from_secs(90));
}

#[test]
fn policy_with_zero_lifetimes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy {
        max_ttl: Duration::ZERO,
        ..Policy::new(td())
    };
    let err = Authority::self_signed(dir.path(), policy).unwrap_err();
    assert!(matches!(err, CaError::Policy(_)), "{err:?}");
}

// An organisation's PKI, made with rcgen as its root would be.

struct Root {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn org_root(name: &str) -> Root {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    Root {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// Parameters of an intermediate CA valid from `from` to `until`.
fn intermediate(
    name: &str,
    path_len: u8,
    from: SystemTime,
    until: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    params.not_before = x509_time(from).unwrap();
    params.not_after = x509_time(until).unwrap();
    params
}

/// Writes a CA's certificate chain, key (mode 0600) and roots into `dir`,
/// and returns their paths.
fn write_ca(dir: &Path, chain: &str, key: &KeyPair, roots: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (cert_path, key_path, roots_path) = (
        dir.join("ca-cert.pem"),
        dir.join("ca-key.pem"),
        dir.join("roots.pem"),
    );
    fs::write(&cert_path, chain).unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&roots_path, roots).unwrap();
    (cert_path, key_path, roots_path)
}

fn load_ca(paths: &(PathBuf, PathBuf, PathBuf)) -> Result<Authority, CaError> {
    Authority::load(&paths.0, &paths.1, &paths.2, Policy::new(td()))
}

#[test]
fn leaves_never_outlive_the_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let root = org_root("Example Root");
    let now = SystemTime::now();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ca = intermediate("short-lived", 0, now - HOUR, now + HOUR)
        .signed_by(&key, &root.issuer)
        .unwrap();
    let authority = load_ca(&write_ca(dir.path(), &ca.pem(), &key, &root.pem)).unwrap();

    let (leaf, _) = leaf_for_ttl(&authority, 24 * HOUR);
    assert_eq!(not_after(&leaf), not_after(ca.der()));
    assert_eq!(authority.not_after(), not_after(ca.der()));
}

#[test]
fn intermediates_above_the_signing_certificate_are_passed_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = org_root("Example Root");
    let now = SystemTime::now();
    let issuing_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let issuing_params = intermediate("Example Issuing CA", 1, now - HOUR, now + 10 * HOUR);
    let issuing = issuing_params
        .signed_by(&issuing_key, &root.issuer)
        .unwrap();
    let issuing_ca = Issuer::new(issuing_params, issuing_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ca = intermediate("warren", 0, now - HOUR, now + 20 * HOUR)
        .signed_by(&key, &issuing_ca)
        .unwrap();
    let chain_file = format!("{}{}", ca.pem(), issuing.pem());
    let authority = load_ca(&write_ca(dir.path(), &chain_file, &key, &root.pem)).unwrap();

    let (csr, _) = csr_for(&sleep());
    let chain = authority.sign(&csr, 24 * HOUR, allow).unwrap();
    assert_eq!(chain.len(), 3, "leaf, warren's CA, the issuing CA");
    verify(&chain, authority.roots()).unwrap();
    // Capped by the issuing CA, which expires first.
    assert_eq!(not_after(&ders(&chain)[0]), not_after(issuing.der()));
}

// Loading.

#[test]
fn load_refuses_a_key_others_can_read() {
    let lab = Lab::new();
    let key = lab.path("ca-key.pem");
    for loose in [0o644, 0o640] {
        fs::set_permissions(&key, fs::Permissions::from_mode(loose)).unwrap();
        let err = Authority::load(
            &lab.path("ca-cert.pem"),
            &key,
            &lab.path("root.pem"),
            Policy::new(td()),
        )
        .unwrap_err();
        assert!(
            matches!(err, CaError::KeyPermissions { mode, .. } if mode == loose),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&key.display().to_string()), "{message}");
        assert!(message.contains(&format!("{loose:04o}")), "{message}");
        assert!(message.contains("chmod 600"), "{message}");
    }
}

/// A directory in Istio's plug-in CA layout, from a lab CA: what a mounted
/// `cacerts` Secret holds.
fn cacerts_from(lab: &Lab) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &str, to: &str| fs::copy(lab.path(from), dir.path().join(to)).unwrap();
    copy("ca-cert.pem", cacerts::CA_CERT);
    copy("ca-key.pem", cacerts::CA_KEY);
    copy("root.pem", cacerts::ROOT_CERT);
    let chain = fs::read_to_string(lab.path("ca-cert.pem")).unwrap()
        + &fs::read_to_string(lab.path("root.pem")).unwrap();
    fs::write(dir.path().join(cacerts::CERT_CHAIN), chain).unwrap();
    dir
}

#[test]
fn loads_istios_cacerts_layout() {
    let lab = Lab::new();
    let dir = cacerts_from(&lab);
    let key = dir.path().join(cacerts::CA_KEY);
    // As the kubelet mounts a Secret for a non-root process: 0440, the
    // file's group one of ours (the pod's fsGroup).
    fs::set_permissions(&key, fs::Permissions::from_mode(0o440)).unwrap();
    let authority = Authority::load_cacerts(dir.path(), Policy::new(td())).unwrap();
    assert_eq!(authority.roots().roots(), lab.authority.roots().roots());
    let (csr, _) = csr_for(&sleep());
    let chain = authority.sign(&csr, HOUR, allow).unwrap();
    verify(&chain, authority.roots()).unwrap();

    // Without cert-chain.pem, ca-cert.pem alone.
    fs::remove_file(dir.path().join(cacerts::CERT_CHAIN)).unwrap();
    Authority::load_cacerts(dir.path(), Policy::new(td())).unwrap();
}

#[test]
fn cacerts_keys_are_for_our_group_at_most() {
    let lab = Lab::new();
    let dir = cacerts_from(&lab);
    let key = dir.path().join(cacerts::CA_KEY);
    // Readable by others, or writable by the group: refused.
    for loose in [0o444, 0o460, 0o644] {
        fs::set_permissions(&key, fs::Permissions::from_mode(loose)).unwrap();
        let err = Authority::load_cacerts(dir.path(), Policy::new(td())).unwrap_err();
        assert!(
            matches!(err, CaError::KeyPermissions { mode, .. } if mode == loose),
            "{err:?}"
        );
    }
    // Readable by a group this process is not in: refused.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o440)).unwrap();
    let stranger = (60000..65000)
        .map(nix::unistd::Gid::from_raw)
        .find(|gid| {
            *gid != nix::unistd::getegid()
                && !nix::unistd::getgroups().unwrap_or_default().contains(gid)
        })
        .unwrap();
    nix::unistd::chown(&key, None, Some(stranger)).unwrap();
    let err = Authority::load_cacerts(dir.path(), Policy::new(td())).unwrap_err();
    assert!(matches!(err, CaError::KeyPermissions { .. }), "{err:?}");
    // Files named directly keep the stricter rule.
    nix::unistd::chown(&key, None, Some(nix::unistd::getegid())).unwrap();
    let err = Authority::load(
        &dir.path().join(cacerts::CA_CERT),
        &key,
        &dir.path().join(cacerts::ROOT_CERT),
        Policy::new(td()),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::KeyPermissions { .. }), "{err:?}");
}

#[test]
fn a_cert_chain_must_start_with_the_signing_certificate() {
    let lab = Lab::new();
    let dir = cacerts_from(&lab);
    fs::copy(lab.path("root.pem"), dir.path().join(cacerts::CERT_CHAIN)).unwrap();
    let err = Authority::load_cacerts(dir.path(), Policy::new(td())).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("cert-chain.pem") && message.contains("does not start with"),
        "{message}"
    );
}

#[test]
fn load_refuses_a_key_of_another_certificate() {
    let one = Lab::new();
    let other = Lab::new();
    let err = Authority::load(
        &one.path("ca-cert.pem"),
        &other.path("ca-key.pem"),
        &one.path("root.pem"),
        Policy::new(td()),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
}

#[test]
fn load_refuses_a_certificate_that_is_not_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = org_root("Example Root");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let now = SystemTime::now();
    let mut params = intermediate("not a CA", 0, now - HOUR, now + HOUR);
    params.is_ca = IsCa::ExplicitNoCa;
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    let err = load_ca(&write_ca(dir.path(), &cert.pem(), &key, &root.pem)).unwrap_err();
    assert!(matches!(err, CaError::NotCa { .. }), "{err:?}");
    assert!(err.to_string().contains("CA:FALSE"), "{err}");
}

#[test]
fn load_refuses_an_expired_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let root = org_root("Example Root");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let now = SystemTime::now();
    let cert = intermediate("expired", 0, now - 2 * HOUR, now - HOUR)
        .signed_by(&key, &root.issuer)
        .unwrap();
    let err = load_ca(&write_ca(dir.path(), &cert.pem(), &key, &root.pem)).unwrap_err();
    assert!(matches!(err, CaError::Expired { .. }), "{err:?}");
}

#[test]
fn load_refuses_a_certificate_of_another_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = org_root("Example Root");
    let stranger = org_root("Another Root");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let now = SystemTime::now();
    let cert = intermediate("warren", 0, now - HOUR, now + HOUR)
        .signed_by(&key, &root.issuer)
        .unwrap();
    let err = load_ca(&write_ca(dir.path(), &cert.pem(), &key, &stranger.pem)).unwrap_err();
    assert!(matches!(err, CaError::Untrusted { .. }), "{err:?}");
    assert!(err.to_string().contains("roots.pem"), "{err}");
}

#[test]
fn load_explains_keys_not_in_pkcs8_form() {
    let lab = Lab::new();
    let key = lab.path("ca-key.pem");
    let pkcs8 = pem::parse(fs::read(&key).unwrap()).unwrap();
    let relabelled = pem::encode(&pem::Pem::new("EC PRIVATE KEY", pkcs8.contents()));
    fs::write(&key, relabelled).unwrap();
    let err = Authority::load(
        &lab.path("ca-cert.pem"),
        &key,
        &lab.path("root.pem"),
        Policy::new(td()),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::BadKey { .. }), "{err:?}");
    assert!(err.to_string().contains("openssl pkcs8 -topk8"), "{err}");
}

#[test]
fn debug_output_leaves_the_key_out() {
    let lab = Lab::new();
    let shown = format!("{:?}", lab.authority);
    let key = fs::read_to_string(lab.path("ca-key.pem")).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!shown.contains(line), "key material in {shown}");
    }
    assert!(
        shown.contains("warren intermediate cluster.local"),
        "{shown}"
    );
}

// The self-signed root.

#[test]
fn self_signed_root_is_made_once_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::self_signed(dir.path(), Policy::new(td())).unwrap();
    assert!(first.is_self_signed());
    assert_eq!(mode(&dir.path().join("root-key.pem")), 0o600);
    let again = Authority::self_signed(dir.path(), Policy::new(td())).unwrap();
    assert_eq!(first.roots().roots(), again.roots().roots());

    let (csr, _) = csr_for(&sleep());
    let chain = again.sign(&csr, Duration::ZERO, allow).unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(ders(&chain)[1], first.roots().roots()[0]);
    verify(&chain, first.roots()).unwrap();
}

#[test]
fn self_signed_root_is_made_from_a_key_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::self_signed(dir.path(), Policy::new(td())).unwrap();
    fs::remove_file(dir.path().join("root.pem")).unwrap();
    let again = Authority::self_signed(dir.path(), Policy::new(td())).unwrap();
    assert_ne!(first.roots().roots(), again.roots().roots());
    let (csr, _) = csr_for(&sleep());
    verify(
        &again.sign(&csr, Duration::ZERO, allow).unwrap(),
        again.roots(),
    )
    .unwrap();
}

#[test]
fn self_signed_root_is_made_once_by_processes_racing_to_make_it() {
    let dir = tempfile::tempdir().unwrap();
    let racers = 8;
    let start = Arc::new(std::sync::Barrier::new(racers));
    let roots: Vec<TrustBundle> = (0..racers)
        .map(|_| {
            let (dir, start) = (dir.path().to_owned(), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                Authority::self_signed(&dir, Policy::new(td()))
                    .unwrap()
                    .roots()
                    .clone()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|racer| racer.join().unwrap())
        .collect();
    assert!(roots.iter().all(|r| r.roots() == roots[0].roots()));
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2, "temporary files left behind: {left:?}");
}

#[test]
fn an_expired_self_signed_root_says_how_to_replace_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = init::root_params("old", &key, 0, HOUR).unwrap();
    let now = SystemTime::now();
    params.not_before = x509_time(now - 3 * HOUR).unwrap();
    params.not_after = x509_time(now - HOUR).unwrap();
    let key_path = dir.path().join("root-key.pem");
    fs::write(&key_path, key.serialize_pem()).unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(
        dir.path().join("root.pem"),
        params.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let err = Authority::self_signed(dir.path(), Policy::new(td())).unwrap_err();
    assert!(matches!(err, CaError::SelfSignedExpired { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("root.pem"), "{message}");
    assert!(
        message.contains("delete it and its key to make a new one"),
        "{message}"
    );
}

// `warren-ca init`.

#[test]
fn lab_output_loads_and_signs() {
    let dir = tempfile::tempdir().unwrap();
    let summary = init::lab(dir.path(), &td()).unwrap();
    let path = |name| dir.path().join(name);
    assert_eq!(mode(&path("root-key.pem")), 0o600);
    assert_eq!(mode(&path("ca-key.pem")), 0o600);
    let serve = format!(
        "warren-ca serve --ca-cert {} --ca-key {} --roots {}",
        path("ca-cert.pem").display(),
        path("ca-key.pem").display(),
        path("root.pem").display()
    );
    assert!(summary.contains(&serve), "{summary}");

    let authority = Authority::load(
        &path("ca-cert.pem"),
        &path("ca-key.pem"),
        &path("root.pem"),
        Policy::new(td()),
    )
    .unwrap();
    assert!(!authority.is_self_signed());
    let (csr, _) = csr_for(&sleep());
    let chain = authority.sign(&csr, Duration::ZERO, allow).unwrap();
    let roots = TrustBundle::from_pem_file(&path("root.pem")).unwrap();
    verify(&chain, &roots).unwrap();
}

#[test]
fn lab_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    init::lab(dir.path(), &td()).unwrap();
    let key_before = fs::read(dir.path().join("ca-key.pem")).unwrap();
    let err = init::lab(dir.path(), &td()).unwrap_err();
    let CaError::Exists(paths) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(paths.len(), 4, "{err}");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
    assert_eq!(fs::read(dir.path().join("ca-key.pem")).unwrap(), key_before);
}

#[test]
fn csr_asks_for_an_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let summary = init::csr(dir.path(), &td()).unwrap();
    assert_eq!(mode(&dir.path().join("ca-key.pem")), 0o600);
    assert!(summary.contains(OPENSSL_SIGNING_SCRIPT), "{summary}");
    assert!(summary.contains("warren-ca serve --ca-cert"), "{summary}");

    let pem = fs::read_to_string(dir.path().join("ca.csr")).unwrap();
    let der = pem::parse(&pem).unwrap().contents().to_vec();
    let (_, csr) =
        <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(&der)
            .unwrap();
    csr.verify_signature().unwrap();
    assert_eq!(
        csr.certification_request_info.subject.to_string(),
        "O=warren, CN=warren intermediate cluster.local"
    );
    let key =
        KeyPair::from_pem(&fs::read_to_string(dir.path().join("ca-key.pem")).unwrap()).unwrap();
    assert_eq!(
        csr.certification_request_info.subject_pki.raw,
        key.subject_public_key_info().as_slice()
    );
    let request = CertificateSigningRequestParams::from_pem(&pem).unwrap();
    assert_eq!(
        request.params.is_ca,
        IsCa::Ca(BasicConstraints::Constrained(0))
    );
    assert_eq!(
        request.params.key_usages,
        [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
    );

    if !openssl_available() {
        eprintln!("openssl not found: not checking that it reads the CSR");
        return;
    }
    let out = Command::new("openssl")
        .args(["req", "-in", "ca.csr", "-noout", "-text", "-verify"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("O = warren, CN = warren intermediate cluster.local"),
        "{text}"
    );
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
}

#[test]
fn csr_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    init::csr(dir.path(), &td()).unwrap();
    let key_before = fs::read(dir.path().join("ca-key.pem")).unwrap();
    let err = init::csr(dir.path(), &td()).unwrap_err();
    assert!(
        matches!(&err, CaError::Exists(paths) if paths.len() == 2),
        "{err:?}"
    );
    assert_eq!(fs::read(dir.path().join("ca-key.pem")).unwrap(), key_before);

    // The key alone is enough to refuse: it is what must never be lost.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ca-key.pem"), "precious").unwrap();
    let err = init::csr(dir.path(), &td()).unwrap_err();
    assert!(
        matches!(&err, CaError::Exists(paths) if paths.len() == 1),
        "{err:?}"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("ca-key.pem")).unwrap(),
        "precious"
    );
}

/// The "plug in your organisation's CA" path, with rcgen as the PKI.
#[test]
fn organisation_root_signs_the_csr() {
    let dir = tempfile::tempdir().unwrap();
    init::csr(dir.path(), &td()).unwrap();
    let root = org_root("Example Corp Root");

    let mut request = CertificateSigningRequestParams::from_pem(
        &fs::read_to_string(dir.path().join("ca.csr")).unwrap(),
    )
    .unwrap();
    let now = SystemTime::now();
    request.params.not_before = x509_time(now - HOUR).unwrap();
    request.params.not_after = x509_time(now + 365 * 24 * HOUR).unwrap();
    request.params.use_authority_key_identifier_extension = true;
    let signed = request.signed_by(&root.issuer).unwrap();
    fs::write(dir.path().join("ca-cert.pem"), signed.pem()).unwrap();
    fs::write(dir.path().join("root.pem"), &root.pem).unwrap();

    assert_loads_and_signs_for(dir.path(), &root.pem);
}

/// The same with the OpenSSL commands `init::csr` prints, run as printed.
#[test]
fn organisation_root_signs_the_csr_with_the_printed_openssl_command() {
    if !openssl_available() {
        eprintln!("openssl not found: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    init::csr(dir.path(), &td()).unwrap();
    let root = org_root("Example Corp Root");
    fs::write(dir.path().join("root.pem"), &root.pem).unwrap();
    fs::write(
        dir.path().join("root-key.pem"),
        root.issuer.key().serialize_pem(),
    )
    .unwrap();

    let out = Command::new("sh")
        .args(["-c", OPENSSL_SIGNING_SCRIPT])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_loads_and_signs_for(dir.path(), &root.pem);
}

/// Loads the CA in `dir` as `init::csr` told the user to run it, signs a
/// workload certificate and checks it chains to `root`.
fn assert_loads_and_signs_for(dir: &Path, root: &str) {
    let authority = Authority::load(
        &dir.join("ca-cert.pem"),
        &dir.join("ca-key.pem"),
        &dir.join("root.pem"),
        Policy::new(td()),
    )
    .unwrap();
    assert!(!authority.is_self_signed());
    let (csr, key) = csr_for(&sleep());
    let chain = authority.sign(&csr, Duration::ZERO, allow).unwrap();
    assert_eq!(chain.len(), 2);
    verify(&chain, &TrustBundle::from_pem(root.as_bytes()).unwrap()).unwrap();
    let cert =
        WorkloadCertificate::from_pem(chain.concat().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap();
    assert_eq!(cert.identity(), &sleep());
}

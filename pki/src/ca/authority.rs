//! The signing CA: its certificate and key, checked once at load, and the
//! issuing of workload certificates.

use std::{
    fmt, fs, iter,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    string::Ia5String,
};
use rustls::{
    RootCertStore,
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use x509_parser::certificate::X509Certificate;

use super::{
    BACKDATE, CaError, Policy, cacerts, csr,
    files::{self, KEY_MODE, KeyReaders, PUBLIC_MODE},
    init, names, system_time, x509_time,
};
use crate::{identity::SpiffeId, tls::TrustBundle};

/// How long the self-signed root lives: long, as it is for labs, and
/// replacing it means replacing every workload's trust.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// The signing CA: an intermediate certificate and its key (normally), or a
/// self-signed root (only when asked for explicitly: labs and tests).
///
/// Debug output names the certificate, never the key.
pub struct Authority {
    policy: Policy,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then any intermediates above it: what every
    /// workload gets after its own certificate, to chain up to a root.
    chain: Vec<CertificateDer<'static>>,
    /// Where that chain is valid; leaves stay inside it.
    not_before: SystemTime,
    not_after: SystemTime,
    roots: TrustBundle,
    self_signed: bool,
    subject: String,
}

impl Authority {
    /// Loads the signing certificate (PEM: the CA's certificate first, then
    /// any intermediates between it and the root), its key (PEM, PKCS#8) and
    /// the root bundle to publish.
    ///
    /// Refuses a key file readable by group or others, a key that is not the
    /// certificate's, a certificate that is not a CA, is expired or not yet
    /// valid, and one that does not chain to a root of the bundle. The last
    /// is checked the way workloads will check it: by signing a throwaway
    /// certificate and verifying it against the bundle.
    pub fn load(cert: &Path, key: &Path, roots: &Path, policy: Policy) -> Result<Self, CaError> {
        Self::load_with(cert, key, roots, policy, KeyReaders::Owner)
    }

    /// Loads the signing material from a directory in Istio's plug-in CA
    /// layout ([`cacerts`]), as a mounted `cacerts` Secret has it: the chain
    /// from `cert-chain.pem` (which must start with `ca-cert.pem`'s
    /// certificate; `ca-cert.pem` alone if there is none), the key from
    /// `ca-key.pem`, the roots from `root-cert.pem`. With the checks of
    /// [`load`](Self::load), except that the key may also be readable by the
    /// file's group if this process is in it (how Kubernetes mounts a Secret
    /// for a non-root process).
    pub fn load_cacerts(dir: &Path, policy: Policy) -> Result<Self, CaError> {
        let cert = dir.join(cacerts::CA_CERT);
        let chain = dir.join(cacerts::CERT_CHAIN);
        let chain = if chain.exists() {
            let signing = files::read_certificates(&cert)?;
            let listed = files::read_certificates(&chain)?;
            if listed[0] != signing[0] {
                return Err(CaError::BadCertificate {
                    path: chain,
                    reason: format!(
                        "does not start with the certificate of {}; it must list {} first, then \
                         every certificate above it up to the root",
                        cacerts::CA_CERT,
                        cacerts::CA_CERT
                    ),
                });
            }
            chain
        } else {
            cert
        };
        Self::load_with(
            &chain,
            &dir.join(cacerts::CA_KEY),
            &dir.join(cacerts::ROOT_CERT),
            policy,
            KeyReaders::OwnerAndOwnGroup,
        )
    }

    fn load_with(
        cert: &Path,
        key: &Path,
        roots: &Path,
        policy: Policy,
        readers: KeyReaders,
    ) -> Result<Self, CaError> {
        policy.check()?;
        let key_pair = load_key(key, readers)?;
        let chain = files::read_certificates(cert)?;
        // Never empty: `read_certificates` refuses a file without any.
        let signing_cert = &chain[0];
        let signing = check_signing_certificate(cert, key, signing_cert, &key_pair)?;
        let (not_before, not_after) = validity_of_chain(cert, &chain)?;
        let bundle = read_roots(roots)?;
        let issuer = Issuer::from_ca_cert_der(signing_cert, key_pair).map_err(|e| {
            CaError::BadCertificate {
                path: cert.to_owned(),
                reason: format!("cannot sign with it: {e}"),
            }
        })?;
        let authority = Self {
            policy,
            issuer,
            chain,
            not_before,
            not_after,
            roots: bundle,
            self_signed: signing.self_signed,
            subject: signing.subject,
        };
        authority.self_test().map_err(|reason| CaError::Untrusted {
            cert: cert.to_owned(),
            roots: roots.to_owned(),
            reason,
        })?;
        Ok(authority)
    }

    /// A self-signed root that signs workload certificates directly, for
    /// labs and tests: made in `dir` on first use (`root.pem`, and
    /// `root-key.pem` with mode 0600) and loaded from there afterwards, with
    /// the checks of [`load`](Self::load). [`is_self_signed`](Self::is_self_signed)
    /// is then true, so that callers can warn.
    ///
    /// Several processes may share `dir` and start together (the agents of a
    /// lab sharing a development CA), so they may race to make the root. Each
    /// file is written under a temporary name and published only if no file
    /// has that name yet; a loser uses the winner's file. The key is
    /// published first and the certificate made from whichever key won, so
    /// whoever wins the certificate, certificate and key match; and a run
    /// that died between the two leaves a key that the next one certifies.
    pub fn self_signed(dir: &Path, policy: Policy) -> Result<Self, CaError> {
        policy.check()?;
        files::create_dir(dir)?;
        let cert = dir.join(names::ROOT_CERT);
        let key = dir.join(names::ROOT_KEY);
        if !key.exists() {
            let new = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            files::publish(&key, new.serialize_pem().as_bytes(), KEY_MODE)?;
        }
        if !cert.exists() {
            let key_pair = load_key(&key, KeyReaders::Owner)?;
            let name = format!("warren self-signed CA {}", policy.trust_domain);
            let params = init::root_params(&name, &key_pair, 0, SELF_SIGNED_VALIDITY)?;
            let root = params.self_signed(&key_pair)?;
            files::publish(&cert, root.pem().as_bytes(), PUBLIC_MODE)?;
        }
        Self::load(&cert, &key, &cert, policy).map_err(|error| match error {
            // Replacing it is the fix, which the message says.
            CaError::Expired { path, not_after } => CaError::SelfSignedExpired { path, not_after },
            other => other,
        })
    }

    /// Whether the CA signs with a self-signed root rather than as an
    /// intermediate: fine for a lab, a warning sign anywhere else.
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }

    /// The roots that workloads must trust.
    pub fn roots(&self) -> &TrustBundle {
        &self.roots
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// When the signing certificate (or one above it) expires: no leaf
    /// outlives it, so the CA must be given a new one before then.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Validates a PEM CSR strictly (see [`CaError`]'s `Csr*` variants), asks
    /// `authorize` whether the requester may have the identity it asks for,
    /// and issues a certificate for it.
    ///
    /// The certificate carries the CSR's public key and its SPIFFE ID as the
    /// only SAN; the rest is the CA's: serverAuth and clientAuth, not a CA,
    /// backdated a few minutes for clock skew, and valid for
    /// `requested_ttl` (zero: the policy's default; capped at its maximum)
    /// but never past the signing certificate.
    ///
    /// Returns the chain as PEM certificates, leaf first, ending at the
    /// signing certificate.
    pub fn sign(
        &self,
        csr_pem: &str,
        requested_ttl: Duration,
        authorize: impl FnOnce(&SpiffeId) -> Result<(), String>,
    ) -> Result<Vec<String>, CaError> {
        let request = csr::validate(csr_pem, &self.policy)?;
        authorize(&request.id).map_err(|reason| CaError::Unauthorized {
            id: request.id.clone(),
            reason,
        })?;
        let ttl = self.policy.ttl(requested_ttl);
        let leaf = self.issue(
            &request.key,
            request.key.is_rsa(),
            &request.id.to_string(),
            ttl,
        )?;
        Ok(iter::once(&leaf).chain(&self.chain).map(to_pem).collect())
    }

    /// The signing certificate, then any intermediates above it.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A credential whose identity `uri` the caller has decided on: for one
    /// of warren's own parts (a node, the CA service), or a workload of the
    /// agent's development CA. A fresh P-256 key made here, and its
    /// certificate, as [`sign`](Self::sign) makes them, valid `ttl` (never
    /// past the signing certificate). No CSR and no policy: this is the CA's
    /// operator acting.
    pub fn issue_credential(&self, uri: &str, ttl: Duration) -> Result<Credential, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.issue(&key, false, uri, ttl)?;
        Ok(self.credential(leaf, key))
    }

    /// Tests only: a credential with any SANs (none, several, not SPIFFE
    /// IDs), valid exactly from `not_before` to `not_after`, which may lie in
    /// the past or outside the signing certificate's validity: certificates
    /// that peers must refuse. Otherwise made as every leaf is.
    #[cfg(feature = "testing")]
    pub fn issue_unchecked(
        &self,
        subject_alt_names: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Credential, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.sign_leaf(&key, false, subject_alt_names, not_before, not_after)?;
        Ok(self.credential(leaf, key))
    }

    fn credential(&self, leaf: CertificateDer<'static>, key: KeyPair) -> Credential {
        Credential {
            chain: iter::once(leaf).chain(self.chain.iter().cloned()).collect(),
            key,
        }
    }

    /// A leaf for `uri` valid `ttl` from now: backdated a few minutes, and
    /// kept within the signing certificate's validity.
    fn issue(
        &self,
        key: &impl PublicKeyData,
        rsa: bool,
        uri: &str,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(CaError::IssuerExpired);
        }
        let not_before = now
            .checked_sub(BACKDATE)
            .unwrap_or(now)
            .max(self.not_before);
        let not_after = now
            .checked_add(ttl)
            .map_or(self.not_after, |end| end.min(self.not_after));
        let san = SanType::URI(Ia5String::try_from(uri)?);
        self.sign_leaf(key, rsa, vec![san], not_before, not_after)
    }

    /// The one place leaves are made: what a leaf is, whoever asked for it.
    fn sign_leaf(
        &self,
        key: &impl PublicKeyData,
        rsa: bool,
        subject_alt_names: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let mut params = CertificateParams::default();
        // Like Istio's workload certificates: an empty subject, the identity
        // only in the URI SAN (which rcgen then marks critical, as RFC 5280
        // asks of a certificate without a subject).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if rsa {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        // rcgen's default serial is a hash of the key, which would repeat
        // whenever a workload renews with the same key.
        params.serial_number = Some(random_serial());
        params.not_before = x509_time(not_before)?;
        params.not_after = x509_time(not_after)?;
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }

    /// Signs a throwaway certificate and verifies it as peers will, as a
    /// server and as a client: proves that key, chain and roots fit together
    /// before any workload depends on them. Says why they do not.
    fn self_test(&self) -> Result<(), String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let id = SpiffeId::new(self.policy.trust_domain.clone(), "warren-ca", "self-test")
            .map_err(|e| e.to_string())?;
        let leaf = self
            .issue(&key, false, &id.to_string(), Duration::from_secs(60))
            .map_err(|e| e.to_string())?;

        let mut store = RootCertStore::empty();
        for root in self.roots.roots() {
            store.add(root.clone()).map_err(|e| e.to_string())?;
        }
        let store = Arc::new(store);
        let provider = Arc::new(ring::default_provider());
        let now = UnixTime::now();
        let parsed = ParsedCertificate::try_from(&leaf).map_err(|e| e.to_string())?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &store,
            &self.chain,
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| e.to_string())?;
        WebPkiClientVerifier::builder_with_provider(store, provider)
            .build()
            .map_err(|e| e.to_string())?
            .verify_client_cert(&leaf, &self.chain, now)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A certificate chain (leaf first, ending at the signing certificate) and
/// its private key. Debug output leaves the key out.
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
}

impl Credential {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }

    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(to_pem).collect()
    }

    /// The private key as PEM (PKCS#8), for writing to a 0600 file.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("subject", &self.subject)
            .field("self_signed", &self.self_signed)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.roots().len())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What `load` learnt of the signing certificate.
struct SigningCertificate {
    subject: String,
    self_signed: bool,
}

fn check_signing_certificate(
    cert_path: &Path,
    key_path: &Path,
    cert: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<SigningCertificate, CaError> {
    let x509 = parse(cert_path, cert)?;
    let bad = |e: x509_parser::error::X509Error| CaError::BadCertificate {
        path: cert_path.to_owned(),
        reason: e.to_string(),
    };
    let not_ca = |reason| CaError::NotCa {
        path: cert_path.to_owned(),
        reason,
    };
    match x509.basic_constraints().map_err(bad)? {
        Some(constraints) if constraints.value.ca => {}
        Some(_) => return Err(not_ca("its basicConstraints say CA:FALSE")),
        None => return Err(not_ca("it has no basicConstraints extension")),
    }
    if let Some(usage) = x509.key_usage().map_err(bad)?
        && !usage.value.key_cert_sign()
    {
        return Err(not_ca("its key usage does not include keyCertSign"));
    }
    let validity = x509.validity();
    let now = SystemTime::now();
    if system_time(validity.not_before.timestamp()).is_none_or(|start| now < start) {
        return Err(CaError::NotYetValid {
            path: cert_path.to_owned(),
            not_before: validity.not_before.to_string(),
        });
    }
    if system_time(validity.not_after.timestamp()).is_none_or(|end| now >= end) {
        return Err(CaError::Expired {
            path: cert_path.to_owned(),
            not_after: validity.not_after.to_string(),
        });
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Ok(SigningCertificate {
        subject: x509.subject().to_string(),
        self_signed: x509.subject().as_raw() == x509.issuer().as_raw(),
    })
}

/// The span in which every certificate of the chain is valid.
fn validity_of_chain(
    path: &Path,
    chain: &[CertificateDer<'_>],
) -> Result<(SystemTime, SystemTime), CaError> {
    let mut window: Option<(SystemTime, SystemTime)> = None;
    for cert in chain {
        let x509 = parse(path, cert)?;
        let validity = x509.validity();
        let out_of_range = || CaError::BadCertificate {
            path: path.to_owned(),
            reason: format!("the validity of {} is out of range", x509.subject()),
        };
        let from = system_time(validity.not_before.timestamp()).ok_or_else(out_of_range)?;
        let until = system_time(validity.not_after.timestamp()).ok_or_else(out_of_range)?;
        window = Some(match window {
            None => (from, until),
            Some((start, end)) => (start.max(from), end.min(until)),
        });
    }
    window.ok_or_else(|| CaError::BadCertificate {
        path: path.to_owned(),
        reason: "no certificate".into(),
    })
}

fn parse<'a>(path: &Path, cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_rest, x509)| x509)
        .map_err(|e| CaError::BadCertificate {
            path: path.to_owned(),
            reason: format!("cannot parse the certificate: {e}"),
        })
}

fn load_key(path: &Path, readers: KeyReaders) -> Result<KeyPair, CaError> {
    let der = files::read_private_key(path, readers)?;
    KeyPair::try_from(&der).map_err(|e| CaError::BadKey {
        path: path.to_owned(),
        reason: unusable_key(&der, e),
    })
}

fn read_roots(path: &Path) -> Result<TrustBundle, CaError> {
    let pem = fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    TrustBundle::from_pem(&pem).map_err(|source| CaError::Roots {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Why rcgen could not use a key, with the fix for the common case: ring
/// reads only PKCS#8, while OpenSSL often writes SEC1 or PKCS#1.
fn unusable_key(key: &PrivateKeyDer<'_>, error: rcgen::Error) -> String {
    match key {
        PrivateKeyDer::Pkcs8(_) => {
            format!("{error} (supported: ECDSA P-256 or P-384, Ed25519, RSA of 2048 bits or more)")
        }
        _ => "it is not in PKCS#8 form (\"BEGIN PRIVATE KEY\"); convert it with \
              `openssl pkcs8 -topk8 -nocrypt -in <key> -out <new key>`"
            .into(),
    }
}

/// 16 random bytes, positive and non-zero as RFC 5280 asks.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A certificate as PEM, with LF line endings.
pub fn to_pem(der: &CertificateDer<'_>) -> String {
    let block = pem::Pem::new("CERTIFICATE", der.to_vec());
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

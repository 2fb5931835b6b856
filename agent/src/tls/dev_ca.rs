//! The development CA: a self-signed root kept on disk and shared by every
//! agent pointed at the same directory, so their workloads trust each other
//! without a real CA.

use std::{
    fmt, fs,
    future::{self, Future},
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use time::OffsetDateTime;

use super::{
    CertificateSource, TlsError, TrustBundle, WorkloadCertificate,
    certs::{certificates_from_pem, validity_of},
    provider::provider,
};
use crate::identity::SpiffeId;

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root-key.pem";
/// Workload certificates live a day, as Istio's do by default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Certificates start a little in the past, so that a peer whose clock runs
/// behind ours does not find them not yet valid.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The development CA. Issues ECDSA P-256 workload certificates whose only
/// SAN is the workload's SPIFFE ID.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    bundle: TrustBundle,
    validity: Duration,
}

impl DevCa {
    /// Loads the root in `dir` (`root.pem`, `root-key.pem`), creating it first
    /// if there is none.
    ///
    /// Agents starting together may race to create it. Each file is written
    /// to a temporary file and then published without replacing an existing
    /// one; the loser of a race reads the winner's file instead. The key is
    /// published first and the certificate is made from whichever key won, so
    /// whoever wins the certificate race, certificate and key match, and a
    /// creator that died between the two steps leaves a key the next one uses.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let key_path = dir.join(ROOT_KEY);
        let cert_path = dir.join(ROOT_CERT);

        let key_pem = match read_if_exists(&key_path)? {
            Some(pem) => pem,
            None => {
                let mine = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?.serialize_pem();
                publish(&key_path, mine.as_bytes(), 0o600)?
            }
        };
        warn_if_readable_by_others(&key_path);
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|source| TlsError::Pem {
                what: "private key",
                source,
            })
            .map_err(in_file(&key_path))?;
        let key = KeyPair::try_from(&key_der)
            .map_err(TlsError::from)
            .map_err(in_file(&key_path))?;

        let cert_pem = match read_if_exists(&cert_path)? {
            Some(pem) => pem,
            None => {
                let mine = root_params(&key)?.self_signed(&key)?.pem();
                publish(&cert_path, mine.as_bytes(), 0o644)?
            }
        };
        let root = certificates_from_pem(&cert_pem, "development CA root")
            .map_err(in_file(&cert_path))?
            .swap_remove(0);
        let (_, not_after) = validity_of(&root).map_err(in_file(&cert_path))?;
        if not_after <= SystemTime::now() {
            return Err(TlsError::RootExpired { path: cert_path });
        }
        // A key left over from another root would sign certificates that
        // nobody trusts: refuse the pair now rather than at every handshake.
        CertifiedKey::from_der(vec![root.clone()], key_der, &provider())
            .map_err(TlsError::Key)
            .map_err(in_file(&cert_path))?;

        let issuer = Issuer::from_ca_cert_der(&root, key)?;
        let bundle = TrustBundle::from_roots(vec![root.clone()])?;
        Ok(Self {
            issuer,
            root,
            bundle,
            validity: DEFAULT_VALIDITY,
        })
    }

    /// How long issued certificates are valid (default: 24 hours).
    pub fn with_validity(self, validity: Duration) -> Self {
        Self { validity, ..self }
    }

    /// A fresh certificate and key for `id`, valid from shortly before now.
    pub fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, TlsError> {
        let now = SystemTime::now();
        let not_after = now
            .checked_add(self.validity)
            .ok_or(TlsError::Validity("it ends too far in the future"))?;
        self.issue_with(id, now - BACKDATE, not_after)
    }

    /// A certificate for `id` valid exactly from `not_before` to `not_after`,
    /// which may lie in the past: tests use it to make expired certificates.
    pub fn issue_with(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, TlsError> {
        let uri = Ia5String::try_from(id.to_string())?;
        let (cert, key) = self.sign_leaf(vec![SanType::URI(uri)], not_before, not_after)?;
        WorkloadCertificate::new(vec![cert], key)
    }

    /// Signs a leaf with any SANs, which lets tests make certificates that
    /// carry no SPIFFE ID, or several.
    pub(super) fn sign_leaf(
        &self,
        subject_alt_names: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        if not_after <= not_before {
            return Err(TlsError::Validity("it ends before it starts"));
        }
        let mut params = CertificateParams::default();
        // Like Istio's workload certificates: an empty subject, identity only
        // in the URI SAN (which rcgen then marks critical, as RFC 5280 asks).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = x509_time(not_before)?;
        params.not_after = x509_time(not_after)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), key.into()))
    }

    /// The CA's root, as a bundle.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl CertificateSource for DevCa {
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>> {
        // Signing takes well under a millisecond: not worth a blocking thread.
        Box::pin(future::ready(self.issue(id)))
    }
}

fn root_params(key: &KeyPair) -> Result<CertificateParams, TlsError> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "warren");
    // Named after its key, so that a certificate from another development CA
    // fails as "unknown issuer", not as a bad signature from a namesake.
    let key_id: String = key.public_key_raw()[1..9]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    name.push(
        DnType::CommonName,
        format!("warren development CA {key_id}"),
    );
    params.distinguished_name = name;
    // Signs workload certificates directly, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = x509_time(now - BACKDATE)?;
    params.not_after = x509_time(now + ROOT_VALIDITY)?;
    Ok(params)
}

fn x509_time(time: SystemTime) -> Result<OffsetDateTime, TlsError> {
    super::x509_time::to_x509(time).ok_or(TlsError::Validity(
        "a date is outside what certificates can hold",
    ))
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match fs::read(path) {
        Ok(contents) => Ok(Some(contents)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates `path` with `contents` unless it exists by now, and returns what
/// the file holds afterwards: ours, or that of whoever created it first.
fn publish(path: &Path, contents: &[u8], mode: u32) -> Result<Vec<u8>, TlsError> {
    let write_error = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    if crate::files::create_new(path, contents, mode).map_err(write_error)? {
        Ok(contents.to_vec())
    } else {
        read_if_exists(path)?
            .ok_or_else(|| write_error(io::Error::other("it existed a moment ago and is gone now")))
    }
}

fn warn_if_readable_by_others(key_path: &Path) {
    if let Ok(meta) = fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %key_path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "development CA key is readable by other users",
        );
    }
}

fn in_file(path: &Path) -> impl Fn(TlsError) -> TlsError + '_ {
    move |source| TlsError::CaFile {
        path: PathBuf::from(path),
        source: Box::new(source),
    }
}

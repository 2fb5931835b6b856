//! The CA's signing core: validates certificate signing requests strictly and
//! signs workload certificates with an intermediate CA's key.
//!
//! The CA is normally an intermediate of the organisation's existing root: its
//! certificate and key come from files ([`Authority::load`]), made either by
//! `warren-ca init` for a lab ([`init::lab`]) or by the organisation's PKI
//! from a CSR ([`init::csr`]). A self-signed root that signs directly exists
//! only for labs and tests, and only when asked for ([`Authority::self_signed`]):
//! `warren-ca serve --self-signed`, and the agent's development CA.
//!
//! What a workload gets is decided here, never by the CSR: the CSR contributes
//! its public key and the one SPIFFE ID it asks for; everything else in the
//! certificate (usages, lifetime, no CA rights) is the CA's policy. Whether
//! the requester may have that identity (node authorization) is decided by the
//! caller, through the `authorize` argument of [`Authority::sign`].
//!
//! The signing core does not log: the caller logs refusals, with the reasons
//! these errors give. No error or `Debug` output contains a private key.
//!
//! Around it: `warren-ca` serves it as Istio's certificate API to nodes
//! authenticated over mutual TLS ([`crate::transport`]).

mod authority;
mod csr;
pub(crate) mod files;
pub mod init;

#[cfg(test)]
mod tests;

use std::{
    io,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use time::OffsetDateTime;

pub use authority::{Authority, Credential, to_pem};

use crate::{
    identity::{IdentityError, SpiffeId, TrustDomain},
    tls::{TlsError, TrustBundle, x509_time::from_x509 as system_time},
};

/// Workload certificates live a day by default, as Istio's do.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A CSR for one identity is well under 2 KiB, even with an RSA 4096 key.
pub const DEFAULT_MAX_CSR_BYTES: usize = 16 * 1024;
/// Certificates start a little in the past, so that a peer whose clock runs
/// behind ours does not find them not yet valid.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Policy for what the CA signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Only identities of this trust domain are signed.
    pub trust_domain: TrustDomain,
    /// Longer requested lifetimes are shortened to this.
    pub max_ttl: Duration,
    /// The lifetime when the request names none (zero).
    pub default_ttl: Duration,
    /// Larger CSRs are refused before they are parsed.
    pub max_csr_bytes: usize,
}

impl Policy {
    /// The defaults: a day's lifetime at most and by default, 16 KiB CSRs.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            max_ttl: DEFAULT_TTL,
            default_ttl: DEFAULT_TTL,
            max_csr_bytes: DEFAULT_MAX_CSR_BYTES,
        }
    }

    fn check(&self) -> Result<(), CaError> {
        if self.max_ttl.is_zero() || self.default_ttl.is_zero() {
            return Err(CaError::Policy(
                "certificate lifetimes must be longer than zero",
            ));
        }
        if self.max_csr_bytes == 0 {
            return Err(CaError::Policy("the CSR size limit must be above zero"));
        }
        Ok(())
    }

    /// The lifetime to give a certificate: zero asks for the default, and
    /// asking for more than the maximum gets the maximum, as Istio does,
    /// rather than a refusal.
    fn ttl(&self, requested: Duration) -> Duration {
        let wanted = if requested.is_zero() {
            self.default_ttl
        } else {
            requested
        };
        wanted.min(self.max_ttl)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    // Refusals of a request: the requester's fault (see `is_bad_request`).
    #[error("CSR is {size} bytes, more than the {max} allowed")]
    CsrTooLarge { size: usize, max: usize },
    #[error("CSR is not PEM: {0}")]
    CsrNotPem(String),
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    CsrMalformed(String),
    #[error("CSR's signature does not verify: {0}")]
    CsrSignature(String),
    #[error(
        "CSR's key is not accepted: {0}; use ECDSA P-256 or P-384, or RSA of 2048 bits or more"
    )]
    CsrKey(String),
    #[error("CSR has no subject alternative name; it must have exactly one spiffe:// URI")]
    CsrNoSan,
    #[error("CSR asks for {0}; a workload certificate carries only its one spiffe:// URI")]
    CsrExtraSan(String),
    #[error("CSR has {0} URI SANs; a workload certificate carries exactly one")]
    CsrSeveralUris(usize),
    #[error(
        "CSR's URI {uri:?} is not a workload SPIFFE ID: {}",
        spiffe_problem(reason)
    )]
    CsrNotSpiffe { uri: String, reason: IdentityError },
    #[error("CSR asks for {id}, which is not in this CA's trust domain {expected}")]
    CsrForeignTrustDomain { id: SpiffeId, expected: TrustDomain },
    #[error("not authorized to obtain {id}: {reason}")]
    Unauthorized { id: SpiffeId, reason: String },

    // The CA's own files and state.
    #[error(
        "private key {} is readable by group or others (mode {mode:04o}); run `chmod 600 {}` \
         (a mounted Secret: defaultMode 0400, or 0440 with the pod's fsGroup)",
        path.display(),
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{}: cannot use this private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("CA key {} is not the key of certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: not a CA certificate: {reason}", path.display())]
    NotCa { path: PathBuf, reason: &'static str },
    #[error("{}: certificate expired on {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error(
        "self-signed root {} expired on {not_after}; delete it and its key to make a new one",
        path.display()
    )]
    SelfSignedExpired { path: PathBuf, not_after: String },
    #[error("{}: certificate is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error(
        "{} does not chain to a root in {}: {reason}",
        cert.display(),
        roots.display()
    )]
    Untrusted {
        cert: PathBuf,
        roots: PathBuf,
        reason: String,
    },
    #[error("the CA's signing certificate has expired; it needs a new one")]
    IssuerExpired,
    #[error("root bundle {}: {source}", path.display())]
    Roots {
        path: PathBuf,
        source: Box<TlsError>,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "refusing to overwrite {}: move {} away or choose another directory",
        list(.0),
        if .0.len() == 1 { "it" } else { "them" }
    )]
    Exists(Vec<PathBuf>),
    #[error("invalid CA policy: {0}")]
    Policy(&'static str),
    #[error("the system clock is outside what certificates can hold")]
    Clock,
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl CaError {
    /// Whether the request itself was at fault (a bad CSR), rather than the
    /// requester's rights or the CA: a service answers these as invalid
    /// arguments.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Self::CsrTooLarge { .. }
                | Self::CsrNotPem(_)
                | Self::CsrMalformed(_)
                | Self::CsrSignature(_)
                | Self::CsrKey(_)
                | Self::CsrNoSan
                | Self::CsrExtraSan(_)
                | Self::CsrSeveralUris(_)
                | Self::CsrNotSpiffe { .. }
                | Self::CsrForeignTrustDomain { .. }
        )
    }
}

/// What is wrong with a URI that was meant to be a SPIFFE ID, without
/// repeating the URI, which the message already names.
fn spiffe_problem(error: &IdentityError) -> String {
    match error {
        IdentityError::Shape(_) => {
            "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>".into()
        }
        other => other.to_string(),
    }
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// A time as certificates hold it: whole seconds.
fn x509_time(time: SystemTime) -> Result<OffsetDateTime, CaError> {
    crate::tls::x509_time::to_x509(time).ok_or(CaError::Clock)
}

/// The file names `init` writes and `Authority::self_signed` uses.
mod names {
    pub const ROOT_CERT: &str = "root.pem";
    pub const ROOT_KEY: &str = "root-key.pem";
    pub const CA_CERT: &str = "ca-cert.pem";
    pub const CA_KEY: &str = "ca-key.pem";
    pub const CA_CSR: &str = "ca.csr";
}

/// Istio's plug-in CA layout: the keys of the `cacerts` Secret that istiod
/// reads, so that a cluster which plugged its PKI into Istio reuses it.
pub mod cacerts {
    /// The signing (intermediate) certificate.
    pub const CA_CERT: &str = "ca-cert.pem";
    /// Its private key.
    pub const CA_KEY: &str = "ca-key.pem";
    /// The roots workloads trust.
    pub const ROOT_CERT: &str = "root-cert.pem";
    /// `ca-cert.pem`, then every certificate above it up to the root.
    pub const CERT_CHAIN: &str = "cert-chain.pem";
}

/// Writes a node credential into `dir` as `warren-ca node-credential` does:
/// the chain, the key (mode 0600) and the roots. Refuses to replace an
/// existing credential unless `replace` (renewing it), and then replaces each
/// file in one step.
pub fn write_node_credential(
    dir: &std::path::Path,
    credential: &Credential,
    roots: &TrustBundle,
    replace: bool,
) -> Result<(), CaError> {
    use crate::transport::{NODE_CERT, NODE_KEY, NODE_ROOTS};
    let roots_pem: String = roots.roots().iter().map(authority::to_pem).collect();
    let contents = [
        (NODE_KEY, credential.key_pem(), files::KEY_MODE),
        (NODE_CERT, credential.chain_pem(), files::PUBLIC_MODE),
        (NODE_ROOTS, roots_pem, files::PUBLIC_MODE),
    ]
    .map(|(name, text, mode)| (dir.join(name), text, mode));
    files::create_dir(dir)?;
    if !replace {
        let existing: Vec<&std::path::Path> = contents.iter().map(|(p, ..)| p.as_path()).collect();
        files::refuse_existing(&existing)?;
    }
    for (path, text, mode) in &contents {
        if replace {
            files::replace(path, text.as_bytes(), *mode).map_err(|source| CaError::Write {
                path: path.clone(),
                source,
            })?;
        } else {
            files::write_new(path, text.as_bytes(), *mode)?;
        }
    }
    Ok(())
}

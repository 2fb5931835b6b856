//! Strict validation of a workload's certificate signing request.
//!
//! A CSR comes from the network, so every step here treats it as hostile:
//! its size is bounded before it is parsed, each problem has an error that
//! names it, and nothing panics.

use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, PublicKeyData};
use x509_parser::{
    certification_request::X509CertificationRequest,
    cri_attributes::ParsedCriAttribute,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_DSA, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384,
        OID_NIST_EC_P521, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED448, OID_SIG_ED25519,
        OID_X509_EXT_SUBJECT_ALT_NAME,
    },
    prelude::FromDer,
    x509::SubjectPublicKeyInfo,
};

use super::{CaError, Policy};
use crate::identity::SpiffeId;

/// RSA keys below this are refused (NIST SP 800-57: 112-bit security).
const MIN_RSA_BITS: usize = 2048;
/// And above this too: ring verifies nothing larger, and huge keys only cost
/// the CA time.
const MAX_RSA_BITS: usize = 8192;

/// What a valid CSR asks for.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) id: SpiffeId,
    pub(super) key: RequestKey,
}

/// The public key of a CSR, as the certificate will carry it.
#[derive(Debug)]
pub(super) struct RequestKey {
    /// The subjectPublicKey bits: an EC point or an RSAPublicKey.
    bits: Vec<u8>,
    /// Only picks the key's algorithm identifier in the certificate: what
    /// signs the certificate is the CA's own key.
    algorithm: &'static rcgen::SignatureAlgorithm,
    is_rsa: bool,
}

impl RequestKey {
    /// RSA keys may also encipher (TLS 1.2's RSA key exchange).
    pub(super) fn is_rsa(&self) -> bool {
        self.is_rsa
    }
}

impl PublicKeyData for RequestKey {
    fn der_bytes(&self) -> &[u8] {
        &self.bits
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// Checks a PEM CSR against `policy`. The order is the order in which each
/// check becomes possible; the key is checked before the signature so that a
/// weak key is reported as weak, not as a signature that cannot be verified.
pub(super) fn validate(csr_pem: &str, policy: &Policy) -> Result<Request, CaError> {
    if csr_pem.len() > policy.max_csr_bytes {
        return Err(CaError::CsrTooLarge {
            size: csr_pem.len(),
            max: policy.max_csr_bytes,
        });
    }
    let der = der_of(csr_pem)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CaError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::CsrMalformed(format!(
            "{} bytes follow the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CaError::CsrMalformed(format!(
            "version {} (only version 1, encoded 0, exists)",
            info.version.0
        )));
    }
    let key = check_key(&info.subject_pki)?;
    csr.verify_signature()
        .map_err(|e| CaError::CsrSignature(e.to_string()))?;
    let id = requested_identity(&csr, policy)?;
    Ok(Request { id, key })
}

/// The DER inside exactly one `CERTIFICATE REQUEST` PEM block.
fn der_of(csr_pem: &str) -> Result<Vec<u8>, CaError> {
    let blocks = pem::parse_many(csr_pem).map_err(|e| CaError::CsrNotPem(e.to_string()))?;
    let [block] = blocks.as_slice() else {
        return Err(CaError::CsrNotPem(format!(
            "expected one CERTIFICATE REQUEST block, found {} PEM blocks",
            blocks.len()
        )));
    };
    // "NEW CERTIFICATE REQUEST" is what older OpenSSL versions wrote.
    if !matches!(
        block.tag(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(CaError::CsrNotPem(format!(
            "expected a CERTIFICATE REQUEST block, found {}",
            block.tag()
        )));
    }
    Ok(block.contents().to_vec())
}

fn check_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<RequestKey, CaError> {
    let refuse = |why: String| Err(CaError::CsrKey(why));
    let algorithm = &spki.algorithm.algorithm;
    let bits = &spki.subject_public_key.data;
    let key = if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let (name, signature_algorithm, point_len) = match curve {
            Some(c) if c == OID_EC_P256 => ("P-256", &PKCS_ECDSA_P256_SHA256, 65),
            Some(c) if c == OID_NIST_EC_P384 => ("P-384", &PKCS_ECDSA_P384_SHA384, 97),
            Some(c) if c == OID_NIST_EC_P521 => return refuse("it is on curve P-521".into()),
            Some(c) => return refuse(format!("it is on elliptic curve {c}")),
            None => return refuse("it is an EC key without a named curve".into()),
        };
        // Uncompressed points only: what every TLS stack sends, and all
        // that ring can verify.
        if bits.len() != point_len || bits.first() != Some(&4) {
            return refuse(format!("its {name} point is not an uncompressed point"));
        }
        RequestKey {
            bits: bits.to_vec(),
            algorithm: signature_algorithm,
            is_rsa: false,
        }
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let size = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => bit_length(rsa.modulus),
            _ => return refuse("its RSA public key cannot be parsed".into()),
        };
        if size < MIN_RSA_BITS {
            return refuse(format!("it is RSA of {size} bits"));
        }
        if size > MAX_RSA_BITS {
            return refuse(format!(
                "it is RSA of {size} bits, more than {MAX_RSA_BITS}"
            ));
        }
        RequestKey {
            bits: bits.to_vec(),
            algorithm: &PKCS_RSA_SHA256,
            is_rsa: true,
        }
    } else if *algorithm == OID_SIG_ED25519 {
        return refuse("it is Ed25519".into());
    } else if *algorithm == OID_SIG_ED448 {
        return refuse("it is Ed448".into());
    } else if *algorithm == OID_KEY_TYPE_DSA {
        return refuse("it is DSA".into());
    } else {
        return refuse(format!("its algorithm is {algorithm}"));
    };
    // The certificate re-encodes the key; insist that the result is the very
    // key the CSR carries (and proved possession of), byte for byte, rather
    // than trusting that unusual encodings survive.
    if key.subject_public_key_info() != spki.raw {
        return refuse("its SubjectPublicKeyInfo is not in the standard encoding".into());
    }
    Ok(key)
}

/// Bits in a big-endian unsigned integer, ignoring leading zeros.
fn bit_length(big_endian: &[u8]) -> usize {
    let significant = big_endian
        .iter()
        .position(|&b| b != 0)
        .map_or(&[][..], |first| &big_endian[first..]);
    match significant.first() {
        Some(top) => significant.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    }
}

/// The one SPIFFE ID the CSR asks for, from its subject alternative names.
/// Anything else there is refused rather than dropped: a requester that
/// asks for a DNS name expects it, and should hear that it will not get it.
fn requested_identity(
    csr: &X509CertificationRequest<'_>,
    policy: &Policy,
) -> Result<SpiffeId, CaError> {
    let mut names = Vec::new();
    // Every extension request, and every SAN extension in each: a second one
    // must not smuggle in names the first one lacks.
    for attribute in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(request) = attribute.parsed_attribute() else {
            continue;
        };
        for extension in &request.extensions {
            if extension.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
                continue;
            }
            match extension.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter());
                }
                _ => {
                    return Err(CaError::CsrMalformed(
                        "its subject alternative name extension cannot be parsed".into(),
                    ));
                }
            }
        }
    }

    let mut uris = Vec::new();
    for name in names {
        match name {
            GeneralName::URI(uri) => uris.push(*uri),
            other => return Err(CaError::CsrExtraSan(describe(other))),
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(CaError::CsrNoSan),
        [one] => *one,
        several => return Err(CaError::CsrSeveralUris(several.len())),
    };
    let id: SpiffeId = uri.parse().map_err(|reason| CaError::CsrNotSpiffe {
        uri: uri.to_owned(),
        reason,
    })?;
    if id.trust_domain() != &policy.trust_domain {
        return Err(CaError::CsrForeignTrustDomain {
            id,
            expected: policy.trust_domain.clone(),
        });
    }
    Ok(id)
}

/// A SAN as a person would name it in an error message.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("DNS name {dns:?}"),
        GeneralName::IPAddress(bytes) => match ip_address(bytes) {
            Some(ip) => format!("IP address {ip}"),
            None => "a malformed IP address".into(),
        },
        GeneralName::RFC822Name(email) => format!("email address {email:?}"),
        GeneralName::URI(uri) => format!("URI {uri:?}"),
        GeneralName::DirectoryName(dn) => format!("directory name {dn}"),
        GeneralName::OtherName(oid, _) => format!("an otherName of type {oid}"),
        GeneralName::RegisteredID(oid) => format!("registered ID {oid}"),
        GeneralName::X400Address(_) => "an X.400 address".into(),
        GeneralName::EDIPartyName(_) => "an EDI party name".into(),
        GeneralName::Invalid(..) => "a malformed name".into(),
    }
}

fn ip_address(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(Into::into),
        16 => <[u8; 16]>::try_from(bytes).ok().map(Into::into),
        _ => None,
    }
}

//! `warren-ca init`: the files a newcomer needs to run a CA, and what to do
//! with them next. Never overwrites anything: existing keys may already sign
//! certificates that workloads rely on.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use super::{
    BACKDATE, CaError,
    files::{self, KEY_MODE, PUBLIC_MODE},
    names, x509_time,
};
use crate::identity::TrustDomain;

const LAB_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Shorter than the root: re-running `init` for a lab is cheap.
const LAB_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What a PKI administrator pastes, in a directory holding `ca.csr` and
/// their root's `root.pem` and `root-key.pem`, to sign the CSR as warren's
/// intermediate. Kept verbatim (a heredoc's end marker must start its line)
/// and run as is by the tests.
pub(super) const OPENSSL_SIGNING_SCRIPT: &str = "\
cat > warren-intermediate.ext <<'EOF'
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
openssl x509 -req -in ca.csr -CA root.pem -CAkey root-key.pem -CAcreateserial \\
  -days 365 -sha256 -extfile warren-intermediate.ext -out ca-cert.pem
";

/// The last steps, the same for both paths.
const AGENTS: &str = "
Then, for each node, make its credential (same --ca-cert, --ca-key and --roots):
  warren-ca node-credential ... --node <node name> --out /etc/warren/nodes/<node name>
copy that directory to the node as /etc/warren/node (keep node-key.pem mode 0600),
and give the node's agent, instead of devCaDir:
  ca:
    address: <CA host>:15012
    nodeCredential: /etc/warren/node
";

/// For a lab: a root, and an intermediate signed by it that the CA signs
/// with, written to `dir` (`root.pem`, `root-key.pem`, `ca-cert.pem`,
/// `ca-key.pem`; keys with mode 0600). Returns what was made and what to run
/// next.
pub fn lab(dir: &Path, trust_domain: &TrustDomain) -> Result<String, CaError> {
    let root_cert_path = dir.join(names::ROOT_CERT);
    let root_key_path = dir.join(names::ROOT_KEY);
    let ca_cert_path = dir.join(names::CA_CERT);
    let ca_key_path = dir.join(names::CA_KEY);
    files::create_dir(dir)?;
    files::refuse_existing(&[&root_cert_path, &root_key_path, &ca_cert_path, &ca_key_path])?;

    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // Path length 1: the root signs intermediates, which sign workloads.
    let name = format!("warren lab root {trust_domain}");
    let root_params = root_params(&name, &root_key, 1, LAB_ROOT_VALIDITY)?;
    let root_not_after = root_params.not_after;
    let root_cert = root_params.self_signed(&root_key)?;
    let root = Issuer::new(root_params, root_key);

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = intermediate_params(trust_domain);
    valid_for(&mut params, LAB_INTERMEDIATE_VALIDITY)?;
    params.use_authority_key_identifier_extension = true;
    let ca_not_after = params.not_after;
    let ca_cert = params.signed_by(&ca_key, &root)?;

    // Keys first, so that a run failing half-way never leaves a certificate
    // whose key is lost; the next run names whatever this one left behind.
    files::write_new(
        &root_key_path,
        root.key().serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    files::write_new(&ca_key_path, ca_key.serialize_pem().as_bytes(), KEY_MODE)?;
    files::write_new(&root_cert_path, root_cert.pem().as_bytes(), PUBLIC_MODE)?;
    files::write_new(&ca_cert_path, ca_cert.pem().as_bytes(), PUBLIC_MODE)?;

    Ok(format!(
        "Made a lab CA for trust domain {trust_domain} in {dir}:\n\
         \x20 root.pem      the root (valid until {root_until}): what every workload trusts\n\
         \x20 root-key.pem  the root's key (mode 0600): keep it offline; only needed to sign\n\
         \x20               another intermediate\n\
         \x20 ca-cert.pem   the intermediate the CA signs with, signed by the root\n\
         \x20               (valid until {ca_until})\n\
         \x20 ca-key.pem    the intermediate's key (mode 0600): the CA's signing key\n\
         \n\
         Next, start the CA (mesh.yaml: the workloads, in the agent's config format):\n\
         \x20 warren-ca serve --ca-cert {ca_cert} --ca-key {ca_key} --roots {root_cert} \\\n\
         \x20   --workloads mesh.yaml\n\
         {AGENTS}\
         \n\
         This root is for a lab. In production, make only the intermediate's key and a CSR\n\
         (the CSR mode of `warren-ca init`) and have your organisation's PKI sign it.\n",
        dir = dir.display(),
        root_cert = root_cert_path.display(),
        ca_cert = ca_cert_path.display(),
        ca_key = ca_key_path.display(),
        root_until = day(root_not_after),
        ca_until = day(ca_not_after),
    ))
}

/// For an organisation's PKI: the intermediate's key (`ca-key.pem`, mode
/// 0600), which never leaves `dir`, and a CSR for it (`ca.csr`) for their
/// root to sign. Returns the next steps, including an OpenSSL command their
/// PKI administrator can paste, and what to pass to `warren-ca serve`.
pub fn csr(dir: &Path, trust_domain: &TrustDomain) -> Result<String, CaError> {
    let key_path = dir.join(names::CA_KEY);
    let csr_path = dir.join(names::CA_CSR);
    let cert_path = dir.join(names::CA_CERT);
    let roots_path = dir.join(names::ROOT_CERT);
    files::create_dir(dir)?;
    files::refuse_existing(&[&key_path, &csr_path])?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = intermediate_params(trust_domain)
        .serialize_request(&key)?
        .pem()?;
    files::write_new(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    files::write_new(&csr_path, csr.as_bytes(), PUBLIC_MODE)?;

    Ok(format!(
        "Made the key and a certificate signing request for warren's intermediate CA,\n\
         trust domain {trust_domain}, in {dir}:\n\
         \x20 ca-key.pem  the intermediate's key (mode 0600): it stays here\n\
         \x20 ca.csr      the CSR: subject \"O=warren, CN=warren intermediate {trust_domain}\",\n\
         \x20             CA:true with pathlen:0, key usage keyCertSign and cRLSign\n\
         \n\
         Next:\n\
         1. Send ca.csr to your PKI administrator, to sign as an intermediate CA with the\n\
         \x20  extensions below. With OpenSSL, in a directory holding ca.csr and the root's\n\
         \x20  certificate and key as root.pem and root-key.pem (or change those names), paste:\n\
         \n\
         {OPENSSL_SIGNING_SCRIPT}\n\
         \x20  If an intermediate CA of theirs signs it rather than the root itself, put that\n\
         \x20  CA's certificate after the new one in ca-cert.pem.\n\
         2. Save the signed certificate as {cert}, and the root certificate(s)\n\
         \x20  that workloads must trust as {roots}.\n\
         3. Start the CA. It first checks that the certificate is a CA, matches the key\n\
         \x20  and chains to the roots:\n\
         \x20  warren-ca serve --ca-cert {cert} --ca-key {key} --roots {roots} \\\n\
         \x20    --workloads mesh.yaml\n\
         {AGENTS}",
        dir = dir.display(),
        key = key_path.display(),
        cert = cert_path.display(),
        roots = roots_path.display(),
    ))
}

/// A root's parameters: valid from a few minutes ago for `validity`, with
/// `path_len` CAs allowed below it. Roots are named after their key too, so
/// that a certificate from another root of the same name fails as "unknown
/// issuer", not as a bad signature.
pub(super) fn root_params(
    name: &str,
    key: &KeyPair,
    path_len: u8,
    validity: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let key_id: String = params
        .key_identifier(key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = warren_name(&format!("{name} {key_id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    valid_for(&mut params, validity)?;
    Ok(params)
}

fn valid_for(params: &mut CertificateParams, validity: Duration) -> Result<(), CaError> {
    let now = SystemTime::now();
    params.not_before = x509_time(now - BACKDATE)?;
    params.not_after = x509_time(now + validity)?;
    Ok(())
}

/// What the intermediate asks to be (lab and CSR alike); its validity is the
/// signer's choice.
fn intermediate_params(trust_domain: &TrustDomain) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = warren_name(&format!("warren intermediate {trust_domain}"));
    // Signs workload certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn warren_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "warren");
    name.push(DnType::CommonName, common_name);
    name
}

/// A date for people: `2035-05-01 UTC`.
fn day(time: OffsetDateTime) -> String {
    format!("{} UTC", time.date())
}

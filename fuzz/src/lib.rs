//! What the fuzz targets share: harnesses for the parsers reachable from
//! outside their crates (the CA's CSR validation, the CNI protocol, the CA's
//! reading of an agent config), and the seeds the targets generate. The
//! agent's own harnesses are `warren_agent::fuzzing`.

use std::{fs, path::PathBuf};

/// The CNI plugin's side of the spec, which lives in its binary crate.
#[allow(dead_code)]
#[path = "../../cni/src/spec.rs"]
mod cni_spec;

/// Where a target writes the seeds it generates: `cargo xtask fuzz` sets it
/// to the target's corpus, which libFuzzer reads after the target's
/// initialisation.
pub const SEEDS_ENV: &str = "WARREN_FUZZ_SEEDS";

/// Writes `seeds` (name, input) to `$WARREN_FUZZ_SEEDS`, if it is set.
pub fn write_seeds(seeds: impl FnOnce() -> Vec<(String, Vec<u8>)>) {
    let Some(dir) = std::env::var_os(SEEDS_ENV).map(PathBuf::from) else {
        return;
    };
    fs::create_dir_all(&dir).expect("the seed directory");
    for (name, input) in seeds() {
        fs::write(dir.join(format!("seed-{name}")), input).expect("a seed");
    }
}

/// The CA's signing of a workload's CSR (`Authority::sign`).
pub mod csr {
    use std::{
        cell::RefCell,
        sync::OnceLock,
        time::{Duration, SystemTime},
    };

    use rcgen::{CertificateParams, KeyPair, SanType, SigningKey, string::Ia5String};
    use warren_pki::{
        ca::{Authority, CaError, Policy, init},
        identity::{SpiffeId, TrustDomain},
    };
    use x509_parser::{extensions::GeneralName, prelude::FromDer};

    const TRUST_DOMAIN: &str = "cluster.local";

    /// A development CA, made once per process as `warren-ca init lab`
    /// makes one, loaded as `warren-ca serve` loads it.
    fn authority() -> &'static Authority {
        static AUTHORITY: OnceLock<(tempfile::TempDir, Authority)> = OnceLock::new();
        let (_, authority) = AUTHORITY.get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let trust_domain = TrustDomain::new(TRUST_DOMAIN).expect("a trust domain");
            init::lab(dir.path(), &trust_domain).expect("a lab CA");
            let authority = Authority::load(
                &dir.path().join("ca-cert.pem"),
                &dir.path().join("ca-key.pem"),
                &dir.path().join("root.pem"),
                Policy::new(trust_domain),
            )
            .expect("the lab CA loads");
            (dir, authority)
        });
        authority
    }

    /// Asks the CA to sign `data` as a PEM CSR, as a node's request
    /// carries it. What must hold: a refusal is the requester's fault
    /// (`is_bad_request`), never the CA's; what is signed is a leaf for
    /// exactly the one identity that was authorized, of this trust domain,
    /// carrying the CSR's key.
    pub fn sign_pem(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            sign(text);
        }
    }

    fn sign(csr: &str) {
        let asked: RefCell<Option<SpiffeId>> = RefCell::new(None);
        let signed = authority().sign(csr, Duration::ZERO, |id| {
            *asked.borrow_mut() = Some(id.clone());
            Ok(())
        });
        match signed {
            Ok(chain) => {
                let asked = asked.into_inner().expect("authorization was asked");
                check_leaf(csr, &chain[0], &asked);
            }
            Err(error) => {
                assert!(error.is_bad_request(), "the CA's fault: {error}");
                assert!(!matches!(error, CaError::Unauthorized { .. }), "{error}");
                let _ = error.to_string();
            }
        }
    }

    fn check_leaf(csr: &str, leaf: &str, asked: &SpiffeId) {
        assert_eq!(asked.trust_domain().as_str(), TRUST_DOMAIN);
        let der = pem::parse(leaf).expect("a PEM certificate");
        let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der.contents())
            .expect("the leaf parses");
        let names: Vec<_> = certificate
            .subject_alternative_name()
            .expect("one SAN extension")
            .expect("a SAN extension")
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::URI(uri) => uri.to_string(),
                other => panic!("the leaf carries {other:?}"),
            })
            .collect();
        assert_eq!(names, [asked.to_string()], "the leaf's names");
        let basic = certificate
            .basic_constraints()
            .expect("one basicConstraints");
        assert!(basic.is_none_or(|b| !b.value.ca), "the leaf is a CA");
        assert!(
            certificate.validity().is_valid_at(
                x509_parser::time::ASN1Time::from_timestamp(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .expect("after 1970")
                        .as_secs() as i64
                )
                .expect("now")
            )
        );
        let request = pem::parse(csr).expect("the CSR was PEM");
        let (_, request) = x509_parser::certification_request::X509CertificationRequest::from_der(
            request.contents(),
        )
        .expect("the CSR parsed");
        assert_eq!(
            certificate.public_key().raw,
            request.certification_request_info.subject_pki.raw,
            "the leaf's key is not the CSR's"
        );
    }

    /// A P-256 key for fuzzing only: the requester's key of
    /// [`sign_info`], fixed so that kept inputs stay signed by it.
    const REQUESTER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTnvDRluuE9cgnagZ
WKqiqRrPdRtX3+GcuBtWpO0F9W2hRANCAARVxLr9dJX0XaPT4q7jr1OgkgajbM2r
/liAuNXfYcW/hrQ4a40TifphJsKsrYoNpoLKOPzk6vOYSMbvhg4fHCH6
-----END PRIVATE KEY-----
";

    fn requester() -> &'static KeyPair {
        static KEY: OnceLock<KeyPair> = OnceLock::new();
        KEY.get_or_init(|| KeyPair::from_pem(REQUESTER_KEY).expect("the requester's key"))
    }

    /// ecdsa-with-SHA256, as an AlgorithmIdentifier.
    const ECDSA_SHA256: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];

    /// Signs `data`, a CertificationRequestInfo (DER), with the requester's
    /// key and asks the CA to sign the resulting CSR: the signature checks
    /// out whatever the fuzzer writes, so what follows it (the key and the
    /// names asked for) is fuzzed too. The same checks as [`sign_pem`].
    pub fn sign_info(data: &[u8]) {
        sign(&csr_of(data));
    }

    /// The PEM CSR of `info` signed with the requester's key.
    pub fn csr_of(info: &[u8]) -> String {
        let signature = requester().sign(info).expect("ECDSA signs anything");
        let mut bit_string = vec![0];
        bit_string.extend(signature);
        let mut body = info.to_vec();
        body.extend(ECDSA_SHA256);
        body.extend(tlv(0x03, &bit_string));
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", tlv(0x30, &body)))
    }

    fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = value.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend(value);
        out
    }

    /// The first element of a DER SEQUENCE: a CSR's CertificationRequestInfo.
    fn first_element(der: &[u8]) -> Option<&[u8]> {
        fn header(der: &[u8]) -> Option<(usize, usize)> {
            let first = *der.get(1)?;
            if first < 0x80 {
                return Some((2, first as usize));
            }
            let n = (first & 0x7f) as usize;
            let len = der
                .get(2..2 + n)?
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            Some((2 + n, len))
        }
        let (outer, _) = header(der)?;
        let inner = der.get(outer..)?;
        let (head, len) = header(inner)?;
        inner.get(..head + len)
    }

    fn name_sets() -> Vec<(&'static str, Vec<SanType>)> {
        let uri = |text: &str| SanType::URI(Ia5String::try_from(text).expect("ASCII"));
        let dns = |text: &str| SanType::DnsName(Ia5String::try_from(text).expect("ASCII"));
        let good = "spiffe://cluster.local/ns/default/sa/sleep";
        vec![
            ("spiffe", vec![uri(good)]),
            ("spiffe-and-dns", vec![uri(good), dns("sleep.default.svc")]),
            ("ip", vec![SanType::IpAddress([10, 0, 0, 1].into())]),
            (
                "email",
                vec![SanType::Rfc822Name(
                    Ia5String::try_from("a@example.org").expect("ASCII"),
                )],
            ),
            (
                "two-uris",
                vec![uri(good), uri("spiffe://cluster.local/ns/default/sa/web")],
            ),
            ("no-san", vec![]),
            (
                "foreign",
                vec![uri("spiffe://example.org/ns/default/sa/sleep")],
            ),
            ("not-workload", vec![uri("spiffe://cluster.local/node/n1")]),
            (
                "https",
                vec![uri("https://cluster.local/ns/default/sa/sleep")],
            ),
        ]
    }

    /// Seeds for [`sign_pem`]: CSRs of each key type the CA meets, asking
    /// for the names it must sign or refuse.
    pub fn pem_seeds() -> Vec<(String, Vec<u8>)> {
        let mut seeds = Vec::new();
        for (alg_name, alg) in [
            ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
            ("ed25519", &rcgen::PKCS_ED25519),
        ] {
            let key = KeyPair::generate_for(alg).expect("a key");
            for (names_name, names) in name_sets() {
                let mut params = CertificateParams::default();
                params.subject_alt_names = names;
                let csr = params
                    .serialize_request(&key)
                    .and_then(|r| r.pem())
                    .expect("a CSR");
                seeds.push((format!("{alg_name}-{names_name}"), csr.into_bytes()));
            }
        }
        seeds
    }

    /// Seeds for [`sign_info`]: the CertificationRequestInfo of CSRs made
    /// with the requester's key.
    pub fn info_seeds() -> Vec<(String, Vec<u8>)> {
        name_sets()
            .into_iter()
            .map(|(name, names)| {
                let mut params = CertificateParams::default();
                params.subject_alt_names = names;
                let csr = params.serialize_request(requester()).expect("a CSR");
                let info = first_element(csr.der()).expect("a CertificationRequestInfo");
                (name.to_owned(), info.to_vec())
            })
            .collect()
    }
}

/// The CNI plugin's protocol: what the runtime gives the plugin, what the
/// plugin and the agent tell each other.
pub mod cni {
    use std::path::Path;

    use serde::{Serialize, de::DeserializeOwned};
    use serde_json::Value;
    use warren_cni::{Membership, PodRef, Request, Response, SUPPORTED_VERSIONS};

    use super::cni_spec::{Env, NetConf, version};

    /// `data` as the runtime's network configuration on the plugin's
    /// stdin (ADD, CHECK, VERSION), as `CNI_ARGS`, as a request the agent
    /// reads off its socket, as an answer and a membership file the plugin
    /// reads. What must hold: an accepted configuration is one the plugin
    /// supports, and the result it passes on is JSON at that version;
    /// VERSION always answers; a pod named in `CNI_ARGS` has a namespace and
    /// a name; what either side reads, it writes back the same.
    pub fn protocol(data: &[u8]) {
        if let Ok(conf) = NetConf::parse(data) {
            assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
            assert!(conf.socket.as_deref().is_none_or(Path::is_absolute));
            if let Ok(previous) = conf.previous_result() {
                let _ = previous.ipv4_in(Path::new("/var/run/netns/pod"));
                let output = previous
                    .output(&conf.cni_version)
                    .expect("the result encodes");
                let output: Value = serde_json::from_str(&output).expect("the result is JSON");
                assert_eq!(output["cniVersion"], conf.cni_version.as_str());
            }
        }
        let answer = version(data).expect("VERSION answers");
        let answer: Value = serde_json::from_str(&answer).expect("VERSION's answer is JSON");
        assert!(answer["cniVersion"].is_string());
        if let Ok(text) = std::str::from_utf8(data) {
            let env = Env::from_vars([("CNI_ARGS".to_owned(), text.to_owned())]);
            match env.pod() {
                Ok(Some(pod)) => assert!(!pod.namespace.is_empty() && !pod.name.is_empty()),
                Ok(None) => {}
                Err(error) => {
                    let _: Value = serde_json::from_str(&error.to_json()).expect("JSON");
                }
            }
        }
        round_trip::<Request>(data);
        round_trip::<Response>(data);
        if let Some(membership) = round_trip::<Membership>(data) {
            let pod = PodRef {
                namespace: "default".into(),
                name: "pod".into(),
                uid: Some("uid".into()),
            };
            let _ = membership.must_hold(&pod);
        }
    }

    /// What one side writes of what it read, the other reads the same.
    fn round_trip<T>(data: &[u8]) -> Option<T>
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let read: T = serde_json::from_slice(data).ok()?;
        let mut line = serde_json::to_vec(&read).expect("it encodes");
        line.push(b'\n');
        let again: T = serde_json::from_slice(&line).expect("it reads back");
        assert_eq!(again, read);
        Some(read)
    }
}

/// An agent's config file, read by the CA as a workloads file
/// (`warren-ca serve --workloads`).
pub mod config {
    use std::path::Path;

    use warren_ca::workloads::Workloads;

    /// Whatever config the agent accepts, the CA accepts too, and reads the
    /// same placements of the same trust domain: it must never believe a
    /// node runs an identity the agent does not place there.
    pub fn agent_and_ca(data: &[u8]) {
        let agent = warren_agent::fuzzing::config::parse(data);
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let ca = Workloads::parse(Path::new(warren_agent::fuzzing::config::PATH), text);
        let Some(agent) = agent else {
            return;
        };
        let ca = match ca {
            Ok(ca) => ca,
            Err(error) => panic!("the agent accepts what the CA refuses: {error}"),
        };
        assert_eq!(ca.trust_domain, agent.trust_domain);
        let placed = |identity: String, node: &str| (identity, node.to_owned());
        let by_ca: Vec<_> = ca
            .placements
            .iter()
            .map(|p| placed(p.identity.to_string(), &p.node))
            .collect();
        let by_agent: Vec<_> = agent
            .workloads
            .iter()
            .map(|w| placed(w.identity.to_string(), &w.node))
            .collect();
        assert_eq!(by_ca, by_agent, "placements differ");
    }
}

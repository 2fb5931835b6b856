//! Workload identities: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; and the
//! identities of warren's own parts: nodes
//! (`spiffe://<trust-domain>/warren/node/<node>`, [`NodeId`]) and the CA
//! service (`spiffe://<trust-domain>/warren/ca`, [`ca_service_id`]). Their
//! paths cannot be mistaken for each other, so a node credential is never a
//! workload identity and the reverse.
//!
//! Parsed and validated once, at the edge (config, certificates), so the rest
//! of the agent and the CA handle only well-formed identities.

use std::{fmt, str::FromStr};

/// The trust domain when a config or command names none, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("trust domain {0:?} is invalid: {1}")]
    TrustDomain(String, &'static str),
    #[error("namespace {0:?} is not a valid Kubernetes namespace name: {1}")]
    Namespace(String, &'static str),
    #[error("service account {0:?} is not a valid Kubernetes service account name: {1}")]
    ServiceAccount(String, &'static str),
    #[error(
        "{0:?} is not a workload SPIFFE ID (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    Shape(String),
    #[error("node name {0:?} is not a valid DNS subdomain: {1}")]
    NodeName(String, &'static str),
    #[error("{0:?} is not a node SPIFFE ID (expected spiffe://<trust-domain>/warren/node/<node>)")]
    NodeShape(String),
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let invalid = |why| Err(IdentityError::TrustDomain(name.to_owned(), why));
        if name.is_empty() {
            return invalid("it is empty");
        }
        if name.len() > 255 {
            return invalid("it is longer than 255 characters");
        }
        // The SPIFFE spec's trust domain alphabet.
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return invalid("only lowercase letters, digits, '-', '.' and '_' are allowed");
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity of a workload: who it is, wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        // Namespaces are RFC 1123 labels; service accounts RFC 1123 subdomains.
        check_dns_name(namespace, 63, false)
            .map_err(|why| IdentityError::Namespace(namespace.to_owned(), why))?;
        check_dns_name(service_account, 253, true)
            .map_err(|why| IdentityError::ServiceAccount(service_account.to_owned(), why))?;
        Ok(Self {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || IdentityError::Shape(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(shape)?;
        let (domain, path) = rest.split_once('/').ok_or_else(shape)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Self::new(TrustDomain::new(domain)?, ns, sa)
            }
            _ => Err(shape()),
        }
    }
}

/// The identity of a node's agent towards the CA: which node it is, so the CA
/// can tell which workloads' certificates it may have.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    trust_domain: TrustDomain,
    name: String,
}

impl NodeId {
    /// Node names are Kubernetes node names: RFC 1123 subdomains.
    pub fn new(trust_domain: TrustDomain, name: &str) -> Result<Self, IdentityError> {
        check_dns_name(name, 253, true).map_err(|why| IdentityError::NodeName(name.into(), why))?;
        Ok(Self {
            trust_domain,
            name: name.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The node's name, as workloads' `node` fields name it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/warren/node/{}",
            self.trust_domain, self.name
        )
    }
}

impl FromStr for NodeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || IdentityError::NodeShape(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(shape)?;
        let (domain, path) = rest.split_once('/').ok_or_else(shape)?;
        let name = path.strip_prefix("warren/node/").ok_or_else(shape)?;
        if name.contains('/') {
            return Err(shape());
        }
        Self::new(TrustDomain::new(domain)?, name)
    }
}

/// The URI SAN of the CA service's own TLS certificate, which its clients
/// require.
pub fn ca_service_id(trust_domain: &TrustDomain) -> String {
    format!("spiffe://{trust_domain}/warren/ca")
}

fn check_dns_name(name: &str, max: usize, dots: bool) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > max {
        return Err(if max == 63 {
            "it is longer than 63 characters"
        } else {
            "it is longer than 253 characters"
        });
    }
    let labels: Vec<&str> = if dots {
        name.split('.').collect()
    } else {
        vec![name]
    };
    for label in labels {
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
            return Err("it must start and end with a lowercase letter or digit");
        }
        if !bytes.iter().all(|b| alnum(b) || *b == b'-') {
            return Err(if dots {
                "only lowercase letters, digits, '-' and '.' are allowed"
            } else {
                "only lowercase letters, digits and '-' are allowed"
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn formats_and_parses_back() {
        let id = SpiffeId::new(td(), "default", "sleep").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn service_accounts_may_contain_dots() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b.c-d".parse().unwrap();
        assert_eq!(id.service_account(), "b.c-d");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/-a/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/c",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b..c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_name_the_bad_part() {
        let err = SpiffeId::new(td(), "Default", "sa").unwrap_err();
        assert!(err.to_string().contains("namespace \"Default\""), "{err}");
        let err = TrustDomain::new("exa mple").unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");
    }

    #[test]
    fn node_ids_parse_and_validate() {
        let node = NodeId::new(td(), "node-1.example").unwrap();
        assert_eq!(
            node.to_string(),
            "spiffe://cluster.local/warren/node/node-1.example"
        );
        assert_eq!(node.to_string().parse::<NodeId>().unwrap(), node);
        for bad in [
            "spiffe://cluster.local/warren/node/",
            "spiffe://cluster.local/warren/node/Node1",
            "spiffe://cluster.local/warren/node/a/b",
            "spiffe://cluster.local/warren/ca",
            "spiffe://cluster.local/ns/a/sa/b",
            "http://cluster.local/warren/node/a",
        ] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?} was accepted");
        }
        // A node identity is never a workload identity.
        assert!(node.to_string().parse::<SpiffeId>().is_err());
    }

    #[test]
    fn rejects_overlong_namespace() {
        let long = "a".repeat(64);
        assert!(SpiffeId::new(td(), &long, "sa").is_err());
        assert!(SpiffeId::new(td(), &long[..63], "sa").is_ok());
    }
}

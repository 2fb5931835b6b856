//! The CA reads its workloads file in the agent's config format
//! (`warren-ca serve --workloads`), with a view of its own that does not
//! depend on the agent: one real agent config must give both the same
//! identities on the same nodes.

use std::path::Path;

use warren_agent::config::Config;
use warren_ca::workloads::Workloads;

/// An agent config with every field of the format (see the file).
const AGENT_CONFIG: &str = include_str!("../../ca/testdata/agent-config.yaml");

#[test]
fn the_ca_and_the_agent_read_one_config_alike() {
    let path = Path::new("ca/testdata/agent-config.yaml");
    let agent = Config::parse(path, AGENT_CONFIG).unwrap();
    let ca = Workloads::parse(path, AGENT_CONFIG).unwrap();
    assert_eq!(ca.trust_domain, agent.trust_domain);
    let agent_view: Vec<(String, &str)> = agent
        .workloads
        .iter()
        .map(|w| (w.identity.to_string(), w.node.as_str()))
        .collect();
    let ca_view: Vec<(String, &str)> = ca
        .placements
        .iter()
        .map(|p| (p.identity.to_string(), p.node.as_str()))
        .collect();
    assert_eq!(ca_view, agent_view);
    // The file is not trivially small: local and remote workloads, several
    // nodes, one identity on two nodes.
    assert_eq!(agent_view.len(), 3);
    assert!(agent.workloads.iter().any(|w| w.local.is_some()));
}

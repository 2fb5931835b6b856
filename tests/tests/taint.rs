//! The agent removing the `warren.io/agent-not-ready` taint from its Node,
//! against a real API server (1.20), as the agent's service account bound
//! to the roles of deploy/: the RBAC is checked for real, and the audit log
//! shows that both grants on nodes (`get`, `patch`) are used and nothing is
//! refused.

use std::error::Error as _;

use k8s_openapi::api::core::v1::{Node, NodeSpec, ServiceAccount, Taint};
use kube::api::{Api, ObjectMeta, PostParams};
use warren_agent::kubernetes::taint::{NOT_READY_TAINT, Removed, remove_not_ready_taint};
use warren_tests::{
    audit,
    cluster::RBAC,
    controlplane::{ControlPlane, kubeconfig_client, write_kubeconfig},
    harness::test_lab,
};

const NAMESPACE: &str = "warren-system";
const AGENT: &str = "warren-agent";
const AGENT_USER: &str = "system:serviceaccount:warren-system:warren-agent";
const NODE: &str = "node-1";

fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        value: value.map(str::to_owned),
        effect: effect.into(),
        ..Taint::default()
    }
}

/// The taints a node is registered with: ours between two others.
fn registered_taints() -> Vec<Taint> {
    vec![
        taint("dedicated", Some("mesh"), "NoSchedule"),
        taint(NOT_READY_TAINT, None, "NoSchedule"),
        taint("example.com/maintenance", None, "PreferNoSchedule"),
    ]
}

/// A control plane with the agents' RBAC as deployed, and the Node
/// [`NODE`] registered with [`registered_taints`]; returns its taints as
/// stored.
fn start() -> (warren_tests::Lab, ControlPlane, Vec<Taint>) {
    let lab = test_lab(1, 0);
    let cp = ControlPlane::start(&lab).expect("control plane");
    cp.apply(RBAC).expect("agent RBAC");
    let node = Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(registered_taints()),
            ..NodeSpec::default()
        }),
        ..Node::default()
    };
    let nodes: Api<Node> = Api::all(cp.client());
    let created = cp
        .block_on(nodes.create(&PostParams::default(), &node))
        .expect("creating the Node");
    let stored = taints(&created);
    // The API server may add taints of its own at creation (1.20's
    // TaintNodesByCondition admission adds node.kubernetes.io/not-ready);
    // ours are all there, in order.
    let ours: Vec<&Taint> = stored
        .iter()
        .filter(|t| registered_taints().contains(t))
        .collect();
    assert_eq!(
        ours,
        registered_taints().iter().collect::<Vec<_>>(),
        "the Node as stored"
    );
    (lab, cp, stored)
}

fn taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|spec| spec.taints.clone())
        .unwrap_or_default()
}

fn node_taints(cp: &ControlPlane) -> Vec<Taint> {
    let nodes: Api<Node> = Api::all(cp.client());
    taints(&cp.block_on(nodes.get(NODE)).expect("reading the Node"))
}

/// A client authenticated as the service account `account` in
/// [`NAMESPACE`], with a token from the TokenRequest API.
fn client_as(cp: &ControlPlane, account: &str) -> kube::Client {
    let token = cp
        .service_account_token(NAMESPACE, account)
        .expect("service-account token");
    let kubeconfig = cp.dir().join(format!("{account}.kubeconfig"));
    write_kubeconfig(
        &kubeconfig,
        &cp.url(),
        cp.ca_pem(),
        account,
        &token,
        NAMESPACE,
    )
    .unwrap();
    cp.block_on(kubeconfig_client(&kubeconfig))
        .expect("service-account client")
}

#[test]
fn the_agent_removes_only_its_taint_and_keeps_the_others_in_order() {
    let (_lab, cp, before) = start();
    let agent = client_as(&cp, AGENT);

    let removed = cp
        .block_on(remove_not_ready_taint(&agent, NODE))
        .unwrap_or_else(|e| panic!("removing the taint: {e} ({:?})", e.source()));
    assert_eq!(removed, Removed::Removed);
    let after = node_taints(&cp);
    let expected: Vec<Taint> = before
        .iter()
        .filter(|t| t.key != NOT_READY_TAINT)
        .cloned()
        .collect();
    assert_eq!(after, expected, "the other taints, whole and in order");
    assert_eq!(
        after
            .iter()
            .filter(|t| registered_taints().contains(t))
            .cloned()
            .collect::<Vec<_>>(),
        [
            taint("dedicated", Some("mesh"), "NoSchedule"),
            taint("example.com/maintenance", None, "PreferNoSchedule"),
        ]
    );

    // Again: nothing to do, nothing written.
    let nodes: Api<Node> = Api::all(cp.client());
    let version = |cp: &ControlPlane| {
        cp.block_on(nodes.get(NODE))
            .unwrap()
            .metadata
            .resource_version
    };
    let unchanged = version(&cp);
    assert_eq!(
        cp.block_on(remove_not_ready_taint(&agent, NODE))
            .expect("removing an absent taint"),
        Removed::WasAbsent
    );
    assert_eq!(version(&cp), unchanged, "the Node was written");
    assert_eq!(node_taints(&cp), after);

    // The agent asked for nothing it may not, and used both of its grants
    // on nodes (the rest of its role is for the watches, not run here).
    drop(agent);
    let events = cp.audit_events().expect("audit events");
    assert_eq!(audit::denied(&events, AGENT_USER), Vec::<String>::new());
    let unused = audit::unused_grants(RBAC, &events, AGENT_USER);
    assert!(
        !unused.iter().any(|line| line.contains(" nodes ")),
        "{unused:?}"
    );
    assert!(
        !unused.is_empty(),
        "the watches' grants are counted as unused here"
    );
}

#[test]
fn a_service_account_without_the_grant_is_refused_and_the_taint_stays() {
    let (_lab, cp, before) = start();
    let accounts: Api<ServiceAccount> = Api::namespaced(cp.client(), NAMESPACE);
    let bystander = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("bystander".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    cp.block_on(accounts.create(&PostParams::default(), &bystander))
        .expect("creating the service account");
    let client = client_as(&cp, "bystander");

    let error = cp
        .block_on(remove_not_ready_taint(&client, NODE))
        .expect_err("a service account without the grant");
    assert!(error.forbidden(), "{error:?}");
    let said = error.to_string();
    assert!(
        said.starts_with("get node node-1: forbidden (403)") && said.contains("nodes get/patch"),
        "{said}"
    );
    // The cause says who was refused what, as the API server put it.
    let cause = error.source().expect("the API server's answer").to_string();
    assert!(
        cause.contains("system:serviceaccount:warren-system:bystander")
            && cause.contains("cannot get resource \"nodes\""),
        "{cause}"
    );
    assert_eq!(node_taints(&cp), before, "the Node changed");
}

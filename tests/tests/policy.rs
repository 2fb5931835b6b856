//! Istio policies in the lab: PeerAuthentication and AuthorizationPolicy
//! documents in a directory the agents watch, real clients of several
//! identities, and an unenrolled attacker pod.
//!
//! Node 1: n1p1 is default/sleep, n1p2 is ops/admin, n1p3 is the attacker
//! (not enrolled). Node 2: n2p1 is shop/web (app=web), n2p2 is shop/db
//! (app=db). Servers listen on 8080 (and db on 9090 too).

use std::{fs, net::SocketAddrV4, path::PathBuf, time::Duration};

use warren_tests::{
    Lab, Pod,
    harness::{
        Agent, Call, LogLine, MeshWorkload, PATIENCE, Server, Tool, ended, replace_policies, spray,
        start_agents_with_policies, test_lab,
    },
    lab::files_dir,
};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

struct PolicyMesh {
    lab: Lab,
    sleep: MeshWorkload,
    admin: MeshWorkload,
    web: MeshWorkload,
    db: MeshWorkload,
    agents: Vec<Agent>,
    policies: PathBuf,
}

impl PolicyMesh {
    fn new() -> Self {
        let lab = test_lab(2, 3);
        let sleep = MeshWorkload::new(lab.pod(0, 0), "default", "sleep").label("app", "sleep");
        let admin = MeshWorkload::new(lab.pod(0, 1), "ops", "admin").label("app", "admin");
        let web = MeshWorkload::new(lab.pod(1, 0), "shop", "web").label("app", "web");
        let db = MeshWorkload::new(lab.pod(1, 1), "shop", "db").label("app", "db");
        let dir = files_dir(lab.prefix());
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).unwrap();
        let workloads = [sleep.clone(), admin.clone(), web.clone(), db.clone()];
        let agents = start_agents_with_policies(&lab, &workloads, &policies, &dir.join("agents"));
        Self {
            lab,
            sleep,
            admin,
            web,
            db,
            agents,
            policies,
        }
    }

    /// Not enrolled, on node 1.
    fn attacker(&self) -> Pod {
        self.lab.pod(0, 2).clone()
    }

    /// Replaces the policies with `yaml` (atomically, as config management
    /// does) and waits until both agents have loaded them.
    fn set_policies(&mut self, yaml: &str) {
        replace_policies(&mut self.agents, &self.policies, yaml);
    }
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// One call and whether it must get through.
struct Expect<'a> {
    from: &'a Pod,
    to: (&'a MeshWorkload, u16),
    allowed: bool,
}

#[test]
fn authorization_policies_decide_who_connects() {
    let mut mesh = PolicyMesh::new();
    let mut servers = [
        Server::start(&mesh.web.pod, PORT).unwrap(),
        Server::start(&mesh.db.pod, PORT).unwrap(),
        Server::start(&mesh.db.pod, OTHER_PORT).unwrap(),
    ];
    let dry_run = ap("shop", "deny-all", "{action: DENY, rules: [{}]}").replace(
        "namespace: shop}",
        "namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
    );
    let (sleep, admin, web, db) = (
        mesh.sleep.pod.clone(),
        mesh.admin.pod.clone(),
        mesh.web.clone(),
        mesh.db.clone(),
    );
    let cases: Vec<(&str, String, Vec<Expect<'_>>)> = vec![
        (
            "no policy: everyone in",
            String::new(),
            vec![
                Expect {
                    from: &sleep,
                    to: (&web, PORT),
                    allowed: true,
                },
                Expect {
                    from: &admin,
                    to: (&web, PORT),
                    allowed: true,
                },
            ],
        ),
        (
            "ALLOW sleep's principal on web",
            ap(
                "shop",
                "web-from-sleep",
                "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]}",
            ),
            vec![
                Expect {
                    from: &sleep,
                    to: (&web, PORT),
                    allowed: true,
                },
                Expect {
                    from: &admin,
                    to: (&web, PORT),
                    allowed: false,
                },
                // db has no ALLOW policy: open.
                Expect {
                    from: &admin,
                    to: (&db, PORT),
                    allowed: true,
                },
            ],
        ),
        (
            "DENY namespace ops, mesh-wide",
            ap(
                "istio-system",
                "no-ops",
                "{action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}",
            ),
            vec![
                Expect {
                    from: &admin,
                    to: (&web, PORT),
                    allowed: false,
                },
                Expect {
                    from: &admin,
                    to: (&db, PORT),
                    allowed: false,
                },
                Expect {
                    from: &sleep,
                    to: (&web, PORT),
                    allowed: true,
                },
            ],
        ),
        (
            "an empty ALLOW policy denies all",
            ap("shop", "nothing", "{}"),
            vec![
                Expect {
                    from: &sleep,
                    to: (&web, PORT),
                    allowed: false,
                },
                Expect {
                    from: &admin,
                    to: (&db, PORT),
                    allowed: false,
                },
            ],
        ),
        (
            "ALLOW to one port only",
            ap(
                "shop",
                "db-9090",
                "{selector: {matchLabels: {app: db}}, rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}",
            ),
            vec![
                Expect {
                    from: &sleep,
                    to: (&db, OTHER_PORT),
                    allowed: true,
                },
                Expect {
                    from: &sleep,
                    to: (&db, PORT),
                    allowed: false,
                },
            ],
        ),
        (
            "DENY beats ALLOW",
            ap("shop", "all", "{rules: [{}]}")
                + &ap(
                    "shop",
                    "not-sleep",
                    "{action: DENY, rules: [{from: [{source: {principals: [\"*/sa/sleep\"]}}]}]}",
                ),
            vec![
                Expect {
                    from: &sleep,
                    to: (&web, PORT),
                    allowed: false,
                },
                Expect {
                    from: &admin,
                    to: (&web, PORT),
                    allowed: true,
                },
            ],
        ),
        (
            "AUDIT only logs",
            ap("shop", "audit-all", "{action: AUDIT, rules: [{}]}"),
            vec![Expect {
                from: &sleep,
                to: (&web, PORT),
                allowed: true,
            }],
        ),
        (
            "dry-run DENY only logs",
            dry_run,
            vec![Expect {
                from: &admin,
                to: (&web, PORT),
                allowed: true,
            }],
        ),
        (
            "an invalid policy is refused and fails closed over its namespace",
            ap(
                "shop",
                "typo",
                "{action: DENY, rules: [{from: [{source: {principalz: [x]}}]}]}",
            ) + &ap(
                "default",
                "no-admin",
                "{action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}",
            ),
            vec![
                // shop: everything denied, as the broken policy stands for.
                Expect {
                    from: &sleep,
                    to: (&web, PORT),
                    allowed: false,
                },
                Expect {
                    from: &admin,
                    to: (&db, PORT),
                    allowed: false,
                },
            ],
        ),
    ];

    for (case, yaml, expectations) in &cases {
        mesh.set_policies(yaml);
        for expect in expectations {
            let (workload, port) = expect.to;
            let server = servers
                .iter_mut()
                .find(|s| s.name == workload.pod.name && s.addr.port() == port)
                .unwrap();
            let peer = expect.from.ip.to_string();
            let dst = server.addr.to_string();
            let refusal = |l: &LogLine| {
                l.message() == "HBONE stream refused"
                    && l.0["status"] == 401
                    && l.field("src").split(':').next() == Some(peer.as_str())
                    && l.field("dst") == dst
                    && l.field("reason").starts_with("denied by policy")
            };
            let refusals_before = mesh.agents[1].lines().iter().filter(|l| refusal(l)).count();
            let called = Call::default().run(expect.from, server.addr);
            let what = format!(
                "{case}: {} -> {} port {port}",
                expect.from.name, workload.pod.name
            );
            if expect.allowed {
                called.unwrap_or_else(|e| panic!("{what}: refused: {e:#}"));
                let served = server.next_served().unwrap();
                assert_eq!(served.peer.ip(), expect.from.ip, "{what}");
            } else {
                assert!(called.is_err(), "{what}: got through");
                // The server's agent said why, and the application never saw it.
                mesh.agents[1]
                    .wait_for_count(PATIENCE, refusals_before + 1, refusal)
                    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                assert!(
                    server.saw_nothing(),
                    "{what}: the application saw a connection"
                );
            }
        }
    }

    let agent = &mesh.agents[1];
    let logged = |message: &str| {
        agent
            .lines()
            .iter()
            .any(|l: &LogLine| l.message() == message)
    };
    assert!(logged("AUDIT policy matched"));
    assert!(agent.lines().iter().any(|l| l.message() == "dry-run policy"
        && l.field("result") == "DENY shop/deny-all: would deny"));
    assert!(agent.lines().iter().any(|l| {
        l.message()
            == "policy refused; the workloads it was meant for fail closed, the other policies apply"
            && l.field("error")
                .contains("shop/typo: spec.rules[0].from[0].source.principalz")
    }));
}

#[test]
fn a_disable_destination_is_sent_plaintext() {
    let mut mesh = PolicyMesh::new();
    let mut web = Server::start(&mesh.web.pod, PORT).unwrap();
    let sleep = mesh.sleep.pod.clone();

    Call::default().run(&sleep, web.addr).unwrap();
    web.next_served().unwrap();
    assert_eq!(mesh.agents[0].captures().last().unwrap().path, "hbone");

    mesh.set_policies(&pa(
        "shop",
        "web-plain",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
    ));
    let streams = |mesh: &PolicyMesh| {
        mesh.agents[1]
            .lines()
            .iter()
            .filter(|l| l.message() == "accepted HBONE stream")
            .count()
    };
    let before = streams(&mesh);
    Call::default().run(&sleep, web.addr).unwrap();
    assert_eq!(web.next_served().unwrap().peer.ip(), sleep.ip);
    assert_eq!(
        mesh.agents[0].captures().last().unwrap().path,
        "passthrough"
    );
    assert_eq!(streams(&mesh), before, "web's agent saw a tunnel");

    // Back to the default, PERMISSIVE: HBONE again, for new connections.
    mesh.set_policies("");
    Call::default().run(&sleep, web.addr).unwrap();
    web.next_served().unwrap();
    assert_eq!(mesh.agents[0].captures().last().unwrap().path, "hbone");
}

#[test]
fn mtls_modes_decide_what_plaintext_gets_in() {
    let mut mesh = PolicyMesh::new();
    let mut servers = [
        Server::start(&mesh.web.pod, PORT).unwrap(),
        Server::start(&mesh.db.pod, PORT).unwrap(),
        Server::start(&mesh.db.pod, OTHER_PORT).unwrap(),
    ];
    let (attacker, sleep, web, db) = (
        mesh.attacker(),
        mesh.sleep.pod.clone(),
        mesh.web.clone(),
        mesh.db.clone(),
    );
    let strict_mesh = pa("istio-system", "mesh", "{mtls: {mode: STRICT}}");
    // (case, policies, calls: from, to, port, gets in, handled by the agent)
    type Case<'a> = (&'a str, String, Vec<(&'a Pod, &'a MeshWorkload, u16, bool)>);
    let cases: Vec<Case<'_>> = vec![
        (
            "PERMISSIVE by default: plaintext gets in, through the agent",
            String::new(),
            vec![(&attacker, &web, PORT, true), (&sleep, &web, PORT, true)],
        ),
        (
            "STRICT mesh-wide: plaintext dropped, HBONE in",
            strict_mesh.clone(),
            vec![
                (&attacker, &web, PORT, false),
                (&attacker, &db, OTHER_PORT, false),
                (&sleep, &web, PORT, true),
            ],
        ),
        (
            "a PERMISSIVE namespace under a STRICT mesh",
            strict_mesh.clone() + &pa("shop", "shop", "{mtls: {mode: PERMISSIVE}}"),
            vec![(&attacker, &web, PORT, true)],
        ),
        (
            "a PERMISSIVE workload in a STRICT namespace",
            pa("shop", "shop", "{mtls: {mode: STRICT}}")
                + &pa(
                    "shop",
                    "web",
                    "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}",
                ),
            vec![(&attacker, &web, PORT, true), (&attacker, &db, PORT, false)],
        ),
        (
            "a PERMISSIVE port on a STRICT workload",
            pa(
                "shop",
                "db",
                "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}, portLevelMtls: {\"9090\": {mode: PERMISSIVE}}}",
            ),
            vec![
                (&attacker, &db, OTHER_PORT, true),
                (&attacker, &db, PORT, false),
            ],
        ),
        (
            "PERMISSIVE plaintext is authorized too: no identity, no ALLOW",
            ap(
                "shop",
                "sleep-only",
                "{rules: [{from: [{source: {principals: [\"*/sa/sleep\"]}}]}]}",
            ),
            vec![(&attacker, &web, PORT, false), (&sleep, &web, PORT, true)],
        ),
        (
            "DISABLE: plaintext, through the agent (authorization applies)",
            strict_mesh.clone()
                + &pa(
                    "shop",
                    "web",
                    "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
                ),
            vec![(&attacker, &web, PORT, true), (&sleep, &web, PORT, true)],
        ),
    ];
    for (case, yaml, calls) in &cases {
        mesh.set_policies(yaml);
        for &(from, to, port, gets_in) in calls {
            let server = servers
                .iter_mut()
                .find(|s| s.name == to.pod.name && s.addr.port() == port)
                .unwrap();
            let what = format!("{case}: {} -> {} port {port}", from.name, to.pod.name);
            let plaintext_before = mesh.agents[1]
                .lines()
                .iter()
                .filter(|l| l.message() == "accepted plaintext connection")
                .count();
            let called = Call::quick().run(from, server.addr);
            if gets_in {
                called.unwrap_or_else(|e| panic!("{what}: refused: {e:#}"));
                assert_eq!(server.next_served().unwrap().peer.ip(), from.ip, "{what}");
            } else {
                assert!(called.is_err(), "{what}: got in");
                assert!(
                    server.saw_nothing(),
                    "{what}: the application saw a connection"
                );
            }
            // Plaintext to a PERMISSIVE pod goes through its agent.
            let through_agent = mesh.agents[1]
                .lines()
                .iter()
                .filter(|l| l.message() == "accepted plaintext connection")
                .count()
                > plaintext_before;
            // Plaintext always goes through the agent: from outside the
            // mesh, and to a DISABLE pod (authorization applies); a STRICT
            // drop is the kernel's, the agent never sees it.
            let expected = gets_in && (from.name == attacker.name || case.starts_with("DISABLE"));
            assert_eq!(through_agent, expected, "{what}: through the agent");
            if !gets_in && from.name == attacker.name && case.contains("STRICT") {
                let src = from.ip.to_string();
                assert!(
                    !mesh.agents[1].lines().iter().any(|l| {
                        l.message() == "plaintext connection refused"
                            && l.field("src").starts_with(&src)
                            && l.field("dst") == server.addr.to_string()
                    }),
                    "{what}: the agent, not the kernel, refused it"
                );
            }
        }
    }
    assert!(mesh.agents[1].lines().iter().any(|l| {
        l.message() == "plaintext connection refused"
            && l.field("reason").starts_with("denied by policy")
            && l.field("src").starts_with(&attacker.ip.to_string())
    }));
}

#[test]
fn a_policy_change_cuts_the_open_connections_it_now_denies() {
    let mut mesh = PolicyMesh::new();
    let keep = Tool::start(&mesh.web.pod, &["keep", "--port", &PORT.to_string()]);
    keep.next("listening", PATIENCE);
    let web = SocketAddrV4::new(mesh.web.pod.ip, PORT).into();
    // Three HBONE connections of sleep's, three of admin's, and two in
    // plaintext from the attacker (web is PERMISSIVE): all open, for 15 s.
    let sprays = [
        spray(&mesh.sleep.pod, web, 3, 5_000, 15_000),
        spray(&mesh.admin.pod, web, 3, 5_000, 15_000),
        spray(&mesh.attacker(), web, 2, 5_000, 15_000),
    ];
    for (spray, n) in sprays.iter().zip([3, 3, 2]) {
        assert_eq!(spray.next("connected", PATIENCE)["echoed"], n);
    }

    // Now sleep is denied, and web takes no plaintext.
    mesh.set_policies(
        &(ap(
            "shop",
            "not-sleep",
            "{action: DENY, rules: [{from: [{source: {principals: [\"*/sa/sleep\"]}}]}]}",
        ) + &pa(
            "shop",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
        )),
    );
    let cut = mesh.agents[1]
        .wait_for_count(PATIENCE, 3, |l| {
            l.message() == "HBONE stream closed: no longer allowed"
        })
        .unwrap();
    for line in &cut {
        assert_eq!(line.field("peer_identity"), mesh.sleep.identity());
        assert_eq!(
            line.field("reason"),
            "denied by policy: DENY shop/not-sleep"
        );
    }
    let plain = mesh.agents[1]
        .wait_for_count(PATIENCE, 2, |l| {
            l.message() == "plaintext connection closed: no longer allowed"
        })
        .unwrap();
    assert!(
        plain
            .iter()
            .all(|l| l.field("reason") == "the pod's mTLS mode is now STRICT")
    );
    // The access lines say so too.
    let denied = mesh.agents[1]
        .lines()
        .into_iter()
        .filter(|l| {
            l.field("target") == "access"
                && l.field("response_flags") == "DENY"
                && l.field("error").starts_with("denied by policy")
        })
        .count();
    assert_eq!(denied, 3);

    // The clients saw theirs cut; admin's stayed open to the end.
    let [sleep, admin, attacker] = sprays;
    let wait = Duration::from_secs(20);
    assert_eq!(ended(&sleep.next("sprayed", wait), "cut"), 3);
    assert_eq!(ended(&admin.next("sprayed", wait), "echoed"), 3);
    assert_eq!(ended(&attacker.next("sprayed", wait), "cut"), 2);
}

#[test]
fn with_its_agent_killed_a_strict_pod_still_takes_no_plaintext() {
    let mut mesh = PolicyMesh::new();
    let mut web = Server::start(&mesh.web.pod, PORT).unwrap();
    let mut db = Server::start(&mesh.db.pod, PORT).unwrap();
    let attacker = mesh.attacker();
    // web STRICT; db PERMISSIVE (no policy for it).
    mesh.set_policies(&pa(
        "shop",
        "web-strict",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
    ));
    let quick = Call::quick();
    // The policies are loaded before the pods' modes reach the kernel: the
    // agent dies after that (on a slow machine the two are far apart).
    mesh.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message() == "mTLS modes changed" && l.field("workload") == mesh.web.qualified_name()
        })
        .unwrap();

    // Node 2's agent dies.
    drop(mesh.agents.pop());
    for _ in 0..2 {
        assert!(
            quick.run(&attacker, web.addr).is_err(),
            "plaintext reached a STRICT pod"
        );
        assert!(
            web.saw_nothing(),
            "the STRICT pod's application received bytes"
        );
    }
    // A PERMISSIVE pod still takes plaintext (straight to the application).
    let called = quick.run(&attacker, db.addr).unwrap();
    let served = db.next_served().unwrap();
    assert_eq!(served.peer.ip(), attacker.ip);
    assert_eq!(served.bytes, called.sent);
}

#[test]
fn with_its_agent_killed_a_permissive_pod_under_authorization_fails_closed() {
    let mut mesh = PolicyMesh::new();
    let mut db = Server::start(&mesh.db.pod, PORT).unwrap();
    let attacker = mesh.attacker();
    // db PERMISSIVE, but with an ALLOW policy: its plaintext must be checked.
    mesh.set_policies(&ap(
        "shop",
        "db-from-anywhere",
        "{selector: {matchLabels: {app: db}}, rules: [{}]}",
    ));
    let quick = Call::quick();
    quick.run(&attacker, db.addr).unwrap();
    db.next_served().unwrap();

    drop(mesh.agents.pop());
    assert!(
        quick.run(&attacker, db.addr).is_err(),
        "plaintext bypassed authorization while the agent was down"
    );
    assert!(db.saw_nothing());
}

#[test]
fn a_pod_forging_another_pods_address_gets_nothing_through() {
    let mut mesh = PolicyMesh::new();
    let mut web = Server::start(&mesh.web.pod, PORT).unwrap();
    let (sleep, admin) = (mesh.sleep.pod.clone(), mesh.admin.pod.clone());
    // web lets in sleep's address only.
    mesh.set_policies(&ap(
        "shop",
        "from-sleep",
        &format!(
            "{{rules: [{{from: [{{source: {{ipBlocks: [{}]}}}}]}}]}}",
            sleep.ip
        ),
    ));
    Call::default().run(&sleep, web.addr).unwrap();
    web.next_served().unwrap();
    let quick = Call::quick();
    assert!(quick.run(&admin, web.addr).is_err());

    // admin takes sleep's address as its own and tries again from it.
    let added = std::process::Command::new("ip")
        .args(["-n", &admin.netns, "addr", "add"])
        .arg(format!("{}/32", sleep.ip))
        .args(["dev", "eth0"])
        .status()
        .unwrap();
    assert!(added.success());
    let forged = Call {
        bind_ip: Some(sleep.ip),
        ..quick.clone()
    };
    assert!(
        forged.run(&admin, web.addr).is_err(),
        "a forged source got through"
    );
    assert!(web.saw_nothing());
    let dropped = format!("egress: dropped a packet from {}", sleep.ip);
    mesh.agents[0]
        .wait_for(PATIENCE, |l| l.message().starts_with(&dropped))
        .unwrap();
    // sleep itself is unaffected.
    Call::default().run(&sleep, web.addr).unwrap();
    assert_eq!(web.next_served().unwrap().peer.ip(), sleep.ip);
}

#[test]
fn every_mode_at_every_scope() {
    let mut mesh = PolicyMesh::new();
    let mut web = Server::start(&mesh.web.pod, PORT).unwrap();
    let (attacker, sleep) = (mesh.attacker(), mesh.sleep.pod.clone());
    /// A scope's name, and its PeerAuthentication for a mode.
    type Scope = (&'static str, fn(&str) -> String);
    let scopes: [Scope; 4] = [
        ("mesh", |mode| {
            pa(
                "istio-system",
                "mesh",
                &format!("{{mtls: {{mode: {mode}}}}}"),
            )
        }),
        ("namespace", |mode| {
            pa("shop", "shop", &format!("{{mtls: {{mode: {mode}}}}}"))
        }),
        ("workload", |mode| {
            pa(
                "shop",
                "web",
                &format!("{{selector: {{matchLabels: {{app: web}}}}, mtls: {{mode: {mode}}}}}"),
            )
        }),
        ("port", |mode| {
            pa(
                "shop",
                "web",
                &format!(
                    "{{selector: {{matchLabels: {{app: web}}}}, portLevelMtls: {{\"8080\": {{mode: {mode}}}}}}}"
                ),
            )
        }),
    ];
    let plaintext_accepted = |mesh: &PolicyMesh| {
        mesh.agents[1]
            .lines()
            .iter()
            .filter(|l| l.message() == "accepted plaintext connection")
            .count()
    };
    for (scope, policy) in scopes {
        for mode in ["STRICT", "PERMISSIVE", "DISABLE"] {
            let what = format!("{mode} at {scope} scope");
            // Below the mesh scope, the mesh says otherwise: the scope's
            // policy must win for the case to pass.
            let parent = match (scope, mode) {
                ("mesh", _) => String::new(),
                (_, "STRICT") => pa("istio-system", "mesh", "{mtls: {mode: PERMISSIVE}}"),
                _ => pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"),
            };
            mesh.set_policies(&(parent + &policy(mode)));

            // The attacker's plaintext: dropped in the kernel, or handed to
            // the agent (which authorizes it).
            let before = plaintext_accepted(&mesh);
            let called = Call::quick().run(&attacker, web.addr);
            assert_eq!(called.is_ok(), mode != "STRICT", "{what}: attacker");
            if called.is_ok() {
                assert_eq!(web.next_served().unwrap().peer.ip(), attacker.ip, "{what}");
            } else {
                assert!(web.saw_nothing(), "{what}");
            }
            let through_agent = plaintext_accepted(&mesh) > before;
            assert_eq!(through_agent, mode != "STRICT", "{what}: through the agent");

            // A mesh client always gets in: over HBONE, or in plaintext to
            // a DISABLE destination.
            Call::default().run(&sleep, web.addr).unwrap();
            assert_eq!(web.next_served().unwrap().peer.ip(), sleep.ip, "{what}");
            let path = mesh.agents[0].captures().last().unwrap().path.clone();
            let expected = if mode == "DISABLE" {
                "passthrough"
            } else {
                "hbone"
            };
            assert_eq!(path, expected, "{what}: client path");
        }
    }
}

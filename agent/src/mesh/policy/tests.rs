//! Istio's policy semantics, case by case.

use std::{net::Ipv4Addr, path::Path};

use super::*;

/// A workload of namespace `ns` with labels `labels` ("k=v,k=v").
fn workload(ns: &str, labels: &str) -> Workload {
    let labels = labels
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    Workload {
        name: "pod".into(),
        namespace: ns.into(),
        workload_name: "w".into(),
        service_account: "sa".into(),
        identity: format!("spiffe://cluster.local/ns/{ns}/sa/sa")
            .parse()
            .unwrap(),
        ip: Ipv4Addr::new(10, 244, 2, 2),
        node: "node-2".into(),
        labels,
        local: None,
        probe_ports: Default::default(),
    }
}

fn load(yaml: &str) -> Loaded {
    Policies::from_texts(
        [(Path::new("p.yaml").to_owned(), Ok(yaml.to_owned()))],
        DEFAULT_ROOT_NAMESPACE,
    )
}

fn policies(yaml: &str) -> Policies {
    let loaded = load(yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.policies
}

fn pa(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )
}

fn ap(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )
}

#[test]
fn mtls_modes_follow_scope_precedence() {
    use MtlsMode::*;
    let web = workload("shop", "app=web");
    let db = workload("shop", "app=db");
    let other = workload("other", "app=web");
    let cases: Vec<(&str, String, &Workload, u16, MtlsMode)> = vec![
        ("no policy", String::new(), &web, 80, Permissive),
        (
            "mesh-wide",
            pa("istio-system", "m", "  mtls: {mode: STRICT}"),
            &web,
            80,
            Strict,
        ),
        (
            "namespace over mesh",
            pa("istio-system", "m", "  mtls: {mode: STRICT}")
                + &pa("shop", "n", "  mtls: {mode: PERMISSIVE}"),
            &web,
            80,
            Permissive,
        ),
        (
            "namespace policy stays in its namespace",
            pa("istio-system", "m", "  mtls: {mode: STRICT}")
                + &pa("shop", "n", "  mtls: {mode: DISABLE}"),
            &other,
            80,
            Strict,
        ),
        (
            "workload over namespace",
            pa("shop", "n", "  mtls: {mode: STRICT}")
                + &pa(
                    "shop",
                    "w",
                    "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}",
                ),
            &web,
            80,
            Disable,
        ),
        (
            "selector that does not match",
            pa("shop", "n", "  mtls: {mode: STRICT}")
                + &pa(
                    "shop",
                    "w",
                    "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}",
                ),
            &db,
            80,
            Strict,
        ),
        (
            "UNSET inherits",
            pa("istio-system", "m", "  mtls: {mode: STRICT}")
                + &pa("shop", "n", "  mtls: {mode: UNSET}")
                + &pa("shop", "w", "  selector: {matchLabels: {app: web}}"),
            &web,
            80,
            Strict,
        ),
        (
            "port level over workload",
            pa(
                "shop",
                "w",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: PERMISSIVE}",
            ),
            &web,
            8080,
            Permissive,
        ),
        (
            "port level only for its port",
            pa(
                "shop",
                "w",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: PERMISSIVE}",
            ),
            &web,
            9090,
            Strict,
        ),
        (
            "root-namespace selector is not mesh-wide",
            pa(
                "istio-system",
                "w",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}",
            ),
            &web,
            80,
            Permissive,
        ),
    ];
    for (what, yaml, workload, port, expected) in cases {
        let got = policies(&yaml).mtls_mode(workload, port);
        assert_eq!(got, expected, "{what}");
    }
}

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

#[test]
fn authorization_follows_istios_order() {
    let web = workload("shop", "app=web");
    let sleep = id("spiffe://cluster.local/ns/default/sa/sleep");
    let admin = id("spiffe://cluster.local/ns/ops/sa/admin");
    fn from<'a>(source: Option<&'a SpiffeId>, ip: [u8; 4], port: u16) -> Connection<'a> {
        Connection {
            source,
            source_ip: IpAddr::V4(Ipv4Addr::from(ip)),
            destination_ip: Ipv4Addr::new(10, 244, 2, 2),
            destination_port: port,
        }
    }
    // (case, policies, connection, allowed, decided by)
    let cases: Vec<(&str, String, Connection<'_>, bool, &str)> = vec![
        (
            "no policy allows",
            String::new(),
            from(None, [10, 0, 0, 9], 80),
            true,
            "no policy",
        ),
        (
            "empty ALLOW denies all",
            ap("shop", "nothing", "  {}"),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            false,
            "no ALLOW policy matched",
        ),
        (
            "ALLOW by principal",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "ALLOW by principal, other identity",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]",
            ),
            from(Some(&admin), [10, 244, 1, 2], 80),
            false,
            "no ALLOW policy matched",
        ),
        (
            "principals need an identity: plaintext never matches",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {principals: [\"*\"]}}]}]",
            ),
            from(None, [10, 244, 1, 2], 80),
            false,
            "no ALLOW policy matched",
        ),
        (
            "wildcard principal prefix",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {principals: [\"cluster.local/ns/default/*\"]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "DENY by namespace beats ALLOW",
            ap("shop", "a", "  rules: [{}]")
                + &ap(
                    "shop",
                    "d",
                    "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]",
                ),
            from(Some(&admin), [10, 244, 1, 9], 80),
            false,
            "DENY shop/d",
        ),
        (
            "DENY not matching leaves ALLOW",
            ap("shop", "a", "  rules: [{}]")
                + &ap(
                    "shop",
                    "d",
                    "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]",
                ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "notPrincipals [*] denies plaintext",
            ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]",
            ),
            from(None, [10, 244, 2, 3], 80),
            false,
            "DENY shop/d",
        ),
        (
            "notPrincipals [*] lets identities through",
            ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            true,
            "no policy",
        ),
        (
            "ipBlocks",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]",
            ),
            from(None, [10, 244, 1, 7], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "notIpBlocks",
            ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.244.0.0/16]}}]}]",
            ),
            from(None, [192, 168, 1, 1], 80),
            false,
            "DENY shop/d",
        ),
        (
            "remoteIpBlocks is the source at L4",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {remoteIpBlocks: [10.244.1.2]}}]}]",
            ),
            from(None, [10, 244, 1, 2], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "ports",
            ap(
                "shop",
                "a",
                "  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            false,
            "no ALLOW policy matched",
        ),
        (
            "notPorts",
            ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 9090),
            false,
            "DENY shop/d",
        ),
        (
            "from AND to",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {ports: [\"80\"]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "when destination.port",
            ap(
                "shop",
                "a",
                "  rules: [{when: [{key: destination.port, values: [\"80\"]}]}]",
            ),
            from(None, [10, 244, 1, 2], 80),
            true,
            "ALLOW shop/a",
        ),
        (
            "when source.ip notValues",
            ap(
                "shop",
                "a",
                "  rules: [{when: [{key: source.ip, notValues: [10.244.1.0/24]}]}]",
            ),
            from(None, [10, 244, 1, 2], 80),
            false,
            "no ALLOW policy matched",
        ),
        (
            "when source.principal",
            ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{when: [{key: source.principal, values: [\"*/sa/admin\"]}]}]",
            ),
            from(Some(&admin), [10, 244, 1, 2], 80),
            false,
            "DENY shop/d",
        ),
        (
            "AUDIT does not decide",
            ap("shop", "au", "  action: AUDIT\n  rules: [{}]"),
            from(None, [10, 244, 1, 2], 80),
            true,
            "no policy",
        ),
        (
            "dry-run DENY is not enforced",
            ap("shop", "d", "  action: DENY\n  rules: [{}]").replace(
                "metadata: {name: d, namespace: shop}",
                "metadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
            ),
            from(None, [10, 244, 1, 2], 80),
            true,
            "no policy",
        ),
        (
            "dry-run ALLOW does not make others deny",
            ap(
                "shop",
                "a",
                "  rules: [{from: [{source: {namespaces: [ops]}}]}]",
            )
            .replace(
                "metadata: {name: a, namespace: shop}",
                "metadata: {name: a, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            true,
            "no policy",
        ),
        (
            "L7 ALLOW never matches",
            ap(
                "shop",
                "a",
                "  rules: [{to: [{operation: {methods: [GET]}}]}]",
            ),
            from(Some(&sleep), [10, 244, 1, 2], 80),
            false,
            "no ALLOW policy matched",
        ),
        (
            "L7 DENY applies on its L4 parts",
            ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}], to: [{operation: {paths: [/admin]}}]}]",
            ),
            from(Some(&admin), [10, 244, 1, 2], 80),
            false,
            "DENY shop/d",
        ),
        (
            "root namespace applies everywhere",
            ap(
                "istio-system",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [ops]}}]}]",
            ),
            from(Some(&admin), [10, 244, 1, 2], 80),
            false,
            "DENY istio-system/d",
        ),
        (
            "other namespaces' policies do not apply",
            ap("default", "d", "  action: DENY\n  rules: [{}]"),
            from(Some(&admin), [10, 244, 1, 2], 80),
            true,
            "no policy",
        ),
        (
            "selector that does not match",
            ap(
                "shop",
                "d",
                "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{}]",
            ),
            from(Some(&admin), [10, 244, 1, 2], 80),
            true,
            "no policy",
        ),
    ];
    for (what, yaml, connection, allowed, reason) in cases {
        let decision = policies(&yaml).authorize(&web, &connection);
        assert_eq!(decision.allowed, allowed, "{what}: {decision:?}");
        assert_eq!(decision.reason, reason, "{what}");
    }
}

#[test]
fn audit_and_dry_run_are_reported() {
    let web = workload("shop", "app=web");
    let yaml = ap("shop", "au", "  action: AUDIT\n  rules: [{}]")
        + &ap("shop", "d", "  action: DENY\n  rules: [{}]").replace(
            "namespace: shop}",
            "namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
        );
    let decision = policies(&yaml).authorize(
        &web,
        &Connection {
            source: None,
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            destination_ip: web.ip,
            destination_port: 80,
        },
    );
    assert!(decision.allowed);
    assert_eq!(decision.audited, ["shop/au"]);
    assert_eq!(decision.dry_run, ["DENY shop/d: would deny"]);
}

#[test]
fn l7_rules_are_warned_about() {
    let loaded = load(&ap(
        "shop",
        "a",
        "  rules: [{to: [{operation: {paths: [/x]}}], when: [{key: \"request.headers[x]\", values: [y]}]}]",
    ));
    assert!(loaded.errors.is_empty());
    assert_eq!(loaded.warnings.len(), 1);
    let warning = &loaded.warnings[0];
    for expected in [
        "p.yaml",
        "policy shop/a",
        "spec.rules[0].to[0].operation.paths",
        "request.headers[x]",
        "never matches",
    ] {
        assert!(warning.contains(expected), "{warning:?} lacks {expected:?}");
    }
}

#[test]
fn invalid_documents_are_refused_one_by_one() {
    let good = ap("shop", "good", "  rules: [{}]");
    let cases = [
        (
            pa("shop", "m", "  mtls: {mode: STRICTLY}"),
            "p.yaml: shop/m: spec.mtls.mode: \"STRICTLY\" is not UNSET",
        ),
        (
            ap(
                "shop",
                "t",
                "  rules: [{from: [{source: {principalz: [x]}}]}]",
            ),
            "shop/t: spec.rules[0].from[0].source.principalz: unknown field `principalz`",
        ),
        (
            ap(
                "shop",
                "p",
                "  rules: [{to: [{operation: {ports: [\"http\"]}}]}]",
            ),
            "shop/p: spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port",
        ),
        (
            ap(
                "shop",
                "c",
                "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]",
            ),
            "shop/c: spec.rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            ap("shop", "x", "  action: CUSTOM"),
            "shop/x: spec.action: CUSTOM",
        ),
        (
            ap(
                "shop",
                "k",
                "  rules: [{when: [{key: source.colour, values: [red]}]}]",
            ),
            "shop/k: spec.rules[0].when[0].key: \"source.colour\"",
        ),
        (
            pa("shop", "n", "  portLevelMtls: {\"80\": {mode: STRICT}}"),
            "shop/n: spec.portLevelMtls: applies only with a selector",
        ),
        (
            pa(
                "shop",
                "many",
                &format!(
                    "  selector: {{matchLabels: {{app: web}}}}\n  portLevelMtls: {{{}}}",
                    (1..=65)
                        .map(|p| format!("\"{p}\": {{mode: PERMISSIVE}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            "shop/many: spec.portLevelMtls: 65 ports; at most 64 are accepted",
        ),
        (
            ap("shop", "v", "  rules: []").replace("security.istio.io/v1", "security.istio.io/v2"),
            "shop/v: apiVersion",
        ),
        (
            ap("shop", "s", "  rules: []").replace("AuthorizationPolicy", "Sidecar"),
            "shop/s: kind: \"Sidecar\"",
        ),
        ("---\nkind: AuthorizationPolicy\n".into(), "document #1"),
    ];
    for (bad, expected) in cases {
        let loaded = load(&(bad.clone() + &good));
        assert_eq!(loaded.errors.len(), 1, "{bad}: {:?}", loaded.errors);
        let message = loaded.errors[0].to_string();
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        // The valid document next to it still applies.
        assert!(
            loaded
                .policies
                .authorization_policies
                .iter()
                .any(|ap| ap.name == "good"),
            "{bad}"
        );
        assert!(loaded.complete);
    }
}

#[test]
fn a_refused_peer_authentication_keeps_its_place_among_newer_ones() {
    let dated = |name: &str, created: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: \
             {{name: {name}, namespace: shop, creationTimestamp: \"{created}\"}}\nspec:\n{spec}\n"
        )
    };
    let many: Vec<String> = (1..=65)
        .map(|p| format!("\"{p}\": {{mode: PERMISSIVE}}"))
        .collect();
    // The older policy is refused (too many ports); a newer valid one at the
    // same scope must not take its place.
    let loaded = load(
        &(dated(
            "web-ports",
            "2026-01-01T00:00:00Z",
            &format!(
                "  selector: {{matchLabels: {{app: web}}}}\n  mtls: {{mode: PERMISSIVE}}\n  \
                 portLevelMtls: {{{}}}",
                many.join(", ")
            ),
        ) + &dated(
            "web-loose",
            "2026-02-01T00:00:00Z",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}",
        )),
    );
    assert_eq!(loaded.errors.len(), 1);
    let web = workload("shop", "app=web");
    assert_eq!(loaded.policies.mtls_mode(&web, 8080), MtlsMode::Strict);
}

#[test]
fn a_refused_policy_fails_closed_over_its_workloads() {
    let web = workload("shop", "app=web");
    let db = workload("shop", "app=db");
    let sleep = id("spiffe://cluster.local/ns/default/sa/sleep");
    let connection = Connection {
        source: Some(&sleep),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
        destination_ip: web.ip,
        destination_port: 80,
    };
    // A broken ALLOW for web (its selector is fine): web denies all, db is
    // unaffected.
    let loaded = load(&ap(
        "shop",
        "web",
        "  selector: {matchLabels: {app: web}}\n  rules: [{to: [{operation: {portz: [\"80\"]}}]}]",
    ));
    assert_eq!(loaded.errors.len(), 1);
    let decision = loaded.policies.authorize(&web, &connection);
    assert!(!decision.allowed);
    assert_eq!(decision.reason, "DENY shop/web (refused: fails closed)");
    assert!(loaded.policies.authorize(&db, &connection).allowed);

    // A broken PeerAuthentication makes its namespace STRICT.
    let loaded = load(&pa("shop", "n", "  mtls: {mode: STRICTLY}"));
    assert_eq!(loaded.policies.mtls_mode(&db, 80), MtlsMode::Strict);
    // An AUDIT that cannot run denies nothing.
    let loaded = load(&ap(
        "shop",
        "a",
        "  action: AUDIT\n  rules: [{when: [{key: nope, values: [x]}]}]",
    ));
    assert!(loaded.policies.authorize(&web, &connection).allowed);
}

#[test]
fn a_file_that_is_not_yaml_leaves_the_policies_incomplete() {
    let loaded = load(&(ap("shop", "ok", "  rules: [{}]") + "---\nspec: [unclosed\n"));
    assert!(!loaded.complete);
    assert_eq!(loaded.errors.len(), 1);
}

#[test]
fn empty_selectors_and_lists_are_unset_as_in_istio() {
    let web = workload("shop", "app=web");
    // `selector: {}` is namespace-wide; `principals: []` is no condition.
    let policies = policies(
        &(pa("shop", "n", "  selector: {}\n  mtls: {mode: STRICT}")
            + &ap(
                "shop",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {principals: []}}]}]",
            )),
    );
    assert_eq!(policies.mtls_mode(&web, 80), MtlsMode::Strict);
    let decision = policies.authorize(
        &web,
        &Connection {
            source: None,
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            destination_ip: web.ip,
            destination_port: 80,
        },
    );
    assert!(!decision.allowed, "{decision:?}");
    // A selector in the root namespace makes a PeerAuthentication ignored.
    let loaded = load(&pa(
        "istio-system",
        "w",
        "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}",
    ));
    assert_eq!(loaded.policies.counts().0, 0);
    assert!(loaded.warnings[0].contains("ignored, as in Istio"));
}

#[test]
fn a_directory_of_files_is_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        pa("istio-system", "m", "  mtls: {mode: STRICT}"),
    )
    .unwrap();
    std::fs::write(dir.path().join("a.yml"), ap("shop", "a", "  rules: [{}]")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let loaded = Policies::load_dir(dir.path(), DEFAULT_ROOT_NAMESPACE);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(loaded.policies.counts(), (1, 1));

    let missing = Policies::load_dir(&dir.path().join("nope"), DEFAULT_ROOT_NAMESPACE);
    assert_eq!(missing.errors.len(), 1);
    assert!(missing.errors[0].to_string().contains("cannot read it"));
}

#[test]
fn a_kubectl_export_reads_as_is() {
    // What `kubectl get ... -o yaml` writes: a List, server-side fields, and
    // two namespace-wide policies of which Istio takes the older.
    let yaml = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata:
    name: a-newer
    namespace: shop
    creationTimestamp: "2026-03-01T10:00:00Z"
    uid: 0b0d
    resourceVersion: "42"
    annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  spec: {mtls: {mode: DISABLE}}
  status: {}
- apiVersion: security.istio.io/v1beta1
  kind: PeerAuthentication
  metadata:
    name: b-older
    namespace: shop
    creationTimestamp: "2025-01-01T10:00:00Z"
  spec: {mtls: {mode: STRICT}}
"#;
    let policies = policies(yaml);
    assert_eq!(policies.counts().0, 2);
    assert_eq!(
        policies.mtls_mode(&workload("shop", ""), 80),
        MtlsMode::Strict
    );
}

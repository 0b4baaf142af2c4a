//! The connection model on small policies of its own: selectors, peers, ports, and
//! both directions of a connection.

use super::*;

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

fn pod(ns: &str, labels: &[(&str, &str)]) -> Endpoint {
    let mut ep = Endpoint::new("x", ns, labels);
    ep.ports.insert("http".into(), 8000);
    ep
}

#[test]
fn selectors_as_kubernetes_defines_them() {
    let labels = label_map(&[("app", "sluice"), ("tier", "web")]);
    assert!(selects(&yaml("{}"), &labels));
    assert!(selects(&yaml("matchLabels: {app: sluice}"), &labels));
    assert!(!selects(&yaml("matchLabels: {app: mongo}"), &labels));
    assert!(!selects(&yaml("matchLabels: {other: x}"), &labels));
    let expr = |e: &str| yaml(&format!("matchExpressions: [{e}]"));
    assert!(selects(
        &expr("{key: tier, operator: In, values: [web, db]}"),
        &labels
    ));
    assert!(!selects(
        &expr("{key: tier, operator: NotIn, values: [web]}"),
        &labels
    ));
    assert!(selects(&expr("{key: tier, operator: Exists}"), &labels));
    assert!(!selects(&expr("{key: zone, operator: Exists}"), &labels));
    assert!(!selects(
        &expr("{key: app, operator: DoesNotExist}"),
        &labels
    ));
}

#[test]
fn a_peer_without_a_namespace_selector_is_the_policys_namespace() {
    let here = pod("assessment", &[("app", "sluice")]);
    let there = pod("default", &[("app", "sluice")]);
    let peer = yaml("podSelector: {matchLabels: {app: sluice}}");
    assert!(peer_admits(&peer, "assessment", &here));
    assert!(!peer_admits(&peer, "assessment", &there));
    let both = yaml(
        "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}, podSelector: {matchLabels: {app: sluice}}}",
    );
    assert!(peer_admits(&both, "assessment", &there));
    assert!(!peer_admits(&both, "assessment", &here));
    assert!(!peer_admits(
        &yaml("ipBlock: {cidr: 0.0.0.0/0}"),
        "assessment",
        &here
    ));
    assert!(!peer_admits(&yaml("{}"), "assessment", &pod(NODE, &[])));
}

#[test]
fn ports_by_number_name_range_and_protocol() {
    let dst = pod("assessment", &[]);
    assert!(ports_admit(&Value::Null, &dst, 1, "UDP"));
    let ports = yaml("[{port: http}]");
    assert!(ports_admit(&ports, &dst, 8000, "TCP"));
    assert!(!ports_admit(&ports, &dst, 8000, "UDP"));
    let range = yaml("[{protocol: TCP, port: 8000, endPort: 8010}]");
    assert!(ports_admit(&range, &dst, 8010, "TCP"));
    assert!(!ports_admit(&range, &dst, 8011, "TCP"));
    assert!(!ports_admit(&yaml("[{port: metrics}]"), &dst, 8000, "TCP"));
}

#[test]
fn policy_types_default_to_what_the_spec_has() {
    assert_eq!(policy_types(&yaml("spec: {podSelector: {}}")), ["Ingress"]);
    assert_eq!(
        policy_types(&yaml("spec: {egress: []}")),
        ["Ingress", "Egress"]
    );
    assert_eq!(
        policy_types(&yaml("spec: {policyTypes: [Egress]}")),
        ["Egress"]
    );
}

#[test]
fn a_connection_needs_the_sources_egress_and_the_destinations_ingress() {
    let web = pod("assessment", &[("app", "web")]);
    let db = pod("assessment", &[("app", "db")]);
    let deny_all = yaml(
        "{metadata: {name: deny, namespace: assessment}, spec: {podSelector: {}, policyTypes: [Ingress, Egress]}}",
    );
    let web_out = yaml(
        "{metadata: {name: web-out, namespace: assessment}, spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]}}",
    );
    let db_in = yaml(
        "{metadata: {name: db-in, namespace: assessment}, spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]}}",
    );
    assert!(connection(&[], &web, &db, 5432, "TCP").0);
    assert!(!connection(&[&deny_all, &web_out], &web, &db, 5432, "TCP").0);
    let (ok, why) = connection(&[&deny_all, &web_out, &db_in], &web, &db, 5432, "TCP");
    assert!(ok, "{why}");
    assert_eq!(why, "egress web-out; ingress db-in");
    let (ok, why) = connection(&[&deny_all, &web_out, &db_in], &web, &db, 5433, "TCP");
    assert!(!ok);
    assert_eq!(why, "ingress denied by deny, db-in");
    assert!(!connection(&[&deny_all, &web_out, &db_in], &db, &web, 8000, "TCP").0);
    assert!(connection(&[&deny_all], &pod(NODE, &[]), &web, 8000, "TCP").0);
}

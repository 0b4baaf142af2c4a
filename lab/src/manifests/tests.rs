//! The check against the shipped manifests, against each deliberate drift of the
//! policies, and against single edits that each break one rule: a check that finds
//! nothing in the shipped files must still find each of these.

use std::path::PathBuf;

use super::app::max_pool_size;
use super::redis::{compares_with_pong, redis_url_password};
use super::*;

fn shipped() -> Manifests {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    Manifests::load(&root).unwrap_or_else(|e| panic!("{e}"))
}

/// The one object of `kind` named `name`, to edit.
fn object<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The problems of the shipped manifests after `edit`.
fn problems_after(edit: impl FnOnce(&mut Manifests)) -> Vec<String> {
    let mut m = shipped();
    let before = m.clone();
    edit(&mut m);
    assert!(
        m.app != before.app || m.redis != before.redis,
        "the edit changed nothing"
    );
    m.check().unwrap().1
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn the_shipped_manifests_have_no_problem() {
    let (lines, problems) = shipped().check().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    // Three lines of summary, the 26 connections, two more.
    assert_eq!(lines.len(), 3 + 26 + 2, "{lines:#?}");
    assert!(
        lines[0].starts_with("settings: ") && lines[0].contains("ConfigMap, 2 from the Secret")
    );
    assert!(lines[2].contains("rejects all 8 deliberate drifts"));
}

#[test]
fn the_policies_allow_what_the_system_needs_and_nothing_else() {
    let m = shipped();
    let (problems, table) = netpol::problems(&m.app, &m).unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(table.len(), 26, "{table:#?}");
    let allowed: Vec<&str> = table
        .iter()
        .filter_map(|l| l.strip_prefix("allow "))
        .collect();
    assert_eq!(
        allowed,
        [
            "traefik -> sluice:8000/TCP",
            "prometheus -> sluice:8000/TCP",
            "the kubelet -> sluice:8000/TCP (from the pod's own node: kube-router accepts it before any policy)",
            "sluice -> coredns:53/UDP",
            "sluice -> coredns:53/TCP",
            "sluice -> mongo:27017/TCP",
            "sluice -> redis:6379/TCP",
        ]
    );
    let denied = table.iter().filter(|l| l.starts_with("deny  ")).count();
    assert_eq!(denied, 19, "{table:#?}");
    assert!(table.contains(&"deny  a pod in default -> redis:6379/TCP".to_string()));
    assert!(table.contains(&"deny  sluice -> the internet:443/TCP".to_string()));
}

/// Each drift, and a problem it must cause.
const DRIFTS: [(&str, &str); 8] = [
    (
        "sluice-http without from (as before)",
        "NetworkPolicy: a pod in default -> sluice:8000/TCP is allowed",
    ),
    (
        "Traefik's peer by namespace only",
        "NetworkPolicy: metrics-server -> sluice:8000/TCP is allowed",
    ),
    (
        "Traefik's namespace and label as two peers (either one)",
        "NetworkPolicy: metrics-server -> sluice:8000/TCP is allowed",
    ),
    (
        "no DNS egress",
        "NetworkPolicy: sluice -> coredns:53/UDP is denied",
    ),
    (
        "no default-deny egress",
        "no default-deny egress NetworkPolicy",
    ),
    (
        "Redis open to every namespace",
        "NetworkPolicy: traefik -> redis:6379/TCP is allowed",
    ),
    (
        "sluice to anywhere on 443",
        "NetworkPolicy: sluice -> the internet:443/TCP is allowed",
    ),
    (
        "Prometheus' port by another number",
        "NetworkPolicy: traefik -> sluice:8000/TCP is denied",
    ),
];

#[test]
fn every_drift_of_the_policies_is_rejected() {
    let m = shipped();
    let drifts = netpol::drifts();
    let names: Vec<&str> = drifts.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, DRIFTS.map(|(n, _)| n));
    for ((name, drift), (_, want)) in drifts.into_iter().zip(DRIFTS) {
        let mut broken = m.app.clone();
        drift(&mut broken).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_ne!(broken, m.app, "{name} changed nothing");
        let (problems, _) = netpol::problems(&broken, &m).unwrap();
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "the drift {name:?} must give {want:?}, gave {problems:#?}"
        );
    }
}

#[test]
fn a_deployment_with_replicas_is_a_problem() {
    let problems = problems_after(|m| {
        let spec = object(&mut m.app, "Deployment", "sluice")["spec"]
            .as_mapping_mut()
            .unwrap();
        spec.insert("replicas".into(), 3.into());
    });
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("Deployment sluice sets spec.replicas"));
}

#[test]
fn a_readiness_probe_on_the_database_is_a_problem() {
    let problems = problems_after(|m| {
        let dep = object(&mut m.app, "Deployment", "sluice");
        dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] =
            "/readyz".into();
    });
    assert_eq!(
        problems,
        [r#"readiness path: is "/readyz", must be "/readyz/pod""#]
    );
}

#[test]
fn a_redis_url_with_another_password_is_a_problem() {
    let problems = problems_after(|m| {
        let secret = object(&mut m.app, "Secret", "sluice-secrets");
        secret["stringData"]["REDIS_URL"] =
            "redis://:0123456789abcdef0123456789abcdef@redis:6379".into();
    });
    assert_eq!(
        problems,
        ["REDIS_URL's password is not the one in Secret redis-auth"]
    );
}

#[test]
fn redis_that_takes_any_reply_or_gets_its_secret_late_is_a_problem() {
    let problems = problems_after(|m| {
        for (file, doc) in &mut m.redis {
            if doc["kind"] == "Secret" {
                *file = "k8s/redis/zz-auth.yaml".into();
            }
            if doc["kind"] == "Deployment" {
                doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]
                    ["command"] = yaml("[redis-cli, ping]");
            }
        }
    });
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("redis readiness must compare"));
    assert!(problems[1].starts_with("k8s/redis/zz-auth.yaml must sort before"));
}

#[test]
fn a_small_pool_and_a_short_grace_period_are_problems() {
    let problems = problems_after(|m| {
        let secret = object(&mut m.app, "Secret", "sluice-secrets");
        secret["stringData"]["MONGO_URI"] =
            "mongodb://mongo:27017/assessmentdb?maxPoolSize=2".into();
        let dep = object(&mut m.app, "Deployment", "sluice");
        dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30.into();
    });
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("MONGO_URI needs maxPoolSize"));
    assert_eq!(
        problems[1],
        "terminationGracePeriodSeconds 30 must exceed preStop 5 + drain 25"
    );
}

#[test]
fn an_ingress_path_beyond_the_public_ones_is_a_problem() {
    let problems = problems_after(|m| {
        let ing = object(&mut m.app, "Ingress", "sluice");
        let paths = ing["spec"]["rules"][0]["http"]["paths"]
            .as_sequence_mut()
            .unwrap();
        let mut metrics = paths[0].clone();
        metrics["path"] = "/metrics".into();
        paths.push(metrics);
    });
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("Ingress paths (Exact)"));
}

#[test]
fn a_policy_that_admits_more_than_sluice_to_mongo_is_a_problem() {
    let problems = problems_after(|m| {
        let pol = object(&mut m.app, "NetworkPolicy", "mongo-from-sluice");
        pol["spec"]["ingress"][0]["from"]
            .as_sequence_mut()
            .unwrap()
            .push(yaml(
                "podSelector: {matchLabels: {app.kubernetes.io/name: redis}}",
            ));
    });
    // Redis' own egress is still denied, so the connection model finds nothing: the rule
    // on the policy's shape does not rest on another policy.
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("NetworkPolicy for mongo must admit only sluice pods on 27017"),
        "{problems:#?}"
    );
}

#[test]
fn uris_and_probe_commands_are_read_as_the_rules_say() {
    assert_eq!(max_pool_size("mongodb://m:27017/db?maxPoolSize=4"), Some(4));
    assert_eq!(
        max_pool_size("mongodb://m/db?w=1&maxPoolSize=12&x=y"),
        Some(12)
    );
    assert_eq!(max_pool_size("mongodb://m/db?minmaxPoolSize=4"), None);
    assert_eq!(max_pool_size("mongodb://m/db"), None);
    assert_eq!(redis_url_password("redis://:abc@redis:6379"), Some("abc"));
    assert_eq!(redis_url_password("redis://:abc@redis:6379/"), Some("abc"));
    assert_eq!(redis_url_password("redis://redis:6379"), None);
    assert_eq!(redis_url_password("redis://:a@b@redis:6379"), None);
    assert!(compares_with_pong(
        r#"sh -c [ "$(redis-cli ping)" = PONG ]"#
    ));
    assert!(compares_with_pong("x =PONG"));
    assert!(!compares_with_pong("x = PONGS"));
    assert!(!compares_with_pong("redis-cli ping"));
}

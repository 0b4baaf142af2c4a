//! The deployment's contract with the code, checked where the code is: the manifests'
//! settings go through sluice's own settings parser, every setting has one name (clap's),
//! and every metric the dashboard and the alert rules query exists in sluice's registry.
//! The manifests are read by the lab's `k8s` module, the one reader of them in Rust.
//! (`lab manifests`, lab/src/manifests/, checks the manifests against each other, and
//! `scripts/check-deploy.sh` the rest.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use serde_yaml::Value;
use sluice::config::Cli;
use sluice::metrics::Metrics;
use sluice_lab::k8s;

/// The repository: this crate is its `lab/`.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml(path: &str) -> Value {
    k8s::manifest(&root(), path).unwrap_or_else(|e| panic!("{e}"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The pod's environment as the Deployment builds it: the ConfigMap and the Secret.
fn pod_settings() -> BTreeMap<String, String> {
    k8s::pod_settings(&root()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_manifests_settings_are_settings_sluice_accepts() {
    let settings = pod_settings();
    assert!(settings.len() > 10, "read the ConfigMap: {settings:?}");
    let mut args = vec!["sluice".to_string()];
    for (name, value) in &settings {
        args.push(format!("--{}", name.to_lowercase().replace('_', "-")));
        args.push(value.clone());
    }
    let cli = Cli::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("k8s/app's settings do not parse as sluice's: {e}"));
    cli.config
        .validate()
        .unwrap_or_else(|e| panic!("k8s/app's settings are refused at start: {e}"));
}

/// The server's settings by their environment names, as clap declares them: the one
/// source of the names (the operator subcommands' own flags are not settings).
fn clap_settings() -> BTreeSet<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// The names in the first column of the README's "Configuration" table.
fn readme_settings() -> BTreeSet<String> {
    let readme = read("README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a Configuration section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split(','))
        .map(|name| name.trim().trim_matches('`').to_string())
        .collect()
}

/// Every name the cluster sets in sluice's environment: the ConfigMap, the Secret and the
/// container's own `env` (the downward API's POD_NAME).
fn manifest_settings() -> BTreeSet<String> {
    let deployment = yaml("k8s/app/deployment.yaml");
    let env = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|c| c["env"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|e| e["name"].as_str().map(str::to_string));
    pod_settings().into_keys().chain(env).collect()
}

/// What the cluster leaves at sluice's default, and why; every other setting it sets.
const CLUSTER_DEFAULTS: [&str; 3] = [
    // 0.0.0.0: the pod's every address.
    "APP_HOST",
    // Comparison runs only.
    "NAIVE_MODE",
    // 10 s for a client that stopped reading; no deployment-specific reason to differ.
    "WRITE_PROGRESS_TIMEOUT_MS",
];

#[test]
fn every_setting_has_one_name_in_clap_the_readme_and_the_manifests() {
    let clap = clap_settings();
    assert!(clap.len() > 20, "read clap's settings: {clap:?}");
    let readme = readme_settings();
    let undocumented: Vec<_> = clap.difference(&readme).collect();
    let unknown: Vec<_> = readme.difference(&clap).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "README.md's Configuration table and clap disagree: no row for {undocumented:?}; rows sluice does not read: {unknown:?}"
    );
    let set = manifest_settings();
    let ignored: Vec<_> = set.difference(&clap).collect();
    assert!(
        ignored.is_empty(),
        "k8s/app sets {ignored:?}, which sluice does not read"
    );
    let defaults: BTreeSet<String> = CLUSTER_DEFAULTS.iter().map(|s| s.to_string()).collect();
    let unset: BTreeSet<String> = clap.difference(&set).cloned().collect();
    assert_eq!(
        unset, defaults,
        "the settings k8s/app leaves at sluice's default are not the ones this test names: set the new one in the ConfigMap, or add it to CLUSTER_DEFAULTS with the reason"
    );
}

#[test]
fn the_fallback_split_covers_every_pod_there_can_be() {
    let settings = pod_settings();
    let fallback: u32 = settings["BUDGET_FALLBACK_PODS"].parse().unwrap();
    // The HPA and the Deployment's surge as the lab's autoscaler reads them.
    let hpa = k8s::Hpa::load(&root()).unwrap();
    let (max_replicas, surge) = (hpa.max, hpa.surge);
    assert!(
        fallback >= max_replicas + surge,
        "BUDGET_FALLBACK_PODS ({fallback}) must be at least maxReplicas ({max_replicas}) + maxSurge ({surge}), the most pods that spend at once (a terminating pod draws nothing from the fallback): pods all cut off from Redis would overspend the budget"
    );
}

/// sluice metric names a PromQL text queries, without histogram suffixes.
fn queried(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while let Some(at) = promql[i..].find("sluice_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = promql[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(promql.len(), |e| start + e);
        if boundary {
            let name = &promql[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

/// Fails unless every name in `used` is a metric family sluice's registry exports.
fn assert_exported(used: &BTreeSet<String>, what: &str) {
    assert!(used.len() > 3, "read {what}'s queries: {used:?}");
    let known: BTreeSet<String> = Metrics::new().family_names().into_iter().collect();
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "{what} queries metrics sluice does not export: {unknown:?}"
    );
}

#[test]
fn the_dashboard_queries_only_metrics_sluice_exports() {
    let text = read("k8s/grafana/sluice-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(queried(target["expr"].as_str().unwrap_or_default()));
        }
    }
    assert!(used.len() > 5, "read the dashboard's queries: {used:?}");
    assert_exported(&used, "the dashboard");
}

#[test]
fn the_alert_rules_query_only_metrics_sluice_exports() {
    let rules = yaml("k8s/monitoring/sluice-alerts.rules.yaml");
    let mut used = BTreeSet::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            used.extend(queried(rule["expr"].as_str().unwrap()));
        }
    }
    assert_exported(&used, "the alert rules");
}

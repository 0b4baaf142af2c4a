//! What the lab plays of Kubernetes, read from `k8s/app/`: the ConfigMap's settings, the
//! HPA and the Deployment's surge and readinessProbe, and the sizing formula. The one
//! Rust reader of the manifests: the checks (`sizing`, `manifests`) and the contract
//! tests read `k8s/` through `documents`, `find` and `manifest`.

use std::collections::BTreeMap;
use std::path::Path;

use clap::Parser;

use crate::util::Error;

/// sluice's memory, M(C) = base + k × C for C open connections: docs/deploy.md's sizing
/// formula, whose figures docs/sizing.json holds for the deploy checks and the lab alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemFormula {
    pub base_mib: f64,
    pub per_conn_kib: f64,
}

impl MemFormula {
    /// sluice's, from docs/sizing.json (compiled in: the lab judges the checkout it was
    /// built from).
    pub fn sluice() -> MemFormula {
        let sizing: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/sizing.json"))
                .expect("docs/sizing.json is JSON");
        let figure = |k: &str| {
            sizing["sluice"][k]
                .as_f64()
                .unwrap_or_else(|| panic!("docs/sizing.json has sluice.{k}"))
        };
        MemFormula {
            base_mib: figure("base"),
            per_conn_kib: figure("k_kib"),
        }
    }

    pub fn mib(&self, conns: f64) -> f64 {
        self.base_mib + self.per_conn_kib * conns / 1024.0
    }
}

/// A replica's settings (`STATE/sluice.env`, by environment name) as sluice itself reads
/// them: each passed as the flag clap declares for that name, so that the lab's figures
/// are the replicas' own and no default is written twice.
pub fn sluice_config(settings: &BTreeMap<String, String>) -> Result<sluice::config::Config, Error> {
    use clap::CommandFactory;
    let mut args = vec!["sluice".to_string()];
    for arg in sluice::config::Cli::command().get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env().and_then(|n| n.to_str()), arg.get_long())
        else {
            continue;
        };
        if let Some(value) = settings.get(name) {
            args.push(format!("--{long}={value}"));
        }
    }
    Ok(sluice::config::Cli::try_parse_from(args)?.config)
}

/// The settings the lab manages itself, per replica: never taken from the caller.
const PER_REPLICA: [&str; 5] = ["MONGO_URI", "REDIS_URL", "POD_NAME", "APP_HOST", "APP_PORT"];

/// A lab replica's environment, a later line winning: the ConfigMap's data, then `lab`
/// (KEY=VALUE), then each setting sluice reads (its clap names) that this process's
/// environment holds.
pub fn replica_settings(root: &Path, lab: &[String]) -> Result<Vec<String>, Error> {
    use clap::CommandFactory;
    let text = std::fs::read_to_string(root.join("k8s/app/configmap.yaml"))?;
    let mut lines: Vec<String> = configmap_data(&text)?
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    lines.extend(lab.iter().cloned());
    for arg in sluice::config::Cli::command().get_arguments() {
        let Some(name) = arg.get_env().and_then(|n| n.to_str()) else {
            continue;
        };
        if let (false, Ok(value)) = (PER_REPLICA.contains(&name), std::env::var(name)) {
            lines.push(format!("{name}={value}"));
        }
    }
    Ok(lines)
}

pub fn configmap_data(text: &str) -> Result<Vec<(String, String)>, Error> {
    string_map(text, "data", "configmap.yaml")
}

/// `key`'s map of a manifest, every value a string (a ConfigMap's `data`, a Secret's
/// `stringData`), in its order.
fn string_map(text: &str, key: &str, file: &str) -> Result<Vec<(String, String)>, Error> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text)?;
    let data = doc[key]
        .as_mapping()
        .ok_or(format!("{file}: no {key} map"))?;
    data.iter()
        .map(|(k, v)| match (k.as_str(), v.as_str()) {
            (Some(k), Some(v)) => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{file}: {k:?} is not a string setting").into()),
        })
        .collect()
}

/// A sluice pod's settings as the Deployment builds its environment (`envFrom`): the
/// ConfigMap's `data` and the Secret's `stringData`, by environment name.
pub fn pod_settings(root: &Path) -> Result<BTreeMap<String, String>, Error> {
    let read = |f: &str| std::fs::read_to_string(root.join("k8s/app").join(f));
    let mut settings: BTreeMap<String, String> = configmap_data(&read("configmap.yaml")?)?
        .into_iter()
        .collect();
    settings.extend(string_map(
        &read("secret.yaml")?,
        "stringData",
        "secret.yaml",
    )?);
    Ok(settings)
}

/// Every object of the `.yaml` files in `dir` (under `root`), in file order; a file may
/// hold several documents. A kustomization.yaml is not an object and is left out.
pub fn documents(root: &Path, dir: &str) -> Result<Vec<serde_yaml::Value>, Error> {
    Ok(sourced_documents(root, dir)?
        .into_iter()
        .map(|(_, doc)| doc)
        .collect())
}

/// `documents`, each with the file it came from as `dir/NAME.yaml`: for the checks whose
/// subject is the files' order (`kubectl apply -f DIR` applies them sorted by name).
pub fn sourced_documents(
    root: &Path,
    dir: &str,
) -> Result<Vec<(String, serde_yaml::Value)>, Error> {
    use serde::Deserialize;
    let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
        .map_err(|e| format!("{dir}: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let name = format!(
            "{dir}/{}",
            f.file_name().unwrap_or_default().to_string_lossy()
        );
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v =
                serde_yaml::Value::deserialize(doc).map_err(|e| format!("{}: {e}", f.display()))?;
            if !v.is_null() && v["kind"] != "Kustomization" {
                docs.push((name.clone(), v));
            }
        }
    }
    Ok(docs)
}

/// The one object of `kind` named `name` among `docs`.
pub fn find<'a>(
    docs: &'a [serde_yaml::Value],
    kind: &str,
    name: &str,
) -> Result<&'a serde_yaml::Value, Error> {
    let mut hits = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    match (hits.next(), hits.next()) {
        (Some(d), None) => Ok(d),
        (None, _) => Err(format!("no {kind} {name}").into()),
        (Some(_), Some(_)) => Err(format!("more than one {kind} {name}").into()),
    }
}

/// A manifest of the repository at `root`, parsed.
pub fn manifest(root: &Path, path: &str) -> Result<serde_yaml::Value, Error> {
    let text = std::fs::read_to_string(root.join(path)).map_err(|e| format!("{path}: {e}"))?;
    Ok(serde_yaml::from_str(&text).map_err(|e| format!("{path}: {e}"))?)
}

// ------------------------------------------------------------------------- the HPA

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub pods: bool,
    pub value: f64,
    pub period_s: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Behavior {
    pub window_s: f64,
    pub select_max: bool,
    pub policies: Vec<Policy>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hpa {
    pub min: u32,
    pub max: u32,
    pub target_pct: f64,
    pub up: Behavior,
    pub down: Behavior,
    pub surge: u32,
    pub memory_request_mib: f64,
}

/// The parts of `autoscaling/v2` HorizontalPodAutoscaler the lab uses.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HpaSpec {
    min_replicas: Option<u32>,
    max_replicas: u32,
    metrics: Vec<serde_yaml::Value>,
    #[serde(default)]
    behavior: BehaviorSpec,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct BehaviorSpec {
    scale_up: Option<RulesSpec>,
    scale_down: Option<RulesSpec>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RulesSpec {
    stabilization_window_seconds: Option<f64>,
    select_policy: Option<String>,
    #[serde(default)]
    policies: Vec<PolicySpec>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    #[serde(rename = "type")]
    kind: String,
    value: f64,
    period_seconds: f64,
}

impl Behavior {
    /// Kubernetes' defaults where the spec is silent: no scale-up window, a 300 s
    /// scale-down window, the policy allowing the most change.
    fn from_spec(spec: Option<RulesSpec>, default_window_s: f64) -> Behavior {
        let spec = spec.unwrap_or(RulesSpec {
            stabilization_window_seconds: None,
            select_policy: None,
            policies: vec![],
        });
        Behavior {
            window_s: spec
                .stabilization_window_seconds
                .unwrap_or(default_window_s),
            select_max: spec.select_policy.as_deref() != Some("Min"),
            policies: spec
                .policies
                .into_iter()
                .map(|p| Policy {
                    pods: p.kind == "Pods",
                    value: p.value,
                    period_s: p.period_seconds,
                })
                .collect(),
        }
    }
}

/// The sluice container's readinessProbe as "PATH PERIOD_S TIMEOUT_S FAILURES SUCCESSES",
/// with Kubernetes' defaults where the manifest is silent (10 s, 1 s, 3, 1).
pub fn readiness_probe(root: &Path) -> Result<String, Error> {
    let dep: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("k8s/app/deployment.yaml"),
    )?)?;
    let probe = dep["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "sluice"))
        .map(|c| &c["readinessProbe"])
        .ok_or("deployment.yaml: no sluice container")?;
    let path = probe["httpGet"]["path"]
        .as_str()
        .ok_or("deployment.yaml: the readinessProbe is not an httpGet")?;
    let field = |name: &str, default: u64| probe[name].as_u64().unwrap_or(default);
    Ok(format!(
        "{path} {} {} {} {}",
        field("periodSeconds", 10),
        field("timeoutSeconds", 1),
        field("failureThreshold", 3),
        field("successThreshold", 1)
    ))
}

impl Hpa {
    pub fn load(root: &Path) -> Result<Hpa, Error> {
        let hpa = std::fs::read_to_string(root.join("k8s/app/hpa.yaml"))?;
        let dep = std::fs::read_to_string(root.join("k8s/app/deployment.yaml"))?;
        Hpa::parse(&hpa, &dep)
    }

    /// From the HPA's spec, and the Deployment's `maxSurge` and the sluice container's
    /// CPU request (what the HPA's utilisation is a percentage of).
    pub fn parse(hpa: &str, deployment: &str) -> Result<Hpa, Error> {
        let hpa: serde_yaml::Value = serde_yaml::from_str(hpa)?;
        let spec: HpaSpec = serde_yaml::from_value(hpa["spec"].clone())?;
        let target_pct = spec
            .metrics
            .iter()
            .filter(|m| m["resource"]["name"] == "memory")
            .find_map(|m| m["resource"]["target"]["averageUtilization"].as_f64())
            .ok_or("hpa.yaml: no memory averageUtilization target")?;
        let dep: serde_yaml::Value = serde_yaml::from_str(deployment)?;
        let surge = match &dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] {
            serde_yaml::Value::Number(n) => n.as_u64().map_or(1, |n| n as u32),
            // A percentage rounds up, as the Deployment controller does.
            serde_yaml::Value::String(p) => {
                let pct: f64 = p.trim_end_matches('%').parse()?;
                (f64::from(spec.max_replicas) * pct / 100.0).ceil() as u32
            }
            // Kubernetes' default is 25 %.
            _ => (f64::from(spec.max_replicas) * 0.25).ceil() as u32,
        };
        let memory = dep["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .and_then(|c| c.iter().find(|c| c["name"] == "sluice"))
            .and_then(|c| {
                c["resources"]["requests"]["memory"]
                    .as_str()
                    .map(str::to_string)
            })
            .ok_or("deployment.yaml: no memory request on the sluice container")?;
        let memory_request_mib = match memory.strip_suffix("Mi") {
            Some(m) => m.parse::<f64>()?,
            None => {
                memory
                    .strip_suffix("Gi")
                    .ok_or("deployment.yaml: the memory request is not in Mi or Gi")?
                    .parse::<f64>()?
                    * 1024.0
            }
        };
        Ok(Hpa {
            min: spec.min_replicas.unwrap_or(1),
            max: spec.max_replicas,
            target_pct,
            up: Behavior::from_spec(spec.behavior.scale_up, 0.0),
            down: Behavior::from_spec(spec.behavior.scale_down, 300.0),
            surge,
            memory_request_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn reads_the_hpa_and_the_surge() {
        let h = Hpa::load(&repo()).unwrap();
        assert!(h.min >= 1 && h.max >= h.min);
        assert!(h.target_pct > 0.0 && h.memory_request_mib > 0.0);
        assert!(!h.up.policies.is_empty() && !h.down.policies.is_empty());
        assert!(h.surge >= 1);
    }

    #[test]
    fn memory_formula_is_docs_sizing_json() {
        let m = MemFormula::sluice();
        assert!(m.base_mib > 0.0 && m.per_conn_kib > 0.0, "{m:?}");
        assert_eq!(m.mib(1024.0), m.base_mib + m.per_conn_kib);
    }

    #[test]
    fn settings_are_read_by_sluices_own_parser_under_their_env_names() {
        let settings: BTreeMap<String, String> = [
            ("DB_COMMAND_BUDGET", "20"),
            ("DB_TIMEOUT_MS", "1500"),
            ("WRITE_JOURNAL", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = sluice_config(&settings).unwrap();
        assert_eq!(c.budget.db_command_budget, 20);
        assert_eq!(c.store.db_timeout, std::time::Duration::from_millis(1500));
        let bad = [("DB_COMMAND_BUDGET".to_string(), "lots".to_string())].into();
        assert!(sluice_config(&bad).is_err());
    }

    #[test]
    fn a_replicas_settings_are_the_clusters_then_the_labs() {
        let lines = replica_settings(&repo(), &["LOG_FORMAT=text".into()]).unwrap();
        let at = |line: &str| lines.iter().position(|l| l == line);
        // The ConfigMap's json first, the lab's text after it (a later line wins).
        assert!(at("DB_COMMAND_BUDGET=50").is_some(), "{lines:?}");
        assert!(at("LOG_FORMAT=json") < at("LOG_FORMAT=text"), "{lines:?}");
        assert!(at("LOG_FORMAT=json").is_some(), "{lines:?}");
    }

    #[test]
    fn configmap_data_is_read_as_environment() {
        let d = configmap_data(
            "metadata:\n  name: x\ndata:\n  # c\n  A_B: \"50\"\n  LOG: json\nother:\n  C: 1\n",
        )
        .unwrap();
        assert_eq!(
            d,
            vec![("A_B".into(), "50".into()), ("LOG".into(), "json".into())]
        );
    }
}

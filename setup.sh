#!/usr/bin/env bash
# Runs sluice, MongoDB and Redis on a local k3d cluster, reachable at
# http://assessment.local through k3d's load balancer and k3s' Traefik.
# Safe to run again: every step checks what is already there. `./setup.sh --help`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The local lab (no Docker, no cluster) has its own script; everything after --local is its.
if [ "${1:-}" = "--local" ]; then
  shift
  exec "$ROOT/lab/setup-local.sh" "$@"
fi

CLUSTER=${SLUICE_CLUSTER:-sluice}
IMAGE=sluice:local # k8s/app/deployment.yaml names this tag
K3S_IMAGE=${SLUICE_K3S_IMAGE:-rancher/k3s:v1.30.11-k3s1}
AGENTS=2
HTTP_PORT=80
TIMEOUT=300
BUILD=1
SMOKE=1
ADD_HOSTS=0
HOST=assessment.local
HOSTS_FILE=${SLUICE_HOSTS_FILE:-/etc/hosts} # overridable for scripts/deploy/test-scripts.sh
NS=assessment
# nginx in k3d's load balancer: 10,000 clients are 20,000 connections (client + upstream),
# and one worker may take most of them.
LB_WORKER_CONNECTIONS=32768

usage() {
  cat <<EOF
Usage: ./setup.sh [options]
       ./setup.sh --local [lab options]   run everything on this machine, without Docker
                                          (hands over to lab/setup-local.sh)

Creates (or reuses) a k3d cluster with 2 agents and host port 80 on its load balancer,
builds the sluice image and imports it, applies k8s/ (namespace, MongoDB, Redis, sluice,
Traefik tuning), waits for every rollout, then smoke-tests http://$HOST through the
Ingress. Needs docker, k3d (v5.5 or newer), kubectl and curl.

Options:
  -n, --name NAME       cluster name (default: $CLUSTER; env SLUICE_CLUSTER)
      --agents N        agent nodes when creating the cluster (default: $AGENTS)
      --k3s-image IMG   k3s node image, Kubernetes 1.30 or newer
                        (default: $K3S_IMAGE; env SLUICE_K3S_IMAGE)
      --http-port PORT  host port for the load balancer's port 80 (default: $HTTP_PORT)
      --timeout SECS    how long to wait for each rollout (default: $TIMEOUT)
      --skip-build      reuse the existing $IMAGE image instead of running docker build
      --no-smoke        skip the smoke test through the Ingress
      --add-hosts       add "127.0.0.1 $HOST" to /etc/hosts (uses sudo)
  -h, --help            show this help

Undo everything with ./cleanup.sh.
EOF
}

die_usage() { printf 'setup.sh: %s\nTry ./setup.sh --help\n' "$1" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    -n | --name) [ $# -ge 2 ] || die_usage "$1 needs a value"; CLUSTER=$2; shift 2 ;;
    --agents) [ $# -ge 2 ] || die_usage "$1 needs a value"; AGENTS=$2; shift 2 ;;
    --k3s-image) [ $# -ge 2 ] || die_usage "$1 needs a value"; K3S_IMAGE=$2; shift 2 ;;
    --http-port) [ $# -ge 2 ] || die_usage "$1 needs a value"; HTTP_PORT=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die_usage "$1 needs a value"; TIMEOUT=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    --no-smoke) SMOKE=0; shift ;;
    --add-hosts) ADD_HOSTS=1; shift ;;
    --local) die_usage "--local must be the first argument" ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown option '$1'" ;;
  esac
done
for n in "$AGENTS" "$HTTP_PORT" "$TIMEOUT"; do
  case $n in '' | *[!0-9]*) die_usage "'$n' is not a number" ;; esac
done

CONTEXT=k3d-$CLUSTER
if [ "$HTTP_PORT" = 80 ]; then BASE_URL=http://$HOST; else BASE_URL=http://$HOST:$HTTP_PORT; fi

# ------------------------------------------------------------------ output helpers

if [ -t 1 ]; then B=$'\033[1m' R=$'\033[31m' G=$'\033[32m' Y=$'\033[33m' N=$'\033[0m'; else B='' R='' G='' Y='' N=''; fi
STEP=0
STEPS=8
step() { STEP=$((STEP + 1)); printf '\n%s==> [%d/%d] %s%s  (%ds)\n' "$B" "$STEP" "$STEPS" "$*" "$N" "$SECONDS"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    %sok%s %s\n' "$G" "$N" "$*"; }
warn() { printf '    %swarning:%s %s\n' "$Y" "$N" "$*" >&2; }
# die WHAT NEXT...: the failure, then what to try next, one line each.
die() {
  printf '\n%sfailed:%s %s\n' "$R" "$N" "$1" >&2
  shift
  [ $# -gt 0 ] && printf 'next:\n' >&2
  for hint in "$@"; do printf '    %s\n' "$hint" >&2; done
  exit 1
}
trap 'printf "\n%sfailed%s at line %s (after %ss): %s\n" "$R" "$N" "$LINENO" "$SECONDS" "$BASH_COMMAND" >&2' ERR

k() { kubectl --context "$CONTEXT" "$@"; }

# ------------------------------------------------------------------ 1. preflight

step "Preflight: tools, Docker, port $HTTP_PORT"
os=$(uname -s)
hint_for() {
  case $1:$os in
    docker:Darwin) echo "install Docker Desktop (https://docs.docker.com/desktop/) or colima, then start it" ;;
    docker:*) echo "install Docker Engine (https://docs.docker.com/engine/install/), then: sudo systemctl start docker" ;;
    k3d:Darwin) echo "brew install k3d" ;;
    k3d:*) echo "curl -s https://raw.githubusercontent.com/k3d-io/k3d/main/install.sh | bash   (or see https://k3d.io)" ;;
    kubectl:Darwin) echo "brew install kubectl" ;;
    kubectl:*) echo "see https://kubernetes.io/docs/tasks/tools/ (or: sudo snap install kubectl --classic)" ;;
    curl:Darwin) echo "brew install curl" ;;
    curl:*) echo "sudo apt-get install -y curl   (or your distribution's package)" ;;
  esac
}
missing=()
for tool in docker k3d kubectl curl; do
  if command -v "$tool" >/dev/null 2>&1; then ok "$tool: $(command -v "$tool")"; else missing+=("$tool"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  hints=()
  for tool in "${missing[@]}"; do hints+=("$tool: $(hint_for "$tool")"); done
  die "missing: ${missing[*]}" "${hints[@]}" "then run ./setup.sh again"
fi
docker info >/dev/null 2>&1 ||
  die "docker is installed but its daemon does not answer ('docker info' fails)" \
    "start it: sudo systemctl start docker (Linux) or open Docker Desktop (macOS/Windows)" \
    "if it is running, check you may use it: docker ps (Linux: add yourself to the docker group, then log in again)"
ok "docker daemon answers"
k3d_version=$(k3d version 2>/dev/null | sed -n 's/^k3d version v\{0,1\}\([0-9][0-9.]*\).*/\1/p' | head -n 1)
k3d_major=${k3d_version%%.*}
k3d_minor=${k3d_version#*.}; k3d_minor=${k3d_minor%%.*}
if [ -z "$k3d_version" ] || [ "$k3d_major" -lt 5 ] || { [ "$k3d_major" -eq 5 ] && [ "$k3d_minor" -lt 5 ]; }; then
  die "k3d ${k3d_version:-of unknown version} is too old: v5.5 or newer is needed (--lb-config-override, --runtime-ulimit)" \
    "upgrade k3d: $(hint_for k3d)"
fi
ok "k3d v$k3d_version"
[ -f "$ROOT/Dockerfile" ] || die "no Dockerfile beside setup.sh" "run setup.sh from a full clone of the repository"

cluster_exists=0
if k3d cluster get "$CLUSTER" >/dev/null 2>&1; then cluster_exists=1; fi
if [ "$cluster_exists" = 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; then
  die "something on this machine already listens on port $HTTP_PORT, which the cluster's load balancer needs" \
    "find it: sudo lsof -iTCP:$HTTP_PORT -sTCP:LISTEN   (or: sudo ss -ltnp 'sport = :$HTTP_PORT')" \
    "stop it, or use another port: ./setup.sh --http-port 8080"
fi
ok "port $HTTP_PORT $([ "$cluster_exists" = 1 ] && echo "belongs to the existing cluster" || echo "is free")"

# ------------------------------------------------------------------ 2. cluster

step "Cluster '$CLUSTER' (1 server, $AGENTS agents, port $HTTP_PORT -> load balancer -> Traefik)"
if [ "$cluster_exists" = 1 ]; then
  info "exists: reusing it (./cleanup.sh removes it)"
  k3d cluster start "$CLUSTER" --wait >/dev/null 2>&1 || true
  k3d kubeconfig merge "$CLUSTER" --kubeconfig-merge-default >/dev/null ||
    die "cannot write the kubeconfig for '$CLUSTER'" "k3d kubeconfig merge $CLUSTER --kubeconfig-merge-default"
else
  create=(k3d cluster create "$CLUSTER"
    --image "$K3S_IMAGE"
    --agents "$AGENTS"
    --port "$HTTP_PORT:80@loadbalancer"
    --lb-config-override "settings.workerConnections=$LB_WORKER_CONNECTIONS"
    --wait --timeout 300s)
  # File descriptors for 10,000 connections per proxy; older k3d lacks the flag.
  if k3d cluster create --help 2>/dev/null | grep -q -- '--runtime-ulimit'; then
    create+=(--runtime-ulimit "nofile=1048576:1048576")
  fi
  info "${create[*]}"
  "${create[@]}" ||
    die "k3d could not create the cluster" \
      "its containers: docker ps -a --filter name=k3d-$CLUSTER" \
      "start clean: ./cleanup.sh && ./setup.sh"
fi
k get nodes >/dev/null 2>&1 ||
  die "kubectl cannot reach the cluster (context $CONTEXT)" \
    "kubectl config get-contexts" "k3d cluster list" "./cleanup.sh && ./setup.sh"
server_minor=$(k version -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -n 1 || true)
if [ -n "$server_minor" ] && [ "$server_minor" -lt 30 ]; then
  die "the cluster runs Kubernetes 1.$server_minor; sluice's preStop sleep action needs 1.30 or newer" \
    "./cleanup.sh && ./setup.sh   (creates it with $K3S_IMAGE)"
fi
ok "$(k get nodes --no-headers 2>/dev/null | wc -l | tr -d ' ') nodes ready, Kubernetes 1.${server_minor:-?}, context $CONTEXT"
lb_nofile=$(docker exec "k3d-$CLUSTER-serverlb" sh -c 'ulimit -n' 2>/dev/null || echo unknown)
case $lb_nofile in
  unlimited) ok "load balancer: unlimited open files" ;;
  '' | *[!0-9]*) warn "could not read the load balancer's open-file limit" ;;
  *)
    if [ "$lb_nofile" -lt 40000 ]; then
      warn "k3d's load balancer may open only $lb_nofile files: 10,000 clients need ~20,000."
      warn "Raise Docker's default (daemon.json: \"default-ulimits\": {\"nofile\": {\"Name\": \"nofile\", \"Soft\": 1048576, \"Hard\": 1048576}}),"
      warn "restart Docker, then ./cleanup.sh && ./setup.sh. Small runs (PROFILE=smoke) are unaffected."
    else
      ok "load balancer: $lb_nofile open files, $LB_WORKER_CONNECTIONS connections per nginx worker"
    fi ;;
esac

# ------------------------------------------------------------------ 3. traefik

step "Traefik tuning for 10,000 connections (k8s/traefik)"
# k3s registers the HelmChartConfig kind shortly after its API answers: retry briefly.
deadline=$((SECONDS + 120))
until k apply -f "$ROOT/k8s/traefik/" >/dev/null 2>&1; do
  [ "$SECONDS" -lt "$deadline" ] ||
    die "could not apply k8s/traefik/ (is this a k3s cluster?)" \
      "kubectl --context $CONTEXT apply -f k8s/traefik/   (shows the error)" \
      "kubectl --context $CONTEXT get crd helmchartconfigs.helm.cattle.io"
  sleep 3
done
ok "HelmChartConfig kube-system/traefik applied"
info "waiting for k3s to (re)deploy Traefik with it..."
deadline=$((SECONDS + TIMEOUT))
until k -n kube-system get deployment traefik >/dev/null 2>&1; do
  [ "$SECONDS" -lt "$deadline" ] ||
    die "Traefik was not installed within ${TIMEOUT}s" \
      "k -n kube-system get pods,jobs   (the helm-install-traefik job installs it)" \
      "k -n kube-system logs job/helm-install-traefik"
  sleep 3
done
k -n kube-system rollout status deployment/traefik --timeout="${TIMEOUT}s" >/dev/null ||
  die "Traefik did not become ready" "kubectl --context $CONTEXT -n kube-system describe deployment traefik"
ok "Traefik ready ($(k -n kube-system get deployment traefik -o jsonpath='{.status.readyReplicas}') replicas)"

# ------------------------------------------------------------------ 4. image

step "Image $IMAGE"
if [ "$BUILD" = 1 ]; then
  info "docker build -t $IMAGE .   (first build compiles every dependency: several minutes)"
  docker build -t "$IMAGE" "$ROOT" ||
    die "docker build failed" "read the error above; the build runs: cargo build --release --locked" \
      "the same build without Docker: cargo build --release --locked"
elif ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  die "--skip-build, but there is no $IMAGE image yet" "run ./setup.sh without --skip-build"
fi
image_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
image_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
ok "$IMAGE ${image_id#sha256:} ($image_mb MB)"
k3d image import "$IMAGE" --cluster "$CLUSTER" >/dev/null ||
  die "k3d image import failed" "k3d image import $IMAGE --cluster $CLUSTER --verbose"
ok "imported into every node of '$CLUSTER'"

# ------------------------------------------------------------------ 5. manifests

step "Manifests (k8s/base, mongodb, redis, app)"
for dir in base mongodb redis app; do
  k apply -f "$ROOT/k8s/$dir/" | sed 's/^/    /'
done
# A rebuilt image keeps its tag: stamp its ID on the pod template so a change rolls out
# (and an unchanged image does not).
k -n "$NS" patch deployment sluice --type merge \
  -p "{\"spec\":{\"template\":{\"metadata\":{\"annotations\":{\"sluice/image-id\":\"${image_id#sha256:}\"}}}}}" |
  sed 's/^/    /'

# ------------------------------------------------------------------ 6. rollouts

step "Rollouts (up to ${TIMEOUT}s each)"
for deploy in mongo redis sluice; do
  if k -n "$NS" rollout status "deployment/$deploy" --timeout="${TIMEOUT}s" >/dev/null; then
    ok "$deploy ready ($(k -n "$NS" get deployment "$deploy" -o jsonpath='{.status.readyReplicas}') replicas)"
  else
    k -n "$NS" get pods -o wide >&2 || true
    die "deployment/$deploy was not ready within ${TIMEOUT}s" \
      "kubectl --context $CONTEXT -n $NS describe pods -l app.kubernetes.io/name=$deploy" \
      "kubectl --context $CONTEXT -n $NS logs -l app.kubernetes.io/name=$deploy --tail=50" \
      "kubectl --context $CONTEXT -n $NS get events --sort-by=.lastTimestamp | tail -20" \
      "then ./setup.sh again (it picks up where it stopped), or --timeout 600 on a slow machine"
  fi
done

# ------------------------------------------------------------------ 7. smoke test

step "Smoke test through the Ingress ($BASE_URL)"
RESOLVE=(--resolve "$HOST:$HTTP_PORT:127.0.0.1")
BODY=$(mktemp)
trap 'rm -f "$BODY"' EXIT
# fetch PATH: prints "<status> <body>".
fetch() {
  : >"$BODY"
  curl -sS -m 10 "${RESOLVE[@]}" -H 'Accept: application/json' -o "$BODY" \
    -w '%{http_code}' "$BASE_URL$1" 2>/dev/null || true
  printf ' '
  head -c 300 "$BODY" 2>/dev/null || true
}
if [ "$SMOKE" = 1 ]; then
  # Traefik needs a moment to pick up a new Ingress, readiness a moment to see MongoDB.
  for path in /healthz /readyz; do
    deadline=$((SECONDS + 120))
    until out=$(fetch "$path") && [ "${out%% *}" = 200 ]; do
      [ "$SECONDS" -lt "$deadline" ] ||
        die "GET $path through the Ingress answered: ${out:-nothing}" \
          "kubectl --context $CONTEXT -n $NS get ingress,svc,endpoints" \
          "kubectl --context $CONTEXT -n kube-system logs deployment/traefik --tail=30" \
          "curl -v --resolve $HOST:$HTTP_PORT:127.0.0.1 $BASE_URL$path"
      sleep 2
    done
    ok "GET $path -> ${out:0:120}"
  done
  out=$(fetch /api/data)
  case $out in
    200*'"status":"success"'* | 200*'"status": "success"'*) ok "GET /api/data -> ${out:0:120}..." ;;
    *) die "GET /api/data answered: ${out:-nothing}" \
      "kubectl --context $CONTEXT -n $NS logs -l app.kubernetes.io/name=sluice --tail=50" \
      "kubectl --context $CONTEXT -n $NS exec deploy/sluice -- /usr/local/bin/sluice check" ;;
  esac
  out=$(fetch /api/cache/status)
  [ "${out%% *}" = 200 ] || die "GET /api/cache/status answered: ${out:-nothing}" \
    "kubectl --context $CONTEXT -n $NS logs -l app.kubernetes.io/name=sluice --tail=50"
  ok "GET /api/cache/status -> ${out:0:120}..."
else
  info "skipped (--no-smoke)"
fi

# ------------------------------------------------------------------ 8. hosts line, next commands

step "Hosts line and next steps"
hosts_line="127.0.0.1 $HOST"
if grep -Eq "^[[:space:]]*127\.0\.0\.1[[:space:]]+([^#]*[[:space:]])?$HOST([[:space:]]|$)" "$HOSTS_FILE" 2>/dev/null; then
  ok "$HOSTS_FILE already maps $HOST"
elif [ "$ADD_HOSTS" = 1 ]; then
  if [ -w "$HOSTS_FILE" ]; then
    printf '%s\n' "$hosts_line" >>"$HOSTS_FILE"
  else
    info "adding '$hosts_line' to $HOSTS_FILE with sudo"
    printf '%s\n' "$hosts_line" | sudo tee -a "$HOSTS_FILE" >/dev/null
  fi
  ok "$HOSTS_FILE maps $HOST"
else
  printf '\n  Add this line to /etc/hosts (or run ./setup.sh --add-hosts):\n\n    %s\n' "$hosts_line"
fi
cat <<EOF

  Try it:
    curl $BASE_URL/api/data
    curl --resolve $HOST:$HTTP_PORT:127.0.0.1 $BASE_URL/api/cache/status   # without the hosts line

  Load test (k6, see stress-test/README.md):
    k6 run -e BASE_URL=$BASE_URL -e PROFILE=smoke stress-test/stress-test.js   # 100 VUs, 30 s
    k6 run -e BASE_URL=$BASE_URL stress-test/stress-test.js                    # the full 13-minute profile

  Watch (kubectl context $CONTEXT):
    kubectl -n $NS get pods -o wide -w
    kubectl -n $NS get hpa sluice -w
    kubectl -n $NS top pods
    kubectl -n $NS logs -l app.kubernetes.io/name=sluice -f --max-log-requests 10
    kubectl -n $NS exec deploy/sluice -- /usr/local/bin/sluice status --url http://127.0.0.1:8000

  Remove it all: ./cleanup.sh
EOF
printf '\n%ssetup finished in %ds%s\n' "$G" "$SECONDS" "$N"

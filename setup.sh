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
IMAGE=sluice:local # what docker build tags; the pods run this build's own tag, sluice:build-<id>
                   # (steps 4 and 5), set by kustomize over k8s/app/deployment.yaml's sluice:local
# Kubernetes 1.36 (1.30, the line this used before, is out of support). 1.35 and newer
# refuse cgroup v1 hosts unless told otherwise: the preflight handles that.
K3S_IMAGE=${SLUICE_K3S_IMAGE:-rancher/k3s:v1.36.4-k3s1}
# AGENTS, NODE_MEMORY and MONITORING_NODE_MEMORY: the cluster's size, which docs/deploy.md
# sums the pods' requests and limits against (lab/src/sizing.rs).
# shellcheck source=k8s/cluster.env
. "$ROOT/k8s/cluster.env"
# What was asked for explicitly (an option, or its env variable): on an existing cluster,
# which these cannot change, an explicit value that differs stops setup.sh, and an
# unasked one is read from the cluster instead.
K3S_IMAGE_SET=0
[ -z "${SLUICE_K3S_IMAGE:-}" ] || K3S_IMAGE_SET=1
AGENTS_SET=0
HTTP_PORT_SET=0
RECREATE=0
NODE_MEMORY=${SLUICE_NODE_MEMORY:-$NODE_MEMORY}
NODE_MEMORY_SET=0
[ -z "${SLUICE_NODE_MEMORY:-}" ] || NODE_MEMORY_SET=1
MONITORING=0
RESET_DATA=0
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
builds the sluice image and imports it into every node, applies k8s/ (namespace,
MongoDB, Redis, sluice, Traefik tuning), waits for every rollout and for Traefik to run
with its tuning, then smoke-tests http://$HOST through the Ingress. Needs docker, k3d
(v5.5 or newer), kubectl and curl.

Options:
  -n, --name NAME       cluster name (default: $CLUSTER; env SLUICE_CLUSTER)
      --agents N        agent nodes, when creating the cluster (default: $AGENTS)
      --k3s-image IMG   k3s node image, Kubernetes 1.30 or newer
                        (default: $K3S_IMAGE; env SLUICE_K3S_IMAGE)
      --node-memory M   memory per node, when creating the cluster, e.g. 3g
                        (default: $NODE_MEMORY, $MONITORING_NODE_MEMORY with --monitoring; env SLUICE_NODE_MEMORY)
      --http-port PORT  host port for the load balancer's port 80, when creating the
                        cluster (default: $HTTP_PORT; an existing cluster's own otherwise)
      --recreate        delete the existing cluster (its volumes and MongoDB's data with
                        it) and create it again, with --agents, --node-memory,
                        --http-port and --k3s-image as given
      --timeout SECS    how long to wait for each rollout (default: $TIMEOUT)
      --skip-build      reuse the existing $IMAGE image instead of running docker build
      --no-smoke        skip the smoke test through the Ingress
      --add-hosts       add "127.0.0.1 $HOST" to /etc/hosts (uses sudo)
      --monitoring      also install Prometheus and Grafana (kube-prometheus-stack),
                        with sluice's dashboard and alert rules
      --reset-data      delete MongoDB's data (the deployment and its volume) and start
                        it empty: every full run leaves GBs behind on the Docker disk
  -h, --help            show this help

An existing cluster keeps the agents, node memory, host port and k3s image it was
created with: setup.sh reuses it as it is, and stops when one of those options asks
for something else (--recreate applies them). One setup.sh runs at a time. A
--reset-data that was interrupted is finished by the next run.

Undo everything with ./cleanup.sh.
EOF
}

die_usage() { printf 'setup.sh: %s\nTry ./setup.sh --help\n' "$1" >&2; exit 2; }

ARGS=("$@") # as given, for the hints
while [ $# -gt 0 ]; do
  case $1 in
    -n | --name) [ $# -ge 2 ] || die_usage "$1 needs a value"; CLUSTER=$2; shift 2 ;;
    --agents) [ $# -ge 2 ] || die_usage "$1 needs a value"; AGENTS=$2; AGENTS_SET=1; shift 2 ;;
    --k3s-image) [ $# -ge 2 ] || die_usage "$1 needs a value"; K3S_IMAGE=$2; K3S_IMAGE_SET=1; shift 2 ;;
    --http-port) [ $# -ge 2 ] || die_usage "$1 needs a value"; HTTP_PORT=$2; HTTP_PORT_SET=1; shift 2 ;;
    --recreate) RECREATE=1; shift ;;
    --timeout) [ $# -ge 2 ] || die_usage "$1 needs a value"; TIMEOUT=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    --no-smoke) SMOKE=0; shift ;;
    --add-hosts) ADD_HOSTS=1; shift ;;
    --node-memory) [ $# -ge 2 ] || die_usage "$1 needs a value"; NODE_MEMORY=$2; NODE_MEMORY_SET=1; shift 2 ;;
    --monitoring) MONITORING=1; shift ;;
    --reset-data) RESET_DATA=1; shift ;;
    --local) die_usage "--local must be the first argument" ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown option '$1'" ;;
  esac
done
for n in "$AGENTS" "$HTTP_PORT" "$TIMEOUT"; do
  case $n in '' | *[!0-9]*) die_usage "'$n' is not a number" ;; esac
done
if [ "$MONITORING" = 1 ] && [ "$NODE_MEMORY_SET" = 0 ]; then NODE_MEMORY=$MONITORING_NODE_MEMORY; fi
[[ $NODE_MEMORY =~ ^[1-9][0-9]*[gm]$ ]] || die_usage "--node-memory '$NODE_MEMORY': use e.g. 3g or 3072m"

CONTEXT=k3d-$CLUSTER
if [ "$HTTP_PORT" = 80 ]; then BASE_URL=http://$HOST; else BASE_URL=http://$HOST:$HTTP_PORT; fi

# ------------------------------------------------------------------ output helpers

if [ -t 1 ]; then B=$'\033[1m' R=$'\033[31m' G=$'\033[32m' Y=$'\033[33m' N=$'\033[0m'; else B='' R='' G='' Y='' N=''; fi
STEP=0
STEPS=$((8 + MONITORING))
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

step "Preflight: tools, Docker, the cluster and its port"
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
# Kubernetes 1.35+ kubelets refuse to start on a cgroup v1 host unless told to.
K3S_ARGS=()
if [ "$(docker info -f '{{.CgroupVersion}}' 2>/dev/null || true)" = 1 ]; then
  warn "Docker runs on cgroup v1, which Kubernetes 1.35+ no longer supports by default:"
  warn "a new cluster's kubelets get --fail-cgroupv1=false (a cgroup v2 host is the real fix)"
  K3S_ARGS=(--k3s-arg "--kubelet-arg=fail-cgroupv1=false@server:*;agent:*")
fi
k3d_version=$(k3d version 2>/dev/null | sed -n 's/^k3d version v\{0,1\}\([0-9][0-9.]*\).*/\1/p' | head -n 1)
k3d_major=${k3d_version%%.*}
k3d_minor=${k3d_version#*.}; k3d_minor=${k3d_minor%%.*}
if [ -z "$k3d_version" ] || [ "$k3d_major" -lt 5 ] || { [ "$k3d_major" -eq 5 ] && [ "$k3d_minor" -lt 5 ]; }; then
  die "k3d ${k3d_version:-of unknown version} is too old: v5.5 or newer is needed (--lb-config-override, --runtime-ulimit)" \
    "upgrade k3d: $(hint_for k3d)"
fi
ok "k3d v$k3d_version"
[ -f "$ROOT/Dockerfile" ] || die "no Dockerfile beside setup.sh" "run setup.sh from a full clone of the repository"

# One setup.sh at a time: two would build, tag, import and apply the same things at
# once, and one's removal of older build tags (step 4) can take the other's before it
# is imported. The lock is a directory (mkdir is atomic, on macOS too) holding its
# owner's pid; one whose owner is no longer a running setup.sh (killed, say) is taken
# over. It is released on exit.
LOCK=${TMPDIR:-/tmp}/sluice-setup-$UID.lock
LOCKED=0
release_lock() {
  if [ "$LOCKED" = 1 ] && [ "$(cat "$LOCK/pid" 2>/dev/null)" = "$$" ]; then rm -rf "$LOCK"; fi
  LOCKED=0
}
take_lock() {
  local pid holder
  until mkdir "$LOCK" 2>/dev/null; do
    [ -d "$LOCK" ] || die "cannot create the lock directory $LOCK" "is ${TMPDIR:-/tmp} writable?"
    pid=$(cat "$LOCK/pid" 2>/dev/null || true)
    if [ -z "$pid" ]; then sleep 1; pid=$(cat "$LOCK/pid" 2>/dev/null || true); fi # being taken right now
    holder=$(ps -p "${pid:-0}" -o args= 2>/dev/null || true)
    case $holder in
      *setup.sh*)
        die "another ./setup.sh is running ($(cat "$LOCK/what" 2>/dev/null || echo "pid $pid"))" \
          "wait for it to finish, or stop it: kill $pid" ;;
    esac
    warn "taking over the lock of a setup.sh that no longer runs (pid ${pid:-unknown})"
    rm -rf "$LOCK" || die "cannot remove the stale lock $LOCK" "rm -rf $LOCK"
  done
  LOCKED=1
  trap release_lock EXIT
  echo "$$" >"$LOCK/pid"
  printf 'pid %s, cluster %s, since %s: ./setup.sh %s\n' "$$" "$CLUSTER" "$(date -u +%FT%TZ)" "${ARGS[*]:-}" >"$LOCK/what"
}
take_lock
ok "no other setup.sh is running (lock $LOCK)"

cluster_exists=0
if k3d cluster get "$CLUSTER" >/dev/null 2>&1; then cluster_exists=1; fi
if [ "$cluster_exists" = 1 ] && [ "$RECREATE" = 1 ]; then
  info "--recreate: deleting the cluster '$CLUSTER' and its volumes (MongoDB's data with them)"
  k3d cluster delete "$CLUSTER" >/dev/null 2>&1 ||
    die "k3d could not delete the cluster '$CLUSTER'" "k3d cluster delete $CLUSTER   (shows the error)" \
      "its containers: docker ps -a --filter label=k3d.cluster=$CLUSTER"
  cluster_exists=0
  ok "deleted; it is created again in step 2"
fi
if [ "$cluster_exists" = 1 ]; then
  # What the cluster was made with. Its nodes are containers created with their image,
  # memory limit and published ports, which k3d cannot change afterwards: an option
  # that asks for something else stops here rather than being ignored, and one not
  # given takes the cluster's own value (the port above all: the smoke test and the
  # URLs printed at the end use it).
  roles=$(docker ps -a --filter "label=k3d.cluster=$CLUSTER" --format '{{.Names}} {{.Label "k3d.role"}}' 2>/dev/null || true)
  nodes=$(awk '$2 == "server" || $2 == "agent" { print $1 }' <<<"$roles")
  lb=$(awk '$2 == "loadbalancer" { print $1; exit }' <<<"$roles")
  if [ -z "$nodes" ]; then
    warn "could not list the containers of cluster '$CLUSTER' (docker ps -a --filter label=k3d.cluster=$CLUSTER):"
    warn "--agents, --node-memory, --http-port and --k3s-image are not checked against it"
  else
    have_agents=$(awk '$2 == "agent" { n++ } END { print n + 0 }' <<<"$roles")
    have_port=""
    if [ -n "$lb" ]; then
      have_port=$(docker inspect -f '{{range $p, $b := .HostConfig.PortBindings}}{{if eq (printf "%s" $p) "80/tcp"}}{{range $b}}{{.HostPort}} {{end}}{{end}}{{end}}' "$lb" 2>/dev/null || true)
      have_port=$(awk '{ print $1 }' <<<"$have_port")
    fi
    # shellcheck disable=SC2086 # one word per node
    node_info=$(docker inspect -f '{{.Config.Image}} {{.HostConfig.Memory}}' $nodes 2>/dev/null || true)
    have_image=$(awk '{ sub(/^docker\.io\//, "", $1); print $1 }' <<<"$node_info" | sort -u | tr '\n' ' ')
    have_image=${have_image% }
    # Memory limits in bytes (0: none, a cluster made without --node-memory), as k3d
    # sets them from --servers-memory/--agents-memory (binary units: 3g = 3 GiB).
    have_mem=$(awk '{ b = $2 + 0; if (b == 0) print "none"; else if (b % 1073741824 == 0) print b / 1073741824 "g"; else print int(b / 1048576) "m" }' <<<"$node_info" | sort -u | tr '\n' ' ')
    have_mem=${have_mem% }
    case $NODE_MEMORY in *g) want_mem=$((${NODE_MEMORY%g} * 1024))m ;; *) want_mem=$NODE_MEMORY ;; esac
    case $have_mem in *[!0-9g]* | '' | g) have_mem_m=$have_mem ;; *g) have_mem_m=$((${have_mem%g} * 1024))m ;; *) have_mem_m=$have_mem ;; esac
    mismatch=()
    if [ "$AGENTS_SET" = 1 ] && [ "$AGENTS" != "$have_agents" ]; then
      mismatch+=("--agents $AGENTS: it has $have_agents agent(s)")
    fi
    if [ "$NODE_MEMORY_SET" = 1 ] && [ "$want_mem" != "$have_mem_m" ]; then
      mismatch+=("--node-memory $NODE_MEMORY: its nodes' memory limit is ${have_mem:-(unknown)}")
    fi
    if [ "$HTTP_PORT_SET" = 1 ] && [ "$HTTP_PORT" != "$have_port" ]; then
      mismatch+=("--http-port $HTTP_PORT: its load balancer is published on host port ${have_port:-(none)}")
    fi
    if [ "$K3S_IMAGE_SET" = 1 ] && [ "${K3S_IMAGE#docker.io/}" != "$have_image" ]; then
      mismatch+=("--k3s-image $K3S_IMAGE: its nodes run ${have_image:-(unknown)}")
    fi
    # --monitoring's larger default node memory applies only to a cluster it creates.
    case $have_mem_m in
      *[!0-9m]* | '' | m) ;;
      *) if [ "$MONITORING" = 1 ] && [ "$NODE_MEMORY_SET" = 0 ] && [ "${have_mem_m%m}" -lt "${want_mem%m}" ]; then
        warn "the cluster's nodes have $have_mem each, not the $NODE_MEMORY --monitoring creates them with: the monitoring"
        warn "stack's limits may not fit beside the load test. Recreate it: ./setup.sh --recreate --monitoring"
      fi ;;
    esac
    if [ ${#mismatch[@]} -gt 0 ]; then
      die "the cluster '$CLUSTER' already exists, created with other settings than these options ask for;
k3d cannot change them on an existing cluster, so setup.sh stops instead of ignoring them:$(printf '\n    %s' "${mismatch[@]}")" \
        "keep the cluster as it is: run ./setup.sh without those options" \
        "or delete it and create it with them (MongoDB's data is deleted too): ./setup.sh --recreate ${ARGS[*]:-}"
    fi
    if [ -n "$have_port" ]; then
      [ "$have_port" = "$HTTP_PORT" ] || info "the cluster's load balancer is published on host port $have_port: using it"
      HTTP_PORT=$have_port
    else
      warn "could not read the host port of the cluster's load balancer ($lb): assuming $HTTP_PORT"
    fi
    AGENTS=$have_agents
    if [ "$HTTP_PORT" = 80 ]; then BASE_URL=http://$HOST; else BASE_URL=http://$HOST:$HTTP_PORT; fi
    ok "cluster '$CLUSTER' exists: $have_agents agent(s), node memory $have_mem, host port $HTTP_PORT, $have_image"
  fi
fi
if [ "$cluster_exists" = 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; then
  die "something on this machine already listens on port $HTTP_PORT, which the cluster's load balancer needs" \
    "find it: sudo lsof -iTCP:$HTTP_PORT -sTCP:LISTEN   (or: sudo ss -ltnp 'sport = :$HTTP_PORT')" \
    "stop it, or use another port: ./setup.sh --http-port 8080"
fi
ok "port $HTTP_PORT $([ "$cluster_exists" = 1 ] && echo "belongs to the existing cluster" || echo "is free")"

# ------------------------------------------------------------------ 2. cluster

step "Cluster '$CLUSTER' (1 server, $AGENTS agents, port $HTTP_PORT -> load balancer -> Traefik)"
if [ "$cluster_exists" = 1 ]; then
  info "exists: reusing it (./setup.sh --recreate makes it anew, ./cleanup.sh removes it)"
  if ! out=$(k3d cluster start "$CLUSTER" --wait 2>&1); then
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/    | /' >&2
    die "k3d could not start the existing cluster '$CLUSTER'" \
      "its containers: docker ps -a --filter label=k3d.cluster=$CLUSTER" \
      "start clean: ./cleanup.sh && ./setup.sh"
  fi
  k3d kubeconfig merge "$CLUSTER" --kubeconfig-merge-default >/dev/null ||
    die "cannot write the kubeconfig for '$CLUSTER'" "k3d kubeconfig merge $CLUSTER --kubeconfig-merge-default"
else
  # --runtime-ulimit (k3d >= 5.5, which the preflight requires): file descriptors for
  # 10,000 connections in every node and the load balancer. --*-memory: each node
  # advertises NODE_MEMORY instead of the whole machine.
  create=(k3d cluster create "$CLUSTER"
    --image "$K3S_IMAGE"
    --agents "$AGENTS"
    --port "$HTTP_PORT:80@loadbalancer"
    --lb-config-override "settings.workerConnections=$LB_WORKER_CONNECTIONS"
    --runtime-ulimit "nofile=1048576:1048576"
    --servers-memory "$NODE_MEMORY" --agents-memory "$NODE_MEMORY"
    ${K3S_ARGS[@]+"${K3S_ARGS[@]}"}
    --wait --timeout 300s)
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
NODES=$(k get nodes -o jsonpath='{.items[*].metadata.name}')
ok "$(wc -w <<<"$NODES" | tr -d ' ') nodes ready, Kubernetes 1.${server_minor:-?}, context $CONTEXT"

# What each node advertises: a node claiming far more than NODE_MEMORY was created
# without the memory flags (an older setup.sh), and its pods' limits overcommit the VM.
case $NODE_MEMORY in *g) unit_ki=1048576 ;; *) unit_ki=1024 ;; esac
want_ki=$((${NODE_MEMORY%[gm]} * unit_ki))
big=""
while read -r node mem; do
  case $mem in *Ki) [ "${mem%Ki}" -le $((want_ki * 11 / 10)) ] || big+=" $node=$((${mem%Ki} / 1048576))GiB" ;; esac
done < <(k get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.status.capacity.memory}{"\n"}{end}')
if [ -n "$big" ]; then
  warn "nodes advertise more memory than $NODE_MEMORY each:$big"
  warn "pods' limits can then overcommit Docker's memory; recreate: ./cleanup.sh && ./setup.sh"
else
  ok "nodes advertise at most $NODE_MEMORY of memory each"
fi

# Open files in every node and in the load balancer, on a new cluster and on a reused
# one (created perhaps without --runtime-ulimit): 10,000 clients are ~20,000 descriptors
# in the load balancer and in Traefik's node.
low=""
for c in $(docker ps --filter "label=k3d.cluster=$CLUSTER" --format '{{.Names}}'); do
  n=$(docker exec "$c" sh -c 'ulimit -n' 2>/dev/null || echo unknown)
  case $n in
    unlimited) ;;
    '' | *[!0-9]*) low+=" $c=unknown" ;;
    *) [ "$n" -ge 40000 ] || low+=" $c=$n" ;;
  esac
done
if [ -n "$low" ]; then
  warn "open-file limits too low for 10,000 clients (need >= 40000):$low"
  warn "recreate the cluster (it gets --runtime-ulimit): ./cleanup.sh && ./setup.sh; if that is not"
  warn "enough, raise Docker's default (daemon.json \"default-ulimits\"). Small runs are unaffected."
else
  ok "every node and the load balancer may open >= 40000 files"
fi
# The connections the load balancer's nginx takes per worker, as its running config
# says (k3d's proxy renders it from --lb-config-override): a cluster made without the
# override, by an older setup.sh or by hand, keeps k3d's 1,024.
lb_conf=$(docker exec "k3d-$CLUSTER-serverlb" cat /etc/nginx/nginx.conf 2>/dev/null || true)
lb_conns=$(awk '$1 == "worker_connections" { sub(/;.*/, "", $2); print $2; exit }' <<<"$lb_conf")
case $lb_conns in
  '' | *[!0-9]*)
    warn "could not read worker_connections in the load balancer's nginx.conf (docker exec k3d-$CLUSTER-serverlb cat /etc/nginx/nginx.conf)" ;;
  *)
    if [ "$lb_conns" -lt "$LB_WORKER_CONNECTIONS" ]; then
      warn "the load balancer's nginx takes $lb_conns connections per worker, not $LB_WORKER_CONNECTIONS: 10,000 clients are"
      warn "~20,000 connections there (client + upstream). Recreate the cluster: ./setup.sh --recreate (deletes MongoDB's data)"
    else
      ok "the load balancer's nginx takes $lb_conns connections per worker"
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
# rollout status alone can pass on the old Traefik while k3s' helm-install-traefik job
# has not yet re-run with these values (or has failed). Wait until the job has finished
# and the Deployment runs with every argument, the replica count and the resources of
# the file (a change of resources alone must not pass on the old pods).
info "waiting for k3s' helm-install-traefik job to redeploy Traefik with it..."
TRAEFIK_ARGS=$(grep -o -- '"--[^"]*"' "$ROOT/k8s/traefik/helmchartconfig.yaml" | tr -d '"')
TRAEFIK_REPLICAS=$(sed -n 's/^ *replicas: *\([0-9][0-9]*\) *$/\1/p' "$ROOT/k8s/traefik/helmchartconfig.yaml" | head -n 1)
# The values' resources as "requests.cpu=500m requests.memory=320Mi limits.memory=608Mi".
# (check_manifests.py traefik keeps them in the canonical form the API server returns.)
TRAEFIK_RESOURCES=$(awk '
  /^[[:space:]]*(#|$)/ { next }
  /^ *resources: *$/ { indent = match($0, /[^ ]/); inside = 1; next }
  inside && match($0, /[^ ]/) <= indent { inside = 0 }
  inside && $1 ~ /^(requests|limits):$/ { section = substr($1, 1, length($1) - 1) }
  inside && $1 ~ /^(cpu|memory):$/ { gsub(/"/, "", $2); printf "%s.%s=%s ", section, substr($1, 1, length($1) - 1), $2 }
' "$ROOT/k8s/traefik/helmchartconfig.yaml")
[ -n "$TRAEFIK_RESOURCES" ] || die "found no resources in k8s/traefik/helmchartconfig.yaml's values (block style, one quantity a line)"
traefik_state() { # prints what is still missing, nothing once Traefik runs with the tuning
  local job args replicas got a
  if [ "$(k -n kube-system get job helm-install-traefik -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null)" = True ]; then
    echo failed; return
  fi
  # No job at all (deleted after an earlier install) is fine: the arguments decide.
  job=$(k -n kube-system get job helm-install-traefik -o jsonpath='{.status.succeeded}/{.status.active}' 2>/dev/null) || job=none
  case $job in none | [1-9]*/ | [1-9]*/0) ;; *) echo "the helm-install-traefik job has not finished"; return ;; esac
  args=$(k -n kube-system get deployment traefik -o jsonpath='{.spec.template.spec.containers[0].args}' 2>/dev/null || true)
  for a in $TRAEFIK_ARGS; do
    case $args in *"$a"*) ;; *) echo "Traefik runs without $a"; return ;; esac
  done
  replicas=$(k -n kube-system get deployment traefik -o jsonpath='{.spec.replicas}' 2>/dev/null || true)
  [ "$replicas" = "${TRAEFIK_REPLICAS:-1}" ] || { echo "Traefik has ${replicas:-no} replicas, not ${TRAEFIK_REPLICAS:-1}"; return; }
  for a in $TRAEFIK_RESOURCES; do
    got=$(k -n kube-system get deployment traefik -o jsonpath="{.spec.template.spec.containers[0].resources.${a%%=*}}" 2>/dev/null || true)
    [ "$got" = "${a#*=}" ] || { echo "Traefik runs with ${a%%=*} ${got:-unset}, not ${a#*=}"; return; }
  done
}
deadline=$((SECONDS + TIMEOUT))
while untuned=$(traefik_state) && [ -n "$untuned" ]; do
  [ "$untuned" != failed ] ||
    die "k3s' helm-install-traefik job failed" \
      "kubectl --context $CONTEXT -n kube-system logs job/helm-install-traefik" \
      "kubectl --context $CONTEXT -n kube-system get helmchartconfig traefik -o yaml   (the values it merged)"
  [ "$SECONDS" -lt "$deadline" ] ||
    die "Traefik was not redeployed with k8s/traefik/ within ${TIMEOUT}s: $untuned" \
      "kubectl --context $CONTEXT -n kube-system get jobs,pods" \
      "kubectl --context $CONTEXT -n kube-system logs job/helm-install-traefik"
  sleep 3
done
k -n kube-system rollout status deployment/traefik --timeout="${TIMEOUT}s" >/dev/null ||
  die "Traefik did not become ready" "kubectl --context $CONTEXT -n kube-system describe deployment traefik"
ok "Traefik ready ($(k -n kube-system get deployment traefik -o jsonpath='{.status.readyReplicas}') replicas) and running with $(wc -w <<<"$TRAEFIK_ARGS" | tr -d ' ') tuning arguments"

# ------------------------------------------------------------------ 4. image

step "Image $IMAGE"
if [ "$BUILD" = 1 ]; then
  info "docker build -t $IMAGE .   (first build compiles every dependency: several minutes)"
  docker build -t "$IMAGE" "$ROOT" ||
    die "docker build failed" \
      "read the error above: a file reported not found, or \"couldn't read\", is one the build context lacks" \
      "the daemon gets only what .dockerignore admits (its ! lines), and the build sees only what the Dockerfile COPYs:" \
      "a file the sources compile in (include_str!) needs both; a plain cargo build here sees the whole checkout" \
      "replay the Dockerfile's build stage from that same context, without Docker (names what is missing):" \
      "  scripts/deploy/replay_build.py"
elif ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  die "--skip-build, but there is no $IMAGE image yet" "run ./setup.sh without --skip-build"
fi
image_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
image_id=${image_id#sha256:}
image_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
ok "$IMAGE $image_id ($image_mb MB)"
# `k3d image import` can report success without importing (k3d#1538: hosts whose Docker
# uses containerd's image store). A second tag unique to this build proves, node by
# node, that this very image arrived; where it did not, import it with containerd's own
# client instead.
BUILD_TAG=sluice:build-${image_id:0:12}
docker tag "$IMAGE" "$BUILD_TAG"
for t in $(docker image ls sluice --format '{{.Tag}}' 2>/dev/null); do # earlier builds' tags
  case $t in build-*) [ "sluice:$t" = "$BUILD_TAG" ] || docker image rm "sluice:$t" >/dev/null 2>&1 || true ;; esac
done
node_has_image() { # NODE: is this build in NODE's containerd?
  local refs
  refs=$(docker exec "$1" ctr -n k8s.io images ls -q 2>/dev/null) || return 1
  grep -qxF "docker.io/library/$BUILD_TAG" <<<"$refs"
}
missing_nodes() { local n; for n in $NODES; do node_has_image "$n" || printf '%s ' "$n"; done; }
k3d image import "$IMAGE" "$BUILD_TAG" --cluster "$CLUSTER" >/dev/null 2>&1 || warn "k3d image import failed"
absent=$(missing_nodes)
if [ -n "$absent" ]; then
  warn "the image is not on: $absent; importing with docker save | ctr images import"
  save=(docker save)
  # Docker >= 28 can save one platform: with the containerd image store a multi-platform
  # save lists blobs it does not have, which ctr refuses.
  save_help=$(docker save --help 2>&1 || true)
  case $save_help in *--platform*) save+=(--platform "$(docker version -f '{{.Server.Os}}/{{.Server.Arch}}' 2>/dev/null || echo linux/amd64)") ;; esac
  for n in $absent; do
    "${save[@]}" "$IMAGE" "$BUILD_TAG" | docker exec -i "$n" ctr -n k8s.io images import - >/dev/null ||
      warn "ctr images import failed on $n"
  done
  absent=$(missing_nodes)
  [ -z "$absent" ] ||
    die "$IMAGE is still missing on: $absent" \
      "k3d image import $IMAGE --cluster $CLUSTER --verbose" \
      "docker info | grep -i 'driver-type'   (io.containerd.snapshotter: Docker's containerd image store, see k3d#1538)" \
      "docker exec <node> ctr -n k8s.io images ls | grep sluice"
fi
ok "$BUILD_TAG is on every node: $NODES"

# ------------------------------------------------------------------ 5. manifests

step "Manifests (k8s/base, mongodb, redis, app)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; release_lock' EXIT
hash16() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -c1-16; }

# A data reset is marked on the namespace (annotation sluice/reset-data: when it began)
# before anything is deleted, and unmarked only once MongoDB runs empty and Redis is
# flushed (step 6). A run interrupted or failed in between leaves the mark, and the next
# run finishes the reset; else it would re-create MongoDB on its old volume (Deployment
# deleted, claim not yet) or keep Redis' cache of deleted documents.
RESET_MARK=sluice/reset-data
RESET_MARKED=0
reset_started=$(k get namespace "$NS" -o jsonpath="{.metadata.annotations.$RESET_MARK}" 2>/dev/null || true)
if [ -n "$reset_started" ] && [ "$RESET_DATA" = 0 ]; then
  warn "a --reset-data begun at $reset_started did not finish (interrupted, or failed): finishing it now"
  RESET_DATA=1
fi
if [ "$RESET_DATA" = 1 ]; then
  if k get namespace "$NS" >/dev/null 2>&1; then
    k annotate namespace "$NS" --overwrite "$RESET_MARK=${reset_started:-$(date -u +%FT%TZ)}" >/dev/null ||
      die "could not mark namespace $NS for the data reset" "kubectl --context $CONTEXT annotate namespace $NS $RESET_MARK=now"
    RESET_MARKED=1
  fi
  # On k3d the 2Gi volume is a directory on the node (local-path has no quota): every
  # run's documents stay on the Docker disk until the claim is deleted.
  info "--reset-data: deleting MongoDB and its volume mongo-pvc"
  k -n "$NS" delete deployment mongo --ignore-not-found --wait --timeout="${TIMEOUT}s" | sed 's/^/    /'
  k -n "$NS" delete pvc mongo-pvc --ignore-not-found --wait --timeout="${TIMEOUT}s" | sed 's/^/    /'
  deadline=$((SECONDS + TIMEOUT))
  while claims=$(k get pv -o jsonpath='{range .items[*]}{.spec.claimRef.namespace}/{.spec.claimRef.name}{"\n"}{end}') &&
    grep -qx "$NS/mongo-pvc" <<<"$claims"; do
    [ "$SECONDS" -lt "$deadline" ] ||
      die "the old volume of mongo-pvc was not deleted within ${TIMEOUT}s" \
        "kubectl --context $CONTEXT get pv; kubectl --context $CONTEXT -n kube-system logs -l app=local-path-provisioner --tail=20"
    sleep 2
  done
  ok "MongoDB's data deleted; it starts empty below"
fi

for dir in base mongodb redis; do
  k apply -f "$ROOT/k8s/$dir/" | sed 's/^/    /'
done
# sluice: k8s/app is a kustomize base (k8s/app/kustomization.yaml), applied with kubectl's
# built-in kustomize through two overlays written here:
#   settings  the base without its Deployment, first, so that the cluster holds the
#             ConfigMap's and the Secret's data before it is hashed;
#   app       all of it, the Deployment's image set to this build's own tag (images:)
#             and its pod template annotated (a patch) with the image's ID and a hash of
#             that data (envFrom is read only when a container starts), in one apply: a
#             first install rolls out once, a new build or a changed setting rolls out.
# The pods never run the mutable sluice:local: `kubectl rollout undo`, or a restarted
# container of an older ReplicaSet, runs that ReplicaSet's own build, whose tag stays
# imported in the nodes.
ln -s "$ROOT/k8s/app" "$WORK/base" # kustomize takes a base by relative path only
mkdir "$WORK/settings" "$WORK/app"
cat >"$WORK/settings/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../base
patches:
  - target:
      kind: Deployment
      name: sluice
    patch: |-
      $patch: delete
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: sluice
EOF
k apply -k "$WORK/settings" | sed 's/^/    /'
config_hash=$( { k -n "$NS" get configmap sluice-config -o jsonpath='{.data}'
  k -n "$NS" get secret sluice-secrets -o jsonpath='{.data}'; } | hash16)
cat >"$WORK/app/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../base
images:
  - name: sluice
    newName: ${BUILD_TAG%%:*}
    newTag: ${BUILD_TAG#*:}
patches:
  - target:
      kind: Deployment
      name: sluice
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: sluice
      spec:
        template:
          metadata:
            annotations:
              sluice/image-id: "${image_id:0:12}"
              sluice/config-hash: "$config_hash"
EOF
# What will be applied: kustomize's images: changes nothing, silently, when no container
# is named sluice. The Deployment alone (documents are separated by --- lines) is also
# what set-last-applied below records.
rendered=$(k kustomize "$WORK/app") ||
  die "kubectl kustomize could not render k8s/app with this build's overlay" \
    "kubectl kustomize k8s/app   (shows the error in the base)" "kubectl version --client   (1.35 or newer)"
awk 'BEGIN { n = 0; dep = -1 } /^---$/ { n++; next } { doc[n] = doc[n] $0 "\n" } /^kind: Deployment$/ { dep = n }
  END { if (dep >= 0) printf "%s", doc[dep] }' <<<"$rendered" >"$WORK/deployment.yaml"
sluice_images=$(sed -n 's/^[ -]*image: *"\{0,1\}\(sluice[:@][^" ]*\)"\{0,1\} *$/\1/p' "$WORK/deployment.yaml" | sort -u)
[ "$sluice_images" = "$BUILD_TAG" ] ||
  die "the Deployment rendered from k8s/app would run ${sluice_images:-no sluice image}, not this build's $BUILD_TAG" \
    "k8s/app/deployment.yaml's container must name the image sluice:local (kustomize's images: matches the name sluice)" \
    "see what is applied: kubectl kustomize k8s/app"
grep -qF "sluice/config-hash: \"$config_hash\"" "$WORK/deployment.yaml" ||
  grep -qF "sluice/config-hash: $config_hash" "$WORK/deployment.yaml" ||
  die "the Deployment rendered from k8s/app lacks the settings hash $config_hash on its pod template" \
    "the patch setup.sh writes must reach the pod template: kubectl kustomize k8s/app | grep -n -A3 'annotations:'"
# A Deployment first applied by an older setup.sh carries spec.replicas in its
# last-applied annotation; applying a file without it would reset the count to 1. Record
# the new file as last applied first (changes nothing live), as the HPA guide advises.
last=$(k -n "$NS" get deployment sluice -o jsonpath='{.metadata.annotations.kubectl\.kubernetes\.io/last-applied-configuration}' 2>/dev/null || true)
case $last in
  *'"replicas"'*) k -n "$NS" apply set-last-applied -f "$WORK/deployment.yaml" >/dev/null &&
    info "handed spec.replicas over to the HPA" ;;
esac
k apply -k "$WORK/app" | sed 's/^/    /'
ok "pods stamped with image ${image_id:0:12} and settings $config_hash; they run $BUILD_TAG"

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

if [ "$RESET_DATA" = 1 ]; then
  # Redis may still hold read ids of the deleted documents; it is only a cache. redis-cli
  # exits 0 on some error replies (NOAUTH), so the reply itself is checked.
  flushed=$(k -n "$NS" exec deploy/redis -- redis-cli FLUSHALL 2>&1 || true)
  [ "$flushed" = OK ] ||
    die "Redis did not flush its cache of the deleted documents: ${flushed:-no answer}" \
      "kubectl --context $CONTEXT -n $NS exec deploy/redis -- redis-cli FLUSHALL" \
      "then ./setup.sh again: it finishes the data reset"
  info "Redis cache flushed"
  if [ "$RESET_MARKED" = 1 ]; then
    k annotate namespace "$NS" "$RESET_MARK-" >/dev/null ||
      die "could not clear the data reset's mark: the next ./setup.sh would delete MongoDB's data again" \
        "kubectl --context $CONTEXT annotate namespace $NS $RESET_MARK-"
  fi
  ok "data reset finished: MongoDB and Redis start empty"
fi

# The Docker disk behind MongoDB's volume: local-path does not enforce the PVC's 2Gi, so
# a full run's ~5 GB (and every earlier run's) land there, and below the kubelet's
# eviction threshold (15% free) pods are evicted and the imported image may be removed.
mongo_node=$(k -n "$NS" get pod -l app.kubernetes.io/name=mongo -o jsonpath='{.items[0].spec.nodeName}' 2>/dev/null || true)
if [ -n "$mongo_node" ] && df_line=$(docker exec "$mongo_node" df -Pk /var/lib/rancher/k3s/storage 2>/dev/null | tail -n 1) &&
  data_kb=$(docker exec "$mongo_node" du -sk /var/lib/rancher/k3s/storage 2>/dev/null | cut -f1); then
  read -r _ size_kb _ avail_kb _ <<<"$df_line"
  msg="Docker disk (node $mongo_node): $((avail_kb / 1048576)) of $((size_kb / 1048576)) GiB free; volumes hold $((data_kb / 1024)) MiB"
  if [ "$avail_kb" -lt $((size_kb * 15 / 100 + 6 * 1048576)) ]; then
    warn "$msg: too little for a full run (~5 GB more, and 15% must stay free)"
    warn "free it: ./setup.sh --reset-data (deletes MongoDB's data), docker system prune"
  else
    ok "$msg"
  fi
else
  warn "could not read the free space of the node holding MongoDB's volume"
fi

# ------------------------------------------------------------------ monitoring (--monitoring)

if [ "$MONITORING" = 1 ]; then
  step "Monitoring: kube-prometheus-stack (Prometheus, Alertmanager, Grafana), sluice's dashboard and alert rules"
  MON_TIMEOUT=$((TIMEOUT > 600 ? TIMEOUT : 600))
  deadline=$((SECONDS + 120))
  until k apply -f "$ROOT/k8s/monitoring/kube-prometheus-stack.yaml" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] ||
      die "could not apply k8s/monitoring/kube-prometheus-stack.yaml" \
        "kubectl --context $CONTEXT apply -f k8s/monitoring/kube-prometheus-stack.yaml   (shows the error)"
    sleep 3
  done
  ok "HelmChart kube-system/monitoring applied (kube-prometheus-stack, pinned in the file)"
  info "waiting for k3s' helm-install-monitoring job (it downloads the chart and images: minutes)..."
  deadline=$((SECONDS + MON_TIMEOUT))
  until k get crd prometheusrules.monitoring.coreos.com podmonitors.monitoring.coreos.com >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] ||
      die "the Prometheus Operator's CRDs did not appear within ${MON_TIMEOUT}s" \
        "kubectl --context $CONTEXT -n kube-system logs job/helm-install-monitoring --tail=30"
    sleep 5
  done
  k wait --for=condition=Established --timeout=120s \
    crd/prometheusrules.monitoring.coreos.com crd/podmonitors.monitoring.coreos.com >/dev/null ||
    die "the Prometheus Operator's CRDs are not established" "kubectl --context $CONTEXT get crd | grep monitoring.coreos.com"
  # Only now that the CRDs exist: the alert rules (generated from the one rules file),
  # the scrape of every sluice pod, and the dashboard for Grafana's sidecar.
  "$ROOT/scripts/deploy/prometheusrule.sh" | k apply -f - | sed 's/^/    /'
  k apply -f "$ROOT/k8s/grafana/podmonitor.yaml" | sed 's/^/    /'
  k -n monitoring create configmap sluice-dashboard \
    --from-file=sluice-dashboard.json="$ROOT/k8s/grafana/sluice-dashboard.json" --dry-run=client -o yaml |
    k label --local -f - grafana_dashboard=1 -o yaml | k apply -f - | sed 's/^/    /'
  deadline=$((SECONDS + MON_TIMEOUT))
  # Alertmanager's StatefulSet is the operator's, named after the chart's Alertmanager
  # resource (monitoring-alertmanager), like Prometheus'.
  until k -n monitoring get deployment/monitoring-grafana statefulset/prometheus-monitoring-prometheus \
    statefulset/alertmanager-monitoring-alertmanager >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] ||
      die "Grafana, Prometheus and Alertmanager were not created within ${MON_TIMEOUT}s" "kubectl --context $CONTEXT -n monitoring get pods"
    sleep 5
  done
  for w in deployment/monitoring-grafana statefulset/prometheus-monitoring-prometheus statefulset/alertmanager-monitoring-alertmanager; do
    k -n monitoring rollout status "$w" --timeout="${MON_TIMEOUT}s" >/dev/null ||
      die "$w did not become ready" "kubectl --context $CONTEXT -n monitoring describe $w"
  done
  ok "Prometheus, Alertmanager and Grafana ready in namespace monitoring"
  info "Alertmanager routes every alert to its null receiver (nobody is notified): docs/runbook.md#routing-the-alerts;"
  info "  see them at http://localhost:9093 after: kubectl --context $CONTEXT -n monitoring port-forward svc/monitoring-alertmanager 9093"
fi

# ------------------------------------------------------------------ 7. smoke test

step "Smoke test through the Ingress ($BASE_URL)"
RESOLVE=(--resolve "$HOST:$HTTP_PORT:127.0.0.1")
BODY=$WORK/body
# fetch PATH: prints "<status> <body>".
fetch() {
  : >"$BODY"
  curl -sS -m 10 "${RESOLVE[@]}" -H 'Accept: application/json' -o "$BODY" \
    -w '%{http_code}' "$BASE_URL$1" 2>/dev/null || true
  printf ' '
  head -c 300 "$BODY" 2>/dev/null || true
}
if [ "$SMOKE" = 1 ]; then
  # Traefik needs a moment to pick up a new Ingress. Pods are Ready (/readyz/pod) before
  # MongoDB answers, so wait on the service's own /readyz until it does.
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
  # Not published: the Ingress routes only what clients use (k8s/app/ingress.yaml).
  for path in /metrics /api/cache/status /api/stats; do
    out=$(fetch "$path")
    [ "${out%% *}" = 404 ] ||
      die "GET $path through the Ingress answered ${out%% *}: it must not be published" \
        "kubectl --context $CONTEXT -n $NS get ingress sluice -o yaml"
  done
  ok "GET /metrics, /api/cache/status and /api/stats -> 404 (internal only)"
  # The status page, from inside a pod.
  out=$(k -n "$NS" exec deploy/sluice -- /usr/local/bin/sluice status --url http://127.0.0.1:8000 2>&1) ||
    die "sluice status inside a pod failed: ${out:0:300}" \
      "kubectl --context $CONTEXT -n $NS logs -l app.kubernetes.io/name=sluice --tail=50"
  ok "sluice status (inside a pod): $(head -n 1 <<<"$out")..."
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
    curl --resolve $HOST:$HTTP_PORT:127.0.0.1 $BASE_URL/api/data   # without the hosts line

  Load test (k6; every run's summary, HTML report, HPA events and kubectl top samples
  are saved under results/; see stress-test/README.md):
    stress-test/run.sh --profile smoke      # 100 VUs for 30 s, k6 on this machine
    stress-test/run.sh --in-docker          # the full 13-minute profile to 10,000 VUs, k6 inside
                                            # the cluster's Docker network
    k6 run -e BASE_URL=$BASE_URL -e HOSTS=$HOST=127.0.0.1 -e PROFILE=smoke stress-test/stress-test.js
                                            # plain k6; HOSTS spares the hosts line (.local on macOS)

  Watch (kubectl context $CONTEXT):
    kubectl -n $NS get pods -o wide -w
    kubectl -n $NS get hpa sluice -w
    kubectl -n $NS top pods
    kubectl -n $NS logs -l app.kubernetes.io/name=sluice -f --max-log-requests 10
    kubectl -n $NS exec deploy/sluice -- /usr/local/bin/sluice status --url http://127.0.0.1:8000

  Between full runs: ./setup.sh --skip-build --reset-data   (MongoDB's data piles up on the Docker disk)
  Remove it all: ./cleanup.sh
EOF
if [ "$MONITORING" = 1 ]; then
  cat <<EOF

  Monitoring (namespace monitoring):
    kubectl --context $CONTEXT -n monitoring port-forward svc/monitoring-grafana 3000:80
      http://localhost:3000  user admin, password:
      kubectl --context $CONTEXT -n monitoring get secret monitoring-grafana -o jsonpath='{.data.admin-password}' | base64 -d
      dashboard: Dashboards -> "sluice"
    kubectl --context $CONTEXT -n monitoring port-forward svc/monitoring-prometheus 9090
      http://localhost:9090/alerts   sluice's alert rules (group sluice), firing or not
      http://localhost:9090/targets  the sluice pods (podMonitor/assessment/sluice)
EOF
fi
printf '\n%ssetup finished in %ds%s\n' "$G" "$SECONDS" "$N"

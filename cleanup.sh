#!/usr/bin/env bash
# Removes what ./setup.sh made: the k3d cluster (with its volumes and MongoDB's data) and
# the sluice:local image, after stopping any k6 container `stress-test/run.sh --in-docker`
# left running against it. Succeeds when they are already gone; fails when Docker does not
# answer, since then it cannot know. Touches /etc/hosts, and so needs sudo, only when
# asked to with --remove-hosts. `./cleanup.sh --help`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The local lab has its own cleanup; everything after --local is its.
if [ "${1:-}" = "--local" ]; then
  shift
  exec "$ROOT/lab/cleanup-local.sh" "$@"
fi

CLUSTER=${SLUICE_CLUSTER:-sluice}
IMAGE=sluice:local
HOST=assessment.local
HOSTS_FILE=${SLUICE_HOSTS_FILE:-/etc/hosts} # overridable for scripts/deploy/test-scripts.sh
KEEP_IMAGE=0
REMOVE_HOSTS=0

usage() {
  cat <<EOF
Usage: ./cleanup.sh [options]
       ./cleanup.sh --local [lab options]   stop the local lab instead (lab/cleanup-local.sh)

Stops a k6 container of stress-test/run.sh --in-docker still running against it, then
deletes the k3d cluster '$CLUSTER' (its nodes, load balancer, volumes and kubeconfig
entry) and the $IMAGE image. Whatever is already gone is skipped, so it ends
successfully when nothing is left; when Docker does not answer it says what it could
not check and exits 1.

Options:
  -n, --name NAME    cluster name (default: $CLUSTER; env SLUICE_CLUSTER)
      --keep-image   leave the $IMAGE image (a later ./setup.sh --skip-build reuses it)
      --remove-hosts also remove the "127.0.0.1 $HOST" line from /etc/hosts (uses sudo)
  -h, --help         show this help
EOF
}

die_usage() { printf 'cleanup.sh: %s\nTry ./cleanup.sh --help\n' "$1" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    -n | --name) [ $# -ge 2 ] || die_usage "$1 needs a value"; CLUSTER=$2; shift 2 ;;
    --keep-image) KEEP_IMAGE=1; shift ;;
    --remove-hosts) REMOVE_HOSTS=1; shift ;;
    --local) die_usage "--local must be the first argument" ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown option '$1'" ;;
  esac
done

step() { printf '==> %s  (%ds)\n' "$*" "$SECONDS"; }
info() { printf '    %s\n' "$*"; }
fail() { printf 'failed: %s\nnext:\n    %s\n' "$1" "$2" >&2; exit 1; }

# Without a Docker daemon nothing can be checked: k3d would report every cluster as
# missing, and "already gone" would be a guess. Say so and fail instead.
docker_up=1
if ! command -v docker >/dev/null 2>&1; then
  docker_up=0
elif ! docker info >/dev/null 2>&1; then
  docker_up=down
fi
unchecked=()

# A `stress-test/run.sh --in-docker` k6 container outlives run.sh when run.sh is killed,
# and goes on loading the cluster; attached to the cluster's network, it would also
# keep k3d from deleting that network. run.sh labels each one with the cluster's name;
# an unlabelled grafana/k6 container on the network is one from an older run.sh.
step "k6 containers of stress-test/run.sh --in-docker"
if [ "$docker_up" = 0 ]; then
  info "docker is not installed: none"
elif [ "$docker_up" = down ]; then
  info "the docker daemon does not answer: cannot check for them"
  unchecked+=("k6 containers")
else
  k6_ids=$( {
    docker ps -aq --filter "label=sluice.stress-test.cluster=$CLUSTER" 2>/dev/null || true
    docker ps -a --filter "network=k3d-$CLUSTER" --format '{{.ID}} {{.Image}}' 2>/dev/null |
      awk '$2 ~ /^(docker\.io\/)?grafana\/k6(:|@|$)/ { print $1 }' || true
  } | sort -u)
  if [ -n "$k6_ids" ]; then
    # shellcheck disable=SC2086 # one word per container id
    docker rm -f $k6_ids >/dev/null ||
      fail "docker could not stop the k6 container(s) $(tr '\n' ' ' <<<"$k6_ids")" "docker ps -a --filter label=sluice.stress-test.cluster=$CLUSTER, then docker rm -f them"
    info "stopped and removed $(wc -w <<<"$k6_ids" | tr -d ' ')"
  else
    info "none"
  fi
fi

step "Cluster '$CLUSTER'"
if ! command -v k3d >/dev/null 2>&1; then
  info "k3d is not installed: no cluster to remove"
elif [ "$docker_up" = down ]; then
  info "the docker daemon does not answer: cannot tell whether '$CLUSTER' exists"
  unchecked+=("the cluster '$CLUSTER'")
elif k3d cluster get "$CLUSTER" >/dev/null 2>&1; then
  k3d cluster delete "$CLUSTER" ||
    fail "k3d could not delete '$CLUSTER'" "docker ps -a --filter name=k3d-$CLUSTER, then docker rm -f those containers"
  info "deleted"
else
  info "already gone"
fi

step "Image $IMAGE"
if [ "$KEEP_IMAGE" = 1 ]; then
  info "kept (--keep-image)"
elif [ "$docker_up" = 0 ]; then
  info "docker is not installed: no image to remove"
elif [ "$docker_up" = down ]; then
  info "the docker daemon does not answer: cannot check for the image"
  unchecked+=("the $IMAGE image")
else
  # setup.sh also tags each build sluice:build-<id> (to prove the import per node).
  tags=$(docker image ls sluice --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | grep -E '^sluice:(local|build-[0-9a-f]+)$' || true)
  if [ -n "$tags" ]; then
    # shellcheck disable=SC2086 # one word per tag
    docker image rm $tags >/dev/null ||
      fail "docker could not remove $IMAGE" "docker ps -a --filter ancestor=$IMAGE (a container still using it?)"
    info "removed $(wc -w <<<"$tags" | tr -d ' ') tag(s) (build cache kept; 'docker builder prune' frees it)"
  else
    info "already gone"
  fi
fi

step "$HOSTS_FILE entry for $HOST"
matches() { awk -v h="$HOST" '$1 == "127.0.0.1" { for (i = 2; i <= NF && $i !~ /^#/; i++) if ($i == h) { found = 1 } } END { exit !found }' "$HOSTS_FILE" 2>/dev/null; }
if ! matches; then
  info "none"
elif [ "$REMOVE_HOSTS" = 0 ]; then
  info "kept (remove it with ./cleanup.sh --remove-hosts)"
else
  tmp=$(mktemp)
  trap 'rm -f "$tmp"' EXIT
  awk -v h="$HOST" '$1 == "127.0.0.1" && $2 == h && (NF == 2 || $3 ~ /^#/) { next } { print }' "$HOSTS_FILE" >"$tmp"
  # cp (not mv) keeps the file's owner, mode and inode.
  if [ -w "$HOSTS_FILE" ]; then cp "$tmp" "$HOSTS_FILE"; else sudo cp "$tmp" "$HOSTS_FILE"; fi
  if matches; then
    info "a line maps $HOST together with other names: left in place, edit $HOSTS_FILE by hand"
  else
    info "removed"
  fi
fi

if [ ${#unchecked[@]} -gt 0 ]; then
  printf 'failed: could not check %s: Docker does not answer\nnext:\n    start Docker, then run ./cleanup.sh again\n' \
    "$(printf '%s and ' "${unchecked[@]}" | sed 's/ and $//')" >&2
  exit 1
fi
printf 'cleanup done in %ds\n' "$SECONDS"

#!/usr/bin/env bash
# Runs setup.sh and cleanup.sh end to end against stand-ins for docker, k3d, kubectl
# and curl, because CI has no Docker engine and no k3d. The stand-ins keep a little
# state (does the cluster exist, does the image) and log every call, so this proves
# the scripts' own logic: flags, the order of steps, that a second run reuses instead
# of recreating, that cleanup succeeds twice, and that the hosts file is only touched
# when asked. It proves nothing about the real tools; the README says what was and
# was not run against a real cluster.
#
#   scripts/deploy/test-scripts.sh      prints one line per assertion, exits 1 on failure
#
# The stand-ins' bodies are single-quoted on purpose: they expand when the stand-in runs.
# shellcheck disable=SC2016
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=$(mktemp -d)
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
BIN=$WORK/bin STATE=$WORK/state LOG=$WORK/calls.log HOSTS=$WORK/hosts
mkdir -p "$BIN" "$STATE"
printf '127.0.0.1 localhost\n' >"$HOSTS"
: >"$LOG"

stand_in() { # NAME BODY: a bash stand-in that logs its arguments, then runs BODY
  {
    printf '#!/usr/bin/env bash\nSTATE=%q\nprintf "%%s %%s\\n" %q "$*" >>%q\n' "$STATE" "$1" "$LOG"
    printf '%s\n' "$2"
  } >"$BIN/$1"
  chmod +x "$BIN/$1"
}

stand_in k3d '
case "$1 $2" in
  "version "*) echo "k3d version v5.7.4"; echo "k3s version v1.30.4-k3s1 (default)" ;;
  "cluster get") [ -e "$STATE/cluster" ] ;;
  "cluster create")
    if [ "$3" = --help ]; then echo "      --runtime-ulimit strings"; exit 0; fi
    [ -e "$STATE/cluster" ] && { echo "cluster exists" >&2; exit 1; }
    touch "$STATE/cluster" ;;
  "cluster start") [ -e "$STATE/cluster" ] ;;
  "cluster delete") rm -f "$STATE/cluster" ;;
  "kubeconfig merge") [ -e "$STATE/cluster" ] ;;
  "image import") [ -e "$STATE/cluster" ] && [ -e "$STATE/image" ] ;;
  *) echo "k3d stand-in: unexpected: $*" >&2; exit 1 ;;
esac'

stand_in docker '
case "$1" in
  info) exit 0 ;;
  build) touch "$STATE/image" ;;
  image)
    case "$2" in
      inspect)
        [ -e "$STATE/image" ] || exit 1
        case "$*" in
          *"{{.Id}}"*) echo "sha256:0123456789abcdef" ;;
          *"{{.Size}}"*) echo 41000000 ;;
        esac ;;
      rm) rm -f "$STATE/image" ;;
    esac ;;
  exec) echo 1048576 ;;
  *) echo "docker stand-in: unexpected: $*" >&2; exit 1 ;;
esac'

stand_in kubectl '
[ -e "$STATE/cluster" ] || { echo "The connection to the server was refused" >&2; exit 1; }
[ "$1" = --context ] && shift 2
args="$*"
case "$args" in
  "get nodes"*) printf "k3d-sluice-server-0 Ready\nk3d-sluice-agent-0 Ready\nk3d-sluice-agent-1 Ready\n" ;;
  "version -o json") printf "{\n \"clientVersion\": {\"minor\": \"32\"},\n \"serverVersion\": {\n  \"minor\": \"30\"\n }\n}\n" ;;
  "apply -f "*) echo "applied ${args#apply -f }" ;;
  *"get deployment "*"-o jsonpath"*) echo 2 ;;
  *"get deployment traefik") exit 0 ;;
  *"rollout status"*) exit 0 ;;
  *"patch deployment sluice"*) echo "deployment.apps/sluice patched" ;;
  *) echo "kubectl stand-in: unexpected: $args" >&2; exit 1 ;;
esac'

stand_in curl '
out="" url=""
while [ $# -gt 0 ]; do
  case "$1" in -o) out=$2; shift 2 ;; -m|-w|-H|--resolve) shift 2 ;; http*) url=$1; shift ;; *) shift ;; esac
done
case "$url" in
  */healthz) body="{\"status\":\"ok\",\"timestamp\":\"t\"}" ;;
  */readyz) body="{\"status\":\"ready\"}" ;;
  */api/data) body="{\"status\":\"success\",\"reads\":[null,null,null,null,null],\"writes\":[]}" ;;
  */api/cache/status) body="{\"l1\":{}}" ;;
  *) body="{}" ;;
esac
printf "%s" "$body" >"$out"
printf 200'

export PATH="$BIN:$PATH" SLUICE_HOSTS_FILE="$HOSTS" SLUICE_CLUSTER=sluice
PORT=18080 # the port check needs a free one; 80 may be taken (or privileged) here

pass=0 fail=0
assert() { # DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); printf '  ok   %s\n' "$what"
  else fail=$((fail + 1)); printf '  FAIL %s\n' "$what"; fi
}
calls() { grep -c -- "$1" "$LOG" || true; }
apply_order() { grep -o 'apply -f [^ ]*' "$LOG" | sed 's#.*/k8s/##; s#/$##' | tr '\n' ' '; }

"$ROOT/setup.sh" --help >"$WORK/out" 2>&1
assert "setup.sh --help exits 0 and explains the flags" grep -q -- '--skip-build' "$WORK/out"
"$ROOT/setup.sh" --no-such-flag >/dev/null 2>&1
assert "setup.sh rejects an unknown flag with exit 2" test $? -eq 2

"$ROOT/setup.sh" --http-port "$PORT" --add-hosts >"$WORK/run1" 2>&1
rc=$?
assert "first setup.sh run succeeds (exit $rc)" test "$rc" -eq 0
[ "$rc" -eq 0 ] || sed 's/^/      | /' "$WORK/run1"
assert "it creates the cluster once, with 2 agents and the LB tuning" \
  grep -q -- "k3d cluster create sluice --image rancher/k3s:v1.30.11-k3s1 --agents 2 --port $PORT:80@loadbalancer --lb-config-override settings.workerConnections=32768" "$LOG"
assert "it builds the image before importing it" \
  bash -c "grep -n 'docker build' '$LOG' | head -1 | cut -d: -f1 | { read -r b; i=\$(grep -n 'k3d image import' '$LOG' | head -1 | cut -d: -f1); [ -n \"\$b\" ] && [ -n \"\$i\" ] && [ \"\$b\" -lt \"\$i\" ]; }"
assert "it applies traefik, base, mongodb, redis, app in that order ($(apply_order))" \
  test "$(apply_order)" = "traefik base mongodb redis app "
assert "it waits for the mongo, redis and sluice rollouts" \
  test "$(grep -c 'rollout status deployment/\(mongo\|redis\|sluice\)' "$LOG")" -eq 3
assert "it smoke-tests /healthz, /readyz, /api/data, /api/cache/status with --resolve" \
  test "$(grep 'curl ' "$LOG" | grep -- "--resolve assessment.local:$PORT:127.0.0.1" | grep -c 'healthz\|readyz\|api/data\|api/cache/status')" -ge 4
assert "it prints the k6 and kubectl commands" \
  bash -c "grep -q 'k6 run -e BASE_URL=http://assessment.local:$PORT' '$WORK/run1' && grep -q 'kubectl -n assessment get hpa sluice -w' '$WORK/run1'"
assert "--add-hosts added the hosts line" grep -qx '127.0.0.1 assessment.local' "$HOSTS"

: >"$LOG"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build >"$WORK/run2" 2>&1
rc=$?
assert "second setup.sh run succeeds (exit $rc)" test "$rc" -eq 0
[ "$rc" -eq 0 ] || sed 's/^/      | /' "$WORK/run2"
assert "second run reuses the cluster (no create)" test "$(calls 'k3d cluster create sluice')" -eq 0
assert "--skip-build does not build" test "$(calls 'docker build')" -eq 0
assert "second run sees the hosts line and does not add it again" \
  test "$(grep -c 'assessment.local' "$HOSTS")" -eq 1

"$ROOT/cleanup.sh" >"$WORK/clean1" 2>&1
assert "cleanup.sh succeeds" test $? -eq 0
assert "it deleted the cluster and the image" bash -c "[ ! -e '$STATE/cluster' ] && [ ! -e '$STATE/image' ]"
assert "without --remove-hosts the hosts file is untouched" grep -qx '127.0.0.1 assessment.local' "$HOSTS"
"$ROOT/cleanup.sh" --remove-hosts >"$WORK/clean2" 2>&1
assert "cleanup.sh succeeds again when everything is gone" test $? -eq 0
assert "and says so" grep -q 'already gone' "$WORK/clean2"
assert "--remove-hosts removed only sluice's line" \
  bash -c "! grep -q assessment.local '$HOSTS' && grep -qx '127.0.0.1 localhost' '$HOSTS'"

# A PATH holding only what setup.sh needs to reach its preflight, and none of the tools.
mkdir -p "$WORK/bare"
for tool in bash env dirname uname; do ln -s "$(command -v "$tool")" "$WORK/bare/$tool"; done
PATH="$WORK/bare" "$WORK/bare/bash" "$ROOT/setup.sh" >"$WORK/pre" 2>&1
rc=$?
assert "preflight without k3d fails (exit $rc) with an install hint" \
  bash -c "[ $rc -ne 0 ] && grep -q 'missing: .*k3d' '$WORK/pre' && grep -q 'k3d.io' '$WORK/pre'"

printf '  %d passed, %d failed\n' "$pass" "$fail"
[ "$fail" -eq 0 ]

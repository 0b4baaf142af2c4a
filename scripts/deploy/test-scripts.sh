#!/usr/bin/env bash
# Runs setup.sh, cleanup.sh and stress-test/run.sh end to end against stand-ins for
# docker, k3d, kubectl, curl and k6, because CI has no Docker engine and no k3d. The
# stand-ins keep a little state (does the cluster exist, the image, its import on the
# nodes) and log every call, so this proves the scripts' own logic: flags, the order of
# steps, that a second run reuses instead of recreating, that a silently failed image
# import is caught and repaired, that Traefik's tuning is waited for, that the data
# reset deletes the volume, that cleanup fails when Docker does not answer, and that a
# run's records land in its folder. It proves nothing about the real tools;
# docs/deploy.md says what was and was not run against a real cluster.
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

# State files: cluster, image, imported (the build is on the nodes), import-noop (k3d
# import "succeeds" without importing, as in k3d#1538), start-fails, docker-down,
# old-apply (the live Deployment was applied with spec.replicas by an older setup.sh).
stand_in k3d '
case "$1 $2" in
  "version "*) echo "k3d version v5.7.4"; echo "k3s version v1.30.4-k3s1 (default)" ;;
  "cluster get") [ -e "$STATE/cluster" ] ;;
  "cluster create")
    [ -e "$STATE/cluster" ] && { echo "cluster exists" >&2; exit 1; }
    touch "$STATE/cluster" ;;
  "cluster start")
    [ -e "$STATE/start-fails" ] && { echo "ERRO Failed to start server k3d-sluice-server-0" >&2; exit 1; }
    [ -e "$STATE/cluster" ] ;;
  "cluster delete") rm -f "$STATE/cluster" "$STATE/imported" ;;
  "kubeconfig merge") [ -e "$STATE/cluster" ] ;;
  "image import")
    [ -e "$STATE/cluster" ] && [ -e "$STATE/image" ] || exit 1
    [ -e "$STATE/import-noop" ] || touch "$STATE/imported" ;;
  *) echo "k3d stand-in: unexpected: $*" >&2; exit 1 ;;
esac'

stand_in docker '
[ -e "$STATE/docker-down" ] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }
case "$1" in
  info) case "$*" in *CgroupVersion*) echo 2 ;; esac; exit 0 ;;
  build) touch "$STATE/image" ;;
  tag) [ -e "$STATE/image" ] ;;
  save) case "$*" in *--help*) echo "      --platform string   Save only the given platform" ;; *) echo tarball ;; esac ;;
  version) echo linux/amd64 ;;
  ps) printf "k3d-sluice-server-0\nk3d-sluice-agent-0\nk3d-sluice-agent-1\nk3d-sluice-serverlb\n" ;;
  image)
    case "$2" in
      inspect)
        [ -e "$STATE/image" ] || exit 1
        case "$*" in
          *"{{.Id}}"*) echo "sha256:0123456789abcdef0123" ;;
          *"{{.Size}}"*) echo 41000000 ;;
        esac ;;
      ls) [ -e "$STATE/image" ] && printf "sluice:local\nsluice:build-0123456789ab\n" ;;
      rm) rm -f "$STATE/image" ;;
    esac ;;
  exec)
    case "$*" in
      *"ulimit -n"*) echo 1048576 ;;
      *"images ls -q"*) echo docker.io/rancher/mirrored-pause:3.6
        [ -e "$STATE/imported" ] && echo docker.io/library/sluice:build-0123456789ab ;;
      *"images import -"*) cat >/dev/null; touch "$STATE/imported" ;;
      *" df -Pk "*) printf "Filesystem 1024-blocks Used Available Capacity Mounted\noverlay 104857600 20971520 83886080 20%% /\n" ;;
      *" du -sk "*) printf "524288\t/var/lib/rancher/k3s/storage\n" ;;
      *) echo "docker stand-in: unexpected exec: $*" >&2; exit 1 ;;
    esac ;;
  inspect) echo 172.18.0.5 ;;
  run) cat >/dev/null </dev/null; echo "k6 in docker" ;;
  *) echo "docker stand-in: unexpected: $*" >&2; exit 1 ;;
esac'

stand_in kubectl '
[ -e "$STATE/cluster" ] || { echo "The connection to the server was refused" >&2; exit 1; }
[ "$1" = --context ] && shift 2
args="$*"
case "$args" in
  "get nodes -o jsonpath={.items[*].metadata.name}") echo "k3d-sluice-server-0 k3d-sluice-agent-0 k3d-sluice-agent-1" ;;
  "get nodes -o jsonpath={range"*) printf "k3d-sluice-server-0 3145728Ki\nk3d-sluice-agent-0 3145728Ki\nk3d-sluice-agent-1 3145728Ki\n" ;;
  "get nodes"* | "top nodes"*) printf "k3d-sluice-server-0 Ready\nk3d-sluice-agent-0 Ready\nk3d-sluice-agent-1 Ready\n" ;;
  "version -o json") printf "{\n \"clientVersion\": {\"minor\": \"32\"},\n \"serverVersion\": {\n  \"minor\": \"36\"\n }\n}\n" ;;
  "apply -f -"* | *" apply -f -") cat >"$STATE/stdin-$RANDOM"; echo "applied from stdin" ;;
  "label --local -f - "*) cat ;;
  *"create configmap sluice-dashboard"*) echo "kind: ConfigMap" ;;
  "apply "*) echo "applied ${args#apply }" ;;
  *"apply set-last-applied"*) rm -f "$STATE/old-apply"; echo "set" ;;
  *"get job helm-install-traefik"*Failed*) echo "" ;;
  *"get job helm-install-traefik"*) echo "1/" ;;
  *"get deployment traefik -o jsonpath={.spec.template.spec.containers[0].args}") echo "[\"--serversTransport.maxIdleConnsPerHost=20000\",\"--serversTransport.forwardingTimeouts.idleConnTimeout=4s\"]" ;;
  *"get deployment traefik -o jsonpath={.spec.replicas}") echo 2 ;;
  *"get deployment traefik -o jsonpath={.spec.template.spec.containers[0].resources.requests.cpu}") echo 500m ;;
  *"get deployment traefik -o jsonpath={.spec.template.spec.containers[0].resources.requests.memory}") echo 320Mi ;;
  *"get deployment traefik -o jsonpath={.spec.template.spec.containers[0].resources.limits.memory}") echo 608Mi ;;
  *"get deployment sluice -o jsonpath={.metadata.annotations"*) [ -e "$STATE/old-apply" ] && echo "{\"spec\":{\"replicas\":2}}" ;;
  *"get deployment sluice -o jsonpath="*) echo stamped ;;
  *"get deployment "*"-o jsonpath"*) echo 2 ;;
  *"get deployment sluice" | *"get deployment traefik") exit 0 ;;
  *"get configmap sluice-config -o jsonpath={.data}") echo "{\"APP_PORT\":\"8000\"}" ;;
  *"get secret sluice-secrets -o jsonpath={.data}") echo "{\"MONGO_URI\":\"eA==\"}" ;;
  *"get pod -l app.kubernetes.io/name=mongo"*) echo k3d-sluice-agent-0 ;;
  *"get pv -o jsonpath"*) echo "" ;;
  *"delete "*) echo "deleted ${args#*delete }" ;;
  *"rollout status"*) exit 0 ;;
  *"get crd "* | *"wait --for=condition=Established"*) exit 0 ;;
  *"-n monitoring get deployment/monitoring-grafana"*) exit 0 ;;
  *"exec deploy/sluice -- /usr/local/bin/sluice status"*) printf "l1\n  hits 1\n" ;;
  *"exec deploy/redis -- redis-cli FLUSHALL"*) echo OK ;;
  *"top pods"* | *"get hpa"* | *"describe hpa"* | *"get events"* | *"get pods"*) echo "$args" ;;
  *) echo "kubectl stand-in: unexpected: $args" >&2; exit 1 ;;
esac'

stand_in curl '
out="" url=""
while [ $# -gt 0 ]; do
  case "$1" in -o) out=$2; shift 2 ;; -m|-w|-H|--resolve) shift 2 ;; http*) url=$1; shift ;; *) shift ;; esac
done
code=200
case "$url" in
  */healthz) body="{\"status\":\"ok\",\"timestamp\":\"t\"}" ;;
  */readyz) body="{\"status\":\"ready\"}" ;;
  */api/data) body="{\"status\":\"success\",\"reads\":[null,null,null,null,null],\"writes\":[]}" ;;
  *) body="404 page not found"; code=404 ;;
esac
printf "%s" "$body" >"$out"
printf "%s" "$code"'

# k6: writes what --summary-export and K6_WEB_DASHBOARD_EXPORT name, like the real one.
stand_in k6 '
case "$1" in
  version) echo "k6 v1.1.0 (stand-in)"; exit 0 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in --summary-export) echo "{\"metrics\":{}}" >"$2"; shift 2 ;; *) shift ;; esac
done
[ -n "${K6_WEB_DASHBOARD_EXPORT:-}" ] && echo "<html></html>" >"$K6_WEB_DASHBOARD_EXPORT"
echo "checks.........: 100.00%"'

export PATH="$BIN:$PATH" SLUICE_HOSTS_FILE="$HOSTS" SLUICE_CLUSTER=sluice
unset SLUICE_NODE_MEMORY
PORT=18080 # the port check needs a free one; 80 may be taken (or privileged) here

pass=0 fail=0
assert() { # DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); printf '  ok   %s\n' "$what"
  else fail=$((fail + 1)); printf '  FAIL %s\n' "$what"; fi
}
calls() { grep -c -- "$1" "$LOG" || true; }
line_of() { grep -n -- "$1" "$LOG" | head -n 1 | cut -d: -f1; }
before() { local a b; a=$(line_of "$1"); b=$(line_of "$2"); [ -n "$a" ] && [ -n "$b" ] && [ "$a" -lt "$b" ]; }
# What kubectl apply was given, in order: directories and files under k8s/, "rendered"
# for setup.sh's filled-in Deployment, "stdin" for a pipe.
apply_order() {
  grep '^kubectl .* apply ' "$LOG" | grep -v set-last-applied | sed -e 's/.* apply //' |
    sed -e 's#-f [^ ]*/k8s/\([^ ]*\)#\1#g' -e 's#-f /[^ ]*/deployment.yaml#rendered#' -e 's#^-f -$#stdin#' -e 's#/ *$##' |
    tr '\n' ';'
}
show_on_failure() { [ "$1" -eq 0 ] || sed 's/^/      | /' "$2"; }

"$ROOT/setup.sh" --help >"$WORK/out" 2>&1
assert "setup.sh --help exits 0 and explains the flags" \
  bash -c "grep -q -- '--skip-build' '$WORK/out' && grep -q -- '--monitoring' '$WORK/out' && grep -q -- '--reset-data' '$WORK/out'"
"$ROOT/setup.sh" --no-such-flag >/dev/null 2>&1
assert "setup.sh rejects an unknown flag with exit 2" test $? -eq 2

# ---------------------------------------------------------------- first run, import silently failing
touch "$STATE/import-noop"
"$ROOT/setup.sh" --http-port "$PORT" --add-hosts >"$WORK/run1" 2>&1
rc=$?
assert "first setup.sh run succeeds (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/run1"
assert "it creates the cluster once: 2 agents, LB tuning, open-file limit, node memory, k3s 1.36" \
  grep -q -- "k3d cluster create sluice --image rancher/k3s:v1.36.4-k3s1 --agents 2 --port $PORT:80@loadbalancer --lb-config-override settings.workerConnections=32768 --runtime-ulimit nofile=1048576:1048576 --servers-memory 3g --agents-memory 3g" "$LOG"
assert "it builds the image before importing it" before 'docker build' 'k3d image import'
assert "it imports the build's own tag with the image" grep -q 'k3d image import sluice:local sluice:build-0123456789ab' "$LOG"
assert "k3d's import did nothing: every node was checked, then fed with ctr images import" \
  bash -c "[ \$(grep -c 'images ls -q' '$LOG') -ge 6 ] && [ \$(grep -c 'images import -' '$LOG') -eq 3 ] && grep -q 'is on every node' '$WORK/run1'"
assert "it waits for the helm-install-traefik job and Traefik's arguments and resources before the rollout" \
  bash -c "grep -q 'get job helm-install-traefik' '$LOG' && grep -q 'get deployment traefik -o jsonpath={.spec.template.spec.containers\[0\].args}' '$LOG' && grep -q 'resources.limits.memory}' '$LOG'"
assert "it checks open files on every node and the load balancer" \
  test "$(grep -c "exec .* sh -c ulimit -n" "$LOG")" -eq 4
assert "it applies traefik, base, mongodb, redis, app's files, then the stamped Deployment ($(apply_order))" \
  bash -c "[[ '$(apply_order)' == 'traefik;base;mongodb;redis;app/configmap.yaml app/hpa.yaml app/ingress.yaml app/networkpolicy.yaml app/pdb.yaml app/secret.yaml app/service.yaml;rendered;' ]]"
assert "the Deployment is stamped in its first apply (no patch: one rollout)" test "$(calls 'patch deployment')" -eq 0
assert "the stamp hashes the ConfigMap's and the Secret's data" \
  bash -c "grep -q 'get configmap sluice-config -o jsonpath={.data}' '$LOG' && grep -q 'get secret sluice-secrets -o jsonpath={.data}' '$LOG' && grep -q 'stamped with image 0123456789ab and settings' '$WORK/run1'"
assert "it waits for the mongo, redis and sluice rollouts" \
  test "$(grep -c 'rollout status deployment/\(mongo\|redis\|sluice\)' "$LOG")" -eq 3
assert "it smoke-tests /healthz, /readyz, /api/data with --resolve, and that /metrics is not published" \
  bash -c "[ \$(grep 'curl ' '$LOG' | grep -- '--resolve assessment.local:$PORT:127.0.0.1' | grep -c 'healthz\|readyz\|api/data\|metrics') -ge 4 ] && grep -q 'internal only' '$WORK/run1'"
assert "it reports the Docker disk's free space" grep -q 'Docker disk (node k3d-sluice-agent-0): 80 of 100 GiB free' "$WORK/run1"
assert "it prints run.sh, the k6 HOSTS mapping and the kubectl commands" \
  bash -c "grep -q 'stress-test/run.sh --in-docker' '$WORK/run1' && grep -q 'HOSTS=assessment.local=127.0.0.1' '$WORK/run1' && grep -q 'kubectl -n assessment get hpa sluice -w' '$WORK/run1'"
assert "no monitoring without --monitoring" test "$(calls 'kube-prometheus-stack')" -eq 0
assert "--add-hosts added the hosts line" grep -qx '127.0.0.1 assessment.local' "$HOSTS"
rm -f "$STATE/import-noop"

# ---------------------------------------------------------------- second run over an older setup's Deployment
: >"$LOG"
touch "$STATE/old-apply"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build >"$WORK/run2" 2>&1
rc=$?
assert "second setup.sh run succeeds (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/run2"
assert "second run reuses the cluster (no create)" test "$(calls 'k3d cluster create sluice')" -eq 0
assert "--skip-build does not build" test "$(calls 'docker build')" -eq 0
assert "the image already on every node is not imported again by ctr" test "$(calls 'images import -')" -eq 0
assert "an older Deployment's spec.replicas is handed to the HPA before the apply" \
  before 'apply set-last-applied' "apply -f /.*/deployment.yaml"
assert "second run sees the hosts line and does not add it again" \
  test "$(grep -c 'assessment.local' "$HOSTS")" -eq 1

# ---------------------------------------------------------------- --reset-data and --monitoring
: >"$LOG"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --reset-data --monitoring >"$WORK/run3" 2>&1
rc=$?
assert "setup.sh --reset-data --monitoring succeeds (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/run3"
assert "--reset-data deletes MongoDB's Deployment and then its claim before applying" \
  bash -c "grep -q 'delete deployment mongo' '$LOG' && grep -q 'delete pvc mongo-pvc' '$LOG'" 
assert "... before the manifests are applied again" before 'delete pvc mongo-pvc' 'apply -f .*/k8s/mongodb/'
assert "... and flushes Redis' cache of the deleted documents" grep -q 'redis-cli FLUSHALL' "$LOG"
assert "--monitoring applies the pinned HelmChart, waits for the CRDs, then the rules, PodMonitor and dashboard" \
  bash -c "grep -q 'apply -f .*/k8s/monitoring/kube-prometheus-stack.yaml' '$LOG' && grep -q 'wait --for=condition=Established' '$LOG' && grep -q 'apply -f .*/k8s/grafana/podmonitor.yaml' '$LOG' && grep -q 'create configmap sluice-dashboard' '$LOG'"
assert "... the PrometheusRule only after the CRDs" before 'wait --for=condition=Established' 'podmonitor.yaml'
assert "... and the PrometheusRule sent is the generated one" \
  bash -c "grep -l 'kind: PrometheusRule' '$STATE'/stdin-* | head -n 1 | xargs grep -q 'alert: SluiceDatabaseDiskFilling'"
assert "... and says where to look" bash -c "grep -q 'localhost:9090/alerts' '$WORK/run3' && grep -q 'svc/monitoring-grafana' '$WORK/run3'"

# ---------------------------------------------------------------- run.sh
: >"$LOG"
(cd "$WORK" && "$ROOT/stress-test/run.sh" --profile smoke --out "$WORK/run-a" --period 1 >"$WORK/runsh" 2>&1)
rc=$?
assert "stress-test/run.sh --profile smoke succeeds (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/runsh"
assert "it saves k6's summary JSON and HTML report, its log, HPA events, top samples, events" \
  bash -c "cd '$WORK/run-a' && for f in k6-summary.json k6-report.html k6.log hpa-events.txt hpa.txt top-pods.txt top-nodes.txt events.txt pods.txt run.env disk.txt; do [ -s \$f ] || { echo missing \$f; exit 1; }; done"
assert "k6 ran the smoke profile with the HOSTS mapping and summary export" \
  grep -q -- "^k6 run --summary-export $WORK/run-a/k6-summary.json -e PROFILE=smoke -e BASE_URL=http://assessment.local -e HOSTS=assessment.local=127.0.0.1" "$LOG"
(cd "$WORK" && "$ROOT/stress-test/run.sh" --in-docker --out "$WORK/run-b" --period 1 >"$WORK/runsh2" 2>&1)
rc=$?
assert "stress-test/run.sh --in-docker (full profile) succeeds (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/runsh2"
assert "--in-docker runs k6 on the cluster network, aimed at the load balancer" \
  grep -q -- '^docker run --rm --network k3d-sluice .*grafana/k6:1.1.0 run --summary-export /results/k6-summary.json -e PROFILE=full -e BASE_URL=http://assessment.local -e HOSTS=assessment.local=172.18.0.5' "$LOG"
printf 'overlay 104857600 99614720 5242880 95%% /\n' >"$WORK/fulldisk"
sed -i 's#\*" df -Pk "\*) printf .*#*" df -Pk "*) cat '"$WORK"'/fulldisk ;;#' "$BIN/docker"
"$ROOT/stress-test/run.sh" --out "$WORK/run-c" >"$WORK/runsh3" 2>&1
rc=$?
assert "run.sh refuses a full run on a nearly full Docker disk (exit $rc) and says how to free it" \
  bash -c "[ $rc -eq 1 ] && grep -q 'reset-data' '$WORK/runsh3'"

# ---------------------------------------------------------------- cleanup
"$ROOT/cleanup.sh" >"$WORK/clean1" 2>&1
assert "cleanup.sh succeeds" test $? -eq 0
assert "it deleted the cluster and the image" bash -c "[ ! -e '$STATE/cluster' ] && [ ! -e '$STATE/image' ]"
assert "without --remove-hosts the hosts file is untouched" grep -qx '127.0.0.1 assessment.local' "$HOSTS"
"$ROOT/cleanup.sh" --remove-hosts >"$WORK/clean2" 2>&1
assert "cleanup.sh succeeds again when everything is gone" test $? -eq 0
assert "and says so" grep -q 'already gone' "$WORK/clean2"
assert "--remove-hosts removed only sluice's line" \
  bash -c "! grep -q assessment.local '$HOSTS' && grep -qx '127.0.0.1 localhost' '$HOSTS'"
touch "$STATE/docker-down"
"$ROOT/cleanup.sh" >"$WORK/clean3" 2>&1
rc=$?
assert "with Docker down cleanup.sh fails (exit $rc) instead of calling the cluster gone" \
  bash -c "[ $rc -eq 1 ] && grep -q 'cannot tell' '$WORK/clean3' && ! grep -q 'already gone' '$WORK/clean3'"
rm -f "$STATE/docker-down"

# ---------------------------------------------------------------- failures
touch "$STATE/cluster" "$STATE/image" "$STATE/start-fails"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build >"$WORK/run4" 2>&1
rc=$?
assert "a failing 'k3d cluster start' stops setup.sh (exit $rc) with k3d's error" \
  bash -c "[ $rc -eq 1 ] && grep -q 'could not start the existing cluster' '$WORK/run4' && grep -q 'Failed to start server' '$WORK/run4'"
rm -f "$STATE/start-fails" "$STATE/cluster" "$STATE/image"

# A PATH holding only what setup.sh needs to reach its preflight, and none of the tools.
mkdir -p "$WORK/bare"
for tool in bash env dirname uname; do ln -s "$(command -v "$tool")" "$WORK/bare/$tool"; done
PATH="$WORK/bare" "$WORK/bare/bash" "$ROOT/setup.sh" >"$WORK/pre" 2>&1
rc=$?
assert "preflight without k3d fails (exit $rc) with an install hint" \
  bash -c "[ $rc -ne 0 ] && grep -q 'missing: .*k3d' '$WORK/pre' && grep -q 'k3d.io' '$WORK/pre'"

printf '  %d passed, %d failed\n' "$pass" "$fail"
[ "$fail" -eq 0 ]

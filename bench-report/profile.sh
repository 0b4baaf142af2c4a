#!/usr/bin/env bash
# Sourced, never run: what bench-report/cost.sh and bench-report/flame.sh share. Both
# profile one replica of a lab of their own, built with the `profiling` cargo profile
# (release plus line tables, so a flame graph names functions and lines).
#
#   profile_setup NAME [PERF]
#                          the run folder results/NAME-<time> (RUN), the lab's state
#                          folder (LAB_STATE_DIR), the profiling build (BIN), and unless
#                          PERF is 0, perf and inferno (INFERNO); a lab started later is
#                          cleaned up on exit
#   profile_lab SLUICE     a lab with one replica of SLUICE and no load; sets PID, URL
#   profile_perf S HZ NAME TITLE
#                          perf on the replica for S seconds at HZ, folded into
#                          RUN/folded-NAME.txt, drawn as RUN/flame-NAME.svg (TITLE), its
#                          top frames in RUN/top-NAME.txt
#   profile_done NAME      results/NAME-latest points at the run folder

# shellcheck source=scripts/tools.sh
. scripts/tools.sh

profile_setup() {
  TS=$(date -u +%Y%m%dT%H%M%SZ)
  RUN=$ROOT/results/$1-$TS
  mkdir -p "$RUN"
  export LAB_STATE_DIR=$ROOT/results/.$1-state
  tools_step "cargo build --profile profiling (sluice and the lab)"
  cargo build --profile profiling --locked -p sluice -p sluice-lab --bins \
    >"$RUN/cargo-build.log" 2>&1 || { tail -n 30 "$RUN/cargo-build.log" >&2; exit 1; }
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/profiling
  if [ "${2:-1}" != 0 ]; then
    command -v perf >/dev/null || tools_apt linux-perf
    INFERNO=$(tools_inferno)
  fi
  trap 'lab/cleanup-local.sh --quiet >>"$RUN/cleanup.log" 2>&1 || true' EXIT
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

profile_lab() {
  tools_step "lab up: one replica, no load ($1)"
  SLUICE_BIN=$1 LAB_BIN=$BIN/lab lab/setup-local.sh --no-load --replicas 1 \
    >"$RUN/setup.log" 2>&1 || { tail -n 30 "$RUN/setup.log" >&2; exit 1; }
  PID=$(cat "$LAB_STATE_DIR/slot-0.pid")
  # shellcheck disable=SC2034 # read by the script that sources this
  URL=http://127.0.0.1:$(cat "$LAB_STATE_DIR/slot-0.port")
}

profile_perf() {
  local seconds=$1 hz=$2 name=$3 title=$4
  perf record -q -F "$hz" --call-graph dwarf,16384 -p "$PID" -o "$RUN/perf-$name.data" \
    -- sleep "$seconds" 2>>"$RUN/perf.log"
  perf script --no-inline -i "$RUN/perf-$name.data" 2>>"$RUN/perf.log" |
    "$INFERNO/inferno-collapse-perf" >"$RUN/folded-$name.txt"
  "$INFERNO/inferno-flamegraph" --title "$title" <"$RUN/folded-$name.txt" >"$RUN/flame-$name.svg"
  "$BIN/lab" sluice-cost --top "$RUN/folded-$name.txt" >"$RUN/top-$name.txt"
  rm -f "$RUN/perf-$name.data"
}

profile_done() {
  ln -sfn "$1-$TS" "results/$1-latest"
  echo "results: ${RUN#"$ROOT"/}"
}

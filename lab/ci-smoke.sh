#!/usr/bin/env bash
# CI smoke test of the local lab: the lab's logic on made-up figures (the example's unit
# tests) and cgroup v2's exact writes against a stand-in folder; then the lab brought up
# with --no-load, and set up again over it (which must stop the first one) for a short
# chaos run with autoscaling: every fault must happen and be recorded, nothing
# acknowledged may be lost, no second may exceed the budget beyond the tolerance, and
# Prometheus must scrape every replica and evaluate the alert rules. Then cleanup, and
# checks that nothing the lab started is left: processes, mount, loop device, cgroups.
#
# Uses its own state folder, so a lab someone has running is left alone.
# Prints "lab-smoke: N passed, M failed" last; exits non-zero when anything failed.
#
#   LAB_SMOKE_DURATION  seconds of /api/data load (default 60: five faults, a few s each)
#   LAB_SMOKE_VUS       VUs (default 30)
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export LAB_RESULTS_DIR=${LAB_RESULTS_DIR:-$ROOT/results}
export LAB_STATE_DIR=${LAB_SMOKE_STATE_DIR:-$LAB_RESULTS_DIR/.lab-smoke-state}
DURATION=${LAB_SMOKE_DURATION:-60}
VUS=${LAB_SMOKE_VUS:-30}
T0=$SECONDS
mkdir -p "$LAB_RESULTS_DIR"
TS=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=$LAB_RESULTS_DIR/lab-smoke-$TS.json
LOG=$LAB_RESULTS_DIR/lab-smoke-$TS.log
SNAP=$(mktemp -d)
trap 'rm -rf "$SNAP" "$SNAP.selftest"' EXIT

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "ok   - $*"; }
fail() { failed=$((failed + 1)); echo "FAIL - $*"; }
check() { # NAME CMD...: one test
  local name=$1
  shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}
# save_state: copies what the running lab recorded, to check later that it is all gone.
save_state() {
  rm -f "$SNAP"/*
  for f in pids cgroups loopdev mountpoint; do
    [ -f "$LAB_STATE_DIR/$f" ] && cp "$LAB_STATE_DIR/$f" "$SNAP/$f"
  done
  [ -f "$LAB_STATE_DIR/disk.img" ] && echo "$LAB_STATE_DIR/disk.img" >"$SNAP/image"
  return 0
}
# shellcheck disable=SC2086  # the stat fields are meant to split
proc_start() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; echo "${20}"; }
none_alive() {
  [ -f "$SNAP/pids" ] || return 0
  local name pid start
  while read -r name pid start; do
    if [ "$(proc_start "$pid")" = "$start" ]; then echo "  still running: $name ($pid)"; return 1; fi
  done <"$SNAP/pids"
}
no_mount() { [ ! -f "$SNAP/mountpoint" ] || ! mountpoint -q "$(cat "$SNAP/mountpoint")"; }
loops_on_image() { losetup -l -n -O BACK-FILE 2>/dev/null | grep -c "$LAB_STATE_DIR/disk.img"; }
at_most_one_loop() { [ "$(loops_on_image)" -le 1 ]; }
no_loop() { [ "$(loops_on_image)" -eq 0 ]; }
no_cgroups() { [ ! -f "$SNAP/cgroups" ] || ! grep -q . <(while read -r d; do [ -d "$d" ] && echo "$d"; done <"$SNAP/cgroups"); }
machine_allows_constraints() {
  [ "$(id -u)" -eq 0 ] && [ -e /dev/loop-control ] && command -v losetup >/dev/null &&
    [ -d /sys/fs/cgroup/blkio ] && [ -d /sys/fs/cgroup/cpu ] && [ -d /sys/fs/cgroup/memory ]
}

echo "lab smoke: log in ${LOG#"$ROOT"/}"

# 0. The lab's logic on made-up figures: HPA decisions, the budget tolerance, the memory
#    formula, k6's thresholds, the settings (the lab example's unit tests).
(cd "$ROOT" && cargo test --locked --quiet -p sluice-lab) >>"$LOG" 2>&1
check "the lab example's unit tests (HPA, tolerance, memory formula, thresholds)" [ $? -eq 0 ]

# cgroup v2 cannot be exercised on a cgroup v1 host: its exact writes, in order, against
# a stand-in folder (io.max, cpu.max and memory.max are plain files there).
T=$SNAP.selftest
mkdir -p "$T/cg"
LAB_STATE_DIR=$T/state LAB_RESULTS_DIR=$T/results LAB_CG_TRACE=$T/trace bash -c \
  '. "$1/lib.sh" && lab_cgroup2_setup "$2" sluice-lab-test 7:3 524288000' _ "$HERE" "$T/cg" >"$T/dir"
printf '%s\n' "$T/cg/cgroup.subtree_control +io +cpu +memory" \
  "$T/cg/sluice-lab-test/io.max 7:3 riops=100 wiops=100" \
  "$T/cg/sluice-lab-test/cpu.max 50000 100000" \
  "$T/cg/sluice-lab-test/memory.max 524288000" >"$T/expected"
check "cgroup v2: controllers enabled, then io.max, cpu.max, memory.max, in that order" diff "$T/expected" "$T/trace"
cg2_files() {
  local d=$T/cg/sluice-lab-test
  [ "$(cat "$d/io.max")" = "7:3 riops=100 wiops=100" ] && [ "$(cat "$d/cpu.max")" = "50000 100000" ] &&
    [ "$(cat "$d/memory.max")" = 524288000 ] && [ "$(cat "$T/dir")" = "$d" ]
}
check "cgroup v2: the files hold the limits" cg2_files

# 1. Up without load.
"$HERE/setup-local.sh" --replicas 1 --profile smoke --no-load >>"$LOG" 2>&1
rc=$?
check "setup --no-load brings the lab up (exit $rc)" [ "$rc" -eq 0 ]
if [ "$rc" -eq 0 ]; then
  # shellcheck disable=SC1091
  BASE_URL=$(. "$LAB_STATE_DIR/lab.env" && echo "$BASE_URL")
  check "HAProxy passes /readyz through" curl -fsS -o /dev/null -m 5 "$BASE_URL/readyz"
  check "/api/data answers through HAProxy" curl -fsS -o /dev/null -m 10 "$BASE_URL/api/data"
fi
save_state

# 2. Setup over a running lab: stops the old one first, then a short chaos run with
#    autoscaling. The memory target is lowered (--memory-target via LAB_MEMORY_TARGET) so that
#    so few VUs make it scale, the HPA's windows shrunk 20 times, the faults 3 s apart,
#    the database's ceiling measured for 3 s a setting.
LAB_MEMORY_TARGET=${LAB_MEMORY_TARGET:-3} LAB_CHAOS_GAP=${LAB_CHAOS_GAP:-3} LAB_CEILING_SECONDS=${LAB_CEILING_SECONDS:-3} \
  "$HERE/setup-local.sh" --profile smoke --duration "$DURATION" --healthz-duration 15 --max-vus "$VUS" \
  --autoscale --time-scale 20 --chaos --report "$REPORT" >>"$LOG" 2>&1
rc=$?
check "setup --chaos --autoscale, run over the running lab, passes its verdict (exit $rc)" [ "$rc" -eq 0 ]
check "the first lab's processes were stopped" none_alive
check "the first lab's loop device was detached" at_most_one_loop
save_state

# 3. The report.
LAB_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/lab
CONSTRAINED=()
machine_allows_constraints && CONSTRAINED=(--constrained)
if [ -s "$REPORT" ] && [ -x "$LAB_BIN" ]; then
  pass "report written"
  while IFS= read -r line; do
    case "$line" in
      ok\ *) pass "${line#ok }" ;;
      *) fail "${line#fail }" ;;
    esac
  done < <("$LAB_BIN" check-report "$REPORT" "${CONSTRAINED[@]}")
  sed -n '/^SLUICE.S OWN CHECKS/,/^VERDICT/p' "$LOG"
else
  fail "report written (${REPORT#"$ROOT"/})"
fi

# 4. Cleanup leaves nothing behind.
"$HERE/cleanup-local.sh" >>"$LOG" 2>&1
check "cleanup-local.sh exits 0" [ $? -eq 0 ]
check "no process the lab started is left" none_alive
check "the disk is unmounted" no_mount
check "the loop device is detached" no_loop
check "the cgroups are removed" no_cgroups
check "the state folder is gone" [ ! -e "$LAB_STATE_DIR" ]

if [ "$failed" -ne 0 ]; then
  echo "--- last lines of the log (${LOG#"$ROOT"/})"
  tail -n 40 "$LOG"
fi
echo "lab-smoke: $passed passed, $failed failed ($((SECONDS - T0)) s)"
[ "$failed" -eq 0 ]

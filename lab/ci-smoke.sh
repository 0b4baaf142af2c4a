#!/usr/bin/env bash
# CI smoke test of the local lab: brings the lab up with --no-load, runs setup again over
# it (which must stop the first one), drives a few seconds of load through 1 replica
# (constrained disk, CPU and memory when the machine allows), checks that the report has
# every figure and that no acknowledged document was lost, then cleans up and checks
# that nothing the lab started is left: processes, mount, loop device, cgroups.
#
# Uses its own state folder, so a lab someone has running is left alone.
# Prints "lab-smoke: N passed, M failed" last; exits non-zero when anything failed.
#
#   LAB_SMOKE_DURATION  seconds of load per k6 run (default 5)
#   LAB_SMOKE_VUS       VUs (default 20)
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export LAB_RESULTS_DIR=${LAB_RESULTS_DIR:-$ROOT/results}
export LAB_STATE_DIR=${LAB_SMOKE_STATE_DIR:-$LAB_RESULTS_DIR/.lab-smoke-state}
DURATION=${LAB_SMOKE_DURATION:-5}
VUS=${LAB_SMOKE_VUS:-20}
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

# 0. The report's arithmetic on made-up figures: 100 acknowledged responses but only
#    480 documents stored must show 20 lost and fail (exit 3); the ratio is 50/200.
T=$SNAP.selftest
mkdir -p "$T"
cat >"$T/k6-data.json" <<'JSON'
{"root_group": {"checks": {"status is 200": {"passes": 100, "fails": 5},
  "body status is \"success\"": {"passes": 100, "fails": 5}}},
 "metrics": {"http_reqs": {"count": 105, "rate": 50.0},
  "http_req_duration": {"p(95)": 900, "p(99)": 1500, "med": 100, "max": 3000,
    "thresholds": {"p(95)<2000": false, "p(99)<5000": false}},
  "http_req_failed": {"value": 0.05, "thresholds": {"rate<0.01": true}},
  "error_rate": {"value": 0.05}, "successful_requests": {"count": 98},
  "failed_requests": {"count": 7}}}
JSON
cat >"$T/k6-healthz.json" <<'JSON'
{"metrics": {"http_reqs": {"count": 400, "rate": 200.0}, "http_req_duration": {"p(95)": 10, "p(99)": 20}}}
JSON
echo '{"t": 0, "commands": {"insert": 10, "serverStatus": 5}, "commands_total": 15, "probe_commands": 5, "documents_inserted": 0, "records": 0}' >"$T/before.json"
echo '{"t": 10, "commands": {"insert": 110, "serverStatus": 105}, "commands_total": 215, "probe_commands": 105, "documents_inserted": 480}' >"$T/after.json"
echo '{"t": 12, "commands": {"insert": 110, "serverStatus": 107}, "commands_total": 217, "probe_commands": 107, "documents_inserted": 480, "records": 480}' >"$T/settled.json"
echo '{"l1": {"hits": 90, "misses": 10}, "l2": {"hits": 1, "misses": 1}}' >"$T/cache-a.json"
python3 "$HERE/labtool.py" report --meta /dev/null --data-summary "$T/k6-data.json" \
  --healthz-summary "$T/k6-healthz.json" --before "$T/before.json" --after "$T/after.json" --settled "$T/settled.json" \
  --cache "$T/cache-a.json" --out "$T/report.json" >"$T/table.txt" 2>&1
rc=$?
check "report exits 3 when documents were lost (exit $rc)" [ "$rc" -eq 3 ]
check "report computes lost, ratio, commands/s, docs/s and hit ratio" python3 - "$T/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["documents"]["lost"] == 20, r["documents"]
assert abs(r["ratio_api_to_healthz"] - 0.25) < 1e-9
assert abs(r["database"]["commands_per_s"] - 10.0) < 1e-9, r["database"]  # serverStatus is the lab's own
assert abs(r["database"]["docs_per_s"] - 48.0) < 1e-9
assert abs(r["cache_hit_ratios"]["all"]["l1"]["hit_ratio"] - 0.9) < 1e-9
assert r["api_data"]["thresholds"]["http_req_failed rate<0.01"] is False
assert r["api_data"]["thresholds"]["http_req_duration p(95)<2000"] is True
PY
# A database restart mid-run zeroes its counters: the report must add across it.
printf '%s\n' '{"t": 5, "commands_total": 115, "probe_commands": 55, "documents_inserted": 300}' \
  '{"t": 6, "commands_total": 3, "probe_commands": 1, "documents_inserted": 0}' >"$T/samples.jsonl"
echo '{"t": 10, "commands": {"insert": 30, "serverStatus": 21}, "commands_total": 53, "probe_commands": 21, "documents_inserted": 180}' >"$T/after.json"
python3 "$HERE/labtool.py" report --meta /dev/null --data-summary "$T/k6-data.json" \
  --healthz-summary "$T/k6-healthz.json" --before "$T/before.json" --after "$T/after.json" \
  --settled "$T/settled.json" --samples "$T/samples.jsonl" --out "$T/report2.json" >/dev/null 2>&1
check "report adds serverStatus counters across a database restart" python3 - "$T/report2.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["database"]
assert d["commands"] == 82, d            # 50 before the restart, 2 + 30 after it
assert d["documents_inserted"] == 480, d
assert d["counters_reset_by_restart"] is True, d
PY

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

# 2. Setup over a running lab: stops the old one first, then a few seconds of load.
"$HERE/setup-local.sh" --replicas 1 --profile smoke --duration "$DURATION" --max-vus "$VUS" \
  --report "$REPORT" >>"$LOG" 2>&1
rc=$?
check "setup with load, run over the running lab (exit $rc)" [ "$rc" -eq 0 ]
check "the first lab's processes were stopped" none_alive
check "the first lab's loop device was detached" at_most_one_loop
save_state

# 3. The report.
if [ -s "$REPORT" ]; then
  pass "report written"
  while IFS= read -r line; do
    case "$line" in
      ok\ *) pass "${line#ok }" ;;
      *) fail "${line#fail }" ;;
    esac
  done < <(python3 - "$REPORT" "$(machine_allows_constraints && echo 1 || echo 0)" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
allows = sys.argv[2] == "1"
def get(path):
    node = r
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node
figures = [
    "api_data.req_per_s", "api_data.p95_ms", "api_data.p99_ms", "api_data.successful_requests",
    "api_data.thresholds", "healthz_ceiling.req_per_s", "healthz_ceiling.p95_ms",
    "ratio_api_to_healthz", "database.commands_per_s", "database.docs_per_s",
    "database.commands_per_s_peak_1s", "documents.stored", "documents.lost", "disk.db_bytes",
    "cache_hit_ratios.all.l1.hit_ratio", "cache_hit_ratios.all.l2.hit_ratio",
    "meta.constraints.disk", "meta.constraints.cpu", "meta.constraints.memory",
    "meta.db_restarts", "database.docs_per_insert_command", "meta.sluice_peak_rss_mib",
    "meta.sluice_rss_cap_mib",
]
for f in figures:
    v = get(f)
    print(("ok " if v not in (None, {}, "") else "fail ") + f"report has {f} ({v if not isinstance(v, dict) else len(v)})")
lost = get("documents.lost")
print(("ok " if lost == 0 else "fail ") + f"lost == 0 (stored {get('documents.stored')}, 5 x acknowledged {get('documents.expected_5x_acknowledged')})")
ok_req = (get("api_data.successful_requests") or 0) > 0
print(("ok " if ok_req else "fail ") + "some /api/data requests succeeded")
print(("ok " if get("meta.db_restarts") == 0 else "fail ") + f"the database never died (restarts {get('meta.db_restarts')}, OOM kills {get('meta.db_oom_kills')})")
print(("ok " if get("checks")["sluice peak RSS < cap"] else "fail ") + f"sluice peak RSS {get('meta.sluice_peak_rss_mib')} MiB under the cap of {get('meta.sluice_rss_cap_mib')} MiB")
cps = get("database.commands_per_s")
print(("ok " if cps is not None and cps <= 100 else "fail ") + f"database commands/s <= 100 ({cps})")
if allows:
    print(("ok " if get("meta.constrained") is True else "fail ") + "the database ran constrained (the machine allows it)")
EOF
  )
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
echo "lab-smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

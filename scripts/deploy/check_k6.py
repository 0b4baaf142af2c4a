#!/usr/bin/env python3
"""Checks one profile of stress-test/stress-test.js through `k6 inspect`.

    check_k6.py K6 PROFILE [MAX_VUS]

k6 inspect evaluates the script's options the way `k6 run` would, so this compares
what k6 will actually run (stages, graceful stop, thresholds) with ASSESSMENT.md, and
checks the parts inspect does not show (checks, custom metrics, setup) in the source.
Exits 1 with the differences.
"""

import json
import re
import subprocess
import sys

SCRIPT = "stress-test/stress-test.js"

FULL = [("1m0s", 1000), ("2m0s", 5000), ("3m0s", 10000), ("5m0s", 10000), ("2m0s", 0)]
PROFILES = {
    "full": (FULL, 10000),
    "lab": ([("20s", 1000), ("40s", 5000), ("40s", 10000), ("1m0s", 10000), ("20s", 0)], 10000),
    "smoke": ([("30s", 100)], 100),
}
THRESHOLDS = {
    "http_req_duration": ["p(95)<2000", "p(99)<5000"],
    "error_rate": ["rate<0.01"],
    "http_req_failed": ["rate<0.01"],
}
# What the source must contain (inspect does not show checks, metric kinds or setup).
SOURCE = {
    "check: status 200": r"r\.status === 200",
    "check: body status": r"bodyStatus\(r\) === EXPECT_STATUS",
    "check: duration < 2 s": r"r\.timings\.duration < 2000",
    "metric error_rate (Rate)": r"new Rate\('error_rate'\)",
    "metric response_time_ms (Trend)": r"new Trend\('response_time_ms'",
    "metric successful_requests (Counter)": r"new Counter\('successful_requests'\)",
    "metric failed_requests (Counter)": r"new Counter\('failed_requests'\)",
    "Accept: application/json": r"Accept: 'application/json'",
    "10 s timeout": r"timeout: '10s'",
    "setup() aborts unless /readyz is 200": r"/readyz`[\s\S]*status !== 200\)[\s\S]*exec\.test\.abort",
    "BASE_URL default": r"__ENV\.BASE_URL \|\| 'http://assessment\.local'",
}


def main():
    k6, profile = sys.argv[1], sys.argv[2]
    max_vus = int(sys.argv[3]) if len(sys.argv) > 3 else None
    stages, peak = PROFILES[profile]
    if max_vus is not None:
        stages = [(d, 0 if t == 0 else max(1, round(t * max_vus / peak))) for d, t in stages]
    env = ["-e", f"PROFILE={profile}"] + (["-e", f"MAX_VUS={max_vus}"] if max_vus else [])
    res = subprocess.run([k6, "inspect", "--execution-requirements", *env, SCRIPT],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr.strip())
        print(f"  FAILED: k6 inspect rejected the {profile} profile (exit {res.returncode})")
        return 1
    opts = json.loads(res.stdout)
    problems = []
    scenarios = opts.get("scenarios") or {}
    if len(scenarios) != 1:
        problems.append(f"expected one scenario, found {list(scenarios)}")
    else:
        sc = next(iter(scenarios.values()))
        got = [(s["duration"], s["target"]) for s in sc.get("stages", [])]
        if sc.get("executor") != "ramping-vus":
            problems.append(f"executor {sc.get('executor')!r}, expected ramping-vus")
        if got != stages:
            problems.append(f"stages {got}, expected {stages}")
        want_start = stages[0][1] if profile == "smoke" else 0
        if sc.get("startVUs") != want_start:
            problems.append(f"startVUs {sc.get('startVUs')}, expected {want_start}")
        if sc.get("gracefulStop") != "30s":
            problems.append(f"gracefulStop {sc.get('gracefulStop')!r}, expected 30s")
    if opts.get("thresholds") != THRESHOLDS:
        problems.append(f"thresholds {opts.get('thresholds')}, expected {THRESHOLDS}")
    with open(SCRIPT) as f:
        src = f.read()
    for what, pattern in SOURCE.items():
        if not re.search(pattern, src):
            problems.append(f"source lacks {what}")
    if re.search(r"\bsleep\s*\(", src):
        problems.append("the iterations must not sleep (closed loop, no think time)")
    for p in problems:
        print(f"  {p}")
    if problems:
        print(f"  FAILED: the {profile} profile differs from what it must be")
        return 1
    print(f"  {profile}: {len(stages)} stage(s) to a peak of {opts.get('maxVUs')} VUs, "
          f"{opts.get('totalDuration')} with graceful stop; 4 thresholds, 3 checks, 4 custom metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())

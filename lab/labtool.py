#!/usr/bin/env python3
"""Kept only for bench-report/run.sh, which calls `labtool.py snapshot [--count] URI OUT`.

The lab's logic lives in examples/lab.rs now; this hands the call to its `snapshot`
subcommand (same JSON: t, commands, commands_total, probe_commands, documents_inserted,
records with --count). lab/setup-local.sh builds it. Call the binary directly instead:
    target/release/examples/lab snapshot [--count] URI OUT
"""

import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(root, "target")
lab = os.environ.get("LAB_BIN") or os.path.join(target, "release", "examples", "lab")
if len(sys.argv) < 2 or sys.argv[1] != "snapshot":
    sys.exit("labtool.py: only `snapshot` is left; the rest is examples/lab.rs")
os.execv(lab, [lab] + sys.argv[1:])

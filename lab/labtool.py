#!/usr/bin/env python3
"""The local lab's measuring tool.

  labtool.py ping URI                    exit 0 once the database answers `ping`
  labtool.py snapshot [--count] URI OUT  serverStatus counters (+ documents stored), now
  labtool.py sample URI OUT.jsonl [SECS] serverStatus counters every SECS until SIGTERM
  labtool.py report --meta META.json ... the report: a table on stdout and a JSON file

`ping`, `snapshot` and `sample` need pymongo (the lab's venv has it); `report` is stdlib.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
import urllib.request

# Commands the lab's own probes send; reported apart so the app's rate is not inflated
# by the measuring. (Drivers' heartbeats, the app's included, stay in the app's figure.)
PROBE_COMMANDS = {"serverStatus"}


def _client(uri, timeout_ms=3000):
    from pymongo import MongoClient  # only the database subcommands need pymongo

    return MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
                       socketTimeoutMS=600000, directConnection=True)


def _db_and_coll(uri):
    from pymongo.uri_parser import parse_uri

    return parse_uri(uri).get("database") or "assessmentdb", "records"


def _command_totals(status):
    """metrics.commands.<name>.total for every command, as {name: total}."""
    out = {}
    for name, v in ((status.get("metrics") or {}).get("commands") or {}).items():
        if isinstance(v, dict) and "total" in v:
            out[name] = int(v["total"])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = int(v)  # mongod's "<UNKNOWN>" counter
    return out


def _counters(client):
    status = client.admin.command("serverStatus")
    cmds = _command_totals(status)
    inserted = int(((status.get("metrics") or {}).get("document") or {}).get("inserted", 0))
    return {
        "t": time.time(),
        "commands": cmds,
        "commands_total": sum(cmds.values()),
        "probe_commands": sum(v for k, v in cmds.items() if k in PROBE_COMMANDS),
        "documents_inserted": inserted,
    }


def cmd_meta(a):
    """Writes a JSON object from key=value pairs (values parsed as JSON when they are)."""
    out = {}
    for kv in a.pairs:
        k, _, v = kv.partition("=")
        try:
            v = json.loads(v)
        except ValueError:
            pass
        node = out
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


def cmd_ping(a):
    try:
        c = _client(a.uri, 2000)
        ok = c.admin.command("ping").get("ok")
        return 0 if ok in (1, 1.0, True) else 1
    except Exception as e:  # noqa: BLE001 - any failure means "not yet"
        if a.verbose:
            print(e, file=sys.stderr)
        return 1


def cmd_snapshot(a):
    c = _client(a.uri)
    snap = _counters(c)
    if a.count:
        dbname, coll = _db_and_coll(a.uri)
        # count_documents({}) is exact (and scans: seconds per million documents on a
        # constrained secantusd-rs); the app's documents live in this one collection.
        snap["records"] = int(c[dbname][coll].count_documents({}, maxTimeMS=600000))
    snap["t_end"] = time.time()
    with open(a.out, "w") as f:
        json.dump(snap, f)
    return 0


def cmd_sample(a):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    c = _client(a.uri)
    with open(a.out, "a") as f:
        while not stop:
            t0 = time.time()
            try:
                s = _counters(c)
                f.write(json.dumps({k: s[k] for k in ("t", "commands", "commands_total",
                                                      "probe_commands", "documents_inserted")}) + "\n")
                f.flush()
            except Exception as e:  # noqa: BLE001 - a busy database may time out; keep going
                print(f"sample: {e}", file=sys.stderr)
            time.sleep(max(0.0, a.interval - (time.time() - t0)))
    return 0


# ---------------------------------------------------------------------------- report


def _load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    return json.loads(text) if text.strip() else None


def _k6_figures(summary):
    """The k6 figures from a --summary-export file (legacy summary format)."""
    if not summary:
        return None
    m = summary.get("metrics", {})
    dur = m.get("http_req_duration", {})
    thresholds = {}
    for metric, v in m.items():
        for expr, crossed in (v.get("thresholds") or {}).items():
            # In this format the value says whether the threshold was crossed.
            thresholds[f"{metric} {expr}"] = not crossed
    # Responses that claimed success (status 200 and body status as expected), however
    # slow: each such /api/data response promises its 5 documents are stored. The
    # successful_requests counter also demands < 2 s, so it can only be smaller.
    acknowledged = None
    for name, c in ((summary.get("root_group") or {}).get("checks") or {}).items():
        if name.startswith("body status is"):
            acknowledged = c.get("passes")
    reqs = m.get("http_reqs", {})
    failed = m.get("http_req_failed", {})
    return {
        "requests": reqs.get("count"),
        "req_per_s": reqs.get("rate"),
        "p95_ms": dur.get("p(95)"),
        "p99_ms": dur.get("p(99)"),
        "median_ms": dur.get("med"),
        "max_ms": dur.get("max"),
        "http_req_failed_rate": failed.get("value"),
        "error_rate": (m.get("error_rate") or {}).get("value"),
        "successful_requests": (m.get("successful_requests") or {}).get("count", 0),
        "acknowledged_responses": acknowledged,
        "failed_requests": (m.get("failed_requests") or {}).get("count", 0),
        "vus_max": (m.get("vus_max") or m.get("vus") or {}).get("max"),
        "thresholds": thresholds,
        "thresholds_passed": all(thresholds.values()) if thresholds else None,
    }


def _find_counts(obj, path=()):
    """Yields (path, key, value) for every numeric leaf of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _find_counts(v, path + (str(k),))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _cache_ratios(status):
    """Hit ratios for the l1 and l2 caches from one replica's /api/cache/status.

    Accepts the shapes a status document plausibly has: {"l1": {"hits": h, "misses": m}},
    {"l1_hits": h, "l1_misses": m}, nested under "cache"/"caches", or a ready-made
    "hit_ratio". Returns {"l1": {"hits", "misses", "hit_ratio"}, "l2": {...}}.
    """
    out = {}
    for path, v in _find_counts(status):
        keys = [p.lower() for p in path]
        for level in ("l1", "l2"):
            if not any(k == level or k.startswith(level + "_") for k in keys):
                continue
            last = keys[-1]
            slot = out.setdefault(level, {})
            if last.endswith("hit_ratio") or last.endswith("hitratio") or last == "ratio":
                slot.setdefault("reported_ratio", v)
            elif last.endswith("hits") or last == "hit":
                slot["hits"] = slot.get("hits", 0) + v
            elif last.endswith("misses") or last == "miss":
                slot["misses"] = slot.get("misses", 0) + v
    for slot in out.values():
        h, m = slot.get("hits"), slot.get("misses")
        if h is not None and m is not None:
            slot["hit_ratio"] = (h / (h + m)) if (h + m) else None
        elif "reported_ratio" in slot:
            slot["hit_ratio"] = slot["reported_ratio"]
    return out


def _rate_stats(samples, t0, t1):
    """Peak commands/s over 1-sample windows inside [t0, t1], less the lab's probes."""
    pts = [s for s in samples if t0 - 1 <= s["t"] <= t1 + 1]
    peak_cmd = peak_docs = None
    for a, b in zip(pts, pts[1:]):
        dt = b["t"] - a["t"]
        if dt <= 0.2:
            continue
        if b["commands_total"] < a["commands_total"]:
            continue  # the database restarted in between
        c = ((b["commands_total"] - b["probe_commands"]) - (a["commands_total"] - a["probe_commands"])) / dt
        d = (b["documents_inserted"] - a["documents_inserted"]) / dt
        peak_cmd = c if peak_cmd is None else max(peak_cmd, c)
        peak_docs = d if peak_docs is None else max(peak_docs, d)
    return peak_cmd, peak_docs


def _fmt(v, unit="", digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:,.{digits}f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def cmd_report(a):
    meta = _load(a.meta) or {}
    data = _k6_figures(_load(a.data_summary))
    ceil = _k6_figures(_load(a.healthz_summary))
    before, after = _load(a.before), _load(a.after)
    settled = _load(a.settled) or after
    samples = []
    if a.samples and os.path.exists(a.samples):
        with open(a.samples) as f:
            for line in f:
                try:
                    samples.append(json.loads(line))
                except ValueError:
                    pass

    db = {}
    if before and after:
        secs = max(1e-9, after["t"] - before["t"])
        # serverStatus counters start from 0 when the database restarts: sum the
        # increments along before, the samples, after, taking a drop as a restart.
        chain = [before] + [x for x in samples if before["t"] < x["t"] < after["t"]] + [after]

        def delta(key):
            total = 0
            for a_, b_ in zip(chain, chain[1:]):
                total += b_[key] - a_[key] if b_[key] >= a_[key] else b_[key]
            return total

        cmds_all = delta("commands_total")
        probes = delta("probe_commands")
        inserted = delta("documents_inserted")
        restarted = any(b_["commands_total"] < a_["commands_total"] for a_, b_ in zip(chain, chain[1:]))

        by_name = {}
        named = [x for x in chain if "commands" in x]
        for a_, b_ in zip(named, named[1:]):
            for k, v in b_["commands"].items():
                v0 = a_["commands"].get(k, 0)
                by_name[k] = by_name.get(k, 0) + (v - v0 if v >= v0 else v)
        by_name = {k: v for k, v in by_name.items() if v > 0}
        peak_cmd, peak_docs = _rate_stats(samples, before["t"], after["t"])
        db = {
            "window_s": secs,
            "commands": cmds_all - probes,
            "commands_per_s": (cmds_all - probes) / secs,
            "commands_per_s_incl_probes": cmds_all / secs,
            "commands_per_s_peak_1s": peak_cmd,
            "commands_by_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
            "documents_inserted": inserted,
            "docs_per_s": inserted / secs,
            "docs_per_s_peak_1s": peak_docs,
            "docs_per_insert_command": (inserted / by_name["insert"]) if by_name.get("insert") else None,
            "counters_reset_by_restart": restarted,
        }

    stored = expected = lost = None
    if before and settled and data and "records" in before and "records" in settled:
        stored = settled["records"] - before["records"]
        acked = data["acknowledged_responses"]
        expected = 5 * int(data["successful_requests"] if acked is None else max(acked, data["successful_requests"] or 0))
        lost = max(0, expected - stored)

    caches = {}
    cache_raw = {}
    for path in a.cache or []:
        name = os.path.basename(path).rsplit(".", 1)[0]
        doc = _load(path)
        cache_raw[name] = doc
        if doc is not None:
            caches[name] = _cache_ratios(doc)
    # All replicas together.
    total = {}
    for rep in caches.values():
        for level, slot in rep.items():
            t = total.setdefault(level, {"hits": 0, "misses": 0})
            if "hits" in slot and "misses" in slot:
                t["hits"] += slot["hits"]
                t["misses"] += slot["misses"]
    for slot in total.values():
        n = slot["hits"] + slot["misses"]
        slot["hit_ratio"] = slot["hits"] / n if n else None

    ratio = ok_ratio = None
    if data and ceil and data.get("req_per_s") and ceil.get("req_per_s"):
        ratio = data["req_per_s"] / ceil["req_per_s"]
        # Fast failures (503s) count as requests too: the same ratio over successes only.
        ok = data["acknowledged_responses"]
        if ok is not None and data.get("requests"):
            ok_ratio = (ok * data["req_per_s"] / data["requests"]) / ceil["req_per_s"]

    report = {
        "meta": meta,
        "api_data": data,
        "healthz_ceiling": ceil,
        "ratio_api_to_healthz": ratio,
        "ratio_api_successes_to_healthz": ok_ratio,
        "database": db,
        "documents": {"stored": stored, "expected_5x_acknowledged": expected, "lost": lost,
                      "extra_from_failed_requests": (stored - expected)
                      if stored is not None and expected is not None and stored > expected else 0,
                      "total_in_collection": (settled or {}).get("records")},
        "disk": {"db_bytes": meta.get("db_bytes"), "fs_used_bytes": meta.get("fs_used_bytes")},
        "cache_hit_ratios": {"replicas": caches, "all": total},
        "cache_status_raw": cache_raw,
    }
    rss, rss_cap = meta.get("sluice_peak_rss_mib") or [], meta.get("sluice_rss_cap_mib")
    checks = {
        "lost == 0": lost == 0 if lost is not None else None,
        "sluice peak RSS < cap": (all(isinstance(x, int) and x < rss_cap for x in rss))
        if rss and rss_cap else None,
        "database never restarted": (meta["db_restarts"] == 0) if meta.get("db_restarts") is not None else None,
        "commands/s <= 100": (db["commands_per_s"] <= 100) if db else None,
    }
    report["checks"] = checks
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")

    # ---- the table
    rows = []

    def row(k, v):
        rows.append((k, v))

    c = meta.get("constraints", {})
    row("profile / replicas", f"{meta.get('profile')} / {meta.get('replicas')}  (max VUs {meta.get('max_vus') or 'profile default'})")
    row("database", f"{meta.get('db_server')}  on {c.get('disk', 'n/a')}, cpu {c.get('cpu', 'n/a')}, memory {c.get('memory', 'n/a')}")
    if data:
        row("/api/data req/s", _fmt(data["req_per_s"]))
        row("/api/data p95 / p99", f"{_fmt(data['p95_ms'], ' ms', 0)} / {_fmt(data['p99_ms'], ' ms', 0)}")
        row("/api/data requests ok / failed", f"{_fmt(data['successful_requests'])} / {_fmt(data['failed_requests'])}"
            f"  (http_req_failed {_fmt((data['http_req_failed_rate'] or 0) * 100, '%', 2)})")
        for name, ok in data["thresholds"].items():
            row(f"  threshold {name}", "pass" if ok else "FAIL")
    else:
        row("/api/data", "no k6 summary")
    if ceil:
        row("/healthz req/s (same-run ceiling)", _fmt(ceil["req_per_s"]))
        row("/healthz p95 / p99", f"{_fmt(ceil['p95_ms'], ' ms', 0)} / {_fmt(ceil['p99_ms'], ' ms', 0)}")
    row("ratio /api/data ÷ /healthz req/s", _fmt(ratio, "", 3))
    row("  the same, successful responses only", _fmt(ok_ratio, "", 3))
    if db:
        row("MongoDB commands/s (avg / peak 1 s)", f"{_fmt(db['commands_per_s'])} / {_fmt(db['commands_per_s_peak_1s'])}")
        top = ", ".join(f"{k} {v}" for k, v in list(db["commands_by_name"].items())[:5])
        row("  by name (serverStatus = lab probe)", top or "none")
        row("MongoDB documents/s (avg / peak 1 s)", f"{_fmt(db['docs_per_s'])} / {_fmt(db['docs_per_s_peak_1s'])}")
        row("documents per insert command", _fmt(db["docs_per_insert_command"]))
    row("documents stored / 5 × success responses", f"{_fmt(stored)} / {_fmt(expected)}")
    row("LOST documents", _fmt(lost))
    if meta.get("db_restarts") is not None:
        peak = meta.get("db_peak_memory_bytes")
        row("database restarts (OOM kills)", f"{meta['db_restarts']} ({_fmt(meta.get('db_oom_kills'))})"
            + (f", peak memory incl. page cache {_fmt(peak / 2**20, ' MiB', 0)} of {meta.get('db_memory_mib')} MiB" if peak else ""))
    if rss:
        row("sluice peak RSS per replica", ", ".join(f"{x} MiB" for x in rss)
            + f"  (cap {_fmt(rss_cap, ' MiB', 0)}, the pod's memory request)")
    row("disk used by the database", _fmt((meta.get("db_bytes") or 0) / 2**20, " MiB") if meta.get("db_bytes") is not None else "n/a")
    for level, slot in sorted(total.items()):
        row(f"cache {level} hit ratio (all replicas)",
            f"{_fmt(slot['hit_ratio'] * 100 if slot['hit_ratio'] is not None else None, '%', 2)}"
            f"  ({_fmt(slot['hits'])} hits, {_fmt(slot['misses'])} misses)")
    if not total:
        row("cache hit ratios", "n/a")
    for name, ok in checks.items():
        row(f"check {name}", "n/a" if ok is None else ("pass" if ok else "FAIL"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    print(line)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(line)
    print(f"report: {a.out_display or a.out}")
    return 0 if all(v is not False for v in checks.values()) else 3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ping")
    s.add_argument("uri")
    s.add_argument("-v", "--verbose", action="store_true")
    s = sub.add_parser("snapshot")
    s.add_argument("--count", action="store_true", help="also count the stored documents exactly")
    s.add_argument("uri")
    s.add_argument("out")
    s = sub.add_parser("sample")
    s.add_argument("uri")
    s.add_argument("out")
    s.add_argument("interval", nargs="?", type=float, default=1.0)
    s = sub.add_parser("meta")
    s.add_argument("out")
    s.add_argument("pairs", nargs="*")
    s = sub.add_parser("report")
    s.add_argument("--meta")
    s.add_argument("--data-summary")
    s.add_argument("--healthz-summary")
    s.add_argument("--before")
    s.add_argument("--after")
    s.add_argument("--settled", help="snapshot taken once the stored count stopped moving")
    s.add_argument("--samples")
    s.add_argument("--cache", action="append")
    s.add_argument("--out", required=True)
    s.add_argument("--out-display")
    a = p.parse_args()
    return {"meta": cmd_meta, "ping": cmd_ping, "snapshot": cmd_snapshot, "sample": cmd_sample, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

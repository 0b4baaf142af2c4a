//! What the CI smoke demands of a short chaos run with autoscaling (`lab check-report`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::util::load_json;

/// Prints "ok ..." / "fail ..." for each check of the report at `path`; 1 if one failed.
pub fn run(path: &Path, constrained: bool) -> i32 {
    let Some(r) = load_json(path) else {
        println!("fail the report {} is readable JSON", path.display());
        return 1;
    };
    let lines = check_report(&r, path, constrained);
    for (ok, what) in &lines {
        println!("{} {what}", if *ok { "ok" } else { "fail" });
    }
    i32::from(lines.iter().any(|(ok, _)| !ok))
}

fn check_report(r: &Value, path: &Path, constrained: bool) -> Vec<(bool, String)> {
    let mut out = vec![];
    let mut check = |ok: bool, what: String| out.push((ok, what));
    let events = r["events"].as_array().cloned().unwrap_or_default();
    for kind in [
        "chaos-kill-replica",
        "chaos-redis-restart",
        "chaos-db-stall",
        "chaos-db-kill",
        "chaos-disk-full",
    ] {
        let e = events.iter().find(|e| e["kind"] == kind);
        let happened =
            e.is_some_and(|e| e["ok"] == true && e["t"].is_number() && e["end"].is_number());
        let recovered = e.and_then(|e| e["recovered_after_s"].as_f64());
        // The CI run is long enough for every fault; only a machine without a disk to
        // fill may skip one.
        let skipped = e.is_some_and(|e| e["skipped"] == true);
        let no_time = e.is_some_and(|e| e["not_enough_time"] == true);
        check(
            happened && (recovered.is_some() || (skipped && !no_time)),
            format!(
                "fault {kind} happened and was recorded (ready again after {} s{})",
                recovered.map_or("?".into(), |s| format!("{s:.0}")),
                match e.filter(|_| skipped) {
                    Some(e) => format!(", {}", e["detail"].as_str().unwrap_or("skipped")),
                    None => String::new(),
                }
            ),
        );
    }
    let scaled = events
        .iter()
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("scale-")))
        .count();
    check(
        scaled > 0,
        format!("the autoscaler scaled ({scaled} events)"),
    );
    check(
        r["lost"] == json!(0.0),
        format!("lost == 0 ({})", r["lost"]),
    );
    let over = r["budget"]["seconds_over"]
        .as_array()
        .map_or(usize::MAX, |v| v.len());
    let secs = r["budget"]["seconds_checked"].as_u64().unwrap_or(0);
    let over_in = r["budget"]["seconds_over_in_fault_windows"]
        .as_array()
        .map_or(usize::MAX, |v| v.len());
    check(
        over == 0 && over_in == 0 && secs > 0,
        format!(
            "no second over the budget beyond the tolerance, faults included ({secs} seconds checked, {over} over outside fault windows, {over_in} inside; peak {} commands/s)",
            r["peak_commands_per_s"]
        ),
    );
    let p = &r["prometheus"];
    let want = p["replica_instances"].as_array().map_or(0, |v| v.len());
    let missing = p["unscraped_replicas"]
        .as_array()
        .map_or(usize::MAX, |v| v.len());
    check(
        want > 0 && missing == 0,
        format!("Prometheus scraped every replica ({want} instances, {missing} missed)"),
    );
    let rules = p["rules"].as_u64().unwrap_or(0);
    check(
        rules > 0 && p["rules_evaluated"].as_u64() == Some(rules),
        format!(
            "Prometheus evaluated every alert rule ({} of {rules})",
            p["rules_evaluated"]
        ),
    );
    check(
        r["alerts"].is_array(),
        "the report lists the alerts that fired".into(),
    );
    let tl = r["timeline"].as_array().cloned().unwrap_or_default();
    let fields = [
        "replicas",
        "req_per_s",
        "p95_ms",
        "db_commands",
        "documents",
        "queue_depth",
    ];
    let full = fields
        .iter()
        .all(|f| tl.iter().any(|row| row[*f].is_number()));
    check(
        tl.len() > 10 && full,
        format!(
            "the timeline has a row per second with {} ({} rows)",
            fields.join(", "),
            tl.len()
        ),
    );
    check(
        path.with_extension("svg").exists(),
        "the SVG chart is beside the report".into(),
    );
    let stem = path.with_extension("");
    let html = PathBuf::from(format!("{}-k6-data.html", stem.display()));
    check(
        html.exists(),
        "k6's HTML report is beside the report".into(),
    );
    if constrained {
        check(
            r["meta"]["constrained"] == "true",
            "the database ran constrained (the machine allows it)".into(),
        );
    }
    out
}

//! The report: the JSON, the SVG chart and the verdict, from what the conductor, k6 and
//! setup left in the state folder. Each part of the judgement has its module; this one
//! reads the inputs, asks each, and writes and prints what they found.

mod budget;
mod chart;
pub mod check;
mod faults;
mod prometheus;
mod stored;
mod terminal;
mod thresholds;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::autoscaler::held_at_minimum;
use crate::database::COUNTED_COMMANDS;
use crate::k6;
use crate::k8s::{self, MemFormula};
use crate::state::{self, Event};
use crate::util::{env_file, read_to_string, Error};

#[derive(clap::Args)]
pub struct ReportArgs {
    #[arg(long)]
    state: PathBuf,
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Prometheus' base URL, for alerts, scrapes, rules and the p95 timeline.
    #[arg(long)]
    prometheus: Option<String>,
}

/// Writes the report and its chart, prints it; 0 when it passes, 3 when not.
pub async fn run(a: ReportArgs) -> Result<i32, Error> {
    let st = &a.state;
    let meta = env_file(&st.join("meta.env"));
    let settings = env_file(&st.join("sluice.env"));
    let timeline = state::read_timeline(st);
    let mut events = state::read_events(st)?;
    let mut autoscaler = state::read_autoscaling(st);
    let data = k6::Summary::read(&st.join("k6-data.json")).map(|s| s.lab_report());
    let ceil = k6::Summary::read(&st.join("k6-healthz.json")).map(|s| s.lab_report());

    let faults = faults::annotate(&mut events, &timeline);
    let config = k8s::sluice_config(&settings)
        .map_err(|e| format!("{}: {e}", st.join("sluice.env").display()))?;
    let budget = budget::judge(&config, &timeline, &mut events, &faults);
    let docs = stored::documents(st, &meta, data.as_ref());
    let memory = stored::memory(&timeline);
    let caches = stored::caches(st)?;
    let prom = prometheus::read(a.prometheus.as_deref(), &timeline, &faults).await;
    let judged = thresholds::judge(
        data.as_ref(),
        ceil.as_ref(),
        &timeline,
        &faults,
        &read_to_string(st.join("k6-data.log")).unwrap_or_default(),
        prom.latency_outside.as_ref(),
        docs.ceiling,
    );

    if let Some(a) = autoscaler.as_mut().filter(|a| a.fixed_replicas.is_none()) {
        let evals: Vec<(f64, u32, f64)> = timeline
            .iter()
            .filter_map(|r| Some((r.t, r.replicas, r.memory_util_pct?)))
            .collect();
        let window = a.scale_up_window_s / a.time_scale.max(1.0);
        let first_scaling = events
            .iter()
            .filter(|e| e.kind.starts_with("scale-"))
            .map(|e| e.t)
            .fold(f64::INFINITY, f64::min);
        a.held_at_minimum_pct = held_at_minimum(&evals, a.min, window, first_scaling);
    }

    // The timeline, trimmed to what the chart and a reader need.
    let tl: Vec<Value> = timeline
        .iter()
        .map(|r| {
            json!({"t": r.t, "phase": r.phase, "replicas": r.replicas, "live_pods": r.live_pods,
                   "req_per_s": r.requests, "failed_per_s": r.failed, "p95_ms": prom.p95.get(&r.second),
                   "db_commands": r.db_commands, "db_span_s": r.span_s, "db_other_commands": r.db_other,
                   "documents": r.documents, "queue_depth": r.queue_depth, "all_ready": r.all_ready,
                   "memory_util_pct": r.memory_util_pct})
        })
        .collect();

    let replica_restarts: f64 = read_to_string(st.join("replica-restarts"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0);
    let db_restarts = meta
        .get("db_restarts")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    // The supervisor logs each restart with its Unix time first; one inside a fault's
    // window (a kill, a full disk that keeps it from starting) is the fault's.
    let unexpected_db_restarts = read_to_string(st.join("db-restarts.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .filter(|t| !faults.contains(*t))
        .count() as f64;
    let faults_failed: Vec<&Event> = faults
        .events
        .iter()
        .map(|i| &events[*i])
        .filter(|e| e.ok != Some(true))
        .collect();

    let m = MemFormula::sluice();
    let formula = format!("{} MiB + {} KiB x connections", m.base_mib, m.per_conn_kib);
    let mut checks = json!({
        "lost == 0": docs.lost.map(|l| l == 0.0),
        "budget held in every second, faults included (within the tolerance)": budget.ok,
        "no replica restarted unexpectedly": replica_restarts == 0.0,
        "the database never died unless a fault killed it": unexpected_db_restarts == 0.0,
        "no alert fired except after an injected fault": prom.alerts.iter().all(|x| x["after_a_fault"] == true),
        "every injected fault happened": faults_failed.is_empty(),
    });
    checks[format!("peak RSS within {formula}")] = json!(memory.iter().all(|m| m["ok"] == true));
    let stalls: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "chaos-db-stall" && e.replicas_taken_out.is_some())
        .collect();
    if !stalls.is_empty() {
        checks["a database stall kept every replica in HAProxy (sluice answered, not HAProxy)"] =
            json!(stalls.iter().all(|e| {
                e.replicas_taken_out.as_ref().is_some_and(Vec::is_empty)
                    && e.haproxy_own_5xx == Some(0)
            }));
    }
    let sluice_ok = checks
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == &json!(true));
    let pass = sluice_ok && !judged.sluice_failed;
    let rule = "exit 0 when sluice passed every one of its own checks and every k6 threshold that /healthz passed on this machine; a threshold /healthz also fails is the machine's ceiling; a latency threshold that asks more documents a second than the database's own insert ceiling (measured after the load, same database, same limits; clients x 5 documents / the limit, ASSESSMENT.md's arithmetic) is the database's ceiling, as long as sluice stored at least 0.9 of that ceiling over its best 10 s; with --chaos, failed requests inside a fault's window (its start to 10 s after, or until every replica is ready again and HAProxy has seen it) are reported per event and left out, and so are iterations that failed a check (k6 logs each one with its start and end) and overlapped such a window; latency percentiles are k6's over the whole run";

    let report = json!({
        "meta": meta,
        "autoscaler": autoscaler,
        "verdict": if pass { "PASS" } else { "FAIL" },
        "exit_rule": rule,
        "checks": checks,
        "lost": docs.lost,
        "documents": {"stored": docs.stored, "expected_5x_acknowledged": docs.expected, "before": docs.before, "after": docs.after},
        "db_insert_ceiling": {"documents_per_second": docs.ceiling, "documents_added": docs.ceiling_documents, "runs": docs.ceiling_runs,
                              "sluice_best_10s_documents_per_second": judged.best_stored},
        "budget": {"db_command_budget": budget.budget, "flush_concurrency": budget.flush_concurrency, "counted_commands": COUNTED_COMMANDS,
                   "tolerance": budget.tolerance_text(), "seconds_checked": budget.seconds, "seconds_over": budget.over,
                   "seconds_over_in_fault_windows": budget.over_in},
        "peak_commands_per_s": budget.peak,
        "api_data": data,
        "healthz_ceiling": ceil,
        "thresholds": judged.thresholds,
        "failed_rate_outside_fault_windows": judged.failed_rate_outside,
        "memory": {"formula": format!("M(C) = {formula} (docs/deploy.md, sizing)"), "replicas": memory},
        "restarts": {"replicas_unexpected": replica_restarts, "database": db_restarts, "database_unexpected": unexpected_db_restarts},
        "prometheus": prom.summary,
        "cache": caches,
        "alerts": prom.alerts,
        "events": events,
        "timeline": tl,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)? + "\n")?;
    let svg = a.out.with_extension("svg");
    if let Err(e) = chart::draw(&svg, &tl, &events, budget.budget) {
        eprintln!("chart: {e}");
    }

    let show = |p: &Path| {
        p.strip_prefix(&a.root)
            .map(|x| x.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    terminal::print(&report, &show(&a.out), &show(&svg));
    Ok(if pass { 0 } else { 3 })
}

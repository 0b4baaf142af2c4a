//! The budget, second by second: the commands serverStatus counted against what the
//! design allows in that window.

use serde_json::{json, Value};

use super::faults::Faults;
use crate::database::COUNTED_COMMANDS;
use crate::state::{Event, Row};

/// What the report says of the budget.
pub struct Budget {
    pub budget: f64,
    pub flush_concurrency: f64,
    pub fallback_pods: f64,
    /// Samples checked, and those over the tolerance outside and inside fault windows.
    pub seconds: u64,
    pub over: Vec<Value>,
    pub over_in: Vec<Value>,
    /// The most commands in a one-second sample.
    pub peak: f64,
    pub ok: bool,
}

impl Budget {
    pub fn tolerance_text(&self) -> String {
        format!(
            "commands counted per wall-clock second from serverStatus ({}) may exceed DB_COMMAND_BUDGET = {} (times the sample's window when serverStatus answered late) by one token on the window's edge, plus each live pod's in-flight cap (FLUSH_CONCURRENCY + 1 = {}: the server counts a command when it completes), plus, for 3 s after a Redis restart, one forgotten token and each pod's fallback share (budget / BUDGET_FALLBACK_PODS = {} / {})",
            COUNTED_COMMANDS.join(", "),
            self.budget,
            self.flush_concurrency + 1.0,
            self.budget,
            self.fallback_pods
        )
    }
}

/// Judges every sample of `timeline` against the replicas' settings, and counts each second over inside a fault window against that fault's event.
pub fn judge(
    config: &sluice::config::Config,
    timeline: &[Row],
    events: &mut [Event],
    faults: &Faults,
) -> Budget {
    let budget = f64::from(config.budget.db_command_budget);
    let flush_c = config.writes.flush_concurrency as f64;
    let fallback_pods = f64::from(config.budget.budget_fallback_pods);
    // Seconds from a Redis restart until every pod has asked Redis again
    // (`CLUSTER_RETRY`, 1 s) and a sample has closed after it.
    let redis_windows: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| e.kind == "chaos-redis-restart")
        .map(|e| (e.t.floor(), e.end.unwrap_or(e.t) + 3.0))
        .collect();

    // The budget, second by second.
    let mut over = vec![];
    let mut peak: f64 = 0.0;
    let mut seconds = 0;
    for r in timeline {
        let Some(c) = r.db_commands.map(|c| c as f64) else {
            continue;
        };
        let t = r.t;
        let span = r.span_s.unwrap_or(1.0);
        let window = r.window_s.unwrap_or(span).max(span.min(1.0));
        seconds += 1;
        if span <= 1.0 {
            peak = peak.max(c);
        }
        let pods = f64::from(r.live_pods.max(1));
        let redis_fault = redis_windows.iter().any(|(a, b)| t >= *a && t < *b);
        let allowed = tolerance(
            budget,
            window,
            pods,
            flush_c + 1.0,
            redis_fault.then_some(fallback_pods),
        );
        if c > allowed {
            over.push(json!({"t": t, "commands": c, "window_s": window, "allowed": allowed}));
        }
    }
    // The budget holds inside fault windows too (the tolerance already allows for the
    // commands a stall releases at once); seconds over inside a window are also counted
    // against the fault that started it, to say which fault broke it.
    let (over_in, over): (Vec<Value>, Vec<Value>) = over
        .into_iter()
        .partition(|o| o["t"].as_f64().is_some_and(|t| faults.contains(t)));
    // Each such second belongs to the latest fault that started before it.
    let fault_starts: Vec<(usize, f64)> = faults
        .events
        .iter()
        .map(|i| (*i, events[*i].t.floor()))
        .collect();
    for i in &faults.events {
        events[*i].seconds_over_budget = Some(0);
    }
    for o in &over_in {
        let t = o["t"].as_f64().unwrap_or(0.0);
        if let Some((i, _)) = fault_starts.iter().rev().find(|(_, t0)| *t0 <= t) {
            *events[*i].seconds_over_budget.get_or_insert(0) += 1;
        }
    }
    let budget_ok = seconds > 0 && over.is_empty() && over_in.is_empty();
    Budget {
        budget,
        flush_concurrency: flush_c,
        fallback_pods,
        seconds,
        over,
        over_in,
        peak,
        ok: budget_ok,
    }
}

/// Commands a window of `span_s` seconds may hold beyond `budget × span_s`, from the
/// design (the same terms as `tests/reliability.rs`):
/// - one: the cluster's tokens are one period apart, so a window holds one more than its
///   span when a token falls on each of its boundaries;
/// - each live pod's in-flight cap (`FLUSH_CONCURRENCY` + 1): the server counts a command
///   when it completes, so a window may also hold what was sent before it and answered in
///   it (after a stall, all of it at once); the cap is why no more can wait;
/// - around a Redis restart: the one token promised and not yet due that the empty Redis
///   forgot, and each pod's fallback share (`budget / BUDGET_FALLBACK_PODS`) while it is
///   back on the cluster schedule before the others.
pub fn tolerance(
    budget: f64,
    span_s: f64,
    pods: f64,
    in_flight_cap: f64,
    redis_fallback: Option<f64>,
) -> f64 {
    let restart = redis_fallback.map_or(0.0, |fallback| 1.0 + pods * (budget / fallback).ceil());
    (budget * span_s).round() + 1.0 + pods * in_flight_cap + restart
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tolerance_is_the_edge_token_and_each_pods_in_flight_cap() {
        assert_eq!(tolerance(50.0, 1.0, 3.0, 2.0, None), 57.0);
        assert_eq!(tolerance(50.0, 1.3, 2.0, 2.0, None), 70.0);
        // Around a Redis restart: one forgotten token, each pod's fallback share.
        assert_eq!(
            tolerance(50.0, 1.0, 3.0, 2.0, Some(8.0)),
            57.0 + 1.0 + 3.0 * 7.0
        );
    }
}

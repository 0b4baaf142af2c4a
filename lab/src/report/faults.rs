//! The faults of a chaos run, as the report judges them: the requests that failed in the
//! 10 s after each, when every replica was ready again, and the windows whose failures
//! are the fault's rather than sluice's.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::conductor::EVENT_WINDOW_S;

/// The injected faults (indices into the events) and their windows, Unix seconds, end
/// excluded.
pub struct Faults {
    pub chaos: bool,
    pub events: Vec<usize>,
    pub windows: Vec<(f64, f64)>,
}

impl Faults {
    pub fn contains(&self, t: f64) -> bool {
        self.windows.iter().any(|(a, b)| t >= *a && t < *b)
    }
}

/// Annotates each event with what followed it (`failed_in_10s`, `recovered_after_s`, and
/// for a stall what HAProxy did) and returns the faults' windows.
pub fn annotate(events: &mut [Value], timeline: &[Value]) -> Faults {
    let chaos = events
        .iter()
        .any(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("chaos-")));
    // Events: failed requests in the 10 s after, seconds until every replica is ready.
    let fault_events: Vec<usize> = (0..events.len())
        .filter(|i| {
            let k = events[*i]["kind"].as_str().unwrap_or("");
            k.starts_with("chaos-") && k != "chaos-done"
        })
        .collect();
    let fault_times: Vec<f64> = fault_events
        .iter()
        .filter_map(|i| events[*i]["t"].as_f64())
        .collect();
    // Where a fault's recovery is looked for: until the next fault, and never more than
    // a minute, so that trouble long after a fault is not excused by it.
    let search_until = |t0: f64, end: f64| {
        fault_times
            .iter()
            .copied()
            .filter(|t| *t > t0)
            .fold(end + MAX_RECOVERY_S, f64::min)
    };
    let mut windows: Vec<(f64, f64)> = vec![];
    for e in events.iter_mut() {
        let kind = e["kind"].as_str().unwrap_or("").to_string();
        if !(kind.starts_with("chaos-")
            || kind.starts_with("scale-")
            || kind.starts_with("replica-"))
        {
            continue;
        }
        let Some(t0) = e["t"].as_f64() else { continue };
        if e["skipped"] == true {
            continue;
        }
        let end = e["end"].as_f64().unwrap_or(t0);
        let failed: f64 = timeline
            .iter()
            .filter(|r| {
                r["t"]
                    .as_f64()
                    .is_some_and(|t| t >= t0 && t < t0 + EVENT_WINDOW_S)
            })
            .filter_map(|r| r["failed"].as_f64())
            .sum();
        e["failed_in_10s"] = json!(failed);
        if kind == "chaos-db-stall" {
            // Readiness is the pod's own: a stalled database must leave every replica in
            // HAProxy, so clients get sluice's 503 and Retry-After, not HAProxy's. Until
            // 10 s after the stall, or the next fault if it comes sooner (what a killed
            // database or a full disk does is that fault's, not the stall's).
            let until = (e["stall_end"].as_f64().unwrap_or(end) + EVENT_WINDOW_S)
                .min(search_until(t0, end));
            let rows = || {
                timeline.iter().filter(move |r| {
                    r["t"]
                        .as_f64()
                        .is_some_and(|t| t >= t0.floor() && t < until)
                })
            };
            let taken_out: BTreeSet<&str> = rows()
                .filter_map(|r| r["replicas_checked_down"].as_array())
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            e["replicas_taken_out"] = json!(taken_out);
            e["haproxy_own_5xx"] = json!(rows()
                .filter_map(|r| r["haproxy_own_5xx"].as_f64())
                .sum::<f64>());
        }
        if kind.starts_with("chaos-") && kind != "chaos-done" {
            let back = recovered_at(timeline, t0, end, search_until(t0, end));
            e["recovered_after_s"] = json!(back.map(|b| (b - t0).max(0.0).round()));
            // HAProxy, like the readinessProbe, sends requests again up to 5 s after
            // /readyz answers 200.
            let w_end = (t0 + EVENT_WINDOW_S)
                .max((back.unwrap_or(end) + 6.0).min(end + MAX_RECOVERY_S + 6.0));
            windows.push((t0.floor(), w_end));
        }
    }
    Faults {
        chaos,
        events: fault_events,
        windows,
    }
}

/// The longest a fault may take to recover from and still excuse what happens meanwhile.
pub const MAX_RECOVERY_S: f64 = 60.0;

/// When every replica was ready again after a fault that started at `t0` and ended at
/// `end`: the first ready sample after the last one not ready before the next fault. Not
/// simply the first ready sample after `end`: readiness lags a fault (a replica notices a
/// dead database only when its commands fail), and the database may fail again on its
/// own after the fault ends (a full disk makes it panic when it is freed).
pub fn recovered_at(timeline: &[Value], t0: f64, end: f64, next: f64) -> Option<f64> {
    let t = |r: &Value| r["t"].as_f64();
    let last_unready = timeline
        .iter()
        .rev()
        .filter(|r| t(r).is_some_and(|x| x >= t0 && x < next) && r["all_ready"] == false)
        .find_map(t);
    let from = last_unready.map_or(end, |u| u.max(end));
    timeline
        .iter()
        .filter(|r| {
            t(r).is_some_and(|x| x >= from && Some(x) != last_unready) && r["all_ready"] == true
        })
        .filter_map(t)
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_waits_for_readiness_that_lags_the_fault() {
        let row = |t: f64, ready: bool| json!({"t": t, "all_ready": ready});
        // A kill at 10 ends at 10.2; replicas still look ready at 11, then not until 18.
        let timeline: Vec<Value> = [(11.0, true), (12.0, false), (17.0, false), (18.0, true)]
            .iter()
            .map(|&(t, r)| row(t, r))
            .chain([row(40.0, false), row(41.0, true)])
            .collect();
        assert_eq!(recovered_at(&timeline, 10.0, 10.2, 30.0), Some(18.0));
        // Never unready: back at the first ready sample after the fault's end.
        let calm = vec![row(11.0, true), row(12.0, true)];
        assert_eq!(recovered_at(&calm, 10.0, 11.5, 30.0), Some(12.0));
    }
}

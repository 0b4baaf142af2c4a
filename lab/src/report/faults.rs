//! The faults of a chaos run, as the report judges them: the requests that failed in the
//! 10 s after each, when every replica was ready again, and the windows whose failures
//! are the fault's rather than sluice's.

use std::collections::BTreeSet;

use crate::conductor::EVENT_WINDOW_S;
use crate::state::{Event, Row};

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
pub fn annotate(events: &mut [Event], timeline: &[Row]) -> Faults {
    let chaos = events.iter().any(|e| e.kind.starts_with("chaos-"));
    // Events: failed requests in the 10 s after, seconds until every replica is ready.
    let fault_events: Vec<usize> = (0..events.len())
        .filter(|i| events[*i].is_fault())
        .collect();
    let fault_times: Vec<f64> = fault_events.iter().map(|i| events[*i].t).collect();
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
        if !(e.kind.starts_with("chaos-")
            || e.kind.starts_with("scale-")
            || e.kind.starts_with("replica-"))
            || e.skipped
        {
            continue;
        }
        let t0 = e.t;
        let end = e.end.unwrap_or(t0);
        e.failed_in_10s = Some(
            timeline
                .iter()
                .filter(|r| r.t >= t0 && r.t < t0 + EVENT_WINDOW_S)
                .filter_map(|r| r.failed)
                .sum(),
        );
        if e.kind == "chaos-db-stall" {
            // Readiness is the pod's own: a stalled database must leave every replica in
            // HAProxy, so clients get sluice's 503 and Retry-After, not HAProxy's. Until
            // 10 s after the stall, or the next fault if it comes sooner (what a killed
            // database or a full disk does is that fault's, not the stall's).
            let until = (e.stall_end.unwrap_or(end) + EVENT_WINDOW_S).min(search_until(t0, end));
            let rows = || {
                timeline
                    .iter()
                    .filter(move |r| r.t >= t0.floor() && r.t < until)
            };
            let taken_out: BTreeSet<&String> = rows()
                .filter_map(|r| r.replicas_checked_down.as_ref())
                .flatten()
                .collect();
            e.replicas_taken_out = Some(taken_out.into_iter().cloned().collect());
            e.haproxy_own_5xx = Some(rows().filter_map(|r| r.haproxy_own_5xx).sum());
        }
        if e.is_fault() {
            let back = recovered_at(timeline, t0, end, search_until(t0, end));
            e.recovered_after_s = back.map(|b| (b - t0).max(0.0).round());
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
pub fn recovered_at(timeline: &[Row], t0: f64, end: f64, next: f64) -> Option<f64> {
    let last_unready = timeline
        .iter()
        .rev()
        .find(|r| r.t >= t0 && r.t < next && !r.all_ready)
        .map(|r| r.t);
    let from = last_unready.map_or(end, |u| u.max(end));
    timeline
        .iter()
        .find(|r| r.t >= from && Some(r.t) != last_unready && r.all_ready)
        .map(|r| r.t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_waits_for_readiness_that_lags_the_fault() {
        let row = |t: f64, all_ready: bool| Row {
            t,
            all_ready,
            ..Row::default()
        };
        // A kill at 10 ends at 10.2; replicas still look ready at 11, then not until 18.
        let timeline: Vec<Row> = [(11.0, true), (12.0, false), (17.0, false), (18.0, true)]
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

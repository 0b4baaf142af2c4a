//! k6's thresholds, judged: sluice's to pass unless /healthz fails the same one on this
//! machine, or the database's own ceiling is below what it asks; in a chaos run, the
//! failure rates again outside the fault windows.

use serde_json::{json, Value};

use super::faults::Faults;
use crate::state::Row;

pub struct Judged {
    pub thresholds: Vec<Value>,
    /// A threshold failed that sluice, not the machine or the database, must answer for.
    pub sluice_failed: bool,
    pub failed_rate_outside: Option<f64>,
    /// Documents stored a second over sluice's best 10 s.
    pub best_stored: f64,
}

/// `data` and `ceil` are the /api/data and /healthz runs' k6 figures, `k6_log` the
/// /api/data run's log, `latency_outside` Prometheus' shares of answers within each
/// bound outside the windows, `db_ceiling` the database's insert ceiling.
pub fn judge(
    data: Option<&Value>,
    ceil: Option<&Value>,
    timeline: &[Row],
    faults: &Faults,
    k6_log: &str,
    latency_outside: Option<&(Vec<(f64, f64)>, f64)>,
    db_ceiling: Option<f64>,
) -> Judged {
    let best_stored = best_mean(
        &timeline
            .iter()
            .filter(|r| r.phase == "data")
            .map(|r| r.documents.unwrap_or(0) as f64)
            .collect::<Vec<_>>(),
        10,
    );
    let mut thresholds = vec![];
    let mut sluice_threshold_fail = false;
    let (req_out, failed_out) = timeline
        .iter()
        .filter(|r| r.phase == "data" && !faults.contains(r.t))
        .fold((0.0, 0.0), |(q, fl), r| {
            (
                q + r.requests.unwrap_or(0) as f64,
                fl + r.failed.unwrap_or(0) as f64,
            )
        });
    // Failures k6 saw that HAProxy never answered with a 5xx (client timeouts, refused
    // connections) cannot be placed in time: all of them count as outside the windows.
    let haproxy_5xx: f64 = timeline
        .iter()
        .filter(|r| r.phase == "data")
        .filter_map(|r| r.failed)
        .sum::<u64>() as f64;
    let k6_failed = data.map_or(0.0, |d| {
        d["requests"].as_f64().unwrap_or(0.0) * d["http_req_failed_rate"].as_f64().unwrap_or(0.0)
    });
    let unplaced = (k6_failed - haproxy_5xx).max(0.0).round();
    let failed_rate_outside = if req_out > 0.0 {
        Some((failed_out + unplaced) / req_out)
    } else {
        None
    };
    // Share of sluice's answers outside the fault windows within `limit_ms`, and how many
    // answers that is over.
    let within = |limit_ms: f64| {
        let (shares, answers) = latency_outside?;
        let share = shares
            .iter()
            .find(|(le, _)| (le - limit_ms / 1000.0).abs() < 1e-9)
            .map(|(_, share)| *share)?;
        Some((share, *answers))
    };
    if let Some(d) = data {
        for (name, passed) in d["thresholds"].as_object().into_iter().flatten() {
            let k6_passed = passed.as_bool().unwrap_or(false);
            let healthz = ceil.and_then(|c| c["thresholds"][name].as_bool());
            let mut passed = k6_passed;
            let mut how = "k6".to_string();
            // In a chaos run, `http_req_failed` and `error_rate`, if k6 failed them over
            // the whole run and /healthz passed them (so they decide the exit code), are
            // judged again outside the fault windows: failed requests placed in time by
            // HAProxy's 5xx, failed iterations (errors, wrong bodies, answers slower than
            // 2 s) by k6's own log of each. The latency percentiles are never re-judged:
            // k6's summary cannot be split by time.
            if faults.chaos && !k6_passed && healthz == Some(true) {
                let failed = |r: f64| {
                    format!("HAProxy's 5xx outside the fault windows plus the {unplaced:.0} failures k6 saw and HAProxy did not: {:.3}%", 100.0 * r)
                };
                let rejudged = if name.starts_with("http_req_failed") {
                    failed_rate_outside.map(|r| (r < 0.01, failed(r)))
                } else if name.starts_with("error_rate") {
                    // Any failed check (an error, a wrong body, an answer slower than 2 s),
                    // placed in time by k6's own log of each failed iteration; failed
                    // iterations k6 counted but did not log count as outside.
                    let k6_failed = data.and_then(|d| d["failed_iterations"].as_f64());
                    let (logged, outside) = failed_checks(k6_log, &faults.windows);
                    k6_failed.filter(|_| logged > 0.0 && req_out > 0.0).map(|k6_failed| {
                        let unlogged = (k6_failed - logged).max(0.0).round();
                        let rate = (outside + unlogged) / req_out;
                        (rate < 0.01, format!(
                            "k6's log of each failed iteration: {logged:.0} logged, {outside:.0} of them overlapping no fault window, plus {unlogged:.0} k6 counted and did not log, over {req_out:.0} requests outside the windows: {:.3}%",
                            100.0 * rate
                        ))
                    })
                } else {
                    None
                };
                if let Some((ok, text)) = rejudged {
                    passed = ok;
                    how = text;
                }
            }
            // For reference only: sluice's own histogram cannot see HAProxy's queue or
            // k6's own time, so it never turns a failed latency threshold into a pass.
            if !passed {
                if let Some((limit_ms, (share, n))) = latency_threshold(name)
                    .and_then(|(_, limit_ms)| within(limit_ms).map(|w| (limit_ms, w)))
                {
                    how = format!(
                        "k6; for reference, sluice's own histogram has {:.3}% of {n:.0} answers within {limit_ms} ms{} (server side, without HAProxy's queue and k6's time)",
                        100.0 * share,
                        if faults.chaos { " outside the fault windows" } else { "" }
                    );
                }
            }
            // The database's ceiling: a latency this run's clients could not get from a
            // database that stores at most `db_ceiling` documents a second.
            // Only while sluice itself stored near that ceiling (0.9 of it over its best
            // 10 s, the load report's goal for stored ÷ ceiling): a sluice that stores
            // less is the bound, not the database.
            let db_bound = latency_limit_ms(name)
                .zip(data.and_then(|d| d["vus_max"].as_f64()))
                .zip(db_ceiling)
                .map(|((limit_ms, vus), ceiling)| (documents_needed(vus, limit_ms), ceiling, vus))
                .filter(|(needed, ceiling, _)| ceiling < needed);
            if let (false, Some((needed, ceiling, vus))) = (passed, db_bound) {
                how = format!(
                    "{how}; {vus:.0} clients answered within the limit need {needed:.0} documents stored a second; the database stores at most {ceiling:.0} (its insert ceiling, this run), sluice stored {best_stored:.0} over its best 10 s ({:.2} of it)",
                    best_stored / ceiling
                );
            }
            let db_bound = db_bound.filter(|(_, ceiling, _)| best_stored >= 0.9 * ceiling);
            let verdict = match (passed, healthz) {
                (true, _) if k6_passed => "pass",
                (true, _) => "pass outside the fault windows",
                (false, Some(false)) => "machine's ceiling (/healthz fails it too)",
                (false, _) if db_bound.is_some() => {
                    "the database's ceiling (no service could pass it on this database)"
                }
                (false, _) => {
                    sluice_threshold_fail = true;
                    "FAIL (sluice: /healthz passes it)"
                }
            };
            thresholds.push(
                json!({"threshold": name, "k6_passed": k6_passed, "api_data_passed": passed,
                       "judged_by": how, "healthz_passed": healthz, "verdict": verdict}),
            );
        }
    }
    Judged {
        thresholds,
        sluice_failed: sluice_threshold_fail,
        failed_rate_outside,
        best_stored,
    }
}

/// The latency a threshold asks of every answer it counts, in ms: a duration percentile's
/// limit, or `error_rate`'s, whose check fails an answer slower than 2 s
/// (stress-test/stress-test.js).
pub fn latency_limit_ms(name: &str) -> Option<f64> {
    if name.starts_with("error_rate") {
        return Some(2000.0);
    }
    latency_threshold(name).map(|(_, limit_ms)| limit_ms)
}

/// Documents the database must store each second for `vus` closed-loop clients to be
/// answered within `limit_ms`: ASSESSMENT.md's arithmetic, latency = clients ÷
/// throughput, five documents a request. At 10,000 clients and 2 s, 25,000.
pub fn documents_needed(vus: f64, limit_ms: f64) -> f64 {
    vus * sluice::record::PER_REQUEST as f64 / (limit_ms / 1000.0)
}

/// The highest mean over `n` consecutive values (over all of them if there are fewer).
pub fn best_mean(values: &[f64], n: usize) -> f64 {
    let n = n.min(values.len()).max(1);
    values
        .windows(n)
        .map(|w| w.iter().sum::<f64>() / n as f64)
        .fold(0.0, f64::max)
}

/// `(0.99, 5000.0)` from k6's `http_req_duration p(99)<5000`.
pub fn latency_threshold(name: &str) -> Option<(f64, f64)> {
    let rest = name.strip_prefix("http_req_duration p(")?;
    let (q, limit) = rest.split_once(")<")?;
    Some((q.parse::<f64>().ok()? / 100.0, limit.parse().ok()?))
}

/// From k6's log of a run with `LOG_FAILED_CHECKS=1` (`failed-check <start ms> <end ms>`
/// per iteration that failed a check): how many it logged, and how many of those
/// overlapped none of `windows` (Unix seconds, end excluded).
pub fn failed_checks(log: &str, windows: &[(f64, f64)]) -> (f64, f64) {
    let (mut logged, mut outside) = (0.0, 0.0);
    for line in log.lines() {
        let Some(rest) = line.split("failed-check ").nth(1) else {
            continue;
        };
        let mut ms = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse::<f64>().ok());
        let (Some(start), Some(end)) = (ms.next(), ms.next()) else {
            continue;
        };
        let (start, end) = (start / 1000.0, end / 1000.0);
        logged += 1.0;
        if !windows.iter().any(|(a, b)| start < *b && end >= *a) {
            outside += 1.0;
        }
    }
    (logged, outside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_the_database_cannot_give_is_its_ceiling() {
        assert_eq!(documents_needed(10_000.0, 2000.0), 25_000.0);
        assert_eq!(documents_needed(10_000.0, 5000.0), 10_000.0);
        assert_eq!(latency_limit_ms("error_rate rate<0.01"), Some(2000.0));
        assert_eq!(
            latency_limit_ms("http_req_duration p(99)<5000"),
            Some(5000.0)
        );
        assert_eq!(latency_limit_ms("http_req_failed rate<0.01"), None);
        assert_eq!(
            latency_threshold("http_req_duration p(99)<5000"),
            Some((0.99, 5000.0))
        );
        assert_eq!(latency_threshold("http_req_failed rate<0.01"), None);
        assert_eq!(best_mean(&[1.0, 5.0, 3.0, 0.0], 2), 4.0);
        assert_eq!(best_mean(&[2.0], 10), 2.0);
        assert_eq!(best_mean(&[], 10), 0.0);
    }

    #[test]
    fn failed_iterations_that_overlap_a_fault_window_are_left_out() {
        let log = r#"time="2026-11-23T18:00:00Z" level=info msg="failed-check 100000 102500" source=console
time="2026-11-23T18:00:01Z" level=info msg="failed-check 108000 108100" source=console
time="2026-11-23T18:00:02Z" level=info msg="failed-check 119900 120300" source=console
running (0m30.0s), 30/30 VUs, 1200 complete and 0 interrupted iterations
time="2026-11-23T18:00:03Z" level=info msg="failed-check 130000" source=console"#;
        // A fault from 101 s to 110 s: the first two overlap it; the third ends after
        // it and starts before the next one; the last line is cut and not counted.
        assert_eq!(
            failed_checks(log, &[(101.0, 110.0), (120.5, 130.0)]),
            (3.0, 1.0)
        );
        // An iteration ending exactly where a window starts overlaps it.
        assert_eq!(failed_checks(log, &[(120.3, 125.0)]), (3.0, 2.0));
        assert_eq!(failed_checks("", &[]), (0.0, 0.0));
    }
}

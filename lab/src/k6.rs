//! k6's `--summary-export` JSON, read in one place: the lab's report, the load report's
//! levels and bench-report's line after each run all take their figures from here, so a
//! change in k6's format, or in the test script's metrics, is one change.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::util::{f, load_json, MAX_FAILED_SHARE};

/// One run's figures. A figure the export lacks is `None`, except the test script's own
/// counters (`successful_requests`, `failed_requests`), which k6 leaves out when nothing
/// was added to them: there, absent means 0.
pub struct Summary {
    /// `http_reqs`: every request k6 sent, and per second over the run.
    pub requests: Option<f64>,
    pub req_per_s: Option<f64>,
    /// `http_req_failed`: the share of requests k6 counts as failed (status, timeout).
    pub failed_rate: Option<f64>,
    /// The script's `error_rate`: the share of iterations whose checks did not all pass,
    /// and how many iterations that was (the Rate's `passes`: each adds `!ok`).
    pub error_rate: Option<f64>,
    pub failed_iterations: Option<f64>,
    pub successful_requests: f64,
    pub failed_requests: f64,
    /// Responses whose body carried the expected status: the script's `body status is`
    /// check's passes.
    pub acknowledged_responses: Option<f64>,
    /// `http_req_duration` statistics, in ms, as `--summary-trend-stats` asked for them.
    pub med_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// `vus_max`: the most virtual users the run held at once.
    pub vus_max: Option<f64>,
    /// Every threshold, "metric expression", and whether it passed (the export's value
    /// says whether it was crossed).
    pub thresholds: BTreeMap<String, bool>,
}

impl Summary {
    pub fn read(path: &Path) -> Option<Summary> {
        load_json(path).map(|s| Summary::parse(&s))
    }

    pub fn parse(s: &Value) -> Summary {
        let m = &s["metrics"];
        let mut thresholds = BTreeMap::new();
        for (metric, v) in m.as_object().into_iter().flatten() {
            for (expr, crossed) in v["thresholds"].as_object().into_iter().flatten() {
                thresholds.insert(
                    format!("{metric} {expr}"),
                    !crossed.as_bool().unwrap_or(false),
                );
            }
        }
        let duration = |stat: &str| f(m, &["http_req_duration", stat]);
        Summary {
            requests: f(m, &["http_reqs", "count"]),
            req_per_s: f(m, &["http_reqs", "rate"]),
            failed_rate: f(m, &["http_req_failed", "value"]),
            error_rate: f(m, &["error_rate", "value"]),
            failed_iterations: f(m, &["error_rate", "passes"]),
            successful_requests: f(m, &["successful_requests", "count"]).unwrap_or(0.0),
            failed_requests: f(m, &["failed_requests", "count"]).unwrap_or(0.0),
            acknowledged_responses: s["root_group"]["checks"]
                .as_object()
                .and_then(|c| c.iter().find(|(k, _)| k.starts_with("body status is")))
                .and_then(|(_, v)| v["passes"].as_f64()),
            med_ms: duration("med"),
            p95_ms: duration("p(95)"),
            p99_ms: duration("p(99)"),
            max_ms: duration("max"),
            vus_max: f(m, &["vus_max", "max"]).or_else(|| f(m, &["vus_max", "value"])),
            thresholds,
        }
    }

    /// The figures the lab's report JSON keeps of a run (`api_data`, `healthz_ceiling`).
    pub fn lab_report(&self) -> Value {
        json!({
            "requests": self.requests,
            "req_per_s": self.req_per_s,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "vus_max": self.vus_max,
            "http_req_failed_rate": self.failed_rate,
            "failed_iterations": self.failed_iterations,
            "successful_requests": self.successful_requests,
            "acknowledged_responses": self.acknowledged_responses,
            "failed_requests": self.failed_requests,
            "thresholds": self.thresholds,
        })
    }

    /// A profiled run's CPU per request: `ticks` of the profiled process's CPU (at
    /// `clk_tck` a second) over the whole run, divided by k6's requests. An error when
    /// more than [`MAX_FAILED_SHARE`] of them failed: it profiled the error path.
    pub fn cpu_per_request(&self, ticks: u64, clk_tck: u64) -> Result<String, String> {
        let (Some(requests), Some(failed)) = (self.requests, self.failed_rate) else {
            return Err("no request count or failed rate in the summary".into());
        };
        if failed > MAX_FAILED_SHARE {
            return Err(format!(
                "{:.1}% of {requests:.0} requests failed: not a profile of the request",
                100.0 * failed
            ));
        }
        let us = 1e6 * ticks as f64 / clk_tck.max(1) as f64 / requests.max(1.0);
        Ok(format!(
            "    -> {us:.1} µs of sluice's CPU a request over the run, perf's own cost included"
        ))
    }

    /// bench-report's line after each run; None when the run lacks one of its figures.
    pub fn line(&self) -> Option<String> {
        Some(format!(
            "    -> {:.0} req/s, p95 {:.0} ms, failed {:.1}%, {:.0} ok",
            self.req_per_s?,
            self.p95_ms?,
            100.0 * self.failed_rate?,
            self.successful_requests
        ))
    }
}

/// The seconds of load a `k6 inspect` plan runs: the longest scenario's start plus its
/// stages (or its duration). The graceful stop is left out: iterations still running
/// then are the tail, not the load.
pub fn load_seconds(plan: &Value) -> Option<f64> {
    let scenarios = plan["scenarios"].as_object()?;
    scenarios
        .values()
        .map(|sc| {
            let start = sc["startTime"].as_str().and_then(seconds).unwrap_or(0.0);
            let run = match sc["stages"].as_array() {
                Some(stages) => stages
                    .iter()
                    .map(|st| st["duration"].as_str().and_then(seconds))
                    .sum::<Option<f64>>(),
                None => sc["duration"].as_str().and_then(seconds),
            };
            run.map(|r| start + r)
        })
        .collect::<Option<Vec<f64>>>()?
        .into_iter()
        .reduce(f64::max)
}

/// A k6 duration ("1m30s", "500ms", "2h") in seconds.
fn seconds(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += n * match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        rest = &rest[unit..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_lasts_its_longest_scenario_without_the_graceful_stop() {
        let plan = json!({"scenarios": {
            "ramp": {"executor": "ramping-vus", "gracefulStop": "30s",
                     "stages": [{"duration": "1m30s", "target": 10}, {"duration": "500ms", "target": 0}]},
            "late": {"executor": "constant-vus", "startTime": "10s", "duration": "1m"}}});
        assert_eq!(load_seconds(&plan), Some(90.5));
        assert_eq!(seconds("2h"), Some(7200.0));
        assert_eq!(seconds("3 parsecs"), None);
        assert_eq!(load_seconds(&json!({"scenarios": null})), None);
    }

    #[test]
    fn a_profiled_run_of_failures_is_refused() {
        let run = |failed: f64| {
            Summary::parse(&json!({"metrics": {
                "http_reqs": {"count": 200_000, "rate": 3_333.3},
                "http_req_failed": {"value": failed}}}))
        };
        // 9.2 CPU seconds (920 ticks at 100 a second) for 200,000 requests.
        let line = run(0.0).cpu_per_request(920, 100).unwrap();
        assert!(line.contains("46.0 µs"), "{line}");
        assert!(run(0.01).cpu_per_request(920, 100).is_ok());
        let e = run(0.5).cpu_per_request(920, 100).unwrap_err();
        assert!(e.contains("50.0% of 200000 requests failed"), "{e}");
        assert!(Summary::parse(&json!({})).cpu_per_request(1, 100).is_err());
    }

    #[test]
    fn thresholds_read_as_passed() {
        let s = json!({"metrics": {"http_req_failed": {"value": 0.05, "thresholds": {"rate<0.01": true}},
            "http_req_duration": {"p(95)": 10, "thresholds": {"p(95)<2000": false}},
            "error_rate": {"value": 0.25, "passes": 3, "fails": 9}},
            "root_group": {"checks": {"body status is \"success\"": {"passes": 7}}}});
        let k = Summary::parse(&s).lab_report();
        assert_eq!(k["thresholds"]["http_req_failed rate<0.01"], false);
        assert_eq!(k["thresholds"]["http_req_duration p(95)<2000"], true);
        assert_eq!(k["acknowledged_responses"], 7.0);
        // error_rate adds !ok: its passes are the failed iterations.
        assert_eq!(k["failed_iterations"], 3.0);
    }

    #[test]
    fn absent_counters_are_zero_and_absent_figures_none() {
        let s = Summary::parse(&json!({"metrics": {
            "http_reqs": {"count": 300, "rate": 10.0},
            "http_req_duration": {"med": 4, "p(95)": 12.4, "p(99)": 20, "max": 31},
            "http_req_failed": {"value": 0.0123}}}));
        assert_eq!(s.successful_requests, 0.0);
        assert_eq!(s.failed_requests, 0.0);
        assert_eq!(s.error_rate, None);
        assert_eq!((s.med_ms, s.max_ms), (Some(4.0), Some(31.0)));
        assert_eq!(
            s.line().unwrap(),
            "    -> 10 req/s, p95 12 ms, failed 1.2%, 0 ok"
        );
        assert_eq!(Summary::parse(&json!({})).line(), None);
    }
}

//! What Prometheus saw of the run: the alerts that fired, the replicas it scraped, the
//! rules it evaluated, and sluice's own latency histogram.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use super::faults::Faults;
use crate::state::Row;

pub struct Prometheus {
    /// Each alert that fired, with whether it followed an injected fault.
    pub alerts: Vec<Value>,
    /// Scraped instances, rules and how many were evaluated.
    pub summary: Value,
    /// /api/data's p95 per second (ms), by Unix second.
    pub p95: BTreeMap<i64, f64>,
    /// The share of /api/data answers within each bucket bound outside the fault
    /// windows, and how many answers that is.
    pub latency_outside: Option<(Vec<(f64, f64)>, f64)>,
}

/// Asks the Prometheus at `url` (none: the run had none) about the run `timeline` spans.
pub async fn read(url: Option<&str>, timeline: &[Row], faults: &Faults) -> Prometheus {
    let http = reqwest::Client::new();
    let (t_start, t_end) = (
        timeline.first().map_or(0.0, |r| r.t),
        timeline.last().map_or(0.0, |r| r.t),
    );
    let mut alerts = vec![];
    let mut prom = json!({"url": url});
    let mut p95: BTreeMap<i64, f64> = BTreeMap::new();
    let mut latency_outside: Option<(Vec<(f64, f64)>, f64)> = None;
    if let Some(base) = url {
        let range = |q: &str| {
            vec![
                ("query", q.to_string()),
                ("start", format!("{:.0}", t_start - 1.0)),
                ("end", format!("{:.0}", t_end + 60.0)),
                ("step", "1".to_string()),
            ]
        };
        if let Some(d) = prom_query(
            &http,
            base,
            "/api/v1/query_range",
            &range("ALERTS{alertstate=\"firing\"}"),
        )
        .await
        {
            for s in d["result"].as_array().into_iter().flatten() {
                let ts: Vec<f64> = s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v[0].as_f64())
                    .collect();
                let (Some(first), Some(last)) = (ts.first(), ts.last()) else {
                    continue;
                };
                let during_chaos =
                    faults.chaos && faults.windows.first().is_some_and(|w| *first >= w.0);
                alerts.push(json!({"alert": s["metric"]["alertname"], "labels": s["metric"], "first_firing": first,
                                    "last_firing": last, "after_a_fault": during_chaos}));
            }
        }
        let mut scraped = BTreeSet::new();
        if let Some(d) = prom_query(&http, base, "/api/v1/query_range", &range("up == 1")).await {
            for s in d["result"].as_array().into_iter().flatten() {
                if let Some(i) = s["metric"]["instance"].as_str() {
                    scraped.insert(i.to_string());
                }
            }
        }
        let mut rules = 0;
        let mut evaluated = 0;
        if let Some(d) = prom_query(&http, base, "/api/v1/rules", &[]).await {
            for g in d["groups"].as_array().into_iter().flatten() {
                for r in g["rules"].as_array().into_iter().flatten() {
                    rules += 1;
                    if r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|s| !s.starts_with("0001"))
                    {
                        evaluated += 1;
                    }
                }
            }
        }
        let q = "histogram_quantile(0.95, sum by (le) (rate(sluice_http_request_duration_seconds_bucket{route=\"/api/data\"}[3s])))";
        if let Some(d) = prom_query(&http, base, "/api/v1/query_range", &range(q)).await {
            for s in d["result"].as_array().into_iter().flatten() {
                for v in s["values"].as_array().into_iter().flatten() {
                    if let (Some(t), Some(x)) = (
                        v[0].as_f64(),
                        v[1].as_str().and_then(|x| x.parse::<f64>().ok()),
                    ) {
                        if x.is_finite() {
                            p95.insert(t as i64, x * 1000.0);
                        }
                    }
                }
            }
        }
        // sluice's own latency outside the fault windows, for judging k6's latency
        // thresholds in a chaos run (k6's summary cannot be split by time).
        let q = "sum by (instance, le) (sluice_http_request_duration_seconds_bucket{route=\"/api/data\"})";
        if let Some(d) = prom_query(&http, base, "/api/v1/query_range", &range(q)).await {
            let data_t: Vec<f64> = timeline
                .iter()
                .filter(|r| r.phase == "data")
                .map(|r| r.t)
                .collect();
            if let (Some(first), Some(last)) = (data_t.first(), data_t.last()) {
                let (first, last) = (first.floor(), last.ceil());
                latency_outside = Some(answered_within(&d, |t| {
                    t >= first && t <= last && !faults.contains(t)
                }));
            }
        }
        // Replicas that were ready for 10 s or more: Prometheus' discovery hands new
        // targets to its scrapers at most every 5 s, so a shorter life may go unseen.
        let mut ready_secs: BTreeMap<u16, u32> = BTreeMap::new();
        for p in timeline.iter().flat_map(|r| &r.replica) {
            if p.state == "Ready" {
                *ready_secs.entry(p.port).or_insert(0) += 1;
            }
        }
        let replicas_seen: Vec<u16> = ready_secs
            .iter()
            .filter(|(_, n)| **n >= 10)
            .map(|(p, _)| *p)
            .collect();
        let want: BTreeSet<String> = replicas_seen
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let missing: Vec<&String> = want.difference(&scraped).collect();
        prom["scraped_instances"] = json!(scraped);
        prom["replica_instances"] = json!(want);
        prom["unscraped_replicas"] = json!(missing);
        prom["rules"] = json!(rules);
        prom["rules_evaluated"] = json!(evaluated);
    }
    Prometheus {
        alerts,
        summary: prom,
        p95,
        latency_outside,
    }
}

async fn prom_query(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    params: &[(&str, String)],
) -> Option<Value> {
    let r = http
        .get(format!("{base}{path}"))
        .query(params)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// From a Prometheus range query of cumulative histogram buckets by (instance, le): the
/// share of answers within each bucket bound (`le` as a number, so "5" and "5.0" are the
/// same), over the steps `keep` accepts, and how many answers that is. Each series'
/// increase is taken step by step, a drop being a restarted replica's counter.
pub fn answered_within(data: &Value, keep: impl Fn(f64) -> bool) -> (Vec<(f64, f64)>, f64) {
    let mut counts: Vec<(f64, f64)> = vec![];
    for series in data["result"].as_array().into_iter().flatten() {
        let Some(le) = series["metric"]["le"]
            .as_str()
            .and_then(|le| le.parse::<f64>().ok())
        else {
            continue;
        };
        let mut prev: Option<f64> = None;
        let mut sum = 0.0;
        for v in series["values"].as_array().into_iter().flatten() {
            let (Some(t), Some(x)) = (
                v[0].as_f64(),
                v[1].as_str().and_then(|x| x.parse::<f64>().ok()),
            ) else {
                continue;
            };
            let step = match prev {
                Some(p) if x >= p => x - p,
                Some(_) => x,
                None => 0.0,
            };
            prev = Some(x);
            if keep(t) {
                sum += step;
            }
        }
        match counts.iter_mut().find(|(b, _)| *b == le) {
            Some((_, n)) => *n += sum,
            None => counts.push((le, sum)),
        }
    }
    let all = counts
        .iter()
        .find(|(le, _)| le.is_infinite())
        .map_or(0.0, |(_, n)| *n);
    let shares = counts
        .into_iter()
        .map(|(le, n)| (le, if all > 0.0 { n / all } else { 0.0 }))
        .collect();
    (shares, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_shares_come_from_bucket_increases_outside_the_windows() {
        let series = |inst: &str, le: &str, v: &[f64]| {
            json!({"metric": {"instance": inst, "le": le},
                   "values": v.iter().enumerate().map(|(i, x)| json!([i as f64, x.to_string()])).collect::<Vec<_>>()})
        };
        // Two replicas; the second restarts (its counters drop) at t=2. Step 3 is in a
        // fault window, where every answer took longer than 5 s.
        let data = json!({"result": [
            series("a", "5.0", &[0.0, 10.0, 20.0, 20.0]),
            series("a", "+Inf", &[0.0, 10.0, 20.0, 120.0]),
            series("b", "5", &[50.0, 60.0, 5.0, 5.0]),
            series("b", "+Inf", &[50.0, 70.0, 5.0, 5.0]),
        ]});
        let (within, answers) = answered_within(&data, |t| t < 3.0);
        // a: 20 of 20; b: 10 of 20, then 5 of 5 after the restart.
        assert_eq!(answers, 45.0);
        assert!(within.contains(&(5.0, 35.0 / 45.0)));
        assert!(within.contains(&(f64::INFINITY, 1.0)));
    }
}

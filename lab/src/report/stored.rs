//! What the run left behind: the documents stored against those acknowledged, the
//! database's own ceiling, each replica's memory against the sizing formula, and the
//! replicas' caches.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::k8s::MemFormula;
use crate::state::Row;
use crate::util::{load_json, read_to_string, Error};

/// The documents: counted before and after, the ones the insert ceiling added (not
/// sluice's), five per acknowledged response, and the database's best rate.
pub struct Documents {
    pub before: Option<f64>,
    pub after: Option<f64>,
    pub stored: Option<f64>,
    pub expected: Option<f64>,
    pub lost: Option<f64>,
    pub ceiling: Option<f64>,
    pub ceiling_documents: f64,
    pub ceiling_runs: Vec<Value>,
}

/// `meta` is setup's `meta.env`, `data` the /api/data run's k6 figures.
pub fn documents(st: &Path, meta: &BTreeMap<String, String>, data: Option<&Value>) -> Documents {
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<f64>().ok());
    // Lost: 5 documents per acknowledged response against what the collection gained.
    let before = num("records_before");
    let after = num("records_after");
    let acked = data.map(|d| {
        d["acknowledged_responses"]
            .as_f64()
            .unwrap_or(0.0)
            .max(d["successful_requests"].as_f64().unwrap_or(0.0))
    });
    // The database's own ceiling, measured after the load on the same database and under
    // the same limits (`lab insert-ceiling`, sluice's batch shape): its best rate,
    // and the documents it added, which are not sluice's.
    let ceiling_runs: Vec<Value> = load_json(&st.join("insert-ceiling.json"))
        .and_then(|c| c["runs"].as_array().cloned())
        .unwrap_or_default();
    let db_ceiling = ceiling_runs
        .iter()
        .filter_map(|r| r["documents_per_second"].as_f64())
        .reduce(f64::max);
    let ceiling_documents: f64 = ceiling_runs
        .iter()
        .filter_map(|r| r["documents"].as_f64())
        .sum();
    let (stored, expected, lost) = match (before, after, acked) {
        (Some(b), Some(a), Some(k)) => {
            let stored = a - b - ceiling_documents;
            let expected = sluice::record::PER_REQUEST as f64 * k;
            (
                Some(stored),
                Some(expected),
                Some((expected - stored).max(0.0)),
            )
        }
        _ => (None, None, None),
    };
    Documents {
        before,
        after,
        stored,
        expected,
        lost,
        ceiling: db_ceiling,
        ceiling_documents,
        ceiling_runs,
    }
}

/// Each replica's peak RSS against M(C) at its peak connection count.
pub fn memory(timeline: &[Row]) -> Vec<Value> {
    let formula = MemFormula::sluice();
    let mut per_pid: BTreeMap<u32, (usize, f64, f64)> = BTreeMap::new();
    for p in timeline.iter().flat_map(|r| &r.replica) {
        let e = per_pid.entry(p.pid).or_insert((p.slot, 0.0, 0.0));
        let rss = p.hwm_kib.or(p.rss_kib).unwrap_or(0) as f64 / 1024.0;
        e.1 = e.1.max(rss);
        e.2 = e.2.max(p.connections as f64);
    }
    per_pid
        .iter()
        .map(|(pid, (slot, rss, c))| {
            let limit = formula.mib(*c);
            json!({"slot": slot, "pid": pid, "peak_rss_mib": rss, "peak_connections": c,
                   "mib_per_1000_connections": if *c > 0.0 { Some(1000.0 * rss / c) } else { None },
                   "mib_per_1000_connections_above_base": if *c > 0.0 { Some(1000.0 * (rss - formula.base_mib) / c) } else { None },
                   "formula_mib": limit, "ok": *rss <= limit})
        })
        .collect()
}

/// Hit ratios, from each replica's /api/cache/status (sluice's own type) saved in `st`.
pub fn caches(st: &Path) -> Result<Value, Error> {
    let mut caches = BTreeMap::new();
    let (mut l1, mut l2) = ((0u64, 0u64), (0u64, 0u64));
    for entry in std::fs::read_dir(st)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !(name.starts_with("cache-") && name.ends_with(".json")) {
            continue;
        }
        let Some(text) = read_to_string(entry.path()) else {
            continue;
        };
        if let Ok(s) = serde_json::from_str::<sluice::status::Status>(&text) {
            l1 = (l1.0 + s.l1.hits, l1.1 + s.l1.misses);
            l2 = (l2.0 + s.l2.hits, l2.1 + s.l2.misses);
            caches.insert(s.pod.clone(), json!({"l1_hits": s.l1.hits, "l1_misses": s.l1.misses,
                "l2_hits": s.l2.hits, "l2_misses": s.l2.misses, "documents_stored": s.writer.documents_stored}));
        }
    }
    let ratio = |(h, m): (u64, u64)| {
        if h + m > 0 {
            Some(h as f64 / (h + m) as f64)
        } else {
            None
        }
    };
    Ok(json!({"replicas": caches, "l1_hit_ratio": ratio(l1), "l2_hit_ratio": ratio(l2)}))
}

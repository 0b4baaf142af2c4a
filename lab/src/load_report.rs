//! `load-report DIR`: turns one load-report run's raw files into `report.json`,
//! `report.md` (the tables) and `chart.svg`: req/s and p95 per VU level for sluice, naive
//! mode and the `/healthz` ceiling, with the database's raw insert ceiling after each
//! level.
//!
//! `bench-report/run.sh` drives the lab and then runs this; run it alone to redraw:
//!
//! ```text
//! cargo run --release -p sluice-lab -- load-report results/report-<time>
//! ```
//!
//! The folder holds, as the script writes them:
//!
//! - `meta.json`: when, where, with what command and settings;
//! - `k6-<target>-<vus>.json`: k6's `--summary-export` of each run (target: sluice,
//!   naive, healthz);
//! - `db-<target>-<vus>-before.json` / `-after.json`: serverStatus snapshots around each
//!   `/api/data` run (`snapshot`);
//! - `insert-ceiling-<vus>.json`: `lab insert-ceiling`'s output, measured right
//!   after that level on the same database (older runs have one `insert-ceiling.json`,
//!   measured after every level, which stands in for each);
//! - `instructions/<part>.json`: gungraun's summary of each part of the request path
//!   `benches/request_instructions.rs` counts under Valgrind (`records`, `answer`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::{json, Value};

use crate::k6;
use crate::util::{f as num, load_json as load, Error};

const DOCS_PER_REQUEST: f64 = sluice::record::PER_REQUEST as f64;

const TARGETS: [&str; 3] = ["sluice", "naive", "healthz"];

/// One k6 run's figures, and the database's over the same run where there are snapshots.
fn level(dir: &Path, target: &str, vus: u64) -> Option<Value> {
    let k6 = k6::Summary::read(&dir.join(format!("k6-{target}-{vus}.json")))?;
    let requests = k6.requests?;
    let rate = k6.req_per_s?;
    // The summary export has no run time, but count / rate is exactly it.
    let seconds = if rate > 0.0 { requests / rate } else { 0.0 };
    let ok = k6.successful_requests;
    let per_s = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
    let mut out = json!({
        "vus": vus,
        "seconds": seconds,
        "requests": requests,
        "req_per_s": rate,
        "ok_requests": ok,
        "ok_req_per_s": per_s(ok),
        // Answered 200 with its documents stored, however slowly: what the database's
        // bound is about (a shed 503 is fast and stores nothing).
        "acknowledged_per_s": k6.acknowledged_responses.map(per_s),
        "failed_rate": k6.failed_rate.unwrap_or(0.0),
        "error_rate": k6.error_rate.unwrap_or(0.0),
        "med_ms": k6.med_ms,
        "p95_ms": k6.p95_ms,
        "p99_ms": k6.p99_ms,
        "max_ms": k6.max_ms,
    });
    // The database's CPU seconds over the same window as its snapshots (both are taken
    // around k6's run).
    let mut database_cpu_s = None;
    let cpu_before = load(&dir.join(format!("cpu-{target}-{vus}-before.json")));
    let cpu_after = load(&dir.join(format!("cpu-{target}-{vus}-after.json")));
    if let (Some(b), Some(a)) = (cpu_before, cpu_after) {
        let tck = num(&a, &["clk_tck"]).unwrap_or(100.0);
        // Negative when a process restarted during the level (its pid's ticks began anew).
        let cpu_s = |k: &str| Some((num(&a, &[k])? - num(&b, &[k])?) / tck).filter(|s| *s >= 0.0);
        // Shares of the wall-clock time between the snapshots, which take in k6's start
        // and end; older runs have no uptime, and their k6 run time stands in.
        let wall = num(&a, &["uptime_s"])
            .zip(num(&b, &["uptime_s"]))
            .map(|(a, b)| a - b)
            .filter(|w| *w > 0.0)
            .unwrap_or(seconds);
        let cores = |k: &str| cpu_s(k).map(|c| c / wall);
        database_cpu_s = cpu_s("database");
        // What the machine spent beyond sluice, the database and HAProxy: k6 mostly, and
        // Prometheus, the lab's conductor, the kernel's interrupts, and any of the three
        // that restarted during the level (its ticks are not counted above).
        let rest = || {
            let lab: f64 = ["sluice", "database", "haproxy"]
                .iter()
                .map(|k| cores(k).unwrap_or(0.0))
                .sum();
            Some(cores("machine")? - lab)
        };
        out["cpu"] = json!({
            "sluice_cores": cores("sluice"),
            "database_cores": cores("database"),
            "haproxy_cores": cores("haproxy"),
            "rest_cores": rest(),
            "machine_busy_cores": cores("machine"),
            "machine_cores": num(&a, &["cores"]),
            "wall_s": wall,
            "sluice_us_per_request": cpu_s("sluice")
                .filter(|_| requests > 0.0)
                .map(|s| s * 1e6 / requests),
        });
    }
    let before = load(&dir.join(format!("db-{target}-{vus}-before.json")));
    let after = load(&dir.join(format!("db-{target}-{vus}-after.json")));
    // A database that restarted during the level (naive mode can overwhelm it) started
    // its counters again: no difference of them means anything, so none is shown.
    let restarted = |b: &Value, a: &Value| {
        num(a, &["commands_total"]) < num(b, &["commands_total"])
            || num(a, &["documents_inserted"]) < num(b, &["documents_inserted"])
    };
    if let (Some(b), Some(a)) = (before, after) {
        if restarted(&b, &a) {
            out["db"] = json!({"restarted": true});
            return Some(out);
        }
        let delta = |p: &[&str]| Some(num(&a, p)? - num(&b, p)?);
        let docs = delta(&["documents_inserted"]).unwrap_or(0.0);
        let inserts = delta(&["commands", "insert"]).unwrap_or(0.0);
        let finds = delta(&["commands", "find"]).unwrap_or(0.0);
        let commands =
            delta(&["commands_total"]).unwrap_or(0.0) - delta(&["probe_commands"]).unwrap_or(0.0);
        out["db"] = json!({
            "documents": docs,
            "documents_per_s": per_s(docs),
            "commands_per_s": per_s(commands),
            "insert_commands": inserts,
            "find_commands": finds,
            "documents_per_insert": if inserts > 0.0 { docs / inserts } else { 0.0 },
            "documents_per_database_cpu_second": database_cpu_s
                .filter(|c| *c > 0.0)
                .map(|c| docs / c),
        });
    }
    Some(out)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => {
            let s = format!("{v:.digits$}");
            // Thousands separators make the tables readable at a glance.
            let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
            let (sign, int) = int.strip_prefix('-').map_or(("", int), |i| ("-", i));
            let mut grouped = String::new();
            for (i, c) in int.chars().enumerate() {
                if i > 0 && (int.len() - i) % 3 == 0 {
                    grouped.push(',');
                }
                grouped.push(c);
            }
            if frac.is_empty() {
                format!("{sign}{grouped}")
            } else {
                format!("{sign}{grouped}.{frac}")
            }
        }
        None => "n/a".into(),
    }
}

fn tables(report: &Value) -> String {
    let mut md = String::new();
    let meta = &report["meta"];
    let _ = writeln!(
        md,
        "Command: `{}`  \nDate: {}  \nMachine: {}  \nStages per level: {}  \nk6 against: {}  \nDatabase: {}\n",
        meta["command"].as_str().unwrap_or("?"),
        meta["date"].as_str().unwrap_or("?"),
        meta["machine"].as_str().unwrap_or("?"),
        meta["stages"].as_str().unwrap_or("?"),
        // Reports from before --direct existed went through HAProxy.
        meta["route"].as_str().unwrap_or("HAProxy"),
        meta["database"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "| target | VUs | req/s | ok req/s | failed | p50 ms | p95 ms | p99 ms | docs/s stored | DB commands/s | docs per insert | sluice µs CPU per request | cores: sluice / DB / HAProxy / rest (k6 mostly) = machine busy of N |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for target in TARGETS {
        for l in report["series"][target].as_array().into_iter().flatten() {
            let db = |k: &str| l["db"][k].as_f64();
            let cpu = |k: &str| l["cpu"][k].as_f64();
            let _ = writeln!(
                md,
                "| {target} | {} | {} | {} | {}% | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} / {} = {} of {} |",
                fmt(l["vus"].as_f64(), 0),
                fmt(l["req_per_s"].as_f64(), 0),
                fmt(l["ok_req_per_s"].as_f64(), 0),
                fmt(l["failed_rate"].as_f64().map(|r| r * 100.0), 1),
                fmt(l["med_ms"].as_f64(), 0),
                fmt(l["p95_ms"].as_f64(), 0),
                fmt(l["p99_ms"].as_f64(), 0),
                fmt(db("documents_per_s"), 0),
                fmt(db("commands_per_s"), 1),
                fmt(db("documents_per_insert"), 0),
                fmt(cpu("sluice_us_per_request"), 0),
                fmt(cpu("sluice_cores"), 2),
                fmt(cpu("database_cores"), 2),
                fmt(cpu("haproxy_cores"), 2),
                fmt(cpu("rest_cores"), 2),
                fmt(cpu("machine_busy_cores"), 2),
                fmt(cpu("machine_cores"), 0),
            );
        }
    }
    if let Some(parts) = report["instructions_per_request"]
        .as_object()
        .filter(|p| !p.is_empty())
    {
        let each: Vec<String> = parts
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
            .collect();
        let total: u64 = parts.values().filter_map(Value::as_u64).sum();
        let _ = writeln!(
            md,
            "\nInstructions per request in the parts of its path without I/O, counted under Valgrind (`benches/request_instructions.rs`; the same on every run of one build, where the µs above move with the machine): {} ({total} in all).",
            each.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\n| VUs | sluice ÷ /healthz (req/s) | sluice ÷ /healthz (µs CPU per request) | its floor: (/healthz + 5 documents through the driver) ÷ /healthz | sluice 200s/s ÷ min(/healthz req/s, raw insert ceiling ÷ 5) | stored docs/s ÷ raw insert ceiling | the same per database CPU-second | sluice ÷ naive (ok req/s) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in report["ratios"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(r["vus"].as_f64(), 0),
            fmt(r["sluice_over_healthz"].as_f64(), 2),
            fmt(r["cpu_per_request_over_healthz"].as_f64(), 2),
            fmt(r["cpu_per_request_floor"].as_f64(), 2),
            fmt(r["sluice_over_bound"].as_f64(), 2),
            fmt(r["stored_over_ceiling"].as_f64(), 2),
            fmt(r["stored_over_ceiling_per_db_cpu"].as_f64(), 2),
            fmt(r["sluice_over_naive"].as_f64(), 1),
        );
    }
    let ceilings = report["insert_ceiling"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let _ = writeln!(
        md,
        "\nRaw insert ceiling, right after each level on its database ({}; {}):\n",
        ceilings
            .first()
            .and_then(|c| c["what"].as_str())
            .unwrap_or("not measured"),
        ceilings
            .first()
            .and_then(|c| c["write_concern"].as_str())
            .unwrap_or("-"),
    );
    let _ = writeln!(
        md,
        "| after VUs | docs per insert | in flight | docs/s | commands/s | p50 ms per command | errors | client µs CPU per document | database cores | docs per database CPU-second |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (vus, r) in ceilings.iter().flat_map(|c| {
        let runs = c["runs"].as_array().map_or(&[][..], Vec::as_slice);
        runs.iter().map(move |r| (&c["vus"], r))
    }) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(vus.as_f64(), 0),
            fmt(r["batch_docs"].as_f64(), 0),
            fmt(r["concurrency"].as_f64(), 0),
            fmt(r["documents_per_second"].as_f64(), 0),
            fmt(r["commands_per_second"].as_f64(), 1),
            fmt(r["command_ms_p50"].as_f64(), 0),
            fmt(r["errors"].as_f64(), 0),
            fmt(r["client_cpu_us_per_document"].as_f64(), 1),
            fmt(r["database_cores"].as_f64(), 2),
            fmt(r["documents_per_database_cpu_second"].as_f64(), 0),
        );
    }
    md
}

fn points(report: &Value, target: &str, key: &str) -> Vec<(f64, f64)> {
    report["series"][target]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["vus"].as_f64()?, l[key].as_f64()?)))
        .collect()
}

fn chart(report: &Value, out: &Path) -> Result<(), Error> {
    let colors = [
        ("sluice", RGBColor(0x1f, 0x77, 0xb4)),
        ("naive", RGBColor(0xd6, 0x27, 0x28)),
        ("healthz", RGBColor(0x7f, 0x7f, 0x7f)),
    ];
    let label = |t: &str| match t {
        "healthz" => "/healthz (HTTP ceiling)".to_string(),
        "naive" => "naive mode".to_string(),
        t => t.to_string(),
    };
    // Each level's database ceiling, in requests' worth.
    let insert_ceiling: Vec<(f64, f64)> = report["insert_ceiling"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let docs = c["best_documents_per_second"].as_f64()?;
            Some((c["vus"].as_f64()?, docs / DOCS_PER_REQUEST))
        })
        .collect();
    let root = SVGBackend::new(out, (1280, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "sluice load report, {} ({})",
            report["meta"]["date"].as_str().unwrap_or(""),
            report["meta"]["stages"].as_str().unwrap_or("")
        ),
        ("sans-serif", 20),
    )?;
    let (left, right) = root.split_horizontally(640);
    let x_range = || (70f64..14000f64).log_scale();

    let ymax = TARGETS
        .iter()
        .flat_map(|t| points(report, t, "ok_req_per_s"))
        .map(|p| p.1)
        .chain(insert_ceiling.iter().map(|p| p.1))
        .fold(100.0, f64::max)
        * 1.15;
    let mut rps = ChartBuilder::on(&left)
        .caption("successful req/s", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range(), 0f64..ymax)?;
    rps.configure_mesh()
        .x_desc("VUs (log)")
        .y_desc("req/s")
        .draw()?;
    for (t, c) in colors {
        let pts = points(report, t, "ok_req_per_s");
        rps.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(label(t))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        rps.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    if !insert_ceiling.is_empty() {
        let c = RGBColor(0x2c, 0xa0, 0x2c);
        rps.draw_series(LineSeries::new(insert_ceiling.clone(), c.stroke_width(2)))?
            .label("raw insert ceiling ÷ 5 docs, after each level")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        rps.draw_series(
            insert_ceiling
                .into_iter()
                .map(|p| Cross::new(p, 5, c.stroke_width(2))),
        )?;
    }
    rps.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut p95 = ChartBuilder::on(&right)
        .caption("p95 latency (ms, log)", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range(), (1f64..30000f64).log_scale())?;
    p95.configure_mesh()
        .x_desc("VUs (log)")
        .y_desc("ms")
        .draw()?;
    for (t, c) in colors {
        let pts: Vec<_> = points(report, t, "p95_ms")
            .into_iter()
            .map(|(x, y)| (x, y.max(1.0)))
            .collect();
        p95.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(label(t))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        p95.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    let threshold = RGBColor(0xff, 0x7f, 0x0e);
    p95.draw_series(LineSeries::new(
        vec![(70.0, 2000.0), (14000.0, 2000.0)],
        threshold.stroke_width(1),
    ))?
    .label("k6 threshold p95 < 2 s")
    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], threshold));
    p95.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The most `/api/data` req/s the machine allows in one run: what its HTTP path carries
/// (`/healthz` at the same VUs) or what the database stores (its raw insert ceiling, 5
/// documents a request), whichever is lower; `None` when neither was measured.
/// Instructions per request of each part `benches/request_instructions.rs` counts, from
/// the gungraun summaries run.sh copied into `instructions/`: deterministic, beside the
/// µs of CPU that move with the machine's load.
fn instructions(dir: &Path) -> BTreeMap<String, u64> {
    let Ok(entries) = std::fs::read_dir(dir.join("instructions")) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let part = path.file_stem()?.to_str()?.to_string();
            let summary = load(&path)?;
            // The new count is the first of Left ("no earlier run") or Both (new, old).
            let ir = &summary["profiles"][0]["summaries"]["total"]["summary"]["Callgrind"]["Ir"]
                ["metrics"];
            let new = ir["Left"]
                .as_object()
                .or_else(|| ir["Both"][0].as_object())?;
            Some((part, new.get("Int")?.as_u64()?))
        })
        .collect()
}

fn bound(healthz_req_per_s: Option<f64>, ceiling_docs_per_s: Option<f64>) -> Option<f64> {
    let by_db = ceiling_docs_per_s.map(|d| d / DOCS_PER_REQUEST);
    match (healthz_req_per_s, by_db) {
        (Some(h), Some(d)) => Some(h.min(d)),
        (h, d) => h.or(d),
    }
}

/// The least `/api/data` can cost in CPU, as a multiple of `/healthz` at the same VUs:
/// the HTTP answer `/healthz` pays, plus making its five documents and driving them
/// through the driver at the cheapest the raw insert ceiling measured a document. Both
/// are part of every `/api/data`, so no request can cost less, however lean the rest.
fn cpu_floor(healthz_us: Option<f64>, client_us_per_document: Option<f64>) -> Option<f64> {
    let h = healthz_us.filter(|h| *h > 0.0)?;
    Some((h + DOCS_PER_REQUEST * client_us_per_document?) / h)
}

/// The raw insert ceiling measured right after level `vus` on its database, with its best
/// run's figures added; older runs measured one after every level, which stands in.
fn ceiling(dir: &Path, vus: u64) -> Option<Value> {
    let mut c = load(&dir.join(format!("insert-ceiling-{vus}.json")))
        .or_else(|| load(&dir.join("insert-ceiling.json")))?;
    // The best run by one figure, None when no run has it.
    let best_of = |key: &str| {
        c["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r[key].as_f64())
            .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))))
    };
    let best = best_of("documents_per_second");
    let best_per_db_cpu = best_of("documents_per_database_cpu_second");
    let cheapest = c["runs"]
        .as_array()
        .into_iter()
        .flatten()
        // A run with failed inserts spread its CPU over fewer stored documents.
        .filter(|r| r["errors"].as_u64().unwrap_or(0) == 0)
        .filter_map(|r| r["client_cpu_us_per_document"].as_f64())
        .filter(|us| *us > 0.0)
        .reduce(f64::min);
    let obj = c.as_object_mut()?;
    obj.insert("vus".into(), json!(vus));
    obj.insert("best_documents_per_second".into(), json!(best));
    obj.insert(
        "best_documents_per_database_cpu_second".into(),
        json!(best_per_db_cpu),
    );
    obj.insert(
        "cheapest_client_cpu_us_per_document".into(),
        json!(cheapest),
    );
    Some(c)
}

pub fn run(dir: &Path) -> Result<(), Error> {
    let meta = load(&dir.join("meta.json")).ok_or("no meta.json in the run folder")?;
    let levels: Vec<u64> = meta["levels"]
        .as_array()
        .ok_or("meta.json has no levels")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let mut series = BTreeMap::new();
    for target in TARGETS {
        let found: Vec<Value> = levels
            .iter()
            .filter_map(|&v| level(dir, target, v))
            .collect();
        series.insert(target, found);
    }
    // A figure of one level, by JSON pointer ("/req_per_s", "/db/documents_per_s").
    let at = |target: &str, vus: u64, pointer: &str| {
        series[target]
            .iter()
            .find(|l| l["vus"].as_u64() == Some(vus))
            .and_then(|l| l.pointer(pointer))
            .and_then(Value::as_f64)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ceilings: Vec<Value> = levels.iter().filter_map(|&v| ceiling(dir, v)).collect();
    let ratios: Vec<Value> = levels
        .iter()
        .map(|&v| {
            let of_ceiling = |key: &str| {
                ceilings
                    .iter()
                    .find(|c| c["vus"].as_u64() == Some(v))
                    .and_then(|c| c[key].as_f64())
            };
            let best = of_ceiling("best_documents_per_second");
            let best_per_db_cpu = of_ceiling("best_documents_per_database_cpu_second");
            let healthz_us = at("healthz", v, "/cpu/sluice_us_per_request");
            json!({
                "vus": v,
                "sluice_over_healthz": ratio(at("sluice", v, "/req_per_s"), at("healthz", v, "/req_per_s")),
                "cpu_per_request_over_healthz": ratio(
                    at("sluice", v, "/cpu/sluice_us_per_request"),
                    healthz_us,
                ),
                "cpu_per_request_floor": cpu_floor(
                    healthz_us,
                    of_ceiling("cheapest_client_cpu_us_per_document"),
                ),
                "sluice_ok_over_healthz": ratio(at("sluice", v, "/ok_req_per_s"), at("healthz", v, "/ok_req_per_s")),
                "sluice_over_naive": ratio(at("sluice", v, "/ok_req_per_s"), at("naive", v, "/ok_req_per_s")),
                "sluice_over_bound": ratio(at("sluice", v, "/acknowledged_per_s"), bound(at("healthz", v, "/req_per_s"), best)),
                "stored_over_ceiling": ratio(at("sluice", v, "/db/documents_per_s"), best),
                // The same, per second of the database's CPU: the ceiling had an idle
                // machine, a load run shares it with k6.
                "stored_over_ceiling_per_db_cpu": ratio(
                    at("sluice", v, "/db/documents_per_database_cpu_second"),
                    best_per_db_cpu,
                ),
            })
        })
        .collect();
    let report = json!({
        "meta": meta,
        "series": series,
        "ratios": ratios,
        "insert_ceiling": ceilings,
        "instructions_per_request": instructions(dir),
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = tables(&report);
    std::fs::write(dir.join("report.md"), &md)?;
    chart(&report, &dir.join("chart.svg"))?;
    println!("{md}");
    println!(
        "wrote {0}/report.json, {0}/report.md and {0}/chart.svg",
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_the_new_count_of_each_gungraun_summary() {
        let dir = tempfile::tempdir().unwrap();
        assert!(instructions(dir.path()).is_empty());
        let parts = dir.path().join("instructions");
        std::fs::create_dir(&parts).unwrap();
        let summary = |metrics: Value| {
            json!({"profiles": [{"summaries": {"total": {"summary": {"Callgrind": {"Ir": {"metrics": metrics}}}}}}]})
                .to_string()
        };
        // A first run has only the new count; a later one the new and the old.
        std::fs::write(
            parts.join("records.json"),
            summary(json!({"Left": {"Int": 34129}})),
        )
        .unwrap();
        std::fs::write(
            parts.join("answer.json"),
            summary(json!({"Both": [{"Int": 7946}, {"Int": 8000}]})),
        )
        .unwrap();
        assert_eq!(
            instructions(dir.path()),
            BTreeMap::from([("answer".to_string(), 7946), ("records".to_string(), 34129)])
        );
    }

    #[test]
    fn the_bound_is_the_lower_of_the_http_path_and_the_database() {
        // The database binds: 20,000 documents/s is 4,000 requests/s.
        assert_eq!(bound(Some(9_000.0), Some(20_000.0)), Some(4_000.0));
        // The HTTP path binds.
        assert_eq!(bound(Some(2_000.0), Some(20_000.0)), Some(2_000.0));
        assert_eq!(bound(None, Some(20_000.0)), Some(4_000.0));
        assert_eq!(bound(None, None), None);
    }

    #[test]
    fn the_cpu_floor_adds_five_of_the_cheapest_documents_to_healthz() {
        // /healthz 40 µs, a document 2 µs at best: 50 µs, 1.25 times /healthz.
        assert_eq!(cpu_floor(Some(40.0), Some(2.0)), Some(1.25));
        assert_eq!(cpu_floor(None, Some(2.0)), None);
        assert_eq!(cpu_floor(Some(0.0), Some(2.0)), None);
        assert_eq!(cpu_floor(Some(40.0), None), None);
    }

    #[test]
    fn each_level_is_held_against_its_own_ceiling_and_old_runs_against_their_one() {
        let run = |batch: u64, docs_per_s: f64| {
            json!({"batch_docs": batch, "documents_per_second": docs_per_s,
                   "client_cpu_us_per_document": 4e4 / docs_per_s})
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, runs: Vec<Value>| {
            std::fs::write(dir.path().join(name), json!({ "runs": runs }).to_string()).unwrap()
        };
        write(
            "insert-ceiling-100.json",
            vec![run(250, 9_000.0), run(2000, 21_000.0)],
        );
        write("insert-ceiling-10000.json", vec![run(2000, 17_500.0)]);
        let best = |vus| ceiling(dir.path(), vus).unwrap()["best_documents_per_second"].as_f64();
        assert_eq!(best(100), Some(21_000.0));
        assert_eq!(best(10_000), Some(17_500.0));
        let cheapest = ceiling(dir.path(), 100).unwrap()["cheapest_client_cpu_us_per_document"]
            .as_f64()
            .unwrap();
        assert!((cheapest - 4e4 / 21_000.0).abs() < 1e-9, "{cheapest}");
        assert!(
            ceiling(dir.path(), 1_000).is_none(),
            "no ceiling was measured after 1,000 VUs"
        );
        write("insert-ceiling.json", vec![run(2000, 18_000.0)]);
        assert_eq!(best(1_000), Some(18_000.0));
        assert_eq!(
            best(100),
            Some(21_000.0),
            "a level's own ceiling comes first"
        );
    }
}

//! The report on the terminal: what a user reads when the run ends, from the report JSON
//! alone, so that the file and the screen cannot disagree.

use serde_json::Value;

/// Prints `r` (the report as written), naming its files as `report` and `chart`.
pub fn print(r: &Value, report: &str, chart: &str) {
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let n = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.0}"));
    let t_start = num(&r["timeline"][0]["t"]);
    let line = "-".repeat(100);
    println!("{line}");
    println!(
        "profile {} · {} · database {}",
        r["meta"]["profile"].as_str().unwrap_or("?"),
        r["autoscaler"]["mode"].as_str().unwrap_or("?"),
        r["meta"]["constraints"].as_str().unwrap_or("?")
    );
    let (d, c) = (&r["api_data"], &r["healthz_ceiling"]);
    if d.is_object() {
        println!(
            "/api/data: {:.0} req/s, p95 {:.0} ms, {:.0} ok / {:.0} failed   /healthz (same run, same profile): {:.0} req/s, p95 {:.0} ms",
            num(&d["req_per_s"]),
            num(&d["p95_ms"]),
            num(&d["successful_requests"]),
            num(&d["failed_requests"]),
            num(&c["req_per_s"]),
            num(&c["p95_ms"])
        );
    }
    let db = &r["db_insert_ceiling"];
    if let Some(c) = db["documents_per_second"].as_f64() {
        let best = num(&db["sluice_best_10s_documents_per_second"]);
        println!(
            "database insert ceiling (after the load, same database and limits): {c:.0} documents/s; sluice stored {best:.0}/s over its best 10 s ({:.2} of it)",
            best / c
        );
    }
    let docs = &r["documents"];
    println!(
        "documents stored {} / 5 x acknowledged {} (lost {}); peak database commands in one second {}",
        n(&docs["stored"]),
        n(&docs["expected_5x_acknowledged"]),
        n(&r["lost"]),
        n(&r["peak_commands_per_s"])
    );
    println!(
        "budget tolerance: {}",
        r["budget"]["tolerance"].as_str().unwrap_or("")
    );
    let a = &r["autoscaler"];
    if let Some(held) = a["held_at_minimum_pct"].as_f64() {
        let target = num(&a["target_pct"]);
        println!(
            "autoscaler: at its minimum {} replicas the pods held {held:.0}% of their memory request on average through a whole scale-up window; it scales up above {:.1}% (1.1 x the {target:.0}% target)",
            a["min"],
            1.1 * target
        );
    }
    events(r, t_start);
    alerts(r, t_start);
    caches_and_memory(r);
    println!("\nSLUICE'S OWN CHECKS");
    for (k, v) in r["checks"].as_object().into_iter().flatten() {
        let verdict = match v.as_bool() {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "n/a",
        };
        println!("  {verdict:<6} {k}");
    }
    for (key, what) in [
        ("seconds_over", "seconds over the budget"),
        (
            "seconds_over_in_fault_windows",
            "seconds over the budget inside fault windows",
        ),
    ] {
        if let Some(over) = r["budget"][key].as_array().filter(|o| !o.is_empty()) {
            println!("         {what}: {}", Value::from(over.clone()));
        }
    }
    println!("K6 THRESHOLDS (/api/data, against /healthz on this machine)");
    for t in r["thresholds"].as_array().into_iter().flatten() {
        let how = t["judged_by"].as_str().unwrap_or("k6");
        println!(
            "  {:<34} {}{}",
            t["threshold"].as_str().unwrap_or(""),
            t["verdict"].as_str().unwrap_or(""),
            if how == "k6" {
                String::new()
            } else {
                format!(" (k6 failed it over the whole run; judged by {how})")
            }
        );
    }
    println!("\nrule: {}", r["exit_rule"].as_str().unwrap_or(""));
    println!(
        "VERDICT: {}  (report {report}, chart {chart})",
        r["verdict"].as_str().unwrap_or("?")
    );
    println!("{line}");
}

fn events(r: &Value, t_start: f64) {
    let Some(events) = r["events"].as_array().filter(|e| !e.is_empty()) else {
        return;
    };
    println!("\nevents (time from the first sample):");
    println!(
        "  {:>6}  {:<22} {:>8} {:>10}  detail",
        "t (s)", "event", "failed/10s", "ready after"
    );
    for e in events {
        println!(
            "  {:>6.0}  {:<22} {:>8} {:>10}  {}",
            e["t"].as_f64().unwrap_or(0.0) - t_start,
            e["kind"].as_str().unwrap_or(""),
            e["failed_in_10s"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.0}")),
            e["recovered_after_s"]
                .as_f64()
                .map_or("-".to_string(), |s| format!("{s:.0} s")),
            e["detail"].as_str().unwrap_or("")
        );
        if let Some(out) = e["replicas_taken_out"].as_array() {
            let out: Vec<&str> = out.iter().filter_map(Value::as_str).collect();
            println!(
                "  {:>6}  {:<22} replicas HAProxy took out: {}; HAProxy's own 5xx: {}",
                "",
                "",
                if out.is_empty() {
                    "none".to_string()
                } else {
                    out.join(", ")
                },
                e["haproxy_own_5xx"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

fn alerts(r: &Value, t_start: f64) {
    let alerts: Vec<String> = r["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "{} at +{:.0} s{}",
                x["alert"].as_str().unwrap_or("?"),
                x["first_firing"].as_f64().unwrap_or(0.0) - t_start,
                if x["after_a_fault"] == true {
                    " (after a fault)"
                } else {
                    ""
                }
            )
        })
        .collect();
    println!(
        "\nalerts fired: {}",
        if alerts.is_empty() {
            "none".to_string()
        } else {
            alerts.join(", ")
        }
    );
    let prom = &r["prometheus"];
    if let Some(u) = prom["url"].as_str() {
        let count = |k: &str| prom[k].as_array().map_or(0, Vec::len);
        println!(
            "prometheus {u}: {} rules, {} evaluated; scraped {} of {} replica instances",
            prom["rules"],
            prom["rules_evaluated"],
            count("replica_instances") - count("unscraped_replicas"),
            count("replica_instances")
        );
    }
}

fn caches_and_memory(r: &Value) {
    let cache = &r["cache"];
    if let Some(replicas) = cache["replicas"].as_object().filter(|c| !c.is_empty()) {
        let pct = |v: &Value| {
            v.as_f64()
                .map_or("n/a".to_string(), |r| format!("{:.1}%", 100.0 * r))
        };
        println!(
            "cache hit ratios: L1 {}, L2 {}",
            pct(&cache["l1_hit_ratio"]),
            pct(&cache["l2_hit_ratio"])
        );
        for (pod, c) in replicas {
            println!(
                "  {pod}: L1 {} hits / {} misses, L2 {} hits / {} misses, {} documents stored",
                c["l1_hits"], c["l1_misses"], c["l2_hits"], c["l2_misses"], c["documents_stored"]
            );
        }
    }
    for m in r["memory"]["replicas"].as_array().into_iter().flatten() {
        let c = m["peak_connections"].as_f64().unwrap_or(0.0);
        let per_1000 = if c >= 1000.0 {
            format!(
                ", {:.0} MiB per 1,000 connections",
                m["mib_per_1000_connections"].as_f64().unwrap_or(0.0)
            )
        } else {
            String::new()
        };
        println!(
            "memory sluice-local-{} (pid {}): peak RSS {:.0} MiB at {c:.0} open connections; M({c:.0}) = {:.0} MiB{per_1000}",
            m["slot"],
            m["pid"],
            m["peak_rss_mib"].as_f64().unwrap_or(0.0),
            m["formula_mib"].as_f64().unwrap_or(0.0)
        );
    }
}

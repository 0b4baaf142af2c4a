//! Far more load than the database budget can absorb: the service sheds with 503 and
//! `Retry-After`, its memory stays bounded, and `/healthz` keeps answering.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The stated cap on sluice's peak resident memory under this overload.
const RSS_CAP_MIB: u64 = 256;

/// Peak resident set size of a process, from the kernel's high-water mark.
fn peak_rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_sheds_with_bounded_memory_and_live_health() {
    // Two commands a second for the whole "cluster" and small batches: the database side
    // can store a few hundred requests a second at most, against 2,000 clients.
    let (_redis, mongo, mut sluice) = spawn_binary(&[
        ("DB_COMMAND_BUDGET", "2"),
        ("BATCH_MAX_DOCS", "500"),
        ("QUEUE_CAPACITY", "500"),
        ("WRITE_TIMEOUT_MS", "3000"),
        ("DB_TIMEOUT_MS", "3000"),
    ])
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(&sluice.url("/api/data"), 2000, Arc::clone(&stop));

    // Probe liveness the whole time, as the kubelet would.
    let probe_client = client();
    let mut slowest_probe = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let probe = get(&probe_client, &sluice.url("/healthz")).await;
        assert_eq!(probe.status, 200, "liveness must hold under overload");
        slowest_probe = slowest_probe.max(probe.latency);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = load.await.unwrap();

    let shed: Vec<_> = outcomes.iter().filter(|o| o.status == 503).collect();
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    let peak = peak_rss_mib(sluice.process().pid());
    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap_or_default();
    println!(
        "overload: {} requests, {ok} stored, {} shed with 503; slowest answer {slowest:?}; peak RSS {peak} MiB (cap {RSS_CAP_MIB}); slowest /healthz {slowest_probe:?}",
        outcomes.len(),
        shed.len()
    );
    assert!(
        !shed.is_empty() && shed.iter().all(|o| o.retry_after),
        "overload is shed with 503 + Retry-After"
    );
    let mut by_status = std::collections::BTreeMap::new();
    for o in &outcomes {
        *by_status.entry(o.status).or_insert(0usize) += 1;
    }
    assert!(
        outcomes.iter().all(|o| o.status == 200 || o.status == 503),
        "only 200 or 503, got {by_status:?}; e.g. {:?}",
        outcomes.iter().find(|o| o.status != 200 && o.status != 503)
    );
    // WRITE_TIMEOUT_MS and DB_TIMEOUT_MS are 3 s here: every request is answered by
    // then, plus scheduling slack on a busy 2-core machine, never at the client's 10 s.
    assert!(
        slowest < Duration::from_secs(6),
        "a request waited {slowest:?} for its answer"
    );
    assert!(ok > 0, "some requests still get through");
    assert!(
        peak < RSS_CAP_MIB,
        "peak RSS {peak} MiB over the {RSS_CAP_MIB} MiB cap"
    );
    assert!(
        slowest_probe < Duration::from_secs(1),
        "/healthz took {slowest_probe:?}"
    );
    assert_nothing_lost(&mongo, &outcomes).await;
}

//! What the design exists for: many requests share one database command.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_insert_commands() {
    let (_redis, mongo, sluice) = spawn_app(&[]).await;
    let inserts_before = mongo.command_total("insert").await;

    let started = Instant::now();
    let outcomes = burst(&sluice.url("/api/data"), 2000).await;
    let took = started.elapsed();

    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    assert_eq!(
        ok,
        2000,
        "every request stored: {:?}",
        outcomes.iter().find(|o| o.status != 200)
    );
    assert_eq!(assert_nothing_lost(&mongo, &outcomes).await, 10_000);
    let stored = mongo.stored_count().await;
    assert_eq!(stored, 10_000, "no document stored twice or missing");
    let inserts = mongo.command_total("insert").await - inserts_before;
    // However long a slow machine takes to send the burst, the budget (default 50/s,
    // one pod) bounds the commands, and each must carry many requests' documents.
    let allowed = (50.0 * took.as_secs_f64()).ceil() as i64 + 1;
    assert!(
        inserts <= allowed,
        "{inserts} inserts in {took:?}; the budget allows {allowed}"
    );
    assert!(
        10_000 / inserts >= 50,
        "10,000 documents took {inserts} insert commands: under 50 documents each"
    );
    println!(
        "2,000 concurrent requests: 10,000 documents in {inserts} insert commands over {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_cache_reads_the_database_once() {
    let env = [("CACHE_FRESH_MS", "600000"), ("CACHE_STALE_MS", "600000")];
    let (_redis, mongo, pods) = cold_cluster(1, &env).await;

    let (outcomes, finds) = mongo
        .commands_during("find", burst(&pods[0].url("/api/data"), 1000))
        .await;

    assert!(outcomes.iter().all(|o| o.status == 200));
    let seed = outcomes[0].body["reads"][0].as_str().unwrap().to_string();
    assert!(outcomes.iter().all(|o| o.body["reads"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r == &seed)));
    assert_eq!(
        finds, 1,
        "1,000 cold requests (5,000 reads) should cost one query"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_share_one_refresh_through_redis() {
    let env = [("CACHE_FRESH_MS", "600000"), ("CACHE_STALE_MS", "600000")];
    let (_redis, mongo, pods) = cold_cluster(3, &env).await;

    let (outcomes, finds) = mongo.commands_during("find", bursts(&pods, 300)).await;

    let failed = outcomes.iter().find(|o| o.status != 200);
    assert!(failed.is_none(), "every request stored: {failed:?}");
    assert_eq!(
        finds, 1,
        "three cold pods should share one query through the Redis lock"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sustained_load_stays_within_the_command_budget() {
    const BUDGET: i64 = 10;
    let (_redis, mongo, sluice) = spawn_app(&[
        ("DB_COMMAND_BUDGET", "10"),
        ("CACHE_FRESH_MS", "200"),
        ("CACHE_EMPTY_MS", "50"),
    ])
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(&sluice.url("/api/data"), 200, Arc::clone(&stop));
    // Let the budget settle on its Redis-counted share, then measure a window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, started) = (budgeted_commands(&mongo).await, Instant::now());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (after, window) = (budgeted_commands(&mongo).await, started.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes = load.await.unwrap();

    let used = after - before;
    let allowed = (BUDGET as f64 * window.as_secs_f64()).ceil() as i64 + 1;
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    println!("{used} commands in {window:?} (allowed {allowed}); {ok} requests stored");
    assert!(
        used <= allowed,
        "{used} commands in {window:?} exceed the budget of {BUDGET}/s"
    );
    assert!(
        used >= BUDGET * 3,
        "the load should have used the budget, used {used}"
    );
    assert!(
        ok > 1000,
        "requests kept succeeding within the budget: {ok}"
    );
    assert_nothing_lost(&mongo, &outcomes).await;
}

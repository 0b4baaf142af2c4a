//! Promises that hold while the world moves: pods join, leave and lose Redis, Redis
//! restarts empty or slows down, the database stalls, a cold cluster meets a burst,
//! clients retry. Each test runs real servers; several sluice instances share one Redis
//! and one MongoDB-wire server, as pods do.
//!
//! The budget tolerance, stated once. Commands are counted from `serverStatus` in windows
//! of about a second (longer when the database stalled and answered no sample); a window
//! of span `s` may hold `round(budget × s)` plus:
//! - [`EDGE`]: the cluster's tokens are one period apart, so a window holds one more than
//!   its span when a token falls on each of its boundaries;
//! - [`RESTART`]: a Redis restarted empty (or flushed) loses the schedule, and with it the
//!   one token that was promised and not yet due (`src/budget.rs`);
//! - `budget / BUDGET_FALLBACK_PODS` for each pod cut off from Redis while others reach
//!   it (README, "The budget while pods come and go");
//! - after a database stall, the commands it received and ran on resuming: at most the
//!   in-flight cap (`FLUSH_CONCURRENCY + 1`) per pod.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const BUDGET: i64 = 20;
const EDGE: i64 = 1;
const RESTART: i64 = 1;
/// Commands one pod may have sent and not seen answered, at the default
/// `FLUSH_CONCURRENCY` of 1 (`sluice::store::in_flight_cap`).
const IN_FLIGHT: i64 = 2;

/// Loads each pod with its own closed loop of `users` clients until `stop`.
fn load_all(
    pods: &[&Sluice],
    users: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Outcome>>> {
    pods.iter()
        .map(|p| load(&p.url("/api/data"), users, Arc::clone(stop)))
        .collect()
}

async fn gather(loads: Vec<tokio::task::JoinHandle<Vec<Outcome>>>) -> Vec<Outcome> {
    let mut all = Vec::new();
    for l in loads {
        all.extend(l.await.unwrap());
    }
    all
}

/// The budget's share of a window: `round(BUDGET × span)`.
fn budget_for(w: &Window) -> i64 {
    (BUDGET as f64 * w.span.as_secs_f64()).round() as i64
}

/// The windows holding more than their budget plus `extra(window)`.
fn over(windows: &[Window], extra: impl Fn(&Window) -> i64) -> Vec<Window> {
    windows
        .iter()
        .filter(|w| w.commands > budget_for(w) + extra(w))
        .copied()
        .collect()
}

fn counts(windows: &[Window]) -> Vec<i64> {
    windows.iter().map(|w| w.commands).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_every_second_while_pods_come_and_go() {
    let mut redis = Redis::start();
    let mongo = Mongo::start().await;
    let budget = BUDGET.to_string();
    let fallback = 5;
    let env = [
        ("DB_COMMAND_BUDGET", budget.as_str()),
        ("BUDGET_FALLBACK_PODS", "5"),
        ("CACHE_FRESH_MS", "500"),
    ];
    // Pod C reaches Redis through a relay the test can cut.
    let relay = Relay::start(redis.port).await;
    let a = Sluice::start(&mongo.uri(), &redis.url(), &env).await;
    let b = Sluice::start(&mongo.uri(), &redis.url(), &env).await;
    let c = Sluice::start(&mongo.uri(), &relay.url(), &env).await;
    for pod in [&a, &b, &c] {
        pod.wait_ready().await;
    }
    let meter = CommandMeter::start(mongo.port);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = load_all(&[&a, &b, &c], 40, &stop);
    let mut events: Vec<(&str, Instant)> = vec![("steady", Instant::now())];
    let pause = || tokio::time::sleep(Duration::from_secs(3));

    pause().await;
    events.push(("FLUSHALL", Instant::now()));
    assert_eq!(redis.command(&["FLUSHALL"]), "+OK");
    pause().await;
    events.push(("pod c cut off from redis for 6 s", Instant::now()));
    relay.set_stalled(true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    relay.set_stalled(false);
    pause().await;
    events.push((
        "redis killed, pod d started, redis back empty 3 s later",
        Instant::now(),
    ));
    redis.stop();
    let d = Sluice::start(&mongo.uri(), &redis.url(), &env).await;
    d.wait_ready().await;
    loads.extend(load_all(&[&d], 40, &stop));
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart();
    pause().await;
    events.push(("pod b stopped (SIGTERM's path)", Instant::now()));
    drop(b);
    pause().await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = gather(loads).await;
    let windows = meter.windows();
    drop(meter);

    // Whatever happens, at most one pod is cut off while the others reach Redis; with
    // every pod cut off (Redis killed) their fallback shares add up to at most 4 × 4.
    let extra = BUDGET / fallback + EDGE + RESTART;
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    let mut statuses = std::collections::BTreeMap::new();
    for o in &outcomes {
        *statuses.entry(o.status).or_insert(0) += 1;
    }
    let mut worst = Vec::new();
    for (i, (name, from)) in events.iter().enumerate() {
        let to = events.get(i + 1).map(|e| e.1);
        let during = windows
            .iter()
            .filter(|w| w.end > *from && to.is_none_or(|t| w.end <= t))
            .max_by_key(|w| w.commands - budget_for(w));
        if let Some(w) = during {
            worst.push(format!(
                "{name}: worst window {} commands in {:.2} s",
                w.commands,
                w.span.as_secs_f64()
            ));
        }
    }
    println!(
        "churn: budget {BUDGET}, allowed {BUDGET} + {extra} a second; {}; commands per window {:?}; answers by status {statuses:?} (0: no answer, e.g. the stopped pod's port)",
        worst.join("; "),
        counts(&windows),
    );
    assert!(windows.len() >= 20, "the meter sampled: {windows:?}");
    let too_many = over(&windows, |_| extra);
    assert!(
        too_many.is_empty(),
        "windows over budget {BUDGET} + {extra}: {too_many:?}"
    );
    assert!(ok > 1000, "the load was real: {ok} requests stored");
    let checked = assert_nothing_lost(&mongo, &outcomes).await;
    let stored = mongo.stored_count().await;
    assert!(
        stored as usize >= checked,
        "every 200's documents stored once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_stall_longer_than_the_timeout_releases_no_burst() {
    let budget = BUDGET.to_string();
    let (_redis, mongo, sluice) = spawn_app(&[
        ("DB_COMMAND_BUDGET", budget.as_str()),
        ("DB_TIMEOUT_MS", "2000"),
        ("WRITE_TIMEOUT_MS", "3000"),
    ])
    .await;
    let meter = CommandMeter::start(mongo.port);
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load_all(&[&sluice], 50, &stop);
    tokio::time::sleep(Duration::from_secs(3)).await;
    mongo.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let resumed = Instant::now();
    mongo.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = gather(loads).await;
    let windows = meter.windows();
    drop(meter);

    // The window that ends after the resume holds what the stall released: at most the
    // pod's in-flight cap, on top of the budget for its span.
    let extra = EDGE + IN_FLIGHT;
    let after: Vec<&Window> = windows.iter().filter(|w| w.end > resumed).collect();
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    println!(
        "stall of 8 s: commands per window {:?}; after the resume {:?}; allowed {BUDGET} + {extra}; {ok} of {} requests stored",
        counts(&windows),
        after
            .iter()
            .map(|w| format!("{} in {:.2} s", w.commands, w.span.as_secs_f64()))
            .collect::<Vec<_>>(),
        outcomes.len()
    );
    assert!(
        after.len() >= 4,
        "the meter sampled after the stall: {windows:?}"
    );
    let too_many = over(&windows, |_| extra);
    assert!(too_many.is_empty(), "{too_many:?}");
    assert!(ok > 100, "the load was real: {ok}");
    assert!(
        outcomes.iter().any(|o| o.status == 503),
        "the stall was longer than DB_TIMEOUT_MS, so some requests must have been shed"
    );
    assert_nothing_lost(&mongo, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_redis_keeps_the_budget_and_the_answers() {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    let budget = BUDGET.to_string();
    let relay = Relay::start(redis.port).await;
    let env = [
        ("DB_COMMAND_BUDGET", budget.as_str()),
        ("BUDGET_FALLBACK_PODS", "5"),
        ("REDIS_TIMEOUT_MS", "200"),
    ];
    let direct = Sluice::start(&mongo.uri(), &redis.url(), &env).await;
    let slowed = Sluice::start(&mongo.uri(), &relay.url(), &env).await;
    for pod in [&direct, &slowed] {
        pod.wait_ready().await;
    }
    let meter = CommandMeter::start(mongo.port);
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load_all(&[&direct, &slowed], 30, &stop);
    // A round trip 100 ms longer: below REDIS_TIMEOUT_MS, so the slowed pod stays on the
    // cluster limiter.
    relay.set_delay(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let below = slowed.status().await["budget"]["mode"].clone();
    // 300 ms longer: above it, so the slowed pod spends from its fallback.
    relay.set_delay(Duration::from_millis(150));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let above = slowed.status().await["budget"]["mode"].clone();
    stop.store(true, Ordering::Relaxed);
    let outcomes = gather(loads).await;
    let windows = meter.windows();
    drop(meter);

    let extra = BUDGET / 5 + EDGE;
    let slow_answers = outcomes.iter().filter(|o| o.status != 200).count();
    println!(
        "slow redis: mode {below} below the timeout, {above} above it; commands per window {:?} (allowed {BUDGET} + {extra}); {slow_answers} of {} requests not 200",
        counts(&windows),
        outcomes.len()
    );
    assert_eq!(below, "cluster");
    assert_eq!(above, "fallback");
    let too_many = over(&windows, |_| extra);
    assert!(too_many.is_empty(), "{too_many:?}");
    assert!(
        outcomes.iter().all(|o| o.status == 200),
        "Redis is only a cache: {:?}",
        outcomes.iter().find(|o| o.status != 200)
    );
    assert_nothing_lost(&mongo, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn short_database_pulses_are_slow_not_dead() {
    let budget = BUDGET.to_string();
    let (_redis, mongo, sluice) = spawn_app(&[
        ("DB_COMMAND_BUDGET", budget.as_str()),
        ("DB_TIMEOUT_MS", "3000"),
        ("WRITE_TIMEOUT_MS", "5000"),
    ])
    .await;
    let meter = CommandMeter::start(mongo.port);
    let stop = Arc::new(AtomicBool::new(false));
    let loads = load_all(&[&sluice], 50, &stop);
    let probes = {
        let (url, stop) = (sluice.url("/readyz"), Arc::clone(&stop));
        tokio::spawn(async move {
            let client = client();
            let mut failed = 0;
            let mut probed = 0;
            while !stop.load(Ordering::Relaxed) {
                probed += 1;
                if get(&client, &url).await.status != 200 {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (probed, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pulses = 5;
    for _ in 0..pulses {
        mongo.signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        mongo.signal(Signal::SIGCONT);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = gather(loads).await;
    let (probed, not_ready) = probes.await.unwrap();
    let windows = meter.windows();
    drop(meter);

    let shed_database = sluice
        .metric("sluice_shed_total{reason=\"database\"}")
        .await
        .unwrap_or_else(|| "missing".into());
    // One pod: the edges, and what it had in flight when each stall began.
    let extra = EDGE + IN_FLIGHT;
    let too_many = over(&windows, |_| extra);
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    println!(
        "pulses: {pulses} stalls of 1.5 s; {ok} of {} requests stored; shed as database unavailable: {shed_database}; /readyz failures {not_ready} of {probed}; commands per window {:?} (budget {BUDGET} + {extra})",
        outcomes.len(),
        counts(&windows),
    );
    assert_eq!(not_ready, 0, "/readyz failed during short stalls");
    assert_eq!(
        shed_database, "0",
        "requests were shed as 'database unavailable'"
    );
    assert!(
        outcomes.iter().all(|o| o.status == 200),
        "{:?}",
        outcomes.iter().find(|o| o.status != 200)
    );
    assert!(too_many.is_empty(), "{too_many:?}");
    assert_nothing_lost(&mongo, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_cluster_meets_a_burst_with_one_query_and_no_read_failures() {
    let env = [("QUEUE_CAPACITY", "20"), ("ENQUEUE_TIMEOUT_MS", "50")];
    let (_redis, mongo, pods) = cold_cluster(3, &env).await;
    let (outcomes, finds) = mongo.commands_during("find", bursts(&pods, 400)).await;
    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap();
    let shed = outcomes.iter().filter(|o| o.status == 503).count();
    println!(
        "cold burst: {} requests, {shed} shed by the tiny queue, {finds} queries, slowest {slowest:?}",
        outcomes.len()
    );
    assert!(finds <= 2, "{finds} queries for a cold cluster");
    assert!(
        slowest < Duration::from_secs(3),
        "a read waited past DB_TIMEOUT_MS: {slowest:?}"
    );
    for o in outcomes.iter().filter(|o| o.status != 200) {
        let message = o.body["message"].as_str().unwrap_or_default();
        assert!(
            o.status == 503 && message.contains("queue"),
            "not a queue shed: {o:?}"
        );
    }
    assert_nothing_lost(&mongo, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_idempotency_key_stores_nothing_twice() {
    let (_redis, mongo, sluice) =
        spawn_app(&[("WRITE_TIMEOUT_MS", "1000"), ("DB_TIMEOUT_MS", "3000")]).await;
    let client = client();
    let with_key = |key: &str| {
        client
            .get(sluice.url("/api/data"))
            .header("Idempotency-Key", key)
    };

    let first = send(with_key("\"order-0001-first\"")).await;
    let again = send(with_key("order-0001-first")).await;
    assert_eq!((first.status, again.status), (200, 200));
    assert_eq!(
        first.write_ids(),
        again.write_ids(),
        "a replay answers the same ids"
    );
    let stored = mongo.stored_among(&first.write_ids()).await;
    assert_eq!(stored, 5);

    let bad = send(with_key("no spaces allowed")).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body["message"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));

    // The same key on two pods at once: the second is told the first is in flight.
    let slow_env = [("BATCH_LINGER_MS", "1000")];
    let slow = Sluice::start(&mongo.uri(), &_redis.url(), &slow_env).await;
    let other = Sluice::start(&mongo.uri(), &_redis.url(), &slow_env).await;
    slow.wait_ready().await;
    other.wait_ready().await;
    let request = |pod: &Sluice| {
        client
            .get(pod.url("/api/data"))
            .header("Idempotency-Key", "order-0002-twice")
    };
    let (x, y) = tokio::join!(send(request(&slow)), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(request(&other)).await
    });
    assert_eq!((x.status, y.status), (200, 409), "{y:?}");
    // A replay once the first is answered: the same ids, nothing stored twice, and no
    // error anywhere (a duplicate key is proof of storage).
    let replay = send(request(&other)).await;
    assert_eq!(replay.status, 200, "{replay:?}");
    assert_eq!(replay.write_ids(), x.write_ids());
    assert_eq!(mongo.stored_among(&x.write_ids()).await, 5);
    for pod in [&slow, &other] {
        let errors = pod
            .metric("sluice_db_commands_total{op=\"insert\",outcome=\"error\"}")
            .await;
        assert_eq!(errors.as_deref(), Some("0"), "a replay counted as an error");
    }
    let duplicates = other
        .metric("sluice_db_commands_total{op=\"insert\",outcome=\"duplicate\"}")
        .await;
    assert_eq!(duplicates.as_deref(), Some("1"), "the replay's insert");

    // A stall answers 503 although the insert may still land; the replay stores nothing
    // twice and answers the same ids.
    mongo.signal(Signal::SIGSTOP);
    let stalled = send(with_key("order-0003-stalled")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    mongo.signal(Signal::SIGCONT);
    assert_eq!(stalled.status, 503, "{stalled:?}");
    sluice.wait_ready().await;
    let replay = send(with_key("order-0003-stalled")).await;
    assert_eq!(replay.status, 200, "{replay:?}");
    let stored = mongo.stored_among(&replay.write_ids()).await;
    assert_eq!(stored, 5, "the replay stored its 5 documents exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_loses_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_redis, _mongo, sluice) = spawn_app(&[
        ("WRITE_PROGRESS_TIMEOUT_MS", "2000"),
        ("MAX_CONNECTIONS", "1"),
    ])
    .await;
    // The readiness probe's connection may still hold the only slot for a moment: connect
    // until sluice answers this client with a 200 head, not the over-cap 503.
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            // A small receive buffer, as a slow mobile client's would be: the stall comes soon.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut stream = socket
                .connect(([127, 0, 0, 1], sluice.port).into())
                .await
                .unwrap();
            stream
                .write_all(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.unwrap();
            if &head == b"HTTP/1.1 200" {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut stream = connected
        .await
        .expect("the readiness probe's slot was never freed");
    // Pipelined requests for a large answer, a few at a time (sluice reads a head only
    // when it wants the next request), never reading the answers: the socket buffers
    // fill and sluice's writes stop making progress.
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(50);
        while started.elapsed() < Duration::from_secs(15) {
            if stream.write_all(&chunk).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = client();
    let held = get(&client, &sluice.url("/healthz")).await;
    // Refused: a 503, or a reset when the refusal closes the socket under the request.
    assert_ne!(held.status, 200, "the stuck client holds the only slot");
    let freed = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if get(&client, &sluice.url("/healthz")).await.status == 200 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot was never freed"
        );
    };
    let cut = writer.await.unwrap();
    println!(
        "a client that never read was cut off after {cut:?}; its slot was free after {freed:?}"
    );
    assert!(cut < Duration::from_secs(10), "its connection stayed open");
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_that_fail_after_the_writes_are_stored_still_answer_200() {
    // Nothing stays fresh or stale: every read must refresh, and gives up after 1 s.
    let (redis, mongo, sluice) = spawn_app(&[
        ("CACHE_FRESH_MS", "1"),
        ("CACHE_STALE_MS", "1"),
        ("DB_TIMEOUT_MS", "1000"),
    ])
    .await;
    let client = client();
    let url = sluice.url("/api/data");
    let first = get(&client, &url).await;
    assert_eq!(first.status, 200);
    let known = get(&client, &url).await;
    assert!(known.body["reads"][0].is_string(), "{known:?}");

    // Another pod holds the refresh lock and never shares a value: this pod's reads wait
    // for it past their deadline, while the database stores the writes as usual.
    let lock = redis.command(&[
        "SET",
        "sluice:lock:first-write",
        "another-pod:0",
        "PX",
        "10000",
    ]);
    assert_eq!(lock, "+OK");
    let during = get(&client, &url).await;

    assert!(
        during.latency >= Duration::from_secs(1),
        "the reads did not wait out their deadline, so this test showed nothing: {during:?}"
    );
    assert_eq!(
        during.status, 200,
        "its documents were stored: a 503 would invite a retry that stores them twice: {during:?}"
    );
    assert_eq!(mongo.stored_among(&during.write_ids()).await, 5);
    // It answers the last first write the pod found, which is still the first write
    // (documents are never deleted).
    assert_eq!(during.body["reads"], known.body["reads"]);
}

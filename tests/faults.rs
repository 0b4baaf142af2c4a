//! Faults a client must survive: a 200 always means stored; a failing dependency makes
//! sluice degrade, never hang; overload gets a fast 503 with `Retry-After`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Short timeouts so an outage shows within seconds: a request waits at most about
/// WRITE_TIMEOUT_MS (+ one DB_TIMEOUT_MS attempt) before its 503.
const FAST_FAIL: &[(&str, &str)] = &[("DB_TIMEOUT_MS", "1000"), ("WRITE_TIMEOUT_MS", "2000")];
/// Longest any answer may take in these tests; the client gives up at 10 s.
const BOUNDED: Duration = Duration::from_secs(5);

fn between(outcomes: &[Outcome], from: Instant, to: Instant) -> Vec<&Outcome> {
    outcomes
        .iter()
        .filter(|o| o.at >= from && o.at < to)
        .collect()
}

/// Keeps `users` clients busy until `body` returns, then checks what every client saw.
async fn under_load<F, Fut>(url: String, users: usize, body: F) -> (Vec<Outcome>, Fut::Output)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future,
{
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(&url, users, Arc::clone(&stop));
    let out = body().await;
    stop.store(true, Ordering::Relaxed);
    (load.await.unwrap(), out)
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_never_started_still_serves() {
    let mongo = Mongo::start().await;
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let sluice = Sluice::start(&mongo.uri(), &nowhere, &[("BUDGET_FALLBACK_PODS", "3")]).await;
    sluice.wait_ready().await;

    let outcomes = burst(&sluice.url("/api/data"), 50).await;
    assert!(outcomes
        .iter()
        .all(|o| o.status == 200 && o.latency < BOUNDED));
    assert_nothing_lost(&mongo, &outcomes).await;
    let status = sluice.status().await;
    assert_eq!(status["l2"]["connected"], false);
    assert_eq!(status["budget"]["mode"], "fallback");
    let fallback = status["budget"]["fallback_commands_per_second"]
        .as_f64()
        .unwrap();
    assert!((fallback - 50.0 / 3.0).abs() < 0.01, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_started_while_redis_is_down_joins_it_when_it_comes_up() {
    let mut redis = Redis::start();
    redis.stop();
    let (mongo, env) = (Mongo::start().await, [("CACHE_FRESH_MS", "300")]);
    // The binary, so its log can be read.
    let sluice = Sluice::binary(&mongo.uri(), &redis.url(), &env);
    sluice.wait_ready().await;
    let (outcomes, joined_after) = under_load(sluice.url("/api/data"), 10, || async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let down = sluice.status().await;
        assert_eq!(down["budget"]["mode"], "fallback", "{down}");
        redis.restart();
        let up_at = Instant::now();
        loop {
            let up = sluice.status().await;
            if up["l2"]["connected"] == true && up["budget"]["mode"] == "cluster" {
                break up_at.elapsed();
            }
            assert!(
                up_at.elapsed() < Duration::from_secs(10),
                "still not using redis 10 s after it came up: {up}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The pod's commands now take their tokens from the schedule in Redis.
    let schedule = redis.command(&["EXISTS", "sluice:budget:next"]);
    println!("joined redis {joined_after:?} after it came up; schedule key: {schedule}");
    // The reconnect policy retries every 500 ms; the budget asks Redis again within
    // CLUSTER_RETRY (1 s) of its last failure: 2 s covers both with room for the load.
    assert!(joined_after < Duration::from_secs(2), "{joined_after:?}");
    // RedisWatch samples the connection every 250 ms, so its line comes up to one period
    // after the status showed the connection, and the test may get here first: wait four
    // periods for it.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !sluice.log().contains("connected to redis") {
        assert!(
            Instant::now() < deadline,
            "no 'connected to redis' in the log 1 s after the status showed the connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(outcomes.iter().all(|o| o.status == 200), "Redis is a cache");
    assert_nothing_lost(&mongo, &outcomes).await;
}

/// Redis's clock stepped back (an NTP correction) leaves the command schedule far ahead
/// of it: the pods start it again from now rather than wait out the step.
#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_far_ahead_of_redis_clock_does_not_stop_the_database() {
    let (redis, mongo, sluice) = spawn_app(&[]).await;
    // Redis runs on this machine, on this clock: an hour ahead of it.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_secs(3600);
    let set = redis.command(&[
        "SET",
        "sluice:budget:next",
        &ahead.as_micros().to_string(),
        "PX",
        "3600000",
    ]);
    assert_eq!(set, "+OK");
    let outcomes = burst(&sluice.url("/api/data"), 10).await;
    assert!(
        outcomes
            .iter()
            .all(|o| o.status == 200 && o.latency < BOUNDED),
        "{:?}",
        outcomes.iter().map(|o| o.status).collect::<Vec<_>>()
    );
    assert_nothing_lost(&mongo, &outcomes).await;
    // The schedule is back beside the clock: it expires within a period or two.
    let ttl = redis.command(&["PTTL", "sluice:budget:next"]);
    let ttl: i64 = ttl.trim_start_matches(':').parse().unwrap();
    assert!(ttl < 5_000, "the schedule still lies {ttl} ms ahead");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_crash_degrades_then_recovers() {
    let (mut redis, mongo, sluice) = spawn_app(&[("CACHE_FRESH_MS", "300")]).await;
    let (outcomes, ()) = under_load(sluice.url("/api/data"), 20, || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis.stop();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let down = sluice.status().await;
        assert_eq!(down["l2"]["connected"], false);
        assert_eq!(down["budget"]["mode"], "fallback");
        redis.restart();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let up = sluice.status().await;
            if up["l2"]["connected"] == true && up["budget"]["mode"] == "cluster" {
                break;
            }
            assert!(Instant::now() < until, "tiers did not come back: {up}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let failed: Vec<_> = outcomes.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.is_empty(),
        "Redis is only a cache; {} requests failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(outcomes.iter().all(|o| o.latency < BOUNDED));
    assert_nothing_lost(&mongo, &outcomes).await;
}

/// Takes the database away (crash or stall) under load and brings it back; every client
/// gets an answer in bounded time, service recovers by itself, and nothing acknowledged
/// is lost.
async fn database_outage(stall: bool) {
    let (_redis, mut mongo, sluice) = spawn_app(FAST_FAIL).await;
    let (outcomes, (down_at, up_at, recovered_at)) =
        under_load(sluice.url("/api/data"), 50, || async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let down_at = Instant::now();
            if stall {
                mongo.signal(Signal::SIGSTOP);
            } else {
                mongo.kill();
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            // The outage is the database's, shared by every pod: the pod's own readiness
            // (the readinessProbe) keeps it in the load balancer, /readyz reports it.
            let client = client();
            let pod = get(&client, &sluice.url("/readyz/pod")).await;
            let service = get(&client, &sluice.url("/readyz")).await;
            assert_eq!(
                (pod.status, service.status),
                (200, 503),
                "/readyz/pod {pod:?}, /readyz {service:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            let up_at = Instant::now();
            if stall {
                mongo.signal(Signal::SIGCONT);
            } else {
                mongo.restart().await;
            }
            let until = Instant::now() + Duration::from_secs(20);
            let recovered_at = loop {
                if get(&client, &sluice.url("/api/data")).await.status == 200 {
                    break Instant::now();
                }
                assert!(Instant::now() < until, "did not recover:\n{}", sluice.log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            (down_at, up_at, recovered_at)
        })
        .await;

    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap();
    assert!(slowest < BOUNDED, "a request waited {slowest:?}");
    // Asked 3 s into the outage and answered before the database came back: a request
    // sent a moment before SIGCONT may be served after it, and rightly get 200 (seen
    // once: sent before `up_at`, answered 200 in 48 ms).
    let during: Vec<_> = between(&outcomes, down_at + Duration::from_secs(3), up_at)
        .into_iter()
        .filter(|o| o.at + o.latency < up_at)
        .collect();
    assert!(
        !during.is_empty() && during.iter().all(|o| o.status == 503 && o.retry_after),
        "while the database is away, requests get 503 + Retry-After: {:?}",
        during.iter().find(|o| o.status != 503)
    );
    let after = between(
        &outcomes,
        recovered_at + Duration::from_millis(500),
        Instant::now(),
    );
    assert!(
        after.iter().filter(|o| o.status == 200).count() > after.len() / 2,
        "service recovered"
    );
    let checked = assert_nothing_lost(&mongo, &outcomes).await;
    println!(
        "{} outage: {} requests, {} answered 503 fast, {checked} acknowledged documents all stored, recovered {:?} after return",
        if stall { "stall" } else { "crash" },
        outcomes.len(),
        outcomes.iter().filter(|o| o.status == 503).count(),
        recovered_at - up_at,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn database_crash_sheds_fast_and_loses_nothing() {
    database_outage(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_stall_sheds_fast_and_loses_nothing() {
    database_outage(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_sheds_with_retry_after() {
    // One request per batch, one batch at a time, two commands a second: the queue of
    // one fills at once.
    let (_redis, mongo, sluice) = spawn_app(&[
        ("QUEUE_CAPACITY", "1"),
        ("ENQUEUE_TIMEOUT_MS", "10"),
        ("BATCH_MAX_DOCS", "5"),
        ("FLUSH_CONCURRENCY", "1"),
        ("DB_COMMAND_BUDGET", "2"),
    ])
    .await;
    let outcomes = burst(&sluice.url("/api/data"), 60).await;
    let shed: Vec<_> = outcomes.iter().filter(|o| o.status == 503).collect();
    assert!(
        shed.iter().all(|o| o.retry_after),
        "every 503 carries Retry-After"
    );
    // Requests that did get into the queue may still outlive WRITE_TIMEOUT_MS behind
    // the 2/s budget: those are 503s too, but not the fast queue-full kind.
    let queue_full: Vec<_> = shed
        .iter()
        .filter(|o| {
            o.body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("queue is full")
        })
        .collect();
    assert!(!queue_full.is_empty(), "a full queue sheds");
    assert!(
        queue_full
            .iter()
            .all(|o| o.latency < Duration::from_secs(1)),
        "queue-full answers are fast"
    );
    assert!(outcomes.iter().any(|o| o.status == 200));
    assert!(outcomes.iter().all(|o| o.status == 200 || o.status == 503));
    assert_nothing_lost(&mongo, &outcomes).await;
    let shed = sluice
        .metric("sluice_shed_total{reason=\"queue_full\"}")
        .await;
    assert_eq!(shed, Some(queue_full.len().to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_drains_and_loses_nothing() {
    let (_redis, mongo, mut sluice) = spawn_binary(&[("DRAIN_TIMEOUT_SECS", "10")]).await;
    let (outcomes, exit) = under_load(sluice.url("/api/data"), 100, || async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sent = Instant::now();
        sluice.process().signal(Signal::SIGTERM);
        let status = sluice.process().exited(Duration::from_secs(12)).await;
        (status, sent.elapsed())
    })
    .await;
    let (status, took) = exit;
    let status = status.expect("sluice exits after SIGTERM");
    assert!(
        status.success(),
        "clean exit, got {status:?}:\n{}",
        sluice.log()
    );
    assert!(
        took < Duration::from_secs(10),
        "exit within the drain timeout, took {took:?}"
    );
    assert!(sluice.log().contains("write queue drained"));
    // Every request whose head sluice read got 200. sluice logs, as it exits, how many
    // /api/data requests it answered and with what; they must be exactly the 200s the
    // clients saw. So the requests that got no answer (connection errors) were never
    // read: sent after the listener closed, or racing the close of an idle keep-alive
    // connection (hyper closes those on shutdown; the client sees an incomplete
    // message). The client alone cannot tell those from a dropped request; the server's
    // own count can.
    let seen_ok = outcomes.iter().filter(|o| o.status == 200).count();
    let log = sluice.log();
    let exit_line = log
        .lines()
        .find(|l| l.contains("shutdown complete"))
        .unwrap_or_default();
    let logged = |field: &str| -> usize {
        exit_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in the shutdown line: {exit_line}"))
    };
    assert_eq!(
        logged("data_other"),
        0,
        "sluice refused requests while draining"
    );
    assert_eq!(
        logged("data_ok"),
        seen_ok,
        "sluice answered 200s its clients never saw"
    );
    let refused = outcomes.iter().find(|o| o.status != 200 && o.status != 0);
    assert!(refused.is_none(), "answered but not 200: {refused:?}");
    let unanswered = outcomes.iter().filter(|o| o.status == 0).count();
    println!("SIGTERM: {seen_ok} answered 200, as sluice counted; {unanswered} connection errors, never read by sluice");
    let checked = assert_nothing_lost(&mongo, &outcomes).await;
    assert!(checked > 100, "the load was real: {checked} documents");
    println!("SIGTERM under load: exited in {took:?}; {checked} acknowledged documents all stored");
}

/// An SRE paged at night greps the log for the `X-Request-Id` a client reported: a
/// request sluice failed is warned about with that id, whatever made it fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_request_is_warned_about_with_its_request_id() {
    let (_redis, mongo, sluice) = spawn_binary(FAST_FAIL).await;
    let client = client();
    let mut n = 0;
    // Requests, each with an id of its own, until one is answered `status`: its id.
    let mut first_answered = async |status: u16, prefix: &str, what: &str| {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            n += 1;
            let id = format!("{prefix}-{n}");
            let request = client
                .get(sluice.url("/api/data"))
                .header("X-Request-Id", &id);
            if send(request).await.status == status {
                return id;
            }
            assert!(Instant::now() < until, "no {status} {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    mongo.signal(Signal::SIGSTOP);
    let failed = first_answered(503, "night-page", "while the database was stopped").await;
    mongo.signal(Signal::SIGCONT);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let log = sluice.log();
        if log
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&failed))
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "no warning names the failed request {failed}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A request that did not fail is not warned about.
    let calm = first_answered(200, "calm", "after the database came back").await;
    let log = sluice.log();
    assert!(!log.lines().any(|l| l.contains(&calm)), "{log}");
}

/// An error body is sluice's own words, never the driver's: a failed server selection
/// names the topology, the database's address and port, which tell a client nothing it
/// can act on and tell anyone probing how sluice is deployed. The database is killed
/// under load, so requests fail the ways an outage makes them (writes in flight when it
/// died, the fast-fail once it is known down, the stats count); every answer but a 200
/// is checked, and the cause is still in the log under a request's id.
///
/// Server selection gives up after 300 ms here, well inside a command's 1 s limit, so
/// the writes in flight at the kill fail with the driver's own error (topology, address,
/// port) rather than sluice's timeout: the words that once reached the body.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_crash_is_answered_in_sluices_words() {
    let redis = Redis::start();
    let mut mongo = Mongo::start().await;
    let uri = format!("{}?serverSelectionTimeoutMS=300", mongo.uri());
    let sluice = Sluice::binary(&uri, &redis.url(), FAST_FAIL);
    sluice.wait_ready().await;
    let port = mongo.port.to_string();
    let (mut outcomes, probes) = under_load(sluice.url("/api/data"), 20, || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        mongo.kill();
        // The other route that asks the database, while it is away.
        let client = client();
        let mut probes = Vec::new();
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            probes.push(get(&client, &sluice.url("/api/stats")).await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        probes
    })
    .await;
    outcomes.extend(probes);

    // Status 0 is the client's own error (no answer), not a body sluice wrote.
    let answered: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.status != 0 && o.status != 200)
        .collect();
    let driver_words = [
        port.as_str(),
        "127.0.0.1",
        "localhost",
        "Server selection",
        "topology",
        "Kind:",
        "mongodb",
        "os error",
        "I/O",
    ];
    for o in &answered {
        let body = o.body.to_string();
        let leaked = driver_words
            .iter()
            .find(|w| body.to_lowercase().contains(&w.to_lowercase()));
        assert!(leaked.is_none(), "{leaked:?} in a public body: {o:?}");
    }
    let unavailable: Vec<&&Outcome> = answered.iter().filter(|o| o.status == 503).collect();
    assert!(
        !unavailable.is_empty(),
        "the database was killed, yet nothing was answered 503"
    );
    // Each 503 still says what happened, in sluice's words: what, then when to retry.
    let messages: Vec<&str> = unavailable
        .iter()
        .map(|o| {
            assert_eq!(o.body["status"], "error", "{o:?}");
            o.body["message"].as_str().unwrap_or_default()
        })
        .collect();
    assert!(
        messages.iter().all(|m| m.contains("; retry ")),
        "a 503 message is sluice's own: {messages:?}"
    );

    // The cause is not lost: the driver's words are in a warning that names a request.
    let log = sluice.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request failed"))
        .collect();
    let with_cause = warned
        .iter()
        .find(|l| l.contains("request_id") && l.contains(&format!("127.0.0.1:{port}")));
    assert!(
        with_cause.is_some(),
        "no warning carries the driver's cause:\n{}",
        warned.join("\n")
    );
    let mut messages = messages;
    messages.sort_unstable();
    messages.dedup();
    println!(
        "{} answers not 200 ({} of them 503), none in the driver's words: {messages:?}",
        answered.len(),
        unavailable.len(),
    );
    println!("the cause, in the log: {}", with_cause.unwrap());
}

/// Redis requires a password (k8s/redis/auth.yaml; every test Redis does too). A pod
/// whose `REDIS_URL` lacks it reaches the port but runs no command: it treats Redis as
/// down (L1 and MongoDB serve, the budget falls back), never crashes, and nothing it
/// logs or answers contains the password.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_url_without_the_password_is_redis_down() {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    let no_password = format!("redis://127.0.0.1:{}", redis.port);
    let env = [("BUDGET_FALLBACK_PODS", "3"), ("LOG_LEVEL", "debug")];
    let mut sluice = Sluice::binary(&mongo.uri(), &no_password, &env);
    sluice.wait_ready().await;

    let (outcomes, status) = under_load(sluice.url("/api/data"), 10, || async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        sluice.status().await
    })
    .await;
    assert!(!outcomes.is_empty());
    let failed: Vec<_> = outcomes.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.is_empty(),
        "Redis is a cache; {} requests failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(outcomes.iter().all(|o| o.latency < BOUNDED));
    assert_nothing_lost(&mongo, &outcomes).await;
    assert_eq!(status["budget"]["mode"], "fallback", "{status}");
    assert_eq!(status["l2"]["connected"], false, "{status}");

    // Nothing reached Redis: the shared read and the budget's schedule were never written.
    assert_eq!(redis.command(&["DBSIZE"]), ":0");
    assert!(
        sluice.process().exited(Duration::ZERO).await.is_none(),
        "sluice exited:\n{}",
        sluice.log()
    );
    let client = client();
    let mut shown = status.to_string();
    for path in ["/healthz", "/readyz", "/api/stats", "/metrics"] {
        shown += &format!("{:?}", get(&client, &sluice.url(path)).await);
    }
    let log = sluice.log();
    assert!(!shown.contains(REDIS_PASSWORD), "shown: {shown}");
    assert!(!log.contains(REDIS_PASSWORD), "logged:\n{log}");
    assert!(
        log.contains("redis refused the login"),
        "the cause is said at the default level:\n{log}"
    );
}

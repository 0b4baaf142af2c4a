//! The HTTP contract of ASSESSMENT.md, as a client sees it.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bson::doc;
use common::*;
use serde_json::Value;

fn is_iso8601(s: &str) -> bool {
    bson::DateTime::parse_rfc3339_str(s).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn data_stores_exactly_what_it_answers() {
    let (_redis, mongo, sluice) = spawn_app(&[]).await;
    let client = client();

    let first = get(&client, &sluice.url("/api/data")).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["status"], "success");
    assert!(is_iso8601(first.body["timestamp"].as_str().unwrap()));
    let writes = first.write_ids();
    assert_eq!(writes.len(), 5);
    assert_eq!(
        writes.iter().collect::<HashSet<_>>().len(),
        5,
        "ids are distinct"
    );
    assert!(writes
        .iter()
        .all(|id| id.len() == 24 && id.chars().all(|c| c.is_ascii_hexdigit())));
    let reads = first.body["reads"].as_array().unwrap();
    assert_eq!(reads.len(), 5);

    // Each written id is stored with the exact shape of ASSESSMENT.md.
    let records = mongo.records().await;
    for (i, id) in writes.iter().enumerate() {
        let oid = bson::oid::ObjectId::parse_str(id).unwrap();
        let d = records
            .find_one(doc! {"_id": oid})
            .await
            .unwrap()
            .expect("stored");
        let mut keys: Vec<_> = d.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["_id", "index", "payload", "timestamp", "type"]);
        assert_eq!(d.get_str("type").unwrap(), "write");
        assert_eq!(d.get_i32("index").unwrap(), i as i32);
        let payload = d.get_str("payload").unwrap();
        assert_eq!(payload.len(), 512);
        assert!(payload.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(d.get_datetime("timestamp").is_ok());
    }

    // Once documents exist, reads are ids of stored `type: "write"` documents.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let later = get(&client, &sluice.url("/api/data")).await;
    assert_eq!(later.status, 200);
    for read in later.body["reads"].as_array().unwrap() {
        let id = read
            .as_str()
            .expect("a read id once the collection has documents");
        let oid = bson::oid::ObjectId::parse_str(id).unwrap();
        let d = records
            .find_one(doc! {"_id": oid})
            .await
            .unwrap()
            .expect("read id is stored");
        assert_eq!(d.get_str("type").unwrap(), "write");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_collection_reads_are_null() {
    // The first request's documents wait 2 s for company before their insert, while its
    // reads run at once: they see the collection still empty.
    let (_redis, _mongo, sluice) =
        spawn_app(&[("BATCH_LINGER_MS", "2000"), ("WRITE_TIMEOUT_MS", "6000")]).await;
    let o = get(&client(), &sluice.url("/api/data")).await;
    assert_eq!(o.status, 200);
    assert_eq!(
        o.body["reads"],
        serde_json::json!([null, null, null, null, null])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_stats_status_and_metrics() {
    let (_redis, _mongo, sluice) = spawn_app(&[]).await;
    let client = client();

    let health = get(&client, &sluice.url("/healthz")).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "ok");
    assert!(is_iso8601(health.body["timestamp"].as_str().unwrap()));

    let ready = get(&client, &sluice.url("/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["status"], "ready");
    let pod_ready = get(&client, &sluice.url("/readyz/pod")).await;
    assert_eq!(pod_ready.status, 200);
    assert_eq!(pod_ready.body["status"], "ready");

    for _ in 0..3 {
        assert_eq!(get(&client, &sluice.url("/api/data")).await.status, 200);
    }
    // The count comes from metadata and is cached for a second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let stats = get(&client, &sluice.url("/api/stats")).await;
    assert_eq!(stats.status, 200);
    assert_eq!(stats.body["total_documents"].as_u64(), Some(15));
    assert!(is_iso8601(stats.body["timestamp"].as_str().unwrap()));

    let status = sluice.status().await;
    for path in [
        "/l1/hits",
        "/l1/misses",
        "/l2/hits",
        "/l2/misses",
        "/l2/errors",
        "/refreshes/from_database",
        "/writer/queue_depth",
        "/writer/batches_flushed",
        "/writer/documents_per_batch_avg",
        "/writer/flush_latency_ms_avg",
        "/budget/fallback_commands_per_second",
        "/budget/commands_sent",
        "/budget/in_flight",
        "/budget/in_flight_cap",
    ] {
        assert!(
            status.pointer(path).is_some(),
            "status lacks {path}: {status}"
        );
    }
    assert_eq!(status.pointer("/writer/documents_stored").unwrap(), 15);
    assert_eq!(status.pointer("/budget/mode").unwrap(), "cluster");

    let metrics = reqwest::get(sluice.url("/metrics")).await.unwrap();
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    for name in [
        "sluice_http_requests_total{route=\"/api/data\",status=\"200\"} 3",
        "sluice_http_request_duration_seconds_bucket",
        "sluice_writer_batch_documents_count",
        "sluice_cache_hits_total",
        "sluice_db_command_budget 50",
        "sluice_budget_mode{mode=\"cluster\"} 1",
        "sluice_db_commands_sent_total{op=\"insert\"}",
        "sluice_shed_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_and_wrong_methods_get_json_errors() {
    let (_redis, _mongo, sluice) = spawn_app(&[]).await;
    let client = client();

    let missing = get(&client, &sluice.url("/nope")).await;
    assert_eq!(missing.status, 404);
    assert!(missing.body["message"].as_str().unwrap().contains("/nope"));

    let post = client.post(sluice.url("/api/data")).send().await.unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET");
    let body: Value = post.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("POST"));

    // HEAD would have to write to answer honestly, so /api/data refuses it; the other
    // routes take it.
    let head = client.head(sluice.url("/api/data")).send().await.unwrap();
    assert_eq!(head.status(), 405);
    assert_eq!(head.headers()["allow"], "GET");
    let head = client.head(sluice.url("/healthz")).send().await.unwrap();
    assert_eq!(head.status(), 200);
}

#[test]
fn bad_configuration_exits_2_naming_the_setting() {
    for (key, value, named) in [
        ("APP_PORT", "eighty", "APP_PORT"),
        ("MONGO_URI", "postgres://db/x", "MONGO_URI"),
        ("REDIS_URL", "http://redis", "REDIS_URL"),
        ("DB_COMMAND_BUDGET", "0", "DB_COMMAND_BUDGET"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT"),
        ("CACHE_STALE_MS", "10", "CACHE_STALE_MS"),
    ] {
        let (code, stderr) = run_to_exit(&[(key, value)]);
        assert_eq!(code, Some(2), "{key}={value}: {stderr}");
        assert!(
            stderr.contains(named),
            "{key}={value} should name {named}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_are_never_logged_or_shown() {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    let mongo_uri = format!(
        "mongodb://admin:Mongo-S3cret@127.0.0.1:{}/assessmentdb?authSource=admin",
        mongo.port
    );
    // Not the test Redis' password (REDIS_PASSWORD), so its login fails too.
    let redis_url = format!("redis://:Redis-S3cret@127.0.0.1:{}", redis.port);
    assert_ne!(REDIS_PASSWORD, "Redis-S3cret");
    let sluice = Sluice::binary(&mongo_uri, &redis_url, &[("LOG_LEVEL", "debug")]);
    let client = client();
    // Neither server takes these credentials, so both logins fail: the paths that log URLs.
    for path in ["/healthz", "/readyz", "/api/data", "/api/stats", "/metrics"] {
        let _ = get(&client, &sluice.url(path)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let status = sluice.status().await.to_string();
    assert!(
        status.contains("admin:***@"),
        "the URI is shown redacted: {status}"
    );
    let log = sluice.log();
    for secret in ["Mongo-S3cret", "Redis-S3cret"] {
        assert!(!status.contains(secret), "status shows {secret}: {status}");
        assert!(!log.contains(secret), "log shows {secret}:\n{log}");
    }
}

/// A container runtime may start sluice with a soft open-files limit of 1,024 and a far
/// higher hard one; sluice raises the soft limit itself, or accepts fail at about a
/// thousand clients.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("stderr");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .env_clear()
        .env("APP_PORT", free_port().to_string())
        .env("APP_HOST", "127.0.0.1")
        .env("MONGO_URI", "mongodb://127.0.0.1:1/x")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            use nix::sys::resource::{setrlimit, Resource};
            setrlimit(Resource::RLIMIT_NOFILE, 256, 4096).map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("sluice listening") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("raised the open-files limit"), "{text}");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["4096", "4096"], "{open_files}");
}

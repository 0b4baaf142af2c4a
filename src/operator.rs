//! The operator subcommands: `sluice check` and `sluice status`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::budget::Budget;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::status::Status;
use crate::store::Store;

/// Connects to both dependencies with the given settings and prints what it found.
/// Returns whether both answered.
pub async fn check(config: &Config) -> Result<bool, ConfigError> {
    let metrics = Arc::new(Metrics::new());
    let budget = Budget::local(config.budget.db_command_budget, 1, Arc::clone(&metrics));
    let store = Store::connect(&config.store, metrics).await?;
    println!("MongoDB  {}", config.store.mongo_uri);
    let mongo_ok = match store.server_version(budget.acquire().await).await {
        Ok(version) => {
            println!("  answered: server version {version}");
            match store
                .estimated_count(budget.acquire().await, store.timeout())
                .await
            {
                Ok(n) => println!(
                    "  {}.{}: about {n} documents",
                    store.database_name(),
                    crate::store::COLLECTION
                ),
                Err(e) => println!("  could not count documents: {e}"),
            }
            true
        }
        Err(e) => {
            println!("  NOT answering: {e}");
            false
        }
    };

    println!("Redis    {}", config.shared.redis_url);
    let shared = Shared::connect(&config.shared).map_err(|e| {
        ConfigError(format!(
            "REDIS_URL ({}) is not usable: {e}",
            config.shared.redis_url
        ))
    })?;
    let redis_ok = shared.wait_connected(config.store.db_timeout).await;
    if redis_ok {
        match shared.ping().await {
            Ok(pong) => println!("  answered: {pong}"),
            Err(e) => println!("  connected, but PING failed: {e}"),
        }
    } else {
        println!("  NOT answering (sluice would serve from L1 and MongoDB)");
    }
    shared.quit().await;
    Ok(mongo_ok && redis_ok)
}

/// Fetches a running instance's [`Status`] and prints it readably, or as JSON with the
/// hit ratios added (what the lab's report reads).
pub async fn status(url: &str, json: bool) -> Result<(), String> {
    let status = fetch_status(url).await?;
    if json {
        let mut value = serde_json::to_value(&status).expect("serializable");
        value["l1"]["hit_ratio"] = serde_json::json!(status.l1.hit_ratio());
        value["l2"]["hit_ratio"] = serde_json::json!(status.l2.hit_ratio());
        println!("{value}");
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// `GET {url}/api/cache/status`, parsed into the one [`Status`] type.
pub async fn fetch_status(url: &str) -> Result<Status, String> {
    let uri: hyper::Uri = format!("{}/api/cache/status", url.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("SLUICE_URL ({url}) is not a URL: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri.clone()))
        .await
        .map_err(|_| format!("{uri} did not answer within 5 s"))?
        .map_err(|e| format!("{uri}: {e}"))?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{uri}: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{uri} did not answer a sluice status: {e}"))
}

/// Sections as headings, fields as aligned `name  value` lines, plus hit ratios.
fn render(s: &Status) -> String {
    let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.2}%", 100.0 * r));
    let value = s.l1.value.as_ref().map_or("-".to_string(), |v| {
        format!(
            "{} ({} ms old)",
            v.id.as_deref().unwrap_or("empty"),
            v.age_ms
        )
    });
    let rows: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "pod",
            vec![("name", s.pod.clone()), ("mode", s.mode.clone())],
        ),
        (
            "l1",
            vec![
                ("hits", s.l1.hits.to_string()),
                ("misses", s.l1.misses.to_string()),
                ("hit_ratio", ratio(s.l1.hit_ratio())),
                ("value", value),
            ],
        ),
        (
            "l2",
            vec![
                ("hits", s.l2.hits.to_string()),
                ("misses", s.l2.misses.to_string()),
                ("errors", s.l2.errors.to_string()),
                ("hit_ratio", ratio(s.l2.hit_ratio())),
                ("connected", s.l2.connected.to_string()),
                ("url", s.l2.url.clone()),
            ],
        ),
        (
            "refreshes",
            vec![
                ("from_database", s.refreshes.from_database.to_string()),
                ("from_shared", s.refreshes.from_shared.to_string()),
                ("errors", s.refreshes.errors.to_string()),
            ],
        ),
        (
            "writer",
            vec![
                (
                    "queue",
                    format!("{} / {}", s.writer.queue_depth, s.writer.queue_capacity),
                ),
                ("batches_flushed", s.writer.batches_flushed.to_string()),
                ("documents_stored", s.writer.documents_stored.to_string()),
                (
                    "documents_per_batch_avg",
                    format!("{:.2}", s.writer.documents_per_batch_avg),
                ),
                (
                    "flush_latency_ms_avg",
                    format!("{:.2}", s.writer.flush_latency_ms_avg),
                ),
                ("retries", s.writer.retries.to_string()),
                ("failed_requests", s.writer.failed_requests.to_string()),
            ],
        ),
        (
            "budget",
            vec![
                (
                    "cluster_per_second",
                    s.budget.cluster_commands_per_second.to_string(),
                ),
                (
                    "fallback_per_second",
                    format!("{:.2}", s.budget.fallback_commands_per_second),
                ),
                ("mode", s.budget.mode.clone()),
                ("commands_sent", s.budget.commands_sent.to_string()),
                (
                    "in_flight",
                    format!("{} of {}", s.budget.in_flight, s.budget.in_flight_cap),
                ),
            ],
        ),
        (
            "database",
            vec![
                ("healthy", s.database.healthy.to_string()),
                ("uri", s.database.uri.clone()),
            ],
        ),
    ];
    let mut out = String::new();
    for (section, fields) in rows {
        out.push_str(section);
        out.push('\n');
        for (name, value) in fields {
            out.push_str(&format!("  {name:<28} {value}\n"));
        }
    }
    out
}

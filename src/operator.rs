//! The operator subcommands: `sluice check` and `sluice status`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::budget::Budget;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::store::Store;
use crate::telemetry::redact;

/// Connects to both dependencies with the given settings and prints what it found.
/// Returns whether both answered.
pub async fn check(config: &Config) -> Result<bool, crate::config::ConfigError> {
    let metrics = std::sync::Arc::new(Metrics::new());
    let budget = Budget::new(config.db_command_budget, 1, std::sync::Arc::clone(&metrics));
    let store = Store::connect(config, metrics).await?;
    println!("MongoDB  {}", redact(&config.mongo_uri));
    let mongo_ok = match store.server_version(budget.acquire().await).await {
        Ok(version) => {
            println!("  answered: server version {version}");
            match store.estimated_count(budget.acquire().await).await {
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

    println!("Redis    {}", redact(&config.redis_url));
    let shared = Shared::connect(&config.redis_url, config.redis_timeout())
        .map_err(|e| crate::config::ConfigError(format!("REDIS_URL is not usable: {e}")))?;
    let redis_ok = shared.wait_connected(config.db_timeout()).await;
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

/// Fetches `/api/cache/status` from a running instance and prints it readably.
pub async fn status(url: &str) -> Result<(), String> {
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
    let status: Value =
        serde_json::from_slice(&body).map_err(|e| format!("{uri} did not answer JSON: {e}"))?;
    print!("{}", render(&status));
    Ok(())
}

/// Sections as headings, fields as aligned `name  value` lines, plus hit ratios.
fn render(status: &Value) -> String {
    let mut out = String::new();
    let Some(sections) = status.as_object() else {
        return format!("{status}\n");
    };
    for (name, value) in sections {
        match value.as_object() {
            Some(fields) => {
                out.push_str(&format!("{name}\n"));
                for (field, v) in fields {
                    out.push_str(&format!("  {field:<28} {}\n", scalar(v)));
                }
                if let (Some(h), Some(m)) = (fields.get("hits"), fields.get("misses")) {
                    let (h, m) = (h.as_f64().unwrap_or(0.0), m.as_f64().unwrap_or(0.0));
                    if h + m > 0.0 {
                        out.push_str(&format!(
                            "  {:<28} {:.2}%\n",
                            "hit_ratio",
                            100.0 * h / (h + m)
                        ));
                    }
                }
            }
            None => out.push_str(&format!("{name:<30} {}\n", scalar(value))),
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

//! The operational endpoints: probes, stats, the status page and metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, StatusCode};
use serde_json::{json, Value};

use super::{json_response, ApiError, Response};
use crate::record::timestamp;
use crate::startup::App;
use crate::telemetry::redact;

/// How long `/api/stats` serves one count before asking MongoDB again.
const STATS_TTL: Duration = Duration::from_secs(1);

/// Liveness: answers as long as the process can serve HTTP; touches no dependency, so a
/// database outage never gets healthy pods restarted.
pub fn healthz() -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "status": "ok", "timestamp": timestamp() }),
    )
}

/// Readiness: ready while MongoDB answers and the pod is not draining. Redis down is
/// reported but does not make the pod unready: sluice serves without it.
pub fn readyz(app: &App) -> Response {
    let redis = if app.shared.is_connected() {
        "up"
    } else {
        "down"
    };
    let (status, body) = if app.draining.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "not ready", "reason": "draining for shutdown", "redis": redis }),
        )
    } else if !app.store.is_healthy() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "not ready", "reason": "mongodb is not answering", "redis": redis }),
        )
    } else {
        (
            StatusCode::OK,
            json!({ "status": "ready", "mongodb": "up", "redis": redis }),
        )
    };
    let mut body = body;
    body["timestamp"] = Value::String(timestamp());
    json_response(status, &body)
}

/// The collection's size from metadata, at most one command per second per pod.
pub async fn stats(app: &Arc<App>) -> Result<Response, ApiError> {
    // Holding the lock across the query makes concurrent callers share one command.
    let mut cached = app.stats.lock().await;
    let count = match *cached {
        Some((at, count)) if at.elapsed() < STATS_TTL => count,
        _ => {
            let token = app.budget.acquire().await;
            let count = app
                .store
                .estimated_count(token)
                .await
                .map_err(|_| ApiError::DatabaseDown)?;
            *cached = Some((Instant::now(), count));
            count
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({ "total_documents": count, "timestamp": timestamp() }),
    ))
}

pub async fn cache_status(app: &Arc<App>) -> Response {
    let m = &app.metrics;
    let tier = |t: &str| {
        json!({
            "hits": m.cache_hits.with_label_values(&[t]).get(),
            "misses": m.cache_misses.with_label_values(&[t]).get(),
            "errors": m.cache_errors.with_label_values(&[t]).get(),
        })
    };
    let cached = app.reads.peek().await;
    let batches = m.batch_documents.get_sample_count();
    let per_batch = if batches == 0 {
        0.0
    } else {
        m.batch_documents.get_sample_sum() / batches as f64
    };
    let flushes = m.flush_seconds.get_sample_count();
    let flush_ms = if flushes == 0 {
        0.0
    } else {
        1000.0 * m.flush_seconds.get_sample_sum() / flushes as f64
    };
    let mut l1 = tier("l1");
    l1["value"] = json!(cached.map(|c| json!({
        "id": c.id.map(|id| id.to_hex()),
        "age_ms": u64::try_from(c.age().as_millis()).unwrap_or(u64::MAX),
    })));
    let mut l2 = tier("l2");
    l2["connected"] = json!(app.shared.is_connected());
    l2["url"] = json!(redact(&app.config.redis_url));
    json_response(
        StatusCode::OK,
        &json!({
            "pod": app.pod,
            "mode": if app.config.naive_mode { "naive" } else { "coalescing" },
            "l1": l1,
            "l2": l2,
            "refreshes": {
                "from_database": m.refreshes.with_label_values(&["database"]).get(),
                "from_shared": m.refreshes.with_label_values(&["shared"]).get(),
                "errors": m.refreshes.with_label_values(&["error"]).get(),
            },
            "writer": {
                "queue_depth": app.writer.queue_depth(),
                "queue_capacity": app.writer.queue_capacity(),
                "batches_flushed": batches,
                "documents_stored": m.documents_stored.get(),
                "documents_per_batch_avg": per_batch,
                "flush_latency_ms_avg": flush_ms,
                "retries": m.write_retries.get(),
                "failed_requests": m.write_failures.get(),
            },
            "budget": {
                "cluster_commands_per_second": app.budget.cluster_rate(),
                "pod_share_per_second": app.budget.share(),
                "used_last_second": m.budget_used.get(),
                "live_pods": app.budget.live_pods(),
                "pods_counted_by": if app.budget.pods_from_redis() { "redis" } else { "fallback" },
            },
            "database": {
                "healthy": app.store.is_healthy(),
                "uri": redact(&app.config.mongo_uri),
            },
            "timestamp": timestamp(),
        }),
    )
}

pub fn metrics(app: &App) -> Response {
    let queue_depth = i64::try_from(app.writer.queue_depth()).unwrap_or(i64::MAX);
    app.metrics.queue_depth.set(queue_depth);
    let mut response = hyper::Response::new(Full::new(Bytes::from(app.metrics.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

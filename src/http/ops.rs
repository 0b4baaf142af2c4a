//! The operational endpoints: probes, stats, metrics and the OpenAPI document. (`/api/cache/status` is the
//! [`Status`](crate::status::Status) type, serialized by the router.)

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, StatusCode};
use serde_json::json;

use super::{json_response, ApiError, Response};
use crate::app::App;
use crate::record::timestamp;

/// Liveness: answers as long as the process can serve HTTP; touches no dependency, so a
/// database outage never gets healthy pods restarted.
pub fn healthz() -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "status": "ok", "timestamp": timestamp() }),
    )
}

/// The service's readiness, for operators and load tests: ready while MongoDB answers and
/// the pod is not draining. Redis down is reported but does not make the pod unready:
/// sluice serves without it.
pub fn readyz(app: &App) -> Response {
    let redis = if app.health.redis_up() { "up" } else { "down" };
    match app.health.readiness() {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({ "status": "ready", "mongodb": "up", "redis": redis, "timestamp": timestamp() }),
        ),
        Err(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "not ready", "reason": reason, "redis": redis, "timestamp": timestamp() }),
        ),
    }
}

/// The pod's own readiness, for the load balancer: answering (so listening, start-up
/// done) and not draining. It asks no dependency, on purpose: the database is shared, so
/// a check on it fails on every pod at once, the Service loses every endpoint, and the
/// clients get the load balancer's bare 503 instead of sluice's cached reads and its
/// 503s with `Retry-After`. The database's state is in `/readyz` and `sluice_db_up`.
pub fn pod_readyz(app: &App) -> Response {
    if app.health.is_draining() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "not ready", "reason": "draining for shutdown", "timestamp": timestamp() }),
        )
    } else {
        json_response(
            StatusCode::OK,
            &json!({ "status": "ready", "timestamp": timestamp() }),
        )
    }
}

pub async fn stats(app: &Arc<App>) -> Result<Response, ApiError> {
    let count = app
        .stats
        .total_documents()
        .await
        .map_err(ApiError::DatabaseFailed)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "total_documents": count, "timestamp": timestamp() }),
    ))
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

/// The API's OpenAPI document (`api/openapi.json`), built into the binary so the
/// document served is always the one this build was tested against.
pub fn openapi() -> Response {
    const DOCUMENT: &str = include_str!("../../api/openapi.json");
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(DOCUMENT.as_bytes())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

//! HTTP: one `match` on method and path, handlers as plain async functions.
//!
//! Every request is counted and timed by route and status here, once, so handlers stay
//! about their own work. Every answer carries an `X-Request-Id`: the client's own when it
//! sent a usable one, else one made here. A request sluice fails (a 5xx) is warned about
//! here with that id and the failure's cause, at most ten lines a second (each says how
//! many were left out before it); the client's body never carries the cause. At
//! `LOG_LEVEL=debug` the request also runs inside a span that holds the id, so what is
//! logged while serving it carries it too. Not at info: the work that logs (loads,
//! flushes) runs in tasks of its own, outside any request, so at info the span would
//! carry nothing and still cost CPU on every request.

mod data;
mod error;
mod naive;
mod ops;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{header, Method, Request, StatusCode};
use serde::Serialize;
use tracing::Instrument;

pub use data::DataAnswer;
pub use error::ApiError;

use crate::app::App;
use crate::telemetry::Sampler;

pub type Response = hyper::Response<Full<Bytes>>;

/// Longer request targets are refused with 414 (longer heads still: 431, by hyper).
const MAX_URI_LEN: usize = 8 * 1024;
const REQUEST_ID: &str = "x-request-id";
/// A client's request id is kept if it is this long at most and visible ASCII.
const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Debug, Clone, Copy)]
enum Route {
    Health,
    Ready,
    PodReady,
    Data,
    Stats,
    CacheStatus,
    Metrics,
    OpenApi,
    Unknown,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/healthz" => Route::Health,
            "/readyz" => Route::Ready,
            "/readyz/pod" => Route::PodReady,
            "/api/data" => Route::Data,
            "/api/stats" => Route::Stats,
            "/api/cache/status" => Route::CacheStatus,
            "/metrics" => Route::Metrics,
            "/openapi.json" => Route::OpenApi,
            _ => Route::Unknown,
        }
    }

    /// The metrics label: a fixed set, so unknown paths cannot blow up cardinality.
    fn label(self) -> &'static str {
        match self {
            Route::Health => "/healthz",
            Route::Ready => "/readyz",
            Route::PodReady => "/readyz/pod",
            Route::Data => "/api/data",
            Route::Stats => "/api/stats",
            Route::CacheStatus => "/api/cache/status",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Unknown => "other",
        }
    }

    /// The methods the route answers. `/api/data` writes, so it takes no `HEAD`: a
    /// `HEAD` must not change anything, and answering it without writing would answer
    /// with ids that were never stored.
    fn allow(self) -> &'static str {
        match self {
            Route::Data => "GET",
            _ => "GET, HEAD",
        }
    }
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response {
    let started = Instant::now();
    let route = Route::of(req.uri().path());
    let request_id = request_id(&req);
    let span = tracing::debug_span!("request", id = %request_id.to_str().unwrap_or("-"));
    let mut response = match dispatch(app, &req, route).instrument(span).await {
        Ok(response) => response,
        Err(e) => {
            if e.is_server_side() {
                warn_failed(route, &request_id, &e);
            }
            e.into_response(app)
        }
    };
    response.headers_mut().insert(REQUEST_ID, request_id);
    let status = response.status();
    let labels = [route.label(), status.as_str()];
    app.metrics.http_requests.with_label_values(&labels).inc();
    app.metrics
        .http_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Warnings about failed requests, at most this many a second per process.
static FAILED_REQUEST_WARNINGS: Sampler = Sampler::new(10);

/// A warning, with the request's id, for a request sluice failed (a 5xx), sampled: the
/// line carries how many were left out before it, and since when (Unix seconds). Sheds
/// (a full queue, a draining pod) are warned about too: the client got a 503 either way.
/// This line is the only place a failure's cause (the driver's own words, which may name
/// the database's addresses) is written: the client's body has sluice's words only, and
/// the request id it got leads here.
fn warn_failed(route: Route, request_id: &HeaderValue, e: &ApiError) {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(left_out) = FAILED_REQUEST_WARNINGS.admit(now_s) {
        tracing::warn!(
            request_id = request_id.to_str().unwrap_or("-"),
            route = route.label(),
            error = %e.message(),
            cause = e.cause().as_deref().unwrap_or("-"),
            left_out = left_out.count,
            left_out_since = left_out.since_s,
            "request failed"
        );
    }
}

/// The client's `X-Request-Id` if it is usable (1-128 visible ASCII characters), else a
/// new one.
fn request_id(req: &Request<Incoming>) -> HeaderValue {
    req.headers()
        .get(REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= MAX_REQUEST_ID_LEN
                && b.iter().all(|c| (0x21..=0x7e).contains(c))
        })
        .cloned()
        .unwrap_or_else(|| {
            let id = format!("{:032x}", rand::random::<u128>());
            HeaderValue::from_str(&id).expect("hex is a valid header value")
        })
}

async fn dispatch(
    app: &Arc<App>,
    req: &Request<Incoming>,
    route: Route,
) -> Result<Response, ApiError> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_LEN {
        return Err(ApiError::UriTooLong(MAX_URI_LEN));
    }
    if let Route::Unknown = route {
        return Err(ApiError::NotFound(req.uri().path().to_string()));
    }
    let allowed = req.method() == Method::GET
        || (req.method() == Method::HEAD && route.allow().contains("HEAD"));
    if !allowed {
        return Err(ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            allow: route.allow(),
        });
    }
    match route {
        Route::Health => Ok(ops::healthz()),
        Route::Ready => Ok(ops::readyz(app)),
        Route::PodReady => Ok(ops::pod_readyz(app)),
        Route::Data => match &app.naive {
            Some(naive) => naive::handle(naive).await,
            None => data::handle(app, req).await,
        },
        Route::Stats => ops::stats(app).await,
        Route::CacheStatus => Ok(json_response(StatusCode::OK, &app.status().await)),
        Route::Metrics => Ok(ops::metrics(app)),
        Route::OpenApi => Ok(ops::openapi()),
        Route::Unknown => unreachable!("answered above"),
    }
}

pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    // Most answers fit: no regrowing the buffer while serialising.
    let mut bytes = Vec::with_capacity(512);
    serde_json::to_writer(&mut bytes, body).expect("serializable");
    json_body(status, bytes)
}

/// A response carrying `json`, already written.
fn json_body(status: StatusCode, json: Vec<u8>) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

//! HTTP: one `match` on method and path, handlers as plain async functions.
//!
//! Every request is counted and timed by route and status here, once, so handlers stay
//! about their own work.

mod data;
mod error;
mod ops;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use serde::Serialize;

pub use error::ApiError;

use crate::startup::App;

pub type Response = hyper::Response<Full<Bytes>>;

/// Longer request targets are refused with 414 (longer heads still: 431, by hyper).
const MAX_URI_LEN: usize = 8 * 1024;

#[derive(Debug, Clone, Copy)]
enum Route {
    Health,
    Ready,
    Data,
    Stats,
    CacheStatus,
    Metrics,
    Unknown,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/healthz" => Route::Health,
            "/readyz" => Route::Ready,
            "/api/data" => Route::Data,
            "/api/stats" => Route::Stats,
            "/api/cache/status" => Route::CacheStatus,
            "/metrics" => Route::Metrics,
            _ => Route::Unknown,
        }
    }

    /// The metrics label: a fixed set, so unknown paths cannot blow up cardinality.
    fn label(self) -> &'static str {
        match self {
            Route::Health => "/healthz",
            Route::Ready => "/readyz",
            Route::Data => "/api/data",
            Route::Stats => "/api/stats",
            Route::CacheStatus => "/api/cache/status",
            Route::Metrics => "/metrics",
            Route::Unknown => "other",
        }
    }
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response {
    let started = Instant::now();
    let route = Route::of(req.uri().path());
    let response = match dispatch(app, &req, route).await {
        Ok(response) => response,
        Err(e) => e.into_response(&app.metrics),
    };
    let status = response.status();
    let labels = [route.label(), status.as_str()];
    app.metrics.http_requests.with_label_values(&labels).inc();
    app.metrics
        .http_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
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
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::MethodNotAllowed(req.method().to_string()));
    }
    match route {
        Route::Health => Ok(ops::healthz()),
        Route::Ready => Ok(ops::readyz(app)),
        Route::Data => data::handle(app).await,
        Route::Stats => ops::stats(app).await,
        Route::CacheStatus => Ok(ops::cache_status(app).await),
        Route::Metrics => Ok(ops::metrics(app)),
        Route::Unknown => unreachable!("answered above"),
    }
}

pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).expect("serializable");
    let mut response = hyper::Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

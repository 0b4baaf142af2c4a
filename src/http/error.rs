//! Every error a client can see, turned into HTTP in this one place.
//!
//! Each body is JSON with a message. Each 503 carries `Retry-After`, because a 503 here
//! always means "come back shortly": the queue is full, the database is away or the pod
//! is draining, never "this request is wrong". The delay grows with the write queue's
//! fill and is jittered, so thousands of shed clients do not come back in the same
//! second.

use hyper::header::{self, HeaderValue};
use hyper::StatusCode;
use serde_json::json;

use super::{json_response, Response};
use crate::app::App;
use crate::metrics::ShedReason;
use crate::reads::ReadError;
use crate::writes::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {method} is not allowed here; use {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("the request URI is longer than {0} bytes")]
    UriTooLong(usize),
    #[error("the Idempotency-Key header {0}")]
    BadIdempotencyKey(String),
    #[error("a request with this Idempotency-Key is still in flight; retry once it is answered")]
    KeyInFlight,
    #[error("the write queue is full; retry shortly")]
    QueueFull,
    #[error("the database is unavailable; retry shortly")]
    DatabaseDown,
    #[error("the reads did not finish; retry shortly")]
    ReadFailed(#[source] ReadError),
    #[error("documents were not stored; retry shortly")]
    NotStored(#[source] WriteError),
    #[error("the service is shutting down; retry on another instance")]
    ShuttingDown,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::BadIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            ApiError::KeyInFlight => StatusCode::CONFLICT,
            ApiError::QueueFull
            | ApiError::DatabaseDown
            | ApiError::ReadFailed(_)
            | ApiError::NotStored(_)
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `sluice_shed_total` reason, for errors that protect the service.
    fn shed_reason(&self) -> Option<ShedReason> {
        match self {
            ApiError::QueueFull => Some(ShedReason::QueueFull),
            ApiError::DatabaseDown | ApiError::ReadFailed(_) | ApiError::NotStored(_) => {
                Some(ShedReason::Database)
            }
            ApiError::ShuttingDown => Some(ShedReason::ShuttingDown),
            _ => None,
        }
    }

    /// sluice, not the request, is why it failed (a 5xx): worth a warning.
    pub fn is_server_side(&self) -> bool {
        self.status().is_server_error()
    }

    /// The message, with the cause's own words where there is one.
    pub fn message(&self) -> String {
        match std::error::Error::source(self) {
            Some(cause) => format!("{self} ({cause})"),
            None => self.to_string(),
        }
    }

    pub fn into_response(self, app: &App) -> Response {
        let status = self.status();
        let mut response = json_response(
            status,
            &json!({ "status": "error", "message": self.message() }),
        );
        if let Some(reason) = self.shed_reason() {
            app.metrics.shed.get(reason).inc();
            let seconds = retry_after(app.writer.queue_depth(), app.writer.queue_capacity());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// Seconds a shed client should wait: 1 when the queue is empty, up to 4 when it is
/// full, plus up to 2 of jitter.
pub fn retry_after(depth: usize, capacity: usize) -> u64 {
    let fill = depth.saturating_mul(3) / capacity.max(1);
    1 + fill.min(3) as u64 + rand::random_range(0..=2)
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::QueueFull => ApiError::QueueFull,
            WriteError::Closed => ApiError::ShuttingDown,
            e @ (WriteError::NotStored(_) | WriteError::Refused(_) | WriteError::Refusing) => {
                ApiError::NotStored(e)
            }
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        ApiError::ReadFailed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::retry_after;

    #[test]
    fn retry_after_grows_with_the_queue_and_is_spread() {
        let empty: Vec<u64> = (0..200).map(|_| retry_after(0, 100)).collect();
        let full: Vec<u64> = (0..200).map(|_| retry_after(100, 100)).collect();
        assert!(empty.iter().all(|s| (1..=3).contains(s)));
        assert!(full.iter().all(|s| (4..=6).contains(s)));
        assert!(empty.iter().any(|&s| s != empty[0]), "no jitter");
    }
}

//! Every error a client can see, turned into HTTP in this one place.
//!
//! Each body is JSON with a message. Each 503 carries `Retry-After`, because a 503 here
//! always means "come back shortly": the queue is full, the database is away or the pod
//! is draining, never "this request is wrong".

use hyper::{header, StatusCode};
use serde_json::json;

use super::{json_response, Response};
use crate::metrics::Metrics;
use crate::reads::ReadError;
use crate::writes::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {0} is not allowed here; use GET")]
    MethodNotAllowed(String),
    #[error("the request URI is longer than {0} bytes")]
    UriTooLong(usize),
    #[error("the write queue is full; retry shortly")]
    QueueFull,
    #[error("the database is unavailable; retry shortly")]
    DatabaseDown,
    #[error("{0}")]
    NotStored(String),
    #[error("the service is shutting down; retry on another instance")]
    ShuttingDown,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::QueueFull
            | ApiError::DatabaseDown
            | ApiError::NotStored(_)
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `sluice_shed_total` reason, for errors that protect the service.
    fn shed_reason(&self) -> Option<&'static str> {
        match self {
            ApiError::QueueFull => Some("queue_full"),
            ApiError::DatabaseDown | ApiError::NotStored(_) => Some("database"),
            ApiError::ShuttingDown => Some("shutting_down"),
            _ => None,
        }
    }

    pub fn into_response(self, metrics: &Metrics) -> Response {
        let status = self.status();
        let mut response = json_response(
            status,
            &json!({ "status": "error", "message": self.to_string() }),
        );
        if let Some(reason) = self.shed_reason() {
            metrics.shed.with_label_values(&[reason]).inc();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::MethodNotAllowed(_)) {
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        }
        response
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::QueueFull => ApiError::QueueFull,
            WriteError::NotStored(reason) => {
                ApiError::NotStored(format!("documents were not stored: {reason}"))
            }
            WriteError::Closed => ApiError::ShuttingDown,
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(_: ReadError) -> Self {
        ApiError::DatabaseDown
    }
}

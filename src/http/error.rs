//! Every error a client can see, turned into HTTP in this one place.
//!
//! Each body is JSON with a message in sluice's own fixed words: never a cause's text.
//! A cause is the database driver's or the write path's own account (a failed server
//! selection names the topology, its addresses and ports), which tells a client nothing
//! it can act on and tells anyone probing the service how it is deployed; it goes to the
//! "request failed" warning, under the request id the client also got, so an operator
//! can still find it.
//!
//! Each 503 carries `Retry-After`, because a 503 here always means "come back shortly":
//! the queue is full, the database is away or the pod is draining, never "this request
//! is wrong". The delay grows with the write queue's fill and is jittered, so thousands
//! of shed clients do not come back in the same second.

use hyper::header::{self, HeaderValue};
use hyper::StatusCode;
use serde_json::json;

use super::{json_response, Response};
use crate::app::App;
use crate::metrics::ShedReason;
use crate::reads::ReadError;
use crate::store::StoreError;
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
    /// `DatabaseDown` with the store's own error, kept for the log.
    #[error("the database is unavailable; retry shortly")]
    DatabaseFailed(#[source] StoreError),
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
            | ApiError::DatabaseFailed(_)
            | ApiError::ReadFailed(_)
            | ApiError::NotStored(_)
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `sluice_shed_total` reason, for errors that protect the service.
    fn shed_reason(&self) -> Option<ShedReason> {
        match self {
            ApiError::QueueFull => Some(ShedReason::QueueFull),
            ApiError::DatabaseDown
            | ApiError::DatabaseFailed(_)
            | ApiError::ReadFailed(_)
            | ApiError::NotStored(_) => Some(ShedReason::Database),
            ApiError::ShuttingDown => Some(ShedReason::ShuttingDown),
            _ => None,
        }
    }

    /// sluice, not the request, is why it failed (a 5xx): worth a warning.
    pub fn is_server_side(&self) -> bool {
        self.status().is_server_error()
    }

    /// The body's message: this error's own words only, never its cause's (the variants'
    /// `#[error]` texts name no source field, so `Display` is exactly sluice's words).
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The cause chain, outermost first and joined by ": ", for the log only: it may
    /// name the database's addresses and ports. `None` when there is no cause. A level
    /// whose text the one above already quotes (`"database refused the command: {0}"`
    /// over the driver's error) is left out, so the driver's words appear once.
    pub fn cause(&self) -> Option<String> {
        let mut levels: Vec<String> = Vec::new();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let text = e.to_string();
            if !levels.last().is_some_and(|above| above.contains(&text)) {
                levels.push(text);
            }
            next = e.source();
        }
        (!levels.is_empty()).then(|| levels.join(": "))
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
    use super::{retry_after, ApiError};
    use crate::reads::ReadError;
    use crate::store::StoreError;
    use crate::writes::{NotStored, WriteError};

    /// What the driver says when server selection fails: topology, address, port.
    const DRIVER: &str = "Server selection timeout: No available servers. Topology: { Type: \
        Single, Servers: [ { Address: 127.0.0.1:27017, Type: Unknown, Error: Kind: I/O \
        error: Connection refused (os error 111) } ] }";

    #[test]
    fn a_cause_is_logged_never_answered() {
        let read = ApiError::from(ReadError(StoreError::Unavailable(DRIVER.into())));
        let write = ApiError::from(WriteError::NotStored(NotStored::Store(
            StoreError::Unavailable(DRIVER.into()),
        )));
        for (e, words) in [
            (read, "the reads did not finish; retry shortly"),
            (write, "documents were not stored; retry shortly"),
        ] {
            assert_eq!(e.message(), words);
            let cause = e.cause().expect("a cause");
            assert!(cause.contains(DRIVER), "{cause}");
            assert_eq!(cause.matches("Server selection").count(), 1, "{cause}");
        }
        assert_eq!(ApiError::QueueFull.cause(), None);
    }

    #[test]
    fn retry_after_grows_with_the_queue_and_is_spread() {
        let empty: Vec<u64> = (0..200).map(|_| retry_after(0, 100)).collect();
        let full: Vec<u64> = (0..200).map(|_| retry_after(100, 100)).collect();
        assert!(empty.iter().all(|s| (1..=3).contains(s)));
        assert!(full.iter().all(|s| (4..=6).contains(s)));
        assert!(empty.iter().any(|&s| s != empty[0]), "no jitter");
    }
}

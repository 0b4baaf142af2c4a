//! The write path: a bounded channel into one flusher that group-commits.
//!
//! A request hands its 5 documents to [`Writer::submit`] and waits. The flusher
//! (`flusher.rs`) takes the first waiting request, gathers more for `BATCH_LINGER_MS` or
//! until `BATCH_MAX_DOCS` (or the byte cap), then waits for a flush slot and a budget
//! token, *still gathering* while it waits. So at low load a batch leaves almost at once,
//! and when the database budget binds the batches grow instead of the commands
//! multiplying: hundreds of requests share one unordered `insert_many`, sent through a
//! [`Sink`] (`sink.rs`: MongoDB, paid from the budget).
//!
//! A request is answered only once the command holding its documents is acknowledged
//! with the configured write concern (default `w:1, j:true`): a 200 means stored. A
//! failed command is retried with backoff, paying from the budget again; duplicate-key
//! answers count as stored, so a retry never duplicates. A request whose documents are
//! not stored by its deadline (`WRITE_TIMEOUT_MS`) is answered 503; nothing is dropped
//! without its request being told. The queue is bounded (`QUEUE_CAPACITY` requests):
//! past `ENQUEUE_TIMEOUT_MS` of waiting for room, the request is shed with 503.
//!
//! Deadlines are per request, never per batch. Under overload a batch mixes requests
//! that waited long in the queue with fresh ones; the expired ones (and those whose
//! client has gone) are left out before each attempt, and the rest are still sent.
//!
//! While the database refuses whole batches (its disk is full), new requests get a 503
//! at once for [`REFUSING_PAUSE`] after each refusal, and writing resumes by itself when
//! a batch goes through again.
//!
//! Shutdown: when `stop` fires, the queue is closed (new submissions fail at once), every
//! request already in it is flushed, and the flusher returns once the last in-flight
//! insert is answered.

mod flusher;
mod sink;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use bson::RawDocumentBuf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use sink::Sink;

use crate::config::WriteSettings;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// A batch's documents take at most this many bytes, well below MongoDB's 48 MB message
/// limit: above it the driver would split the batch into several commands, each costing
/// the disk a commit, for a single budget token.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("the write queue is full")]
    QueueFull,
    #[error("documents not stored within the write timeout: {0}")]
    NotStored(#[source] NotStored),
    #[error("the database refused the documents: {0}")]
    Refused(#[source] Refused),
    #[error("the database is refusing every write (a full disk?); retry shortly")]
    Refusing,
    #[error("the service is shutting down")]
    Closed,
}

/// Why a request's documents were not stored by its deadline (the log's cause; the
/// client hears only that they were not).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotStored {
    #[error("waited longer than WRITE_TIMEOUT_MS for the insert")]
    Deadline,
    #[error("no budget token before the deadline")]
    NoToken,
    #[error("no attempt had enough time left")]
    NoTimeLeft,
    #[error("the database rejected documents")]
    Rejected,
    #[error(transparent)]
    Store(StoreError),
}

/// Why documents were refused for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    /// The insert answered, naming the document among those it refused.
    #[error("a document was refused for good")]
    Document,
    /// The whole command was refused with an error no retry can fix.
    #[error(transparent)]
    Command(StoreError),
}

/// While the database refuses whole batches (a full disk, say), new requests are answered
/// 503 at once instead of queueing for a deadline they cannot meet. Each refused batch
/// holds the gate shut this long; the first batch after it finds out whether space has
/// come back, so sluice recovers by itself.
pub const REFUSING_PAUSE: Duration = Duration::from_secs(1);

/// When the last whole-batch refusal stops turning requests away.
#[derive(Default)]
struct Gate(std::sync::Mutex<Option<Instant>>);

impl Gate {
    fn shut(&self) {
        *self.0.lock().expect("gate lock") = Some(Instant::now() + REFUSING_PAUSE);
    }

    fn open(&self) {
        *self.0.lock().expect("gate lock") = None;
    }

    fn is_shut(&self) -> bool {
        self.0
            .lock()
            .expect("gate lock")
            .is_some_and(|until| Instant::now() < until)
    }
}

struct Job {
    docs: Vec<RawDocumentBuf>,
    bytes: usize,
    ack: oneshot::Sender<Result<(), WriteError>>,
    deadline: Instant,
}

/// The submitting side; cheap to share.
pub struct Writer {
    tx: mpsc::Sender<Job>,
    gate: Arc<Gate>,
    settings: WriteSettings,
    metrics: Arc<Metrics>,
}

impl Writer {
    /// Creates the queue and the flusher that drains it into `sink`. The flusher runs
    /// until `stop` and the queue is empty; the caller owns (and awaits) its task.
    pub fn start<K: Sink>(
        settings: WriteSettings,
        sink: K,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        metrics
            .queue_capacity
            .set(i64::try_from(settings.queue_capacity).unwrap_or(i64::MAX));
        let gate = Arc::new(Gate::default());
        let task = tokio::spawn(flusher::run(
            rx,
            sink,
            settings,
            Arc::clone(&metrics),
            Arc::clone(&gate),
            stop,
        ));
        let writer = Writer {
            tx,
            gate,
            settings,
            metrics,
        };
        (writer, task)
    }

    /// Queues the documents and waits until they are stored, or until the deadline.
    ///
    /// The wait is bounded here, on the request's side, whatever the flusher is doing:
    /// a request is answered within `WRITE_TIMEOUT_MS` even while its batch is still
    /// waiting for the budget or for a slow database.
    pub async fn submit(&self, docs: Vec<RawDocumentBuf>) -> Result<(), WriteError> {
        if self.gate.is_shut() {
            return Err(WriteError::Refusing);
        }
        let (ack, done) = oneshot::channel();
        let deadline = Instant::now() + self.settings.write_timeout;
        let bytes = docs.iter().map(|d| d.as_bytes().len()).sum();
        let job = Job {
            docs,
            bytes,
            ack,
            deadline,
        };
        self.tx
            .send_timeout(job, self.settings.enqueue_timeout)
            .await
            .map_err(|e| match e {
                mpsc::error::SendTimeoutError::Timeout(_) => WriteError::QueueFull,
                mpsc::error::SendTimeoutError::Closed(_) => WriteError::Closed,
            })?;
        let result = match tokio::time::timeout_at(deadline, done).await {
            Ok(answer) => answer.unwrap_or(Err(WriteError::Closed)),
            Err(_) => Err(WriteError::NotStored(NotStored::Deadline)),
        };
        if matches!(
            result,
            Err(WriteError::NotStored(_) | WriteError::Refused(_))
        ) {
            self.metrics.write_failures.inc();
        }
        result
    }

    /// Requests waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn queue_capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

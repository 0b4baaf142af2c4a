//! The only module that talks to MongoDB.
//!
//! Every method takes a budget [`Token`], so the command cap is enforced by the types
//! rather than by convention. One token buys exactly one command: the driver's retries
//! are off (`retryReads`, `retryWrites`), a batch is capped by bytes below the size at
//! which the driver would split it, and the connection pool is small and bounded, so a
//! reconnect after a timed-out command costs at most one handshake per pooled connection.
//!
//! Every command runs under a time limit: the driver has no socket timeout, and a stalled
//! database (SIGSTOP, a saturated disk) must turn into a fast 503 instead of requests
//! piling up until the client gives up. The limit ends the caller's wait, not the command:
//! a command that reached the server runs when a stalled database resumes. So each
//! command runs in a task of its own that keeps its budget [`Token`] (and with it one of
//! the pod's in-flight slots) until the database answers it, or [`ORPHAN_LIMIT`] passes.
//!
//! The store keeps one health bit. A *slow* database is not a dead one: only a command
//! that got no answer within the full `DB_TIMEOUT_MS`, an I/O error or a failed server
//! selection marks it down, and only once nothing has answered for a whole
//! `DB_TIMEOUT_MS`. A command sent with less time than that (the rest of a
//! request's deadline) that runs out is [`StoreError::Slow`] and leaves the bit alone, so
//! a checkpoint stall does not turn every pod unready at once. `/readyz` and the
//! fast-fail path of `/api/data` read the bit, and [`crate::background::HealthCheck`] keeps it
//! current while no other command runs.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, Document, RawDocumentBuf};
use mongodb::error::{Error as DriverError, ErrorKind};
use mongodb::options::{Acknowledgment, ClientOptions, CollectionOptions, WriteConcern};
use mongodb::{Client, Collection, Database};

use crate::budget::{Budget, Token};
use crate::config::{ConfigError, StoreSettings, WriteAck};
use crate::metrics::{DbOp, DbOutcome, Label as _, Metrics};

pub const DEFAULT_DATABASE: &str = "assessmentdb";
pub const COLLECTION: &str = "records";
/// MongoDB's error code for a duplicate `_id`: on a retry, proof the document is stored.
const DUPLICATE_KEY: i32 = 11000;
/// Connections one pod keeps to the database at most. Each in-flight command holds one;
/// the budget caps those at `FLUSH_CONCURRENCY` + 1 (see [`in_flight_cap`]).
pub const MAX_POOL_SIZE: u32 = 8;
/// How long a command the caller gave up on may still hold its in-flight slot (or
/// `DB_TIMEOUT_MS`, if that is longer). Past it the command is dropped (the driver closes
/// its connection) and its slot freed; a database that answers nothing for this long is
/// down, not stalled, and the slot must not be lost for good to a connection that never
/// answers.
pub const ORPHAN_LIMIT: Duration = Duration::from_secs(30);

/// Commands one pod may have sent and not yet seen answered: one per flush slot, plus one
/// for a read, a count or a ping. No more than the connection pool, which a command
/// would otherwise wait for after it was paid.
pub fn in_flight_cap(flush_concurrency: usize) -> usize {
    (flush_concurrency + 1).min(MAX_POOL_SIZE as usize)
}
/// Error codes that no retry can fix: the document or the command is wrong, or the user
/// may not do it. Retrying them only holds a flush slot until the deadline.
const PERMANENT: &[i32] = &[
    2,     // BadValue
    9,     // FailedToParse
    13,    // Unauthorized
    18,    // AuthenticationFailed
    121,   // DocumentValidationFailure
    10334, // BSONObjectTooLarge
];

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No answer within the full `DB_TIMEOUT_MS`, or no connection: the database is down.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// No answer within a limit shorter than `DB_TIMEOUT_MS`: slow, not known to be down.
    #[error("database did not answer within the {0:?} left")]
    Slow(Duration),
    /// The database answered with an error.
    #[error("database refused the command: {0}")]
    Refused(#[source] DriverError),
}

impl StoreError {
    /// Whether sending the same command again can never succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Refused(e) => error_code(e).is_some_and(|c| PERMANENT.contains(&c)),
            _ => false,
        }
    }
}

/// What one `insert_many` left undone, as positions among the documents it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rejected {
    /// Worth sending again (a transient error, such as a full disk).
    pub retry: Vec<usize>,
    /// Refused for good (validation, authorization).
    pub refused: Vec<usize>,
}

/// The database with the budget that pays for each command: what the read cache asks
/// (a `Source`), the flusher inserts into (a `Sink`) and the naive mode goes straight to.
#[derive(Clone)]
pub struct PaidStore {
    pub store: Arc<Store>,
    pub budget: Arc<Budget>,
}

pub struct Store {
    db: Database,
    records: Collection<RawDocumentBuf>,
    /// The same collection, for queries whose answers are read as documents.
    queries: Collection<Document>,
    timeout: Duration,
    pulse: Arc<Pulse>,
}

/// The health bit and what feeds it, shared with command tasks that outlive their caller
/// (an answer that comes after the caller's limit still proves the database is back).
struct Pulse {
    healthy: AtomicBool,
    /// Milliseconds since `started` of the last answered command.
    last_answer_ms: AtomicU64,
    started: Instant,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Builds the client. It connects lazily, so this fails only on a bad `MONGO_URI`.
    pub async fn connect(
        settings: &StoreSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let uri = &settings.mongo_uri;
        let mut options = ClientOptions::parse(uri.expose()).await.map_err(|e| {
            ConfigError(format!(
                "MONGO_URI ({uri}) is not a usable MongoDB URI: {}",
                e.kind
            ))
        })?;
        let timeout = settings.db_timeout;
        // The driver waits 30 s for a server by default; under load that is a hang.
        options.server_selection_timeout = Some(
            options
                .server_selection_timeout
                .unwrap_or(timeout)
                .min(timeout),
        );
        options.connect_timeout = Some(options.connect_timeout.unwrap_or(timeout));
        // One budget token, one command: a retried read or write would be a second.
        options.retry_reads = Some(false);
        options.retry_writes = Some(false);
        options.max_pool_size = Some(options.max_pool_size.unwrap_or(MAX_POOL_SIZE));
        options.app_name.get_or_insert_with(|| "sluice".into());
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.into());
        let client = Client::with_options(options)
            .map_err(|e| ConfigError(format!("MONGO_URI ({uri}) is not usable: {}", e.kind)))?;
        let w = match &settings.write_concern_w {
            WriteAck::Nodes(n) => Acknowledgment::Nodes(*n),
            WriteAck::Majority => Acknowledgment::Majority,
        };
        let write_concern = WriteConcern::builder()
            .w(w)
            .journal(settings.write_journal)
            .build();
        let db = client.database(&database);
        let records = db.collection_with_options(
            COLLECTION,
            CollectionOptions::builder()
                .write_concern(write_concern)
                .build(),
        );
        Ok(Store {
            queries: db.collection(COLLECTION),
            db,
            records,
            timeout,
            pulse: Arc::new(Pulse {
                healthy: AtomicBool::new(false),
                last_answer_ms: AtomicU64::new(0),
                started: Instant::now(),
                timeout,
                metrics,
            }),
        })
    }

    /// Whether the last command was answered. False until the first one is.
    pub fn is_healthy(&self) -> bool {
        self.pulse.healthy.load(Ordering::Relaxed)
    }

    /// The full time limit of one command (`DB_TIMEOUT_MS`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// Stores `docs[i]` for each `i` in `which` with one unordered `insert_many`, within
    /// `limit` (capped at the store's own timeout), and says which were not stored, as
    /// positions in `which`. A duplicate `_id` is not among them: ids are made before the
    /// first attempt, so a duplicate means an earlier attempt (or an earlier request with
    /// the same idempotency key) stored it.
    pub async fn insert_many(
        &self,
        docs: Arc<[RawDocumentBuf]>,
        which: Vec<usize>,
        paid: Token,
        limit: Duration,
    ) -> Result<Rejected, StoreError> {
        let records = self.records.clone();
        let command = async move {
            records
                .insert_many(which.iter().map(|&i| &docs[i]))
                .ordered(false)
                .await
        };
        match self.run(DbOp::Insert, limit, paid, command).await {
            Ok(_) => Ok(Rejected::default()),
            Err(StoreError::Refused(e)) => match e.kind.as_ref() {
                ErrorKind::InsertMany(failure) if failure.write_concern_error.is_none() => {
                    let mut rejected = Rejected::default();
                    for w in failure.write_errors.iter().flatten() {
                        if w.code == DUPLICATE_KEY {
                            continue;
                        }
                        if PERMANENT.contains(&w.code) {
                            rejected.refused.push(w.index);
                        } else {
                            rejected.retry.push(w.index);
                        }
                    }
                    Ok(rejected)
                }
                _ => Err(StoreError::Refused(e)),
            },
            Err(other) => Err(other),
        }
    }

    /// The read every `/api/data` makes five times: the first `type: "write"` document.
    /// Only its id is fetched, since only the id is returned.
    pub async fn first_write(&self, paid: Token) -> Result<Option<ObjectId>, StoreError> {
        let queries = self.queries.clone();
        let query = async move {
            queries
                .find_one(doc! { "type": "write" })
                .projection(doc! { "_id": 1 })
                .await
        };
        let found = self.run(DbOp::Find, self.timeout, paid, query).await?;
        Ok(found.and_then(|d| d.get_object_id("_id").ok()))
    }

    /// Whether the document `id` is still stored as `type: "write"`. Documents are only
    /// ever appended, so the first one stays first while it exists: this revalidates a
    /// known answer of [`Store::first_write`] by `_id` instead of running the query again,
    /// which some servers answer by reading every match before applying the limit.
    pub async fn still_stored(&self, id: ObjectId, paid: Token) -> Result<bool, StoreError> {
        let queries = self.queries.clone();
        let query = async move {
            queries
                .find_one(doc! { "_id": id, "type": "write" })
                .projection(doc! { "_id": 1 })
                .await
        };
        Ok(self
            .run(DbOp::Find, self.timeout, paid, query)
            .await?
            .is_some())
    }

    /// The collection's size from its metadata: no scan, so it costs no disk reads.
    pub async fn estimated_count(&self, paid: Token, limit: Duration) -> Result<u64, StoreError> {
        let records = self.records.clone();
        let count = async move { records.estimated_document_count().await };
        self.run(DbOp::Count, limit, paid, count).await
    }

    pub async fn ping(&self, paid: Token) -> Result<(), StoreError> {
        self.run_command(DbOp::Ping, paid, doc! { "ping": 1 })
            .await?;
        Ok(())
    }

    fn run_command(
        &self,
        op: DbOp,
        paid: Token,
        command: Document,
    ) -> impl Future<Output = Result<Document, StoreError>> + '_ {
        let db = self.db.clone();
        self.run(op, self.timeout, paid, async move {
            db.run_command(command).await
        })
    }

    /// The server's version string, for the `check` subcommand.
    pub async fn server_version(&self, paid: Token) -> Result<String, StoreError> {
        let info = self
            .run_command(DbOp::BuildInfo, paid, doc! { "buildInfo": 1 })
            .await?;
        Ok(info.get_str("version").unwrap_or("unknown").to_string())
    }

    /// How long since the database last answered a command (any command, any outcome
    /// that proves it alive).
    pub fn since_answer(&self) -> Duration {
        self.pulse.since_answer()
    }

    /// Runs one command in a task of its own that keeps `paid` until the database answers
    /// (or [`ORPHAN_LIMIT`]), and waits for it at most `limit` (capped at the store's
    /// timeout); records the outcome in the health bit and the metrics.
    async fn run<T, F>(
        &self,
        op: DbOp,
        limit: Duration,
        paid: Token,
        command: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = mongodb::error::Result<T>> + Send + 'static,
    {
        let limit = limit.min(self.timeout);
        let pulse = &self.pulse;
        pulse.metrics.db_commands_sent.get(op).inc();
        let late = Arc::clone(pulse);
        let answered_late = Arc::new(AtomicBool::new(false));
        let waiting = Arc::clone(&answered_late);
        // Never shorter than the wait for an answer, however DB_TIMEOUT_MS is set.
        let orphan_limit = ORPHAN_LIMIT.max(self.timeout);
        let mut task = tokio::spawn(async move {
            let result = tokio::time::timeout(orphan_limit, command).await;
            drop(paid);
            // The caller stopped waiting: an answer now still says the database is back.
            if waiting.load(Ordering::Acquire) && matches!(result, Ok(Ok(_))) {
                late.answered();
            }
            result
        });
        let joined = match tokio::time::timeout(limit, &mut task).await {
            Ok(joined) => Some(joined),
            Err(_) => {
                answered_late.store(true, Ordering::Release);
                // An answer that came between the timeout and the flag was not counted
                // by the task: take it here.
                if task.is_finished() {
                    Some(task.await)
                } else {
                    None
                }
            }
        };
        let result = match joined {
            Some(Ok(Ok(Ok(value)))) => Ok(value),
            Some(Ok(Ok(Err(e)))) if is_unreachable(&e) => {
                Err(StoreError::Unavailable(e.kind.to_string()))
            }
            Some(Ok(Ok(Err(e)))) => Err(StoreError::Refused(e)),
            Some(Ok(Err(_orphan_limit))) => Err(StoreError::Unavailable(format!(
                "no answer within {orphan_limit:?}"
            ))),
            Some(Err(join)) => Err(StoreError::Unavailable(format!(
                "the command's task failed: {join}"
            ))),
            None => {
                if limit < self.timeout {
                    Err(StoreError::Slow(limit))
                } else {
                    Err(StoreError::Unavailable(format!(
                        "no answer within DB_TIMEOUT_MS ({limit:?})"
                    )))
                }
            }
        };
        let outcome = match &result {
            Ok(_) => DbOutcome::Ok,
            Err(StoreError::Refused(e)) if only_duplicates(e) => DbOutcome::Duplicate,
            Err(StoreError::Refused(_)) => DbOutcome::Error,
            Err(_) => DbOutcome::Unavailable,
        };
        pulse.metrics.db_command(op, outcome);
        match &result {
            Ok(_) | Err(StoreError::Refused(_)) => pulse.answered(),
            Err(StoreError::Unavailable(e)) => pulse.unanswered(op, e),
            Err(StoreError::Slow(_)) => {}
        }
        result
    }
}

impl Pulse {
    fn since_answer(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(
            self.last_answer_ms.load(Ordering::Relaxed),
        ))
    }

    fn answered(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_answer_ms.store(ms, Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            self.metrics.db_up.set(1);
            tracing::info!("mongodb is answering");
        }
    }

    /// A failure marks the database down only once nothing has answered for a whole
    /// `DB_TIMEOUT_MS`: a connection reset right after a stall (the server resuming and
    /// dropping a connection whose command sluice gave up on) is not an outage.
    fn unanswered(&self, op: DbOp, error: &str) {
        if self.since_answer() < self.timeout {
            return;
        }
        if self.healthy.swap(false, Ordering::Relaxed) {
            self.metrics.db_up.set(0);
            tracing::warn!(
                error,
                op = op.as_str(),
                "mongodb stopped answering; shedding writes until it is back"
            );
        }
    }
}

/// Whether a driver error means the server could not be reached at all.
fn is_unreachable(e: &DriverError) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
    )
}

/// Whether an insert was refused only for documents that are stored already.
fn only_duplicates(e: &DriverError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure
                    .write_errors
                    .as_ref()
                    .is_some_and(|w| !w.is_empty() && w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// The server's error code, where the error carries one.
fn error_code(e: &DriverError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

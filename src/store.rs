//! The only module that talks to MongoDB.
//!
//! Every method takes a budget [`Token`], so the command cap is enforced by the types
//! rather than by convention. Every command also runs under a time limit: the driver has
//! no socket timeout, and a stalled database (SIGSTOP, a saturated disk) must turn into a
//! fast 503 instead of requests piling up until the client gives up.
//!
//! The store keeps one health bit, set by the outcome of every command: a command the
//! server answered (even with an error) means the database is up; a timeout, a network
//! error or a failed server selection means it is not. `/readyz` and the fast-fail path
//! of `/api/data` read that bit, and [`Store::run_health_checks`] keeps it current while
//! no other command runs.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::{Acknowledgment, ClientOptions, CollectionOptions, WriteConcern};
use mongodb::{Client, Collection, Database};
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, Token};
use crate::config::{Config, ConfigError, WriteAck};
use crate::metrics::Metrics;
use crate::telemetry::redact;

pub const DEFAULT_DATABASE: &str = "assessmentdb";
pub const COLLECTION: &str = "records";
/// MongoDB's error code for a duplicate `_id`: on a retry, proof the document is stored.
const DUPLICATE_KEY: i32 = 11000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer: down, unreachable, stalled or timed out.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database refused the command: {0}")]
    Refused(String),
}

pub struct Store {
    db: Database,
    records: Collection<Document>,
    timeout: Duration,
    healthy: AtomicBool,
    /// Milliseconds since `started` of the last answered command.
    last_answer_ms: AtomicU64,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Builds the client. It connects lazily, so this fails only on a bad `MONGO_URI`.
    pub async fn connect(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        let mut options = ClientOptions::parse(&cfg.mongo_uri).await.map_err(|e| {
            ConfigError(format!(
                "MONGO_URI ({}) is not a usable MongoDB URI: {e}",
                redact(&cfg.mongo_uri)
            ))
        })?;
        // The driver waits 30 s for a server by default; under load that is a hang.
        options.server_selection_timeout = Some(
            options
                .server_selection_timeout
                .unwrap_or(cfg.db_timeout())
                .min(cfg.db_timeout()),
        );
        options.connect_timeout = Some(options.connect_timeout.unwrap_or(cfg.db_timeout()));
        options.app_name.get_or_insert_with(|| "sluice".into());
        let database = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.into());
        let client = Client::with_options(options).map_err(|e| {
            ConfigError(format!(
                "MONGO_URI ({}) is not usable: {e}",
                redact(&cfg.mongo_uri)
            ))
        })?;
        let w = match &cfg.write_concern_w {
            WriteAck::Nodes(n) => Acknowledgment::Nodes(*n),
            WriteAck::Majority => Acknowledgment::Majority,
        };
        let write_concern = WriteConcern::builder()
            .w(w)
            .journal(cfg.write_journal)
            .build();
        let db = client.database(&database);
        let records = db.collection_with_options(
            COLLECTION,
            CollectionOptions::builder()
                .write_concern(write_concern)
                .build(),
        );
        Ok(Store {
            db,
            records,
            timeout: cfg.db_timeout(),
            healthy: AtomicBool::new(false),
            last_answer_ms: AtomicU64::new(0),
            started: Instant::now(),
            metrics,
        })
    }

    /// Whether the last command was answered. False until the first one is.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// Stores documents with one unordered `insert_many`, within `limit` (capped at the
    /// store's own timeout). Returns the positions, among `docs`, of documents that were
    /// not stored and are worth sending again. A duplicate `_id` is not among them: the
    /// ids are made in-process, so a duplicate means an earlier attempt stored it.
    pub async fn insert_many<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a Document>,
        _paid: Token,
        limit: Duration,
    ) -> Result<Vec<usize>, StoreError> {
        let command = self.records.insert_many(docs).ordered(false);
        match self.run("insert", limit, command).await {
            Ok(_) => Ok(Vec::new()),
            Err(Failure::Driver(e)) => match e.kind.as_ref() {
                ErrorKind::InsertMany(failure) if failure.write_concern_error.is_none() => {
                    Ok(failure
                        .write_errors
                        .iter()
                        .flatten()
                        .filter(|w| w.code != DUPLICATE_KEY)
                        .map(|w| w.index)
                        .collect())
                }
                _ => Err(Failure::Driver(e).into()),
            },
            Err(timeout) => Err(timeout.into()),
        }
    }

    /// The read every `/api/data` makes five times: the first `type: "write"` document.
    /// Only its id is fetched, since only the id is returned.
    pub async fn first_write(&self, _paid: Token) -> Result<Option<ObjectId>, StoreError> {
        let query = self
            .records
            .find_one(doc! { "type": "write" })
            .projection(doc! { "_id": 1 });
        let found = self.run("find", self.timeout, query).await?;
        Ok(found.and_then(|d| d.get_object_id("_id").ok()))
    }

    /// Whether the document `id` is still stored as `type: "write"`. Documents are only
    /// ever appended, so the first one stays first while it exists: this revalidates a
    /// known answer of [`Store::first_write`] by `_id` instead of running the query again,
    /// which some servers answer by reading every match before applying the limit.
    pub async fn still_stored(&self, id: ObjectId, _paid: Token) -> Result<bool, StoreError> {
        let query = self
            .records
            .find_one(doc! { "_id": id, "type": "write" })
            .projection(doc! { "_id": 1 });
        Ok(self.run("find", self.timeout, query).await?.is_some())
    }

    /// The collection's size from its metadata: no scan, so it costs no disk reads.
    pub async fn estimated_count(&self, _paid: Token) -> Result<u64, StoreError> {
        let count = self.records.estimated_document_count();
        Ok(self.run("count", self.timeout, count).await?)
    }

    pub async fn ping(&self, _paid: Token) -> Result<(), StoreError> {
        self.run(
            "ping",
            self.timeout,
            self.db.run_command(doc! { "ping": 1 }),
        )
        .await?;
        Ok(())
    }

    /// The server's version string, for the `check` subcommand.
    pub async fn server_version(&self, _paid: Token) -> Result<String, StoreError> {
        let info = self
            .run(
                "buildInfo",
                self.timeout,
                self.db.run_command(doc! { "buildInfo": 1 }),
            )
            .await?;
        Ok(info.get_str("version").unwrap_or("unknown").to_string())
    }

    /// Keeps the health bit current while nothing else talks to the database: pings when
    /// no command was answered for a while, paying from the budget like any command.
    pub async fn run_health_checks(&self, budget: &Budget, stop: CancellationToken) {
        const EVERY: Duration = Duration::from_secs(1);
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let since_answer = self.since_start().saturating_sub(Duration::from_millis(
                self.last_answer_ms.load(Ordering::Relaxed),
            ));
            if self.is_healthy() && since_answer < 2 * EVERY {
                continue;
            }
            // While down, wait for a token: knowing when it is back is the point. While
            // merely idle, skip if the budget is busy, since busy means commands answer.
            let token = if self.is_healthy() {
                budget.try_acquire()
            } else {
                Some(budget.acquire().await)
            };
            if let Some(token) = token {
                let _ = self.ping(token).await;
            }
        }
    }

    fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs one command under `limit`, then records its outcome in the health bit and
    /// the metrics.
    async fn run<T>(
        &self,
        op: &'static str,
        limit: Duration,
        command: impl IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, Failure> {
        let limit = limit.min(self.timeout);
        let result = match tokio::time::timeout(limit, command.into_future()).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Failure::Driver(e)),
            Err(_) => Err(Failure::TimedOut(limit)),
        };
        let answered = match &result {
            Ok(_) => true,
            Err(failure) => !failure.is_unavailable(),
        };
        let was_healthy = self.healthy.swap(answered, Ordering::Relaxed);
        if answered {
            let ms = u64::try_from(self.since_start().as_millis()).unwrap_or(u64::MAX);
            self.last_answer_ms.store(ms, Ordering::Relaxed);
            if !was_healthy {
                tracing::info!("mongodb is answering");
            }
        } else if was_healthy {
            if let Err(e) = &result {
                tracing::warn!(error = %e, op, "mongodb stopped answering; shedding writes until it is back");
            }
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(f) if f.is_unavailable() => "unavailable",
            Err(_) => "error",
        };
        self.metrics
            .db_commands
            .with_label_values(&[op, outcome])
            .inc();
        result
    }
}

/// Why a command failed, before it is sorted into a [`StoreError`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Driver(mongodb::error::Error),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl Failure {
    fn is_unavailable(&self) -> bool {
        match self {
            Failure::TimedOut(_) => true,
            Failure::Driver(e) => matches!(
                e.kind.as_ref(),
                ErrorKind::Io(_)
                    | ErrorKind::ConnectionPoolCleared { .. }
                    | ErrorKind::ServerSelection { .. }
            ),
        }
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        if f.is_unavailable() {
            StoreError::Unavailable(f.to_string())
        } else {
            StoreError::Refused(f.to_string())
        }
    }
}

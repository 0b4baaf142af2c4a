//! The [`App`]: what request handlers can reach, as narrow handles.
//!
//! Handlers never see the database client or Redis directly: `/api/data` gets the read
//! cache, the writer and the idempotency [`InFlight`] claims, `/api/stats` gets [`Stats`],
//! the probes get [`Health`] (each in a module of its own). Only
//! the naive comparison mode holds the store itself, because going straight to it is the
//! point of that mode. `startup` builds an `App`; nothing here knows about `startup`,
//! the server or HTTP.

use std::sync::Arc;
use std::time::Duration;

use crate::budget::Budget;
use crate::claims::InFlight;
use crate::health::Health;
use crate::metrics::{DbOp, Label as _, Metrics, RefreshSource, Tier};
use crate::reads::ReadCache;
use crate::secret::SecretUrl;
use crate::shared::Shared;
use crate::stats::Stats;
use crate::status::{
    BudgetStatus, CachedValue, DatabaseStatus, L1Status, L2Status, Refreshes, Status, WriterStatus,
};
use crate::store::PaidStore;
use crate::writes::Writer;

/// The read cache as the service runs it: MongoDB under Redis.
pub type Reads = ReadCache<PaidStore, Arc<Shared>>;

pub struct App {
    pub pod: String,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub reads: Arc<Reads>,
    pub writer: Writer,
    /// How long a request waits for its reads (`DB_TIMEOUT_MS`).
    pub read_timeout: Duration,
    pub stats: Stats,
    pub in_flight: InFlight,
    /// Set in the comparison mode: `/api/data` goes straight to the paid store, nothing
    /// between.
    pub naive: Option<PaidStore>,
    pub(crate) budget: Arc<Budget>,
    pub(crate) urls: Urls,
}

/// The two connection URLs, for the status page (they redact themselves).
pub struct Urls {
    pub mongo: SecretUrl,
    pub redis: SecretUrl,
}

impl App {
    /// Everything `/api/cache/status` shows, from the same counters `/metrics` exposes.
    pub async fn status(&self) -> Status {
        let m = &self.metrics;
        let batches = m.batch_documents.get_sample_count();
        let flushes = m.flush_seconds.get_sample_count();
        let avg = |sum: f64, n: u64| if n == 0 { 0.0 } else { sum / n as f64 };
        let value = self.reads.peek().await.map(|(read, age)| CachedValue {
            id: read.id.map(|id| id.to_hex()),
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        });
        Status {
            pod: self.pod.clone(),
            mode: if self.naive.is_some() {
                "naive"
            } else {
                "coalescing"
            }
            .into(),
            l1: L1Status {
                hits: m.cache_hits.get(Tier::L1).get(),
                misses: m.cache_misses.get(Tier::L1).get(),
                errors: m.cache_errors.get(Tier::L1).get(),
                value,
            },
            l2: L2Status {
                hits: m.cache_hits.get(Tier::L2).get(),
                misses: m.cache_misses.get(Tier::L2).get(),
                errors: m.cache_errors.get(Tier::L2).get(),
                connected: self.health.redis_up(),
                url: self.urls.redis.to_string(),
            },
            refreshes: Refreshes {
                from_database: m.refreshes.get(RefreshSource::Database).get(),
                from_shared: m.refreshes.get(RefreshSource::Shared).get(),
                errors: m.refreshes.get(RefreshSource::Error).get(),
            },
            writer: WriterStatus {
                queue_depth: self.writer.queue_depth() as u64,
                queue_capacity: self.writer.queue_capacity() as u64,
                batches_flushed: batches,
                documents_stored: m.documents_stored.get(),
                documents_per_batch_avg: avg(m.batch_documents.get_sample_sum(), batches),
                flush_latency_ms_avg: 1000.0 * avg(m.flush_seconds.get_sample_sum(), flushes),
                retries: m.write_retries.get(),
                failed_requests: m.write_failures.get(),
            },
            budget: BudgetStatus {
                cluster_commands_per_second: self.budget.cluster_rate(),
                fallback_commands_per_second: self.budget.fallback_rate(),
                mode: self.budget.mode().as_str().into(),
                commands_sent: DbOp::ALL
                    .iter()
                    .map(|&op| m.db_commands_sent.get(op).get())
                    .sum(),
                in_flight: self.budget.in_flight() as u64,
                in_flight_cap: self.budget.in_flight_cap() as u64,
            },
            database: DatabaseStatus {
                healthy: self.health.store.is_healthy(),
                uri: self.urls.mongo.to_string(),
            },
            timestamp: crate::record::timestamp(),
        }
    }
}

//! The [`App`]: what request handlers can reach, as narrow handles.
//!
//! Handlers never see the database client or Redis directly: `/api/data` gets the read
//! cache and the writer, `/api/stats` gets [`Stats`], the probes get [`Health`]. Only
//! the naive comparison mode holds the store itself, because going straight to it is the
//! point of that mode. `startup` builds an `App`; nothing here knows about `startup`,
//! the server or HTTP.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::Budget;
use crate::metrics::{DbOp, Label as _, Metrics, RefreshSource, Tier};
use crate::reads::ReadCache;
use crate::record::IdempotencyKey;
use crate::secret::SecretUrl;
use crate::shared::Shared;
use crate::status::{
    BudgetStatus, CachedValue, DatabaseStatus, L1Status, L2Status, Refreshes, Status, WriterStatus,
};
use crate::store::{PaidStore, Store, StoreError};
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
    /// Set in the comparison mode: `/api/data` goes straight to the database.
    /// The naive comparison mode: the paid store itself, nothing between.
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

/// What the probes ask: is the database answering, is Redis, is the pod draining.
pub struct Health {
    pub(crate) store: Arc<Store>,
    pub(crate) shared: Arc<Shared>,
    draining: AtomicBool,
}

impl Health {
    pub fn new(store: Arc<Store>, shared: Arc<Shared>) -> Self {
        Health {
            store,
            shared,
            draining: AtomicBool::new(false),
        }
    }

    /// `Ok` when the pod should get traffic, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("draining for shutdown")
        } else if !self.store.is_healthy() {
            Err("mongodb is not answering")
        } else {
            Ok(())
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether `/api/data` can hope to store anything now.
    pub fn database_up(&self) -> bool {
        self.store.is_healthy()
    }

    pub fn redis_up(&self) -> bool {
        self.shared.is_connected()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// `/api/stats`: the collection's size from metadata, at most one command per second
/// per pod, never holding a request longer than `DB_TIMEOUT_MS`.
pub struct Stats {
    store: Arc<Store>,
    budget: Arc<Budget>,
    /// The last answer (or failure) and when it was taken.
    last: Mutex<Option<(Instant, Result<u64, StoreError>)>>,
    /// One refresh at a time; the others serve the last answer meanwhile.
    refreshing: tokio::sync::Mutex<()>,
}

/// How long one count (or one failure to count) is served.
const STATS_TTL: Duration = Duration::from_secs(1);

impl Stats {
    pub fn new(store: Arc<Store>, budget: Arc<Budget>) -> Self {
        Stats {
            store,
            budget,
            last: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn total_documents(&self) -> Result<u64, StoreError> {
        let limit = self.store.timeout();
        let deadline = Instant::now() + limit;
        loop {
            let last = self.last.lock().expect("stats lock").clone();
            if let Some((at, answer)) = &last {
                if at.elapsed() < STATS_TTL {
                    return answer.clone();
                }
            }
            match self.refreshing.try_lock() {
                Ok(_turn) => {
                    let answer = tokio::time::timeout_at(deadline, async {
                        let token = self.budget.acquire().await;
                        let left = deadline.saturating_duration_since(Instant::now());
                        self.store.estimated_count(token, left).await
                    })
                    .await
                    .unwrap_or(Err(StoreError::Slow(limit)));
                    *self.last.lock().expect("stats lock") = Some((Instant::now(), answer.clone()));
                    return answer;
                }
                // Someone is counting: serve the last count, however old, if there is one.
                Err(_) => match last {
                    Some((_, Ok(count))) => return Ok(count),
                    _ => {
                        if tokio::time::timeout_at(deadline, self.refreshing.lock())
                            .await
                            .is_err()
                        {
                            return Err(StoreError::Slow(limit));
                        }
                    }
                },
            }
        }
    }
}

/// Idempotency keys of requests in flight anywhere in the cluster: a second request with
/// the same key while the first is unanswered gets 409 instead of racing it, on whichever
/// pod it lands.
///
/// Each key is claimed on this pod first (a set in memory), then in Redis (`SET NX PX`)
/// for `ttl`, which outlives the request: its enqueue wait, its write deadline and its
/// reads. A claim is released by its holder only (compare-and-delete) when the request is
/// answered. With Redis unreachable the pod's own claim stands alone, as it did before
/// there was a shared one: the same key sent to two pods then races, and the ids that
/// derive from the key still store its documents once.
pub struct InFlight {
    local: Mutex<HashSet<IdempotencyKey>>,
    shared: Arc<Shared>,
    ttl: Duration,
    /// This pod's name; each claim adds a number of its own.
    pod: String,
    claims: AtomicU64,
}

/// Holds a key as in flight until dropped.
pub struct Claim<'a> {
    set: &'a InFlight,
    key: IdempotencyKey,
    /// The holder token of the claim in Redis, if Redis took it.
    shared: Option<String>,
}

impl InFlight {
    pub fn new(shared: Arc<Shared>, ttl: Duration, pod: String) -> Self {
        InFlight {
            local: Mutex::new(HashSet::new()),
            shared,
            ttl,
            pod,
            claims: AtomicU64::new(0),
        }
    }

    /// The claim on `key`, or `None` if a request with it is in flight on any pod.
    pub async fn claim(&self, key: &IdempotencyKey) -> Option<Claim<'_>> {
        if !self
            .local
            .lock()
            .expect("in-flight lock")
            .insert(key.clone())
        {
            return None;
        }
        let holder = format!(
            "{}:{}",
            self.pod,
            self.claims.fetch_add(1, Ordering::Relaxed)
        );
        // The holder is kept before Redis answers: a `SET` that took the key but whose
        // answer was lost is still released by compare-and-delete, not left to expire.
        let mut claim = Claim {
            set: self,
            key: key.clone(),
            shared: Some(holder),
        };
        let holder = claim.shared.as_deref().expect("set above");
        match self.shared.claim_key(key.as_str(), holder, self.ttl).await {
            Ok(true) => {}
            // Another pod's request holds it; dropping the claim frees the local one.
            Ok(false) => {
                claim.shared = None;
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis unreachable; the idempotency key is claimed on this pod only");
            }
        }
        Some(claim)
    }
}

impl Claim<'_> {
    /// Releases the claim before the answer leaves, so the client's next replay finds
    /// the key free on any pod. Redis is asked within its timeout; a release that fails
    /// leaves the claim to expire after its ttl.
    pub async fn release(mut self) {
        if let Some(holder) = self.shared.take() {
            if let Err(e) = self
                .set
                .shared
                .release_key(self.key.as_str(), &holder)
                .await
            {
                tracing::debug!(error = %e, "could not release an idempotency key's claim; it expires");
            }
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set
            .local
            .lock()
            .expect("in-flight lock")
            .remove(&self.key);
        if let Some(holder) = self.shared.take() {
            let (shared, key) = (Arc::clone(&self.set.shared), self.key.clone());
            // A request dropped before its answer (the client went away): released in
            // the background. A release that fails leaves the claim to expire.
            tokio::spawn(async move {
                if let Err(e) = shared.release_key(key.as_str(), &holder).await {
                    tracing::debug!(error = %e, "could not release an idempotency key's claim; it expires");
                }
            });
        }
    }
}

//! The read path: L1 (in-process moka) → L2 (Redis) → MongoDB, with one loader.
//!
//! All five reads of `/api/data` are the same query, so one cached value serves them.
//! The rules, each there because the database can afford so few commands:
//!
//! - **Single flight per pod.** On an L1 miss, moka's `try_get_with` runs one loader
//!   and parks every other request for the same key on it.
//! - **Single flight per cluster.** The loader first looks in Redis; if the value there
//!   is stale it takes a Redis lock, and only the holder queries MongoDB. The others wait
//!   for the holder's value to appear in Redis (or serve what they have).
//! - **Stale while revalidate.** After warm-up a value older than `CACHE_FRESH_MS` is
//!   still served, and one background task per pod refreshes it, so no request waits on
//!   MongoDB for a read. Only past `CACHE_STALE_MS` is a value dropped.
//! - **Revalidate, don't re-query.** Documents are only appended, so the first
//!   `type: "write"` document stays first while it exists. A refresh that already knows
//!   the answer checks that `_id` still exists (an index lookup) instead of running the
//!   query again; some servers read every match of the query before applying its limit,
//!   which on a large collection costs more than the disk and memory can give.
//! - **Empty is brief.** While the collection is empty the answer (nulls) is fresh only
//!   for `CACHE_EMPTY_MS`, so the first stored document shows up quickly.
//! - **Redis down.** L2 errors are counted and skipped: L1 and MongoDB still serve,
//!   single-flighted per pod and paid from the budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use moka::future::Cache;

use crate::budget::Budget;
use crate::metrics::Metrics;
use crate::shared::{CachedRead, Shared};
use crate::store::{Store, StoreError};

/// How long the cluster-wide refresh lock is held at most (a holder that dies frees it).
const LOCK_TTL: Duration = Duration::from_secs(5);
/// How often a pod waiting on another pod's refresh looks in Redis.
const LOCK_POLL: Duration = Duration::from_millis(20);
/// After a failed or inconclusive refresh, the next one waits at least this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    pub fresh: Duration,
    pub stale: Duration,
    pub empty: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("read failed: {0}")]
pub struct ReadError(String);

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError(e.to_string())
    }
}

/// What L1 keeps: the value, and when this pod should next try to refresh it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    read: CachedRead,
    refresh_after: Instant,
}

pub struct ReadCache {
    l1: Cache<(), Entry>,
    shared: Arc<Shared>,
    store: Arc<Store>,
    budget: Arc<Budget>,
    settings: ReadSettings,
    /// Names this pod as the lock holder.
    holder: String,
    refreshing: AtomicBool,
    metrics: Arc<Metrics>,
}

impl ReadCache {
    pub fn new(
        settings: ReadSettings,
        shared: Arc<Shared>,
        store: Arc<Store>,
        budget: Arc<Budget>,
        holder: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        ReadCache {
            l1: Cache::builder()
                .max_capacity(1)
                .time_to_live(settings.stale)
                .build(),
            shared,
            store,
            budget,
            settings,
            holder,
            refreshing: AtomicBool::new(false),
            metrics,
        }
    }

    /// One read: the id of the first `type: "write"` document, or `None` while there is
    /// none.
    pub async fn first_write(self: &Arc<Self>) -> Result<Option<ObjectId>, ReadError> {
        if let Some(entry) = self.l1.get(&()).await {
            let due = entry.refresh_after <= Instant::now();
            if due && entry.read.id.is_none() {
                // An empty answer is never served stale: the first document should show
                // up as soon as it is stored.
                self.l1.invalidate(&()).await;
                return self.load_through_l1().await;
            }
            self.metrics.cache_hits.with_label_values(&["l1"]).inc();
            if due && !self.refreshing.swap(true, Ordering::AcqRel) {
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    this.refresh().await;
                    this.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok(entry.read.id);
        }
        self.load_through_l1().await
    }

    /// An L1 miss: one loader per pod, every other caller waits for its answer.
    async fn load_through_l1(&self) -> Result<Option<ObjectId>, ReadError> {
        self.metrics.cache_misses.with_label_values(&["l1"]).inc();
        let entry = self
            .l1
            .try_get_with((), self.load(None))
            .await
            .map_err(|e| (*e).clone())?;
        Ok(entry.read.id)
    }

    /// What is cached now, without loading; for the status page.
    pub async fn peek(&self) -> Option<CachedRead> {
        self.l1.get(&()).await.map(|e| e.read)
    }

    async fn refresh(&self) {
        let current = self.l1.get(&()).await.map(|e| e.read);
        match self.load(current).await {
            Ok(entry) => self.l1.insert((), entry).await,
            Err(e) => {
                tracing::warn!(error = %e, "background read refresh failed; serving the cached value");
                if let Some(read) = current {
                    self.l1
                        .insert((), self.entry(read, Some(RETRY_AFTER_FAILURE)))
                        .await;
                }
            }
        }
    }

    /// Finds a fresh value: from Redis if another pod refreshed it, else from MongoDB by
    /// whichever pod holds the lock. `fallback` is what this pod may serve meanwhile.
    async fn load(&self, fallback: Option<CachedRead>) -> Result<Entry, ReadError> {
        let l2 = match self.shared.get_read().await {
            Ok(found) => found,
            Err(e) => {
                self.metrics.cache_errors.with_label_values(&["l2"]).inc();
                tracing::debug!(error = %e, "L2 unavailable; reading MongoDB");
                return self.query(false, fallback.and_then(|r| r.id)).await;
            }
        };
        if let Some(read) = l2.filter(|r| self.is_fresh(r)) {
            self.metrics.cache_hits.with_label_values(&["l2"]).inc();
            self.metrics.refreshes.with_label_values(&["shared"]).inc();
            return Ok(self.entry(read, None));
        }
        self.metrics.cache_misses.with_label_values(&["l2"]).inc();
        // The newest value anyone has, to serve while another pod refreshes.
        let stale = match (l2, fallback) {
            (Some(a), Some(b)) => Some(if a.fetched_at_ms >= b.fetched_at_ms {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        };
        match self.shared.try_lock(&self.holder, LOCK_TTL).await {
            Ok(true) => {
                // The previous holder may have shared its value between our look and our
                // lock: look again before paying for a query.
                let result = match self.shared.get_read().await {
                    Ok(Some(read)) if self.is_fresh(&read) => {
                        self.metrics.refreshes.with_label_values(&["shared"]).inc();
                        Ok(self.entry(read, None))
                    }
                    _ => self.query(true, stale.and_then(|r| r.id)).await,
                };
                if let Err(e) = self.shared.unlock(&self.holder).await {
                    tracing::debug!(error = %e, "could not release the refresh lock; it expires");
                }
                result
            }
            Ok(false) => match stale.filter(|r| r.id.is_some()) {
                Some(read) => Ok(self.entry(read, Some(RETRY_AFTER_FAILURE))),
                None => self.wait_for_holder().await,
            },
            Err(_) => {
                self.metrics.cache_errors.with_label_values(&["l2"]).inc();
                self.query(false, stale.and_then(|r| r.id)).await
            }
        }
    }

    /// Cold start on a pod that lost the lock race: wait for the holder's value.
    async fn wait_for_holder(&self) -> Result<Entry, ReadError> {
        let deadline = Instant::now() + LOCK_TTL;
        while Instant::now() < deadline {
            tokio::time::sleep(LOCK_POLL).await;
            match self.shared.get_read().await {
                Ok(Some(read)) if self.is_fresh(&read) => {
                    self.metrics.refreshes.with_label_values(&["shared"]).inc();
                    return Ok(self.entry(read, None));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // The holder died or Redis went away: read it ourselves.
        self.query(false, None).await
    }

    /// Reads MongoDB (paying from the budget) and, if asked, shares the answer in Redis.
    /// A `known` answer is revalidated by its `_id`; only without one (or if it is gone)
    /// does the query itself run.
    async fn query(&self, share: bool, known: Option<ObjectId>) -> Result<Entry, ReadError> {
        let read = match self.ask_store(known).await {
            Ok(id) => CachedRead::now(id),
            Err(e) => {
                self.metrics.refreshes.with_label_values(&["error"]).inc();
                return Err(e.into());
            }
        };
        self.metrics
            .refreshes
            .with_label_values(&["database"])
            .inc();
        if share {
            let ttl = if read.id.is_some() {
                self.settings.stale
            } else {
                self.settings.empty
            };
            if let Err(e) = self.shared.put_read(&read, ttl).await {
                self.metrics.cache_errors.with_label_values(&["l2"]).inc();
                tracing::debug!(error = %e, "could not share the read in L2");
            }
        }
        Ok(self.entry(read, None))
    }

    async fn ask_store(&self, known: Option<ObjectId>) -> Result<Option<ObjectId>, StoreError> {
        if let Some(id) = known {
            if self
                .store
                .still_stored(id, self.budget.acquire().await)
                .await?
            {
                return Ok(Some(id));
            }
        }
        self.store.first_write(self.budget.acquire().await).await
    }

    fn fresh_for(&self, read: &CachedRead) -> Duration {
        if read.id.is_some() {
            self.settings.fresh
        } else {
            self.settings.empty
        }
    }

    fn is_fresh(&self, read: &CachedRead) -> bool {
        read.age() < self.fresh_for(read)
    }

    /// An L1 entry due for refresh when its value turns stale, or after `retry` if the
    /// value is already stale.
    fn entry(&self, read: CachedRead, retry: Option<Duration>) -> Entry {
        let left = self.fresh_for(&read).saturating_sub(read.age());
        let wait = match retry {
            Some(retry) if left.is_zero() => retry,
            _ => left,
        };
        Entry {
            read,
            refresh_after: Instant::now() + wait,
        }
    }
}

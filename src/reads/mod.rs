//! The read path: L1 (in-process moka) → L2 (Redis) → MongoDB, with one loader.
//!
//! All five reads of `/api/data` are the same query, so one cached value serves them.
//! The rules, each there because the database can afford so few commands:
//!
//! - **Single flight per pod.** On an L1 miss one loader runs and every caller that
//!   misses meanwhile shares its answer. The loader runs in a task of its own, so a
//!   request that is shed or times out never takes the load (or the lock) down with it.
//! - **Single flight per cluster.** The loader first looks in Redis; if the value there
//!   is stale it takes a Redis lock with a token of its own attempt, and only the holder
//!   queries MongoDB. The others retry the lock while they wait for the holder's value to
//!   appear in Redis (or serve what they have); a holder that dies frees the lock after
//!   `LOCK_TTL`, and nobody waits longer than that.
//! - **Stale while revalidate.** After warm-up a value older than `CACHE_FRESH_MS` is
//!   still served, and one background task per pod refreshes it, so no request waits on
//!   MongoDB for a read. Past `CACHE_STALE_MS` a value is never served, whatever the
//!   refreshes did: a failed refresh keeps the value's age.
//! - **Revalidate, don't re-query.** Documents are only appended, so the first
//!   `type: "write"` document stays first while it exists. A refresh that already knows
//!   the answer checks that `_id` still exists (an index lookup) instead of running the
//!   query again.
//! - **Read your writes.** An empty answer (no documents yet) is never kept in L1 while
//!   Redis answers, and once this pod has stored documents it deletes any empty answer
//!   from L2: after a 200, no request on any pod reads "empty" from a cache. (A load
//!   that queried just before the insert can still share "empty" for `CACHE_EMPTY_MS`.)
//! - **Redis down.** L2 errors are counted and skipped: L1 and MongoDB still serve,
//!   single-flighted per pod and paid from the budget.
//! - **Redis is not trusted.** A shared value stamped in this pod's future has no age it
//!   can be judged by, so it is checked in MongoDB before it is served (see
//!   [`ReadCache::shared`]); one that does not parse is a miss (`Shared::get_read`).
//! - **A panic is contained.** A load or refresh that panics is logged as an error and
//!   ends like a failed one: its lock is released, its readers get an error, and the next
//!   miss or due refresh starts afresh.
//!
//! The tiers are behind two traits ([`Source`], [`SharedTier`]), so these rules are unit-tested
//! under tokio's paused time in `tests.rs`; the real-server tests prove them end to end.

mod seams;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bson::oid::ObjectId;
use moka::future::Cache;
use tokio::sync::watch;
use tokio::time::Instant;

pub use seams::{SharedTier, Source};

use crate::config::ReadSettings;
use crate::metrics::{Metrics, RefreshSource, Tier};
use crate::shared::{CachedRead, Clock, SharedError};
use crate::store::StoreError;

/// How long the cluster-wide refresh lock is held at most (a holder that dies frees it).
const LOCK_TTL: Duration = Duration::from_secs(5);
/// How often a pod waiting on another pod's refresh looks in Redis.
const LOCK_POLL: Duration = Duration::from_millis(20);
/// How far ahead of this pod's clock a shared value's stamp may be and still be taken as
/// "just fetched" (see [`ReadCache::shared`]).
const CLOCK_SKEW: Duration = Duration::from_secs(1);
/// After a failed or inconclusive refresh, the next one waits at least this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
#[error("read failed")]
pub struct ReadError(#[source] pub StoreError);

/// A load's answer, once it has one.
type Loaded = Option<Result<Entry, ReadError>>;

/// What L1 keeps: the value, and when this pod should next try to refresh it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    read: CachedRead,
    refresh_after: Instant,
}

pub struct ReadCache<S, T> {
    l1: Cache<(), Entry>,
    source: S,
    tier: T,
    settings: ReadSettings,
    clock: Clock,
    /// Names this pod in lock tokens; each attempt adds a number of its own.
    pod: String,
    attempts: AtomicU64,
    /// The answer of the L1 load in progress, if any.
    loading: std::sync::Mutex<Option<watch::Receiver<Loaded>>>,
    refreshing: AtomicBool,
    /// The last document id any load found: documents are never deleted, so it stays
    /// the right answer however old it is; served only when a request's own documents
    /// were stored but its reads failed.
    last_known: std::sync::Mutex<Option<ObjectId>>,
    /// Set once this pod has stored a document: documents are never deleted, so from
    /// then on an empty answer is known to be out of date.
    stored: AtomicBool,
    metrics: Arc<Metrics>,
}

impl<S: Source, T: SharedTier> ReadCache<S, T> {
    pub fn new(
        settings: ReadSettings,
        source: S,
        tier: T,
        pod: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        ReadCache {
            l1: Cache::builder().max_capacity(1).build(),
            source,
            tier,
            settings,
            clock: Clock::new(),
            pod,
            attempts: AtomicU64::new(0),
            loading: std::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
            stored: AtomicBool::new(false),
            last_known: std::sync::Mutex::new(None),
            metrics,
        }
    }

    /// One read: the id of the first `type: "write"` document, or `None` while there is
    /// none.
    pub async fn first_write(self: &Arc<Self>) -> Result<Option<ObjectId>, ReadError> {
        if let Some(entry) = self.usable_l1().await {
            self.metrics.cache_hits.get(Tier::L1).inc();
            if entry.refresh_after <= Instant::now()
                && !self.refreshing.swap(true, Ordering::AcqRel)
            {
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let _refreshing = Lower(&this.refreshing);
                    contained("background read refresh", this.refresh(entry.read)).await;
                });
            }
            return Ok(entry.read.id);
        }
        self.metrics.cache_misses.get(Tier::L1).inc();
        let mut answer = self.join_load();
        let loaded = answer
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ReadError(StoreError::Unavailable("the read loader stopped".into())))?;
        loaded
            .clone()
            .expect("waited for an answer")
            .map(|e| e.read.id)
    }

    /// The load in progress on this pod, or a new one: one loader per pod, in a task of
    /// its own, whose answer every caller that missed L1 meanwhile shares.
    ///
    /// Only a load still running is shared. One whose task ended without an answer (its
    /// sender is gone) would fail every caller it is handed to, at once and for good: the
    /// next caller starts a new load instead.
    fn join_load(self: &Arc<Self>) -> watch::Receiver<Loaded> {
        let mut slot = self.loading.lock().expect("loading lock");
        if let Some(answer) = slot
            .as_ref()
            .filter(|a| a.borrow().is_none() && a.has_changed().is_ok())
        {
            return answer.clone();
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let load = async {
                let (entry, shared) = this.load(None).await?;
                this.keep(entry, shared).await;
                Ok(entry)
            };
            // A panic answers too, so this load's readers fail now and it is not shared
            // again.
            let result = contained("read load", load).await.unwrap_or_else(|| {
                Err(ReadError(StoreError::Unavailable(
                    "the read loader panicked".into(),
                )))
            });
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Tells the cache that this pod's documents were acknowledged: an empty answer is
    /// out of date from now on, here and (best effort) in L2.
    pub async fn note_stored(&self) {
        if self.stored.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.l1.get(&()).await.is_some_and(|e| e.read.id.is_none()) {
            self.l1.invalidate(&()).await;
        }
        if let Err(e) = self.tier.forget_empty().await {
            self.metrics.cache_errors.get(Tier::L2).inc();
            tracing::debug!(error = %e, "could not clear the empty answer in L2");
        }
    }

    /// What is cached now, without loading; for the status page.
    pub async fn peek(&self) -> Option<(CachedRead, Duration)> {
        let now = self.clock.now_ms();
        self.l1.get(&()).await.map(|e| (e.read, e.read.age(now)))
    }

    /// The L1 value if it may be served: younger than `CACHE_STALE_MS`, and not an empty
    /// answer that is due or known to be out of date (empty is never served stale).
    async fn usable_l1(&self) -> Option<Entry> {
        let entry = self.l1.get(&()).await?;
        let age = entry.read.age(self.clock.now_ms());
        let outdated_empty = entry.read.id.is_none()
            && (entry.refresh_after <= Instant::now() || self.stored.load(Ordering::Acquire));
        if age >= self.settings.stale || outdated_empty {
            self.l1.invalidate(&()).await;
            return None;
        }
        Some(entry)
    }

    /// The last document id any load found, however old (see `last_known`).
    pub fn last_known(&self) -> Option<ObjectId> {
        *self.last_known.lock().expect("last known lock")
    }

    /// Puts a loaded value in L1, unless it is an empty answer L2 holds for everyone.
    async fn keep(&self, entry: Entry, shared: bool) {
        if let Some(id) = entry.read.id {
            *self.last_known.lock().expect("last known lock") = Some(id);
        }
        if entry.read.id.is_some() || !shared {
            self.l1.insert((), entry).await;
        }
    }

    async fn refresh(&self, current: CachedRead) {
        match self.load(Some(current)).await {
            Ok((entry, shared)) => self.keep(entry, shared).await,
            Err(e) => {
                tracing::warn!(error = %e, cause = %e.0, "background read refresh failed; serving the cached value");
                // The value keeps its age, so it still stops being served when stale.
                let retry = Instant::now() + RETRY_AFTER_FAILURE;
                self.l1
                    .insert(
                        (),
                        Entry {
                            read: current,
                            refresh_after: retry,
                        },
                    )
                    .await;
            }
        }
    }

    /// Finds a fresh value: from Redis if another pod refreshed it, else from MongoDB by
    /// whichever pod holds the lock. `fallback` is what this pod may serve meanwhile.
    /// Also says whether L2 holds the value (so L1 need not keep an empty one).
    async fn load(&self, fallback: Option<CachedRead>) -> Result<(Entry, bool), ReadError> {
        let l2 = match self.shared().await {
            Ok(found) => found,
            Err(e) => return self.without_l2(e, fallback.and_then(|r| r.id)).await,
        };
        if let Some(read) = l2.filter(|r| self.is_fresh(r)) {
            self.metrics.cache_hits.get(Tier::L2).inc();
            self.metrics.refreshes.get(RefreshSource::Shared).inc();
            return Ok((self.entry(read, None), true));
        }
        self.metrics.cache_misses.get(Tier::L2).inc();
        let known = [l2, fallback]
            .into_iter()
            .flatten()
            .filter(|r| r.id.is_some());
        // The newest value anyone has, to serve while another pod refreshes; never one
        // past `CACHE_STALE_MS`, which also keeps out a value whose stamp is not trusted.
        let now = self.clock.now_ms();
        let stale = known
            .clone()
            .filter(|r| r.age(now) < self.settings.stale)
            .max_by_key(|r| r.fetched_at_ms);
        // Any id a load found will do to revalidate, however old: the lookup by `_id`
        // checks it in MongoDB before it is served.
        let known = known.max_by_key(|r| r.fetched_at_ms).and_then(|r| r.id);
        let holder = format!(
            "{}:{}",
            self.pod,
            self.attempts.fetch_add(1, Ordering::Relaxed)
        );
        let give_up_at = Instant::now() + LOCK_TTL;
        loop {
            match self.tier.try_lock(&holder, LOCK_TTL).await {
                Ok(true) => {
                    // The previous holder may have shared its value between our look and
                    // our lock: look again before paying for a query.
                    let held = async {
                        match self.shared().await {
                            Ok(Some(read)) if self.is_fresh(&read) => {
                                self.metrics.refreshes.get(RefreshSource::Shared).inc();
                                Ok((self.entry(read, None), true))
                            }
                            _ => self.query(true, known).await,
                        }
                    };
                    // Released even if the query panics, so a panic here does not make
                    // every pod wait out `LOCK_TTL`; the panic then goes on to the task's
                    // `contained`.
                    let result = CatchUnwind(Box::pin(held)).await;
                    if let Err(e) = self.tier.unlock(&holder).await {
                        tracing::debug!(error = %e, "could not release the refresh lock; it expires");
                    }
                    return result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                }
                Ok(false) => {
                    if let Some(read) = stale {
                        return Ok((self.entry(read, Some(RETRY_AFTER_FAILURE)), false));
                    }
                }
                Err(e) => return self.without_l2(e, known).await,
            }
            // Cold, and another attempt holds the lock: wait for its value, retrying the
            // lock in case the holder is gone.
            if Instant::now() >= give_up_at {
                return self.query(false, None).await;
            }
            tokio::time::sleep(LOCK_POLL).await;
            if let Ok(Some(read)) = self.shared().await {
                if self.is_fresh(&read) {
                    self.metrics.refreshes.get(RefreshSource::Shared).inc();
                    return Ok((self.entry(read, None), true));
                }
            }
        }
    }

    /// The shared value, its stamp judged by this pod's clock.
    ///
    /// A stamp in the future (a pod whose clock runs ahead, or a damaged value) tells
    /// nothing of the value's age. Taken as "now" it would stay fresh as long as it is
    /// ahead, and each refresh that read it again would find it fresh again: never
    /// revalidated while the key lives. So it is taken as unknown, that is as old as can
    /// be: neither fresh nor served stale. Its id is kept, as a hint the lookup by `_id`
    /// checks before anything is served; that costs one index lookup, under the lock,
    /// where trusting the stamp could serve an answer nobody checked.
    ///
    /// Pods' clocks differ by a little (each reads the system clock once at start, and
    /// nodes keep theirs in step): a stamp up to [`CLOCK_SKEW`] ahead is that, and counts
    /// as just fetched; without the allowance every pod would revalidate every value
    /// another pod shared a millisecond "later" than its own clock.
    async fn shared(&self) -> Result<Option<CachedRead>, SharedError> {
        let found = self.tier.get().await?;
        let now = self.clock.now_ms();
        let skew = u64::try_from(CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
        Ok(found.map(|read| {
            let fetched_at_ms = if read.fetched_at_ms > now.saturating_add(skew) {
                0
            } else {
                read.fetched_at_ms.min(now)
            };
            CachedRead {
                fetched_at_ms,
                ..read
            }
        }))
    }

    async fn without_l2(
        &self,
        e: SharedError,
        known: Option<ObjectId>,
    ) -> Result<(Entry, bool), ReadError> {
        self.metrics.cache_errors.get(Tier::L2).inc();
        tracing::debug!(error = %e, "L2 unavailable; reading MongoDB");
        self.query(false, known).await
    }

    /// Reads MongoDB (the source pays from the budget) and, if asked, shares the answer in
    /// Redis. A `known` answer is revalidated by its `_id`; only without one (or if it is
    /// gone) does the query itself run.
    async fn query(
        &self,
        share: bool,
        known: Option<ObjectId>,
    ) -> Result<(Entry, bool), ReadError> {
        let id = match self.ask_source(known).await {
            Ok(id) => id,
            Err(e) => {
                self.metrics.refreshes.get(RefreshSource::Error).inc();
                return Err(ReadError(e));
            }
        };
        let read = CachedRead {
            id,
            fetched_at_ms: self.clock.now_ms(),
        };
        self.metrics.refreshes.get(RefreshSource::Database).inc();
        let mut shared = false;
        if share {
            let ttl = if id.is_some() {
                self.settings.stale
            } else {
                self.settings.empty
            };
            match self.tier.put(read, ttl).await {
                Ok(()) => shared = true,
                Err(e) => {
                    self.metrics.cache_errors.get(Tier::L2).inc();
                    tracing::debug!(error = %e, "could not share the read in L2");
                }
            }
        }
        Ok((self.entry(read, None), shared))
    }

    async fn ask_source(&self, known: Option<ObjectId>) -> Result<Option<ObjectId>, StoreError> {
        if let Some(id) = known {
            if self.source.still_stored(id).await? {
                return Ok(Some(id));
            }
        }
        self.source.first_write().await
    }

    fn fresh_for(&self, read: &CachedRead) -> Duration {
        if read.id.is_some() {
            self.settings.fresh
        } else {
            self.settings.empty
        }
    }

    fn is_fresh(&self, read: &CachedRead) -> bool {
        if read.id.is_none() && self.stored.load(Ordering::Acquire) {
            return false;
        }
        read.age(self.clock.now_ms()) < self.fresh_for(read)
    }

    /// An L1 entry due for refresh when its value turns stale, or after `retry` if the
    /// value is already stale.
    fn entry(&self, read: CachedRead, retry: Option<Duration>) -> Entry {
        let left = self
            .fresh_for(&read)
            .saturating_sub(read.age(self.clock.now_ms()));
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

/// Runs `work` to its end or to its panic. A panic is logged as an error and comes back as
/// `None`, so whoever waits on the work gets an answer rather than a dead end.
async fn contained<F: Future>(task: &'static str, work: F) -> Option<F::Output> {
    match CatchUnwind(Box::pin(work)).await {
        Ok(output) => Some(output),
        Err(panic) => {
            tracing::error!(
                task,
                panic = panic_message(panic.as_ref()),
                "a read cache task panicked"
            );
            None
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A future's output, or the payload of the panic it raised while polled. Unwind safety
/// is asserted: the future is never polled again after it panicked, and what it shares
/// with the rest of the cache (moka, atomics, mutexes that poison) stays consistent.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Lowers a flag when dropped: when the work it marks ends, however it ends (also by a
/// panic, or the task being dropped), so the flag never stays raised with nothing behind
/// it.
struct Lower<'a>(&'a AtomicBool);

impl Drop for Lower<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

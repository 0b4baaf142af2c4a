//! The read cache's rules under tokio's paused time, against in-memory tiers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::oid::ObjectId;
use tokio::time::Instant;

use super::{ReadCache, SharedTier, Source, LOCK_TTL};
use crate::config::ReadSettings;
use crate::metrics::Metrics;
use crate::shared::{CachedRead, Clock, SharedError};
use crate::store::StoreError;

#[derive(Default)]
struct Db {
    first: Mutex<Option<ObjectId>>,
    queries: AtomicUsize,
    revalidations: AtomicUsize,
    down: AtomicBool,
    latency_ms: Mutex<u64>,
    /// How many of the next calls panic (after their latency), as a bug in a driver would.
    panics: AtomicUsize,
}

#[derive(Clone, Default)]
struct MemorySource(Arc<Db>);

impl Source for MemorySource {
    async fn first_write(&self) -> Result<Option<ObjectId>, StoreError> {
        self.0.queries.fetch_add(1, Ordering::SeqCst);
        self.answer().await?;
        Ok(*self.0.first.lock().unwrap())
    }

    async fn still_stored(&self, id: ObjectId) -> Result<bool, StoreError> {
        self.0.revalidations.fetch_add(1, Ordering::SeqCst);
        self.answer().await?;
        Ok(*self.0.first.lock().unwrap() == Some(id))
    }
}

impl MemorySource {
    async fn answer(&self) -> Result<(), StoreError> {
        let latency = *self.0.latency_ms.lock().unwrap();
        tokio::time::sleep(Duration::from_millis(latency)).await;
        if self
            .0
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("the source panicked, as the test asked");
        }
        if self.0.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        Ok(())
    }
}

/// Keys expire as in Redis once `put` or `try_lock` gave them a TTL; a test that sets a
/// field directly sets a key that never expires.
#[derive(Default)]
struct Redis {
    value: Mutex<Option<CachedRead>>,
    value_expires: Mutex<Option<Instant>>,
    lock: Mutex<Option<String>>,
    lock_expires: Mutex<Option<Instant>>,
}

fn expire<V>(key: &Mutex<Option<V>>, expires: &Mutex<Option<Instant>>) {
    if expires
        .lock()
        .unwrap()
        .take_if(|at| *at <= Instant::now())
        .is_some()
    {
        *key.lock().unwrap() = None;
    }
}

#[derive(Clone, Default)]
struct MemoryTier(Arc<Redis>);

impl SharedTier for MemoryTier {
    async fn get(&self) -> Result<Option<CachedRead>, SharedError> {
        expire(&self.0.value, &self.0.value_expires);
        Ok(*self.0.value.lock().unwrap())
    }

    async fn put(&self, read: CachedRead, ttl: Duration) -> Result<(), SharedError> {
        *self.0.value.lock().unwrap() = Some(read);
        *self.0.value_expires.lock().unwrap() = Some(Instant::now() + ttl);
        Ok(())
    }

    async fn forget_empty(&self) -> Result<(), SharedError> {
        let mut v = self.0.value.lock().unwrap();
        if v.is_some_and(|r| r.id.is_none()) {
            *v = None;
        }
        Ok(())
    }

    async fn try_lock(&self, holder: &str, ttl: Duration) -> Result<bool, SharedError> {
        expire(&self.0.lock, &self.0.lock_expires);
        let mut lock = self.0.lock.lock().unwrap();
        if lock.is_some() {
            return Ok(false);
        }
        *lock = Some(holder.to_string());
        *self.0.lock_expires.lock().unwrap() = Some(Instant::now() + ttl);
        Ok(true)
    }

    async fn unlock(&self, holder: &str) -> Result<(), SharedError> {
        let mut lock = self.0.lock.lock().unwrap();
        if lock.as_deref() == Some(holder) {
            *lock = None;
        }
        Ok(())
    }
}

const FRESH: Duration = Duration::from_secs(5);
const STALE: Duration = Duration::from_secs(60);
const EMPTY: Duration = Duration::from_millis(250);

type Cache = Arc<ReadCache<MemorySource, MemoryTier>>;

fn cache(source: &MemorySource, tier: &MemoryTier) -> Cache {
    Arc::new(ReadCache::new(
        ReadSettings {
            fresh: FRESH,
            stale: STALE,
            empty: EMPTY,
        },
        source.clone(),
        tier.clone(),
        "pod-a".into(),
        Arc::new(Metrics::new()),
    ))
}

fn seeded() -> (MemorySource, MemoryTier, ObjectId) {
    let source = MemorySource::default();
    let id = ObjectId::new();
    *source.0.first.lock().unwrap() = Some(id);
    (source, MemoryTier::default(), id)
}

fn queries(source: &MemorySource) -> usize {
    source.0.queries.load(Ordering::SeqCst) + source.0.revalidations.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_fresh_value_is_read_once_for_everyone() {
    let (source, tier, id) = seeded();
    *source.0.latency_ms.lock().unwrap() = 50;
    let cache = cache(&source, &tier);
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.first_write().await })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), Some(id));
    }
    tokio::time::advance(FRESH / 2).await;
    assert_eq!(cache.first_write().await.unwrap(), Some(id));
    assert_eq!(queries(&source), 1);
    assert!(
        tier.0.value.lock().unwrap().is_some(),
        "shared with the other pods"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_value_is_served_while_one_refresh_revalidates_it() {
    let (source, tier, id) = seeded();
    *source.0.latency_ms.lock().unwrap() = 1000;
    let cache = cache(&source, &tier);
    cache.first_write().await.unwrap();
    tokio::time::advance(FRESH + Duration::from_millis(1)).await;
    let t0 = Instant::now();
    for _ in 0..10 {
        assert_eq!(cache.first_write().await.unwrap(), Some(id));
    }
    assert!(
        t0.elapsed() < Duration::from_millis(10),
        "no request waited on the refresh"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(source.0.queries.load(Ordering::SeqCst), 1);
    assert_eq!(
        source.0.revalidations.load(Ordering::SeqCst),
        1,
        "one refresh, by _id"
    );
}

#[tokio::test(start_paused = true)]
async fn past_stale_nothing_is_served_even_after_failed_refreshes() {
    let (source, tier, _) = seeded();
    let cache = cache(&source, &tier);
    cache.first_write().await.unwrap();
    source.0.down.store(true, Ordering::SeqCst);
    *tier.0.value.lock().unwrap() = None;
    // Refreshes keep failing; each failure must not make the value look younger.
    for _ in 0..13 {
        tokio::time::advance(FRESH).await;
        let _ = cache.first_write().await;
        tokio::task::yield_now().await;
    }
    assert!(STALE <= FRESH * 13);
    assert!(
        cache.first_write().await.is_err(),
        "a value past CACHE_STALE_MS was served"
    );
}

#[tokio::test(start_paused = true)]
async fn empty_is_brief_and_never_outlives_a_stored_write() {
    let source = MemorySource::default();
    let tier = MemoryTier::default();
    let cache = cache(&source, &tier);
    assert_eq!(cache.first_write().await.unwrap(), None);
    assert!(
        cache.peek().await.is_none(),
        "empty is shared in L2, not kept in L1"
    );
    // This pod's documents are acknowledged: from now on "empty" is out of date.
    let id = ObjectId::new();
    *source.0.first.lock().unwrap() = Some(id);
    cache.note_stored().await;
    assert_eq!(cache.first_write().await.unwrap(), Some(id));
    assert_eq!(source.0.queries.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_takes_the_holders_value_instead_of_querying() {
    let (source, tier, id) = seeded();
    *tier.0.lock.lock().unwrap() = Some("pod-b:7".into());
    let cache = cache(&source, &tier);
    let reader = {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move { cache.first_write().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Pod B finishes its refresh.
    let now = Clock::new().now_ms();
    *tier.0.value.lock().unwrap() = Some(CachedRead {
        id: Some(id),
        fetched_at_ms: now,
    });
    *tier.0.lock.lock().unwrap() = None;
    assert_eq!(reader.await.unwrap().unwrap(), Some(id));
    assert_eq!(queries(&source), 0);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_died_costs_a_waiter_at_most_the_lock_ttl() {
    let (source, tier, id) = seeded();
    *tier.0.lock.lock().unwrap() = Some("pod-gone:1".into());
    let cache = cache(&source, &tier);
    let t0 = Instant::now();
    assert_eq!(cache.first_write().await.unwrap(), Some(id));
    assert!(t0.elapsed() <= LOCK_TTL + Duration::from_millis(100));
    assert_eq!(queries(&source), 1);
}

#[tokio::test(start_paused = true)]
async fn a_released_lock_is_taken_by_a_waiter() {
    let (source, tier, id) = seeded();
    *tier.0.lock.lock().unwrap() = Some("pod-b:1".into());
    let cache = cache(&source, &tier);
    let reader = {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move { cache.first_write().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Pod B's refresh failed and it let go without sharing anything.
    *tier.0.lock.lock().unwrap() = None;
    let t0 = Instant::now();
    assert_eq!(reader.await.unwrap().unwrap(), Some(id));
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "waited for the TTL instead"
    );
    assert_eq!(queries(&source), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_caller_does_not_take_the_load_down_with_it() {
    let (source, tier, id) = seeded();
    *source.0.latency_ms.lock().unwrap() = 500;
    let cache = cache(&source, &tier);
    let first = {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move { cache.first_write().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.abort(); // shed, or timed out
    assert_eq!(cache.first_write().await.unwrap(), Some(id));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(queries(&source), 1, "the second caller re-queried");
    assert!(
        tier.0.lock.lock().unwrap().is_none(),
        "the lock was orphaned"
    );
}

#[tokio::test(start_paused = true)]
async fn a_load_that_panicked_is_not_shared_with_later_readers() {
    let (source, tier, id) = seeded();
    *source.0.latency_ms.lock().unwrap() = 50;
    source.0.panics.store(1, Ordering::SeqCst);
    let cache = cache(&source, &tier);
    assert!(
        cache.first_write().await.is_err(),
        "the readers of the load that panicked have no answer"
    );
    let t0 = Instant::now();
    assert_eq!(
        cache.first_write().await.unwrap(),
        Some(id),
        "every read after the panic fails"
    );
    assert!(
        t0.elapsed() < LOCK_TTL / 2,
        "the load that panicked kept the refresh lock"
    );
    assert!(
        tier.0.lock.lock().unwrap().is_none(),
        "the lock was orphaned"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_panicked_does_not_stop_later_refreshes() {
    let (source, tier, id) = seeded();
    *source.0.latency_ms.lock().unwrap() = 1000;
    let cache = cache(&source, &tier);
    cache.first_write().await.unwrap();
    source.0.panics.store(1, Ordering::SeqCst);
    // A read a second for twice CACHE_STALE_MS: the first refresh panics; the next ones
    // must keep the value fresh, or a read past CACHE_STALE_MS waits on MongoDB.
    for second in 0..2 * STALE.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        assert_eq!(cache.first_write().await.unwrap(), Some(id));
        assert!(
            t0.elapsed() < Duration::from_millis(10),
            "read {second} waited on MongoDB: refreshes stopped"
        );
    }
    assert_eq!(
        source.0.panics.load(Ordering::SeqCst),
        0,
        "no refresh panicked"
    );
    assert!(source.0.revalidations.load(Ordering::SeqCst) > 2);
}

#[tokio::test(start_paused = true)]
async fn a_shared_value_stamped_in_the_future_is_checked_before_it_is_served() {
    let (source, tier, id) = seeded();
    let cache = cache(&source, &tier);
    // Shared by a pod whose clock runs an hour ahead, and naming a document MongoDB does
    // not hold (say the collection was dropped and Redis kept its key).
    let ahead = Clock::new().now_ms() + 3_600_000;
    *tier.0.value.lock().unwrap() = Some(CachedRead {
        id: Some(ObjectId::new()),
        fetched_at_ms: ahead,
    });
    assert_eq!(
        cache.first_write().await.unwrap(),
        Some(id),
        "an unchecked answer was served"
    );
    assert_eq!(
        source.0.revalidations.load(Ordering::SeqCst),
        1,
        "its id was not checked"
    );
    assert_eq!(source.0.queries.load(Ordering::SeqCst), 1);
    let shared = tier.0.value.lock().unwrap().expect("shared again");
    assert_eq!(shared.id, Some(id));
    assert!(
        shared.fetched_at_ms < ahead,
        "the shared stamp was not replaced"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shared_value_past_stale_is_not_served_while_another_pod_refreshes() {
    let (source, tier, id) = seeded();
    let cache = cache(&source, &tier);
    // Stamped by a pod whose clock runs behind, so to this pod it is past CACHE_STALE_MS.
    let old = Clock::new().now_ms() - (STALE + FRESH).as_millis() as u64;
    *tier.0.value.lock().unwrap() = Some(CachedRead {
        id: Some(ObjectId::new()),
        fetched_at_ms: old,
    });
    *tier.0.lock.lock().unwrap() = Some("pod-b:3".into());
    let reader = {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move { cache.first_write().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Pod B finishes its refresh.
    *tier.0.value.lock().unwrap() = Some(CachedRead {
        id: Some(id),
        fetched_at_ms: Clock::new().now_ms(),
    });
    *tier.0.lock.lock().unwrap() = None;
    assert_eq!(
        reader.await.unwrap().unwrap(),
        Some(id),
        "a value past CACHE_STALE_MS was served"
    );
}

/// `Shared::get_read` reads a value that does not parse as absent (a miss); these are the
/// values it must not parse.
#[test]
fn a_shared_value_with_a_bad_id_does_not_parse() {
    for bad in [
        r#"{"id":"not an id","fetched_at_ms":1}"#,
        r#"{"id":{"$oid":"0123"},"fetched_at_ms":1}"#,
        r#"{"id":{"$oid":"zzzzzzzzzzzzzzzzzzzzzzzz"},"fetched_at_ms":1}"#,
        r#"{"id":17,"fetched_at_ms":1}"#,
        r#"{"id":null,"fetched_at_ms":-1}"#,
    ] {
        assert!(
            serde_json::from_str::<CachedRead>(bad).is_err(),
            "{bad} parsed"
        );
    }
    let good = CachedRead {
        id: Some(ObjectId::new()),
        fetched_at_ms: 1,
    };
    let json = serde_json::to_string(&good).unwrap();
    assert_eq!(serde_json::from_str::<CachedRead>(&json).unwrap(), good);
}

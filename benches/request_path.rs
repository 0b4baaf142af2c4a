//! The CPU one `/api/data` request costs sluice, piece by piece, with no I/O in the way.
//!
//! The database sees a few commands a second whatever the load, so at 5,000 req/s what
//! decides how many replicas are needed is this per-request CPU. Each benchmark goes
//! through sluice's public API, the same code a request runs, with the database and
//! Redis replaced at the two seams (`reads::Source`/`SharedTier`, `writes::Sink`) by in-memory
//! ones that answer at once:
//!
//! - `reads/5_l1_hits`: the five reads, served from L1 by [`ReadCache::first_write`].
//!   `reads/5_moka_gets` is moka alone on a value of the same shape, for scale.
//! - `records/new_batch`: the five documents, 512 random characters of payload each,
//!   encoded to BSON.
//! - `response/encode`: the response JSON, written into a hyper response.
//! - `writes/submit_to_ack`: one request's documents handed to [`Writer::submit`],
//!   gathered into a batch by the flusher, "stored" by a sink that takes no time, and
//!   acknowledged back: the queue, the batching and the hand-offs, all of the write path
//!   but the database itself.
//!
//! Run with `cargo bench --bench request_path`.

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::RawDocumentBuf;
use criterion::{criterion_group, criterion_main, Criterion};
use moka::future::Cache;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use sluice::config::{ReadSettings, WriteSettings};
use sluice::http::DataAnswer;
use sluice::metrics::Metrics;
use sluice::reads::{ReadCache, SharedTier, Source};
use sluice::record::{self, PER_REQUEST};
use sluice::shared::{CachedRead, SharedError};
use sluice::store::{Rejected, StoreError};
use sluice::writes::{Sink, Writer};

const LONG: Duration = Duration::from_secs(3600);

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A database that always has the same first document.
struct Fixed(ObjectId);

impl Source for Fixed {
    async fn first_write(&self) -> Result<Option<ObjectId>, StoreError> {
        Ok(Some(self.0))
    }

    async fn still_stored(&self, _id: ObjectId) -> Result<bool, StoreError> {
        Ok(true)
    }
}

/// A Redis that is never there: L1 alone serves.
struct NoRedis;

impl SharedTier for NoRedis {
    async fn get(&self) -> Result<Option<CachedRead>, SharedError> {
        Ok(None)
    }
    async fn put(&self, _read: CachedRead, _ttl: Duration) -> Result<(), SharedError> {
        Ok(())
    }
    async fn forget_empty(&self) -> Result<(), SharedError> {
        Ok(())
    }
    async fn try_lock(&self, _holder: &str, _ttl: Duration) -> Result<bool, SharedError> {
        Ok(true)
    }
    async fn unlock(&self, _holder: &str) -> Result<(), SharedError> {
        Ok(())
    }
}

/// A database that stores everything at once.
struct Instant0;

impl Sink for Instant0 {
    type Paid = ();
    async fn pay(&self) {}
    async fn insert(
        &self,
        _docs: Arc<[RawDocumentBuf]>,
        _which: Vec<usize>,
        _paid: (),
        _limit: Duration,
    ) -> Result<Rejected, StoreError> {
        Ok(Rejected::default())
    }
}

/// The time `iters` requests' reads take on `rt`, each request `PER_REQUEST` awaits of
/// `read` one after the other, as a request makes them: one loop for the L1 and the
/// moka benchmarks, so that the second stays a fair scale for the first.
fn time_reads<F: Future>(rt: &Runtime, iters: u64, read: impl Fn() -> F) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            for _ in 0..PER_REQUEST {
                black_box(read().await);
            }
        }
        start.elapsed()
    })
}

fn reads(c: &mut Criterion) {
    let rt = runtime(2);
    let mut group = c.benchmark_group("reads");

    let cache = rt.block_on(async {
        let cache = Arc::new(ReadCache::new(
            ReadSettings {
                fresh: LONG,
                stale: 2 * LONG,
                empty: Duration::from_millis(250),
            },
            Fixed(ObjectId::new()),
            NoRedis,
            "bench".into(),
            Arc::new(Metrics::new()),
        ));
        cache.first_write().await.expect("a first read");
        cache
    });
    group.bench_function("5_l1_hits", |b| {
        b.iter_custom(|iters| {
            time_reads(&rt, iters, || async {
                cache.first_write().await.expect("an L1 hit")
            })
        })
    });
    // moka alone, on a value shaped like L1's entry (the id, when it was fetched, when to
    // refresh), with L1's settings.
    let moka: Cache<(), (Option<ObjectId>, u64, Instant)> = Cache::builder()
        .max_capacity(1)
        .time_to_live(2 * LONG)
        .build();
    rt.block_on(moka.insert((), (Some(ObjectId::new()), 0, Instant::now() + LONG)));
    group.bench_function("5_moka_gets", |b| {
        b.iter_custom(|iters| {
            time_reads(&rt, iters, || async { moka.get(&()).await.expect("a hit") })
        })
    });
    group.finish();
}

fn records(c: &mut Criterion) {
    c.bench_function("records/new_batch", |b| b.iter(|| record::new_batch(None)));
}

fn response(c: &mut Criterion) {
    let (ids, _) = record::new_batch(None);
    let reads = [Some(ObjectId::new()); PER_REQUEST];
    // The handler's own 200 answer.
    c.bench_function("response/encode", |b| {
        b.iter(|| DataAnswer::new(black_box(reads), black_box(ids)).into_response())
    });
}

fn writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("writes");
    group.sample_size(30);
    group.bench_function("submit_to_ack", |b| {
        b.iter_custom(|iters| {
            // One flusher thread, and this thread as the requests: the two cores.
            let rt = runtime(1);
            let (writer, _flusher) = rt.block_on(async {
                Writer::start(
                    WriteSettings {
                        batch_max_docs: 2000,
                        linger: Duration::ZERO,
                        queue_capacity: 1 << 20,
                        enqueue_timeout: LONG,
                        write_timeout: 2 * LONG,
                        flush_concurrency: 1,
                    },
                    Instant0,
                    Arc::new(Metrics::new()),
                    CancellationToken::new(),
                )
            });
            let writer = Arc::new(writer);
            let batches: Vec<_> = (0..iters).map(|_| record::new_batch(None).1).collect();
            let start = Instant::now();
            rt.block_on(async {
                let acks: Vec<_> = batches
                    .into_iter()
                    .map(|docs| {
                        let writer = Arc::clone(&writer);
                        tokio::spawn(async move { writer.submit(docs).await })
                    })
                    .collect();
                for ack in acks {
                    ack.await.expect("no panic").expect("stored");
                }
            });
            let elapsed = start.elapsed();
            rt.shutdown_background();
            elapsed
        })
    });
    group.finish();
}

criterion_group!(benches, reads, records, response, writes);
criterion_main!(benches);

//! The CPU one `/api/data` request costs sluice, piece by piece, with no I/O in the way.
//!
//! The database sees a few commands a second whatever the load, so at 5,000 req/s what
//! decides how many replicas are needed is this per-request CPU. Each benchmark goes
//! through sluice's public API, the same code a request runs:
//!
//! - `reads/5_l1_hits`: the five reads, served from L1 by [`ReadCache::first_write`]. L1 is
//!   filled the way a pod fills it, from a value another pod shared in Redis, so this
//!   benchmark starts a throwaway `redis-server` (skipped, loudly, when there is none).
//!   `reads/5_moka_gets` is moka alone on a value of the same shape, for scale.
//! - `records/new_batch`: the five documents, 512 random characters of payload each.
//! - `response/encode`: the response JSON, serialised into a hyper response.
//! - `writes/submit_to_batch`: one request's documents handed to [`Writer::submit`] and
//!   gathered into a batch by the flusher. The writer is given no flush slot, so it
//!   gathers forever and never reaches the database: what is timed is the queue and the
//!   gathering, the part that grows with load. A sample is timed from the first
//!   submission until the flusher has taken the last one off the queue.
//!
//! Run with `cargo bench --bench request_path`.

use std::future::Future;
use std::hint::black_box;
use std::net::TcpListener;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion};
use hyper::StatusCode;
use moka::future::Cache;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use sluice::budget::Budget;
use sluice::config::Cli;
use sluice::http::json_response;
use sluice::metrics::Metrics;
use sluice::reads::{ReadCache, ReadSettings};
use sluice::record::{self, PER_REQUEST};
use sluice::shared::{CachedRead, Shared};
use sluice::store::Store;
use sluice::writes::{WriteSettings, Writer};

/// Nothing listens here: the store connects lazily and these benchmarks never use it.
const NO_DATABASE: &str = "mongodb://127.0.0.1:1/assessmentdb";
const LONG: Duration = Duration::from_secs(3600);

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` for the length of the benchmark, stopped when dropped.
struct Redis(Child);

impl Redis {
    fn start(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // Connect only once it listens: the client's first failed attempt is not retried
        // at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Some(Redis(child));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis(child))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn store(redis_url: &str, metrics: &Arc<Metrics>) -> Arc<Store> {
    let cli = Cli::try_parse_from([
        "sluice",
        "--mongo-uri",
        NO_DATABASE,
        "--redis-url",
        redis_url,
    ])
    .expect("valid settings");
    Arc::new(
        Store::connect(&cli.config, Arc::clone(metrics))
            .await
            .expect("a lazily connecting store"),
    )
}

fn reads(c: &mut Criterion) {
    let rt = runtime(2);
    let mut group = c.benchmark_group("reads");

    let port = free_port();
    let redis_url = format!("redis://127.0.0.1:{port}");
    let redis = Redis::start(port);
    let cache: Result<Arc<ReadCache>, String> = rt.block_on(async {
        if redis.is_none() {
            return Err("redis-server could not be started (apt-get install redis-server)".into());
        }
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(
            Shared::connect(&redis_url, Duration::from_secs(1)).map_err(|e| e.to_string())?,
        );
        if !shared.wait_connected(Duration::from_secs(5)).await {
            return Err(format!(
                "redis-server on port {port} did not answer within 5 s"
            ));
        }
        // What another pod's refresh leaves in L2; this pod's first read copies it to L1.
        let id = ObjectId::new();
        shared
            .put_read(&CachedRead::now(Some(id)), LONG)
            .await
            .map_err(|e| e.to_string())?;
        let cache = Arc::new(ReadCache::new(
            ReadSettings {
                fresh: LONG,
                stale: 2 * LONG,
                empty: Duration::from_millis(250),
            },
            shared,
            store(&redis_url, &metrics).await,
            Arc::new(Budget::new(50, 1, Arc::clone(&metrics))),
            "bench".into(),
            metrics,
        ));
        let first = cache.first_write().await.map_err(|e| e.to_string())?;
        if first != Some(id) {
            return Err(format!("L1 was not filled from L2: got {first:?}"));
        }
        Ok(cache)
    });
    match cache {
        Ok(cache) => {
            group.bench_function("5_l1_hits", |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            for _ in 0..PER_REQUEST {
                                black_box(cache.first_write().await.expect("an L1 hit"));
                            }
                        }
                        start.elapsed()
                    })
                })
            });
        }
        Err(why) => {
            eprintln!("\n!!! reads/5_l1_hits SKIPPED: {why}. reads/5_moka_gets still runs.\n")
        }
    }
    drop(redis);

    // moka alone, on a value shaped like L1's entry (the id, when it was fetched, when to
    // refresh), with L1's settings.
    let moka: Cache<(), (Option<ObjectId>, u64, Instant)> = Cache::builder()
        .max_capacity(1)
        .time_to_live(2 * LONG)
        .build();
    rt.block_on(moka.insert((), (Some(ObjectId::new()), 0, Instant::now() + LONG)));
    group.bench_function("5_moka_gets", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..PER_REQUEST {
                        black_box(moka.get(&()).await.expect("a hit"));
                    }
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn records(c: &mut Criterion) {
    c.bench_function("records/new_batch", |b| b.iter(record::new_batch));
}

fn response(c: &mut Criterion) {
    let (ids, _) = record::new_batch();
    let reads = [Some(ObjectId::new()); PER_REQUEST];
    // The same body `/api/data` answers with, built the same way.
    c.bench_function("response/encode", |b| {
        b.iter(|| {
            json_response(
                StatusCode::OK,
                &json!({
                    "status": "success",
                    "reads": black_box(reads).map(|id| id.map(|id| id.to_hex())),
                    "writes": black_box(ids).map(|id| id.to_hex()),
                    "timestamp": record::timestamp(),
                }),
            )
        })
    });
}

fn writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("writes");
    group.sample_size(30);
    group.bench_function("submit_to_batch", |b| {
        b.iter_custom(|iters| {
            // One flusher thread, and this thread as the requests: the two cores.
            let rt = runtime(1);
            let _context = rt.enter();
            let metrics = Arc::new(Metrics::new());
            let store = rt.block_on(store("redis://127.0.0.1:1", &metrics));
            let budget = Arc::new(Budget::new(50, 1, Arc::clone(&metrics)));
            let (writer, _flusher) = Writer::start(
                WriteSettings {
                    batch_max_docs: usize::MAX,
                    linger: Duration::ZERO,
                    queue_capacity: 1 << 24,
                    enqueue_timeout: LONG,
                    write_timeout: LONG,
                    // No slot ever frees, so the flusher gathers and never flushes.
                    flush_concurrency: 0,
                },
                store,
                budget,
                metrics,
                CancellationToken::new(),
            );
            let batches: Vec<_> = (0..iters).map(|_| record::new_batch().1).collect();
            let mut waiting: Vec<Pin<Box<dyn Future<Output = _>>>> =
                Vec::with_capacity(batches.len());
            let mut cx = Context::from_waker(Waker::noop());

            let start = Instant::now();
            for docs in batches {
                // Polled once: the request enqueues and then waits for its ack, as in the
                // handler.
                let mut submit = Box::pin(writer.submit(docs));
                assert!(submit.as_mut().poll(&mut cx).is_pending());
                waiting.push(submit);
            }
            while writer.queue_depth() > 0 {
                std::hint::spin_loop();
            }
            let elapsed = start.elapsed();

            drop(waiting);
            drop(writer);
            drop(_context);
            rt.shutdown_background();
            elapsed
        })
    });
    group.finish();
}

criterion_group!(benches, reads, records, response, writes);
criterion_main!(benches);

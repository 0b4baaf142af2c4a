//! The flusher: gathers queued requests into batches and sees each batch stored.
//!
//! The rules (each unit-tested under paused time in `tests.rs`):
//! - a batch leaves `linger` after its first request, or at once when full (documents or
//!   bytes); while it waits for a flush slot and a budget token it keeps gathering;
//! - a request that expired or whose client left is dropped before each attempt;
//! - a partial failure is mapped back to the requests that own the failed documents,
//!   which alone are retried; a request is answered as soon as all of its documents are;
//! - a document the database refuses for good fails its request at once;
//! - no attempt is sent with less time left than an insert takes (twice the last one's
//!   latency, at least [`MIN_ATTEMPT`]): it could only time out and waste a token;
//! - a batch the database refuses whole shuts the gate on new requests for a moment;
//! - past the last deadline every request still waiting is answered 503.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bson::RawDocumentBuf;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Gate, Job, NotStored, Refused, Sink, WriteError, MAX_BATCH_BYTES};
use crate::config::WriteSettings;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// The shortest time limit an insert attempt is sent with.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(50);
/// ... and never needs more than this, however slow the last insert was.
const MAX_MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// Requests gathered for one command.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    docs: usize,
    bytes: usize,
}

impl Batch {
    /// Whether `job` would still fit (a batch always takes its first request).
    fn fits(&self, job: &Job, settings: &WriteSettings) -> bool {
        self.jobs.is_empty()
            || (self.docs + job.docs.len() <= settings.batch_max_docs
                && self.bytes + job.bytes <= MAX_BATCH_BYTES)
    }

    fn full(&self, settings: &WriteSettings) -> bool {
        self.docs >= settings.batch_max_docs || self.bytes >= MAX_BATCH_BYTES
    }

    /// The last deadline among its requests: past it, nobody waits for this batch.
    fn deadline(&self) -> Option<Instant> {
        self.jobs.iter().map(|j| j.deadline).max()
    }

    /// Leaves out the requests whose clients stopped waiting.
    fn drop_expired(&mut self) {
        let now = Instant::now();
        self.jobs.retain(|j| !j.ack.is_closed() && j.deadline > now);
        self.docs = self.jobs.iter().map(|j| j.docs.len()).sum();
        self.bytes = self.jobs.iter().map(|j| j.bytes).sum();
    }

    /// Adds a request, unless its client stopped waiting: it timed out in the queue
    /// (its `submit` has answered it) or disconnected. Its documents would only take
    /// room that live requests need.
    fn push(&mut self, job: Job) {
        if job.ack.is_closed() || job.deadline <= Instant::now() {
            return;
        }
        self.docs += job.docs.len();
        self.bytes += job.bytes;
        self.jobs.push(job);
    }
}

struct Flusher<K> {
    rx: mpsc::Receiver<Job>,
    /// A request that did not fit the last batch; it starts the next one.
    carry: Option<Job>,
    sink: Arc<K>,
    settings: WriteSettings,
    metrics: Arc<Metrics>,
    /// The last successful insert's latency, in microseconds.
    last_insert_us: Arc<AtomicU64>,
    gate: Arc<Gate>,
}

pub(super) async fn run<K: Sink>(
    rx: mpsc::Receiver<Job>,
    sink: K,
    settings: WriteSettings,
    metrics: Arc<Metrics>,
    gate: Arc<Gate>,
    stop: CancellationToken,
) {
    let flusher = Flusher {
        rx,
        carry: None,
        sink: Arc::new(sink),
        settings,
        metrics,
        last_insert_us: Arc::new(AtomicU64::new(0)),
        gate,
    };
    flusher.run(stop).await;
}

impl<K: Sink> Flusher<K> {
    async fn run(mut self, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.flush_concurrency));
        let mut flushes = JoinSet::new();
        let mut closing = false;
        loop {
            let first = match self.carry.take() {
                Some(job) => job,
                None => tokio::select! {
                    job = self.rx.recv() => match job {
                        Some(job) => job,
                        None => break,
                    },
                    _ = stop.cancelled(), if !closing => {
                        // Refuse new work; what is queued already is still flushed below.
                        self.rx.close();
                        closing = true;
                        continue;
                    }
                },
            };
            let mut batch = Batch::default();
            batch.push(first);
            if batch.jobs.is_empty() {
                continue;
            }
            self.linger(&mut batch).await;
            let slot = self
                .gather(&mut batch, Arc::clone(&slots).acquire_owned())
                .await
                .expect("the semaphore is never closed");
            // A token may not come before every request has expired (a draining pod cut
            // off from Redis gets none): then the batch is dropped, its requests having
            // been answered 503 by `submit`, so the writer can still finish.
            let paid = loop {
                let Some(until) = batch.deadline() else {
                    break None;
                };
                let sink = Arc::clone(&self.sink);
                let pay = async move { tokio::time::timeout_at(until, sink.pay()).await.ok() };
                match self.gather(&mut batch, pay).await {
                    Some(paid) => break Some(paid),
                    None => batch.drop_expired(),
                }
            };
            let Some(paid) = paid else {
                continue;
            };
            let flush = Flush {
                sink: Arc::clone(&self.sink),
                metrics: Arc::clone(&self.metrics),
                last_insert_us: Arc::clone(&self.last_insert_us),
                gate: Arc::clone(&self.gate),
            };
            flushes.spawn(flush.run(batch, paid, slot));
            while flushes.try_join_next().is_some() {}
        }
        while flushes.join_next().await.is_some() {}
        tracing::info!("write queue drained");
    }

    /// Gathers for `linger` after the batch's first request, or until it is full.
    async fn linger(&mut self, batch: &mut Batch) {
        let until = tokio::time::sleep(self.settings.linger);
        tokio::pin!(until);
        self.fill(batch, until).await;
    }

    /// Adds waiting requests to `batch` until `until` completes or the batch is full,
    /// then waits for `until` alone.
    async fn gather<F: Future>(&mut self, batch: &mut Batch, until: F) -> F::Output {
        tokio::pin!(until);
        match self.fill(batch, until.as_mut()).await {
            Some(out) => out,
            None => until.await,
        }
    }

    /// Adds waiting requests to `batch` until `until` completes (its output) or the
    /// batch is full (`None`).
    async fn fill<F: Future>(
        &mut self,
        batch: &mut Batch,
        mut until: Pin<&mut F>,
    ) -> Option<F::Output> {
        while self.carry.is_none() && !batch.full(&self.settings) {
            tokio::select! {
                biased;
                out = &mut until => return Some(out),
                job = self.rx.recv() => match job {
                    Some(job) if batch.fits(&job, &self.settings) => batch.push(job),
                    Some(job) => self.carry = Some(job),
                    None => break,
                },
            }
        }
        None
    }
}

/// One batch's journey to the database, retries included.
struct Flush<K> {
    sink: Arc<K>,
    metrics: Arc<Metrics>,
    last_insert_us: Arc<AtomicU64>,
    gate: Arc<Gate>,
}

/// A request in a batch, until it is answered.
struct Waiter {
    /// Its documents not yet stored.
    left: usize,
    /// Taken when the request is answered, so it is answered once.
    ack: Option<oneshot::Sender<Result<(), WriteError>>>,
    deadline: Instant,
}

impl Waiter {
    fn answer(&mut self, result: Result<(), WriteError>) {
        if let Some(ack) = self.ack.take() {
            // A closed receiver means `submit` already answered the client.
            let _ = ack.send(result);
        }
    }

    /// Still owed an answer by this batch: not answered, not expired, client waiting.
    fn waiting(&self, now: Instant) -> bool {
        self.ack.as_ref().is_some_and(|ack| !ack.is_closed()) && self.deadline > now
    }
}

impl<K: Sink> Flush<K> {
    async fn run(self, batch: Batch, paid: K::Paid, _slot: OwnedSemaphorePermit) {
        let started = Instant::now();
        self.metrics.batch_documents.observe(batch.docs as f64);
        let mut docs: Vec<RawDocumentBuf> = Vec::with_capacity(batch.docs);
        // For each document, the index of its request in `waiters`.
        let mut owner = Vec::with_capacity(batch.docs);
        let mut waiters = Vec::with_capacity(batch.jobs.len());
        for (j, job) in batch.jobs.into_iter().enumerate() {
            owner.extend(std::iter::repeat_n(j, job.docs.len()));
            waiters.push(Waiter {
                left: job.docs.len(),
                ack: Some(job.ack),
                deadline: job.deadline,
            });
            docs.extend(job.docs);
        }
        let docs: Arc<[RawDocumentBuf]> = docs.into();
        // Positions in `docs` still to be stored, ascending.
        let mut todo: Vec<usize> = (0..docs.len()).collect();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times()
            .with_jitter()
            .build();
        let mut paid = Some(paid);
        let mut reason = NotStored::NoTimeLeft;
        let mut refusal = Refused::Document;
        loop {
            let paid_now = match paid.take() {
                Some(p) => p,
                None => {
                    let now = Instant::now();
                    let waiting = todo.iter().filter(|&&i| waiters[owner[i]].waiting(now));
                    let Some(until) = waiting.map(|&i| waiters[owner[i]].deadline).max() else {
                        break;
                    };
                    match tokio::time::timeout_at(until, self.sink.pay()).await {
                        Ok(p) => p,
                        Err(_) => {
                            give_up(&mut waiters, &NotStored::NoToken);
                            break;
                        }
                    }
                }
            };
            // Leave out the requests nobody waits for any more, then give the command
            // until the last deadline among the rest: a request whose own deadline
            // passes meanwhile has been answered 503 by `submit`.
            let now = Instant::now();
            todo.retain(|&i| waiters[owner[i]].waiting(now));
            let Some(deadline) = todo.iter().map(|&i| waiters[owner[i]].deadline).max() else {
                break;
            };
            let limit = deadline.saturating_duration_since(now);
            if limit < self.min_attempt() {
                give_up(&mut waiters, &reason);
                break;
            }
            let sent = Instant::now();
            let outcome = self
                .sink
                .insert(Arc::clone(&docs), todo.clone(), paid_now, limit)
                .await;
            let outcome_answered = outcome.is_ok();
            // A reply naming a document the command did not hold cannot be mapped back to
            // a request: the batch counts as failed and is sent again, never credited.
            let outcome = outcome.and_then(|rejected| {
                match rejected
                    .retry
                    .iter()
                    .chain(&rejected.refused)
                    .find(|&&i| i >= todo.len())
                {
                    Some(&i) => Err(StoreError::Unavailable(format!(
                        "the reply named document {i} of an insert of {}",
                        todo.len()
                    ))),
                    None => Ok(rejected),
                }
            });
            let (retry, refused) = match outcome {
                Ok(rejected) => {
                    let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.last_insert_us.store(us, Ordering::Relaxed);
                    reason = NotStored::Rejected;
                    let to_todo = |v: Vec<usize>| {
                        let mut v: Vec<usize> = v.into_iter().map(|i| todo[i]).collect();
                        v.sort_unstable();
                        v
                    };
                    (to_todo(rejected.retry), to_todo(rejected.refused))
                }
                Err(e) if e.is_permanent() => {
                    refusal = Refused::Command(e);
                    (Vec::new(), todo.clone())
                }
                Err(e) => {
                    reason = NotStored::Store(e);
                    (todo.clone(), Vec::new())
                }
            };
            for &i in &refused {
                waiters[owner[i]].answer(Err(WriteError::Refused(refusal.clone())));
            }
            let stored = todo.len() - retry.len() - refused.len();
            self.metrics.documents_stored.inc_by(stored as u64);
            if stored > 0 {
                self.gate.open();
            } else if outcome_answered && retry.len() == todo.len() {
                // The database answered and stored none of it: it is refusing writes.
                self.gate.shut();
            }
            // Credit stored documents to their requests; answer the complete ones.
            for &i in &todo {
                if retry.binary_search(&i).is_err() && refused.binary_search(&i).is_err() {
                    let waiter = &mut waiters[owner[i]];
                    waiter.left -= 1;
                    if waiter.left == 0 {
                        waiter.answer(Ok(()));
                    }
                }
            }
            todo = retry;
            if todo.is_empty() {
                break;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(1));
            if Instant::now() + delay >= deadline {
                give_up(&mut waiters, &reason);
                break;
            }
            self.metrics.write_retries.inc();
            tracing::debug!(documents = todo.len(), ?delay, %reason, "retrying insert");
            tokio::time::sleep(delay).await;
        }
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Less time than this left, an attempt could only time out.
    fn min_attempt(&self) -> Duration {
        let last = Duration::from_micros(self.last_insert_us.load(Ordering::Relaxed));
        (2 * last).clamp(MIN_ATTEMPT, MAX_MIN_ATTEMPT)
    }
}

/// Answers every request still waiting with 503: its documents were not stored in time
/// (some may have been; none is acknowledged).
fn give_up(waiters: &mut [Waiter], reason: &NotStored) {
    let now = Instant::now();
    let mut answered = 0;
    for waiter in waiters.iter_mut().filter(|w| w.waiting(now)) {
        waiter.answer(Err(WriteError::NotStored(reason.clone())));
        answered += 1;
    }
    if answered > 0 {
        tracing::warn!(
            requests = answered,
            %reason,
            "documents not stored before their deadline; answered 503"
        );
    }
}

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
    /// Sends the batch, paying again for each retry, until every document is stored or
    /// refused, or no request is left that can still be answered in time.
    async fn run(self, batch: Batch, paid: K::Paid, _slot: OwnedSemaphorePermit) {
        let started = Instant::now();
        self.metrics.batch_documents.observe(batch.docs as f64);
        let (mut ledger, docs) = Ledger::new(batch);
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times()
            .with_jitter()
            .build();
        let mut paid = Some(paid);
        let mut reason = NotStored::NoTimeLeft;
        loop {
            let paid_now = match paid.take() {
                Some(p) => p,
                None => {
                    let Some(until) = ledger.last_deadline(Instant::now()) else {
                        break;
                    };
                    match tokio::time::timeout_at(until, self.sink.pay()).await {
                        Ok(p) => p,
                        Err(_) => {
                            ledger.give_up(&NotStored::NoToken);
                            break;
                        }
                    }
                }
            };
            // Leave out the requests nobody waits for any more, then give the command
            // until the last deadline among the rest: a request whose own deadline
            // passes meanwhile has been answered 503 by `submit`.
            let now = Instant::now();
            ledger.forget_unwaited(now);
            let Some(deadline) = ledger.last_deadline(now) else {
                break;
            };
            let limit = deadline.saturating_duration_since(now);
            if limit < self.min_attempt() {
                ledger.give_up(&reason);
                break;
            }
            let attempt = self.attempt(&docs, &ledger.todo, paid_now, limit).await;
            if let Some(why) = attempt.not_stored.clone() {
                reason = why;
            }
            ledger.refuse(&attempt);
            let sent = ledger.todo.len();
            let stored = sent - attempt.retry.len() - attempt.refused.len();
            self.metrics.documents_stored.inc_by(stored as u64);
            if stored > 0 {
                self.gate.open();
            } else if attempt.answered && attempt.retry.len() == sent {
                // The database answered and stored none of it: it is refusing writes.
                self.gate.shut();
            }
            ledger.credit(&attempt);
            if ledger.todo.is_empty() {
                break;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(1));
            if Instant::now() + delay >= deadline {
                ledger.give_up(&reason);
                break;
            }
            self.metrics.write_retries.inc();
            tracing::debug!(documents = ledger.todo.len(), ?delay, %reason, "retrying insert");
            tokio::time::sleep(delay).await;
        }
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// One insert of the documents at `todo` (positions in `docs`) within `limit`, and
    /// what its reply means for them.
    async fn attempt(
        &self,
        docs: &Arc<[RawDocumentBuf]>,
        todo: &[usize],
        paid: K::Paid,
        limit: Duration,
    ) -> Attempt {
        let sent = Instant::now();
        let outcome = self
            .sink
            .insert(Arc::clone(docs), todo.to_vec(), paid, limit)
            .await;
        let answered = outcome.is_ok();
        // A reply naming a document the command did not hold cannot be mapped back to a
        // request: the batch counts as failed and is sent again, never credited.
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
        match outcome {
            Ok(rejected) => {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.last_insert_us.store(us, Ordering::Relaxed);
                let in_batch = |v: Vec<usize>| {
                    let mut v: Vec<usize> = v.into_iter().map(|i| todo[i]).collect();
                    v.sort_unstable();
                    v
                };
                Attempt {
                    retry: in_batch(rejected.retry),
                    refused: in_batch(rejected.refused),
                    answered,
                    not_stored: Some(NotStored::Rejected),
                    refusal: Refused::Document,
                }
            }
            Err(e) if e.is_permanent() => Attempt {
                retry: Vec::new(),
                refused: todo.to_vec(),
                answered,
                not_stored: None,
                refusal: Refused::Command(e),
            },
            Err(e) => Attempt {
                retry: todo.to_vec(),
                refused: Vec::new(),
                answered,
                not_stored: Some(NotStored::Store(e)),
                refusal: Refused::Document,
            },
        }
    }

    /// Less time than this left, an attempt could only time out.
    fn min_attempt(&self) -> Duration {
        let last = Duration::from_micros(self.last_insert_us.load(Ordering::Relaxed));
        (2 * last).clamp(MIN_ATTEMPT, MAX_MIN_ATTEMPT)
    }
}

/// What one attempt left undone, as positions in the batch, ascending.
struct Attempt {
    /// Worth sending again.
    retry: Vec<usize>,
    /// Refused for good, and why.
    refused: Vec<usize>,
    refusal: Refused,
    /// The database answered the command (it may still have stored nothing).
    answered: bool,
    /// Why the documents to retry were not stored, if this attempt says.
    not_stored: Option<NotStored>,
}

/// Who is owed what in one batch: each document's request, each request's documents not
/// yet stored, and the documents still to send. Attempts read it; crediting their
/// replies writes it, and answers each request once.
struct Ledger {
    /// For each document, the index of its request in `waiters`.
    owner: Vec<usize>,
    waiters: Vec<Waiter>,
    /// Positions in the batch's documents still to be stored, ascending.
    todo: Vec<usize>,
}

impl Ledger {
    fn new(batch: Batch) -> (Ledger, Arc<[RawDocumentBuf]>) {
        let mut docs: Vec<RawDocumentBuf> = Vec::with_capacity(batch.docs);
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
        let todo = (0..docs.len()).collect();
        let ledger = Ledger {
            owner,
            waiters,
            todo,
        };
        (ledger, docs.into())
    }

    fn waiter(&self, doc: usize) -> &Waiter {
        &self.waiters[self.owner[doc]]
    }

    /// The latest deadline among the requests still waiting for a document to send.
    fn last_deadline(&self, now: Instant) -> Option<Instant> {
        self.todo
            .iter()
            .map(|&i| self.waiter(i))
            .filter(|w| w.waiting(now))
            .map(|w| w.deadline)
            .max()
    }

    /// Leaves out the documents of requests nobody waits for any more.
    fn forget_unwaited(&mut self, now: Instant) {
        let (owner, waiters) = (&self.owner, &self.waiters);
        self.todo.retain(|&i| waiters[owner[i]].waiting(now));
    }

    /// Answers the requests an attempt refused a document of with 503.
    fn refuse(&mut self, attempt: &Attempt) {
        for &i in &attempt.refused {
            let refusal = WriteError::Refused(attempt.refusal.clone());
            self.waiters[self.owner[i]].answer(Err(refusal));
        }
    }

    /// Credits an attempt at `todo`: answers the requests whose every document is now
    /// stored with 200, and keeps the documents to send again.
    fn credit(&mut self, attempt: &Attempt) {
        for i in std::mem::take(&mut self.todo) {
            let undone = attempt.retry.binary_search(&i).is_ok()
                || attempt.refused.binary_search(&i).is_ok();
            if !undone {
                let waiter = &mut self.waiters[self.owner[i]];
                waiter.left -= 1;
                if waiter.left == 0 {
                    waiter.answer(Ok(()));
                }
            }
        }
        self.todo = attempt.retry.clone();
    }

    /// Answers every request still waiting with 503: its documents were not stored in
    /// time (some may have been; none is acknowledged).
    fn give_up(&mut self, reason: &NotStored) {
        let now = Instant::now();
        let mut answered = 0;
        for waiter in self.waiters.iter_mut().filter(|w| w.waiting(now)) {
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
}

//! The write path: a bounded channel into one flusher that group-commits.
//!
//! A request hands its 5 documents to [`Writer::submit`] and waits. The flusher takes
//! the first waiting request, gathers more for `BATCH_LINGER_MS` or until
//! `BATCH_MAX_DOCS`, then waits for a flush slot and a budget token, *still gathering*
//! while it waits. So at low load a batch leaves almost at once, and when the database
//! budget binds the batches grow instead of the commands multiplying: hundreds of
//! requests share one unordered `insert_many`.
//!
//! A request is answered only once the command holding its documents is acknowledged
//! with the configured write concern (default `w:1, j:true`): a 200 means stored. A
//! failed command is retried with backoff, paying from the budget again; duplicate-key
//! answers count as stored, so a retry never duplicates. A request whose documents are
//! not stored by its deadline (`WRITE_TIMEOUT_MS`) is answered 503; nothing is dropped
//! without its request being told. The queue is bounded (`QUEUE_CAPACITY` requests):
//! past `ENQUEUE_TIMEOUT_MS` of waiting for room, the request is shed with 503.
//!
//! Deadlines are per request, never per batch. Under overload a batch mixes requests
//! that waited long in the queue with fresh ones; the expired ones (and those whose
//! client has gone) are answered and left out before each attempt, and the rest are
//! still sent. Otherwise one old request would sink the hundreds that share its batch,
//! and the database's few commands would go to waste exactly when they are scarcest.
//!
//! Shutdown: when `stop` fires, the queue is closed (new submissions fail at once), every
//! request already in it is flushed, and the flusher returns once the last in-flight
//! insert is answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bson::Document;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, Token};
use crate::metrics::Metrics;
use crate::store::Store;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("the write queue is full")]
    QueueFull,
    #[error("documents not stored within the write timeout: {0}")]
    NotStored(String),
    #[error("the service is shutting down")]
    Closed,
}

#[derive(Debug, Clone, Copy)]
pub struct WriteSettings {
    pub batch_max_docs: usize,
    pub linger: Duration,
    pub queue_capacity: usize,
    pub enqueue_timeout: Duration,
    pub write_timeout: Duration,
    pub flush_concurrency: usize,
}

struct Job {
    docs: Vec<Document>,
    ack: oneshot::Sender<Result<(), WriteError>>,
    deadline: Instant,
}

/// The submitting side; cheap to share.
pub struct Writer {
    tx: mpsc::Sender<Job>,
    settings: WriteSettings,
    metrics: Arc<Metrics>,
}

impl Writer {
    /// Creates the queue and the flusher that drains it. The flusher runs until `stop`
    /// and the queue is empty; the caller owns (and awaits) its task.
    pub fn start(
        settings: WriteSettings,
        store: Arc<Store>,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let flusher = Flusher {
            rx,
            store,
            budget,
            metrics: Arc::clone(&metrics),
            settings,
        };
        let task = tokio::spawn(flusher.run(stop));
        let writer = Writer {
            tx,
            settings,
            metrics,
        };
        (writer, task)
    }

    /// Queues the documents and waits until they are stored, or until the deadline.
    ///
    /// The wait is bounded here, on the request's side, whatever the flusher is doing:
    /// a request is answered within `WRITE_TIMEOUT_MS` even while its batch is still
    /// waiting for the budget or for a slow database.
    pub async fn submit(&self, docs: Vec<Document>) -> Result<(), WriteError> {
        let (ack, done) = oneshot::channel();
        let deadline = Instant::now() + self.settings.write_timeout;
        let job = Job {
            docs,
            ack,
            deadline,
        };
        self.tx
            .send_timeout(job, self.settings.enqueue_timeout)
            .await
            .map_err(|e| match e {
                mpsc::error::SendTimeoutError::Timeout(_) => WriteError::QueueFull,
                mpsc::error::SendTimeoutError::Closed(_) => WriteError::Closed,
            })?;
        let result = match tokio::time::timeout_at(deadline.into(), done).await {
            Ok(answer) => answer.unwrap_or(Err(WriteError::Closed)),
            Err(_) => Err(WriteError::NotStored(
                "waited longer than WRITE_TIMEOUT_MS for the insert".into(),
            )),
        };
        if matches!(result, Err(WriteError::NotStored(_))) {
            self.metrics.write_failures.inc();
        }
        result
    }

    /// Requests waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn queue_capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

struct Flusher {
    rx: mpsc::Receiver<Job>,
    store: Arc<Store>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    settings: WriteSettings,
}

/// Requests gathered for one command.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    docs: usize,
}

impl Batch {
    /// Adds a request, unless its client stopped waiting: it timed out in the queue
    /// (its `submit` has answered it) or disconnected. Its documents would only take
    /// room that live requests need.
    fn push(&mut self, job: Job) {
        if job.ack.is_closed() || job.deadline <= Instant::now() {
            return;
        }
        self.docs += job.docs.len();
        self.jobs.push(job);
    }
}

impl Flusher {
    async fn run(mut self, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.flush_concurrency));
        let mut flushes = JoinSet::new();
        let mut closing = false;
        loop {
            let first = tokio::select! {
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
            };
            let mut batch = Batch::default();
            batch.push(first);
            if batch.jobs.is_empty() {
                continue;
            }
            self.gather(&mut batch, tokio::time::sleep(self.settings.linger))
                .await;
            let slot = self
                .gather(&mut batch, Arc::clone(&slots).acquire_owned())
                .await
                .expect("the semaphore is never closed");
            let budget = Arc::clone(&self.budget);
            let token = self.gather(&mut batch, budget.acquire()).await;
            let flush = Flush {
                store: Arc::clone(&self.store),
                budget: Arc::clone(&self.budget),
                metrics: Arc::clone(&self.metrics),
            };
            flushes.spawn(flush.run(batch, token, slot));
            while flushes.try_join_next().is_some() {}
        }
        while flushes.join_next().await.is_some() {}
        tracing::info!("write queue drained");
    }

    /// Adds waiting requests to `batch` until `until` completes or the batch is full,
    /// then waits for `until` alone.
    async fn gather<F: std::future::Future>(&mut self, batch: &mut Batch, until: F) -> F::Output {
        tokio::pin!(until);
        while batch.docs < self.settings.batch_max_docs {
            tokio::select! {
                biased;
                out = &mut until => return out,
                job = self.rx.recv() => match job {
                    Some(job) => batch.push(job),
                    None => break,
                },
            }
        }
        until.await
    }
}

/// One batch's journey to the database, retries included.
struct Flush {
    store: Arc<Store>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
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

impl Flush {
    async fn run(self, batch: Batch, token: Token, _slot: OwnedSemaphorePermit) {
        let started = Instant::now();
        self.metrics.batch_documents.observe(batch.docs as f64);
        let mut docs = Vec::with_capacity(batch.docs);
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
        // Positions in `docs` still to be stored, ascending.
        let mut todo: Vec<usize> = (0..docs.len()).collect();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times()
            .with_jitter()
            .build();
        let mut token = Some(token);
        loop {
            let paid = match token.take() {
                Some(t) => t,
                None => self.budget.acquire().await,
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
            let (failed, reason) = match self
                .store
                .insert_many(todo.iter().map(|&i| &docs[i]), paid, limit)
                .await
            {
                Ok(rejected) => {
                    let mut failed: Vec<usize> = rejected.iter().map(|&i| todo[i]).collect();
                    failed.sort_unstable();
                    (failed, "the database rejected documents".to_string())
                }
                Err(e) => (todo.clone(), e.to_string()),
            };
            self.metrics
                .documents_stored
                .inc_by((todo.len() - failed.len()) as u64);
            // Credit stored documents to their requests; answer the complete ones.
            for &i in &todo {
                if failed.binary_search(&i).is_err() {
                    let waiter = &mut waiters[owner[i]];
                    waiter.left -= 1;
                    if waiter.left == 0 {
                        waiter.answer(Ok(()));
                    }
                }
            }
            todo = failed;
            if todo.is_empty() {
                break;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(1));
            if Instant::now() + delay >= deadline {
                give_up(&mut waiters, &reason);
                break;
            }
            self.metrics.write_retries.inc();
            tracing::debug!(documents = todo.len(), ?delay, reason, "retrying insert");
            tokio::time::sleep(delay).await;
        }
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Answers every request still waiting with 503: its documents were not stored in time
/// (some may have been; none is acknowledged).
fn give_up(waiters: &mut [Waiter], reason: &str) {
    let now = Instant::now();
    let mut answered = 0;
    for waiter in waiters.iter_mut().filter(|w| w.waiting(now)) {
        waiter.answer(Err(WriteError::NotStored(reason.to_string())));
        answered += 1;
    }
    tracing::warn!(
        requests = answered,
        reason,
        "documents not stored before their deadline; answered 503"
    );
}

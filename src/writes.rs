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
            metrics,
            settings,
        };
        let task = tokio::spawn(flusher.run(stop));
        (Writer { tx, settings }, task)
    }

    /// Queues the documents and waits until they are stored (or definitely not).
    pub async fn submit(&self, docs: Vec<Document>) -> Result<(), WriteError> {
        let (ack, done) = oneshot::channel();
        let job = Job {
            docs,
            ack,
            deadline: Instant::now() + self.settings.write_timeout,
        };
        self.tx
            .send_timeout(job, self.settings.enqueue_timeout)
            .await
            .map_err(|e| match e {
                mpsc::error::SendTimeoutError::Timeout(_) => WriteError::QueueFull,
                mpsc::error::SendTimeoutError::Closed(_) => WriteError::Closed,
            })?;
        done.await.unwrap_or(Err(WriteError::Closed))
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
    fn push(&mut self, job: Job) {
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
    fn answer(&mut self, result: Result<(), WriteError>) -> bool {
        self.ack.take().map(|ack| ack.send(result)).is_some()
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
            let deadline = waiters
                .iter()
                .filter(|w| w.ack.is_some())
                .map(|w| w.deadline)
                .min()
                .unwrap_or(started);
            let paid = match token.take() {
                Some(t) => t,
                None => self.budget.acquire().await,
            };
            let limit = deadline.saturating_duration_since(Instant::now());
            if limit.is_zero() {
                self.give_up(
                    &mut waiters,
                    "waited longer than WRITE_TIMEOUT_MS before the insert",
                );
                break;
            }
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
                self.give_up(&mut waiters, &reason);
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

    /// Answers every request still waiting with 503: its documents were not stored in
    /// time (some may have been; none is acknowledged).
    fn give_up(&self, waiters: &mut [Waiter], reason: &str) {
        let failed = waiters
            .iter_mut()
            .filter_map(|w| {
                w.answer(Err(WriteError::NotStored(reason.to_string())))
                    .then_some(())
            })
            .count() as u64;
        self.metrics.write_failures.inc_by(failed);
        tracing::warn!(
            requests = failed,
            reason,
            "documents not stored before their deadline; answered 503"
        );
    }
}

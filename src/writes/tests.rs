//! The flusher's rules under tokio's paused time, against an in-memory sink.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::oid::ObjectId;
use bson::RawDocumentBuf;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Sink, WriteError, Writer};
use crate::config::WriteSettings;
use crate::metrics::Metrics;
use crate::record::new_batch;
use crate::store::{Rejected, StoreError};

/// What the sink does with its next insert.
#[derive(Clone)]
enum Next {
    /// Stores everything it is sent.
    Store,
    /// Stores everything but the documents with these ids, which it asks to retry.
    Reject(Vec<ObjectId>),
    /// Refuses these ids for good, stores the rest.
    Refuse(Vec<ObjectId>),
    /// Stores everything, then reports the database as gone (a lost acknowledgement).
    StoreButFail,
    /// Stores nothing and reports the database as gone.
    Fail,
    /// Stores nothing and names a document it was not sent (a malformed reply).
    BadIndex,
}

#[derive(Default)]
struct Memory {
    stored: Mutex<Vec<ObjectId>>,
    inserts: Mutex<Vec<(Instant, usize)>>,
    script: Mutex<VecDeque<Next>>,
    /// While set, `pay` waits (the budget is binding).
    gate: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

#[derive(Clone, Default)]
struct MemorySink(Arc<Memory>);

fn id_of(doc: &RawDocumentBuf) -> ObjectId {
    doc.get_object_id("_id").unwrap()
}

impl Sink for MemorySink {
    type Paid = ();

    async fn pay(&self) {
        let gate = self.0.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.notified().await;
        }
    }

    async fn insert(
        &self,
        all: Arc<[RawDocumentBuf]>,
        which: Vec<usize>,
        _paid: (),
        _limit: Duration,
    ) -> Result<Rejected, StoreError> {
        let docs: Vec<&RawDocumentBuf> = which.iter().map(|&i| &all[i]).collect();
        self.0
            .inserts
            .lock()
            .unwrap()
            .push((Instant::now(), docs.len()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let next = self
            .0
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Next::Store);
        let mut stored = self.0.stored.lock().unwrap();
        let mut rejected = Rejected::default();
        for (i, doc) in docs.iter().enumerate() {
            let id = id_of(doc);
            match &next {
                Next::Fail | Next::BadIndex => {}
                Next::Reject(ids) if ids.contains(&id) => rejected.retry.push(i),
                Next::Refuse(ids) if ids.contains(&id) => rejected.refused.push(i),
                // A duplicate `_id` is stored already: the real store reports it as such.
                _ if stored.contains(&id) => {}
                _ => stored.push(id),
            }
        }
        match next {
            Next::Fail | Next::StoreButFail => Err(StoreError::Unavailable("gone".into())),
            Next::BadIndex => Ok(Rejected {
                retry: vec![docs.len()],
                refused: vec![],
            }),
            _ => Ok(rejected),
        }
    }
}

fn settings() -> WriteSettings {
    WriteSettings {
        batch_max_docs: 1000,
        linger: Duration::from_millis(100),
        queue_capacity: 100,
        enqueue_timeout: Duration::from_millis(50),
        write_timeout: Duration::from_secs(2),
        flush_concurrency: 1,
    }
}

fn start(settings: WriteSettings, sink: &MemorySink) -> (Arc<Writer>, CancellationToken) {
    let stop = CancellationToken::new();
    let (writer, _task) = Writer::start(
        settings,
        sink.clone(),
        Arc::new(Metrics::new()),
        stop.clone(),
    );
    (Arc::new(writer), stop)
}

/// A request's answer and when it came.
type Answer = tokio::task::JoinHandle<(Result<(), WriteError>, Instant)>;

/// Submits one request's documents in a task; returns its ids and its answer.
fn submit(writer: &Arc<Writer>) -> ([ObjectId; 5], Answer) {
    let (ids, docs) = new_batch(None);
    let writer = Arc::clone(writer);
    let task = tokio::spawn(async move { (writer.submit(docs).await, Instant::now()) });
    (ids, task)
}

#[tokio::test(start_paused = true)]
async fn a_batch_lingers_for_company_then_leaves_in_one_insert() {
    let sink = MemorySink::default();
    let (writer, _stop) = start(settings(), &sink);
    let t0 = Instant::now();
    let (_, a) = submit(&writer);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (_, b) = submit(&writer);
    let (a, at) = a.await.unwrap();
    let (b, _) = b.await.unwrap();
    assert!(a.is_ok() && b.is_ok());
    let inserts = sink.0.inserts.lock().unwrap().clone();
    assert_eq!(
        inserts.len(),
        1,
        "both requests share one insert: {inserts:?}"
    );
    assert_eq!(inserts[0].1, 10);
    assert!(
        inserts[0].0 - t0 >= Duration::from_millis(100),
        "left before the linger"
    );
    assert!(at - t0 < Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_leaves_at_once_and_the_rest_starts_the_next() {
    let sink = MemorySink::default();
    let (writer, _stop) = start(
        WriteSettings {
            batch_max_docs: 10,
            ..settings()
        },
        &sink,
    );
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..3).map(|_| submit(&writer).1).collect();
    for t in tasks {
        assert!(t.await.unwrap().0.is_ok());
    }
    let inserts = sink.0.inserts.lock().unwrap().clone();
    let sizes: Vec<usize> = inserts.iter().map(|i| i.1).collect();
    assert_eq!(sizes, [10, 5]);
    assert!(
        inserts[0].0 - t0 < Duration::from_millis(100),
        "a full batch does not linger"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_and_abandoned_requests_are_left_out() {
    let sink = MemorySink::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    *sink.0.gate.lock().unwrap() = Some(Arc::clone(&gate));
    let (writer, _stop) = start(settings(), &sink);
    let (old_ids, old) = submit(&writer);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (gone_ids, gone) = submit(&writer);
    tokio::time::sleep(Duration::from_millis(10)).await;
    gone.abort(); // the client disconnected
    let (live_ids, live) = submit(&writer);
    // The budget frees up after the first request's deadline.
    tokio::time::sleep(Duration::from_millis(600)).await;
    *sink.0.gate.lock().unwrap() = None;
    gate.notify_waiters();
    assert!(matches!(
        old.await.unwrap().0,
        Err(WriteError::NotStored(_))
    ));
    assert!(live.await.unwrap().0.is_ok());
    let stored = sink.0.stored.lock().unwrap().clone();
    assert!(live_ids.iter().all(|id| stored.contains(id)));
    assert!(
        !old_ids.iter().any(|id| stored.contains(id)),
        "expired documents were sent"
    );
    assert!(
        !gone_ids.iter().any(|id| stored.contains(id)),
        "abandoned documents were sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_partial_reject_retries_only_its_own_request() {
    let sink = MemorySink::default();
    let (writer, _stop) = start(settings(), &sink);
    let (a_ids, a) = submit(&writer);
    let (b_ids, b) = submit(&writer);
    sink.0
        .script
        .lock()
        .unwrap()
        .push_back(Next::Reject(vec![b_ids[3]]));
    let (a, a_at) = a.await.unwrap();
    let (b, b_at) = b.await.unwrap();
    assert!(a.is_ok() && b.is_ok());
    assert!(
        a_at < b_at,
        "A was complete after the first insert and answered then"
    );
    let inserts: Vec<usize> = sink.0.inserts.lock().unwrap().iter().map(|i| i.1).collect();
    assert_eq!(inserts, [10, 1], "only the rejected document is sent again");
    let stored = sink.0.stored.lock().unwrap().clone();
    let unique: HashSet<_> = stored.iter().collect();
    assert_eq!(stored.len(), 10);
    assert_eq!(unique.len(), 10);
    assert!(a_ids.iter().chain(&b_ids).all(|id| stored.contains(id)));
}

#[tokio::test(start_paused = true)]
async fn a_lost_acknowledgement_is_retried_without_storing_twice() {
    let sink = MemorySink::default();
    sink.0.script.lock().unwrap().push_back(Next::StoreButFail);
    let (writer, _stop) = start(settings(), &sink);
    let (ids, task) = submit(&writer);
    assert!(
        task.await.unwrap().0.is_ok(),
        "the duplicates count as stored"
    );
    let stored = sink.0.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 5);
    assert!(ids.iter().all(|id| stored.contains(id)));
    assert_eq!(sink.0.inserts.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_reply_naming_a_document_it_was_not_sent_fails_the_batch_not_the_flusher() {
    let sink = MemorySink::default();
    sink.0.script.lock().unwrap().push_back(Next::BadIndex);
    let (writer, _stop) = start(settings(), &sink);
    let (ids, task) = submit(&writer);
    assert!(
        task.await.unwrap().0.is_ok(),
        "the batch is sent again and stored"
    );
    let stored = sink.0.stored.lock().unwrap().clone();
    assert!(ids.iter().all(|id| stored.contains(id)));
    assert_eq!(sink.0.inserts.lock().unwrap().len(), 2);
    // The flusher is still there for the next request.
    let (_, task) = submit(&writer);
    assert!(task.await.unwrap().0.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_writer_that_never_gets_a_token_still_finishes_its_drain() {
    // The budget never pays (a draining pod cut off from Redis): requests are answered
    // 503 by their deadline, and the writer's task ends instead of waiting for ever.
    let sink = MemorySink::default();
    *sink.0.gate.lock().unwrap() = Some(Arc::new(tokio::sync::Notify::new()));
    let stop = CancellationToken::new();
    let (writer, task) = Writer::start(
        settings(),
        sink.clone(),
        Arc::new(Metrics::new()),
        stop.clone(),
    );
    let writer = Arc::new(writer);
    let (_, answer) = submit(&writer);
    // In the queue and gathered, waiting for its token, when the drain begins.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (result, _) = answer.await.unwrap();
    assert!(
        matches!(result, Err(WriteError::NotStored(_))),
        "{result:?}"
    );
    let finished = tokio::time::timeout(settings().write_timeout * 2, task).await;
    assert!(finished.is_ok(), "the writer never finished draining");
    assert!(sink.0.inserts.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_refused_document_fails_its_request_at_once() {
    let sink = MemorySink::default();
    let (writer, _stop) = start(settings(), &sink);
    let t0 = Instant::now();
    let (a_ids, a) = submit(&writer);
    let (_, b) = submit(&writer);
    sink.0
        .script
        .lock()
        .unwrap()
        .push_back(Next::Refuse(vec![a_ids[0]]));
    let (a, a_at) = a.await.unwrap();
    assert!(matches!(a, Err(WriteError::Refused(_))), "{a:?}");
    assert!(
        a_at - t0 < Duration::from_millis(500),
        "no retry until the deadline"
    );
    assert!(b.await.unwrap().0.is_ok());
    assert_eq!(sink.0.inserts.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_database_that_never_answers_gets_503_by_the_deadline() {
    let sink = MemorySink::default();
    sink.0
        .script
        .lock()
        .unwrap()
        .extend(std::iter::repeat_n(Next::Fail, 100));
    let (writer, _stop) = start(settings(), &sink);
    let t0 = Instant::now();
    let (ids, task) = submit(&writer);
    let (result, at) = task.await.unwrap();
    assert!(
        matches!(result, Err(WriteError::NotStored(_))),
        "{result:?}"
    );
    assert!(at - t0 <= settings().write_timeout + Duration::from_millis(1));
    assert!(sink.0.inserts.lock().unwrap().len() > 2, "it was retried");
    assert!(!ids
        .iter()
        .any(|id| sink.0.stored.lock().unwrap().contains(id)));
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_what_is_queued_and_refuses_the_rest() {
    let sink = MemorySink::default();
    let (writer, stop) = start(settings(), &sink);
    let (ids, task) = submit(&writer);
    tokio::time::sleep(Duration::from_millis(1)).await;
    stop.cancel();
    assert!(task.await.unwrap().0.is_ok());
    assert!(ids
        .iter()
        .all(|id| sink.0.stored.lock().unwrap().contains(id)));
    let (_, late) = submit(&writer);
    assert!(matches!(late.await.unwrap().0, Err(WriteError::Closed)));
}

#[tokio::test(start_paused = true)]
async fn a_database_refusing_every_write_turns_new_requests_away_until_it_stops() {
    let sink = MemorySink::default();
    let (writer, _stop) = start(settings(), &sink);
    // A full disk: the database answers, and refuses every document.
    let (ids, first) = submit(&writer);
    sink.0
        .script
        .lock()
        .unwrap()
        .extend([Next::Reject(ids.to_vec()), Next::Reject(ids.to_vec())]);
    // The first refusal lands after the linger (100 ms) and one insert (10 ms).
    tokio::time::sleep(Duration::from_millis(120)).await;
    let t0 = Instant::now();
    let (_, turned_away) = submit(&writer);
    let (result, at) = turned_away.await.unwrap();
    assert!(matches!(result, Err(WriteError::Refusing)), "{result:?}");
    assert_eq!(at, t0, "answered at once");
    // Space comes back: the first request's retry goes through, and new ones do too.
    assert!(first.await.unwrap().0.is_ok());
    tokio::time::sleep(super::REFUSING_PAUSE).await;
    let (_, later) = submit(&writer);
    assert!(later.await.unwrap().0.is_ok());
}

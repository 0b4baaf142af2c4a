//! Where the flusher sends its batches, as a trait: the real one is MongoDB paid from the
//! budget; the unit tests bring an in-memory one that can fail on cue.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bson::RawDocumentBuf;

use crate::budget::Token;
use crate::store::{PaidStore, Rejected, StoreError};

pub trait Sink: Send + Sync + 'static {
    /// The right to send one insert command.
    type Paid: Send + 'static;
    /// Waits until one more insert command may be sent.
    fn pay(&self) -> impl Future<Output = Self::Paid> + Send;
    /// Sends one unordered insert of `docs[i]` for each `i` in `which`, within `limit`;
    /// says which were not stored, as positions in `which`. The documents are shared, not
    /// lent: a command the caller stops waiting for may still be on its way.
    fn insert(
        &self,
        docs: Arc<[RawDocumentBuf]>,
        which: Vec<usize>,
        paid: Self::Paid,
        limit: Duration,
    ) -> impl Future<Output = Result<Rejected, StoreError>> + Send;
}

/// MongoDB, each insert paid from the cluster budget.
impl Sink for PaidStore {
    type Paid = Token;

    async fn pay(&self) -> Token {
        self.budget.acquire().await
    }

    async fn insert(
        &self,
        docs: Arc<[RawDocumentBuf]>,
        which: Vec<usize>,
        paid: Token,
        limit: Duration,
    ) -> Result<Rejected, StoreError> {
        self.store.insert_many(docs, which, paid, limit).await
    }
}

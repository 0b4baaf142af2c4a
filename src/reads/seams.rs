//! The two things the read cache stands on, as traits: where answers come from
//! ([`Source`]: MongoDB, paid from the budget) and the tier the pods share ([`SharedTier`]:
//! Redis). The real ones are here; the unit tests bring small in-memory ones.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;

use crate::shared::{CachedRead, Shared, SharedError};
use crate::store::{PaidStore, StoreError};

/// Answers the read query. Every call costs the database one command.
pub trait Source: Send + Sync + 'static {
    /// The id of the first `type: "write"` document, `None` while there is none.
    fn first_write(&self) -> impl Future<Output = Result<Option<ObjectId>, StoreError>> + Send;
    /// Whether `id` is still stored (a cheap revalidation of a known answer).
    fn still_stored(&self, id: ObjectId) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// The shared tier: the cached answer and the cluster-wide refresh lock.
pub trait SharedTier: Send + Sync + 'static {
    fn get(&self) -> impl Future<Output = Result<Option<CachedRead>, SharedError>> + Send;
    fn put(
        &self,
        read: CachedRead,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), SharedError>> + Send;
    /// Deletes the shared answer if it says "empty".
    fn forget_empty(&self) -> impl Future<Output = Result<(), SharedError>> + Send;
    /// Takes the lock for `holder` unless someone holds it.
    fn try_lock(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, SharedError>> + Send;
    /// Releases the lock if `holder` still holds it.
    fn unlock(&self, holder: &str) -> impl Future<Output = Result<(), SharedError>> + Send;
}

/// MongoDB as a [`Source`], each query paid from the budget.
impl Source for PaidStore {
    async fn first_write(&self) -> Result<Option<ObjectId>, StoreError> {
        self.store.first_write(self.budget.acquire().await).await
    }

    async fn still_stored(&self, id: ObjectId) -> Result<bool, StoreError> {
        self.store
            .still_stored(id, self.budget.acquire().await)
            .await
    }
}

impl SharedTier for Arc<Shared> {
    async fn get(&self) -> Result<Option<CachedRead>, SharedError> {
        self.get_read().await
    }

    async fn put(&self, read: CachedRead, ttl: Duration) -> Result<(), SharedError> {
        self.put_read(&read, ttl).await
    }

    async fn forget_empty(&self) -> Result<(), SharedError> {
        self.forget_empty_read().await
    }

    async fn try_lock(&self, holder: &str, ttl: Duration) -> Result<bool, SharedError> {
        Shared::try_lock(self, holder, ttl).await
    }

    async fn unlock(&self, holder: &str) -> Result<(), SharedError> {
        Shared::unlock(self, holder).await
    }
}

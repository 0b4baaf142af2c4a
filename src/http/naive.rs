//! `GET /api/data` as the naive service does it, for before/after comparisons only:
//! 5 single-document inserts and 5 queries, one after another, straight to MongoDB.
//! The budget is still paid (at a rate so high it never binds), because the store takes
//! nothing else.

use super::data::DataAnswer;
use super::{ApiError, Response};
use crate::record::{self, PER_REQUEST};
use crate::store::PaidStore;
use crate::writes::{NotStored, Refused, WriteError};

pub async fn handle(naive: &PaidStore) -> Result<Response, ApiError> {
    if !naive.store.is_healthy() {
        return Err(ApiError::DatabaseDown);
    }
    let timeout = naive.store.timeout();
    let (ids, docs) = record::new_batch(None);
    let docs: std::sync::Arc<[bson::RawDocumentBuf]> = docs.into();
    for i in 0..docs.len() {
        let token = naive.budget.acquire().await;
        let rejected = naive
            .store
            .insert_many(std::sync::Arc::clone(&docs), vec![i], token, timeout)
            .await
            .map_err(|e| WriteError::NotStored(NotStored::Store(e)))?;
        if !rejected.retry.is_empty() || !rejected.refused.is_empty() {
            return Err(WriteError::Refused(Refused::Document).into());
        }
    }
    let mut reads = [None; PER_REQUEST];
    for slot in &mut reads {
        let token = naive.budget.acquire().await;
        *slot = naive
            .store
            .first_write(token)
            .await
            .map_err(|_| ApiError::DatabaseDown)?;
    }
    Ok(DataAnswer::new(reads, ids).into_response())
}

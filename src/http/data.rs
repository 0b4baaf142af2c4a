//! `GET /api/data`: 5 reads and 5 writes, answered 200 only once the writes are stored.

use std::sync::Arc;

use bson::oid::ObjectId;
use bson::Document;
use hyper::StatusCode;
use serde_json::json;

use super::{json_response, ApiError, Response};
use crate::record::{self, PER_REQUEST};
use crate::startup::App;

type Reads = [Option<ObjectId>; PER_REQUEST];

pub async fn handle(app: &Arc<App>) -> Result<Response, ApiError> {
    // While the database is known to be away, answer at once instead of queueing
    // requests that can only time out.
    if !app.store.is_healthy() {
        return Err(ApiError::DatabaseDown);
    }
    let (ids, docs) = record::new_batch();
    let reads = if app.config.naive_mode {
        naive(app, docs).await?
    } else {
        coalesced(app, docs).await?
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "status": "success",
            "reads": reads.map(|id| id.map(|id| id.to_hex())),
            "writes": ids.map(|id| id.to_hex()),
            "timestamp": record::timestamp(),
        }),
    ))
}

/// The real path: reads from the cache tiers while the writes wait for their batch.
///
/// Both halves are bounded, so a request is answered (503 at worst) within
/// `WRITE_TIMEOUT_MS` or `DB_TIMEOUT_MS`, whichever is longer, even when a cold cache's
/// loader is queued behind the writer for the database budget.
async fn coalesced(app: &Arc<App>, docs: Vec<Document>) -> Result<Reads, ApiError> {
    let reads = async {
        let mut out = [None; PER_REQUEST];
        for slot in &mut out {
            *slot = app.reads.first_write().await?;
        }
        Ok::<_, ApiError>(out)
    };
    let reads = async {
        tokio::time::timeout(app.config.db_timeout(), reads)
            .await
            .map_err(|_| ApiError::DatabaseDown)?
    };
    let writes = async { Ok(app.writer.submit(docs).await?) };
    // A shed write answers at once, without waiting for the reads.
    let ((), reads) = tokio::try_join!(writes, reads)?;
    Ok(reads)
}

/// The naive service, for before/after comparisons only: 5 single-document inserts and
/// 5 queries, one after another, straight to MongoDB.
async fn naive(app: &Arc<App>, docs: Vec<Document>) -> Result<Reads, ApiError> {
    let timeout = app.config.db_timeout();
    for doc in &docs {
        let token = app.budget.acquire().await;
        let failed = app
            .store
            .insert_many([doc], token, timeout)
            .await
            .map_err(|e| ApiError::NotStored(e.to_string()))?;
        if !failed.is_empty() {
            return Err(ApiError::NotStored(
                "the database rejected a document".into(),
            ));
        }
    }
    let mut reads = [None; PER_REQUEST];
    for slot in &mut reads {
        let token = app.budget.acquire().await;
        *slot = app
            .store
            .first_write(token)
            .await
            .map_err(|_| ApiError::DatabaseDown)?;
    }
    Ok(reads)
}

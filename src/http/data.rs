//! `GET /api/data`: 5 reads and 5 writes, answered 200 only once the writes are stored.

use std::sync::Arc;

use bson::oid::ObjectId;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Serialize;

use super::{json_response, ApiError, Response};
use crate::app::App;
use crate::record::{self, IdempotencyKey, PER_REQUEST};

/// The 200 body.
#[derive(Serialize)]
pub struct DataAnswer {
    pub status: &'static str,
    pub reads: [Option<Hex>; PER_REQUEST],
    pub writes: [Hex; PER_REQUEST],
    pub timestamp: String,
}

impl DataAnswer {
    pub fn new(reads: [Option<ObjectId>; PER_REQUEST], writes: [ObjectId; PER_REQUEST]) -> Self {
        DataAnswer {
            status: "success",
            reads: reads.map(|id| id.map(Hex)),
            writes: writes.map(Hex),
            timestamp: record::timestamp(),
        }
    }
}

/// An id serialised as its 24 hex digits straight from the stack: ten ids a response,
/// each a `String` of its own before, were a measurable share of the answer's cost.
pub struct Hex(ObjectId);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = [0u8; 24];
        hex::encode_to_slice(self.0.bytes(), &mut out).expect("12 bytes fill 24 digits");
        serializer.serialize_str(std::str::from_utf8(&out).expect("hex digits are ASCII"))
    }
}

/// The real path. A request with an Idempotency-Key holds the key's claim until its
/// answer is ready, and releases it before the answer leaves.
pub async fn handle(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response, ApiError> {
    let Some(key) = req.headers().get("idempotency-key") else {
        return answer(app, None).await;
    };
    let key = IdempotencyKey::parse(key.as_bytes()).map_err(ApiError::BadIdempotencyKey)?;
    let claim = app
        .in_flight
        .claim(&key)
        .await
        .ok_or(ApiError::KeyInFlight)?;
    let answer = answer(app, Some(&key)).await;
    claim.release().await;
    answer
}

/// Reads from the cache tiers while the writes wait for their batch.
///
/// Both halves are bounded, so a request is answered (503 at worst) within
/// `WRITE_TIMEOUT_MS` or `DB_TIMEOUT_MS`, whichever is longer, even when a cold cache's
/// loader is queued behind the writer for the database budget.
async fn answer(app: &Arc<App>, key: Option<&IdempotencyKey>) -> Result<Response, ApiError> {
    // While the database is known to be away, answer at once instead of queueing
    // requests that can only time out.
    if !app.health.database_up() {
        return Err(ApiError::DatabaseDown);
    }
    let (ids, docs) = record::new_batch(key);
    // The five reads ask the same question (the first write), so one cache read
    // answers all five.
    let reads = async { Ok::<_, ApiError>([app.reads.first_write().await?; PER_REQUEST]) };
    let reads = async {
        tokio::time::timeout(app.read_timeout, reads)
            .await
            .map_err(|_| ApiError::DatabaseDown)?
    };
    let writes = async {
        app.writer.submit(docs).await?;
        app.reads.note_stored().await;
        Ok::<_, ApiError>(())
    };
    // A shed write answers at once, without waiting for the reads; a stored one waits
    // for them.
    tokio::pin!(writes, reads);
    let mut read = None;
    loop {
        tokio::select! {
            written = &mut writes => break written?,
            r = &mut reads, if read.is_none() => read = Some(r),
        }
    }
    let read = match read {
        Some(r) => r,
        None => reads.await,
    };
    // The documents are stored: a 503 now would invite a retry that stores them again.
    // If the reads failed, the last id any load found is still the first document
    // (documents are never deleted); only a pod that never found one answers 503.
    let reads = match read {
        Ok(reads) => reads,
        Err(e) => match app.reads.last_known() {
            Some(id) => [Some(id); PER_REQUEST],
            None => return Err(e),
        },
    };
    Ok(json_response(StatusCode::OK, &DataAnswer::new(reads, ids)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_written_as_its_hex() {
        for id in [
            ObjectId::new(),
            ObjectId::from_bytes([0xff; 12]),
            ObjectId::from_bytes([0; 12]),
        ] {
            let json = serde_json::to_string(&Hex(id)).unwrap();
            assert_eq!(json, format!("\"{}\"", id.to_hex()));
        }
    }
}

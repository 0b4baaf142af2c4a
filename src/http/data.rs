//! `GET /api/data`: 5 reads and 5 writes, answered 200 only once the writes are stored.

use std::sync::Arc;

use bson::oid::ObjectId;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::{json_body, ApiError, Response};
use crate::app::App;
use crate::record::{self, IdempotencyKey, PER_REQUEST};

/// The 200 body: `{"status": "success", "reads": [...], "writes": [...], "timestamp": ...}`,
/// the ids as their 24 hex digits, a read that found nothing as `null`.
pub struct DataAnswer {
    reads: [Option<ObjectId>; PER_REQUEST],
    writes: [ObjectId; PER_REQUEST],
    timestamp: String,
}

impl DataAnswer {
    pub fn new(reads: [Option<ObjectId>; PER_REQUEST], writes: [ObjectId; PER_REQUEST]) -> Self {
        DataAnswer {
            reads,
            writes,
            timestamp: record::timestamp(),
        }
    }

    /// The answer as a 200 response. Its JSON is written here, not by serde: every string
    /// in it is hex digits or the timestamp (RFC 3339: digits and `-T:.Z`), which need no
    /// escaping, and serde_json's escaping scan of the ten ids was most of the
    /// instructions the answer cost (`benches/request_instructions.rs` counts them).
    pub fn into_response(self) -> Response {
        debug_assert!(self
            .timestamp
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-T:.Z".contains(&b)));
        let found = self.reads.iter().flatten().count();
        let len = OPEN.len()
            + THEN_WRITES.len()
            + THEN_TIMESTAMP.len()
            + CLOSE.len()
            + 2 * (PER_REQUEST - 1)
            + QUOTED_ID * (found + PER_REQUEST)
            + b"null".len() * (PER_REQUEST - found)
            + self.timestamp.len();
        // Exactly as long as it is written: `Bytes` takes the buffer as it is.
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(OPEN);
        for (i, read) in self.reads.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match read {
                Some(id) => push_hex(&mut out, id),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(THEN_WRITES);
        for (i, id) in self.writes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_hex(&mut out, id);
        }
        out.extend_from_slice(THEN_TIMESTAMP);
        out.extend_from_slice(self.timestamp.as_bytes());
        out.extend_from_slice(CLOSE);
        debug_assert_eq!(out.len(), len);
        json_body(StatusCode::OK, out)
    }
}

/// The answer's fixed parts, around its ids and its timestamp.
const OPEN: &[u8] = br#"{"status":"success","reads":["#;
const THEN_WRITES: &[u8] = br#"],"writes":["#;
const THEN_TIMESTAMP: &[u8] = br#"],"timestamp":""#;
const CLOSE: &[u8] = br#""}"#;
/// An id as JSON: its 24 hex digits in quotes.
const QUOTED_ID: usize = 26;

/// `"<24 hex digits>"`.
fn push_hex(out: &mut Vec<u8>, id: &ObjectId) {
    let mut digits = [0u8; 24];
    hex::encode_to_slice(id.bytes(), &mut digits).expect("12 bytes fill 24 digits");
    out.push(b'"');
    out.extend_from_slice(&digits);
    out.push(b'"');
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
    Ok(DataAnswer::new(reads, ids).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(answer: DataAnswer) -> serde_json::Value {
        let response = answer.into_response();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).expect("the answer is JSON")
    }

    #[tokio::test]
    async fn the_answer_is_the_contract_s_json() {
        let ids: [ObjectId; 8] = std::array::from_fn(|_| ObjectId::new());
        let writes = [
            ids[0],
            ObjectId::from_bytes([0xff; 12]),
            ids[1],
            ids[2],
            ids[3],
        ];
        let hex = |id: &ObjectId| serde_json::Value::from(id.to_hex());
        let cases = [
            [Some(ids[4]), None, Some(ids[5]), None, Some(ids[6])],
            [
                Some(ObjectId::from_bytes([0; 12])),
                Some(ids[7]),
                Some(ids[4]),
                Some(ids[5]),
                Some(ids[6]),
            ],
            [None; PER_REQUEST],
        ];
        for reads in cases {
            let answer = DataAnswer::new(reads, writes);
            let timestamp = answer.timestamp.clone();
            let reads: Vec<serde_json::Value> = reads
                .iter()
                .map(|r| r.as_ref().map_or(serde_json::Value::Null, hex))
                .collect();
            assert_eq!(
                body(answer).await,
                serde_json::json!({
                    "status": "success",
                    "reads": reads,
                    "writes": writes.iter().map(hex).collect::<Vec<_>>(),
                    "timestamp": timestamp,
                })
            );
        }
    }
}

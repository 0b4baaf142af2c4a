//! The stored document: `{_id, type: "write", index, payload, timestamp}`.
//!
//! Ids are made here, in-process, before anything is sent. That is what makes retries
//! safe: a document sent twice collides on its own `_id` instead of being stored twice.

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use rand::distr::{Alphanumeric, SampleString};

pub const PER_REQUEST: usize = 5;
const PAYLOAD_LEN: usize = 512;

/// The 5 documents one `/api/data` request stores, and their ids.
pub fn new_batch() -> ([ObjectId; PER_REQUEST], Vec<Document>) {
    let mut rng = rand::rng();
    let now = DateTime::now();
    let ids = std::array::from_fn(|_| ObjectId::new());
    let docs = ids
        .iter()
        .zip(0i32..)
        .map(|(id, index)| {
            doc! {
                "_id": id,
                "type": "write",
                "index": index,
                "payload": Alphanumeric.sample_string(&mut rng, PAYLOAD_LEN),
                "timestamp": now,
            }
        })
        .collect();
    (ids, docs)
}

/// Now, as the ISO-8601 text every response carries.
pub fn timestamp() -> String {
    DateTime::now()
        .try_to_rfc3339_string()
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_have_the_stored_shape() {
        let (ids, docs) = new_batch();
        assert_eq!(docs.len(), PER_REQUEST);
        for (i, d) in docs.iter().enumerate() {
            assert_eq!(d.get_object_id("_id").unwrap(), ids[i]);
            assert_eq!(d.get_str("type").unwrap(), "write");
            assert_eq!(d.get_i32("index").unwrap(), i as i32);
            let payload = d.get_str("payload").unwrap();
            assert_eq!(payload.len(), PAYLOAD_LEN);
            assert!(payload.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(d.get_datetime("timestamp").is_ok());
        }
    }
}

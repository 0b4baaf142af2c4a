//! The stored document: `{_id, type: "write", index, payload, timestamp}`.
//!
//! Ids are made here, in-process, before anything is sent. That is what makes retries
//! safe: a document sent twice collides on its own `_id` instead of being stored twice.
//! With an `Idempotency-Key`, the ids derive from the key, so a client's replay of the
//! same request collides too, and is answered with the same ids.
//!
//! Documents are encoded to BSON once, here: a retried insert sends the same bytes
//! without encoding them again, and the writer knows each batch's size in bytes.

use bson::oid::ObjectId;
use bson::{DateTime, RawDocumentBuf};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

pub const PER_REQUEST: usize = 5;
const PAYLOAD_LEN: usize = 512;

/// A client's `Idempotency-Key` (the IETF httpapi draft of that name): 8 to 128
/// characters from `A-Z a-z 0-9 . _ : ~ -`, sent as a structured-field string
/// (`"..."`) or bare. Keys are not secrets: sluice has no authentication, so anyone who
/// knows a key can replay it and see its ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MIN_LEN: usize = 8;
    pub const MAX_LEN: usize = 128;

    /// The key as the client sent it, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn parse(header: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(header).map_err(|_| "is not ASCII".to_string())?;
        let text = text.trim();
        let key = match text.strip_prefix('"') {
            Some(rest) => rest
                .strip_suffix('"')
                .ok_or_else(|| "opens a quote it does not close".to_string())?,
            None => text,
        };
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&key.len()) {
            return Err(format!(
                "must be {} to {} characters long",
                Self::MIN_LEN,
                Self::MAX_LEN
            ));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:~-".contains(&b))
        {
            return Err("may hold only A-Z a-z 0-9 . _ : ~ -".into());
        }
        Ok(IdempotencyKey(key.to_string()))
    }

    /// The request's ids, the same on every pod and every run. They are hashes, so they
    /// carry no meaningful ObjectId time and land in random places of the `_id` index.
    fn ids(&self) -> [ObjectId; PER_REQUEST] {
        std::array::from_fn(|i| {
            let (a, b) = (
                fnv1a(self.0.as_bytes(), 2 * i as u64),
                fnv1a(self.0.as_bytes(), 2 * i as u64 + 1),
            );
            let mut bytes = [0u8; 12];
            bytes[..8].copy_from_slice(&a.to_be_bytes());
            bytes[8..].copy_from_slice(&b.to_be_bytes()[..4]);
            ObjectId::from_bytes(bytes)
        })
    }
}

/// FNV-1a, 64 bits, with a seed folded in first: stable across builds and platforms,
/// unlike the standard library's hasher.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The 5 documents one `/api/data` request stores, and their ids.
pub fn new_batch(key: Option<&IdempotencyKey>) -> ([ObjectId; PER_REQUEST], Vec<RawDocumentBuf>) {
    // A small, fast generator per request: the payload is filler, not a secret.
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let now = DateTime::now();
    let ids = key.map_or_else(
        || std::array::from_fn(|_| ObjectId::new()),
        IdempotencyKey::ids,
    );
    let mut buf = [0u8; PAYLOAD_LEN];
    let docs = ids
        .iter()
        .zip(0i32..)
        .map(|(id, index)| {
            // Sized once: growing a document field by field (and byte by byte for each
            // key) was half of building the batch in the profile.
            let mut bytes = Vec::with_capacity(DOC_CAPACITY);
            bytes.extend_from_slice(EMPTY_DOCUMENT);
            let mut doc = RawDocumentBuf::from_bytes(bytes).expect("the empty document");
            doc.append_ref("_id", *id);
            doc.append_ref("type", "write");
            doc.append_ref("index", index);
            doc.append_ref("payload", payload(&mut rng, &mut buf));
            doc.append_ref("timestamp", now);
            doc
        })
        .collect();
    (ids, docs)
}

/// BSON's empty document: its length (5) and the terminating zero.
const EMPTY_DOCUMENT: &[u8] = &[5, 0, 0, 0, 0];
/// A stored document's size in BSON: the payload and about 80 bytes of the other fields.
const DOC_CAPACITY: usize = PAYLOAD_LEN + 96;

/// `PAYLOAD_LEN` random alphanumeric characters, written into `buf`. One random byte a
/// character, scaled to 0..62 by multiply-and-shift: a character comes out 4 or 5 times
/// in 256 instead of exactly 1 in 62, which does not matter for filler and is an order of
/// magnitude cheaper than sampling each character without bias (the profile showed
/// rand's per-character sampling at a fifth of a request's CPU). The digit is turned into
/// its character by arithmetic, not by a table: without a load per character the loop
/// runs on whole vector registers (`records` in `benches/request_instructions.rs`).
fn payload<'b>(rng: &mut SmallRng, buf: &'b mut [u8; PAYLOAD_LEN]) -> &'b str {
    rng.fill_bytes(buf);
    for b in buf.iter_mut() {
        *b = alphanumeric(*b);
    }
    std::str::from_utf8(buf).expect("alphanumeric is ASCII")
}

/// The byte `random` scaled to 0..62 and spelled `0-9`, `A-Z`, `a-z`, in that order.
fn alphanumeric(random: u8) -> u8 {
    let digit = ((u16::from(random) * 62) >> 8) as u8;
    let to_upper = if digit >= 10 { b'A' - b'9' - 1 } else { 0 };
    let to_lower = if digit >= 36 { b'a' - b'Z' - 1 } else { 0 };
    digit + b'0' + to_upper + to_lower
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
        let (ids, docs) = new_batch(None);
        assert_eq!(docs.len(), PER_REQUEST);
        for (i, raw) in docs.iter().enumerate() {
            let d = raw.to_document().unwrap();
            assert_eq!(d.get_object_id("_id").unwrap(), ids[i]);
            assert_eq!(d.get_str("type").unwrap(), "write");
            assert_eq!(d.get_i32("index").unwrap(), i as i32);
            let payload = d.get_str("payload").unwrap();
            assert_eq!(payload.len(), PAYLOAD_LEN);
            assert!(payload.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(d.get_datetime("timestamp").is_ok());
            assert!(raw.as_bytes().len() <= DOC_CAPACITY, "sized once");
        }
    }

    #[test]
    fn every_byte_is_one_of_the_62_characters_and_each_comes_out() {
        let all: std::collections::BTreeSet<u8> = (0..=255).map(alphanumeric).collect();
        let expected: std::collections::BTreeSet<u8> = (b'0'..=b'9')
            .chain(b'A'..=b'Z')
            .chain(b'a'..=b'z')
            .collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn a_key_always_gives_the_same_distinct_ids() {
        let key = IdempotencyKey::parse(b"\"order-2026-11-23:0001\"").unwrap();
        let (a, _) = new_batch(Some(&key));
        let (b, _) = new_batch(Some(
            &IdempotencyKey::parse(b"order-2026-11-23:0001").unwrap(),
        ));
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), PER_REQUEST);
        let (c, _) = new_batch(Some(
            &IdempotencyKey::parse(b"order-2026-11-23:0002").unwrap(),
        ));
        assert!(a.iter().all(|id| !c.contains(id)));
    }

    #[test]
    fn bad_keys_say_why() {
        for bad in [
            &b"short"[..],
            b"\"unclosed-key",
            b"spaces are bad",
            b"caf\xc3\xa9-latte-key",
        ] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IdempotencyKey::parse(&[b'k'; 129]).is_err());
    }
}

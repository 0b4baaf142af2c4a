//! Idempotency keys in flight, claimed on this pod and in Redis.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::record::IdempotencyKey;
use crate::shared::Shared;

/// Idempotency keys of requests in flight anywhere in the cluster: a second request with
/// the same key while the first is unanswered gets 409 instead of racing it, on whichever
/// pod it lands.
///
/// Each key is claimed on this pod first (a set in memory), then in Redis (`SET NX PX`)
/// for `ttl`, which outlives the request: its enqueue wait, its write deadline and its
/// reads. A claim is released by its holder only (compare-and-delete) when the request is
/// answered. With Redis unreachable the pod's own claim stands alone, as it did before
/// there was a shared one: the same key sent to two pods then races, and the ids that
/// derive from the key still store its documents once.
pub struct InFlight {
    local: Mutex<HashSet<IdempotencyKey>>,
    shared: Arc<Shared>,
    ttl: Duration,
    /// This pod's name; each claim adds a number of its own.
    pod: String,
    claims: AtomicU64,
}

/// Holds a key as in flight until dropped.
pub struct Claim<'a> {
    set: &'a InFlight,
    key: IdempotencyKey,
    /// The holder token of the claim in Redis, if Redis took it.
    shared: Option<String>,
}

impl InFlight {
    pub fn new(shared: Arc<Shared>, ttl: Duration, pod: String) -> Self {
        InFlight {
            local: Mutex::new(HashSet::new()),
            shared,
            ttl,
            pod,
            claims: AtomicU64::new(0),
        }
    }

    /// The claim on `key`, or `None` if a request with it is in flight on any pod.
    pub async fn claim(&self, key: &IdempotencyKey) -> Option<Claim<'_>> {
        if !self
            .local
            .lock()
            .expect("in-flight lock")
            .insert(key.clone())
        {
            return None;
        }
        let holder = format!(
            "{}:{}",
            self.pod,
            self.claims.fetch_add(1, Ordering::Relaxed)
        );
        // The holder is kept before Redis answers: a `SET` that took the key but whose
        // answer was lost is still released by compare-and-delete, not left to expire.
        let mut claim = Claim {
            set: self,
            key: key.clone(),
            shared: Some(holder),
        };
        let holder = claim.shared.as_deref().expect("set above");
        match self.shared.claim_key(key.as_str(), holder, self.ttl).await {
            Ok(true) => {}
            // Another pod's request holds it; dropping the claim frees the local one.
            Ok(false) => {
                claim.shared = None;
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis unreachable; the idempotency key is claimed on this pod only");
            }
        }
        Some(claim)
    }
}

impl Claim<'_> {
    /// Releases the claim before the answer leaves, so the client's next replay finds
    /// the key free on any pod. Redis is asked within its timeout; a release that fails
    /// leaves the claim to expire after its ttl.
    pub async fn release(mut self) {
        if let Some(holder) = self.shared.take() {
            if let Err(e) = self
                .set
                .shared
                .release_key(self.key.as_str(), &holder)
                .await
            {
                tracing::debug!(error = %e, "could not release an idempotency key's claim; it expires");
            }
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set
            .local
            .lock()
            .expect("in-flight lock")
            .remove(&self.key);
        if let Some(holder) = self.shared.take() {
            let (shared, key) = (Arc::clone(&self.set.shared), self.key.clone());
            // A request dropped before its answer (the client went away): released in
            // the background. A release that fails leaves the claim to expire.
            tokio::spawn(async move {
                if let Err(e) = shared.release_key(key.as_str(), &holder).await {
                    tracing::debug!(error = %e, "could not release an idempotency key's claim; it expires");
                }
            });
        }
    }
}

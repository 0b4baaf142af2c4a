//! `/api/stats`' count, cached for a second with one refresh at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::Budget;
use crate::store::{Store, StoreError};

/// `/api/stats`: the collection's size from metadata, at most one command per second
/// per pod, never holding a request longer than `DB_TIMEOUT_MS`.
pub struct Stats {
    store: Arc<Store>,
    budget: Arc<Budget>,
    /// The last answer (or failure) and when it was taken.
    last: Mutex<Option<(Instant, Result<u64, StoreError>)>>,
    /// One refresh at a time; the others serve the last answer meanwhile.
    refreshing: tokio::sync::Mutex<()>,
}

/// How long one count (or one failure to count) is served.
const STATS_TTL: Duration = Duration::from_secs(1);

impl Stats {
    pub fn new(store: Arc<Store>, budget: Arc<Budget>) -> Self {
        Stats {
            store,
            budget,
            last: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn total_documents(&self) -> Result<u64, StoreError> {
        let limit = self.store.timeout();
        let deadline = Instant::now() + limit;
        loop {
            let last = self.last.lock().expect("stats lock").clone();
            if let Some((at, answer)) = &last {
                if at.elapsed() < STATS_TTL {
                    return answer.clone();
                }
            }
            match self.refreshing.try_lock() {
                Ok(_turn) => {
                    let answer = tokio::time::timeout_at(deadline, async {
                        let token = self.budget.acquire().await;
                        let left = deadline.saturating_duration_since(Instant::now());
                        self.store.estimated_count(token, left).await
                    })
                    .await
                    .unwrap_or(Err(StoreError::Slow(limit)));
                    *self.last.lock().expect("stats lock") = Some((Instant::now(), answer.clone()));
                    return answer;
                }
                // Someone is counting: serve the last count, however old, if there is one.
                Err(_) => match last {
                    Some((_, Ok(count))) => return Ok(count),
                    _ => {
                        if tokio::time::timeout_at(deadline, self.refreshing.lock())
                            .await
                            .is_err()
                        {
                            return Err(StoreError::Slow(limit));
                        }
                    }
                },
            }
        }
    }
}

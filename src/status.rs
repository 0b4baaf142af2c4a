//! The shape of `/api/cache/status`, as one serde type: the endpoint serializes it,
//! `sluice status` and the lab's report read it back, and the OpenAPI document's
//! `CacheStatus` schema is tested against it. A field added here shows up everywhere,
//! and a field renamed breaks a test rather than a dashboard.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pod: String,
    /// `coalescing`, or `naive` for the comparison mode.
    pub mode: String,
    pub l1: L1Status,
    pub l2: L2Status,
    pub refreshes: Refreshes,
    pub writer: WriterStatus,
    pub budget: BudgetStatus,
    pub database: DatabaseStatus,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L1Status {
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    /// What L1 holds now, if anything.
    pub value: Option<CachedValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedValue {
    /// The first `type: "write"` document's id, `null` while the collection is empty.
    pub id: Option<String>,
    pub age_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L2Status {
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub connected: bool,
    /// `REDIS_URL` with its password redacted.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refreshes {
    pub from_database: u64,
    pub from_shared: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriterStatus {
    pub queue_depth: u64,
    pub queue_capacity: u64,
    pub batches_flushed: u64,
    pub documents_stored: u64,
    pub documents_per_batch_avg: f64,
    pub flush_latency_ms_avg: f64,
    pub retries: u64,
    pub failed_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    /// `DB_COMMAND_BUDGET`: commands per second for the whole cluster.
    pub cluster_commands_per_second: u32,
    /// What this pod spends at most while it cannot reach Redis.
    pub fallback_commands_per_second: f64,
    /// Where tokens come from now: `cluster` (Redis), `fallback` or `local`.
    pub mode: String,
    /// Commands this pod has sent since it started.
    pub commands_sent: u64,
    /// Commands sent and not yet answered, and the most there may be.
    pub in_flight: u64,
    pub in_flight_cap: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatabaseStatus {
    pub healthy: bool,
    /// `MONGO_URI` with its password redacted.
    pub uri: String,
}

/// Hits as a share of lookups, `None` before the first lookup.
pub fn hit_ratio(hits: u64, misses: u64) -> Option<f64> {
    let total = hits + misses;
    (total > 0).then(|| hits as f64 / total as f64)
}

impl L1Status {
    pub fn hit_ratio(&self) -> Option<f64> {
        hit_ratio(self.hits, self.misses)
    }
}

impl L2Status {
    pub fn hit_ratio(&self) -> Option<f64> {
        hit_ratio(self.hits, self.misses)
    }
}

//! Everything the pods share through Redis: the L2 read cache, the refresh lock that lets
//! one pod in the whole cluster query MongoDB, and the heartbeats that split the budget.
//!
//! This is the only module that talks to Redis. Redis is a cache here, never a source of
//! truth: every call fails fast (no queueing while disconnected) and has a short timeout,
//! so a Redis outage costs each request at most one timeout before the callers fall back
//! to L1 and MongoDB.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bson::oid::ObjectId;
use fred::clients::WithOptions;
use fred::prelude::*;
use fred::types::config::{Config as RedisConfig, ReconnectPolicy};
use fred::types::{Expiration, SetOptions};
use serde::{Deserialize, Serialize};

use crate::config::SharedSettings;

const READ_KEY: &str = "sluice:read:first-write";
const LOCK_KEY: &str = "sluice:lock:first-write";
const PODS_KEY: &str = "sluice:pods";

/// Adds this pod with the server's clock (so pods' clocks need not agree), forgets pods
/// that missed their heartbeats, and counts the rest, in one round trip.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
";

/// Deletes the shared read only if it says the collection is empty: once a document is
/// stored, no pod may go on serving "empty" from L2.
const FORGET_EMPTY_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.find(v, '"id":null', 1, true) then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Deletes the lock only if this pod still holds it, so a slow pod whose lock expired
/// cannot release another pod's.
const UNLOCK_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct SharedError(#[from] fred::error::Error);

/// The result of the read query, as cached in both tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedRead {
    /// The first `type: "write"` document's id; `None` while the collection is empty.
    pub id: Option<ObjectId>,
    /// When MongoDB answered, in milliseconds since the Unix epoch.
    pub fetched_at_ms: u64,
}

impl CachedRead {
    /// How old the answer is at `now_ms` (a [`Clock`] reading).
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.fetched_at_ms))
    }
}

/// Wall-clock milliseconds, as the pods stamp shared answers with, advancing with tokio's
/// clock: read once from the system at start, then moved on by tokio's monotonic time.
/// So ages never jump with a clock step, and the read cache's rules run under tokio's
/// paused time in tests.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch_ms_at_start: u64,
    start: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            epoch_ms_at_start: u64::try_from(since.as_millis()).unwrap_or(u64::MAX),
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.epoch_ms_at_start.saturating_add(elapsed)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Shared {
    client: Client,
    options: Options,
}

impl Shared {
    /// Builds the client and starts connecting in the background. Start-up does not wait
    /// for Redis: sluice serves without it.
    pub fn connect(settings: &SharedSettings) -> Result<Self, SharedError> {
        let timeout = settings.redis_timeout;
        let config = RedisConfig::from_url(settings.redis_url.expose())?;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_millis(500));
                c.internal_command_timeout = timeout.max(Duration::from_millis(500));
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .set_policy(ReconnectPolicy::new_constant(0, 500))
            .build()?;
        client.connect();
        let options = Options {
            fail_fast: true,
            timeout: Some(timeout),
            max_attempts: Some(1),
            ..Default::default()
        };
        Ok(Shared { client, options })
    }

    /// Waits up to `limit` for the first connection; false if Redis did not answer.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.client.wait_for_connect()).await,
            Ok(Ok(()))
        )
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    fn call(&self) -> WithOptions<Client> {
        self.client.with_options(&self.options)
    }

    pub async fn get_read(&self) -> Result<Option<CachedRead>, SharedError> {
        let raw: Option<String> = self.call().get(READ_KEY).await?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn put_read(&self, read: &CachedRead, ttl: Duration) -> Result<(), SharedError> {
        let json = serde_json::to_string(read).expect("serializable");
        let px = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let _: () = self
            .call()
            .set(READ_KEY, json, Some(Expiration::PX(px)), None, false)
            .await?;
        Ok(())
    }

    /// Deletes the shared read if it is an empty answer.
    pub async fn forget_empty_read(&self) -> Result<(), SharedError> {
        let _: i64 = self
            .call()
            .eval(FORGET_EMPTY_SCRIPT, vec![READ_KEY], Vec::<String>::new())
            .await?;
        Ok(())
    }

    /// Takes the cluster-wide refresh lock for `ttl` unless another pod holds it.
    pub async fn try_lock(&self, holder: &str, ttl: Duration) -> Result<bool, SharedError> {
        let px = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> = self
            .call()
            .set(
                LOCK_KEY,
                holder,
                Some(Expiration::PX(px)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    pub async fn unlock(&self, holder: &str) -> Result<(), SharedError> {
        let _: i64 = self
            .call()
            .eval(UNLOCK_SCRIPT, vec![LOCK_KEY], vec![holder])
            .await?;
        Ok(())
    }

    /// Records this pod as alive and returns how many pods are.
    pub async fn heartbeat(&self, pod: &str, ttl: Duration) -> Result<u32, SharedError> {
        let ttl_ms = ttl.as_millis().to_string();
        let pods: i64 = self
            .call()
            .eval(HEARTBEAT_SCRIPT, vec![PODS_KEY], vec![pod, ttl_ms.as_str()])
            .await?;
        Ok(u32::try_from(pods).unwrap_or(1))
    }

    pub async fn leave(&self, pod: &str) -> Result<(), SharedError> {
        let _: i64 = self.call().zrem(PODS_KEY, pod).await?;
        Ok(())
    }

    /// Round trip to Redis, for the `check` subcommand.
    pub async fn ping(&self) -> Result<String, SharedError> {
        Ok(self.call().ping(None).await?)
    }

    pub async fn quit(&self) {
        if self.client.is_connected() {
            let _ = self.client.quit().await;
        }
    }
}

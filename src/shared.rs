//! Everything the pods share through Redis: the L2 read cache, the refresh lock that lets
//! one pod in the whole cluster query MongoDB, and the cluster's one command schedule.
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
/// Prefix of the claims on idempotency keys of requests in flight anywhere.
const KEY_CLAIM_PREFIX: &str = "sluice:idempotency:";
const LOCK_KEY: &str = "sluice:lock:first-write";
const BUDGET_KEY: &str = "sluice:budget:next";

/// The cluster's command schedule (GCRA by virtual scheduling), on Redis's clock so the
/// pods' clocks need not agree. `KEYS[1]` holds the theoretical arrival time of the next
/// token, in microseconds. A token is reserved only if it is due within one `period`
/// (`ARGV[1]`, microseconds): the answer is then the wait until it is due (0 or more).
/// Otherwise nothing is reserved and the answer is minus the wait until asking again.
/// Keeping reservations within one period means at most one token is promised and not
/// yet due at any moment, so losing the key (a Redis restart) frees at most that one.
/// The key expires once it lies in the past, so an idle cluster leaves nothing behind.
/// Reserving so never puts the schedule more than two periods ahead of Redis's clock; a
/// schedule further ahead means that clock stepped back, and waiting for it would stop
/// every pod for the size of the step: the schedule starts again from now (one token
/// early, as after a restart). `%.0f`: Lua's `%d` is a C `long`, 32 bits on some builds.
const RESERVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local due = tonumber(redis.call('GET', KEYS[1]) or '0')
if due < now or due > now + 2 * period then due = now end
local wait = due - now
if wait > period then return -(wait - period) end
redis.call('SET', KEYS[1], string.format('%.0f', due + period), 'PX', math.floor((wait + period) / 1000) + 1000)
return wait
";

/// Deletes the shared read only if it says the collection is empty: once a document is
/// stored, no pod may go on serving "empty" from L2.
const FORGET_EMPTY_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.find(v, '"id":null', 1, true) then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Deletes a lock (the refresh lock, an idempotency key's claim) only if its holder still
/// holds it, so a slow holder whose lock expired cannot release another's.
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
    /// Required, though it may be null: a value without it is damaged, not "empty".
    #[serde(deserialize_with = "Option::deserialize")]
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

/// Logs, at most once a minute, that Redis refused the login: a missing or wrong password
/// otherwise shows only as commands timing out while the client retries, and the
/// operator would look for a network fault.
fn warn_on_refused_login(client: &Client) {
    const EVERY: Duration = Duration::from_secs(60);
    let last: std::sync::Mutex<Option<tokio::time::Instant>> = std::sync::Mutex::new(None);
    let _listener = client.on_error(move |(error, _server)| {
        if *error.kind() == fred::error::ErrorKind::Auth {
            let mut last = last.lock().expect("warning lock");
            if last.is_none_or(|at| at.elapsed() >= EVERY) {
                *last = Some(tokio::time::Instant::now());
                tracing::warn!(error = %error, "redis refused the login: check the password in REDIS_URL");
            }
        }
        async { Ok(()) }
    });
}

pub struct Shared {
    client: Client,
    options: Options,
}

impl Shared {
    /// Builds the client and starts connecting in the background, for as long as the
    /// process lives. Start-up does not wait for Redis: sluice serves without it.
    pub fn connect(settings: &SharedSettings) -> Result<Self, SharedError> {
        let timeout = settings.redis_timeout;
        let mut config = RedisConfig::from_url(settings.redis_url.expose())?;
        // fred's default tries the first connection once and gives up for good; the
        // reconnect policy below (unlimited attempts) then covers the first one too, so a
        // pod started while Redis is down joins it when it comes up.
        config.fail_fast = false;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_millis(500));
                c.internal_command_timeout = timeout.max(Duration::from_millis(500));
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .set_policy(ReconnectPolicy::new_constant(0, 500))
            .build()?;
        warn_on_refused_login(&client);
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
        self.take(LOCK_KEY.to_string(), holder, ttl).await
    }

    pub async fn unlock(&self, holder: &str) -> Result<(), SharedError> {
        self.release(LOCK_KEY.to_string(), holder).await
    }

    /// Claims an idempotency key for a request in flight, for `ttl`, unless a request on
    /// any pod holds it.
    pub async fn claim_key(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, SharedError> {
        self.take(format!("{KEY_CLAIM_PREFIX}{key}"), holder, ttl)
            .await
    }

    /// Releases a key's claim if `holder` still holds it.
    pub async fn release_key(&self, key: &str, holder: &str) -> Result<(), SharedError> {
        self.release(format!("{KEY_CLAIM_PREFIX}{key}"), holder)
            .await
    }

    async fn take(&self, key: String, holder: &str, ttl: Duration) -> Result<bool, SharedError> {
        let px = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> = self
            .call()
            .set(
                key,
                holder,
                Some(Expiration::PX(px)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    async fn release(&self, key: String, holder: &str) -> Result<(), SharedError> {
        let _: i64 = self
            .call()
            .eval(UNLOCK_SCRIPT, vec![key], vec![holder])
            .await?;
        Ok(())
    }

    /// Reserves the cluster's next database command `period_us` microseconds after the
    /// last one: the wait until it is due, or a negative number (minus the wait before
    /// asking again) when the schedule is full.
    pub async fn reserve_command(&self, period_us: u64) -> Result<i64, SharedError> {
        let period = period_us.to_string();
        Ok(self
            .call()
            .eval(RESERVE_SCRIPT, vec![BUDGET_KEY], vec![period.as_str()])
            .await?)
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

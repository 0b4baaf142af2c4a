//! The cluster-wide MongoDB command budget.
//!
//! The disk sustains about 100 I/O operations a second and every command costs journal
//! I/O, so the number of *commands* is what must be capped, not documents. One setting
//! (`DB_COMMAND_BUDGET`) is the cap for the whole cluster; each pod takes an equal share
//! of the pods that heartbeat into Redis, recomputed every second, so scaling the
//! Deployment up or down never moves the total. While Redis is unreachable each pod
//! assumes `BUDGET_FALLBACK_PODS` pods, which errs on the side of the disk.
//!
//! Every store method takes a [`Token`], and only [`Budget`] makes them, so no command can
//! reach MongoDB without having been paid for. The writer waits for its token while it
//! keeps filling its batch: when the budget binds, batches grow instead of commands
//! multiplying. The pacing itself is `governor`'s GCRA limiter with a burst of one.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::shared::Shared;

/// Proof that one MongoDB command was paid for.
#[must_use = "a token is the right to send one command"]
pub struct Token(());

pub struct Budget {
    cluster_rate: u32,
    fallback_pods: u32,
    limiter: RwLock<Arc<DefaultDirectRateLimiter>>,
    pods: AtomicU32,
    pods_from_redis: AtomicBool,
    /// Commands paid for since the last heartbeat tick.
    used: AtomicU64,
    metrics: Arc<Metrics>,
}

/// How often pods heartbeat, and so how fast the split follows scaling.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A pod missing for this long no longer holds a share.
const POD_TTL: Duration = Duration::from_secs(3);

impl Budget {
    /// Starts as if Redis were down: the conservative split until the first heartbeat.
    pub fn new(cluster_rate: u32, fallback_pods: u32, metrics: Arc<Metrics>) -> Self {
        let budget = Budget {
            cluster_rate,
            fallback_pods,
            limiter: RwLock::new(Arc::new(limiter(cluster_rate, fallback_pods))),
            pods: AtomicU32::new(fallback_pods),
            pods_from_redis: AtomicBool::new(false),
            used: AtomicU64::new(0),
            metrics,
        };
        budget.publish();
        budget
    }

    /// Waits until this pod may send one more command.
    pub async fn acquire(&self) -> Token {
        let limiter = self.current();
        limiter.until_ready().await;
        self.used.fetch_add(1, Ordering::Relaxed);
        Token(())
    }

    /// A token if one is free right now; for optional commands such as health pings.
    pub fn try_acquire(&self) -> Option<Token> {
        self.current().check().ok()?;
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(Token(()))
    }

    /// Commands per second this pod may send now.
    pub fn share(&self) -> f64 {
        f64::from(self.cluster_rate) / f64::from(self.pods.load(Ordering::Relaxed))
    }

    pub fn cluster_rate(&self) -> u32 {
        self.cluster_rate
    }

    pub fn live_pods(&self) -> u32 {
        self.pods.load(Ordering::Relaxed)
    }

    /// Whether the pod count came from Redis heartbeats (else it is the fallback).
    pub fn pods_from_redis(&self) -> bool {
        self.pods_from_redis.load(Ordering::Relaxed)
    }

    fn current(&self) -> Arc<DefaultDirectRateLimiter> {
        self.limiter.read().expect("limiter lock").clone()
    }

    fn set_pods(&self, pods: u32, from_redis: bool) {
        let pods = pods.max(1);
        self.pods_from_redis.store(from_redis, Ordering::Relaxed);
        if self.pods.swap(pods, Ordering::Relaxed) != pods {
            // A new limiter forgets the old one's pacing state; waiters already parked on
            // the old one finish there. Both cost at most one extra command per change.
            *self.limiter.write().expect("limiter lock") =
                Arc::new(limiter(self.cluster_rate, pods));
            tracing::info!(pods, share = self.share(), "database budget re-split");
        }
        self.publish();
    }

    fn publish(&self) {
        self.metrics.budget_share.set(self.share());
        self.metrics.live_pods.set(i64::from(self.live_pods()));
    }

    /// Heartbeats into Redis every second and re-splits the budget from the live pod
    /// count, until `stop`; then leaves the pod set so the others take its share at once.
    pub async fn run_heartbeats(&self, shared: &Shared, pod: &str, stop: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let used = self.used.swap(0, Ordering::Relaxed);
            self.metrics
                .budget_used
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            match shared.heartbeat(pod, POD_TTL).await {
                Ok(pods) => self.set_pods(pods, true),
                Err(e) => {
                    if self.pods_from_redis() {
                        tracing::warn!(error = %e, fallback_pods = self.fallback_pods,
                            "redis heartbeat failed; assuming the fallback pod count");
                    }
                    self.set_pods(self.fallback_pods, false);
                }
            }
        }
        if let Err(e) = shared.leave(pod).await {
            tracing::debug!(error = %e, "could not leave the pod set; it expires by itself");
        }
    }
}

fn limiter(cluster_rate: u32, pods: u32) -> DefaultDirectRateLimiter {
    let period = Duration::from_secs_f64(f64::from(pods) / f64::from(cluster_rate));
    let quota = Quota::with_period(period)
        .expect("a positive period")
        .allow_burst(NonZeroU32::MIN);
    RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_follows_the_pod_count() {
        let budget = Budget::new(50, 2, Arc::new(Metrics::new()));
        assert_eq!(budget.share(), 25.0);
        budget.set_pods(5, true);
        assert_eq!(budget.share(), 10.0);
        budget.set_pods(0, true);
        assert_eq!(budget.share(), 50.0, "a pod always counts itself");
    }

    #[test]
    fn no_burst_beyond_one_command() {
        let budget = Budget::new(10, 1, Arc::new(Metrics::new()));
        assert!(budget.try_acquire().is_some());
        assert!(budget.try_acquire().is_none());
    }
}

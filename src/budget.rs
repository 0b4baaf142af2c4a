//! The cluster-wide MongoDB command budget.
//!
//! The disk sustains about 100 I/O operations a second and every command costs journal
//! I/O, so the number of *commands* is what must be capped, not documents. One setting
//! (`DB_COMMAND_BUDGET`) is the cap for the whole cluster, and the invariant is that the
//! shares all live pods spend add up to at most that at every moment, while pods come and
//! go and Redis restarts:
//!
//! - **Lower at once, raise late.** Each pod heartbeats into Redis every second and
//!   divides the budget by the *largest* pod count it saw in the last
//!   [`RAISE_AFTER`]. A new pod makes every share smaller within one heartbeat; a pod
//!   that left makes them larger only once every other pod has had time to see the same
//!   count. After a Redis restart the first heartbeat sees a set of one, but the pods keep
//!   the count they saw before until the set has filled again.
//! - **Join before spending.** A new pod registers, then waits two heartbeat periods (its
//!   readiness waits too) before it sends anything, so the others have lowered their
//!   shares before it spends its own.
//! - **Cut off from Redis.** A pod whose heartbeat fails spends `budget /
//!   BUDGET_FALLBACK_PODS`. If every pod is cut off that adds up to at most the budget
//!   (the deploy checks hold `BUDGET_FALLBACK_PODS >= maxReplicas + maxSurge`). If only
//!   some are, the others drop them after [`POD_TTL`] and split the whole budget, so the
//!   worst case is `k × budget / BUDGET_FALLBACK_PODS` over the cap for `k` cut-off pods.
//!
//! Every store method takes a [`Token`], and only [`Budget`] makes them, so no command can
//! reach MongoDB without having been paid for. The pacing is virtual scheduling (GCRA with
//! a burst of one): each token is given the next free instant, one period after the last.
//! A re-split changes the period of the tokens to come; it never makes a new limiter, so it
//! never hands out a free burst. Time is tokio's, so the rules are unit-tested under
//! paused time.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::shared::Shared;

/// Proof that one MongoDB command was paid for.
#[must_use = "a token is the right to send one command"]
pub struct Token(());

/// How often pods heartbeat, and so how fast the split follows scaling.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A pod missing for this long no longer holds a share.
pub const POD_TTL: Duration = Duration::from_secs(3);
/// How long a new pod waits after registering before it spends: two heartbeats, so every
/// other pod has heartbeated (and lowered its share) in between, whatever the phase of
/// their heartbeats against ours. One was measured too short by the lab: a second over
/// the budget when a pod joined right after a Redis restart.
pub const JOIN_WAIT: Duration = Duration::from_secs(2);
/// How long a pod count keeps holding the share down after a lower one is seen: two
/// heartbeats, so every other pod has heartbeated (and seen the new count) in between.
pub const RAISE_AFTER: Duration = Duration::from_secs(2);

/// Where the pod count comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Not registered yet (or registered less than a heartbeat ago): spend nothing.
    Joining,
    /// Counted from Redis heartbeats.
    Redis,
    /// Redis unreachable: `BUDGET_FALLBACK_PODS` assumed.
    Fallback,
}

struct Pacer {
    /// The earliest instant the next token may be used.
    next_free: Instant,
    period: Duration,
    /// Counts seen recently, newest last, for "raise late".
    seen: Vec<(Instant, u32)>,
    split: Split,
    /// When the pod may start spending (one heartbeat after it registered).
    spend_from: Option<Instant>,
}

pub struct Budget {
    cluster_rate: u32,
    fallback_pods: u32,
    pacer: Mutex<Pacer>,
    /// Wakes waiters when the pod may start spending.
    joined: tokio::sync::Notify,
    pods: AtomicU32,
    joining: AtomicBool,
    /// Commands paid for since the last heartbeat tick.
    used: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Budget {
    /// A pod that spends nothing until it has registered (see [`Budget::run_heartbeats`]).
    pub fn new(cluster_rate: u32, fallback_pods: u32, metrics: Arc<Metrics>) -> Self {
        let budget = Budget {
            cluster_rate,
            fallback_pods,
            pacer: Mutex::new(Pacer {
                next_free: Instant::now(),
                period: period(cluster_rate, fallback_pods),
                seen: Vec::new(),
                split: Split::Joining,
                spend_from: None,
            }),
            joined: tokio::sync::Notify::new(),
            pods: AtomicU32::new(fallback_pods),
            joining: AtomicBool::new(true),
            used: AtomicU64::new(0),
            metrics,
        };
        budget.publish();
        budget
    }

    /// A budget for one process alone (operator tools, benchmarks): no heartbeats, the
    /// whole rate at once.
    pub fn standalone(rate: u32, metrics: Arc<Metrics>) -> Self {
        let budget = Budget::new(rate, 1, metrics);
        budget.counted(1, Split::Redis, Instant::now());
        budget.start_spending(Instant::now());
        budget
    }

    /// Waits until this pod may send one more command.
    pub async fn acquire(&self) -> Token {
        loop {
            let joined = self.joined.notified();
            if !self.joining.load(Ordering::Acquire) {
                break;
            }
            joined.await;
        }
        let at = {
            let mut p = self.pacer.lock().expect("pacer lock");
            let at = p.next_free.max(Instant::now());
            p.next_free = at + p.period;
            at
        };
        tokio::time::sleep_until(at).await;
        self.used.fetch_add(1, Ordering::Relaxed);
        Token(())
    }

    /// A token if one is free right now; for optional commands such as health pings.
    pub fn try_acquire(&self) -> Option<Token> {
        if self.joining.load(Ordering::Acquire) {
            return None;
        }
        let mut p = self.pacer.lock().expect("pacer lock");
        let now = Instant::now();
        if p.next_free > now {
            return None;
        }
        p.next_free = now + p.period;
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(Token(()))
    }

    /// Whether this pod has finished joining and may spend.
    pub fn is_spending(&self) -> bool {
        !self.joining.load(Ordering::Acquire)
    }

    /// Commands per second this pod may send now.
    pub fn share(&self) -> f64 {
        if self.joining.load(Ordering::Acquire) {
            return 0.0;
        }
        f64::from(self.cluster_rate) / f64::from(self.pods.load(Ordering::Relaxed))
    }

    pub fn cluster_rate(&self) -> u32 {
        self.cluster_rate
    }

    /// The pod count the share is divided by.
    pub fn live_pods(&self) -> u32 {
        self.pods.load(Ordering::Relaxed)
    }

    pub fn split(&self) -> Split {
        self.pacer.lock().expect("pacer lock").split
    }

    /// Records one heartbeat's outcome at `now`: `Some(count)` from Redis, `None` if Redis
    /// could not be reached.
    fn heartbeat_result(&self, result: Option<u32>, now: Instant) {
        match result {
            Some(count) => {
                self.counted(count, Split::Redis, now);
                let first = {
                    let mut p = self.pacer.lock().expect("pacer lock");
                    p.spend_from.is_none().then(|| {
                        p.spend_from = Some(now + JOIN_WAIT);
                    })
                };
                if first.is_some() {
                    tracing::info!("registered in the pod set; spending after one heartbeat");
                }
            }
            None => {
                self.counted(self.fallback_pods, Split::Fallback, now);
                // Nobody can be told about this pod, so waiting buys nothing.
                self.start_spending(now);
            }
        }
        let due = self.pacer.lock().expect("pacer lock").spend_from;
        if due.is_some_and(|t| t <= now) {
            self.start_spending(now);
        }
    }

    fn start_spending(&self, now: Instant) {
        let mut p = self.pacer.lock().expect("pacer lock");
        p.spend_from.get_or_insert(now);
        if self.joining.swap(false, Ordering::AcqRel) {
            p.next_free = p.next_free.max(now);
            drop(p);
            self.joined.notify_waiters();
            self.publish();
        }
    }

    /// Takes a new count: the divisor is the largest count seen within `RAISE_AFTER`.
    fn counted(&self, count: u32, split: Split, now: Instant) {
        let count = count.max(1);
        let mut p = self.pacer.lock().expect("pacer lock");
        // The fallback count stays in the history like any other: when Redis comes back
        // (empty, after a restart), the first heartbeats see only the pods that have
        // registered again, and the fallback keeps the share down for `RAISE_AFTER` after
        // this pod's last failed heartbeat, time for the others' next heartbeats to
        // register them. Clearing the history here once let a pod spend the whole budget.
        p.split = split;
        p.seen
            .retain(|&(at, _)| now.duration_since(at) < RAISE_AFTER);
        p.seen.push((now, count));
        let pods = p.seen.iter().map(|&(_, c)| c).max().unwrap_or(count);
        let new_period = period(self.cluster_rate, pods);
        if new_period != p.period {
            // Tokens already promised keep their instants; the next one is spaced by the
            // new period from the last promised one, so a re-split is never a burst.
            p.period = new_period;
        }
        drop(p);
        if self.pods.swap(pods, Ordering::Relaxed) != pods {
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
        let mut tick = tokio::time::interval(HEARTBEAT / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            // Half-period ticks let the joining wait end on time; beats stay one a second.
            if last_beat.is_some_and(|t| now.duration_since(t) < HEARTBEAT) {
                self.heartbeat_tick_only(now);
                continue;
            }
            last_beat = Some(now);
            let used = self.used.swap(0, Ordering::Relaxed);
            self.metrics
                .budget_used
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            match shared.heartbeat(pod, POD_TTL).await {
                Ok(pods) => self.heartbeat_result(Some(pods), now),
                Err(e) => {
                    if self.split() == Split::Redis {
                        tracing::warn!(error = %e, fallback_pods = self.fallback_pods,
                            "redis heartbeat failed; assuming the fallback pod count");
                    }
                    self.heartbeat_result(None, now);
                }
            }
        }
        if let Err(e) = shared.leave(pod).await {
            tracing::debug!(error = %e, "could not leave the pod set; it expires by itself");
        }
    }

    fn heartbeat_tick_only(&self, now: Instant) {
        let due = self.pacer.lock().expect("pacer lock").spend_from;
        if due.is_some_and(|t| t <= now) {
            self.start_spending(now);
        }
    }
}

fn period(cluster_rate: u32, pods: u32) -> Duration {
    Duration::from_secs_f64(f64::from(pods.max(1)) / f64::from(cluster_rate.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(rate: u32, fallback: u32) -> Budget {
        Budget::new(rate, fallback, Arc::new(Metrics::new()))
    }

    /// Tokens handed out within `window`, acquiring as fast as allowed.
    async fn tokens_within(budget: &Budget, window: Duration) -> u32 {
        let until = Instant::now() + window;
        let mut n = 0;
        loop {
            tokio::select! {
                _ = budget.acquire() => n += 1,
                _ = tokio::time::sleep_until(until) => return n,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_joining_pod_spends_nothing_until_two_heartbeats_have_passed() {
        let b = budget(10, 4);
        assert!(b.try_acquire().is_none());
        b.heartbeat_result(Some(2), Instant::now());
        assert!(
            b.try_acquire().is_none(),
            "registered, but others may not know yet"
        );
        tokio::time::advance(HEARTBEAT).await;
        b.heartbeat_result(Some(2), Instant::now());
        assert!(
            b.try_acquire().is_none(),
            "one heartbeat is not enough for every phase"
        );
        tokio::time::advance(HEARTBEAT).await;
        b.heartbeat_result(Some(2), Instant::now());
        assert!(b.try_acquire().is_some());
        assert_eq!(b.share(), 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn more_pods_lower_the_share_at_once_fewer_raise_it_late() {
        let b = Budget::standalone(10, Arc::new(Metrics::new()));
        b.heartbeat_result(Some(2), Instant::now());
        assert_eq!(b.share(), 5.0);
        b.heartbeat_result(Some(5), Instant::now());
        assert_eq!(b.share(), 2.0, "a new pod lowers the share at once");
        tokio::time::advance(HEARTBEAT).await;
        b.heartbeat_result(Some(1), Instant::now());
        assert_eq!(b.share(), 2.0, "a lower count waits");
        tokio::time::advance(RAISE_AFTER).await;
        b.heartbeat_result(Some(1), Instant::now());
        assert_eq!(b.share(), 10.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_redis_restart_does_not_hand_one_pod_the_whole_budget() {
        let b = Budget::standalone(20, Arc::new(Metrics::new()));
        b.heartbeat_result(Some(4), Instant::now());
        tokio::time::advance(HEARTBEAT).await;
        // Redis restarted empty: this pod is the first to heartbeat into a new set.
        b.heartbeat_result(Some(1), Instant::now());
        let spent = tokens_within(&b, Duration::from_secs(1)).await;
        assert!(
            spent <= 6,
            "spent {spent} in the second after the restart; share is 5/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_redis_restart_seen_as_a_failed_heartbeat_keeps_the_fallback_share() {
        let b = budget(21, 7);
        b.heartbeat_result(Some(3), Instant::now());
        tokio::time::advance(JOIN_WAIT).await;
        b.heartbeat_result(Some(3), Instant::now());
        assert_eq!(b.share(), 7.0);
        // The restart: one heartbeat fails, the next finds an empty set.
        tokio::time::advance(HEARTBEAT).await;
        b.heartbeat_result(None, Instant::now());
        assert_eq!(b.share(), 3.0);
        tokio::time::advance(HEARTBEAT).await;
        b.heartbeat_result(Some(1), Instant::now());
        assert_eq!(b.share(), 3.0, "one pod re-registered is not one pod alive");
        tokio::time::advance(HEARTBEAT).await;
        b.heartbeat_result(Some(3), Instant::now());
        assert_eq!(b.share(), 7.0, "the set has filled again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_split_hands_out_no_free_token() {
        let b = Budget::standalone(10, Arc::new(Metrics::new()));
        b.heartbeat_result(Some(1), Instant::now());
        assert!(b.try_acquire().is_some());
        b.heartbeat_result(Some(2), Instant::now());
        assert!(
            b.try_acquire().is_none(),
            "the re-split must not reset the pacing"
        );
        let spent = tokens_within(&b, Duration::from_secs(2)).await;
        assert!(spent <= 11, "{spent} tokens in 2 s at 5/s");
    }

    #[tokio::test(start_paused = true)]
    async fn cut_off_from_redis_a_pod_spends_the_fallback_share() {
        let b = budget(12, 6);
        b.heartbeat_result(None, Instant::now());
        assert!(b.is_spending(), "Redis down for everyone must still serve");
        assert_eq!(b.share(), 2.0);
        let spent = tokens_within(&b, Duration::from_secs(3)).await;
        assert!((5..=7).contains(&spent), "{spent} tokens in 3 s at 2/s");
    }

    #[tokio::test(start_paused = true)]
    async fn no_burst_beyond_one_command() {
        let b = Budget::standalone(10, Arc::new(Metrics::new()));
        assert!(b.try_acquire().is_some());
        assert!(b.try_acquire().is_none());
    }
}

//! The cluster-wide MongoDB command budget.
//!
//! The disk sustains about 100 I/O operations a second and every command costs journal
//! I/O, so the number of *commands* is what must be capped, not documents. One setting
//! (`DB_COMMAND_BUDGET`) is the cap for the whole cluster, kept by construction rather
//! than by counting pods:
//!
//! - **One limiter in Redis.** Every command's token comes from one GCRA schedule kept in
//!   Redis and advanced by a script on Redis's own clock ([`crate::shared`]), so however
//!   many pods run, and however their clocks drift, the tokens handed out are one period
//!   apart. A pod may reserve at most one period ahead, so at any moment at most one
//!   token is promised but not yet due: the burst is one token, and a Redis restarted
//!   empty (the schedule lost) costs at most that one token more.
//! - **Cut off from Redis.** A pod whose reservation fails takes its tokens from a local
//!   limiter at `budget / BUDGET_FALLBACK_PODS`, and asks Redis again after
//!   [`CLUSTER_RETRY`]. The cluster limiter cannot see those tokens, so each cut-off pod
//!   adds at most its fallback share to the cap while the others still spend the whole
//!   budget; when every pod is cut off they add up to at most the budget, because the
//!   deploy checks hold `BUDGET_FALLBACK_PODS` at or above the most pods that spend at
//!   once (`maxReplicas + maxSurge`). A draining pod draws nothing from the fallback, so
//!   terminating pods never count.
//! - **Sent but unanswered is capped.** A command that times out is not cancelled on the
//!   server: a stalled database runs it when it resumes. Each token holds one of
//!   [`Budget::in_flight_cap`] in-flight slots until the database answers the command
//!   (the store keeps the slot past the caller's timeout), and a slot is taken *before*
//!   the token, so a stall leaves at most that many commands per pod to land in the
//!   second the database resumes, and no token is spent waiting for a slot.
//!
//! Every store method takes a [`Token`], and only [`Budget`] makes them, so no command can
//! reach MongoDB without having been paid for. Time is tokio's, and Redis sits behind the
//! [`Cluster`] seam, so the rules are unit-tested under paused time.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::{BudgetMode, Metrics};
use crate::shared::{Shared, SharedError};

/// Proof that one MongoDB command was paid for; holds one in-flight slot until dropped,
/// which the store does only once the database has answered the command.
#[must_use = "a token is the right to send one command"]
pub struct Token {
    _slot: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl Drop for Token {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// After a failed reservation, how long a pod spends from the fallback before it asks
/// Redis again: a hung Redis then costs one `REDIS_TIMEOUT_MS` a second, not one per
/// command.
pub const CLUSTER_RETRY: Duration = Duration::from_secs(1);

/// The cluster limiter's answer to one reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Reserved: the token is due after this wait (at most one period).
    After(Duration),
    /// Not reserved, the schedule is full for now: ask again after this long.
    Later(Duration),
}

/// The cluster-wide schedule (Redis in the service, an in-memory one in unit tests).
pub trait Cluster: Send + Sync {
    /// Reserves the next token one `period` after the last one, unless that is more than
    /// one period away.
    fn reserve(
        &self,
        period: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, SharedError>> + Send + '_>>;
}

impl Cluster for Shared {
    fn reserve(
        &self,
        period: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, SharedError>> + Send + '_>> {
        Box::pin(async move {
            let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX);
            let wait_us = self.reserve_command(period_us).await?;
            Ok(if wait_us >= 0 {
                Grant::After(Duration::from_micros(wait_us.unsigned_abs()))
            } else {
                Grant::Later(Duration::from_micros(wait_us.unsigned_abs()))
            })
        })
    }
}

/// Where this pod's tokens come from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The cluster limiter in Redis.
    Cluster,
    /// Redis unreachable: the local limiter at `budget / BUDGET_FALLBACK_PODS`.
    Fallback,
    /// A process alone (operator tools, benchmarks, the naive mode): local only.
    Local,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cluster => "cluster",
            Mode::Fallback => "fallback",
            Mode::Local => "local",
        }
    }

    fn label(self) -> BudgetMode {
        match self {
            Mode::Cluster => BudgetMode::Cluster,
            Mode::Fallback => BudgetMode::Fallback,
            Mode::Local => BudgetMode::Local,
        }
    }
}

/// The pod's own side of the limiter, behind one lock: whoever holds it is the one task
/// of this pod asking for a token, so reservations go out one at a time, in order.
struct Turn {
    /// The earliest instant the local limiter's next token may be used.
    next_local: Instant,
    /// While set and in the future, Redis failed recently: spend from the fallback.
    cluster_retry_at: Option<Instant>,
}

pub struct Budget {
    cluster_rate: u32,
    cluster: Option<Arc<dyn Cluster>>,
    /// Spacing of the cluster's tokens.
    cluster_period: Duration,
    /// Spacing of this pod's tokens while it spends from its local limiter.
    local_period: Duration,
    /// Tokens per second the local limiter hands out.
    local_rate: f64,
    in_flight: Arc<Semaphore>,
    in_flight_cap: usize,
    turn: tokio::sync::Mutex<Turn>,
    mode: AtomicU8,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Budget {
    /// A pod's budget: tokens from `cluster`, `cluster_rate` a second for all pods
    /// together, or `cluster_rate / fallback_pods` from the local limiter while `cluster`
    /// fails; at most `in_flight_cap` commands unanswered at once.
    pub fn clustered(
        cluster: Arc<dyn Cluster>,
        cluster_rate: u32,
        fallback_pods: u32,
        in_flight_cap: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::build(
            Some(cluster),
            cluster_rate,
            fallback_pods,
            in_flight_cap,
            metrics,
        )
    }

    /// A budget for one process alone: `rate` a second from the local limiter.
    pub fn local(rate: u32, in_flight_cap: usize, metrics: Arc<Metrics>) -> Self {
        Self::build(None, rate, 1, in_flight_cap, metrics)
    }

    fn build(
        cluster: Option<Arc<dyn Cluster>>,
        cluster_rate: u32,
        fallback_pods: u32,
        in_flight_cap: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cluster_rate = cluster_rate.max(1);
        let fallback_pods = fallback_pods.max(1);
        let in_flight_cap = in_flight_cap.max(1);
        let mode = if cluster.is_some() {
            Mode::Cluster
        } else {
            Mode::Local
        };
        let budget = Budget {
            cluster_rate,
            cluster,
            cluster_period: period(cluster_rate, 1),
            local_period: period(cluster_rate, fallback_pods),
            local_rate: f64::from(cluster_rate) / f64::from(fallback_pods),
            in_flight: Arc::new(Semaphore::new(in_flight_cap)),
            in_flight_cap,
            turn: tokio::sync::Mutex::new(Turn {
                next_local: Instant::now(),
                cluster_retry_at: None,
            }),
            mode: AtomicU8::new(mode as u8),
            draining: AtomicBool::new(false),
            metrics,
        };
        budget
            .metrics
            .db_command_budget
            .set(i64::from(cluster_rate));
        budget
            .metrics
            .db_commands_in_flight_cap
            .set(i64::try_from(in_flight_cap).unwrap_or(i64::MAX));
        budget.publish_mode(mode);
        budget
    }

    /// Waits until this pod may send one more command: first an in-flight slot, then a
    /// token from the cluster limiter (or, cut off from Redis, from the local one).
    pub async fn acquire(&self) -> Token {
        let slot = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .expect("the in-flight semaphore is never closed");
        let mut turn = self.turn.lock().await;
        loop {
            let now = Instant::now();
            if let Some(cluster) = &self.cluster {
                if turn.cluster_retry_at.is_none_or(|at| at <= now) {
                    match cluster.reserve(self.cluster_period).await {
                        Ok(Grant::After(wait)) => {
                            turn.cluster_retry_at = None;
                            self.set_mode(Mode::Cluster, None);
                            tokio::time::sleep(wait).await;
                            break;
                        }
                        Ok(Grant::Later(wait)) => {
                            turn.cluster_retry_at = None;
                            self.set_mode(Mode::Cluster, None);
                            // At most a period by construction; asking sooner costs a
                            // round trip, waiting out a bad answer stops the pod.
                            let wait = wait.clamp(Duration::from_millis(1), self.cluster_period);
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        Err(e) => {
                            turn.cluster_retry_at = Some(Instant::now() + CLUSTER_RETRY);
                            self.set_mode(Mode::Fallback, Some(&e));
                        }
                    }
                }
                if self.draining.load(Ordering::Acquire) {
                    // A draining pod draws nothing from the fallback: only the pods that
                    // stay count against `BUDGET_FALLBACK_PODS`.
                    let retry = turn.cluster_retry_at.unwrap_or(now + CLUSTER_RETRY);
                    tokio::time::sleep_until(retry).await;
                    continue;
                }
            }
            let at = turn.next_local.max(now);
            turn.next_local = at + self.local_period;
            tokio::time::sleep_until(at).await;
            break;
        }
        drop(turn);
        let in_flight = self.metrics.db_commands_in_flight.clone();
        in_flight.inc();
        Token {
            _slot: slot,
            in_flight,
        }
    }

    /// From now on this pod draws nothing from the fallback (its queue still drains
    /// through the cluster limiter while Redis answers).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn cluster_rate(&self) -> u32 {
        self.cluster_rate
    }

    /// Commands per second this pod spends at most while it is cut off from Redis.
    pub fn fallback_rate(&self) -> f64 {
        self.local_rate
    }

    /// Commands this pod may have sent and not yet seen answered.
    pub fn in_flight_cap(&self) -> usize {
        self.in_flight_cap
    }

    /// Commands paid for and not yet answered now (the gauge: a slot held by a command
    /// still waiting for its token is not counted).
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.metrics.db_commands_in_flight.get()).unwrap_or(0)
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            m if m == Mode::Cluster as u8 => Mode::Cluster,
            m if m == Mode::Fallback as u8 => Mode::Fallback,
            _ => Mode::Local,
        }
    }

    fn set_mode(&self, mode: Mode, cause: Option<&SharedError>) {
        let before = self.mode.swap(mode as u8, Ordering::Relaxed);
        if before == mode as u8 {
            return;
        }
        self.publish_mode(mode);
        match (mode, cause) {
            (Mode::Fallback, Some(e)) => tracing::warn!(
                error = %e,
                fallback_per_second = self.local_rate,
                "redis unreachable: the database budget falls back to this pod's local limiter"
            ),
            _ => tracing::info!("database budget: tokens from the cluster limiter in redis"),
        }
    }

    fn publish_mode(&self, mode: Mode) {
        for m in [Mode::Cluster, Mode::Fallback, Mode::Local] {
            self.metrics
                .budget_mode
                .get(m.label())
                .set(i64::from(m == mode));
        }
    }
}

fn period(rate: u32, pods: u32) -> Duration {
    // Rounded up to the microsecond the Redis script counts in, so the schedule is never
    // faster than the budget.
    let micros = (1_000_000 * u64::from(pods.max(1))).div_ceil(u64::from(rate.max(1)));
    Duration::from_micros(micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The Redis script's rule in memory, on tokio's clock, with an outage switch.
    #[derive(Default)]
    struct Memory {
        tat: Mutex<Option<Instant>>,
        down: AtomicBool,
    }

    impl Cluster for Memory {
        fn reserve(
            &self,
            period: Duration,
        ) -> Pin<Box<dyn Future<Output = Result<Grant, SharedError>> + Send + '_>> {
            Box::pin(async move {
                if self.down.load(Ordering::Relaxed) {
                    return Err(SharedError::from(fred::error::Error::new(
                        fred::error::ErrorKind::IO,
                        "cut off",
                    )));
                }
                let now = Instant::now();
                let mut tat = self.tat.lock().unwrap();
                let due = tat.map_or(now, |t| t.max(now));
                let wait = due - now;
                if wait > period {
                    return Ok(Grant::Later(wait - period));
                }
                *tat = Some(due + period);
                Ok(Grant::After(wait))
            })
        }
    }

    impl Memory {
        /// Redis restarted empty: the schedule is gone.
        fn forget(&self) {
            *self.tat.lock().unwrap() = None;
        }
    }

    fn pod(cluster: &Arc<Memory>, rate: u32, fallback: u32, cap: usize) -> Arc<Budget> {
        Arc::new(Budget::clustered(
            Arc::clone(cluster) as Arc<dyn Cluster>,
            rate,
            fallback,
            cap,
            Arc::new(Metrics::new()),
        ))
    }

    /// Starts `tasks` loops per pod, each taking tokens and answering at once; returns
    /// the instants every token was handed out at, for `window`.
    async fn spend(pods: &[Arc<Budget>], tasks: usize, window: Duration) -> Vec<Instant> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let until = Instant::now() + window;
        let mut set = tokio::task::JoinSet::new();
        for p in pods {
            for _ in 0..tasks {
                let (p, got) = (Arc::clone(p), Arc::clone(&got));
                set.spawn(async move {
                    loop {
                        tokio::select! {
                            token = p.acquire() => {
                                got.lock().unwrap().push(Instant::now());
                                drop(token);
                            }
                            _ = tokio::time::sleep_until(until) => return,
                        }
                    }
                });
            }
        }
        while set.join_next().await.is_some() {}
        let mut v = got.lock().unwrap().clone();
        v.sort();
        v
    }

    /// The most tokens any window of one second (sliding) holds.
    fn worst_second(at: &[Instant]) -> usize {
        let mut worst = 0;
        let mut start = 0;
        for end in 0..at.len() {
            while at[end] - at[start] >= Duration::from_secs(1) {
                start += 1;
            }
            worst = worst.max(end - start + 1);
        }
        worst
    }

    #[tokio::test(start_paused = true)]
    async fn many_pods_share_one_schedule_whatever_their_number() {
        let cluster = Arc::new(Memory::default());
        let pods: Vec<_> = (0..6).map(|_| pod(&cluster, 20, 6, 2)).collect();
        let at = spend(&pods, 3, Duration::from_secs(10)).await;
        // A sliding second holds at most the budget plus the one token at its edge.
        assert!(worst_second(&at) <= 21, "{}", worst_second(&at));
        assert!(at.len() >= 195, "the budget was not used: {}", at.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_redis_restart_costs_at_most_one_token() {
        let cluster = Arc::new(Memory::default());
        let pods: Vec<_> = (0..3).map(|_| pod(&cluster, 20, 4, 2)).collect();
        let forget = {
            let cluster = Arc::clone(&cluster);
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(1_370)).await;
                    cluster.forget();
                }
            })
        };
        let at = spend(&pods, 3, Duration::from_secs(8)).await;
        forget.await.unwrap();
        // Edge token plus the one promised before the schedule was lost.
        assert!(worst_second(&at) <= 22, "{}", worst_second(&at));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_pod_spends_its_fallback_share_and_comes_back() {
        let cluster = Arc::new(Memory::default());
        let b = pod(&cluster, 12, 4, 2);
        cluster.down.store(true, Ordering::Relaxed);
        let at = spend(std::slice::from_ref(&b), 3, Duration::from_secs(5)).await;
        assert_eq!(b.mode(), Mode::Fallback);
        // 3 a second for 5 s, plus the first one at once.
        assert!((15..=16).contains(&at.len()), "{} tokens", at.len());
        cluster.down.store(false, Ordering::Relaxed);
        let back = Instant::now();
        let at = spend(std::slice::from_ref(&b), 3, Duration::from_secs(3)).await;
        assert_eq!(b.mode(), Mode::Cluster, "back on the cluster limiter");
        // Redis is asked again within CLUSTER_RETRY; from then on 12 a second, less the
        // one at the window's edge.
        let on_cluster = at.iter().filter(|&&t| t >= back + CLUSTER_RETRY).count();
        assert!(on_cluster >= 23, "{on_cluster} tokens in 2 s at 12/s");
    }

    #[tokio::test(start_paused = true)]
    async fn cut_off_pods_add_at_most_their_fallback_shares() {
        let cluster = Arc::new(Memory::default());
        let reaching: Vec<_> = (0..2).map(|_| pod(&cluster, 20, 5, 2)).collect();
        // The third pod's Redis is unreachable: its own view of the cluster fails.
        let alone = Arc::new(Memory {
            down: AtomicBool::new(true),
            ..Memory::default()
        });
        let cut = pod(&alone, 20, 5, 2);
        let mut all = reaching.clone();
        all.push(cut);
        let at = spend(&all, 3, Duration::from_secs(6)).await;
        // 20 from the cluster, 4 from the cut-off pod's fallback, 2 edge tokens.
        assert!(worst_second(&at) <= 20 + 4 + 2, "{}", worst_second(&at));
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_pod_draws_nothing_from_the_fallback() {
        let cluster = Arc::new(Memory::default());
        let b = pod(&cluster, 20, 4, 2);
        cluster.down.store(true, Ordering::Relaxed);
        b.start_draining();
        let at = spend(std::slice::from_ref(&b), 2, Duration::from_secs(3)).await;
        assert!(at.is_empty(), "{} tokens while draining", at.len());
        cluster.down.store(false, Ordering::Relaxed);
        let at = spend(std::slice::from_ref(&b), 2, Duration::from_secs(2)).await;
        assert!(!at.is_empty(), "draining still spends from the cluster");
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_commands_hold_their_slots() {
        let cluster = Arc::new(Memory::default());
        let b = pod(&cluster, 100, 1, 2);
        // Two commands sent and never answered (a stalled database).
        let stuck = [b.acquire().await, b.acquire().await];
        assert_eq!(b.in_flight(), 2);
        let third = tokio::time::timeout(Duration::from_secs(5), b.acquire()).await;
        assert!(third.is_err(), "a third command went out during the stall");
        drop(stuck);
        let third = tokio::time::timeout(Duration::from_secs(1), b.acquire()).await;
        assert!(third.is_ok(), "an answered command frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn a_local_budget_paces_with_a_burst_of_one() {
        let b = Arc::new(Budget::local(10, 4, Arc::new(Metrics::new())));
        let at = spend(std::slice::from_ref(&b), 4, Duration::from_secs(3)).await;
        assert_eq!(b.mode(), Mode::Local);
        assert!(
            (30..=31).contains(&at.len()),
            "{} tokens in 3 s at 10/s",
            at.len()
        );
        assert!(worst_second(&at) <= 11);
    }
}

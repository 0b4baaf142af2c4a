//! The loops that run beside the requests for the pod's whole life, each stopped by the
//! shutdown watch it is started with (pingora's `BackgroundService` pattern). The domain
//! types keep the single steps (`Store::ping`, `Shared::is_connected`); when to take them
//! lives here, so that no type's method holds another's for a whole loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;
use crate::store::PaidStore;

/// A loop that runs until `stop` is cancelled.
pub trait Background: Send + Sync + 'static {
    fn run(self, stop: CancellationToken) -> impl Future<Output = ()> + Send;
}

/// Starts `service` on `set`, stopped by `stop`.
pub fn start(set: &mut JoinSet<()>, service: impl Background, stop: &CancellationToken) {
    set.spawn(service.run(stop.clone()));
}

/// Keeps the database's health bit current while nothing else talks to it: a ping,
/// paid from the budget like any command, whenever it is down or has answered nothing
/// for two ticks. While commands flow they answer, and it never pings.
pub struct HealthCheck(pub PaidStore);

impl Background for HealthCheck {
    async fn run(self, stop: CancellationToken) {
        const EVERY: Duration = Duration::from_secs(1);
        let PaidStore { store, budget } = self.0;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if store.is_healthy() && store.since_answer() < 2 * EVERY {
                continue;
            }
            let token = tokio::select! {
                _ = stop.cancelled() => return,
                token = budget.acquire() => token,
            };
            let _ = store.ping(token).await;
        }
    }
}

/// Logs each time the connection to Redis is lost or made: an operator reading the log
/// sees when a pod joined a Redis that came up after it.
pub struct RedisWatch(pub Arc<Shared>);

impl Background for RedisWatch {
    async fn run(self, stop: CancellationToken) {
        const EVERY: Duration = Duration::from_millis(250);
        let mut was = self.0.is_connected();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            let now = self.0.is_connected();
            match (was, now) {
                (false, true) => tracing::info!("connected to redis"),
                (true, false) => {
                    tracing::warn!("lost the connection to redis; reconnecting every 500 ms")
                }
                _ => {}
            }
            was = now;
        }
    }
}

//! Builds the [`App`], starts its tasks, and owns the shutdown order.
//!
//! [`build`] binds the port and starts every task, and returns an [`Application`] that
//! serves once [`Application::run_until`] is given a shutdown future: the binary passes
//! SIGTERM/SIGINT, tests pass a token of their own and start sluice in-process on port 0.
//!
//! Every long-lived task has one owner here and one way to stop. Shutdown runs in this
//! order, all of it bounded by `DRAIN_TIMEOUT_SECS` (under Kubernetes' grace period):
//!
//! 1. The shutdown future completes: `/readyz` turns 503, so the load balancer stops
//!    sending.
//! 2. The listener closes; open connections finish their in-flight requests (their
//!    writes still go through, because the writer is still running). This phase gets
//!    half of the drain time; connections still open then are cut.
//! 3. The writer closes its queue, flushes everything in it and waits for the last
//!    insert to be acknowledged.
//! 4. The health checker and the Redis connection watcher stop.
//!
//! From step 1 on, the pod draws nothing from the budget's fallback: while Redis answers
//! its queue drains through the cluster limiter like any pod's commands.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::app::{App, Urls};
use crate::background::{self, HealthCheck, RedisWatch};
use crate::budget::{Budget, Cluster};
use crate::claims::InFlight;
use crate::config::{Config, ConfigError, ServerSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::reads::ReadCache;
use crate::shared::Shared;
use crate::stats::Stats;
use crate::store::{in_flight_cap, PaidStore, Store, MAX_POOL_SIZE};
use crate::writes::Writer;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (APP_HOST/APP_PORT)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("shutdown did not finish within DRAIN_TIMEOUT_SECS ({0:?})")]
    DrainTimedOut(Duration),
}

/// A built sluice: bound, its tasks running, not yet serving.
pub struct Application {
    app: Arc<App>,
    listener: TcpListener,
    addr: SocketAddr,
    server: ServerSettings,
    shared: Arc<Shared>,
    tasks: Tasks,
}

/// The tasks an [`App`] runs besides serving, and the tokens that stop them.
struct Tasks {
    stop_writer: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    stop_background: CancellationToken,
    background: tokio::task::JoinSet<()>,
}

/// Builds the app, binds its port and starts its writer, health checks and the Redis
/// connection watcher.
/// Fails only on settings that cannot work; unreachable dependencies are waited out
/// while serving.
pub async fn build(mut config: Config) -> Result<Application, StartError> {
    config.validate()?;
    crate::server::fit_open_files_limit(&mut config)?;
    let metrics = Arc::new(Metrics::new());
    let pod = config.pod_name();
    let store = Arc::new(Store::connect(&config.store, Arc::clone(&metrics)).await?);
    let shared = Arc::new(Shared::connect(&config.shared).map_err(|e| {
        ConfigError(format!(
            "REDIS_URL ({}) is not usable: {e}",
            config.shared.redis_url
        ))
    })?);
    // The naive comparison mode has no budget worth the name, like the service it
    // imitates: a local rate that never binds, as many commands at once as the pool.
    let budget = Arc::new(if config.naive_mode {
        Budget::local(1_000_000, MAX_POOL_SIZE as usize, Arc::clone(&metrics))
    } else {
        Budget::clustered(
            Arc::clone(&shared) as Arc<dyn Cluster>,
            config.budget.db_command_budget,
            config.budget.budget_fallback_pods,
            in_flight_cap(config.writes.flush_concurrency),
            Arc::clone(&metrics),
        )
    });

    let paid = PaidStore {
        store: Arc::clone(&store),
        budget: Arc::clone(&budget),
    };
    let stop_writer = CancellationToken::new();
    let (writer, writer_task) = Writer::start(
        config.writes,
        paid.clone(),
        Arc::clone(&metrics),
        stop_writer.clone(),
    );
    let reads = Arc::new(ReadCache::new(
        config.reads,
        paid.clone(),
        Arc::clone(&shared),
        pod.clone(),
        Arc::clone(&metrics),
    ));

    // A moment for Redis before the first command asks it for a token: without it the
    // health check's first ping would find the connection still opening and take its
    // token from the fallback.
    if !shared.wait_connected(Duration::from_secs(1)).await {
        tracing::warn!(redis = %config.shared.redis_url,
            "redis is not answering; serving from L1 and MongoDB until it is");
    }
    let stop_background = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    background::start(
        &mut background,
        RedisWatch(Arc::clone(&shared)),
        &stop_background,
    );
    background::start(&mut background, HealthCheck(paid.clone()), &stop_background);

    if config.naive_mode {
        tracing::warn!(
            "NAIVE_MODE is on: no cache, no coalescing, no budget. For comparisons only"
        );
    }
    let addr = SocketAddr::new(config.server.app_host, config.server.app_port);
    let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let in_flight = InFlight::new(Arc::clone(&shared), claim_ttl(&config), pod.clone());
    let app = Arc::new(App {
        pod,
        health: Health::new(Arc::clone(&store), Arc::clone(&shared)),
        reads,
        writer,
        read_timeout: config.store.db_timeout,
        stats: Stats::new(Arc::clone(&store), Arc::clone(&budget)),
        in_flight,
        naive: config.naive_mode.then_some(paid),
        budget,
        urls: Urls {
            mongo: config.store.mongo_uri.clone(),
            redis: config.shared.redis_url.clone(),
        },
        metrics,
    });
    Ok(Application {
        app,
        listener,
        addr,
        server: config.server,
        shared,
        tasks: Tasks {
            stop_writer,
            writer: writer_task,
            stop_background,
            background,
        },
    })
}

impl Application {
    /// Where it listens (the real port when `APP_PORT` was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` completes, then shuts down in the order above.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let Application {
            app,
            listener,
            addr,
            server,
            shared,
            tasks,
        } = self;
        tracing::info!(
            %addr,
            pod = %app.pod,
            mongodb = %app.urls.mongo,
            redis = %app.urls.redis,
            budget = app.budget.cluster_rate(),
            "sluice listening"
        );
        let stop_accepting = CancellationToken::new();
        let drain = server.drain_timeout;
        let server_task = {
            let (app, stop) = (Arc::clone(&app), stop_accepting.clone());
            tokio::spawn(async move {
                crate::server::serve(listener, app, &server, stop.cancelled_owned(), drain / 2)
                    .await;
            })
        };
        shutdown.await;

        tracing::info!(?drain, "shutting down");
        app.health.start_draining();
        app.budget.start_draining();
        stop_accepting.cancel();
        let started = Instant::now();
        let finished = tokio::time::timeout(drain, async {
            let _ = server_task.await;
            tasks.stop_writer.cancel();
            let _ = tasks.writer.await;
            tasks.stop_background.cancel();
            let mut background = tasks.background;
            while background.join_next().await.is_some() {}
        })
        .await;
        shared.quit().await;
        match finished {
            Ok(()) => {
                let (ok, other) = app.metrics.data_answers();
                tracing::info!(took = ?started.elapsed(), data_ok = ok, data_other = other, "shutdown complete");
                Ok(())
            }
            Err(_) => Err(StartError::DrainTimedOut(drain)),
        }
    }
}

/// How long an idempotency key's claim lives at most: longer than any request that holds
/// it (its enqueue wait, then the longer of its write deadline and its reads' limit), plus
/// a second for the crediting and the answer, so it never expires under a live request.
fn claim_ttl(config: &Config) -> Duration {
    config.writes.enqueue_timeout
        + config.writes.write_timeout.max(config.store.db_timeout)
        + Duration::from_secs(1)
}

/// Serves until SIGTERM or SIGINT, then shuts down in the order above.
pub async fn run(config: Config) -> Result<(), StartError> {
    build(config).await?.run_until(shutdown_signal()).await
}

/// Binds with a deep accept backlog: thousands of clients connect at once at the start of
/// a load test, and the default (1,024) drops their SYNs into second-long retransmits.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    const BACKLOG: u32 = 8192;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    tracing::info!(signal, "signal received");
}

//! Builds the [`App`], starts its tasks, and owns the shutdown order.
//!
//! Every long-lived task has one owner here and one way to stop. Shutdown runs in this
//! order, all of it bounded by `DRAIN_TIMEOUT_SECS` (under Kubernetes' grace period):
//!
//! 1. SIGTERM or SIGINT: `/readyz` turns 503, so the load balancer stops sending.
//! 2. The listener closes; open connections finish their in-flight requests (their
//!    writes still go through, because the writer is still running).
//! 3. The writer closes its queue, flushes everything in it and waits for the last
//!    insert to be acknowledged.
//! 4. Heartbeats stop and the pod leaves the shared pod set, so the others take its
//!    share of the budget at once; the health checker stops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::reads::{ReadCache, ReadSettings};
use crate::shared::Shared;
use crate::store::Store;
use crate::telemetry::redact;
use crate::writes::{WriteSettings, Writer};

/// Everything a request handler can reach, shared by `Arc`.
pub struct App {
    pub config: Config,
    pub pod: String,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Store>,
    pub shared: Arc<Shared>,
    pub budget: Arc<Budget>,
    pub reads: Arc<ReadCache>,
    pub writer: Writer,
    /// The last `/api/stats` count and when it was taken.
    pub stats: Mutex<Option<(Instant, u64)>>,
    /// Set once shutdown begins; `/readyz` reports it.
    pub draining: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (APP_HOST/APP_PORT): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("shutdown did not finish within DRAIN_TIMEOUT_SECS ({0:?})")]
    DrainTimedOut(Duration),
}

/// The tasks an [`App`] runs besides serving, and the tokens that stop them.
struct Tasks {
    stop_writer: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    stop_background: CancellationToken,
    background: tokio::task::JoinSet<()>,
}

/// Builds the app and starts its writer, heartbeats and health checks. Fails only on
/// settings that cannot work; unreachable dependencies are waited out while serving.
async fn build(config: Config) -> Result<(Arc<App>, Tasks), ConfigError> {
    let metrics = Arc::new(Metrics::new());
    let pod = config.pod_name();
    let store = Arc::new(Store::connect(&config, Arc::clone(&metrics)).await?);
    let shared = Arc::new(
        Shared::connect(&config.redis_url, config.redis_timeout()).map_err(|e| {
            ConfigError(format!(
                "REDIS_URL ({}) is not usable: {e}",
                redact(&config.redis_url)
            ))
        })?,
    );
    // The naive comparison mode has no budget, like the service it imitates.
    let rate = if config.naive_mode {
        1_000_000
    } else {
        config.db_command_budget
    };
    let budget = Arc::new(Budget::new(
        rate,
        config.budget_fallback_pods,
        Arc::clone(&metrics),
    ));

    let stop_writer = CancellationToken::new();
    let (writer, writer_task) = Writer::start(
        WriteSettings {
            batch_max_docs: config.batch_max_docs as usize,
            linger: Duration::from_millis(config.batch_linger_ms),
            queue_capacity: config.queue_capacity as usize,
            enqueue_timeout: Duration::from_millis(config.enqueue_timeout_ms),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
            flush_concurrency: config.flush_concurrency as usize,
        },
        Arc::clone(&store),
        Arc::clone(&budget),
        Arc::clone(&metrics),
        stop_writer.clone(),
    );
    let reads = Arc::new(ReadCache::new(
        ReadSettings {
            fresh: Duration::from_millis(config.cache_fresh_ms),
            stale: Duration::from_millis(config.cache_stale_ms),
            empty: Duration::from_millis(config.cache_empty_ms),
        },
        Arc::clone(&shared),
        Arc::clone(&store),
        Arc::clone(&budget),
        format!("{pod}:{}", bson::oid::ObjectId::new()),
        Arc::clone(&metrics),
    ));

    let stop_background = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    {
        let (budget, shared, pod, stop) = (
            Arc::clone(&budget),
            Arc::clone(&shared),
            pod.clone(),
            stop_background.clone(),
        );
        background.spawn(async move { budget.run_heartbeats(&shared, &pod, stop).await });
    }
    {
        let (store, budget, stop) = (
            Arc::clone(&store),
            Arc::clone(&budget),
            stop_background.clone(),
        );
        background.spawn(async move { store.run_health_checks(&budget, stop).await });
    }

    let app = Arc::new(App {
        config,
        pod,
        metrics,
        store,
        shared,
        budget,
        reads,
        writer,
        stats: Mutex::new(None),
        draining: AtomicBool::new(false),
    });
    let tasks = Tasks {
        stop_writer,
        writer: writer_task,
        stop_background,
        background,
    };
    Ok((app, tasks))
}

/// Serves until SIGTERM or SIGINT, then shuts down in the order above.
pub async fn run(config: Config) -> Result<(), StartError> {
    let addr = SocketAddr::new(config.app_host, config.app_port);
    if config.naive_mode {
        tracing::warn!(
            "NAIVE_MODE is on: no cache, no coalescing, no budget. For comparisons only"
        );
    }
    let (app, tasks) = build(config).await?;
    let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
    if !app.shared.wait_connected(Duration::from_secs(1)).await {
        tracing::warn!(redis = %redact(&app.config.redis_url),
            "redis is not answering; serving from L1 and MongoDB until it is");
    }
    tracing::info!(
        %addr,
        pod = %app.pod,
        mongodb = %redact(&app.config.mongo_uri),
        redis = %redact(&app.config.redis_url),
        budget = app.config.db_command_budget,
        "sluice listening"
    );

    let stop_accepting = CancellationToken::new();
    let server = tokio::spawn(crate::server::serve(
        listener,
        Arc::clone(&app),
        stop_accepting.clone(),
    ));
    let signal = shutdown_signal().await;

    let drain = app.config.drain_timeout();
    tracing::info!(signal, ?drain, "shutting down");
    app.draining.store(true, Ordering::Relaxed);
    stop_accepting.cancel();
    let started = Instant::now();
    let finished = tokio::time::timeout(drain, async {
        let _ = server.await;
        tasks.stop_writer.cancel();
        let _ = tasks.writer.await;
        tasks.stop_background.cancel();
        let mut background = tasks.background;
        while background.join_next().await.is_some() {}
    })
    .await;
    app.shared.quit().await;
    match finished {
        Ok(()) => {
            tracing::info!(took = ?started.elapsed(), "shutdown complete");
            Ok(())
        }
        Err(_) => Err(StartError::DrainTimedOut(drain)),
    }
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

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

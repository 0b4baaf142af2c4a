//! The accept loop.
//!
//! A semaphore caps open connections (`MAX_CONNECTIONS`). A connection past the cap waits
//! up to `SLOT_WAIT` (1 s) for a slot to free, then gets a 503 with `Retry-After` and is
//! closed, so an overload costs a few bytes instead of unbounded memory. The wait is
//! what keeps a refusal cheap: answered at once, a client that ignores `Retry-After`
//! (k6 does) comes straight back at once, and the refusals take CPU from everything else
//! on the node (docs/results/2026-12-03-code-comment-figures.md).
//! Past the waiting pool up to `MAX_REFUSING` connections at once get their 503 at
//! once; past those, a connection is closed unanswered (still counted as shed), so a
//! flood holds a bounded number of descriptors and cannot take those MongoDB and Redis
//! need to reconnect. [`fit_open_files_limit`] checks at start that all of it fits under
//! the open-files limit, and lowers `MAX_CONNECTIONS` if it does not.
//! Every connection has a header-read timeout, so a client dribbling
//! its head a byte at a time is cut off, and a write-progress timeout, so a client that
//! sends requests but never reads the answers cannot hold its slot (and shutdown) for
//! ever: hyper has no write timeout of its own.
//!
//! When `shutdown` completes the loop stops accepting and hyper's graceful shutdown lets
//! in-flight requests finish while idle keep-alive connections close (a connection still
//! waiting for a slot is served one request at most, or refused). That phase has its
//! own limit (`drain`); connections still open after it are cut, so the writer's own
//! drain always gets its turn.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::app::App;
use crate::config::{Config, ConfigError, ServerSettings};
use crate::metrics::ShedReason;
use crate::store::MAX_POOL_SIZE;

/// Request heads larger than this are refused by hyper with 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a connection past the cap waits for a slot before its 503: as long as the
/// `Retry-After` it would be told, so a client that ignores it comes back no sooner.
const SLOT_WAIT: Duration = Duration::from_secs(1);
// `Retry-After` is sent in whole seconds.
const _: () = assert!(SLOT_WAIT.as_secs() >= 1);
/// Connections waiting for a slot at most; past them, refused at once. A waiting
/// connection holds a socket and its task, no HTTP buffers (hyper allocates them once
/// it serves), and keeps its place while it is refused, so its descriptor is counted
/// here for its whole life (up to `SLOT_WAIT` plus `REFUSE_LIMIT`). Below 8,192
/// connections the pool is an eighth of `MAX_CONNECTIONS` (see [`ClientSockets`]).
const MAX_WAITING: u64 = 1024;
/// Connections being refused at once (past the waiting pool) at most; past them, closed
/// unanswered. A refusal ends once its client has read the 503 and closed, one round trip
/// (under 100 ms even between regions), so 256 answer over 2,500 refusals a second; a
/// client that never closes holds its place for `REFUSE_LIMIT`, so a flood holds at most
/// 256 descriptors here. Below 8,192 connections, a thirty-second of `MAX_CONNECTIONS`.
const MAX_REFUSING: u64 = 256;
/// How long a refusal may take to write its 503 and see the client close.
const REFUSE_LIMIT: Duration = Duration::from_secs(1);

/// Serves until `shutdown`, then waits up to `drain` for open connections to finish
/// their requests.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    settings: &ServerSettings,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let sockets = ClientSockets::for_cap(settings.max_connections.into());
    let slots = Arc::new(Semaphore::new(settings.max_connections as usize));
    let waiting = Arc::new(Semaphore::new(sockets.waiting as usize));
    let refusing = Arc::new(Semaphore::new(sockets.refusing as usize));
    // Connections closed unanswered since the last warning about them.
    let mut unanswered = 0u64;
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES);
    let http = Arc::new(http);
    let write_timeout = settings.write_progress_timeout;
    tokio::pin!(shutdown);
    let mut trim = tokio::time::interval(TRIM_EVERY);
    let mut peak_open = 0;

    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            _ = trim.tick() => {
                if unanswered > 0 {
                    tracing::warn!(
                        closed = unanswered,
                        waiting = sockets.waiting,
                        refusing = sockets.refusing,
                        "connections closed unanswered: the waiting pool and the refusals were full"
                    );
                    unanswered = 0;
                }
                while connections.try_join_next().is_some() {}
                peak_open = peak_open.max(connections.len());
                if peak_open >= connections.len() + TRIM_AFTER_CLOSED {
                    peak_open = connections.len();
                    tokio::task::spawn_blocking(return_freed_memory);
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        peak_open = peak_open.max(connections.len() + 1);
        let slot = Arc::clone(&slots).try_acquire_owned().ok();
        let waiter = match slot {
            Some(_) => None,
            None => match Arc::clone(&waiting).try_acquire_owned() {
                Ok(waiter) => {
                    app.metrics.connection_waits.inc();
                    Some(waiter)
                }
                Err(_) => {
                    app.metrics.shed.get(ShedReason::Connections).inc();
                    match Arc::clone(&refusing).try_acquire_owned() {
                        Ok(refusal) => {
                            tokio::spawn(async move {
                                refuse(stream).await;
                                drop(refusal);
                            });
                        }
                        // A flood: its descriptors are worth more than its answers.
                        Err(_) => {
                            unanswered += 1;
                            drop(stream);
                        }
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (app, http, slots) = (Arc::clone(&app), Arc::clone(&http), Arc::clone(&slots));
        // Taken now, not once a slot is free: a shutdown that starts meanwhile must
        // reach this connection too.
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let slot = match slot {
                Some(slot) => slot,
                None => {
                    let freed = tokio::time::timeout(SLOT_WAIT, slots.acquire_owned()).await;
                    match freed {
                        Ok(Ok(slot)) => {
                            drop(waiter);
                            slot
                        }
                        _ => {
                            app.metrics.shed.get(ShedReason::Connections).inc();
                            refuse(stream).await;
                            // Its place in the pool covered its descriptor until now.
                            drop(waiter);
                            return;
                        }
                    }
                }
            };
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(crate::http::handle(&app, req).await) }
            });
            let io = TokioIo::new(WriteProgress::new(stream, write_timeout));
            if let Err(e) = watcher.watch(http.serve_connection(io, service)).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(
        open = graceful.count(),
        "stopped accepting; finishing open requests"
    );
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            ?drain,
            "connections still open after the connection drain limit; closing them"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

/// How often the accept loop looks whether connections closed in numbers.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Closed connections (from the peak) that make it worth handing their buffers back.
const TRIM_AFTER_CLOSED: usize = 256;

/// Hands memory freed by closed connections back to the kernel. glibc keeps freed
/// buffers in its per-thread arenas for reuse, so without this a pod that once held
/// 10,000 connections keeps their memory for good
/// (docs/results/2026-12-03-code-comment-figures.md). Runs at most every `TRIM_EVERY`, and only
/// after `TRIM_AFTER_CLOSED` closes, on a blocking thread: it walks every arena.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only releases free memory glibc owns; it takes the arenas'
        // own locks and touches nothing Rust holds.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::debug!(took = ?started.elapsed(), "returned closed connections' memory");
    }
}

/// Answers a connection over the cap with a raw 503: no hyper machinery spent on it.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"status":"error","message":"too many open connections; retry shortly"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        SLOT_WAIT.as_secs(),
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_LIMIT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Closed with the client's request unread, the socket would send a reset, which
        // can reach the client before the 503 does: read until the client closes.
        let mut unread = [0u8; 1024];
        while stream.read(&mut unread).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// The client sockets sluice holds at most for a connection cap, by what they wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSockets {
    /// `MAX_CONNECTIONS`: connections being served.
    pub connections: u64,
    /// Connections past the cap waiting for a slot (and then, if none frees, refused).
    pub waiting: u64,
    /// Connections past the waiting pool being refused at once.
    pub refusing: u64,
}

impl ClientSockets {
    /// The pools for `connections`: an eighth of it may wait and a thirty-second be
    /// refused, up to `MAX_WAITING` and `MAX_REFUSING` (reached at 8,192 connections).
    /// The pools are for overload only, so under a tight open-files limit the
    /// descriptors go to served connections first; and each is at least 1, so a small
    /// cap still waits before it refuses.
    pub fn for_cap(connections: u64) -> Self {
        ClientSockets {
            connections,
            waiting: connections.div_ceil(8).min(MAX_WAITING),
            refusing: connections.div_ceil(32).min(MAX_REFUSING),
        }
    }

    /// Descriptors they hold at most.
    pub fn total(self) -> u64 {
        self.connections + self.waiting + self.refusing
    }
}

/// The process's own descriptors (not the listener's, its clients' or its dependencies').
/// Measured (Linux): a ready sluice with no client holds 14, 9 of them the process's own
/// (stdin, stdout, stderr, a `/dev/null`, two epoll instances and an eventfd for tokio's
/// I/O driver, three for its signal driver's socket pair), then the listener, Redis's
/// socket and MongoDB's three (two monitors, one pooled). Transient ones come on top of
/// those 9: a `/metrics` scrape reads `/proc/self/{fd,stat,limits}`, and a name lookup
/// (each reconnect does one) opens `/etc/hosts`, `/etc/resolv.conf` and a UDP socket, on
/// several blocking threads at once. 32 is over three times the 9.
const PROCESS_BASELINE: u64 = 32;
/// The listening socket.
const LISTENER: u64 = 1;
/// Redis: the client's one connection, and the next one while a reconnect replaces it.
const REDIS: u64 = 2;
/// MongoDB, per server the driver knows of: its monitor's connection and the one that
/// measures round trips (the streaming protocol's two). The pool comes on top: the
/// driver keeps one per server, bounded by `maxPoolSize` (connections in use, idle and
/// being opened alike).
const MONGO_MONITORS: u64 = 2;
/// Servers counted for a `mongodb+srv://` URI, whose hosts come from DNS at start: a
/// replica set's voting members at most.
const SRV_HOSTS: u64 = 7;
/// The smallest cap sluice lowers `MAX_CONNECTIONS` to; below it (an open-files limit of
/// under about 120), it refuses to start. A pod that can serve fewer clients than that
/// does not help a service meant for thousands: the limit is a mistake to fix (`ulimit -n`,
/// the container runtime's `nofile`), not one to run with.
const MIN_CONNECTIONS: u64 = 64;

/// Descriptors sluice keeps for itself: [`PROCESS_BASELINE`], the listener, Redis, and
/// MongoDB's monitors and pool on each of `mongo_hosts` servers.
pub fn reserved_descriptors(mongo_hosts: u64, mongo_pool: u64) -> u64 {
    PROCESS_BASELINE + LISTENER + REDIS + mongo_hosts * (MONGO_MONITORS + mongo_pool)
}

/// How a connection cap fits under an open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// As configured.
    Fits,
    /// Only this lower cap fits (at least `MIN_CONNECTIONS`).
    Lowered(u32),
    /// Not even the smaller of the cap and `MIN_CONNECTIONS` fits; `needs` descriptors
    /// would.
    TooLow { needs: u64 },
}

/// Fits `wanted` connections, with their waiting and refusal pools and `reserved`
/// descriptors, under `limit` open files.
pub fn fit_connections(wanted: u32, limit: u64, reserved: u64) -> Fit {
    let needs = |cap: u64| ClientSockets::for_cap(cap).total().saturating_add(reserved);
    if needs(wanted.into()) <= limit {
        return Fit::Fits;
    }
    // The largest cap that fits: `needs` grows with the cap, so bisect [0, wanted).
    let (mut fits, mut too_many) = (0u64, u64::from(wanted));
    while too_many - fits > 1 {
        let mid = fits + (too_many - fits) / 2;
        if needs(mid) <= limit {
            fits = mid;
        } else {
            too_many = mid;
        }
    }
    let floor = MIN_CONNECTIONS.min(wanted.into());
    if fits >= floor && needs(fits) <= limit {
        Fit::Lowered(u32::try_from(fits).unwrap_or(u32::MAX))
    } else {
        Fit::TooLow {
            needs: needs(floor),
        }
    }
}

/// MongoDB servers and pool size per server that `uri` makes the driver open, as the
/// store builds its client: `maxPoolSize` from the URI, else [`MAX_POOL_SIZE`]. A
/// `maxPoolSize` of 0 means no bound, which nothing can reserve for; it is counted as
/// the default.
fn mongo_connections(uri: &str) -> (u64, u64) {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hosts = if scheme == "mongodb+srv" {
        SRV_HOSTS
    } else {
        hosts.split(',').count() as u64
    };
    let pool = rest
        .split_once('?')
        .map(|(_, query)| query)
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| name.eq_ignore_ascii_case("maxPoolSize"))
        .and_then(|(_, value)| value.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(MAX_POOL_SIZE.into());
    (hosts, pool)
}

/// Raises the soft open-files limit to the hard one (container runtimes often start
/// processes at a soft 1,024 under a far higher hard limit), then checks that
/// `MAX_CONNECTIONS`, its waiting and refusal pools and the descriptors MongoDB, Redis
/// and the process need fit under it: lowers `MAX_CONNECTIONS` with a warning if they do
/// not, and fails if not even a small cap fits. Without this a flood would fail accepts
/// and, worse, the database's and Redis's reconnects, with "too many open files".
pub fn fit_open_files_limit(config: &mut Config) -> Result<(), ConfigError> {
    let Some(limit) = raise_open_files_limit() else {
        return Ok(());
    };
    let (hosts, pool) = mongo_connections(config.store.mongo_uri.expose());
    let reserved = reserved_descriptors(hosts, pool);
    let wanted = config.server.max_connections;
    match fit_connections(wanted, limit, reserved) {
        Fit::Fits => {
            let needs = ClientSockets::for_cap(wanted.into()).total() + reserved;
            tracing::info!(
                open_files_limit = limit,
                needs,
                max_connections = wanted,
                "open-files limit"
            );
            Ok(())
        }
        Fit::Lowered(cap) => {
            tracing::warn!(
                max_connections = wanted,
                open_files_limit = limit,
                lowered_to = cap,
                reserved,
                "MAX_CONNECTIONS does not fit under the open-files limit (RLIMIT_NOFILE) with \
                 its waiting and refusal pools and the descriptors MongoDB, Redis and sluice \
                 keep; lowered"
            );
            config.server.max_connections = cap;
            Ok(())
        }
        Fit::TooLow { needs } => Err(ConfigError(format!(
            "MAX_CONNECTIONS ({wanted}) does not fit under the open-files limit \
             (RLIMIT_NOFILE {limit}): even {} connections need {needs} descriptors, \
             {reserved} of them for MongoDB, Redis and sluice itself; raise the limit \
             (ulimit -n, the container's nofile)",
            MIN_CONNECTIONS.min(wanted.into())
        ))),
    }
}

/// Raises the soft open-files limit to the hard one and returns it (the soft one if it
/// could not be raised); `None` if it cannot be read, or has no bound.
fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the open-files limit");
                hard
            }
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open-files limit; MAX_CONNECTIONS is not checked against it");
            return None;
        }
    };
    (limit != RLIM_INFINITY).then_some(limit)
}

/// A stream whose writes fail once they have made no progress for `limit`: the client
/// stopped reading, its socket buffer is full, and waiting longer only holds resources.
struct WriteProgress<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteProgress<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteProgress {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when a write is pending: errors once it has been pending for `limit`.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of its response within WRITE_PROGRESS_TIMEOUT_MS",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteProgress<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteProgress<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reserve for the default `MONGO_URI`: one server, the default pool.
    fn default_reserve() -> u64 {
        let (hosts, pool) = mongo_connections("mongodb://mongo:27017/assessmentdb");
        reserved_descriptors(hosts, pool)
    }

    #[test]
    fn pools_are_full_from_8192_connections_and_a_fraction_below() {
        let at = |c| ClientSockets::for_cap(c);
        assert_eq!(
            at(20_000),
            ClientSockets {
                connections: 20_000,
                waiting: 1024,
                refusing: 256
            }
        );
        assert_eq!((at(8192).waiting, at(8192).refusing), (1024, 256));
        assert_eq!((at(800).waiting, at(800).refusing), (100, 25));
        assert_eq!((at(5).waiting, at(5).refusing), (1, 1));
        assert_eq!(at(0).total(), 0);
    }

    #[test]
    fn the_reserve_counts_mongodb_redis_the_listener_and_the_process() {
        // 32 baseline + 1 listener + 2 Redis + 1 server x (2 monitors + 8 pooled).
        assert_eq!(default_reserve(), 45);
        assert_eq!(
            mongo_connections("mongodb://mongo:27017/assessmentdb"),
            (1, 8)
        );
        assert_eq!(
            mongo_connections("mongodb://u:p%40ss@a:1,b:2,c:3/db?w=1&MAXPOOLSIZE=20"),
            (3, 20)
        );
        assert_eq!(mongo_connections("mongodb://a,b?maxPoolSize=0"), (2, 8));
        assert_eq!(mongo_connections("mongodb+srv://c.example.com/db"), (7, 8));
        assert_eq!(reserved_descriptors(3, 20), 32 + 1 + 2 + 3 * 22);
    }

    #[test]
    fn a_cap_that_fits_is_kept() {
        let reserve = default_reserve();
        assert_eq!(fit_connections(20_000, 1_048_576, reserve), Fit::Fits);
        // Exactly at the limit: 20,000 + 1,024 + 256 + 45.
        assert_eq!(fit_connections(20_000, 21_325, reserve), Fit::Fits);
        assert_eq!(fit_connections(5, 200, reserve), Fit::Fits);
    }

    #[test]
    fn a_cap_over_the_limit_is_lowered_to_the_largest_that_fits() {
        let reserve = default_reserve();
        // The default cap under a hard limit of 20,000 (this machine's, and common).
        assert_eq!(
            fit_connections(20_000, 20_000, reserve),
            Fit::Lowered(20_000 - 1024 - 256 - 45)
        );
        assert_eq!(
            fit_connections(20_000, 21_324, reserve),
            Fit::Lowered(19_999)
        );
        // A soft 1,024 with no higher hard limit: 846 + 106 waiting + 27 refusing + 45.
        assert_eq!(fit_connections(20_000, 1024, reserve), Fit::Lowered(846));
        // Every limit from where 64 connections fit up: the largest cap that fits.
        for limit in 119..21_325 {
            match fit_connections(20_000, limit, reserve) {
                Fit::Lowered(cap) => {
                    let needs = |c: u64| ClientSockets::for_cap(c).total() + reserve;
                    assert!(needs(cap.into()) <= limit, "{limit}: {cap} does not fit");
                    assert!(
                        needs(u64::from(cap) + 1) > limit,
                        "{limit}: {cap} is not the largest"
                    );
                    assert!(u64::from(cap) >= MIN_CONNECTIONS);
                }
                other => panic!("{limit}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_limit_too_low_for_a_small_cap_fails() {
        let reserve = default_reserve();
        // 64 connections + 8 waiting + 2 refusing + 45 = 119.
        assert_eq!(
            fit_connections(20_000, 118, reserve),
            Fit::TooLow { needs: 119 }
        );
        assert_eq!(fit_connections(20_000, 119, reserve), Fit::Lowered(64));
        assert_eq!(
            fit_connections(20_000, 0, reserve),
            Fit::TooLow { needs: 119 }
        );
        // A cap set below 64 is not lowered further: it fits as it is or not at all.
        assert_eq!(fit_connections(5, 52, reserve), Fit::Fits);
        assert_eq!(fit_connections(5, 51, reserve), Fit::TooLow { needs: 52 });
    }
}

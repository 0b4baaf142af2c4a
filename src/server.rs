//! The accept loop.
//!
//! A semaphore caps open connections (`MAX_CONNECTIONS`). A connection past the cap waits
//! up to `SLOT_WAIT` (1 s) for a slot to free, then gets a 503 with `Retry-After` and is
//! closed, so an overload costs a few bytes instead of unbounded memory. The wait is
//! what keeps a refusal cheap: answered at once, a client that ignores `Retry-After`
//! (k6 does) comes straight back. Measured: 10,000 k6 clients on one replica capped at
//! 10,000 connections (a probe or a scrape takes the last slot) drew 92,100 instant
//! refusals in 76 s, 22 % of k6's requests, CPU taken from k6 and the database.
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
use crate::config::ServerSettings;
use crate::metrics::ShedReason;

/// Request heads larger than this are refused by hyper with 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a connection past the cap waits for a slot before its 503: as long as the
/// `Retry-After` it would be told, so a client that ignores it comes back no sooner.
const SLOT_WAIT: Duration = Duration::from_secs(1);
// `Retry-After` is sent in whole seconds.
const _: () = assert!(SLOT_WAIT.as_secs() >= 1);
/// Connections waiting for a slot at most; past them, refused at once. A waiting
/// connection holds a socket and its task, no HTTP buffers (hyper allocates them once
/// it serves).
const MAX_WAITING: usize = 1024;

/// Serves until `shutdown`, then waits up to `drain` for open connections to finish
/// their requests.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    settings: &ServerSettings,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections as usize));
    let waiting = Arc::new(Semaphore::new(MAX_WAITING));
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
                    tokio::spawn(refuse(stream));
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
                    drop(waiter);
                    match freed {
                        Ok(Ok(slot)) => slot,
                        _ => {
                            app.metrics.shed.get(ShedReason::Connections).inc();
                            return refuse(stream).await;
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
/// 10,000 connections keeps their memory (measured: none of 3,000 idle connections'
/// 18 KiB each came back after they closed). Runs at most every `TRIM_EVERY`, and only
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
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
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

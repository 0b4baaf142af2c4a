//! The accept loop.
//!
//! A semaphore caps open connections (`MAX_CONNECTIONS`): past the cap a connection gets
//! a 503 with `Retry-After` and is closed, so an overload costs a few bytes instead of
//! unbounded memory. Every connection has a header-read timeout, so a client dribbling
//! its head a byte at a time is cut off. On `stop` the loop stops accepting and hyper's
//! graceful shutdown lets in-flight requests finish while idle keep-alive connections
//! close.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::startup::App;

/// Request heads larger than this are refused by hyper with 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves until `stop`, then waits for open connections to finish their requests.
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(app.config.max_connections as usize));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.config.header_read_timeout_ms))
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES);

    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
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
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            app.metrics.shed.with_label_values(&["connections"]).inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let service = service_fn(move |req| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(crate::http::handle(&app, req).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
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
    graceful.shutdown().await;
}

/// Answers a connection over the cap with a raw 503: no hyper machinery spent on it.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"status":"error","message":"too many open connections; retry shortly"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

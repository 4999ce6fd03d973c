//! The HTTP/1.1 server (hyper 1 + tokio): accept loop, per-connection limits and graceful
//! shutdown.
//!
//! * At most `http.max_connections` connections are served at once; the accept loop waits
//!   for a free slot.
//! * Request headers must arrive within `http.header_read_timeout_secs` (hyper closes the
//!   connection otherwise); bodies within `http.body_read_timeout_secs` (408) and up to
//!   `limits.max_body_bytes` (413).
//! * When the shutdown future completes (SIGTERM/SIGINT in the binary), the listener closes,
//!   every connection finishes its in-flight request and closes, and [`serve`] waits up to
//!   `http.shutdown_grace_secs` for that.

pub mod router;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::MetricsAccess;
use crate::service::App;
pub use router::Router;

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_body_bytes: usize,
    pub metrics_access: MetricsAccess,
}

/// Serves `app` on `listener` until `shutdown` completes, then drains connections.
///
/// # Errors
/// Only when the listener's address cannot be read; accept errors are logged and retried.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    opts: HttpOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!("listening on {addr}");
    let router = Arc::new(Router::new(app, opts.clone()));
    let max = opts.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let header_timeout = opts.header_read_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let router = router.clone();
                async move { Ok::<_, Infallible>(router.handle(req).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let stopping = async move {
                // Only the fact matters; the guard is dropped before the next await.
                let _ = stop.wait_for(|s| *s).await.map(|_| ());
            };
            let r = tokio::select! {
                r = conn.as_mut() => r,
                () = stopping => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    match tokio::time::timeout(opts.shutdown_grace, slots.acquire_many(all)).await {
        Ok(_) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(
            grace = ?opts.shutdown_grace,
            "shutdown grace period over; dropping remaining connections"
        ),
    }
    Ok(())
}

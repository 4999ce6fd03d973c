//! The HTTP/1.1 server (hyper 1 + tokio): accept loop, per-connection limits and graceful
//! shutdown.
//!
//! * Every connection is accepted at once and admitted by the shared
//!   [`service_kit::conn::ConnectionGate`]: at most `http.max_connections` at once, and at
//!   most `http.max_connections_per_peer` from one client IP (when set); one over a cap is
//!   answered `503 overloaded` with `Retry-After` and closed, never left waiting in the
//!   kernel's backlog. The header read timeout also closes keep-alive connections idle that
//!   long.
//! * Request headers must arrive within `http.header_read_timeout_secs` (hyper closes the
//!   connection otherwise); bodies within `http.body_read_timeout_secs` (408) and up to
//!   `limits.max_body_bytes` (413). A client that stops reading its answer for
//!   `http.write_timeout_secs` loses the connection ([`service_kit::guarded_io`]).
//! * When the shutdown future completes (SIGTERM/SIGINT in the binary), the listener closes,
//!   every connection finishes its in-flight request and closes, and [`serve`] waits up to
//!   `http.shutdown_grace_secs` for that.

pub mod router;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use service_kit::conn::PeerId;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::MetricsAccess;
use crate::service::MessageService;
pub use router::{error_response, service, HttpService};

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// A write that makes no progress this long ends the connection.
    pub write_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_body_bytes: usize,
    pub metrics_access: MetricsAccess,
}

/// Serves `app` on `listener` until `shutdown` completes, then drains connections.
///
/// # Errors
/// Only when the listener's address cannot be read; accept errors are logged and retried.
pub async fn serve(
    listener: TcpListener,
    app: Arc<MessageService>,
    opts: HttpOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!("listening on {addr}");
    let service = router::service(app.clone(), opts.clone());
    let gate = app.gate.clone();
    // In flight: every connection task holds one read guard; shutdown waits for all of them.
    let tasks = Arc::new(tokio::sync::RwLock::new(()));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
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
        let permit = match gate
            .admit()
            .and_then(|g| gate.admit_peer(g, PeerId::Ip(peer.ip())))
        {
            Ok(p) => p,
            Err(why) => {
                gate.refuse(stream, why);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let http = service.clone();
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let http = http.clone();
            async move { Ok::<_, std::convert::Infallible>(http.answer(req).await) }
        });
        let mut stop = stop_rx.clone();
        let header_timeout = opts.header_read_timeout;
        let write_timeout = opts.write_timeout;
        let running = tasks.clone().read_owned().await;
        tokio::spawn(async move {
            let _permit = permit;
            let _running = running;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(
                TokioIo::new(service_kit::guarded_io::GuardedIo::new(
                    stream,
                    write_timeout,
                )),
                svc,
            );
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
    match tokio::time::timeout(opts.shutdown_grace, tasks.write()).await {
        Ok(_) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(
            grace = ?opts.shutdown_grace,
            "shutdown grace period over; dropping remaining connections"
        ),
    }
    Ok(())
}

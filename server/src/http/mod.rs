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
//!   every connection finishes its in-flight request and closes, and [`serve()`] waits up to
//!   `http.shutdown_grace_secs` for that. The connection itself, the accept back-off and the
//!   shutdown are the KMS's too ([`service_kit::serve`]).

mod answer;
mod app;
pub mod cors;
pub mod progressdb;
mod request;
mod state;
pub mod v1;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use service_kit::conn::PeerId;
use service_kit::serve;
use tokio::net::TcpListener;

use crate::config::MetricsAccess;
use crate::service::MessageService;
pub use answer::error_response;
pub use app::{service, HttpService};

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
    /// `http.cors_allowed_origins`.
    pub cors_allowed_origins: Vec<String>,
}

/// Serves `service` on `listener` until `shutdown` completes, then drains connections.
///
/// # Errors
/// Only when the listener's address cannot be read; accept errors are logged and retried.
pub async fn serve(
    listener: TcpListener,
    service: Arc<MessageService>,
    opts: HttpOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!("listening on {addr}");
    let handler = app::service(service.clone(), opts.clone());
    let gate = service.gate().clone();
    let graceful = serve::GracefulShutdown::new();
    let timeouts = serve::ConnTimeouts {
        header_read: opts.header_read_timeout,
        write: opts.write_timeout,
    };
    tokio::pin!(shutdown);
    while let Some((stream, peer)) =
        serve::next_connection(&mut shutdown, || listener.accept()).await
    {
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
        let http = handler.clone();
        let answer = move |req: hyper::Request<hyper::body::Incoming>| {
            let http = http.clone();
            async move { http.answer(req).await }
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            serve::serve_connection(stream, answer, timeouts, serve::KeepAlive::On, watcher).await;
            drop(permit);
        });
    }
    drop(listener);
    serve::drain(graceful, opts.shutdown_grace).await;
    Ok(())
}

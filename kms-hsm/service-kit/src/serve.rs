//! The HTTP/1 serving loop of both services, written once: one connection served under the
//! shared timeouts, the next connection until a stop (an accept failure backed off), and one
//! graceful-shutdown mechanism
//! (hyper-util's [`GracefulShutdown`]: every connection is watched; at shutdown each finishes
//! its in-flight request and closes, idle keep-alive connections at once).
//!
//! What differs between the services stays with them: the KMS admits Unix-socket peers by
//! uid and TLS peers by certificate, and serves an admin endpoint; the server admits TCP
//! peers by IP. Both then hand the admitted connection to [`serve_connection`] and, when the
//! shutdown future completes, call [`drain`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
pub use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};

/// The timeouts of every served connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// Deadline for a request head; also how long a keep-alive connection may sit idle.
    pub header_read: Duration,
    /// A write that makes no progress this long ends the connection
    /// ([`crate::guarded_io`]).
    pub write: Duration,
}

/// Whether a connection may carry more than one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    On,
    /// One answer, then the connection closes (a refused peer).
    Off,
}

/// Serves `io` with `answer` (one request in, one response out, never failing) until the
/// peer closes, a timeout ends it, or shutdown (through `watcher`) closes it after its
/// in-flight request. Connection errors are logged at debug level.
pub async fn serve_connection<I, F, Fut, B>(
    io: I,
    answer: F,
    timeouts: ConnTimeouts,
    keep_alive: KeepAlive,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = service_fn(move |req| {
        let fut = answer(req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .keep_alive(keep_alive == KeepAlive::On);
    let conn = builder.serve_connection(
        TokioIo::new(crate::guarded_io::GuardedIo::new(io, timeouts.write)),
        svc,
    );
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The next connection `accept` gives, or `None` once `stop` completes (checked first, so a
/// stopping listener takes no new connection). A failed accept (EMFILE, ENFILE, ...) is
/// logged and backed off instead of spinning, then accepting goes on.
pub async fn next_connection<S, A, Fut, T>(stop: &mut Pin<&mut S>, accept: A) -> Option<T>
where
    S: Future,
    A: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.as_mut() => return None,
            a = accept() => a,
        };
        match accepted {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// After the listeners are closed: lets every watched connection finish its in-flight
/// request, waiting at most `grace`; what is still open then is dropped.
pub async fn drain(graceful: GracefulShutdown, grace: Duration) {
    tracing::info!(
        connections = graceful.count(),
        "shutting down: finishing in-flight requests"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "in-flight requests did not finish in time; closing them"
        ),
    }
}

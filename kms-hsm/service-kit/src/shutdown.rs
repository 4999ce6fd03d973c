//! The shutdown signal of both binaries.

use std::future::Future;

/// Installs the SIGTERM and SIGINT handlers now and returns a future that completes on the
/// first of them, also when it arrived before the future was first polled (so a signal during
/// start-up is a clean stop, not a kill).
///
/// # Errors
/// When the handlers cannot be installed.
pub fn signals() -> std::io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

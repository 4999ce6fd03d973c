//! The signals of both binaries: the shutdown signal, and `SIGXFSZ` made harmless.

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

/// Makes a file-size limit (`RLIMIT_FSIZE`, `ulimit -f`) an error instead of a kill: by default
/// `SIGXFSZ` terminates the process with a core dump; with a handler installed the write just
/// fails with `EFBIG`, which the stores answer like a full disk (507, nothing written, reads
/// go on). Each occurrence is logged. Must run inside a tokio runtime.
///
/// # Errors
/// When the handler cannot be installed.
pub fn survive_file_size_limit() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let raw = rustix::process::Signal::XFSZ.as_raw();
    let mut s = signal(SignalKind::from_raw(raw))?;
    tokio::spawn(async move {
        while s.recv().await.is_some() {
            tracing::warn!(
                "SIGXFSZ: a store file reached the process's file-size limit; the write failed"
            );
        }
    });
    Ok(())
}

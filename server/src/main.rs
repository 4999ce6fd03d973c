//! `progressdb serve --config FILE`: parse the config, initialise tracing, build the server,
//! serve until SIGTERM/SIGINT. Configuration errors exit with status 2 and one line on
//! stderr naming the key or file at fault.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use progressdb::config::{LogConfig, LogFormat};
use progressdb::{Config, Server};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "progressdb",
    version,
    about = "progressdb: an encrypted thread and message store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve {
        /// TOML configuration file; keys can be overridden with PROGRESSDB__SECTION__KEY.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
    }
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("progressdb: {msg}");
    ExitCode::from(code)
}

fn init_tracing(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(path: &Path) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    init_tracing(&cfg.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}"), 1),
    };
    rt.block_on(async {
        // Signal handlers first, so a SIGTERM during start-up is a clean stop too.
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => return fail(format!("cannot install signal handlers: {e}"), 1),
        };
        let server = match Server::build(&cfg).await {
            Ok(s) => s,
            Err(e) => return fail(e, 2),
        };
        let listener = match tokio::net::TcpListener::bind(cfg.http.listen).await {
            Ok(l) => l,
            Err(e) => return fail(format!("http.listen {}: {e}", cfg.http.listen), 2),
        };
        match server.run(listener, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("server error: {e}"), 1),
        }
    })
}

/// Installs the SIGTERM/SIGINT handlers now; the returned future completes on either signal
/// (also one received before it is first polled).
///
/// # Errors
/// When the handlers cannot be installed.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
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

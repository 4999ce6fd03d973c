//! Logging: `tracing` to stderr, human-readable text or one JSON object per line
//! (`log.format`). The filter is `RUST_LOG` when set, else `log.level`.
//!
//! Nothing secret is ever a field of a log event: the PIN, DEKs, wrapped DEKs, plaintext and
//! ciphertext are not logged, and request/response bodies are not logged at any level. Key
//! ids, thread ids, KEK ids and versions, endpoints and statuses are.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. A second call does nothing.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let _ = match cfg.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

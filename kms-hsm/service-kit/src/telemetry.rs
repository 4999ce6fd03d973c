//! Logs: `tracing` to stderr, human-readable text or one JSON object per line (`log.format`).
//! The filter is `RUST_LOG` when set, else `log.level`.
//!
//! Nothing secret is ever a field of a log event in either service: PINs, API keys, DEKs,
//! wrapped DEKs, plaintext and ciphertext are not logged, and request and response bodies are
//! not logged at any level. Ids (key, thread, KEK, message), endpoints and statuses are.

use std::io::IsTerminal as _;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// `log.format`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `progressdb=debug,info`. `RUST_LOG` wins if set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Installs the global subscriber. A second call does nothing.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // `cryptoki` logs an ERROR line for every mechanism of the token's list it has no name
    // for (dozens at each start on SoftHSM): not an error of this process. The KMS reads
    // the list itself and names what it needs and lacks.
    let filter = match "cryptoki::mechanism=off".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
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

//! Server configuration: a TOML file given with `--config FILE`, every key overridable from
//! the environment as `PROGRESSDB__SECTION__KEY` (e.g. `PROGRESSDB__HTTP__LISTEN`).
//!
//! [`Config::load`] reads and validates; every error is one line naming the key or the file at
//! fault. Secret files named here (`auth.keys_file`, `kms.client_key`, `kms.master_key_file`)
//! are read later, when the server is built, and refused unless mode 0600 or stricter.
//! The reference file is `server/progressdb.example.toml`.

mod sections;
pub use sections::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_api::Endpoint;
use serde::Deserialize;

/// Prefix of environment overrides; sections and keys are separated by `__`.
pub const ENV_PREFIX: &str = "PROGRESSDB";

/// Why the configuration was refused. `Display` is a single line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] service_kit::config::LoadError),
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl ConfigError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub kms: KmsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

pub use service_kit::telemetry::{LogConfig, LogFormat};

impl Config {
    /// Reads `path` (TOML), applies `PROGRESSDB__*` environment overrides and validates.
    ///
    /// # Errors
    /// [`ConfigError`], one line naming the file or key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`] with the environment given as a map (for tests); `None` reads the
    /// process environment.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut cfg: Config = service_kit::config::load(path, ENV_PREFIX, env)?;
        let base = service_kit::config::base_dir(path)?;
        cfg.resolve_paths(&base);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Makes every relative file path absolute against `base` (the config file's directory),
    /// as the KMS does, so a config means the same from any working directory.
    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.store.path);
        abs(&mut self.auth.keys_file);
        for p in [
            &mut self.store.password_file,
            &mut self.store.ca_file,
            &mut self.kms.client_cert,
            &mut self.kms.client_key,
            &mut self.kms.ca,
            &mut self.kms.master_key_file,
        ]
        .into_iter()
        .flatten()
        {
            abs(p);
        }
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.store.backend {
            StoreBackendKind::Lmdb => {
                if self.store.path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid("store.path", "must not be empty"));
                }
                if self.store.url.is_some() {
                    return Err(ConfigError::invalid(
                        "store.url",
                        "is for store.backend = \"postgres\"",
                    ));
                }
            }
            StoreBackendKind::Postgres => {
                if !self.store.path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid(
                        "store.path",
                        "is for store.backend = \"lmdb\" (the messages are in store.url)",
                    ));
                }
                // One connection holds the one-server lock (the writer writes on it), one
                // is for looking up a commit whose connection broke, one at least for reads.
                if !(3..=1024).contains(&self.store.pool_size) {
                    return Err(ConfigError::invalid("store.pool_size", "must be 3 to 1024"));
                }
                if !(1..=3600).contains(&self.store.timeout_secs) {
                    return Err(ConfigError::invalid(
                        "store.timeout_secs",
                        "must be 1 to 3600",
                    ));
                }
                self.store
                    .postgres()
                    .map_err(|e| ConfigError::invalid(e.key, e.reason))?;
            }
        }
        if self.auth.keys_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("auth.keys_file", "must not be empty"));
        }
        if !(1..=1024).contains(&self.encryption.max_concurrent_rotations) {
            return Err(ConfigError::invalid(
                "encryption.max_concurrent_rotations",
                "must be 1 to 1024",
            ));
        }
        if !(60..=crate::auth::MAX_SIGNATURE_TTL_SECS).contains(&self.auth.max_signature_ttl_secs) {
            return Err(ConfigError::invalid(
                "auth.max_signature_ttl_secs",
                format!(
                    "must be 60 to {} (7 days)",
                    crate::auth::MAX_SIGNATURE_TTL_SECS
                ),
            ));
        }
        for o in &self.http.cors_allowed_origins {
            if !crate::http::cors::is_origin(o) {
                return Err(ConfigError::invalid(
                    "http.cors_allowed_origins",
                    format!("{o:?} is not an origin: scheme://host[:port] (http or https, no path), or \"*\""),
                ));
            }
        }
        if self.store.map_size_mb == 0 {
            return Err(ConfigError::invalid(
                "store.map_size_mb",
                "must be at least 1",
            ));
        }
        if self.store.max_map_size_mb < self.store.map_size_mb {
            return Err(ConfigError::invalid(
                "store.max_map_size_mb",
                "must be at least store.map_size_mb",
            ));
        }
        if usize::try_from(self.store.max_map_size_mb.saturating_mul(1 << 20)).is_err() {
            return Err(ConfigError::invalid(
                "store.max_map_size_mb",
                "too large for this platform",
            ));
        }
        if self.store.max_batch_ops == 0 {
            return Err(ConfigError::invalid(
                "store.max_batch_ops",
                "must be at least 1",
            ));
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError::invalid(
                "http.max_connections",
                "must be at least 1",
            ));
        }
        if self.http.header_read_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "http.header_read_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.http.body_read_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "http.body_read_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.http.write_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "http.write_timeout_secs",
                "must be at least 1",
            ));
        }
        let l = &self.limits;
        if l.max_body_bytes < 1024 || l.max_body_bytes > kms_api::wire::MAX_ITEM_BYTES / 2 {
            return Err(ConfigError::invalid(
                "limits.max_body_bytes",
                format!(
                    "must be between 1024 and {} bytes",
                    kms_api::wire::MAX_ITEM_BYTES / 2
                ),
            ));
        }
        if l.max_page_size == 0 || l.max_page_size > kms_api::wire::MAX_BATCH_ITEMS {
            return Err(ConfigError::invalid(
                "limits.max_page_size",
                format!("must be between 1 and {}", kms_api::wire::MAX_BATCH_ITEMS),
            ));
        }
        if l.default_page_size == 0 {
            return Err(ConfigError::invalid(
                "limits.default_page_size",
                "must be at least 1",
            ));
        }
        for (key, v) in [
            ("limits.max_title_bytes", l.max_title_bytes),
            ("limits.max_page_bytes", l.max_page_bytes),
            ("limits.max_metadata_bytes", l.max_metadata_bytes),
            ("limits.max_metadata_depth", l.max_metadata_depth),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        let k = &self.kms;
        if k.max_batch_items == 0 || k.max_batch_items > kms_api::wire::MAX_BATCH_ITEMS {
            return Err(ConfigError::invalid(
                "kms.max_batch_items",
                format!("must be between 1 and {}", kms_api::wire::MAX_BATCH_ITEMS),
            ));
        }
        if k.max_batch_bytes < 64 * 1024 {
            return Err(ConfigError::invalid(
                "kms.max_batch_bytes",
                "must be at least 65536 (and at most the KMS's limits.max_body_bytes)",
            ));
        }
        if k.max_inflight_batches == 0 {
            return Err(ConfigError::invalid(
                "kms.max_inflight_batches",
                "must be at least 1",
            ));
        }
        for (key, v) in [
            ("kms.connect_timeout_ms", k.connect_timeout_ms),
            ("kms.request_timeout_ms", k.request_timeout_ms),
            ("kms.ready_timeout_ms", k.ready_timeout_ms),
            ("kms.deadline_ms", k.deadline_ms),
            ("kms.breaker_cooldown_ms", k.breaker_cooldown_ms),
            ("kms.health_interval_ms", k.health_interval_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(
                    key,
                    "must be at least 1 (milliseconds)",
                ));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                "must be a tracing filter such as \"info\" or \"progressdb=debug\"",
            ));
        }
        let endpoints = k.parsed_endpoints()?;
        match k.mode {
            KmsMode::External => {
                if self.encryption.enabled && endpoints.is_empty() {
                    return Err(ConfigError::invalid(
                        "kms.endpoint",
                        "required when encryption.enabled = true and kms.mode = \"external\" (or kms.endpoints, for replicas)",
                    ));
                }
                let unix = endpoints.iter().any(|e| matches!(e, Endpoint::Unix(_)));
                if k.peer_uid.is_some() && !unix {
                    return Err(ConfigError::invalid(
                        "kms.peer_uid",
                        "applies only to unix:// KMS endpoints (mutual TLS identifies the KMS by its certificate)",
                    ));
                }
                if endpoints
                    .iter()
                    .any(|e| matches!(e, Endpoint::Https { .. }))
                {
                    for (key, v) in [
                        ("kms.client_cert", &k.client_cert),
                        ("kms.client_key", &k.client_key),
                        ("kms.ca", &k.ca),
                    ] {
                        if v.is_none() {
                            return Err(ConfigError::invalid(
                                key,
                                "required for an https:// KMS endpoint",
                            ));
                        }
                    }
                }
            }
            KmsMode::Embedded => {
                #[cfg(not(feature = "dev-embedded"))]
                return Err(ConfigError::invalid(
                    "kms.mode",
                    "\"embedded\" is only available in dev builds: rebuild with `cargo build -p progressdb --features dev-embedded`, or use kms.mode = \"external\"",
                ));
                #[cfg(feature = "dev-embedded")]
                if k.master_key_file.is_none() {
                    return Err(ConfigError::invalid(
                        "kms.master_key_file",
                        "required when kms.mode = \"embedded\"",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

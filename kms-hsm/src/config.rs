//! Configuration of the KMS: one TOML file (`--config FILE`) whose every key can be overridden
//! from the environment as `PROGRESSDB_KMS__SECTION__KEY` (e.g. `PROGRESSDB_KMS__CACHE__TTL_SECS`).
//!
//! Loading is two steps: the `config` crate merges the file and the environment into
//! [`RawConfig`] (every key optional, unknown keys refused), then [`RawConfig::validate`] turns
//! it into a [`Config`] whose values are checked and typed. Every error is one line that names
//! the key or file at fault. Secrets are not read here: [`Config::hsm_settings`] reads the PIN
//! (from `hsm.pin_file`, which must be mode 0600, or from `PROGRESSDB_KMS_HSM_PIN`) only when
//! the HSM is about to be opened.
//!
//! Relative paths are resolved against the directory of the config file.
//!
//! See `progressdb-kms.example.toml` for the commented reference of every key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_api::KekId;
use secrecy::SecretString;
use service_kit::secret_file::{self, SecretFileError};

use crate::backend::{HsmLimits, HsmSettings};

/// Prefix of environment overrides; sections and keys are separated by `__`.
pub const ENV_PREFIX: &str = "PROGRESSDB_KMS";
/// Environment variable that may hold the HSM user PIN instead of `hsm.pin_file`.
pub const PIN_ENV: &str = "PROGRESSDB_KMS_HSM_PIN";

/// The PIN taken out of the environment by [`take_pin_from_env`].
static ENV_PIN: std::sync::Mutex<Option<SecretString>> = std::sync::Mutex::new(None);

/// Moves the PIN from [`PIN_ENV`] into zeroizing memory and removes the variable, so no
/// later reader of the environment (a PKCS#11 module, a child process) sees it. Call once,
/// first thing in `main`, before any other thread exists (changing the environment while
/// another thread reads it is not sound). The kernel's copy of the initial environment
/// (`/proc/<pid>/environ`) is readable only by root, since the process is not dumpable
/// ([`service_kit::process`]); `hsm.pin_file` avoids it altogether.
pub fn take_pin_from_env() {
    if let Some(v) = std::env::var_os(PIN_ENV) {
        std::env::remove_var(PIN_ENV);
        let pin = zeroize::Zeroizing::new(v.into_string().unwrap_or_default());
        if !pin.is_empty() {
            *ENV_PIN.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(SecretString::from(pin.as_str()));
        }
    }
}

/// The PIN from the environment: the one [`take_pin_from_env`] took, else the variable.
fn pin_from_env() -> Option<SecretString> {
    use secrecy::ExposeSecret as _;
    let taken = ENV_PIN.lock().unwrap_or_else(|p| p.into_inner());
    match taken.as_ref() {
        Some(p) => Some(SecretString::from(p.expose_secret())),
        None => std::env::var(PIN_ENV)
            .ok()
            .filter(|p| !p.is_empty())
            .map(SecretString::from),
    }
}

/// Why the configuration was refused. Each message names the key or file at fault and never
/// contains a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value has the wrong type.
    #[error(transparent)]
    Load(#[from] service_kit::config::LoadError),
    /// A required key is absent.
    #[error("config key {key} is required{hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
    /// A key has an unacceptable value.
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// Keys that cannot be used together (or a required choice left open).
    #[error("config: {0}")]
    Conflict(&'static str),
    /// The PIN file is missing, unreadable or group/world accessible.
    #[error("hsm.pin_file: {0}")]
    PinFile(#[from] SecretFileError),
}

mod raw;
mod validate;

pub use raw::*;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (for messages).
    pub source: PathBuf,
    pub listen: ListenConfig,
    /// The admin endpoint: always a Unix socket of its own.
    pub admin: AdminConfig,
    pub hsm: HsmConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub lifecycle: crate::lifecycle::LifecycleOptions,
}

/// The admin endpoint (`listen.admin_unix`, `listen.admin_uids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The admin socket (mode 0600). Default: beside `listen.unix`, named
    /// `<stem>.admin.sock` (`kms.sock` → `kms.admin.sock`); with `listen.tcp`,
    /// `kms.admin.sock` inside `store.path`.
    pub unix: PathBuf,
    /// Peer uids allowed on the admin socket. Default: the KMS's own uid only.
    pub uids: Vec<u32>,
    /// Whether a uid may be both a client (the server) and an admin.
    pub users: Users,
}

/// `listen.single_user`: whether the server's identity and the operators' are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Users {
    /// The default: no uid that can reach the client socket is an admin; the KMS refuses to
    /// start otherwise, and refuses a client peer whose uid is an admin.
    Separate,
    /// `listen.single_user = true`: one uid runs everything (single-user development). The
    /// server's identity can then use the admin API; raised as the `single_user` alert.
    SingleUser,
}

/// Where the KMS listens: exactly one transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenConfig {
    /// `listen.unix`: a Unix socket created with mode 0600 (or 0660, `listen.socket_access`),
    /// optionally restricted to peer uids.
    Unix {
        path: PathBuf,
        access: SocketAccess,
        allowed_uids: Option<Vec<u32>>,
    },
    /// `listen.tcp` with mutual TLS.
    Tcp { addr: SocketAddr, tls: TlsConfig },
}

/// `[tls]`: files of the server certificate, its key (mode 0600) and the client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Client-certificate subjects (common name or DNS name) that are admin identities on
    /// TCP: they get the admin API instead of the key API.
    pub admin_subjects: Vec<String>,
}

/// `[hsm]`
#[derive(Debug, Clone)]
pub struct HsmConfig {
    pub module: PathBuf,
    pub token_label: String,
    /// `None`: the PIN comes from [`PIN_ENV`].
    pub pin_file: Option<PathBuf>,
    pub kek_label: KekId,
    /// Default: `<kek_label>-audit`.
    pub audit_key_label: String,
    /// Default: `<kek_label>-binding`.
    pub binding_key_label: String,
    pub sessions: usize,
    pub limits: HsmLimits,
    /// `hsm.dek_residency`: where unwrapped DEKs live.
    pub residency: crate::backend::DekResidency,
    /// `hsm.resident_keys_per_session`: DEK session objects kept per worker session.
    pub resident_keys_per_session: usize,
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The KMS's local state directory: the LMDB files (`backend = "lmdb"`) and the admin
    /// socket's default place.
    pub path: PathBuf,
    pub backend: StoreBackend,
}

/// `store.backend`.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// The embedded LMDB store in `store.path` (one KMS process per store).
    Lmdb { map_size_mb: u64 },
    /// A PostgreSQL database, shared by every replica.
    Postgres(PostgresConfig),
}

pub use crate::keystore::postgres::{InvalidPostgresConfig, PostgresConfig, PG_PASSWORD_ENV};

impl From<InvalidPostgresConfig> for ConfigError {
    fn from(e: InvalidPostgresConfig) -> Self {
        invalid(e.key, e.reason)
    }
}

/// `[cache]`
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Zero disables the cache.
    pub ttl: Duration,
    /// Zero disables the cache.
    pub max_entries: usize,
}

/// `[limits]`
#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    pub max_body_bytes: usize,
    pub read_timeout: Duration,
    /// A connection whose client reads nothing of its answer this long is closed.
    pub write_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    /// Requests a second from one peer on the key API (off when `per_sec` is 0).
    pub peer_rate: service_kit::rate::RateLimit,
    /// `create_dek_for_thread` calls a second from one peer: every create adds a key record
    /// and an audit entry for good (off when `per_sec` is 0).
    pub peer_create_rate: service_kit::rate::RateLimit,
    /// Connections from one peer (uid on the Unix socket, client certificate on TCP).
    pub max_connections_per_peer: usize,
}

pub use service_kit::telemetry::{LogConfig, LogFormat};

/// Defaults of optional keys (documented in the example file).
pub mod defaults {
    pub const HSM_SESSIONS: u32 = 4;
    /// DEK session objects per worker session in `hsm` residency (SoftHSM keeps each in a
    /// few hundred bytes; a real HSM's object memory may call for less).
    pub const HSM_RESIDENT_KEYS_PER_SESSION: u32 = 4096;
    pub const HSM_QUEUE_DEPTH: u32 = 64;
    pub const HSM_JOB_TIMEOUT_MS: u64 = 5000;
    pub const MAP_SIZE_MB: u64 = 1024;
    pub const PG_POOL_SIZE: u64 = 16;
    pub const PG_TIMEOUT_SECS: u64 = 5;
    pub const PG_COHERENCE_MS: u64 = 500;
    pub const CACHE_TTL_SECS: u64 = 300;
    pub const CACHE_MAX_ENTRIES: u64 = 10_000;
    pub const MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
    pub const READ_TIMEOUT_SECS: u64 = 10;
    pub const WRITE_TIMEOUT_SECS: u64 = 30;
    pub const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
    pub const MAX_CONNECTIONS: u64 = 4096;
    pub const MAX_CONNECTIONS_PER_PEER: u64 = 1024;
    pub const LOG_LEVEL: &str = "info";
    pub const REWRAP_CONCURRENCY: u32 = 2;
    pub const REWRAP_BATCH: u32 = 128;
    pub const LEASE_SECS: u64 = 10;
}

impl Config {
    /// Loads `path` and applies overrides from the process environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`], with the environment given as a map (for tests); `None` reads
    /// the process environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or key at fault.
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = service_kit::config::load(path, ENV_PREFIX, env)?;
        let base = service_kit::config::base_dir(path)?;
        raw.validate(path, &base)
    }

    /// The settings of the PKCS#11 backend, with the PIN read from `hsm.pin_file` (refused
    /// unless mode 0600 or stricter) or from `PROGRESSDB_KMS_HSM_PIN`.
    ///
    /// # Errors
    /// [`ConfigError::PinFile`] naming the file; [`ConfigError::Missing`] or
    /// [`ConfigError::Conflict`] when the PIN source is absent or ambiguous.
    pub fn hsm_settings(&self) -> Result<HsmSettings, ConfigError> {
        let env_pin = pin_from_env();
        let pin: SecretString = match (&self.hsm.pin_file, env_pin) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "set either hsm.pin_file or PROGRESSDB_KMS_HSM_PIN, not both",
                ))
            }
            (Some(file), None) => secret_file::read_secret_string(file)?,
            (None, Some(p)) => p,
            (None, None) => {
                return Err(ConfigError::Missing {
                    key: "hsm.pin_file",
                    hint: " (or set PROGRESSDB_KMS_HSM_PIN)",
                })
            }
        };
        Ok(HsmSettings {
            module: self.hsm.module.clone(),
            token_label: self.hsm.token_label.clone(),
            pin,
            kek_label: self.hsm.kek_label.clone(),
            audit_key_label: self.hsm.audit_key_label.clone(),
            binding_key_label: self.hsm.binding_key_label.clone(),
            sessions: self.hsm.sessions,
            residency: self.hsm.residency,
            resident_keys_per_session: self.hsm.resident_keys_per_session,
            limits: self.hsm.limits,
        })
    }
}

/// `listen.admin_unix` by default: `<stem>.admin.sock` beside the client socket.
pub fn default_admin_socket(client: &Path) -> PathBuf {
    let stem = client
        .file_stem()
        .map_or_else(|| "kms".into(), |s| s.to_string_lossy().into_owned());
    client.with_file_name(format!("{stem}.admin.sock"))
}

impl UidList {
    fn into_vec(self, key: &'static str) -> Result<Vec<u32>, ConfigError> {
        let v = match self {
            UidList::One(u) => vec![u],
            UidList::Many(v) => v,
            UidList::Text(t) => t
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<u32>()
                        .map_err(|_| invalid(key, "must be a list of numeric uids"))
                })
                .collect::<Result<_, _>>()?,
        };
        if v.is_empty() {
            return Err(invalid(
                key,
                "must list at least one uid (omit the key for the default)",
            ));
        }
        Ok(v)
    }
}

fn invalid(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

fn to_usize(key: &'static str, v: u64) -> Result<usize, ConfigError> {
    usize::try_from(v).map_err(|_| invalid(key, "is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

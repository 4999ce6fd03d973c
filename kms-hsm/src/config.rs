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

impl RawConfig {
    /// Checks every key and builds the typed [`Config`]. `base` is the directory relative
    /// paths are resolved against.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key at fault.
    pub fn validate(self, source: &Path, base: &Path) -> Result<Config, ConfigError> {
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let listen = match (self.listen.unix, self.listen.tcp) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "set exactly one of listen.unix and listen.tcp, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::Conflict(
                    "set exactly one of listen.unix (socket path) and listen.tcp (host:port, mutual TLS)",
                ))
            }
            (Some(path), None) => {
                if path.as_os_str().is_empty() {
                    return Err(invalid("listen.unix", "must be a socket path"));
                }
                if self.tls.cert.is_some()
                    || self.tls.key.is_some()
                    || self.tls.client_ca.is_some()
                    || self.tls.admin_subjects.is_some()
                {
                    return Err(ConfigError::Conflict(
                        "tls.* is used only with listen.tcp; remove it or listen on TCP",
                    ));
                }
                let allowed_uids = self
                    .listen
                    .allowed_uids
                    .map(|u| u.into_vec("listen.allowed_uids"))
                    .transpose()?;
                let access = self.listen.socket_access.unwrap_or_default();
                if access == SocketAccess::Group && allowed_uids.is_none() {
                    return Err(invalid(
                        "listen.socket_access",
                        "\"group\" requires listen.allowed_uids (the uids of the servers): group membership alone must not admit a peer",
                    ));
                }
                ListenConfig::Unix {
                    path: abs(path),
                    access,
                    allowed_uids,
                }
            }
            (None, Some(tcp)) => {
                if self.listen.allowed_uids.is_some() || self.listen.socket_access.is_some() {
                    return Err(ConfigError::Conflict(
                        "listen.allowed_uids and listen.socket_access apply only to listen.unix",
                    ));
                }
                let addr: SocketAddr = tcp.trim().parse().map_err(|_| {
                    invalid("listen.tcp", "must be an IP address and port, e.g. 127.0.0.1:7443")
                })?;
                let tls = match (self.tls.cert, self.tls.key, self.tls.client_ca) {
                    (Some(cert), Some(key), Some(client_ca)) => TlsConfig {
                        cert: abs(cert),
                        key: abs(key),
                        client_ca: abs(client_ca),
                        admin_subjects: self
                            .tls
                            .admin_subjects
                            .map(StringList::into_vec)
                            .unwrap_or_default(),
                    },
                    _ => {
                        return Err(ConfigError::Conflict(
                            "listen.tcp requires tls.cert, tls.key and tls.client_ca (mutual TLS); plain TCP is refused",
                        ))
                    }
                };
                ListenConfig::Tcp { addr, tls }
            }
        };

        let store_path = abs(self.store.path.clone().ok_or(ConfigError::Missing {
            key: "store.path",
            hint: " (directory of the key store)",
        })?);
        let admin_unix = match (self.listen.admin_unix, &listen) {
            (Some(p), _) if p.as_os_str().is_empty() => {
                return Err(invalid("listen.admin_unix", "must be a socket path"))
            }
            (Some(p), _) => abs(p),
            (None, ListenConfig::Unix { path, .. }) => default_admin_socket(path),
            (None, ListenConfig::Tcp { .. }) => store_path.join("kms.admin.sock"),
        };
        if let ListenConfig::Unix { path, .. } = &listen {
            if *path == admin_unix {
                return Err(ConfigError::Conflict(
                    "listen.admin_unix must differ from listen.unix",
                ));
            }
        }
        let users = match self.listen.single_user {
            Some(true) => Users::SingleUser,
            Some(false) | None => Users::Separate,
        };
        let me = rustix::process::geteuid().as_raw();
        let (admin_uids, admin_key) = match self.listen.admin_uids {
            Some(u) => (u.into_vec("listen.admin_uids")?, "listen.admin_uids"),
            None => (vec![me], "listen.admin_uids (unset: the KMS's own uid)"),
        };
        if users == Users::Separate {
            // Who can reach the client socket: the allow-list, or, without one, the socket
            // file's owner (the KMS's uid) and root, who passes any file mode.
            let (clients, clients_key) = match &listen {
                ListenConfig::Unix {
                    allowed_uids: Some(v),
                    ..
                } => (v.clone(), "listen.allowed_uids"),
                ListenConfig::Unix {
                    allowed_uids: None, ..
                } => (
                    vec![me, 0],
                    "listen.allowed_uids (unset: the KMS's own uid and root)",
                ),
                ListenConfig::Tcp { .. } => (Vec::new(), "listen.allowed_uids"),
            };
            if let Some(uid) = admin_uids.iter().find(|u| clients.contains(u)) {
                return Err(ConfigError::Invalid {
                    key: "listen.admin_uids",
                    reason: format!(
                        "uid {uid} is in {admin_key} and can reach the client socket ({clients_key}): the server's identity must not be an admin; run the server as its own user and list only it in listen.allowed_uids (docs/deploy.md), or set listen.single_user = true for single-user development"
                    ),
                });
            }
        }
        let admin = AdminConfig {
            unix: admin_unix,
            uids: admin_uids,
            users,
        };

        let module = self.hsm.module.ok_or(ConfigError::Missing {
            key: "hsm.module",
            hint: " (path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so)",
        })?;
        let token_label = self.hsm.token_label.ok_or(ConfigError::Missing {
            key: "hsm.token_label",
            hint: "",
        })?;
        if token_label.is_empty() || token_label.len() > 32 {
            return Err(invalid("hsm.token_label", "must be 1 to 32 characters"));
        }
        let kek_label = self.hsm.kek_label.ok_or(ConfigError::Missing {
            key: "hsm.kek_label",
            hint: "",
        })?;
        let kek_label = KekId::parse(&kek_label).map_err(|e| invalid("hsm.kek_label", e))?;
        let hmac_label = |key: &'static str, set: Option<String>, suffix: &str| {
            let label = set.unwrap_or_else(|| format!("{kek_label}-{suffix}"));
            if label.is_empty() || label.len() > 64 {
                return Err(invalid(key, "must be 1 to 64 characters"));
            }
            if label == kek_label.as_str() {
                return Err(invalid(key, "must differ from hsm.kek_label"));
            }
            Ok(label)
        };
        let audit_key_label = hmac_label("hsm.audit_key_label", self.hsm.audit_key_label, "audit")?;
        let binding_key_label = hmac_label(
            "hsm.binding_key_label",
            self.hsm.binding_key_label,
            "binding",
        )?;
        if binding_key_label == audit_key_label {
            return Err(invalid(
                "hsm.binding_key_label",
                "must differ from hsm.audit_key_label (each key has one use)",
            ));
        }
        let sessions = self.hsm.sessions.unwrap_or(defaults::HSM_SESSIONS);
        if !(1..=64).contains(&sessions) {
            return Err(invalid("hsm.sessions", "must be between 1 and 64"));
        }
        let queue_depth = self.hsm.queue_depth.unwrap_or(defaults::HSM_QUEUE_DEPTH);
        if !(1..=65_536).contains(&queue_depth) {
            return Err(invalid("hsm.queue_depth", "must be between 1 and 65536"));
        }
        let job_timeout_ms = self
            .hsm
            .job_timeout_ms
            .unwrap_or(defaults::HSM_JOB_TIMEOUT_MS);
        if !(10..=600_000).contains(&job_timeout_ms) {
            return Err(invalid(
                "hsm.job_timeout_ms",
                "must be between 10 and 600000",
            ));
        }
        let residency = match self.hsm.dek_residency.as_deref().unwrap_or("memory") {
            "memory" => crate::backend::DekResidency::Memory,
            "hsm" => crate::backend::DekResidency::Hsm,
            _ => {
                return Err(invalid(
                    "hsm.dek_residency",
                    "must be \"memory\" or \"hsm\"",
                ))
            }
        };
        let resident_keys_per_session = self
            .hsm
            .resident_keys_per_session
            .unwrap_or(defaults::HSM_RESIDENT_KEYS_PER_SESSION);
        if !(1..=1_000_000).contains(&resident_keys_per_session) {
            return Err(invalid(
                "hsm.resident_keys_per_session",
                "must be between 1 and 1000000",
            ));
        }
        let hsm = HsmConfig {
            residency,
            resident_keys_per_session: resident_keys_per_session as usize,
            module,
            token_label,
            pin_file: self.hsm.pin_file.map(abs),
            kek_label,
            audit_key_label,
            binding_key_label,
            sessions: sessions as usize,
            limits: HsmLimits {
                queue_depth: queue_depth as usize,
                job_timeout: Duration::from_millis(job_timeout_ms),
            },
        };

        let backend = match self.store.backend.as_deref().unwrap_or("lmdb") {
            "lmdb" => {
                for (key, set) in [
                    ("store.url", self.store.url.is_some()),
                    ("store.password_file", self.store.password_file.is_some()),
                    ("store.ca_file", self.store.ca_file.is_some()),
                    ("store.pool_size", self.store.pool_size.is_some()),
                    ("store.timeout_secs", self.store.timeout_secs.is_some()),
                    ("store.coherence_ms", self.store.coherence_ms.is_some()),
                ] {
                    if set {
                        return Err(invalid(key, "is only for store.backend = \"postgres\""));
                    }
                }
                let map_size_mb = self.store.map_size_mb.unwrap_or(defaults::MAP_SIZE_MB);
                if !(1..=1 << 24).contains(&map_size_mb) {
                    return Err(invalid(
                        "store.map_size_mb",
                        "must be between 1 and 16777216",
                    ));
                }
                StoreBackend::Lmdb { map_size_mb }
            }
            "postgres" => {
                if self.store.map_size_mb.is_some() {
                    return Err(invalid(
                        "store.map_size_mb",
                        "is only for store.backend = \"lmdb\"",
                    ));
                }
                let url = self.store.url.clone().ok_or(ConfigError::Missing {
                    key: "store.url",
                    hint: " with store.backend = \"postgres\" (a libpq connection string)",
                })?;
                let pool_size = to_usize(
                    "store.pool_size",
                    self.store.pool_size.unwrap_or(defaults::PG_POOL_SIZE),
                )?;
                if !(1..=1024).contains(&pool_size) {
                    return Err(invalid("store.pool_size", "must be between 1 and 1024"));
                }
                let timeout_secs = self.store.timeout_secs.unwrap_or(defaults::PG_TIMEOUT_SECS);
                if !(1..=3600).contains(&timeout_secs) {
                    return Err(invalid("store.timeout_secs", "must be between 1 and 3600"));
                }
                let coherence_ms = self.store.coherence_ms.unwrap_or(defaults::PG_COHERENCE_MS);
                if !(50..=60_000).contains(&coherence_ms) {
                    return Err(invalid(
                        "store.coherence_ms",
                        "must be between 50 and 60000",
                    ));
                }
                StoreBackend::Postgres(PostgresConfig::new(
                    url,
                    self.store.password_file.clone().map(&abs),
                    self.store.ca_file.clone().map(&abs),
                    pool_size,
                    Duration::from_secs(timeout_secs),
                    Duration::from_millis(coherence_ms),
                )?)
            }
            other => {
                return Err(invalid(
                    "store.backend",
                    format!("{other:?} is not \"lmdb\" or \"postgres\""),
                ))
            }
        };
        let store = StoreConfig {
            path: store_path,
            backend,
        };

        let cache = CacheConfig {
            ttl: Duration::from_secs(self.cache.ttl_secs.unwrap_or(defaults::CACHE_TTL_SECS)),
            max_entries: to_usize(
                "cache.max_entries",
                self.cache
                    .max_entries
                    .unwrap_or(defaults::CACHE_MAX_ENTRIES),
            )?,
        };

        let max_body_bytes = self
            .limits
            .max_body_bytes
            .unwrap_or(defaults::MAX_BODY_BYTES);
        if !(1024..=1 << 30).contains(&max_body_bytes) {
            return Err(invalid(
                "limits.max_body_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        let read_timeout_secs = self
            .limits
            .read_timeout_secs
            .unwrap_or(defaults::READ_TIMEOUT_SECS);
        if !(1..=3600).contains(&read_timeout_secs) {
            return Err(invalid(
                "limits.read_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        let write_timeout_secs = self
            .limits
            .write_timeout_secs
            .unwrap_or(defaults::WRITE_TIMEOUT_SECS);
        if !(1..=3600).contains(&write_timeout_secs) {
            return Err(invalid(
                "limits.write_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        let shutdown_timeout_secs = self
            .limits
            .shutdown_timeout_secs
            .unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS);
        if shutdown_timeout_secs > 3600 {
            return Err(invalid(
                "limits.shutdown_timeout_secs",
                "must be at most 3600",
            ));
        }
        let max_connections = self
            .limits
            .max_connections
            .unwrap_or(defaults::MAX_CONNECTIONS);
        let max_connections_per_peer = self
            .limits
            .max_connections_per_peer
            .unwrap_or(defaults::MAX_CONNECTIONS_PER_PEER)
            .min(max_connections);
        if max_connections_per_peer == 0 {
            return Err(invalid(
                "limits.max_connections_per_peer",
                "must be at least 1",
            ));
        }
        if !(1..=1 << 20).contains(&max_connections) {
            return Err(invalid(
                "limits.max_connections",
                "must be between 1 and 1048576",
            ));
        }
        let rate = |key: &'static str, v: Option<u64>| -> Result<u32, ConfigError> {
            match v.unwrap_or(0) {
                n @ 0..=1_000_000 => Ok(n as u32),
                _ => Err(invalid(key, "must be between 0 and 1000000")),
            }
        };
        let peer_rate = service_kit::rate::RateLimit {
            per_sec: rate("limits.peer_rate_per_sec", self.limits.peer_rate_per_sec)?,
            burst: rate("limits.peer_rate_burst", self.limits.peer_rate_burst)?,
        };
        let peer_create_rate = service_kit::rate::RateLimit {
            per_sec: rate(
                "limits.peer_create_rate_per_sec",
                Some(self.limits.peer_create_rate_per_sec.unwrap_or(1000)),
            )?,
            burst: rate(
                "limits.peer_create_burst",
                Some(self.limits.peer_create_burst.unwrap_or(20_000)),
            )?,
        };
        let limits = LimitsConfig {
            peer_rate,
            peer_create_rate,
            max_body_bytes: to_usize("limits.max_body_bytes", max_body_bytes)?,
            read_timeout: Duration::from_secs(read_timeout_secs),
            write_timeout: Duration::from_secs(write_timeout_secs),
            shutdown_timeout: Duration::from_secs(shutdown_timeout_secs),
            max_connections: to_usize("limits.max_connections", max_connections)?,
            max_connections_per_peer: to_usize(
                "limits.max_connections_per_peer",
                max_connections_per_peer,
            )?,
        };

        let format = match self.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(invalid("log.format", "must be \"text\" or \"json\"")),
        };
        let level = self
            .log
            .level
            .unwrap_or_else(|| defaults::LOG_LEVEL.to_owned());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(invalid(
                "log.level",
                "must be a tracing filter such as \"info\" or \"progressdb_kms=debug\"",
            ));
        }

        let rewrap_concurrency = self
            .lifecycle
            .rewrap_concurrency
            .unwrap_or(defaults::REWRAP_CONCURRENCY);
        if !(1..=256).contains(&rewrap_concurrency) {
            return Err(invalid(
                "lifecycle.rewrap_concurrency",
                "must be between 1 and 256",
            ));
        }
        let rewrap_batch = self
            .lifecycle
            .rewrap_batch
            .unwrap_or(defaults::REWRAP_BATCH);
        if !(1..=10_000).contains(&rewrap_batch) {
            return Err(invalid(
                "lifecycle.rewrap_batch",
                "must be between 1 and 10000",
            ));
        }
        let lease_secs = self.lifecycle.lease_secs.unwrap_or(defaults::LEASE_SECS);
        if !(1..=600).contains(&lease_secs) {
            return Err(invalid(
                "lifecycle.lease_secs",
                "must be between 1 and 600 (seconds)",
            ));
        }
        let lifecycle = crate::lifecycle::LifecycleOptions {
            concurrency: rewrap_concurrency as usize,
            batch: rewrap_batch as usize,
            lease: Duration::from_secs(lease_secs),
            // Other replicas learn of a new KEK version through the change feed within
            // 2 × its poll period.
            settle: match &store.backend {
                StoreBackend::Lmdb { .. } => Duration::ZERO,
                StoreBackend::Postgres(pg) => 2 * pg.coherence,
            },
        };

        Ok(Config {
            source: source.to_owned(),
            listen,
            admin,
            lifecycle,
            hsm,
            store,
            cache,
            limits,
            log: LogConfig { format, level },
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

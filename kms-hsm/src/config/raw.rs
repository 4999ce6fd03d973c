//! The configuration as written ([`RawConfig`]): every key optional, unknown keys refused, so
//! that validation ([`RawConfig::validate`]) can name a missing or wrong key.

use std::path::PathBuf;

use serde::Deserialize;

/// The file as written, before validation. Every key is optional here so that a missing key is
/// reported by name by [`RawConfig::validate`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub hsm: RawHsm,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub lifecycle: RawLifecycle,
}

/// `[listen]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub unix: Option<PathBuf>,
    pub tcp: Option<String>,
    pub socket_access: Option<SocketAccess>,
    pub allowed_uids: Option<UidList>,
    pub admin_unix: Option<PathBuf>,
    pub admin_uids: Option<UidList>,
    pub single_user: Option<bool>,
}

/// `listen.socket_access`: who may open the client socket file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketAccess {
    /// Mode 0600: only the KMS's own user (and root).
    #[default]
    Owner,
    /// Mode 0660: also the members of the socket's group (the KMS's group, or the directory's
    /// with setgid), so the server can run as a user of its own. Requires
    /// `listen.allowed_uids`: group membership alone admits no one.
    Group,
}

impl SocketAccess {
    /// The socket file's mode.
    pub fn mode(self) -> u32 {
        match self {
            SocketAccess::Owner => 0o600,
            SocketAccess::Group => 0o660,
        }
    }
}

/// `listen.allowed_uids`: a TOML array of uids, or (from the environment) one uid or a
/// comma-separated list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UidList {
    One(u32),
    Many(Vec<u32>),
    Text(String),
}

/// `[tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub admin_subjects: Option<StringList>,
}

pub use service_kit::config::StringList;

/// `[lifecycle]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    pub rewrap_concurrency: Option<u32>,
    pub rewrap_batch: Option<u32>,
    pub lease_secs: Option<u64>,
}

/// `[hsm]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsm {
    pub module: Option<PathBuf>,
    pub token_label: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub kek_label: Option<String>,
    pub audit_key_label: Option<String>,
    pub binding_key_label: Option<String>,
    pub sessions: Option<u32>,
    pub queue_depth: Option<u32>,
    pub job_timeout_ms: Option<u64>,
    pub dek_residency: Option<String>,
    pub resident_keys_per_session: Option<u32>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub path: Option<PathBuf>,
    pub map_size_mb: Option<u64>,
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub pool_size: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub coherence_ms: Option<u64>,
}

/// `[cache]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub ttl_secs: Option<u64>,
    pub max_entries: Option<u64>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body_bytes: Option<u64>,
    pub read_timeout_secs: Option<u64>,
    pub write_timeout_secs: Option<u64>,
    pub shutdown_timeout_secs: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_connections_per_peer: Option<u64>,
    pub peer_rate_per_sec: Option<u64>,
    pub peer_rate_burst: Option<u64>,
    pub peer_create_rate_per_sec: Option<u64>,
    pub peer_create_burst: Option<u64>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

//! The sections of the server's config file with their defaults: `[http]`, `[store]`,
//! `[auth]`, `[encryption]`, `[kms]`, `[limits]`.

use super::*;

/// Who may read `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAccess {
    /// An admin API key is required (the default).
    Admin,
    /// No key needed; expose the listener only on a trusted network.
    Public,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:8080` (port 0 picks a free port).
    pub listen: SocketAddr,
    /// A client must send its request headers within this time.
    pub header_read_timeout_secs: u64,
    /// A client must send its request body within this time (408 otherwise).
    pub body_read_timeout_secs: u64,
    /// A connection whose client reads nothing of its answer for this long is closed.
    pub write_timeout_secs: u64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace_secs: u64,
    /// Connections served at once; one more is answered 503 `overloaded` at once.
    pub max_connections: usize,
    /// Connections served at once from one client IP address (0: `max_connections`). Leave
    /// it at 0 behind a load balancer, where every connection comes from its address.
    pub max_connections_per_peer: usize,
    pub metrics_access: MetricsAccess,
    /// Browser origins (`https://app.example.com`) whose pages may call the API (CORS), or
    /// `"*"` for any. Empty (the default): no CORS headers, and browsers refuse cross-origin
    /// calls. Preflight requests of a listed origin are answered before authentication.
    #[serde(deserialize_with = "service_kit::config::string_list")]
    pub cors_allowed_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            write_timeout_secs: 30,
            shutdown_grace_secs: 30,
            max_connections: 4096,
            max_connections_per_peer: 0,
            metrics_access: MetricsAccess::Admin,
            cors_allowed_origins: Vec::new(),
        }
    }
}

/// `store.backend`: where the messages live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackendKind {
    /// LMDB files in `store.path` (the default).
    #[default]
    Lmdb,
    /// A PostgreSQL database (`store.url`).
    Postgres,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: StoreBackendKind,
    /// LMDB directory (created if missing); with `backend = "lmdb"`.
    #[serde(default)]
    pub path: PathBuf,
    /// With `backend = "postgres"`: the libpq connection string, holding no password.
    #[serde(default)]
    pub url: Option<String>,
    /// The database password (mode 0600), else `PGPASSWORD`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The CA that verifies the database's TLS certificate (required over TCP unless the
    /// database is on this host and the URL says `sslmode=disable`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Most connections to the database.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Connecting, waiting for a connection, and each statement.
    #[serde(default = "default_store_timeout_secs")]
    pub timeout_secs: u64,
    /// Initial LMDB map size in MiB.
    #[serde(default = "default_map_size_mb")]
    pub map_size_mb: u64,
    /// The map grows (doubling) up to this many MiB; beyond it writes answer 507.
    #[serde(default = "default_max_map_size_mb")]
    pub max_map_size_mb: u64,
    /// Most writes committed together by one group commit.
    #[serde(default = "default_max_batch_ops")]
    pub max_batch_ops: usize,
}

pub(super) fn default_map_size_mb() -> u64 {
    1024
}
pub(super) fn default_max_map_size_mb() -> u64 {
    64 * 1024
}
pub(super) fn default_max_batch_ops() -> usize {
    1024
}
pub(super) fn default_pool_size() -> usize {
    16
}
pub(super) fn default_store_timeout_secs() -> u64 {
    5
}

impl StoreConfig {
    /// With `backend = "postgres"`, where the database is and how to reach it.
    ///
    /// # Errors
    /// [`InvalidPostgresConfig`](service_kit::postgres::InvalidPostgresConfig) naming the key.
    pub fn postgres(
        &self,
    ) -> Result<
        Option<service_kit::postgres::PostgresConfig>,
        service_kit::postgres::InvalidPostgresConfig,
    > {
        if self.backend != StoreBackendKind::Postgres {
            return Ok(None);
        }
        let Some(url) = self.url.clone() else {
            return Err(service_kit::postgres::InvalidPostgresConfig {
                key: "store.url",
                reason: "is required with store.backend = \"postgres\"".into(),
            });
        };
        service_kit::postgres::PostgresConfig::new(
            url,
            self.password_file.clone(),
            self.ca_file.clone(),
            self.pool_size,
            std::time::Duration::from_secs(self.timeout_secs),
            std::time::Duration::from_millis(500),
        )
        .map(Some)
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file (mode 0600): `admin = [..]`, `backend = [..]`, `frontend = [..]`,
    /// `signing_secret = ".."`.
    pub keys_file: PathBuf,
    /// Accept only expiring user signatures (plain ones never expire and are bearer
    /// credentials forever). Off when absent, for configurations written before it; on in
    /// the reference configuration and `dev.sh`.
    #[serde(default)]
    pub require_expiring_signatures: bool,
    /// The longest lifetime of an expiring signature, in seconds (60 to 604800; default
    /// 43200, 12 hours): `POST /v1/sign` grants no more, and a signature expiring further
    /// away is refused.
    #[serde(default = "default_max_signature_ttl_secs")]
    pub max_signature_ttl_secs: u64,
}

pub(super) fn default_max_signature_ttl_secs() -> u64 {
    crate::auth::DEFAULT_SIGNATURE_TTL_SECS
}

impl AuthConfig {
    /// The signature policy this section sets.
    pub fn signature_policy(&self) -> crate::auth::SignaturePolicy {
        crate::auth::SignaturePolicy {
            forms: if self.require_expiring_signatures {
                crate::auth::SignatureForms::ExpiringOnly
            } else {
                crate::auth::SignatureForms::PlainAndExpiring
            },
            max_ttl_secs: self.max_signature_ttl_secs,
        }
    }
}

/// `[encryption]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Encrypt message content through the KMS (default). When false, new content is stored
    /// in plain form, marked as such.
    pub enabled: bool,
    /// Rotate a thread's DEK once it has sealed more messages than this (default 2^30, far
    /// below AES-GCM's 2^32 random-nonce bound).
    pub rotate_after_messages: u64,
    /// Rotate a thread's DEK once it is older than this many days (0 = never, the default).
    pub rotate_after_days: u64,
    /// Automatic rotations start only while fewer than this many server jobs run in this
    /// process (default 4; 1 to 1024); the next post to a thread past the policy retries.
    pub max_concurrent_rotations: usize,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rotate_after_messages: 1 << 30,
            rotate_after_days: 0,
            max_concurrent_rotations: 4,
        }
    }
}

/// Which key provider the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KmsMode {
    /// The `progressdb-kms` process, over a Unix socket or HTTPS with mutual TLS.
    External,
    /// In-process provider with a software master key: only in builds with the
    /// `dev-embedded` feature.
    Embedded,
}

/// `[kms]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    pub mode: KmsMode,
    /// `unix:///path/kms.sock` or `https://host:port`.
    pub endpoint: Option<String>,
    /// Several replicas of one KMS (instead of `endpoint`): calls are spread over them and a
    /// failed one is retried on another.
    pub endpoints: Option<Vec<String>>,
    /// How often each replica's `/readyz` is probed in the background (with `endpoints`).
    pub health_interval_ms: u64,
    /// PEM client certificate for `https://` endpoints.
    pub client_cert: Option<PathBuf>,
    /// PEM private key (mode 0600) for `https://` endpoints.
    pub client_key: Option<PathBuf>,
    /// PEM CA certificate that signed the KMS's server certificate.
    pub ca: Option<PathBuf>,
    /// For a `unix://` endpoint: the uid the KMS runs as; a socket served by another uid is
    /// refused (checked with `SO_PEERCRED` on each connection).
    pub peer_uid: Option<u32>,
    /// 32-byte master key, base64 or hex, mode 0600. `embedded` mode; in `external` mode (dev
    /// builds only) it enables the local read fallback for threads it wrapped.
    pub master_key_file: Option<PathBuf>,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// Retries of a failed KMS call (transport errors and 503), with backoff.
    pub max_retries: u32,
    /// The most a user request waits for the KMS, all retries included: past it, 503
    /// `kms_unavailable`.
    pub deadline_ms: u64,
    /// Consecutive failed KMS calls after which calls fail at once (circuit open); 0 never.
    pub breaker_failures: u32,
    /// How long an open circuit fails calls at once before one probe is let through.
    pub breaker_cooldown_ms: u64,
    /// Most items in one coalesced encrypt/decrypt batch.
    pub max_batch_items: usize,
    /// Largest body of one batch request to the KMS, in bytes. Keep it at or below the KMS's
    /// `limits.max_body_bytes` (4 MiB by default); default 3 MiB.
    pub max_batch_bytes: usize,
    /// Coalesced batches in flight at once, per operation.
    pub max_inflight_batches: usize,
    /// `/readyz` gives the KMS this long to answer.
    pub ready_timeout_ms: u64,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            mode: KmsMode::External,
            endpoint: None,
            endpoints: None,
            health_interval_ms: 1000,
            client_cert: None,
            client_key: None,
            ca: None,
            peer_uid: None,
            master_key_file: None,
            connect_timeout_ms: 2000,
            request_timeout_ms: 10_000,
            max_retries: 2,
            deadline_ms: 5000,
            breaker_failures: 5,
            breaker_cooldown_ms: 2000,
            max_batch_items: 256,
            max_batch_bytes: 3 << 20,
            max_inflight_batches: 4,
            ready_timeout_ms: 2000,
        }
    }
}

impl KmsConfig {
    /// The KMS's endpoints: `kms.endpoint`, or every one of `kms.endpoints` (empty when
    /// neither is set).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key: both keys set, an empty or repeated list, or
    /// an endpoint that does not parse.
    pub fn parsed_endpoints(&self) -> Result<Vec<Endpoint>, ConfigError> {
        let parse = |key: &'static str, e: &str| {
            e.parse::<Endpoint>()
                .map_err(|err| ConfigError::invalid(key, err.to_string()))
        };
        match (&self.endpoint, &self.endpoints) {
            (Some(_), Some(_)) => Err(ConfigError::invalid(
                "kms.endpoints",
                "set kms.endpoint (one KMS) or kms.endpoints (replicas), not both",
            )),
            (Some(e), None) => Ok(vec![parse("kms.endpoint", e)?]),
            (None, Some(list)) => {
                if list.is_empty() {
                    return Err(ConfigError::invalid(
                        "kms.endpoints",
                        "must list at least one endpoint",
                    ));
                }
                let parsed = list
                    .iter()
                    .map(|e| parse("kms.endpoints", e))
                    .collect::<Result<Vec<_>, _>>()?;
                for (i, e) in parsed.iter().enumerate() {
                    if parsed[..i].contains(e) {
                        return Err(ConfigError::invalid(
                            "kms.endpoints",
                            format!("{e} is listed twice"),
                        ));
                    }
                }
                Ok(parsed)
            }
            (None, None) => Ok(Vec::new()),
        }
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(self.ready_timeout_ms)
    }
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
    pub fn breaker_cooldown(&self) -> Duration {
        Duration::from_millis(self.breaker_cooldown_ms)
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Page size when `limit` is not given (capped at `max_page_size`).
    pub default_page_size: usize,
    /// Largest accepted `limit`.
    pub max_page_size: usize,
    /// Stored bytes of messages one page holds at most (a page stops early, with a cursor).
    pub max_page_bytes: usize,
    /// Longest thread title in bytes.
    pub max_title_bytes: usize,
    /// Largest thread metadata, as JSON text.
    pub max_metadata_bytes: usize,
    /// Deepest nesting of thread metadata.
    pub max_metadata_depth: usize,
    /// Thread metadata records kept in memory.
    pub thread_cache_entries: usize,
    /// Bytes of thread records kept in memory (estimated, parsed metadata counted at 16x its
    /// text).
    pub thread_cache_bytes: usize,
    /// Requests a second per API key, counted per user for callers that act for one (every
    /// browser shares the frontend key); 0: no limit.
    pub key_rate_per_sec: u32,
    /// Burst per API key and user (0: `key_rate_per_sec`).
    pub key_rate_burst: u32,
    /// Threads one user may have (0: no limit).
    pub max_threads_per_user: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 256 * 1024,
            default_page_size: 50,
            max_page_size: 500,
            max_page_bytes: 4 << 20,
            max_title_bytes: 512,
            max_metadata_bytes: 4096,
            max_metadata_depth: 16,
            thread_cache_entries: 10_000,
            thread_cache_bytes: 64 << 20,
            key_rate_per_sec: 0,
            key_rate_burst: 0,
            max_threads_per_user: 10_000,
        }
    }
}

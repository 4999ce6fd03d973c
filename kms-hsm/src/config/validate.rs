//! Validation: the raw file checked key by key and turned into the typed [`Config`]; every
//! error names the key at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_api::KekId;

use crate::backend::HsmLimits;

use super::*;

impl RawConfig {
    /// Checks every key and builds the typed [`Config`]. `base` is the directory relative
    /// paths are resolved against. Each section is checked by a function of its own below.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key at fault.
    pub fn validate(self, source: &Path, base: &Path) -> Result<Config, ConfigError> {
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        // The admin endpoint's keys of `[listen]` are checked apart from the client's.
        let mut raw_listen = self.listen;
        let raw_admin = RawListen {
            admin_unix: raw_listen.admin_unix.take(),
            admin_uids: raw_listen.admin_uids.take(),
            single_user: raw_listen.single_user.take(),
            ..RawListen::default()
        };
        let listen = listen(raw_listen, self.tls, &abs)?;
        let store_path = abs(self.store.path.clone().ok_or(ConfigError::Missing {
            key: "store.path",
            hint: " (directory of the key store)",
        })?);
        let admin = admin(raw_admin, &listen, &store_path, &abs)?;
        let hsm = hsm(self.hsm, &abs)?;
        let store = store(self.store, store_path, &abs)?;
        let lifecycle = lifecycle(self.lifecycle, &store.backend)?;
        Ok(Config {
            source: source.to_owned(),
            listen,
            admin,
            lifecycle,
            hsm,
            store,
            cache: cache(self.cache)?,
            limits: limits(self.limits)?,
            log: log(self.log)?,
        })
    }
}

/// `[listen]` (the client endpoint) and `[tls]`.
fn listen(
    listen: RawListen,
    tls: RawTls,
    abs: &impl Fn(PathBuf) -> PathBuf,
) -> Result<ListenConfig, ConfigError> {
    Ok(match (listen.unix, listen.tcp) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Conflict(
                "set exactly one of listen.unix and listen.tcp, not both",
            ))
        }
        (None, None) => return Err(ConfigError::Conflict(
            "set exactly one of listen.unix (socket path) and listen.tcp (host:port, mutual TLS)",
        )),
        (Some(path), None) => {
            if path.as_os_str().is_empty() {
                return Err(invalid("listen.unix", "must be a socket path"));
            }
            if tls.cert.is_some()
                || tls.key.is_some()
                || tls.client_ca.is_some()
                || tls.admin_subjects.is_some()
            {
                return Err(ConfigError::Conflict(
                    "tls.* is used only with listen.tcp; remove it or listen on TCP",
                ));
            }
            let allowed_uids = listen
                .allowed_uids
                .map(|u| u.into_vec("listen.allowed_uids"))
                .transpose()?;
            let access = listen.socket_access.unwrap_or_default();
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
            if listen.allowed_uids.is_some() || listen.socket_access.is_some() {
                return Err(ConfigError::Conflict(
                    "listen.allowed_uids and listen.socket_access apply only to listen.unix",
                ));
            }
            let addr: SocketAddr = tcp.trim().parse().map_err(|_| {
                invalid(
                    "listen.tcp",
                    "must be an IP address and port, e.g. 127.0.0.1:7443",
                )
            })?;
            let tls = match (tls.cert, tls.key, tls.client_ca) {
                    (Some(cert), Some(key), Some(client_ca)) => TlsConfig {
                        cert: abs(cert),
                        key: abs(key),
                        client_ca: abs(client_ca),
                        admin_subjects: tls
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
    })
}

/// The admin endpoint (`listen.admin_unix`, `listen.admin_uids`, `listen.single_user`),
/// which must not be reachable by the clients' identity.
fn admin(
    raw: RawListen,
    listen: &ListenConfig,
    store_path: &Path,
    abs: &impl Fn(PathBuf) -> PathBuf,
) -> Result<AdminConfig, ConfigError> {
    let admin_unix = match (raw.admin_unix, listen) {
        (Some(p), _) if p.as_os_str().is_empty() => {
            return Err(invalid("listen.admin_unix", "must be a socket path"))
        }
        (Some(p), _) => abs(p),
        (None, ListenConfig::Unix { path, .. }) => default_admin_socket(path),
        (None, ListenConfig::Tcp { .. }) => store_path.join("kms.admin.sock"),
    };
    if let ListenConfig::Unix { path, .. } = listen {
        if *path == admin_unix {
            return Err(ConfigError::Conflict(
                "listen.admin_unix must differ from listen.unix",
            ));
        }
    }
    let users = match raw.single_user {
        Some(true) => Users::SingleUser,
        Some(false) | None => Users::Separate,
    };
    let me = rustix::process::geteuid().as_raw();
    let (admin_uids, admin_key) = match raw.admin_uids {
        Some(u) => (u.into_vec("listen.admin_uids")?, "listen.admin_uids"),
        None => (vec![me], "listen.admin_uids (unset: the KMS's own uid)"),
    };
    if users == Users::Separate {
        // Who can reach the client socket: the allow-list, or, without one, the socket
        // file's owner (the KMS's uid) and root, who passes any file mode.
        let (clients, clients_key) = match listen {
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
    Ok(AdminConfig {
        unix: admin_unix,
        uids: admin_uids,
        users,
    })
}

/// `[hsm]`.
fn hsm(hsm: RawHsm, abs: &impl Fn(PathBuf) -> PathBuf) -> Result<HsmConfig, ConfigError> {
    let module = hsm.module.ok_or(ConfigError::Missing {
        key: "hsm.module",
        hint: " (path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so)",
    })?;
    let token_label = hsm.token_label.ok_or(ConfigError::Missing {
        key: "hsm.token_label",
        hint: "",
    })?;
    if token_label.is_empty() || token_label.len() > 32 {
        return Err(invalid("hsm.token_label", "must be 1 to 32 characters"));
    }
    let kek_label = hsm.kek_label.ok_or(ConfigError::Missing {
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
    let audit_key_label = hmac_label("hsm.audit_key_label", hsm.audit_key_label, "audit")?;
    let binding_key_label = hmac_label("hsm.binding_key_label", hsm.binding_key_label, "binding")?;
    if binding_key_label == audit_key_label {
        return Err(invalid(
            "hsm.binding_key_label",
            "must differ from hsm.audit_key_label (each key has one use)",
        ));
    }
    let sessions = hsm.sessions.unwrap_or(defaults::HSM_SESSIONS);
    if !(1..=64).contains(&sessions) {
        return Err(invalid("hsm.sessions", "must be between 1 and 64"));
    }
    let queue_depth = hsm.queue_depth.unwrap_or(defaults::HSM_QUEUE_DEPTH);
    if !(1..=65_536).contains(&queue_depth) {
        return Err(invalid("hsm.queue_depth", "must be between 1 and 65536"));
    }
    let job_timeout_ms = hsm.job_timeout_ms.unwrap_or(defaults::HSM_JOB_TIMEOUT_MS);
    if !(10..=600_000).contains(&job_timeout_ms) {
        return Err(invalid(
            "hsm.job_timeout_ms",
            "must be between 10 and 600000",
        ));
    }
    let residency = match hsm.dek_residency.as_deref().unwrap_or("memory") {
        "memory" => crate::backend::DekResidency::Memory,
        "hsm" => crate::backend::DekResidency::Hsm,
        _ => {
            return Err(invalid(
                "hsm.dek_residency",
                "must be \"memory\" or \"hsm\"",
            ))
        }
    };
    let resident_keys_per_session = hsm
        .resident_keys_per_session
        .unwrap_or(defaults::HSM_RESIDENT_KEYS_PER_SESSION);
    if !(1..=1_000_000).contains(&resident_keys_per_session) {
        return Err(invalid(
            "hsm.resident_keys_per_session",
            "must be between 1 and 1000000",
        ));
    }
    Ok(HsmConfig {
        residency,
        resident_keys_per_session: resident_keys_per_session as usize,
        module,
        token_label,
        pin_file: hsm.pin_file.map(abs),
        kek_label,
        audit_key_label,
        binding_key_label,
        sessions: sessions as usize,
        limits: HsmLimits {
            queue_depth: queue_depth as usize,
            job_timeout: Duration::from_millis(job_timeout_ms),
        },
    })
}

/// `[store]`: LMDB or PostgreSQL, and only the keys of the chosen backend.
fn store(
    store: RawStore,
    store_path: PathBuf,
    abs: &impl Fn(PathBuf) -> PathBuf,
) -> Result<StoreConfig, ConfigError> {
    let backend = match store.backend.as_deref().unwrap_or("lmdb") {
        "lmdb" => {
            for (key, set) in [
                ("store.url", store.url.is_some()),
                ("store.password_file", store.password_file.is_some()),
                ("store.ca_file", store.ca_file.is_some()),
                ("store.pool_size", store.pool_size.is_some()),
                ("store.timeout_secs", store.timeout_secs.is_some()),
                ("store.coherence_ms", store.coherence_ms.is_some()),
            ] {
                if set {
                    return Err(invalid(key, "is only for store.backend = \"postgres\""));
                }
            }
            let map_size_mb = store.map_size_mb.unwrap_or(defaults::MAP_SIZE_MB);
            if !(1..=1 << 24).contains(&map_size_mb) {
                return Err(invalid(
                    "store.map_size_mb",
                    "must be between 1 and 16777216",
                ));
            }
            StoreBackend::Lmdb { map_size_mb }
        }
        "postgres" => {
            if store.map_size_mb.is_some() {
                return Err(invalid(
                    "store.map_size_mb",
                    "is only for store.backend = \"lmdb\"",
                ));
            }
            let url = store.url.clone().ok_or(ConfigError::Missing {
                key: "store.url",
                hint: " with store.backend = \"postgres\" (a libpq connection string)",
            })?;
            let pool_size = to_usize(
                "store.pool_size",
                store.pool_size.unwrap_or(defaults::PG_POOL_SIZE),
            )?;
            if !(1..=1024).contains(&pool_size) {
                return Err(invalid("store.pool_size", "must be between 1 and 1024"));
            }
            let timeout_secs = store.timeout_secs.unwrap_or(defaults::PG_TIMEOUT_SECS);
            if !(1..=3600).contains(&timeout_secs) {
                return Err(invalid("store.timeout_secs", "must be between 1 and 3600"));
            }
            let coherence_ms = store.coherence_ms.unwrap_or(defaults::PG_COHERENCE_MS);
            if !(50..=60_000).contains(&coherence_ms) {
                return Err(invalid(
                    "store.coherence_ms",
                    "must be between 50 and 60000",
                ));
            }
            StoreBackend::Postgres(PostgresConfig::new(
                url,
                store.password_file.clone().map(&abs),
                store.ca_file.clone().map(&abs),
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
    Ok(StoreConfig {
        path: store_path,
        backend,
    })
}

/// `[cache]`.
fn cache(cache: RawCache) -> Result<CacheConfig, ConfigError> {
    Ok(CacheConfig {
        ttl: Duration::from_secs(cache.ttl_secs.unwrap_or(defaults::CACHE_TTL_SECS)),
        max_entries: to_usize(
            "cache.max_entries",
            cache.max_entries.unwrap_or(defaults::CACHE_MAX_ENTRIES),
        )?,
    })
}

/// `[limits]`.
fn limits(limits: RawLimits) -> Result<LimitsConfig, ConfigError> {
    let max_body_bytes = limits.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES);
    if !(1024..=1 << 30).contains(&max_body_bytes) {
        return Err(invalid(
            "limits.max_body_bytes",
            "must be between 1024 and 1073741824",
        ));
    }
    let read_timeout_secs = limits
        .read_timeout_secs
        .unwrap_or(defaults::READ_TIMEOUT_SECS);
    if !(1..=3600).contains(&read_timeout_secs) {
        return Err(invalid(
            "limits.read_timeout_secs",
            "must be between 1 and 3600",
        ));
    }
    let write_timeout_secs = limits
        .write_timeout_secs
        .unwrap_or(defaults::WRITE_TIMEOUT_SECS);
    if !(1..=3600).contains(&write_timeout_secs) {
        return Err(invalid(
            "limits.write_timeout_secs",
            "must be between 1 and 3600",
        ));
    }
    let shutdown_timeout_secs = limits
        .shutdown_timeout_secs
        .unwrap_or(defaults::SHUTDOWN_TIMEOUT_SECS);
    if shutdown_timeout_secs > 3600 {
        return Err(invalid(
            "limits.shutdown_timeout_secs",
            "must be at most 3600",
        ));
    }
    let max_connections = limits.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
    let max_connections_per_peer = limits
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
        per_sec: rate("limits.peer_rate_per_sec", limits.peer_rate_per_sec)?,
        burst: rate("limits.peer_rate_burst", limits.peer_rate_burst)?,
    };
    let peer_create_rate = service_kit::rate::RateLimit {
        per_sec: rate(
            "limits.peer_create_rate_per_sec",
            Some(limits.peer_create_rate_per_sec.unwrap_or(1000)),
        )?,
        burst: rate(
            "limits.peer_create_burst",
            Some(limits.peer_create_burst.unwrap_or(20_000)),
        )?,
    };
    Ok(LimitsConfig {
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
    })
}

/// `[log]`.
fn log(log: RawLog) -> Result<LogConfig, ConfigError> {
    let format = match log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        _ => return Err(invalid("log.format", "must be \"text\" or \"json\"")),
    };
    let level = log.level.unwrap_or_else(|| defaults::LOG_LEVEL.to_owned());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(invalid(
            "log.level",
            "must be a tracing filter such as \"info\" or \"progressdb_kms=debug\"",
        ));
    }
    Ok(LogConfig { format, level })
}

/// `[lifecycle]`; its settle time follows the store backend's coherence.
fn lifecycle(
    lifecycle: RawLifecycle,
    backend: &StoreBackend,
) -> Result<crate::lifecycle::LifecycleOptions, ConfigError> {
    let rewrap_concurrency = lifecycle
        .rewrap_concurrency
        .unwrap_or(defaults::REWRAP_CONCURRENCY);
    if !(1..=256).contains(&rewrap_concurrency) {
        return Err(invalid(
            "lifecycle.rewrap_concurrency",
            "must be between 1 and 256",
        ));
    }
    let rewrap_batch = lifecycle.rewrap_batch.unwrap_or(defaults::REWRAP_BATCH);
    if !(1..=10_000).contains(&rewrap_batch) {
        return Err(invalid(
            "lifecycle.rewrap_batch",
            "must be between 1 and 10000",
        ));
    }
    let lease_secs = lifecycle.lease_secs.unwrap_or(defaults::LEASE_SECS);
    if !(1..=600).contains(&lease_secs) {
        return Err(invalid(
            "lifecycle.lease_secs",
            "must be between 1 and 600 (seconds)",
        ));
    }
    Ok(crate::lifecycle::LifecycleOptions {
        concurrency: rewrap_concurrency as usize,
        batch: rewrap_batch as usize,
        lease: Duration::from_secs(lease_secs),
        // Other replicas learn of a new KEK version through the change feed within
        // 2 × its poll period.
        settle: match backend {
            StoreBackend::Lmdb { .. } => Duration::ZERO,
            StoreBackend::Postgres(pg) => 2 * pg.coherence,
        },
    })
}

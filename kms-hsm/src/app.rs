//! Wiring: build the KMS from its [`Config`] (metrics → key store → HSM backend → service →
//! HTTP API), then [`Server::run`] it on a [`Listener`] until a shutdown future completes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::pkcs11::{self, InitKekOutcome, Pkcs11Backend};
use crate::backend::{BackendError, KeyBackend};
use crate::cache::DekCache;
use crate::config::{Config, ConfigError, StoreBackend};
use crate::http::{Api, HttpLimits};
use crate::keystore::lmdb::LmdbStore;
use crate::keystore::postgres::PostgresStore;
use crate::keystore::AnyStore;
use crate::keystore::{KeyStore, StoreError};
use crate::metrics::{BackendStats, Metrics};
use crate::service::KeyService;
use crate::transport::{self, Listener, ServeOptions, TransportError};
use service_kit::conn::{ConnectionGate, ConnectionLimits};

/// Why the KMS could not start (or stopped with an error). Each message is one line naming
/// the key, file or component at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("hsm: {0}")]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("start-up task failed: {0}")]
    Task(String),
    #[error("kek: {0}")]
    KekPin(#[from] crate::kek_pin::PinError),
}

/// A built KMS, ready to serve.
pub struct Server<B, S> {
    api: Arc<Api<B, S>>,
    serve: ServeOptions,
    gate: Arc<ConnectionGate>,
    cache_ttl: Duration,
    /// With a shared store: how often the change feed is polled ([`crate::coherence`]).
    coherence: Option<Duration>,
}

impl<B, S> std::fmt::Debug for Server<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("serve", &self.serve)
            .finish_non_exhaustive()
    }
}

impl Server<Pkcs11Backend, AnyStore> {
    /// Opens the key store and the HSM (on a blocking thread) as configured.
    ///
    /// # Errors
    /// [`StartError`] naming what is wrong (PIN file, token, KEK, store directory...).
    pub async fn build(cfg: &Config) -> Result<Self, StartError> {
        let settings = cfg.hsm_settings()?;
        tracing::info!(
            module = %settings.module.display(),
            token_label = %settings.token_label,
            kek_label = %settings.kek_label,
            sessions = settings.sessions,
            "opening HSM"
        );
        let token = settings.token_label.clone();
        let opened = tokio::task::spawn_blocking(move || {
            // A token provisioned before the audit log (or the AesKwV3 binding) existed gets
            // its key now.
            for role in pkcs11::ensure_hmac_keys(&settings)? {
                tracing::info!(%role, "created an HMAC key in the HSM");
            }
            Pkcs11Backend::open(settings)
        })
        .await
        .map_err(|e| StartError::Task(e.to_string()))?;
        let backend = match opened {
            Ok(b) => b,
            Err(e @ BackendError::PinRejected(_)) => {
                // The HSM that makes the audit MACs refused us: the event waits, pending,
                // for the next start that can chain it.
                record_pin_rejected(cfg, &token).await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let kek = backend.current_kek();
        tracing::info!(kek_id = %kek.id, kek_version = %kek.version, "HSM ready");
        Self::with_backend(cfg, Arc::new(backend)).await
    }
}

/// Opens the key store `cfg.store` names.
///
/// # Errors
/// [`crate::keystore::StoreError::Open`] naming the store and what failed.
pub async fn open_store(
    cfg: &Config,
    metrics: crate::metrics::StoreMetrics,
) -> Result<AnyStore, crate::keystore::StoreError> {
    Ok(match &cfg.store.backend {
        StoreBackend::Lmdb { map_size_mb } => {
            AnyStore::Lmdb(LmdbStore::open(&cfg.store.path, *map_size_mb, metrics)?)
        }
        StoreBackend::Postgres(pg) => AnyStore::Postgres(PostgresStore::open(pg, metrics).await?),
    })
}

/// Opens one side of `store copy` (`spec`), with the connection settings of `cfg`'s
/// `[store]` for a PostgreSQL side (password file, CA file, timeout) when it has them, else
/// `PGPASSWORD` and no TLS. An LMDB source must exist.
///
/// # Errors
/// [`StoreError::Open`] naming the store.
pub async fn open_copy_side(
    cfg: &Config,
    spec: &crate::storecopy::StoreSpec,
    side: CopySide,
) -> Result<AnyStore, StoreError> {
    use crate::storecopy::StoreSpec;
    let metrics = crate::metrics::StoreMetrics::default();
    match spec {
        StoreSpec::Lmdb(path) => {
            if side == CopySide::Source && !path.join("data.mdb").exists() {
                return Err(StoreError::Open {
                    target: path.display().to_string(),
                    detail: "no LMDB key store here".into(),
                });
            }
            let map_size_mb = match &cfg.store.backend {
                StoreBackend::Lmdb { map_size_mb } => *map_size_mb,
                StoreBackend::Postgres(_) => crate::config::defaults::MAP_SIZE_MB,
            };
            Ok(AnyStore::Lmdb(LmdbStore::open(path, map_size_mb, metrics)?))
        }
        StoreSpec::Postgres(url) => {
            let (password_file, ca_file, timeout) = match &cfg.store.backend {
                StoreBackend::Postgres(pg) => {
                    (pg.password_file.clone(), pg.ca_file.clone(), pg.timeout)
                }
                StoreBackend::Lmdb { .. } => (
                    None,
                    None,
                    Duration::from_secs(crate::config::defaults::PG_TIMEOUT_SECS),
                ),
            };
            let pg = crate::config::PostgresConfig::new(
                url.clone(),
                password_file,
                ca_file,
                4,
                timeout,
                Duration::from_millis(crate::config::defaults::PG_COHERENCE_MS),
            )
            .map_err(|e| StoreError::Open {
                target: "postgres".into(),
                detail: e.to_string(),
            })?;
            Ok(AnyStore::Postgres(PostgresStore::open(&pg, metrics).await?))
        }
    }
}

/// Which side of `store copy` a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopySide {
    Source,
    Target,
}

impl<B: KeyBackend + BackendStats> Server<B, AnyStore> {
    /// Builds the KMS around an already opened backend.
    ///
    /// # Errors
    /// [`StartError::Store`] when the key store cannot be opened.
    pub async fn with_backend(cfg: &Config, backend: Arc<B>) -> Result<Self, StartError> {
        let gate = ConnectionGate::new(ConnectionLimits {
            max_connections: cfg.limits.max_connections,
            max_per_peer: cfg.limits.max_connections_per_peer,
        });
        let metrics = Arc::new(Metrics::new(backend.clone(), gate.clone()));
        let store = open_store(cfg, metrics.store.clone()).await?;
        crate::kek_pin::check(&store, &backend.current_kek()).await?;
        let cache = DekCache::new(cfg.cache.ttl, cfg.cache.max_entries, metrics.cache.clone());
        let coherence = match &cfg.store.backend {
            StoreBackend::Lmdb { .. } => None,
            StoreBackend::Postgres(pg) => {
                // Other replicas write the same store: nothing is cached until the change
                // feed has been read once.
                cache.valid_until(std::time::Instant::now());
                Some(pg.coherence)
            }
        };
        let service = Arc::new(KeyService::new(backend, store, cache));
        let api = Arc::new(Api::new(
            service,
            metrics,
            HttpLimits {
                max_body_bytes: cfg.limits.max_body_bytes,
                body_read_timeout: cfg.limits.read_timeout,
                peer_rate: cfg.limits.peer_rate,
                peer_create_rate: cfg.limits.peer_create_rate,
            },
            cfg.lifecycle,
        ));
        Ok(Self {
            api,
            serve: ServeOptions {
                read_timeout: cfg.limits.read_timeout,
                write_timeout: cfg.limits.write_timeout,
                shutdown_timeout: cfg.limits.shutdown_timeout,
            },
            cache_ttl: cfg.cache.ttl,
            gate,
            coherence,
        })
    }
}

impl<B: KeyBackend, S: KeyStore> Server<B, S> {
    pub fn api(&self) -> &Arc<Api<B, S>> {
        &self.api
    }

    /// Serves the key API on `listener` and the admin API on `admin` until `shutdown`
    /// completes, then finishes in-flight requests. Unfinished lifecycle jobs resume first.
    ///
    /// # Errors
    /// [`StartError::Transport`].
    pub async fn run(
        self,
        listener: Listener,
        admin: Option<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        // Expired DEKs are dropped (and zeroized) even when no request touches them.
        let period = self
            .cache_ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let svc = self.api.service().clone();
        let coherence = self
            .coherence
            .map(|every| tokio::spawn(crate::coherence::run(svc.clone(), every)));
        let purger = svc.clone();
        let purge = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                purger.cache().purge_expired();
            }
        });
        // Events recorded while the HSM could not MAC them are chained now.
        match svc.store().pending_audits(1).await {
            Ok(p) if !p.is_empty() => {
                let ev = crate::audit::AuditEvent::new("audit.pending_chained");
                if let Err(e) = svc.audit(ev).await {
                    tracing::error!(error = %e, "cannot chain the pending audit entries yet");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the pending audit entries"),
        }
        // A PIN refused while running (the HSM cannot MAC then) becomes a pending entry.
        let watched = svc.clone();
        let pin_watch = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if watched.backend().state() == crate::backend::BackendState::PinRejected {
                    let entry = crate::audit::pending_entry(
                        crate::audit::AuditEvent::new("hsm.pin_rejected")
                            .outcome(crate::audit::Outcome::Failed)
                            .with("when", "running"),
                    );
                    if let Err(e) = watched.store().put_pending_audit(entry).await {
                        tracing::error!(error = %e, "cannot record the refused PIN in the audit log");
                    }
                    return;
                }
            }
        });
        match self.api.lifecycle().resume().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "unfinished lifecycle jobs offered to drive"),
            Err(e) => tracing::error!(error = %e, "cannot read lifecycle jobs; will try again"),
        }
        // A job a dead replica drove is taken over once its lease lapses.
        let watch = tokio::spawn(self.api.lifecycle().clone().watch());
        let result = transport::serve(
            listener,
            admin,
            self.api.clone(),
            self.serve,
            self.gate,
            shutdown,
        )
        .await;
        purge.abort();
        pin_watch.abort();
        watch.abort();
        if let Some(c) = coherence {
            c.abort();
        }
        result.map_err(StartError::from)
    }
}

/// Stores a pending `hsm.pin_rejected` audit entry (see [`crate::audit`]); failures are
/// logged, the start-up error stands either way.
async fn record_pin_rejected(cfg: &Config, token: &str) {
    let store = match open_store(cfg, crate::metrics::StoreMetrics::default()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot record the refused PIN in the audit log");
            return;
        }
    };
    let entry = crate::audit::pending_entry(
        crate::audit::AuditEvent::new("hsm.pin_rejected")
            .outcome(crate::audit::Outcome::Failed)
            .with("token", token)
            .with("when", "start-up"),
    );
    if let Err(e) = store.put_pending_audit(entry).await {
        tracing::error!(error = %e, "cannot record the refused PIN in the audit log");
    }
}

/// `progressdb-kms serve`: build, bind, serve until `shutdown`.
///
/// # Errors
/// [`StartError`].
pub async fn serve(cfg: &Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    if let Some(n) = service_kit::conn::raise_open_file_limit() {
        let wanted = cfg.limits.max_connections as u64 + 256;
        if n < wanted {
            tracing::warn!(
                open_file_limit = n,
                max_connections = cfg.limits.max_connections,
                "the open-file limit is below limits.max_connections: raise it (LimitNOFILE) or \
                 lower limits.max_connections"
            );
        }
    }
    lock_key_memory(cfg);
    if cfg.admin.users == crate::config::Users::SingleUser {
        service_kit::alerts::raise(
            service_kit::alerts::Alert::SingleUser,
            "listen.single_user = true: the server's uid can also use the admin API (backup, \
             restore, kek destroy); for single-user development only",
        );
    }
    let app = Server::build(cfg).await?;
    let listener = Listener::bind(&cfg.listen)?.refusing_admins(&cfg.admin);
    let admin = Listener::bind_admin(&cfg.admin)?;
    app.run(listener, Some(admin), shutdown).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Sizes and locks the key arena ([`service_kit::locked`]) before any DEK exists: one slot
/// per cache entry plus headroom for keys held by requests in flight. A refusal by the OS is
/// a warning, not a reason to stop: the keys then live in unlocked (still zeroized) memory.
fn lock_key_memory(cfg: &Config) {
    let m = service_kit::locked::init(
        cfg.cache
            .max_entries
            .saturating_add(service_kit::locked::HEADROOM_SLOTS),
    );
    match &m.locking {
        service_kit::locked::Locking::Locked => tracing::info!(
            slots = m.slots,
            bytes = m.bytes,
            "key memory locked into RAM"
        ),
        service_kit::locked::Locking::Refused(why) => service_kit::alerts::raise(
            service_kit::alerts::Alert::KeyMemoryUnlocked,
            &format!(
                "key memory ({} slots) is not locked, DEKs may reach swap: {why}",
                m.slots
            ),
        ),
    }
}

/// `progressdb-kms init-kek`: creates the KEK in the token if it is missing.
///
/// # Errors
/// [`StartError`].
///
/// Two `init-kek` started at once (on two replicas, or twice on one host) do not both create
/// a KEK: on a shared store they take its `admin` lease first (the one a rotation holds while
/// it makes a KEK version), on LMDB an exclusive lock on `init-kek.lock` in the store
/// directory. The second then finds the first one's KEK and changes nothing.
pub fn init_kek(cfg: &Config) -> Result<InitKekOutcome, StartError> {
    let settings = cfg.hsm_settings()?;
    match &cfg.store.backend {
        StoreBackend::Lmdb { .. } => {
            let _lock = lock_init(&cfg.store.path)?;
            Ok(pkcs11::init_kek(&settings)?)
        }
        StoreBackend::Postgres(pg) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StartError::Task(e.to_string()))?;
            let lease = cfg.lifecycle.lease;
            rt.block_on(async move {
                let store =
                    PostgresStore::open(pg, crate::metrics::StoreMetrics::default()).await?;
                let holder = crate::lifecycle::replica_name();
                let deadline = tokio::time::Instant::now() + 2 * lease + Duration::from_secs(5);
                loop {
                    match store.acquire_lease("admin", &holder, lease).await? {
                        crate::keystore::LeaseOutcome::HeldBy(_)
                            if tokio::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        crate::keystore::LeaseOutcome::HeldBy(other) => {
                            return Err(StartError::Store(StoreError::Io(format!(
                                "another KMS replica ({other}) holds the admin role; try again"
                            ))))
                        }
                        _ => break,
                    }
                }
                // Creating a KEK takes well under a lease.
                let made = tokio::task::spawn_blocking(move || pkcs11::init_kek(&settings))
                    .await
                    .map_err(|e| StartError::Task(e.to_string()));
                if let Err(e) = store.release_lease("admin", &holder).await {
                    tracing::warn!(error = %e, "cannot release the admin lease; it lapses");
                }
                Ok(made??)
            })
        }
    }
}

/// The exclusive lock `init-kek` holds on an LMDB deployment (blocking until a concurrent
/// `init-kek` is done).
fn lock_init(store_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let io = |e: std::io::Error| {
        StartError::Store(StoreError::Open {
            target: store_dir.display().to_string(),
            detail: format!("init-kek lock: {e}"),
        })
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(store_dir)
        .map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(store_dir.join("init-kek.lock"))
        .map_err(io)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(e.into()))?;
    Ok(file)
}

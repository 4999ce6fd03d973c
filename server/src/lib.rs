//! progressdb: an encrypted thread and message store.
//!
//! Conversation threads and their messages live in LMDB ([`store`]); message content is
//! encrypted per thread under a data key (DEK) that only the key provider can use
//! ([`provider`]: the `progressdb-kms` process, or an in-process dev provider behind the
//! `dev-embedded` feature). Applications talk to the JSON HTTP API ([`http`]), authenticated by
//! API keys and signed user ids ([`auth`]).
//!
//! Layers, top to bottom:
//!
//! * [`http`]: hyper server, routing, body limits, graceful shutdown.
//! * [`service`]: the flows (create thread with its DEK, encrypt on post, batch-decrypt pages,
//!   crypto-shred on delete), access rules, the thread cache ([`cache`]).
//! * [`store`]: LMDB with a single writer thread doing group commits; [`provider`]: the key
//!   provider trait and its implementations.
//!
//! [`Server::build`] assembles everything from a [`Config`]; [`Server::run`] serves a
//! listener until a shutdown future completes. The `progressdb` binary is a thin wrapper.

pub mod admin_client;
pub mod api;
pub mod auth;
pub mod backup;
pub mod cache;
pub mod check;
pub mod config;
pub mod error;
pub mod http;
pub mod ids;
pub mod meta;
pub mod metrics;
pub mod provider;
pub mod service;
pub mod store;
pub mod store_copy;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use service_kit::conn::{ConnectionGate, ConnectionLimits};
use tokio::net::TcpListener;

pub use config::Config;
pub use error::{ApiError, ErrorCode};

use auth::{ApiKeys, KeysFileError};
use config::KmsMode;
use provider::ProviderBuildError;
use service::{MessageService, ServiceDeps};
use store::{OpenError, Store, StoreOptions};

/// Why the server could not be built. `Display` is one line naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Keys(#[from] KeysFileError),
    #[error(transparent)]
    Provider(#[from] ProviderBuildError),
    #[error(transparent)]
    Store(#[from] OpenError),
}

/// A built server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    service: Arc<MessageService>,
    http: http::HttpOptions,
}

/// Whether the configuration asks for a key provider: always with encryption on, and with it
/// off when one is configured anyway (to read and shred what was encrypted before).
fn wants_provider(cfg: &Config) -> bool {
    cfg.encryption.enabled
        || match cfg.kms.mode {
            KmsMode::External => cfg.kms.endpoint.is_some() || cfg.kms.endpoints.is_some(),
            KmsMode::Embedded => true,
        }
}

impl Server {
    /// Validates `cfg`, reads the keys file, builds the key provider and opens the store.
    /// Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`BuildError`].
    pub async fn build(cfg: &Config) -> Result<Self, BuildError> {
        cfg.validate()?;
        let keys = ApiKeys::load(&cfg.auth.keys_file)?.with_policy(cfg.auth.signature_policy());
        let per_peer = match cfg.http.max_connections_per_peer {
            0 => cfg.http.max_connections,
            n => n.min(cfg.http.max_connections),
        };
        let gate = ConnectionGate::new(ConnectionLimits {
            max_connections: cfg.http.max_connections,
            max_per_peer: per_peer,
        });
        let metrics = Arc::new(metrics::Metrics::new(gate.clone()));
        let provider = if wants_provider(cfg) {
            Some(provider::build(&cfg.kms, metrics.kms.clone())?)
        } else {
            None
        };
        let store = match cfg.store.postgres().map_err(|e| OpenError {
            place: e.key.into(),
            message: e.reason,
        })? {
            Some(pg) => {
                Store::open_postgres(&pg, cfg.store.max_batch_ops, metrics.store.clone()).await?
            }
            None => {
                let mut opts = StoreOptions::new(
                    &cfg.store.path,
                    cfg.store.map_size_mb,
                    cfg.store.max_map_size_mb,
                );
                opts.max_batch_ops = cfg.store.max_batch_ops;
                let store_metrics = metrics.store.clone();
                let path = cfg.store.path.clone();
                tokio::task::spawn_blocking(move || Store::open(&opts, store_metrics))
                    .await
                    .map_err(|e| OpenError::at_path(&path, e.to_string()))??
            }
        };
        // The copies a backup or restore that died left beside the store (this process holds
        // the store now).
        if let Some(dir) = store.lmdb_dir() {
            crate::backup::remove_leftovers(dir);
        }
        // Revoked users, read before the first request is served.
        let signature_generations = crate::auth::SignatureGenerations::new(
            store.signature_generations().await.map_err(|e| OpenError {
                place: "store".into(),
                message: e.to_string(),
            })?,
        );
        let service = MessageService::new(
            cfg,
            ServiceDeps {
                store,
                provider,
                keys,
                metrics,
                gate,
                signature_generations,
            },
        );
        let http = http::HttpOptions {
            header_read_timeout: Duration::from_secs(cfg.http.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(cfg.http.body_read_timeout_secs),
            write_timeout: Duration::from_secs(cfg.http.write_timeout_secs),
            shutdown_grace: Duration::from_secs(cfg.http.shutdown_grace_secs),
            max_body_bytes: cfg.limits.max_body_bytes,
            metrics_access: cfg.http.metrics_access,
            cors_allowed_origins: cfg.http.cors_allowed_origins.clone(),
        };
        Ok(Self {
            service: Arc::new(service),
            http,
        })
    }

    /// The message service (for tools and tests).
    pub fn service(&self) -> &Arc<MessageService> {
        &self.service
    }

    /// Serves `listener` until `shutdown` completes, then finishes in-flight requests and
    /// closes the store once the last request is done. Logs `listening on <addr>` first.
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        // Jobs a stopped server left unfinished go on from where they were.
        match service::jobs::resume_all(&self.service).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "resumed unfinished DEK rotation jobs"),
            Err(e) => tracing::error!(error = %e, "cannot read the job records; none resumed"),
        }
        http::serve(listener, self.service, self.http, shutdown).await
    }
}

/// Builds from `cfg` and serves `listener` until `shutdown` completes.
///
/// # Errors
/// [`BuildError`] at start-up; I/O errors are logged and end the server.
pub async fn run(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BuildError> {
    service_kit::conn::raise_open_file_limit();
    let server = Server::build(cfg).await?;
    if let Err(e) = server.run(listener, shutdown).await {
        tracing::error!(error = %e, "server stopped");
    }
    Ok(())
}

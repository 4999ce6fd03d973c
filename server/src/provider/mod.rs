//! The key-provider boundary: one trait, [`KeyProvider`], and its implementations.
//!
//! * [`external::ExternalProvider`]: the `progressdb-kms` process over a Unix socket or HTTPS
//!   with mutual TLS ([`kms_api::KmsClient`]). Concurrent single encrypt/decrypt calls are
//!   coalesced into the KMS batch endpoints ([`coalesce`]). The server never sees a KEK or a
//!   raw DEK in this mode: it stores the wrapped DEK the KMS returned and sends the key id.
//! * `embedded::EmbeddedProvider` (only with the `dev-embedded` cargo feature): in-process
//!   AES-256-GCM with per-thread DEKs wrapped under a software master key. For development and
//!   tests; a build without the feature refuses `kms.mode = "embedded"` at start-up.
//!
//! Ciphertext is the same in both: `nonce(12) | ciphertext | tag(16)`, AES-256-GCM, with the
//! caller's AAD.

pub mod coalesce;
#[cfg(feature = "dev-embedded")]
pub mod embedded;
pub mod external;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kms_api::wire::SecretBytes;
use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use serde::{Deserialize, Serialize};

use crate::config::{KmsConfig, KmsMode};
use crate::metrics::KmsMetrics;

/// A boxed, `Send` future: what the object-safe [`KeyProvider`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A thread's DEK as described by its provider, stored in the thread record under `kms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadKey {
    pub key_id: KeyId,
    /// The DEK wrapped under the KEK (opaque to the server).
    pub wrapped_dek: WrappedDek,
    pub kek_id: KekId,
    pub kek_version: KekVersion,
}

/// `nonce(12) | ciphertext | tag(16)`. Not secret; `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct Ciphertext(pub Vec<u8>);

impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ciphertext(<{} bytes>)", self.0.len())
    }
}

/// One encryption: `plaintext` under `key`'s DEK, bound to `aad`.
#[derive(Debug)]
pub struct EncryptItem {
    pub key: Arc<ThreadKey>,
    pub plaintext: SecretBytes,
    pub aad: Vec<u8>,
}

/// One decryption.
#[derive(Clone)]
pub struct DecryptItem {
    pub key: Arc<ThreadKey>,
    pub ciphertext: Vec<u8>,
    pub aad: Vec<u8>,
}

impl fmt::Debug for DecryptItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptItem")
            .field("key_id", &self.key.key_id)
            .field(
                "ciphertext",
                &format_args!("<{} bytes>", self.ciphertext.len()),
            )
            .field("aad", &String::from_utf8_lossy(&self.aad))
            .finish()
    }
}

/// A failed provider call. Messages never carry key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The KMS (or its HSM) cannot be reached or is not ready; retrying later may work.
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
    /// The provider does not know the key (never created, or destroyed).
    #[error("unknown key")]
    UnknownKey,
    /// Authentication failed: wrong key, wrong AAD, tampered or truncated ciphertext.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The provider refused the request as invalid (a bug or a configuration problem).
    #[error("key provider refused the request: {0}")]
    Rejected(String),
    /// Anything else.
    #[error("key provider error: {0}")]
    Internal(String),
}

/// Result of one item of a batch call.
pub type ItemOutcome<T> = Result<T, ProviderError>;

/// Which implementation a provider is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    External,
    Embedded,
}

/// The operations the server needs from a key provider.
///
/// Batch calls fail as a whole only when the call itself fails (provider unreachable);
/// per-item failures (e.g. one ciphertext that does not authenticate) are in the results, one
/// per item, in order.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    fn kind(&self) -> ProviderKind;

    /// Creates a DEK for `thread` and returns how to refer to it.
    fn create_dek_for_thread<'a>(
        &'a self,
        thread: &'a ThreadId,
    ) -> BoxFuture<'a, Result<ThreadKey, ProviderError>>;

    fn encrypt(&self, item: EncryptItem) -> BoxFuture<'_, Result<Ciphertext, ProviderError>>;

    fn decrypt(&self, item: DecryptItem) -> BoxFuture<'_, Result<SecretBytes, ProviderError>>;

    fn encrypt_batch(
        &self,
        items: Vec<EncryptItem>,
    ) -> BoxFuture<'_, Result<Vec<ItemOutcome<Ciphertext>>, ProviderError>>;

    fn decrypt_batch(
        &self,
        items: Vec<DecryptItem>,
    ) -> BoxFuture<'_, Result<Vec<ItemOutcome<SecretBytes>>, ProviderError>>;

    /// Destroys the DEK (crypto-shredding). Destroying an unknown or already destroyed key
    /// succeeds.
    fn destroy_key<'a>(&'a self, key: &'a ThreadKey) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// The key as the provider holds it now: after a KEK rotation the wrapped DEK and KEK
    /// version differ from the thread's copy (the key id and the DEK do not).
    fn current_copy<'a>(
        &'a self,
        key: &'a ThreadKey,
    ) -> BoxFuture<'a, Result<ThreadKey, ProviderError>>;

    /// `Ok` when the provider can serve requests now.
    fn ready(&self) -> BoxFuture<'_, Result<(), ProviderError>>;
}

/// Why no provider could be built. `Display` is one line naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProviderBuildError {
    #[error("kms.mode = \"embedded\" is only available in dev builds: rebuild with `cargo build -p progressdb --features dev-embedded`, or use kms.mode = \"external\"")]
    EmbeddedNotCompiled,
    #[error("kms.master_key_file is only supported in dev builds (`--features dev-embedded`); remove it from the configuration")]
    MasterKeyNotCompiled,
    #[error("kms.master_key_file {0}")]
    MasterKey(String),
    #[error("kms TLS settings (kms.ca, kms.client_cert, kms.client_key): {0}")]
    Tls(#[from] kms_api::tls::TlsError),
    #[error("kms.endpoint: {0}")]
    Endpoint(String),
}

/// Builds the provider selected by `cfg.kms.mode`. Must run inside a tokio runtime (the
/// external provider starts its coalescing tasks).
///
/// # Errors
/// [`ProviderBuildError`].
pub fn build(
    cfg: &KmsConfig,
    metrics: KmsMetrics,
) -> Result<Arc<dyn KeyProvider>, ProviderBuildError> {
    match cfg.mode {
        KmsMode::External => {
            let endpoints = cfg
                .parsed_endpoints()
                .map_err(|e| ProviderBuildError::Endpoint(e.to_string()))?;
            if endpoints.is_empty() {
                return Err(ProviderBuildError::Endpoint("not configured".into()));
            }
            let tls = match (&cfg.ca, &cfg.client_cert, &cfg.client_key) {
                (Some(ca), Some(cert), Some(key)) => {
                    Some(Arc::new(kms_api::tls::client_config(ca, cert, key)?))
                }
                _ => None,
            };
            let mut client_cfg = kms_api::KmsClientConfig::replicas(endpoints, tls);
            client_cfg.health_interval = cfg.health_interval();
            client_cfg.connect_timeout = cfg.connect_timeout();
            client_cfg.request_timeout = cfg.request_timeout();
            client_cfg.max_retries = cfg.max_retries;
            client_cfg.deadline = cfg.deadline();
            client_cfg.expected_peer_uid = cfg.peer_uid;
            client_cfg.breaker = kms_api::client::BreakerConfig {
                failures: cfg.breaker_failures,
                cooldown: cfg.breaker_cooldown(),
            };
            let client = kms_api::KmsClient::new(client_cfg)
                .map_err(|e| ProviderBuildError::Endpoint(e.to_string()))?;
            if !cfg.health_interval().is_zero() {
                // Closes an open circuit once the KMS answers again (so no user request waits
                // out a hung KMS as the half-open probe) and, with several replicas, ejects a
                // failing one before user calls find it; ends with the client.
                drop(client.spawn_health_checks());
            }
            #[cfg(feature = "dev-embedded")]
            let fallback = match &cfg.master_key_file {
                Some(p) => Some(Arc::new(embedded::MasterKey::load(p)?)),
                None => None,
            };
            #[cfg(not(feature = "dev-embedded"))]
            if cfg.master_key_file.is_some() {
                return Err(ProviderBuildError::MasterKeyNotCompiled);
            }
            let p = external::ExternalProvider::new(
                client,
                external::Options {
                    max_batch_items: cfg.max_batch_items,
                    max_batch_bytes: cfg.max_batch_bytes,
                    max_inflight_batches: cfg.max_inflight_batches,
                    deadline: cfg.deadline(),
                },
                metrics,
                #[cfg(feature = "dev-embedded")]
                fallback,
            );
            Ok(Arc::new(p))
        }
        KmsMode::Embedded => {
            #[cfg(feature = "dev-embedded")]
            {
                let path = cfg
                    .master_key_file
                    .as_deref()
                    .ok_or_else(|| ProviderBuildError::MasterKey("is not configured".into()))?;
                let key = embedded::MasterKey::load(path)?;
                tracing::warn!(
                    "kms.mode = \"embedded\": DEKs are wrapped by a software master key; for development only"
                );
                Ok(Arc::new(embedded::EmbeddedProvider::new(
                    Arc::new(key),
                    metrics,
                )))
            }
            #[cfg(not(feature = "dev-embedded"))]
            {
                let _ = metrics;
                Err(ProviderBuildError::EmbeddedNotCompiled)
            }
        }
    }
}

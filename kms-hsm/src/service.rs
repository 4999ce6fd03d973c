//! The KMS operations, independent of HTTP: create a DEK for a thread, encrypt and decrypt
//! under it (one item or a batch), read its wrapped form, destroy it, and report readiness.
//!
//! Generic over the [`KeyBackend`] (where the KEK lives) and the [`KeyStore`] (where key
//! records live). Raw DEKs exist only in the backend's answers and the [`DekCache`]; they are
//! zeroized when dropped.
//!
//! Errors are [`ServiceError`]; [`ServiceError::code`] is the one exhaustive mapping to the
//! stable wire codes. Every decryption failure is the same [`ServiceError::DecryptionFailed`].

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use kms_api::wire::SecretBytes;
use kms_api::{IdempotencyKey, KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use ring::rand::{SecureRandom, SystemRandom};

use crate::backend::{DekResidency, KekRef, KeyBackend, ResidentKey};
use crate::cache::{CachedDek, DekCache, DekMaterial};
use crate::keystore::{now_secs, DestroyOutcome, KeyRecord, KeyState, KeyStore, StoreError};

mod batch;
mod error;
mod readiness;

use batch::*;
pub use error::ServiceError;
pub use readiness::Readiness;

/// Answer of [`KeyService::create_dek_for_thread`].
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key_id: KeyId,
    pub wrapped: WrappedDek,
    pub kek: KekRef,
}

/// Answer of [`KeyService::encrypt`]: `nonce | ciphertext | tag`, and the KEK version the DEK
/// is wrapped under.
#[derive(Debug, Clone)]
pub struct Encrypted {
    pub ciphertext: Vec<u8>,
    pub kek_version: KekVersion,
}

/// Answer of [`KeyService::get_wrapped`].
#[derive(Debug, Clone)]
pub struct WrappedInfo {
    pub wrapped: WrappedDek,
    pub kek_id: KekId,
    pub kek_version: KekVersion,
}

/// One item of an encrypt batch. `Debug` shows lengths only.
pub struct EncryptItem<'a> {
    pub key_id: &'a KeyId,
    pub plaintext: &'a [u8],
    pub aad: &'a [u8],
}

impl std::fmt::Debug for EncryptItem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptItem")
            .field("key_id", self.key_id)
            .field("plaintext_len", &self.plaintext.len())
            .field("aad_len", &self.aad.len())
            .finish()
    }
}

/// One item of a decrypt batch. `Debug` shows lengths only.
pub struct DecryptItem<'a> {
    pub key_id: &'a KeyId,
    pub ciphertext: &'a [u8],
    pub aad: &'a [u8],
}

impl std::fmt::Debug for DecryptItem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptItem")
            .field("key_id", self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .field("aad_len", &self.aad.len())
            .finish()
    }
}

/// Decrypted bytes: zeroized on drop, redacting `Debug`.
pub type Plaintext = SecretBytes;

/// One unwrap in flight, shared by every request that misses the cache for the same key.
type Flight = Arc<tokio::sync::OnceCell<DekOutcome>>;

/// The KMS operations.
pub struct KeyService<B, S> {
    backend: Arc<B>,
    store: S,
    cache: DekCache,
    rng: SystemRandom,
    /// Unwraps in flight, by key: concurrent misses for one cold key share one HSM call.
    flights: std::sync::Mutex<HashMap<KeyId, Flight>>,
    /// The last HSM readiness round trip and when it ended.
    ready: tokio::sync::Mutex<Option<(std::time::Instant, Readiness)>>,
    audit: crate::audit::AuditLog,
    /// Held shared by a destroy from its audit entry until its record is marked, and
    /// exclusively by [`KeyService::quiesced_audit_head`]: at the head that returns, every
    /// destroy of this process recorded at or before it is done in the store.
    shred_gate: tokio::sync::RwLock<()>,
}

impl<B, S> std::fmt::Debug for KeyService<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// A DEK lookup's outcome, shared by every item (or waiter) that asked for the same key.
type DekOutcome = Result<Arc<CachedDek>, Arc<ServiceError>>;

impl<B: KeyBackend, S: KeyStore> KeyService<B, S> {
    pub fn new(backend: Arc<B>, store: S, cache: DekCache) -> Self {
        Self {
            backend,
            store,
            cache,
            rng: SystemRandom::new(),
            flights: std::sync::Mutex::new(HashMap::new()),
            ready: tokio::sync::Mutex::new(None),
            audit: crate::audit::AuditLog::default(),
            shred_gate: tokio::sync::RwLock::new(()),
        }
    }

    /// The audit log's head at a moment when no destroy of this process is between its
    /// audit entry and its store write: a listing of the store made after it shows every
    /// key destroyed at or before it as destroyed (a backup's mark; destroys after it are
    /// found in the log from there).
    ///
    /// # Errors
    /// `Store` when the head cannot be read.
    pub async fn quiesced_audit_head(
        &self,
    ) -> Result<Option<crate::keystore::AuditHead>, ServiceError> {
        let _quiet = self.shred_gate.write().await;
        Ok(self.store.audit_head().await?)
    }

    /// Appends `ev` to the audit log, durably; see [`crate::audit`].
    ///
    /// # Errors
    /// `Audit` when it could not be written: the action it records must not be done.
    pub async fn audit(&self, ev: crate::audit::AuditEvent) -> Result<(), ServiceError> {
        self.audit
            .append(&*self.backend, &self.store, ev)
            .await
            .map_err(ServiceError::from)
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn cache(&self) -> &DekCache {
        &self.cache
    }

    fn new_key_id(&self) -> Result<KeyId, ServiceError> {
        let mut b = [0u8; 16];
        self.rng.fill(&mut b).map_err(|_| ServiceError::Random)?;
        Ok(KeyId::from_random(b))
    }

    /// Creates a DEK for `thread_id`: generated and wrapped by the HSM, its record committed
    /// durably before this returns, and the raw DEK placed in the cache.
    ///
    /// # Errors
    /// `Backend(Unavailable)` / `Store(..)` when the HSM or the store cannot be used; nothing is
    /// left behind then except, at worst, an unused durable record.
    pub async fn create_dek_for_thread(
        &self,
        thread_id: ThreadId,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<CreatedKey, ServiceError> {
        let key_id = match &idempotency_key {
            None => self.new_key_id()?,
            Some(k) => KeyId::derived(&thread_id, k),
        };
        match self.create_new(key_id.clone(), thread_id.clone()).await {
            // A repeat of a create that was committed (its answer lost, or it raced this one
            // on another replica): the key it made. Repeats are rare, so they are found by
            // the store refusing the second record, not by a read before every create.
            Err(ServiceError::Store(StoreError::AlreadyExists(_))) if idempotency_key.is_some() => {
                match self.store.get(&key_id).await? {
                    Some(existing) => replay(existing, &thread_id),
                    None => Err(ServiceError::Internal(
                        "a key reported as existing is not in the store",
                    )),
                }
            }
            other => other,
        }
    }

    async fn create_new(
        &self,
        key_id: KeyId,
        thread_id: ThreadId,
    ) -> Result<CreatedKey, ServiceError> {
        let (material, wrapped, kek) = match self.backend.residency() {
            DekResidency::Memory => {
                let (dek, wrapped, kek) = self.backend.generate_dek(&key_id).await?;
                (DekMaterial::Memory(dek), wrapped, kek)
            }
            DekResidency::Hsm => {
                let (wrapped, kek) = self.backend.generate_resident(&key_id).await?;
                let resident = ResidentKey {
                    key_id: key_id.clone(),
                    kek_id: kek.id.clone(),
                    wrapped: wrapped.clone(),
                };
                (DekMaterial::Resident(resident), wrapped, kek)
            }
        };
        let record = KeyRecord {
            key_id: key_id.clone(),
            kek_id: kek.id.clone(),
            kek_version: kek.version,
            thread_id,
            created_at: now_secs(),
            state: KeyState::Active {
                wrapped: wrapped.clone(),
            },
        };
        // No audit, no key: the record and its audit entry are committed together.
        let epoch = self.cache.epoch();
        let ev = crate::audit::AuditEvent::new("dek.create")
            .with("key_id", &key_id)
            .with("thread_id", &record.thread_id)
            .with("kek_version", kek.version);
        self.audit
            .append_with(&*self.backend, &self.store, ev, Some(record))
            .await
            .map_err(|e| match e {
                crate::audit::AuditError::Store(s) => ServiceError::Store(s),
                other => ServiceError::Audit(other),
            })?;
        self.cache.insert(
            epoch,
            key_id.clone(),
            Arc::new(CachedDek {
                material,
                kek_version: kek.version,
            }),
        );
        tracing::debug!(key_id = %key_id, kek_id = %kek.id, kek_version = %kek.version, "DEK created");
        Ok(CreatedKey {
            key_id,
            wrapped,
            kek,
        })
    }

    /// The DEK of `key_id`, from the cache or unwrapped by the HSM. Concurrent misses for the
    /// same key wait for one unwrap instead of each making their own.
    async fn dek(&self, key_id: &KeyId) -> Result<Arc<CachedDek>, ServiceError> {
        if let Some(hit) = self.cache.get(key_id) {
            return Ok(hit);
        }
        let flight = {
            let mut f = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            f.entry(key_id.clone()).or_default().clone()
        };
        // Removes the flight when this caller is done with it, also when the caller is
        // cancelled (a client that went away), so no flight outlives every one of its waiters.
        let _leave = LeaveFlight {
            flights: &self.flights,
            key_id,
            flight: &flight,
        };
        let out = flight
            .get_or_init(|| async { self.load_dek(key_id).await.map_err(Arc::new) })
            .await
            .clone();
        out.map_err(ServiceError::Shared)
    }

    /// Reads `key_id`'s record and unwraps its DEK through the HSM, caching the result.
    async fn load_dek(&self, key_id: &KeyId) -> Result<Arc<CachedDek>, ServiceError> {
        if let Some(hit) = self.cache.get(key_id) {
            return Ok(hit);
        }
        let epoch = self.cache.epoch();
        let record = self
            .store
            .get(key_id)
            .await?
            .ok_or_else(|| ServiceError::UnknownKey(key_id.clone()))?;
        let wrapped = record
            .wrapped()
            .ok_or_else(|| ServiceError::UnknownKey(key_id.clone()))?;
        let material = match self.backend.residency() {
            DekResidency::Memory => DekMaterial::Memory(
                self.backend
                    .unwrap_dek(key_id, &record.kek_id, wrapped)
                    .await
                    .map_err(|e| corrupt_or(key_id, e))?,
            ),
            // Unwrapped by the HSM into a session object at its first use; a blob that is not
            // even well-formed is refused now.
            DekResidency::Hsm => {
                crate::backend::parse_wrapped_header(wrapped).map_err(|e| corrupt_or(key_id, e))?;
                DekMaterial::Resident(ResidentKey {
                    key_id: key_id.clone(),
                    kek_id: record.kek_id.clone(),
                    wrapped: wrapped.clone(),
                })
            }
        };
        let cached = Arc::new(CachedDek {
            material,
            kek_version: record.kek_version,
        });
        self.cache.insert(epoch, key_id.clone(), cached.clone());
        Ok(cached)
    }

    /// DEKs of several keys, each resolved (and unwrapped) once.
    async fn deks<'k>(&self, ids: impl Iterator<Item = &'k KeyId>) -> HashMap<KeyId, DekOutcome> {
        let mut out: HashMap<KeyId, DekOutcome> = HashMap::new();
        for id in ids {
            if out.contains_key(id) {
                continue;
            }
            let r = self.dek(id).await.map_err(|e| match e {
                ServiceError::Shared(shared) => shared,
                other => Arc::new(other),
            });
            out.insert(id.clone(), r);
        }
        out
    }

    /// Encrypts `plaintext` with `aad` under the DEK of `key_id`.
    ///
    /// # Errors
    /// `UnknownKey`; `Backend(Unavailable)` when the DEK must be unwrapped and the HSM is down.
    pub async fn encrypt(
        &self,
        key_id: &KeyId,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Encrypted, ServiceError> {
        let dek = self.dek(key_id).await?;
        one(self.seal_all(&dek, &[(plaintext, aad)]).await?)
    }

    /// Decrypts `nonce | ciphertext | tag` with `aad` under the DEK of `key_id`.
    ///
    /// # Errors
    /// `DecryptionFailed` for anything that does not authenticate; `UnknownKey`;
    /// `Backend(Unavailable)`.
    pub async fn decrypt(
        &self,
        key_id: &KeyId,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Plaintext, ServiceError> {
        let dek = self.dek(key_id).await?;
        one(self.open_all(&dek, &[(ciphertext, aad)]).await?)
    }

    /// The wrapped DEK of an active key and its KEK.
    ///
    /// # Errors
    /// `UnknownKey` for an unknown or destroyed key.
    pub async fn get_wrapped(&self, key_id: &KeyId) -> Result<WrappedInfo, ServiceError> {
        let record = self
            .store
            .get(key_id)
            .await?
            .ok_or_else(|| ServiceError::UnknownKey(key_id.clone()))?;
        match record.state {
            KeyState::Active { wrapped } => Ok(WrappedInfo {
                wrapped,
                kek_id: record.kek_id,
                kek_version: record.kek_version,
            }),
            KeyState::Destroyed { .. } => Err(ServiceError::UnknownKey(key_id.clone())),
        }
    }

    /// Destroys the DEK of `key_id`: its wrapped form is removed from the store (durably) and
    /// any cached copy is dropped. Idempotent; later use of the key answers `UnknownKey`.
    ///
    /// # Errors
    /// `UnknownKey` for a key that never existed; `Store(..)`.
    pub async fn destroy_key(&self, key_id: &KeyId) -> Result<(), ServiceError> {
        // Evicted first: even when the audit fails, no cached copy outlives the request.
        self.cache.evict(key_id);
        self.backend.forget_resident(key_id);
        let gate = self.shred_gate.read().await;
        self.audit(crate::audit::AuditEvent::new("dek.destroy").with("key_id", key_id))
            .await?;
        let outcome = self.store.mark_destroyed(key_id).await;
        drop(gate);
        // Evict even when the store failed: a cached DEK must not outlive a destroy request.
        self.cache.evict(key_id);
        self.backend.forget_resident(key_id);
        // Nor may an unwrap that started before it: a request arriving from now on starts a
        // new flight, which reads the destroyed record.
        self.flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key_id);
        match outcome? {
            DestroyOutcome::Destroyed => {
                tracing::info!(key_id = %key_id, "DEK destroyed");
                Ok(())
            }
            DestroyOutcome::AlreadyDestroyed => Ok(()),
            DestroyOutcome::Unknown => Err(ServiceError::UnknownKey(key_id.clone())),
        }
    }
}

/// The answer to a repeated create: the key its first attempt made, if it is this thread's and
/// still active.
fn replay(existing: KeyRecord, thread_id: &ThreadId) -> Result<CreatedKey, ServiceError> {
    if existing.thread_id != *thread_id {
        return Err(ServiceError::IdempotencyConflict(existing.key_id));
    }
    let Some(wrapped) = existing.wrapped().cloned() else {
        // Made, then destroyed (its thread deleted) before the repeat arrived.
        return Err(ServiceError::UnknownKey(existing.key_id));
    };
    tracing::debug!(key_id = %existing.key_id, "repeated create answered with the key it made");
    Ok(CreatedKey {
        key_id: existing.key_id,
        wrapped,
        kek: KekRef {
            id: existing.kek_id,
            version: existing.kek_version,
        },
    })
}

/// Takes a flight out of the map when dropped, if it is still the one there (a later miss
/// may have started a new one).
struct LeaveFlight<'a> {
    flights: &'a std::sync::Mutex<HashMap<KeyId, Flight>>,
    key_id: &'a KeyId,
    flight: &'a Flight,
}

impl Drop for LeaveFlight<'_> {
    fn drop(&mut self) {
        let mut f = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if f.get(self.key_id)
            .is_some_and(|cur| Arc::ptr_eq(cur, self.flight))
        {
            f.remove(self.key_id);
        }
    }
}

/// Moves an opened buffer (no copy) into the redacting, zeroizing wire type.
fn plaintext(mut buf: zeroize::Zeroizing<Vec<u8>>) -> Plaintext {
    SecretBytes::new(std::mem::take(&mut *buf))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

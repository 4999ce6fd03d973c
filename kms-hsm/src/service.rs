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
use std::time::Duration;

use kms_api::wire::SecretBytes;
use kms_api::{ErrorCode, IdempotencyKey, KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use ring::rand::{SecureRandom, SystemRandom};

use futures_util::StreamExt as _;

use crate::backend::{
    BackendError, BackendState, DekResidency, KekRef, KeyBackend, ResidentItem, ResidentKey,
};
use crate::cache::{CachedDek, DekCache, DekMaterial};
use crate::keystore::{now_secs, DestroyOutcome, KeyRecord, KeyState, KeyStore, StoreError};
use service_kit::aead;

/// Longest wait for the HSM round trip of a readiness check.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a readiness answer is reused: `/readyz` needs no credentials, so without this any
/// local caller could turn it into HSM load.
const READY_CACHE: Duration = Duration::from_secs(1);

/// Failures of the KMS operations. `Display` is for the log: it names keys, never key
/// material, plaintext or the PIN.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No such key, or the key was destroyed.
    #[error("unknown key {0}")]
    UnknownKey(KeyId),
    /// A create's idempotency key names a key of another thread; nothing was created.
    #[error("idempotency key already used for another thread (key {0})")]
    IdempotencyConflict(KeyId),
    /// The ciphertext does not authenticate (any cause).
    #[error("decryption failed")]
    DecryptionFailed,
    /// The stored wrapped DEK does not unwrap under its KEK (store corruption or a foreign
    /// record).
    #[error("stored wrapped DEK of key {0} does not authenticate under its KEK")]
    CorruptKey(KeyId),
    /// The random generator failed.
    #[error("random generator failed")]
    Random,
    /// A broken internal invariant; detail for the log.
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The failure of an unwrap that several requests waited for.
    #[error(transparent)]
    Shared(Arc<ServiceError>),
    /// The audit entry of the action could not be written; the action was not done.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl ServiceError {
    /// The stable wire code of this error: the single mapping from service failures to the
    /// API (the HTTP status follows from [`ErrorCode::status`]).
    /// The wire code of a backend failure.
    pub fn backend_code(e: &BackendError) -> ErrorCode {
        match e {
            // A refused KEK or PIN leaves the KMS unready until an operator acts: callers
            // see an outage (503), the log and /metrics say why.
            BackendError::Unavailable(_)
            | BackendError::KekRefused { .. }
            | BackendError::HmacKey { .. }
            | BackendError::PinRejected(_) => ErrorCode::Unavailable,
            BackendError::Overloaded => ErrorCode::Overloaded,
            BackendError::InvalidWrapped
            | BackendError::KekNotFound { .. }
            | BackendError::Config(_)
            | BackendError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The wire code of a key-store failure.
    pub fn store_code(e: &StoreError) -> ErrorCode {
        match e {
            StoreError::Full { .. } | StoreError::NoSpace(_) => ErrorCode::StorageFull,
            StoreError::Io(_)
            | StoreError::Closed
            | StoreError::LeaseLost(_)
            | StoreError::Open { .. }
            | StoreError::AuditHeadMoved => ErrorCode::Unavailable,
            StoreError::AlreadyExists(_)
            | StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::Corrupt { .. } => ErrorCode::Internal,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::UnknownKey(_) => ErrorCode::UnknownKey,
            ServiceError::IdempotencyConflict(_) => ErrorCode::IdempotencyConflict,
            ServiceError::DecryptionFailed => ErrorCode::DecryptionFailed,
            ServiceError::CorruptKey(_) | ServiceError::Random | ServiceError::Internal(_) => {
                ErrorCode::Internal
            }
            ServiceError::Backend(e) => Self::backend_code(e),
            ServiceError::Store(e) => Self::store_code(e),
            ServiceError::Shared(e) => e.code(),
            ServiceError::Audit(_) => ErrorCode::Unavailable,
        }
    }
}

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

/// Result of a readiness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not ready, with a short reason safe to show to callers.
    NotReady(&'static str),
}

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

    /// Encrypts each of `items` under one DEK: here (memory residency) or in the HSM.
    async fn seal_all(
        &self,
        dek: &CachedDek,
        items: &[(&[u8], &[u8])],
    ) -> Result<Vec<Result<Encrypted, Arc<ServiceError>>>, ServiceError> {
        let encrypted = |ciphertext| Encrypted {
            ciphertext,
            kek_version: dek.kek_version,
        };
        match &dek.material {
            DekMaterial::Memory(key) => Ok(items
                .iter()
                .map(|(plaintext, aad)| {
                    aead::seal(&self.rng, key, plaintext, aad)
                        .map(encrypted)
                        .map_err(|_| Arc::new(ServiceError::Random))
                })
                .collect()),
            DekMaterial::Resident(key) => {
                let mut r = self.backend.seal_resident(key, resident_items(items)).await;
                if let Err(BackendError::KekNotFound { .. }) = r {
                    if let Some(fresh) = self.fresh_resident(key).await? {
                        r = self
                            .backend
                            .seal_resident(&fresh, resident_items(items))
                            .await;
                    }
                }
                let out = r.map_err(|e| self.resident_failed(key, e))?;
                Ok(out
                    .into_iter()
                    .map(|r| {
                        r.map(encrypted)
                            .map_err(|e| Arc::new(ServiceError::Backend(e)))
                    })
                    .collect())
            }
        }
    }

    /// Decrypts each of `items` under one DEK: here (memory residency) or in the HSM. Every
    /// item that does not authenticate is the opaque `DecryptionFailed`.
    async fn open_all(
        &self,
        dek: &CachedDek,
        items: &[(&[u8], &[u8])],
    ) -> Result<Vec<Result<Plaintext, Arc<ServiceError>>>, ServiceError> {
        match &dek.material {
            DekMaterial::Memory(key) => Ok(items
                .iter()
                .map(|(ciphertext, aad)| {
                    aead::open(key, ciphertext, aad)
                        .map(plaintext)
                        .map_err(|_| Arc::new(ServiceError::DecryptionFailed))
                })
                .collect()),
            DekMaterial::Resident(key) => {
                let mut r = self.backend.open_resident(key, resident_items(items)).await;
                if let Err(BackendError::KekNotFound { .. }) = r {
                    if let Some(fresh) = self.fresh_resident(key).await? {
                        r = self
                            .backend
                            .open_resident(&fresh, resident_items(items))
                            .await;
                    }
                }
                let out = r.map_err(|e| self.resident_failed(key, e))?;
                Ok(out
                    .into_iter()
                    .map(|r| match r {
                        Ok(p) => Ok(plaintext(p)),
                        Err(BackendError::InvalidWrapped) => {
                            Err(Arc::new(ServiceError::DecryptionFailed))
                        }
                        Err(e) => Err(Arc::new(ServiceError::Backend(e))),
                    })
                    .collect())
            }
        }
    }

    /// The key's record read again, when the cached blob's KEK version is gone (a rotation
    /// moved the record, then the old version was destroyed): `Some` when the store now holds
    /// another blob for it.
    async fn fresh_resident(&self, key: &ResidentKey) -> Result<Option<ResidentKey>, ServiceError> {
        self.cache.evict(&key.key_id);
        let entry = self.dek(&key.key_id).await?;
        Ok(match &entry.material {
            DekMaterial::Resident(k) if k.wrapped != key.wrapped => Some(k.clone()),
            _ => None,
        })
    }

    /// A whole resident call failed: a blob that does not unwrap is a corrupt key, and its
    /// cache entry goes (the next call reads the record again).
    fn resident_failed(&self, key: &ResidentKey, e: BackendError) -> ServiceError {
        match e {
            BackendError::InvalidWrapped => {
                self.cache.evict(&key.key_id);
                ServiceError::CorruptKey(key.key_id.clone())
            }
            other => ServiceError::Backend(other),
        }
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

    /// Encrypts every item; items under the same key share one DEK lookup. One result per item,
    /// in order.
    pub async fn encrypt_batch(
        &self,
        items: &[EncryptItem<'_>],
    ) -> Vec<Result<Encrypted, Arc<ServiceError>>> {
        let deks = self.deks(items.iter().map(|i| i.key_id)).await;
        let inputs: Vec<(&KeyId, &[u8], &[u8])> = items
            .iter()
            .map(|i| (i.key_id, i.plaintext, i.aad))
            .collect();
        per_key(&deks, &inputs, |dek, group| async move {
            self.seal_all(&dek, &group).await
        })
        .await
    }

    /// Decrypts every item; items under the same key share one DEK lookup. One result per item,
    /// in order.
    pub async fn decrypt_batch(
        &self,
        items: &[DecryptItem<'_>],
    ) -> Vec<Result<Plaintext, Arc<ServiceError>>> {
        let deks = self.deks(items.iter().map(|i| i.key_id)).await;
        let inputs: Vec<(&KeyId, &[u8], &[u8])> = items
            .iter()
            .map(|i| (i.key_id, i.ciphertext, i.aad))
            .collect();
        per_key(&deks, &inputs, |dek, group| async move {
            self.open_all(&dek, &group).await
        })
        .await
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

    /// Ready when the backend says so, a real HSM round trip succeeds and the store answers.
    /// The HSM round trip is made at most once per [`READY_CACHE`]; concurrent callers share
    /// it.
    pub async fn readiness(&self) -> Readiness {
        let state = self.backend.state();
        if state != BackendState::Ready {
            return Readiness::NotReady(state.reason());
        }
        let mut last = self.ready.lock().await;
        if let Some((at, r)) = *last {
            if at.elapsed() < READY_CACHE {
                return r;
            }
        }
        let r = self.check_ready().await;
        *last = Some((std::time::Instant::now(), r));
        r
    }

    async fn check_ready(&self) -> Readiness {
        match tokio::time::timeout(READY_TIMEOUT, self.backend.health_check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: HSM round trip failed");
                return Readiness::NotReady("HSM round trip failed");
            }
            Err(_) => {
                tracing::warn!("readiness: HSM round trip timed out");
                return Readiness::NotReady("HSM round trip timed out");
            }
        }
        if let Err(e) = self.store.check().await {
            tracing::warn!(error = %e, "readiness: key store check failed");
            return Readiness::NotReady("key store unavailable");
        }
        Readiness::Ready
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

/// The items of a resident call (inputs copied into zeroizing buffers).
fn resident_items(items: &[(&[u8], &[u8])]) -> Vec<ResidentItem> {
    items
        .iter()
        .map(|(data, aad)| ResidentItem {
            data: zeroize::Zeroizing::new(data.to_vec()),
            aad: aad.to_vec(),
        })
        .collect()
}

/// A backend error about a key's blob (`InvalidWrapped`) is that key's corruption.
fn corrupt_or(key_id: &KeyId, e: BackendError) -> ServiceError {
    match e {
        BackendError::InvalidWrapped => ServiceError::CorruptKey(key_id.clone()),
        other => ServiceError::Backend(other),
    }
}

/// The only result of a one-item call.
fn one<T>(mut out: Vec<Result<T, Arc<ServiceError>>>) -> Result<T, ServiceError> {
    match out.pop() {
        Some(r) => r.map_err(|e| Arc::try_unwrap(e).unwrap_or_else(ServiceError::Shared)),
        None => Err(ServiceError::Internal("a one-item call answered nothing")),
    }
}

/// Distinct keys of one batch worked on at once ([`per_key`]).
const KEYS_AT_ONCE: usize = 16;

/// Runs `op` once per distinct key of `inputs` (each key's items together, up to
/// [`KEYS_AT_ONCE`] keys concurrently), and puts every result back in its item's place. An item whose key did not
/// resolve answers that key's error.
async fn per_key<'a, T, F, Fut>(
    deks: &HashMap<KeyId, DekOutcome>,
    inputs: &[(&'a KeyId, &'a [u8], &'a [u8])],
    op: F,
) -> Vec<Result<T, Arc<ServiceError>>>
where
    F: Fn(Arc<CachedDek>, Vec<(&'a [u8], &'a [u8])>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Result<T, Arc<ServiceError>>>, ServiceError>>,
{
    let mut groups: Vec<(&KeyId, Vec<usize>)> = Vec::new();
    let mut at: HashMap<&KeyId, usize> = HashMap::new();
    for (i, (id, _, _)) in inputs.iter().enumerate() {
        let g = *at.entry(id).or_insert_with(|| {
            groups.push((id, Vec::new()));
            groups.len() - 1
        });
        if let Some((_, idx)) = groups.get_mut(g) {
            idx.push(i);
        }
    }
    let mut out: Vec<Option<Result<T, Arc<ServiceError>>>> =
        (0..inputs.len()).map(|_| None).collect();
    let mut calls = Vec::new();
    for (id, idx) in &groups {
        match shared(deks, id) {
            Ok(dek) => {
                let group = idx
                    .iter()
                    .filter_map(|&i| inputs.get(i).map(|(_, a, b)| (*a, *b)))
                    .collect();
                calls.push((idx.clone(), op(dek, group)));
            }
            Err(e) => {
                for &i in idx {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = Some(Err(e.clone()));
                    }
                }
            }
        }
    }
    // At most a few keys' calls at once: in hsm residency each is an HSM job, and a batch
    // of many keys must not fill every worker's queue (which would answer `overloaded`).
    let done: Vec<_> = futures_util::stream::iter(calls)
        .map(|(idx, fut)| async move { (idx, fut.await) })
        .buffer_unordered(KEYS_AT_ONCE)
        .collect()
        .await;
    for (idx, r) in done {
        match r {
            Ok(results) => {
                for (&i, r) in idx.iter().zip(results) {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = Some(r);
                    }
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for i in idx {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = Some(Err(e.clone()));
                    }
                }
            }
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Arc::new(ServiceError::Internal(
                    "a batch item got no result",
                )))
            })
        })
        .collect()
}

/// Moves an opened buffer (no copy) into the redacting, zeroizing wire type.
fn plaintext(mut buf: zeroize::Zeroizing<Vec<u8>>) -> Plaintext {
    SecretBytes::new(std::mem::take(&mut *buf))
}

fn shared(
    deks: &HashMap<KeyId, DekOutcome>,
    id: &KeyId,
) -> Result<Arc<CachedDek>, Arc<ServiceError>> {
    match deks.get(id) {
        Some(r) => r.clone(),
        // `deks` was built from the same items, so every id is present; answer an internal
        // error rather than panic if that ever changes.
        None => Err(Arc::new(ServiceError::Internal(
            "batch key resolution missed an item",
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cache::CacheMetrics;
    use crate::keystore::lmdb::LmdbStore;
    use crate::metrics::StoreMetrics;
    use crate::testing::MockBackend;
    use zeroize::Zeroizing;

    fn service(cache_entries: usize) -> (tempfile::TempDir, KeyService<MockBackend, LmdbStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), 8, StoreMetrics::unregistered()).unwrap();
        let cache = DekCache::new(
            Duration::from_secs(60),
            cache_entries,
            CacheMetrics::default(),
        );
        (
            dir,
            KeyService::new(Arc::new(MockBackend::new()), store, cache),
        )
    }

    fn tid(s: &str) -> ThreadId {
        ThreadId::parse(s).unwrap()
    }

    /// A key store filled by creates keeps room for destroys: creates answer `Full` while
    /// the map's last part is still free, and then every key can still be destroyed (each
    /// with its audit entry), one at a time, and the audit log verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_store_still_destroys_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), 2, StoreMetrics::unregistered()).unwrap();
        let cache = DekCache::new(Duration::from_secs(60), 10, CacheMetrics::default());
        let backend = Arc::new(MockBackend::new());
        let svc = Arc::new(KeyService::new(Arc::clone(&backend), store, cache));
        let mut made = Vec::new();
        // In waves of 64 concurrent creates: they share audit groups and commits, and must
        // not pass the room check together.
        let mut full = None;
        for wave in 0..1000 {
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let svc = Arc::clone(&svc);
                    tokio::spawn(async move {
                        svc.create_dek_for_thread(tid(&format!("t{wave}-{i}")), None)
                            .await
                    })
                })
                .collect();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(k) => made.push(k.key_id),
                    Err(e) => full = Some(e),
                }
            }
            if full.is_some() {
                break;
            }
        }
        let full = full.expect("a 2 MiB map must fill");
        assert!(
            matches!(&full, ServiceError::Store(StoreError::Full { limit }) if limit.contains("kept for destroying every key")),
            "{full:?}"
        );
        assert!(made.len() > 500, "{}", made.len());
        eprintln!("a 2 MiB key store took {} creates", made.len());
        for k in &made {
            svc.destroy_key(k).await.unwrap();
        }
        let v = crate::audit::verify(&*backend, svc.store()).await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.verified as usize, 2 * made.len());
        // Archived and compacted, the log and the tombstones give the room back: as many
        // creates fit again (within the B-trees' slack).
        let (_, bytes) = svc
            .store()
            .audit_range(v.head_seq - 1, 1)
            .await
            .unwrap()
            .remove(0);
        let last: kms_api::admin::AuditEntry = serde_json::from_slice(&bytes).unwrap();
        let done = crate::audit_archive::compact(&svc, last.seq, &last.mac, &"0".repeat(64))
            .await
            .unwrap();
        assert_eq!(done.entries_removed as usize, 2 * made.len());
        assert_eq!(done.tombstones_removed as usize, made.len());
        for i in 0..made.len() * 9 / 10 {
            svc.create_dek_for_thread(tid(&format!("again-{i}")), None)
                .await
                .unwrap();
        }
        assert!(
            crate::audit::verify(&*backend, svc.store())
                .await
                .unwrap()
                .ok
        );
    }

    #[tokio::test]
    async fn create_encrypt_decrypt() {
        for entries in [0, 100] {
            let (_d, s) = service(entries);
            let k = s.create_dek_for_thread(tid("t1"), None).await.unwrap();
            let e = s.encrypt(&k.key_id, b"hello", b"aad").await.unwrap();
            assert_eq!(e.kek_version, KekVersion::FIRST);
            let p = s.decrypt(&k.key_id, &e.ciphertext, b"aad").await.unwrap();
            assert_eq!(p.expose(), b"hello");
            assert!(matches!(
                s.decrypt(&k.key_id, &e.ciphertext, b"other").await,
                Err(ServiceError::DecryptionFailed)
            ));
            let w = s.get_wrapped(&k.key_id).await.unwrap();
            assert_eq!(w.wrapped, k.wrapped);
            let unwraps = s.backend().unwraps();
            if entries == 0 {
                assert!(unwraps >= 2, "no cache: every call unwraps");
            } else {
                assert_eq!(unwraps, 0, "seeded cache: no unwrap");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeated_create_answers_the_key_it_made() {
        let (_d, s) = service(100);
        let s = Arc::new(s);
        let idem = || Some(IdempotencyKey::parse("retry-1").unwrap());
        let first = s.create_dek_for_thread(tid("t1"), idem()).await.unwrap();
        let again = s.create_dek_for_thread(tid("t1"), idem()).await.unwrap();
        assert_eq!(again.key_id, first.key_id);
        assert_eq!(again.wrapped, first.wrapped);
        assert_eq!(again.kek, first.kek);
        assert_eq!(first.key_id, KeyId::derived(&tid("t1"), &idem().unwrap()));
        assert_eq!(s.store().key_count().await.unwrap(), 1, "one key, not two");
        // Repeats racing each other: all get the one key.
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.create_dek_for_thread(tid("t2"), Some(IdempotencyKey::parse("race").unwrap()))
                        .await
                        .unwrap()
                        .key_id
                })
            })
            .collect();
        let mut ids = Vec::new();
        for r in racers {
            ids.push(r.await.unwrap());
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(s.store().key_count().await.unwrap(), 2);
        // The same key for another thread names another key id (no conflict), and without a
        // key every call makes a new one.
        let other = s.create_dek_for_thread(tid("t3"), idem()).await.unwrap();
        assert_ne!(other.key_id, first.key_id);
        let a = s.create_dek_for_thread(tid("t1"), None).await.unwrap();
        let b = s.create_dek_for_thread(tid("t1"), None).await.unwrap();
        assert_ne!(a.key_id, b.key_id);
        // A repeat after the key was destroyed (its thread deleted) makes nothing new.
        s.destroy_key(&first.key_id).await.unwrap();
        assert_eq!(
            s.create_dek_for_thread(tid("t1"), idem())
                .await
                .unwrap_err()
                .code(),
            ErrorCode::UnknownKey
        );
        assert_eq!(s.store().key_count().await.unwrap(), 5);
    }

    #[test]
    fn a_record_of_another_thread_is_an_idempotency_conflict() {
        let mut r = KeyRecord {
            key_id: KeyId::from_random([1; 16]),
            kek_id: KekId::parse("kek").unwrap(),
            kek_version: KekVersion::FIRST,
            thread_id: tid("owner"),
            created_at: 0,
            state: KeyState::Active {
                wrapped: WrappedDek::new(vec![1; 8]),
            },
        };
        assert!(replay(r.clone(), &tid("owner")).is_ok());
        assert!(matches!(
            replay(r.clone(), &tid("intruder")),
            Err(ServiceError::IdempotencyConflict(_))
        ));
        r.state = KeyState::Destroyed { destroyed_at: 1 };
        assert!(matches!(
            replay(r, &tid("owner")),
            Err(ServiceError::UnknownKey(_))
        ));
    }

    #[tokio::test]
    async fn other_keys_ciphertext_fails() {
        let (_d, s) = service(100);
        let a = s.create_dek_for_thread(tid("a"), None).await.unwrap();
        let b = s.create_dek_for_thread(tid("b"), None).await.unwrap();
        let e = s.encrypt(&a.key_id, b"x", b"").await.unwrap();
        let err = s.decrypt(&b.key_id, &e.ciphertext, b"").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::DecryptionFailed);
    }

    #[tokio::test]
    async fn unknown_and_destroyed() {
        let (_d, s) = service(100);
        let unknown = KeyId::from_random([9; 16]);
        assert_eq!(
            s.encrypt(&unknown, b"x", b"").await.unwrap_err().code(),
            ErrorCode::UnknownKey
        );
        assert_eq!(
            s.destroy_key(&unknown).await.unwrap_err().code(),
            ErrorCode::UnknownKey
        );
        let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
        let e = s.encrypt(&k.key_id, b"x", b"").await.unwrap();
        s.destroy_key(&k.key_id).await.unwrap();
        s.destroy_key(&k.key_id).await.unwrap();
        for r in [
            s.decrypt(&k.key_id, &e.ciphertext, b"").await.map(|_| ()),
            s.encrypt(&k.key_id, b"x", b"").await.map(|_| ()),
            s.get_wrapped(&k.key_id).await.map(|_| ()),
        ] {
            assert_eq!(r.unwrap_err().code(), ErrorCode::UnknownKey);
        }
    }

    #[tokio::test]
    async fn batch_shares_unwraps() {
        let (_d, s) = service(0);
        let a = s.create_dek_for_thread(tid("a"), None).await.unwrap();
        let b = s.create_dek_for_thread(tid("b"), None).await.unwrap();
        let unknown = KeyId::from_random([7; 16]);
        let before = s.backend().unwraps();
        let items = [
            EncryptItem {
                key_id: &a.key_id,
                plaintext: b"1",
                aad: b"",
            },
            EncryptItem {
                key_id: &a.key_id,
                plaintext: b"2",
                aad: b"",
            },
            EncryptItem {
                key_id: &b.key_id,
                plaintext: b"3",
                aad: b"x",
            },
            EncryptItem {
                key_id: &unknown,
                plaintext: b"4",
                aad: b"",
            },
        ];
        let r = s.encrypt_batch(&items).await;
        assert_eq!(s.backend().unwraps() - before, 2);
        assert_eq!(r[3].as_ref().unwrap_err().code(), ErrorCode::UnknownKey);
        let cts: Vec<Vec<u8>> = r[..3]
            .iter()
            .map(|x| x.as_ref().unwrap().ciphertext.clone())
            .collect();
        let d = [
            DecryptItem {
                key_id: &a.key_id,
                ciphertext: &cts[0],
                aad: b"",
            },
            DecryptItem {
                key_id: &a.key_id,
                ciphertext: &cts[1],
                aad: b"",
            },
            DecryptItem {
                key_id: &b.key_id,
                ciphertext: &cts[2],
                aad: b"",
            },
        ];
        let out = s.decrypt_batch(&d).await;
        assert_eq!(out[0].as_ref().unwrap().expose(), b"1");
        assert_eq!(out[1].as_ref().unwrap().expose(), b"2");
        assert_eq!(
            out[2].as_ref().unwrap_err().code(),
            ErrorCode::DecryptionFailed
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_for_one_cold_key_share_one_unwrap() {
        let (_d, s) = service(100);
        let s = Arc::new(s);
        let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
        let ct = s.encrypt(&k.key_id, b"cold", b"").await.unwrap().ciphertext;
        s.cache().evict(&k.key_id);
        s.backend().set_unwrap_delay_ms(100);
        let before = s.backend().unwraps();
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (s, id, ct) = (s.clone(), k.key_id.clone(), ct.clone());
                tokio::spawn(
                    async move { s.decrypt(&id, &ct, b"").await.map(|p| p.expose().to_vec()) },
                )
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), b"cold");
        }
        assert_eq!(
            s.backend().unwraps() - before,
            1,
            "one HSM unwrap for 32 misses"
        );
        // The flight is gone once it landed: a later miss unwraps again.
        s.cache().evict(&k.key_id);
        s.decrypt(&k.key_id, &ct, b"").await.unwrap();
        assert_eq!(s.backend().unwraps() - before, 2);
        assert!(s.flights.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_unwrap_leaves_no_flight_behind() {
        let (_d, s) = service(100);
        let s = Arc::new(s);
        let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
        let ct = s.encrypt(&k.key_id, b"x", b"").await.unwrap().ciphertext;
        s.cache().evict(&k.key_id);
        s.backend().set_unwrap_delay_ms(500);
        let (s2, id, ct2) = (s.clone(), k.key_id.clone(), ct.clone());
        let waiter = tokio::spawn(async move { s2.decrypt(&id, &ct2, b"").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.flights.lock().unwrap().len(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert!(
            s.flights.lock().unwrap().is_empty(),
            "the flight left with its last waiter"
        );
    }

    #[tokio::test]
    async fn readiness_round_trips_are_cached_for_a_second() {
        let (_d, s) = service(100);
        let before = s.backend().calls();
        for _ in 0..50 {
            assert_eq!(s.readiness().await, Readiness::Ready);
        }
        assert_eq!(
            s.backend().calls() - before,
            1,
            "50 probes, one HSM round trip"
        );
        tokio::time::sleep(READY_CACHE + Duration::from_millis(50)).await;
        assert_eq!(s.readiness().await, Readiness::Ready);
        assert_eq!(s.backend().calls() - before, 2);
    }

    #[tokio::test]
    async fn a_cold_key_in_an_outage_fails_alone_in_its_batch() {
        let (_d, s) = service(100);
        let warm = s.create_dek_for_thread(tid("warm"), None).await.unwrap();
        let cold = s.create_dek_for_thread(tid("cold"), None).await.unwrap();
        s.cache().evict(&cold.key_id);
        s.backend().set_down(true);
        let items = [
            EncryptItem {
                key_id: &warm.key_id,
                plaintext: b"a",
                aad: b"",
            },
            EncryptItem {
                key_id: &cold.key_id,
                plaintext: b"b",
                aad: b"",
            },
        ];
        let out = s.encrypt_batch(&items).await;
        assert!(out[0].is_ok(), "the cached key keeps serving");
        assert_eq!(out[1].as_ref().unwrap_err().code(), ErrorCode::Unavailable);
    }

    #[tokio::test]
    async fn hsm_down_is_unavailable_and_not_ready() {
        let (_d, s) = service(0);
        assert_eq!(s.readiness().await, Readiness::Ready);
        let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
        s.backend().set_down(true);
        assert_eq!(
            s.encrypt(&k.key_id, b"x", b"").await.unwrap_err().code(),
            ErrorCode::Unavailable
        );
        assert_eq!(
            s.create_dek_for_thread(tid("t"), None)
                .await
                .unwrap_err()
                .code(),
            ErrorCode::Unavailable
        );
        assert!(matches!(s.readiness().await, Readiness::NotReady(_)));
        s.backend().set_down(false);
        assert_eq!(s.readiness().await, Readiness::Ready);
    }

    #[tokio::test]
    async fn destroy_wins_over_a_racing_cache_fill() {
        let (_d, s) = service(100);
        let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
        s.cache().evict(&k.key_id);
        // A reader that took its epoch before the destroy must not re-populate the cache.
        let epoch = s.cache().epoch();
        s.destroy_key(&k.key_id).await.unwrap();
        s.cache().insert(
            epoch,
            k.key_id.clone(),
            Arc::new(CachedDek {
                material: crate::cache::DekMaterial::Memory(crate::backend::Dek::from_bytes(
                    Zeroizing::new([0; 32]),
                )),
                kek_version: KekVersion::FIRST,
            }),
        );
        assert_eq!(
            s.encrypt(&k.key_id, b"x", b"").await.unwrap_err().code(),
            ErrorCode::UnknownKey
        );
    }
}

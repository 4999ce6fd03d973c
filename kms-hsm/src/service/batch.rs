//! Encrypting and decrypting many items: items under one key share one DEK lookup and one
//! backend call (here in memory residency, in the HSM in hsm residency), keys are served a
//! few at a time, and every item gets its own result.

use std::collections::HashMap;
use std::sync::Arc;

use kms_api::KeyId;

use futures_util::StreamExt as _;

use crate::backend::{BackendError, KeyBackend, ResidentItem, ResidentKey};
use crate::cache::{CachedDek, DekMaterial};
use crate::keystore::KeyStore;
use service_kit::aead;

use super::*;

impl<B: KeyBackend, S: KeyStore> KeyService<B, S> {
    /// Encrypts each of `items` under one DEK: here (memory residency) or in the HSM.
    pub(super) async fn seal_all(
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
    pub(super) async fn open_all(
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
    pub(super) async fn fresh_resident(
        &self,
        key: &ResidentKey,
    ) -> Result<Option<ResidentKey>, ServiceError> {
        self.cache.evict(&key.key_id);
        let entry = self.dek(&key.key_id).await?;
        Ok(match &entry.material {
            DekMaterial::Resident(k) if k.wrapped != key.wrapped => Some(k.clone()),
            _ => None,
        })
    }

    /// A whole resident call failed: a blob that does not unwrap is a corrupt key, and its
    /// cache entry goes (the next call reads the record again).
    pub(super) fn resident_failed(&self, key: &ResidentKey, e: BackendError) -> ServiceError {
        match e {
            BackendError::InvalidWrapped => {
                self.cache.evict(&key.key_id);
                ServiceError::CorruptKey(key.key_id.clone())
            }
            other => ServiceError::Backend(other),
        }
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
}

/// The items of a resident call (inputs copied into zeroizing buffers).
pub(super) fn resident_items(items: &[(&[u8], &[u8])]) -> Vec<ResidentItem> {
    items
        .iter()
        .map(|(data, aad)| ResidentItem {
            data: zeroize::Zeroizing::new(data.to_vec()),
            aad: aad.to_vec(),
        })
        .collect()
}

/// A backend error about a key's blob (`InvalidWrapped`) is that key's corruption.
pub(super) fn corrupt_or(key_id: &KeyId, e: BackendError) -> ServiceError {
    match e {
        BackendError::InvalidWrapped => ServiceError::CorruptKey(key_id.clone()),
        other => ServiceError::Backend(other),
    }
}

/// The only result of a one-item call.
pub(super) fn one<T>(mut out: Vec<Result<T, Arc<ServiceError>>>) -> Result<T, ServiceError> {
    match out.pop() {
        Some(r) => r.map_err(|e| Arc::try_unwrap(e).unwrap_or_else(ServiceError::Shared)),
        None => Err(ServiceError::Internal("a one-item call answered nothing")),
    }
}

/// Distinct keys of one batch worked on at once ([`per_key`]).
pub(super) const KEYS_AT_ONCE: usize = 16;

/// Runs `op` once per distinct key of `inputs` (each key's items together, up to
/// [`KEYS_AT_ONCE`] keys concurrently), and puts every result back in its item's place. An item whose key did not
/// resolve answers that key's error.
pub(super) async fn per_key<'a, T, F, Fut>(
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

pub(super) fn shared(
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

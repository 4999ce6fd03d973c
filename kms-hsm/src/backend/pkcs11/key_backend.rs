//! The [`KeyBackend`] boundary served by the PKCS#11 backend: each call becomes one HSM job
//! (or a few, for large batches) sent to a worker, with its deadline.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use kms_api::{KekId, KekVersion, KeyId, WrappedDek};

use self::worker::{HsmOp, HsmRequest};
use crate::backend::{
    BackendError, BackendState, Dek, DekResidency, KekMissing, KekRef, KeyBackend, ResidentItem,
    ResidentKey,
};

use provision::{destroy_kek, ensure_kek};

use super::*;

impl KeyBackend for Pkcs11Backend {
    fn current_kek(&self) -> KekRef {
        self.pool.current_kek()
    }

    fn generate_dek(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<(Dek, WrappedDek, KekRef), BackendError>> + Send {
        let key_id = key_id.clone();
        async move {
            if self.pool.residency == DekResidency::Hsm {
                return Err(bytes_refused());
            }
            self.call(move |reply| HsmOp::Generate { key_id, reply })
                .await
        }
    }

    fn unwrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<Dek, BackendError>> + Send {
        // A malformed blob is refused here, without a trip to a worker.
        let parsed = blob_kek(&self.settings.kek_label, kek_id, wrapped);
        let key_id = key_id.clone();
        let wrapped = wrapped.clone();
        async move {
            if self.pool.residency == DekResidency::Hsm {
                return Err(bytes_refused());
            }
            let (kek, format) = parsed?;
            self.call(move |reply| HsmOp::Unwrap {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            })
            .await
        }
    }

    fn check_wrapped(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let parsed = blob_kek(&self.settings.kek_label, kek_id, wrapped);
        let key_id = key_id.clone();
        let wrapped = wrapped.clone();
        async move {
            let (kek, format) = parsed?;
            self.call(move |reply| HsmOp::Check {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            })
            .await
        }
    }

    fn rewrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send {
        let parsed = blob_kek(&self.settings.kek_label, kek_id, wrapped);
        let key_id = key_id.clone();
        let wrapped = wrapped.clone();
        async move {
            let (kek, format) = parsed?;
            self.call(move |reply| HsmOp::Rewrap {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            })
            .await
        }
    }

    fn kek_versions(&self) -> impl Future<Output = Result<Vec<KekVersion>, BackendError>> + Send {
        let settings = self.settings.clone();
        async move {
            tokio::task::spawn_blocking(move || list_kek_versions(&settings))
                .await
                .map_err(|e| BackendError::Internal(format!("KEK listing task failed: {e}")))?
        }
    }

    fn ensure_kek_version(
        &self,
        version: KekVersion,
        missing: KekMissing,
    ) -> impl Future<Output = Result<KekRef, BackendError>> + Send {
        let settings = self.settings.clone();
        let pool = Arc::clone(&self.pool);
        async move {
            let kek = tokio::task::spawn_blocking(move || ensure_kek(&settings, version, missing))
                .await
                .map_err(|e| BackendError::Internal(format!("KEK creation task failed: {e}")))??;
            pool.known_keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(kek.clone());
            pool.destroyed_keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&kek.version);
            let mut current = pool.current.write().unwrap_or_else(PoisonError::into_inner);
            if kek.version > current.version {
                tracing::info!(kek_id = %kek.id, kek_version = %kek.version, "new KEK version is current");
                *current = kek.clone();
            }
            Ok(kek)
        }
    }

    fn destroy_kek_version(
        &self,
        version: KekVersion,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let settings = self.settings.clone();
        let pool = Arc::clone(&self.pool);
        async move {
            if pool.current_kek().version == version {
                return Err(BackendError::Config(format!(
                    "KEK version {version} is the current KEK and is never destroyed"
                )));
            }
            // Refuse every use first, so no job starts on the object while it goes.
            pool.destroyed_keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(version);
            let kek = KekRef {
                id: settings.kek_label.clone(),
                version,
            };
            pool.known_keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&kek);
            tokio::task::spawn_blocking(move || destroy_kek(&settings, &kek))
                .await
                .map_err(|e| BackendError::Internal(format!("KEK destruction task failed: {e}")))?
        }
    }

    fn audit_chain(
        &self,
        prev: [u8; 32],
        messages: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<[u8; 32]>, BackendError>> + Send {
        self.call(move |reply| HsmOp::AuditChain {
            prev,
            messages,
            reply,
        })
    }

    fn residency(&self) -> DekResidency {
        self.pool.residency
    }

    fn generate_resident(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send {
        let key_id = key_id.clone();
        async move {
            if self.pool.residency != DekResidency::Hsm {
                return Err(crate::backend::not_resident());
            }
            self.call(move |reply| HsmOp::GenerateResident { key_id, reply })
                .await
        }
    }

    fn seal_resident(
        &self,
        key: &ResidentKey,
        items: Vec<ResidentItem>,
    ) -> impl Future<Output = Result<Vec<Result<Vec<u8>, BackendError>>, BackendError>> + Send {
        let key = key.clone();
        async move {
            self.resident_batch(&key, items, |key, kek, format, items, reply| {
                HsmOp::SealResident {
                    key,
                    kek,
                    format,
                    items,
                    reply,
                }
            })
            .await
        }
    }

    fn open_resident(
        &self,
        key: &ResidentKey,
        items: Vec<ResidentItem>,
    ) -> impl Future<
        Output = Result<Vec<Result<zeroize::Zeroizing<Vec<u8>>, BackendError>>, BackendError>,
    > + Send {
        let key = key.clone();
        async move {
            self.resident_batch(&key, items, |key, kek, format, items, reply| {
                HsmOp::OpenResident {
                    key,
                    kek,
                    format,
                    items,
                    reply,
                }
            })
            .await
        }
    }

    fn forget_resident(&self, key_id: &KeyId) {
        if self.pool.residency != DekResidency::Hsm {
            return;
        }
        for (tx, slot) in self.workers.iter().zip(&self.pool.slots) {
            slot.inflight.fetch_add(1, Ordering::AcqRel);
            let job = HsmRequest {
                kind: HsmOp::Forget {
                    key_id: key_id.clone(),
                },
                deadline: Instant::now() + self.job_timeout,
            };
            if tx.try_send(job).is_err() {
                // A full queue: the object goes when the worker's bounded map evicts it.
                slot.inflight.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn health_check(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.call(|reply| HsmOp::Health { reply })
    }

    fn state(&self) -> BackendState {
        if self.pool.ctx.pin_rejected(&self.pool.token_label) {
            return BackendState::PinRejected;
        }
        let all_healthy = !self.pool.slots.is_empty()
            && self
                .pool
                .slots
                .iter()
                .all(|s| s.healthy.load(Ordering::Acquire));
        if all_healthy {
            BackendState::Ready
        } else {
            BackendState::Recovering
        }
    }
}

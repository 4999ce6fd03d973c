//! Destroying a retired KEK version in the HSM: only once no active record depends on it
//! and a completed rotation retired it, under the admin lease, logged before it happens.

use kms_api::admin::JobKind;
use kms_api::KekVersion;

use crate::audit::{AuditEvent, Outcome};
use crate::backend::{BackendError, KeyBackend};
use crate::keystore::{now_secs, KekState, KeyStore};

use super::*;

impl<B: KeyBackend, S: KeyStore> Lifecycle<B, S> {
    /// Removes retired KEK `version` from the HSM. Refused while it is current, not retired
    /// by a completed rotation, a rotation runs, or any active record depends on it.
    /// Idempotent for a version already destroyed.
    ///
    /// # Errors
    /// `KekNotRetired`, `KekInUse`, `Backend`, `Store`.
    pub async fn destroy_kek(&self, version: KekVersion) -> Result<(), LifecycleError> {
        let _admin = self.admin_lock().await?;
        let result = self.destroy_kek_locked(version).await;
        if let Err(e @ (LifecycleError::KekNotRetired { .. } | LifecycleError::KekInUse { .. })) =
            &result
        {
            let ev = AuditEvent::new("kek.destroy")
                .outcome(Outcome::Refused)
                .with("version", version)
                .with("reason", e);
            if let Err(a) = self.svc.audit(ev).await {
                tracing::error!(error = %a, "cannot audit a refused KEK destruction");
            }
        }
        result
    }

    pub(super) async fn destroy_kek_locked(
        &self,
        version: KekVersion,
    ) -> Result<(), LifecycleError> {
        if self.svc.backend().current_kek().version == version {
            return Err(LifecycleError::KekNotRetired {
                version,
                reason: "it is the current KEK",
            });
        }
        if self
            .running_job(|k| matches!(k, JobKind::RotateKek { .. }))
            .await?
            .is_some()
        {
            return Err(LifecycleError::KekNotRetired {
                version,
                reason: "a KEK rotation is running",
            });
        }
        let record = self
            .svc
            .store()
            .kek_versions()
            .await?
            .into_iter()
            .find(|r| r.version == version);
        let Some(mut record) = record else {
            return Err(LifecycleError::KekNotRetired {
                version,
                reason: "no completed rotation retired it",
            });
        };
        match record.state {
            KekState::Active => {
                return Err(LifecycleError::KekNotRetired {
                    version,
                    reason: "no completed rotation retired it",
                })
            }
            KekState::Retired | KekState::Destroyed => {}
        }
        let in_use = self.count_dependents(version).await?;
        if in_use > 0 {
            return Err(LifecycleError::KekInUse {
                version,
                count: in_use,
            });
        }
        self.audit(AuditEvent::new("kek.destroy").with("version", version))
            .await?;
        match self.svc.backend().destroy_kek_version(version).await {
            Ok(()) => {}
            // Destroyed by an earlier call that stopped before recording it.
            Err(BackendError::KekNotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if record.state != KekState::Destroyed {
            record.state = KekState::Destroyed;
            record.destroyed_at = Some(now_secs());
            self.svc.store().put_kek_version(record).await?;
        }
        tracing::info!(kek_version = %version, "retired KEK version destroyed");
        Ok(())
    }
}

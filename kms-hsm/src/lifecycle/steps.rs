//! The steps of a job: make the KEK version (`creating_kek`), rewrap the DEKs under older
//! versions (`rewrapping`), verify every DEK and retire the old versions (`verifying`). Each
//! step is idempotent: a step cut short (a kill, a lost lease) is redone by the next driver.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::stream::{self, StreamExt as _};
use kms_api::admin::{Job, JobKind, JobProgress, JobState};
use kms_api::{KekVersion, KeyId};

use crate::audit::{AuditEvent, Outcome};
use crate::backend::{parse_wrapped_header, BackendError, KekMissing, KekRef, KeyBackend};
use crate::keystore::{
    now_secs, KekState, KekVersionRecord, KeyRecord, KeyState, KeyStore, StoreError,
};

use super::*;

impl<B: KeyBackend, S: KeyStore> Lifecycle<B, S> {
    /// One step of `job`; the caller persists the job after it.
    pub(super) async fn step(&self, job: &mut Job) -> Result<(), StepError> {
        match job.state {
            JobState::CreatingKek => self.step_create(job).await,
            JobState::Rewrapping => self.step_rewrap(job).await,
            JobState::Verifying => self.step_verify(job).await,
            JobState::Succeeded | JobState::Failed => Ok(()),
        }
    }

    pub(super) async fn step_create(&self, job: &mut Job) -> Result<(), StepError> {
        let JobKind::RotateKek { target } = job.kind else {
            return Err(StepError::Fail("only a rotation creates a KEK".into()));
        };
        self.step_audit(
            AuditEvent::new("kek.create")
                .with("job", &job.id)
                .with("version", target),
        )
        .await?;
        // The store learns of the version before the HSM makes it: a version in the token
        // that the store does not know was not made by this deployment, and a KMS refuses
        // to start on it ([`crate::kek_pin`]).
        let known = self.svc.store().kek_versions().await?;
        if !known.iter().any(|r| r.version == target) {
            self.svc
                .store()
                .put_kek_version(KekVersionRecord {
                    version: target,
                    state: KekState::Active,
                    created_at: now_secs(),
                    retired_at: None,
                    destroyed_at: None,
                })
                .await?;
        }
        let kek = {
            // No other replica (or `init-kek`) makes a KEK version at the same time.
            let _admin = self
                .admin_lock()
                .await
                .map_err(|e| StepError::Pause(e.to_string()))?;
            self.svc
                .backend()
                .ensure_kek_version(target, KekMissing::Generate)
                .await
                .map_err(backend_step_error)?
        };
        if !self.opts.settle.is_zero() {
            // Other replicas adopt the version from the change feed; until they have, they
            // may still wrap new DEKs under the old one.
            tracing::info!(job = %job.id, settle_ms = self.opts.settle.as_millis() as u64, "waiting for every replica to adopt the new KEK version");
            tokio::time::sleep(self.opts.settle).await;
        }
        tracing::info!(job = %job.id, kek_version = %kek.version, "new KEK version is current; rewrapping");
        job.state = JobState::Rewrapping;
        job.cursor = None;
        job.progress.passes = 1;
        job.progress.scanned = 0;
        job.progress.total = self.svc.store().key_count().await?;
        Ok(())
    }

    pub(super) async fn step_rewrap(&self, job: &mut Job) -> Result<(), StepError> {
        let batch = self
            .svc
            .store()
            .list(job.cursor.as_ref(), self.opts.batch)
            .await?;
        let Some(last) = batch.last().map(|r| r.key_id.clone()) else {
            // Verification finds every DEK that failed here again (it is still under an old
            // version, or does not unwrap), so it starts its own count.
            job.state = JobState::Verifying;
            job.cursor = None;
            job.progress.scanned = 0;
            job.progress.verified = 0;
            job.progress.failed = 0;
            job.progress.failed_keys.clear();
            job.progress.per_version.clear();
            job.progress.total = self.svc.store().key_count().await?;
            return Ok(());
        };
        let current = self.svc.backend().current_kek();
        let n = batch.len() as u64;
        // HSM work at most `concurrency` at a time; then every replacement of the batch is
        // queued at once, so they share one or two durable commits instead of one each.
        let prepared: Vec<Result<Prepared, StepError>> = stream::iter(batch)
            .map(|r| self.prepare_rewrap(r, &current))
            .buffer_unordered(self.opts.concurrency)
            .collect()
            .await;
        let mut swaps = Vec::new();
        let mut outcomes = Vec::new();
        for p in prepared {
            match p? {
                Prepared::Done(o) => outcomes.push(o),
                Prepared::Swap { old, new } => swaps.push((old, new)),
            }
        }
        let swapped = futures_util::future::join_all(
            swaps
                .iter()
                .map(|(old, new)| self.svc.store().compare_and_swap(old, new.clone())),
        )
        .await;
        for ((old, _), res) in swaps.into_iter().zip(swapped) {
            match res {
                Ok(()) => outcomes.push(Rewrap::Rewrapped),
                // Changed (or destroyed) since it was read: settle that one record alone.
                Err(StoreError::Conflict(_)) => {
                    outcomes.push(self.rewrap_alone(old.key_id, &current).await?)
                }
                Err(StoreError::NotFound(_)) => outcomes.push(Rewrap::Destroyed),
                Err(e) => return Err(e.into()),
            }
        }
        let mut p = job.progress.clone();
        for o in outcomes {
            match o {
                Rewrap::Rewrapped => p.rewrapped += 1,
                Rewrap::AlreadyCurrent => p.already_current += 1,
                Rewrap::Destroyed => p.destroyed += 1,
                Rewrap::Failed(k) => note_failure(&mut p, k),
            }
        }
        p.scanned += n;
        job.progress = p;
        job.cursor = Some(last);
        Ok(())
    }

    /// The rewrapped record for `rec`, or why there is none to write.
    pub(super) async fn prepare_rewrap(
        &self,
        rec: KeyRecord,
        current: &KekRef,
    ) -> Result<Prepared, StepError> {
        let KeyState::Active { wrapped } = &rec.state else {
            return Ok(Prepared::Done(Rewrap::Destroyed));
        };
        let Ok(header) = parse_wrapped_header(wrapped) else {
            tracing::error!(key_id = %rec.key_id, "key record holds a malformed wrapped DEK");
            return Ok(Prepared::Done(Rewrap::Failed(rec.key_id)));
        };
        if header.kek_version == current.version && rec.kek_version == current.version {
            return Ok(Prepared::Done(Rewrap::AlreadyCurrent));
        }
        let (blob, kek) = match self
            .svc
            .backend()
            .rewrap_dek(&rec.key_id, &rec.kek_id, wrapped)
            .await
        {
            Ok(x) => x,
            Err(e @ (BackendError::InvalidWrapped | BackendError::KekNotFound { .. })) => {
                tracing::error!(key_id = %rec.key_id, error = %e, "DEK cannot be rewrapped");
                return Ok(Prepared::Done(Rewrap::Failed(rec.key_id)));
            }
            Err(e) => return Err(backend_step_error(e)),
        };
        let new = KeyRecord {
            kek_id: kek.id,
            kek_version: kek.version,
            state: KeyState::Active { wrapped: blob },
            ..rec.clone()
        };
        Ok(Prepared::Swap { old: rec, new })
    }

    /// Rewraps one record that changed under a batch: re-read, rewrap, compare-and-swap,
    /// a few times.
    pub(super) async fn rewrap_alone(
        &self,
        key_id: KeyId,
        current: &KekRef,
    ) -> Result<Rewrap, StepError> {
        for _ in 0..8 {
            let Some(rec) = self.svc.store().get(&key_id).await? else {
                return Ok(Rewrap::Destroyed);
            };
            let (old, new) = match self.prepare_rewrap(rec, current).await? {
                Prepared::Done(o) => return Ok(o),
                Prepared::Swap { old, new } => (old, new),
            };
            match self.svc.store().compare_and_swap(&old, new).await {
                Ok(()) => return Ok(Rewrap::Rewrapped),
                Err(StoreError::Conflict(_)) => continue,
                Err(StoreError::NotFound(_)) => return Ok(Rewrap::Destroyed),
                Err(e) => return Err(e.into()),
            }
        }
        Err(StepError::Pause(format!(
            "key {key_id} kept changing while being rewrapped"
        )))
    }

    pub(super) async fn step_verify(&self, job: &mut Job) -> Result<(), StepError> {
        let batch = self
            .svc
            .store()
            .list(job.cursor.as_ref(), self.opts.batch)
            .await?;
        let Some(last) = batch.last().map(|r| r.key_id.clone()) else {
            return self.finish_verification(job).await;
        };
        let n = batch.len() as u64;
        let outcomes: Vec<Result<Verified, StepError>> = stream::iter(batch)
            .map(|r| self.verify_one(r))
            .buffer_unordered(self.opts.concurrency)
            .collect()
            .await;
        let mut p = job.progress.clone();
        for o in outcomes {
            match o? {
                Verified::Ok(v) => {
                    p.verified += 1;
                    *p.per_version.entry(v.get()).or_insert(0) += 1;
                }
                Verified::Destroyed => {}
                Verified::Failed(k) => note_failure(&mut p, k),
            }
        }
        p.scanned += n;
        job.progress = p;
        job.cursor = Some(last);
        Ok(())
    }

    pub(super) async fn verify_one(&self, rec: KeyRecord) -> Result<Verified, StepError> {
        let KeyState::Active { wrapped } = &rec.state else {
            return Ok(Verified::Destroyed);
        };
        let Ok(header) = parse_wrapped_header(wrapped) else {
            tracing::error!(key_id = %rec.key_id, "key record holds a malformed wrapped DEK");
            return Ok(Verified::Failed(rec.key_id));
        };
        if header.kek_version != rec.kek_version {
            tracing::error!(key_id = %rec.key_id, "key record and its wrapped DEK name different KEK versions");
            return Ok(Verified::Failed(rec.key_id));
        }
        match self
            .svc
            .backend()
            .check_wrapped(&rec.key_id, &rec.kek_id, wrapped)
            .await
        {
            Ok(()) => Ok(Verified::Ok(header.kek_version)),
            Err(e @ (BackendError::InvalidWrapped | BackendError::KekNotFound { .. })) => {
                tracing::error!(key_id = %rec.key_id, error = %e, "DEK does not unwrap");
                Ok(Verified::Failed(rec.key_id))
            }
            Err(e) => Err(backend_step_error(e)),
        }
    }

    /// End of a verification pass: finish, fail, or (rotation) go round again.
    pub(super) async fn finish_verification(&self, job: &mut Job) -> Result<(), StepError> {
        let now = now_secs();
        let failed = job.progress.failed;
        match job.kind {
            JobKind::Verify => {
                if failed == 0 {
                    job.state = JobState::Succeeded;
                } else {
                    job.state = JobState::Failed;
                    job.progress.error =
                        Some(format!("{failed} DEK(s) did not unwrap under their KEK"));
                }
            }
            JobKind::RotateKek { target } => {
                let current = self.svc.backend().current_kek().version;
                let stale: u64 = job
                    .progress
                    .per_version
                    .iter()
                    .filter(|(v, _)| **v != current.get())
                    .map(|(_, n)| n)
                    .sum();
                if failed > 0 {
                    job.state = JobState::Failed;
                    job.progress.error = Some(format!(
                        "{failed} DEK(s) could not be rewrapped or did not unwrap; older KEK \
                         versions stay active"
                    ));
                } else if stale > 0 {
                    if job.progress.passes >= MAX_PASSES {
                        job.state = JobState::Failed;
                        job.progress.error = Some(format!(
                            "{stale} DEK(s) are still under older KEK versions after {MAX_PASSES} passes"
                        ));
                    } else {
                        tracing::info!(job = %job.id, stale, "DEKs under older versions remain; another rewrap pass");
                        job.state = JobState::Rewrapping;
                        job.cursor = None;
                        job.progress.passes += 1;
                        job.progress.scanned = 0;
                        job.progress.total = self.svc.store().key_count().await?;
                        return Ok(());
                    }
                } else {
                    self.retire_below(target).await?;
                    job.state = JobState::Succeeded;
                }
            }
        }
        let mut ev = AuditEvent::new("job.finish")
            .outcome(if job.state == JobState::Succeeded {
                Outcome::Ok
            } else {
                Outcome::Failed
            })
            .with("job", &job.id)
            .with("kind", job.kind.label())
            .with("verified", job.progress.verified)
            .with("rewrapped", job.progress.rewrapped)
            .with("failed", failed);
        if let Some(e) = &job.progress.error {
            ev = ev.with("error", e);
        }
        self.step_audit(ev).await?;
        job.cursor = None;
        job.finished_at = Some(now);
        tracing::info!(
            job = %job.id,
            kind = job.kind.label(),
            state = ?job.state,
            verified = job.progress.verified,
            failed,
            "lifecycle job finished"
        );
        Ok(())
    }

    /// Audits from a job step: a failed audit pauses the job (the step is redone).
    pub(super) async fn step_audit(&self, ev: AuditEvent) -> Result<(), StepError> {
        self.svc
            .audit(ev)
            .await
            .map_err(|e| StepError::Pause(e.to_string()))
    }

    /// Marks every version below `target` that is still active as retired.
    pub(super) async fn retire_below(&self, target: KekVersion) -> Result<(), StepError> {
        let records: BTreeMap<KekVersion, KekVersionRecord> = self
            .svc
            .store()
            .kek_versions()
            .await?
            .into_iter()
            .map(|r| (r.version, r))
            .collect();
        let mut versions: BTreeSet<KekVersion> = self
            .svc
            .backend()
            .kek_versions()
            .await
            .map_err(backend_step_error)?
            .into_iter()
            .collect();
        versions.extend(records.keys().copied());
        let now = now_secs();
        for v in versions.into_iter().filter(|v| *v < target) {
            let rec = records.get(&v).cloned().unwrap_or(KekVersionRecord {
                version: v,
                state: KekState::Active,
                created_at: 0,
                retired_at: None,
                destroyed_at: None,
            });
            if rec.state == KekState::Active {
                self.step_audit(AuditEvent::new("kek.retire").with("version", v))
                    .await?;
                self.svc
                    .store()
                    .put_kek_version(KekVersionRecord {
                        state: KekState::Retired,
                        retired_at: Some(now),
                        ..rec
                    })
                    .await?;
                tracing::info!(kek_version = %v, "KEK version retired");
            }
        }
        Ok(())
    }
}

/// Counts a DEK that failed, keeping the first [`MAX_FAILED_KEYS`] ids.
pub(super) fn note_failure(p: &mut JobProgress, key: KeyId) {
    p.failed += 1;
    if p.failed_keys.len() < MAX_FAILED_KEYS {
        p.failed_keys.push(key);
    }
}

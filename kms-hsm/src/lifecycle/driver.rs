//! The job driver: runs a job to its end while this process holds the job's lease, renewing
//! it, persisting every step with a write fenced by it, pausing with backoff on transient
//! failures, and stopping the moment the lease is lost.

use std::time::Duration;

use kms_api::admin::{Job, JobId, JobState};

use crate::backend::KeyBackend;
use crate::keystore::{now_secs, KeyStore, LeaseOutcome, StoreError};

use super::*;

/// Why a driver stopped driving a job before its end.
enum Lost {
    /// The engine was dropped (shutdown): the next start resumes the job.
    Shutdown,
    /// Another replica holds the job's lease, or this one's lapsed: it is driven elsewhere
    /// (or offered again by [`Lifecycle::watch`], which re-reads it first).
    Lease,
}

/// Runs `job` to its end while this process holds the job's lease, persisting it after
/// every step with a write fenced by that lease. Transient failures pause it with backoff;
/// a persisted state is only ever one the job really reached. The lease is renewed every
/// third of its length, during steps and pauses alike; the moment it cannot be, the driver
/// stops (a step cut short is redone by the next driver: every step is idempotent).
pub(super) async fn drive<B: KeyBackend, S: KeyStore>(
    engine: std::sync::Weak<Lifecycle<B, S>>,
    job: Job,
) {
    let id = job.id.clone();
    match drive_leased(&engine, id.clone()).await {
        Ok(()) => {
            if let Some(me) = engine.upgrade() {
                let _ = me
                    .svc
                    .store()
                    .release_lease(&job_lease(&id), &me.holder)
                    .await;
            }
        }
        Err(Lost::Shutdown) => {}
        Err(Lost::Lease) => tracing::info!(job = %id, "lifecycle job is driven by another replica"),
    }
}

async fn drive_leased<B: KeyBackend, S: KeyStore>(
    engine: &std::sync::Weak<Lifecycle<B, S>>,
    id: JobId,
) -> Result<(), Lost> {
    let lease = job_lease(&id);
    // Lease first, then the record: whatever a previous driver persisted is where this one
    // starts.
    let mut job = {
        let me = engine.upgrade().ok_or(Lost::Shutdown)?;
        match me.hold_job(&id).await {
            Ok(LeaseOutcome::Acquired | LeaseOutcome::Renewed) => {}
            Ok(LeaseOutcome::HeldBy(_)) => return Err(Lost::Lease),
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot take the job's lease; will try again");
                return Err(Lost::Lease);
            }
        }
        let job = match me.job(&id).await {
            Ok(job) => job,
            Err(LifecycleError::UnknownJob(_)) => return Ok(()),
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "cannot read the job; will try again");
                return Err(Lost::Lease);
            }
        };
        if !job.state.is_final() {
            tracing::info!(job = %id, kind = job.kind.label(), state = ?job.state, holder = %me.holder, "driving lifecycle job");
        }
        job
    };
    let mut backoff = service_kit::jobs::Backoff::new();
    loop {
        if job.state.is_final() {
            return Ok(());
        }
        let me = engine.upgrade().ok_or(Lost::Shutdown)?;
        let renew_every = (me.opts.lease / 3).max(Duration::from_millis(10));
        let mut next = job.clone();
        let result = {
            let step = me.step(&mut next);
            tokio::pin!(step);
            let start = tokio::time::Instant::now() + renew_every;
            let mut renew = tokio::time::interval_at(start, renew_every);
            loop {
                tokio::select! {
                    r = &mut step => break r,
                    _ = renew.tick() => keep_lease(&me, &id).await?,
                }
            }
        };
        let ttl = me.opts.lease;
        match result {
            Ok(()) => {
                next.updated_at = now_secs();
                match me
                    .svc
                    .store()
                    .put_job_leased(next.clone(), &lease, &me.holder, ttl)
                    .await
                {
                    Ok(()) => {
                        job = next;
                        backoff.reset();
                        continue;
                    }
                    Err(StoreError::LeaseLost(_)) => return Err(Lost::Lease),
                    Err(e) => {
                        // The step's own writes are idempotent: redoing it is safe.
                        tracing::warn!(job = %job.id, error = %e, "cannot record job progress; retrying");
                    }
                }
            }
            Err(StepError::Pause(why)) => {
                tracing::warn!(job = %job.id, state = ?job.state, error = %why, "lifecycle job paused; retrying");
            }
            Err(StepError::Fail(why)) => {
                tracing::error!(job = %job.id, state = ?job.state, error = %why, "lifecycle job failed");
                let mut failed = job.clone();
                failed.state = JobState::Failed;
                failed.progress.error = Some(why);
                failed.finished_at = Some(now_secs());
                failed.updated_at = now_secs();
                match me
                    .svc
                    .store()
                    .put_job_leased(failed, &lease, &me.holder, ttl)
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err(StoreError::LeaseLost(_)) => return Err(Lost::Lease),
                    Err(_) => {}
                }
            }
        }
        drop(me);
        // Pause, renewing the lease; the engine is not held meanwhile (shutdown ends it).
        let resume_at = tokio::time::Instant::now() + backoff.next_pause();
        while tokio::time::Instant::now() < resume_at {
            tokio::time::sleep_until(resume_at.min(tokio::time::Instant::now() + renew_every))
                .await;
            let me = engine.upgrade().ok_or(Lost::Shutdown)?;
            keep_lease(&me, &id).await?;
        }
    }
}

/// Renews the job's lease: `Lost::Lease` unless it was still this process's, unbroken.
async fn keep_lease<B: KeyBackend, S: KeyStore>(
    me: &Lifecycle<B, S>,
    id: &JobId,
) -> Result<(), Lost> {
    match me.hold_job(id).await {
        Ok(LeaseOutcome::Renewed) => Ok(()),
        Ok(LeaseOutcome::Acquired) => {
            // It lapsed in between: another replica may have moved the job on.
            tracing::warn!(job = %id, "the job's lease lapsed; re-reading the job");
            Err(Lost::Lease)
        }
        Ok(LeaseOutcome::HeldBy(_)) => Err(Lost::Lease),
        // The store cannot be reached: keep going; the fenced write decides.
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "cannot renew the job's lease");
            Ok(())
        }
    }
}

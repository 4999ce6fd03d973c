//! Key lifecycle: KEK rotation with bulk rewrap, verification of every DEK, destruction of
//! retired KEK versions, and the status the admin API reports.
//!
//! # Jobs
//! A job ([`kms_api::admin::Job`]) is a small state machine persisted in the key store after
//! every step, so a KMS killed at any point (SIGKILL included) resumes it at start-up where it
//! stopped ([`Lifecycle::resume`]):
//!
//! ```text
//! rotate_kek:  creating_kek ──► rewrapping ──► verifying ──► succeeded
//!                                   ▲              │  (a DEK still under an old version:
//!                                   └──────────────┘   another pass, at most MAX_PASSES)
//!                                                  └──► failed (a DEK that does not unwrap)
//! verify:      verifying ──► succeeded | failed
//! ```
//!
//! * **creating_kek**: KEK version `target` (one above the highest in the HSM when the job
//!   was made) is generated in the HSM with the hardened attributes, or adopted if a previous
//!   run already made it (idempotent), and becomes current for new DEKs at once.
//! * **rewrapping**: key records are walked in key-id order from the persisted cursor, a batch
//!   at a time. Each active DEK under an older version is rewrapped inside the HSM
//!   ([`KeyBackend::rewrap_dek`]) and replaced by compare-and-swap, so a destroy or another
//!   change that raced it wins and is re-read, never overwritten. A DEK already under the
//!   current version is left alone, so a resumed batch never wraps anything twice. The cursor
//!   moves only after a whole batch is durable; an HSM or store outage pauses the job (with
//!   backoff) instead of failing it. At most `lifecycle.rewrap_concurrency` HSM jobs run at
//!   once, leaving the rest of the HSM queues to live traffic.
//! * **verifying**: every active DEK is unwrapped through the HSM (not the cache) and counted
//!   per KEK version. Only when every one is under the current version and unwraps are the
//!   older versions marked retired; DEKs created under the old version while the first pass
//!   ran are caught here and rewrapped by another pass.
//!
//! Starting a rotation while one runs returns the running one. Job starts and KEK
//! destruction are serialised by one lock, so they never interleave.
//!
//! # Cached DEKs
//! Rewrapping changes the wrapped form, not the DEK: cached DEKs stay valid throughout.

use std::sync::Arc;
use std::time::Duration;

use kms_api::admin::{Job, JobId, JobKind, JobProgress, JobState};
use kms_api::{KekVersion, KeyId};

use crate::audit::AuditEvent;
use crate::backend::{BackendError, KeyBackend};
use crate::keystore::{now_secs, KeyRecord, KeyStore, LeaseOutcome, StoreError};
use crate::service::KeyService;
use crate::service::ServiceError;

mod destroy;
mod driver;
mod status;
mod steps;

use driver::drive;

/// Rewrap passes before a rotation gives up (each pass after the first only meets DEKs made
/// under the old version while the previous pass ran).
const MAX_PASSES: u32 = 5;
/// Failed key ids kept in a job's progress.
const MAX_FAILED_KEYS: usize = 20;
/// Finished jobs shown by `status` (running ones are always shown).
const FINISHED_IN_STATUS: usize = 5;

/// Settings of the lifecycle jobs (`[lifecycle]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleOptions {
    /// HSM rewraps (or verification unwraps) in flight at once.
    pub concurrency: usize,
    /// Key records per batch: the cursor is persisted after each.
    pub batch: usize,
    /// How long a replica's lease on a job (or on the admin role) lasts unless renewed:
    /// a job whose replica died is taken over within about this long.
    pub lease: Duration,
    /// How long a rotation waits, once its new KEK version is current here, before it
    /// rewraps: the time every other replica takes to learn of the version
    /// (2 × `store.coherence_ms` on a shared store, 0 on LMDB).
    pub settle: Duration,
}

impl Default for LifecycleOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            batch: 128,
            lease: Duration::from_secs(10),
            settle: Duration::ZERO,
        }
    }
}

/// The lease that serialises job starts, KEK creation and destruction, restores and imports
/// across every replica of a store.
const ADMIN_LEASE: &str = "admin";

/// The lease whose holder drives job `id`.
fn job_lease(id: &JobId) -> String {
    format!("job/{id}")
}

/// This process's name as a lease holder: host, pid and a random part (a restarted process
/// never takes itself for its predecessor).
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "kms".to_owned());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The admin role, held for as long as the guard lives: the local lock plus, for other
/// replicas, the store's `admin` lease, renewed in the background. Dropping it releases both.
pub struct AdminGuard<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    renew: tokio::task::JoinHandle<()>,
    release: Option<Box<dyn FnOnce() + Send + 'a>>,
}

impl std::fmt::Debug for AdminGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminGuard").finish_non_exhaustive()
    }
}

impl Drop for AdminGuard<'_> {
    fn drop(&mut self) {
        self.renew.abort();
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

/// Failures of an admin lifecycle call.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no job {0}")]
    UnknownJob(JobId),
    /// The version is current or has not been retired by a completed rotation.
    #[error("KEK version {version} is not retired: {reason}")]
    KekNotRetired {
        version: KekVersion,
        reason: &'static str,
    },
    /// Active key records still depend on the version.
    #[error("KEK version {version} still wraps {count} active DEK(s); rotate first")]
    KekInUse { version: KekVersion, count: u64 },
    /// Another replica has held the admin role (a job start, a KEK destruction, a restore)
    /// for longer than this call waits.
    #[error("another KMS replica ({holder}) holds the admin role; try again")]
    Busy { holder: String },
    /// The KEK version space is exhausted (u32).
    #[error("no KEK version is left after {0}")]
    VersionsExhausted(KekVersion),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit entry could not be written, so nothing was done.
    #[error("{0}")]
    Audit(ServiceError),
}

use service_kit::jobs::StepError;

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full { .. }
            | StoreError::NoSpace(_)
            | StoreError::Io(_)
            | StoreError::Closed
            | StoreError::AuditHeadMoved
            | StoreError::LeaseLost(_) => StepError::Pause(e.to_string()),
            StoreError::Open { .. }
            | StoreError::AlreadyExists(_)
            | StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::Corrupt { .. } => StepError::Fail(e.to_string()),
        }
    }
}

fn backend_step_error(e: BackendError) -> StepError {
    match e {
        // No audit, no step: the job waits until the audit key is usable again.
        BackendError::Unavailable(_) | BackendError::Overloaded | BackendError::HmacKey { .. } => {
            StepError::Pause(e.to_string())
        }
        BackendError::InvalidWrapped
        | BackendError::KekNotFound { .. }
        | BackendError::KekRefused { .. }
        | BackendError::PinRejected(_)
        | BackendError::Config(_)
        | BackendError::Internal(_) => StepError::Fail(e.to_string()),
    }
}

/// Outcome of one record in a rewrap batch.
enum Rewrap {
    Rewrapped,
    AlreadyCurrent,
    Destroyed,
    Failed(KeyId),
}

/// A record read for rewrapping: settled already, or its replacement to write.
enum Prepared {
    Done(Rewrap),
    Swap { old: KeyRecord, new: KeyRecord },
}

/// Outcome of one record in a verification batch.
enum Verified {
    Ok(KekVersion),
    Destroyed,
    Failed(KeyId),
}

/// The lifecycle engine of one KMS process.
pub struct Lifecycle<B, S> {
    svc: Arc<KeyService<B, S>>,
    opts: LifecycleOptions,
    /// Serialises job starts and KEK destruction in this process (the `admin` lease does
    /// across replicas).
    admin: tokio::sync::Mutex<()>,
    /// This process's name in the store's leases.
    holder: String,
    /// Acquisitions of the admin role so far (each holds the lease under its own name).
    admin_turns: std::sync::atomic::AtomicU64,
    /// Jobs driven by this process (dropping the engine stops them: what they did is
    /// persisted, and the next start resumes them).
    running: service_kit::jobs::Driven<JobId>,
}

impl<B, S> std::fmt::Debug for Lifecycle<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<B: KeyBackend, S: KeyStore> Lifecycle<B, S> {
    pub fn new(svc: Arc<KeyService<B, S>>, opts: LifecycleOptions) -> Arc<Self> {
        Arc::new(Self {
            svc,
            opts: LifecycleOptions {
                concurrency: opts.concurrency.max(1),
                batch: opts.batch.max(1),
                lease: opts.lease.max(Duration::from_millis(100)),
                settle: opts.settle,
            },
            admin: tokio::sync::Mutex::new(()),
            holder: replica_name(),
            admin_turns: std::sync::atomic::AtomicU64::new(0),
            running: service_kit::jobs::Driven::default(),
        })
    }

    /// This process's name in the store's leases.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The admin role, which serialises job starts and KEK creation and destruction across
    /// every replica of the store; restore and import hold it too, so no record can appear
    /// under a version while that version is being destroyed. Waits up to two leases for a
    /// role another replica holds.
    ///
    /// # Errors
    /// `Busy` when another replica kept it that long; `Store` when the lease cannot be read.
    pub async fn admin_lock(&self) -> Result<AdminGuard<'_>, LifecycleError>
    where
        S: 'static,
    {
        let local = self.admin.lock().await;
        let ttl = self.opts.lease;
        // A holder name of this acquisition alone: the release of the previous one (spawned
        // when its guard dropped) can then never remove this one's lease.
        let holder = format!(
            "{}#{}",
            self.holder,
            self.admin_turns
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let deadline = tokio::time::Instant::now() + 2 * ttl;
        loop {
            match self
                .svc
                .store()
                .acquire_lease(ADMIN_LEASE, &holder, ttl)
                .await?
            {
                LeaseOutcome::Acquired | LeaseOutcome::Renewed => break,
                LeaseOutcome::HeldBy(holder) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(LifecycleError::Busy { holder });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let svc = Arc::clone(&self.svc);
        let renewing = holder.clone();
        let renew = tokio::spawn(async move {
            let holder = renewing;
            loop {
                tokio::time::sleep(ttl / 3).await;
                match svc.store().acquire_lease(ADMIN_LEASE, &holder, ttl).await {
                    Ok(LeaseOutcome::Renewed | LeaseOutcome::Acquired) => {}
                    // This process stalled past the lease and another replica took the
                    // role: what it does under it is fenced by compare-and-swap and the
                    // job leases, but say so.
                    Ok(LeaseOutcome::HeldBy(other)) => {
                        tracing::error!(holder = %other, "the admin lease was taken over by another replica while held here");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot renew the admin lease"),
                }
            }
        });
        let svc = Arc::clone(&self.svc);
        Ok(AdminGuard {
            _local: local,
            renew,
            release: Some(Box::new(move || {
                // Best effort: a lease that is not released lapses at its expiry.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Err(e) = svc.store().release_lease(ADMIN_LEASE, &holder).await {
                            tracing::warn!(error = %e, "cannot release the admin lease");
                        }
                    });
                }
            })),
        })
    }

    /// Resumes every job that had not finished when the KMS last stopped (or that a replica
    /// that died was driving: it is driven here once its lease lapses). Call at start-up,
    /// inside the runtime, and then keep [`Lifecycle::watch`] running.
    ///
    /// # Errors
    /// `Store` when the job records cannot be read.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, LifecycleError> {
        let mut n = 0;
        for job in self.svc.store().jobs().await? {
            if !job.state.is_final() {
                if !self.running.contains(&job.id) {
                    tracing::debug!(job = %job.id, kind = job.kind.label(), state = ?job.state, "offering to drive lifecycle job");
                }
                self.ensure_driven(&job);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every half lease, offers to drive each unfinished job this process does not drive:
    /// the driver's lease says who does, so a job whose replica died is taken over here
    /// within about a lease. Runs until aborted.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval((self.opts.lease / 2).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.resume().await {
                tracing::warn!(error = %e, "cannot read lifecycle jobs; will try again");
            }
        }
    }

    /// Starts a KEK rotation, or returns the one already running (`started == false`).
    ///
    /// # Errors
    /// `Backend` when the HSM cannot list its KEK versions; `Store` when the job cannot be
    /// recorded (then nothing was started); `VersionsExhausted`.
    pub async fn rotate_kek(self: &Arc<Self>) -> Result<(Job, bool), LifecycleError> {
        let asked = now_secs();
        let _admin = self.admin_lock().await?;
        // A rotation that runs, or that another replica started while this call waited for
        // the admin role (two operators asking at once get one rotation), is the answer.
        let existing = self.svc.store().jobs().await?.into_iter().find(|j| {
            matches!(j.kind, JobKind::RotateKek { .. })
                && (!j.state.is_final() || j.created_at >= asked)
        });
        if let Some(job) = existing {
            if !job.state.is_final() {
                self.ensure_driven(&job);
            }
            return Ok((job, false));
        }
        let versions = self.svc.backend().kek_versions().await?;
        let current = self.svc.backend().current_kek().version;
        let highest = versions.last().copied().unwrap_or(current).max(current);
        let target = highest
            .next()
            .ok_or(LifecycleError::VersionsExhausted(highest))?;
        self.audit(
            AuditEvent::new("kek.rotate")
                .with("from_version", current)
                .with("target_version", target),
        )
        .await?;
        let job = self
            .new_job(JobKind::RotateKek { target }, JobState::CreatingKek, 0)
            .await?;
        tracing::info!(job = %job.id, from = %current, target = %target, "KEK rotation started");
        self.ensure_driven(&job);
        Ok((job, true))
    }

    /// Starts a verification of every DEK, or returns the one already running.
    ///
    /// # Errors
    /// `Store` when the job cannot be recorded.
    pub async fn verify(self: &Arc<Self>) -> Result<(Job, bool), LifecycleError> {
        let _admin = self.admin_lock().await?;
        if let Some(job) = self.running_job(|k| matches!(k, JobKind::Verify)).await? {
            self.ensure_driven(&job);
            return Ok((job, false));
        }
        self.audit(AuditEvent::new("verify.start")).await?;
        let total = self.svc.store().key_count().await?;
        let job = self
            .new_job(JobKind::Verify, JobState::Verifying, total)
            .await?;
        self.ensure_driven(&job);
        Ok((job, true))
    }

    /// One job.
    ///
    /// # Errors
    /// `UnknownJob`; `Store`.
    pub async fn job(&self, id: &JobId) -> Result<Job, LifecycleError> {
        self.svc
            .store()
            .jobs()
            .await?
            .into_iter()
            .find(|j| &j.id == id)
            .ok_or_else(|| LifecycleError::UnknownJob(id.clone()))
    }

    /// Every job, oldest first.
    ///
    /// # Errors
    /// `Store`.
    pub async fn jobs(&self) -> Result<Vec<Job>, LifecycleError> {
        Ok(self.svc.store().jobs().await?)
    }

    async fn audit(&self, ev: AuditEvent) -> Result<(), LifecycleError> {
        self.svc.audit(ev).await.map_err(LifecycleError::Audit)
    }

    async fn running_job(
        &self,
        kind: impl Fn(&JobKind) -> bool,
    ) -> Result<Option<Job>, StoreError> {
        Ok(self
            .svc
            .store()
            .jobs()
            .await?
            .into_iter()
            .find(|j| !j.state.is_final() && kind(&j.kind)))
    }

    /// Records a new job, whole in one write: once it is in the store another replica may
    /// take it over, so nothing is written to it afterwards outside its lease.
    async fn new_job(
        &self,
        kind: JobKind,
        state: JobState,
        total: u64,
    ) -> Result<Job, LifecycleError> {
        let now = now_secs();
        let job = Job {
            id: JobId::from_random(rand::random()),
            kind,
            state,
            cursor: None,
            progress: JobProgress {
                passes: u32::from(state == JobState::Verifying),
                total,
                ..JobProgress::default()
            },
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        self.svc.store().put_job(job.clone()).await?;
        Ok(job)
    }

    /// Drives `job` on a task of its own unless this process already does (the task gives up
    /// at once when another replica holds the job's lease).
    fn ensure_driven(self: &Arc<Self>, job: &Job) {
        // The task holds a weak reference: dropping the engine (shutdown) ends it.
        let me = Arc::downgrade(self);
        let job = job.clone();
        self.running.start(&job.id.clone(), drive(me, job));
    }

    /// Takes or renews the lease of job `id`. `Renewed` means this process may go on
    /// driving it; `Acquired` after a lapse is not continuity (the caller must re-read the
    /// job); `HeldBy` means another replica drives it.
    async fn hold_job(&self, id: &JobId) -> Result<LeaseOutcome, StoreError> {
        self.svc
            .store()
            .acquire_lease(&job_lease(id), &self.holder, self.opts.lease)
            .await
    }
}

#[cfg(test)]
mod tests;

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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt as _};
use kms_api::admin::{
    CacheStatus, HsmStatus, Job, JobId, JobKind, JobProgress, JobState, KekVersionStatus,
    StatusResponse,
};
use kms_api::{KekVersion, KeyId};

use crate::audit::{AuditEvent, Outcome};
use crate::backend::{parse_wrapped_header, BackendError, KekMissing, KekRef, KeyBackend};
use crate::keystore::{
    now_secs, KekState, KekVersionRecord, KeyRecord, KeyState, KeyStore, LeaseOutcome, StoreError,
};
use crate::service::KeyService;
use crate::service::ServiceError;

/// Rewrap passes before a rotation gives up (each pass after the first only meets DEKs made
/// under the old version while the previous pass ran).
const MAX_PASSES: u32 = 5;
/// Failed key ids kept in a job's progress.
const MAX_FAILED_KEYS: usize = 20;
/// Finished jobs shown by `status` (running ones are always shown).
const FINISHED_IN_STATUS: usize = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

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

/// What a step of a job ran into.
enum StepError {
    /// The HSM or the store cannot serve now: retried with backoff, the job state unchanged.
    Transient(String),
    /// The job cannot go on.
    Fatal(String),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full { .. }
            | StoreError::NoSpace(_)
            | StoreError::Io(_)
            | StoreError::Closed
            | StoreError::AuditHeadMoved
            | StoreError::LeaseLost(_) => StepError::Transient(e.to_string()),
            StoreError::Open { .. }
            | StoreError::AlreadyExists(_)
            | StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::Corrupt { .. } => StepError::Fatal(e.to_string()),
        }
    }
}

fn backend_step_error(e: BackendError) -> StepError {
    match e {
        // No audit, no step: the job waits until the audit key is usable again.
        BackendError::Unavailable(_) | BackendError::Overloaded | BackendError::HmacKey { .. } => {
            StepError::Transient(e.to_string())
        }
        BackendError::InvalidWrapped
        | BackendError::KekNotFound { .. }
        | BackendError::KekRefused { .. }
        | BackendError::PinRejected(_)
        | BackendError::Config(_)
        | BackendError::Internal(_) => StepError::Fatal(e.to_string()),
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
    /// Jobs driven by this process.
    running: std::sync::Mutex<BTreeMap<JobId, tokio::task::JoinHandle<()>>>,
}

impl<B, S> std::fmt::Debug for Lifecycle<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<B, S> Drop for Lifecycle<B, S> {
    /// Stops the job tasks; what they did is persisted, and the next start resumes them.
    fn drop(&mut self) {
        let running = std::mem::take(
            &mut *self
                .running
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (_, task) in running {
            task.abort();
        }
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
            running: std::sync::Mutex::new(BTreeMap::new()),
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
                if !self.is_driven(&job.id) {
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
        self.spawn(job.clone());
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
        self.spawn(job.clone());
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

    async fn destroy_kek_locked(&self, version: KekVersion) -> Result<(), LifecycleError> {
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

    /// KEK versions, DEK counts per version, jobs and the cache, with `hsm` (the backend's
    /// state and counters, which the caller reads from its metrics).
    ///
    /// # Errors
    /// `Backend` when the HSM cannot list its KEK versions; `Store`.
    pub async fn status(&self, hsm: HsmStatus) -> Result<StatusResponse, LifecycleError> {
        let current = self.svc.backend().current_kek();
        let in_hsm: BTreeSet<KekVersion> = self
            .svc
            .backend()
            .kek_versions()
            .await?
            .into_iter()
            .collect();
        let records: BTreeMap<KekVersion, KekVersionRecord> = self
            .svc
            .store()
            .kek_versions()
            .await?
            .into_iter()
            .map(|r| (r.version, r))
            .collect();
        let (per_version, active, destroyed) = self.census().await?;
        let mut versions: BTreeSet<KekVersion> = in_hsm.clone();
        versions.extend(records.keys().copied());
        versions.extend(per_version.keys().copied());
        let versions = versions
            .into_iter()
            .map(|v| KekVersionStatus {
                version: v,
                state: match records.get(&v).map(|r| r.state) {
                    Some(KekState::Retired) => "retired",
                    Some(KekState::Destroyed) => "destroyed",
                    Some(KekState::Active) | None => "active",
                }
                .to_owned(),
                in_hsm: in_hsm.contains(&v),
                deks: per_version.get(&v).copied().unwrap_or(0),
                current: v == current.version,
            })
            .collect();
        let all = self.svc.store().jobs().await?;
        let mut jobs: Vec<Job> = all
            .iter()
            .filter(|j| !j.state.is_final())
            .cloned()
            .collect();
        let mut finished: Vec<Job> = all.into_iter().filter(|j| j.state.is_final()).collect();
        finished.sort_by_key(|j| std::cmp::Reverse((j.finished_at, j.created_at)));
        jobs.extend(finished.into_iter().take(FINISHED_IN_STATUS));
        Ok(StatusResponse {
            kek_id: current.id,
            current_version: current.version,
            versions,
            active_deks: active,
            destroyed_deks: destroyed,
            jobs,
            cache: CacheStatus {
                entries: self.svc.cache().len() as u64,
                max_entries: self.svc.cache().max_entries() as u64,
                ttl_secs: self.svc.cache().ttl().as_secs(),
            },
            hsm,
            key_memory: key_memory(),
            alerts: service_kit::alerts::current(),
        })
    }

    /// Active DEKs per KEK version, active and destroyed totals.
    async fn census(&self) -> Result<(BTreeMap<KekVersion, u64>, u64, u64), StoreError> {
        let mut per_version = BTreeMap::new();
        let (mut active, mut destroyed) = (0, 0);
        self.for_each_record(|r| match &r.state {
            KeyState::Active { .. } => {
                active += 1;
                *per_version.entry(record_version(r)).or_insert(0) += 1;
            }
            KeyState::Destroyed { .. } => destroyed += 1,
        })
        .await?;
        Ok((per_version, active, destroyed))
    }

    /// Active records wrapped under `version` (by the record or by the blob's header; a blob
    /// whose header cannot be read counts too: it cannot be shown not to depend on it).
    async fn count_dependents(&self, version: KekVersion) -> Result<u64, StoreError> {
        let mut n = 0;
        self.for_each_record(|r| {
            if let KeyState::Active { wrapped } = &r.state {
                let under = match parse_wrapped_header(wrapped) {
                    Ok(h) => h.kek_version == version,
                    Err(_) => true,
                };
                if r.kek_version == version || under {
                    n += 1;
                }
            }
        })
        .await?;
        Ok(n)
    }

    /// Calls `f` on every key record, in key-id order, a page at a time.
    async fn for_each_record(&self, mut f: impl FnMut(&KeyRecord)) -> Result<(), StoreError> {
        let mut after: Option<KeyId> = None;
        loop {
            let page = self.svc.store().list(after.as_ref(), 1024).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key_id.clone());
            page.iter().for_each(&mut f);
        }
        Ok(())
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

    fn is_driven(&self, id: &JobId) -> bool {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .is_some_and(|t| !t.is_finished())
    }

    /// Drives `job` on a task of its own unless this process already does (the task gives up
    /// at once when another replica holds the job's lease).
    fn ensure_driven(self: &Arc<Self>, job: &Job) {
        if !self.is_driven(&job.id) {
            self.spawn(job.clone());
        }
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

    fn spawn(self: &Arc<Self>, job: Job) {
        let id = job.id.clone();
        // The task holds a weak reference: dropping the engine (shutdown) ends it.
        let me = Arc::downgrade(self);
        let task = tokio::spawn(async move { drive(me, job).await });
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.retain(|_, t| !t.is_finished());
        running.insert(id, task);
    }

    /// One step of `job`; the caller persists the job after it.
    async fn step(&self, job: &mut Job) -> Result<(), StepError> {
        match job.state {
            JobState::CreatingKek => self.step_create(job).await,
            JobState::Rewrapping => self.step_rewrap(job).await,
            JobState::Verifying => self.step_verify(job).await,
            JobState::Succeeded | JobState::Failed => Ok(()),
        }
    }

    async fn step_create(&self, job: &mut Job) -> Result<(), StepError> {
        let JobKind::RotateKek { target } = job.kind else {
            return Err(StepError::Fatal("only a rotation creates a KEK".into()));
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
                .map_err(|e| StepError::Transient(e.to_string()))?;
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

    async fn step_rewrap(&self, job: &mut Job) -> Result<(), StepError> {
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
    async fn prepare_rewrap(
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
    async fn rewrap_alone(&self, key_id: KeyId, current: &KekRef) -> Result<Rewrap, StepError> {
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
        Err(StepError::Transient(format!(
            "key {key_id} kept changing while being rewrapped"
        )))
    }

    async fn step_verify(&self, job: &mut Job) -> Result<(), StepError> {
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

    async fn verify_one(&self, rec: KeyRecord) -> Result<Verified, StepError> {
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
    async fn finish_verification(&self, job: &mut Job) -> Result<(), StepError> {
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
    async fn step_audit(&self, ev: AuditEvent) -> Result<(), StepError> {
        self.svc
            .audit(ev)
            .await
            .map_err(|e| StepError::Transient(e.to_string()))
    }

    /// Marks every version below `target` that is still active as retired.
    async fn retire_below(&self, target: KekVersion) -> Result<(), StepError> {
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
/// The key arena of this process, for `status`.
fn key_memory() -> kms_api::admin::KeyMemory {
    let m = service_kit::locked::status();
    kms_api::admin::KeyMemory {
        locked: m.locking == service_kit::locked::Locking::Locked,
        slots: m.slots as u64,
        in_use: m.in_use as u64,
        unlocked_keys: m.unlocked_keys,
    }
}

fn note_failure(p: &mut JobProgress, key: KeyId) {
    p.failed += 1;
    if p.failed_keys.len() < MAX_FAILED_KEYS {
        p.failed_keys.push(key);
    }
}

/// The KEK version an active record is under (its blob's header is authoritative).
fn record_version(r: &KeyRecord) -> KekVersion {
    match &r.state {
        KeyState::Active { wrapped } => {
            parse_wrapped_header(wrapped).map_or(r.kek_version, |h| h.kek_version)
        }
        KeyState::Destroyed { .. } => r.kek_version,
    }
}

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
async fn drive<B: KeyBackend, S: KeyStore>(engine: std::sync::Weak<Lifecycle<B, S>>, job: Job) {
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
    let mut backoff = FIRST_BACKOFF;
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
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                    Err(StoreError::LeaseLost(_)) => return Err(Lost::Lease),
                    Err(e) => {
                        // The step's own writes are idempotent: redoing it is safe.
                        tracing::warn!(job = %job.id, error = %e, "cannot record job progress; retrying");
                    }
                }
            }
            Err(StepError::Transient(why)) => {
                tracing::warn!(job = %job.id, state = ?job.state, error = %why, "lifecycle job paused; retrying");
            }
            Err(StepError::Fatal(why)) => {
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
        let resume_at = tokio::time::Instant::now() + backoff;
        while tokio::time::Instant::now() < resume_at {
            tokio::time::sleep_until(resume_at.min(tokio::time::Instant::now() + renew_every))
                .await;
            let me = engine.upgrade().ok_or(Lost::Shutdown)?;
            keep_lease(&me, &id).await?;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cache::{CacheMetrics, DekCache};
    use crate::keystore::lmdb::LmdbStore;
    use crate::metrics::StoreMetrics;
    use crate::testing::MockBackend;
    use kms_api::ThreadId;

    struct Fixture {
        dir: tempfile::TempDir,
        backend: Arc<MockBackend>,
        svc: Arc<KeyService<MockBackend, LmdbStore>>,
    }

    fn fixture_in(dir: tempfile::TempDir, backend: Arc<MockBackend>) -> Fixture {
        let store = LmdbStore::open(dir.path(), 64, StoreMetrics::unregistered()).unwrap();
        // No cache: every decrypt unwraps the stored blob, so the tests see what rewrap wrote.
        let cache = DekCache::new(Duration::from_secs(60), 0, CacheMetrics::default());
        let svc = Arc::new(KeyService::new(Arc::clone(&backend), store, cache));
        Fixture { dir, backend, svc }
    }

    fn fixture() -> Fixture {
        fixture_in(tempfile::tempdir().unwrap(), Arc::new(MockBackend::new()))
    }

    fn opts() -> LifecycleOptions {
        LifecycleOptions {
            concurrency: 3,
            batch: 7,
            ..LifecycleOptions::default()
        }
    }

    /// `n` DEKs, each with one ciphertext of its own key id.
    async fn seed(f: &Fixture, n: usize) -> Vec<(KeyId, Vec<u8>)> {
        let mut out = Vec::new();
        for i in 0..n {
            let k = f
                .svc
                .create_dek_for_thread(ThreadId::parse(&format!("t{i}")).unwrap(), None)
                .await
                .unwrap();
            let ct = f
                .svc
                .encrypt(&k.key_id, k.key_id.as_str().as_bytes(), b"aad")
                .await
                .unwrap();
            out.push((k.key_id, ct.ciphertext));
        }
        out
    }

    async fn wait_final(lc: &Lifecycle<MockBackend, LmdbStore>, id: &JobId) -> Job {
        for _ in 0..2000 {
            let j = lc.job(id).await.unwrap();
            if j.state.is_final() {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("job {id} did not finish");
    }

    async fn all_decrypt(f: &Fixture, keys: &[(KeyId, Vec<u8>)]) {
        for (k, ct) in keys {
            let p = f.svc.decrypt(k, ct, b"aad").await.unwrap();
            assert_eq!(p.expose(), k.as_str().as_bytes());
        }
    }

    async fn versions_of(f: &Fixture) -> BTreeMap<u32, u64> {
        let mut m = BTreeMap::new();
        for r in f.svc.store().list(None, usize::MAX).await.unwrap() {
            if let KeyState::Active { .. } = r.state {
                let v = record_version(&r);
                assert_eq!(v, r.kek_version, "record and blob agree");
                *m.entry(v.get()).or_insert(0) += 1;
            }
        }
        m
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_rewraps_verifies_and_retires() {
        let f = fixture();
        let keys = seed(&f, 40).await;
        f.svc.destroy_key(&keys[3].0).await.unwrap();
        let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
        let (job, started) = lc.rotate_kek().await.unwrap();
        assert!(started);
        assert_eq!(
            job.kind,
            JobKind::RotateKek {
                target: KekVersion::new(2).unwrap()
            }
        );
        // Asked again while it runs (or just after): the same job, not a second rotation.
        let (again, started_again) = lc.rotate_kek().await.unwrap();
        if !started_again {
            assert_eq!(again.id, job.id);
        }
        let done = wait_final(&lc, &job.id).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(done.progress.rewrapped, 39);
        assert_eq!(f.backend.rewraps(), 39, "each DEK rewrapped exactly once");
        assert_eq!(done.progress.failed, 0);
        assert_eq!(done.progress.verified, 39);
        assert_eq!(done.progress.per_version, BTreeMap::from([(2, 39)]));
        assert_eq!(f.backend.current_kek().version.get(), 2);
        assert_eq!(versions_of(&f).await, BTreeMap::from([(2, 39)]));
        let live: Vec<_> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, k)| k.clone())
            .collect();
        all_decrypt(&f, &live).await;
        // New DEKs are under the new version.
        let new = seed(&f, 1).await;
        all_decrypt(&f, &new).await;
        let status = lc.status(HsmStatus::default()).await.unwrap();
        assert_eq!(status.current_version.get(), 2);
        let v1 = status
            .versions
            .iter()
            .find(|v| v.version.get() == 1)
            .unwrap();
        assert_eq!(
            (v1.state.as_str(), v1.deks, v1.in_hsm),
            ("retired", 0, true)
        );
        let v2 = status
            .versions
            .iter()
            .find(|v| v.version.get() == 2)
            .unwrap();
        assert_eq!(
            (v2.state.as_str(), v2.deks, v2.current),
            ("active", 40, true)
        );
        assert_eq!((status.active_deks, status.destroyed_deks), (40, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_rotation_resumes_and_ends_consistent() {
        let f = fixture();
        let keys = seed(&f, 60).await;
        let (dir, backend) = {
            let lc = Lifecycle::new(
                Arc::clone(&f.svc),
                LifecycleOptions {
                    concurrency: 2,
                    batch: 5,
                    ..LifecycleOptions::default()
                },
            );
            let (job, _) = lc.rotate_kek().await.unwrap();
            // Let it get part of the way, then "kill" it: the engine and its tasks go away
            // wherever they are, like a SIGKILL (only what was committed remains).
            loop {
                let j = lc.job(&job.id).await.unwrap();
                if j.progress.rewrapped >= 15 || j.state.is_final() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(lc);
            let Fixture { dir, backend, svc } = f;
            // Every task held only a weak reference: the service (and the store) close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(svc);
            (dir, backend)
        };
        let f = fixture_in(dir, backend);
        let mid = versions_of(&f).await;
        assert_eq!(mid.values().sum::<u64>(), 60, "no record lost: {mid:?}");
        let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
        assert_eq!(
            lc.resume().await.unwrap(),
            usize::from(lc.jobs().await.unwrap().iter().any(|j| !j.state.is_final()))
        );
        let job = lc.jobs().await.unwrap().pop().unwrap();
        let done = wait_final(&lc, &job.id).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(versions_of(&f).await, BTreeMap::from([(2, 60)]));
        all_decrypt(&f, &keys).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_start_one_rotation_and_a_dead_drivers_job_is_taken_over() {
        let f = fixture();
        let keys = seed(&f, 40).await;
        f.backend.set_unwrap_delay_ms(10);
        let short = LifecycleOptions {
            concurrency: 1,
            batch: 1,
            lease: Duration::from_millis(300),
            settle: Duration::ZERO,
        };
        // Two engines on one store and one HSM: two replicas.
        let a = Lifecycle::new(Arc::clone(&f.svc), short);
        let b = Lifecycle::new(Arc::clone(&f.svc), short);
        assert_ne!(a.holder(), b.holder());
        let (ra, rb) = tokio::join!(a.rotate_kek(), b.rotate_kek());
        let ((ja, started_a), (jb, started_b)) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ja.id, jb.id, "one rotation, seen by both");
        assert!(started_a ^ started_b, "exactly one started it");
        let id = ja.id.clone();
        // Exactly one drives it (the other's driver found the lease taken and stopped).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(a.is_driven(&id) ^ b.is_driven(&id));
        let (driver, other) = if a.is_driven(&id) { (a, b) } else { (b, a) };
        loop {
            let j = other.job(&id).await.unwrap();
            assert!(
                !j.state.is_final(),
                "the test needs the job still running: {j:?}"
            );
            if j.progress.rewrapped >= 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The driver dies without releasing anything; the other replica's watcher takes the
        // job over once the lease lapses, and finishes it.
        drop(driver);
        let watcher = tokio::spawn(Arc::clone(&other).watch());
        let done = wait_final(&other, &id).await;
        watcher.abort();
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(
            f.backend.kek_versions().await.unwrap().len(),
            2,
            "one new KEK"
        );
        assert_eq!(versions_of(&f).await, BTreeMap::from([(2, 40)]));
        all_decrypt(&f, &keys).await;
        // A write fenced by the dead driver's lease is refused now.
        let lease = job_lease(&id);
        let store = f.svc.store();
        assert!(matches!(
            store
                .put_job_leased(ja, &lease, "dead-replica", short.lease)
                .await,
            Err(StoreError::LeaseLost(_))
        ));
        assert_eq!(other.job(&id).await.unwrap().state, JobState::Succeeded);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_admin_role_is_exclusive_across_replicas() {
        let f = fixture();
        let short = LifecycleOptions {
            lease: Duration::from_millis(200),
            ..opts()
        };
        let a = Lifecycle::new(Arc::clone(&f.svc), short);
        let b = Lifecycle::new(Arc::clone(&f.svc), short);
        let held = a.admin_lock().await.unwrap();
        // b waits up to two leases, renewed by a all along, then gives up.
        let t = std::time::Instant::now();
        assert!(matches!(
            b.admin_lock().await,
            Err(LifecycleError::Busy { holder }) if holder.starts_with(a.holder())
        ));
        assert!(t.elapsed() >= Duration::from_millis(400));
        drop(held);
        // Released: b gets it at once.
        let t = std::time::Instant::now();
        let _g = b.admin_lock().await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn destroy_is_refused_until_retired_and_unused() {
        let f = fixture();
        let keys = seed(&f, 5).await;
        let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
        let v1 = KekVersion::FIRST;
        assert!(matches!(
            lc.destroy_kek(v1).await,
            Err(LifecycleError::KekNotRetired { .. })
        ));
        let (job, _) = lc.rotate_kek().await.unwrap();
        assert_eq!(wait_final(&lc, &job.id).await.state, JobState::Succeeded);
        let v2 = KekVersion::new(2).unwrap();
        assert!(matches!(
            lc.destroy_kek(v2).await,
            Err(LifecycleError::KekNotRetired { .. })
        ));
        // Plant a record that still depends on v1 (as a restore of an old backup would).
        let rec = f.svc.store().get(&keys[0].0).await.unwrap().unwrap();
        let old_blob = f.backend.generate_dek_under(&rec.key_id, v1);
        let planted = KeyRecord {
            kek_version: v1,
            state: KeyState::Active { wrapped: old_blob },
            ..rec.clone()
        };
        f.svc
            .store()
            .compare_and_swap(&rec, planted.clone())
            .await
            .unwrap();
        match lc.destroy_kek(v1).await {
            Err(LifecycleError::KekInUse { count, .. }) => assert_eq!(count, 1),
            other => panic!("{other:?}"),
        }
        f.svc.store().compare_and_swap(&planted, rec).await.unwrap();
        lc.destroy_kek(v1).await.unwrap();
        // Idempotent, and the version is gone from the backend.
        lc.destroy_kek(v1).await.unwrap();
        assert_eq!(f.backend.kek_versions().await.unwrap(), vec![v2]);
        let status = lc.status(HsmStatus::default()).await.unwrap();
        let s1 = status.versions.iter().find(|v| v.version == v1).unwrap();
        assert_eq!((s1.state.as_str(), s1.in_hsm), ("destroyed", false));
        all_decrypt(&f, &keys).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dek_that_does_not_unwrap_fails_the_job_and_retires_nothing() {
        let f = fixture();
        let keys = seed(&f, 6).await;
        // Tamper with one stored blob (flip a ciphertext byte).
        let rec = f.svc.store().get(&keys[2].0).await.unwrap().unwrap();
        let KeyState::Active { wrapped } = &rec.state else {
            panic!()
        };
        let mut bytes = wrapped.as_bytes().to_vec();
        bytes[20] ^= 1;
        let bad = KeyRecord {
            state: KeyState::Active {
                wrapped: kms_api::WrappedDek::new(bytes),
            },
            ..rec.clone()
        };
        f.svc.store().compare_and_swap(&rec, bad).await.unwrap();
        let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
        let (verify, _) = lc.verify().await.unwrap();
        let v = wait_final(&lc, &verify.id).await;
        assert_eq!(v.state, JobState::Failed);
        assert_eq!((v.progress.verified, v.progress.failed), (5, 1));
        assert_eq!(v.progress.failed_keys, vec![keys[2].0.clone()]);
        let (job, _) = lc.rotate_kek().await.unwrap();
        let done = wait_final(&lc, &job.id).await;
        assert_eq!(done.state, JobState::Failed, "{done:?}");
        assert!(done.progress.error.as_deref().unwrap().contains("1 DEK"));
        let records = f.svc.store().kek_versions().await.unwrap();
        assert!(
            records.iter().all(|r| r.state == KekState::Active),
            "nothing retired: {records:?}"
        );
        assert!(matches!(
            lc.destroy_kek(KekVersion::FIRST).await,
            Err(LifecycleError::KekNotRetired { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_hsm_outage_pauses_the_job_instead_of_failing_it() {
        let f = fixture();
        let keys = seed(&f, 12).await;
        f.backend.set_down(true);
        let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
        // The KEK versions cannot even be listed: nothing is started.
        assert!(matches!(
            lc.rotate_kek().await,
            Err(LifecycleError::Backend(_))
        ));
        f.backend.set_down(false);
        let (job, _) = lc.rotate_kek().await.unwrap();
        f.backend.set_down(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let paused = lc.job(&job.id).await.unwrap();
        assert!(!paused.state.is_final(), "{paused:?}");
        f.backend.set_down(false);
        let done = wait_final(&lc, &job.id).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        all_decrypt(&f, &keys).await;
        let _ = &f.dir;
    }
}

//! Server jobs: per-thread DEK rotation and the encryption of plain threads in place.
//!
//! ```text
//! migrating ──► verifying ──► destroying_old ──► succeeded
//!     │              └─ a migrated message does not decrypt ──► failed (the old key is kept)
//!     └─ the thread was deleted ──► failed
//! ```
//!
//! * **Start** ([`start`]): a new DEK is created in the KMS, then one transaction makes it the
//!   thread's key for every message from the next id on, keeps the old key as the retiring
//!   one (none for a plain thread) and stores the job (`job:<id>`). Posts and edits work at
//!   once: which key sealed which message follows [`crate::store::DekRotation`]'s rule, and
//!   the writer refuses a message sealed under a key the rule no longer names.
//! * **migrating**: messages before the start id and after the cursor are read in id order,
//!   a batch at a time; each is decrypted under the retiring key (or taken as it is, when
//!   plain) and encrypted under the new key (record format upgraded to the current one), in
//!   one batch call each way. The batch and the moved cursor are written in **one**
//!   transaction, each message by compare-and-swap on its stored bytes: an edit that raced
//!   the job wins and the job reads that message again. A message that already did not
//!   decrypt is left as it is and counted (`unreadable`).
//! * **verifying**: every message before the start id is decrypted under the new key.
//! * **destroying_old**: the retiring DEK is destroyed in the KMS, then the rotation state is
//!   cleared (in that order: a crash in between finds nothing left under the old key and
//!   destroys it again, which the KMS answers as done).
//!
//! The job record and the rotation state are persisted with every batch, so a job survives
//! a SIGKILL of the server: [`resume_all`] starts every unfinished job again at start-up.
//! KMS outages pause a job (with backoff); they never fail it.
//!
//! **Automatic rotation**: after a post, a thread whose key has sealed more than
//! `encryption.rotate_after_messages` messages (default 2^30, far below the 2^32
//! random-nonce bound of AES-GCM), or is older than `encryption.rotate_after_days` (0 =
//! never), gets the same job.

mod migrate;
use migrate::*;
use std::sync::Arc;

use kms_api::admin::JobId;
use kms_api::wire::{Bytes64, SecretBytes};
use kms_api::ThreadId;

use crate::error::ApiError;
use crate::ids::{MessageId, Timestamp};
use crate::provider::{DecryptItem, EncryptItem, ProviderError, ThreadKey};
use crate::service::MessageService;
use crate::store::aad::{message_aad, MessageBinding};
use crate::store::{
    Content, FinishRotation, JobKind, JobProgress, JobRecord, JobState, MessageRecord,
    MigrateBatch, Migrated, PatchThread, PutJob, RecordFormat, ReviveJob, RotationStart, SealedBy,
    StartRotation, StoreError, ThreadRecord,
};

/// Messages per migration batch.
const BATCH: usize = 64;

/// Why a step stopped (`Pause`: the KMS or the store cannot serve now; `Fail`: the job ends
/// `failed`).
use service_kit::jobs::StepError as Step;

impl From<StoreError> for Step {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full
            | StoreError::Closed
            | StoreError::Lmdb(_)
            | StoreError::Unavailable(_) => Step::Pause(e.to_string()),
            StoreError::NotFound
            | StoreError::Conflict(_)
            | StoreError::NotAuthor
            | StoreError::StaleKey
            | StoreError::ThreadLimit
            | StoreError::Corrupt(_) => Step::Fail(e.to_string()),
        }
    }
}

fn provider_step(e: ProviderError) -> Step {
    match e {
        ProviderError::Unavailable(m) => Step::Pause(m),
        other => Step::Fail(other.to_string()),
    }
}

/// A batch call's results, which must be one per item (`n`).
fn one_per_item<T>(r: Result<Vec<T>, ProviderError>, n: usize) -> Result<Vec<T>, Step> {
    let results = r.map_err(provider_step)?;
    if results.len() == n {
        Ok(results)
    } else {
        Err(Step::Pause(
            "the KMS answered a batch with the wrong number of results".into(),
        ))
    }
}

/// Starts a rotation of `thread`'s DEK (`kind` = [`JobKind::RotateDek`]) or the encryption
/// of a plain thread ([`JobKind::EncryptThread`]), or returns the job already running on it
/// (`started = false`).
///
/// # Errors
/// 404 for an unknown thread; 409 `already_encrypted` for `EncryptThread` on a thread that
/// has a key and no plain messages; 503 when the KMS cannot create the new DEK (nothing
/// changed).
pub async fn start(
    svc: &Arc<MessageService>,
    thread: &ThreadId,
    kind: JobKind,
    reason: &str,
) -> Result<(JobRecord, bool), ApiError> {
    let rec = svc
        .store
        .get_thread(thread)
        .await?
        .ok_or(ApiError::NotFound)?;
    if let Some(r) = &rec.rotation {
        let job = svc.store.get_job(&r.job).await?.ok_or(ApiError::Internal)?;
        if job.state == JobState::Failed {
            // A failed job leaves its rotation in place (messages are under both keys): asked
            // again, it runs again from its cursor instead of wedging the thread.
            let mut again = job;
            again.state = JobState::Migrating;
            again.error = None;
            again.finished_at = None;
            again.progress.verified = 0;
            again.updated_at = Timestamp::now();
            svc.store.write(ReviveJob(again.clone())).await?;
            tracing::info!(job = %again.id, thread = %thread, "failed DEK rotation started again");
            ensure_driven(svc, &again);
            return Ok((again, true));
        }
        ensure_driven(svc, &job);
        return Ok((job, false));
    }
    if kind == JobKind::EncryptThread && rec.kms.is_some() && rec.plain_migration.is_none() {
        return Err(ApiError::AlreadyEncrypted);
    }
    let provider = svc.provider.as_ref().ok_or(ApiError::KmsUnavailable)?;
    let new_key = provider.create_dek_for_thread(thread).await.map_err(|e| {
        tracing::warn!(thread = %thread, error = %e, "cannot create the new DEK");
        ApiError::KmsUnavailable
    })?;
    let now = Timestamp::now();
    let id = JobId::from_random(rand::random());
    let start = svc.ids.next();
    let total = svc.store.count_messages(thread, start).await?;
    let job = JobRecord {
        id: id.clone(),
        kind,
        thread: thread.clone(),
        state: JobState::Migrating,
        progress: JobProgress {
            total,
            ..JobProgress::default()
        },
        old_key_id: None,
        new_key_id: new_key.key_id.clone(),
        error: None,
        reason: reason.to_owned(),
        created_at: now,
        updated_at: now,
        finished_at: None,
    };
    let outcome = svc
        .store
        .write(StartRotation {
            thread: thread.clone(),
            new_key: new_key.clone(),
            start,
            job,
        })
        .await;
    svc.cache.invalidate(thread);
    match outcome {
        Ok(RotationStart::Started(job)) => {
            tracing::info!(job = %job.id, thread = %thread, kind = ?kind, reason, "DEK rotation started");
            ensure_driven(svc, &job);
            Ok((job, true))
        }
        Ok(RotationStart::Running(other)) => {
            // Another request started one first: ours is unused.
            discard(svc, new_key);
            let job = svc.store.get_job(&other).await?.ok_or(ApiError::Internal)?;
            ensure_driven(svc, &job);
            Ok((job, false))
        }
        Err(e) => {
            discard(svc, new_key);
            Err(e.into())
        }
    }
}

fn discard(svc: &Arc<MessageService>, key: ThreadKey) {
    let svc = Arc::clone(svc);
    tokio::spawn(async move {
        if let Some(p) = &svc.provider {
            if let Err(e) = p.destroy_key(&key).await {
                tracing::warn!(key_id = %key.key_id, error = %e, "cannot destroy an unused DEK");
            }
        }
    });
}

/// Starts every unfinished job again (at start-up).
///
/// # Errors
/// A store error reading the jobs.
pub async fn resume_all(svc: &Arc<MessageService>) -> Result<usize, StoreError> {
    let mut n = 0;
    for job in svc.store.jobs().await? {
        if !job.state.is_final() {
            tracing::info!(job = %job.id, thread = %job.thread, state = ?job.state, "resuming server job");
            ensure_driven(svc, &job);
            n += 1;
        }
    }
    Ok(n)
}

/// After a post: starts an automatic rotation when the thread's key is past the policy
/// (`thread` is the record as the post left it).
pub fn maybe_rotate(svc: &Arc<MessageService>, thread: &ThreadRecord) {
    if thread.kms.is_none() || thread.rotation.is_some() {
        return;
    }
    let policy = svc.rotation_policy;
    let by_count = thread.sealed > policy.after_messages;
    let by_age = policy.after_age.is_some_and(|age| {
        let since = thread.key_since.unwrap_or(thread.created_at);
        Timestamp::now().as_nanos().saturating_sub(since.as_nanos())
            > u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)
    });
    if !(by_count || by_age) {
        return;
    }
    let Some(slot) = svc.running.reserve(policy.max_running) else {
        tracing::debug!(thread = %thread.id, max = policy.max_running, "automatic DEK rotation deferred: as many jobs run as encryption.max_concurrent_rotations allows");
        return;
    };
    let (svc, id) = (Arc::clone(svc), thread.id.clone());
    let reason = if by_count {
        "automatic: message count"
    } else {
        "automatic: key age"
    };
    tokio::spawn(async move {
        // Held until `start` has handed the job to its driver (or failed).
        let _slot = slot;
        if let Err(e) = start(&svc, &id, JobKind::RotateDek, reason).await {
            tracing::warn!(thread = %id, error = ?e, "automatic DEK rotation did not start; the next post retries");
        }
    });
}

fn ensure_driven(svc: &Arc<MessageService>, job: &JobRecord) {
    if job.state.is_final() {
        return;
    }
    let id = job.id.clone();
    let driver = Arc::clone(svc);
    let job = job.clone();
    svc.running
        .driven
        .start(&id, async move { drive(&driver, job).await });
}

async fn drive(svc: &Arc<MessageService>, mut job: JobRecord) {
    let mut backoff = service_kit::jobs::Backoff::new();
    while !job.state.is_final() {
        match step(svc, &mut job).await {
            Ok(()) => backoff.reset(),
            Err(Step::Pause(why)) => {
                tracing::warn!(job = %job.id, state = ?job.state, error = %why, "server job paused; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
            }
            Err(Step::Fail(why)) => {
                tracing::error!(job = %job.id, state = ?job.state, error = %why, "server job failed");
                job.state = JobState::Failed;
                job.error = Some(why);
                job.finished_at = Some(Timestamp::now());
                job.updated_at = Timestamp::now();
                if let Err(e) = svc.store.write(PutJob(job.clone())).await {
                    tracing::error!(job = %job.id, error = %e, "cannot record the job's failure");
                }
                return;
            }
        }
    }
}

/// One step; `job` is what was persisted after it.
async fn step(svc: &Arc<MessageService>, job: &mut JobRecord) -> Result<(), Step> {
    let Some(thread) = svc.store.get_thread(&job.thread).await? else {
        return Err(Step::Fail("the thread was deleted".into()));
    };
    let Some(rot) = thread.rotation.clone() else {
        // Finished by an earlier run that stopped before its job record said so.
        if job.state == JobState::DestroyingOld {
            finish(svc, job).await?;
            return Ok(());
        }
        return Err(Step::Fail("the thread has no rotation by this job".into()));
    };
    if rot.job != job.id {
        return Err(Step::Fail("another job owns the thread's rotation".into()));
    }
    match job.state {
        JobState::Migrating => migrate_batch(svc, &thread, job).await,
        JobState::Verifying => verify(svc, &thread, job).await,
        JobState::DestroyingOld => {
            reseal_meta(svc, &thread).await?;
            if let (Some(old), Some(p)) = (&rot.retiring, &svc.provider) {
                match p.destroy_key(old).await {
                    // A key destroyed by an earlier run is answered as destroyed again.
                    Ok(()) => {}
                    // A key the KMS never made: the rotation record was forged or edited,
                    // and the thread's real old DEK is not shown to be destroyed.
                    Err(ProviderError::UnknownKey) => {
                        svc.metrics.kms.shred_failures.inc();
                        return Err(Step::Fail(
                            "the KMS does not know the retiring DEK: it cannot be shown to be \
                             destroyed"
                                .into(),
                        ));
                    }
                    Err(e) => return Err(provider_step(e)),
                }
            }
            finish(svc, job).await
        }
        JobState::Succeeded | JobState::Failed => Ok(()),
    }
}

/// Before the retiring key goes: the thread's title and metadata sealed under its current
/// key (they were sealed under the retiring one, or, for a thread that had none, stored
/// plain). Done when the stored record says so: a concurrent patch seals under the current
/// key too (the writer refuses any other), and a conflict reads the record again.
async fn reseal_meta(svc: &Arc<MessageService>, thread: &ThreadRecord) -> Result<(), Step> {
    let Some(p) = &svc.provider else {
        return Err(Step::Pause("no key provider is configured".into()));
    };
    let mut thread = thread.clone();
    for _ in 0..8 {
        let Some(key) = thread.kms.clone() else {
            return Ok(());
        };
        if thread
            .sealed_meta
            .as_ref()
            .is_some_and(|s| s.key_id == key.key_id)
        {
            return Ok(());
        }
        let opened = crate::meta::open(Some(p.as_ref()), thread.clone())
            .await
            .map_err(|e| match e {
                ProviderError::Unavailable(m) => Step::Pause(m),
                other => Step::Fail(format!(
                    "the thread's sealed metadata does not open ({other}); the old key is kept"
                )),
            })?;
        let sealed = crate::meta::seal(p.as_ref(), &key, &opened)
            .await
            .map_err(provider_step)?;
        let op = PatchThread {
            id: thread.id.clone(),
            title: None,
            slug: None,
            metadata: None,
            sealed: Some((thread.sealed_meta.clone(), sealed)),
            // Not an edit: `updated_at` stays.
            now: thread.updated_at,
        };
        let r = svc.store.write(op).await;
        svc.cache.invalidate(&thread.id);
        match r {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict(_)) => {
                thread = svc
                    .store
                    .get_thread(&thread.id)
                    .await?
                    .ok_or_else(|| Step::Fail("the thread was deleted".into()))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Step::Pause(
        "the thread's metadata kept changing; sealing it again later".into(),
    ))
}

async fn finish(svc: &Arc<MessageService>, job: &mut JobRecord) -> Result<(), Step> {
    let mut done = job.clone();
    done.state = JobState::Succeeded;
    done.finished_at = Some(Timestamp::now());
    done.updated_at = Timestamp::now();
    svc.store
        .write(FinishRotation {
            thread: job.thread.clone(),
            job: done.clone(),
        })
        .await?;
    svc.cache.invalidate(&job.thread);
    tracing::info!(job = %job.id, thread = %job.thread, migrated = done.progress.migrated, "DEK rotation finished; the old DEK is destroyed");
    *job = done;
    Ok(())
}

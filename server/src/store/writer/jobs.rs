//! The writes of a thread's DEK rotation or encryption job: its start, each migrated batch,
//! its end, and its record (persisted, revived, and the server's key copies refreshed).

use kms_api::ThreadId;

use super::{keys, records, StoreError};
use crate::ids::MessageId;
use crate::provider::ThreadKey;

use super::*;

/// Reads a job record.
pub(super) fn read_job(
    kv: &(impl KvRead + ?Sized),
    id: &kms_api::admin::JobId,
) -> KvResult<Option<Result<records::JobRecord, StoreError>>> {
    Ok(kv.get(&keys::job(id))?.map(|v| {
        serde_json::from_slice::<records::JobRecord>(&v).map_err(|e| {
            StoreError::Corrupt(format!(
                "job record: {}",
                crate::store::serde_error_text(&e)
            ))
        })
    }))
}

/// Outcome of [`StartRotation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationStart {
    Started(records::JobRecord),
    /// A rotation of this thread is running already: its job.
    Running(kms_api::admin::JobId),
}

/// Begins a DEK rotation (or, for a thread without a key, its encryption): `new_key` becomes
/// the thread's key for every message from `start` on, the old key (if any) is kept as the
/// retiring one, and the job record is stored, all in one transaction.
#[derive(Debug)]
pub struct StartRotation {
    pub thread: ThreadId,
    pub new_key: ThreadKey,
    pub start: MessageId,
    pub job: records::JobRecord,
}

impl WriteOp for StartRotation {
    type Out = RotationStart;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<RotationStart, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let mut rec = match read_thread(kv, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        if let Some(r) = &rec.rotation {
            return Ok(Ok(RotationStart::Running(r.job.clone())));
        }
        let mut job = self.job.clone();
        job.old_key_id = rec.kms.as_ref().map(|k| k.key_id.clone());
        // Every message stored so far was sealed under the old key, including one whose id
        // was taken after `self.start` by a post that committed before this transaction: the
        // new key starts after all of them.
        let start = match newest_message(kv, &self.thread)? {
            Some(newest) if newest >= self.start => newest.successor(),
            _ => self.start,
        };
        rec.rotation = Some(records::DekRotation {
            job: job.id.clone(),
            retiring: rec.kms.take(),
            start,
            cursor: None,
        });
        rec.kms = Some(self.new_key.clone());
        rec.sealed = 0;
        rec.key_since = Some(self.job.created_at);
        let (value, job_value) = match (to_json(&rec), to_json(&job)) {
            (Ok(v), Ok(j)) => (v, j),
            (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
        };
        kv.put(&meta_key, &value)?;
        kv.put(&keys::job(&job.id), &job_value)?;
        Ok(Ok(RotationStart::Started(job)))
    }
}

/// One message the job looked at: the record as it read it (raw) and its re-encrypted form,
/// or `None` when it is left as it is (it did not decrypt). Every scanned message is listed,
/// so the cursor never passes one that changed after the job read it.
#[derive(Debug)]
pub struct Migrated {
    pub id: MessageId,
    pub expected: Vec<u8>,
    pub new: Option<Vec<u8>>,
}

/// Writes a batch of migrated messages and moves the rotation's cursor past them, in one
/// transaction. Messages are applied in id order up to the first one that changed since the
/// job read it (an edit, or a delete); the cursor stops just before it, so the job reads it
/// again. Returns how many were applied. `NotFound` when the thread or its rotation by this
/// job is gone.
#[derive(Debug)]
pub struct MigrateBatch {
    pub thread: ThreadId,
    pub job: records::JobRecord,
    pub items: Vec<Migrated>,
    /// The last id the job looked at (messages it did not list were deleted meanwhile).
    pub scanned_to: MessageId,
}

impl WriteOp for MigrateBatch {
    type Out = usize;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<usize, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let mut rec = match read_thread(kv, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        let Some(rot) = rec.rotation.as_mut() else {
            return Ok(Err(StoreError::NotFound));
        };
        if rot.job != self.job.id {
            return Ok(Err(StoreError::Conflict(
                "another rotation owns this thread",
            )));
        }
        let mut applied = 0;
        let mut left = 0u64;
        let mut stopped = false;
        let mut cursor = self.scanned_to;
        for m in &self.items {
            let key = keys::msg(&self.thread, m.id);
            match kv.get(&key)? {
                Some(current) if current == m.expected.as_slice() => match &m.new {
                    Some(new) => {
                        kv.put(&key, new)?;
                        applied += 1;
                    }
                    // A tombstone has nothing to migrate and is not an unreadable message
                    // (the verification's allowance counts only those).
                    None if records::is_tombstone_bytes(&current) => {}
                    None => left += 1,
                },
                // Deleted since the job read it: nothing to migrate.
                None => {}
                Some(_) => {
                    // Changed meanwhile (an edit): stop before it; the job reads it again.
                    stopped = true;
                    cursor = match m.id.predecessor() {
                        Some(p) => p,
                        None => return Ok(Ok(0)),
                    };
                    break;
                }
            }
        }
        if !matches!(rot.cursor, Some(c) if cursor <= c) {
            rot.cursor = Some(cursor);
        }
        let mut job = self.job.clone();
        job.progress.migrated += applied as u64;
        job.progress.unreadable += left;
        if stopped {
            job.progress.conflicts += 1;
        }
        let (value, job_value) = match (to_json(&rec), to_json(&job)) {
            (Ok(v), Ok(j)) => (v, j),
            (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
        };
        kv.put(&meta_key, &value)?;
        kv.put(&keys::job(&job.id), &job_value)?;
        Ok(Ok(applied))
    }
}

/// Ends a rotation: the retiring key is forgotten (the caller destroyed it in the KMS first),
/// every message is under the thread's key, so the plain-migration boundary goes too; the
/// job is marked succeeded. Idempotent.
#[derive(Debug)]
pub struct FinishRotation {
    pub thread: ThreadId,
    pub job: records::JobRecord,
}

impl WriteOp for FinishRotation {
    type Out = ();
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<(), StoreError>> {
        let meta_key = keys::meta(&self.thread);
        if let Some(Ok(mut rec)) = read_thread(kv, &meta_key)? {
            if rec.rotation.as_ref().is_some_and(|r| r.job == self.job.id) {
                rec.rotation = None;
                rec.plain_migration = None;
                match to_json(&rec) {
                    Ok(v) => kv.put(&meta_key, &v)?,
                    Err(e) => return Ok(Err(e)),
                }
            }
        }
        match to_json(&self.job) {
            Ok(v) => kv.put(&keys::job(&self.job.id), &v)?,
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(()))
    }
}

/// Stores (creates or replaces) a job record, unless it is final already.
#[derive(Debug)]
pub struct PutJob(pub records::JobRecord);

impl WriteOp for PutJob {
    type Out = ();
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<(), StoreError>> {
        if let Some(Ok(j)) = read_job(kv, &self.0.id)? {
            if j.state.is_final() {
                return Ok(Ok(()));
            }
        }
        match to_json(&self.0) {
            Ok(v) => kv.put(&keys::job(&self.0.id), &v)?,
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(()))
    }
}

/// Replaces the thread's copy of its key (`kms`) by `fresh` when it names the same key id
/// (after a KEK rotation the KMS holds the DEK wrapped anew); returns whether it changed.
#[derive(Debug)]
pub struct RefreshKeyCopy {
    pub thread: ThreadId,
    pub fresh: ThreadKey,
}

impl WriteOp for RefreshKeyCopy {
    type Out = bool;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<bool, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let mut rec = match read_thread(kv, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        match &rec.kms {
            Some(k) if k.key_id == self.fresh.key_id && *k != self.fresh => {}
            _ => return Ok(Ok(false)),
        }
        rec.kms = Some(self.fresh.clone());
        match to_json(&rec) {
            Ok(v) => kv.put(&meta_key, &v)?,
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(true))
    }
}

/// Replaces a job record even when it is final: a failed job asked to run again.
#[derive(Debug)]
pub struct ReviveJob(pub records::JobRecord);

impl WriteOp for ReviveJob {
    type Out = ();
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<(), StoreError>> {
        match to_json(&self.0) {
            Ok(v) => kv.put(&keys::job(&self.0.id), &v)?,
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(()))
    }
}

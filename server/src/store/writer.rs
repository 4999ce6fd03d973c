//! The server's write operations, run by the shared group-commit writer
//! ([`service_kit::group_commit`]: one thread, one transaction per group, map growth).
//!
//! Each [`WriteOp`] validates before it writes: a logical failure (thread not found, key
//! exists) is returned to its caller and leaves the shared transaction untouched, so other
//! writes of the same group commit are unaffected. An LMDB failure aborts the whole group;
//! every caller of that group gets the error and nothing of it was written.

use std::ops::Bound;

use heed::RwTxn;
use kms_api::ThreadId;
use service_kit::group_commit::{CommitError, Write};
use tokio::sync::oneshot;

use super::kv::lmdb::LmdbWrite;
use super::kv::{KvError, KvRead, KvResult, KvWrite};
use super::{keys, records, Db, StoreError};
use crate::ids::{MessageId, Timestamp, UserId};
use crate::provider::ThreadKey;
use records::{PlainMigration, ThreadRecord};

mod jobs;
mod messages;

pub use jobs::*;
pub use messages::*;

/// One write. `apply` runs inside the writer's shared transaction and may run more than once
/// (a group is retried after the map grew), so it must depend only on `self` and the txn.
pub trait WriteOp: Send + 'static {
    type Out: Send + 'static;

    /// Returns `Ok(Err(_))` for a logical failure, having written nothing; `Err(_)` for a
    /// failure of the database, which aborts the group.
    ///
    /// # Errors
    /// [`KvError`] from the database.
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<Self::Out, StoreError>>;
}

/// A write waiting in a backend's queue: applied in the group's transaction (perhaps more
/// than once, when the group is tried again), then told how the group's commit went.
pub(crate) trait Queued: Send {
    /// Applies the op; `Err` aborts the group.
    ///
    /// # Errors
    /// [`KvError`] from the database.
    fn apply(&mut self, kv: &mut dyn KvWrite) -> KvResult<()>;

    /// Answers the caller: the op's own result when the group committed, else `commit`'s
    /// error.
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

/// A queued op with its reply channel.
struct Pending<O: WriteOp> {
    op: O,
    result: Option<Result<O::Out, StoreError>>,
    reply: oneshot::Sender<Result<O::Out, StoreError>>,
}

/// `op` as a queued write.
pub(crate) fn pending<O: WriteOp>(
    op: O,
    reply: oneshot::Sender<Result<O::Out, StoreError>>,
) -> Box<dyn Queued> {
    Box::new(Pending {
        op,
        result: None,
        reply,
    })
}

impl<O: WriteOp> Queued for Pending<O> {
    fn apply(&mut self, kv: &mut dyn KvWrite) -> KvResult<()> {
        self.result = Some(self.op.apply(kv)?);
        Ok(())
    }

    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        let answer = match (commit, self.result) {
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(StoreError::Lmdb("write was not applied".into())),
            (Err(e), _) => Err(e),
        };
        // The caller may have gone away (client disconnected): the write stands regardless.
        let _ = self.reply.send(answer);
    }
}

/// A queued write as the shared LMDB group-commit writer takes it.
pub(crate) struct LmdbQueued {
    pub(crate) db: Db,
    pub(crate) inner: Box<dyn Queued>,
}

impl Write for LmdbQueued {
    fn apply(&mut self, txn: &mut RwTxn<'_>) -> heed::Result<()> {
        match self.inner.apply(&mut LmdbWrite { db: self.db, txn }) {
            Ok(()) => Ok(()),
            Err(KvError::Lmdb(e)) => Err(e),
            // (LMDB's transaction raises no other kind.)
            Err(e @ (KvError::Postgres(_) | KvError::Pool(_))) => {
                Err(heed::Error::Io(std::io::Error::other(e.to_string())))
            }
        }
    }

    fn finish(self: Box<Self>, commit: Result<(), CommitError>) {
        self.inner.finish(commit.map_err(|e| match e {
            CommitError::MapFull | CommitError::NoSpace(_) => StoreError::Full,
            CommitError::Lmdb(m) => StoreError::Lmdb(m),
        }));
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("cannot encode record: {e}")))
}

fn read_thread(
    kv: &(impl KvRead + ?Sized),
    key: &[u8],
) -> KvResult<Option<Result<ThreadRecord, StoreError>>> {
    Ok(kv.get(key)?.map(|v| super::scan::parse_thread(key, &v)))
}

/// Stores a new thread and its author index entry. Fails with `Conflict` if the id exists,
/// and with `ThreadLimit` when its author has `max_per_author` threads already (counted in
/// the same transaction, so concurrent creates cannot pass the bound together).
#[derive(Debug)]
pub struct CreateThread {
    record: ThreadRecord,
    max_per_author: ThreadsPerAuthor,
}

/// How many threads one author may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadsPerAuthor {
    Unlimited,
    AtMost(usize),
}

impl CreateThread {
    pub fn new(record: ThreadRecord, max_per_author: ThreadsPerAuthor) -> Self {
        Self {
            record,
            max_per_author,
        }
    }
}

/// Whether `user` has at least `max` threads (counting at most `max` index keys).
pub(super) fn author_has_at_least(
    kv: &(impl KvRead + ?Sized),
    user: &UserId,
    max: usize,
) -> KvResult<bool> {
    let (lo, hi) = keys::author_index_bounds(user);
    let n = kv
        .range(
            Bound::Included(lo.as_slice()),
            Bound::Excluded(hi.as_slice()),
        )?
        .take(max)
        .count();
    Ok(n >= max)
}

impl WriteOp for CreateThread {
    type Out = ();
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<(), StoreError>> {
        let key = keys::meta(&self.record.id);
        if kv.get(&key)?.is_some() {
            return Ok(Err(StoreError::Conflict("thread id exists")));
        }
        if let ThreadsPerAuthor::AtMost(max) = self.max_per_author {
            if author_has_at_least(kv, &self.record.author, max)? {
                return Ok(Err(StoreError::ThreadLimit));
            }
        }
        let value = match to_json(&self.record) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        kv.put(&key, &value)?;
        kv.put(
            &keys::author_index(&self.record.author, &self.record.id),
            &[],
        )?;
        Ok(Ok(()))
    }
}

/// Revokes every signature of `user` made so far: its signature generation goes up by one;
/// returns the new generation.
#[derive(Debug)]
pub struct RevokeSignatures {
    pub user: UserId,
}

impl WriteOp for RevokeSignatures {
    type Out = u64;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<u64, StoreError>> {
        let key = keys::signature_generation(&self.user);
        let current = match kv.get(&key)? {
            None => 0,
            Some(v) => match std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
            {
                Some(g) => g,
                None => {
                    return Ok(Err(StoreError::Corrupt(format!(
                        "{}'s signature generation",
                        self.user
                    ))))
                }
            },
        };
        let next = current.saturating_add(1);
        kv.put(&key, next.to_string().as_bytes())?;
        Ok(Ok(next))
    }
}

/// Renames a thread and/or replaces its metadata; returns the new record.
#[derive(Debug)]
pub struct PatchThread {
    pub id: ThreadId,
    pub title: Option<String>,
    /// `Some(None)` removes the slug.
    pub slug: Option<Option<String>>,
    /// `Some(None)` removes the metadata.
    pub metadata: Option<Option<records::RawJson>>,
    /// A sealed thread's new title and metadata, written only over the sealed part given
    /// first (else `Conflict`: another patch came between).
    pub sealed: Option<(Option<records::SealedMeta>, records::SealedMeta)>,
    pub now: Timestamp,
}

impl WriteOp for PatchThread {
    type Out = ThreadRecord;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<ThreadRecord, StoreError>> {
        let key = keys::meta(&self.id);
        let mut rec = match read_thread(kv, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        match &self.sealed {
            None => {
                // Plain title and metadata only for a thread without a key: one that got a
                // key since the caller read it stores them sealed.
                if rec.kms.is_some() || rec.sealed_meta.is_some() {
                    return Ok(Err(StoreError::Conflict("the thread has a key now")));
                }
                if let Some(t) = &self.title {
                    rec.title.clone_from(t);
                }
                if let Some(s) = &self.slug {
                    rec.slug.clone_from(s);
                }
                if let Some(m) = &self.metadata {
                    rec.metadata.clone_from(m);
                }
            }
            Some((expected, new)) => {
                // Only over the sealed part the caller opened, and only under the thread's
                // key now (a seal under a key a rotation is retiring would be shredded with
                // it).
                if rec.sealed_meta != *expected
                    || rec.kms.as_ref().map(|k| &k.key_id) != Some(&new.key_id)
                {
                    return Ok(Err(StoreError::Conflict("the thread's metadata changed")));
                }
                rec.title.clear();
                rec.slug = None;
                rec.metadata = None;
                rec.sealed_meta = Some(new.clone());
            }
        }
        rec.updated_at = self.now.max(rec.updated_at);
        let value = match to_json(&rec) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        kv.put(&key, &value)?;
        Ok(Ok(rec))
    }
}

/// Gives a thread created without encryption its DEK, unless it has one already; returns
/// the record (with whichever key it ends up with). When the thread already holds messages
/// (stored plain), it also records the [`PlainMigration`] boundary: the id after its newest
/// message, so those plain records stay readable and any later plain record is refused.
#[derive(Debug)]
pub struct SetThreadKeyIfAbsent {
    pub id: ThreadId,
    pub key: ThreadKey,
}

impl WriteOp for SetThreadKeyIfAbsent {
    type Out = ThreadRecord;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<ThreadRecord, StoreError>> {
        let key = keys::meta(&self.id);
        let mut rec = match read_thread(kv, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        if rec.kms.is_some() {
            return Ok(Ok(rec));
        }
        let newest = newest_message(kv, &self.id)?;
        if let Some(last) = newest {
            let plain_before = last.successor();
            tracing::info!(
                thread = %self.id,
                plain_before = %plain_before,
                "thread gets its DEK: messages before this id stay readable in plain form"
            );
            rec.plain_migration = Some(PlainMigration { plain_before });
        }
        rec.kms = Some(self.key.clone());
        let value = match to_json(&rec) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        kv.put(&key, &value)?;
        Ok(Ok(rec))
    }
}

/// The id of the newest message of `thread`, if any.
fn newest_message(kv: &(impl KvRead + ?Sized), thread: &ThreadId) -> KvResult<Option<MessageId>> {
    let prefix = keys::msg_prefix(thread);
    let end = keys::msg_end(thread);
    let range = (
        Bound::Included(prefix.as_slice()),
        Bound::Excluded(end.as_slice()),
    );
    for r in kv.rev_range(range.0, range.1)? {
        let (k, _) = r?;
        if let Some(id) = keys::parse_msg(&prefix, &k) {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Deletes a thread: its meta, every message and its index entry, in one transaction.
/// Returns the deleted record.
#[derive(Debug)]
pub struct DeleteThread {
    pub id: ThreadId,
}

impl WriteOp for DeleteThread {
    type Out = ThreadRecord;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<ThreadRecord, StoreError>> {
        let key = keys::meta(&self.id);
        let rec = match read_thread(kv, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        let lo = keys::thread_prefix(&self.id);
        let hi = keys::thread_end(&self.id);
        kv.delete_range(
            Bound::Included(lo.as_slice()),
            Bound::Excluded(hi.as_slice()),
        )?;
        kv.delete(&keys::author_index(&rec.author, &self.id))?;
        Ok(Ok(rec))
    }
}

/// Writes raw pairs in one write (one transaction): `store copy`'s pages.
#[derive(Debug)]
pub struct RawPuts(pub Vec<(Vec<u8>, Vec<u8>)>);

impl WriteOp for RawPuts {
    type Out = ();
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<(), StoreError>> {
        for (k, v) in &self.0 {
            kv.put(k, v)?;
        }
        Ok(Ok(()))
    }
}

/// Writes raw bytes under a raw key: for operator tools and tests only.
#[derive(Debug)]
pub struct RawPut {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl WriteOp for RawPut {
    type Out = ();
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<(), StoreError>> {
        kv.put(&self.key, &self.value)?;
        Ok(Ok(()))
    }
}

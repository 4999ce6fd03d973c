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
use serde_json::Value;
use service_kit::group_commit::{CommitError, Observer, Write};
use tokio::sync::oneshot;

use super::{keys, records, Db, StoreError};
use crate::ids::{MessageId, Timestamp, UserId};
use crate::metrics::StoreMetrics;
use crate::provider::ThreadKey;
use records::{Content, MessageRecord, PlainMigration, RecordFormat, ThreadRecord};

/// One write. `apply` runs inside the writer's shared transaction and may run more than once
/// (a group is retried after the map grew), so it must depend only on `self` and the txn.
pub trait WriteOp: Send + 'static {
    type Out: Send + 'static;

    /// Returns `Ok(Err(_))` for a logical failure, having written nothing; `Err(_)` for an
    /// LMDB failure, which aborts the group.
    ///
    /// # Errors
    /// [`heed::Error`] from LMDB.
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<Self::Out, StoreError>>;
}

/// A queued op with its reply channel and the database it writes to.
struct Pending<O: WriteOp> {
    op: O,
    db: Db,
    result: Option<Result<O::Out, StoreError>>,
    reply: oneshot::Sender<Result<O::Out, StoreError>>,
}

/// `op` as a write for the shared group-commit writer.
pub(crate) fn pending<O: WriteOp>(
    op: O,
    db: Db,
    reply: oneshot::Sender<Result<O::Out, StoreError>>,
) -> Box<dyn Write> {
    Box::new(Pending {
        op,
        db,
        result: None,
        reply,
    })
}

impl<O: WriteOp> Write for Pending<O> {
    fn apply(&mut self, txn: &mut RwTxn<'_>) -> heed::Result<()> {
        self.result = Some(self.op.apply(&self.db, txn)?);
        Ok(())
    }

    fn finish(self: Box<Self>, commit: Result<(), CommitError>) {
        let answer = match (commit, self.result) {
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(StoreError::Lmdb("write was not applied".into())),
            (Err(CommitError::MapFull), _) => Err(StoreError::Full),
            (Err(CommitError::Lmdb(m)), _) => Err(StoreError::Lmdb(m)),
        };
        // The caller may have gone away (client disconnected): the write stands regardless.
        let _ = self.reply.send(answer);
    }
}

/// Store metrics and logs for the group-commit writer.
pub(crate) struct StoreObserver(pub(crate) StoreMetrics);

impl Observer for StoreObserver {
    fn committed(&self, writes: usize, took: std::time::Duration) {
        self.0.commits.inc();
        self.0.commit_ops.observe(writes as f64);
        self.0.commit_duration.observe(took.as_secs_f64());
    }

    fn failed(&self, error: &CommitError, writes: usize) {
        self.0.write_errors.inc();
        match error {
            CommitError::MapFull => {
                tracing::warn!(writes, "LMDB map is full at store.max_map_size_mb")
            }
            CommitError::Lmdb(_) => tracing::error!(error = %error, writes, "group commit failed"),
        }
    }

    fn resized(&self, bytes: usize) {
        self.0.resizes.inc();
        self.0
            .map_size_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("cannot encode record: {e}")))
}

fn read_thread(
    db: &Db,
    txn: &RwTxn<'_>,
    key: &[u8],
) -> heed::Result<Option<Result<ThreadRecord, StoreError>>> {
    Ok(db.get(txn, key)?.map(|v| {
        serde_json::from_slice::<ThreadRecord>(v)
            .map_err(|e| StoreError::Corrupt(format!("thread record: {}", e.classify_text())))
    }))
}

/// Stores a new thread and its author index entry. Fails with `Conflict` if the id exists.
#[derive(Debug)]
pub struct CreateThread {
    record: ThreadRecord,
}

impl CreateThread {
    pub fn new(record: ThreadRecord) -> Self {
        Self { record }
    }
}

impl WriteOp for CreateThread {
    type Out = ();
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        let key = keys::meta(&self.record.id);
        if db.get(txn, &key)?.is_some() {
            return Ok(Err(StoreError::Conflict("thread id exists")));
        }
        let value = match to_json(&self.record) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        db.put(txn, &key, &value)?;
        db.put(
            txn,
            &keys::author_index(&self.record.author, &self.record.id),
            &[],
        )?;
        Ok(Ok(()))
    }
}

/// Renames a thread and/or replaces its metadata; returns the new record.
#[derive(Debug)]
pub struct PatchThread {
    pub id: ThreadId,
    pub title: Option<String>,
    /// `Some(None)` removes the metadata.
    pub metadata: Option<Option<Value>>,
    pub now: Timestamp,
}

impl WriteOp for PatchThread {
    type Out = ThreadRecord;
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<ThreadRecord, StoreError>> {
        let key = keys::meta(&self.id);
        let mut rec = match read_thread(db, txn, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        if let Some(t) = &self.title {
            rec.title.clone_from(t);
        }
        if let Some(m) = &self.metadata {
            rec.metadata.clone_from(m);
        }
        rec.updated_at = self.now.max(rec.updated_at);
        let value = match to_json(&rec) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        db.put(txn, &key, &value)?;
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
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<ThreadRecord, StoreError>> {
        let key = keys::meta(&self.id);
        let mut rec = match read_thread(db, txn, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        if rec.kms.is_some() {
            return Ok(Ok(rec));
        }
        let newest = newest_message(db, txn, &self.id)?;
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
        db.put(txn, &key, &value)?;
        Ok(Ok(rec))
    }
}

/// The id of the newest message of `thread`, if any.
fn newest_message(db: &Db, txn: &RwTxn<'_>, thread: &ThreadId) -> heed::Result<Option<MessageId>> {
    let prefix = keys::msg_prefix(thread);
    let end = keys::msg_end(thread);
    let range = (
        Bound::Included(prefix.as_slice()),
        Bound::Excluded(end.as_slice()),
    );
    for r in db.rev_range(txn, &range)? {
        let (k, _) = r?;
        if let Some(id) = keys::parse_msg(&prefix, k) {
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
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<ThreadRecord, StoreError>> {
        let key = keys::meta(&self.id);
        let rec = match read_thread(db, txn, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        let lo = keys::thread_prefix(&self.id);
        let hi = keys::thread_end(&self.id);
        db.delete_range(
            txn,
            &(
                Bound::Included(lo.as_slice()),
                Bound::Excluded(hi.as_slice()),
            ),
        )?;
        db.delete(txn, &keys::author_index(&rec.author, &self.id))?;
        Ok(Ok(rec))
    }
}

/// Stores a new message of an existing thread. `NotFound` if the thread is gone (so no
/// message outlives a deleted thread), `Conflict` if the id is taken.
#[derive(Debug)]
pub struct PutMessage {
    thread: ThreadId,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl PutMessage {
    /// # Errors
    /// [`StoreError::Corrupt`] if the record cannot be encoded.
    pub fn new(
        thread: &ThreadId,
        id: MessageId,
        record: &MessageRecord,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            thread: thread.clone(),
            key: keys::msg(thread, id),
            value: to_json(record)?,
        })
    }
}

impl WriteOp for PutMessage {
    type Out = ();
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        if db.get(txn, &keys::meta(&self.thread))?.is_none() {
            return Ok(Err(StoreError::NotFound));
        }
        if db.get(txn, &self.key)?.is_some() {
            return Ok(Err(StoreError::Conflict("message id exists")));
        }
        db.put(txn, &self.key, &self.value)?;
        Ok(Ok(()))
    }
}

/// Who may change a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorRule {
    /// Any caller that may see the thread (backend and admin keys).
    Anyone,
    /// Only the message's author (frontend keys).
    OnlyAuthor(UserId),
    /// No one (a frontend principal without a user; cannot happen after authentication).
    Nobody,
}

impl AuthorRule {
    /// Whether a message written by `author` may be changed under this rule.
    pub fn allows(&self, author: &UserId) -> bool {
        match self {
            AuthorRule::Anyone => true,
            AuthorRule::OnlyAuthor(u) => u == author,
            AuthorRule::Nobody => false,
        }
    }
}

/// Replaces a message's content (keeps author and creation time); returns the new record.
///
/// The new content was sealed for the author and creation time the caller read
/// (`sealed_for`); if the stored record no longer has them the write is refused with
/// `Conflict`, so a ciphertext is never stored next to metadata it is not bound to.
#[derive(Debug)]
pub struct UpdateMessage {
    pub thread: ThreadId,
    pub id: MessageId,
    pub content: Content,
    pub format: RecordFormat,
    pub sealed_for: (UserId, Timestamp),
    pub rule: AuthorRule,
    pub now: Timestamp,
}

fn read_message(
    db: &Db,
    txn: &RwTxn<'_>,
    key: &[u8],
) -> heed::Result<Option<Result<MessageRecord, StoreError>>> {
    Ok(db.get(txn, key)?.map(|v| {
        serde_json::from_slice::<MessageRecord>(v)
            .map_err(|e| StoreError::Corrupt(format!("message record: {}", e.classify_text())))
    }))
}

/// serde_json error text without the input it may quote.
trait ClassifyText {
    fn classify_text(&self) -> String;
}

impl ClassifyText for serde_json::Error {
    fn classify_text(&self) -> String {
        format!(
            "{:?} error at line {} column {}",
            self.classify(),
            self.line(),
            self.column()
        )
    }
}

impl WriteOp for UpdateMessage {
    type Out = MessageRecord;
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<MessageRecord, StoreError>> {
        let key = keys::msg(&self.thread, self.id);
        let mut rec = match read_message(db, txn, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(r)) => r,
        };
        if !self.rule.allows(&rec.author) {
            return Ok(Err(StoreError::NotAuthor));
        }
        if (&rec.author, rec.created_at) != (&self.sealed_for.0, self.sealed_for.1) {
            return Ok(Err(StoreError::Conflict(
                "message metadata changed while it was being re-encrypted",
            )));
        }
        rec.content = self.content.clone();
        rec.format = self.format;
        rec.updated_at = self.now.max(rec.updated_at);
        let value = match to_json(&rec) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        db.put(txn, &key, &value)?;
        Ok(Ok(rec))
    }
}

/// Deletes one message; returns its record (`None` if it did not parse). Under
/// [`AuthorRule::OnlyAuthor`] a record that does not parse cannot be shown to be the caller's,
/// so it is refused with `NotAuthor`.
#[derive(Debug)]
pub struct DeleteMessage {
    pub thread: ThreadId,
    pub id: MessageId,
    pub rule: AuthorRule,
}

impl WriteOp for DeleteMessage {
    type Out = Option<MessageRecord>;
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<Option<MessageRecord>, StoreError>> {
        let key = keys::msg(&self.thread, self.id);
        let rec = match read_message(db, txn, &key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(r) => r.ok(),
        };
        let allowed = match (&self.rule, &rec) {
            (AuthorRule::Anyone, _) => true,
            (rule, Some(r)) => rule.allows(&r.author),
            (AuthorRule::OnlyAuthor(_) | AuthorRule::Nobody, None) => false,
        };
        if !allowed {
            return Ok(Err(StoreError::NotAuthor));
        }
        db.delete(txn, &key)?;
        Ok(Ok(rec))
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
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        db.put(txn, &self.key, &self.value)?;
        Ok(Ok(()))
    }
}

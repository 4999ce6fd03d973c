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
            (Err(CommitError::MapFull | CommitError::NoSpace(_)), _) => Err(StoreError::Full),
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
            CommitError::NoSpace(_) => tracing::error!(
                error = %error,
                writes,
                alert = "disk_full",
                "the store's file system is full: writes answer 507 until space is freed"
            ),
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
        serde_json::from_slice::<ThreadRecord>(v).map_err(|e| {
            StoreError::Corrupt(format!("thread record: {}", super::serde_error_text(&e)))
        })
    }))
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
pub fn author_has_at_least(
    db: &Db,
    txn: &heed::RoTxn<'_, heed::WithoutTls>,
    user: &UserId,
    max: usize,
) -> heed::Result<bool> {
    let (lo, hi) = keys::author_index_bounds(user);
    let n = db
        .range(
            txn,
            &(
                Bound::Included(lo.as_slice()),
                Bound::Excluded(hi.as_slice()),
            ),
        )?
        .take(max)
        .count();
    Ok(n >= max)
}

impl WriteOp for CreateThread {
    type Out = ();
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        let key = keys::meta(&self.record.id);
        if db.get(txn, &key)?.is_some() {
            return Ok(Err(StoreError::Conflict("thread id exists")));
        }
        if let ThreadsPerAuthor::AtMost(max) = self.max_per_author {
            if author_has_at_least(db, txn, &self.record.author, max)? {
                return Ok(Err(StoreError::ThreadLimit));
            }
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

/// Revokes every signature of `user` made so far: its signature generation goes up by one;
/// returns the new generation.
#[derive(Debug)]
pub struct RevokeSignatures {
    pub user: UserId,
}

impl WriteOp for RevokeSignatures {
    type Out = u64;
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<u64, StoreError>> {
        let key = keys::signature_generation(&self.user);
        let current = match db.get(txn, &key)? {
            None => 0,
            Some(v) => match std::str::from_utf8(v)
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
        db.put(txn, &key, next.to_string().as_bytes())?;
        Ok(Ok(next))
    }
}

/// Renames a thread and/or replaces its metadata; returns the new record.
#[derive(Debug)]
pub struct PatchThread {
    pub id: ThreadId,
    pub title: Option<String>,
    /// `Some(None)` removes the metadata.
    pub metadata: Option<Option<records::RawJson>>,
    /// A sealed thread's new title and metadata, written only over the sealed part given
    /// first (else `Conflict`: another patch came between).
    pub sealed: Option<(Option<records::SealedMeta>, records::SealedMeta)>,
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
                rec.metadata = None;
                rec.sealed_meta = Some(new.clone());
            }
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
/// message outlives a deleted thread), `Conflict` if the id is taken, and
/// [`StoreError::StaleKey`] if the content was not sealed by the key the thread's rotation
/// rule names for this id now (the caller re-reads the thread and seals again).
#[derive(Debug)]
pub struct PutMessage {
    thread: ThreadId,
    id: MessageId,
    key: Vec<u8>,
    value: Vec<u8>,
    sealed_with: Option<kms_api::KeyId>,
}

impl PutMessage {
    /// `sealed_with`: the key id the content is encrypted under (`None`: plain).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the record cannot be encoded.
    pub fn new(
        thread: &ThreadId,
        id: MessageId,
        record: &MessageRecord,
        sealed_with: Option<kms_api::KeyId>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            thread: thread.clone(),
            id,
            key: keys::msg(thread, id),
            value: to_json(record)?,
            sealed_with,
        })
    }
}

/// Checks that content sealed with `sealed_with` is what `thread`'s rule names for `id`, and
/// counts the seal against the current key. Returns the record to write back (when counted).
fn check_seal(
    thread: &ThreadRecord,
    id: MessageId,
    sealed_with: Option<&kms_api::KeyId>,
) -> Result<Option<ThreadRecord>, StoreError> {
    let expected = thread.sealed_by(id);
    if expected.key_id() != sealed_with {
        return Err(StoreError::StaleKey);
    }
    // Plain content never enters a thread that has a DEK, whatever its rotation says.
    if sealed_with.is_none() && thread.kms.is_some() {
        return Err(StoreError::StaleKey);
    }
    match (&thread.kms, sealed_with) {
        (Some(k), Some(used)) if &k.key_id == used => {
            let mut t = thread.clone();
            t.sealed = t.sealed.saturating_add(1);
            Ok(Some(t))
        }
        _ => Ok(None),
    }
}

impl WriteOp for PutMessage {
    /// The thread's updated [`ThreadRecord`] when the seal was counted against its key.
    type Out = Option<ThreadRecord>;
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<Option<ThreadRecord>, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let thread = match read_thread(db, txn, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(t)) => t,
        };
        if db.get(txn, &self.key)?.is_some() {
            return Ok(Err(StoreError::Conflict("message id exists")));
        }
        // During a rotation the messages before its start are a fixed set the job walks:
        // a new message there (an id taken before the rotation began) would be passed over.
        if thread.rotation.as_ref().is_some_and(|r| self.id < r.start) {
            return Ok(Err(StoreError::StaleKey));
        }
        let counted = match check_seal(&thread, self.id, self.sealed_with.as_ref()) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(t) = &counted {
            match to_json(t) {
                Ok(v) => db.put(txn, &meta_key, &v)?,
                Err(e) => return Ok(Err(e)),
            }
        }
        db.put(txn, &self.key, &self.value)?;
        Ok(Ok(counted))
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

/// Replaces a message's content (keeps author and creation time, counts one more edit at
/// `updated_at`); returns the new record.
///
/// The new content was sealed for the author, creation time and edit count the caller read
/// (`sealed_for`), plus one edit at `updated_at`; if the stored record no longer has them (an
/// edit landed in between) the write is refused with `Conflict`, so a ciphertext is never
/// stored next to an edit state it is not bound to, and no edit is lost unseen.
#[derive(Debug)]
pub struct UpdateMessage {
    pub thread: ThreadId,
    pub id: MessageId,
    pub content: Content,
    pub format: RecordFormat,
    /// Author, creation time and edit count of the record the content was sealed against.
    pub sealed_for: (UserId, Timestamp, u32),
    /// When this edit was made (not before the stored `updated_at`).
    pub updated_at: Timestamp,
    /// The key id `content` is encrypted under (`None`: plain); checked like
    /// [`PutMessage`]'s.
    pub sealed_with: Option<kms_api::KeyId>,
    pub rule: AuthorRule,
}

fn read_message(
    db: &Db,
    txn: &RwTxn<'_>,
    key: &[u8],
) -> heed::Result<Option<Result<MessageRecord, StoreError>>> {
    Ok(db.get(txn, key)?.map(|v| {
        serde_json::from_slice::<MessageRecord>(v).map_err(|e| {
            StoreError::Corrupt(format!("message record: {}", super::serde_error_text(&e)))
        })
    }))
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
        let (author, created_at, edits) = &self.sealed_for;
        if (&rec.author, rec.created_at, rec.edits) != (author, *created_at, *edits)
            || rec.updated_at > self.updated_at
        {
            return Ok(Err(StoreError::Conflict(
                "the message changed while its edit was being encrypted",
            )));
        }
        let Some(next) = rec.edits.checked_add(1) else {
            return Ok(Err(StoreError::Conflict("the edit count is exhausted")));
        };
        let meta_key = keys::meta(&self.thread);
        let thread = match read_thread(db, txn, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(t)) => t,
        };
        match check_seal(&thread, self.id, self.sealed_with.as_ref()) {
            Ok(Some(t)) => match to_json(&t) {
                Ok(v) => db.put(txn, &meta_key, &v)?,
                Err(e) => return Ok(Err(e)),
            },
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        rec.content = self.content.clone();
        rec.format = self.format;
        rec.updated_at = self.updated_at;
        rec.edits = next;
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

/// Reads a job record.
fn read_job(
    db: &Db,
    txn: &RwTxn<'_>,
    id: &kms_api::admin::JobId,
) -> heed::Result<Option<Result<records::JobRecord, StoreError>>> {
    Ok(db.get(txn, &keys::job(id))?.map(|v| {
        serde_json::from_slice::<records::JobRecord>(v).map_err(|e| {
            StoreError::Corrupt(format!("job record: {}", super::serde_error_text(&e)))
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
    fn apply(
        &self,
        db: &Db,
        txn: &mut RwTxn<'_>,
    ) -> heed::Result<Result<RotationStart, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let mut rec = match read_thread(db, txn, &meta_key)? {
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
        let start = match newest_message(db, txn, &self.thread)? {
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
        db.put(txn, &meta_key, &value)?;
        db.put(txn, &keys::job(&job.id), &job_value)?;
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
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<usize, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let mut rec = match read_thread(db, txn, &meta_key)? {
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
            match db.get(txn, &key)? {
                Some(current) if current == m.expected.as_slice() => match &m.new {
                    Some(new) => {
                        db.put(txn, &key, new)?;
                        applied += 1;
                    }
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
        db.put(txn, &meta_key, &value)?;
        db.put(txn, &keys::job(&job.id), &job_value)?;
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
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        let meta_key = keys::meta(&self.thread);
        if let Some(Ok(mut rec)) = read_thread(db, txn, &meta_key)? {
            if rec.rotation.as_ref().is_some_and(|r| r.job == self.job.id) {
                rec.rotation = None;
                rec.plain_migration = None;
                match to_json(&rec) {
                    Ok(v) => db.put(txn, &meta_key, &v)?,
                    Err(e) => return Ok(Err(e)),
                }
            }
        }
        match to_json(&self.job) {
            Ok(v) => db.put(txn, &keys::job(&self.job.id), &v)?,
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
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        if let Some(Ok(j)) = read_job(db, txn, &self.0.id)? {
            if j.state.is_final() {
                return Ok(Ok(()));
            }
        }
        match to_json(&self.0) {
            Ok(v) => db.put(txn, &keys::job(&self.0.id), &v)?,
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
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<bool, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let mut rec = match read_thread(db, txn, &meta_key)? {
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
            Ok(v) => db.put(txn, &meta_key, &v)?,
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
    fn apply(&self, db: &Db, txn: &mut RwTxn<'_>) -> heed::Result<Result<(), StoreError>> {
        match to_json(&self.0) {
            Ok(v) => db.put(txn, &keys::job(&self.0.id), &v)?,
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(()))
    }
}

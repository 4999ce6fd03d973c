//! The message writes: a post (checked against the thread's key for its id), an edit (sealed
//! for the record's current edit state), a delete, under the author rule of the caller.

use kms_api::ThreadId;

use super::{keys, records, StoreError};
use crate::ids::{MessageId, Timestamp, UserId};
use records::{Content, MessageRecord, RecordFormat, ThreadRecord};

use super::*;

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
pub(super) fn check_seal(
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
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<Option<ThreadRecord>, StoreError>> {
        let meta_key = keys::meta(&self.thread);
        let thread = match read_thread(kv, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(t)) => t,
        };
        if kv.get(&self.key)?.is_some() {
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
        let mut next = counted.clone().unwrap_or_else(|| thread.clone());
        next.live_messages = Some(live_messages(kv, &thread)?.saturating_add(1));
        match to_json(&next) {
            Ok(v) => kv.put(&meta_key, &v)?,
            Err(e) => return Ok(Err(e)),
        }
        kv.put(&self.key, &self.value)?;
        Ok(Ok(counted.map(|_| next)))
    }
}

/// How many live messages `thread` holds: its counter, or (a record from before the counter)
/// a count of its message keys that are not tombstones.
fn live_messages(kv: &(impl KvRead + ?Sized), thread: &ThreadRecord) -> KvResult<u64> {
    if let Some(n) = thread.live_messages {
        return Ok(n);
    }
    let (lo, hi) = (keys::msg_prefix(&thread.id), keys::msg_end(&thread.id));
    let mut n = 0u64;
    for r in kv.range(
        std::ops::Bound::Included(lo.as_slice()),
        std::ops::Bound::Excluded(hi.as_slice()),
    )? {
        let (_, v) = r?;
        if !records::is_tombstone_bytes(&v) {
            n += 1;
        }
    }
    Ok(n)
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

/// The message record at `key`; a tombstone is no message (`None`): it cannot be edited or
/// deleted again.
pub(super) fn read_message(
    kv: &(impl KvRead + ?Sized),
    key: &[u8],
) -> KvResult<Option<Result<MessageRecord, StoreError>>> {
    Ok(kv
        .get(key)?
        .and_then(|v| match serde_json::from_slice::<MessageRecord>(&v) {
            Ok(r) if r.is_tombstone() => None,
            Ok(r) => Some(Ok(r)),
            Err(e) => Some(Err(StoreError::Corrupt(format!(
                "message record: {}",
                crate::store::serde_error_text(&e)
            )))),
        }))
}

impl WriteOp for UpdateMessage {
    type Out = MessageRecord;
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<MessageRecord, StoreError>> {
        let key = keys::msg(&self.thread, self.id);
        let mut rec = match read_message(kv, &key)? {
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
        let thread = match read_thread(kv, &meta_key)? {
            None => return Ok(Err(StoreError::NotFound)),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(t)) => t,
        };
        match check_seal(&thread, self.id, self.sealed_with.as_ref()) {
            Ok(Some(t)) => match to_json(&t) {
                Ok(v) => kv.put(&meta_key, &v)?,
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
        kv.put(&key, &value)?;
        Ok(Ok(rec))
    }
}

/// Deletes one message: its record is replaced by its tombstone (no content,
/// [`MessageRecord::tombstone`]; a record that does not parse is removed); returns the record
/// it replaced (`None` if it did not parse). Under
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
    fn apply(&self, kv: &mut dyn KvWrite) -> KvResult<Result<Option<MessageRecord>, StoreError>> {
        let key = keys::msg(&self.thread, self.id);
        let rec = match read_message(kv, &key)? {
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
        // One live message fewer.
        let meta_key = keys::meta(&self.thread);
        if let Some(Ok(mut t)) = read_thread(kv, &meta_key)? {
            let live = live_messages(kv, &t)?;
            t.live_messages = Some(live.saturating_sub(1));
            match to_json(&t) {
                Ok(v) => kv.put(&meta_key, &v)?,
                Err(e) => return Ok(Err(e)),
            }
        }
        match &rec {
            Some(r) => match to_json(&r.clone().tombstone(Timestamp::now())) {
                Ok(v) => kv.put(&key, &v)?,
                Err(e) => return Ok(Err(e)),
            },
            None => {
                kv.delete(&key)?;
            }
        }
        Ok(Ok(rec))
    }
}

//! Stored records (JSON values of the LMDB keys in [`super::keys`]).
//!
//! A message record never holds its own id or thread id: both come from its key, so a record
//! copied under another key cannot claim to be the original (and its ciphertext, bound by AAD
//! to the original key, no longer decrypts).

use std::fmt;

use kms_api::wire::Bytes64;
use kms_api::ThreadId;
use serde::{Deserialize, Serialize};

use crate::ids::{MessageId, Timestamp, UserId};
use crate::provider::ThreadKey;

/// A JSON value kept as its text (compact JSON), never as a parsed tree: a thread's metadata
/// takes its own size in memory, not the many times more of a `serde_json::Value`. `Debug`
/// shows only its length: it is content.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// The compact JSON text of `v`.
    ///
    /// # Errors
    /// When `v` cannot be written as JSON (a map with non-string keys cannot occur in a
    /// `Value`, so in practice never).
    pub fn from_value(v: &serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(v).map(Self)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Bytes of JSON text.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawJson(<{} bytes>)", self.len())
    }
}

/// `thread:<id>:meta`. `Debug` shows neither the title nor the metadata: they are content.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadRecord {
    pub id: ThreadId,
    pub title: String,
    /// A human-friendly name for URLs (ProgressDB's `slug`); sealed with the title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
    pub author: UserId,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RawJson>,
    /// The thread's DEK as the KMS described it; absent for threads created with encryption
    /// disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<ThreadKey>,
    /// Set when a thread that was written with encryption off got its DEK later: messages
    /// older than this boundary may still be stored in plain form. Without it, a plain record
    /// in a thread that has a DEK is refused (it can only be a forgery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_migration: Option<PlainMigration>,
    /// A DEK rotation (or the encryption of a plain thread) in progress: see
    /// [`DekRotation`] for which key sealed which message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<DekRotation>,
    /// Messages sealed (posted or edited) under `kms` since it became the thread's key: the
    /// automatic rotation counts this against `encryption.rotate_after_messages`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sealed: u64,
    /// When `kms` became the thread's key (absent: when the thread was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_since: Option<Timestamp>,
    /// How many live messages (not tombstones) the thread holds, kept by every post and
    /// delete; absent in records written before it existed (counted on the next post). Only
    /// a listing's `total` reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_messages: Option<u64>,
    /// The title and metadata, encrypted under one of the thread's DEKs: then `title` is
    /// stored empty and `metadata` absent, and the server fills both in when it reads the
    /// record ([`crate::meta`]). Absent for threads without a DEK, and for records written
    /// before it existed (a rotation seals those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_meta: Option<SealedMeta>,
}

/// A thread's title and metadata as stored: AES-GCM under the DEK `key_id` (the thread's
/// key, or during a rotation the retiring one), bound to the thread by its AAD
/// ([`super::aad::thread_meta_aad`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMeta {
    pub key_id: kms_api::KeyId,
    pub ct: Bytes64,
}

impl fmt::Debug for SealedMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedMeta({}, <{} bytes>)",
            self.key_id,
            self.ct.0.len()
        )
    }
}

impl fmt::Debug for ThreadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadRecord")
            .field("id", &self.id)
            .field("title", &"<redacted>")
            .field("slug", &self.slug.as_ref().map(|_| "<redacted>"))
            .field("author", &self.author)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .field("metadata", &self.metadata.as_ref().map(|_| "<redacted>"))
            .field("kms", &self.kms)
            .field("rotation", &self.rotation)
            .field("sealed_meta", &self.sealed_meta)
            .finish_non_exhaustive()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The state of a DEK rotation of one thread, which decides without guessing which key
/// sealed each message (messages carry no key information):
///
/// * a message whose id is at or after `start` was written after the rotation began: sealed
///   under the thread's current key (`kms`);
/// * a message before `start` and at or before `cursor` has been migrated: current key;
/// * any other message (before `start`, after `cursor`) is not migrated yet: sealed under
///   `retiring`, or plain when `retiring` is `None` (a plain thread being encrypted).
///
/// The writer checks every new or edited message against this rule inside its transaction
/// (a writer that sealed under a stale key is refused and retries), and the migration moves
/// `cursor` in the same transaction as the messages it re-encrypted, so the rule is always
/// true of what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DekRotation {
    pub job: kms_api::admin::JobId,
    /// The key being retired; `None` when the thread was plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<ThreadKey>,
    pub start: MessageId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<MessageId>,
}

/// What a server job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A new DEK for a thread; every message re-encrypted under it; the old DEK destroyed.
    RotateDek,
    /// A thread stored plain gets a DEK; every message encrypted under it in place.
    EncryptThread,
}

/// Where a server job is. `succeeded` and `failed` are final; the others resume after a
/// restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Migrating,
    Verifying,
    DestroyingOld,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// Counters of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Messages to migrate when the job started (an estimate: posts go on).
    pub total: u64,
    /// Messages re-encrypted (or encrypted) under the new key.
    pub migrated: u64,
    /// Messages that already did not decrypt before migration (left as they are).
    pub unreadable: u64,
    /// Migrated messages decrypted again under the new key by the verification pass.
    pub verified: u64,
    /// Messages changed by an edit while they were being migrated (migrated again).
    pub conflicts: u64,
}

/// `job:<id>`: a server job, persisted after every batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: kms_api::admin::JobId,
    pub kind: JobKind,
    pub thread: ThreadId,
    pub state: JobState,
    pub progress: JobProgress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_key_id: Option<kms_api::KeyId>,
    pub new_key_id: kms_api::KeyId,
    /// Why it ended `failed`, or why it is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the job started: `admin` or `automatic` (a count or age limit).
    pub reason: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

/// Which key a message is sealed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedBy<'a> {
    Key(&'a ThreadKey),
    /// Stored plain (a thread without a DEK, or a not yet encrypted message of one).
    Plain,
}

impl SealedBy<'_> {
    /// The key id, if sealed under a key.
    pub fn key_id(&self) -> Option<&kms_api::KeyId> {
        match self {
            SealedBy::Key(k) => Some(&k.key_id),
            SealedBy::Plain => None,
        }
    }
}

/// The explicit, logged state that lets a thread with a DEK still hold plain messages: those
/// written before it got its key. Recorded by the store when it adds the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlainMigration {
    /// Messages whose ids sort before this one may be plain; later ones never are.
    pub plain_before: MessageId,
}

impl ThreadRecord {
    /// Whether a plain record stored under message `id` is acceptable in this thread: always in
    /// a thread without a DEK, and in one with a DEK only before its [`PlainMigration`]
    /// boundary.
    pub fn accepts_plain(&self, id: MessageId) -> bool {
        if let Some(r) = &self.rotation {
            if id >= r.start || r.cursor.is_some_and(|c| id <= c) {
                // New or migrated: never plain.
                return false;
            }
            if r.retiring.is_none() {
                return true;
            }
        }
        match (&self.kms, &self.plain_migration) {
            (None, _) => true,
            (Some(_), Some(m)) => id < m.plain_before,
            (Some(_), None) => false,
        }
    }

    /// The key that seals message `id` now, by the rule of [`DekRotation`].
    pub fn sealed_by(&self, id: MessageId) -> SealedBy<'_> {
        let current = match &self.kms {
            Some(k) => SealedBy::Key(k),
            None => SealedBy::Plain,
        };
        match &self.rotation {
            Some(r) if id < r.start && !matches!(r.cursor, Some(c) if id <= c) => match &r.retiring
            {
                Some(k) => SealedBy::Key(k),
                None => SealedBy::Plain,
            },
            _ => current,
        }
    }
}

/// Format of a message record, stored as `"v"` (absent in records written before it existed,
/// which are format 1). It decides what the ciphertext's AAD covers; see
/// [`crate::store::aad`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum RecordFormat {
    /// AAD = the message key only.
    #[default]
    V1,
    /// AAD = the message key, the author, the creation time and the thread's author,
    /// length-prefixed.
    V2,
    /// AAD = V2's fields, the time of the last write and the edit count.
    V3,
    /// AAD = V3's fields, the author's role and the message replied to.
    V4,
}

impl RecordFormat {
    /// The format of every new write.
    pub const CURRENT: RecordFormat = RecordFormat::V4;

    fn is_v1(&self) -> bool {
        *self == RecordFormat::V1
    }
}

impl Serialize for RecordFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(match self {
            RecordFormat::V1 => 1,
            RecordFormat::V2 => 2,
            RecordFormat::V3 => 3,
            RecordFormat::V4 => 4,
        })
    }
}

impl<'de> Deserialize<'de> for RecordFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            1 => Ok(RecordFormat::V1),
            2 => Ok(RecordFormat::V2),
            3 => Ok(RecordFormat::V3),
            4 => Ok(RecordFormat::V4),
            other => Err(serde::de::Error::custom(format!(
                "unknown message record format {other}"
            ))),
        }
    }
}

/// `thread:<id>:msg:<ts>-<seq>`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// Record format (absent = 1).
    #[serde(default, rename = "v", skip_serializing_if = "RecordFormat::is_v1")]
    pub format: RecordFormat,
    pub author: UserId,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Times the content was edited (absent = 0); bound into the V3 AAD with `updated_at`.
    #[serde(default, skip_serializing_if = "no_edits")]
    pub edits: u32,
    /// The author's role (`user`, `assistant`, ...), set when the message is posted; bound
    /// into the V4 AAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<MessageRole>,
    /// The message this one answers, set when it is posted; bound into the V4 AAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    pub content: Content,
}

impl MessageRecord {
    /// Whether this is a deleted message's tombstone.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.content, Content::Deleted)
    }

    /// The tombstone that replaces this record when the message is deleted at `now`: no
    /// content, and no role or reply (nothing binds them once the ciphertext is gone).
    #[must_use]
    pub fn tombstone(mut self, now: Timestamp) -> Self {
        self.content = Content::Deleted;
        self.role = None;
        self.reply_to = None;
        self.updated_at = now.max(self.updated_at);
        self
    }

    /// Whether the record's `role` and `reply_to` are covered by its ciphertext's AAD (or
    /// the record is plain, where nothing is): a record of a format before V4 that claims
    /// them was edited on disk, and is refused.
    pub fn attrs_bound(&self) -> bool {
        matches!(self.content, Content::Plain(_) | Content::Deleted)
            || self.format == RecordFormat::V4
            || (self.role.is_none() && self.reply_to.is_none())
    }
}

/// What a message is posted with besides its body: who the author speaks as, and which
/// message it answers. Both are fixed when the message is posted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageAttrs {
    pub role: Option<MessageRole>,
    pub reply_to: Option<MessageId>,
}

/// The role of a message's author, as the client names it (`user`, `assistant`, `system`):
/// 1 to 64 bytes of UTF-8 without control characters or white space at either end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MessageRole(String);

impl MessageRole {
    pub const MAX_LEN: usize = 64;

    /// # Errors
    /// A message saying what a role must be.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        if !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && !s.chars().any(char::is_control)
            && s.trim() == s
        {
            Ok(Self(s.to_owned()))
        } else {
            Err("role must be 1 to 64 bytes of UTF-8 without control characters or white space at either end")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for MessageRole {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn no_edits(n: &u32) -> bool {
    *n == 0
}

/// A message body as stored.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// `{"enc": "<base64 of nonce(12) | ciphertext | tag(16)>"}`: the JSON bytes of the body,
    /// encrypted under the thread's DEK with AAD = the message key.
    Enc(Bytes64),
    /// `{"plain": <body>}`: stored while `encryption.enabled = false`, marked so that a later
    /// job can find and encrypt it.
    Plain(serde_json::Value),
    /// `"deleted"`: a deleted message's tombstone. The content is gone; the record keeps the
    /// author, the creation time and (as `updated_at`) when it was deleted, so a listing
    /// that asks for deleted messages can show where one was.
    Deleted,
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Enc(b) => write!(f, "Enc(<{} bytes>)", b.0.len()),
            Content::Plain(_) => f.write_str("Plain(<redacted>)"),
            Content::Deleted => f.write_str("Deleted"),
        }
    }
}

/// Whether the stored bytes of a message record are a tombstone, without parsing it: a
/// record is written with `content` last, and only a tombstone's content is a string
/// (`"deleted"`); every other ends with an object (`...}}`). For counting and skipping in
/// scans; a record is parsed whole before anything of it is shown.
pub fn is_tombstone_bytes(v: &[u8]) -> bool {
    v.ends_with(br#""content":"deleted"}"#)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::{Timestamp, UserId};

    fn key(n: u8) -> ThreadKey {
        ThreadKey {
            key_id: kms_api::KeyId::from_random([n; 16]),
            wrapped_dek: kms_api::WrappedDek::new(vec![n]),
            kek_id: kms_api::KekId::parse("kek").unwrap(),
            kek_version: kms_api::KekVersion::FIRST,
        }
    }

    fn id(n: u64) -> MessageId {
        MessageId::new(Timestamp::from_nanos(n), 0).unwrap()
    }

    #[test]
    fn the_rotation_rule_names_one_key_per_message() {
        let mut t = ThreadRecord {
            id: ThreadId::parse("t").unwrap(),
            title: String::new(),
            author: UserId::parse("u").unwrap(),
            created_at: Timestamp::from_nanos(1),
            updated_at: Timestamp::from_nanos(1),
            slug: None,
            metadata: None,
            kms: Some(key(2)),
            plain_migration: None,
            rotation: Some(DekRotation {
                job: kms_api::admin::JobId::from_random([0; 8]),
                retiring: Some(key(1)),
                start: id(100),
                cursor: Some(id(40)),
            }),
            sealed: 0,
            key_since: None,
            live_messages: None,
            sealed_meta: None,
        };
        let by = |t: &ThreadRecord, n| t.sealed_by(id(n)).key_id().cloned();
        let (k1, k2) = (Some(key(1).key_id), Some(key(2).key_id));
        assert_eq!(by(&t, 10), k2, "migrated");
        assert_eq!(by(&t, 40), k2, "the cursor itself is migrated");
        assert_eq!(by(&t, 41), k1, "not migrated yet");
        assert_eq!(by(&t, 99), k1);
        assert_eq!(by(&t, 100), k2, "written after the start");
        assert!(
            !t.accepts_plain(id(50)),
            "an encrypted thread's rotation accepts no plain"
        );
        // A plain thread being encrypted: unmigrated messages are plain, the rest not.
        if let Some(r) = t.rotation.as_mut() {
            r.retiring = None;
        }
        assert_eq!(t.sealed_by(id(50)), SealedBy::Plain);
        assert!(t.accepts_plain(id(50)));
        assert!(
            !t.accepts_plain(id(40)),
            "a migrated message is never plain again"
        );
        assert!(!t.accepts_plain(id(100)));
        assert_eq!(by(&t, 30), k2);
        // No rotation: the thread's key for everything.
        t.rotation = None;
        assert_eq!(by(&t, 50), k2);
        assert!(!t.accepts_plain(id(50)));
    }

    #[test]
    fn content_shapes() {
        let e = Content::Enc(Bytes64(vec![1, 2, 3]));
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"enc":"AQID"}"#);
        let p = Content::Plain(serde_json::json!({"text": "hi"}));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"plain":{"text":"hi"}}"#
        );
        assert!(!format!("{p:?}").contains("hi"));
        let back: Content = serde_json::from_str(r#"{"plain":null}"#).unwrap();
        assert_eq!(back, Content::Plain(serde_json::Value::Null));
    }

    #[test]
    fn tombstones_are_told_from_their_bytes_alone() {
        let rec = MessageRecord {
            format: RecordFormat::CURRENT,
            author: UserId::parse("u").unwrap(),
            created_at: Timestamp::from_nanos(1),
            updated_at: Timestamp::from_nanos(1),
            edits: 0,
            role: Some(MessageRole::parse("user").unwrap()),
            reply_to: None,
            content: Content::Plain(serde_json::json!({"content": "deleted"})),
        };
        let plain = serde_json::to_vec(&rec).unwrap();
        assert!(!is_tombstone_bytes(&plain));
        let mut enc = rec.clone();
        enc.content = Content::Enc(Bytes64(vec![1, 2, 3]));
        assert!(!is_tombstone_bytes(&serde_json::to_vec(&enc).unwrap()));
        let dead = rec.tombstone(Timestamp::from_nanos(9));
        let bytes = serde_json::to_vec(&dead).unwrap();
        assert!(
            is_tombstone_bytes(&bytes),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let back: MessageRecord = serde_json::from_slice(&bytes).unwrap();
        assert!(back.is_tombstone() && back.role.is_none());
        assert_eq!(back.updated_at, Timestamp::from_nanos(9));
    }
}

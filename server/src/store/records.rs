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

/// `thread:<id>:meta`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadRecord {
    pub id: ThreadId,
    pub title: String,
    pub author: UserId,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// The thread's DEK as the KMS described it; absent for threads created with encryption
    /// disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<ThreadKey>,
    /// Set when a thread that was written with encryption off got its DEK later: messages
    /// older than this boundary may still be stored in plain form. Without it, a plain record
    /// in a thread that has a DEK is refused (it can only be a forgery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_migration: Option<PlainMigration>,
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
        match (&self.kms, &self.plain_migration) {
            (None, _) => true,
            (Some(_), Some(m)) => id < m.plain_before,
            (Some(_), None) => false,
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
}

impl RecordFormat {
    /// The format of every new write.
    pub const CURRENT: RecordFormat = RecordFormat::V2;

    fn is_v1(&self) -> bool {
        *self == RecordFormat::V1
    }
}

impl Serialize for RecordFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(match self {
            RecordFormat::V1 => 1,
            RecordFormat::V2 => 2,
        })
    }
}

impl<'de> Deserialize<'de> for RecordFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            1 => Ok(RecordFormat::V1),
            2 => Ok(RecordFormat::V2),
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
    pub content: Content,
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
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Enc(b) => write!(f, "Enc(<{} bytes>)", b.0.len()),
            Content::Plain(_) => f.write_str("Plain(<redacted>)"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}

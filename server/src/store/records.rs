//! Stored records (JSON values of the LMDB keys in [`super::keys`]).
//!
//! A message record never holds its own id or thread id: both come from its key, so a record
//! copied under another key cannot claim to be the original (and its ciphertext, bound by AAD
//! to the original key, no longer decrypts).

use std::fmt;

use kms_api::wire::Bytes64;
use kms_api::ThreadId;
use serde::{Deserialize, Serialize};

use crate::ids::{Timestamp, UserId};
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
}

/// `thread:<id>:msg:<ts>-<seq>`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
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

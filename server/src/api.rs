//! JSON shapes of the HTTP API: request bodies and the views returned to clients.
//!
//! Unknown request fields are ignored. Timestamps are RFC 3339 (UTC, nanoseconds).

use std::fmt;

use kms_api::ThreadId;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::{ApiError, ErrorCode};
use crate::ids::{MessageId, Timestamp, UserId};
use crate::provider::ThreadKey;
use crate::store::ThreadRecord;
use crate::store::{MessageAttrs, MessageRole};

/// `POST /v1/threads`
#[derive(Debug, Deserialize)]
pub struct CreateThreadBody {
    pub title: String,
    #[serde(default)]
    pub slug: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value.
pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /v1/threads/{id}`: `title` renames; `slug` and `metadata` replace (`null` removes).
#[derive(Debug, Deserialize)]
pub struct PatchThreadBody {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub slug: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub metadata: Option<Option<Value>>,
}

/// `POST /v1/threads/{id}/messages` and `PUT .../messages/{msg_id}`: any JSON body; a post
/// may also give the author's `role` and the message it answers (`reply_to`), which an edit
/// cannot change. `Debug` does not show the body (message content is secret).
#[derive(Deserialize)]
pub struct MessageBody {
    pub body: Value,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
}

impl MessageBody {
    /// The attributes of a new message.
    ///
    /// # Errors
    /// 400 for a role or message id that does not parse.
    pub fn attrs(&self) -> Result<MessageAttrs, ApiError> {
        message_attrs(self.role.as_deref(), self.reply_to.as_deref())
    }

    /// Refuses attributes on an edit (they are fixed when the message is posted).
    ///
    /// # Errors
    /// 400 when `role` or `reply_to` is given.
    pub fn edit_only(&self) -> Result<(), ApiError> {
        if self.role.is_some() || self.reply_to.is_some() {
            return Err(ApiError::invalid(
                "role and reply_to are set when a message is posted and cannot be edited",
            ));
        }
        Ok(())
    }
}

/// A new message's attributes from their text.
///
/// # Errors
/// 400 for a role or message id that does not parse.
pub fn message_attrs(role: Option<&str>, reply_to: Option<&str>) -> Result<MessageAttrs, ApiError> {
    Ok(MessageAttrs {
        role: role
            .map(|r| MessageRole::parse(r).map_err(ApiError::invalid))
            .transpose()?,
        reply_to: reply_to
            .map(|m| {
                MessageId::parse(m)
                    .map_err(|_| ApiError::invalid("reply_to must be a message id (its key)"))
            })
            .transpose()?,
    })
}

impl fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageBody { body: <redacted> }")
    }
}

/// `POST /v1/sign`: `expires_in_secs` asks for the expiring signature form.
#[derive(Debug, Deserialize)]
pub struct SignBody {
    pub user_id: String,
    #[serde(default, deserialize_with = "integral_u64")]
    pub expires_in_secs: Option<u64>,
}

/// A JSON integer, also when written with a zero fraction (`60.0`): JSON Schema counts that
/// as an integer, so a client generated from the API reference may send it.
fn integral_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(v) = n.as_u64() {
        return Ok(Some(v));
    }
    match n.as_f64() {
        // Exact below 2^53, far above any accepted value.
        // In range and integral, so the cast is exact.
        Some(f) if f.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&f) => {
            Ok(Some(f as u64))
        }
        _ => Err(serde::de::Error::custom("expected a non-negative integer")),
    }
}

/// Answer of `POST /v1/sign`. `Debug` does not show the signature (a credential).
#[derive(Serialize)]
pub struct SignView {
    pub user_id: UserId,
    pub signature: String,
    /// When an expiring signature stops being accepted (RFC 3339); absent for the plain form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl fmt::Debug for SignView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignView")
            .field("user_id", &self.user_id)
            .field("signature", &"<redacted>")
            .finish()
    }
}

/// Answer of `POST /v1/users/{user_id}/revoke-signatures`.
#[derive(Debug, Serialize)]
pub struct RevokeView {
    pub user_id: UserId,
    /// How many times this user's signatures have been revoked; signatures made from now
    /// on bind it.
    pub signature_generation: u64,
}

/// A thread as clients see it; `kms` only for admin callers.
#[derive(Debug, Serialize)]
pub struct ThreadView {
    pub id: ThreadId,
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
    pub author: UserId,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<crate::store::RawJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms: Option<ThreadKey>,
}

/// Whether a view may show the thread's `kms` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsVisibility {
    Shown,
    Hidden,
}

impl ThreadView {
    pub fn new(t: &ThreadRecord, kms: KmsVisibility) -> Self {
        Self {
            id: t.id.clone(),
            title: t.title.clone(),
            slug: t.slug.clone(),
            author: t.author.clone(),
            created_at: t.created_at.to_rfc3339(),
            updated_at: t.updated_at.to_rfc3339(),
            metadata: t.metadata.clone(),
            kms: match kms {
                KmsVisibility::Shown => t.kms.clone(),
                KmsVisibility::Hidden => None,
            },
        }
    }
}

/// `GET /v1/threads`
#[derive(Debug, Serialize)]
pub struct ThreadList {
    pub threads: Vec<ThreadView>,
    pub next_cursor: Option<String>,
}

/// A readable message. `Debug` does not show the body.
#[derive(Serialize)]
pub struct MessageView {
    pub id: MessageId,
    pub thread_id: ThreadId,
    pub author: UserId,
    /// The body's JSON text, checked to be one JSON value and sent as it is (a decrypted body
    /// is the compact JSON written at post time, so it is not parsed into a tree and written
    /// out again).
    pub body: Box<serde_json::value::RawValue>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: Timestamp,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: Timestamp,
    /// The author's role, when the message was posted with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::store::MessageRole>,
    /// The message this one answers, when posted with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
}

fn rfc3339<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339())
}

impl fmt::Debug for MessageView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageView")
            .field("id", &self.id)
            .field("thread_id", &self.thread_id)
            .field("author", &self.author)
            .field("body", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// Answer of `DELETE /v1/threads/{id}/messages/{msg_id}`: the content is gone, so no body.
#[derive(Debug, Serialize)]
pub struct DeletedMessageView {
    pub id: MessageId,
    pub thread_id: ThreadId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub author: Option<UserId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    pub deleted: bool,
}

/// `{"code": ...}` of an unreadable list item.
#[derive(Debug, Serialize)]
pub struct ItemError {
    pub code: ErrorCode,
}

/// One entry of a message page: the message, or why it cannot be read (never wrong content).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum MessageItem {
    Ok(MessageView),
    /// A deleted message's tombstone (only in listings that ask for them): no content.
    Deleted {
        id: MessageId,
        thread_id: ThreadId,
        author: UserId,
        #[serde(serialize_with = "rfc3339")]
        created_at: Timestamp,
        /// When it was deleted.
        #[serde(serialize_with = "rfc3339")]
        updated_at: Timestamp,
        deleted: bool,
    },
    Unreadable {
        id: MessageId,
        thread_id: ThreadId,
        error: ItemError,
    },
}

/// `GET /v1/threads/{id}/messages`
#[derive(Debug, Serialize)]
pub struct MessageList {
    pub messages: Vec<MessageItem>,
    pub next_cursor: Option<String>,
}

/// `GET /readyz`
#[derive(Debug, Serialize)]
pub struct ReadyView {
    /// `ok` or `unavailable` (ProgressDB's clients read this).
    pub status: &'static str,
    /// The server's version.
    pub version: &'static str,
    pub ready: bool,
    pub store: &'static str,
    pub kms: &'static str,
    /// Process alerts (`core_dumps_not_denied`), absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let p: PatchThreadBody = serde_json::from_str(r#"{"title":"x"}"#).unwrap();
        assert_eq!(p.metadata, None);
        let p: PatchThreadBody = serde_json::from_str(r#"{"metadata":null}"#).unwrap();
        assert_eq!(p.metadata, Some(None));
        let p: PatchThreadBody = serde_json::from_str(r#"{"metadata":{"a":1}}"#).unwrap();
        assert_eq!(p.metadata, Some(Some(serde_json::json!({"a":1}))));
    }

    #[test]
    fn debug_hides_content_and_signatures() {
        let b: MessageBody = serde_json::from_str(r#"{"body":"top secret"}"#).unwrap();
        assert!(!format!("{b:?}").contains("top secret"));
        let v = MessageView {
            id: MessageId::parse("00000000000000000001-000000").unwrap(),
            thread_id: ThreadId::parse("t").unwrap(),
            author: UserId::parse("u").unwrap(),
            body: serde_json::value::to_raw_value("top secret").unwrap(),
            created_at: Timestamp::from_nanos(0),
            updated_at: Timestamp::from_nanos(0),
            role: None,
            reply_to: None,
        };
        assert!(!format!("{v:?}").contains("top secret"));
        assert!(!format!("{:?}", MessageItem::Ok(v)).contains("top secret"));
        let s = SignView {
            user_id: UserId::parse("u").unwrap(),
            signature: "abcdef0123".into(),
            expires_at: None,
        };
        assert!(!format!("{s:?}").contains("abcdef0123"));
    }

    #[test]
    fn message_body_is_required_but_may_be_null() {
        assert!(serde_json::from_str::<MessageBody>("{}").is_err());
        assert!(serde_json::from_str::<MessageBody>(r#"{"body":null}"#).is_ok());
    }
}

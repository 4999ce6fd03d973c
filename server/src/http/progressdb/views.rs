//! ProgressDB's JSON shapes: threads and messages with `key`s and unix-nanosecond times, the
//! `{thread}` / `{message}` envelopes, and `pagination`. Unknown request fields are ignored,
//! as by ProgressDB's server and `/v1`.

use std::fmt;

use kms_api::ThreadId;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::{MessageItem, MessageView};
use crate::error::ApiError;
use crate::ids::{MessageId, UserId};
use crate::store::{MessageAttrs, MessageRole, ThreadRecord, Windowed};

/// A thread as ProgressDB shows it. No `Debug`: titles and slugs are content.
#[derive(Serialize)]
pub(super) struct Thread<'a> {
    key: &'a ThreadId,
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slug: Option<&'a str>,
    author: &'a UserId,
    created_ts: u64,
    updated_ts: u64,
    /// The thread's key as the KMS described it: admin reads only.
    #[serde(skip_serializing_if = "Option::is_none")]
    kms: Option<&'a crate::provider::ThreadKey>,
}

impl<'a> Thread<'a> {
    pub(super) fn of(t: &'a ThreadRecord) -> Self {
        Thread {
            key: &t.id,
            title: &t.title,
            slug: t.slug.as_deref(),
            author: &t.author,
            created_ts: t.created_at.as_nanos(),
            updated_ts: t.updated_at.as_nanos(),
            kms: None,
        }
    }

    /// With its `kms` block, for admin callers.
    pub(super) fn for_admin(t: &'a ThreadRecord) -> Self {
        Thread {
            kms: t.kms.as_ref(),
            ..Self::of(t)
        }
    }
}

/// `{"key": .., "thread": {..}}` (`key` on creates and updates, which the SDKs read).
#[derive(Serialize)]
pub(super) struct ThreadEnvelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a ThreadId>,
    pub thread: Thread<'a>,
}

/// A message as ProgressDB shows it, or (in a list) why it cannot be read: never wrong
/// content. `Debug` does not show the body.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum Message<'a> {
    Ok {
        key: MessageId,
        thread: &'a ThreadId,
        author: &'a UserId,
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'a MessageRole>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_to: Option<MessageId>,
        created_ts: u64,
        updated_ts: u64,
        body: &'a RawValue,
    },
    Unreadable {
        key: MessageId,
        thread: &'a ThreadId,
        error: &'static str,
        code: &'static str,
    },
    /// A tombstone (`include_deleted=true`): where a deleted message was, no content.
    Deleted {
        key: MessageId,
        thread: &'a ThreadId,
        author: &'a UserId,
        created_ts: u64,
        updated_ts: u64,
        deleted: bool,
    },
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Ok { key, .. } => write!(f, "Message({key}, <redacted>)"),
            Message::Unreadable { key, .. } => write!(f, "Unreadable({key})"),
            Message::Deleted { key, .. } => write!(f, "Deleted({key})"),
        }
    }
}

impl<'a> Message<'a> {
    pub(super) fn of(m: &'a MessageView) -> Self {
        Message::Ok {
            key: m.id,
            thread: &m.thread_id,
            author: &m.author,
            role: m.role.as_ref(),
            reply_to: m.reply_to,
            created_ts: m.created_at.as_nanos(),
            updated_ts: m.updated_at.as_nanos(),
            body: &m.body,
        }
    }

    pub(super) fn of_item(i: &'a MessageItem) -> Self {
        match i {
            MessageItem::Ok(m) => Self::of(m),
            MessageItem::Unreadable {
                id,
                thread_id,
                error,
            } => Message::Unreadable {
                key: *id,
                thread: thread_id,
                error: "message cannot be read",
                code: error.code.as_str(),
            },
            MessageItem::Deleted {
                id,
                thread_id,
                author,
                created_at,
                updated_at,
                deleted,
            } => Message::Deleted {
                key: *id,
                thread: thread_id,
                author,
                created_ts: created_at.as_nanos(),
                updated_ts: updated_at.as_nanos(),
                deleted: *deleted,
            },
        }
    }
}

/// `{"key": .., "message": {..}}`.
#[derive(Debug, Serialize)]
pub(super) struct MessageEnvelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<MessageId>,
    pub message: Message<'a>,
}

/// ProgressDB's `pagination`: the keys that continue the listing in either direction, whether
/// items lie beyond them, the page's size and the listing's.
#[derive(Debug, Serialize)]
pub(super) struct Pagination {
    before_anchor: String,
    after_anchor: String,
    has_before: bool,
    has_after: bool,
    count: usize,
    total: u64,
}

impl Pagination {
    /// For a page shown in order `shown`, whose `before`/`after` flags the caller has mapped
    /// from the window's older/newer ones.
    pub(super) fn new(
        first: Option<String>,
        last: Option<String>,
        has_before: bool,
        has_after: bool,
        count: usize,
        total: u64,
    ) -> Self {
        Pagination {
            before_anchor: first.unwrap_or_default(),
            after_anchor: last.unwrap_or_default(),
            has_before,
            has_after,
            count,
            total,
        }
    }
}

/// `{"threads": [..], "pagination": {..}}`
#[derive(Serialize)]
pub(super) struct ThreadList<'a> {
    pub threads: Vec<Thread<'a>>,
    pub pagination: Pagination,
}

/// `{"thread": "<key>", "messages": [..], "pagination": {..}}`
#[derive(Debug, Serialize)]
pub(super) struct MessageList<'a> {
    pub thread: &'a ThreadId,
    pub messages: Vec<Message<'a>>,
    pub pagination: Pagination,
}

/// The messages page of `w`, time order (oldest first): `before` continues to older
/// messages, `after` to newer ones (what the React hooks page with).
pub(super) fn message_list<'a>(
    thread: &'a ThreadId,
    w: &'a Windowed<MessageItem>,
) -> MessageList<'a> {
    let key = |i: &MessageItem| match i {
        MessageItem::Ok(m) => m.id.to_string(),
        MessageItem::Unreadable { id, .. } | MessageItem::Deleted { id, .. } => id.to_string(),
    };
    MessageList {
        thread,
        messages: w.items.iter().map(Message::of_item).collect(),
        pagination: Pagination::new(
            w.items.first().map(key),
            w.items.last().map(key),
            w.older,
            w.newer,
            w.items.len(),
            w.total,
        ),
    }
}

/// `POST /frontend/v1/threads` (no `Debug`: the title and slug are content)
#[derive(Deserialize)]
pub(super) struct CreateThread {
    pub title: String,
    #[serde(default)]
    pub slug: Option<String>,
}

/// `PUT /frontend/v1/threads/{threadKey}`: `title` renames, `slug` replaces (`null`
/// removes it). No `Debug`: content.
#[derive(Deserialize)]
pub(super) struct UpdateThread {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "crate::api::present")]
    pub slug: Option<Option<String>>,
}

/// `POST .../messages` and `PUT .../messages/{id}`: `body` is required and not `null`.
/// `Debug` does not show the body.
#[derive(Deserialize)]
pub(super) struct MessageBody {
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

impl fmt::Debug for MessageBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageBody(<redacted>)")
    }
}

impl MessageBody {
    /// A new message's body and attributes.
    pub(super) fn into_new(self) -> Result<(Value, MessageAttrs), ApiError> {
        let attrs = crate::api::message_attrs(self.role.as_deref(), self.reply_to.as_deref())?;
        Ok((self.into_body()?, attrs))
    }

    /// An edit's body: `role` and `reply_to` are fixed when the message is posted.
    pub(super) fn into_edit(self) -> Result<Value, ApiError> {
        if self.role.is_some() || self.reply_to.is_some() {
            return Err(ApiError::invalid(
                "role and reply_to are set when a message is posted and cannot be edited",
            ));
        }
        self.into_body()
    }

    /// The body, required and not `null`. A client's `id` is ignored, as ProgressDB's server
    /// ignores it (its own benchmark client sends one): keys are the server's, and the
    /// answer carries the one given.
    fn into_body(self) -> Result<Value, ApiError> {
        match self.body {
            None | Some(Value::Null) => Err(ApiError::invalid("body: cannot be empty")),
            Some(b) => Ok(b),
        }
    }
}

/// `POST /backend/v1/sign`
#[derive(Debug, Deserialize)]
pub(super) struct SignBody {
    #[serde(rename = "userId")]
    pub user_id: String,
}

/// Its answer. `Debug` does not show the signature (a credential).
#[derive(Serialize)]
pub(super) struct Signed {
    #[serde(rename = "userId")]
    pub user_id: UserId,
    pub signature: String,
}

impl fmt::Debug for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signed({:?}, <redacted>)", self.user_id)
    }
}

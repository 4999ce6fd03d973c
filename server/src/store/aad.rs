//! What a message's ciphertext is bound to (its AAD), by record format.
//!
//! * [`RecordFormat::V1`] (records written before formats existed): the message key
//!   `thread:<id>:msg:<ts>-<seq>`. A ciphertext moved to another message or thread no longer
//!   decrypts, but the record's `author` and `created_at` are not covered.
//! * [`RecordFormat::V2`] (every new write): a domain tag, then four length-prefixed fields
//!   (`u32` big-endian length, then the bytes): the message key, the message's author, its
//!   creation time (8 bytes, big-endian unix nanoseconds) and the thread's author. A disk
//!   writer who edits the author or the creation time of a message, or the author of its
//!   thread, makes the message unreadable instead of re-attributing it.
//!
//! * [`RecordFormat::V3`] (every new write): V2's fields, then when the content was last
//!   written (8 bytes, big-endian unix nanoseconds) and how many edits the message has had
//!   (`u32` big-endian). A disk writer cannot show an edited message as unedited, move its
//!   edit time, or put an earlier version's ciphertext under the current record's edit state
//!   (or the reverse): the message becomes unreadable. Replacing the whole record with an
//!   earlier copy of itself (a rollback of that one record) is not detected: nothing outside
//!   the record knows its current edit count (docs/threat-model.md).
//!
//! * [`RecordFormat::V4`] (every new write): V3's fields, then the author's role and the id
//!   of the message replied to (each empty when absent; neither can be empty when present).
//!   A disk writer cannot give a message another role or thread it under another message.
//!   A record of an earlier format that claims a role or a reply is refused when read
//!   ([`MessageRecord::attrs_bound`]): its AAD does not cover them.
//!
//! Length prefixes make the encoding injective: no two different field tuples give the same
//! bytes, whatever the fields contain.
//!
//! Downgrading a record (removing its `"v": 2`) does not help a forger: the ciphertext was made
//! under the V2 AAD, so opening it with the V1 AAD fails.

use kms_api::ThreadId;

use super::keys;
use super::records::{MessageRecord, RecordFormat, ThreadRecord};
use crate::ids::{MessageId, Timestamp, UserId};

/// Domain tag of the V2 AAD.
const V2_TAG: &[u8] = b"progressdb:msg:v2";
/// Domain tag of the V3 AAD.
const V3_TAG: &[u8] = b"progressdb:msg:v3";
/// Domain tag of the V4 AAD.
const V4_TAG: &[u8] = b"progressdb:msg:v4";
/// Domain tag of a thread's sealed title and metadata.
const META_TAG: &[u8] = b"progressdb:thread-meta:v1";

/// The AAD of a thread's sealed title and metadata: a domain tag, then the thread id, its
/// author and its creation time, length-prefixed like [`message_aad`]'s V2. Moved to another
/// thread, or re-attributed, the sealed metadata does not open.
pub fn thread_meta_aad(thread: &ThreadId, author: &UserId, created_at: Timestamp) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_TAG.len() + 3 * 4 + 64);
    out.extend_from_slice(META_TAG);
    push_field(&mut out, thread.as_str().as_bytes());
    push_field(&mut out, author.as_str().as_bytes());
    push_field(&mut out, &created_at.as_nanos().to_be_bytes());
    out
}

/// The facts a message's ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct MessageBinding<'a> {
    pub thread: &'a ThreadId,
    pub thread_author: &'a UserId,
    pub id: MessageId,
    pub author: &'a UserId,
    pub created_at: Timestamp,
    /// When the content was last written (V3 only).
    pub updated_at: Timestamp,
    /// How many times the content was edited (V3 and V4).
    pub edits: u32,
    /// The author's role (V4 only).
    pub role: Option<&'a str>,
    /// The message replied to (V4 only).
    pub reply_to: Option<MessageId>,
}

impl<'a> MessageBinding<'a> {
    /// The binding of message `id` of `thread` as `rec` describes it.
    pub fn of(thread: &'a ThreadRecord, id: MessageId, rec: &'a MessageRecord) -> Self {
        Self {
            thread: &thread.id,
            thread_author: &thread.author,
            id,
            author: &rec.author,
            created_at: rec.created_at,
            updated_at: rec.updated_at,
            edits: rec.edits,
            role: rec.role.as_ref().map(|r| r.as_str()),
            reply_to: rec.reply_to,
        }
    }
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    // Ids are at most a few hundred bytes; a field longer than u32::MAX cannot exist here, but
    // saturate rather than truncate silently if it ever did (the AAD then simply differs).
    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}

/// The AAD of a message stored in `format`.
pub fn message_aad(format: RecordFormat, b: &MessageBinding<'_>) -> Vec<u8> {
    let key = keys::msg(b.thread, b.id);
    match format {
        RecordFormat::V1 => key,
        RecordFormat::V2 | RecordFormat::V3 | RecordFormat::V4 => {
            let mut out = Vec::with_capacity(V4_TAG.len() + 8 * 4 + key.len() + 160);
            out.extend_from_slice(match format {
                RecordFormat::V2 => V2_TAG,
                RecordFormat::V3 => V3_TAG,
                RecordFormat::V1 | RecordFormat::V4 => V4_TAG,
            });
            push_field(&mut out, &key);
            push_field(&mut out, b.author.as_str().as_bytes());
            push_field(&mut out, &b.created_at.as_nanos().to_be_bytes());
            push_field(&mut out, b.thread_author.as_str().as_bytes());
            if matches!(format, RecordFormat::V3 | RecordFormat::V4) {
                push_field(&mut out, &b.updated_at.as_nanos().to_be_bytes());
                push_field(&mut out, &b.edits.to_be_bytes());
            }
            if format == RecordFormat::V4 {
                // Absent is the empty field: no role or message id is empty.
                push_field(&mut out, b.role.unwrap_or("").as_bytes());
                let reply = b.reply_to.map(|m| m.to_string()).unwrap_or_default();
                push_field(&mut out, reply.as_bytes());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn u(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn v1_is_the_message_key_and_v2_covers_every_field() {
        let t = ThreadId::parse("t1").unwrap();
        let id = MessageId::new(Timestamp::from_nanos(5), 1).unwrap();
        let (alice, bob) = (u("alice"), u("bob"));
        let base = MessageBinding {
            thread: &t,
            thread_author: &alice,
            id,
            author: &alice,
            created_at: Timestamp::from_nanos(5),
            updated_at: Timestamp::from_nanos(5),
            edits: 0,
            role: None,
            reply_to: None,
        };
        assert_eq!(message_aad(RecordFormat::V1, &base), keys::msg(&t, id));
        let v2 = message_aad(RecordFormat::V2, &base);
        assert!(v2.starts_with(V2_TAG));
        let variants = [
            MessageBinding {
                author: &bob,
                ..base
            },
            MessageBinding {
                thread_author: &bob,
                ..base
            },
            MessageBinding {
                created_at: Timestamp::from_nanos(6),
                ..base
            },
            MessageBinding {
                id: MessageId::new(Timestamp::from_nanos(5), 2).unwrap(),
                ..base
            },
        ];
        for v in variants {
            assert_ne!(message_aad(RecordFormat::V2, &v), v2, "{v:?}");
            assert_ne!(
                message_aad(RecordFormat::V3, &v),
                message_aad(RecordFormat::V3, &base),
                "{v:?}"
            );
        }
        // V2 does not cover the edit state; V3 does, and differs from V2 by its tag.
        let edited = MessageBinding {
            updated_at: Timestamp::from_nanos(9),
            edits: 1,
            ..base
        };
        assert_eq!(message_aad(RecordFormat::V2, &edited), v2);
        let v3 = message_aad(RecordFormat::V3, &base);
        assert!(v3.starts_with(V3_TAG) && v3 != v2);
        for v in [
            edited,
            MessageBinding { edits: 1, ..base },
            MessageBinding {
                updated_at: Timestamp::from_nanos(6),
                ..base
            },
        ] {
            assert_ne!(message_aad(RecordFormat::V3, &v), v3, "{v:?}");
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        // ("ab", "c") and ("a", "bc") as author / thread author must not collide.
        let t = ThreadId::parse("t").unwrap();
        let id = MessageId::new(Timestamp::from_nanos(1), 0).unwrap();
        let (ab, c, a, bc) = (u("ab"), u("c"), u("a"), u("bc"));
        let x = MessageBinding {
            thread: &t,
            thread_author: &c,
            id,
            author: &ab,
            created_at: Timestamp::from_nanos(1),
            updated_at: Timestamp::from_nanos(1),
            edits: 0,
            role: None,
            reply_to: None,
        };
        let y = MessageBinding {
            thread_author: &bc,
            author: &a,
            ..x
        };
        for f in [RecordFormat::V2, RecordFormat::V3, RecordFormat::V4] {
            assert_ne!(message_aad(f, &x), message_aad(f, &y));
        }
    }

    #[test]
    fn v4_covers_the_role_and_the_reply() {
        let t = ThreadId::parse("t1").unwrap();
        let a = u("alice");
        let id = MessageId::new(Timestamp::from_nanos(5), 1).unwrap();
        let other = MessageId::new(Timestamp::from_nanos(4), 0).unwrap();
        let base = MessageBinding {
            thread: &t,
            thread_author: &a,
            id,
            author: &a,
            created_at: Timestamp::from_nanos(5),
            updated_at: Timestamp::from_nanos(5),
            edits: 0,
            role: None,
            reply_to: None,
        };
        let v4 = message_aad(RecordFormat::V4, &base);
        assert!(v4.starts_with(V4_TAG) && v4 != message_aad(RecordFormat::V3, &base));
        let all = [
            base,
            MessageBinding {
                role: Some("user"),
                ..base
            },
            MessageBinding {
                role: Some("assistant"),
                ..base
            },
            MessageBinding {
                reply_to: Some(other),
                ..base
            },
            MessageBinding {
                role: Some("user"),
                reply_to: Some(other),
                ..base
            },
            MessageBinding { edits: 1, ..base },
        ];
        let aads: std::collections::HashSet<Vec<u8>> = all
            .iter()
            .map(|b| message_aad(RecordFormat::V4, b))
            .collect();
        assert_eq!(aads.len(), all.len(), "two bindings share an AAD");
    }
}

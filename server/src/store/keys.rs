//! LMDB key layout. Every key is ASCII; fields are separated by `:`, which no [`ThreadId`],
//! [`MessageId`] or encoded [`UserId`] ([`UserId::key_segment`]: `%XX` for any byte outside
//! `[A-Za-z0-9_.@+-]`) can contain, so one thread's or user's prefix never matches another's.
//!
//! | key | value |
//! |---|---|
//! | `thread:<thread_id>:meta` | thread record (JSON) |
//! | `thread:<thread_id>:msg:<ts>-<seq>` | message record (JSON, content ciphertext) |
//! | `idx:author:<user_id>:<thread_id>` | empty: the threads of a user |
//! | `job:<job_id>` | a server job (DEK rotation, thread encryption), JSON |
//! | `user:<user_id>:sig_gen` | the user's signature generation (decimal): how many times its signatures were revoked |
//!
//! `<ts>-<seq>` is a [`MessageId`]: fixed width, so byte order is time order. Within one
//! thread, `:meta` sorts before every `:msg:` key (`e` < `s`).

use kms_api::ThreadId;

use crate::ids::{MessageId, UserId};

const THREAD: &str = "thread:";
const AUTHOR_IDX: &str = "idx:author:";
const JOB: &str = "job:";
const USER: &str = "user:";
const SIG_GEN: &str = ":sig_gen";

/// `user:<id>:sig_gen`
pub fn signature_generation(user: &UserId) -> Vec<u8> {
    format!("{USER}{}{SIG_GEN}", user.key_segment()).into_bytes()
}

/// `user:` and `user;`: the bounds of all user keys.
pub fn all_users() -> (Vec<u8>, Vec<u8>) {
    (USER.as_bytes().to_vec(), b"user;".to_vec())
}

/// The user of a `user:<id>:sig_gen` key, or `None` for any other key.
pub fn parse_signature_generation(key: &[u8]) -> Option<UserId> {
    let s = std::str::from_utf8(key).ok()?;
    let id = s.strip_prefix(USER)?.strip_suffix(SIG_GEN)?;
    UserId::from_key_segment(id).ok()
}

/// `job:<id>`
pub fn job(id: &kms_api::admin::JobId) -> Vec<u8> {
    format!("{JOB}{id}").into_bytes()
}

/// `job:` and `job;`: the bounds of all job keys.
pub fn all_jobs() -> (Vec<u8>, Vec<u8>) {
    (JOB.as_bytes().to_vec(), b"job;".to_vec())
}

/// `thread:<id>:meta`
pub fn meta(thread: &ThreadId) -> Vec<u8> {
    format!("{THREAD}{thread}:meta").into_bytes()
}

/// `thread:<id>:msg:` — the prefix of every message key of `thread`.
pub fn msg_prefix(thread: &ThreadId) -> Vec<u8> {
    format!("{THREAD}{thread}:msg:").into_bytes()
}

/// `thread:<id>:msg;` — the first key after every message key of `thread` (`;` follows `:`).
pub fn msg_end(thread: &ThreadId) -> Vec<u8> {
    format!("{THREAD}{thread}:msg;").into_bytes()
}

/// `thread:<id>:msg:<ts>-<seq>`: the message's key, and the AAD its ciphertext is bound to.
pub fn msg(thread: &ThreadId, id: MessageId) -> Vec<u8> {
    format!("{THREAD}{thread}:msg:{id}").into_bytes()
}

/// `thread:<id>:` — the prefix of every key of `thread`.
pub fn thread_prefix(thread: &ThreadId) -> Vec<u8> {
    format!("{THREAD}{thread}:").into_bytes()
}

/// `thread:<id>;` — the first key after every key of `thread`.
pub fn thread_end(thread: &ThreadId) -> Vec<u8> {
    format!("{THREAD}{thread};").into_bytes()
}

/// `thread:` and `thread;`: the bounds of all thread keys.
pub fn all_threads() -> (Vec<u8>, Vec<u8>) {
    (THREAD.as_bytes().to_vec(), b"thread;".to_vec())
}

/// The thread id of a `thread:<id>:meta` key, or `None` for any other key.
pub fn parse_meta(key: &[u8]) -> Option<ThreadId> {
    let s = std::str::from_utf8(key).ok()?;
    let id = s.strip_prefix(THREAD)?.strip_suffix(":meta")?;
    ThreadId::parse(id).ok()
}

/// The thread id of any `thread:<id>:...` key.
pub fn parse_thread_of(key: &[u8]) -> Option<ThreadId> {
    let s = std::str::from_utf8(key).ok()?;
    let rest = s.strip_prefix(THREAD)?;
    let (id, _) = rest.split_once(':')?;
    ThreadId::parse(id).ok()
}

/// The message id of a key that starts with `prefix` (a [`msg_prefix`]).
pub fn parse_msg(prefix: &[u8], key: &[u8]) -> Option<MessageId> {
    let rest = key.strip_prefix(prefix)?;
    MessageId::parse(std::str::from_utf8(rest).ok()?).ok()
}

/// `idx:author:<user>:<thread>`
pub fn author_index(user: &UserId, thread: &ThreadId) -> Vec<u8> {
    format!("{AUTHOR_IDX}{}:{thread}", user.key_segment()).into_bytes()
}

/// `idx:author:<user>:` and `idx:author:<user>;`: the bounds of `user`'s index keys.
pub fn author_index_bounds(user: &UserId) -> (Vec<u8>, Vec<u8>) {
    (
        format!("{AUTHOR_IDX}{}:", user.key_segment()).into_bytes(),
        format!("{AUTHOR_IDX}{};", user.key_segment()).into_bytes(),
    )
}

/// `idx:author:` and `idx:author;`: the bounds of every author index key.
pub fn all_author_index() -> (Vec<u8>, Vec<u8>) {
    (AUTHOR_IDX.as_bytes().to_vec(), b"idx:author;".to_vec())
}

/// The user of an author index key `idx:author:<user>:<thread>`, or `None` for any other key.
pub fn parse_author_of_index(key: &[u8]) -> Option<UserId> {
    let s = std::str::from_utf8(key).ok()?;
    let (seg, thread) = s.strip_prefix(AUTHOR_IDX)?.split_once(':')?;
    ThreadId::parse(thread).ok()?;
    UserId::from_key_segment(seg).ok()
}

/// The thread id of an author index key that starts with `prefix`.
pub fn parse_author_index(prefix: &[u8], key: &[u8]) -> Option<ThreadId> {
    let rest = key.strip_prefix(prefix)?;
    ThreadId::parse(std::str::from_utf8(rest).ok()?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::Timestamp;

    fn t(s: &str) -> ThreadId {
        ThreadId::parse(s).unwrap()
    }
    fn m(ts: u64, seq: u32) -> MessageId {
        MessageId::new(Timestamp::from_nanos(ts), seq).unwrap()
    }

    #[test]
    fn layout() {
        let id = t("t1");
        assert_eq!(meta(&id), b"thread:t1:meta");
        assert_eq!(
            msg(&id, m(5, 1)),
            b"thread:t1:msg:00000000000000000005-000001"
        );
        assert_eq!(parse_meta(b"thread:t1:meta"), Some(id.clone()));
        assert_eq!(parse_meta(b"thread:t1:msg:x"), None);
        assert_eq!(parse_thread_of(&msg(&id, m(5, 1))), Some(id.clone()));
        assert_eq!(
            parse_msg(&msg_prefix(&id), &msg(&id, m(5, 1))),
            Some(m(5, 1))
        );
        let u = UserId::parse("bob@x").unwrap();
        let (lo, _) = author_index_bounds(&u);
        assert_eq!(parse_author_index(&lo, &author_index(&u, &id)), Some(id));
        assert_eq!(signature_generation(&u), b"user:bob@x:sig_gen");
        assert_eq!(
            parse_signature_generation(&signature_generation(&u)),
            Some(u)
        );
        assert_eq!(parse_signature_generation(b"user:bob@x:other"), None);
        // A user id with the separator in it stays one field.
        let odd = UserId::parse("auth0:x|y").unwrap();
        assert_eq!(signature_generation(&odd), b"user:auth0%3Ax%7Cy:sig_gen");
        assert_eq!(
            parse_signature_generation(&signature_generation(&odd)),
            Some(odd.clone())
        );
        let (lo, hi) = author_index_bounds(&UserId::parse("auth0").unwrap());
        let k = author_index(&odd, &t("t1"));
        assert!(!(k >= lo && k < hi), "auth0:x's threads are not auth0's");
    }

    #[test]
    fn keys_sort_in_time_order_and_meta_first() {
        let id = t("abc");
        let mut keys = vec![
            msg(&id, m(10, 0)),
            msg(&id, m(9, 5)),
            msg(&id, m(1_000_000_000_000, 0)),
            meta(&id),
            msg(&id, m(10, 2)),
        ];
        keys.sort();
        assert_eq!(keys[0], meta(&id));
        let ids: Vec<MessageId> = keys[1..]
            .iter()
            .map(|k| parse_msg(&msg_prefix(&id), k).unwrap())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        // Everything of the thread is inside [thread_prefix, thread_end) and the message
        // range is inside [msg_prefix, msg_end).
        for k in &keys {
            assert!(k.as_slice() >= thread_prefix(&id).as_slice());
            assert!(k.as_slice() < thread_end(&id).as_slice());
        }
        for k in &keys[1..] {
            assert!(k.as_slice() >= msg_prefix(&id).as_slice());
            assert!(k.as_slice() < msg_end(&id).as_slice());
        }
    }

    #[test]
    fn no_thread_prefix_matches_another_thread() {
        // "ab" is a prefix of "abc" and "ab-" as strings, but not as key prefixes.
        let ab = t("ab");
        for other in ["abc", "ab-", "ab_", "a", "abb"] {
            let o = t(other);
            for k in [meta(&o), msg(&o, m(1, 0))] {
                assert!(!k.starts_with(&thread_prefix(&ab)), "{other}");
                assert!(!k.starts_with(&msg_prefix(&ab)), "{other}");
                let inside = k.as_slice() >= thread_prefix(&ab).as_slice()
                    && k.as_slice() < thread_end(&ab).as_slice();
                assert!(!inside, "{other}");
            }
        }
    }
}

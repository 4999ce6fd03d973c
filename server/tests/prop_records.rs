//! Property tests of the server's decoders: message ids (the page cursor), user ids, LMDB
//! keys and stored records. Arbitrary input never panics, and what parses is exactly what
//! was written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kms_api::ThreadId;
use progressdb::ids::{MessageId, UserId};
use progressdb::store::keys;
use progressdb::store::records::{MessageRecord, ThreadRecord};
use proptest::prelude::*;

proptest! {
    #[test]
    fn cursors_parse_exactly(s in "\\PC{0,40}", digits in "[0-9]{20}-[0-9]{6}") {
        if let Ok(id) = MessageId::parse(&s) {
            prop_assert_eq!(id.to_string(), s.clone());
        }
        // The written form of every id parses back to itself; a timestamp over u64 does not.
        let fits = digits[..20].parse::<u64>().is_ok();
        match MessageId::parse(&digits) {
            Ok(id) => prop_assert_eq!(id.to_string(), digits),
            Err(_) => prop_assert!(!fits, "{} was refused", digits),
        }
    }

    #[test]
    fn user_ids_parse_exactly(s in "\\PC{0,140}") {
        if let Ok(u) = UserId::parse(&s) {
            prop_assert_eq!(u.as_str(), s.as_str());
            // Its store-key form never holds the separator and decodes to it.
            let seg = u.key_segment();
            prop_assert!(!seg.contains(':'));
            prop_assert_eq!(UserId::from_key_segment(&seg).unwrap(), u);
        }
    }

    #[test]
    fn store_keys_parse_back_and_garbage_does_not(
        t in "[A-Za-z0-9_-]{1,64}",
        digits in "[0-9]{19}-[0-9]{6}",
        junk in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let thread = ThreadId::parse(&t).unwrap();
        let id = MessageId::parse(&format!("0{digits}")).unwrap();
        prop_assert_eq!(keys::parse_meta(&keys::meta(&thread)), Some(thread.clone()));
        let prefix = keys::msg_prefix(&thread);
        prop_assert_eq!(keys::parse_msg(&prefix, &keys::msg(&thread, id)), Some(id));
        let _ = keys::parse_meta(&junk);
        let _ = keys::parse_thread_of(&junk);
        let _ = keys::parse_msg(&prefix, &junk);
    }

    #[test]
    fn stored_records_from_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = serde_json::from_slice::<MessageRecord>(&bytes);
        let _ = serde_json::from_slice::<ThreadRecord>(&bytes);
    }

    #[test]
    fn stored_records_from_arbitrary_json_never_panic(
        author in "\\PC{0,10}",
        content in prop_oneof![
            "\\PC{0,20}".prop_map(|s| serde_json::json!({"enc": s})),
            any::<i64>().prop_map(|n| serde_json::json!({"plain": n})),
            Just(serde_json::json!({"enc": null})),
            Just(serde_json::json!({})),
        ],
        v in proptest::option::of(any::<i64>()),
        ts in any::<i64>(),
    ) {
        let mut rec = serde_json::json!({
            "author": author, "created_at": ts, "updated_at": ts, "content": content,
        });
        if let Some(v) = v {
            rec["v"] = serde_json::json!(v);
        }
        let _ = serde_json::from_value::<MessageRecord>(rec);
    }
}

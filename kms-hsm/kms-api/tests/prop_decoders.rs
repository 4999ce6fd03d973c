//! Property tests of the KMS request decoders, the ids and the base64 codec (run by
//! `cargo test`, 256 cases each; failures proptest finds are kept in
//! `proptest-regressions/` and replayed first). The hostile seeds in `tests/corpus/` are
//! replayed too: each must be refused with an error, never accepted or panicking.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kms_api::parse::{BatchBody, CreateDekBody, DecryptBody, EncryptBody};
use kms_api::wire::{
    CreateDekRequest, DecryptRequest, EncryptRequest, MAX_AAD_BYTES, MAX_ITEM_BYTES,
};
use kms_api::{b64, KeyId, ThreadId};
use proptest::prelude::*;

/// Every decoder on `bytes`: never a panic; whatever parses is within the limits.
fn decode_all(bytes: &[u8]) -> usize {
    let mut accepted = 0;
    if let Ok(b) = serde_json::from_slice::<EncryptBody>(bytes) {
        if let Ok(r) = EncryptRequest::try_from(b) {
            assert!(r.plaintext.len() <= MAX_ITEM_BYTES);
            assert!(!matches!(&r.aad, Some(a) if a.0.len() > MAX_AAD_BYTES));
            accepted += 1;
        }
    }
    if let Ok(b) = serde_json::from_slice::<DecryptBody>(bytes) {
        if let Ok(r) = DecryptRequest::try_from(b) {
            assert!(r.ciphertext.0.len() <= MAX_ITEM_BYTES + 28);
            accepted += 1;
        }
    }
    if let Ok(b) = serde_json::from_slice::<CreateDekBody>(bytes) {
        if CreateDekRequest::try_from(b).is_ok() {
            accepted += 1;
        }
    }
    if let Ok(b) = serde_json::from_slice::<BatchBody<EncryptBody>>(bytes) {
        if let Ok(items) = b.into_items() {
            if items
                .into_iter()
                .all(|i| EncryptRequest::try_from(i).is_ok())
            {
                accepted += 1;
            }
        }
    }
    accepted
}

#[test]
fn the_hostile_corpus_is_refused() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode_all(&bytes), 0, "{} was accepted", path.display());
        n += 1;
    }
    assert!(n >= 10, "the corpus holds {n} files");
}

/// A JSON string literal of `s`.
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_fields_are_parsed_or_refused(
        key in "(dek_[0-9a-f]{32}|dek_[0-9a-fA-F]{0,40}|[ -~]{0,40})",
        text in "[A-Za-z0-9+/=]{0,64}",
        aad in proptest::option::of("[A-Za-z0-9+/=-]{0,16}"),
    ) {
        let body = match &aad {
            Some(a) => format!(r#"{{"key_id":{},"plaintext":{},"aad":{}}}"#, lit(&key), lit(&text), lit(a)),
            None => format!(r#"{{"key_id":{},"plaintext":{}}}"#, lit(&key), lit(&text)),
        };
        let parsed: EncryptBody = serde_json::from_str(&body).unwrap();
        match EncryptRequest::try_from(parsed) {
            Ok(r) => {
                // Accepted only when every field is exactly what the API allows.
                prop_assert_eq!(r.key_id.as_str(), key.as_str());
                prop_assert_eq!(b64::encode(r.plaintext.expose()), text);
                if let Some(a) = &aad {
                    prop_assert_eq!(&b64::encode(&r.aad.unwrap().0), a);
                }
            }
            Err(_) => {
                let key_ok = KeyId::parse(&key).is_ok();
                let text_ok = b64::decode(text.as_bytes()).is_ok();
                let aad_ok = match &aad {
                    Some(a) => b64::decode(a.as_bytes()).is_ok(),
                    None => true,
                };
                prop_assert!(!(key_ok && text_ok && aad_ok), "a valid request was refused: {}", body);
            }
        }
    }

    /// Base64 has exactly one accepted text per byte string: decoding then encoding gives
    /// the input back, for every input that decodes.
    #[test]
    fn base64_round_trips_and_is_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..200), text in "[A-Za-z0-9+/=]{0,24}") {
        prop_assert_eq!(b64::decode(b64::encode(&bytes).as_bytes()).unwrap(), bytes);
        if let Ok(b) = b64::decode(text.as_bytes()) {
            prop_assert_eq!(b64::encode(&b), text);
        }
    }

    /// Ids are parsed exactly: accepted ones print as they were written.
    #[test]
    fn ids_parse_exactly(s in "\\PC{0,80}") {
        if let Ok(k) = KeyId::parse(&s) {
            prop_assert_eq!(k.to_string(), s.clone());
        }
        if let Ok(t) = ThreadId::parse(&s) {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert!(!s.is_empty() && s.len() <= ThreadId::MAX_LEN);
            prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
    }
}

//! Property tests of the KMS's binary parsers: the wrapped-DEK header and the message
//! ciphertext (`nonce | ciphertext | tag`). Arbitrary bytes never panic, only well-formed
//! values parse, and a ciphertext with any one bit changed never opens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kms_api::WrappedDek;
use progressdb_kms::backend::{parse_wrapped_header, AES_GCM_V1_LEN};
use proptest::prelude::*;
use ring::rand::SystemRandom;
use service_kit::aead::{open, seal, DataKey};

proptest! {
    #[test]
    fn wrapped_headers_parse_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let ok = bytes.len() == AES_GCM_V1_LEN
            && bytes[0] == 1
            && u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) != 0;
        let parsed = parse_wrapped_header(&WrappedDek::new(bytes.clone()));
        prop_assert_eq!(parsed.is_ok(), ok);
        if let Ok(h) = parsed {
            prop_assert_eq!(h.kek_version.get(), u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
        }
    }

    #[test]
    fn arbitrary_ciphertexts_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..200), aad in proptest::collection::vec(any::<u8>(), 0..32)) {
        let key = DataKey::random(&SystemRandom::new()).unwrap();
        prop_assert!(open(&key, &bytes, &aad).is_err());
    }

    #[test]
    fn one_changed_bit_or_aad_byte_never_opens(
        plain in proptest::collection::vec(any::<u8>(), 0..300),
        aad in proptest::collection::vec(any::<u8>(), 0..32),
        bit in any::<usize>(),
    ) {
        let rng = SystemRandom::new();
        let key = DataKey::random(&rng).unwrap();
        let sealed = seal(&rng, &key, &plain, &aad).unwrap();
        prop_assert_eq!(&open(&key, &sealed, &aad).unwrap()[..], &plain[..]);
        let mut bad = sealed.clone();
        let i = bit % (bad.len() * 8);
        bad[i / 8] ^= 1 << (i % 8);
        prop_assert!(open(&key, &bad, &aad).is_err());
        let mut other = aad.clone();
        other.push(0);
        prop_assert!(open(&key, &sealed, &other).is_err());
        prop_assert!(open(&key, &sealed[..sealed.len() - 1], &aad).is_err());
    }
}

//! Property tests of the KMS's binary parsers: the wrapped-DEK header and the message
//! ciphertext (`nonce | ciphertext | tag`). Arbitrary bytes never panic, only well-formed
//! values parse, and a ciphertext with any one bit changed never opens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kms_api::WrappedDek;
use progressdb_kms::backend::{
    parse_wrapped_header, WrapFormat, AES_GCM_V1_LEN, AES_KW_V2_LEN, AES_KW_V3_LEN,
};
use proptest::prelude::*;
use ring::rand::SystemRandom;
use service_kit::aead::{open, seal, DataKey};

proptest! {
    #[test]
    fn wrapped_headers_parse_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        // Every format: tag 1 (AES-GCM, under encrypt-class KEKs), tag 2 (AES key wrap with
        // a check under the DEK, read only) and tag 3 (AES key wrap bound by the HSM's HMAC),
        // each at its own exact length, with a version that is not 0.
        let ok = ((bytes.len() == AES_GCM_V1_LEN && bytes[0] == 1)
            || (bytes.len() == AES_KW_V2_LEN && bytes[0] == 2)
            || (bytes.len() == AES_KW_V3_LEN && bytes[0] == 3))
            && u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) != 0;
        let parsed = parse_wrapped_header(&WrappedDek::new(bytes.clone()));
        prop_assert_eq!(parsed.is_ok(), ok);
        if let Ok(h) = parsed {
            prop_assert_eq!(h.kek_version.get(), u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
        }
    }

    #[test]
    fn well_formed_headers_of_every_format_parse(
        tag in 1u8..=3,
        version in 1u32..,
        rest in proptest::collection::vec(any::<u8>(), AES_KW_V3_LEN),
    ) {
        let len = WrapFormat::from_tag(tag).unwrap().blob_len();
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&rest[..len - 5]);
        let h = parse_wrapped_header(&WrappedDek::new(bytes.clone())).unwrap();
        prop_assert_eq!(h.kek_version.get(), version);
        // One byte more or less is refused.
        bytes.push(0);
        prop_assert!(parse_wrapped_header(&WrappedDek::new(bytes.clone())).is_err());
        bytes.truncate(len - 1);
        prop_assert!(parse_wrapped_header(&WrappedDek::new(bytes)).is_err());
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

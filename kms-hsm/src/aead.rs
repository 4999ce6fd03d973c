//! Message encryption under a DEK: AES-256-GCM (ring), 96-bit random nonce, 128-bit tag.
//!
//! Ciphertext layout: `nonce (12) | ciphertext (= plaintext length) | tag (16)`. The caller's
//! AAD (empty when absent) is authenticated but not stored. Every failure to open — short
//! input, wrong key, wrong AAD, any flipped bit — is the same opaque [`OpenError`], so a caller
//! learns nothing about which check failed.

use kms_api::wire::SecretBytes;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::backend::Dek;

/// Bytes of nonce in front of every ciphertext.
pub const NONCE_BYTES: usize = NONCE_LEN;
/// Bytes of authentication tag at the end of every ciphertext.
pub const TAG_BYTES: usize = 16;
/// Shortest valid ciphertext (empty plaintext).
pub const MIN_CIPHERTEXT_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// Encryption failed: only when the system random generator fails (never observed).
#[derive(Debug, thiserror::Error)]
#[error("AEAD seal failed (random generator or cipher error)")]
pub struct SealError;

/// Decryption failed. Deliberately carries no cause.
#[derive(Debug, thiserror::Error)]
#[error("decryption failed")]
pub struct OpenError;

/// An AES-256-GCM key. ring refuses only keys of the wrong length, and a [`Dek`] is 32 bytes
/// by type, so the error branch is never taken; it is still an error, not a panic.
fn key(dek: &Dek) -> Result<LessSafeKey, ring::error::Unspecified> {
    UnboundKey::new(&AES_256_GCM, dek.expose()).map(LessSafeKey::new)
}

/// Encrypts `plaintext` with AAD `aad` under `dek`. Returns `nonce | ciphertext | tag`.
///
/// # Errors
/// [`SealError`] when the random generator fails.
pub fn seal(
    rng: &SystemRandom,
    dek: &Dek,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill(&mut nonce).map_err(|_| SealError)?;
    let mut out = Vec::with_capacity(NONCE_BYTES + plaintext.len() + TAG_BYTES);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key(dek)
        .map_err(|_| SealError)?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_BYTES..],
        )
        .map_err(|_| SealError)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Decrypts `nonce | ciphertext | tag` with AAD `aad` under `dek`. The plaintext is zeroized on
/// drop and never printed.
///
/// # Errors
/// [`OpenError`] for any input that does not authenticate.
pub fn open(dek: &Dek, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, OpenError> {
    if sealed.len() < MIN_CIPHERTEXT_BYTES {
        return Err(OpenError);
    }
    let (nonce, rest) = sealed.split_at(NONCE_BYTES);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
    let mut buf = Zeroizing::new(rest.to_vec());
    let len = key(dek)
        .map_err(|_| OpenError)?
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| OpenError)?
        .len();
    buf.truncate(len);
    // Moves the buffer (no copy) into the redacting, zeroizing wrapper.
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn dek(b: u8) -> Dek {
        Dek::from_bytes(Zeroizing::new([b; 32]))
    }

    #[test]
    fn round_trip_and_layout() {
        let rng = SystemRandom::new();
        let ct = seal(&rng, &dek(1), b"hello", b"aad").unwrap();
        assert_eq!(ct.len(), 12 + 5 + 16);
        assert_eq!(open(&dek(1), &ct, b"aad").unwrap().expose(), b"hello");
        let empty = seal(&rng, &dek(1), b"", b"").unwrap();
        assert_eq!(empty.len(), MIN_CIPHERTEXT_BYTES);
        assert!(open(&dek(1), &empty, b"").unwrap().is_empty());
    }

    #[test]
    fn nonces_differ() {
        let rng = SystemRandom::new();
        let a = seal(&rng, &dek(1), b"x", b"").unwrap();
        let b = seal(&rng, &dek(1), b"x", b"").unwrap();
        assert_ne!(a[..12], b[..12]);
    }

    #[test]
    fn every_tampering_fails() {
        let rng = SystemRandom::new();
        let ct = seal(&rng, &dek(1), b"hello world", b"aad").unwrap();
        assert!(open(&dek(1), &ct, b"other").is_err());
        assert!(open(&dek(1), &ct, b"").is_err());
        assert!(open(&dek(2), &ct, b"aad").is_err());
        assert!(open(&dek(1), &ct[..ct.len() - 1], b"aad").is_err());
        assert!(open(&dek(1), &ct[..10], b"aad").is_err());
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 0x01;
            assert!(open(&dek(1), &t, b"aad").is_err(), "bit flip at {i}");
        }
    }
}

//! AES-256-GCM under a 256-bit key (ring), the one implementation used by the KMS for message
//! encryption and by the dev-only embedded provider of the server.
//!
//! Layout: `nonce (12, random) | ciphertext (= plaintext length) | tag (16)`. The caller's
//! AAD is authenticated but not stored. Every failure to open (short input, wrong key, wrong
//! AAD, any flipped bit) is the same opaque [`OpenError`].

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length of a key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Bytes of nonce in front of every ciphertext.
pub const NONCE_BYTES: usize = NONCE_LEN;
/// Bytes of authentication tag at the end of every ciphertext.
pub const TAG_BYTES: usize = 16;
/// Shortest valid ciphertext (empty plaintext).
pub const MIN_CIPHERTEXT_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// A raw 256-bit key, held in a slot of the process's locked key arena ([`crate::locked`]),
/// or in zeroizing heap memory when every slot is taken. Moving it moves a reference, never
/// the bytes; zeroized on drop; neither `Clone` nor `PartialEq`; `Debug` prints nothing of it;
/// no `Display`.
pub struct DataKey(Option<Storage>);

enum Storage {
    Locked(crate::locked::Slot),
    Heap(Box<Zeroizing<[u8; KEY_LEN]>>),
}

/// What [`DataKey::expose`] would see of a key whose storage was given back, which only
/// happens inside `drop`, where nothing can call it: never read, so no panic path is needed.
static RELEASED: [u8; KEY_LEN] = [0; KEY_LEN];

impl Storage {
    /// Empty storage to fill: a locked slot when one is free.
    fn empty() -> Self {
        match crate::locked::take() {
            Some(slot) => Self::Locked(slot),
            None => Self::Heap(Box::new(Zeroizing::new([0u8; KEY_LEN]))),
        }
    }

    fn bytes(&self) -> &[u8; KEY_LEN] {
        match self {
            Self::Locked(k) => k,
            Self::Heap(k) => k,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8; KEY_LEN] {
        match self {
            Self::Locked(k) => k,
            Self::Heap(k) => k,
        }
    }
}

impl DataKey {
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let mut k = Storage::empty();
        k.bytes_mut().copy_from_slice(&bytes[..]);
        Self(Some(k))
    }

    /// A key copied from `bytes`, or `None` unless it is exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut k = Storage::empty();
        k.bytes_mut().copy_from_slice(bytes);
        Some(Self(Some(k)))
    }

    /// A fresh key from the system random generator.
    ///
    /// # Errors
    /// [`SealError`] when the generator fails.
    pub fn random(rng: &SystemRandom) -> Result<Self, SealError> {
        let mut k = Storage::empty();
        let filled = rng.fill(&mut k.bytes_mut()[..]);
        // Built before the check, so a failure still gives the slot back through `drop`.
        let key = Self(Some(k));
        filled.map_err(|_| SealError)?;
        Ok(key)
    }

    /// The key bytes, for the cipher and for wrapping only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.as_ref().map_or(&RELEASED, Storage::bytes)
    }

    /// ring refuses only keys of the wrong length, and a `DataKey` is 32 bytes by type, so
    /// the error branch is never taken; it is still an error, not a panic.
    fn cipher(&self) -> Result<LessSafeKey, ring::error::Unspecified> {
        UnboundKey::new(&AES_256_GCM, &self.expose()[..]).map(LessSafeKey::new)
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        if let Some(Storage::Locked(slot)) = self.0.take() {
            crate::locked::give_back(slot);
        }
        // A heap key zeroizes itself when its box drops.
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// Encryption failed: only when the system random generator fails (never observed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("AEAD seal failed (random generator or cipher error)")]
pub struct SealError;

/// Decryption failed. Deliberately carries no cause.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("decryption failed")]
pub struct OpenError;

/// Encrypts `plaintext` with AAD `aad` under `key`. Returns `nonce | ciphertext | tag`; the
/// plaintext is encrypted in place in the output buffer, so no plaintext copy is left in it.
///
/// # Errors
/// [`SealError`] when the random generator fails.
pub fn seal(
    rng: &SystemRandom,
    key: &DataKey,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill(&mut nonce).map_err(|_| SealError)?;
    let mut out = Vec::with_capacity(NONCE_BYTES + plaintext.len() + TAG_BYTES);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .cipher()
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

/// Decrypts `nonce | ciphertext | tag` with AAD `aad` under `key`, into a zeroizing buffer.
///
/// # Errors
/// [`OpenError`] for any input that does not authenticate.
pub fn open(key: &DataKey, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    if sealed.len() < MIN_CIPHERTEXT_BYTES {
        return Err(OpenError);
    }
    let (nonce, rest) = sealed.split_at(NONCE_BYTES);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
    let mut buf = Zeroizing::new(rest.to_vec());
    let len = key
        .cipher()
        .map_err(|_| OpenError)?
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| OpenError)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(b: u8) -> DataKey {
        DataKey::from_bytes(Zeroizing::new([b; 32]))
    }

    #[test]
    fn round_trip_and_layout() {
        let rng = SystemRandom::new();
        let ct = seal(&rng, &key(1), b"hello", b"aad").unwrap();
        assert_eq!(ct.len(), 12 + 5 + 16);
        assert_eq!(&open(&key(1), &ct, b"aad").unwrap()[..], b"hello");
        let empty = seal(&rng, &key(1), b"", b"").unwrap();
        assert_eq!(empty.len(), MIN_CIPHERTEXT_BYTES);
        assert!(open(&key(1), &empty, b"").unwrap().is_empty());
    }

    #[test]
    fn nonces_differ() {
        let rng = SystemRandom::new();
        let a = seal(&rng, &key(1), b"x", b"").unwrap();
        let b = seal(&rng, &key(1), b"x", b"").unwrap();
        assert_ne!(a[..12], b[..12]);
    }

    #[test]
    fn every_tampering_fails() {
        let rng = SystemRandom::new();
        let ct = seal(&rng, &key(1), b"hello world", b"aad").unwrap();
        assert!(open(&key(1), &ct, b"other").is_err());
        assert!(open(&key(1), &ct, b"").is_err());
        assert!(open(&key(2), &ct, b"aad").is_err());
        assert!(open(&key(1), &ct[..ct.len() - 1], b"aad").is_err());
        assert!(open(&key(1), &ct[..10], b"aad").is_err());
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 0x01;
            assert!(open(&key(1), &t, b"aad").is_err(), "bit flip at {i}");
        }
    }

    #[test]
    fn keys_print_nothing() {
        let k = key(0x41);
        assert_eq!(format!("{k:?}"), "DataKey(<redacted>)");
        assert!(DataKey::from_slice(&[0; 31]).is_none());
        assert_eq!(DataKey::from_slice(&[7; 32]).unwrap().expose(), &[7; 32]);
    }
}

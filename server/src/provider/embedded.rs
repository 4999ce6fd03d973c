//! The embedded (in-process) provider — compiled only with the `dev-embedded` feature.
//!
//! A 32-byte master key (from a mode-0600 file holding it as base64 or hex) wraps one random
//! 256-bit DEK per thread with AES-256-GCM (ring). The wrapped form is
//! `0xE1 | nonce(12) | wrapped DEK(32) | tag(16)`, bound by AAD to the key id, and reported
//! under `kek_id = "embedded-master"`, `kek_version = 1`. Messages are encrypted exactly like
//! the KMS does: `nonce(12) | ciphertext | tag(16)` with the caller's AAD.
//!
//! Raw DEKs exist only inside one call, in zeroizing buffers. This provider is for development
//! and tests: the master key is a software key in the server's memory.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use kms_api::wire::SecretBytes;
use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use ring::rand::{SecureRandom, SystemRandom};
use service_kit::aead::{self, DataKey};
use service_kit::secret_file;
use zeroize::Zeroizing;

use super::{
    BoxFuture, Ciphertext, DecryptItem, EncryptItem, ItemOutcome, KeyProvider, ProviderBuildError,
    ProviderError, ProviderKind, ThreadKey,
};
use crate::metrics::KmsMetrics;

/// The `kek_id` of DEKs wrapped by the dev master key.
pub const KEK_ID: &str = "embedded-master";
const WRAP_FORMAT: u8 = 0xE1;
const WRAP_AAD_PREFIX: &[u8] = b"progressdb-embedded-dek-v1:";
const DEK_LEN: usize = aead::KEY_LEN;

fn rng_error(_: aead::SealError) -> ProviderError {
    ProviderError::Internal("no randomness".into())
}

/// `nonce | ciphertext | tag` of `plaintext` under `key` with `aad`.
fn seal(key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ProviderError> {
    aead::seal(&SystemRandom::new(), key, plaintext, aad).map_err(rng_error)
}

/// Opens `nonce | ciphertext | tag`; any failure is the one opaque `DecryptionFailed`.
fn open(key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, ProviderError> {
    let mut pt = aead::open(key, sealed, aad).map_err(|_| ProviderError::DecryptionFailed)?;
    // Moved (no copy) into the redacting, zeroizing wire type.
    Ok(SecretBytes::new(std::mem::take(&mut *pt)))
}

fn wrap_aad(key_id: &KeyId) -> Vec<u8> {
    let mut a = WRAP_AAD_PREFIX.to_vec();
    a.extend_from_slice(key_id.as_str().as_bytes());
    a
}

/// The dev master key. `Debug` shows nothing of it.
pub struct MasterKey {
    key: DataKey,
    kek_id: KekId,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Reads a master key file: mode 0600 or stricter, 32 bytes as hex (64 digits) or
    /// standard base64, surrounding whitespace ignored.
    ///
    /// # Errors
    /// [`ProviderBuildError::MasterKey`] naming the file (never its content).
    pub fn load(path: &Path) -> Result<Self, ProviderBuildError> {
        let err = |m: String| ProviderBuildError::MasterKey(format!("{}: {m}", path.display()));
        let raw = secret_file::read_secret_bytes(path).map_err(|e| err(e.to_string()))?;
        let text = std::str::from_utf8(&raw)
            .map_err(|_| err("not text (expected base64 or hex)".into()))?;
        let text = text.trim();
        let bytes = Zeroizing::new(
            if text.len() == 2 * DEK_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                hex::decode(text).map_err(|_| err("invalid hex".into()))?
            } else {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| err("expected 32 bytes as base64 or 64 hex digits".into()))?
            },
        );
        if bytes.len() != DEK_LEN {
            return Err(err(format!("holds {} bytes, expected 32", bytes.len())));
        }
        Self::from_bytes(&bytes).map_err(|e| err(e.to_string()))
    }

    /// A master key from its 32 bytes.
    ///
    /// # Errors
    /// [`ProviderError::Internal`] for a wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProviderError> {
        let kek_id = KekId::parse(KEK_ID).map_err(|e| ProviderError::Internal(e.to_string()))?;
        Ok(Self {
            key: DataKey::from_slice(bytes)
                .ok_or_else(|| ProviderError::Internal("invalid AES-256 key length".into()))?,
            kek_id,
        })
    }

    /// Creates and wraps a new DEK.
    ///
    /// # Errors
    /// [`ProviderError::Internal`] when the system has no randomness.
    pub fn new_dek(&self) -> Result<ThreadKey, ProviderError> {
        let rng = SystemRandom::new();
        let no_rng = |_| ProviderError::Internal("no randomness".into());
        let mut id = [0u8; 16];
        rng.fill(&mut id).map_err(no_rng)?;
        let key_id = KeyId::from_random(id);
        let dek = DataKey::random(&rng).map_err(rng_error)?;
        let mut wrapped = vec![WRAP_FORMAT];
        wrapped.extend(seal(&self.key, &wrap_aad(&key_id), dek.expose())?);
        Ok(ThreadKey {
            key_id,
            wrapped_dek: WrappedDek::new(wrapped),
            kek_id: self.kek_id.clone(),
            kek_version: KekVersion::FIRST,
        })
    }

    /// The DEK of `key`. `UnknownKey` if another KEK wrapped it.
    fn unwrap(&self, key: &ThreadKey) -> Result<DataKey, ProviderError> {
        if key.kek_id != self.kek_id {
            return Err(ProviderError::UnknownKey);
        }
        let w = key.wrapped_dek.as_bytes();
        match w.split_first() {
            Some((&WRAP_FORMAT, sealed)) => {
                let dek = open(&self.key, &wrap_aad(&key.key_id), sealed)?;
                DataKey::from_slice(dek.expose()).ok_or(ProviderError::DecryptionFailed)
            }
            _ => Err(ProviderError::DecryptionFailed),
        }
    }

    /// Encrypts under `key`'s DEK.
    ///
    /// # Errors
    /// [`ProviderError`].
    pub fn encrypt(
        &self,
        key: &ThreadKey,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Ciphertext, ProviderError> {
        seal(&self.unwrap(key)?, aad, plaintext).map(Ciphertext)
    }

    /// Decrypts under `key`'s DEK.
    ///
    /// # Errors
    /// [`ProviderError::DecryptionFailed`] for any authentication failure.
    pub fn decrypt(
        &self,
        key: &ThreadKey,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> ItemOutcome<SecretBytes> {
        open(&self.unwrap(key)?, aad, ciphertext)
    }
}

/// See the module documentation.
pub struct EmbeddedProvider {
    master: Arc<MasterKey>,
    metrics: KmsMetrics,
}

impl fmt::Debug for EmbeddedProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedProvider").finish_non_exhaustive()
    }
}

impl EmbeddedProvider {
    pub fn new(master: Arc<MasterKey>, metrics: KmsMetrics) -> Self {
        Self { master, metrics }
    }

    fn decrypt_many(&self, items: &[DecryptItem]) -> Vec<ItemOutcome<SecretBytes>> {
        // Unwrap each distinct DEK once per call.
        let mut keys: HashMap<&KeyId, Result<DataKey, ProviderError>> = HashMap::new();
        items
            .iter()
            .map(|i| {
                let k = keys
                    .entry(&i.key.key_id)
                    .or_insert_with(|| self.master.unwrap(&i.key));
                match k {
                    Ok(k) => open(k, &i.aad, &i.ciphertext),
                    Err(e) => Err(e.clone()),
                }
            })
            .collect()
    }
}

impl KeyProvider for EmbeddedProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Embedded
    }

    fn create_dek_for_thread<'a>(
        &'a self,
        _thread: &'a ThreadId,
    ) -> BoxFuture<'a, Result<ThreadKey, ProviderError>> {
        Box::pin(async move {
            self.metrics.call("create_dek_for_thread", "ok");
            self.master.new_dek()
        })
    }

    fn encrypt(&self, item: EncryptItem) -> BoxFuture<'_, Result<Ciphertext, ProviderError>> {
        Box::pin(async move {
            self.metrics.call("encrypt", "ok");
            self.master
                .encrypt(&item.key, item.plaintext.expose(), &item.aad)
        })
    }

    fn decrypt(&self, item: DecryptItem) -> BoxFuture<'_, Result<SecretBytes, ProviderError>> {
        Box::pin(async move {
            self.metrics.call("decrypt", "ok");
            self.master.decrypt(&item.key, &item.ciphertext, &item.aad)
        })
    }

    fn encrypt_batch(
        &self,
        items: Vec<EncryptItem>,
    ) -> BoxFuture<'_, Result<Vec<ItemOutcome<Ciphertext>>, ProviderError>> {
        Box::pin(async move {
            self.metrics.call("encrypt_batch", "ok");
            Ok(items
                .iter()
                .map(|i| self.master.encrypt(&i.key, i.plaintext.expose(), &i.aad))
                .collect())
        })
    }

    fn decrypt_batch(
        &self,
        items: Vec<DecryptItem>,
    ) -> BoxFuture<'_, Result<Vec<ItemOutcome<SecretBytes>>, ProviderError>> {
        Box::pin(async move {
            self.metrics.call("decrypt_batch", "ok");
            Ok(self.decrypt_many(&items))
        })
    }

    fn destroy_key<'a>(&'a self, _key: &'a ThreadKey) -> BoxFuture<'a, Result<(), ProviderError>> {
        // The wrapped DEK lives only in the thread record; deleting the record shreds it.
        Box::pin(async { Ok(()) })
    }

    fn current_copy<'a>(
        &'a self,
        key: &'a ThreadKey,
    ) -> BoxFuture<'a, Result<ThreadKey, ProviderError>> {
        // The thread record holds the only copy.
        Box::pin(async move { Ok(key.clone()) })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mk() -> MasterKey {
        MasterKey::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let m = mk();
        let k = m.new_dek().unwrap();
        assert_eq!(k.kek_id.as_str(), KEK_ID);
        assert_eq!(k.wrapped_dek.as_bytes().len(), 1 + 12 + 32 + 16);
        let ct = m.encrypt(&k, b"hello marker", b"aad-1").unwrap();
        assert_eq!(ct.0.len(), 12 + 12 + 16);
        assert!(!ct.0.windows(6).any(|w| w == b"marker"));
        assert_eq!(
            m.decrypt(&k, &ct.0, b"aad-1").unwrap().expose(),
            b"hello marker"
        );
        assert_eq!(
            m.decrypt(&k, &ct.0, b"aad-2").map(|p| p.expose().to_vec()),
            Err(ProviderError::DecryptionFailed)
        );
        let mut bad = ct.0.clone();
        bad[20] ^= 1;
        assert_eq!(
            m.decrypt(&k, &bad, b"aad-1").map(|p| p.expose().to_vec()),
            Err(ProviderError::DecryptionFailed)
        );
        assert_eq!(
            m.decrypt(&k, &ct.0[..20], b"aad-1")
                .map(|p| p.expose().to_vec()),
            Err(ProviderError::DecryptionFailed)
        );
        let other = m.new_dek().unwrap();
        assert_eq!(
            m.decrypt(&other, &ct.0, b"aad-1")
                .map(|p| p.expose().to_vec()),
            Err(ProviderError::DecryptionFailed)
        );
        // A wrapped DEK moved to another key id does not unwrap.
        let moved = ThreadKey {
            key_id: other.key_id.clone(),
            ..k.clone()
        };
        assert_eq!(
            m.decrypt(&moved, &ct.0, b"aad-1")
                .map(|p| p.expose().to_vec()),
            Err(ProviderError::DecryptionFailed)
        );
        // Another master key cannot unwrap it.
        let m2 = MasterKey::from_bytes(&[8u8; 32]).unwrap();
        assert_eq!(
            m2.decrypt(&k, &ct.0, b"aad-1").map(|p| p.expose().to_vec()),
            Err(ProviderError::DecryptionFailed)
        );
        assert!(!format!("{m:?}").contains('7'));
    }

    #[test]
    fn key_file_formats_and_permissions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("master.key");
        std::fs::write(&p, format!("{}\n", hex::encode([1u8; 32]))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        MasterKey::load(&p).unwrap();
        std::fs::write(
            &p,
            base64::engine::general_purpose::STANDARD.encode([2u8; 32]),
        )
        .unwrap();
        MasterKey::load(&p).unwrap();
        std::fs::write(&p, "c2hvcnQ=").unwrap();
        let e = MasterKey::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("kms.master_key_file") && e.contains("expected 32"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = MasterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("master.key") && e.contains("0640"), "{e}");
    }
}

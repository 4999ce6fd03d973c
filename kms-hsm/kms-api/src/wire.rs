//! JSON bodies of the KMS HTTP API. Binary values travel as standard base64.
//!
//! Plaintext travels in [`SecretBytes`], which zeroizes on drop and never prints its content.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::ids::{IdempotencyKey, KekId, KekVersion, KeyId, ThreadId, WrappedDek};

/// Largest plaintext or ciphertext in one item, in bytes (before base64).
pub const MAX_ITEM_BYTES: usize = 1 << 20;
/// Largest number of items in one batch call.
pub const MAX_BATCH_ITEMS: usize = 1024;
/// Largest AAD, in bytes.
pub const MAX_AAD_BYTES: usize = 4096;
/// Bytes a ciphertext has beyond its plaintext: nonce (12) and tag (16).
pub const CIPHERTEXT_OVERHEAD: usize = 28;

/// Length of the standard base64 (padded) text of `n` bytes.
pub const fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// JSON framing of one batch item besides its base64 fields and key id: field names, quotes,
/// separators (measured at 44 bytes for an encrypt item; rounded up).
const ITEM_FRAMING_BYTES: usize = 64;
/// `{"items":[` and `]}`.
pub const BATCH_FRAMING_BYTES: usize = 16;

pub use service_kit::body::ZeroizingBuf;

/// `value` as JSON in a [`ZeroizingBuf`] (sized up front from `size_hint`).
///
/// # Errors
/// When `value` cannot be serialized.
pub fn to_json_zeroizing<T: Serialize>(
    value: &T,
    size_hint: usize,
) -> Result<ZeroizingBuf, serde_json::Error> {
    let mut buf = ZeroizingBuf::with_capacity(size_hint.max(64));
    serde_json::to_writer(&mut buf, value)?;
    Ok(buf)
}

/// Secret bytes (plaintext, raw key material): zeroized on drop, redacting `Debug`, no
/// `Display`, neither `Clone` nor `PartialEq` (a copy is made only on purpose, with
/// [`SecretBytes::duplicate`]). Serialized as base64, through zeroizing buffers.
#[derive(Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(v: Vec<u8>) -> Self {
        Self(Zeroizing::new(v))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A second zeroizing copy, for the rare caller that must keep one (e.g. to retry).
    pub fn duplicate(&self) -> Self {
        Self::new(self.0.to_vec())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::b64::encode_zeroizing(self.0.as_slice()))
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        let v = crate::b64::decode_zeroizing(s.as_bytes())
            .map_err(|_| serde::de::Error::custom("invalid base64"))?;
        Ok(Self(v))
    }
}

/// Non-secret binary data (ciphertext, AAD): base64 on the wire; `Debug` shows only length.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes64(pub Vec<u8>);

impl fmt::Debug for Bytes64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes64(<{} bytes>)", self.0.len())
    }
}

impl Serialize for Bytes64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::b64::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::b64::decode(s.as_bytes())
            .map(Bytes64)
            .map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

/// `POST /create_dek_for_thread`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDekRequest {
    pub thread_id: ThreadId,
    /// The same for every attempt of one create (see [`IdempotencyKey`]): a repeat answers
    /// the key the first attempt made. Without it every call makes a new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
}

/// Answer of `POST /create_dek_for_thread`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateDekResponse {
    pub key_id: KeyId,
    pub wrapped: WrappedDek,
    pub kek_id: KekId,
    pub kek_version: KekVersion,
}

/// `POST /encrypt`, and one item of `POST /encrypt_batch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptRequest {
    pub key_id: KeyId,
    pub plaintext: SecretBytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad: Option<Bytes64>,
}

impl EncryptRequest {
    /// An upper bound of this item's size inside a batch request body, in bytes.
    pub fn encoded_len(&self) -> usize {
        ITEM_FRAMING_BYTES
            + self.key_id.as_str().len()
            + base64_len(self.plaintext.len())
            + self.aad.as_ref().map_or(0, |a| base64_len(a.0.len()))
    }
}

/// Answer of `/encrypt`: `ciphertext` is `nonce(12) | ciphertext | tag(16)` (AES-256-GCM);
/// `key_version` is the KEK version under which the DEK is currently wrapped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncryptResponse {
    pub ciphertext: Bytes64,
    pub key_version: KekVersion,
}

/// `POST /decrypt`, and one item of `POST /decrypt_batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptRequest {
    pub key_id: KeyId,
    pub ciphertext: Bytes64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad: Option<Bytes64>,
}

impl DecryptRequest {
    /// An upper bound of this item's size inside a batch request body, in bytes.
    pub fn encoded_len(&self) -> usize {
        ITEM_FRAMING_BYTES
            + self.key_id.as_str().len()
            + base64_len(self.ciphertext.0.len())
            + self.aad.as_ref().map_or(0, |a| base64_len(a.0.len()))
    }
}

/// Answer of `/decrypt`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DecryptResponse {
    pub plaintext: SecretBytes,
}

/// Answer of `GET /get_wrapped?key_id=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetWrappedResponse {
    pub wrapped: WrappedDek,
    pub kek_id: KekId,
    pub kek_version: KekVersion,
}

/// `POST /destroy_key`: crypto-shredding of one DEK. Idempotent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyKeyRequest {
    pub key_id: KeyId,
}

crate::admin::wire_state! {
    /// A DEK's state as `destroy_key` answers it.
    KeyState {
        /// Destroyed: nothing can be unwrapped under it any more.
        Destroyed => "destroyed",
    }
}

/// Answer of `POST /destroy_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestroyKeyResponse {
    pub key_id: KeyId,
    pub state: KeyState,
}

/// `POST /encrypt_batch` and `POST /decrypt_batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<T> {
    pub items: Vec<T>,
}

/// Answer of a batch call: one result per item, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResponse<T> {
    pub results: Vec<ItemResult<T>>,
}

/// One item's outcome: `{"ok": {...}}` or `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemResult<T> {
    Ok(T),
    Error(ErrorDetail),
}

/// Stable error codes of the KMS API. The set only grows; a code never changes meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON or does not match the schema.
    MalformedRequest,
    /// A binary field is not valid standard base64.
    InvalidBase64,
    /// A field is well-formed JSON but its value is not acceptable (bad id, too many items...).
    InvalidArgument,
    /// No such route.
    NotFound,
    /// The key id is unknown (or destroyed).
    UnknownKey,
    /// The method is not allowed on this route.
    MethodNotAllowed,
    /// The caller is not allowed (peer uid not in the allow-list).
    Forbidden,
    /// Decryption failed: wrong key, wrong AAD, tampered or truncated ciphertext. One opaque
    /// code for every cause.
    DecryptionFailed,
    /// The body or an item is larger than allowed.
    PayloadTooLarge,
    /// The HSM or the key store cannot be reached now; retry later.
    Unavailable,
    /// The KMS is at a limit (connections, HSM queue); retry after the `Retry-After` delay.
    Overloaded,
    /// This peer is over its request rate (`limits.peer_rate_per_sec`); retry after the
    /// `Retry-After` delay.
    RateLimited,
    /// The key store cannot take writes: its map is at `store.map_size_mb`, or its file system
    /// is full. Nothing was written; reads keep working.
    StorageFull,
    /// Admin: no job with that id.
    UnknownJob,
    /// Admin: the KEK version is current, or not retired yet (a rotation has not moved and
    /// verified every DEK off it); it is not destroyed.
    KekNotRetired,
    /// Admin: key records still depend on the KEK version; it is not destroyed.
    KekInUse,
    /// `create_dek_for_thread`: the idempotency key was used before for another thread (its
    /// derived key id names a key of another thread); nothing was created.
    IdempotencyConflict,
    /// Admin: the backup file is not a backup of this format, or its HMAC does not verify
    /// (tampered, truncated, or made under another audit key); nothing was restored.
    BackupInvalid,
    /// Admin: a restore cannot establish which keys were destroyed after the backup (the
    /// store's audit log does not continue the backup's and no verifying audit export was
    /// given); nothing was restored.
    DestroysUnknown,
    /// Admin: the audit log cannot be compacted as asked (the archive does not end at a stored
    /// entry with its MAC, the entries up to it do not verify, or they were compacted
    /// already); nothing was removed.
    ArchiveMismatch,
    /// Anything else inside the KMS; detail is in the KMS log only.
    Internal,
    /// A code this build does not know (sent by a newer KMS). Treated like `internal`.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status for this code: the single mapping used by the KMS.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MalformedRequest | ErrorCode::InvalidBase64 | ErrorCode::InvalidArgument => {
                400
            }
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::UnknownKey | ErrorCode::UnknownJob => 404,
            ErrorCode::KekNotRetired
            | ErrorCode::KekInUse
            | ErrorCode::IdempotencyConflict
            | ErrorCode::DestroysUnknown
            | ErrorCode::ArchiveMismatch => 409,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::DecryptionFailed | ErrorCode::BackupInvalid => 422,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
            ErrorCode::Unavailable | ErrorCode::Overloaded => 503,
            ErrorCode::StorageFull => 507,
        }
    }

    /// The snake_case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::InvalidBase64 => "invalid_base64",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownKey => "unknown_key",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::DecryptionFailed => "decryption_failed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::UnknownJob => "unknown_job",
            ErrorCode::KekNotRetired => "kek_not_retired",
            ErrorCode::KekInUse => "kek_in_use",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::BackupInvalid => "backup_invalid",
            ErrorCode::DestroysUnknown => "destroys_unknown",
            ErrorCode::ArchiveMismatch => "archive_mismatch",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// `{"code": ..., "message": ...}`. Messages are for humans and never carry secrets or
/// internal detail on 5xx.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// The error body of every non-2xx answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// Answer of `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadyResponse {
    pub ready: bool,
    #[serde(default)]
    pub reason: Option<String>,
    /// Process alerts (`service_kit::alerts`: `single_user`, `core_dumps_not_denied`,
    /// `key_memory_unlocked`): ready, with a weakened guarantee an operator must see.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names() {
        for c in [
            ErrorCode::MalformedRequest,
            ErrorCode::InvalidBase64,
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::UnknownKey,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Forbidden,
            ErrorCode::DecryptionFailed,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Unavailable,
            ErrorCode::Overloaded,
            ErrorCode::StorageFull,
            ErrorCode::Internal,
        ] {
            let j = serde_json::to_string(&c).unwrap();
            assert_eq!(j, format!("\"{}\"", c.as_str()));
            assert!((400..600).contains(&c.status()));
        }
    }

    #[test]
    fn zeroizing_buf_grows_and_serializes() {
        let mut b = ZeroizingBuf::with_capacity(2);
        for i in 0..100u8 {
            b.push(&[i; 3]);
        }
        assert_eq!(b.len(), 300);
        assert_eq!(&b.as_slice()[297..], &[99, 99, 99]);
        let j = to_json_zeroizing(
            &DecryptResponse {
                plaintext: SecretBytes::new(b"hi".to_vec()),
            },
            1,
        )
        .unwrap();
        assert_eq!(j.as_slice(), br#"{"plaintext":"aGk="}"#);
        assert_eq!(&j.into_bytes()[..], br#"{"plaintext":"aGk="}"#);
        assert!(!format!("{b:?}").contains("99"));
    }

    #[test]
    fn unknown_codes_are_tolerated() {
        let b: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"quota_exceeded","message":"m"}}"#).unwrap();
        assert_eq!(b.error.code, ErrorCode::Unknown);
        assert_eq!(b.error.code.status(), 500);
    }

    #[test]
    fn secret_bytes_debug_redacts() {
        let s = SecretBytes::new(b"hunter2-plaintext".to_vec());
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"));
        let j = serde_json::to_string(&s).unwrap();
        let back: SecretBytes = serde_json::from_str(&j).unwrap();
        assert_eq!(back.expose(), b"hunter2-plaintext");
    }

    #[test]
    fn item_result_shape() {
        let r: ItemResult<DecryptResponse> = ItemResult::Error(ErrorDetail {
            code: ErrorCode::DecryptionFailed,
            message: "x".into(),
        });
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["error"]["code"], "decryption_failed");
    }

    #[test]
    fn encoded_len_bounds_the_real_encoding() {
        for (pt, aad) in [
            (0usize, None),
            (1, Some(0)),
            (1000, Some(77)),
            (65536, Some(4096)),
        ] {
            let e = EncryptRequest {
                key_id: KeyId::from_random([7; 16]),
                plaintext: SecretBytes::new(vec![0xa5; pt]),
                aad: aad.map(|n| Bytes64(vec![1; n])),
            };
            let real = serde_json::to_vec(&e).unwrap().len();
            assert!(
                real <= e.encoded_len() && e.encoded_len() <= real + 64,
                "{real}"
            );
            let d = DecryptRequest {
                key_id: KeyId::from_random([7; 16]),
                ciphertext: Bytes64(vec![0xa5; pt + 28]),
                aad: aad.map(|n| Bytes64(vec![1; n])),
            };
            let real = serde_json::to_vec(&d).unwrap().len();
            assert!(
                real <= d.encoded_len() && d.encoded_len() <= real + 64,
                "{real}"
            );
        }
    }

    #[test]
    fn bad_base64_is_refused() {
        let r: Result<DecryptRequest, _> = serde_json::from_str(
            r#"{"key_id":"dek_00000000000000000000000000000000","ciphertext":"!!"}"#,
        );
        assert!(r.is_err());
    }
}

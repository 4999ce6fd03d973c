//! The key-backend boundary: everything the KMS asks of the place where the KEK lives.
//!
//! The only production backend is [`pkcs11::Pkcs11Backend`] (an HSM reached through PKCS#11).
//! The service layer is generic over [`KeyBackend`], so unit tests of its logic can use a mock
//! and a future "DEKs never leave the HSM" backend can slot in.
//!
//! # Wrapped-DEK format
//! A wrapped DEK is self-describing; its first byte is a [`WrapFormat`] tag, so a blob written
//! today stays readable when another mechanism is added for an HSM that lacks this one. The
//! choice of mechanism lives in exactly one place: [`WrapFormat::CURRENT`].
//!
//! `AesGcmV1` (tag `0x01`), 65 bytes:
//! `tag(1) | kek_version (u32 BE, 4) | iv (12) | encrypted DEK (32) | GCM tag (16)`.
//! The DEK is encrypted by the HSM with `CKM_AES_GCM` under the KEK `(kek_id, kek_version)`,
//! with AAD = [`wrap_aad`] (binds the blob to its key id, KEK id and KEK version).

use std::fmt;
use std::future::Future;

use kms_api::{KekId, KekVersion, KeyId, WrappedDek};
use secrecy::SecretString;

pub mod pkcs11;

/// Length of a DEK in bytes (AES-256).
pub const DEK_LEN: usize = service_kit::aead::KEY_LEN;

/// A raw data-encryption key: boxed, zeroized on drop, never printed, not `Clone`
/// ([`service_kit::aead::DataKey`]).
pub use service_kit::aead::DataKey as Dek;

/// One KEK: its label in the HSM and its version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KekRef {
    pub id: KekId,
    pub version: KekVersion,
}

/// Tag of the wrapped-DEK format (first byte of every [`WrappedDek`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WrapFormat {
    /// DEK encrypted by the HSM with `CKM_AES_GCM` (96-bit IV from the HSM RNG, 128-bit tag)
    /// via `C_Encrypt`, AAD = [`wrap_aad`].
    AesGcmV1 = 0x01,
}

impl WrapFormat {
    /// The mechanism used for every new wrap. Change it here and only here.
    pub const CURRENT: WrapFormat = WrapFormat::AesGcmV1;

    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0x01 => Some(WrapFormat::AesGcmV1),
            _ => None,
        }
    }
}

/// AAD that binds a wrapped DEK to its key id and KEK:
/// `"progressdb-kms:dek:v1" 0x00 key_id 0x00 kek_id 0x00 kek_version(u32 BE)`.
pub fn wrap_aad(key_id: &KeyId, kek: &KekRef) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(b"progressdb-kms:dek:v1");
    aad.push(0);
    aad.extend_from_slice(key_id.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(kek.id.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(&kek.version.get().to_be_bytes());
    aad
}

/// The parsed header of a wrapped DEK (format and KEK version), without touching the HSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrappedHeader {
    pub format: WrapFormat,
    pub kek_version: KekVersion,
}

/// Reads the header of a wrapped DEK.
///
/// # Errors
/// [`BackendError::InvalidWrapped`] for an unknown tag, a bad version or a wrong length.
pub fn parse_wrapped_header(w: &WrappedDek) -> Result<WrappedHeader, BackendError> {
    let b = w.as_bytes();
    let format = b
        .first()
        .and_then(|t| WrapFormat::from_tag(*t))
        .ok_or(BackendError::InvalidWrapped)?;
    match format {
        WrapFormat::AesGcmV1 => {
            if b.len() != AES_GCM_V1_LEN {
                return Err(BackendError::InvalidWrapped);
            }
            let v = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
            let kek_version = KekVersion::new(v).map_err(|_| BackendError::InvalidWrapped)?;
            Ok(WrappedHeader {
                format,
                kek_version,
            })
        }
    }
}

/// Length of an `AesGcmV1` wrapped DEK.
pub const AES_GCM_V1_LEN: usize = 1 + 4 + 12 + DEK_LEN + 16;

/// Settings of the PKCS#11 backend (section `[hsm]` of the KMS config).
#[derive(Clone)]
pub struct HsmSettings {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: std::path::PathBuf,
    /// Token label (`CKA_LABEL` of the token); never a slot number.
    pub token_label: String,
    /// User PIN.
    pub pin: SecretString,
    /// KEK label (`CKA_LABEL` of the key); the KEK id on the wire.
    pub kek_label: KekId,
    /// Label of the audit log's HMAC key (a generic-secret token object, never extractable).
    pub audit_key_label: String,
    /// Sessions (= worker threads) opened against the token.
    pub sessions: usize,
    /// Queue and deadline of HSM jobs.
    pub limits: HsmLimits,
}

/// Bounds on the work waiting for the HSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HsmLimits {
    /// Jobs queued per worker (session) before new ones are refused with `Overloaded`.
    pub queue_depth: usize,
    /// How long a caller waits for an HSM job (queue time included) before `Unavailable`.
    pub job_timeout: std::time::Duration,
}

impl Default for HsmLimits {
    /// 64 jobs per worker, 5 s.
    fn default() -> Self {
        Self {
            queue_depth: 64,
            job_timeout: std::time::Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for HsmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSettings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("kek_label", &self.kek_label)
            .field("audit_key_label", &self.audit_key_label)
            .field("sessions", &self.sessions)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Failures of a backend. Messages are for the KMS log (they never contain key material or the
/// PIN); the HTTP layer maps variants to codes and never shows the 5xx detail to callers.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The HSM cannot be used now (token absent, device error, login failed, workers
    /// recovering). Retryable; maps to 503.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// The wrapped DEK is not valid under its KEK: unknown format, wrong length, or failed
    /// authentication (tampered blob, wrong key id). Opaque; maps to 422/500 by caller context.
    #[error("wrapped DEK is invalid or does not authenticate")]
    InvalidWrapped,
    /// The KEK named by id and version is not in the token.
    #[error("KEK {id} version {version} not found in the token")]
    KekNotFound { id: KekId, version: KekVersion },
    /// An object with the KEK's label and version is not a hardened KEK (not sensitive,
    /// extractable, imported, usable for wrapping...): it is never used.
    #[error("KEK '{id}' version {version} is refused: {reason}; remove or replace that object")]
    KekRefused {
        id: KekId,
        version: KekVersion,
        reason: String,
    },
    /// The audit log's HMAC key is missing or is not a hardened key; nothing is audited, so
    /// nothing that must be audited is done. Fatal at start-up, 503 later.
    #[error("audit key '{label}': {reason}")]
    AuditKey { label: String, reason: String },
    /// The token refused the PIN. Never retried (a real HSM locks the PIN after a few
    /// failures); the KMS stays unready until it is restarted with a correct PIN.
    #[error("HSM PIN rejected: {0}")]
    PinRejected(String),
    /// Every HSM worker's queue is full: the HSM is saturated. Retryable; maps to 503
    /// `overloaded`.
    #[error("HSM queues are full")]
    Overloaded,
    /// Configuration problems found when opening (module not loadable, no token with that
    /// label, wrong PIN). Fatal at start-up.
    #[error("HSM configuration: {0}")]
    Config(String),
    /// Anything else the HSM reported; detail for the log only.
    #[error("HSM error: {0}")]
    Internal(String),
}

/// What [`KeyBackend::ensure_kek_version`] does when the version is not in the HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekMissing {
    /// Generate it (the rotation that introduces it).
    Generate,
    /// Refuse (`KekNotFound`): only a version another process made is adopted.
    Adopt,
}

/// What the KMS needs from the holder of its KEKs.
///
/// Implementations must be cheap to share (`Send + Sync`); methods never block the async
/// runtime (the PKCS#11 backend runs HSM calls on its own worker threads).
pub trait KeyBackend: Send + Sync + 'static {
    /// The KEK used for new wraps.
    fn current_kek(&self) -> KekRef;

    /// Generates a 256-bit DEK with the HSM's random generator and wraps it under the current
    /// KEK with [`WrapFormat::CURRENT`], bound to `key_id`. Returns the raw DEK too, so the
    /// caller can seed its cache without an unwrap round trip.
    ///
    /// # Errors
    /// `Unavailable` when the HSM cannot be used (nothing was created: the DEK only exists in
    /// memory until the caller stores the wrapped form); `KekNotFound` when the current KEK is
    /// missing; `Internal` otherwise.
    fn generate_dek(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<(Dek, WrappedDek, KekRef), BackendError>> + Send;

    /// Unwraps `wrapped` (made for `key_id`) through the HSM.
    ///
    /// # Errors
    /// `InvalidWrapped` when the blob is malformed or does not authenticate (opaque);
    /// `KekNotFound` when its KEK version is not in the token; `Unavailable` when the HSM
    /// cannot be used now.
    fn unwrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<Dek, BackendError>> + Send;

    /// Unwraps `wrapped` (made for `key_id` under an older KEK version) and wraps the same
    /// DEK again under the current KEK, inside one HSM job: the DEK bytes never leave the
    /// backend and are zeroized at once. KEK rotation moves every record this way.
    ///
    /// # Errors
    /// As [`KeyBackend::unwrap_dek`] for the unwrap; `Unavailable`/`Overloaded` when the HSM
    /// cannot take the job now (nothing changed: the caller keeps the old blob).
    fn rewrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send;

    /// The KEK versions present in the HSM, ascending (one entry per object, so a duplicate
    /// shows twice).
    ///
    /// # Errors
    /// `Unavailable` when the HSM cannot be asked now.
    fn kek_versions(&self) -> impl Future<Output = Result<Vec<KekVersion>, BackendError>> + Send;

    /// Makes KEK `version` known and checked, and current for new wraps when it is newer
    /// than the current one. A version that exists and passes the checks is adopted, never
    /// made twice; a missing one is generated inside the token with the same hardened
    /// attributes as the first one when `missing` is [`KekMissing::Generate`] (a rotation),
    /// and refused with [`KekMissing::Adopt`] (a replica following a rotation another one
    /// made).
    ///
    /// # Errors
    /// `KekRefused` when an object with that label and version exists but is not a hardened
    /// KEK (it is not used); `KekNotFound` when it is missing and `missing` is `Adopt`;
    /// `Unavailable` for device errors; `Internal` when the token refuses to generate the
    /// key. On error the current KEK is unchanged.
    fn ensure_kek_version(
        &self,
        version: KekVersion,
        missing: KekMissing,
    ) -> impl Future<Output = Result<KekRef, BackendError>> + Send;

    /// Destroys every object of KEK `version` in the HSM; afterwards the backend answers
    /// `KekNotFound` for blobs under it. The caller has checked that nothing depends on it.
    ///
    /// # Errors
    /// `Config` when `version` is the current KEK (never destroyed); `KekNotFound` when no
    /// object has that version; `Unavailable` for device errors.
    fn destroy_kek_version(
        &self,
        version: KekVersion,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Extends the audit chain: for each message `m_i`, `mac_i = HMAC-SHA256(audit key,
    /// mac_{i-1} || m_i)` computed inside the HSM, starting from `prev`. One HSM job for the
    /// whole batch.
    ///
    /// # Errors
    /// `AuditKey` when the audit key is missing or refused; `Unavailable`/`Overloaded`.
    fn audit_chain(
        &self,
        prev: [u8; 32],
        messages: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<[u8; 32]>, BackendError>> + Send;

    /// One real round trip to the HSM (e.g. a random-number request on a pooled session).
    ///
    /// # Errors
    /// `Unavailable` when the HSM does not answer correctly.
    fn health_check(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// What the backend can do now, without a round trip; `/readyz` reports unready unless
    /// [`BackendState::Ready`].
    fn state(&self) -> BackendState;

    /// `state() == Ready`.
    fn is_ready(&self) -> bool {
        self.state() == BackendState::Ready
    }
}

/// Whether a backend can serve, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Ready,
    /// Sessions are being re-established after a loss; the backend heals by itself.
    Recovering,
    /// The token refused the PIN; nothing happens until an operator fixes it and restarts.
    PinRejected,
}

impl BackendState {
    /// A short reason safe to show to callers.
    pub fn reason(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::Recovering => "HSM sessions are being re-established",
            BackendState::PinRejected => {
                "the HSM refused the PIN; fix hsm.pin_file and restart the KMS"
            }
        }
    }
}

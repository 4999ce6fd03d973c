//! [`BackendError`]: the failures of a key backend, and what a missing KEK version means.

use kms_api::{KekId, KekVersion};

use super::HmacRole;

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
    /// One of the KMS's HMAC keys (the audit log's, or the binding key of `AesKwV3` blobs)
    /// is missing or is not a hardened key: nothing is audited (so nothing that must be
    /// audited is done), or no DEK is wrapped or unwrapped under a wrap-class KEK. Fatal at
    /// start-up, 503 later.
    #[error("{role} key '{label}': {reason}")]
    HmacKey {
        role: HmacRole,
        label: String,
        reason: String,
    },
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
///
/// [`KeyBackend::ensure_kek_version`]: super::KeyBackend::ensure_kek_version
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekMissing {
    /// Generate it (the rotation that introduces it).
    Generate,
    /// Refuse (`KekNotFound`): only a version another process made is adopted.
    Adopt,
}

/// What the resident methods answer on a backend that keeps DEKs in memory.
pub(crate) fn not_resident() -> BackendError {
    BackendError::Config("this backend does not keep DEKs resident in the HSM".into())
}

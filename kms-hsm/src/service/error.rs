//! The service's error and its one exhaustive mapping to the stable wire codes.

use std::sync::Arc;

use kms_api::{ErrorCode, KeyId};

use crate::backend::BackendError;
use crate::keystore::StoreError;

/// Failures of the KMS operations. `Display` is for the log: it names keys, never key
/// material, plaintext or the PIN.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No such key, or the key was destroyed.
    #[error("unknown key {0}")]
    UnknownKey(KeyId),
    /// A create's idempotency key names a key of another thread; nothing was created.
    #[error("idempotency key already used for another thread (key {0})")]
    IdempotencyConflict(KeyId),
    /// The ciphertext does not authenticate (any cause).
    #[error("decryption failed")]
    DecryptionFailed,
    /// The stored wrapped DEK does not unwrap under its KEK (store corruption or a foreign
    /// record).
    #[error("stored wrapped DEK of key {0} does not authenticate under its KEK")]
    CorruptKey(KeyId),
    /// The random generator failed.
    #[error("random generator failed")]
    Random,
    /// A broken internal invariant; detail for the log.
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The failure of an unwrap that several requests waited for.
    #[error(transparent)]
    Shared(Arc<ServiceError>),
    /// The audit entry of the action could not be written; the action was not done.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl ServiceError {
    /// The stable wire code of this error: the single mapping from service failures to the
    /// API (the HTTP status follows from [`ErrorCode::status`]).
    /// The wire code of a backend failure.
    pub fn backend_code(e: &BackendError) -> ErrorCode {
        match e {
            // A refused KEK or PIN leaves the KMS unready until an operator acts: callers
            // see an outage (503), the log and /metrics say why.
            BackendError::Unavailable(_)
            | BackendError::KekRefused { .. }
            | BackendError::HmacKey { .. }
            | BackendError::PinRejected(_) => ErrorCode::Unavailable,
            BackendError::Overloaded => ErrorCode::Overloaded,
            BackendError::InvalidWrapped
            | BackendError::KekNotFound { .. }
            | BackendError::Config(_)
            | BackendError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The wire code of a key-store failure.
    pub fn store_code(e: &StoreError) -> ErrorCode {
        match e {
            StoreError::Full { .. } | StoreError::NoSpace(_) => ErrorCode::StorageFull,
            StoreError::Io(_)
            | StoreError::Closed
            | StoreError::LeaseLost(_)
            | StoreError::Open { .. }
            | StoreError::AuditHeadMoved => ErrorCode::Unavailable,
            StoreError::AlreadyExists(_)
            | StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::Corrupt { .. } => ErrorCode::Internal,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::UnknownKey(_) => ErrorCode::UnknownKey,
            ServiceError::IdempotencyConflict(_) => ErrorCode::IdempotencyConflict,
            ServiceError::DecryptionFailed => ErrorCode::DecryptionFailed,
            ServiceError::CorruptKey(_) | ServiceError::Random | ServiceError::Internal(_) => {
                ErrorCode::Internal
            }
            ServiceError::Backend(e) => Self::backend_code(e),
            ServiceError::Store(e) => Self::store_code(e),
            ServiceError::Shared(e) => e.code(),
            ServiceError::Audit(_) => ErrorCode::Unavailable,
        }
    }
}

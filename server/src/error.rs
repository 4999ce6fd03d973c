//! Errors of the HTTP API: [`ApiError`] (what went wrong), [`ErrorCode`] (the stable
//! snake_case code clients see) and the single exhaustive mapping from code to HTTP status
//! ([`ErrorCode::status`]).
//!
//! Lower layers have their own enums ([`crate::store::StoreError`],
//! [`crate::provider::ProviderError`], [`crate::auth::AuthError`]); each converts into
//! [`ApiError`] through one exhaustive `match`, logging internal detail there. 5xx answers carry
//! a fixed, generic message and nothing else.

use http::StatusCode;
use serde::Serialize;

use crate::auth::AuthError;
use crate::provider::ProviderError;
use crate::store::StoreError;

/// Stable error codes of the server API. The set only grows; a code never changes meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON or does not have the documented shape.
    MalformedRequest,
    /// A value is well-formed but not acceptable (bad id, limit, cursor, order, title...).
    InvalidArgument,
    /// Missing or unknown API key, or a missing / wrong user signature.
    Unauthorized,
    /// The caller's role may not use this endpoint.
    Forbidden,
    /// No such route, thread or message (or the thread belongs to another user).
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The request body did not arrive in time.
    RequestTimeout,
    /// The request body is larger than `limits.max_body_bytes`.
    PayloadTooLarge,
    /// A stored message cannot be decrypted (tampered, moved, or its key was destroyed).
    MessageUnreadable,
    /// Anything else; detail only in the server log.
    Internal,
    /// The endpoint is reserved but not built yet.
    NotImplemented,
    /// The KMS cannot be reached or is not ready; retry later.
    KmsUnavailable,
    /// The server cannot serve this now (store closed, shutting down); retry later.
    Unavailable,
    /// The LMDB map reached `store.max_map_size_mb`.
    StorageFull,
    /// Deleting a thread: the KMS does not know the thread's DEK, so it cannot be shown to be
    /// destroyed; the thread was kept.
    ShredFailed,
    /// `POST /admin/threads/{id}/encrypt` on a thread that is encrypted already.
    AlreadyEncrypted,
    /// Over the request rate of the API key (per user, for callers acting for one).
    RateLimited,
    /// Creating a thread: its user has `limits.max_threads_per_user` threads already.
    ThreadLimit,
}

impl ErrorCode {
    /// The HTTP status of each code: the single mapping used by the server.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::MalformedRequest | ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::MessageUnreadable | ErrorCode::Internal | ErrorCode::ShredFailed => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ErrorCode::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorCode::KmsUnavailable | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::AlreadyEncrypted => StatusCode::CONFLICT,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ThreadLimit => StatusCode::FORBIDDEN,
        }
    }

    /// The snake_case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::MessageUnreadable => "message_unreadable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::KmsUnavailable => "kms_unavailable",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::ShredFailed => "shred_failed",
            ErrorCode::AlreadyEncrypted => "already_encrypted",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ThreadLimit => "thread_limit",
        }
    }

    /// Every code, for tests and docs.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::MalformedRequest,
        ErrorCode::InvalidArgument,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::MessageUnreadable,
        ErrorCode::Internal,
        ErrorCode::NotImplemented,
        ErrorCode::KmsUnavailable,
        ErrorCode::Unavailable,
        ErrorCode::StorageFull,
        ErrorCode::ShredFailed,
        ErrorCode::AlreadyEncrypted,
        ErrorCode::RateLimited,
        ErrorCode::ThreadLimit,
    ];
}

/// A failed API request. Client-facing messages of 4xx variants are safe to show (they never
/// echo secrets); 5xx variants have fixed messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("this API key may not use this endpoint")]
    Forbidden,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body not received in time")]
    RequestTimeout,
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    #[error("message cannot be read")]
    MessageUnreadable,
    #[error("internal error")]
    Internal,
    #[error("not implemented yet")]
    NotImplemented,
    #[error("key service unavailable, retry later")]
    KmsUnavailable,
    #[error("service unavailable, retry later")]
    Unavailable,
    #[error("storage full")]
    StorageFull,
    #[error("the thread's key could not be shown to be destroyed; the thread was kept")]
    ShredFailed,
    #[error("the thread is encrypted already (use rotate-dek for a new key)")]
    AlreadyEncrypted,
    /// Over the API key's request rate; retry after this many seconds.
    #[error("too many requests for this API key; retry in {0} s")]
    RateLimited(u64),
    #[error(
        "this user has as many threads as allowed (limits.max_threads_per_user); delete one first"
    )]
    ThreadLimit,
}

impl ApiError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::MalformedRequest(_) => ErrorCode::MalformedRequest,
            ApiError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::Forbidden => ErrorCode::Forbidden,
            ApiError::NotFound => ErrorCode::NotFound,
            ApiError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            ApiError::RequestTimeout => ErrorCode::RequestTimeout,
            ApiError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ApiError::MessageUnreadable => ErrorCode::MessageUnreadable,
            ApiError::Internal => ErrorCode::Internal,
            ApiError::NotImplemented => ErrorCode::NotImplemented,
            ApiError::KmsUnavailable => ErrorCode::KmsUnavailable,
            ApiError::Unavailable => ErrorCode::Unavailable,
            ApiError::StorageFull => ErrorCode::StorageFull,
            ApiError::ShredFailed => ErrorCode::ShredFailed,
            ApiError::AlreadyEncrypted => ErrorCode::AlreadyEncrypted,
            ApiError::RateLimited(_) => ErrorCode::RateLimited,
            ApiError::ThreadLimit => ErrorCode::ThreadLimit,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        ApiError::InvalidArgument(msg.into())
    }

    /// The JSON body `{"error": {"code", "message"}}`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        }
    }
}

/// `{"code": ..., "message": ...}`
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound,
            StoreError::Full => ApiError::StorageFull,
            StoreError::Closed => ApiError::Unavailable,
            StoreError::NotAuthor => ApiError::Forbidden,
            StoreError::ThreadLimit => ApiError::ThreadLimit,
            // The caller retried and the rotation kept moving: retryable.
            StoreError::StaleKey => ApiError::Unavailable,
            StoreError::Conflict(what) => {
                tracing::error!(what, "store conflict");
                ApiError::Internal
            }
            StoreError::Corrupt(what) => {
                tracing::error!(what = %what, "corrupt record in store");
                ApiError::Internal
            }
            StoreError::Lmdb(msg) => {
                tracing::error!(error = %msg, "LMDB error");
                ApiError::Internal
            }
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "store unavailable");
                ApiError::Unavailable
            }
        }
    }
}

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "key provider unavailable");
                ApiError::KmsUnavailable
            }
            ProviderError::DecryptionFailed => ApiError::MessageUnreadable,
            ProviderError::UnknownKey => {
                tracing::error!("key provider does not know a thread's key");
                ApiError::Internal
            }
            ProviderError::Rejected(msg) | ProviderError::Internal(msg) => {
                tracing::error!(error = %msg, "key provider error");
                ApiError::Internal
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingKey
            | AuthError::UnknownKey
            | AuthError::MissingUser
            | AuthError::BadSignature => ApiError::Unauthorized,
            AuthError::BadUserId => ApiError::invalid("X-User-ID is not a valid user id"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn codes_serialize_as_their_names_and_5xx_say_nothing_internal() {
        for c in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
            assert!(c.status().is_client_error() || c.status().is_server_error());
        }
        let e: ApiError = StoreError::Lmdb("disk on fire at /secret/path".into()).into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!serde_json::to_string(&e.body()).unwrap().contains("secret"));
        let e: ApiError = ProviderError::Unavailable("connect /run/kms.sock".into()).into();
        assert_eq!(e.code(), ErrorCode::KmsUnavailable);
        assert!(!e.to_string().contains("kms.sock"));
    }
}

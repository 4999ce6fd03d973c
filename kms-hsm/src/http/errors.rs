//! The HTTP layer's errors: [`HttpError`], its one exhaustive mapping to a stable code and
//! status, what a caller may see of it, and the JSON answers every handler sends.

use super::*;

/// Failures found at the HTTP edge, plus the service's own errors.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("this peer is not allowed to use the KMS")]
    Forbidden,
    #[error("admin operations are served only on the admin endpoint, to an admin identity")]
    AdminOnly,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request body was not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("request body could not be read")]
    BodyRead,
    #[error("too many requests from this peer; retry in {} s", .0.as_secs())]
    RateLimited(Duration),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Lifecycle(#[from] crate::lifecycle::LifecycleError),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error(transparent)]
    Compact(#[from] crate::audit_archive::CompactError),
}

impl HttpError {
    /// The stable wire code (exhaustive; service errors use [`ServiceError::code`]).
    pub fn code(&self) -> ErrorCode {
        match self {
            HttpError::NotFound => ErrorCode::NotFound,
            HttpError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            HttpError::Forbidden | HttpError::AdminOnly => ErrorCode::Forbidden,
            HttpError::BodyTooLarge { .. } => ErrorCode::PayloadTooLarge,
            HttpError::BodyTimeout(_) | HttpError::BodyRead => ErrorCode::MalformedRequest,
            HttpError::RateLimited(_) => ErrorCode::RateLimited,
            HttpError::Parse(e) => e.code(),
            HttpError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            HttpError::Service(e) => e.code(),
            HttpError::Lifecycle(e) => e.code(),
            HttpError::Backup(e) => e.code(),
            HttpError::Compact(crate::audit_archive::CompactError::Refused(_)) => {
                ErrorCode::ArchiveMismatch
            }
            HttpError::Compact(crate::audit_archive::CompactError::Service(e)) => e.code(),
        }
    }

    /// Whether the connection should be closed after answering (the body was not fully read).
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            HttpError::BodyTooLarge { .. } | HttpError::BodyTimeout(_) | HttpError::BodyRead
        )
    }
}

/// What a caller may see of an error: the code and, for 4xx, the message; 5xx messages are
/// generic and the detail is logged here.
pub(super) fn detail(
    code: ErrorCode,
    err: &dyn std::fmt::Display,
    endpoint: &'static str,
) -> ErrorDetail {
    let message = match code {
        ErrorCode::Unavailable => {
            tracing::warn!(endpoint, error = %err, "answering 503");
            "the key service is temporarily unavailable; retry later".to_owned()
        }
        ErrorCode::Overloaded => {
            tracing::warn!(endpoint, error = %err, "answering 503 overloaded");
            "the key service is at capacity; retry after the Retry-After delay".to_owned()
        }
        ErrorCode::Internal | ErrorCode::Unknown => {
            tracing::error!(endpoint, error = %err, "answering 500");
            "internal error".to_owned()
        }
        _ => err.to_string(),
    };
    ErrorDetail { code, message }
}

/// A JSON answer. Answers can carry plaintext (`/decrypt`), so every body is built in a
/// [`ZeroizingBuf`] and handed to hyper as `Bytes` that wipe their memory when dropped.
pub(super) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match to_json_zeroizing(value, 256) {
        Ok(buf) => {
            let mut r = Response::new(Body::from(buf.into_bytes()));
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize an answer");
            let mut r = Response::new(Body::from(
                &br#"{"error":{"code":"internal","message":"internal error"}}"#[..],
            ));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    }
}

pub(super) fn error_response(err: &HttpError, endpoint: &'static str) -> Response<Body> {
    let code = err.code();
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(
        status,
        &ErrorBody {
            error: detail(code, err, endpoint),
        },
    );
    if code == ErrorCode::Overloaded {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    if let HttpError::RateLimited(wait) = err {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
    }
    if err.closes_connection() {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

//! How an answer is built, for both APIs: JSON in zeroizing memory, and the one place that
//! turns an [`ApiError`] into an HTTP answer (its status and headers; each API gives the
//! body its own shape).

use axum::body::Body;
use axum::http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ApiError;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}

/// Turns an error into its JSON answer (`{"error": {"code", "message"}}`).
pub fn error_response(e: &ApiError) -> Response {
    error_answer(e, &e.body())
}

/// The answer to `e` with `body` (each API surface has its error shape): `e`'s status and
/// headers. The only place that turns an error into an answer.
pub(in crate::http) fn error_answer<B: Serialize>(e: &ApiError, body: &B) -> Response {
    let mut r = json_response(e.status(), body);
    match e {
        ApiError::Unauthorized => {
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        ApiError::RateLimited(secs) => {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        // The KMS is down or hung (its circuit open): the server probes it every second.
        ApiError::KmsUnavailable => {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static("1"),
            );
        }
        ApiError::MalformedRequest(_)
        | ApiError::InvalidArgument(_)
        | ApiError::Forbidden
        | ApiError::NotFound
        | ApiError::MethodNotAllowed
        | ApiError::RequestTimeout
        | ApiError::PayloadTooLarge(_)
        | ApiError::MessageUnreadable
        | ApiError::Internal
        | ApiError::NotImplemented
        | ApiError::Unavailable
        | ApiError::StorageFull
        | ApiError::ShredFailed
        | ApiError::AlreadyEncrypted
        | ApiError::ThreadLimit => {}
    }
    r
}

/// A JSON answer, built in zeroizing memory and sent from `Bytes` that wipe it when dropped
/// (answers carry decrypted message bodies).
pub(in crate::http) fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response {
    match kms_api::wire::to_json_zeroizing(v, 512) {
        Ok(b) => with_type(status, Body::from(b.into_bytes()), "application/json"),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a response");
            with_type(
                StatusCode::INTERNAL_SERVER_ERROR,
                Body::from(&br#"{"error":{"code":"internal","message":"internal error"}}"#[..]),
                "application/json",
            )
        }
    }
}

pub(in crate::http) fn with_type(status: StatusCode, body: Body, ctype: &'static str) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

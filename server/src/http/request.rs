//! What both APIs read from a request the same way: a JSON body within the body limit and
//! deadline, and a listing's `limit`.

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use service_kit::body::BodyError;

use super::state::RouterState;
use crate::error::ApiError;

/// A JSON request body, read within the body-limit layer and the body deadline into zeroizing
/// memory (message bodies are secret) and parsed into `T`. Failures are 413
/// `payload_too_large`, 408 `request_timeout` or 400 `malformed_request` with the category
/// and position of a JSON error, never serde's text (it can quote the request).
pub(super) struct JsonBody<T>(pub(in crate::http) T);

impl<T> std::fmt::Debug for JsonBody<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonBody(<redacted>)")
    }
}

impl<T: DeserializeOwned> FromRequest<RouterState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &RouterState) -> Result<Self, ApiError> {
        let buf = service_kit::body::read_zeroizing(req.into_body(), st.opts.body_read_timeout)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge => ApiError::PayloadTooLarge(st.opts.max_body_bytes),
                BodyError::Timeout => ApiError::RequestTimeout,
                BodyError::Broken => {
                    ApiError::MalformedRequest("the request body could not be read".into())
                }
            })?;
        // Every request body is a JSON object; serde would also take a struct written as an
        // array of its fields in order, which is not the documented shape.
        if buf.as_slice().iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::MalformedRequest(
                "the body must be a JSON object".into(),
            ));
        }
        serde_json::from_slice(buf.as_slice())
            .map(JsonBody)
            .map_err(|e| {
                let what = match e.classify() {
                    serde_json::error::Category::Data => {
                        "the body does not have the documented shape (missing, unknown or mistyped field)"
                    }
                    serde_json::error::Category::Syntax
                    | serde_json::error::Category::Eof
                    | serde_json::error::Category::Io => "the body is not valid JSON",
                };
                ApiError::MalformedRequest(format!(
                    "{what} at line {} column {}",
                    e.line(),
                    e.column()
                ))
            })
    }
}

/// A listing's `limit` query value (both APIs): a non-negative integer; the service bounds it.
pub(in crate::http) fn parse_limit(l: Option<&str>) -> Result<Option<usize>, ApiError> {
    l.map(|l| {
        l.parse::<usize>()
            .map_err(|_| ApiError::invalid("limit must be a positive integer"))
    })
    .transpose()
}

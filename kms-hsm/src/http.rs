//! The HTTP API (hyper 1, HTTP/1.1): routing, request parsing, answers and error bodies.
//!
//! | method, path | body | answer |
//! |---|---|---|
//! | POST /create_dek_for_thread | `{thread_id}` | `{key_id, wrapped, kek_id, kek_version}` |
//! | POST /encrypt | `{key_id, plaintext, aad?}` | `{ciphertext, key_version}` |
//! | POST /decrypt | `{key_id, ciphertext, aad?}` | `{plaintext}` |
//! | POST /encrypt_batch, /decrypt_batch | `{items: [...]}` | `{results: [{ok}|{error}]}` |
//! | POST /destroy_key | `{key_id}` | `{key_id, state: "destroyed"}` |
//! | GET /get_wrapped?key_id= | | `{wrapped, kek_id, kek_version}` |
//! | GET /healthz, /readyz, /metrics | | liveness, readiness, Prometheus text |
//!
//! Parsing is explicit, so each failure has its own stable code without looking at serde's
//! messages: the body is read with a size limit and a deadline (413 / 400), parsed as JSON
//! into structs of plain strings (400 `malformed_request`), then every binary field is decoded
//! from base64 (400 `invalid_base64`) and every id parsed (400 `invalid_argument`).
//!
//! Errors are `{"error": {"code", "message"}}` ([`ErrorBody`]) with the status of
//! [`ErrorCode::status`]. 5xx answers carry a generic message only; their detail goes to the
//! log. Request and response bodies are never logged.
//!
//! In a batch, an item that is invalid or fails (unknown key, decryption failure) gets its own
//! error result; a failure of the HSM or the store (503) fails the whole call so the caller
//! retries it as a unit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use kms_api::wire::{
    to_json_zeroizing, BatchResponse, Bytes64, CreateDekResponse, DecryptResponse,
    DestroyKeyResponse, EncryptResponse, GetWrappedResponse, ItemResult, ReadyResponse,
    ZeroizingBuf, MAX_AAD_BYTES, MAX_BATCH_ITEMS, MAX_ITEM_BYTES,
};
use kms_api::{ErrorBody, ErrorCode, ErrorDetail, KeyId, ThreadId};
use secrecy::{ExposeSecret as _, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::backend::KeyBackend;
use crate::keystore::KeyStore;
use crate::metrics::{self, Metrics};
use crate::service::{DecryptItem, EncryptItem, KeyService, Readiness, ServiceError};

/// Response body type of every answer.
pub type Body = Full<Bytes>;

/// Extra bytes of an oversize body read and discarded before answering 413, so an ordinary
/// client reads the answer instead of a reset; beyond that the connection is closed.
const DRAIN_ALLOWANCE: usize = 4 << 20;

/// `Retry-After` of a 503 `overloaded` answer, in seconds.
pub const RETRY_AFTER_SECS: &str = "1";

/// Limits on request bodies.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    /// Deadline for receiving the whole body once the head has arrived.
    pub body_read_timeout: Duration,
}

/// Failures found at the HTTP edge, plus the service's own errors.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed { allow: &'static str },
    #[error("this peer is not allowed to use the KMS")]
    Forbidden,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{field} is larger than {limit} bytes")]
    ItemTooLarge { field: &'static str, limit: usize },
    #[error("request body was not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("request body could not be read")]
    BodyRead,
    #[error("{0}")]
    Malformed(String),
    #[error("{field} is not valid standard base64")]
    InvalidBase64 { field: &'static str },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl HttpError {
    /// The stable wire code (exhaustive; service errors use [`ServiceError::code`]).
    pub fn code(&self) -> ErrorCode {
        match self {
            HttpError::NotFound => ErrorCode::NotFound,
            HttpError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            HttpError::Forbidden => ErrorCode::Forbidden,
            HttpError::BodyTooLarge { .. } | HttpError::ItemTooLarge { .. } => {
                ErrorCode::PayloadTooLarge
            }
            HttpError::BodyTimeout(_) | HttpError::BodyRead | HttpError::Malformed(_) => {
                ErrorCode::MalformedRequest
            }
            HttpError::InvalidBase64 { .. } => ErrorCode::InvalidBase64,
            HttpError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            HttpError::Service(e) => e.code(),
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
fn detail(code: ErrorCode, err: &dyn std::fmt::Display, endpoint: &'static str) -> ErrorDetail {
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

/// An endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    CreateDek,
    Encrypt,
    Decrypt,
    EncryptBatch,
    DecryptBatch,
    DestroyKey,
    GetWrapped,
    Healthz,
    Readyz,
    Metrics,
}

const ROUTES: &[(&str, Method, Route)] = &[
    ("/create_dek_for_thread", Method::POST, Route::CreateDek),
    ("/encrypt", Method::POST, Route::Encrypt),
    ("/decrypt", Method::POST, Route::Decrypt),
    ("/encrypt_batch", Method::POST, Route::EncryptBatch),
    ("/decrypt_batch", Method::POST, Route::DecryptBatch),
    ("/destroy_key", Method::POST, Route::DestroyKey),
    ("/get_wrapped", Method::GET, Route::GetWrapped),
    ("/healthz", Method::GET, Route::Healthz),
    ("/readyz", Method::GET, Route::Readyz),
    ("/metrics", Method::GET, Route::Metrics),
];

impl Route {
    /// Metric label of the endpoint.
    pub fn label(self) -> &'static str {
        match self {
            Route::CreateDek => "create_dek_for_thread",
            Route::Encrypt => "encrypt",
            Route::Decrypt => "decrypt",
            Route::EncryptBatch => "encrypt_batch",
            Route::DecryptBatch => "decrypt_batch",
            Route::DestroyKey => "destroy_key",
            Route::GetWrapped => "get_wrapped",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
        }
    }

    fn find(method: &Method, path: &str) -> Result<Route, HttpError> {
        let mut path_matched = None;
        for (p, m, r) in ROUTES {
            if *p == path {
                if m == method {
                    return Ok(*r);
                }
                path_matched = Some(m);
            }
        }
        match path_matched {
            Some(m) if *m == Method::GET => Err(HttpError::MethodNotAllowed { allow: "GET" }),
            Some(_) => Err(HttpError::MethodNotAllowed { allow: "POST" }),
            None => Err(HttpError::NotFound),
        }
    }
}

/// Label for requests that matched no route.
const UNKNOWN_ENDPOINT: &str = "unknown";

// ---- raw request bodies: plain strings, decoded explicitly ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreate {
    thread_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncrypt {
    key_id: String,
    plaintext: SecretString,
    #[serde(default)]
    aad: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecrypt {
    key_id: String,
    ciphertext: String,
    #[serde(default)]
    aad: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestroy {
    key_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch<T> {
    items: Vec<T>,
}

struct EncryptInput {
    key_id: KeyId,
    plaintext: Zeroizing<Vec<u8>>,
    aad: Vec<u8>,
}

struct DecryptInput {
    key_id: KeyId,
    ciphertext: Vec<u8>,
    aad: Vec<u8>,
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| {
        // Position and category only: serde's messages can quote the input.
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "request body is not valid JSON"
            }
            serde_json::error::Category::Data | serde_json::error::Category::Io => {
                "request body does not match the schema of this endpoint (missing, unknown or mistyped field)"
            }
        };
        HttpError::Malformed(format!(
            "{what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

fn parse_key_id(s: &str) -> Result<KeyId, HttpError> {
    KeyId::parse(s).map_err(|e| HttpError::InvalidArgument(format!("key_id: {e}")))
}

/// Longest base64 text that can decode to at most `limit` bytes.
fn b64_len(limit: usize) -> usize {
    limit.div_ceil(3) * 4
}

fn decode_b64(field: &'static str, s: &str, limit: usize) -> Result<Vec<u8>, HttpError> {
    if s.len() > b64_len(limit) {
        return Err(HttpError::ItemTooLarge { field, limit });
    }
    let v = base64::engine::general_purpose::STANDARD
        .decode(s.as_bytes())
        .map_err(|_| HttpError::InvalidBase64 { field })?;
    if v.len() > limit {
        return Err(HttpError::ItemTooLarge { field, limit });
    }
    Ok(v)
}

fn decode_aad(s: Option<&str>) -> Result<Vec<u8>, HttpError> {
    s.map_or(Ok(Vec::new()), |s| decode_b64("aad", s, MAX_AAD_BYTES))
}

impl RawEncrypt {
    fn validate(self) -> Result<EncryptInput, HttpError> {
        let key_id = parse_key_id(&self.key_id)?;
        let text = self.plaintext.expose_secret();
        if text.len() > b64_len(MAX_ITEM_BYTES) {
            return Err(HttpError::ItemTooLarge {
                field: "plaintext",
                limit: MAX_ITEM_BYTES,
            });
        }
        let mut plaintext = Zeroizing::new(vec![0u8; text.len() / 4 * 3 + 3]);
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(text.as_bytes(), plaintext.as_mut_slice())
            .map_err(|_| HttpError::InvalidBase64 { field: "plaintext" })?;
        plaintext.truncate(n);
        let aad = decode_aad(self.aad.as_deref())?;
        Ok(EncryptInput {
            key_id,
            plaintext,
            aad,
        })
    }
}

impl RawDecrypt {
    fn validate(self) -> Result<DecryptInput, HttpError> {
        Ok(DecryptInput {
            key_id: parse_key_id(&self.key_id)?,
            ciphertext: decode_b64("ciphertext", &self.ciphertext, MAX_ITEM_BYTES + 28)?,
            aad: decode_aad(self.aad.as_deref())?,
        })
    }
}

fn check_batch_len(n: usize) -> Result<(), HttpError> {
    if n > MAX_BATCH_ITEMS {
        return Err(HttpError::InvalidArgument(format!(
            "a batch holds at most {MAX_BATCH_ITEMS} items"
        )));
    }
    Ok(())
}

/// Reads the whole body within the size limit and the deadline. The buffer is zeroized on drop.
async fn read_body<Bd>(
    req: Request<Bd>,
    limits: HttpLimits,
) -> Result<Zeroizing<Vec<u8>>, HttpError>
where
    Bd: hyper::body::Body<Data = Bytes> + Unpin,
{
    let limit = limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(DRAIN_ALLOWANCE) as u64) {
        // Not worth draining: answer at once and close the connection.
        return Err(HttpError::BodyTooLarge { limit });
    }
    let mut body = req.into_body();
    let read = async {
        let mut over = declared.is_some_and(|n| n > limit as u64);
        let initial = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0).min(limit));
        let mut buf = ZeroizingBuf::with_capacity(if over { 0 } else { initial });
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| HttpError::BodyRead)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if over || seen > limit {
                over = true;
                buf.clear();
                if seen > limit.saturating_add(DRAIN_ALLOWANCE) {
                    break;
                }
                continue;
            }
            buf.push(&data);
        }
        if over {
            Err(HttpError::BodyTooLarge { limit })
        } else {
            Ok(buf.into_inner())
        }
    };
    tokio::time::timeout(limits.body_read_timeout, read)
        .await
        .map_err(|_| HttpError::BodyTimeout(limits.body_read_timeout))?
}

/// A JSON answer. Answers can carry plaintext (`/decrypt`), so every body is built in a
/// [`ZeroizingBuf`] and handed to hyper as `Bytes` that wipe their memory when dropped.
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match to_json_zeroizing(value, 256) {
        Ok(buf) => {
            let mut r = Response::new(Full::new(buf.into_bytes()));
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize an answer");
            let mut r = Response::new(Full::new(Bytes::from_static(
                br#"{"error":{"code":"internal","message":"internal error"}}"#,
            )));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    }
}

fn error_response(err: &HttpError, endpoint: &'static str) -> Response<Body> {
    let code = err.code();
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(
        status,
        &ErrorBody {
            error: detail(code, err, endpoint),
        },
    );
    if let HttpError::MethodNotAllowed { allow } = err {
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    if code == ErrorCode::Overloaded {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    if err.closes_connection() {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn query_key_id(query: Option<&str>) -> Result<KeyId, HttpError> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "key_id" {
            if found.is_some() {
                return Err(HttpError::InvalidArgument(
                    "key_id is given more than once".into(),
                ));
            }
            found = Some(v);
        }
    }
    let v = found
        .ok_or_else(|| HttpError::InvalidArgument("query parameter key_id is required".into()))?;
    parse_key_id(v)
}

/// The HTTP front of a [`KeyService`].
pub struct Api<B, S> {
    service: Arc<KeyService<B, S>>,
    metrics: Arc<Metrics>,
    limits: HttpLimits,
}

impl<B, S> std::fmt::Debug for Api<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<B: KeyBackend, S: KeyStore> Api<B, S> {
    pub fn new(service: Arc<KeyService<B, S>>, metrics: Arc<Metrics>, limits: HttpLimits) -> Self {
        Self {
            service,
            metrics,
            limits,
        }
    }

    pub fn service(&self) -> &Arc<KeyService<B, S>> {
        &self.service
    }

    /// Answers one request (never fails: errors become error answers).
    pub async fn handle<Bd>(&self, req: Request<Bd>) -> Response<Body>
    where
        Bd: hyper::body::Body<Data = Bytes> + Unpin,
    {
        let start = Instant::now();
        let (label, resp) = match Route::find(req.method(), req.uri().path()) {
            Ok(route) => {
                let label = route.label();
                let resp = match self.dispatch(route, req).await {
                    Ok(r) => r,
                    Err(e) => error_response(&e, label),
                };
                (label, resp)
            }
            Err(e) => (UNKNOWN_ENDPOINT, error_response(&e, UNKNOWN_ENDPOINT)),
        };
        self.finish(label, start, resp)
    }

    /// Answers a request from a peer that is not allowed: 403, without reading the body.
    pub fn forbidden<Bd>(&self, req: &Request<Bd>) -> Response<Body> {
        let start = Instant::now();
        let label = Route::find(req.method(), req.uri().path())
            .map(Route::label)
            .unwrap_or(UNKNOWN_ENDPOINT);
        let mut resp = error_response(&HttpError::Forbidden, label);
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        self.finish(label, start, resp)
    }

    fn finish(&self, label: &'static str, start: Instant, resp: Response<Body>) -> Response<Body> {
        let elapsed = start.elapsed();
        let status = resp.status().as_u16();
        self.metrics.observe_request(label, status, elapsed);
        tracing::debug!(
            endpoint = label,
            status,
            micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "request"
        );
        resp
    }

    async fn dispatch<Bd>(
        &self,
        route: Route,
        req: Request<Bd>,
    ) -> Result<Response<Body>, HttpError>
    where
        Bd: hyper::body::Body<Data = Bytes> + Unpin,
    {
        let svc = &self.service;
        match route {
            Route::Healthz => Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "status": "ok" }),
            )),
            Route::Readyz => match svc.readiness().await {
                Readiness::Ready => Ok(json_response(
                    StatusCode::OK,
                    &ReadyResponse {
                        ready: true,
                        reason: None,
                    },
                )),
                Readiness::NotReady(reason) => Ok(json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &ErrorBody::new(ErrorCode::Unavailable, format!("not ready: {reason}")),
                )),
            },
            Route::Metrics => {
                let text = self.metrics.encode().map_err(|_| {
                    HttpError::Service(ServiceError::Internal("metrics encoding failed"))
                })?;
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                Ok(r)
            }
            Route::GetWrapped => {
                let key_id = query_key_id(req.uri().query())?;
                let w = svc.get_wrapped(&key_id).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &GetWrappedResponse {
                        wrapped: w.wrapped,
                        kek_id: w.kek_id,
                        kek_version: w.kek_version,
                    },
                ))
            }
            Route::CreateDek => {
                let body = read_body(req, self.limits).await?;
                let raw: RawCreate = parse_json(&body)?;
                let thread_id = ThreadId::parse(&raw.thread_id)
                    .map_err(|e| HttpError::InvalidArgument(format!("thread_id: {e}")))?;
                let k = svc.create_dek_for_thread(thread_id).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &CreateDekResponse {
                        key_id: k.key_id,
                        wrapped: k.wrapped,
                        kek_id: k.kek.id,
                        kek_version: k.kek.version,
                    },
                ))
            }
            Route::Encrypt => {
                let body = read_body(req, self.limits).await?;
                let input = parse_json::<RawEncrypt>(&body)?.validate()?;
                drop(body);
                let e = svc
                    .encrypt(&input.key_id, &input.plaintext, &input.aad)
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &EncryptResponse {
                        ciphertext: Bytes64(e.ciphertext),
                        key_version: e.kek_version,
                    },
                ))
            }
            Route::Decrypt => {
                let body = read_body(req, self.limits).await?;
                let input = parse_json::<RawDecrypt>(&body)?.validate()?;
                let p = svc
                    .decrypt(&input.key_id, &input.ciphertext, &input.aad)
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &DecryptResponse { plaintext: p },
                ))
            }
            Route::DestroyKey => {
                let body = read_body(req, self.limits).await?;
                let raw: RawDestroy = parse_json(&body)?;
                let key_id = parse_key_id(&raw.key_id)?;
                svc.destroy_key(&key_id).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &DestroyKeyResponse {
                        key_id,
                        state: "destroyed".to_owned(),
                    },
                ))
            }
            Route::EncryptBatch => {
                let body = read_body(req, self.limits).await?;
                let raw: RawBatch<RawEncrypt> = parse_json(&body)?;
                drop(body);
                check_batch_len(raw.items.len())?;
                let inputs: Vec<Result<EncryptInput, HttpError>> =
                    raw.items.into_iter().map(RawEncrypt::validate).collect();
                let items: Vec<EncryptItem<'_>> = inputs
                    .iter()
                    .flatten()
                    .map(|i| EncryptItem {
                        key_id: &i.key_id,
                        plaintext: &i.plaintext,
                        aad: &i.aad,
                    })
                    .collect();
                let mut done = svc.encrypt_batch(&items).await.into_iter();
                let results = merge(route.label(), inputs, &mut done, |e| EncryptResponse {
                    ciphertext: Bytes64(e.ciphertext),
                    key_version: e.kek_version,
                })?;
                Ok(json_response(StatusCode::OK, &BatchResponse { results }))
            }
            Route::DecryptBatch => {
                let body = read_body(req, self.limits).await?;
                let raw: RawBatch<RawDecrypt> = parse_json(&body)?;
                drop(body);
                check_batch_len(raw.items.len())?;
                let inputs: Vec<Result<DecryptInput, HttpError>> =
                    raw.items.into_iter().map(RawDecrypt::validate).collect();
                let items: Vec<DecryptItem<'_>> = inputs
                    .iter()
                    .flatten()
                    .map(|i| DecryptItem {
                        key_id: &i.key_id,
                        ciphertext: &i.ciphertext,
                        aad: &i.aad,
                    })
                    .collect();
                let mut done = svc.decrypt_batch(&items).await.into_iter();
                let results = merge(route.label(), inputs, &mut done, |p| DecryptResponse {
                    plaintext: p,
                })?;
                Ok(json_response(StatusCode::OK, &BatchResponse { results }))
            }
        }
    }
}

/// Puts the service's results back in item order next to the items refused at validation.
/// Every item fails on its own: a cold key whose unwrap meets an HSM outage answers
/// `unavailable` for its items, while the items under cached keys beside it succeed.
fn merge<I, T, R>(
    endpoint: &'static str,
    inputs: Vec<Result<I, HttpError>>,
    done: &mut impl Iterator<Item = Result<T, Arc<ServiceError>>>,
    ok: impl Fn(T) -> R,
) -> Result<Vec<ItemResult<R>>, HttpError> {
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        match input {
            Err(e) => out.push(ItemResult::Error(detail(e.code(), &e, endpoint))),
            Ok(_) => match done.next() {
                Some(Ok(v)) => out.push(ItemResult::Ok(ok(v))),
                Some(Err(e)) => out.push(ItemResult::Error(detail(e.code(), &e, endpoint))),
                None => {
                    return Err(HttpError::Service(ServiceError::Internal(
                        "batch answered fewer results than items",
                    )))
                }
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cache::DekCache;
    use crate::keystore::lmdb::LmdbStore;
    use crate::testing::MockBackend;
    use serde_json::{json, Value};

    struct Fixture {
        _dir: tempfile::TempDir,
        api: Api<MockBackend, LmdbStore>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(MockBackend::new());
        let gate = service_kit::conn::ConnectionGate::new(service_kit::conn::ConnectionLimits {
            max_connections: 16,
            max_per_peer: 16,
        });
        let metrics = Arc::new(Metrics::new(backend.clone(), gate));
        let store = LmdbStore::open(dir.path(), 8, metrics.store.clone()).unwrap();
        let cache = DekCache::new(Duration::from_secs(60), 100, metrics.cache.clone());
        let service = Arc::new(KeyService::new(backend, store, cache));
        let api = Api::new(
            service,
            metrics,
            HttpLimits {
                max_body_bytes: 64 * 1024,
                body_read_timeout: Duration::from_secs(5),
            },
        );
        Fixture { _dir: dir, api }
    }

    async fn call(f: &Fixture, method: Method, path: &str, body: &[u8]) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap();
        let resp = f.api.handle(req).await;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    async fn post(f: &Fixture, path: &str, v: Value) -> (u16, Value) {
        call(f, Method::POST, path, &serde_json::to_vec(&v).unwrap()).await
    }

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[tokio::test]
    async fn round_trip_and_errors() {
        let f = fixture();
        let (s, k) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t1"})).await;
        assert_eq!(s, 200, "{k}");
        let key_id = k["key_id"].as_str().unwrap().to_owned();
        assert_eq!(k["kek_version"], 1);
        let (s, e) = post(
            &f,
            "/encrypt",
            json!({"key_id": key_id, "plaintext": b64(b"hi"), "aad": b64(b"a")}),
        )
        .await;
        assert_eq!(s, 200);
        let ct = e["ciphertext"].as_str().unwrap().to_owned();
        let (s, d) = post(
            &f,
            "/decrypt",
            json!({"key_id": key_id, "ciphertext": ct, "aad": b64(b"a")}),
        )
        .await;
        assert_eq!(
            (s, d["plaintext"].as_str().unwrap()),
            (200, b64(b"hi").as_str())
        );
        let (s, d) = post(&f, "/decrypt", json!({"key_id": key_id, "ciphertext": ct})).await;
        assert_eq!(
            (s, d["error"]["code"].as_str().unwrap()),
            (422, "decryption_failed")
        );

        let (s, w) = call(
            &f,
            Method::GET,
            &format!("/get_wrapped?key_id={key_id}"),
            b"",
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(w["wrapped"], k["wrapped"]);

        for (body, status, code) in [
            (&b"{not json"[..], 400, "malformed_request"),
            (&b""[..], 400, "malformed_request"),
            (
                br#"{"key_id":"dek_00000000000000000000000000000000","plaintext":"!!"}"#,
                400,
                "invalid_base64",
            ),
            (
                br#"{"key_id":"nope","plaintext":"aGk="}"#,
                400,
                "invalid_argument",
            ),
            (
                br#"{"key_id":"dek_00000000000000000000000000000000","plaintext":"aGk=","x":1}"#,
                400,
                "malformed_request",
            ),
            (
                br#"{"key_id":"dek_00000000000000000000000000000000","plaintext":"aGk="}"#,
                404,
                "unknown_key",
            ),
        ] {
            let (s, v) = call(&f, Method::POST, "/encrypt", body).await;
            assert_eq!(
                (s, v["error"]["code"].as_str().unwrap()),
                (status, code),
                "{v}"
            );
        }
        let big = vec![b'a'; 70 * 1024];
        let (s, v) = call(&f, Method::POST, "/encrypt", &big).await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (413, "payload_too_large")
        );
        let (s, v) = call(&f, Method::GET, "/encrypt", b"").await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (405, "method_not_allowed")
        );
        let (s, v) = call(&f, Method::GET, "/nope", b"").await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (404, "not_found")
        );
        let (s, v) = call(&f, Method::GET, "/get_wrapped", b"").await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (400, "invalid_argument")
        );
    }

    #[tokio::test]
    async fn batch_mixed_items_and_destroy() {
        let f = fixture();
        let (_, k) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t1"})).await;
        let key_id = k["key_id"].as_str().unwrap().to_owned();
        let (s, r) = post(
            &f,
            "/encrypt_batch",
            json!({"items": [
                {"key_id": key_id, "plaintext": b64(b"one")},
                {"key_id": key_id, "plaintext": "%%%"},
                {"key_id": "dek_00000000000000000000000000000000", "plaintext": b64(b"x")},
                {"key_id": key_id, "plaintext": b64(b"two"), "aad": b64(b"z")},
            ]}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        let res = r["results"].as_array().unwrap();
        assert_eq!(res.len(), 4);
        assert_eq!(res[1]["error"]["code"], "invalid_base64");
        assert_eq!(res[2]["error"]["code"], "unknown_key");
        let c0 = res[0]["ok"]["ciphertext"].as_str().unwrap();
        let c3 = res[3]["ok"]["ciphertext"].as_str().unwrap();
        let (s, r) = post(
            &f,
            "/decrypt_batch",
            json!({"items": [
                {"key_id": key_id, "ciphertext": c0},
                {"key_id": key_id, "ciphertext": c3},
                {"key_id": key_id, "ciphertext": c3, "aad": b64(b"z")},
            ]}),
        )
        .await;
        assert_eq!(s, 200);
        let res = r["results"].as_array().unwrap();
        assert_eq!(res[0]["ok"]["plaintext"], b64(b"one"));
        assert_eq!(res[1]["error"]["code"], "decryption_failed");
        assert_eq!(res[2]["ok"]["plaintext"], b64(b"two"));

        let (s, d) = post(&f, "/destroy_key", json!({"key_id": key_id})).await;
        assert_eq!((s, d["state"].as_str().unwrap()), (200, "destroyed"));
        let (s, _) = post(&f, "/destroy_key", json!({"key_id": key_id})).await;
        assert_eq!(s, 200, "idempotent");
        let (s, v) = post(&f, "/decrypt", json!({"key_id": key_id, "ciphertext": c0})).await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (404, "unknown_key")
        );
    }

    #[tokio::test]
    async fn hsm_down_gives_generic_503() {
        let f = fixture();
        let (_, k) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t1"})).await;
        let key_id = k["key_id"].as_str().unwrap().to_owned();
        f.api
            .service()
            .cache()
            .evict(&KeyId::parse(&key_id).unwrap());
        f.api.service().backend().set_down(true);
        let (s, v) = post(
            &f,
            "/encrypt",
            json!({"key_id": key_id, "plaintext": "aGk="}),
        )
        .await;
        assert_eq!(s, 503);
        assert_eq!(v["error"]["code"], "unavailable");
        assert!(!v.to_string().contains("mock"), "no internal detail: {v}");
        // In a batch, the cold key's item fails alone.
        let (s, r) = post(
            &f,
            "/encrypt_batch",
            json!({"items": [{"key_id": key_id, "plaintext": "aGk="}]}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(r["results"][0]["error"]["code"], "unavailable", "{r}");
        let (s, v) = call(&f, Method::GET, "/readyz", b"").await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (503, "unavailable")
        );
        f.api.service().backend().set_down(false);
        let (s, _) = call(&f, Method::GET, "/readyz", b"").await;
        assert_eq!(s, 200);
    }

    #[tokio::test]
    async fn metrics_count_requests() {
        let f = fixture();
        call(&f, Method::GET, "/healthz", b"").await;
        let req = Request::builder()
            .uri("/metrics")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = f.api.handle(req).await;
        let text = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert!(
            text.contains(r#"progressdb_kms_requests_total{endpoint="healthz",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("progressdb_kms_hsm_calls_total"));
        assert!(text.contains("progressdb_kms_keystore_commits_total"));
        assert!(text.contains("progressdb_kms_cache_hits_total"));
    }
}

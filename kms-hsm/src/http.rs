//! The HTTP API on `axum` (hyper 1, HTTP/1.1), with the `tower-http` body-limit layer:
//! routing, request parsing, answers and error bodies.
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
//! messages: the body is read within `limits.max_body_bytes` (`RequestBodyLimitLayer`, 413)
//! and a whole-body deadline of `limits.read_timeout_secs` (400) into zeroizing memory. (A
//! per-frame `RequestBodyTimeoutLayer` on top measured 20% of `/encrypt` throughput at
//! c=16 and adds nothing the deadline does not already bound.) Then it is parsed as JSON
//! into structs of plain strings (400 `malformed_request`), then every binary field is decoded from base64 (400 `invalid_base64`) and every id parsed
//! (400 `invalid_argument`). Unknown paths are 404 `not_found`, known paths with another
//! method 405 `method_not_allowed` with `Allow`.
//!
//! Errors are `{"error": {"code", "message"}}` ([`ErrorBody`]) with the status of
//! [`ErrorCode::status`]. 5xx answers carry a generic message only; their detail goes to the
//! log. Request and response bodies are never logged.
//!
//! In a batch, every item succeeds or fails on its own (an invalid item, an unknown key, a
//! decryption failure, or a cold key whose unwrap meets an HSM outage), so the cached keys
//! beside a failing one keep serving.

pub mod admin;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, MethodRouter};
use axum::Router;
use http_body_util::BodyExt as _;
use kms_api::parse::{
    parse_json, BatchBody, CreateDekBody, DecryptBody, DestroyKeyBody, EncryptBody, ParseError,
};
use kms_api::wire::{
    to_json_zeroizing, BatchResponse, Bytes64, CreateDekRequest, CreateDekResponse, DecryptRequest,
    DecryptResponse, DestroyKeyRequest, DestroyKeyResponse, EncryptRequest, EncryptResponse,
    GetWrappedResponse, ItemResult, ReadyResponse,
};
use kms_api::{ErrorBody, ErrorCode, ErrorDetail, KeyId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use service_kit::body::BodyError;
use tower::ServiceExt as _;
use tower_http::limit::RequestBodyLimitLayer;
use zeroize::Zeroizing;

use crate::backend::KeyBackend;
use crate::keystore::KeyStore;
use crate::metrics::{self, Metrics};
use crate::service::{DecryptItem, EncryptItem, KeyService, Readiness, ServiceError};

/// `Retry-After` of a 503 `overloaded` answer, in seconds.
pub const RETRY_AFTER_SECS: &str = "1";

/// Limits on request bodies.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    /// Deadline for receiving the whole body once the head has arrived.
    pub body_read_timeout: Duration,
    /// Requests a second per peer on the key API; off by default.
    pub peer_rate: service_kit::rate::RateLimit,
    /// `create_dek_for_thread` calls a second per peer (1000, bursts of 20000, by default).
    pub peer_create_rate: service_kit::rate::RateLimit,
}

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

/// Every endpoint.
const ROUTES: [Route; 10] = [
    Route::CreateDek,
    Route::Encrypt,
    Route::Decrypt,
    Route::EncryptBatch,
    Route::DecryptBatch,
    Route::DestroyKey,
    Route::GetWrapped,
    Route::Healthz,
    Route::Readyz,
    Route::Metrics,
];

impl Route {
    /// Path of the endpoint: its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Route::CreateDek => "/create_dek_for_thread",
            Route::Encrypt => "/encrypt",
            Route::Decrypt => "/decrypt",
            Route::EncryptBatch => "/encrypt_batch",
            Route::DecryptBatch => "/decrypt_batch",
            Route::DestroyKey => "/destroy_key",
            Route::GetWrapped => "/get_wrapped",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
        }
    }

    fn of_path(path: &str) -> Option<Route> {
        ROUTES.into_iter().find(|r| r.label() == path)
    }
}

/// Label for requests that matched no route.
const UNKNOWN_ENDPOINT: &str = "unknown";

fn parse_key_id(s: &str) -> Result<KeyId, HttpError> {
    KeyId::parse(s).map_err(|e| HttpError::InvalidArgument(format!("key_id: {e}")))
}

/// Bytes beyond the limit that are still read (and discarded) before answering 413, so an
/// ordinary client sees the answer; a body declared larger than that is refused at once.
const DRAIN_ALLOWANCE: usize = 4 << 20;

/// The AAD of a request (empty when absent).
fn aad(a: &Option<Bytes64>) -> &[u8] {
    a.as_ref().map_or(&[], |a| a.0.as_slice())
}

/// `body` into the typed request `R` through its written form `W` ([`kms_api::parse`]).
fn parse<W: DeserializeOwned, R: TryFrom<W, Error = ParseError>>(
    body: &[u8],
) -> Result<R, HttpError> {
    Ok(R::try_from(parse_json::<W>(body)?)?)
}

/// A JSON answer. Answers can carry plaintext (`/decrypt`), so every body is built in a
/// [`ZeroizingBuf`] and handed to hyper as `Bytes` that wipe their memory when dropped.
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
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

fn error_response(err: &HttpError, endpoint: &'static str) -> Response<Body> {
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

/// The HTTP front of a [`KeyService`]: what every handler gets.
pub struct Api<B, S> {
    service: Arc<KeyService<B, S>>,
    /// (second, refused admin calls audited in it).
    refusals: std::sync::Mutex<(u64, u32)>,
    lifecycle: Arc<crate::lifecycle::Lifecycle<B, S>>,
    metrics: Arc<Metrics>,
    limits: HttpLimits,
    /// Per peer (its transport identity, e.g. `uid:1000`), on the key API only.
    rate: service_kit::rate::RateLimiter<std::sync::Arc<str>>,
    /// Creates per peer: each leaves a key record and an audit entry for good.
    create_rate: service_kit::rate::RateLimiter<std::sync::Arc<str>>,
}

impl<B, S> std::fmt::Debug for Api<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<B: KeyBackend, S: KeyStore> Api<B, S> {
    pub fn new(
        service: Arc<KeyService<B, S>>,
        metrics: Arc<Metrics>,
        limits: HttpLimits,
        lifecycle: crate::lifecycle::LifecycleOptions,
    ) -> Self {
        Self {
            lifecycle: crate::lifecycle::Lifecycle::new(Arc::clone(&service), lifecycle),
            refusals: std::sync::Mutex::new((0, 0)),
            service,
            metrics,
            limits,
            rate: service_kit::rate::RateLimiter::new(limits.peer_rate),
            create_rate: service_kit::rate::RateLimiter::new(limits.peer_create_rate),
        }
    }

    pub fn service(&self) -> &Arc<KeyService<B, S>> {
        &self.service
    }

    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn lifecycle(&self) -> &Arc<crate::lifecycle::Lifecycle<B, S>> {
        &self.lifecycle
    }

    /// Audits a refused admin call, at most [`REFUSAL_AUDITS_PER_SEC`] a second (a flood of
    /// refused calls must not flood the log); the refusal stands whether or not it is
    /// written.
    pub async fn audit_refusal(&self, route: &'static str, why: &'static str) {
        let now = crate::keystore::now_secs();
        let allowed = {
            let mut w = self
                .refusals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if w.0 != now {
                *w = (now, 0);
            }
            w.1 += 1;
            w.1 <= REFUSAL_AUDITS_PER_SEC
        };
        if !allowed {
            tracing::warn!(
                route,
                "refused admin call not audited: over the per-second cap"
            );
            return;
        }
        let ev = crate::audit::AuditEvent::new("admin.refused")
            .outcome(crate::audit::Outcome::Refused)
            .with("route", route)
            .with("reason", why);
        if let Err(e) = self.service.audit(ev).await {
            tracing::error!(error = %e, "cannot audit a refused admin call");
        }
    }
}

/// Refused admin calls audited per second at most.
pub const REFUSAL_AUDITS_PER_SEC: u32 = 20;

/// Who sent a request, as the transport saw it (`uid:1000`, `cert:<sha256 prefix>`, with an
/// `admin:` prefix on the admin endpoint): the actor of the audit entries it causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer(pub std::sync::Arc<str>);

/// Whether a request (its route label and raw path) can append to the audit log, so needs
/// its actor: key creation and destruction, and anything under `/admin` (a refused one too).
fn audited(route: &'static str, path: &str) -> bool {
    path.starts_with("/admin")
        || route == Route::CreateDek.label()
        || route == Route::DestroyKey.label()
}

/// The shared state of the handlers.
type ApiState<B, S> = State<Arc<Api<B, S>>>;

/// A route table: (path, handlers). Each router is built from its table and nothing else, so
/// the table's paths are exactly the paths served (the API reference test holds
/// `docs/openapi/kms.yaml` to them).
pub type RouteTable<B, S> = Vec<(&'static str, MethodRouter<Arc<Api<B, S>>>)>;

/// The paths of `table`.
pub fn paths<B, S>(table: &RouteTable<B, S>) -> Vec<&'static str> {
    table.iter().map(|(p, _)| *p).collect()
}

/// Every route of the client endpoint. The two `/admin` catch-alls only refuse (403).
pub fn client_routes<B: KeyBackend, S: KeyStore>() -> RouteTable<B, S> {
    vec![
        ("/create_dek_for_thread", post(create_dek::<B, S>)),
        ("/encrypt", post(encrypt::<B, S>)),
        ("/decrypt", post(decrypt::<B, S>)),
        ("/encrypt_batch", post(encrypt_batch::<B, S>)),
        ("/decrypt_batch", post(decrypt_batch::<B, S>)),
        ("/destroy_key", post(destroy_key::<B, S>)),
        ("/get_wrapped", get(get_wrapped::<B, S>)),
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz::<B, S>)),
        ("/metrics", get(metrics::<B, S>)),
        ("/admin", any(admin_refused::<B, S>)),
        ("/admin/{*rest}", any(admin_refused::<B, S>)),
    ]
}

/// `table` as a router.
fn build<B, S>(table: RouteTable<B, S>) -> Router<Arc<Api<B, S>>>
where
    B: KeyBackend,
    S: KeyStore,
{
    table
        .into_iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods))
}

/// The KMS API for an allowed peer.
pub fn router<B: KeyBackend, S: KeyStore>(api: Arc<Api<B, S>>) -> Router {
    let limits = api.limits;
    build(client_routes::<B, S>())
        .fallback(|| async { error_response(&HttpError::NotFound, UNKNOWN_ENDPOINT) })
        .method_not_allowed_fallback(|uri: Uri| async move {
            let label = Route::of_path(uri.path()).map_or(UNKNOWN_ENDPOINT, Route::label);
            error_response(&HttpError::MethodNotAllowed, label)
        })
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .with_state(api)
}

/// `/admin/...` on the client endpoint: refused whoever asks (the server's identity is never
/// an admin), logged and audited.
async fn admin_refused<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    uri: Uri,
) -> Response {
    let label = admin::route_label(uri.path()).unwrap_or(UNKNOWN_ENDPOINT);
    tracing::warn!(route = label, "admin call refused on the client endpoint");
    api.audit_refusal(label, "client endpoint").await;
    let mut r = error_response(&HttpError::AdminOnly, label);
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// What a peer outside `listen.allowed_uids` gets, whatever it asks: 403, without its body
/// being read, and the connection closed.
pub fn forbidden_router<B: KeyBackend, S: KeyStore>(api: Arc<Api<B, S>>) -> Router {
    Router::new()
        .fallback(|| async {
            let mut r = error_response(&HttpError::Forbidden, UNKNOWN_ENDPOINT);
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        })
        .with_state(api)
}

/// Answers `req` with `router` (one of [`router`] and [`forbidden_router`]), then counts the
/// answer by endpoint and status and turns the body-limit layer's own 413 (sent when
/// `Content-Length` is already too large) into our JSON error. The transport serves every
/// request through this, without a boxed middleware in between.
pub async fn answer<B: KeyBackend, S: KeyStore, Bd>(
    api: &Api<B, S>,
    router: Router,
    req: axum::http::Request<Bd>,
) -> Response
where
    Bd: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    Bd::Error: Into<axum::BoxError>,
{
    let start = Instant::now();
    let method = req.method().clone();
    let label = Route::of_path(req.uri().path())
        .map(Route::label)
        .or_else(|| admin::route_label(req.uri().path()))
        .unwrap_or(UNKNOWN_ENDPOINT);
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // The key API's rate per peer (admin peers, probes and metrics are not limited).
    let over = |limiter: &service_kit::rate::RateLimiter<std::sync::Arc<str>>| match req
        .extensions()
        .get::<Peer>()
    {
        Some(p) if p.0.starts_with("admin:") => None,
        Some(p) => limiter.check(&p.0).err(),
        // A request the transport did not tag is limited too, in one shared bucket.
        None => limiter.check(&std::sync::Arc::from("unknown")).err(),
    };
    let over_rate =
        if api.limits.peer_rate.is_on() && !matches!(label, "/healthz" | "/readyz" | "/metrics") {
            over(&api.rate)
        } else {
            None
        };
    // Creates have a budget of their own: a peer cannot fill the key store for everyone.
    let over_rate = over_rate.or_else(|| {
        (api.limits.peer_create_rate.is_on() && label == Route::CreateDek.label())
            .then(|| over(&api.create_rate))
            .flatten()
    });
    let mut resp = match (over_rate, declared) {
        (Some(wait), _) => {
            tracing::debug!(route = label, "peer over its request rate");
            error_response(&HttpError::RateLimited(wait), label)
        }
        // Declared too large, but not absurdly: read and discard it first (within the body
        // deadline), so the client reads the 413 instead of a reset of a connection it is
        // still writing to; the server's KMS client splits a batch on exactly this answer.
        // (The admin routes that take whole backup files have their own, larger limit.)
        (None, Some(n))
            if !admin::large_body_route(label)
                && n > api.limits.max_body_bytes
                && n <= api.limits.max_body_bytes + DRAIN_ALLOWANCE =>
        {
            let mut body = std::pin::pin!(req.into_body());
            let _ = tokio::time::timeout(api.limits.body_read_timeout, async {
                while let Some(Ok(_)) = body.as_mut().frame().await {}
            })
            .await;
            let mut r = error_response(
                &HttpError::BodyTooLarge {
                    limit: api.limits.max_body_bytes,
                },
                label,
            );
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
        // Only requests that may be audited run with their actor set: the hot key
        // operations (encrypt, decrypt, batches) are never audited and pay nothing for it.
        (None, _) if audited(label, req.uri().path()) => {
            let actor = req
                .extensions()
                .get::<Peer>()
                .map_or_else(|| std::sync::Arc::from("unknown"), |p| p.0.clone());
            match crate::audit::ACTOR.scope(actor, router.oneshot(req)).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
        (None, _) => match router.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
    };
    if service_kit::body::is_limit_layer_refusal(&resp) {
        resp = error_response(
            &HttpError::BodyTooLarge {
                limit: api.limits.max_body_bytes,
            },
            label,
        );
    }
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    api.metrics.http.observe(label, &method, status, elapsed);
    tracing::debug!(
        route = label,
        status,
        micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        "request"
    );
    resp
}

/// An error answer for endpoint `label` (the `IntoResponse` of the handlers).
struct Failure(HttpError, &'static str);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error_response(&self.0, self.1)
    }
}

type Answer = Result<Response, Failure>;

fn fail(route: Route) -> impl Fn(HttpError) -> Failure {
    move |e| Failure(e, route.label())
}

/// The request body, read within the body-limit layer and a whole-body deadline into
/// zeroizing memory (it may carry plaintext). Over the limit: 413 and the connection is
/// closed; not complete within the deadline (a client that trickles a byte now and then
/// included) or broken: 400.
async fn read_body(body: Body, limits: HttpLimits) -> Result<Zeroizing<Vec<u8>>, HttpError> {
    match service_kit::body::read_zeroizing(body, limits.body_read_timeout).await {
        Ok(buf) => Ok(buf.into_inner()),
        Err(BodyError::TooLarge) => Err(HttpError::BodyTooLarge {
            limit: limits.max_body_bytes,
        }),
        Err(BodyError::Timeout) => Err(HttpError::BodyTimeout(limits.body_read_timeout)),
        Err(BodyError::Broken) => Err(HttpError::BodyRead),
    }
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

async fn readyz<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>) -> Response {
    match api.service.readiness().await {
        Readiness::Ready => json_response(
            StatusCode::OK,
            &ReadyResponse {
                ready: true,
                reason: None,
                alerts: service_kit::alerts::current(),
            },
        ),
        Readiness::NotReady(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &ErrorBody::new(ErrorCode::Unavailable, format!("not ready: {reason}")),
        ),
    }
}

async fn metrics<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>) -> Answer {
    let mut r = Response::new(Body::from(api.metrics.encode()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(r)
}

/// `GET /get_wrapped?key_id=`, decoded by `serde_urlencoded`.
#[derive(Deserialize)]
struct GetWrappedQuery {
    key_id: Option<String>,
}

async fn get_wrapped<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    q: Result<Query<GetWrappedQuery>, QueryRejection>,
) -> Answer {
    let f = fail(Route::GetWrapped);
    let Query(q) = q.map_err(|_| {
        f(HttpError::InvalidArgument(
            "the query string must be key_id=<key id>, once".into(),
        ))
    })?;
    let raw = q.key_id.ok_or_else(|| {
        f(HttpError::InvalidArgument(
            "query parameter key_id is required".into(),
        ))
    })?;
    let key_id = parse_key_id(&raw).map_err(&f)?;
    let w = api
        .service
        .get_wrapped(&key_id)
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &GetWrappedResponse {
            wrapped: w.wrapped,
            kek_id: w.kek_id,
            kek_version: w.kek_version,
        },
    ))
}

async fn create_dek<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>, body: Body) -> Answer {
    let f = fail(Route::CreateDek);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let req: CreateDekRequest = parse::<CreateDekBody, _>(&body).map_err(&f)?;
    let k = api
        .service
        .create_dek_for_thread(req.thread_id, req.idempotency_key)
        .await
        .map_err(|e| f(e.into()))?;
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

async fn encrypt<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>, body: Body) -> Answer {
    let f = fail(Route::Encrypt);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let req: EncryptRequest = parse::<EncryptBody, _>(&body).map_err(&f)?;
    drop(body);
    let e = api
        .service
        .encrypt(&req.key_id, req.plaintext.expose(), aad(&req.aad))
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &EncryptResponse {
            ciphertext: Bytes64(e.ciphertext),
            key_version: e.kek_version,
        },
    ))
}

async fn decrypt<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>, body: Body) -> Answer {
    let f = fail(Route::Decrypt);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let req: DecryptRequest = parse::<DecryptBody, _>(&body).map_err(&f)?;
    let p = api
        .service
        .decrypt(&req.key_id, &req.ciphertext.0, aad(&req.aad))
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &DecryptResponse { plaintext: p },
    ))
}

async fn destroy_key<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>, body: Body) -> Answer {
    let f = fail(Route::DestroyKey);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let DestroyKeyRequest { key_id } = parse::<DestroyKeyBody, _>(&body).map_err(&f)?;
    api.service
        .destroy_key(&key_id)
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &DestroyKeyResponse {
            key_id,
            state: "destroyed".to_owned(),
        },
    ))
}

async fn encrypt_batch<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let route = Route::EncryptBatch;
    let f = fail(route);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let raw: BatchBody<EncryptBody> = parse_json(&body).map_err(|e| f(e.into()))?;
    drop(body);
    let inputs: Vec<Result<EncryptRequest, HttpError>> = raw
        .into_items()
        .map_err(|e| f(e.into()))?
        .into_iter()
        .map(|b| EncryptRequest::try_from(b).map_err(HttpError::from))
        .collect();
    let items: Vec<EncryptItem<'_>> = inputs
        .iter()
        .flatten()
        .map(|i| EncryptItem {
            key_id: &i.key_id,
            plaintext: i.plaintext.expose(),
            aad: aad(&i.aad),
        })
        .collect();
    let mut done = api.service.encrypt_batch(&items).await.into_iter();
    let results = merge(route.label(), inputs, &mut done, |e| EncryptResponse {
        ciphertext: Bytes64(e.ciphertext),
        key_version: e.kek_version,
    })
    .map_err(&f)?;
    Ok(json_response(StatusCode::OK, &BatchResponse { results }))
}

async fn decrypt_batch<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let route = Route::DecryptBatch;
    let f = fail(route);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let raw: BatchBody<DecryptBody> = parse_json(&body).map_err(|e| f(e.into()))?;
    drop(body);
    let inputs: Vec<Result<DecryptRequest, HttpError>> = raw
        .into_items()
        .map_err(|e| f(e.into()))?
        .into_iter()
        .map(|b| DecryptRequest::try_from(b).map_err(HttpError::from))
        .collect();
    let items: Vec<DecryptItem<'_>> = inputs
        .iter()
        .flatten()
        .map(|i| DecryptItem {
            key_id: &i.key_id,
            ciphertext: &i.ciphertext.0,
            aad: aad(&i.aad),
        })
        .collect();
    let mut done = api.service.decrypt_batch(&items).await.into_iter();
    let results = merge(route.label(), inputs, &mut done, |p| DecryptResponse {
        plaintext: p,
    })
    .map_err(&f)?;
    Ok(json_response(StatusCode::OK, &BatchResponse { results }))
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
    use axum::http::{Method, Request};
    use serde_json::{json, Value};

    struct Fixture {
        _dir: tempfile::TempDir,
        api: Arc<Api<MockBackend, LmdbStore>>,
    }

    impl Fixture {
        async fn handle(&self, req: Request<Body>) -> Response {
            answer(&self.api, router(self.api.clone()), req).await
        }
    }

    fn fixture() -> Fixture {
        fixture_with_rate(service_kit::rate::RateLimit::OFF)
    }

    fn fixture_with_rate(peer_rate: service_kit::rate::RateLimit) -> Fixture {
        fixture_with_rates(peer_rate, service_kit::rate::RateLimit::OFF)
    }

    fn fixture_with_rates(
        peer_rate: service_kit::rate::RateLimit,
        peer_create_rate: service_kit::rate::RateLimit,
    ) -> Fixture {
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
                peer_rate,
                peer_create_rate,
            },
            crate::lifecycle::LifecycleOptions::default(),
        );
        Fixture {
            _dir: dir,
            api: Arc::new(api),
        }
    }

    async fn call(f: &Fixture, method: Method, path: &str, body: &[u8]) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_vec()))
            .unwrap();
        let resp = f.handle(req).await;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    async fn post(f: &Fixture, path: &str, v: Value) -> (u16, Value) {
        call(f, Method::POST, path, &serde_json::to_vec(&v).unwrap()).await
    }

    fn b64(b: &[u8]) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b)
    }

    /// A request the transport did not tag with its peer is limited too (one shared
    /// bucket), never let through unlimited; probes are not limited.
    #[tokio::test]
    async fn untagged_requests_are_rate_limited_and_probes_are_not() {
        let f = fixture_with_rate(service_kit::rate::RateLimit {
            per_sec: 1,
            burst: 2,
        });
        let body = json!({"thread_id": "t"});
        assert_eq!(
            post(&f, "/create_dek_for_thread", body.clone()).await.0,
            200
        );
        assert_eq!(
            post(&f, "/create_dek_for_thread", body.clone()).await.0,
            200
        );
        let (s, v) = post(&f, "/create_dek_for_thread", body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (429, Some("rate_limited")),
            "{v}"
        );
        for _ in 0..5 {
            assert_eq!(call(&f, Method::GET, "/healthz", b"").await.0, 200);
        }
    }

    /// Creates have a per-peer budget of their own, on by default: past it a create is 429
    /// while every other call of the same peer is served (the key store cannot be filled by
    /// one peer at the rate it can send).
    #[tokio::test]
    async fn creates_have_a_budget_of_their_own() {
        let f = fixture_with_rates(
            service_kit::rate::RateLimit::OFF,
            service_kit::rate::RateLimit {
                per_sec: 1,
                burst: 3,
            },
        );
        let mut made = Vec::new();
        for i in 0..3 {
            let (s, k) = post(
                &f,
                "/create_dek_for_thread",
                json!({"thread_id": format!("t{i}")}),
            )
            .await;
            assert_eq!(s, 200, "{k}");
            made.push(k["key_id"].as_str().unwrap().to_owned());
        }
        let (s, v) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t9"})).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (429, Some("rate_limited")),
            "{v}"
        );
        for _ in 0..10 {
            let (s, _) = post(
                &f,
                "/encrypt",
                json!({"key_id": made[0], "plaintext": b64(b"x"), "aad": b64(b"a")}),
            )
            .await;
            assert_eq!(s, 200);
        }
        assert_eq!(
            post(&f, "/destroy_key", json!({"key_id": made[1]})).await.0,
            200
        );
        assert_eq!(f.api.service().store().key_count().await.unwrap(), 3);
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
            .body(Body::empty())
            .unwrap();
        let resp = f.handle(req).await;
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
            text.contains(
                r#"progressdb_kms_http_requests_total{route="/healthz",method="GET",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("progressdb_kms_hsm_calls_total"));
        assert!(text.contains("progressdb_kms_keystore_commits_total"));
        assert!(text.contains("progressdb_kms_cache_hits_total"));
    }
}

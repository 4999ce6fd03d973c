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
mod errors;
mod key_api;
mod routes;

pub use errors::*;
pub use routes::*;

use key_api::*;

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
    /// The route templates of both endpoints, from their route tables.
    routes: Arc<RouteTemplates>,
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
            routes: Arc::new(RouteTemplates::of::<B, S>()),
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

    /// The route templates of both endpoints.
    pub fn route_templates(&self) -> Arc<RouteTemplates> {
        Arc::clone(&self.routes)
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

/// Which API a peer was admitted to: the key API of the client endpoint, or the admin API
/// (the admin socket, or a TLS client whose certificate names an admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Client,
    Admin,
}

/// Who sent a request, as the transport saw it: its role and its identity (`uid:1000`,
/// `cert:<sha256 prefix>`), set on every request by the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    role: PeerRole,
    actor: std::sync::Arc<str>,
}

impl Peer {
    /// A peer of `role` identified by `id`.
    pub fn new(role: PeerRole, id: &str) -> Self {
        let actor = match role {
            PeerRole::Client => std::sync::Arc::from(id),
            PeerRole::Admin => std::sync::Arc::from(format!("admin:{id}")),
        };
        Self { role, actor }
    }

    pub fn role(&self) -> PeerRole {
        self.role
    }

    /// The actor of the audit entries its requests cause (the identity, with an `admin:`
    /// prefix for an admin peer), also the key of its rate limits.
    pub fn actor(&self) -> &std::sync::Arc<str> {
        &self.actor
    }
}

/// Whether a request (its route label and raw path) can append to the audit log, so needs
/// its actor: key creation and destruction, and anything under `/admin` (a refused one too).
fn audited(route: &'static str, path: &str) -> bool {
    path.starts_with("/admin")
        || route == Route::CreateDek.label()
        || route == Route::DestroyKey.label()
}

/// The shared state of the handlers.
type ApiState<B, S> = State<Arc<Api<B, S>>>;

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
    let (label, body_class) = api.routes.of_path(req.uri().path());
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
        Some(p) if p.role() == PeerRole::Admin => None,
        Some(p) => limiter.check(p.actor()).err(),
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
            if body_class != BodyClass::Backup
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
                .map_or_else(|| std::sync::Arc::from("unknown"), |p| p.actor().clone());
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

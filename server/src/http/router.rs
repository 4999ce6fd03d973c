//! Routing, request parsing and responses, on `axum` with `tower-http` layers. Handlers call
//! [`MessageService`]; every error leaves through [`error_response`] (the `IntoResponse` of
//! [`ApiError`]), the single place that turns an error into an HTTP answer.
//!
//! * Routing, path parameters, query strings (`serde_urlencoded`) and method dispatch are
//!   axum's; unknown paths and methods get our JSON error bodies (`not_found`,
//!   `method_not_allowed` with `Allow`). A trailing slash is ignored (`NormalizePath`).
//! * Request bodies: `tower_http::limit::RequestBodyLimitLayer` (`limits.max_body_bytes`,
//!   413); [`JsonBody`] reads within it and within a whole-body deadline of
//!   `http.body_read_timeout_secs` (408) into zeroizing memory
//!   ([`service_kit::body::read_zeroizing`], shared with the KMS), and maps every failure to a
//!   stable code without quoting the request.
//! * Every answer is counted in `/metrics` by route template, method and status.

mod extract;
mod handlers;
pub use extract::*;
use handlers::*;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use kms_api::ThreadId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use service_kit::body::BodyError;
use tower::{Layer as _, ServiceExt as _};
use tower_http::normalize_path::{NormalizePath, NormalizePathLayer};

use super::HttpOptions;
use crate::api::{
    CreateThreadBody, KmsVisibility, MessageBody, MessageList, PatchThreadBody, ReadyView,
    SignBody, SignView, ThreadList, ThreadView,
};
use crate::auth::{Principal, Role};
use crate::config::MetricsAccess;
use crate::error::ApiError;
use crate::ids::{MessageId, Timestamp};
use crate::service::{Health, MessageService};
use crate::store::Order;

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct RouterState {
    pub(in crate::http) service: Arc<MessageService>,
    pub(in crate::http) opts: Arc<HttpOptions>,
}

/// The whole HTTP service: the router behind its layers; [`HttpService::answer`] serves one
/// request.
#[derive(Debug, Clone)]
pub struct HttpService {
    inner: NormalizePath<axum::Router>,
    state: RouterState,
}

/// Every route of the API, as (path, handlers). The router is built from this table and
/// nothing else, so its paths are exactly the paths served (the API reference test holds
/// `docs/openapi/server.yaml` to them).
pub fn routes() -> Vec<(&'static str, MethodRouter<RouterState>)> {
    vec![
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        ("/metrics", get(metrics)),
        ("/v1/threads", get(list_threads).post(create_thread)),
        (
            "/v1/threads/{id}",
            get(get_thread).patch(patch_thread).delete(delete_thread),
        ),
        (
            "/v1/threads/{id}/messages",
            get(list_messages).post(post_message),
        ),
        (
            "/v1/threads/{id}/messages/{msg_id}",
            get(get_message).put(put_message).delete(delete_message),
        ),
        ("/v1/sign", post(sign)),
        (
            "/v1/users/{user_id}/revoke-signatures",
            post(revoke_signatures),
        ),
        ("/admin/threads/{id}/kms", get(thread_kms)),
        ("/admin/threads/{id}/rotate-dek", post(rotate_dek)),
        ("/admin/threads/{id}/encrypt", post(encrypt_thread)),
        ("/admin/jobs", get(admin_jobs)),
        ("/admin/jobs/{job_id}", get(admin_job)),
        ("/admin/kms/refresh-copies", post(refresh_copies)),
        ("/admin/kms/key-copies", get(key_copies)),
        ("/admin/backup", post(backup)),
        ("/admin/verify", post(verify)),
    ]
}

/// The paths of [`routes`].
pub fn paths() -> Vec<&'static str> {
    routes().into_iter().map(|(p, _)| p).collect()
}

/// Builds the service for `app`.
pub fn service(service: Arc<MessageService>, opts: HttpOptions) -> HttpService {
    let state = RouterState {
        service,
        opts: Arc::new(opts),
    };
    let router = routes()
        .into_iter()
        .chain(super::progressdb::routes())
        .fold(axum::Router::new(), |r, (path, methods)| {
            r.route(path, methods)
        })
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            state.opts.max_body_bytes,
        ));
    // Outermost: a preflight is answered before any handler (so before authentication).
    let router = match super::cors::layer(&state.opts.cors_allowed_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    let router = router.with_state(state.clone());
    HttpService {
        inner: NormalizePathLayer::trim_trailing_slash().layer(router),
        state,
    }
}

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

fn with_type(status: StatusCode, body: Body, ctype: &'static str) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

impl HttpService {
    /// Answers one request, then counts and logs the answer by route template. The
    /// body-limit layer's own 413 (sent before any handler runs, when `Content-Length` is
    /// already too large) becomes our JSON error. No boxed middleware sits in between.
    pub async fn answer<Bd>(&self, req: axum::http::Request<Bd>) -> Response
    where
        Bd: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        Bd::Error: Into<axum::BoxError>,
    {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let label = route_label(&path);
        let mut resp = match self.inner.clone().oneshot(req.map(Body::new)).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        if service_kit::body::is_limit_layer_refusal(&resp) {
            let e = ApiError::PayloadTooLarge(self.state.opts.max_body_bytes);
            let mut ours = refusal(&path, &e);
            // Keep the CORS headers the layer added: a browser must be able to read the 413.
            for (name, value) in resp.headers() {
                if name.as_str().starts_with("access-control-") || name == axum::http::header::VARY
                {
                    ours.headers_mut().append(name.clone(), value.clone());
                }
            }
            resp = ours;
        }
        let status = resp.status();
        if status.is_server_error() {
            tracing::warn!(method = %method, route = label, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(method = %method, route = label, status = status.as_u16(), "request");
        }
        self.state.service.metrics().http.observe(
            label,
            &method,
            status.as_u16(),
            started.elapsed(),
        );
        resp
    }
}

/// The route template of `path` (from [`routes`], the table the router is built from), for
/// metric labels of fixed cardinality; `unmatched` for any other path.
fn route_label(path: &str) -> &'static str {
    static TEMPLATES: std::sync::LazyLock<service_kit::routes::Templates<()>> =
        std::sync::LazyLock::new(|| {
            service_kit::routes::Templates::new(
                paths()
                    .into_iter()
                    .chain(super::progressdb::paths())
                    .map(|p| (p, ())),
            )
        });
    // A trailing slash is ignored, as the router ignores it (`NormalizePath`).
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    TEMPLATES
        .of(path)
        .map_or("unmatched", |(template, ())| template)
}

/// An unknown path, or a path without this method, in the error shape of the API the path
/// belongs to (ProgressDB's SDKs read `error` as a string).
fn refusal(path: &str, e: &ApiError) -> Response {
    if super::progressdb::owns(path) {
        super::progressdb::error_response(e)
    } else {
        error_response(e)
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    refusal(uri.path(), &ApiError::NotFound)
}

async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    refusal(uri.path(), &ApiError::MethodNotAllowed)
}

//! The whole HTTP service: both APIs' route tables ([`super::v1`], [`super::progressdb`])
//! in one axum router behind its layers (body limit, CORS, trailing slash), and the one
//! place every answer is counted and logged by route template.
//!
//! * Routing, path parameters, query strings (`serde_urlencoded`) and method dispatch are
//!   axum's; unknown paths and methods get the JSON error body of the API the path belongs
//!   to (`not_found`, `method_not_allowed` with `Allow`). A trailing slash is ignored
//!   (`NormalizePath`).
//! * Request bodies: `tower_http::limit::RequestBodyLimitLayer` (`limits.max_body_bytes`,
//!   413), then [`super::request::JsonBody`] within it.
//! * Every answer is counted in `/metrics` by route template, method and status.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use tower::{Layer as _, ServiceExt as _};
use tower_http::normalize_path::{NormalizePath, NormalizePathLayer};

use super::state::RouterState;
use super::{progressdb, v1, HttpOptions};
use crate::error::ApiError;
use crate::service::MessageService;

/// The whole HTTP service: the router behind its layers; [`HttpService::answer`] serves one
/// request.
#[derive(Debug, Clone)]
pub struct HttpService {
    inner: NormalizePath<axum::Router>,
    state: RouterState,
}

/// Builds the service for `app`.
pub fn service(service: Arc<MessageService>, opts: HttpOptions) -> HttpService {
    let state = RouterState {
        service,
        opts: Arc::new(opts),
    };
    let router = v1::routes()
        .into_iter()
        .chain(progressdb::routes())
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

/// The route template of `path` (from the route tables the router is built from), for
/// metric labels of fixed cardinality; `unmatched` for any other path.
fn route_label(path: &str) -> &'static str {
    static TEMPLATES: std::sync::LazyLock<service_kit::routes::Templates<()>> =
        std::sync::LazyLock::new(|| {
            service_kit::routes::Templates::new(
                v1::paths()
                    .into_iter()
                    .chain(progressdb::paths())
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
    if progressdb::owns(path) {
        progressdb::error_response(e)
    } else {
        super::answer::error_response(e)
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    refusal(uri.path(), &ApiError::NotFound)
}

async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    refusal(uri.path(), &ApiError::MethodNotAllowed)
}

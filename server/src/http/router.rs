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
    app: Arc<MessageService>,
    opts: Arc<HttpOptions>,
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
    ]
}

/// The paths of [`routes`].
pub fn paths() -> Vec<&'static str> {
    routes().into_iter().map(|(p, _)| p).collect()
}

/// Builds the service for `app`.
pub fn service(app: Arc<MessageService>, opts: HttpOptions) -> HttpService {
    let state = RouterState {
        app,
        opts: Arc::new(opts),
    };
    let router = routes()
        .into_iter()
        .fold(axum::Router::new(), |r, (path, methods)| {
            r.route(path, methods)
        })
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            state.opts.max_body_bytes,
        ))
        .with_state(state.clone());
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

/// Turns an error into its JSON answer: the only place that does.
pub fn error_response(e: &ApiError) -> Response {
    let mut r = json_response(e.status(), &e.body());
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
fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response {
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
        let label = route_label(req.uri().path());
        let mut resp = match self.inner.clone().oneshot(req.map(Body::new)).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        if service_kit::body::is_limit_layer_refusal(&resp) {
            resp = error_response(&ApiError::PayloadTooLarge(self.state.opts.max_body_bytes));
        }
        let status = resp.status();
        if status.is_server_error() {
            tracing::warn!(method = %method, route = label, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(method = %method, route = label, status = status.as_u16(), "request");
        }
        self.state
            .app
            .metrics
            .http
            .observe(label, &method, status.as_u16(), started.elapsed());
        resp
    }
}

/// The route template of `path` (from [`routes`], the table the router is built from), for
/// metric labels of fixed cardinality; `unmatched` for any other path.
fn route_label(path: &str) -> &'static str {
    static TEMPLATES: std::sync::LazyLock<service_kit::routes::Templates<()>> =
        std::sync::LazyLock::new(|| {
            service_kit::routes::Templates::new(paths().into_iter().map(|p| (p, ())))
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

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

// ---- extractors ----

/// The authenticated caller (`Authorization: Bearer`, and the user headers).
#[derive(Debug)]
pub struct Caller(Principal);

impl FromRequestParts<RouterState> for Caller {
    type Rejection = ApiError;

    /// Authenticates, then counts the request against its API key's rate.
    async fn from_request_parts(parts: &mut Parts, st: &RouterState) -> Result<Self, ApiError> {
        Ok(Caller(st.app.authenticate(&parts.headers)?))
    }
}

/// An admin caller; any other valid key is 403.
#[derive(Debug)]
pub struct AdminCaller(Principal);

impl FromRequestParts<RouterState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &RouterState) -> Result<Self, ApiError> {
        let Caller(p) = Caller::from_request_parts(parts, st).await?;
        if p.role == Role::Admin {
            Ok(AdminCaller(p))
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

/// `{id}`: a thread id.
#[derive(Debug)]
pub struct ThreadPath(ThreadId);

impl<S: Send + Sync> FromRequestParts<S> for ThreadPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|_| ApiError::invalid("invalid thread id"))?;
        ThreadId::parse(&raw)
            .map(ThreadPath)
            .map_err(|_| ApiError::invalid("invalid thread id"))
    }
}

/// `{id}/.../{msg_id}`: a thread id and a message id.
#[derive(Debug)]
pub struct MessagePath(ThreadId, MessageId);

impl<S: Send + Sync> FromRequestParts<S> for MessagePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let Path((t, m)) = Path::<(String, String)>::from_request_parts(parts, st)
            .await
            .map_err(|_| ApiError::invalid("invalid path"))?;
        let t = ThreadId::parse(&t).map_err(|_| ApiError::invalid("invalid thread id"))?;
        let m = MessageId::parse(&m).map_err(|_| ApiError::invalid("invalid message id"))?;
        Ok(MessagePath(t, m))
    }
}

/// The query parameters of the listings, decoded by `serde_urlencoded`; values are checked
/// by the handlers so each gets its own message.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
    order: Option<String>,
}

impl ListQuery {
    fn from(q: Result<Query<ListQuery>, QueryRejection>) -> Result<Self, ApiError> {
        q.map(|Query(q)| q)
            .map_err(|_| ApiError::invalid("invalid query string"))
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        self.limit
            .as_deref()
            .map(|l| {
                l.parse::<usize>()
                    .map_err(|_| ApiError::invalid("limit must be a positive integer"))
            })
            .transpose()
    }

    fn order(&self) -> Result<Order, ApiError> {
        match self.order.as_deref() {
            None | Some("asc") => Ok(Order::Asc),
            Some("desc") => Ok(Order::Desc),
            Some(_) => Err(ApiError::invalid("order must be asc or desc")),
        }
    }

    fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref().filter(|c| !c.is_empty())
    }
}

/// A JSON request body, read within the body-limit layer and the body deadline into zeroizing
/// memory (message bodies are secret) and parsed into `T`. Failures are 413
/// `payload_too_large`, 408 `request_timeout` or 400 `malformed_request` with the category
/// and position of a JSON error, never serde's text (it can quote the request).
pub struct JsonBody<T>(T);

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

fn view_kms(p: &Principal) -> KmsVisibility {
    match p.role {
        Role::Admin => KmsVisibility::Shown,
        Role::Backend | Role::Frontend => KmsVisibility::Hidden,
    }
}

type Answer = Result<Response, ApiError>;

fn ok<T: Serialize>(v: &T) -> Answer {
    Ok(json_response(StatusCode::OK, v))
}

// ---- handlers ----

async fn healthz() -> Answer {
    ok(&serde_json::json!({"status": "ok"}))
}

async fn readyz(State(st): State<RouterState>) -> Answer {
    let (store, kms) = st.app.readiness().await;
    let ready = store == Health::Ok && kms != Health::Unavailable;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(
        status,
        &ReadyView {
            ready,
            store: store.as_str(),
            kms: kms.as_str(),
            alerts: service_kit::alerts::current(),
        },
    ))
}

async fn metrics(State(st): State<RouterState>, headers: axum::http::HeaderMap) -> Answer {
    match st.opts.metrics_access {
        MetricsAccess::Public => {}
        MetricsAccess::Admin => {
            // Not rate-limited: scrapes must not be refused under load.
            let p = st
                .app
                .keys
                .authenticate(&headers, &st.app.signature_generations)?;
            if p.role != Role::Admin {
                return Err(ApiError::Forbidden);
            }
        }
    }
    Ok(with_type(
        StatusCode::OK,
        Body::from(st.app.metrics.encode()),
        service_kit::metrics::CONTENT_TYPE,
    ))
}

async fn create_thread(
    State(st): State<RouterState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<CreateThreadBody>,
) -> Answer {
    let t = st.app.create_thread(&p, b.title, b.metadata).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &ThreadView::new(&t, view_kms(&p)),
    ))
}

async fn list_threads(
    State(st): State<RouterState>,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let q = ListQuery::from(q)?;
    let page = st.app.list_threads(&p, q.cursor(), q.limit()?).await?;
    let next_cursor = if page.more {
        page.items.last().map(|t| t.id.to_string())
    } else {
        None
    };
    let vis = view_kms(&p);
    ok(&ThreadList {
        threads: page.items.iter().map(|t| ThreadView::new(t, vis)).collect(),
        next_cursor,
    })
}

async fn get_thread(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    Caller(p): Caller,
) -> Answer {
    let t = st.app.thread_for(&p, &id).await?;
    ok(&ThreadView::new(&t, view_kms(&p)))
}

async fn patch_thread(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    Caller(p): Caller,
    JsonBody(b): JsonBody<PatchThreadBody>,
) -> Answer {
    let t = st.app.patch_thread(&p, &id, b.title, b.metadata).await?;
    ok(&ThreadView::new(&t, view_kms(&p)))
}

async fn delete_thread(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    Caller(p): Caller,
) -> Answer {
    let t = st.app.delete_thread(&p, &id).await?;
    ok(&ThreadView::new(&t, view_kms(&p)))
}

async fn post_message(
    State(st): State<RouterState>,
    ThreadPath(tid): ThreadPath,
    Caller(p): Caller,
    JsonBody(b): JsonBody<MessageBody>,
) -> Answer {
    let m = st.app.post_message(&p, &tid, b.body).await?;
    Ok(json_response(StatusCode::CREATED, &m))
}

async fn list_messages(
    State(st): State<RouterState>,
    ThreadPath(tid): ThreadPath,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let q = ListQuery::from(q)?;
    let (messages, next_cursor) = st
        .app
        .list_messages(&p, &tid, q.order()?, q.cursor(), q.limit()?)
        .await?;
    ok(&MessageList {
        messages,
        next_cursor,
    })
}

async fn get_message(
    State(st): State<RouterState>,
    MessagePath(tid, mid): MessagePath,
    Caller(p): Caller,
) -> Answer {
    ok(&st.app.get_message(&p, &tid, mid).await?)
}

async fn put_message(
    State(st): State<RouterState>,
    MessagePath(tid, mid): MessagePath,
    Caller(p): Caller,
    JsonBody(b): JsonBody<MessageBody>,
) -> Answer {
    ok(&st.app.update_message(&p, &tid, mid, b.body).await?)
}

async fn delete_message(
    State(st): State<RouterState>,
    MessagePath(tid, mid): MessagePath,
    Caller(p): Caller,
) -> Answer {
    ok(&st.app.delete_message(&p, &tid, mid).await?)
}

async fn sign(
    State(st): State<RouterState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<SignBody>,
) -> Answer {
    if p.role == Role::Frontend {
        return Err(ApiError::Forbidden);
    }
    let (user_id, signature, expires) = st.app.sign(&p, &b.user_id, b.expires_in_secs)?;
    ok(&SignView {
        user_id,
        signature,
        expires_at: expires
            .map(|e| Timestamp::from_nanos(e.saturating_mul(1_000_000_000)).to_rfc3339()),
    })
}

async fn revoke_signatures(
    State(st): State<RouterState>,
    Caller(p): Caller,
    Path(user_id): Path<String>,
) -> Answer {
    let (user_id, generation) = st.app.revoke_signatures(&p, &user_id).await?;
    ok(&crate::api::RevokeView {
        user_id,
        signature_generation: generation,
    })
}

async fn thread_kms(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    AdminCaller(p): AdminCaller,
) -> Answer {
    ok(&st.app.thread_kms(&p, &id).await?)
}

async fn rotate_dek(st: State<RouterState>, id: ThreadPath, p: AdminCaller) -> Answer {
    start_job(st, id, p, crate::store::JobKind::RotateDek).await
}

async fn encrypt_thread(st: State<RouterState>, id: ThreadPath, p: AdminCaller) -> Answer {
    start_job(st, id, p, crate::store::JobKind::EncryptThread).await
}

/// 202 `{job_id, started, job}`: the job `kind` on thread `id`, started or already running.
async fn start_job(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    AdminCaller(p): AdminCaller,
    kind: crate::store::JobKind,
) -> Answer {
    st.app.thread_for(&p, &id).await?;
    let (job, started) = crate::jobs::start(&st.app, &id, kind, "admin").await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({"job_id": job.id, "started": started, "job": job}),
    ))
}

async fn admin_job(
    State(st): State<RouterState>,
    AdminCaller(_): AdminCaller,
    job_id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Answer {
    // A path that is not UTF-8 is a bad id like any other (JSON error, not axum's text).
    let id = job_id
        .ok()
        .and_then(|axum::extract::Path(j)| kms_api::admin::JobId::parse(&j).ok())
        .ok_or_else(|| ApiError::invalid("job id: `job-` and 16 lowercase hex digits"))?;
    let job = st.app.store.get_job(&id).await?.ok_or(ApiError::NotFound)?;
    ok(&job)
}

async fn refresh_copies(State(st): State<RouterState>, AdminCaller(p): AdminCaller) -> Answer {
    let (checked, refreshed, missing) = st.app.refresh_key_copies(&p).await?;
    ok(&serde_json::json!({"checked": checked, "refreshed": refreshed, "missing": missing}))
}

/// Every thread's copy of its key (and a rotation's retiring key), for
/// `progressdb-kms import-copies` when the KMS lost records.
async fn key_copies(State(st): State<RouterState>, AdminCaller(p): AdminCaller) -> Answer {
    ok(&serde_json::json!({ "copies": st.app.key_copies(&p).await? }))
}

async fn admin_jobs(State(st): State<RouterState>, AdminCaller(_): AdminCaller) -> Answer {
    let jobs = st.app.store.jobs().await?;
    ok(&serde_json::json!({ "jobs": jobs }))
}

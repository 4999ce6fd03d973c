//! Routing, request parsing and responses. Handlers call [`App`]; every error leaves through
//! [`error_response`], the single place that turns an [`ApiError`] into an HTTP answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use kms_api::ThreadId;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::HttpOptions;
use crate::api::{
    CreateThreadBody, KmsVisibility, MessageBody, MessageList, PatchThreadBody, ReadyView,
    SignBody, SignView, ThreadList, ThreadView,
};
use crate::auth::{Principal, Role};
use crate::config::MetricsAccess;
use crate::error::ApiError;
use crate::ids::{MessageId, Timestamp};
use crate::metrics::{HttpLabels, RouteLabels};
use crate::service::{App, Health};
use crate::store::Order;

type Body = Full<Bytes>;

/// A matched route, with its path parameters parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    Threads,
    Thread(ThreadId),
    Messages(ThreadId),
    Message(ThreadId, MessageId),
    Sign,
    AdminThreadKms(ThreadId),
    AdminRotateDek(ThreadId),
    AdminJob,
}

impl Route {
    /// Matches `path`.
    ///
    /// # Errors
    /// `NotFound` for unknown paths, `InvalidArgument` for malformed ids.
    pub fn parse(path: &str) -> Result<Self, ApiError> {
        let path = if path.len() > 1 {
            path.strip_suffix('/').unwrap_or(path)
        } else {
            path
        };
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        let thread =
            |s: &str| ThreadId::parse(s).map_err(|_| ApiError::invalid("invalid thread id"));
        let message =
            |s: &str| MessageId::parse(s).map_err(|_| ApiError::invalid("invalid message id"));
        Ok(match segs.as_slice() {
            ["healthz"] => Route::Healthz,
            ["readyz"] => Route::Readyz,
            ["metrics"] => Route::Metrics,
            ["v1", "threads"] => Route::Threads,
            ["v1", "threads", t] => Route::Thread(thread(t)?),
            ["v1", "threads", t, "messages"] => Route::Messages(thread(t)?),
            ["v1", "threads", t, "messages", m] => Route::Message(thread(t)?, message(m)?),
            ["v1", "sign"] => Route::Sign,
            ["admin", "threads", t, "kms"] => Route::AdminThreadKms(thread(t)?),
            ["admin", "threads", t, "rotate-dek"] => Route::AdminRotateDek(thread(t)?),
            ["admin", "jobs", _] => Route::AdminJob,
            _ => return Err(ApiError::NotFound),
        })
    }

    /// The route template, for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Threads => "/v1/threads",
            Route::Thread(_) => "/v1/threads/{id}",
            Route::Messages(_) => "/v1/threads/{id}/messages",
            Route::Message(..) => "/v1/threads/{id}/messages/{msg_id}",
            Route::Sign => "/v1/sign",
            Route::AdminThreadKms(_) => "/admin/threads/{id}/kms",
            Route::AdminRotateDek(_) => "/admin/threads/{id}/rotate-dek",
            Route::AdminJob => "/admin/jobs/{job_id}",
        }
    }

    /// The methods the route accepts.
    pub fn allowed(&self) -> &'static [Method] {
        const GET: &[Method] = &[Method::GET];
        const POST: &[Method] = &[Method::POST];
        const GET_POST: &[Method] = &[Method::GET, Method::POST];
        const THREAD: &[Method] = &[Method::GET, Method::PATCH, Method::DELETE];
        const MESSAGE: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];
        match self {
            Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::AdminThreadKms(_)
            | Route::AdminJob => GET,
            Route::Threads | Route::Messages(_) => GET_POST,
            Route::Thread(_) => THREAD,
            Route::Message(..) => MESSAGE,
            Route::Sign | Route::AdminRotateDek(_) => POST,
        }
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Turns an error into its JSON answer: the only place that does.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body());
    match e {
        ApiError::Unauthorized => {
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
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
        | ApiError::KmsUnavailable
        | ApiError::Unavailable
        | ApiError::StorageFull
        | ApiError::ShredFailed => {}
    }
    r
}

/// A JSON answer, built in zeroizing memory and sent from `Bytes` that wipe it when dropped
/// (answers carry decrypted message bodies).
fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match kms_api::wire::to_json_zeroizing(v, 512) {
        Ok(b) => with_type(status, b.into_bytes(), "application/json"),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a response");
            with_type(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(br#"{"error":{"code":"internal","message":"internal error"}}"#),
                "application/json",
            )
        }
    }
}

fn with_type(status: StatusCode, body: Bytes, ctype: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Decoded query parameters (later duplicates win).
fn query(req: &Request<Incoming>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    let Some(q) = req.uri().query() else {
        return Ok(out);
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k)?, percent_decode(v)?);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || ApiError::invalid("invalid percent-encoding in the query string");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn parse_limit(q: &HashMap<String, String>) -> Result<Option<usize>, ApiError> {
    q.get("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| ApiError::invalid("limit must be a positive integer"))
        })
        .transpose()
}

fn parse_order(q: &HashMap<String, String>) -> Result<Order, ApiError> {
    match q.get("order").map(String::as_str) {
        None | Some("asc") => Ok(Order::Asc),
        Some("desc") => Ok(Order::Desc),
        Some(_) => Err(ApiError::invalid("order must be asc or desc")),
    }
}

fn cursor(q: &HashMap<String, String>) -> Option<&str> {
    q.get("cursor")
        .map(String::as_str)
        .filter(|c| !c.is_empty())
}

/// Dispatches requests to [`App`].
#[derive(Debug)]
pub struct Router {
    app: Arc<App>,
    opts: HttpOptions,
}

impl Router {
    pub fn new(app: Arc<App>, opts: HttpOptions) -> Self {
        Self { app, opts }
    }

    /// Answers one request; never fails (errors become JSON answers).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let route = Route::parse(req.uri().path());
        let label = route.as_ref().map_or("unmatched", Route::label);
        let resp = match route {
            Ok(route) => match self.dispatch(route, req).await {
                Ok(r) => r,
                Err(e) => error_response(&e),
            },
            Err(e) => error_response(&e),
        };
        let status = resp.status();
        if status.is_server_error() {
            tracing::warn!(method = %method, route = label, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(method = %method, route = label, status = status.as_u16(), "request");
        }
        let m = &self.app.metrics.http;
        m.requests
            .get_or_create(&HttpLabels {
                route: label,
                method: method_label(&method),
                status: status.as_u16(),
            })
            .inc();
        m.duration
            .get_or_create(&RouteLabels { route: label })
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    fn auth(&self, req: &Request<Incoming>) -> Result<Principal, ApiError> {
        Ok(self.app.keys.authenticate(req.headers())?)
    }

    fn admin(&self, req: &Request<Incoming>) -> Result<Principal, ApiError> {
        let p = self.auth(req)?;
        if p.role == Role::Admin {
            Ok(p)
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// Reads a JSON body within the size limit and the body read timeout.
    async fn json_body<T: DeserializeOwned>(&self, req: Request<Incoming>) -> Result<T, ApiError> {
        let max = self.opts.max_body_bytes;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(ApiError::PayloadTooLarge(max));
        }
        let body = Limited::new(req.into_body(), max);
        let collected = tokio::time::timeout(self.opts.body_read_timeout, body.collect())
            .await
            .map_err(|_| ApiError::RequestTimeout)?
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    ApiError::PayloadTooLarge(max)
                } else {
                    ApiError::MalformedRequest("the request body could not be read".into())
                }
            })?;
        let bytes = collected.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| {
            // Category and position only: serde's own text can quote the request (a message
            // body, a title), which must reach neither the answer nor the log.
            let what = match e.classify() {
                serde_json::error::Category::Data => {
                    "the body does not have the documented shape (missing, unknown or mistyped field)"
                }
                serde_json::error::Category::Syntax
                | serde_json::error::Category::Eof
                | serde_json::error::Category::Io => "the body is not valid JSON",
            };
            ApiError::MalformedRequest(format!("{what} at line {} column {}", e.line(), e.column()))
        })
    }

    fn view_kms(p: &Principal) -> KmsVisibility {
        match p.role {
            Role::Admin => KmsVisibility::Shown,
            Role::Backend | Role::Frontend => KmsVisibility::Hidden,
        }
    }

    async fn dispatch(
        &self,
        route: Route,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let method = req.method().clone();
        if !route.allowed().contains(&method) {
            let allow = route
                .allowed()
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut r = error_response(&ApiError::MethodNotAllowed);
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(ALLOW, v);
            }
            return Ok(r);
        }
        let app = &self.app;
        match route {
            Route::Healthz => Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            )),
            Route::Readyz => {
                let (store, kms) = app.readiness().await;
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
                    },
                ))
            }
            Route::Metrics => {
                match self.opts.metrics_access {
                    MetricsAccess::Public => {}
                    MetricsAccess::Admin => {
                        self.admin(&req)?;
                    }
                }
                Ok(with_type(
                    StatusCode::OK,
                    Bytes::from(app.metrics.encode()),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ))
            }
            Route::Threads => {
                let p = self.auth(&req)?;
                if method == Method::POST {
                    let b: CreateThreadBody = self.json_body(req).await?;
                    let t = app.create_thread(&p, b.title, b.metadata).await?;
                    Ok(json_response(
                        StatusCode::CREATED,
                        &ThreadView::new(&t, Self::view_kms(&p)),
                    ))
                } else {
                    let q = query(&req)?;
                    let page = app.list_threads(&p, cursor(&q), parse_limit(&q)?).await?;
                    let next_cursor = if page.more {
                        page.items.last().map(|t| t.id.to_string())
                    } else {
                        None
                    };
                    let vis = Self::view_kms(&p);
                    Ok(json_response(
                        StatusCode::OK,
                        &ThreadList {
                            threads: page.items.iter().map(|t| ThreadView::new(t, vis)).collect(),
                            next_cursor,
                        },
                    ))
                }
            }
            Route::Thread(id) => {
                let p = self.auth(&req)?;
                let vis = Self::view_kms(&p);
                match method {
                    Method::GET => {
                        let t = app.thread_for(&p, &id).await?;
                        Ok(json_response(StatusCode::OK, &ThreadView::new(&t, vis)))
                    }
                    Method::PATCH => {
                        let b: PatchThreadBody = self.json_body(req).await?;
                        let t = app.patch_thread(&p, &id, b.title, b.metadata).await?;
                        Ok(json_response(StatusCode::OK, &ThreadView::new(&t, vis)))
                    }
                    _ => {
                        let t = app.delete_thread(&p, &id).await?;
                        Ok(json_response(StatusCode::OK, &ThreadView::new(&t, vis)))
                    }
                }
            }
            Route::Messages(tid) => {
                let p = self.auth(&req)?;
                if method == Method::POST {
                    let b: MessageBody = self.json_body(req).await?;
                    let m = app.post_message(&p, &tid, b.body).await?;
                    Ok(json_response(StatusCode::CREATED, &m))
                } else {
                    let q = query(&req)?;
                    let (messages, next_cursor) = app
                        .list_messages(&p, &tid, parse_order(&q)?, cursor(&q), parse_limit(&q)?)
                        .await?;
                    Ok(json_response(
                        StatusCode::OK,
                        &MessageList {
                            messages,
                            next_cursor,
                        },
                    ))
                }
            }
            Route::Message(tid, mid) => {
                let p = self.auth(&req)?;
                match method {
                    Method::GET => Ok(json_response(
                        StatusCode::OK,
                        &app.get_message(&p, &tid, mid).await?,
                    )),
                    Method::PUT => {
                        let b: MessageBody = self.json_body(req).await?;
                        let m = app.update_message(&p, &tid, mid, b.body).await?;
                        Ok(json_response(StatusCode::OK, &m))
                    }
                    _ => Ok(json_response(
                        StatusCode::OK,
                        &app.delete_message(&p, &tid, mid).await?,
                    )),
                }
            }
            Route::Sign => {
                let p = self.auth(&req)?;
                if p.role == Role::Frontend {
                    return Err(ApiError::Forbidden);
                }
                let b: SignBody = self.json_body(req).await?;
                let (user_id, signature, expires) = app.sign(&p, &b.user_id, b.expires_in_secs)?;
                Ok(json_response(
                    StatusCode::OK,
                    &SignView {
                        user_id,
                        signature,
                        expires_at: expires.map(|e| {
                            Timestamp::from_nanos(e.saturating_mul(1_000_000_000)).to_rfc3339()
                        }),
                    },
                ))
            }
            Route::AdminThreadKms(id) => {
                let p = self.admin(&req)?;
                Ok(json_response(
                    StatusCode::OK,
                    &app.thread_kms(&p, &id).await?,
                ))
            }
            Route::AdminRotateDek(id) => {
                let p = self.admin(&req)?;
                app.thread_for(&p, &id).await?;
                Err(ApiError::NotImplemented)
            }
            Route::AdminJob => {
                self.admin(&req)?;
                Err(ApiError::NotImplemented)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/v1/threads").unwrap(), Route::Threads);
        assert_eq!(Route::parse("/v1/threads/").unwrap(), Route::Threads);
        assert!(matches!(
            Route::parse("/v1/threads/t1").unwrap(),
            Route::Thread(_)
        ));
        assert!(matches!(
            Route::parse("/v1/threads/t1/messages/00000000000000000001-000000").unwrap(),
            Route::Message(..)
        ));
        assert_eq!(Route::parse("/nope"), Err(ApiError::NotFound));
        assert_eq!(Route::parse("/"), Err(ApiError::NotFound));
        assert!(matches!(
            Route::parse("/v1/threads/a:b"),
            Err(ApiError::InvalidArgument(_))
        ));
        assert!(matches!(
            Route::parse("/v1/threads/t1/messages/12"),
            Err(ApiError::InvalidArgument(_))
        ));
        assert_eq!(Route::parse("/admin/jobs/j1").unwrap(), Route::AdminJob);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c").unwrap(), "a b c");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%2").is_err());
    }
}

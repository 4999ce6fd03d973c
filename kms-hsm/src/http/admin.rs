//! The admin API ([`kms_api::admin`]), served only to an admin identity: a peer of the admin
//! Unix socket whose uid is in `listen.admin_uids`, or a TCP client whose certificate
//! subject is in `tls.admin_subjects`. The client endpoint answers every `/admin/...` path
//! with 403 `forbidden` (and logs the refusal); the admin endpoint serves no key operation
//! (an admin cannot encrypt or decrypt).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use kms_api::admin::{
    DestroyKekRequest, DestroyKekResponse, HsmStatus, JobId, JobsResponse, StartJobResponse,
};
use kms_api::ErrorCode;
use tower_http::limit::RequestBodyLimitLayer;

use super::{
    build, error_response, healthz, json_response, metrics, read_body, readyz, Api, HttpError,
    RouteTable, UNKNOWN_ENDPOINT,
};
use crate::backend::{BackendState, KeyBackend};
use crate::keystore::KeyStore;
use crate::lifecycle::LifecycleError;

/// Largest admin request body other than a restore (`{"version": N}`).
const MAX_ADMIN_BODY: usize = 4096;
/// Largest backup file `POST /admin/restore` accepts (about a million key records).
pub const MAX_RESTORE_BODY: usize = 512 << 20;

impl crate::backup::BackupError {
    /// The stable wire code (exhaustive).
    pub fn code(&self) -> ErrorCode {
        match self {
            crate::backup::BackupError::Invalid(_) => ErrorCode::BackupInvalid,
            crate::backup::BackupError::DestroysUnknown(_) => ErrorCode::DestroysUnknown,
            crate::backup::BackupError::Service(e) => e.code(),
        }
    }
}

impl LifecycleError {
    /// The stable wire code (exhaustive).
    pub fn code(&self) -> ErrorCode {
        match self {
            LifecycleError::UnknownJob(_) => ErrorCode::UnknownJob,
            LifecycleError::KekNotRetired { .. } => ErrorCode::KekNotRetired,
            LifecycleError::KekInUse { .. } => ErrorCode::KekInUse,
            LifecycleError::VersionsExhausted(_) => ErrorCode::Internal,
            // Another replica's admin work: retry later.
            LifecycleError::Busy { .. } => ErrorCode::Unavailable,
            LifecycleError::Backend(e) => crate::service::ServiceError::backend_code(e),
            LifecycleError::Store(e) => crate::service::ServiceError::store_code(e),
            LifecycleError::Audit(e) => e.code(),
        }
    }
}

type AdminState<B, S> = State<Arc<Api<B, S>>>;

/// `POST /admin/restore` with an audit export: the backup file as it is, and the audit
/// entries exported since it was made.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBundle<'a> {
    #[serde(borrow)]
    backup: &'a serde_json::value::RawValue,
    audit: Vec<kms_api::admin::AuditEntry>,
}

/// `r` as a JSON answer with `status`, or its error's.
fn reply<T: serde::Serialize>(
    route: &'static str,
    status: StatusCode,
    r: Result<T, LifecycleError>,
) -> Response {
    match r {
        Ok(v) => json_response(status, &v),
        Err(e) => error_response(&HttpError::Lifecycle(e), route),
    }
}

/// The admin routes that take backup-sized bodies ([`MAX_RESTORE_BODY`]).
pub fn large_body_routes<B: KeyBackend, S: KeyStore>() -> RouteTable<B, S> {
    vec![
        ("/admin/restore", post(restore::<B, S>)),
        ("/admin/import-copies", post(import_copies::<B, S>)),
    ]
}

/// Every other route of the admin endpoint (bodies up to 4 KiB).
pub fn admin_routes<B: KeyBackend, S: KeyStore>() -> RouteTable<B, S> {
    vec![
        ("/admin/backup", get(backup::<B, S>)),
        ("/admin/status", get(status::<B, S>)),
        ("/admin/kek/rotate", post(rotate::<B, S>)),
        ("/admin/kek/destroy", post(destroy::<B, S>)),
        ("/admin/verify", post(verify::<B, S>)),
        ("/admin/jobs", get(jobs::<B, S>)),
        ("/admin/jobs/{id}", get(job::<B, S>)),
        ("/admin/audit", get(audit_list::<B, S>)),
        ("/admin/audit/verify", post(audit_verify::<B, S>)),
        ("/admin/audit/compact", post(audit_compact::<B, S>)),
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz::<B, S>)),
        ("/metrics", get(metrics::<B, S>)),
    ]
}

/// The admin endpoint's router: the admin API, plus `/healthz`, `/readyz` and `/metrics`.
pub fn router<B: KeyBackend, S: KeyStore>(api: Arc<Api<B, S>>) -> Router {
    let routes = api.route_templates();
    let large =
        build(large_body_routes::<B, S>()).layer(RequestBodyLimitLayer::new(MAX_RESTORE_BODY));
    build(admin_routes::<B, S>())
        .layer(RequestBodyLimitLayer::new(MAX_ADMIN_BODY))
        .merge(large)
        .fallback(|| async { error_response(&HttpError::NotFound, UNKNOWN_ENDPOINT) })
        // After the merge, so the large-body routes answer a wrong method in JSON too.
        .method_not_allowed_fallback(move |uri: Uri| async move {
            error_response(&HttpError::MethodNotAllowed, routes.of_path(uri.path()).0)
        })
        .with_state(api)
}

async fn status<B: KeyBackend, S: KeyStore>(State(api): AdminState<B, S>) -> Response {
    let (c, state) = api.metrics().hsm();
    let hsm = HsmStatus {
        state: match state {
            BackendState::Ready => kms_api::admin::HsmState::Ready,
            BackendState::Recovering => kms_api::admin::HsmState::Recovering,
            BackendState::PinRejected => kms_api::admin::HsmState::PinRejected,
        },
        workers: c.workers as u64,
        sessions_open: u64::try_from(c.sessions_open).unwrap_or(0),
        calls: c.calls,
        errors: c.errors,
        recoveries: c.recoveries,
        resets: c.resets,
        overloaded: c.overloaded,
        token: api.metrics().token_capabilities().cloned(),
    };
    reply(
        "/admin/status",
        StatusCode::OK,
        api.lifecycle().status(hsm).await,
    )
}

async fn rotate<B: KeyBackend, S: KeyStore>(State(api): AdminState<B, S>) -> Response {
    tracing::info!("admin: KEK rotation requested");
    let r = api.lifecycle().rotate_kek().await;
    let r = r.map(|(job, started)| StartJobResponse { job, started });
    reply("/admin/kek/rotate", StatusCode::ACCEPTED, r)
}

async fn verify<B: KeyBackend, S: KeyStore>(State(api): AdminState<B, S>) -> Response {
    tracing::info!("admin: verification requested");
    let r = api.lifecycle().verify().await;
    let r = r.map(|(job, started)| StartJobResponse { job, started });
    reply("/admin/verify", StatusCode::ACCEPTED, r)
}

async fn destroy<B: KeyBackend, S: KeyStore>(
    State(api): AdminState<B, S>,
    req: axum::extract::Request,
) -> Response {
    const ROUTE: &str = "/admin/kek/destroy";
    let body = match read_body(req.into_body(), api.limits()).await {
        Ok(b) => b,
        Err(e) => return error_response(&e, ROUTE),
    };
    let parsed: DestroyKekRequest = match kms_api::parse::parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&HttpError::Parse(e), ROUTE),
    };
    tracing::info!(kek_version = %parsed.version, "admin: KEK destruction requested");
    let r = api.lifecycle().destroy_kek(parsed.version).await;
    let r = r.map(|()| DestroyKekResponse {
        version: parsed.version,
        destroyed: true,
    });
    reply(ROUTE, StatusCode::OK, r)
}

async fn jobs<B: KeyBackend, S: KeyStore>(State(api): AdminState<B, S>) -> Response {
    let r = api
        .lifecycle()
        .jobs()
        .await
        .map(|jobs| JobsResponse { jobs });
    reply("/admin/jobs", StatusCode::OK, r)
}

async fn job<B: KeyBackend, S: KeyStore>(
    State(api): AdminState<B, S>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    const ROUTE: &str = "/admin/jobs/{id}";
    // A path that is not UTF-8 is a bad id like any other (JSON error, not axum's text).
    let Some(Ok(id)) = id.ok().map(|Path(id)| JobId::parse(&id)) else {
        return error_response(
            &HttpError::InvalidArgument("job id: `job-` and 16 lowercase hex digits".into()),
            ROUTE,
        );
    };
    reply(ROUTE, StatusCode::OK, api.lifecycle().job(&id).await)
}

/// `GET /admin/audit?after=&limit=`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn audit_list<B: KeyBackend, S: KeyStore>(
    State(api): AdminState<B, S>,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    const ROUTE: &str = "/admin/audit";
    let Ok(axum::extract::Query(q)) = query else {
        return error_response(
            &HttpError::InvalidArgument("query: after and limit are non-negative integers".into()),
            ROUTE,
        );
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = match api
        .service()
        .store()
        .audit_range(q.after.unwrap_or(0), limit)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                &HttpError::Service(crate::service::ServiceError::Store(e)),
                ROUTE,
            )
        }
    };
    // An entry that cannot be decoded is skipped here; `audit verify` names it.
    let entries = rows
        .into_iter()
        .filter_map(|(_, b)| serde_json::from_slice(&b).ok())
        .collect();
    json_response(
        StatusCode::OK,
        &kms_api::admin::AuditListResponse { entries },
    )
}

/// `POST /admin/audit/compact` ([`crate::audit_archive`]).
async fn audit_compact<B: KeyBackend, S: KeyStore>(
    State(api): AdminState<B, S>,
    req: axum::extract::Request,
) -> Response {
    const ROUTE: &str = "/admin/audit/compact";
    let body = match read_body(req.into_body(), api.limits()).await {
        Ok(b) => b,
        Err(e) => return error_response(&e, ROUTE),
    };
    let r: kms_api::admin::AuditCompactRequest = match kms_api::parse::parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&HttpError::Parse(e), ROUTE),
    };
    tracing::info!(through = r.through, "admin: audit compaction requested");
    // Not while a restore reads the log, or a KEK destroy runs.
    let _exclusive = match api.lifecycle().admin_lock().await {
        Ok(g) => g,
        Err(e) => return error_response(&HttpError::Lifecycle(e), ROUTE),
    };
    match crate::audit_archive::compact(api.service(), r.through, &r.mac, &r.archive_sha256).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&HttpError::Compact(e), ROUTE),
    }
}

async fn audit_verify<B: KeyBackend, S: KeyStore>(State(api): AdminState<B, S>) -> Response {
    const ROUTE: &str = "/admin/audit/verify";
    let svc = api.service();
    match crate::audit::verify(&**svc.backend(), svc.store()).await {
        Ok(v) => {
            if let Some(p) = &v.problem {
                tracing::error!(kind = %p.kind, seq = p.seq, "audit log verification failed: {}", p.message);
            }
            json_response(StatusCode::OK, &v)
        }
        Err(e) => error_response(
            &HttpError::Service(crate::service::ServiceError::Audit(e)),
            ROUTE,
        ),
    }
}

async fn backup<B: KeyBackend, S: KeyStore>(State(api): AdminState<B, S>) -> Response {
    const ROUTE: &str = "/admin/backup";
    tracing::info!("admin: backup requested");
    match crate::backup::backup(api.service()).await {
        Ok(bytes) => {
            let mut r = Response::new(axum::body::Body::from(bytes));
            let h = r.headers_mut();
            h.insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            // Wrapped DEKs: no cache on the way keeps a copy.
            h.insert(
                axum::http::header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(e) => error_response(&HttpError::Backup(e), ROUTE),
    }
}

/// `POST /admin/restore?resurrect=KEY_ID&resurrect=...`.
async fn restore<B: KeyBackend, S: KeyStore>(
    State(api): AdminState<B, S>,
    req: axum::extract::Request,
) -> Response {
    const ROUTE: &str = "/admin/restore";
    let mut resurrect = std::collections::BTreeSet::new();
    let mut unchecked = false;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("resurrect", id) => match kms_api::KeyId::parse(id) {
                Ok(id) => {
                    resurrect.insert(id);
                }
                Err(_) => {
                    return error_response(
                        &HttpError::InvalidArgument("query: resurrect=<key id>".into()),
                        ROUTE,
                    )
                }
            },
            ("destroys", "unchecked") => unchecked = true,
            _ => {
                return error_response(
                    &HttpError::InvalidArgument(
                        "query: only resurrect=<key id> (repeated) and destroys=unchecked".into(),
                    ),
                    ROUTE,
                )
            }
        }
    }
    let mut limits = api.limits();
    // A large file over a local socket: give it time.
    limits.body_read_timeout = limits
        .body_read_timeout
        .max(std::time::Duration::from_secs(120));
    let body = match read_body(req.into_body(), limits).await {
        Ok(b) => b,
        Err(e) => return error_response(&e, ROUTE),
    };
    tracing::info!(
        bytes = body.len(),
        resurrect = resurrect.len(),
        "admin: restore requested"
    );
    // No KEK version is destroyed (on any replica) while records under it come back.
    let _exclusive = match api.lifecycle().admin_lock().await {
        Ok(g) => g,
        Err(e) => return error_response(&HttpError::Lifecycle(e), ROUTE),
    };
    // The body is a backup file, or `{"backup": <file>, "audit": [<entries>]}` with the audit
    // log exported since the backup.
    let (file, check) = match serde_json::from_slice::<RestoreBundle<'_>>(&body) {
        Ok(bundle) if !unchecked => (
            bundle.backup.get().as_bytes(),
            crate::backup::DestroyCheck::StoreOrExport(bundle.audit),
        ),
        Ok(_) => {
            return error_response(
                &HttpError::InvalidArgument(
                    "destroys=unchecked with an audit export: give one or the other".into(),
                ),
                ROUTE,
            )
        }
        Err(_) if unchecked => (body.as_ref(), crate::backup::DestroyCheck::Unchecked),
        Err(_) => (body.as_ref(), crate::backup::DestroyCheck::Store),
    };
    match crate::backup::restore(api.service(), file, &resurrect, check).await {
        Ok(report) => json_response(StatusCode::OK, &report),
        Err(e) => error_response(&HttpError::Backup(e), ROUTE),
    }
}

async fn import_copies<B: KeyBackend, S: KeyStore>(
    State(api): AdminState<B, S>,
    req: axum::extract::Request,
) -> Response {
    const ROUTE: &str = "/admin/import-copies";
    let mut limits = api.limits();
    limits.body_read_timeout = limits
        .body_read_timeout
        .max(std::time::Duration::from_secs(120));
    let body = match read_body(req.into_body(), limits).await {
        Ok(b) => b,
        Err(e) => return error_response(&e, ROUTE),
    };
    let parsed: kms_api::admin::ImportCopiesRequest = match kms_api::parse::parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error_response(&HttpError::Parse(e), ROUTE),
    };
    tracing::info!(
        copies = parsed.copies.len(),
        "admin: import of the server's key copies requested"
    );
    let _exclusive = match api.lifecycle().admin_lock().await {
        Ok(g) => g,
        Err(e) => return error_response(&HttpError::Lifecycle(e), ROUTE),
    };
    match crate::backup::import_copies(api.service(), parsed.copies).await {
        Ok(report) => json_response(StatusCode::OK, &report),
        Err(e) => error_response(&HttpError::Backup(e), ROUTE),
    }
}

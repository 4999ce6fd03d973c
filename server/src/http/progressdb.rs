//! ProgressDB's public HTTP API, served beside `/v1` so that ProgressDB's own SDKs (Python,
//! Node, TypeScript, React) work against this server unchanged. The handlers call the same
//! `MessageService` methods as `/v1`: authorization, limits and encryption are the
//! service's, and cannot drift between the two surfaces. What differs is only the shape:
//!
//! * Paths: `POST /backend/v1/sign`, `/frontend/v1/threads[/{threadKey}[/messages[/{id}]]]`,
//!   `GET /admin/health`, `GET /admin/stats`, the admin reads of a user's threads and
//!   messages (decrypted, never raw store values) and `encrypt-threads` (table in
//!   [`routes`]).
//! * Callers (`caller`): the key in `Authorization: Bearer` or `X-API-Key`. The frontend
//!   paths take a signed frontend user, or a backend key acting for one user (`X-User-ID`,
//!   else `?author=`), **scoped to that user** exactly as if it had signed in. Admin keys
//!   serve `/admin/*` only, and signing is for backend keys (ProgressDB's path rules).
//! * Answers (`views`): `{thread}` / `{message}` envelopes with `key`, `thread`, `author`,
//!   `created_ts` / `updated_ts` in unix nanoseconds; creates answer 202 with the new `key`
//!   (what the SDKs read) and the stored item, updates 200, deletes 204; lists carry
//!   ProgressDB's `pagination` (`before_anchor`, `after_anchor`, `has_before`, `has_after`,
//!   `count`, `total`). Every write is durable before its answer.
//! * Errors: `{"error": "<message>", "code": "<code>"}` with the same codes and statuses as
//!   `/v1` ([`crate::error::ErrorCode`]).
//!
//! docs/progressdb-compat.md says what is served, each choice where ProgressDB's document,
//! SDKs and server disagree, and each deliberate difference.

mod caller;
mod handlers;
mod views;

use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use serde::Serialize;

use super::answer::error_answer;
use super::state::RouterState;
use crate::error::ApiError;
use handlers::*;

/// Every ProgressDB path served, as (path, handlers).
pub fn routes() -> Vec<(&'static str, MethodRouter<RouterState>)> {
    vec![
        ("/backend/v1/sign", post(sign)),
        (
            "/frontend/v1/threads",
            get(list_threads).post(create_thread),
        ),
        (
            "/frontend/v1/threads/{threadKey}",
            get(get_thread).put(update_thread).delete(delete_thread),
        ),
        (
            "/frontend/v1/threads/{threadKey}/messages",
            get(list_messages).post(create_message),
        ),
        (
            "/frontend/v1/threads/{threadKey}/messages/{id}",
            get(get_message).put(update_message).delete(delete_message),
        ),
        ("/admin/health", get(admin_health)),
        ("/admin/stats", get(admin_stats)),
        ("/admin/users", get(admin_users)),
        ("/admin/users/{userId}/threads", get(admin_user_threads)),
        (
            "/admin/users/{userId}/threads/{threadKey}/messages",
            get(admin_user_messages),
        ),
        (
            "/admin/users/{userId}/threads/{threadKey}/messages/{messageKey}",
            get(admin_user_message),
        ),
        (
            "/admin/encryption/encrypt-threads",
            post(admin_encrypt_threads),
        ),
    ]
}

/// The paths of [`routes`].
pub fn paths() -> Vec<&'static str> {
    routes().into_iter().map(|(p, _)| p).collect()
}

/// Whether `path` belongs to ProgressDB's API (its errors take ProgressDB's shape): anything
/// under `/frontend/` or `/backend/`, and the `/admin` paths of [`routes`].
pub fn owns(path: &str) -> bool {
    static ADMIN: std::sync::LazyLock<service_kit::routes::Templates<()>> =
        std::sync::LazyLock::new(|| {
            service_kit::routes::Templates::new(
                paths()
                    .into_iter()
                    .filter(|p| p.starts_with("/admin/"))
                    .map(|p| (p, ())),
            )
        });
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    ["/frontend", "/backend"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
        || ADMIN.of(path).is_some()
}

/// An error answered in ProgressDB's shape.
#[derive(Debug)]
pub struct PdbError(pub ApiError);

impl From<ApiError> for PdbError {
    fn from(e: ApiError) -> Self {
        PdbError(e)
    }
}

/// `{"error": "<message>", "code": "<code>"}`: the message is what ProgressDB's SDKs show
/// (they throw `error` as the exception's text).
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
    code: &'static str,
}

/// The answer to `e` on a ProgressDB path.
pub fn error_response(e: &ApiError) -> Response {
    error_answer(
        e,
        &ErrorBody {
            error: e.to_string(),
            code: e.code().as_str(),
        },
    )
}

impl IntoResponse for PdbError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

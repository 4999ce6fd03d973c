//! The server's own API (`/v1`, the probes, `/metrics` and its `/admin` routes): its route
//! table, its extractors (`extract`) and handlers (`handlers`). Errors take the `/v1`
//! shape, `{"error": {"code", "message"}}` ([`super::answer::error_response`]).

mod extract;
mod handlers;
pub use extract::*;
use handlers::*;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{HeaderValue, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use kms_api::ThreadId;
use serde::{Deserialize, Serialize};

use super::answer::{json_response, with_type};
use super::request::{parse_limit, JsonBody};
use super::state::RouterState;
use crate::api::{
    CreateThreadBody, KmsVisibility, MessageBody, MessageList, PatchThreadBody, ReadyView,
    SignBody, SignView, ThreadList, ThreadView,
};
use crate::auth::{Principal, Role};
use crate::config::MetricsAccess;
use crate::error::ApiError;
use crate::ids::{MessageId, Timestamp};
use crate::service::Health;
use crate::store::Order;

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

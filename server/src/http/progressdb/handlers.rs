//! The handlers of the ProgressDB paths: each reads its caller, keys and body, calls the
//! same [`MessageService`](crate::service::MessageService) method as its `/v1` twin, and
//! answers in ProgressDB's shape.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use kms_api::ThreadId;
use serde::Deserialize;

use super::caller::{AdminCaller, BackendCaller, MessageKey, ThreadKey, UserCaller};
use super::views::{self, MessageEnvelope, Pagination, ThreadEnvelope, ThreadList};
use super::PdbError;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::answer::json_response;
use crate::http::request::JsonBody;
use crate::http::state::RouterState;
use crate::ids::{MessageId, UserId};
use crate::service::ThreadMatch;
use crate::store::{Tombstones, Window};

type Answer = Result<Response, PdbError>;

fn answer<T: serde::Serialize>(status: StatusCode, v: &T) -> Answer {
    Ok(json_response(status, v))
}

fn no_content() -> Answer {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

/// The query of both listings, as strings: each value is checked here with its own message.
/// No `Debug`: the title filter is content.
#[derive(Default, Deserialize)]
pub(super) struct ListQuery {
    limit: Option<String>,
    before: Option<String>,
    after: Option<String>,
    anchor: Option<String>,
    sort_by: Option<String>,
    title: Option<String>,
    slug: Option<String>,
    include_deleted: Option<String>,
}

/// Which cursor a listing was given.
enum Cursor<'a> {
    None,
    Before(&'a str),
    After(&'a str),
    Anchor(&'a str),
}

/// How a thread page is ordered (newest first either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortBy {
    Created,
    Updated,
}

impl ListQuery {
    fn from(q: Result<Query<ListQuery>, QueryRejection>) -> Result<Self, ApiError> {
        let q = q
            .map(|Query(q)| q)
            .map_err(|_| ApiError::invalid("invalid query string"))?;
        q.tombstones()?;
        Ok(q)
    }

    /// `include_deleted`: whether deleted messages' tombstones are listed.
    fn tombstones(&self) -> Result<Tombstones, ApiError> {
        match self.include_deleted.as_deref() {
            None | Some("false" | "0") => Ok(Tombstones::Hide),
            Some("true" | "1") => Ok(Tombstones::Show),
            Some(_) => Err(ApiError::invalid("include_deleted must be true or false")),
        }
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        crate::http::request::parse_limit(self.limit.as_deref())
    }

    fn cursor(&self) -> Result<Cursor<'_>, ApiError> {
        fn given(v: &Option<String>) -> Option<&str> {
            v.as_deref().filter(|c| !c.is_empty())
        }
        match (given(&self.before), given(&self.after), given(&self.anchor)) {
            (None, None, None) => Ok(Cursor::None),
            (Some(b), None, None) => Ok(Cursor::Before(b)),
            (None, Some(a), None) => Ok(Cursor::After(a)),
            (None, None, Some(k)) => Ok(Cursor::Anchor(k)),
            _ => Err(ApiError::invalid(
                "only one of anchor, before, after can be specified",
            )),
        }
    }

    fn sort_by(&self) -> Result<SortBy, ApiError> {
        match self.sort_by.as_deref() {
            None | Some("created_ts") => Ok(SortBy::Created),
            Some("updated_ts") => Ok(SortBy::Updated),
            Some(_) => Err(ApiError::invalid(
                "sort_by must be 'created_ts' or 'updated_ts'",
            )),
        }
    }
}

fn thread_cursor(c: &str) -> Result<ThreadId, ApiError> {
    ThreadId::parse(c).map_err(|_| ApiError::invalid("invalid cursor: not a thread key"))
}

fn message_cursor(c: &str) -> Result<MessageId, ApiError> {
    MessageId::parse(c).map_err(|_| ApiError::invalid("invalid cursor: not a message key"))
}

// ---- threads ----

pub(super) async fn create_thread(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    b: Result<JsonBody<views::CreateThread>, ApiError>,
) -> Answer {
    let JsonBody(b) = b?;
    let t = st.service.create_thread(&p, b.title, b.slug, None).await?;
    answer(
        StatusCode::ACCEPTED,
        &ThreadEnvelope {
            key: Some(&t.id),
            thread: views::Thread::of(&t),
        },
    )
}

/// Threads newest first: `after` continues to older threads, `before` to newer ones.
pub(super) async fn list_threads(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    threads_page(&st, &p, ListQuery::from(q)?, Audience::User).await
}

/// Who a listing is shown to: admin reads also show each thread's `kms` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    User,
    Admin,
}

/// A page of `p`'s threads as `q` asks.
async fn threads_page(st: &RouterState, p: &Principal, q: ListQuery, to: Audience) -> Answer {
    let window = match q.cursor()? {
        Cursor::None => Window::Latest,
        Cursor::After(c) => Window::Older(thread_cursor(c)?),
        Cursor::Before(c) => Window::Newer(thread_cursor(c)?),
        Cursor::Anchor(c) => Window::Around(thread_cursor(c)?),
    };
    let sort = q.sort_by()?;
    let filter = ThreadMatch::new(q.title.as_deref(), q.slug.as_deref());
    let page = st
        .service
        .thread_window(p, window, q.limit()?, &filter)
        .await?;
    // The anchors are the page's edges in creation order (what the cursors page by), taken
    // before any re-sorting of the page.
    let mut items: Vec<_> = page.items.iter().rev().collect();
    let pagination = Pagination::new(
        items.first().map(|t| t.id.to_string()),
        items.last().map(|t| t.id.to_string()),
        page.newer,
        page.older,
        items.len(),
        page.total,
    );
    if sort == SortBy::Updated {
        items.sort_by_key(|t| std::cmp::Reverse(t.updated_at));
    }
    answer(
        StatusCode::OK,
        &ThreadList {
            threads: items
                .into_iter()
                .map(|t| match to {
                    Audience::User => views::Thread::of(t),
                    Audience::Admin => views::Thread::for_admin(t),
                })
                .collect(),
            pagination,
        },
    )
}

pub(super) async fn get_thread(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    ThreadKey(id): ThreadKey,
) -> Answer {
    let t = st.service.thread_for(&p, &id).await?;
    answer(
        StatusCode::OK,
        &ThreadEnvelope {
            key: None,
            thread: views::Thread::of(&t),
        },
    )
}

pub(super) async fn update_thread(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    ThreadKey(id): ThreadKey,
    b: Result<JsonBody<views::UpdateThread>, ApiError>,
) -> Answer {
    let JsonBody(b) = b?;
    let t = st
        .service
        .patch_thread(&p, &id, b.title, b.slug, None)
        .await?;
    answer(
        StatusCode::OK,
        &ThreadEnvelope {
            key: Some(&t.id),
            thread: views::Thread::of(&t),
        },
    )
}

/// Deletes the thread, its messages and its keys (crypto-shredded at the KMS).
pub(super) async fn delete_thread(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    ThreadKey(id): ThreadKey,
) -> Answer {
    st.service.delete_thread(&p, &id).await?;
    no_content()
}

// ---- messages ----

pub(super) async fn create_message(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    ThreadKey(tid): ThreadKey,
    b: Result<JsonBody<views::MessageBody>, ApiError>,
) -> Answer {
    let JsonBody(b) = b?;
    let (body, attrs) = b.into_new()?;
    let m = st.service.post_message(&p, &tid, body, attrs).await?;
    answer(
        StatusCode::ACCEPTED,
        &MessageEnvelope {
            key: Some(m.id),
            message: views::Message::of(&m),
        },
    )
}

/// Messages in time order (oldest first); the first page is the newest window. `before`
/// continues to older messages, `after` to newer ones.
pub(super) async fn list_messages(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    ThreadKey(tid): ThreadKey,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    messages_page(&st, &p, &tid, ListQuery::from(q)?).await
}

/// A page of thread `tid`'s messages as `q` asks, for `p`.
async fn messages_page(st: &RouterState, p: &Principal, tid: &ThreadId, q: ListQuery) -> Answer {
    // Validated as ProgressDB does; message pages are in time order either way.
    q.sort_by()?;
    let window = match q.cursor()? {
        Cursor::None => Window::Latest,
        Cursor::Before(c) => Window::Older(message_cursor(c)?),
        Cursor::After(c) => Window::Newer(message_cursor(c)?),
        Cursor::Anchor(c) => Window::Around(message_cursor(c)?),
    };
    let page = st
        .service
        .message_window(p, tid, window, q.limit()?, q.tombstones()?)
        .await?;
    answer(StatusCode::OK, &views::message_list(tid, &page))
}

pub(super) async fn get_message(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    MessageKey(tid, mid): MessageKey,
) -> Answer {
    let m = st.service.get_message(&p, &tid, mid).await?;
    answer(
        StatusCode::OK,
        &MessageEnvelope {
            key: None,
            message: views::Message::of(&m),
        },
    )
}

pub(super) async fn update_message(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    MessageKey(tid, mid): MessageKey,
    b: Result<JsonBody<views::MessageBody>, ApiError>,
) -> Answer {
    let JsonBody(b) = b?;
    let m = st
        .service
        .update_message(&p, &tid, mid, b.into_edit()?)
        .await?;
    answer(
        StatusCode::OK,
        &MessageEnvelope {
            key: Some(m.id),
            message: views::Message::of(&m),
        },
    )
}

pub(super) async fn delete_message(
    State(st): State<RouterState>,
    UserCaller(p): UserCaller,
    MessageKey(tid, mid): MessageKey,
) -> Answer {
    st.service.delete_message(&p, &tid, mid).await?;
    no_content()
}

// ---- backend and admin ----

/// `{"userId"}` → `{"userId", "signature"}`: the same signature as `POST /v1/sign`.
pub(super) async fn sign(
    State(st): State<RouterState>,
    BackendCaller(p): BackendCaller,
    b: Result<JsonBody<views::SignBody>, ApiError>,
) -> Answer {
    let JsonBody(b) = b?;
    let (user_id, signature, _) = st.service.sign(&p, &b.user_id, None)?;
    answer(StatusCode::OK, &views::Signed { user_id, signature })
}

pub(super) async fn admin_health(AdminCaller(_): AdminCaller) -> Answer {
    answer(
        StatusCode::OK,
        &serde_json::json!({"status": "ok", "service": "progressdb"}),
    )
}

/// How many threads and messages the store holds (one pass over the store).
pub(super) async fn admin_stats(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
) -> Answer {
    let (threads, messages) = st.service.stats(&p).await?;
    answer(
        StatusCode::OK,
        &serde_json::json!({"threads": threads, "messages": messages}),
    )
}

/// `{userId}` of an admin path.
fn user_of(raw: &str) -> Result<UserId, ApiError> {
    UserId::parse(raw).map_err(|e| ApiError::invalid(format!("userId: {e}")))
}

type PathOf<T> = Result<Path<T>, PathRejection>;

fn path<T>(p: PathOf<T>) -> Result<T, ApiError> {
    p.map(|Path(t)| t).map_err(|_| ApiError::NotFound)
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct UsersQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// `{"users": [...], "pagination"}`: users who have threads, in store order; `after`
/// continues from `after_anchor`.
pub(super) async fn admin_users(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
    q: Result<Query<UsersQuery>, QueryRejection>,
) -> Answer {
    let Query(q) = q.map_err(|_| ApiError::invalid("invalid query string"))?;
    let limit = ListQuery {
        limit: q.limit,
        ..ListQuery::default()
    }
    .limit()?;
    let (page, total) = st.service.users(&p, q.after.as_deref(), limit).await?;
    let key = |u: &UserId| u.as_str().to_owned();
    let pagination = Pagination::new(
        page.items.first().map(key),
        page.items.last().map(key),
        q.after.as_deref().is_some_and(|a| !a.is_empty()),
        page.more,
        page.items.len(),
        total,
    );
    answer(
        StatusCode::OK,
        &serde_json::json!({ "users": page.items, "pagination": pagination }),
    )
}

/// One user's threads, paged as the user would page them, with their `kms` blocks.
pub(super) async fn admin_user_threads(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
    user: PathOf<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let user = user_of(&path(user)?)?;
    threads_page(
        &st,
        &p.scoped_to(user),
        ListQuery::from(q)?,
        Audience::Admin,
    )
    .await
}

/// One of a user's threads' messages, decrypted, paged as the user would page them.
pub(super) async fn admin_user_messages(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
    keys: PathOf<(String, String)>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let (user, t) = path(keys)?;
    let tid = ThreadId::parse(&t).map_err(|_| ApiError::NotFound)?;
    messages_page(
        &st,
        &p.scoped_to(user_of(&user)?),
        &tid,
        ListQuery::from(q)?,
    )
    .await
}

/// One message of a user's thread, decrypted (never the stored record).
pub(super) async fn admin_user_message(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
    keys: PathOf<(String, String, String)>,
) -> Answer {
    let (user, t, m) = path(keys)?;
    let tid = ThreadId::parse(&t).map_err(|_| ApiError::NotFound)?;
    let mid = MessageId::parse(&m).map_err(|_| ApiError::NotFound)?;
    let msg = st
        .service
        .get_message(&p.scoped_to(user_of(&user)?), &tid, mid)
        .await?;
    answer(
        StatusCode::OK,
        &MessageEnvelope {
            key: None,
            message: views::Message::of(&msg),
        },
    )
}

/// Starts the encryption job of every thread stored without a key: `{"summary": {total,
/// success, skipped, errors}, "results": [{thread_key, status, job_id | error}]}`. The jobs
/// run in the background (`GET /admin/jobs/{job_id}`); `success` counts jobs started.
pub(super) async fn admin_encrypt_threads(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
    b: Result<JsonBody<serde_json::Value>, ApiError>,
) -> Answer {
    b?;
    let outcomes = st.service.encrypt_plain_threads(&p).await?;
    let (mut success, mut skipped, mut errors) = (0u64, 0u64, 0u64);
    let results: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|(t, r)| match r {
            Ok(Some(job)) => {
                success += 1;
                serde_json::json!({"thread_key": t, "status": "ok", "job_id": job.id})
            }
            Ok(None) => {
                skipped += 1;
                serde_json::json!({"thread_key": t, "status": "skipped", "error": "already encrypted"})
            }
            Err(e) => {
                errors += 1;
                serde_json::json!({"thread_key": t, "status": "error", "error": e.to_string(), "code": e.code().as_str()})
            }
        })
        .collect();
    answer(
        StatusCode::OK,
        &serde_json::json!({
            "summary": {"total": outcomes.len(), "success": success, "skipped": skipped, "errors": errors},
            "results": results,
        }),
    )
}

//! Who calls a ProgressDB path, by ProgressDB's rules, and the keys in its path.
//!
//! * [`UserCaller`] (the frontend paths): a signed frontend user, or a backend key acting for
//!   one user — `X-User-ID`, else `?author=` — narrowed to that user
//!   ([`Principal::scoped_to`]): it lists, reads, edits and deletes only that user's threads
//!   and messages, exactly as the user would. A backend key naming no user is 400; a signed
//!   user may repeat its own id in `?author=` but not name another (403). Admin keys are
//!   refused here (403): ProgressDB serves them `/admin/*` only.
//! * [`AdminCaller`]: admin keys only. [`BackendCaller`]: backend keys only (signing).
//! * [`ThreadKey`], [`MessageKey`]: the percent-decoded path keys; a key that cannot name a
//!   thread or message is 404, as no such item exists.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use kms_api::ThreadId;
use serde::Deserialize;

use super::PdbError;
use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::http::state::RouterState;
use crate::ids::{MessageId, UserId};

/// A caller of the frontend paths, acting for exactly one user.
#[derive(Debug)]
pub(super) struct UserCaller(pub Principal);

#[derive(Debug, Default, Deserialize)]
struct AuthorQuery {
    author: Option<String>,
}

impl FromRequestParts<RouterState> for UserCaller {
    type Rejection = PdbError;

    async fn from_request_parts(parts: &mut Parts, st: &RouterState) -> Result<Self, PdbError> {
        let p = st.service.authenticate(&parts.headers)?;
        let author = match Query::<AuthorQuery>::try_from_uri(&parts.uri) {
            Ok(Query(q)) => q.author.filter(|a| !a.is_empty()),
            Err(_) => return Err(ApiError::invalid("invalid query string").into()),
        };
        match p.role {
            Role::Admin => Err(ApiError::Forbidden.into()),
            Role::Frontend => {
                // The signed id is the user; `author` may only repeat it.
                if author.is_some_and(|a| p.user.as_ref().map(UserId::as_str) != Some(&a)) {
                    return Err(ApiError::Forbidden.into());
                }
                Ok(UserCaller(p))
            }
            Role::Backend => {
                let user = match (&p.user, author) {
                    (Some(u), _) => u.clone(),
                    (None, Some(a)) => UserId::parse(&a)
                        .map_err(|e| ApiError::invalid(format!("author: {e}")))?,
                    (None, None) => {
                        return Err(ApiError::invalid(
                            "X-User-ID (or ?author=) is required: a backend key acts for one user on these paths",
                        )
                        .into())
                    }
                };
                Ok(UserCaller(p.scoped_to(user)))
            }
        }
    }
}

/// An admin caller; any other key is 403.
#[derive(Debug)]
pub(super) struct AdminCaller(pub Principal);

impl FromRequestParts<RouterState> for AdminCaller {
    type Rejection = PdbError;

    async fn from_request_parts(parts: &mut Parts, st: &RouterState) -> Result<Self, PdbError> {
        let p = st.service.authenticate(&parts.headers)?;
        match p.role {
            Role::Admin => Ok(AdminCaller(p)),
            Role::Backend | Role::Frontend => Err(ApiError::Forbidden.into()),
        }
    }
}

/// A backend caller; any other key is 403.
#[derive(Debug)]
pub(super) struct BackendCaller(pub Principal);

impl FromRequestParts<RouterState> for BackendCaller {
    type Rejection = PdbError;

    async fn from_request_parts(parts: &mut Parts, st: &RouterState) -> Result<Self, PdbError> {
        let p = st.service.authenticate(&parts.headers)?;
        match p.role {
            Role::Backend => Ok(BackendCaller(p)),
            Role::Admin | Role::Frontend => Err(ApiError::Forbidden.into()),
        }
    }
}

/// `{threadKey}`.
#[derive(Debug)]
pub(super) struct ThreadKey(pub ThreadId);

impl<S: Send + Sync> FromRequestParts<S> for ThreadKey {
    type Rejection = PdbError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, PdbError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(|_| ApiError::NotFound)?;
        Ok(ThreadKey(
            ThreadId::parse(&raw).map_err(|_| ApiError::NotFound)?,
        ))
    }
}

/// `{threadKey}/messages/{id}`.
#[derive(Debug)]
pub(super) struct MessageKey(pub ThreadId, pub MessageId);

impl<S: Send + Sync> FromRequestParts<S> for MessageKey {
    type Rejection = PdbError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, PdbError> {
        let Path((t, m)) = Path::<(String, String)>::from_request_parts(parts, st)
            .await
            .map_err(|_| ApiError::NotFound)?;
        let t = ThreadId::parse(&t).map_err(|_| ApiError::NotFound)?;
        let m = MessageId::parse(&m).map_err(|_| ApiError::NotFound)?;
        Ok(MessageKey(t, m))
    }
}

//! The extractors the handlers take: the authenticated caller (any role, or an admin), the
//! thread and message ids of the path, the list query, and the JSON body read within the
//! body limit and deadline.

use super::*;

// ---- extractors ----

/// The authenticated caller (`Authorization: Bearer`, and the user headers).
#[derive(Debug)]
pub struct Caller(pub(super) Principal);

impl FromRequestParts<RouterState> for Caller {
    type Rejection = ApiError;

    /// Authenticates, then counts the request against its API key's rate.
    async fn from_request_parts(parts: &mut Parts, st: &RouterState) -> Result<Self, ApiError> {
        Ok(Caller(st.service.authenticate(&parts.headers)?))
    }
}

/// An admin caller; any other valid key is 403.
#[derive(Debug)]
pub struct AdminCaller(pub(super) Principal);

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
pub struct ThreadPath(pub(super) ThreadId);

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
pub struct MessagePath(pub(super) ThreadId, pub(super) MessageId);

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
    pub(super) limit: Option<String>,
    pub(super) cursor: Option<String>,
    pub(super) order: Option<String>,
}

impl ListQuery {
    pub(super) fn from(q: Result<Query<ListQuery>, QueryRejection>) -> Result<Self, ApiError> {
        q.map(|Query(q)| q)
            .map_err(|_| ApiError::invalid("invalid query string"))
    }

    pub(super) fn limit(&self) -> Result<Option<usize>, ApiError> {
        parse_limit(self.limit.as_deref())
    }

    pub(super) fn order(&self) -> Result<Order, ApiError> {
        match self.order.as_deref() {
            None | Some("asc") => Ok(Order::Asc),
            Some("desc") => Ok(Order::Desc),
            Some(_) => Err(ApiError::invalid("order must be asc or desc")),
        }
    }

    pub(super) fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref().filter(|c| !c.is_empty())
    }
}

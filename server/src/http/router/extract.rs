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

/// A JSON request body, read within the body-limit layer and the body deadline into zeroizing
/// memory (message bodies are secret) and parsed into `T`. Failures are 413
/// `payload_too_large`, 408 `request_timeout` or 400 `malformed_request` with the category
/// and position of a JSON error, never serde's text (it can quote the request).
pub struct JsonBody<T>(pub(in crate::http) T);

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

/// A listing's `limit` query value (both APIs): a non-negative integer; the service bounds it.
pub(in crate::http) fn parse_limit(l: Option<&str>) -> Result<Option<usize>, ApiError> {
    l.map(|l| {
        l.parse::<usize>()
            .map_err(|_| ApiError::invalid("limit must be a positive integer"))
    })
    .transpose()
}

//! The handlers of every route of the server's API: each parses what its extractors give it,
//! calls the service, and answers in JSON.

use super::*;

pub(super) fn view_kms(p: &Principal) -> KmsVisibility {
    match p.role {
        Role::Admin => KmsVisibility::Shown,
        Role::Backend | Role::Frontend => KmsVisibility::Hidden,
    }
}

pub(super) type Answer = Result<Response, ApiError>;

pub(super) fn ok<T: Serialize>(v: &T) -> Answer {
    Ok(json_response(StatusCode::OK, v))
}

// ---- handlers ----

pub(super) async fn healthz() -> Answer {
    ok(&serde_json::json!({"status": "ok"}))
}

pub(super) async fn readyz(State(st): State<RouterState>) -> Answer {
    let (store, kms) = st.service.readiness().await;
    let ready = store == Health::Ok && kms != Health::Unavailable;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(
        status,
        &ReadyView {
            status: if ready { "ok" } else { "unavailable" },
            version: env!("CARGO_PKG_VERSION"),
            ready,
            store: store.as_str(),
            kms: kms.as_str(),
            alerts: service_kit::alerts::current(),
        },
    ))
}

pub(super) async fn metrics(
    State(st): State<RouterState>,
    headers: axum::http::HeaderMap,
) -> Answer {
    match st.opts.metrics_access {
        MetricsAccess::Public => {}
        MetricsAccess::Admin => {
            // Not rate-limited: scrapes must not be refused under load.
            let p = st.service.authenticate(&headers)?;
            if p.role != Role::Admin {
                return Err(ApiError::Forbidden);
            }
        }
    }
    Ok(with_type(
        StatusCode::OK,
        Body::from(st.service.metrics().encode()),
        service_kit::metrics::CONTENT_TYPE,
    ))
}

pub(super) async fn create_thread(
    State(st): State<RouterState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<CreateThreadBody>,
) -> Answer {
    let t = st
        .service
        .create_thread(&p, b.title, b.slug, b.metadata)
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &ThreadView::new(&t, view_kms(&p)),
    ))
}

pub(super) async fn list_threads(
    State(st): State<RouterState>,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let q = ListQuery::from(q)?;
    let page = st.service.list_threads(&p, q.cursor(), q.limit()?).await?;
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

pub(super) async fn get_thread(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    Caller(p): Caller,
) -> Answer {
    let t = st.service.thread_for(&p, &id).await?;
    ok(&ThreadView::new(&t, view_kms(&p)))
}

pub(super) async fn patch_thread(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    Caller(p): Caller,
    JsonBody(b): JsonBody<PatchThreadBody>,
) -> Answer {
    let t = st
        .service
        .patch_thread(&p, &id, b.title, b.slug, b.metadata)
        .await?;
    ok(&ThreadView::new(&t, view_kms(&p)))
}

pub(super) async fn delete_thread(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    Caller(p): Caller,
) -> Answer {
    let t = st.service.delete_thread(&p, &id).await?;
    ok(&ThreadView::new(&t, view_kms(&p)))
}

pub(super) async fn post_message(
    State(st): State<RouterState>,
    ThreadPath(tid): ThreadPath,
    Caller(p): Caller,
    JsonBody(b): JsonBody<MessageBody>,
) -> Answer {
    let attrs = b.attrs()?;
    let m = st.service.post_message(&p, &tid, b.body, attrs).await?;
    Ok(json_response(StatusCode::CREATED, &m))
}

pub(super) async fn list_messages(
    State(st): State<RouterState>,
    ThreadPath(tid): ThreadPath,
    Caller(p): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let q = ListQuery::from(q)?;
    let (messages, next_cursor) = st
        .service
        .list_messages(&p, &tid, q.order()?, q.cursor(), q.limit()?)
        .await?;
    ok(&MessageList {
        messages,
        next_cursor,
    })
}

pub(super) async fn get_message(
    State(st): State<RouterState>,
    MessagePath(tid, mid): MessagePath,
    Caller(p): Caller,
) -> Answer {
    ok(&st.service.get_message(&p, &tid, mid).await?)
}

pub(super) async fn put_message(
    State(st): State<RouterState>,
    MessagePath(tid, mid): MessagePath,
    Caller(p): Caller,
    JsonBody(b): JsonBody<MessageBody>,
) -> Answer {
    b.edit_only()?;
    ok(&st.service.update_message(&p, &tid, mid, b.body).await?)
}

pub(super) async fn delete_message(
    State(st): State<RouterState>,
    MessagePath(tid, mid): MessagePath,
    Caller(p): Caller,
) -> Answer {
    ok(&st.service.delete_message(&p, &tid, mid).await?)
}

pub(super) async fn sign(
    State(st): State<RouterState>,
    Caller(p): Caller,
    JsonBody(b): JsonBody<SignBody>,
) -> Answer {
    if p.role == Role::Frontend {
        return Err(ApiError::Forbidden);
    }
    let (user_id, signature, expires) = st.service.sign(&p, &b.user_id, b.expires_in_secs)?;
    ok(&SignView {
        user_id,
        signature,
        expires_at: expires
            .map(|e| Timestamp::from_nanos(e.saturating_mul(1_000_000_000)).to_rfc3339()),
    })
}

pub(super) async fn revoke_signatures(
    State(st): State<RouterState>,
    Caller(p): Caller,
    Path(user_id): Path<String>,
) -> Answer {
    let (user_id, generation) = st.service.revoke_signatures(&p, &user_id).await?;
    ok(&crate::api::RevokeView {
        user_id,
        signature_generation: generation,
    })
}

pub(super) async fn thread_kms(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    AdminCaller(p): AdminCaller,
) -> Answer {
    ok(&st.service.thread_kms(&p, &id).await?)
}

pub(super) async fn rotate_dek(st: State<RouterState>, id: ThreadPath, p: AdminCaller) -> Answer {
    start_job(st, id, p, crate::store::JobKind::RotateDek).await
}

pub(super) async fn encrypt_thread(
    st: State<RouterState>,
    id: ThreadPath,
    p: AdminCaller,
) -> Answer {
    start_job(st, id, p, crate::store::JobKind::EncryptThread).await
}

/// 202 `{job_id, started, job}`: the job `kind` on thread `id`, started or already running.
pub(super) async fn start_job(
    State(st): State<RouterState>,
    ThreadPath(id): ThreadPath,
    AdminCaller(p): AdminCaller,
    kind: crate::store::JobKind,
) -> Answer {
    let (job, started) = st.service.start_job(&p, &id, kind).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({"job_id": job.id, "started": started, "job": job}),
    ))
}

pub(super) async fn admin_job(
    State(st): State<RouterState>,
    AdminCaller(_): AdminCaller,
    job_id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Answer {
    // A path that is not UTF-8 is a bad id like any other (JSON error, not axum's text).
    let id = job_id
        .ok()
        .and_then(|axum::extract::Path(j)| kms_api::admin::JobId::parse(&j).ok())
        .ok_or_else(|| ApiError::invalid("job id: `job-` and 16 lowercase hex digits"))?;
    let job = st.service.job(&id).await?;
    ok(&job)
}

pub(super) async fn refresh_copies(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
) -> Answer {
    let (checked, refreshed, missing) = st.service.refresh_key_copies(&p).await?;
    ok(&serde_json::json!({"checked": checked, "refreshed": refreshed, "missing": missing}))
}

/// Every thread's copy of its key (and a rotation's retiring key), for
/// `progressdb-kms import-copies` when the KMS lost records.
pub(super) async fn key_copies(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
) -> Answer {
    ok(&serde_json::json!({ "copies": st.service.key_copies(&p).await? }))
}

pub(super) async fn admin_jobs(
    State(st): State<RouterState>,
    AdminCaller(_): AdminCaller,
) -> Answer {
    let jobs = st.service.jobs().await?;
    ok(&serde_json::json!({ "jobs": jobs }))
}

/// `POST /admin/backup`: the backup file (`crate::backup`), streamed as it is read from its
/// temporary copy, which is removed once sent.
pub(super) async fn backup(State(st): State<RouterState>, AdminCaller(p): AdminCaller) -> Answer {
    let (snap, permit) = st.service.backup(&p).await?;
    let header = snap.header().map_err(|_| ApiError::Internal)?;
    let file = tokio::fs::File::open(snap.data_path()).await.map_err(|e| {
        tracing::error!(error = %e, "cannot read the backup's copy");
        ApiError::Internal
    })?;
    let reader = Held {
        inner: tokio::io::AsyncReadExt::chain(std::io::Cursor::new(header), file),
        _keep: (snap.into_dir(), permit),
    };
    let mut r = Response::new(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20),
    ));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(r)
}

/// A reader that keeps `_keep` (the backup's temporary directory and its permit) until the
/// answer is sent or dropped.
struct Held<R, K> {
    inner: R,
    _keep: K,
}

impl<R: tokio::io::AsyncRead + Unpin, K: Unpin> tokio::io::AsyncRead for Held<R, K> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// `POST /admin/verify` `{"after"?, "limit"?, "sample"?}`: a page of threads checked (keys at
/// the KMS, messages opening); `next` continues.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyBody {
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    sample: Option<u64>,
}

pub(super) async fn verify(
    State(st): State<RouterState>,
    AdminCaller(p): AdminCaller,
    JsonBody(b): JsonBody<VerifyBody>,
) -> Answer {
    let after = b
        .after
        .filter(|a| !a.is_empty())
        .map(|a| ThreadId::parse(&a).map_err(|_| ApiError::invalid("after: not a thread id")))
        .transpose()?;
    let (threads, next) = st
        .service
        .verify_threads(&p, after, b.limit.unwrap_or(100), b.sample.unwrap_or(1))
        .await?;
    ok(&serde_json::json!({ "threads": threads, "next": next }))
}

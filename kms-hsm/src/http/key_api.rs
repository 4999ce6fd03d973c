//! The key API's handlers (and the probes both endpoints serve): each parses its body into
//! a typed request, calls the service and answers JSON; failures become [`Failure`]s that
//! answer with the one error mapping.

use super::*;

/// An error answer for endpoint `label` (the `IntoResponse` of the handlers).
pub(super) struct Failure(HttpError, &'static str);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error_response(&self.0, self.1)
    }
}

pub(super) type Answer = Result<Response, Failure>;

pub(super) fn fail(route: Route) -> impl Fn(HttpError) -> Failure {
    move |e| Failure(e, route.label())
}

pub(super) async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

pub(super) async fn readyz<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>) -> Response {
    match api.service.readiness().await {
        Readiness::Ready => json_response(
            StatusCode::OK,
            &ReadyResponse {
                ready: true,
                reason: None,
                alerts: service_kit::alerts::current(),
            },
        ),
        Readiness::NotReady(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &ErrorBody::new(ErrorCode::Unavailable, format!("not ready: {reason}")),
        ),
    }
}

pub(super) async fn metrics<B: KeyBackend, S: KeyStore>(State(api): ApiState<B, S>) -> Answer {
    let mut r = Response::new(Body::from(api.metrics.encode()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(r)
}

/// `GET /get_wrapped?key_id=`, decoded by `serde_urlencoded`.
#[derive(Deserialize)]
pub(super) struct GetWrappedQuery {
    key_id: Option<String>,
}

pub(super) async fn get_wrapped<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    q: Result<Query<GetWrappedQuery>, QueryRejection>,
) -> Answer {
    let f = fail(Route::GetWrapped);
    let Query(q) = q.map_err(|_| {
        f(HttpError::InvalidArgument(
            "the query string must be key_id=<key id>, once".into(),
        ))
    })?;
    let raw = q.key_id.ok_or_else(|| {
        f(HttpError::InvalidArgument(
            "query parameter key_id is required".into(),
        ))
    })?;
    let key_id = parse_key_id(&raw).map_err(&f)?;
    let w = api
        .service
        .get_wrapped(&key_id)
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &GetWrappedResponse {
            wrapped: w.wrapped,
            kek_id: w.kek_id,
            kek_version: w.kek_version,
        },
    ))
}

pub(super) async fn create_dek<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let f = fail(Route::CreateDek);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let req: CreateDekRequest = parse::<CreateDekBody, _>(&body).map_err(&f)?;
    let k = api
        .service
        .create_dek_for_thread(req.thread_id, req.idempotency_key)
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &CreateDekResponse {
            key_id: k.key_id,
            wrapped: k.wrapped,
            kek_id: k.kek.id,
            kek_version: k.kek.version,
        },
    ))
}

pub(super) async fn encrypt<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let f = fail(Route::Encrypt);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let req: EncryptRequest = parse::<EncryptBody, _>(&body).map_err(&f)?;
    drop(body);
    let e = api
        .service
        .encrypt(&req.key_id, req.plaintext.expose(), aad(&req.aad))
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &EncryptResponse {
            ciphertext: Bytes64(e.ciphertext),
            key_version: e.kek_version,
        },
    ))
}

pub(super) async fn decrypt<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let f = fail(Route::Decrypt);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let req: DecryptRequest = parse::<DecryptBody, _>(&body).map_err(&f)?;
    let p = api
        .service
        .decrypt(&req.key_id, &req.ciphertext.0, aad(&req.aad))
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &DecryptResponse { plaintext: p },
    ))
}

pub(super) async fn destroy_key<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let f = fail(Route::DestroyKey);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let DestroyKeyRequest { key_id } = parse::<DestroyKeyBody, _>(&body).map_err(&f)?;
    api.service
        .destroy_key(&key_id)
        .await
        .map_err(|e| f(e.into()))?;
    Ok(json_response(
        StatusCode::OK,
        &DestroyKeyResponse {
            key_id,
            state: kms_api::wire::KeyState::Destroyed,
        },
    ))
}

pub(super) async fn encrypt_batch<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let route = Route::EncryptBatch;
    let f = fail(route);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let raw: BatchBody<EncryptBody> = parse_json(&body).map_err(|e| f(e.into()))?;
    drop(body);
    let inputs: Vec<Result<EncryptRequest, HttpError>> = raw
        .into_items()
        .map_err(|e| f(e.into()))?
        .into_iter()
        .map(|b| EncryptRequest::try_from(b).map_err(HttpError::from))
        .collect();
    let items: Vec<EncryptItem<'_>> = inputs
        .iter()
        .flatten()
        .map(|i| EncryptItem {
            key_id: &i.key_id,
            plaintext: i.plaintext.expose(),
            aad: aad(&i.aad),
        })
        .collect();
    let mut done = api.service.encrypt_batch(&items).await.into_iter();
    let results = merge(route.label(), inputs, &mut done, |e| EncryptResponse {
        ciphertext: Bytes64(e.ciphertext),
        key_version: e.kek_version,
    })
    .map_err(&f)?;
    Ok(json_response(StatusCode::OK, &BatchResponse { results }))
}

pub(super) async fn decrypt_batch<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    body: Body,
) -> Answer {
    let route = Route::DecryptBatch;
    let f = fail(route);
    let body = read_body(body, api.limits).await.map_err(&f)?;
    let raw: BatchBody<DecryptBody> = parse_json(&body).map_err(|e| f(e.into()))?;
    drop(body);
    let inputs: Vec<Result<DecryptRequest, HttpError>> = raw
        .into_items()
        .map_err(|e| f(e.into()))?
        .into_iter()
        .map(|b| DecryptRequest::try_from(b).map_err(HttpError::from))
        .collect();
    let items: Vec<DecryptItem<'_>> = inputs
        .iter()
        .flatten()
        .map(|i| DecryptItem {
            key_id: &i.key_id,
            ciphertext: &i.ciphertext.0,
            aad: aad(&i.aad),
        })
        .collect();
    let mut done = api.service.decrypt_batch(&items).await.into_iter();
    let results = merge(route.label(), inputs, &mut done, |p| DecryptResponse {
        plaintext: p,
    })
    .map_err(&f)?;
    Ok(json_response(StatusCode::OK, &BatchResponse { results }))
}

/// Puts the service's results back in item order next to the items refused at validation.
/// Every item fails on its own: a cold key whose unwrap meets an HSM outage answers
/// `unavailable` for its items, while the items under cached keys beside it succeed.
pub(super) fn merge<I, T, R>(
    endpoint: &'static str,
    inputs: Vec<Result<I, HttpError>>,
    done: &mut impl Iterator<Item = Result<T, Arc<ServiceError>>>,
    ok: impl Fn(T) -> R,
) -> Result<Vec<ItemResult<R>>, HttpError> {
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        match input {
            Err(e) => out.push(ItemResult::Error(detail(e.code(), &e, endpoint))),
            Ok(_) => match done.next() {
                Some(Ok(v)) => out.push(ItemResult::Ok(ok(v))),
                Some(Err(e)) => out.push(ItemResult::Error(detail(e.code(), &e, endpoint))),
                None => {
                    return Err(HttpError::Service(ServiceError::Internal(
                        "batch answered fewer results than items",
                    )))
                }
            },
        }
    }
    Ok(out)
}

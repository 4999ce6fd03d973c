//! The route tables of both endpoints and the routers built from them (each router from its
//! table and nothing else), the route templates derived from the same tables (metric labels,
//! body classes), and the answers of peers that may not use an endpoint.

use super::*;

/// A route table: (path, handlers). Each router is built from its table and nothing else, so
/// the table's paths are exactly the paths served (the API reference test holds
/// `docs/openapi/kms.yaml` to them).
pub type RouteTable<B, S> = Vec<(&'static str, MethodRouter<Arc<Api<B, S>>>)>;

/// The paths of `table`.
pub fn paths<B, S>(table: &RouteTable<B, S>) -> Vec<&'static str> {
    table.iter().map(|(p, _)| *p).collect()
}

/// Every route of the client endpoint. The two `/admin` catch-alls only refuse (403).
pub fn client_routes<B: KeyBackend, S: KeyStore>() -> RouteTable<B, S> {
    vec![
        (Route::CreateDek.label(), post(create_dek::<B, S>)),
        (Route::Encrypt.label(), post(encrypt::<B, S>)),
        (Route::Decrypt.label(), post(decrypt::<B, S>)),
        (Route::EncryptBatch.label(), post(encrypt_batch::<B, S>)),
        (Route::DecryptBatch.label(), post(decrypt_batch::<B, S>)),
        (Route::DestroyKey.label(), post(destroy_key::<B, S>)),
        (Route::GetWrapped.label(), get(get_wrapped::<B, S>)),
        (Route::Healthz.label(), get(healthz)),
        (Route::Readyz.label(), get(readyz::<B, S>)),
        (Route::Metrics.label(), get(metrics::<B, S>)),
        ("/admin", any(admin_refused::<B, S>)),
        ("/admin/{*rest}", any(admin_refused::<B, S>)),
    ]
}

/// Which body limit a route's requests are held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyClass {
    /// `limits.max_body_bytes` (the key API, probes).
    Key,
    /// 4 KiB (admin calls).
    Admin,
    /// [`admin::MAX_RESTORE_BODY`] (whole backup files).
    Backup,
}

/// The route templates of both endpoints with their body classes, derived from the route
/// tables the routers are built from: the metric label of a request and its body limit
/// cannot drift from what is served.
#[derive(Debug)]
pub struct RouteTemplates {
    /// The admin endpoint's routes (looked up first: they name `/admin/...` paths).
    admin: service_kit::routes::Templates<BodyClass>,
    /// The client endpoint's routes (whose `/admin` catch-alls only refuse).
    client: service_kit::routes::Templates<BodyClass>,
}

impl RouteTemplates {
    pub(super) fn of<B: KeyBackend, S: KeyStore>() -> Self {
        let class = |c: BodyClass| move |(p, _)| (p, c);
        Self {
            admin: service_kit::routes::Templates::new(
                admin::admin_routes::<B, S>()
                    .into_iter()
                    .map(class(BodyClass::Admin))
                    .chain(
                        admin::large_body_routes::<B, S>()
                            .into_iter()
                            .map(class(BodyClass::Backup)),
                    ),
            ),
            client: service_kit::routes::Templates::new(
                client_routes::<B, S>()
                    .into_iter()
                    .map(class(BodyClass::Key)),
            ),
        }
    }

    /// The template `path` matches (its metric label) and its body class; requests that
    /// match no route are labelled [`UNKNOWN_ENDPOINT`] and held to the key API's limit.
    pub fn of_path(&self, path: &str) -> (&'static str, BodyClass) {
        self.admin
            .of(path)
            .or_else(|| self.client.of(path))
            .map_or((UNKNOWN_ENDPOINT, BodyClass::Key), |(t, c)| (t, *c))
    }
}

/// `table` as a router.
pub(super) fn build<B, S>(table: RouteTable<B, S>) -> Router<Arc<Api<B, S>>>
where
    B: KeyBackend,
    S: KeyStore,
{
    table
        .into_iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods))
}

/// The KMS API for an allowed peer.
pub fn router<B: KeyBackend, S: KeyStore>(api: Arc<Api<B, S>>) -> Router {
    let limits = api.limits;
    let routes = Arc::clone(&api.routes);
    build(client_routes::<B, S>())
        .fallback(|| async { error_response(&HttpError::NotFound, UNKNOWN_ENDPOINT) })
        .method_not_allowed_fallback(move |uri: Uri| async move {
            error_response(&HttpError::MethodNotAllowed, routes.of_path(uri.path()).0)
        })
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .with_state(api)
}

/// `/admin/...` on the client endpoint: refused whoever asks (the server's identity is never
/// an admin), logged and audited.
pub(super) async fn admin_refused<B: KeyBackend, S: KeyStore>(
    State(api): ApiState<B, S>,
    uri: Uri,
) -> Response {
    let (label, _) = api.routes.of_path(uri.path());
    tracing::warn!(route = label, "admin call refused on the client endpoint");
    api.audit_refusal(label, "client endpoint").await;
    let mut r = error_response(&HttpError::AdminOnly, label);
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// What a peer outside `listen.allowed_uids` gets, whatever it asks: 403, without its body
/// being read, and the connection closed.
pub fn forbidden_router<B: KeyBackend, S: KeyStore>(api: Arc<Api<B, S>>) -> Router {
    Router::new()
        .fallback(|| async {
            let mut r = error_response(&HttpError::Forbidden, UNKNOWN_ENDPOINT);
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        })
        .with_state(api)
}

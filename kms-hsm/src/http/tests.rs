//! Unit tests of `http`.

use super::*;
use crate::backend::mock::MockBackend;
use crate::cache::DekCache;
use crate::keystore::lmdb::LmdbStore;
use axum::http::{Method, Request};
use serde_json::{json, Value};

struct Fixture {
    _dir: tempfile::TempDir,
    api: Arc<Api<MockBackend, LmdbStore>>,
}

impl Fixture {
    async fn handle(&self, req: Request<Body>) -> Response {
        answer(&self.api, router(self.api.clone()), req).await
    }
}

fn fixture() -> Fixture {
    fixture_with_rate(service_kit::rate::RateLimit::OFF)
}

fn fixture_with_rate(peer_rate: service_kit::rate::RateLimit) -> Fixture {
    fixture_with_rates(peer_rate, service_kit::rate::RateLimit::OFF)
}

fn fixture_with_rates(
    peer_rate: service_kit::rate::RateLimit,
    peer_create_rate: service_kit::rate::RateLimit,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(MockBackend::new());
    let gate = service_kit::conn::ConnectionGate::new(service_kit::conn::ConnectionLimits {
        max_connections: 16,
        max_per_peer: 16,
    });
    let metrics = Arc::new(Metrics::new(backend.clone(), gate));
    let store = LmdbStore::open(dir.path(), 8, metrics.store.clone()).unwrap();
    let cache = DekCache::new(Duration::from_secs(60), 100, metrics.cache.clone());
    let service = Arc::new(KeyService::new(backend, store, cache));
    let api = Api::new(
        service,
        metrics,
        HttpLimits {
            max_body_bytes: 64 * 1024,
            body_read_timeout: Duration::from_secs(5),
            peer_rate,
            peer_create_rate,
        },
        crate::lifecycle::LifecycleOptions::default(),
    );
    Fixture {
        _dir: dir,
        api: Arc::new(api),
    }
}

async fn call(f: &Fixture, method: Method, path: &str, body: &[u8]) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(body.to_vec()))
        .unwrap();
    let resp = f.handle(req).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

async fn post(f: &Fixture, path: &str, v: Value) -> (u16, Value) {
    call(f, Method::POST, path, &serde_json::to_vec(&v).unwrap()).await
}

fn b64(b: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b)
}

/// A request the transport did not tag with its peer is limited too (one shared
/// bucket), never let through unlimited; probes are not limited.
#[tokio::test]
async fn untagged_requests_are_rate_limited_and_probes_are_not() {
    let f = fixture_with_rate(service_kit::rate::RateLimit {
        per_sec: 1,
        burst: 2,
    });
    let body = json!({"thread_id": "t"});
    assert_eq!(
        post(&f, "/create_dek_for_thread", body.clone()).await.0,
        200
    );
    assert_eq!(
        post(&f, "/create_dek_for_thread", body.clone()).await.0,
        200
    );
    let (s, v) = post(&f, "/create_dek_for_thread", body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{v}"
    );
    for _ in 0..5 {
        assert_eq!(call(&f, Method::GET, "/healthz", b"").await.0, 200);
    }
}

/// Creates have a per-peer budget of their own, on by default: past it a create is 429
/// while every other call of the same peer is served (the key store cannot be filled by
/// one peer at the rate it can send).
#[tokio::test]
async fn creates_have_a_budget_of_their_own() {
    let f = fixture_with_rates(
        service_kit::rate::RateLimit::OFF,
        service_kit::rate::RateLimit {
            per_sec: 1,
            burst: 3,
        },
    );
    let mut made = Vec::new();
    for i in 0..3 {
        let (s, k) = post(
            &f,
            "/create_dek_for_thread",
            json!({"thread_id": format!("t{i}")}),
        )
        .await;
        assert_eq!(s, 200, "{k}");
        made.push(k["key_id"].as_str().unwrap().to_owned());
    }
    let (s, v) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t9"})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{v}"
    );
    for _ in 0..10 {
        let (s, _) = post(
            &f,
            "/encrypt",
            json!({"key_id": made[0], "plaintext": b64(b"x"), "aad": b64(b"a")}),
        )
        .await;
        assert_eq!(s, 200);
    }
    assert_eq!(
        post(&f, "/destroy_key", json!({"key_id": made[1]})).await.0,
        200
    );
    assert_eq!(f.api.service().store().key_count().await.unwrap(), 3);
}

#[tokio::test]
async fn round_trip_and_errors() {
    let f = fixture();
    let (s, k) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t1"})).await;
    assert_eq!(s, 200, "{k}");
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    assert_eq!(k["kek_version"], 1);
    let (s, e) = post(
        &f,
        "/encrypt",
        json!({"key_id": key_id, "plaintext": b64(b"hi"), "aad": b64(b"a")}),
    )
    .await;
    assert_eq!(s, 200);
    let ct = e["ciphertext"].as_str().unwrap().to_owned();
    let (s, d) = post(
        &f,
        "/decrypt",
        json!({"key_id": key_id, "ciphertext": ct, "aad": b64(b"a")}),
    )
    .await;
    assert_eq!(
        (s, d["plaintext"].as_str().unwrap()),
        (200, b64(b"hi").as_str())
    );
    let (s, d) = post(&f, "/decrypt", json!({"key_id": key_id, "ciphertext": ct})).await;
    assert_eq!(
        (s, d["error"]["code"].as_str().unwrap()),
        (422, "decryption_failed")
    );

    let (s, w) = call(
        &f,
        Method::GET,
        &format!("/get_wrapped?key_id={key_id}"),
        b"",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(w["wrapped"], k["wrapped"]);

    for (body, status, code) in [
        (&b"{not json"[..], 400, "malformed_request"),
        (&b""[..], 400, "malformed_request"),
        (
            br#"{"key_id":"dek_00000000000000000000000000000000","plaintext":"!!"}"#,
            400,
            "invalid_base64",
        ),
        (
            br#"{"key_id":"nope","plaintext":"aGk="}"#,
            400,
            "invalid_argument",
        ),
        (
            br#"{"key_id":"dek_00000000000000000000000000000000","plaintext":"aGk=","x":1}"#,
            400,
            "malformed_request",
        ),
        (
            br#"{"key_id":"dek_00000000000000000000000000000000","plaintext":"aGk="}"#,
            404,
            "unknown_key",
        ),
    ] {
        let (s, v) = call(&f, Method::POST, "/encrypt", body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap()),
            (status, code),
            "{v}"
        );
    }
    let big = vec![b'a'; 70 * 1024];
    let (s, v) = call(&f, Method::POST, "/encrypt", &big).await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (413, "payload_too_large")
    );
    let (s, v) = call(&f, Method::GET, "/encrypt", b"").await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (405, "method_not_allowed")
    );
    let (s, v) = call(&f, Method::GET, "/nope", b"").await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (404, "not_found")
    );
    let (s, v) = call(&f, Method::GET, "/get_wrapped", b"").await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (400, "invalid_argument")
    );
}

#[tokio::test]
async fn batch_mixed_items_and_destroy() {
    let f = fixture();
    let (_, k) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t1"})).await;
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    let (s, r) = post(
        &f,
        "/encrypt_batch",
        json!({"items": [
            {"key_id": key_id, "plaintext": b64(b"one")},
            {"key_id": key_id, "plaintext": "%%%"},
            {"key_id": "dek_00000000000000000000000000000000", "plaintext": b64(b"x")},
            {"key_id": key_id, "plaintext": b64(b"two"), "aad": b64(b"z")},
        ]}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let res = r["results"].as_array().unwrap();
    assert_eq!(res.len(), 4);
    assert_eq!(res[1]["error"]["code"], "invalid_base64");
    assert_eq!(res[2]["error"]["code"], "unknown_key");
    let c0 = res[0]["ok"]["ciphertext"].as_str().unwrap();
    let c3 = res[3]["ok"]["ciphertext"].as_str().unwrap();
    let (s, r) = post(
        &f,
        "/decrypt_batch",
        json!({"items": [
            {"key_id": key_id, "ciphertext": c0},
            {"key_id": key_id, "ciphertext": c3},
            {"key_id": key_id, "ciphertext": c3, "aad": b64(b"z")},
        ]}),
    )
    .await;
    assert_eq!(s, 200);
    let res = r["results"].as_array().unwrap();
    assert_eq!(res[0]["ok"]["plaintext"], b64(b"one"));
    assert_eq!(res[1]["error"]["code"], "decryption_failed");
    assert_eq!(res[2]["ok"]["plaintext"], b64(b"two"));

    let (s, d) = post(&f, "/destroy_key", json!({"key_id": key_id})).await;
    assert_eq!((s, d["state"].as_str().unwrap()), (200, "destroyed"));
    let (s, _) = post(&f, "/destroy_key", json!({"key_id": key_id})).await;
    assert_eq!(s, 200, "idempotent");
    let (s, v) = post(&f, "/decrypt", json!({"key_id": key_id, "ciphertext": c0})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (404, "unknown_key")
    );
}

#[tokio::test]
async fn hsm_down_gives_generic_503() {
    let f = fixture();
    let (_, k) = post(&f, "/create_dek_for_thread", json!({"thread_id": "t1"})).await;
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    f.api
        .service()
        .cache()
        .evict(&KeyId::parse(&key_id).unwrap());
    f.api.service().backend().set_down(true);
    let (s, v) = post(
        &f,
        "/encrypt",
        json!({"key_id": key_id, "plaintext": "aGk="}),
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(v["error"]["code"], "unavailable");
    assert!(!v.to_string().contains("mock"), "no internal detail: {v}");
    // In a batch, the cold key's item fails alone.
    let (s, r) = post(
        &f,
        "/encrypt_batch",
        json!({"items": [{"key_id": key_id, "plaintext": "aGk="}]}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(r["results"][0]["error"]["code"], "unavailable", "{r}");
    let (s, v) = call(&f, Method::GET, "/readyz", b"").await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (503, "unavailable")
    );
    f.api.service().backend().set_down(false);
    let (s, _) = call(&f, Method::GET, "/readyz", b"").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn metrics_count_requests() {
    let f = fixture();
    call(&f, Method::GET, "/healthz", b"").await;
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = f.handle(req).await;
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(
            r#"progressdb_kms_http_requests_total{route="/healthz",method="GET",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("progressdb_kms_hsm_calls_total"));
    assert!(text.contains("progressdb_kms_keystore_commits_total"));
    assert!(text.contains("progressdb_kms_cache_hits_total"));
}

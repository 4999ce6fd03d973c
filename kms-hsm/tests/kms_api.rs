//! End-to-end tests of the KMS HTTP API over its Unix socket: the real binary, a real SoftHSM
//! token, a real LMDB store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{b64, kms, random_hex};
use http::Method;
use kms_api::wire::{DecryptRequest, EncryptRequest, ItemResult, SecretBytes};
use kms_api::{ClientError, ErrorCode, KeyId, KmsClient, ThreadId};
use serde_json::{json, Value};

fn tid(s: &str) -> ThreadId {
    ThreadId::parse(s).unwrap()
}

async fn post(c: &KmsClient, path: &str, body: &[u8]) -> (u16, Value) {
    let (s, b) = c.raw(Method::POST, path, body.to_vec()).await.unwrap();
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn code(e: ClientError) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("no code in {e}"))
}

#[tokio::test]
async fn round_trip_over_unix_socket() {
    let kms = kms().start_ready().await;
    let c = kms.client();
    let k = c.create_dek_for_thread(&tid("thread-1")).await.unwrap();
    assert_eq!(k.kek_id.as_str(), common::KEK_LABEL);
    assert_eq!(k.kek_version.get(), 1);
    // memory residency: an encrypt-class KEK, AesGcmV1; hsm residency: a wrap-class KEK,
    // AesKwV3.
    let (len, tag) = if common::residency_is_hsm() {
        (77, 0x03)
    } else {
        (65, 0x01)
    };
    assert_eq!(k.wrapped.as_bytes().len(), len, "wrapped DEK length");
    assert_eq!(k.wrapped.as_bytes()[0], tag, "wrapped DEK format");

    let marker = format!("PLAINTEXT-MARKER-{}", random_hex(12));
    for aad in [None, Some(&b"thread:thread-1:msg:1"[..])] {
        let e = c.encrypt(&k.key_id, marker.as_bytes(), aad).await.unwrap();
        assert_eq!(e.key_version.get(), 1);
        assert_eq!(e.ciphertext.0.len(), 12 + marker.len() + 16);
        let p = c.decrypt(&k.key_id, &e.ciphertext.0, aad).await.unwrap();
        assert_eq!(p.expose(), marker.as_bytes());
    }
    // Empty plaintext round-trips too.
    let e = c.encrypt(&k.key_id, b"", None).await.unwrap();
    assert!(c
        .decrypt(&k.key_id, &e.ciphertext.0, None)
        .await
        .unwrap()
        .is_empty());

    // The KMS's own binding AADs are refused: no client can have the KMS compute the check
    // that binds this DEK to another key id in a legacy AesKwV2 blob (AES-GCM under the DEK
    // of an empty message with the wrap AAD), which would let a copy of its blob be planted
    // under that id.
    let forged = [&b"progressdb-kms:dek:v1\0"[..], b"another-key-id"].concat();
    for aad in [&forged[..], b"progressdb-kms:"] {
        let err = c.encrypt(&k.key_id, b"", Some(aad)).await.unwrap_err();
        assert_eq!(code(err), ErrorCode::InvalidArgument);
        let err = c
            .decrypt(&k.key_id, &e.ciphertext.0, Some(aad))
            .await
            .unwrap_err();
        assert_eq!(code(err), ErrorCode::InvalidArgument);
    }

    let w = c.get_wrapped(&k.key_id).await.unwrap();
    assert_eq!(w.wrapped, k.wrapped);
    assert_eq!(w.kek_id, k.kek_id);
    assert_eq!(w.kek_version, k.kek_version);

    // Liveness, readiness, metrics.
    let (s, b) = c.raw(Method::GET, "/healthz", vec![]).await.unwrap();
    assert_eq!((s, &b[..]), (200, &br#"{"status":"ok"}"#[..]));
    c.ready().await.unwrap();
    let (s, b) = c.raw(Method::GET, "/metrics", vec![]).await.unwrap();
    assert_eq!(s, 200);
    let text = String::from_utf8(b.to_vec()).unwrap();
    for name in [
        "progressdb_kms_http_requests_total{route=\"/encrypt\",method=\"POST\",status=\"200\"}",
        "progressdb_kms_http_request_duration_seconds_bucket",
        "progressdb_kms_hsm_calls_total",
        "progressdb_kms_hsm_errors_total",
        "progressdb_kms_hsm_recoveries_total",
        "progressdb_kms_cache_hits_total",
        "progressdb_kms_cache_misses_total",
        "progressdb_kms_keystore_commits_total",
        "progressdb_kms_keystore_commit_ops",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let hsm_calls = kms.metric("progressdb_kms_hsm_calls_total").await.unwrap();
    assert!(hsm_calls >= 1.0, "the HSM generated the DEK");
    let wrapped = k.wrapped.as_bytes().to_vec();
    kms.finish(&[marker.as_bytes(), &wrapped]);
}

#[tokio::test]
async fn batch_round_trip_with_mixed_items() {
    let kms = kms().cache(60, 0).start_ready().await;
    let c = kms.client();
    let a = c.create_dek_for_thread(&tid("a")).await.unwrap();
    let b = c.create_dek_for_thread(&tid("b")).await.unwrap();
    let unknown = KeyId::from_random([0x5a; 16]);
    let item = |k: &KeyId, p: &str, aad: Option<&str>| EncryptRequest {
        key_id: k.clone(),
        plaintext: SecretBytes::new(p.as_bytes().to_vec()),
        aad: aad.map(|x| kms_api::wire::Bytes64(x.as_bytes().to_vec())),
    };
    let res = c
        .encrypt_batch(&[
            item(&a.key_id, "a-1", Some("m1")),
            item(&b.key_id, "b-1", None),
            item(&unknown, "x", None),
            item(&a.key_id, "a-2", Some("m2")),
        ])
        .await
        .unwrap();
    let ct = |r: &ItemResult<kms_api::wire::EncryptResponse>| match r {
        ItemResult::Ok(e) => e.ciphertext.clone(),
        ItemResult::Error(e) => panic!("{e:?}"),
    };
    match &res[2] {
        ItemResult::Error(e) => assert_eq!(e.code, ErrorCode::UnknownKey),
        ItemResult::Ok(_) => panic!("unknown key encrypted"),
    }
    let (c0, c1, c3) = (ct(&res[0]), ct(&res[1]), ct(&res[3]));
    let d = |k: &KeyId, ct: &kms_api::wire::Bytes64, aad: Option<&str>| DecryptRequest {
        key_id: k.clone(),
        ciphertext: ct.clone(),
        aad: aad.map(|x| kms_api::wire::Bytes64(x.as_bytes().to_vec())),
    };
    let out = c
        .decrypt_batch(&[
            d(&a.key_id, &c0, Some("m1")),
            d(&b.key_id, &c1, None),
            d(&a.key_id, &c3, Some("m1")), // wrong AAD
            d(&b.key_id, &c0, Some("m1")), // another key's ciphertext
            d(&a.key_id, &c3, Some("m2")),
        ])
        .await
        .unwrap();
    let plain = |r: &ItemResult<kms_api::wire::DecryptResponse>| match r {
        ItemResult::Ok(p) => String::from_utf8(p.plaintext.expose().to_vec()).unwrap(),
        ItemResult::Error(e) => format!("error:{}", e.code.as_str()),
    };
    let got: Vec<String> = out.iter().map(plain).collect();
    assert_eq!(
        got,
        [
            "a-1",
            "b-1",
            "error:decryption_failed",
            "error:decryption_failed",
            "a-2"
        ]
    );

    // Items with bad base64 or a bad key id fail alone; the others succeed.
    let body = json!({"items": [
        {"key_id": a.key_id.as_str(), "plaintext": "not base64!"},
        {"key_id": "dek_bad", "plaintext": b64(b"x")},
        {"key_id": a.key_id.as_str(), "plaintext": b64(b"fine")},
    ]});
    let (s, v) = post(&c, "/encrypt_batch", body.to_string().as_bytes()).await;
    assert_eq!(s, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["error"]["code"], "invalid_base64");
    assert_eq!(r[1]["error"]["code"], "invalid_argument");
    assert!(r[2]["ok"]["ciphertext"].is_string());
    // An empty batch is fine; a malformed one is refused as a whole.
    let (s, v) = post(&c, "/decrypt_batch", br#"{"items":[]}"#).await;
    assert_eq!((s, v["results"].as_array().unwrap().len()), (200, 0));
    let (s, v) = post(&c, "/decrypt_batch", br#"{"items":[{"key_id":1}]}"#).await;
    assert_eq!(
        (s, v["error"]["code"].as_str().unwrap()),
        (400, "malformed_request")
    );
    kms.finish(&[]);
}

#[tokio::test]
async fn every_decryption_failure_is_one_opaque_422() {
    let kms = kms().start_ready().await;
    let c = kms.client();
    let a = c.create_dek_for_thread(&tid("a")).await.unwrap();
    let b = c.create_dek_for_thread(&tid("b")).await.unwrap();
    let e = c
        .encrypt(&a.key_id, b"secret message body", Some(b"aad-1"))
        .await
        .unwrap();
    let ct = e.ciphertext.0.clone();
    let mut tampered = ct.clone();
    tampered[15] ^= 0x80;
    let mut tampered_tag = ct.clone();
    *tampered_tag.last_mut().unwrap() ^= 1;
    let mut tampered_nonce = ct.clone();
    tampered_nonce[0] ^= 1;
    type Case<'a> = (&'a str, &'a KeyId, Vec<u8>, Option<&'a [u8]>);
    let cases: Vec<Case<'_>> = vec![
        ("wrong aad", &a.key_id, ct.clone(), Some(b"aad-2")),
        ("missing aad", &a.key_id, ct.clone(), None),
        ("tampered body", &a.key_id, tampered, Some(b"aad-1")),
        ("tampered tag", &a.key_id, tampered_tag, Some(b"aad-1")),
        ("tampered nonce", &a.key_id, tampered_nonce, Some(b"aad-1")),
        (
            "truncated",
            &a.key_id,
            ct[..ct.len() - 1].to_vec(),
            Some(b"aad-1"),
        ),
        (
            "shorter than nonce+tag",
            &a.key_id,
            ct[..20].to_vec(),
            Some(b"aad-1"),
        ),
        ("empty", &a.key_id, Vec::new(), Some(b"aad-1")),
        (
            "another key's ciphertext",
            &b.key_id,
            ct.clone(),
            Some(b"aad-1"),
        ),
    ];
    let mut messages = std::collections::HashSet::new();
    for (what, key, bytes, aad) in cases {
        let body = json!({
            "key_id": key.as_str(),
            "ciphertext": b64(&bytes),
            "aad": aad.map(b64),
        });
        let (s, v) = post(&c, "/decrypt", body.to_string().as_bytes()).await;
        assert_eq!(s, 422, "{what}: {v}");
        assert_eq!(v["error"]["code"], "decryption_failed", "{what}");
        messages.insert(v["error"]["message"].as_str().unwrap().to_owned());
    }
    assert_eq!(messages.len(), 1, "one opaque message: {messages:?}");
    // And the right inputs still decrypt.
    let p = c.decrypt(&a.key_id, &ct, Some(b"aad-1")).await.unwrap();
    assert_eq!(p.expose(), b"secret message body");
    kms.finish(&[b"secret message body"]);
}

#[tokio::test]
async fn unknown_key_is_404() {
    // Also runs with JSON logs.
    let kms = kms()
        .env("PROGRESSDB_KMS__LOG__FORMAT", "json")
        .start_ready()
        .await;
    let c = kms.client();
    let unknown = KeyId::from_random([0x11; 16]);
    assert_eq!(
        code(c.encrypt(&unknown, b"x", None).await.unwrap_err()),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        code(c.decrypt(&unknown, &[0u8; 40], None).await.unwrap_err()),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        code(c.get_wrapped(&unknown).await.unwrap_err()),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        code(c.destroy_key(&unknown).await.unwrap_err()),
        ErrorCode::UnknownKey
    );
    let (s, _) = c
        .raw(
            Method::GET,
            &format!("/get_wrapped?key_id={unknown}"),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(s, 404);
    let log = kms.log_text();
    let json_lines = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["level"] == "INFO")
        .count();
    assert!(json_lines >= 3, "JSON log lines expected:\n{log}");
    kms.finish(&[]);
}

#[tokio::test]
async fn bad_requests_get_their_4xx_and_the_kms_keeps_serving() {
    let kms = kms().max_body_bytes(64 * 1024).start_ready().await;
    let c = kms.client();
    let k = c.create_dek_for_thread(&tid("t")).await.unwrap();
    let kid = k.key_id.as_str();
    let big = format!(
        r#"{{"key_id":"{kid}","plaintext":"{}"}}"#,
        b64(&vec![b'x'; 80 * 1024])
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/encrypt", "{not json".into(), 400, "malformed_request"),
        ("/encrypt", String::new(), 400, "malformed_request"),
        (
            "/encrypt",
            r#"{"key_id":1}"#.into(),
            400,
            "malformed_request",
        ),
        (
            "/encrypt",
            format!(r#"{{"key_id":"{kid}","plaintext":"aGk=","extra":true}}"#),
            400,
            "malformed_request",
        ),
        (
            "/encrypt",
            format!(r#"{{"key_id":"{kid}","plaintext":"*not*base64*"}}"#),
            400,
            "invalid_base64",
        ),
        (
            "/decrypt",
            format!(r#"{{"key_id":"{kid}","ciphertext":"QUJD","aad":"%%"}}"#),
            400,
            "invalid_base64",
        ),
        (
            "/encrypt",
            r#"{"key_id":"not-a-key-id","plaintext":"aGk="}"#.into(),
            400,
            "invalid_argument",
        ),
        (
            "/create_dek_for_thread",
            r#"{"thread_id":"has:colon"}"#.into(),
            400,
            "invalid_argument",
        ),
        ("/encrypt", big, 413, "payload_too_large"),
        ("/nowhere", "{}".into(), 404, "not_found"),
    ];
    for (path, body, status, want) in cases {
        let (s, v) = post(&c, path, body.as_bytes()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(want)),
            "{path} {v}"
        );
        // Still serving after each one.
        let e = c.encrypt(&k.key_id, b"still here", None).await.unwrap();
        let p = c.decrypt(&k.key_id, &e.ciphertext.0, None).await.unwrap();
        assert_eq!(p.expose(), b"still here");
    }
    let (s, v) = c.raw(Method::GET, "/encrypt", vec![]).await.unwrap();
    let v: Value = serde_json::from_slice(&v).unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // A body over the limit (64 KiB here), but within the drain allowance (4 MiB more), is
    // read and answered 413 (the client sees the answer, not a reset).
    for size in [(64 << 10) + 1, (64 << 10) + (3 << 20)] {
        let (s, _) = c
            .raw(Method::POST, "/encrypt_batch", vec![b'a'; size])
            .await
            .unwrap();
        assert_eq!(s, 413, "{size} bytes");
    }
    // A body far above the limit is cut off without being buffered.
    let huge = vec![b'a'; 8 << 20];
    // (An error instead of an answer means the KMS closed the connection mid-upload: also a
    // refusal.)
    if let Ok((s, _)) = c.raw(Method::POST, "/encrypt", huge).await {
        assert_eq!(s, 413);
    }
    c.ready().await.unwrap();
    let (s, _) = post(
        &kms.client(),
        "/create_dek_for_thread",
        br#"{"thread_id":"t2"}"#,
    )
    .await;
    assert_eq!(s, 200);
    kms.finish(&[b"still here"]);
}

#[tokio::test]
async fn destroy_key_then_use_is_404() {
    let kms = kms().start_ready().await;
    let c = kms.client();
    let k = c.create_dek_for_thread(&tid("doomed")).await.unwrap();
    let keep = c.create_dek_for_thread(&tid("kept")).await.unwrap();
    let e = c.encrypt(&k.key_id, b"shred me", None).await.unwrap();
    let e2 = c.encrypt(&keep.key_id, b"keep me", None).await.unwrap();
    let d = c.destroy_key(&k.key_id).await.unwrap();
    assert_eq!(
        (d.key_id, d.state.as_str()),
        (k.key_id.clone(), "destroyed")
    );
    // Idempotent.
    assert_eq!(
        c.destroy_key(&k.key_id).await.unwrap().state.as_str(),
        "destroyed"
    );
    assert_eq!(
        code(
            c.decrypt(&k.key_id, &e.ciphertext.0, None)
                .await
                .unwrap_err()
        ),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        code(c.encrypt(&k.key_id, b"x", None).await.unwrap_err()),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        code(c.get_wrapped(&k.key_id).await.unwrap_err()),
        ErrorCode::UnknownKey
    );
    // Other keys are untouched.
    let p = c
        .decrypt(&keep.key_id, &e2.ciphertext.0, None)
        .await
        .unwrap();
    assert_eq!(p.expose(), b"keep me");
    kms.finish(&[b"shred me", b"keep me"]);
}

#[tokio::test]
async fn concurrent_creates_share_commits() {
    let kms = kms().sessions(4).start_ready().await;
    let c = kms.client();
    // Start-up wrote one thing: the current KEK version, pinned in the new store.
    let before = kms
        .metric("progressdb_kms_keystore_commits_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(before, 1.0);
    let writes_before = kms
        .metric("progressdb_kms_keystore_writes_total")
        .await
        .unwrap_or(0.0);
    const N: usize = 64;
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.create_dek_for_thread(&tid(&format!("t-{i}"))).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().unwrap().key_id);
    }
    assert_eq!(ids.len(), N, "every create succeeded with its own key");
    let commits = kms
        .metric("progressdb_kms_keystore_commits_total")
        .await
        .unwrap()
        - before;
    let writes = kms
        .metric("progressdb_kms_keystore_writes_total")
        .await
        .unwrap()
        - writes_before;
    // A create's record and its audit entry are one write; concurrent creates share
    // audit batches and commits.
    assert!(writes >= 1.0 && writes <= N as f64, "{writes}");
    assert!(
        commits < (N / 4) as f64,
        "group commit: {commits} commits for {N} creates"
    );
    eprintln!("{N} creates in {commits} commits");
    kms.finish(&[]);
}

#[tokio::test]
async fn trace_logs_hold_no_secret() {
    let kms = kms().rust_log("trace").start_ready().await;
    let c = kms.client();
    let marker = format!("PLAINTEXT-MARKER-{}", random_hex(16));
    let aad = format!("AAD-MARKER-{}", random_hex(8));
    let k = c.create_dek_for_thread(&tid("logged")).await.unwrap();
    let e = c
        .encrypt(&k.key_id, marker.as_bytes(), Some(aad.as_bytes()))
        .await
        .unwrap();
    let p = c
        .decrypt(&k.key_id, &e.ciphertext.0, Some(aad.as_bytes()))
        .await
        .unwrap();
    assert_eq!(p.expose(), marker.as_bytes());
    let _ = c
        .decrypt(&k.key_id, &e.ciphertext.0, None)
        .await
        .unwrap_err();
    let _ = c.get_wrapped(&k.key_id).await.unwrap();
    let (s, _) = c
        .raw(
            Method::POST,
            "/encrypt",
            format!(
                r#"{{"key_id":"{}","plaintext":"{}","bogus":1}}"#,
                k.key_id,
                b64(marker.as_bytes())
            )
            .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);
    let batch = vec![EncryptRequest {
        key_id: k.key_id.clone(),
        plaintext: SecretBytes::new(marker.as_bytes().to_vec()),
        aad: None,
    }];
    c.encrypt_batch(&batch).await.unwrap();
    c.destroy_key(&k.key_id).await.unwrap();
    let log = kms.log_text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging is on"
    );
    assert!(log.contains(k.key_id.as_str()), "key ids may be logged");
    let wrapped = k.wrapped.as_bytes().to_vec();
    let ct = e.ciphertext.0.clone();
    kms.finish(&[marker.as_bytes(), aad.as_bytes(), &wrapped, &ct[12..]]);
}

//! Request rate limits, off by default, against the real services: per API key on the server
//! (`limits.key_rate_per_sec`) and per peer on the KMS's key API
//! (`limits.peer_rate_per_sec`). Over the rate a request gets 429 `rate_limited` with
//! `Retry-After`, other identities and probes are not affected, nothing is stored for the
//! refused requests, and the caller is served again once its bucket refills.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use progressdb_e2e::{uds_raw, KmsBuilder, Role, Token};
use serde_json::json;

#[test]
fn the_kms_limits_each_peer_on_the_key_api_only() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let kms = KmsBuilder::new(tmp.path())
        .token(&hsm)
        .extra_toml("[limits]\npeer_rate_per_sec = 5\npeer_rate_burst = 5\n")
        .start();
    let (s, k) = kms.call(
        "POST",
        "/create_dek_for_thread",
        Some(json!({"thread_id": "t"})),
    );
    assert_eq!(s, 200, "{k}");
    let key = k["key_id"].as_str().unwrap().to_owned();
    let enc = json!({"key_id": key, "plaintext": "aGk="});
    let statuses: Vec<u16> = (0..12)
        .map(|_| kms.call("POST", "/encrypt", Some(enc.clone())).0)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((4..=6).contains(&ok), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    // The refusal: its code, and how long to wait.
    let (_, text) = uds_raw(&kms.socket(), "POST", "/encrypt", Some(&enc)).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    let raw = raw_head(&kms.socket(), &enc);
    assert!(raw.starts_with("HTTP/1.1 429"), "{raw}");
    assert!(raw.to_lowercase().contains("retry-after: 1"), "{raw}");
    // Probes and the admin socket are not limited.
    for _ in 0..20 {
        assert_eq!(kms.call("GET", "/healthz", None).0, 200);
    }
    let admin = kms.socket().with_file_name("kms.admin.sock");
    for _ in 0..10 {
        let (s, _) = uds_raw(&admin, "GET", "/admin/status", None).unwrap();
        assert_eq!(s, 200);
    }
    // The bucket refills.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(kms.call("POST", "/encrypt", Some(enc)).0, 200);
}

/// The head of one `/encrypt` answer, as sent.
fn raw_head(sock: &std::path::Path, body: &serde_json::Value) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let body = serde_json::to_vec(body).unwrap();
    write!(
        s,
        "POST /encrypt HTTP/1.1\r\nhost: kms\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

#[test]
fn the_server_limits_each_api_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, mut server) = progressdb_e2e::system(tmp.path());
    let mut text = std::fs::read_to_string(&server.config).unwrap();
    text.push_str("\n[limits]\nkey_rate_per_sec = 4\nkey_rate_burst = 4\n");
    std::fs::write(&server.config, text).unwrap();
    server.restart();

    let alice = server.as_role(Role::Backend, "alice");
    let agent = ureq::agent();
    let mut ok = 0;
    let mut refused = None;
    for i in 0..10 {
        let (s, body) = alice
            .send(
                &agent,
                "POST",
                "/v1/threads",
                Some(&json!({"title": format!("t{i}")})),
            )
            .unwrap();
        match s {
            201 => ok += 1,
            429 => refused = Some(body),
            other => panic!("{other} {body}"),
        }
    }
    assert!((3..=5).contains(&ok), "{ok} created");
    let body: serde_json::Value = serde_json::from_str(&refused.expect("no 429")).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let r = ureq::get(&format!("{}/v1/threads", server.base))
        .set("authorization", &format!("Bearer {}", server.keys.backend))
        .set("x-user-id", "alice")
        .call();
    match r {
        Err(ureq::Error::Status(429, resp)) => {
            let wait: u64 = resp.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=2).contains(&wait), "{wait}");
        }
        other => panic!("expected 429: {other:?}"),
    }
    // Another key has its own rate; the probes have none.
    let admin = server.as_role(Role::Admin, "ops");
    let (s, _) = admin.call("GET", "/v1/threads", None);
    assert_eq!(s, 200);
    for _ in 0..10 {
        assert_eq!(
            ureq::get(&format!("{}/healthz", server.base))
                .call()
                .unwrap()
                .status(),
            200
        );
    }
    // Nothing was stored for the refused creates, and the key is served again later.
    std::thread::sleep(Duration::from_millis(1500));
    let (s, list) = alice.call("GET", "/v1/threads?limit=100", None);
    assert_eq!(s, 200);
    assert_eq!(list["threads"].as_array().unwrap().len(), ok, "{list}");
    let (s, _) = alice
        .send(
            &agent,
            "POST",
            "/v1/threads",
            Some(&json!({"title": "later"})),
        )
        .unwrap();
    assert_eq!(s, 201);
}

//! Request rate limits, off by default, against the real services: per API key on the server
//! (`limits.key_rate_per_sec`) and per peer on the KMS's key API
//! (`limits.peer_rate_per_sec`). Over the rate a request gets 429 `rate_limited` with
//! `Retry-After`, other identities and probes are not affected, nothing is stored for the
//! refused requests, and the caller is served again once its bucket refills.
//!
//! How many requests pass before the first refusal depends on how fast they are sent (an
//! fsync per write on the server): each test sends until the first refusal (the event) and
//! checks the count against the burst plus what the measured time refilled, at one token a
//! second, and waits for the refill by asking again, not by sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use progressdb_e2e::{uds_raw, KmsBuilder, Role, ServerBuilder};
use serde_json::json;

/// Calls `send` until it answers `refused` (at most 200 times: a limit that never refuses
/// fails); every other answer must be `ok`. Returns how many passed and the seconds taken.
fn until_refused(ok: u16, refused: u16, mut send: impl FnMut() -> u16) -> (usize, f64) {
    let t = Instant::now();
    let mut passed = 0;
    loop {
        let s = send();
        if s == refused {
            return (passed, t.elapsed().as_secs_f64());
        }
        assert_eq!(s, ok, "after {passed} passed");
        passed += 1;
        assert!(passed < 200, "never refused");
    }
}

/// Asks `send` again (every 50 ms, at most 10 s) until it answers `ok`; every answer before
/// must be `refused`.
fn until_served(ok: u16, refused: u16, mut send: impl FnMut() -> u16) {
    let t = Instant::now();
    loop {
        match send() {
            s if s == ok => return,
            s if s == refused => {}
            other => panic!("{other} while waiting for the bucket to refill"),
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Requests a bucket of `burst` at one token a second lets through before the first refusal,
/// `secs` after its first request: at least the burst less `used` (taken before), at most
/// that plus what refilled (and one for rounding).
fn assert_burst(passed: usize, burst: usize, used: usize, secs: f64) {
    let least = burst - used;
    let most = least + secs.floor() as usize + 1;
    assert!(
        (least..=most).contains(&passed),
        "{passed} passed before the first refusal, in {secs:.2} s (burst {burst})"
    );
}

#[test]
fn the_kms_limits_each_peer_on_the_key_api_only() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).peer_rate(1, 5).start();
    let key = kms.create_dek("t");
    let enc = json!({"key_id": key, "plaintext": "aGk="});
    // The create took one token of the burst of 5.
    let (passed, secs) = until_refused(200, 429, || {
        kms.call("POST", "/encrypt", Some(enc.clone())).0
    });
    assert_burst(passed, 5, 1, secs);
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
    until_served(200, 429, || {
        kms.call("POST", "/encrypt", Some(enc.clone())).0
    });
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
    let kms = KmsBuilder::new(tmp.path()).start();
    let server = ServerBuilder::new(tmp.path())
        .kms(&kms)
        .limit("key_rate_per_sec", 1)
        .limit("key_rate_burst", 4)
        .start();

    let alice = server.as_role(Role::Backend, "alice");
    let agent = ureq::agent();
    let mut i = 0;
    let mut refused = None;
    let (ok, secs) = until_refused(201, 429, || {
        i += 1;
        let (s, body) = alice
            .send(
                &agent,
                "POST",
                "/v1/threads",
                Some(&json!({"title": format!("t{i}")})),
            )
            .unwrap();
        if s == 429 {
            refused = Some(body);
        }
        s
    });
    assert_burst(ok, 4, 0, secs);
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
        assert_eq!(server.healthz(), 200);
    }
    // Nothing was stored for the refused creates, and the key is served again later.
    let mut list = serde_json::Value::Null;
    until_served(200, 429, || {
        let (s, v) = alice.call("GET", "/v1/threads?limit=100", None);
        list = v;
        s
    });
    assert_eq!(list["threads"].as_array().unwrap().len(), ok, "{list}");
    until_served(201, 429, || {
        alice
            .send(
                &agent,
                "POST",
                "/v1/threads",
                Some(&json!({"title": "later"})),
            )
            .unwrap()
            .0
    });
}

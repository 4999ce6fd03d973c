//! A table of hostile requests against both services (the server over TCP, the KMS over its
//! Unix socket): oversize bodies and batches, deep JSON, invalid UTF-8, wrong types, empty and
//! huge ids, control characters and path separators in ids, unknown fields, duplicate keys,
//! bad and non-canonical base64, wrong methods, missing or malformed auth headers, header
//! floods. Each gets a 4xx (with the JSON error shape when it has a body), neither process
//! crashes, and neither store changes: `data.mdb` of both is byte-for-byte the same before
//! and after (a refused request commits nothing; LMDB readers do not write the data file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use progressdb_e2e::{Kms, Role, Server};
use serde_json::json;

/// Sends `raw` (a whole HTTP/1.1 request) and returns the status and body.
fn send<S: Read + Write>(mut s: S, raw: &[u8]) -> (u16, Vec<u8>) {
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no answer to {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )
        });
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| out[i + 4..].to_vec())
        .unwrap_or_default();
    (status, body)
}

fn request(method: &str, path: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// (what, method, path, headers, body).
type ServerCase = (&'static str, String, String, Vec<String>, Vec<u8>);

fn file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A 4xx; when there is a JSON body, it is the error shape with a code.
fn assert_refused(what: &str, status: u16, body: &[u8]) {
    assert!(
        (400..500).contains(&status),
        "{what}: {status} {}",
        String::from_utf8_lossy(body)
    );
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        assert!(v["error"]["code"].is_string(), "{what}: {v}");
    }
}

#[test]
fn hostile_requests_get_4xx_crash_nothing_and_change_no_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, mut kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Backend, "alice");
    let t = alice.create_thread("target");
    let tid = t["id"].as_str().unwrap().to_owned();
    let m = alice.post_message(&tid, json!("hello"));
    let mid = m["id"].as_str().unwrap().to_owned();
    let (_, k) =
        server
            .as_role(Role::Admin, "ops")
            .call("GET", &format!("/admin/threads/{tid}/kms"), None);
    let key = k["key_id"].as_str().unwrap().to_owned();
    // The stores' images are taken with both services stopped: every write they made is
    // committed once they have exited (an event, where a pause would only make it likely).
    let server_db = server.store.join("data.mdb");
    let kms_db = tmp.path().join("kms/store/data.mdb");
    let images = |kms: &mut Kms, server: &mut Server| {
        assert!(server.proc.sigterm().success());
        assert!(kms.proc.sigterm().success());
        let images = (file(&server_db), file(&kms_db));
        kms.restart();
        server.restart();
        images
    };
    let (server_before, kms_before) = images(&mut kms, &mut server);

    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let auth = format!("authorization: Bearer {}", server.keys.backend);
    let user = "x-user-id: alice".to_owned();
    let std_h = vec![
        auth.clone(),
        user.clone(),
        "content-type: application/json".into(),
    ];
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge_id = "t".repeat(10_000);
    let msgs = format!("/v1/threads/{tid}/messages");
    let one = format!("/v1/threads/{tid}/messages/{mid}");
    let mut flood = std_h.clone();
    flood.extend((0..500).map(|i| format!("x-flood-{i}: {}", "a".repeat(50))));
    let server_cases: Vec<ServerCase> = vec![
        (
            "oversize body",
            "POST".into(),
            msgs.clone(),
            std_h.clone(),
            vec![b'{'; (1 << 20) + 10],
        ),
        (
            "deep JSON",
            "POST".into(),
            msgs.clone(),
            std_h.clone(),
            format!("{{\"body\":{deep}}}").into_bytes(),
        ),
        (
            "invalid UTF-8 body",
            "POST".into(),
            msgs.clone(),
            std_h.clone(),
            b"{\"body\":\"\xff\xfe\"}".to_vec(),
        ),
        (
            "wrong type",
            "POST".into(),
            "/v1/threads".into(),
            std_h.clone(),
            br#"{"title":["a"]}"#.to_vec(),
        ),
        (
            "duplicate key",
            "POST".into(),
            "/v1/threads".into(),
            std_h.clone(),
            br#"{"title":"a","title":"b"}"#.to_vec(),
        ),
        (
            "empty title",
            "POST".into(),
            "/v1/threads".into(),
            std_h.clone(),
            br#"{"title":""}"#.to_vec(),
        ),
        (
            "huge thread id",
            "GET".into(),
            format!("/v1/threads/{huge_id}"),
            std_h.clone(),
            vec![],
        ),
        (
            "NUL in id",
            "GET".into(),
            "/v1/threads/t%00x".into(),
            std_h.clone(),
            vec![],
        ),
        (
            "newline in id",
            "DELETE".into(),
            "/v1/threads/t%0Ax".into(),
            std_h.clone(),
            vec![],
        ),
        (
            "slash in id",
            "DELETE".into(),
            "/v1/threads/..%2F..%2Fetc".into(),
            std_h.clone(),
            vec![],
        ),
        (
            "dot-dot path",
            "DELETE".into(),
            format!("/v1/threads/{tid}/messages/../../x"),
            std_h.clone(),
            vec![],
        ),
        (
            "bad message id",
            "PUT".into(),
            format!("{msgs}/99999999999999999999-000000"),
            std_h.clone(),
            br#"{"body":1}"#.to_vec(),
        ),
        (
            "wrong method",
            "PATCH".into(),
            one.clone(),
            std_h.clone(),
            br#"{"body":1}"#.to_vec(),
        ),
        (
            "no auth",
            "DELETE".into(),
            format!("/v1/threads/{tid}"),
            vec![user.clone()],
            vec![],
        ),
        (
            "bad scheme",
            "DELETE".into(),
            format!("/v1/threads/{tid}"),
            vec!["authorization: Basic YTpi".into(), user.clone()],
            vec![],
        ),
        (
            "unknown key",
            "DELETE".into(),
            format!("/v1/threads/{tid}"),
            vec!["authorization: Bearer nope".into(), user.clone()],
            vec![],
        ),
        (
            "bad user id",
            "DELETE".into(),
            format!("/v1/threads/{tid}"),
            vec![auth.clone(), "x-user-id: a/b\u{7f}".into()],
            vec![],
        ),
        (
            "frontend without signature",
            "DELETE".into(),
            format!("/v1/threads/{tid}"),
            vec![
                format!("authorization: Bearer {}", server.keys.frontend),
                user.clone(),
            ],
            vec![],
        ),
        (
            "header flood",
            "DELETE".into(),
            format!("/v1/threads/{tid}"),
            flood,
            vec![],
        ),
        (
            "bad limit",
            "GET".into(),
            format!("{msgs}?limit=-1"),
            std_h.clone(),
            vec![],
        ),
        (
            "bad cursor",
            "GET".into(),
            format!("{msgs}?cursor=..%2F"),
            std_h.clone(),
            vec![],
        ),
        (
            "bad order",
            "GET".into(),
            format!("{msgs}?order=sideways"),
            std_h.clone(),
            vec![],
        ),
        (
            "admin as backend",
            "POST".into(),
            format!("/admin/threads/{tid}/rotate-dek"),
            std_h.clone(),
            vec![],
        ),
    ];
    for (what, method, path, headers, body) in &server_cases {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (status, answer) = send(s, &request(method, path, headers, body));
        assert_refused(what, status, &answer);
        server.proc.assert_running();
    }
    // Raw bytes that are not valid HTTP at all, and non-ASCII in a header.
    for raw in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET /v1/threads HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \xff\xfe\r\nconnection: close\r\n\r\n",
    ] {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (status, answer) = send(s, raw);
        assert_refused("raw bytes", status, &answer);
    }

    // The KMS's client endpoint.
    let sock = kms.socket();
    let b64_big = "A".repeat(1_398_104 + 8);
    let kms_cases: Vec<(&str, &str, String, Vec<u8>)> = vec![
        (
            "oversize body",
            "POST",
            "/encrypt".into(),
            vec![b' '; (4 << 20) + 10],
        ),
        (
            "deep JSON",
            "POST",
            "/encrypt".into(),
            deep.clone().into_bytes(),
        ),
        (
            "array for object",
            "POST",
            "/encrypt".into(),
            format!(r#"["{key}","aGk="]"#).into_bytes(),
        ),
        (
            "invalid UTF-8",
            "POST",
            "/encrypt".into(),
            b"{\"key_id\":\"\xff\",\"plaintext\":\"aGk=\"}".to_vec(),
        ),
        (
            "unknown field",
            "POST",
            "/encrypt".into(),
            format!(r#"{{"key_id":"{key}","plaintext":"aGk=","x":1}}"#).into_bytes(),
        ),
        (
            "duplicate key",
            "POST",
            "/encrypt".into(),
            format!(r#"{{"key_id":"{key}","key_id":"{key}","plaintext":"aGk="}}"#).into_bytes(),
        ),
        (
            "bad base64",
            "POST",
            "/encrypt".into(),
            format!(r#"{{"key_id":"{key}","plaintext":"***"}}"#).into_bytes(),
        ),
        (
            "unpadded base64",
            "POST",
            "/encrypt".into(),
            format!(r#"{{"key_id":"{key}","plaintext":"aGk"}}"#).into_bytes(),
        ),
        (
            "base64 with a newline",
            "POST",
            "/encrypt".into(),
            format!(r#"{{"key_id":"{key}","plaintext":"aGk=\n"}}"#).into_bytes(),
        ),
        (
            "non-canonical base64",
            "POST",
            "/decrypt".into(),
            format!(r#"{{"key_id":"{key}","ciphertext":"aGl="}}"#).into_bytes(),
        ),
        (
            "huge plaintext",
            "POST",
            "/encrypt".into(),
            format!(r#"{{"key_id":"{key}","plaintext":"{b64_big}"}}"#).into_bytes(),
        ),
        (
            "empty key id",
            "POST",
            "/decrypt".into(),
            br#"{"key_id":"","ciphertext":"AAAA"}"#.to_vec(),
        ),
        (
            "huge key id",
            "GET",
            format!("/get_wrapped?key_id={}", "d".repeat(10_000)),
            vec![],
        ),
        (
            "control char in key id",
            "GET",
            "/get_wrapped?key_id=dek_%00".into(),
            vec![],
        ),
        (
            "path separator in thread id",
            "POST",
            "/create_dek_for_thread".into(),
            br#"{"thread_id":"../etc/passwd"}"#.to_vec(),
        ),
        (
            "huge thread id",
            "POST",
            "/create_dek_for_thread".into(),
            format!(r#"{{"thread_id":"{huge_id}"}}"#).into_bytes(),
        ),
        (
            "too many batch items",
            "POST",
            "/encrypt_batch".into(),
            format!(
                r#"{{"items":[{}]}}"#,
                vec![format!(r#"{{"key_id":"{key}","plaintext":""}}"#); 5000].join(",")
            )
            .into_bytes(),
        ),
        (
            "tampered ciphertext",
            "POST",
            "/decrypt".into(),
            format!(r#"{{"key_id":"{key}","ciphertext":"{}"}}"#, "A".repeat(40)).into_bytes(),
        ),
        ("wrong method", "DELETE", "/encrypt".into(), vec![]),
        ("unknown route", "POST", "/..%2F..%2Fadmin".into(), vec![]),
    ];
    for (what, method, path, body) in &kms_cases {
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (status, answer) = send(s, &request(method, path, &[], body));
        assert_refused(what, status, &answer);
        kms.proc.assert_running();
    }

    // Both still serve, and nothing stored changed in either service.
    server.proc.assert_running();
    kms.proc.assert_running();
    assert_eq!(server.healthz(), 200);
    assert_eq!(kms.call("GET", "/healthz", None).0, 200);
    let (server_after, kms_after) = images(&mut kms, &mut server);
    assert!(server_after == server_before, "the server's store changed");
    assert!(kms_after == kms_before, "the KMS's store changed");
    assert_eq!(alice.all_messages(&tid).len(), 1);
    alice.post_message(&tid, json!("still works"));
    server.proc.assert_running();
    kms.proc.assert_running();
}

/// Sends the head of `raw` (up to its blank line), waits, then the body, and reads the whole
/// answer: a connection reset anywhere fails.
fn send_split<S: Read + Write>(mut s: S, raw: &[u8]) -> u16 {
    let head = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    s.write_all(&raw[..head]).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    // The service may already have answered and shut its side: the body is then unwanted
    // but must still not cost the answer.
    let _ = s.write_all(&raw[head..]);
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{e} after {:?}", String::from_utf8_lossy(&out)));
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap()
}

/// An answer sent before the request's body was read (refused, unknown or unauthenticated
/// requests) reaches the client whole, although the body arrives after the answer was
/// written: both services drain a closing connection instead of resetting it.
#[test]
fn answers_sent_before_the_body_arrives_are_not_lost_to_a_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, server) = progressdb_e2e::system(tmp.path());
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let body = vec![b' '; 32 * 1024];
    for (path, want) in [("/nope", 404), ("/v1/threads", 401)] {
        for _ in 0..20 {
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(send_split(s, &request("POST", path, &[], &body)), want);
        }
    }
    for (path, want) in [("/admin/status", 403), ("/nope", 404)] {
        for _ in 0..20 {
            let s = std::os::unix::net::UnixStream::connect(kms.socket()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(send_split(s, &request("POST", path, &[], &body)), want);
        }
    }
}

//! The `progressdb` binary as a process: durability under SIGKILL, graceful SIGTERM, and
//! start-up refusals.
#![cfg(feature = "dev-embedded")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Caller, Client, Kms, Proc, TestEnv};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Posts as fast as possible, recording every acknowledged (201) message id.
async fn writer(
    c: Client,
    t: String,
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let h = [
            ("authorization", format!("Bearer {}", common::BACKEND)),
            ("x-user-id", "u".to_owned()),
        ];
        let body = serde_json::to_vec(&json!({"body": {"i": i}})).unwrap();
        // The server may die mid-request: a failed request is simply not acknowledged.
        let r = tokio::time::timeout(Duration::from_secs(5), try_post(c, &t, &h, body)).await;
        match r {
            Ok(Some(id)) => acked.lock().unwrap().push(id),
            _ => {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

async fn try_post(c: Client, t: &str, h: &[(&str, String)], body: Vec<u8>) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(c.addr).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("/v1/threads/{t}/messages"))
        .header("host", "x");
    for (k, v) in h {
        b = b.header(*k, v);
    }
    let req = b
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if resp.status() != 201 {
        return None;
    }
    use http_body_util::BodyExt as _;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["id"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_write_load_loses_no_acknowledged_message() {
    let env = TestEnv::new();
    let cfg = env.config(&Kms::Embedded, "");
    let mut p = Proc::spawn(&cfg);
    let c = Client::new(p.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "durable").await;

    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(writer(
            c,
            t.clone(),
            acked.clone(),
            stop.clone(),
        )));
    }
    // Once the load has built up (200 posts acknowledged), kill -9 in the middle of it.
    let started = std::time::Instant::now();
    while acked.lock().unwrap().len() < 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "fewer than 200 posts acknowledged in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.child.kill().unwrap();
    let _ = p.child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    eprintln!("{} writes acknowledged before SIGKILL", acked.len());
    assert!(
        acked.len() > 50,
        "only {} writes were acknowledged",
        acked.len()
    );

    let p2 = Proc::spawn(&cfg);
    let c2 = Client::new(p2.addr);
    let all = c2.all_messages(&u, &t, "asc", 500).await;
    let present: BTreeSet<String> = all
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = acked.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        all.iter().all(|m| m.get("body").is_some()),
        "unreadable message after the crash"
    );
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_request_then_exits_0() {
    let env = TestEnv::new();
    let cfg = env.config(&Kms::Embedded, "");
    let mut p = Proc::spawn(&cfg);
    let c = Client::new(p.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "graceful").await;

    // Start a request and send only half of its body, once the handler reads it (the event:
    // the server's `100 Continue`, sent when the body is first read).
    let body = serde_json::to_vec(&json!({"body": "sent across a shutdown"})).unwrap();
    let head = format!(
        "POST /v1/threads/{t}/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nx-user-id: u\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        common::BACKEND,
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("no 100 Continue within 5 s")
            .unwrap();
        assert_eq!(n, 1, "closed before 100 Continue: {interim:?}");
        interim.push(byte[0]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(&body[..10]).await.unwrap();
    p.signal(libc::SIGTERM);
    // New connections are refused (once the listener is closed: the event, at most 5 s)
    // while the in-flight request is still served.
    let signalled = std::time::Instant::now();
    while tokio::net::TcpStream::connect(p.addr).await.is_ok() {
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "still accepting 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.write_all(&body[10..]).await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert_eq!(p.wait(10), Some(0));
    let log = p.drain_log().join("\n");
    assert!(log.contains("shutting down"), "{log}");
    // A whole debug-level log holds no content, key or signature.
    for secret in [
        "sent across a shutdown",
        common::BACKEND,
        common::SIGNING_SECRET,
        common::MASTER_KEY_HEX,
    ] {
        assert!(!log.contains(secret), "log leaks {secret:?}");
    }

    // The message is there after a restart.
    let p2 = Proc::spawn(&cfg);
    let all = Client::new(p2.addr).all_messages(&u, &t, "asc", 10).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["body"], "sent across a shutdown");
}

#[test]
fn bad_configs_exit_2_with_one_line_naming_the_culprit() {
    let env = TestEnv::new();
    let run = |cfg: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_progressdb"))
            .args(["serve", "--config"])
            .arg(cfg)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A keys file readable by others.
    let keys = env.path().join("keys.toml");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = run(&env.config(&Kms::Embedded, ""));
    assert_eq!(code, Some(2));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("keys.toml") && err.contains("0644"), "{err}");
    assert!(!err.contains(common::ADMIN));
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A master key readable by the group.
    let mk = env.path().join("master.key");
    std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, err) = run(&env.config(&Kms::Embedded, ""));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("kms.master_key_file") && err.contains("master.key"),
        "{err}"
    );
    assert!(!err.contains(common::MASTER_KEY_HEX));
    std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A bad value.
    let (code, err) = run(&env.config(&Kms::Embedded, "[limits]\nmax_page_size = 0\n"));
    assert_eq!(code, Some(2));
    assert!(err.contains("limits.max_page_size"), "{err}");
    // A missing file.
    let (code, err) = run(&env.path().join("nope.toml"));
    assert_eq!(code, Some(2));
    assert!(err.contains("nope.toml"), "{err}");
}

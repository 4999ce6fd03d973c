//! Failures end to end: the KMS going away, the server killed with SIGKILL under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use progressdb_e2e::{KmsBuilder, Role, ServerBuilder};
use serde_json::json;

#[test]
fn kms_down_gives_503_stores_nothing_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, mut kms, server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Frontend, "alice");
    let t = alice.create_thread("before");
    let tid = t["id"].as_str().unwrap().to_owned();
    alice.post_message(&tid, json!("first"));

    assert!(kms.proc.sigterm().success());

    let (s, v) = alice.call(
        "POST",
        "/v1/threads",
        Some(json!({ "title": "during outage" })),
    );
    assert_eq!(s, 503, "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    let (s, v) = alice.call(
        "POST",
        &format!("/v1/threads/{tid}/messages"),
        Some(json!({ "body": "lost?" })),
    );
    assert_eq!(s, 503, "{v}");
    let body = v.to_string();
    assert!(
        !body.contains("kms.sock") && !body.contains("os error"),
        "5xx body leaks detail: {body}"
    );
    let (s, _) = server.proc_ready_status();
    assert_eq!(s, 503, "/readyz must say unready while the KMS is down");

    // Listing threads opens their sealed titles: 503 too while the KMS is down.
    let (s, v) = alice.call("GET", "/v1/threads", None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("kms_unavailable")),
        "{v}"
    );

    // The server recovers by itself once the KMS is back.
    kms.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, _) = alice.call(
            "POST",
            &format!("/v1/threads/{tid}/messages"),
            Some(json!({ "body": "after" })),
        );
        if s == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not recover after the KMS came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let bodies: Vec<serde_json::Value> = alice
        .all_messages(&tid)
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    // Nothing half-written meanwhile: one thread, and only the acknowledged messages.
    assert_eq!(bodies, vec![json!("first"), json!("after")]);
    let (_, v) = alice.call("GET", "/v1/threads", None);
    assert_eq!(v["threads"].as_array().unwrap().len(), 1, "{v}");
    let (s, _) = server.proc_ready_status();
    assert_eq!(s, 200);
}

/// `kill -STOP` / `-CONT`: a KMS that hangs instead of dying. Returns once every thread of
/// the process is stopped (`-STOP`) or none is (`-CONT`): a signal is delivered to each
/// thread asynchronously, and a request sent before the last thread stopped could still be
/// answered.
fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
    let want_stopped = sig == "-STOP";
    // The state letter of each thread (`T`: stopped), from /proc/<pid>/task/<tid>/stat.
    let states = || -> Vec<char> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|t| {
                    let stat = std::fs::read_to_string(t.ok()?.path().join("stat")).ok()?;
                    // `pid (comm) S ...`: the state follows the last ')'.
                    stat.rsplit_once(')')?.1.trim_start().chars().next()
                })
                .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = states();
        let stopped = s.iter().filter(|c| **c == 'T').count();
        if (want_stopped && !s.is_empty() && stopped == s.len()) || (!want_stopped && stopped == 0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "kill {sig} {pid}: thread states {s:?} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_hung_kms_costs_one_deadline_then_fails_fast_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    // One second per user request, retries included; the circuit opens after two failures
    // or one hang; the cooldown (half a second) is shorter than the time the test keeps
    // asking while the KMS hangs.
    let server = ServerBuilder::new(tmp.path())
        .kms(&kms)
        .kms_client("deadline_ms", 1000)
        .kms_client("breaker_failures", 2)
        .kms_client("breaker_cooldown_ms", 500)
        .start();
    let alice = server.as_role(Role::Backend, "alice");
    let t = alice.create_thread("hang");
    let tid = t["id"].as_str().unwrap().to_owned();
    alice.post_message(&tid, json!("before"));
    let post = |body: &str| {
        let t0 = Instant::now();
        let (s, v) = alice.call(
            "POST",
            &format!("/v1/threads/{tid}/messages"),
            Some(json!({ "body": body })),
        );
        (s, v, t0.elapsed())
    };

    signal(kms.proc.pid(), "-STOP");
    // The first request waits at most its deadline (not 3 x 10 s of attempts), then 503: its
    // timed-out attempt (or the background probe's, whichever came first) opens the circuit.
    let (s, v, took) = post("during");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "kms_unavailable", "{v}");
    assert!(
        took < Duration::from_millis(3000),
        "first request took {took:?}"
    );
    // The circuit is open: every later request fails at once, reads too, for longer than
    // the cooldown (500 ms): no user request is let through as the probe that would wait
    // out the hung KMS; only the server's own /readyz probes try it.
    let answer = ureq::post(&format!("{}/v1/threads/{tid}/messages", alice.base))
        .set("Authorization", &format!("Bearer {}", alice.key))
        .set("X-User-ID", "alice")
        .send_json(json!({ "body": "during" }));
    match answer {
        Err(ureq::Error::Status(503, r)) => assert_eq!(r.header("Retry-After"), Some("1")),
        other => panic!("expected a 503: {other:?}"),
    }
    let open_since = Instant::now();
    while open_since.elapsed() < Duration::from_millis(2500) {
        let (s, v, took) = post("during");
        assert_eq!(s, 503, "{v}");
        assert!(took < Duration::from_millis(500), "fail fast: {took:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    let (s, _) = alice.call("GET", &format!("/v1/threads/{tid}/messages"), None);
    assert_eq!(s, 503);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );

    // The KMS wakes up: a probe finds it back without any restart.
    signal(kms.proc.pid(), "-CONT");
    let back = Instant::now();
    loop {
        let (s, _, _) = post("after");
        if s == 201 {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(10), "no recovery");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
    // Nothing half-written: only the acknowledged messages.
    let bodies: Vec<serde_json::Value> = alice
        .all_messages(&tid)
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(bodies, vec![json!("before"), json!("after")]);
}

#[test]
fn sigkill_under_write_load_loses_no_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Frontend, "alice");
    let tid = alice.create_thread("load")["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Writers record every acknowledged message (id -> body).
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Instant::now() + Duration::from_millis(1500);
    let mut writers = Vec::new();
    for w in 0..6 {
        let api = alice.clone();
        let acked = acked.clone();
        let tid = tid.clone();
        writers.push(std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build();
            let mut i = 0;
            // Bounded: stops at the deadline or when the server is gone.
            while Instant::now() < stop + Duration::from_secs(2) && i < 10_000 {
                let text = format!("w{w}-m{i}");
                let path = format!("/v1/threads/{tid}/messages");
                match api.send(&agent, "POST", &path, Some(&json!({ "body": text }))) {
                    Ok((201, answer)) => {
                        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .insert(v["id"].as_str().unwrap().to_owned(), text);
                    }
                    _ => return,
                }
                i += 1;
            }
        }));
    }
    std::thread::sleep(stop.saturating_duration_since(Instant::now()));
    server.proc.sigkill();
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the load was too small to mean anything: {}",
        acked.len()
    );

    server.restart();
    let stored: BTreeMap<String, String> = alice
        .all_messages(&tid)
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["body"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (id, text) in &acked {
        assert_eq!(
            stored.get(id),
            Some(text),
            "acknowledged message {id} lost or changed"
        );
    }
}

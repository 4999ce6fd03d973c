//! Kills under load, over and over: the server SIGKILLed ten times in a row under writers
//! that create threads and post messages, and the KMS SIGKILLed and restarted under the same
//! mixed load. After each kill, every acknowledged thread and message is there and decrypts,
//! and no thread exists without its DEK (each one still takes new messages).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use progressdb_e2e::{Api, Role};
use serde_json::json;

/// What the writers had acknowledged: thread id → (message id → body).
type Acked = Arc<Mutex<BTreeMap<String, BTreeMap<String, String>>>>;

/// Starts `n` writers against `api`: each creates a thread, then posts to it, and every tenth
/// post makes a new thread. Refusals (503 while a process is down) and cut connections are
/// retried later; only 201s are recorded. Returns a stop flag and the join handles.
fn writers(
    api: &Api,
    n: usize,
    acked: &Acked,
    refused: &Arc<AtomicU64>,
) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..n {
        let (api, acked, stop, refused) =
            (api.clone(), acked.clone(), stop.clone(), refused.clone());
        handles.push(std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build();
            let mut thread: Option<String> = None;
            let mut i = 0u64;
            // Posts left before the next new thread.
            let mut posts_left = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let Some(tid) = thread.clone().filter(|_| posts_left > 0) else {
                    match api.send(
                        &agent,
                        "POST",
                        "/v1/threads",
                        Some(&json!({ "title": format!("w{w}-{i}") })),
                    ) {
                        Ok((201, body)) => {
                            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                            let id = v["id"].as_str().unwrap().to_owned();
                            acked.lock().unwrap().entry(id.clone()).or_default();
                            thread = Some(id);
                            posts_left = 9;
                        }
                        Ok((503, _)) | Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Ok((s, b)) => panic!("create thread: {s} {b}"),
                    }
                    continue;
                };
                let text = format!("w{w}-m{i}");
                match api.send(
                    &agent,
                    "POST",
                    &format!("/v1/threads/{tid}/messages"),
                    Some(&json!({ "body": text })),
                ) {
                    Ok((201, body)) => {
                        posts_left -= 1;
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .entry(tid)
                            .or_default()
                            .insert(v["id"].as_str().unwrap().to_owned(), text);
                    }
                    Ok((503, _)) | Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok((s, b)) => panic!("post: {s} {b}"),
                }
            }
        }));
    }
    (stop, handles)
}

/// Every acknowledged thread and message is stored, readable and unchanged, and every
/// acknowledged thread still takes a message (its DEK exists in the KMS).
fn check(api: &Api, admin: &Api, acked: &Acked, round: usize) {
    let acked = acked.lock().unwrap().clone();
    for (tid, msgs) in &acked {
        let (s, k) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
        assert_eq!(s, 200, "round {round}: thread {tid} has no key record: {k}");
        let stored: BTreeMap<String, String> = api
            .all_messages(tid)
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["body"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        for (id, text) in msgs {
            assert_eq!(
                stored.get(id),
                Some(text),
                "round {round}: acknowledged message {id} of {tid} lost or changed"
            );
        }
    }
}

#[test]
fn the_server_killed_ten_times_under_load_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, mut server) = progressdb_e2e::system(tmp.path());
    let api = server.as_role(Role::Backend, "alice");
    let admin = server.as_role(Role::Admin, "ops");
    let acked: Acked = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let mut before = 0;
    for round in 0..10 {
        let (stop, handles) = writers(&api, 4, &acked, &refused);
        std::thread::sleep(Duration::from_millis(300));
        server.proc.sigkill();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
        server.restart();
        check(&api, &admin, &acked, round);
        let now: usize = acked.lock().unwrap().values().map(BTreeMap::len).sum();
        assert!(now > before, "round {round}: no write was acknowledged");
        before = now;
    }
    // Each thread still takes a message after the ten kills.
    for tid in acked.lock().unwrap().keys() {
        api.post_message(tid, json!("after"));
    }
    eprintln!(
        "10 kills: {} threads, {before} messages acknowledged and found, {} requests refused or cut",
        acked.lock().unwrap().len(),
        refused.load(Ordering::Relaxed)
    );
}

#[test]
fn the_kms_killed_and_restarted_under_load_loses_nothing_and_no_thread_lacks_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (hsm, mut kms, server) = progressdb_e2e::system(tmp.path());
    let api = server.as_role(Role::Backend, "alice");
    let admin = server.as_role(Role::Admin, "ops");
    let acked: Acked = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let (stop, handles) = writers(&api, 4, &acked, &refused);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        kms.proc.sigkill();
        // Down for a moment under load: requests answer 503 (counted), none hangs.
        std::thread::sleep(Duration::from_millis(300));
        kms.restart(&hsm);
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the kills were noticed by the writers"
    );
    // Back by itself: the server's readiness (which probes the KMS past any open circuit)
    // turns 200 within seconds, with no restart of the server.
    let t0 = std::time::Instant::now();
    while server.proc_ready_status().0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server did not recover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check(&api, &admin, &acked, 0);
    // The server recovered by itself: every acknowledged thread takes a new message now.
    for tid in acked.lock().unwrap().keys() {
        api.post_message(tid, json!("after"));
    }
}

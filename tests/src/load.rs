//! Mixed write load for fault tests: writers that create threads and post messages, record
//! only what was acknowledged (201), and count what was refused or cut, and the check that
//! everything acknowledged is still there and readable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::Api;

/// Items of a message page that did not open (`message_unreadable`, or a KMS failure for
/// that item): a page answers 200 with them, so a reader counts them as failed reads.
pub fn unreadable_items(page: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(page).map_or(1, |v| {
        v["messages"]
            .as_array()
            .map_or(1, |m| m.iter().filter(|i| i.get("error").is_some()).count())
    })
}

/// What the writers had acknowledged: thread id → (message id → body).
pub type Acked = Arc<Mutex<BTreeMap<String, BTreeMap<String, String>>>>;

/// Starts `n` writers against `api`: each creates a thread, then posts to it, and every tenth
/// post makes a new thread. Refusals (503 while a process is down) and cut connections are
/// retried later; only 201s are recorded. Returns a stop flag and the join handles.
pub fn writers(
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
            let mut said = 0u32;
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
                        Ok((503, b)) => {
                            note(&mut said, w, "create thread", &format!("503 {b}"));
                            refused.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            note(&mut said, w, "create thread", &e.to_string());
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
                    Ok((503, b)) => {
                        note(&mut said, w, "post", &format!("503 {b}"));
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        note(&mut said, w, "post", &e.to_string());
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
pub fn check(api: &Api, admin: &Api, acked: &Acked, round: usize) {
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

/// Prints the first few refusals of writer `w` (what a failing test needs to show).
fn note(said: &mut u32, w: usize, what: &str, why: &str) {
    if *said < 3 {
        *said += 1;
        eprintln!("writer {w}: {what} refused: {why}");
    }
}

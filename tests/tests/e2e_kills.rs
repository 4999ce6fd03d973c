//! Kills under load, over and over: the server SIGKILLed ten times in a row under writers
//! that create threads and post messages, and the KMS SIGKILLed and restarted under the same
//! mixed load. After each kill, every acknowledged thread and message is there and decrypts,
//! and no thread exists without its DEK (each one still takes new messages).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use progressdb_e2e::load::{check, writers, Acked};
use progressdb_e2e::Role;
use serde_json::json;

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
    let (_hsm, mut kms, server) = progressdb_e2e::system(tmp.path());
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
        kms.restart();
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

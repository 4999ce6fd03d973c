//! Several KMS replicas: two `progressdb-kms` processes on one SoftHSM token and one
//! PostgreSQL database (a private cluster), behind one server with `kms.endpoints`. Killing a
//! replica under a mixed load (thread creates, posts, reads) fails no request; both replicas
//! serve every key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use progressdb_e2e::load::{check, writers, Acked};
use progressdb_e2e::{Kms, KmsStore, Provider, Role, Server, SoftHsm};
use serde_json::json;
use testkit::pg::PgCluster;

struct Replicated {
    _pg: PgCluster,
    hsm: SoftHsm,
    kms: Vec<Kms>,
    server: Server,
    _tmp: tempfile::TempDir,
}

fn replicated(n: usize) -> Replicated {
    let pg = PgCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(tmp.path());
    let store = KmsStore::Postgres(pg.new_database());
    let kms: Vec<Kms> = (0..n)
        .map(|i| {
            let root = tmp.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&root).unwrap();
            Kms::start_on(&root, &hsm, &store, "")
        })
        .collect();
    let provider = Provider::Replicas {
        endpoints: kms.iter().map(|k| k.endpoint.clone()).collect(),
    };
    let server = Server::start(tmp.path(), "progressdb", &provider, true);
    Replicated {
        _pg: pg,
        hsm,
        kms,
        server,
        _tmp: tmp,
    }
}

/// Readers of every acknowledged thread: each read must answer 200 (counted otherwise).
fn readers(
    api: &progressdb_e2e::Api,
    acked: &Acked,
    failed: &Arc<AtomicU64>,
    reads: &Arc<AtomicU64>,
) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..2)
        .map(|_| {
            let (api, acked, stop, failed, reads) = (
                api.clone(),
                acked.clone(),
                stop.clone(),
                failed.clone(),
                reads.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                while !stop.load(Ordering::Relaxed) {
                    let threads: Vec<String> = acked.lock().unwrap().keys().cloned().collect();
                    for tid in threads.iter().rev().take(5) {
                        match api.send(&agent, "GET", &format!("/v1/threads/{tid}/messages"), None)
                        {
                            Ok((200, _)) => {
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                eprintln!("read of {tid} failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    (stop, handles)
}

#[test]
fn killing_one_replica_under_mixed_load_fails_no_request() {
    let mut sys = replicated(2);
    let api = sys.server.as_role(Role::Backend, "alice");
    let admin = sys.server.as_role(Role::Admin, "ops");
    let acked: Acked = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let failed_reads = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let (stop_w, writers) = writers(&api, 4, &acked, &refused);
    std::thread::sleep(Duration::from_millis(300));
    let (stop_r, readers) = readers(&api, &acked, &failed_reads, &reads);
    // Kill each replica in turn, bringing the other back first.
    for victim in [0usize, 1] {
        std::thread::sleep(Duration::from_millis(800));
        sys.kms[victim].proc.sigkill();
        std::thread::sleep(Duration::from_millis(1200));
        let hsm = &sys.hsm;
        sys.kms[victim].restart(hsm);
    }
    std::thread::sleep(Duration::from_millis(800));
    stop_w.store(true, Ordering::Relaxed);
    stop_r.store(true, Ordering::Relaxed);
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    let threads = acked.lock().unwrap().len();
    let messages: usize = acked.lock().unwrap().values().map(|m| m.len()).sum();
    eprintln!(
        "2 replicas, each killed once: {threads} threads, {messages} messages, {} reads; {} writes and {} reads failed",
        reads.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        failed_reads.load(Ordering::Relaxed)
    );
    assert_eq!(refused.load(Ordering::Relaxed), 0, "a write failed");
    assert_eq!(failed_reads.load(Ordering::Relaxed), 0, "a read failed");
    assert!(threads > 10 && messages > 50, "the load ran");
    assert!(reads.load(Ordering::Relaxed) > 20, "the reads ran");
    check(&api, &admin, &acked, 0);
    // Every key is served by each replica alone.
    for victim in [0usize, 1] {
        sys.kms[victim].proc.sigkill();
        for tid in acked.lock().unwrap().keys().take(20) {
            api.post_message(tid, json!("one replica"));
        }
        let hsm = &sys.hsm;
        sys.kms[victim].restart(hsm);
    }
}

/// A DEK cached by one replica stops being served by it within the coherence bound (2 ×
/// `store.coherence_ms`, 1 s by default) once another replica destroys it, although the
/// cache TTL is 300 s.
#[test]
fn a_key_destroyed_on_one_replica_is_refused_by_the_other_within_the_bound() {
    let sys = replicated(2);
    let (a, b) = (&sys.kms[0], &sys.kms[1]);
    let (s, k) = a.call(
        "POST",
        "/create_dek_for_thread",
        Some(json!({ "thread_id": "coherent" })),
    );
    assert_eq!(s, 200, "{k}");
    let key = k["key_id"].as_str().unwrap().to_owned();
    let encrypt = |kms: &Kms| {
        kms.call(
            "POST",
            "/encrypt",
            Some(json!({ "key_id": key, "plaintext": "aGVsbG8=" })),
        )
        .0
    };
    // Wait until b's cache is in use (its first change-feed poll), then warm it.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(encrypt(b), 200);
    let m = b.metrics();
    let hits_before = progressdb_e2e::metric(&m, "progressdb_kms_cache_hits_total").unwrap();
    assert_eq!(encrypt(b), 200);
    let m = b.metrics();
    assert!(
        progressdb_e2e::metric(&m, "progressdb_kms_cache_hits_total").unwrap() > hits_before,
        "b serves the key from its cache"
    );
    let (s, v) = a.call("POST", "/destroy_key", Some(json!({ "key_id": key })));
    assert_eq!(s, 200, "{v}");
    let t0 = std::time::Instant::now();
    while encrypt(b) != 404 {
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "b still serves the destroyed key after {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("destroyed on a, refused by b after {:?}", t0.elapsed());
}

//! The client over several KMS replicas, against stub replicas on real Unix sockets whose
//! behaviour each test scripts: load is spread, a dead or failing replica costs no call, a
//! create whose answer was lost is retried elsewhere with the same idempotency key, and the
//! health check ejects a failing replica and takes it back. The real KMS replicas are tested
//! end to end elsewhere; here only the client's logic is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// DROP: a replica killed after it acted; HANG: a hung replica (`/readyz` included).
use common::mode::{DROP, HANG, OK, UNAVAILABLE};
use common::{Answer, StubKms, ENCRYPTED};
use kms_api::client::{BreakerConfig, ClientError, Endpoint, KmsClient, KmsClientConfig};
use kms_api::{KeyId, ThreadId};

struct Replica {
    kms: StubKms,
    mode: Arc<AtomicU8>,
    /// Requests other than `/readyz`.
    calls: Arc<AtomicU32>,
    readyz: Arc<AtomicU32>,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Replica {
    async fn start(mode: u8) -> Replica {
        let mode = Arc::new(AtomicU8::new(mode));
        let (calls, readyz, bodies): (Arc<AtomicU32>, Arc<AtomicU32>, Arc<Mutex<Vec<_>>>) =
            Default::default();
        let (m, c, r, b) = (mode.clone(), calls.clone(), readyz.clone(), bodies.clone());
        let kms = StubKms::start(move |path, body| {
            let mode = m.load(Ordering::SeqCst);
            if mode == HANG {
                return Answer::Hang;
            }
            if path == "/readyz" {
                r.fetch_add(1, Ordering::SeqCst);
            } else {
                c.fetch_add(1, Ordering::SeqCst);
                if let Ok(v) = serde_json::from_slice(body) {
                    b.lock().unwrap().push(v);
                }
            }
            match (mode, path) {
                (DROP, p) if p != "/readyz" => Answer::Drop,
                (UNAVAILABLE | DROP, _) => Answer::Json(
                    503,
                    r#"{"error":{"code":"unavailable","message":"down"}}"#.into(),
                ),
                (_, "/readyz") => Answer::Json(200, r#"{"status":"ready"}"#.into()),
                (_, "/create_dek_for_thread") => {
                    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
                    // The key id a real KMS derives from the request.
                    let thread = ThreadId::parse(v["thread_id"].as_str().unwrap()).unwrap();
                    let idem =
                        kms_api::IdempotencyKey::parse(v["idempotency_key"].as_str().unwrap())
                            .unwrap();
                    let key = KeyId::derived(&thread, &idem);
                    Answer::Json(
                        200,
                        format!(
                            r#"{{"key_id":"{key}","wrapped":"AQID","kek_id":"kek","kek_version":1}}"#
                        ),
                    )
                }
                _ => Answer::Json(200, ENCRYPTED.into()),
            }
        })
        .await;
        Replica {
            kms,
            mode,
            calls,
            readyz,
            bodies,
        }
    }

    fn endpoint(&self) -> Endpoint {
        self.kms.endpoint()
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

fn client(endpoints: Vec<Endpoint>, f: impl FnOnce(&mut KmsClientConfig)) -> KmsClient {
    let mut cfg = KmsClientConfig::replicas(endpoints, None);
    f(&mut cfg);
    KmsClient::new(cfg).unwrap()
}

/// Waits (at most 10 s) until `r` has been probed `n` times in all.
async fn probes_after(r: &Replica, n: u32) {
    let t = std::time::Instant::now();
    while r.readyz.load(Ordering::SeqCst) < n {
        assert!(t.elapsed() < Duration::from_secs(10), "no health probes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn encrypt(c: &KmsClient) -> Result<(), ClientError> {
    let key = KeyId::parse("dek_00000000000000000000000000000000").unwrap();
    c.encrypt(&key, b"hi", None).await.map(|_| ())
}

#[tokio::test]
async fn calls_are_spread_over_healthy_replicas() {
    let (a, b) = (Replica::start(OK).await, Replica::start(OK).await);
    let c = client(vec![a.endpoint(), b.endpoint()], |_| {});
    for _ in 0..100 {
        encrypt(&c).await.unwrap();
    }
    assert_eq!(a.calls() + b.calls(), 100);
    assert!(
        a.calls() >= 40 && b.calls() >= 40,
        "{} / {}",
        a.calls(),
        b.calls()
    );
}

#[tokio::test]
async fn a_dead_or_failing_replica_fails_no_call_and_is_ejected() {
    let live = Replica::start(OK).await;
    let failing = Replica::start(UNAVAILABLE).await;
    let dead_dir = tempfile::tempdir().unwrap();
    let dead = Endpoint::Unix(dead_dir.path().join("gone.sock"));
    let c = client(vec![dead, failing.endpoint(), live.endpoint()], |c| {
        c.max_retries = 0;
        c.breaker = BreakerConfig {
            failures: 2,
            cooldown: Duration::from_secs(60),
        };
    });
    for i in 0..60 {
        encrypt(&c)
            .await
            .unwrap_or_else(|e| panic!("call {i} failed: {e}"));
    }
    assert_eq!(live.calls(), 60, "every call ended on the live replica");
    // The failing one was tried until its circuit opened (2 failures), then left alone.
    assert_eq!(failing.calls(), 2, "{}", failing.calls());
    // When every replica is down the call fails, with the reason.
    live.set(UNAVAILABLE);
    let c = client(vec![failing.endpoint(), live.endpoint()], |c| {
        c.max_retries = 1;
        c.breaker = BreakerConfig {
            failures: 0,
            cooldown: Duration::ZERO,
        };
    });
    assert!(matches!(
        encrypt(&c).await,
        Err(ClientError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_retried_elsewhere_with_the_same_idempotency_key() {
    let (a, b) = (Replica::start(DROP).await, Replica::start(OK).await);
    let c = client(vec![a.endpoint(), b.endpoint()], |c| {
        c.breaker = BreakerConfig {
            failures: 0,
            cooldown: Duration::ZERO,
        };
    });
    let thread = ThreadId::parse("t1").unwrap();
    for _ in 0..10 {
        let created = c.create_dek_for_thread(&thread).await.unwrap();
        let seen_b = b.bodies.lock().unwrap().last().cloned().unwrap();
        let key = seen_b["idempotency_key"].as_str().unwrap().to_owned();
        assert_eq!(
            created.key_id,
            KeyId::derived(&thread, &kms_api::IdempotencyKey::parse(&key).unwrap())
        );
    }
    // Every call that reached the dropping replica first carried the key its retry did.
    let dropped = a.bodies.lock().unwrap().clone();
    let answered = b.bodies.lock().unwrap().clone();
    assert!(
        !dropped.is_empty(),
        "round-robin sent some calls to the dropping replica"
    );
    for d in &dropped {
        assert!(
            answered
                .iter()
                .any(|x| x["idempotency_key"] == d["idempotency_key"]),
            "a retried create changed its idempotency key: {d}"
        );
    }
    // Different calls, different keys.
    let mut keys: Vec<&str> = answered
        .iter()
        .map(|v| v["idempotency_key"].as_str().unwrap())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 10);
}

#[tokio::test]
async fn the_health_check_ejects_a_failing_replica_and_takes_it_back() {
    let (a, b) = (Replica::start(OK).await, Replica::start(OK).await);
    let c = client(vec![a.endpoint(), b.endpoint()], |c| {
        c.health_interval = Duration::from_millis(50);
        c.breaker = BreakerConfig {
            failures: 2,
            cooldown: Duration::from_secs(60),
        };
    });
    let checks = c.spawn_health_checks();
    a.set(UNAVAILABLE);
    // Two failed probes open a's circuit before any user call. Waited for in probes: a
    // replica's probes follow one another, so once the fourth since the switch has arrived,
    // the answers of the two before it (certainly failures: the first may have read the mode
    // just before the switch) have been taken.
    let r0 = a.readyz.load(Ordering::SeqCst);
    probes_after(&a, r0 + 4).await;
    assert!(a.readyz.load(Ordering::SeqCst) >= 2);
    let before = a.calls();
    for _ in 0..20 {
        encrypt(&c).await.unwrap();
    }
    assert_eq!(
        a.calls(),
        before,
        "no user call went to the ejected replica"
    );
    // Back: a successful probe closes its circuit (long before the 60 s cooldown), waited
    // for in probes as above.
    a.set(OK);
    let r1 = a.readyz.load(Ordering::SeqCst);
    probes_after(&a, r1 + 3).await;
    for _ in 0..20 {
        encrypt(&c).await.unwrap();
    }
    assert!(a.calls() > before, "the replica was taken back");
    // Readiness: any replica ready is ready.
    b.set(UNAVAILABLE);
    c.ready().await.unwrap();
    a.set(UNAVAILABLE);
    assert!(c.ready().await.is_err());
    drop(c);
    // The check ends with the last client handle.
    tokio::time::timeout(Duration::from_secs(2), checks)
        .await
        .unwrap()
        .unwrap();
}

/// A replica comes back while the other dies (a restart after a kill, then a second kill):
/// the first's circuit is still open and the second's is not yet (one failure of the five
/// that open it). The call has the first probed at once and goes to it, instead of retrying
/// only the replica that just died and failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_has_a_returned_replica_probed_at_once_and_goes_to_it() {
    let (a, b) = (Replica::start(OK).await, Replica::start(OK).await);
    let c = client(vec![a.endpoint(), b.endpoint()], |c| {
        c.health_interval = Duration::from_secs(3);
        c.breaker = BreakerConfig {
            cooldown: Duration::from_secs(60),
            ..BreakerConfig::default()
        };
    });
    let checks = c.spawn_health_checks();
    a.set(UNAVAILABLE);
    for _ in 0..20 {
        encrypt(&c).await.unwrap();
    }
    let before = a.calls();
    encrypt(&c).await.unwrap();
    assert_eq!(a.calls(), before, "a's circuit is open");
    // Just after a probe of a (so the next tick is a whole interval away), a is back and b
    // dies.
    let seen = a.readyz.load(Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), async {
        while a.readyz.load(Ordering::SeqCst) == seen {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    a.set(OK);
    b.set(UNAVAILABLE);
    let t = std::time::Instant::now();
    encrypt(&c).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "waited {:?}: the call waited for the next tick instead of asking for a probe",
        t.elapsed()
    );
    assert_eq!(
        a.calls(),
        before + 1,
        "the call went to the returned replica"
    );
    checks.abort();
}

/// Each replica is probed on its own schedule: a hung one, whose probes wait out the request
/// timeout, does not slow the probes of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_delays_no_other_replicas_health_check() {
    let (a, b) = (Replica::start(HANG).await, Replica::start(OK).await);
    let c = client(vec![a.endpoint(), b.endpoint()], |c| {
        c.health_interval = Duration::from_millis(100);
        c.request_timeout = Duration::from_secs(30);
        c.deadline = Duration::from_secs(30);
    });
    let checks = c.spawn_health_checks();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let probes = b.readyz.load(Ordering::SeqCst);
    assert!(
        probes >= 5,
        "b was probed {probes} times in 1 s at a 100 ms interval while a hung"
    );
    checks.abort();
}

#[test]
fn an_empty_replica_list_is_refused() {
    let e = KmsClient::new(KmsClientConfig::replicas(vec![], None)).unwrap_err();
    assert!(matches!(e, ClientError::Config(_)));
}

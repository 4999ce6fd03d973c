//! The KMS client's retries, backoff, deadline and circuit breaker, against a stub KMS on a
//! real Unix socket whose answers each test scripts (503 `unavailable`, 503 `overloaded`,
//! never answering, or a valid `/encrypt` answer). The real KMS is tested elsewhere; here only
//! the client's logic is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mode::{HANG as SILENT, OK, OVERLOADED, UNAVAILABLE};
use common::{Answer, StubKms, ENCRYPTED};
use kms_api::client::{BreakerConfig, ClientError, KmsClient, KmsClientConfig};
use kms_api::KeyId;

struct Stub {
    kms: StubKms,
    mode: Arc<AtomicU8>,
    requests: Arc<AtomicU32>,
}

impl Stub {
    async fn start(mode: u8) -> Stub {
        let mode = Arc::new(AtomicU8::new(mode));
        let requests = Arc::new(AtomicU32::new(0));
        let (m, n) = (mode.clone(), requests.clone());
        let kms = StubKms::start(move |_, _| {
            n.fetch_add(1, Ordering::SeqCst);
            match m.load(Ordering::SeqCst) {
                UNAVAILABLE => Answer::Json(
                    503,
                    r#"{"error":{"code":"unavailable","message":"HSM unavailable"}}"#.into(),
                ),
                OVERLOADED => Answer::Json(
                    503,
                    r#"{"error":{"code":"overloaded","message":"busy"}}"#.into(),
                ),
                SILENT => Answer::Hang,
                _ => Answer::Json(200, ENCRYPTED.into()),
            }
        })
        .await;
        Stub {
            kms,
            mode,
            requests,
        }
    }

    fn client(&self, f: impl FnOnce(&mut KmsClientConfig)) -> KmsClient {
        let mut cfg = KmsClientConfig::new(self.kms.endpoint(), None);
        f(&mut cfg);
        KmsClient::new(cfg).unwrap()
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn seen(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn encrypt(c: &KmsClient) -> Result<(), ClientError> {
    let key = KeyId::parse("dek_00000000000000000000000000000000").unwrap();
    c.encrypt(&key, b"hi", None).await.map(|_| ())
}

const NO_BREAKER: BreakerConfig = BreakerConfig {
    failures: 0,
    cooldown: Duration::ZERO,
};

#[tokio::test]
async fn retries_with_backoff_then_gives_up() {
    let stub = Stub::start(UNAVAILABLE).await;
    let c = stub.client(|c| {
        c.max_retries = 2;
        c.breaker = NO_BREAKER;
    });
    let t = Instant::now();
    let e = encrypt(&c).await.unwrap_err();
    assert!(matches!(e, ClientError::Unavailable(_)), "{e}");
    assert_eq!(stub.seen(), 3, "the first attempt and two retries");
    // Backoff 50 ms then 100 ms between the attempts.
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );

    // A KMS that comes back during the retries: the call succeeds. It comes back when the
    // first retry reaches it (an event, not a moment: however slow the machine, the first
    // attempt has been refused and the call retried).
    let stub = Stub::start(UNAVAILABLE).await;
    let c = stub.client(|c| {
        c.max_retries = 5;
        c.breaker = NO_BREAKER;
    });
    let flip = {
        let (mode, requests) = (stub.mode.clone(), stub.requests.clone());
        tokio::spawn(async move {
            while requests.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            mode.store(OK, Ordering::SeqCst);
        })
    };
    encrypt(&c).await.unwrap();
    flip.await.unwrap();
    assert!(stub.seen() >= 2, "a refused attempt, then a retry");

    // Overloaded is retried too, and reported as such.
    let stub = Stub::start(OVERLOADED).await;
    let c = stub.client(|c| {
        c.max_retries = 1;
        c.breaker = NO_BREAKER;
    });
    let e = encrypt(&c).await.unwrap_err();
    assert!(matches!(e, ClientError::Overloaded(_)), "{e}");
    assert_eq!(stub.seen(), 2);
}

#[tokio::test]
async fn one_deadline_bounds_every_attempt_and_retry() {
    // A KMS that accepts and never answers (a stopped process): without the deadline each of
    // the three attempts would wait the 10 s request timeout.
    let stub = Stub::start(SILENT).await;
    let c = stub.client(|c| {
        c.request_timeout = Duration::from_secs(10);
        c.max_retries = 2;
        c.deadline = Duration::from_millis(400);
        c.breaker = NO_BREAKER;
    });
    let t = Instant::now();
    let e = encrypt(&c).await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(e, ClientError::Unavailable(_)), "{e}");
    assert!(took >= Duration::from_millis(380), "{took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "the deadline held: {took:?}"
    );
    assert_eq!(
        stub.seen(),
        1,
        "no retry is started that could not finish in time"
    );
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_a_probe_closes_it() {
    const COOLDOWN: Duration = Duration::from_secs(1);
    let stub = Stub::start(UNAVAILABLE).await;
    let c = stub.client(|c| {
        c.max_retries = 0;
        c.breaker = BreakerConfig {
            failures: 3,
            cooldown: COOLDOWN,
        };
    });
    for _ in 0..3 {
        assert!(encrypt(&c).await.is_err());
    }
    assert_eq!(stub.seen(), 3);
    // Open: calls fail at once without reaching the KMS (well within the cooldown, however
    // loaded the machine: the count below is what matters, the time only has to stay
    // under the cooldown).
    let t = Instant::now();
    for _ in 0..10 {
        let e = encrypt(&c).await.unwrap_err();
        assert!(e.to_string().contains("circuit open"), "{e}");
    }
    assert!(t.elapsed() < COOLDOWN, "{:?}", t.elapsed());
    assert_eq!(stub.seen(), 3, "no call reached the KMS while open");

    // After the cooldown one probe goes; it fails: open again.
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert!(encrypt(&c).await.is_err());
    assert_eq!(stub.seen(), 4);
    assert!(encrypt(&c)
        .await
        .unwrap_err()
        .to_string()
        .contains("circuit open"));
    assert_eq!(stub.seen(), 4);

    // The KMS is back: the next probe succeeds and closes the circuit.
    stub.set(OK);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    encrypt(&c).await.unwrap();
    for _ in 0..5 {
        encrypt(&c).await.unwrap();
    }
    assert_eq!(stub.seen(), 10);
}

#[tokio::test]
async fn a_readiness_probe_closes_the_circuit_and_overload_never_opens_it() {
    let stub = Stub::start(UNAVAILABLE).await;
    let c = stub.client(|c| {
        c.max_retries = 0;
        c.breaker = BreakerConfig {
            failures: 2,
            cooldown: Duration::from_secs(3600),
        };
    });
    for _ in 0..2 {
        assert!(encrypt(&c).await.is_err());
    }
    assert!(encrypt(&c)
        .await
        .unwrap_err()
        .to_string()
        .contains("circuit open"));
    // `ready()` always goes to the KMS; once it answers 200 the circuit closes at once.
    stub.set(OK);
    c.ready().await.unwrap();
    encrypt(&c).await.unwrap();

    // A KMS shedding load is alive: overloaded answers do not open the circuit.
    stub.set(OVERLOADED);
    let before = stub.seen();
    for _ in 0..6 {
        assert!(matches!(
            encrypt(&c).await.unwrap_err(),
            ClientError::Overloaded(_)
        ));
    }
    assert_eq!(stub.seen(), before + 6, "every call reached the KMS");
}

#[tokio::test]
async fn a_socket_served_by_another_uid_is_refused() {
    let stub = Stub::start(OK).await;
    let me = own_uid();
    // The stub runs as this test's uid: expecting it works, expecting another uid refuses
    // before any request is sent.
    let c = stub.client(|c| c.expected_peer_uid = Some(me));
    encrypt(&c).await.unwrap();
    let seen = stub.seen();
    let c = stub.client(|c| {
        c.expected_peer_uid = Some(me.wrapping_add(1));
        c.breaker = NO_BREAKER;
        c.max_retries = 0;
    });
    let e = encrypt(&c).await.unwrap_err();
    assert!(matches!(e, ClientError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("not the configured KMS uid"), "{e}");
    assert_eq!(stub.seen(), seen, "nothing was sent to the impostor");
}

/// This process's uid, read from a socket pair's peer credentials.
fn own_uid() -> u32 {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let s = tokio::net::UnixStream::from_std({
        a.set_nonblocking(true).unwrap();
        a
    })
    .unwrap();
    s.peer_cred().unwrap().uid()
}

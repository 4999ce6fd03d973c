//! Session loss and token loss, recovered without a restart. Its own process (file), because
//! the simulation resets the PKCS#11 library for the whole process. One test function, so the
//! steps run in order; the log of the whole run is then scanned for secrets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod hsm_common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hsm_common::hsm;
use kms_api::KeyId;
use progressdb_kms::backend::pkcs11::{init_kek, Pkcs11Backend};
use progressdb_kms::backend::{BackendError, KeyBackend};

/// Collects every log line of the process.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

async fn wait_ready(backend: &Pkcs11Backend, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if backend.is_ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backend.is_ready()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_and_token_recover_without_restart() {
    let logs = LogBuf::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();

    let h = hsm();
    let settings = h.settings("t-main", 3);
    init_kek(&settings).unwrap();
    let backend = Pkcs11Backend::open(settings).unwrap();
    assert!(backend.is_ready());

    let k1 = KeyId::from_random([7; 16]);
    let (dek1, w1, kek) = backend.generate_dek(&k1).await.unwrap();
    let mut secrets = vec![dek1.expose().to_vec()];
    let mut blobs = vec![w1.as_bytes().to_vec()];

    // 1. Every session disappears behind the workers' backs (library reset).
    let before = backend.stats();
    backend.simulate_session_loss().unwrap();
    let (dek2, w2, _) = backend.generate_dek(&k1).await.unwrap();
    secrets.push(dek2.expose().to_vec());
    blobs.push(w2.as_bytes().to_vec());
    let back = backend.unwrap_dek(&k1, &kek.id, &w1).await.unwrap();
    assert_eq!(back.expose(), dek1.expose());
    // Every worker gets work and recovers (the others through the epoch).
    for _ in 0..12 {
        let back = backend.unwrap_dek(&k1, &kek.id, &w2).await.unwrap();
        assert_eq!(back.expose(), dek2.expose());
    }
    backend.health_check().await.unwrap();
    assert!(backend.is_ready());
    let after = backend.stats();
    assert!(
        after.recoveries >= before.recoveries + 3,
        "each of the 3 workers reopened: {after:?}"
    );
    assert!(after.errors > before.errors, "{after:?}");
    assert!(
        after.resets > before.resets,
        "the loss was answered by a library reset"
    );
    assert_eq!(
        after.sessions_open, 3,
        "no session leaked across the recovery: {after:?}"
    );

    // 2. The token goes away: the library comes back without it.
    let empty = h.dir.join("empty-tokens");
    std::fs::create_dir_all(&empty).unwrap();
    h.write_conf(&empty);
    backend.simulate_session_loss().unwrap();
    let err = backend.generate_dek(&k1).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(!backend.is_ready());
    // Fails fast while the worker backs off, and on any worker.
    for _ in 0..6 {
        let t = Instant::now();
        let err = backend.unwrap_dek(&k1, &kek.id, &w1).await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let err = backend.health_check().await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    assert!(!backend.is_ready());

    // 3. The token is back (a new reset rereads the configuration): the workers heal in the
    // background, without any request, and everything written before still unwraps.
    h.write_conf(&h.tokendir);
    let recoveries = backend.stats().recoveries;
    backend.simulate_session_loss().unwrap();
    assert!(
        wait_ready(&backend, Duration::from_secs(20)).await,
        "backend did not become ready again: {:?}",
        backend.stats()
    );
    assert!(backend.stats().recoveries >= recoveries + 3);
    backend.health_check().await.unwrap();
    let back = backend.unwrap_dek(&k1, &kek.id, &w1).await.unwrap();
    assert_eq!(back.expose(), dek1.expose());
    assert_eq!(backend.stats().sessions_open, 3, "{:?}", backend.stats());
    let (dek3, w3, _) = backend.generate_dek(&k1).await.unwrap();
    assert_eq!(
        backend
            .unwrap_dek(&k1, &kek.id, &w3)
            .await
            .unwrap()
            .expose(),
        dek3.expose()
    );
    secrets.push(dek3.expose().to_vec());
    blobs.push(w3.as_bytes().to_vec());

    // 4. Nothing secret was logged: no PIN, no DEK, no wrapped blob, in any usual encoding.
    drop(backend);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    if std::env::var_os("HSM_TEST_SHOW_LOG").is_some() {
        eprintln!("{text}");
    }
    assert!(text.contains("HSM session recovered"), "recovery is logged");
    for pin in h.all_pins() {
        assert!(!text.contains(&pin), "a PIN appears in the log");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for bytes in secrets.iter().chain(blobs.iter()) {
        for enc in [
            hex::encode(bytes),
            hex::encode_upper(bytes),
            b64.encode(bytes),
            format!("{bytes:?}"),
        ] {
            assert!(!text.contains(&enc), "key material appears in the log");
        }
    }
}

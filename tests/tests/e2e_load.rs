//! Hostile load on the real KMS from outside: floods of slow connections on its Unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use progressdb_e2e::KmsBuilder;

#[test]
fn two_thousand_half_sent_heads_do_not_starve_healthz() {
    let limit = service_kit::conn::raise_open_file_limit().unwrap_or(1024);
    assert!(
        limit >= 2300,
        "the test holds 2000 sockets and needs 2300 open files, has {limit}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path())
        .limit("read_timeout_secs", 3)
        .max_connections(1500, 1000)
        .start();
    let sock = kms.socket();
    // 2000 connections that send half a request head and then nothing.
    let mut held = Vec::new();
    for _ in 0..2000 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: kms\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        held.push(s);
    }
    // /healthz answers at once: 503 overloaded (the same uid is over its cap), never a stall.
    let t = Instant::now();
    let (s, v) = kms.call("GET", "/healthz", None);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("overloaded")),
        "{v}"
    );
    // The refused ones were answered, not left hanging.
    let mut answered_503 = 0;
    for s in held.iter_mut().skip(1000).take(50) {
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf) {
            if buf[..n].starts_with(b"HTTP/1.1 503") {
                answered_503 += 1;
            }
        }
    }
    assert_eq!(answered_503, 50);
    // After the read timeout the slow connections are gone and the KMS serves again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, _) = kms.call("GET", "/healthz", None);
        if s == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the KMS did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (s, _) = kms.call("GET", "/readyz", None);
    assert_eq!(s, 200);
    drop(held);
}

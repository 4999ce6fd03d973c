//! Clients that misbehave, against the real server (TCP), the real KMS on its Unix socket and
//! the real KMS on TCP with mutual TLS, each with small connection caps so that a held
//! connection shows: clients that never read their answers, keep-alive connections left
//! idle, TLS handshakes never finished, and floods beyond the cap. Each is cut within its
//! timeout, a flood is answered `503 overloaded` at once, and a well-behaved client is served
//! again as soon as the misbehaving ones are gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use progressdb_e2e::{Certs, Kms, KmsBuilder, Role, Server, ServerBuilder, Token};
use serde_json::json;

/// The timeouts every service here runs with. The read (idle) timeout is the longer, so a
/// connection cut before it was cut by the write timeout.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const CAP: usize = 4;

/// A KMS with the timeouts and connection caps of these tests.
fn kms_with_limits(b: KmsBuilder) -> KmsBuilder {
    b.limit("read_timeout_secs", READ_TIMEOUT.as_secs())
        .limit("write_timeout_secs", WRITE_TIMEOUT.as_secs())
        .max_connections(CAP as u64, CAP as u64)
}

fn big_encrypt_request() -> Vec<u8> {
    // 700 KB of plaintext: an answer of ~930 KB, more than a socket's buffers hold.
    let b64 = kms_api::b64::encode(&vec![0x5au8; 700 * 1024]);
    let body = format!(r#"{{"key_id":"KEY","plaintext":"{b64}"}}"#);
    body.into_bytes()
}

fn http_request(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Reads one whole HTTP answer (head and `Content-Length` body) from a keep-alive stream.
fn read_answer<S: std::io::Read>(s: &mut S) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert!(
            n == 1,
            "closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, body)
}

/// Whether the peer closes `s` (EOF or reset) within `within`.
fn closed_within<S: std::io::Read>(s: &mut S, within: Duration) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 65536];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// A small receive buffer, so that the kernel cannot absorb a large answer the client does
/// not read (loopback TCP autotunes up to tens of MiB otherwise).
fn small_receive_buffer<S: std::os::fd::AsFd>(s: &S) {
    socket2::SockRef::from(s)
        .set_recv_buffer_size(4096)
        .unwrap();
}

/// Waits until `log()` holds `line` at least `n` times.
fn logged(n: usize, line: &str, within: Duration, log: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        let text = log();
        if text.matches(line).count() >= n {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{line:?} not logged {n} times within {within:?}: {}",
            &text[text.len().saturating_sub(2000)..]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries `f` until it holds, for at most `within`.
fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_kms_socket_cuts_clients_that_never_read_or_sit_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let kms = kms_with_limits(KmsBuilder::new(tmp.path()).token(&hsm)).start();
    let key = kms.create_dek("t");
    let body = String::from_utf8(big_encrypt_request())
        .unwrap()
        .replace("KEY", &key);
    let req = http_request("POST", "/encrypt", "", body.as_bytes());

    // CAP clients each send a request with a large answer and never read it.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut c = UnixStream::connect(kms.socket()).unwrap();
        small_receive_buffer(&c);
        c.write_all(&req).unwrap();
        held.push(c);
    }
    // Once the KMS has accepted them (the event: until then a probe is served), they hold
    // every slot: one more is answered 503 at once.
    let accepted = Instant::now();
    let (s, v) = loop {
        let (s, v) = kms.call("GET", "/healthz", None);
        if s != 200 || accepted.elapsed() > Duration::from_secs(10) {
            break (s, v);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("overloaded")),
        "{v}"
    );
    // After the write timeout (well before the idle one) they are cut, and the socket
    // serves again.
    let start = Instant::now();
    eventually(
        READ_TIMEOUT - Duration::from_secs(1),
        "the KMS serves again",
        || kms.call("GET", "/healthz", None).0 == 200,
    );
    assert!(
        start.elapsed() >= WRITE_TIMEOUT / 2,
        "{:?}",
        start.elapsed()
    );
    // Every one of them was cut for its stalled write (reading from them now would be
    // progress, so the log says it).
    logged(
        CAP,
        "connection ended with an error",
        WRITE_TIMEOUT * 3,
        || kms.proc.log_text(),
    );
    drop(held);

    // A keep-alive connection served once and then left idle is closed after the read
    // timeout; a slow handshake-less connection too.
    let mut idle = UnixStream::connect(kms.socket()).unwrap();
    idle.write_all(&http_request("GET", "/healthz", "", b""))
        .unwrap();
    assert_eq!(read_answer(&mut idle).0, 200);
    idle.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut idle, READ_TIMEOUT * 3),
        "an idle keep-alive connection stayed open"
    );
    assert!(t.elapsed() >= READ_TIMEOUT / 2, "{:?}", t.elapsed());
    let (s, _) = kms.call(
        "POST",
        "/encrypt",
        Some(json!({"key_id": key, "plaintext": "aGk="})),
    );
    assert_eq!(s, 200);
}

#[test]
fn the_kms_over_mtls_cuts_unfinished_handshakes_floods_and_clients_that_never_read() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let certs = Certs::generate(&tmp.path().join("certs"));
    let kms = kms_with_limits(KmsBuilder::new(tmp.path()).token(&hsm).mtls(&certs)).start();
    let port: u16 = kms.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = Arc::new(
        kms_api::tls::client_config(&certs.ca, &certs.client_cert, &certs.client_key).unwrap(),
    );
    // A new client for every probe, without retries: a breaker opened by the refusals of
    // an earlier probe must not delay seeing the KMS back.
    let fresh = || {
        let mut cfg = kms_api::client::KmsClientConfig::new(
            kms_api::client::Endpoint::from_str(&kms.endpoint).unwrap(),
            Some(Arc::clone(&tls)),
        );
        cfg.max_retries = 0;
        cfg.request_timeout = Duration::from_secs(2);
        kms_api::client::KmsClient::new(cfg).unwrap()
    };
    let client = fresh();
    let thread = kms_api::ThreadId::parse("t").unwrap();
    let key = rt
        .block_on(client.create_dek_for_thread(&thread))
        .unwrap()
        .key_id;

    // CAP TCP connections that never start their handshake hold every slot; one more is
    // closed at once, before any TLS handshake is spent on it (a TLS client could not read
    // an HTTP answer).
    // (The KMS admits connections in its accept loop, in the order the kernel queued them:
    // these CAP, connected one after the other, come before the extra one.)
    let mut silent: Vec<TcpStream> = (0..CAP)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t = Instant::now();
    let mut answer = Vec::new();
    let _ = extra.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{answer:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The handshake timeout closes them.
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(
            closed_within(s, READ_TIMEOUT * 3),
            "an unfinished handshake stayed open"
        );
    }
    drop(silent);
    eventually(Duration::from_secs(10), "the KMS serves again", || {
        rt.block_on(fresh().ready()).is_ok()
    });

    // CAP clients finish the handshake, send a request with a large answer and never read.
    let body = String::from_utf8(big_encrypt_request())
        .unwrap()
        .replace("KEY", key.as_str());
    let req = Arc::new(http_request("POST", "/encrypt", "", body.as_bytes()));
    // Each says when its handshake is done (the KMS has admitted it); one refused because a
    // probe's connection above still held its slot for a moment tries again.
    let (admitted, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for _ in 0..CAP {
        let (tls, req, admitted) = (Arc::clone(&tls), Arc::clone(&req), admitted.clone());
        held.push(rt.spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut s = loop {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                small_receive_buffer(&tcp);
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls));
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                match connector.connect(name, tcp).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            admitted.send(()).unwrap();
            // Pipelined: eight large answers (~7 MB) queue behind each other, unread. The
            // writes stop when the KMS stops reading; the stream is held until aborted.
            for _ in 0..8 {
                if s.write_all(&req).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await;
            drop(s);
        }));
    }
    rt.block_on(async {
        for _ in 0..CAP {
            handshakes.recv().await.unwrap();
        }
    });
    let refused = rt.block_on(fresh().ready());
    assert!(
        refused.is_err(),
        "every slot should be held by a client that does not read"
    );
    let start = Instant::now();
    eventually(
        READ_TIMEOUT - Duration::from_secs(1),
        "the KMS cuts the stalled clients",
        || rt.block_on(fresh().ready()).is_ok(),
    );
    assert!(
        start.elapsed() >= WRITE_TIMEOUT / 2,
        "{:?}",
        start.elapsed()
    );
    logged(
        CAP,
        "connection ended with an error",
        WRITE_TIMEOUT * 3,
        || kms.proc.log_text(),
    );
    let ct = rt
        .block_on(fresh().encrypt(&key, b"still served", None))
        .unwrap();
    assert!(!ct.ciphertext.0.is_empty());
    for h in held {
        h.abort();
    }
}

fn server_with_limits(root: &Path) -> (Token, Kms, Server) {
    let hsm = Token::new(root);
    let kms = KmsBuilder::new(root).token(&hsm).start();
    let server = ServerBuilder::new(root)
        .kms(&kms)
        .http("max_connections", CAP as u64)
        .http("header_read_timeout_secs", READ_TIMEOUT.as_secs())
        .http("write_timeout_secs", WRITE_TIMEOUT.as_secs())
        .start();
    (hsm, kms, server)
}

#[test]
fn the_server_cuts_clients_that_never_read_or_sit_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, server) = server_with_limits(tmp.path());
    let alice = server.as_role(Role::Backend, "alice");
    let t = alice.create_thread("big");
    let tid = t["id"].as_str().unwrap().to_owned();
    for i in 0..8 {
        alice.post_message(&tid, json!({ "text": "y".repeat(60_000), "i": i }));
    }
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let headers = format!(
        "authorization: Bearer {}\r\nx-user-id: alice\r\n",
        server.keys.backend
    );
    // ~480 KB per answer, 16 pipelined per client, never read.
    let page = http_request(
        "GET",
        &format!("/v1/threads/{tid}/messages?limit=8"),
        &headers,
        b"",
    );
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        small_receive_buffer(&c);
        c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        for _ in 0..16 {
            if c.write_all(&page).is_err() {
                break;
            }
        }
        held.push(c);
    }
    // The server admits connections in its accept loop, in the order the kernel queued them:
    // these CAP come before the probe's below, whose answer is therefore 503.
    // (status, body) of `/healthz`; status 0 when there was no answer.
    let probe = || -> (u16, String) {
        match ureq::get(&format!("{}/healthz", server.base))
            .timeout(Duration::from_secs(2))
            .call()
        {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    };
    let (status, body) = probe();
    assert_eq!(
        status, 503,
        "the stalled clients should hold every slot: {body}"
    );
    assert!(body.contains("overloaded"), "{body}");
    let start = Instant::now();
    eventually(
        READ_TIMEOUT - Duration::from_secs(1),
        "the server serves again",
        || probe().0 == 200,
    );
    assert!(
        start.elapsed() >= WRITE_TIMEOUT / 2,
        "{:?}",
        start.elapsed()
    );
    logged(
        CAP,
        "connection ended with an error",
        WRITE_TIMEOUT * 3,
        || server.proc.log_text(),
    );
    drop(held);

    // An idle keep-alive connection is closed after the header read timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.write_all(&http_request("GET", "/healthz", "", b""))
        .unwrap();
    assert_eq!(read_answer(&mut idle).0, 200);
    idle.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut idle, READ_TIMEOUT * 3),
        "an idle keep-alive connection stayed open"
    );
    assert!(t.elapsed() >= READ_TIMEOUT / 2, "{:?}", t.elapsed());
    // And well-behaved clients were never lost: everything is still there.
    assert_eq!(alice.all_messages(&tid).len(), 8);
}

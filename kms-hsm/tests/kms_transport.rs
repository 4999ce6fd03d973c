//! End-to-end tests of the KMS transports and lifecycle: mutual TLS, the Unix socket and its
//! uid allow-list, graceful shutdown, crash and restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use common::kms;
use http::Method;
use kms_api::{ErrorCode, ThreadId};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn tid(s: &str) -> ThreadId {
    ThreadId::parse(s).unwrap()
}

#[tokio::test]
async fn round_trip_over_mutual_tls_and_strangers_are_refused() {
    let kms = kms().tls().start_ready().await;
    let certs = kms.certs.clone().unwrap();
    let c = kms.client();
    let k = c.create_dek_for_thread(&tid("tls-thread")).await.unwrap();
    let e = c
        .encrypt(&k.key_id, b"over mutual TLS", Some(b"aad"))
        .await
        .unwrap();
    let p = c
        .decrypt(&k.key_id, &e.ciphertext.0, Some(b"aad"))
        .await
        .unwrap();
    assert_eq!(p.expose(), b"over mutual TLS");
    let items = vec![kms_api::wire::DecryptRequest {
        key_id: k.key_id.clone(),
        ciphertext: e.ciphertext.clone(),
        aad: Some(kms_api::wire::Bytes64(b"aad".to_vec())),
    }];
    assert_eq!(c.decrypt_batch(&items).await.unwrap().len(), 1);

    // No client certificate.
    let anonymous = kms.client_with(Some(common::client_tls(&certs, None)));
    let r = anonymous.raw(Method::GET, "/healthz", vec![]).await;
    assert!(r.is_err(), "a client without a certificate got {r:?}");
    // A certificate from another CA.
    let stranger = kms.client_with(Some(std::sync::Arc::new(
        kms_api::tls::client_config(&certs.ca, &certs.other_client_cert, &certs.other_client_key)
            .unwrap(),
    )));
    let r = stranger.raw(Method::GET, "/healthz", vec![]).await;
    assert!(r.is_err(), "a client with a foreign certificate got {r:?}");
    let r = stranger
        .decrypt(&k.key_id, &e.ciphertext.0, Some(b"aad"))
        .await;
    assert!(r.is_err());

    // The KMS keeps serving its real clients.
    let p = c
        .decrypt(&k.key_id, &e.ciphertext.0, Some(b"aad"))
        .await
        .unwrap();
    assert_eq!(p.expose(), b"over mutual TLS");
    assert!(kms.log_text().contains("TLS handshake refused"));
    kms.finish(&[b"over mutual TLS"]);
}

/// The mutual-TLS refusal matrix: client certificates from the right CA that are expired, not
/// valid yet, or made for servers only are refused in the handshake, like no certificate and
/// another CA's; and a client refuses a KMS whose certificate does not name the host it
/// dialled. Each refusal leaves the KMS serving its real client.
#[tokio::test]
async fn mtls_refuses_expired_future_and_wrong_usage_certificates_and_wrong_server_names() {
    let kms = kms().tls().start_ready().await;
    let certs = kms.certs.clone().unwrap();
    let good = kms.client();
    good.ready().await.unwrap();
    for (what, (cert, key)) in [
        ("expired", &certs.expired_client),
        ("not valid yet", &certs.future_client),
        ("serverAuth only", &certs.server_only_client),
    ] {
        let tls = std::sync::Arc::new(kms_api::tls::client_config(&certs.ca, cert, key).unwrap());
        let c = kms.client_with(Some(tls));
        let r = c.raw(Method::GET, "/healthz", vec![]).await;
        assert!(r.is_err(), "a client certificate that is {what} got {r:?}");
        let r = c.create_dek_for_thread(&tid("refused")).await;
        assert!(r.is_err(), "{what}: {r:?}");
        good.ready().await.unwrap();
    }

    // Client side: the KMS's certificate names localhost and 127.0.0.1; a client that dialled
    // another name must refuse it (no answer reaches the caller).
    let tls =
        kms_api::tls::client_config(&certs.ca, &certs.client_cert, &certs.client_key).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", kms.port()))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("not-the-kms.example").unwrap();
    let e = match connector.connect(name, tcp).await {
        Ok(_) => panic!("a server certificate for another name was accepted"),
        Err(e) => e,
    };
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // The right name is accepted by the same client settings.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", kms.port()))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap();
    good.ready().await.unwrap();
    kms.finish(&[]);
}

#[tokio::test]
async fn on_tcp_an_admin_certificate_subject_gets_the_admin_api_and_nothing_else() {
    let kms = kms()
        .tls()
        .env("PROGRESSDB_KMS__TLS__ADMIN_SUBJECTS", "kms-admin")
        .start_ready()
        .await;
    let certs = kms.certs.clone().unwrap();
    // The server's certificate: key API yes, admin API no.
    let c = kms.client();
    c.create_dek_for_thread(&tid("t")).await.unwrap();
    let (s, _) = c.raw(Method::GET, "/admin/status", vec![]).await.unwrap();
    assert_eq!(s, 403);
    // The admin certificate (same CA, subject kms-admin): admin API yes, key API no.
    let admin = kms.client_with(Some(std::sync::Arc::new(
        kms_api::tls::client_config(&certs.ca, &certs.admin_client_cert, &certs.admin_client_key)
            .unwrap(),
    )));
    let st = admin.admin_status().await.unwrap();
    assert_eq!(st.active_deks, 1);
    let (s, _) = admin
        .raw(
            Method::POST,
            "/encrypt",
            br#"{"key_id":"x","plaintext":""}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(s, 404, "an admin cannot use the key API");
    let job = admin.start_verify().await.unwrap();
    assert!(job.started);
    kms.finish(&[]);
}

#[tokio::test]
async fn unix_socket_is_0600_and_uid_allow_list_is_enforced() {
    // An allow-list that does not hold our uid: every request is refused with 403.
    let mut kms = kms().allowed_uids(vec![4_000_000]).provision();
    kms.spawn();
    kms.wait_status(403).await;
    let meta = std::fs::metadata(kms.socket()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let our_uid = std::fs::metadata(&kms.root).unwrap().uid();
    assert_ne!(our_uid, 4_000_000);
    let c = kms.client();
    let (s, b) = c
        .raw(
            Method::POST,
            "/create_dek_for_thread",
            br#"{"thread_id":"x"}"#.to_vec(),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let err = c.create_dek_for_thread(&tid("x")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    kms.stop();

    // Our uid as a client and, by default, as the admin too: refused at start-up (the
    // server's identity must never be an admin).
    kms.edit_config(|t| {
        t.replace(
            "allowed_uids = [4000000]",
            &format!("allowed_uids = [4000000, {our_uid}]"),
        )
    });
    let out = kms.command(&["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen.admin_uids"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the operators' uid set apart, it serves.
    kms.edit_config(|t| {
        t.replace(
            &format!("allowed_uids = [4000000, {our_uid}]"),
            &format!("allowed_uids = [4000000, {our_uid}]\nadmin_uids = [4000001]"),
        )
    });
    kms.spawn();
    kms.wait_ready().await;
    let k = kms.client().create_dek_for_thread(&tid("x")).await.unwrap();
    assert_eq!(k.kek_version.get(), 1);
    kms.finish(&[]);
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_0_and_removes_the_socket() {
    let mut kms = kms().start_ready().await;
    let body = br#"{"thread_id":"in-flight"}"#;
    let mut s = tokio::net::UnixStream::connect(kms.socket()).await.unwrap();
    let head = format!(
        "POST /create_dek_for_thread HTTP/1.1\r\nhost: kms\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..5]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    kms.sigterm();
    // It stops accepting (the socket file goes away) while our request is still open...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kms.socket().exists() {
        assert!(std::time::Instant::now() < deadline, "socket not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tokio::net::UnixStream::connect(kms.socket()).await.is_err());
    // ...and still answers it.
    s.write_all(&body[5..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let created: kms_api::wire::CreateDekResponse = serde_json::from_str(json).unwrap();

    let status = kms.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        kms.log_text()
    );
    assert!(!kms.socket().exists());
    let log = kms.log_text();
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped cleanly"),
        "{log}"
    );

    // The key answered during shutdown was durable.
    kms.spawn();
    kms.wait_ready().await;
    let w = kms.client().get_wrapped(&created.key_id).await.unwrap();
    assert_eq!(w.wrapped, created.wrapped);
    kms.finish(&[]);
}

#[tokio::test]
async fn restart_after_crash_and_after_sigterm_keeps_every_key() {
    let mut kms = kms().start_ready().await;
    let c = kms.client();
    let mut sealed = Vec::new();
    for i in 0..6 {
        let k = c
            .create_dek_for_thread(&tid(&format!("t{i}")))
            .await
            .unwrap();
        let msg = format!("message number {i}");
        let aad = format!("thread:t{i}:msg:1");
        let e = c
            .encrypt(&k.key_id, msg.as_bytes(), Some(aad.as_bytes()))
            .await
            .unwrap();
        sealed.push((k, msg, aad, e.ciphertext.0));
    }
    let destroyed = sealed.pop().unwrap();
    c.destroy_key(&destroyed.0.key_id).await.unwrap();
    drop(c);

    // A crash leaves a stale socket file behind; the next start replaces it.
    kms.crash();
    assert!(kms.socket().exists(), "stale socket left by the crash");
    for round in ["after crash", "after SIGTERM"] {
        kms.spawn();
        kms.wait_ready().await;
        let c = kms.client();
        for (k, msg, aad, ct) in &sealed {
            // The cache is empty after a restart: each DEK is unwrapped by the HSM again.
            let p = c
                .decrypt(&k.key_id, ct, Some(aad.as_bytes()))
                .await
                .unwrap();
            assert_eq!(p.expose(), msg.as_bytes(), "{round}");
            let w = c.get_wrapped(&k.key_id).await.unwrap();
            assert_eq!(w.wrapped, k.wrapped, "{round}");
        }
        let err = c
            .decrypt(
                &destroyed.0.key_id,
                &destroyed.3,
                Some(destroyed.2.as_bytes()),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownKey), "{round}");
        let misses = kms
            .metric("progressdb_kms_cache_misses_total")
            .await
            .unwrap();
        assert!(misses >= sealed.len() as f64, "{round}: {misses} misses");
        kms.stop();
    }
    let msgs: Vec<Vec<u8>> = sealed.iter().map(|s| s.1.clone().into_bytes()).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    kms.finish(&refs);
}

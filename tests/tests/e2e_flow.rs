//! The whole product end to end: SoftHSM token → `progressdb-kms` → `progressdb`, over a Unix
//! socket and over mutual TLS, and the dev-only embedded provider.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use progressdb_e2e::{
    assert_absent, functional_flow, Certs, Kms, KmsBuilder, Provider, Server, ServerBuilder, Token,
};

fn secrets_of(out: &progressdb_e2e::FlowOutcome, hsm: &Token, server: &Server) -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = out.markers.iter().map(|m| m.as_bytes().to_vec()).collect();
    s.push(hsm.pin.as_bytes().to_vec());
    s.push(server.keys.admin.as_bytes().to_vec());
    s.push(server.keys.backend.as_bytes().to_vec());
    s.push(server.keys.frontend.as_bytes().to_vec());
    s.push(server.keys.signing_secret.as_bytes().to_vec());
    if let Some(w) = &out.wrapped_dek {
        s.push(w.as_bytes().to_vec());
        s.push(base64::engine::general_purpose::STANDARD.decode(w).unwrap());
    }
    s
}

fn check_clean(out: &progressdb_e2e::FlowOutcome, hsm: &Token, kms: &Kms, server: &Server) {
    // No plaintext of any posted message in the server's LMDB files.
    let markers: Vec<&[u8]> = out.markers.iter().map(|m| m.as_bytes()).collect();
    assert_absent("server LMDB files", &server.store_bytes(), &markers);
    // No PIN, key, wrapped key or plaintext in any log line of either process.
    let secrets = secrets_of(out, hsm, server);
    let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
    assert_absent("KMS log", kms.proc.log_text().as_bytes(), &refs);
    assert_absent("server log", server.proc.log_text().as_bytes(), &refs);
}

#[test]
fn unix_socket_kms_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (hsm, mut kms, mut server) = progressdb_e2e::system(tmp.path());

    let out = functional_flow(&server, true);

    // Everything survives a restart of both processes.
    assert!(
        server.proc.sigterm().success(),
        "server did not exit cleanly"
    );
    assert!(kms.proc.sigterm().success(), "KMS did not exit cleanly");
    kms.restart();
    server.restart();
    let alice = server.as_role(progressdb_e2e::Role::Frontend, "alice");
    let texts: Vec<String> = alice
        .all_messages(&out.thread_id)
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts.len(), 4);
    assert!(texts.iter().all(|t| out.markers.contains(t)));

    // Deleting the thread shreds its DEK: the thread and its messages are gone.
    let (s, v) = alice.call("DELETE", &format!("/v1/threads/{}", out.thread_id), None);
    assert!(s == 200 || s == 204, "delete thread: {s} {v}");
    let (s, _) = alice.call(
        "GET",
        &format!("/v1/threads/{}/messages", out.thread_id),
        None,
    );
    assert_eq!(s, 404);

    assert!(server.proc.sigterm().success());
    assert!(kms.proc.sigterm().success());
    check_clean(&out, &hsm, &kms, &server);
}

#[test]
fn mutual_tls_kms_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let certs = Certs::generate(&tmp.path().join("tls"));
    let mut kms = KmsBuilder::new(tmp.path()).token(&hsm).mtls(&certs).start();
    // The KMS's endpoint with the good client certificate.
    let mut server = ServerBuilder::new(tmp.path()).kms(&kms).start();
    let out = functional_flow(&server, true);
    assert!(server.proc.sigterm().success());

    // A server whose client certificate comes from another CA gets nothing from the KMS.
    let tmp2 = tempfile::tempdir().unwrap();
    let bad = Provider::External {
        endpoint: kms.endpoint.clone(),
        tls: Some((
            certs.ca.clone(),
            certs.other_client_cert.clone(),
            certs.other_client_key.clone(),
        )),
    };
    let intruder = ServerBuilder::new(tmp2.path()).provider(&bad).start();
    let (s, v) = intruder
        .as_role(progressdb_e2e::Role::Frontend, "mallory")
        .call(
            "POST",
            "/v1/threads",
            Some(serde_json::json!({ "title": "x" })),
        );
    assert_eq!(
        s, 503,
        "a server with a foreign client certificate created a thread: {v}"
    );
    let (s, v) = intruder
        .as_role(progressdb_e2e::Role::Frontend, "mallory")
        .call("GET", "/v1/threads", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["threads"].as_array().unwrap().len(),
        0,
        "nothing may be stored: {v}"
    );
    drop(intruder);

    assert!(kms.proc.sigterm().success());
    check_clean(&out, &hsm, &kms, &server);
}

#[test]
fn embedded_provider_passes_the_same_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("master.key");
    progressdb_e2e::write_secret(&key_file, progressdb_e2e::random_hex(32).as_bytes());
    let provider = Provider::Embedded {
        master_key_file: key_file,
    };
    let mut server = ServerBuilder::new(tmp.path())
        .binary("progressdb-dev")
        .provider(&provider)
        .start();
    let out = functional_flow(&server, true);
    let markers: Vec<&[u8]> = out.markers.iter().map(|m| m.as_bytes()).collect();
    assert!(server.proc.sigterm().success());
    assert_absent("server LMDB files", &server.store_bytes(), &markers);
    assert_absent("server log", server.proc.log_text().as_bytes(), &markers);
}

#[test]
fn plaintext_mode_passes_the_same_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let server = ServerBuilder::new(tmp.path())
        .kms(&kms)
        .encryption(false)
        .start();
    let out = functional_flow(&server, false);
    // Stored in plain form (and marked so a later job can encrypt it).
    let bytes = server.store_bytes();
    let m = out.markers[0].as_bytes();
    assert!(
        bytes.windows(m.len()).any(|w| w == m),
        "plain mode should store content as is"
    );
}

#[test]
fn release_build_refuses_embedded_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("master.key");
    progressdb_e2e::write_secret(&key_file, progressdb_e2e::random_hex(32).as_bytes());
    let provider = Provider::Embedded {
        master_key_file: key_file,
    };
    let config = ServerBuilder::new(tmp.path())
        .provider(&provider)
        .provision()
        .config;
    let out = std::process::Command::new(progressdb_e2e::bin("progressdb"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a default build accepted kms.mode = embedded"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("dev-embedded"),
        "the refusal must say how to build for dev: {text}"
    );
}

//! Every byte both services emit over a whole end-to-end run, with both logging at **trace**
//! level: every log line, the error bodies of refused and failed requests, both `/metrics`
//! pages, and the output of the KMS's admin commands, across threads, messages, a thread DEK
//! rotation and a KEK rotation. None of it holds the PIN, an API key, the signing secret, a
//! wrapped DEK or a posted plaintext, in any encoding (raw, hex, base64, at every alignment).
//! Each log is first shown to be non-empty and at trace level: a scan of an empty or quiet
//! log would prove nothing.
//!
//! The only test of its binary, because it sets the log level of every service it starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use progressdb_e2e::{assert_absent, bin, functional_flow, uds_raw, Role};
use serde_json::json;

#[test]
fn no_secret_reaches_a_log_an_error_a_metrics_page_or_the_cli_at_trace_level() {
    std::env::set_var("PROGRESSDB_E2E_LOG", "trace");
    let tmp = tempfile::tempdir().unwrap();
    let (hsm, kms, server) = progressdb_e2e::system(tmp.path());
    let out = functional_flow(&server, true);
    let admin = server.as_role(Role::Admin, "ops");
    let mut emitted: Vec<(String, Vec<u8>)> = Vec::new();

    // A thread DEK rotation, to the end.
    let (s, started) = admin.call(
        "POST",
        &format!("/admin/threads/{}/rotate-dek", out.thread_id),
        None,
    );
    assert_eq!(s, 202, "{started}");
    let job = started["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = admin.call("GET", &format!("/admin/jobs/{job}"), None);
        if j["state"] == "succeeded" {
            emitted.push(("rotation job".into(), j.to_string().into_bytes()));
            break;
        }
        assert_ne!(j["state"], "failed", "{j}");
        assert!(
            Instant::now() < deadline,
            "the rotation did not finish: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, k) = admin.call(
        "GET",
        &format!("/admin/threads/{}/kms", out.thread_id),
        None,
    );
    let wrapped_now = k["wrapped_dek"].as_str().map(str::to_owned);

    // A KEK rotation and the other admin commands, through the CLI.
    for args in [
        &["rotate-kek", "--json"][..],
        &["status", "--json"],
        &["status"],
        &["audit", "verify", "--json"],
        &["audit", "list", "--after", "0", "--limit", "1000"],
        &["check-config"],
    ] {
        let o = Command::new(bin("progressdb-kms"))
            .env(hsm.conf_var, &hsm.conf)
            .env("RUST_LOG", "trace")
            .args(args)
            .arg("--config")
            .arg(&kms.config)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let mut all = o.stdout;
        all.extend(o.stderr);
        emitted.push((format!("progressdb-kms {args:?}"), all));
    }

    // The thread's DEK as wrapped after the KEK rotation too.
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    let (s, w) = kms.call("GET", &format!("/get_wrapped?key_id={key_id}"), None);
    assert_eq!(s, 200, "{w}");
    let wrapped_rotated = w["wrapped"].as_str().map(str::to_owned);
    assert!(wrapped_rotated.is_some(), "{w}");

    // Error answers of both services: refused, unknown, tampered.
    let anon = ureq::get(&format!("{}/v1/threads", server.base)).call();
    let wrong_key = ureq::get(&format!("{}/v1/threads", server.base))
        .set("authorization", "Bearer not-a-key")
        .call();
    for (what, r) in [("401 no key", anon), ("401 wrong key", wrong_key)] {
        match r {
            Err(ureq::Error::Status(_, resp)) => {
                emitted.push((what.into(), resp.into_string().unwrap().into_bytes()))
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    let alice = server.as_role(Role::Backend, "alice");
    for (method, path, body) in [
        ("GET", "/v1/threads/nope/messages".to_owned(), None),
        (
            "POST",
            format!("/v1/threads/{}/messages", out.thread_id),
            Some(json!({"x": 1})),
        ),
        (
            "GET",
            format!("/v1/threads/{}/messages?cursor=zz", out.thread_id),
            None,
        ),
    ] {
        let (s, v) = alice.call(method, &path, body);
        assert!((400..500).contains(&s), "{method} {path}: {s} {v}");
        emitted.push((format!("{method} {path}"), v.to_string().into_bytes()));
    }
    let (s, created) = kms.call(
        "POST",
        "/create_dek_for_thread",
        Some(json!({"thread_id": "x"})),
    );
    assert_eq!(s, 200);
    let key = created["key_id"].as_str().unwrap();
    for body in [
        json!({"key_id": key, "ciphertext": base64::engine::general_purpose::STANDARD.encode([7u8; 40])}),
        json!({"key_id": "dek_00000000000000000000000000000000", "ciphertext": "AAAA"}),
        json!({"key_id": key, "ciphertext": "not base64"}),
    ] {
        let (_, text) = uds_raw(&kms.socket(), "POST", "/decrypt", Some(&body)).unwrap();
        emitted.push((format!("KMS /decrypt {body}"), text.into_bytes()));
    }
    emitted.push((
        "KMS /metrics".into(),
        uds_raw(&kms.socket(), "GET", "/metrics", None)
            .unwrap()
            .1
            .into_bytes(),
    ));
    let m = ureq::get(&format!("{}/metrics", server.base))
        .set("authorization", &format!("Bearer {}", server.keys.admin))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(m.contains("# TYPE"), "{m}");
    emitted.push(("server /metrics".into(), m.into_bytes()));

    // Both logs, shown to be full and at trace level first.
    for (name, log) in [
        ("KMS log", kms.proc.log_text()),
        ("server log", server.proc.log_text()),
    ] {
        assert!(
            log.lines().count() > 20,
            "{name}: {} lines",
            log.lines().count()
        );
        assert!(log.contains(" TRACE "), "{name} has no trace line");
        emitted.push((name.into(), log.into_bytes()));
    }

    let mut secrets: Vec<Vec<u8>> = out.markers.iter().map(|m| m.as_bytes().to_vec()).collect();
    assert!(!secrets.is_empty());
    secrets.push(hsm.pin.as_bytes().to_vec());
    for k in [
        &server.keys.admin,
        &server.keys.backend,
        &server.keys.frontend,
        &server.keys.signing_secret,
    ] {
        secrets.push(k.as_bytes().to_vec());
    }
    for w in [out.wrapped_dek.clone(), wrapped_now, wrapped_rotated]
        .into_iter()
        .flatten()
    {
        secrets.push(
            base64::engine::general_purpose::STANDARD
                .decode(&w)
                .unwrap(),
        );
        secrets.push(w.into_bytes());
    }
    let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
    for (what, bytes) in &emitted {
        assert_absent(what, bytes, &refs);
    }
    let total: usize = emitted.iter().map(|(_, b)| b.len()).sum();
    assert!(total > 10_000, "only {total} bytes scanned");
}

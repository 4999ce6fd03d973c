//! Harness of the end-to-end tests: a real PKCS#11 token per test, real `progressdb-kms` and
//! `progressdb` processes, real LMDB files, real sockets and real TLS. The KMS's harness
//! ([`KmsBuilder`], [`Kms`]) is `testkit`'s, shared with the KMS's own tests; the server's
//! ([`ServerBuilder`], [`Server`], [`Api`]) is in [`server`]; docs/testing.md says which
//! harness to use when.
//!
//! Nothing here skips: a missing `softhsm2-util` or binary fails the test with a message that
//! says what to install or build. The binaries are taken from `E2E_BIN_DIR` (set by
//! `scripts/test.sh`, which builds both server flavours) or from `target/e2e/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod load;
pub mod server;

use std::path::Path;

pub use server::{Api, Keys, Provider, Role, Server, ServerBuilder};

pub use testkit::kms::{
    uds_raw, uds_request, Kms, KmsBuilder, KmsListen, KmsStore, Residency, KEK_LABEL,
};
pub use testkit::proc::{bin, bin_dir, log_level, Proc};
pub use testkit::token::Token;
pub use testkit::{assert_absent, random_hex, write_secret, Certs, SOFTHSM_MODULE};

/// The size a heavy end-to-end scenario runs at: `full` in the default pass, a tenth of it
/// (at least 1) in the passes that rerun a suite on another token or residency
/// (`PROGRESSDB_TEST_TOKEN`, `PROGRESSDB_TEST_RESIDENCY` set), which check the token's part,
/// not the load.
pub fn heavy(full: usize) -> usize {
    let rerun = ["PROGRESSDB_TEST_TOKEN", "PROGRESSDB_TEST_RESIDENCY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if rerun {
        (full / 10).max(1)
    } else {
        full
    }
}

/// The residency the suites run the KMS in: `PROGRESSDB_TEST_RESIDENCY` (`memory`, the
/// default, or `hsm`), so the same suites run in both (scripts/test.sh).
pub fn residency() -> String {
    Residency::of_run().name().into()
}

/// Runs `cmd` to completion; it must succeed. Returns its stdout (the failure shows both
/// streams).
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The usual system of an end-to-end test under `root`: a token, a KMS on a Unix socket, and
/// an encrypting `progressdb` using it.
pub fn system(root: &Path) -> (Token, Kms, Server) {
    let hsm = Token::new(root);
    let kms = KmsBuilder::new(root).token(&hsm).start();
    let server = ServerBuilder::new(root).kms(&kms).start();
    (hsm, kms, server)
}

/// What [`functional_flow`] leaves behind, for further checks.
#[derive(Debug)]
pub struct FlowOutcome {
    pub thread_id: String,
    /// Plaintext markers that were posted (and must never reach disk or logs).
    pub markers: Vec<String>,
    /// Base64 wrapped DEK shown to the admin (when encryption is on).
    pub wrapped_dek: Option<String>,
}

/// The functional contract of the server, identical for every provider: threads and messages
/// CRUD, ordering, roles. Panics on the first deviation.
pub fn functional_flow(server: &Server, encrypted: bool) -> FlowOutcome {
    use serde_json::json;
    let alice = server.as_role(Role::Frontend, "alice");
    let bob = server.as_role(Role::Frontend, "bob");
    let admin = server.as_role(Role::Admin, "alice");

    let t = alice.create_thread("e2e thread");
    let tid = t["id"].as_str().expect("thread id").to_owned();
    assert_eq!(t["title"], "e2e thread");
    assert_eq!(t["author"], "alice");
    assert!(
        t.get("kms").is_none() || t["kms"].is_null(),
        "frontend must not see kms: {t}"
    );

    let run = random_hex(6);
    let markers: Vec<String> = (0..5)
        .map(|i| format!("PLAINTEXT-MARKER-{run}-{i}"))
        .collect();
    let mut ids = Vec::new();
    for m in &markers {
        let v = alice.post_message(&tid, json!({ "text": m, "n": 1 }));
        assert_eq!(v["thread_id"], tid.as_str());
        assert_eq!(v["author"], "alice");
        assert_eq!(v["body"]["text"], m.as_str());
        ids.push(v["id"].as_str().expect("message id").to_owned());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "message ids must sort in posting order");

    // Read back, oldest first and newest first.
    let all = alice.all_messages(&tid);
    let texts: Vec<&str> = all
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        markers.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let (s, v) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages?order=desc&limit=2"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let page: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(page, vec![markers[4].as_str(), markers[3].as_str()]);
    assert!(v["next_cursor"].as_str().is_some_and(|c| !c.is_empty()));

    // One message: get, edit, delete.
    let (s, v) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages/{}", ids[1]),
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["body"]["text"], markers[1].as_str());
    let edited = format!("EDITED-MARKER-{run}");
    let (s, v) = alice.call(
        "PUT",
        &format!("/v1/threads/{tid}/messages/{}", ids[1]),
        Some(json!({ "body": { "text": edited } })),
    );
    assert_eq!(s, 200, "{v}");
    let (_, v) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages/{}", ids[1]),
        None,
    );
    assert_eq!(v["body"]["text"], edited.as_str());
    let (s, v) = alice.call(
        "DELETE",
        &format!("/v1/threads/{tid}/messages/{}", ids[2]),
        None,
    );
    assert!(s == 200 || s == 204, "delete message: {s} {v}");
    let (s, _) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages/{}", ids[2]),
        None,
    );
    assert_eq!(s, 404);
    assert_eq!(alice.all_messages(&tid).len(), 4);

    // Rename; another user sees nothing of it.
    let (s, v) = alice.call(
        "PATCH",
        &format!("/v1/threads/{tid}"),
        Some(json!({ "title": "renamed" })),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["title"], "renamed");
    let (s, _) = bob.call("GET", &format!("/v1/threads/{tid}"), None);
    assert!(s == 404 || s == 403, "bob read alice's thread: {s}");
    let (s, _) = bob.call("GET", &format!("/v1/threads/{tid}/messages"), None);
    assert!(s == 404 || s == 403, "bob listed alice's messages: {s}");
    let (s, v) = bob.call("GET", "/v1/threads", None);
    assert_eq!(s, 200);
    assert!(v["threads"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["id"] != tid.as_str()));

    // Admin sees the KMS metadata.
    let (s, k) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    let wrapped_dek = if encrypted {
        assert_eq!(s, 200, "{k}");
        assert!(k["key_id"].as_str().unwrap().starts_with("dek_"), "{k}");
        assert!(
            k["wrapped_dek"].as_str().is_some_and(|w| w.len() > 40),
            "{k}"
        );
        assert_eq!(k["kek_version"], 1);
        let (s, _) = alice.call("GET", &format!("/admin/threads/{tid}/kms"), None);
        assert!(s == 401 || s == 403, "frontend reached an admin route: {s}");
        k["wrapped_dek"].as_str().map(str::to_owned)
    } else {
        None
    };

    let mut all_markers = markers;
    all_markers.push(edited);
    FlowOutcome {
        thread_id: tid,
        markers: all_markers,
        wrapped_dek,
    }
}

/// The value of an un-labelled metric in Prometheus text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

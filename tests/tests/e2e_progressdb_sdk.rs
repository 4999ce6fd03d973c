//! ProgressDB's published Python SDK (`progressdb` 0.2.0 from the package registry, in a
//! virtual environment made by `scripts/sdk-venv.sh`) against the real binaries: SoftHSM
//! token → `progressdb-kms` → `progressdb`. Every SDK method is driven, with two users, by
//! `tests/sdk/progressdb_sdk_check.py`, which compares what the SDK returns with what it
//! sent. Then: the messages' text is in no store file and no log line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use progressdb_e2e::assert_absent;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_published_python_sdk_works_unchanged_against_this_server() {
    // The SDK's environment first: a missing Python or registry fails the test, never skips it.
    let venv = Command::new("bash")
        .arg(repo().join("scripts/sdk-venv.sh"))
        .arg(repo().join("target/sdk-venv"))
        .output()
        .unwrap();
    assert!(
        venv.status.success(),
        "cannot make the SDK's virtual environment:\n{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let (hsm, kms, server) = progressdb_e2e::system(tmp.path());
    let marker = format!("sdk-marker-{}", std::process::id());
    let out = Command::new(&python)
        .arg(repo().join("tests/sdk/progressdb_sdk_check.py"))
        .env("PDB_BASE_URL", &server.base)
        .env("PDB_BACKEND_KEY", &server.keys.backend)
        .env("PDB_FRONTEND_KEY", &server.keys.frontend)
        .env("PDB_MARKER", &marker)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK check failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.proc.log_text()
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let methods: Vec<&str> = summary["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    // The SDK's 13 methods, each driven (the script checks it drove every one).
    assert_eq!(methods.len(), 13, "{methods:?}");
    assert!(summary["checks"].as_u64().unwrap() >= 50, "{summary}");

    // Encrypted at rest through the KMS; nothing secret in either log.
    assert_absent("server store", &server.store_bytes(), &[marker.as_bytes()]);
    let secrets: [&[u8]; 4] = [
        marker.as_bytes(),
        hsm.pin.as_bytes(),
        server.keys.backend.as_bytes(),
        server.keys.signing_secret.as_bytes(),
    ];
    assert_absent("server log", server.proc.log_text().as_bytes(), &secrets);
    assert_absent("KMS log", kms.proc.log_text().as_bytes(), &secrets);
}

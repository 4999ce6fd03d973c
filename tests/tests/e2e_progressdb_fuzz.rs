//! schemathesis against the ProgressDB paths, from ProgressDB's own OpenAPI document
//! (`scripts/fuzz-progressdb.sh`, seeded, one worker: a run repeats exactly): no 5xx, every
//! answer conforming to the document except the departures the script excludes by name
//! (each listed in docs/progressdb-compat.md), every error in ProgressDB's `{error, code}`
//! shape, a second user's data untouched, no panic in either log. The real binaries, on a
//! SoftHSM token of the script's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn schemathesis_finds_no_server_error_and_no_undeclared_departure() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bins = progressdb_e2e::bin("progressdb");
    // A port nothing listens on now (the script refuses a busy one).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new("bash")
        .arg(repo.join("scripts/fuzz-progressdb.sh"))
        .env("BIN_DIR", bins.parent().unwrap())
        .env("PORT", port.to_string())
        .env("VENV", repo.join("target/fuzz-venv"))
        .env("EXAMPLES", "15")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rfind(|l| l.starts_with("fuzz-progressdb: "))
        .unwrap_or_default();
    assert!(
        out.status.success() && summary.ends_with("PASS"),
        "the fuzz run failed: {summary}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It did run: hundreds of requests, none a 5xx, no wrongly shaped error.
    let requests: u64 = summary
        .trim_start_matches("fuzz-progressdb: ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(requests >= 300, "{summary}");
    assert!(
        summary.contains(" 0 5xx answers, 0 error answers in the wrong shape"),
        "{summary}"
    );
}

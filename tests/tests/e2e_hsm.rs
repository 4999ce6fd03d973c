//! The HSM seen from outside the KMS process: a token that goes away and comes back, and
//! planted KEK objects. Each test starts a real `progressdb-kms` on a real SoftHSM token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use progressdb_e2e::{Kms, KmsBuilder, Token};
use serde_json::json;

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn create_dek(kms: &Kms, thread: &str) -> (u16, serde_json::Value) {
    kms.call(
        "POST",
        "/create_dek_for_thread",
        Some(json!({ "thread_id": thread })),
    )
}

#[test]
fn a_token_that_goes_away_and_comes_back_is_recovered_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kms = KmsBuilder::new(tmp.path()).start();
    let pid = kms.proc.pid();
    let (s, k) = create_dek(&kms, "t-before");
    assert_eq!(s, 200, "{k}");
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    let (s, e) = kms.call(
        "POST",
        "/encrypt",
        Some(json!({"key_id": key_id, "plaintext": "aGVsbG8="})),
    );
    assert_eq!(s, 200, "{e}");

    // The token directory disappears under the running KMS.
    let tokens = tmp.path().join("softhsm").join("tokens");
    let away = tmp.path().join("softhsm").join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw_503 = false;
    while Instant::now() < deadline {
        let (s, v) = create_dek(&kms, "t-during");
        assert_ne!(s, 200, "a DEK was created without its token: {v}");
        assert_ne!(
            s,
            500,
            "an HSM outage is not an internal error: {v}\n{}",
            tail(&kms.proc.log_text())
        );
        if s == 503 {
            assert_eq!(v["error"]["code"], "unavailable", "{v}");
            let (r, _) = kms.call("GET", "/readyz", None);
            assert_eq!(r, 503);
            saw_503 = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(saw_503, "no 503 during the outage");
    for _ in 0..5 {
        let (s, v) = create_dek(&kms, "t-during");
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (503, Some("unavailable")),
            "{v}"
        );
    }

    // Back: the KMS becomes ready by itself, in the same process.
    std::fs::rename(&away, &tokens).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _) = kms.call("GET", "/readyz", None);
        if s == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready 30 s after the token came back:\n{}",
            kms.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (s, v) = create_dek(&kms, "t-after");
    assert_eq!(s, 200, "{v}");
    // The key made before the outage still works, unwrapped again through the HSM.
    let (s, d) = kms.call(
        "POST",
        "/decrypt",
        Some(json!({"key_id": key_id, "ciphertext": e["ciphertext"]})),
    );
    assert_eq!((s, d["plaintext"].as_str()), (200, Some("aGVsbG8=")), "{d}");
    assert_eq!(kms.proc.pid(), pid, "no restart");
    kms.proc.assert_running();
}

fn pkcs11_tool(hsm: &Token, args: &[&str]) {
    let out = std::process::Command::new("pkcs11-tool")
        .env(hsm.conf_var, &hsm.conf)
        .args([
            "--module",
            &hsm.module.display().to_string(),
            "--token-label",
            &hsm.label,
        ])
        .args(args)
        .output()
        .expect("pkcs11-tool not found: install opensc (scripts/test.sh does)");
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_planted_kek_is_refused_naming_label_version_and_attribute() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let mut kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    let (s, _) = create_dek(&kms, "t");
    assert_eq!(s, 200);
    assert!(kms.proc.sigterm().success());

    // An extractable key made with pkcs11-tool, under the KEK's label and a higher version.
    pkcs11_tool(
        &hsm,
        &[
            "--login",
            "--pin",
            &hsm.pin,
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            &kms.kek_label,
            "--id",
            "00000002",
            "--extractable",
        ],
    );
    let (status, err) = kms.serve_expecting_exit();
    assert_eq!(status.code(), Some(2), "a provisioning problem: {err}");
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.contains(&kms.kek_label) && line.contains("version 2") && line.contains("CKA_"),
        "the reason names the label, the version and the attribute: {err}"
    );
    assert!(!err.contains(&hsm.pin), "no PIN in the message");

    // The same planted as a sensitive, non-extractable key generated in the token, but
    // usable for wrapping (pkcs11-tool's default): still refused.
    let tmp2 = tempfile::tempdir().unwrap();
    let hsm2 = Token::new(tmp2.path());
    let mut kms2 = KmsBuilder::new(tmp2.path()).token(&hsm2).start();
    assert!(kms2.proc.sigterm().success());
    pkcs11_tool(
        &hsm2,
        &[
            "--login",
            "--pin",
            &hsm2.pin,
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            &kms2.kek_label,
            "--id",
            "00000002",
            "--sensitive",
        ],
    );
    let (status, err) = kms2.serve_expecting_exit();
    assert!(!status.success(), "{err}");
    assert!(err.contains("version 2") && err.contains("CKA_"), "{err}");
}

#[test]
fn a_pin_changed_underneath_is_tried_once_and_never_again() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let mut kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    assert_eq!(create_dek(&kms, "t").0, 200);
    // Someone changes the user PIN; the KMS's PIN file still holds the old one.
    let new_pin = format!("{}9", hsm.pin);
    pkcs11_tool(
        &hsm,
        &[
            "--login",
            "--pin",
            &hsm.pin,
            "--change-pin",
            "--new-pin",
            &new_pin,
        ],
    );
    // Force a new login: the token goes away and comes back (a library reset logs out).
    let tokens = tmp.path().join("softhsm").join("tokens");
    let away = tmp.path().join("softhsm").join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    for _ in 0..3 {
        let _ = create_dek(&kms, "t-during");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::rename(&away, &tokens).unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = kms.call("GET", "/readyz", None);
        if s == 503 && v.to_string().contains("PIN") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the KMS did not report the refused PIN: {s} {v}\n{}",
            tail(&kms.proc.log_text())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (s, v) = create_dek(&kms, "t-after");
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{v}"
    );
    // Over several seconds of traffic and background healing, one login attempt only.
    for _ in 0..10 {
        let _ = create_dek(&kms, "t-after");
        std::thread::sleep(Duration::from_millis(300));
    }
    let m = kms.metrics();
    assert_eq!(
        progressdb_e2e::metric(&m, "progressdb_kms_hsm_login_failures_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        progressdb_e2e::metric(&m, "progressdb_kms_hsm_pin_rejected"),
        Some(1.0)
    );
    let log = kms.proc.log_text();
    assert_eq!(
        log.matches("alert=\"hsm_pin_rejected\"").count()
            + log.matches("alert=hsm_pin_rejected").count(),
        1,
        "{}",
        tail(&log)
    );
    assert!(
        !log.contains(&hsm.pin) && !log.contains(&new_pin),
        "no PIN in the log"
    );

    // The refusal could not be MACed then (the HSM refused us); once the operator fixes the
    // PIN file and restarts, it is in the audit log, chained, and the log verifies.
    kms.proc.sigterm();
    testkit::write_secret(&hsm.pin_file, new_pin.as_bytes());
    kms.restart();
    assert_eq!(create_dek(&kms, "t-fixed").0, 200);
    let run = |args: &[&str]| {
        std::process::Command::new(progressdb_e2e::bin("progressdb-kms"))
            .args(args)
            .arg("--config")
            .arg(&kms.config)
            .output()
            .unwrap()
    };
    let out = run(&["audit", "list", "--limit", "1000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let pin_entry = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["action"] == "hsm.pin_rejected")
        .unwrap_or_else(|| panic!("no hsm.pin_rejected entry: {text}"));
    assert_eq!(pin_entry["outcome"], "failed");
    assert_eq!(pin_entry["detail"]["when"], "running");
    assert!(text.contains("audit.pending_chained"), "{text}");
    assert!(!text.contains(&new_pin) && !text.contains(&hsm.pin));
    let out = run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

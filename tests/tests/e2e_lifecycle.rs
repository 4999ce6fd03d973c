//! KEK lifecycle from outside: a real `progressdb-kms` on a real SoftHSM token, driven by the
//! `progressdb-kms` admin subcommands over its admin socket, exactly as an operator would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use progressdb_e2e::{bin, uds_request, Kms, KmsBuilder, Token};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Creates `n` DEKs from `threads` threads; returns (key id, ciphertext of its own id).
fn seed(kms: &Kms, n: usize, threads: usize) -> Vec<(String, String)> {
    let sock = kms.socket();
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..per {
                    let (s, k) = uds_request(
                        &sock,
                        "POST",
                        "/create_dek_for_thread",
                        Some(&json!({"thread_id": format!("t{t}-{i}")})),
                    )
                    .unwrap();
                    assert_eq!(s, 200, "{k}");
                    let key = k["key_id"].as_str().unwrap().to_owned();
                    // Only some keys get a ciphertext: checking every one is verify's job.
                    if i % 50 == 0 {
                        let (s, e) = uds_request(
                            &sock,
                            "POST",
                            "/encrypt",
                            Some(&json!({"key_id": key, "plaintext": B64.encode(&key)})),
                        )
                        .unwrap();
                        assert_eq!(s, 200, "{e}");
                        out.push((key, e["ciphertext"].as_str().unwrap().to_owned()));
                    }
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn decrypts(sock: &Path, key: &str, ct: &str) -> Result<(), String> {
    let (s, d) = uds_request(
        sock,
        "POST",
        "/decrypt",
        Some(&json!({"key_id": key, "ciphertext": ct})),
    )
    .map_err(|e| e.to_string())?;
    if s != 200 {
        return Err(format!("{s} {d}"));
    }
    if d["plaintext"].as_str() != Some(&B64.encode(key)) {
        return Err(format!("wrong plaintext for {key}"));
    }
    Ok(())
}

fn status(kms: &Kms) -> Value {
    kms.cli_json(&["status", "--json"])
}

/// Appends the audit entries `file` lacks to it, with `scripts/export-audit.sh` (the runbook's
/// archive).
fn export_audit(kms: &Kms, file: &Path) {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/export-audit.sh"))
        .arg(file)
        .env(kms.token.conf_var, &kms.token.conf)
        .env("KMS_CONFIG", &kms.config)
        .env("KMS_BIN", bin("progressdb-kms"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn version(status: &Value, v: u64) -> &Value {
    status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["version"] == v)
        .unwrap_or_else(|| panic!("no version {v} in {status}"))
}

fn wait_job(kms: &Kms, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = kms.cli_json(&["jobs", "--id", id, "--json"]);
        if until(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job never got there: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kek_rotation_over_10000_deks_under_live_traffic_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).rewrap(2, 256).start();
    let sample = seed(&kms, 10_000, 8);
    let before = status(&kms);
    assert_eq!(before["current_version"], 1);
    assert_eq!(version(&before, 1)["deks"], 10_000);

    // `kek destroy` before any rotation: refused, the KMS says why.
    let out = kms.cli(&["kek", "destroy", "--version", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kek_not_retired"), "{err}");

    // Live traffic: decrypts of old ciphertexts, encrypts, and new DEKs, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let traffic: Vec<_> = (0..3)
        .map(|t| {
            let (sock, sample) = (kms.socket(), sample.clone());
            let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = t;
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (k, ct) = &sample[i % sample.len()];
                    if let Err(e) = decrypts(&sock, k, ct) {
                        failures.fetch_add(1, Ordering::Relaxed);
                        errors.push(e);
                    }
                    if i % 5 == 0 {
                        let (s, b) = uds_request(
                            &sock,
                            "POST",
                            "/encrypt",
                            Some(&json!({"key_id": k, "plaintext": B64.encode(b"live")})),
                        )
                        .unwrap();
                        if s != 200 {
                            failures.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("encrypt {s} {b}"));
                        }
                    }
                    if i % 10 == 0 {
                        let (s, b) = uds_request(
                            &sock,
                            "POST",
                            "/create_dek_for_thread",
                            Some(&json!({"thread_id": format!("live-{t}-{i}")})),
                        )
                        .unwrap();
                        if s != 200 {
                            failures.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("create {s} {b}"));
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 3;
                }
                errors
            })
        })
        .collect();

    let started = Instant::now();
    let out = kms.cli(&["rotate-kek", "--json"]);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = traffic
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "{errors:?}");
    assert!(done.load(Ordering::Relaxed) > 50, "the traffic ran");
    eprintln!(
        "rotation of {} DEKs took {took:?} with {} live requests alongside",
        job["progress"]["rewrapped"],
        done.load(Ordering::Relaxed)
    );
    assert!(
        job["progress"]["rewrapped"].as_u64().unwrap() >= 9_000,
        "{job}"
    );
    assert_eq!(job["progress"]["failed"], 0);

    let after = status(&kms);
    assert_eq!(after["current_version"], 2);
    assert_eq!(version(&after, 1)["state"], "retired");
    assert_eq!(version(&after, 1)["deks"], 0);
    let total = after["active_deks"].as_u64().unwrap();
    assert!(total > 10_000, "live creates were kept: {after}");
    assert_eq!(
        version(&after, 2)["deks"].as_u64().unwrap(),
        total,
        "{after}"
    );
    for (k, ct) in &sample {
        decrypts(&kms.socket(), k, ct).unwrap();
    }

    // A verification pass agrees, and a retired version can now go.
    let v = kms.cli_json(&["verify", "--json"]);
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["progress"]["verified"].as_u64().unwrap(), total);
    let out = kms.cli(&["kek", "destroy", "--version", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("kek_not_retired"));
    let out = kms.cli(&["kek", "destroy", "--version", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = status(&kms);
    assert_eq!(version(&gone, 1)["state"], "destroyed");
    assert_eq!(version(&gone, 1)["in_hsm"], false);
    for (k, ct) in sample.iter().take(20) {
        decrypts(&kms.socket(), k, ct).unwrap();
    }

    // Every step is in the audit log, which verifies.
    let v = kms.cli_json(&["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["verified"].as_u64().unwrap() > total,
        "one entry per DEK at least: {v}"
    );
    let out = kms.cli(&["audit", "list", "--after", "10000", "--limit", "100000"]);
    assert!(out.status.success());
    let entries: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "kek.rotate",
        "kek.create",
        "kek.retire",
        "job.finish",
        "verify.start",
        "kek.destroy",
    ] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    let refused = entries
        .iter()
        .find(|e| e["action"] == "kek.destroy" && e["outcome"] == "refused")
        .expect("the refused destroy of the current version is audited");
    assert!(
        refused["actor"].as_str().unwrap().starts_with("admin:uid:"),
        "{refused}"
    );
    let rotate = entries
        .iter()
        .find(|e| e["action"] == "kek.rotate")
        .unwrap();
    assert_eq!(rotate["detail"]["target_version"], "2");
    let create = entries
        .iter()
        .find(|e| e["action"] == "kek.create")
        .unwrap();
    assert_eq!(create["actor"], "kms");
    // Ids and versions only: no wrapped DEK is in it.
    let text = String::from_utf8_lossy(&out.stdout);
    for (k, _) in sample.iter().take(20) {
        let (s, w) = kms.call("GET", &format!("/get_wrapped?key_id={k}"), None);
        assert_eq!(s, 200, "{w}");
        let blob = w["wrapped"].as_str().unwrap();
        assert!(!text.contains(blob), "a wrapped DEK is in the audit log");
    }
}

#[test]
fn a_rotation_killed_at_any_point_resumes_and_ends_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kms = KmsBuilder::new(tmp.path()).rewrap(1, 16).start();
    let sample = seed(&kms, 3_000, 6);
    let out = kms.cli(&["rotate-kek", "--no-wait", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = started["state"]
        .as_str()
        .map(|_| started["id"].as_str().unwrap().to_owned())
        .unwrap();
    // Started twice: the same job.
    let again = kms.cli_json(&["rotate-kek", "--no-wait", "--json"]);
    assert_eq!(again["id"], id.as_str());

    // SIGKILL early in the rewrap, in the middle, and during verification.
    type Point = Box<dyn Fn(&Value) -> bool>;
    let points: [(&str, Point); 3] = [
        (
            "early",
            Box::new(|j: &Value| {
                j["progress"]["rewrapped"].as_u64().unwrap_or(0) >= 32
                    || j["state"] != "creating_kek" && j["state"] != "rewrapping"
            }),
        ),
        (
            "mid-batch",
            Box::new(|j: &Value| {
                j["progress"]["scanned"].as_u64().unwrap_or(0) >= 1_500
                    || j["state"] != "rewrapping"
            }),
        ),
        (
            "verifying",
            Box::new(|j: &Value| j["state"] == "verifying" || j["state"] == "succeeded"),
        ),
    ];
    for (name, at) in points {
        let j = wait_job(&kms, &id, at);
        kms.proc.sigkill();
        eprintln!("killed {name}: {}", j["state"]);
        kms.restart();
        // Every record is still there and every sampled ciphertext decrypts, whatever mix
        // of versions the kill left.
        let s = status(&kms);
        assert_eq!(s["active_deks"], 3_000, "{s}");
        for (k, ct) in sample.iter().step_by(7) {
            decrypts(&kms.socket(), k, ct).unwrap();
        }
    }
    let j = wait_job(&kms, &id, |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["progress"]["per_version"], json!({"2": 3000}), "{j}");
    let s = status(&kms);
    assert_eq!(s["current_version"], 2);
    assert_eq!(version(&s, 2)["deks"], 3_000);
    assert_eq!(version(&s, 1)["state"], "retired");
    for (k, ct) in &sample {
        decrypts(&kms.socket(), k, ct).unwrap();
    }
    // Only versions 1 and 2 exist: no kill made a third.
    let versions: Vec<u64> = s["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2]);
}

#[test]
fn admin_calls_are_refused_to_the_server_identity_and_to_other_uids() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kms = KmsBuilder::new(tmp.path()).start();
    let admin_sock = kms.admin_socket();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&admin_sock).unwrap().permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);

    // The client socket (the server's identity) never reaches the admin API.
    for (method, path) in [
        ("GET", "/admin/status"),
        ("POST", "/admin/kek/rotate"),
        ("POST", "/admin/kek/destroy"),
        ("GET", "/admin/jobs/job-0000000000000000"),
        ("GET", "/admin"),
    ] {
        let (s, b) = kms.call(method, path, Some(json!({"version": 1})));
        assert_eq!(s, 403, "{method} {path}: {b}");
        assert_eq!(b["error"]["code"], "forbidden");
    }
    assert!(kms
        .proc
        .log_text()
        .contains("admin call refused on the client endpoint"));
    // The admin socket serves no key operation.
    let (s, _) = uds_request(
        &admin_sock,
        "POST",
        "/create_dek_for_thread",
        Some(&json!({"thread_id": "t"})),
    )
    .unwrap();
    assert_eq!(s, 404);
    let (s, st) = uds_request(&admin_sock, "GET", "/admin/status", None).unwrap();
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["current_version"], 1);

    // The operator scripts wrap the same commands.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = progressdb_e2e::run_ok(
        Command::new("bash")
            .arg(repo.join("scripts/verify-keys.sh"))
            .env("KMS_CONFIG", &kms.config)
            .env("KMS_BIN", bin("progressdb-kms")),
    );
    assert!(text.contains("audit log verified"), "{text}");
    let (s, b) = uds_request(&admin_sock, "GET", "/admin/jobs/job-0000000000000000", None).unwrap();
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("unknown_job")));
    let (s, b) = uds_request(&admin_sock, "GET", "/admin/jobs/../../etc", None).unwrap();
    assert!(s == 400 || s == 404, "{s} {b}");
    let (s, b) = uds_request(
        &admin_sock,
        "POST",
        "/admin/kek/destroy",
        Some(&json!({"version": 0})),
    )
    .unwrap();
    assert_eq!(s, 400, "{b}");

    // An admin socket restricted to another uid refuses this one.
    kms.proc.sigterm();
    kms.edit_config(|t| t.replacen("[listen]\n", "[listen]\nadmin_uids = [4242]\n", 1));
    kms.restart();
    let (s, b) = uds_request(&admin_sock, "GET", "/admin/status", None).unwrap();
    assert_eq!(s, 403, "{b}");
    let out = kms.cli(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With the KMS stopped, the admin commands say it is not running.
    kms.proc.sigterm();
    let out = kms.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `progressdb-kms serve` running"));

    // Every refusal was audited, with who asked.
    kms.edit_config(|t| t.replacen("admin_uids = [4242]\n", "", 1));
    kms.restart();
    let out = kms.cli(&["audit", "list", "--limit", "1000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let me = format!("uid:{}", unsafe_free_uid());
    let client_refusals = entries
        .iter()
        .filter(|e| e["action"] == "admin.refused" && e["actor"] == me.as_str())
        .count();
    assert_eq!(client_refusals, 5, "{entries:?}");
    assert!(entries
        .iter()
        .any(|e| e["action"] == "admin.refused" && e["actor"] == format!("admin:{me}").as_str()));
}

/// This process's uid, read from /proc (no libc call needed).
fn unsafe_free_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Runs `f` on the KMS's LMDB store with the KMS stopped, as someone with write access to
/// its files would.
fn tamper_store(kms: &Kms, f: impl FnOnce(&heed::Env, &mut heed::RwTxn<'_>)) {
    let dir = kms.root.join("kms").join("store");
    let mut opts = heed::EnvOpenOptions::new();
    opts.max_dbs(8).map_size(64 << 20);
    // SAFETY: the KMS that owns these files is stopped, and this test is the only process
    // opening them; the environment is opened once here and dropped before the KMS restarts.
    #[allow(unsafe_code)]
    let env = unsafe { opts.open(&dir) }.unwrap();
    let mut w = env.write_txn().unwrap();
    f(&env, &mut w);
    w.commit().unwrap();
    drop(env);
}

#[test]
fn a_tampered_audit_log_is_detected_and_the_first_bad_entry_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kms = KmsBuilder::new(tmp.path()).start();
    seed(&kms, 30, 3);
    let v = kms.cli_json(&["audit", "verify", "--json"]);
    assert_eq!(
        (v["ok"].as_bool(), v["verified"].as_u64()),
        (Some(true), Some(30))
    );

    // Edit entry 7's thread id behind the KMS's back.
    kms.proc.sigterm();
    let mut original = Vec::new();
    tamper_store(&kms, |env, w| {
        let db: heed::Database<heed::types::Bytes, heed::types::Bytes> =
            env.open_database(w, Some("audit")).unwrap().unwrap();
        let key = 7u64.to_be_bytes();
        original = db.get(w, &key).unwrap().unwrap().to_vec();
        let mut e: Value = serde_json::from_slice(&original).unwrap();
        e["detail"]["thread_id"] = json!("someone-else");
        db.put(w, &key, &serde_json::to_vec(&e).unwrap()).unwrap();
    });
    kms.restart();
    let out = kms.cli(&["audit", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["problem"]["kind"], "mac_mismatch", "{v}");
    assert_eq!(v["problem"]["seq"], 7);

    // Cut the last three entries: reported as a truncated tail (after restoring entry 7).
    kms.proc.sigterm();
    tamper_store(&kms, |env, w| {
        let db: heed::Database<heed::types::Bytes, heed::types::Bytes> =
            env.open_database(w, Some("audit")).unwrap().unwrap();
        db.put(w, &7u64.to_be_bytes(), &original).unwrap();
        for seq in 28u64..=30 {
            db.delete(w, &seq.to_be_bytes()).unwrap();
        }
    });
    kms.restart();
    let out = kms.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("truncated_tail at entry 28"), "{text}");
}

#[test]
fn backup_wipe_restore_decrypts_everything_and_a_tampered_backup_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    // A key-API body limit far below the backup's size: restore has its own.
    let mut kms = KmsBuilder::new(tmp.path())
        .token(&hsm)
        .max_body_bytes(16_384)
        .start();
    let sample = seed(&kms, 400, 4);
    let (gone, _) = sample[0].clone();
    let (s, b) = kms.call("POST", "/destroy_key", Some(json!({"key_id": gone})));
    assert_eq!(s, 200, "{b}");
    let file = tmp.path().join("keys.backup");
    let out = kms.cli(&["backup", "--out", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("backup of 400 key records"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.len() > 16384,
        "the backup is larger than the key API's body limit"
    );
    assert!(!text.contains(&hsm.pin), "no PIN in a backup");

    // Destroyed after the backup: one to stay destroyed, one the operator brings back.
    let (later, _) = sample[2].clone();
    let (named, _) = sample[3].clone();
    for k in [&later, &named] {
        let (s, b) = kms.call("POST", "/destroy_key", Some(json!({"key_id": k})));
        assert_eq!(s, 200, "{b}");
    }
    // The audit log, exported off the host as the runbook has it done after each backup and
    // regularly: twice here, the second run appending only what is new.
    let export = tmp.path().join("audit.jsonl");
    export_audit(&kms, &export);
    let (s, b) = kms.call("POST", "/destroy_key", Some(json!({"key_id": sample[5].0})));
    assert_eq!(s, 200, "{b}");
    export_audit(&kms, &export);
    let lines: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, e)| e["seq"] == i as u64 + 1));

    // Lose the whole key store (its tombstones and audit log with it).
    kms.proc.sigterm();
    let store = kms.root.join("kms").join("store");
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    kms.restart();
    assert!(decrypts(&kms.socket(), &sample[1].0, &sample[1].1).is_err());

    // A tampered copy is refused whole.
    let forged = tmp.path().join("forged.backup");
    std::fs::write(
        &forged,
        text.replacen("\"thread_id\":\"t", "\"thread_id\":\"x", 1),
    )
    .unwrap();
    let out = kms.cli(&["restore", "--in", forged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backup_invalid"));
    assert_eq!(status(&kms)["active_deks"], 0);

    // Without the audit log since the backup, which keys were destroyed after it cannot be
    // known: refused, nothing restored.
    let backup_arg = file.to_str().unwrap();
    let out = kms.cli(&["restore", "--in", backup_arg]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("destroys_unknown") && err.contains("--audit"),
        "{err}"
    );
    assert_eq!(status(&kms)["active_deks"], 0);
    // An export with the later destroy removed does not verify as the chain's continuation.
    let doctored: String = String::from_utf8_lossy(&std::fs::read(&export).unwrap())
        .lines()
        .filter(|l| !l.contains(&later))
        .map(|l| format!("{l}\n"))
        .collect();
    let doctored_file = tmp.path().join("doctored.jsonl");
    std::fs::write(&doctored_file, doctored).unwrap();
    let out = kms.cli(&[
        "restore",
        "--in",
        backup_arg,
        "--audit",
        doctored_file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("destroys_unknown"), "{err}");
    assert_eq!(status(&kms)["active_deks"], 0);

    let report = kms.cli_json(&[
        "restore",
        "--in",
        backup_arg,
        "--audit",
        export.to_str().unwrap(),
        "--resurrect",
        &named,
        "--json",
    ]);
    assert_eq!(report["imported"], 396, "{report}");
    assert_eq!(report["tombstones_imported"], 3, "{report}");
    let mut after_backup = vec![later.clone(), sample[5].0.clone()];
    after_backup.sort();
    assert_eq!(
        report["destroyed_after_backup"],
        json!(after_backup),
        "{report}"
    );
    assert_eq!(report["resurrected"], json!([named]), "{report}");
    assert_eq!(report["destroys_checked_by"], "export", "{report}");
    for (k, ct) in sample[1..]
        .iter()
        .filter(|(k, _)| *k != later && *k != sample[5].0)
    {
        decrypts(&kms.socket(), k, ct).unwrap();
    }
    for (k, ct) in [&sample[0], &sample[2], &sample[5]] {
        assert!(
            decrypts(&kms.socket(), k, ct).is_err(),
            "a key destroyed before or after the backup stays destroyed"
        );
    }
    let v = kms.cli_json(&["verify", "--json"]);
    assert_eq!(v["progress"]["verified"], 397, "{v}");
    // The restored store's audit log starts afresh and verifies.
    let a = kms.cli_json(&["audit", "verify", "--json"]);
    assert_eq!(a["ok"], true, "{a}");
    // This store's log is a new one, not the backup's: restoring the backup again still
    // needs the export (or the operator's explicit acceptance).
    let out = kms.cli(&["restore", "--in", backup_arg]);
    assert_eq!(out.status.code(), Some(1));
    let again = kms.cli_json(&[
        "restore",
        "--in",
        backup_arg,
        "--accept-unchecked-destroys",
        "--json",
    ]);
    assert_eq!(again["destroys_checked_by"], "unchecked", "{again}");
    assert_eq!(again["imported"], 0, "the tombstones here hold: {again}");
}

/// Audit retention (docs/operations.md): the log archived off the host and compacted away
/// with the tombstones it records destroyed; `audit verify` still passes from the sealed
/// anchor, a backup older than the archive restores only with the archive given, and the
/// keys destroyed after that backup stay destroyed.
#[test]
fn an_archived_audit_log_is_compacted_and_still_guards_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let sample = seed(&kms, 20, 4);
    let backup = tmp.path().join("keys.backup");
    let out = kms.cli(&["backup", "--out", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = [sample[0].0.clone(), sample[1].0.clone()];
    for k in &gone {
        let (s, b) = kms.call("POST", "/destroy_key", Some(json!({"key_id": k})));
        assert_eq!(s, 200, "{b}");
    }
    let archive = tmp.path().join("audit-archive.jsonl");
    export_audit(&kms, &archive);
    let archived = std::fs::read_to_string(&archive).unwrap().lines().count();
    let compact = |what: &str| kms.cli(&["audit", "compact", "--archive", what]);
    let out = compact(archive.to_str().unwrap());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!(
            "through entry {archived}: {archived} entries and 2 tombstones"
        )),
        "{said}"
    );
    // The rest of the log verifies from the anchor; the same archive again is refused.
    let v = kms.cli_json(&["audit", "verify", "--json"]);
    assert_eq!(
        (v["ok"].clone(), v["archived_through"].clone()),
        (json!(true), json!(archived)),
        "{v}"
    );
    let out = compact(archive.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("archive_mismatch"));
    assert_eq!(status(&kms)["active_deks"], 18);

    // The backup is older than the archive: without it, which keys were destroyed since
    // cannot be known (their tombstones are gone too); with it, they stay destroyed.
    let backup_arg = backup.to_str().unwrap();
    let out = kms.cli(&["restore", "--in", backup_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("destroys_unknown"));
    let report = kms.cli_json(&[
        "restore",
        "--in",
        backup_arg,
        "--audit",
        archive.to_str().unwrap(),
        "--json",
    ]);
    let mut want = gone.to_vec();
    want.sort();
    assert_eq!(report["destroyed_after_backup"], json!(want), "{report}");
    assert_eq!(
        report["destroys_checked_by"], "export and store",
        "{report}"
    );
    assert_eq!(report["tombstones_imported"], 2, "{report}");
    for (k, ct) in &sample[..2] {
        assert!(decrypts(&kms.socket(), k, ct).is_err(), "{k} came back");
    }
    for (k, ct) in &sample[2..] {
        decrypts(&kms.socket(), k, ct).unwrap();
    }
    assert_eq!(kms.cli_json(&["audit", "verify", "--json"])["ok"], true);
}

#[test]
fn a_destroyed_wrapped_dek_is_gone_from_the_store_files_after_compact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kms = KmsBuilder::new(tmp.path()).start();
    let sample = seed(&kms, 200, 2);
    let victim = &sample[3].0;
    let (_, w) = kms.call("GET", &format!("/get_wrapped?key_id={victim}"), None);
    let wrapped = B64.decode(w["wrapped"].as_str().unwrap()).unwrap();
    let (s, _) = kms.call("POST", "/destroy_key", Some(json!({"key_id": victim})));
    assert_eq!(s, 200);
    // While the KMS runs, compaction is refused (it holds the store's lock).
    let out = kms.cli(&["compact"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process"));
    kms.proc.sigterm();

    let data = kms.root.join("kms").join("store").join("data.mdb");
    let found = |bytes: &[u8]| {
        let hay = std::fs::read(&data).unwrap();
        let enc = [bytes.to_vec(), B64.encode(bytes).into_bytes()];
        enc.iter()
            .any(|e| hay.windows(e.len()).any(|w| w == e.as_slice()))
    };
    // LMDB keeps the replaced record's page: the bytes are still there (so this test can fail).
    assert!(
        found(&wrapped),
        "expected the destroyed blob in LMDB's free pages before compaction"
    );
    let out = kms.cli(&["compact"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !found(&wrapped),
        "the destroyed key's wrapped DEK survived compaction"
    );
    kms.restart();
    for (k, ct) in sample.iter().filter(|(k, _)| k != victim) {
        decrypts(&kms.socket(), k, ct).unwrap();
    }
    assert_eq!(status(&kms)["destroyed_deks"], 1);
}

/// The current KEK version is pinned in the key store. A higher version that appears in the
/// token without a rotation of this deployment (here made properly, by a KMS on another key
/// store of the same token) would otherwise become current and wrap every new DEK: the KMS
/// refuses to start on it, naming both versions, and starts again once it is gone.
#[test]
fn a_kek_version_the_key_store_did_not_make_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Token::new(dir.path());
    let mut kms = KmsBuilder::new(dir.path()).token(&hsm).start();
    let seeded = seed(&kms, 3, 1);
    kms.proc.sigterm();

    // Another deployment on the same token: its own store, a rotation to version 2.
    let store = dir.path().join("kms/store");
    let ours = dir.path().join("kms/store.ours");
    std::fs::rename(&store, &ours).unwrap();
    std::fs::create_dir(&store).unwrap();
    kms.restart();
    let job = kms.cli_json(&["rotate-kek", "--json"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    kms.proc.sigterm();
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::rename(&ours, &store).unwrap();

    let (exit, text) = kms.serve_expecting_exit();
    assert_eq!(exit.code(), Some(2), "{text}");
    assert!(
        text.contains("newest KEK version (2)") && text.contains("(newest 1)"),
        "{text}"
    );

    // Once the operator has removed the planted version (the other deployment's `kek
    // destroy` path is not ours to drive: remove it with the token's own tool), ours serves
    // again and every DEK still decrypts.
    let out = Command::new("pkcs11-tool")
        .env(hsm.conf_var, &hsm.conf)
        .arg("--module")
        .arg(&hsm.module)
        .args(["--token-label", &hsm.label, "--login", "--pin", &hsm.pin])
        .args(["--delete-object", "--type", "secrkey", "--id", "00000002"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kms.restart();
    for (key, ct) in &seeded {
        decrypts(&kms.socket(), key, ct).unwrap();
    }
    assert_eq!(status(&kms)["current_version"], 1);
}

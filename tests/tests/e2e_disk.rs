//! A store that cannot grow, in both services: writes answer 507 `storage_full` with nothing
//! written, reads keep working, the process stays up, and writes work again once space is
//! freed. "No space" is made with the process's file-size limit (`RLIMIT_FSIZE`, set on the
//! running process with `prlimit --pid`): the store's next write past the limit fails with
//! `EFBIG`, exactly where a full file system fails with `ENOSPC` (both map to the same error;
//! a tmpfs filled to the brim gives the same answers, see docs/reliability.md), and it needs
//! no privilege to set up or to lift.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use progressdb_e2e::{Kms, KmsBuilder, Role, Token};
use serde_json::json;

/// Sets the soft file-size limit of `pid` (bytes; `None`: unlimited), hard limit unlimited.
fn fsize(pid: i32, bytes: Option<u64>) {
    let soft = bytes.map_or("unlimited".to_owned(), |b| b.to_string());
    let st = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .expect("prlimit (util-linux) must be installed");
    assert!(st.success(), "prlimit failed");
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn a_full_server_store_answers_507_keeps_reading_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Backend, "alice");
    let t = alice.create_thread("disk");
    let tid = t["id"].as_str().unwrap().to_owned();
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(alice.post_message(&tid, json!({ "n": i }))["id"].clone());
    }
    let data = server.store.join("data.mdb");
    fsize(server.proc.pid(), Some(size(&data) + 64 * 1024));

    let big = "x".repeat(16 * 1024);
    let mut refused = 0;
    for i in 0..200 {
        let (s, v) = alice.call(
            "POST",
            &format!("/v1/threads/{tid}/messages"),
            Some(json!({ "body": { "big": big, "i": i } })),
        );
        match s {
            201 => acked.push(v["id"].clone()),
            507 => {
                assert_eq!(v["error"]["code"], "storage_full", "{v}");
                assert!(!v.to_string().contains("os error"), "detail leaked: {v}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!(
                "unexpected {other}: {v}\n{}",
                server
                    .proc
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }
    assert_eq!(refused, 3, "the limit was never reached");
    // A small write may still fit in pages freed by the refused ones; a big one does not.
    let (s, v) = alice.call(
        "POST",
        &format!("/v1/threads/{tid}/messages"),
        Some(json!({ "body": { "big": big } })),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (507, Some("storage_full")),
        "{v}"
    );
    // Reads go on, with exactly the acknowledged messages.
    server.proc.assert_running();
    let ids: Vec<_> = alice
        .all_messages(&tid)
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, acked);
    let log = server.proc.log_text();
    assert!(log.contains("alert=\"disk_full\""), "no alert in the log");

    // Space freed: writes work again, in the same process.
    fsize(server.proc.pid(), None);
    let after = alice.post_message(&tid, json!("after"));
    acked.push(after["id"].clone());
    // And everything acknowledged survives a restart.
    server.restart();
    let ids: Vec<_> = alice
        .all_messages(&tid)
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, acked);
}

#[test]
fn a_full_kms_store_answers_507_keeps_serving_keys_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let mut kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    let create = |kms: &Kms, i: usize| {
        kms.call(
            "POST",
            "/create_dek_for_thread",
            Some(json!({ "thread_id": format!("t-disk-{i}") })),
        )
    };
    let (s, first) = create(&kms, 0);
    assert_eq!(s, 200, "{first}");
    let key = first["key_id"].as_str().unwrap().to_owned();
    let data = tmp.path().join("kms/store/data.mdb");
    fsize(kms.proc.pid(), Some(size(&data) + 32 * 1024));

    let mut made = 1;
    let mut refused = None;
    for i in 1..5000 {
        let (s, v) = create(&kms, i);
        match s {
            200 => made += 1,
            507 => {
                refused = Some(v);
                break;
            }
            other => panic!(
                "unexpected {other}: {v}\n{}",
                kms.proc
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }
    let v = refused.expect("the limit was never reached");
    assert_eq!(v["error"]["code"], "storage_full", "{v}");
    // Keys already made keep working (reads of the store, the cache, the HSM).
    let (s, e) = kms.call(
        "POST",
        "/encrypt",
        Some(json!({ "key_id": key, "plaintext": "aGVsbG8=" })),
    );
    assert_eq!(s, 200, "{e}");
    let (s, _) = kms.call("GET", &format!("/get_wrapped?key_id={key}"), None);
    assert_eq!(s, 200);
    kms.proc.assert_running();

    fsize(kms.proc.pid(), None);
    let (s, v) = create(&kms, 9999);
    assert_eq!(s, 200, "{v}");
    made += 1;
    // Every key acknowledged is in the store after a restart, and nothing half-written.
    kms.restart();
    let m = kms.metrics();
    assert!(m.contains("progressdb_kms"), "metrics answer");
    let status = Command::new(progressdb_e2e::bin("progressdb-kms"))
        .env(hsm.conf_var, &hsm.conf)
        .args(["status", "--json", "--config"])
        .arg(&kms.config)
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(j["active_deks"], made, "{j}");
    let out = Command::new(progressdb_e2e::bin("progressdb-kms"))
        .env(hsm.conf_var, &hsm.conf)
        .args(["audit", "verify", "--config"])
        .arg(&kms.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the audit chain is intact: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The message store's backup and restore, end to end with the real binaries, a SoftHSM
//! token and the external KMS: `progressdb backup` of the running server, `progressdb-kms
//! backup` beside it, `progressdb backup-check` pairing the two, a wiped store restored with
//! `progressdb restore`, every message of the backup readable again, and a thread deleted
//! after the backup unreadable (its key was shredded at the KMS). Damaged files are refused
//! whole, a store with data or in use is not overwritten.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use progressdb::store::{keys as store_keys, RawPut};
use progressdb_e2e::{assert_absent, bin, Role};
use serde_json::{json, Value};

fn progressdb(args: &[&str]) -> Output {
    Command::new(bin("progressdb")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_wiped_store_restored_from_its_backup_reads_again_and_deleted_threads_stay_unreadable() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, mut kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Backend, "alice");
    let bob = server.as_role(Role::Frontend, "bob");
    let ta = alice.create_thread("kept")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tb = bob.create_thread("deleted later")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let marker = format!("backup-marker-{}", std::process::id());
    for i in 0..3 {
        alice.post_message(&ta, json!({"text": marker, "n": i}));
    }
    for i in 0..2 {
        bob.post_message(&tb, json!({"n": i}));
    }
    let config = server.config.clone();

    // Both backups, while everything runs.
    let backup = tmp.path().join("server.pdbak");
    let o = progressdb(&["backup", "--config", s(&config), "--out", s(&backup)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("2 threads, 5 messages"),
        "{}",
        text(&o)
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&backup).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let bytes = std::fs::read(&backup).unwrap();
    assert!(bytes.starts_with(b"progressdb-backup/1\n"));
    assert_absent("the server backup", &bytes, &[marker.as_bytes()]);
    let o = progressdb(&["backup", "--config", s(&config), "--out", s(&backup)]);
    assert!(
        !o.status.success(),
        "an existing file is not overwritten: {}",
        text(&o)
    );
    let kms_before = tmp.path().join("kms-before.backup");
    let o = kms.cli(&["backup", "--out", s(&kms_before)]);
    assert!(o.status.success(), "{}", text(&o));

    // After the backups: bob's thread is deleted (its key shredded), alice posts once more.
    let (st, v) = bob.call("DELETE", &format!("/v1/threads/{tb}"), None);
    assert_eq!(st, 200, "{v}");
    alice.post_message(&ta, json!({"text": "after the backup"}));
    let kms_after = tmp.path().join("kms-after.backup");
    let o = kms.cli(&["backup", "--out", s(&kms_after)]);
    assert!(o.status.success(), "{}", text(&o));

    // The pairing check: with the KMS backup of the same time, every thread reads; with the
    // later one, bob's thread's key is destroyed.
    let o = progressdb(&[
        "backup-check",
        "--backup",
        s(&backup),
        "--kms-backup",
        s(&kms_before),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&r["threads"], &r["readable"], &r["unreadable"]),
        (&json!(2), &json!(2), &json!([]))
    );
    let o = progressdb(&[
        "backup-check",
        "--backup",
        s(&backup),
        "--kms-backup",
        s(&kms_after),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["unreadable"][0]["thread"], tb.as_str(), "{r}");
    assert_eq!(r["unreadable"][0]["reason"], "key_destroyed", "{r}");

    // Restoring while the server runs is refused; so is a store with data.
    let o = progressdb(&["restore", "--config", s(&config), "--in", s(&backup)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(server.proc.sigterm().success());
    let o = progressdb(&["restore", "--config", s(&config), "--in", s(&backup)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{}",
        text(&o)
    );

    // The server's disk is lost.
    std::fs::remove_dir_all(&server.store).unwrap();

    // Damaged files are refused whole: nothing is written into the store.
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 100] ^= 1;
    let damaged = [
        ("flipped", flipped),
        ("truncated", bytes[..bytes.len() - 4096].to_vec()),
        ("extended", [bytes.as_slice(), b"x"].concat()),
        ("not a backup", b"hello".to_vec()),
    ];
    for (what, b) in damaged {
        let f = tmp.path().join(format!("{what}.pdbak"));
        std::fs::write(&f, b).unwrap();
        let o = progressdb(&["restore", "--config", s(&config), "--in", s(&f)]);
        assert!(!o.status.success(), "{what}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("invalid"),
            "{what}: {}",
            text(&o)
        );
        assert!(
            !server.store.join("data.mdb").exists(),
            "{what} wrote the store"
        );
    }

    let o = progressdb(&["restore", "--config", s(&config), "--in", s(&backup)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("2 threads, 5 messages"),
        "{}",
        text(&o)
    );
    // Over the restored data: only with --force.
    let o = progressdb(&["restore", "--config", s(&config), "--in", s(&backup)]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = progressdb(&[
        "restore",
        "--config",
        s(&config),
        "--in",
        s(&backup),
        "--force",
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // Back up: alice's three messages of the backup read (the later one is not in it); bob's
    // thread is back as a record, but its key is shredded: nothing of it reads.
    server.restart();
    let texts: Vec<Value> = alice
        .all_messages(&ta)
        .iter()
        .map(|m| m["body"]["n"].clone())
        .collect();
    assert_eq!(texts, [json!(0), json!(1), json!(2)]);
    let (st, v) = bob.call("GET", &format!("/v1/threads/{tb}/messages"), None);
    assert_ne!(
        st, 200,
        "a thread deleted after the backup reads again: {v}"
    );
    assert!(!v.to_string().contains("\"n\""), "{v}");

    // `progressdb verify` finds it: alice's thread whole, bob's key missing at the KMS.
    let o = progressdb(&["verify", "--config", s(&config)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&r["threads"], &r["threads_ok"]),
        (&json!(2), &json!(1)),
        "{r}"
    );
    assert_eq!(
        (&r["messages_checked"], &r["messages_unreadable"]),
        (&json!(5), &json!(2)),
        "{r}"
    );
    assert_eq!(
        (&r["problems"][0]["thread"], &r["problems"][0]["key"]),
        (&json!(tb), &json!("missing")),
        "{r}"
    );
    // From a cursor (how an interrupted run resumes): only the threads after it.
    let o = progressdb(&["verify", "--config", s(&config), "--after", &ta]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&r["threads"], &r["problems"][0]["thread"]),
        (&json!(1), &json!(tb)),
        "{r}"
    );
    let o = progressdb(&["verify", "--config", s(&config), "--sample", "2"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        r["messages_checked"], 3,
        "every other message: 2 of alice's 3, 1 of bob's 2: {r}"
    );
    // Once bob's thread is deleted again (its key is a tombstone at the KMS: destroying it
    // again succeeds), everything verifies.
    let (st, v) = bob.call("DELETE", &format!("/v1/threads/{tb}"), None);
    assert_eq!(st, 200, "{v}");
    let o = progressdb(&["verify", "--config", s(&config)]);
    assert!(o.status.success(), "{}", text(&o));

    // The KMS goes away during a verify: the command tries the page again (the server
    // answers 503 meanwhile) and finishes once the KMS is back.
    kms.stop();
    let run = Command::new(bin("progressdb"))
        .args(["verify", "--config", s(&config)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let asked = std::time::Instant::now();
    while !server
        .proc
        .log_text()
        .lines()
        .any(|l| l.contains("request failed") && l.contains("/admin/verify") && l.contains("503"))
    {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(30),
            "no verify page answered 503 with the KMS stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    kms.restart();
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&r["threads"], &r["threads_ok"]),
        (&json!(1), &json!(1)),
        "{r}"
    );

    // Planted thread records: alice's record copied under another thread's key, and one
    // that does not parse. A listing leaves them out; verify reports both as problems.
    assert!(server.proc.sigterm().success());
    server.with_store(|store, rt| {
        let tid = |t: &str| kms_api::ThreadId::parse(t).unwrap();
        let alices = rt
            .block_on(store.raw_get(store_keys::meta(&tid(&ta))))
            .unwrap()
            .unwrap();
        for (t, value) in [
            ("planted-copy", alices),
            ("planted-junk", b"{\"id\":".to_vec()),
        ] {
            rt.block_on(store.write(RawPut {
                key: store_keys::meta(&tid(t)),
                value,
            }))
            .unwrap();
        }
    });
    server.restart();
    let (st, v) = alice.call("GET", "/v1/threads", None);
    assert_eq!(st, 200, "{v}");
    assert!(!v.to_string().contains("planted"), "{v}");
    let o = progressdb(&["verify", "--config", s(&config)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&r["threads"], &r["threads_ok"]),
        (&json!(3), &json!(1)),
        "{r}"
    );
    let problems: Vec<(String, Value, Value)> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["thread"].as_str().unwrap().to_owned(),
                p["key"].clone(),
                p["record_readable"].clone(),
            )
        })
        .collect();
    assert_eq!(
        problems,
        [
            ("planted-copy".to_owned(), json!("unknown"), json!(false)),
            ("planted-junk".to_owned(), json!("unknown"), json!(false)),
        ],
        "{r}"
    );
    assert!(server.proc.sigterm().success());
}

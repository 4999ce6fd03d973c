//! The whole system with the KMS's key records in PostgreSQL (`store.backend = "postgres"`),
//! on a private cluster this test starts (`testkit::pg`): the functional flow, the admin CLI
//! (status, KEK rotation, audit verification), a KMS restart that finds everything again, and
//! the database restarted under load: 503 in the gap, recovery without a restart, nothing
//! acknowledged lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use progressdb_e2e::load::{check, writers, Acked};
use progressdb_e2e::{bin, Kms, KmsBuilder, KmsStore, Role, Server, ServerBuilder, Token};
use serde_json::json;
use testkit::pg::PgCluster;

fn admin_cli(kms: &Kms, args: &[&str]) -> String {
    let out = kms.cli(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

fn system_on(pg: &PgCluster, root: &std::path::Path) -> (Token, Kms, Server) {
    let hsm = Token::new(root);
    let kms = KmsBuilder::new(root)
        .token(&hsm)
        .store(KmsStore::Postgres(pg.new_database()))
        .start();
    let server = ServerBuilder::new(root).kms(&kms).start();
    (hsm, kms, server)
}

#[test]
fn the_whole_system_runs_on_a_postgres_key_store() {
    let pg = PgCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, mut kms, server) = system_on(&pg, tmp.path());
    assert!(
        kms.proc.log_text().contains("key store open (postgres)"),
        "{}",
        kms.proc.log_text()
    );
    let flow = progressdb_e2e::functional_flow(&server, true);
    // Nothing of the KMS is in its state directory: the records are in the database.
    assert!(!tmp.path().join("kms/store/data.mdb").exists());

    let status = admin_cli(&kms, &["status", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&status).unwrap();
    let active = j["active_deks"].as_u64().unwrap();
    assert!(active >= 1, "{j}");

    // A KEK rotation over the database's records, then the audit chain checks out.
    let job: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["rotate-kek", "--json"])).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let j: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["status", "--json"])).unwrap();
    assert_eq!(j["current_version"], 2, "{j}");
    let v: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["audit", "verify", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["verified"].as_u64().unwrap() >= 3, "{v}");

    // A restarted KMS finds every key again: the thread's messages still read.
    kms.restart();
    let api = server.as_role(Role::Backend, "alice");
    let msgs = api.all_messages(&flow.thread_id);
    assert!(!msgs.is_empty());
    api.post_message(&flow.thread_id, json!("after the restart"));
}

#[test]
fn the_database_restarted_under_load_gives_503_then_recovers_and_loses_nothing() {
    let pg = PgCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, server) = system_on(&pg, tmp.path());
    let api = server.as_role(Role::Backend, "alice");
    let admin = server.as_role(Role::Admin, "ops");
    let acked: Acked = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let (stop, handles) = writers(&api, 4, &acked, &refused);
    // Under way once the first thread is acknowledged (an event; at most 10 s).
    let started = Instant::now();
    while acked.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before: usize = acked.lock().unwrap().len();
    assert!(before > 0, "no thread was created before the restart");
    let refused_before = refused.load(Ordering::Relaxed);
    pg.stop();
    // Down until the writers have met it (a create needs the database; posts to threads
    // whose DEK is cached may not), at least 0.8 s, at most 10 s.
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(800)
        || (refused.load(Ordering::Relaxed) == refused_before
            && down.elapsed() < Duration::from_secs(10))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let during = refused.load(Ordering::Relaxed) - refused_before;
    let at_restart = acked.lock().unwrap().len();
    pg.start_server();
    // The writers go on until a thread is created again (at most 15 s), then 0.5 s more.
    let back = Instant::now();
    while acked.lock().unwrap().len() == at_restart && back.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "a thread was created again {:?} after the database restarted",
        back.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        during > 0,
        "the writers did not notice the database was gone"
    );
    // The same KMS process serves again (no restart), and the server is ready.
    let t0 = Instant::now();
    while server.proc_ready_status().0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no recovery");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = acked.lock().unwrap().len();
    assert!(
        after > before,
        "no thread was created after the database came back"
    );
    check(&api, &admin, &acked, 0);
    for tid in acked.lock().unwrap().keys() {
        api.post_message(tid, json!("after"));
    }
    assert!(
        kms.proc.log_text().contains("postgres"),
        "the outage is logged"
    );
}

/// A deployment grows from one KMS on LMDB to PostgreSQL: the KMS is stopped, `store copy`
/// moves its whole state, the KMS starts on the database and serves every thread, its audit
/// chain verifies in the HSM (so the log was copied entry for entry), and a KEK rotation
/// works there. Copying back into a new LMDB store verifies too; a second copy into the now
/// filled database is refused and changes nothing.
#[test]
fn store_copy_moves_a_running_deployment_from_lmdb_to_postgres_and_back() {
    let pg = PgCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let (hsm, mut kms, server) = progressdb_e2e::system(tmp.path());
    let flow = progressdb_e2e::functional_flow(&server, true);
    let api = server.as_role(Role::Backend, "alice");
    for i in 0..20 {
        api.create_thread(&format!("moved {i}"));
    }
    let before: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["status", "--json"])).unwrap();

    let store_dir = tmp.path().join("kms/store");
    let url = pg.new_database();
    let copy = |from: &str, to: &str| {
        Command::new(bin("progressdb-kms"))
            .env(hsm.conf_var, &hsm.conf)
            .args(["store", "copy", "--json", "--from", from, "--to", to])
            .arg("--config")
            .arg(&kms.config)
            .output()
            .unwrap()
    };
    let from_lmdb = format!("lmdb:{}", store_dir.display());
    let to_pg = format!("postgres:{url}");
    // Refused while the KMS runs: the LMDB store is locked by it.
    let out = copy(&from_lmdb, &to_pg);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process"));

    kms.proc.sigterm();
    let out = copy(&from_lmdb, &to_pg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["active"], before["active_deks"], "{report}");
    assert!(report["audit_entries"].as_u64().unwrap() >= 20, "{report}");

    // Again into the filled database: refused (exit 2), nothing changed.
    let out = copy(&from_lmdb, &to_pg);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // Back into a new LMDB store: verified too.
    let back = tmp.path().join("store-back");
    let out = copy(&to_pg, &format!("lmdb:{}", back.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back_report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(back_report, report);

    // The KMS on the database.
    let text = std::fs::read_to_string(&kms.config).unwrap();
    let path_line = format!("path = \"{}\"\n", store_dir.display());
    assert!(text.contains(&path_line));
    std::fs::write(
        &kms.config,
        text.replace(
            &path_line,
            &format!("{path_line}backend = \"postgres\"\nurl = \"{url}\"\n"),
        ),
    )
    .unwrap();
    kms.restart();
    assert!(kms.proc.log_text().contains("key store open (postgres)"));
    let msgs = api.all_messages(&flow.thread_id);
    assert!(!msgs.is_empty());
    api.post_message(&flow.thread_id, json!("after the move"));
    let after: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["status", "--json"])).unwrap();
    assert_eq!(after["active_deks"], before["active_deks"], "{after}");
    let v: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["audit", "verify", "--json"])).unwrap();
    assert_eq!(
        v["ok"], true,
        "the copied audit chain verifies in the HSM: {v}"
    );
    let job: serde_json::Value =
        serde_json::from_str(&admin_cli(&kms, &["rotate-kek", "--json"])).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// Points a server on LMDB at the PostgreSQL database `url` instead (restart to apply).
fn switch_to_postgres(server: &Server, url: &str) {
    let store = server.store.display().to_string();
    server.edit_config(|t| {
        t.replace(
            &format!("[store]\npath = \"{store}\""),
            &format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\""),
        )
    });
}

#[test]
fn the_server_keeps_its_messages_in_postgres_through_a_sigkill_under_writers() {
    let pg = PgCluster::shared();
    let db = pg.new_database();
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    let mut server = ServerBuilder::new(tmp.path())
        .kms(&kms)
        .postgres_store(&db)
        .start();
    let api = server.as_role(Role::Backend, "alice");
    let admin = server.as_role(Role::Admin, "ops");

    // Writers, then a SIGKILL once some of their writes are acknowledged (an event).
    let acked: Acked = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let (stop, handles) = writers(&api, 4, &acked, &refused);
    let started = Instant::now();
    while acked
        .lock()
        .unwrap()
        .values()
        .map(|m| m.len())
        .sum::<usize>()
        < 40
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fewer than 40 posts acknowledged in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.proc.sigkill();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    // Restarted at once (the dead server's lock on the database is let go when the
    // database sees its connection close): every acknowledged write is there.
    server.restart();
    check(&api, &admin, &acked, 0);

    // The messages are in the database, sealed: none of the store directory, and no
    // posted text in any row.
    assert!(
        std::fs::read_dir(&server.store).unwrap().next().is_none(),
        "the LMDB directory was used"
    );
    let name = db.rsplit("dbname=").next().unwrap().to_owned();
    let rows: u64 = pg
        .psql(&name, "SELECT count(*) FROM progressdb_kv")
        .trim()
        .parse()
        .unwrap();
    assert!(rows > 40, "{rows} rows");
    let texts: Vec<String> = acked
        .lock()
        .unwrap()
        .values()
        .flat_map(|m| m.values().cloned())
        .take(20)
        .collect();
    assert!(!texts.is_empty());
    let found = texts
        .iter()
        .map(|t| format!("position(convert_to('\"{t}\"', 'UTF8') IN v) > 0"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let plain: u64 = pg
        .psql(
            &name,
            &format!("SELECT count(*) FROM progressdb_kv WHERE {found}"),
        )
        .trim()
        .parse()
        .unwrap();
    assert_eq!(plain, 0, "a posted text is stored in plain");

    // A second server on the same database is refused at start, naming why.
    let other_root = tmp.path().join("second");
    std::fs::create_dir_all(&other_root).unwrap();
    let second = ServerBuilder::new(&other_root)
        .kms(&kms)
        .postgres_store(&db)
        .provision();
    second.edit_config(|t| t.replace("[auth]", "timeout_secs = 1\n\n[auth]"));
    let out = Command::new(bin("progressdb"))
        .args(["serve", "--config"])
        .arg(&second.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("another progressdb server uses this database"),
        "{text}"
    );

    // A backup of a PostgreSQL store is PostgreSQL's own: refused, saying so.
    let out = Command::new(bin("progressdb"))
        .args(["backup", "--config"])
        .arg(&server.config)
        .arg("--out")
        .arg(tmp.path().join("b.pdbak"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("501"), "{text}");
    assert!(server.proc.sigterm().success());
}

#[test]
fn store_copy_moves_the_servers_messages_to_postgres_and_back_verified() {
    let pg = PgCluster::shared();
    let db = pg.new_database();
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Backend, "alice");
    let mut threads = Vec::new();
    for t in 0..3 {
        let tid = alice.create_thread(&format!("t{t}"))["id"]
            .as_str()
            .unwrap()
            .to_owned();
        for m in 0..(300 * t + 5) {
            alice.post_message(&tid, json!({ "n": m }));
        }
        threads.push(tid);
    }
    let before: Vec<Vec<serde_json::Value>> =
        threads.iter().map(|t| alice.all_messages(t)).collect();
    let config = server.config.clone();
    let store_copy = |from: &str, to: &str| {
        Command::new(bin("progressdb"))
            .args(["store", "copy", "--config"])
            .arg(&config)
            .args(["--from", from, "--to", to])
            .output()
            .unwrap()
    };
    let lmdb = format!("lmdb:{}", server.store.display());
    let postgres = format!("postgres:{db}");

    // Refused while the server runs (its lock on the store).
    let out = store_copy(&lmdb, &postgres);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(server.proc.sigterm().success());

    let out = store_copy(&lmdb, &postgres);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("copied and verified: 3 threads, 915 messages"),
        "{text}"
    );
    // Never into a store that holds data.
    let out = store_copy(&lmdb, &postgres);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{out:?}"
    );

    // The server on the copy reads everything as before.
    switch_to_postgres(&server, &db);
    server.restart();
    let after: Vec<Vec<serde_json::Value>> =
        threads.iter().map(|t| alice.all_messages(t)).collect();
    assert_eq!(before, after);
    alice.post_message(&threads[0], json!({ "n": "on postgres" }));
    assert!(server.proc.sigterm().success());

    // And back into a new LMDB store, with the message posted on PostgreSQL.
    let back = tmp.path().join("back");
    let out = store_copy(&postgres, &format!("lmdb:{}", back.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("3 threads, 916 messages"), "{text}");
}

#[test]
fn the_servers_database_restarted_under_writers_gives_503_then_recovers_and_loses_nothing() {
    let pg = PgCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    let server = ServerBuilder::new(tmp.path())
        .kms(&kms)
        .postgres_store(&pg.new_database())
        .start();
    let api = server.as_role(Role::Backend, "alice");
    let admin = server.as_role(Role::Admin, "ops");
    let acked: Acked = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let (stop, handles) = writers(&api, 4, &acked, &refused);
    let posts = || -> usize { acked.lock().unwrap().values().map(|m| m.len()).sum() };
    let started = Instant::now();
    while posts() < 20 {
        assert!(started.elapsed() < Duration::from_secs(20), "no posts");
        std::thread::sleep(Duration::from_millis(20));
    }
    pg.stop();
    // Down until the writers have met it (at most 10 s).
    let refused_before = refused.load(Ordering::Relaxed);
    let down = Instant::now();
    while refused.load(Ordering::Relaxed) == refused_before {
        assert!(
            down.elapsed() < Duration::from_secs(10),
            "the writers never met the outage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_restart = posts();
    pg.start_server();
    // The same server writes again, without a restart (it holds the database again).
    let back = Instant::now();
    while posts() < at_restart + 20 {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "no post acknowledged after the database came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    check(&api, &admin, &acked, 0);
    assert!(
        server
            .proc
            .log_text()
            .contains("this server holds it again"),
        "the lock on the database was not taken again"
    );
}

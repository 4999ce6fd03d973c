//! Per-thread DEK rotation and in-place encryption, from outside: a real `progressdb-kms` on
//! a real SoftHSM token and a real `progressdb`, driven through the admin HTTP API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use progressdb_e2e::{Api, KmsBuilder, Role, ServerBuilder};
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// Posts `n` messages `{"n": i}` from `threads` threads.
fn fill(api: &Api, thread: &str, n: usize, threads: usize) {
    let per = n.div_ceil(threads);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (api, thread) = (api.clone(), thread.to_owned());
            std::thread::spawn(move || {
                for i in 0..per {
                    let k = t * per + i;
                    if k < n {
                        api.post_message(&thread, json!({ "n": k }));
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

fn wait_job(admin: &Api, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (s, j) = admin.call("GET", &format!("/admin/jobs/{id}"), None);
        assert_eq!(s, 200, "{j}");
        if until(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job never got there: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every message body by id, checking that none is unreadable.
fn bodies(api: &Api, thread: &str) -> BTreeMap<String, Value> {
    api.all_messages(thread)
        .into_iter()
        .map(|m| {
            assert!(m.get("error").is_none(), "unreadable message: {m}");
            (m["id"].as_str().unwrap().to_owned(), m["body"].clone())
        })
        .collect()
}

/// 5,000 messages in the default pass, 500 in the token and residency reruns
/// ([`progressdb_e2e::heavy`]).
#[test]
fn dek_rotation_of_5000_messages_under_posts_edits_and_a_server_kill() {
    let n = progressdb_e2e::heavy(5_000);
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, mut server) = progressdb_e2e::system(tmp.path());
    let admin = server.as_role(Role::Admin, "ops");
    let api = server.as_role(Role::Backend, "alice");
    let t = api.create_thread("rotate me");
    let tid = t["id"].as_str().unwrap().to_owned();
    fill(&api, &tid, n, 8);
    let (_, before) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    let old_key = before["key_id"].as_str().unwrap().to_owned();

    // Posts and edits go on during the whole job, each checked.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let edits: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let posted = Arc::new(AtomicU64::new(0));
    // Requests cut by the kill: they may or may not have been committed.
    let uncertain_posts = Arc::new(AtomicU64::new(0));
    let uncertain_edits: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let ids: Vec<String> = bodies(&api, &tid).into_keys().collect();
    let writer = {
        let (api, tid, stop, failures, edits, posted) = (
            api.clone(),
            tid.clone(),
            stop.clone(),
            failures.clone(),
            edits.clone(),
            posted.clone(),
        );
        let (uncertain_posts, uncertain_edits) = (uncertain_posts.clone(), uncertain_edits.clone());
        std::thread::spawn(move || {
            let agent = agent();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let body = json!({ "live": i });
                match api.send(
                    &agent,
                    "POST",
                    &format!("/v1/threads/{tid}/messages"),
                    Some(&json!({ "body": body })),
                ) {
                    Ok((201, _)) => {
                        posted.fetch_add(1, Ordering::Relaxed);
                    }
                    // Refused while the server restarts: nothing was stored.
                    Ok((503, _)) => std::thread::sleep(Duration::from_millis(20)),
                    // Cut by the kill: it may have been committed.
                    Err(_) => {
                        uncertain_posts.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok((s, b)) => failures.lock().unwrap().push(format!("post {s} {b}")),
                }
                let target = &ids[(i * 37) % ids.len()];
                let body = json!({ "edited": i });
                match api.send(
                    &agent,
                    "PUT",
                    &format!("/v1/threads/{tid}/messages/{target}"),
                    Some(&json!({ "body": body })),
                ) {
                    Ok((200, _)) => {
                        edits.lock().unwrap().insert(target.clone(), body);
                    }
                    Ok((503, _)) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => {
                        uncertain_edits.lock().unwrap().insert(target.clone());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok((s, b)) => failures.lock().unwrap().push(format!("edit {s} {b}")),
                }
            }
        })
    };

    let (s, started) = admin.call("POST", &format!("/admin/threads/{tid}/rotate-dek"), None);
    assert_eq!(s, 202, "{started}");
    let job_id = started["job_id"].as_str().unwrap().to_owned();
    assert_eq!(started["started"], true);
    // Asked again: the same job.
    let (s, again) = admin.call("POST", &format!("/admin/threads/{tid}/rotate-dek"), None);
    assert_eq!((s, again["job_id"].as_str()), (202, Some(job_id.as_str())));
    assert_eq!(again["started"], false);
    // SIGKILL the server mid-migration: the job survives in LMDB and resumes.
    // After the first batch (64 messages) is migrated, well before the last.
    let mid = wait_job(&admin, &job_id, |j| {
        j["progress"]["migrated"].as_u64().unwrap_or(0) >= (n as u64 / 10).max(64)
            || j["state"] != "migrating"
    });
    server.proc.sigkill();
    eprintln!("killed the server at {} {}", mid["state"], mid["progress"]);
    assert_eq!(
        mid["state"], "migrating",
        "the kill must land mid-migration: {mid}"
    );
    server.restart();
    // Readable while the job goes on (or just after), both keys in use.
    assert!(bodies(&api, &tid).len() >= n);
    let done = wait_job(&admin, &job_id, |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );
    assert!(
        posted.load(Ordering::Relaxed) > 0,
        "posts ran during the job"
    );
    assert!(
        done["progress"]["migrated"].as_u64().unwrap() >= n as u64 - 1,
        "{done}"
    );
    assert_eq!(done["progress"]["unreadable"], 0);

    // Every message readable, edits kept, posts kept.
    // A post cut by the kill may have been committed before its answer was lost: it may be
    // there or not, but every acknowledged one must be.
    let all = bodies(&api, &tid);
    let acked = n as u64 + posted.load(Ordering::Relaxed);
    let uncertain = uncertain_posts.load(Ordering::Relaxed);
    assert!(
        (acked..=acked + uncertain).contains(&(all.len() as u64)),
        "nothing lost: {} stored, {acked} acknowledged, {uncertain} cut by the kill",
        all.len()
    );
    let uncertain_edits = uncertain_edits.lock().unwrap();
    for (id, body) in edits.lock().unwrap().iter() {
        if uncertain_edits.contains(id) {
            // A later edit of it was cut by the kill: either one may stand.
            assert!(
                all[id].get("edited").is_some(),
                "{id} keeps an edit: {}",
                all[id]
            );
            continue;
        }
        assert_eq!(&all[id], body, "the last edit of {id} stands");
    }
    // The thread has a new key; the old one is destroyed in the KMS.
    let (_, after) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    assert_ne!(after["key_id"].as_str().unwrap(), old_key);
    let (s, _) = kms.call("GET", &format!("/get_wrapped?key_id={old_key}"), None);
    assert_eq!(s, 404, "the old DEK is destroyed");
    let (s, jobs) = admin.call("GET", "/admin/jobs", None);
    assert_eq!(s, 200);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn a_plain_thread_is_encrypted_in_place_leaving_no_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let mut server = ServerBuilder::new(tmp.path())
        .kms(&kms)
        .encryption(false)
        .start();
    let api = server.as_role(Role::Backend, "bob");
    let t = api.create_thread("plain");
    let tid = t["id"].as_str().unwrap().to_owned();
    for i in 0..150 {
        api.post_message(&tid, json!({ "text": format!("PLAINMARKER-{i:04}") }));
    }
    assert!(contains(&server.store_bytes(), b"PLAINMARKER-0042"));

    // Encryption turned on; the old thread is encrypted by the job.
    server.proc.sigterm();
    server.edit_config(|t| t.replace("enabled = false", "enabled = true"));
    server.restart();
    let admin = server.as_role(Role::Admin, "ops");
    // Through the operator script (which waits for the job).
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let text = progressdb_e2e::run_ok(
        std::process::Command::new("bash")
            .arg(repo.join("scripts/rotate-thread-dek.sh"))
            .arg(&tid)
            .arg("--encrypt")
            .env("PROGRESSDB_URL", &server.base)
            .env("PROGRESSDB_ADMIN_KEY", &server.keys.admin),
    );
    assert!(text.contains("succeeded: 150/150 migrated"), "{text}");
    let (s, jobs) = admin.call("GET", "/admin/jobs", None);
    assert_eq!(s, 200);
    let done = jobs["jobs"][0].clone();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "encrypt_thread");
    assert_eq!(done["progress"]["migrated"], 150);
    let all = bodies(&api, &tid);
    assert_eq!(all.len(), 150);
    assert!(all.values().any(|b| b["text"] == "PLAINMARKER-0042"));
    // Again: refused, it is encrypted now.
    let (s, b) = admin.call("POST", &format!("/admin/threads/{tid}/encrypt"), None);
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("already_encrypted"))
    );

    // The records are ciphertext now; LMDB still holds the old plain records in free pages
    // until they are reused, and `progressdb compact` (offline) drops them.
    server.proc.sigterm();
    let live = String::from_utf8_lossy(&server.store_bytes()).into_owned();
    assert!(
        live.contains("PLAINMARKER"),
        "the free pages still hold the old records (so this test can fail)"
    );
    let out = std::process::Command::new(progressdb_e2e::bin("progressdb"))
        .args(["compact", "--config"])
        .arg(&server.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !contains(&server.store_bytes(), b"PLAINMARKER"),
        "a plaintext copy survived compaction"
    );
    server.restart();
    assert_eq!(bodies(&api, &tid).len(), 150);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn deleting_a_thread_mid_rotation_shreds_both_keys_and_a_pre_delete_copy_stays_unreadable() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, mut server) = progressdb_e2e::system(tmp.path());
    let admin = server.as_role(Role::Admin, "ops");
    let api = server.as_role(Role::Backend, "carol");
    let t = api.create_thread("shred me");
    let tid = t["id"].as_str().unwrap().to_owned();
    fill(&api, &tid, 600, 4);
    let (_, k1) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    let (s, started) = admin.call("POST", &format!("/admin/threads/{tid}/rotate-dek"), None);
    assert_eq!(s, 202, "{started}");
    let (_, k2) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    assert_ne!(k1["key_id"], k2["key_id"]);

    // A copy of the server's store taken before the delete.
    server.proc.sigterm();
    let copy = tmp.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(server.store.join("data.mdb"), copy.join("data.mdb")).unwrap();
    server.restart();
    let (s, b) = api.call("DELETE", &format!("/v1/threads/{tid}"), None);
    assert_eq!(s, 200, "{b}");
    for k in [&k1, &k2] {
        let (s, _) = kms.call(
            "GET",
            &format!("/get_wrapped?key_id={}", k["key_id"].as_str().unwrap()),
            None,
        );
        assert_eq!(s, 404, "both DEKs are destroyed");
    }

    // The server on the pre-delete copy: the thread's records are there, and nothing of it
    // can be read (both keys its title and messages were sealed under are destroyed).
    server.proc.sigterm();
    std::fs::remove_file(server.store.join("data.mdb")).unwrap();
    let _ = std::fs::remove_file(server.store.join("lock.mdb"));
    std::fs::copy(copy.join("data.mdb"), server.store.join("data.mdb")).unwrap();
    server.restart();
    // Its title is sealed under a destroyed key too: the thread itself no longer opens.
    let (s, v) = api.call("GET", &format!("/v1/threads/{tid}/messages?limit=50"), None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (500, Some("message_unreadable")),
        "{v}"
    );
    let (s, v) = api.call("GET", &format!("/v1/threads/{tid}"), None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (500, Some("message_unreadable")),
        "{v}"
    );
}

#[test]
fn server_copies_follow_a_kek_rotation_and_rebuild_a_lost_kms_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (hsm, mut kms, server) = progressdb_e2e::system(tmp.path());
    let admin = server.as_role(Role::Admin, "ops");
    let api = server.as_role(Role::Backend, "dave");
    let threads: Vec<String> = (0..3)
        .map(|i| {
            let t = api.create_thread(&format!("t{i}"));
            let id = t["id"].as_str().unwrap().to_owned();
            fill(&api, &id, 20, 2);
            id
        })
        .collect();
    let kms_config = kms.config.clone();
    let kms_cli = |args: &[&str]| {
        std::process::Command::new(progressdb_e2e::bin("progressdb-kms"))
            .env(hsm.conf_var, &hsm.conf)
            .args(args)
            .arg("--config")
            .arg(&kms_config)
            .output()
            .unwrap()
    };
    let out = kms_cli(&["rotate-kek"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The admin view refreshes the copy lazily; the bulk refresh does the rest.
    let (_, k) = admin.call("GET", &format!("/admin/threads/{}/kms", threads[0]), None);
    assert_eq!(k["kek_version"], 2, "{k}");
    let (s, r) = admin.call("POST", "/admin/kms/refresh-copies", None);
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (
            r["checked"].as_u64(),
            r["refreshed"].as_u64(),
            r["missing"].as_u64()
        ),
        (Some(3), Some(2), Some(0))
    );
    let (_, r) = admin.call("POST", "/admin/kms/refresh-copies", None);
    assert_eq!(r["refreshed"], 0, "idempotent");
    for t in &threads {
        assert_eq!(bodies(&api, t).len(), 20);
    }

    // The KMS loses its whole store; the server's copies rebuild it.
    let (s, copies) = admin.call("GET", "/admin/kms/key-copies", None);
    assert_eq!(s, 200);
    assert_eq!(copies["copies"].as_array().unwrap().len(), 3);
    let file = tmp.path().join("copies.json");
    std::fs::write(&file, serde_json::to_vec(&copies).unwrap()).unwrap();
    kms.proc.sigterm();
    let store = kms.root.join("kms").join("store");
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    kms.restart();
    let (s, v) = api.call(
        "GET",
        &format!("/v1/threads/{}/messages?limit=5", threads[1]),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(
        v["messages"][0]["error"]["code"], "message_unreadable",
        "{v}"
    );
    // A forged copy among them is refused, not stored.
    let mut forged = copies.clone();
    let w1 = forged["copies"][1]["wrapped_dek"].clone();
    forged["copies"][2]["wrapped_dek"] = w1;
    std::fs::write(&file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let out = kms_cli(&["import-copies", "--in", file.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["imported"], 2, "{report}");
    assert_eq!(report["unrecovered"][0]["reason"], "does_not_unwrap");
    assert_eq!(report["unrecovered"][0]["thread_id"], threads[2].as_str());
    for t in &threads[..2] {
        assert_eq!(bodies(&api, t).len(), 20);
    }
    // The genuine copy of the third still rebuilds it.
    std::fs::write(&file, serde_json::to_vec(&copies).unwrap()).unwrap();
    let out = kms_cli(&["import-copies", "--in", file.to_str().unwrap(), "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["imported"].as_u64(), report["present"].as_u64()),
        (Some(1), Some(2)),
        "{report}"
    );
    assert_eq!(bodies(&api, &threads[2]).len(), 20);
}

#[test]
fn a_key_past_its_message_count_is_rotated_automatically() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, mut server) = progressdb_e2e::system(tmp.path());
    server.proc.sigterm();
    server.edit_config(|t| {
        t.replace(
            "enabled = true",
            "enabled = true\nrotate_after_messages = 5",
        )
    });
    server.restart();
    let admin = server.as_role(Role::Admin, "ops");
    let api = server.as_role(Role::Backend, "erin");
    let t = api.create_thread("busy");
    let tid = t["id"].as_str().unwrap().to_owned();
    let (_, k1) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    for i in 0..5 {
        api.post_message(&tid, json!({ "n": i }));
    }
    let (_, jobs) = admin.call("GET", "/admin/jobs", None);
    assert_eq!(
        jobs["jobs"].as_array().unwrap().len(),
        0,
        "not past the limit yet: {jobs}"
    );
    api.post_message(&tid, json!({ "n": 5 }));
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let (_, jobs) = admin.call("GET", "/admin/jobs", None);
        if let Some(j) = jobs["jobs"].as_array().unwrap().first() {
            if j["state"] == "succeeded" {
                break j.clone();
            }
        }
        assert!(Instant::now() < deadline, "no automatic rotation: {jobs}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(job["reason"], "automatic: message count");
    assert_eq!(job["old_key_id"], k1["key_id"]);
    let (_, k2) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    assert_ne!(k2["key_id"], k1["key_id"]);
    assert_eq!(bodies(&api, &tid).len(), 6);
    let (s, _) = kms.call(
        "GET",
        &format!("/get_wrapped?key_id={}", k1["key_id"].as_str().unwrap()),
        None,
    );
    assert_eq!(s, 404, "the old DEK is destroyed");
}

//! Several KMS replicas: two `progressdb-kms` processes on one SoftHSM token and one
//! PostgreSQL database (a private cluster), behind one server with `kms.endpoints`. Killing a
//! replica under a mixed load (thread creates, posts, reads) fails no request; both replicas
//! serve every key. A KEK rotation whose replica is killed is finished by the other; two
//! rotations (or two `init-kek`) started at once on two replicas make one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use progressdb_e2e::load::{check, unreadable_items, writers, Acked};
use progressdb_e2e::{Kms, KmsBuilder, KmsStore, Provider, Role, Server, ServerBuilder, Token};
use serde_json::json;
use testkit::pg::PgCluster;

struct Replicated {
    /// Stops the activity watcher (see [`watch_activity`]) when dropped.
    _watch: Watch,
    _pg: PgCluster,
    kms: Vec<Kms>,
    server: Server,
    _tmp: tempfile::TempDir,
}

/// Long-running or long-idle-in-transaction PostgreSQL sessions, sampled every second
/// (`pg_stat_activity`, with what they wait for), for a failure's report.
struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn watch_activity(url: String) -> Watch {
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (st, se) = (stop.clone(), seen.clone());
    std::thread::spawn(move || {
        let sql = "SELECT clock_timestamp()::time, pid, state, wait_event_type, wait_event, \
                   round(extract(epoch from clock_timestamp() - state_change)::numeric, 2), \
                   backend_xid, left(query, 60) FROM pg_stat_activity \
                   WHERE datname IS NOT NULL AND pid <> pg_backend_pid() \
                   AND state <> 'idle' AND clock_timestamp() - state_change > interval '1 s'";
        while !st.load(Ordering::Relaxed) {
            if let Ok(out) = Command::new(testkit::pg::bin_dir().join("psql"))
                .args(["-X", "-q", "-t", "-A", "-d", &url, "-c", sql])
                .output()
            {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                if !text.is_empty() {
                    se.lock().unwrap().push(text);
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    Watch { stop, seen }
}

impl Replicated {
    /// The server's process, then each replica's (for their logs).
    fn procs(&self) -> Vec<&progressdb_e2e::Proc> {
        std::iter::once(&self.server.proc)
            .chain(self.kms.iter().map(|k| &k.proc))
            .collect()
    }
}

fn replicated(n: usize) -> Replicated {
    replicated_with(n, "")
}

fn replicated_with(n: usize, extra: &str) -> Replicated {
    // Lock waits and slow statements are logged (with the processes) for a failure's report.
    let pg = PgCluster::start_with(
        false,
        &[
            "log_lock_waits=on",
            "deadlock_timeout=200ms",
            "log_min_duration_statement=300",
            "log_line_prefix=%m [%p] ",
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let store = KmsStore::Postgres(pg.new_database());
    let watch = watch_activity(pg.url("postgres"));
    let kms: Vec<Kms> = (0..n)
        .map(|i| {
            let root = tmp.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&root).unwrap();
            KmsBuilder::new(&root)
                .token(&hsm)
                .store(store.clone())
                .extra_toml(extra)
                .start()
        })
        .collect();
    let provider = Provider::Replicas {
        endpoints: kms.iter().map(|k| k.endpoint.clone()).collect(),
    };
    let server = ServerBuilder::new(tmp.path()).provider(&provider).start();
    Replicated {
        _watch: watch,
        _pg: pg,
        kms,
        server,
        _tmp: tmp,
    }
}

/// Readers of every acknowledged thread: each read must answer 200 (counted otherwise).
fn readers(
    api: &progressdb_e2e::Api,
    acked: &Acked,
    failed: &Arc<AtomicU64>,
    reads: &Arc<AtomicU64>,
) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..2)
        .map(|_| {
            let (api, acked, stop, failed, reads) = (
                api.clone(),
                acked.clone(),
                stop.clone(),
                failed.clone(),
                reads.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                while !stop.load(Ordering::Relaxed) {
                    let threads: Vec<String> = acked.lock().unwrap().keys().cloned().collect();
                    for tid in threads.iter().rev().take(5) {
                        match api.send(&agent, "GET", &format!("/v1/threads/{tid}/messages"), None)
                        {
                            // A 200 page can hold items that did not open: failures too.
                            Ok((200, page)) if unreadable_items(&page) == 0 => {
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                eprintln!("read of {tid} failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    (stop, handles)
}

/// Writers and readers through the server, counting what failed.
struct MixedLoad {
    api: progressdb_e2e::Api,
    admin: progressdb_e2e::Api,
    acked: Acked,
    refused: Arc<AtomicU64>,
    failed_reads: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    stops: Vec<Arc<AtomicBool>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl MixedLoad {
    /// `writers` writers, then (after 0.3 s, so there is something to read) 2 readers.
    fn start(server: &Server, writers_n: usize) -> Self {
        let api = server.as_role(Role::Backend, "alice");
        let admin = server.as_role(Role::Admin, "ops");
        let acked: Acked = Arc::default();
        let refused = Arc::new(AtomicU64::new(0));
        let failed_reads = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        let (stop_w, mut handles) = writers(&api, writers_n, &acked, &refused);
        std::thread::sleep(Duration::from_millis(300));
        let (stop_r, r) = readers(&api, &acked, &failed_reads, &reads);
        handles.extend(r);
        Self {
            api,
            admin,
            acked,
            refused,
            failed_reads,
            reads,
            stops: vec![stop_w, stop_r],
            handles,
        }
    }

    /// Stops and joins every worker and prints what ran (`what`: the scenario); then no
    /// write or read may have failed, and everything acknowledged must be there.
    fn stop_and_check(
        &mut self,
        what: &str,
        logs: &[&progressdb_e2e::Proc],
        pg: &PgCluster,
        watch: &Watch,
    ) {
        for s in &self.stops {
            s.store(true, Ordering::Relaxed);
        }
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
        eprintln!(
            "{what}: {} threads, {} messages, {} reads; {} writes and {} reads failed",
            self.threads(),
            self.messages(),
            self.reads.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.failed_reads.load(Ordering::Relaxed)
        );
        if self.refused.load(Ordering::Relaxed) + self.failed_reads.load(Ordering::Relaxed) > 0 {
            eprintln!(
                "--- PostgreSQL sessions busy or in a transaction for over 1 s ---\n{}",
                watch.seen.lock().unwrap().join("\n")
            );
            let pg_log = pg.log_text();
            let kept =
                std::env::temp_dir().join(format!("e2e-replicas-{}-pg.log", std::process::id()));
            let _ = std::fs::write(&kept, &pg_log);
            eprintln!(
                "--- PostgreSQL (log kept in {}) ---\n{}",
                kept.display(),
                pg_log
                    .lines()
                    .filter(|l| !l.contains("LOG:  checkpoint"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            for (i, p) in logs.iter().enumerate() {
                let text = p.log_text();
                let bad: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                let kept = std::env::temp_dir()
                    .join(format!("e2e-replicas-{}-{i}.log", std::process::id()));
                let _ = std::fs::copy(&p.log, &kept);
                eprintln!(
                    "--- process {i} (whole log kept in {}): warnings and errors ---\n{}",
                    kept.display(),
                    bad.join("\n")
                );
            }
        }
        assert_eq!(self.refused.load(Ordering::Relaxed), 0, "a write failed");
        assert_eq!(
            self.failed_reads.load(Ordering::Relaxed),
            0,
            "a read failed"
        );
        check(&self.api, &self.admin, &self.acked, 0);
    }

    fn threads(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn messages(&self) -> usize {
        self.acked.lock().unwrap().values().map(|m| m.len()).sum()
    }
}

#[test]
fn killing_one_replica_under_mixed_load_fails_no_request() {
    let mut sys = replicated(2);
    let mut load = MixedLoad::start(&sys.server, 4);
    // Kill each replica in turn, bringing the other back first.
    for victim in [0usize, 1] {
        std::thread::sleep(Duration::from_millis(800));
        sys.kms[victim].proc.sigkill();
        std::thread::sleep(Duration::from_millis(1200));
        sys.kms[victim].restart();
    }
    std::thread::sleep(Duration::from_millis(800));
    load.stop_and_check(
        "2 replicas, each killed once",
        &sys.procs(),
        &sys._pg,
        &sys._watch,
    );
    assert!(load.threads() > 10 && load.messages() > 50, "the load ran");
    assert!(load.reads.load(Ordering::Relaxed) > 20, "the reads ran");
    // Every key is served by each replica alone.
    for victim in [0usize, 1] {
        sys.kms[victim].proc.sigkill();
        for tid in load.acked.lock().unwrap().keys().take(20) {
            load.api.post_message(tid, json!("one replica"));
        }
        sys.kms[victim].restart();
    }
}

/// A DEK cached by one replica stops being served by it within the coherence bound (2 ×
/// `store.coherence_ms`, 1 s by default) once another replica destroys it, although the
/// cache TTL is 300 s.
#[test]
fn a_key_destroyed_on_one_replica_is_refused_by_the_other_within_the_bound() {
    let sys = replicated(2);
    let (a, b) = (&sys.kms[0], &sys.kms[1]);
    let (s, k) = a.call(
        "POST",
        "/create_dek_for_thread",
        Some(json!({ "thread_id": "coherent" })),
    );
    assert_eq!(s, 200, "{k}");
    let key = k["key_id"].as_str().unwrap().to_owned();
    let encrypt = |kms: &Kms| {
        kms.call(
            "POST",
            "/encrypt",
            Some(json!({ "key_id": key, "plaintext": "aGVsbG8=" })),
        )
        .0
    };
    // Wait until b's cache is in use (its first change-feed poll: the event is a call served
    // from the cache, at most 10 s), which also warms it.
    let hits = || progressdb_e2e::metric(&b.metrics(), "progressdb_kms_cache_hits_total").unwrap();
    let waiting = Instant::now();
    loop {
        assert_eq!(encrypt(b), 200);
        let hits_before = hits();
        assert_eq!(encrypt(b), 200);
        if hits() > hits_before {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "b never serves the key from its cache"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, v) = a.call("POST", "/destroy_key", Some(json!({ "key_id": key })));
    assert_eq!(s, 200, "{v}");
    // The documented bound, 2 × store.coherence_ms (500 ms by default), is checked against
    // when each call was sent: a call sent within it may still be served.
    let bound = Duration::from_millis(2 * 500);
    let t0 = std::time::Instant::now();
    loop {
        let sent = t0.elapsed();
        if encrypt(b) == 404 {
            break;
        }
        assert!(
            sent < bound,
            "b served the destroyed key to a call sent {sent:?} after the destroy"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("destroyed on a, refused by b after {:?}", t0.elapsed());
}

/// A rotation is started on both replicas at once (one job), the replica driving it is
/// SIGKILLed mid-rewrap under a mixed load, and the other takes the job over once its
/// lease lapses and finishes it: every DEK under the new version, the old one retired, no
/// request failed.
#[test]
fn a_rotation_whose_replica_is_killed_is_finished_by_the_other() {
    let mut sys = replicated_with(
        2,
        "[lifecycle]\nrewrap_concurrency = 1\nrewrap_batch = 2\nlease_secs = 2\n",
    );
    // Enough DEKs that the rewrap takes a while.
    let seeders: Vec<_> = (0..4)
        .map(|t| {
            let sock = sys.kms[t % 2].socket();
            let log = sys.kms[t % 2].root.join("kms.log");
            std::thread::spawn(move || {
                for i in 0..300 {
                    let (s, k) = progressdb_e2e::uds_request(
                        &sock,
                        "POST",
                        "/create_dek_for_thread",
                        Some(&json!({ "thread_id": format!("seed-{t}-{i}") })),
                    )
                    .unwrap();
                    if s != 200 {
                        let log = std::fs::read_to_string(&log).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(40).collect();
                        panic!("{s} {k}\n{}", tail.join("\n"));
                    }
                }
            })
        })
        .collect();
    for h in seeders {
        h.join().unwrap();
    }
    let mut load = MixedLoad::start(&sys.server, 2);

    // Both replicas are asked at the same moment: one rotation.
    let (ja, jb) = std::thread::scope(|s| {
        let a = s.spawn(|| sys.kms[0].cli_json(&["rotate-kek", "--no-wait", "--json"]));
        let b = s.spawn(|| sys.kms[1].cli_json(&["rotate-kek", "--no-wait", "--json"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(ja["id"], jb["id"], "two rotations: {ja} {jb}");
    let id = ja["id"].as_str().unwrap().to_owned();
    let job = |sys: &Replicated, k: usize| sys.kms[k].cli_json(&["jobs", "--id", &id, "--json"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let driver = loop {
        let driving: Vec<usize> = (0..2)
            .filter(|k| {
                sys.kms[*k]
                    .proc
                    .log_text()
                    .contains("driving lifecycle job")
            })
            .collect();
        let j = job(&sys, 0);
        assert_ne!(
            j["state"], "succeeded",
            "the rotation ended before the kill: {j}"
        );
        if driving.len() == 1 && j["progress"]["rewrapped"].as_u64().unwrap_or(0) >= 100 {
            break driving[0];
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not get going: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let other = 1 - driver;
    sys.kms[driver].proc.sigkill();
    let killed_at = job(&sys, other);
    eprintln!(
        "replica {driver} killed at {} rewrapped ({})",
        killed_at["progress"]["rewrapped"], killed_at["state"]
    );
    let t0 = Instant::now();
    let done = loop {
        let j = job(&sys, other);
        if j["state"] == "succeeded" || j["state"] == "failed" {
            break j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "never finished: {j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "replica {other} finished the rotation {:?} after the kill",
        t0.elapsed()
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        sys.kms[other]
            .proc
            .log_text()
            .contains("driving lifecycle job"),
        "the other replica took the job over"
    );
    sys.kms[driver].restart();
    std::thread::sleep(Duration::from_millis(500));
    load.stop_and_check(
        "a rotation's replica killed",
        &sys.procs(),
        &sys._pg,
        &sys._watch,
    );
    // Every active DEK is under version 2 and version 1 is retired, seen from both replicas.
    for k in 0..2 {
        let st = sys.kms[k].cli_json(&["status", "--json"]);
        assert_eq!(st["current_version"], 2, "{st}");
        let versions = st["versions"].as_array().unwrap();
        let v1 = versions.iter().find(|v| v["version"] == 1).unwrap();
        let v2 = versions.iter().find(|v| v["version"] == 2).unwrap();
        assert_eq!(v1["deks"], 0, "{st}");
        assert_eq!(v1["state"], "retired", "{st}");
        assert_eq!(v2["deks"], st["active_deks"], "{st}");
        assert_eq!(versions.len(), 2, "one new KEK version: {st}");
    }
}

/// `init-kek` started at the same moment for two replicas of one fresh token: one KEK and
/// one audit key are made (a KMS starts on them: it refuses a duplicated one), and both
/// commands succeed.
#[test]
fn init_kek_started_twice_at_once_makes_one_kek() {
    let pg = PgCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let store = KmsStore::Postgres(pg.new_database());
    let replicas: Vec<Kms> = (0..2)
        .map(|i| {
            let root = tmp.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&root).unwrap();
            KmsBuilder::new(&root)
                .token(&hsm)
                .store(store.clone())
                .init_kek_runs(0)
                .provision()
        })
        .collect();
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = replicas
            .iter()
            .map(|kms| {
                let mut init = kms.command(&["init-kek"]);
                s.spawn(move || init.output().unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let said: Vec<String> = outs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect();
    assert_eq!(
        said.iter().filter(|s| s.starts_with("created KEK")).count(),
        1,
        "{said:?}"
    );
    assert_eq!(
        said.iter()
            .filter(|s| s.contains("already present"))
            .count(),
        1,
        "{said:?}"
    );
    let mut kms = replicas.into_iter().next().unwrap();
    kms.restart();
    let st = kms.cli_json(&["status", "--json"]);
    assert_eq!(st["current_version"], 1, "{st}");
    assert_eq!(st["versions"].as_array().unwrap().len(), 1, "{st}");
}

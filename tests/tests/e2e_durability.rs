//! Durability a SIGKILL cannot show (the page cache survives a killed process): every
//! acknowledged write of both stores comes after a completed `fdatasync`/`fsync`/`msync(MS_SYNC)` of the
//! store's data file. Each service runs under `strace -f`, requests are sent one at a time,
//! and the trace is read in order: between two success answers written to a socket there must
//! be a sync of `data.mdb` that returned 0. The checker itself is tested on traces without a
//! sync (what syncing turned off would look like): it fails them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use progressdb_e2e::{bin, KmsBuilder, Proc, ServerBuilder, Token};
use serde_json::json;

/// Reads an `strace -f` log: returns, for each success answer (`HTTP/1.1 2xx`) written to any
/// descriptor, how many completed syncs of the file named `data_file` came before it since the
/// previous answer; and the number of answers.
fn syncs_before_each_answer(trace: &str, data_file: &str) -> Vec<usize> {
    let mut data_fds: Vec<String> = Vec::new();
    // pid -> fd of a sync call that has not returned yet.
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut since = 0usize;
    let mut out = Vec::new();
    let sync_call = |l: &str| {
        ["fdatasync(", "fsync(", "msync("]
            .iter()
            .find_map(|c| l.find(c).map(|i| (i + c.len(), *c)))
    };
    // pids whose open of the data file has not returned yet (another thread's call came
    // between: strace splits it into `<unfinished ...>` and `<... openat resumed>`).
    let mut opening: Vec<String> = Vec::new();
    let returned_fd = |l: &str| {
        l.rsplit("= ")
            .next()
            .and_then(|f| f.trim().parse::<u32>().ok())
            .map(|fd| fd.to_string())
    };
    for line in trace.lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        let rest = rest.trim_start();
        if rest.starts_with("openat(") && rest.contains(data_file) {
            if rest.ends_with("<unfinished ...>") {
                opening.push(pid.to_owned());
            } else if let Some(fd) = returned_fd(rest) {
                data_fds.push(fd);
            }
            continue;
        }
        if rest.starts_with("<... openat resumed>") {
            if let Some(i) = opening.iter().position(|p| p == pid) {
                opening.swap_remove(i);
                data_fds.extend(returned_fd(rest));
            }
            continue;
        }
        if let Some((at, call)) = sync_call(rest) {
            let arg: String = rest[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            // Only a synchronous msync is a sync (MS_ASYNC schedules the write and returns).
            let target = match call {
                "msync(" if rest.contains("MS_SYNC") => "mmap".to_owned(),
                "msync(" => "async".to_owned(),
                _ => arg,
            };
            if rest.ends_with("<unfinished ...>") {
                pending.insert(pid.to_owned(), target);
            } else if rest.ends_with("= 0") && (target == "mmap" || data_fds.contains(&target)) {
                since += 1;
            }
            continue;
        }
        if rest.contains("resumed>") && rest.ends_with("= 0") {
            if let Some(fd) = pending.remove(pid) {
                if fd == "mmap" || data_fds.contains(&fd) {
                    since += 1;
                }
            }
            continue;
        }
        if rest.contains("\"HTTP/1.1 20") {
            out.push(since);
            since = 0;
        }
    }
    out
}

#[test]
fn the_checker_fails_a_trace_without_syncs() {
    let synced = "10 openat(AT_FDCWD, \"/s/data.mdb\", O_RDWR|O_CREAT, 0600) = 7\n\
                  11 fdatasync(7 <unfinished ...>\n\
                  12 read(3, \"x\", 1) = 1\n\
                  11 <... fdatasync resumed>) = 0\n\
                  13 write(9, \"HTTP/1.1 201 Created\\r\\n\"..., 200) = 200\n\
                  11 fdatasync(7) = 0\n\
                  13 writev(9, [{iov_base=\"HTTP/1.1 201 Created\"...}], 1) = 200\n";
    assert_eq!(syncs_before_each_answer(synced, "data.mdb"), vec![1, 1]);
    // The open itself interrupted by another thread's call.
    let split_open = "10 openat(AT_FDCWD, \"/s/data.mdb\", O_RDWR|O_CREAT, 0600 <unfinished ...>\n\
                      12 openat(AT_FDCWD, \"/s/lock.mdb\", O_RDWR, 0600) = 6\n\
                      10 <... openat resumed>) = 7\n\
                      11 fdatasync(7) = 0\n\
                      13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n\
                      11 fdatasync(6) = 0\n\
                      13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n";
    assert_eq!(syncs_before_each_answer(split_open, "data.mdb"), vec![1, 0]);
    // Syncing off: answers with no sync before them; a sync of another file; a failed sync.
    let unsynced = "10 openat(AT_FDCWD, \"/s/data.mdb\", O_RDWR, 0600) = 7\n\
                    10 openat(AT_FDCWD, \"/s/other\", O_RDWR, 0600) = 8\n\
                    13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n\
                    11 fdatasync(8) = 0\n\
                    13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n\
                    11 fdatasync(7) = -1 EIO (Input/output error)\n\
                    13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n\
                    11 msync(0x7f0000000000, 4096, MS_ASYNC) = 0\n\
                    13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n\
                    11 msync(0x7f0000000000, 4096, MS_SYNC) = 0\n\
                    13 write(9, \"HTTP/1.1 201 Created\"..., 200) = 200\n";
    assert_eq!(
        syncs_before_each_answer(unsynced, "data.mdb"),
        vec![0, 0, 0, 0, 1]
    );
}

fn strace(log: &Path) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-s", "24", "-e", "signal=none", "-e"])
        .arg("trace=openat,fdatasync,fsync,msync,write,writev,sendto,sendmsg")
        .arg("-o")
        .arg(log);
    c
}

/// The service strace runs (its child), killed when the test ends early: killing strace alone
/// would leave it running, detached.
struct Traced(Option<String>);

impl Traced {
    /// The process named `name` that `strace` started, once it has exec'ed (before that,
    /// strace's child is a copy of strace).
    fn of(strace: &Proc, name: &str) -> Traced {
        let t = Instant::now();
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.pid()))
                    .unwrap_or_default();
            let found = children.split_whitespace().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| name.starts_with(c.trim()))
            });
            if let Some(pid) = found {
                return Traced(Some(pid.to_owned()));
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "strace started no {name}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCP port the traced service listens on, once it does.
    fn port(&self) -> Option<u16> {
        let pid: i32 = self.0.as_deref()?.parse().ok()?;
        testkit::proc::listening_ports(pid).first().copied()
    }

    /// SIGTERM, then waits for it to go. `log` is shown if the service was gone already.
    fn stop(&mut self, log: &Path) {
        let pid = self.0.take().unwrap();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(
            killed,
            "the service {pid} had already exited; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        let t = Instant::now();
        while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
            assert!(t.elapsed() < Duration::from_secs(20), "{pid} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first `answers` success answers in the trace at `log` each follow a completed sync.
fn check_trace(log: &Path, answers: usize) {
    let trace = std::fs::read_to_string(log).unwrap();
    let counts = syncs_before_each_answer(&trace, "data.mdb");
    assert!(
        counts.len() >= answers,
        "{} answers in the trace, {answers} sent",
        counts.len()
    );
    let first = &counts[..answers];
    eprintln!(
        "{}: syncs of data.mdb before each answer: {first:?}",
        log.display()
    );
    assert!(
        first.iter().all(|n| *n >= 1),
        "an acknowledged write was not preceded by a completed sync of data.mdb: {first:?}"
    );
}

#[test]
fn every_acknowledged_write_of_both_stores_follows_a_completed_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let kms_files = KmsBuilder::new(tmp.path()).token(&hsm).provision();
    let (kms_conf, sock) = (kms_files.config.clone(), kms_files.socket());

    // The KMS under strace: each acknowledged create_dek_for_thread.
    let kms_trace = tmp.path().join("kms.strace");
    let mut cmd = strace(&kms_trace);
    cmd.env(hsm.conf_var, &hsm.conf)
        .arg(bin("progressdb-kms"))
        .args(["serve", "--config"])
        .arg(&kms_conf);
    let mut kms = Proc::spawn("progressdb-kms", cmd, &tmp.path().join("kms.log"));
    let mut kms_service = Traced::of(&kms, "progressdb-kms");
    wait_until("the KMS did not start", || {
        kms.assert_running();
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    const N: usize = 15;
    for i in 0..N {
        let (s, v) = progressdb_e2e::uds_request(
            Path::new(&sock),
            "POST",
            "/create_dek_for_thread",
            Some(&json!({ "thread_id": format!("t-sync-{i}") })),
        )
        .unwrap();
        assert_eq!(s, 200, "{v}");
    }

    // The server under strace: each acknowledged thread and message.
    let server_files = ServerBuilder::new(tmp.path()).kms(&kms_files).provision();
    let (conf, keys) = (server_files.config.clone(), server_files.keys.clone());
    let server_trace = tmp.path().join("server.strace");
    let mut cmd = strace(&server_trace);
    cmd.arg(bin("progressdb"))
        .args(["serve", "--config"])
        .arg(&conf);
    let mut server = Proc::spawn("progressdb", cmd, &tmp.path().join("server.log"));
    let mut server_service = Traced::of(&server, "progressdb");
    // Configured with port 0, the server binds a free port itself: read it back.
    let mut port = 0;
    wait_until("the server did not start", || {
        server.assert_running();
        port = server_service.port().unwrap_or(0);
        port != 0
    });
    let base = format!("http://127.0.0.1:{port}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let post = |path: &str, body: serde_json::Value| {
        agent
            .post(&format!("{base}{path}"))
            .set("Authorization", &format!("Bearer {}", keys.backend))
            .set("X-User-ID", "alice")
            .send_json(body)
            .unwrap()
            .into_json::<serde_json::Value>()
            .unwrap()
    };
    let t = post("/v1/threads", json!({ "title": "durable" }));
    let tid = t["id"].as_str().unwrap().to_owned();
    for i in 0..N {
        post(&format!("/v1/threads/{tid}/messages"), json!({ "body": i }));
    }

    // SIGTERM to the services themselves (strace's children); strace ends with them.
    server_service.stop(&tmp.path().join("server.log"));
    server.sigterm();
    kms_service.stop(&tmp.path().join("kms.log"));
    kms.sigterm();
    // The KMS's first N answers are the N creates (later ones are the server's calls).
    check_trace(&kms_trace, N);
    // The server's: the thread and its N messages.
    check_trace(&server_trace, N + 1);
}

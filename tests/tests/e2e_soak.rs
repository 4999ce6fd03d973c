//! A bounded soak of the whole system: 16 clients run a mix of every message and thread
//! operation against the real server, the real KMS and a real SoftHSM token for
//! `PROGRESSDB_SOAK_SECS` seconds (default 40; set it higher for a longer soak). Every
//! answer must be the expected one (zero errors), and both processes' memory must stay flat:
//! the anonymous RSS at the end may exceed the one after the warm-up by at most 50 % plus
//! 16 MiB. Latency percentiles and the RSS samples over time are written to
//! `target/soak-report.json` and printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use progressdb_e2e::{Proc, Role};
use serde_json::json;

const CLIENTS: usize = 16;

/// (second, operations so far, KMS anon KiB, server anon KiB, KMS RSS KiB, server RSS KiB).
type Sample = (u64, usize, u64, u64, u64, u64);

fn pid(p: &Proc) -> u32 {
    p.child.as_ref().map(std::process::Child::id).unwrap()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

#[test]
fn a_mixed_load_runs_without_errors_and_memory_stays_flat() {
    let secs: u64 = std::env::var("PROGRESSDB_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, mut kms, server) = progressdb_e2e::system(tmp.path());
    let (kms_pid, server_pid) = (pid(&kms.proc), pid(&server.proc));

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let server = Arc::new(server);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (server, stop, ops, errors, latencies) = (
                Arc::clone(&server),
                Arc::clone(&stop),
                Arc::clone(&ops),
                Arc::clone(&errors),
                Arc::clone(&latencies),
            );
            std::thread::spawn(move || {
                let user = format!("user{c}");
                let api = server.as_role(Role::Backend, &user);
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let mut lat = Vec::new();
                let mut call =
                    |method: &str, path: &str, body: Option<serde_json::Value>, want: u16| {
                        let t = Instant::now();
                        let r = api.send(&agent, method, path, body.as_ref());
                        lat.push(t.elapsed());
                        ops.fetch_add(1, Ordering::Relaxed);
                        match r {
                            // A page answers 200 with the items that did not open: failures.
                            Ok((s, text))
                                if s == want
                                    && path.ends_with("/messages?limit=50")
                                    && progressdb_e2e::load::unreadable_items(&text) > 0 =>
                            {
                                errors
                                    .lock()
                                    .unwrap()
                                    .push(format!("{method} {path}: unreadable items in {text}"));
                                None
                            }
                            Ok((s, text)) if s == want => {
                                serde_json::from_str::<serde_json::Value>(&text).ok()
                            }
                            Ok((s, text)) => {
                                errors
                                    .lock()
                                    .unwrap()
                                    .push(format!("{method} {path}: {s} {text}"));
                                None
                            }
                            Err(e) => {
                                errors.lock().unwrap().push(format!("{method} {path}: {e}"));
                                None
                            }
                        }
                    };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let Some(t) = call(
                        "POST",
                        "/v1/threads",
                        Some(json!({"title": format!("soak {c} {i}")})),
                        201,
                    ) else {
                        continue;
                    };
                    let tid = t["id"].as_str().unwrap_or_default().to_owned();
                    let msgs = format!("/v1/threads/{tid}/messages");
                    let mut last = None;
                    for n in 0..8 {
                        let body = json!({"body": {"text": "s".repeat(200 + 50 * n), "n": n}});
                        last = call("POST", &msgs, Some(body), 201);
                    }
                    call("GET", &format!("{msgs}?limit=50"), None, 200);
                    if let Some(m) = last {
                        let one = format!("{msgs}/{}", m["id"].as_str().unwrap_or_default());
                        call("GET", &one, None, 200);
                        call("PUT", &one, Some(json!({"body": {"edited": true}})), 200);
                        call("DELETE", &one, None, 200);
                    }
                    call(
                        "PATCH",
                        &format!("/v1/threads/{tid}"),
                        Some(json!({"title": "renamed"})),
                        200,
                    );
                    call("GET", "/v1/threads?limit=20", None, 200);
                    if i & 3 == 0 {
                        call("DELETE", &format!("/v1/threads/{tid}"), None, 200);
                    }
                }
                latencies.lock().unwrap().extend(lat);
            })
        })
        .collect();

    // RSS of both processes, every second.
    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        samples.push((
            start.elapsed().as_secs(),
            ops.load(Ordering::Relaxed),
            status_kib(kms_pid, "RssAnon:"),
            status_kib(server_pid, "RssAnon:"),
            status_kib(kms_pid, "VmRSS:"),
            status_kib(server_pid, "VmRSS:"),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let total = ops.load(Ordering::Relaxed);

    let quarter = (samples.len() / 4).max(1);
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let window = |from: usize, to: usize, col: fn(&Sample) -> u64| {
        let mut v: Vec<u64> = samples[from..to].iter().map(col).collect();
        median(&mut v)
    };
    let n = samples.len();
    let kms_early = window(quarter, 2 * quarter, |s| s.2);
    let kms_late = window(n - quarter, n, |s| s.2);
    let srv_early = window(quarter, 2 * quarter, |s| s.3);
    let srv_late = window(n - quarter, n, |s| s.3);
    let report = json!({
        "seconds": secs,
        "clients": CLIENTS,
        "operations": total,
        "ops_per_sec": total as f64 / secs as f64,
        "errors": errors.len(),
        "latency_ms": {"p50": percentile(&lat, 50), "p99": percentile(&lat, 99), "max": percentile(&lat, 100)},
        "rss_anon_kib": {
            "kms": {"after_warmup": kms_early, "end": kms_late},
            "server": {"after_warmup": srv_early, "end": srv_late},
        },
        "samples": samples.iter().map(|s| json!({
            "t": s.0, "ops": s.1, "kms_anon_kib": s.2, "server_anon_kib": s.3,
            "kms_rss_kib": s.4, "server_rss_kib": s.5,
        })).collect::<Vec<_>>(),
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak-report.json");
    let _ = std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap());
    eprintln!(
        "soak: {total} operations in {secs} s ({:.0}/s), {} errors, p50 {:.2} ms, p99 {:.2} ms; \
         RSS anon KiB kms {kms_early} -> {kms_late}, server {srv_early} -> {srv_late}",
        total as f64 / secs as f64,
        errors.len(),
        percentile(&lat, 50),
        percentile(&lat, 99)
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(total > 1000, "only {total} operations");
    for (name, early, late) in [
        ("KMS", kms_early, kms_late),
        ("server", srv_early, srv_late),
    ] {
        assert!(
            late <= early + early / 2 + 16 * 1024,
            "{name} anonymous memory grew from {early} KiB to {late} KiB"
        );
    }
    kms.proc.assert_running();
}

//! A smoke run of `progressdb-bench --quick` (the command `scripts/bench.sh` wraps): every
//! scenario runs against the real binaries and a real SoftHSM token, both report files are
//! written, each rate has its same-run limit and the processes' figures, and the hand-written
//! head of the Markdown report is kept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

/// The scenario groups the bench binary measures (`progressdb-bench --list`).
fn groups() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_progressdb-bench"))
        .arg("--list")
        .output()
        .unwrap();
    assert!(out.status.success());
    let groups: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(groups.len() >= 10, "{groups:?}");
    groups
}

#[test]
fn quick_run_writes_every_scenario_with_its_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("bench");
    let md = prefix.with_extension("md");
    let marker = "<!-- scripts/bench.sh writes everything below this line -->";
    std::fs::write(
        &md,
        format!("# Hand-written analysis\n\n{marker}\n\nold figures\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_progressdb-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&prefix)
        .arg("--dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.starts_with("# Hand-written analysis\n"), "{text}");
    assert_eq!(text.matches(marker).count(), 1, "{text}");
    assert!(!text.contains("old figures"), "{text}");
    assert!(text.contains("| scenario | rate |"), "{text}");

    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(v["failures"], Value::Array(vec![]));
    assert!(v["cores"].as_u64().unwrap() >= 1);
    assert!(!v["commit"].as_str().unwrap().is_empty());
    let scenarios = v["scenarios"].as_array().unwrap();
    let groups = groups();
    // Every scenario belongs to a listed group, and every group was measured.
    for s in scenarios {
        let id = s["id"].as_str().unwrap();
        assert!(
            groups.iter().any(|g| id.starts_with(g.as_str())),
            "{id} is in no group of {groups:?}"
        );
    }
    for want in &groups {
        let s = scenarios
            .iter()
            .find(|s| s["id"].as_str().unwrap().starts_with(want.as_str()))
            .unwrap_or_else(|| panic!("no scenario {want} in {v}"));
        if want == "memory" {
            let m = s["memory"].as_array().unwrap();
            assert_eq!(m.len(), 3, "{s}");
            for f in m {
                assert!(f["peak_rss_kib"].as_u64().unwrap() > 0, "{f}");
                assert!(f["records"].as_u64().unwrap() > 0, "{f}");
            }
            continue;
        }
        assert!(s["system"]["rate"].as_f64().unwrap() > 0.0, "{s}");
        // Calls were made and timed, items counted, and no call took a minute in a quick
        // run.
        let sys = &s["system"];
        assert!(sys["calls"].as_u64().unwrap() > 0, "{s}");
        assert!(
            sys["items"].as_u64().unwrap() >= sys["calls"].as_u64().unwrap(),
            "{s}"
        );
        assert!(sys["p99_ms"].as_f64().unwrap() < 60_000.0, "{s}");
        let limits = s["limits"].as_array().unwrap();
        assert!(!limits.is_empty(), "{s}");
        for l in limits {
            assert!(l["rate"].as_f64().unwrap() > 0.0, "{l}");
        }
        assert!(s["ratio"].as_f64().unwrap() > 0.0, "{s}");
        // The system's own processes were watched (a service, not only the client).
        let procs = s["system"]["processes"].as_array().unwrap();
        assert!(
            procs.iter().any(|p| {
                let name = p["process"].as_str().unwrap();
                !name.starts_with("bench") && p["peak_rss_kib"].as_u64().unwrap() > 0
            }),
            "{s}"
        );
    }
}

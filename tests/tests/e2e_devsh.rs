//! `scripts/dev.sh` from a clean copy of the repository (only the files git tracks), in both
//! modes: `--demo` (external: SoftHSM token, KMS, server) and `--demo --embedded` (dev build
//! with the in-process provider and a master key under `.dev/`), the `--demo-only` alias, the
//! long-running mode stopped by Ctrl-C (SIGINT), and a bad option. The binaries come from
//! `E2E_BIN_DIR` through `PROGRESSDB_DEV_BIN_DIR` (they are the same build the script would
//! make; building again in the copy would rebuild the workspace for minutes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A copy of every file git tracks (the working-tree version), as a fresh clone would have.
fn clean_copy(dst: &Path) {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo_root())
        .output()
        .expect("git must be installed to run this test");
    assert!(out.status.success(), "git ls-files failed");
    let mut n = 0;
    for rel in out.stdout.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).unwrap());
        let src = repo_root().join(rel);
        if !src.is_file() {
            continue; // deleted in the working tree
        }
        let to = dst.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&src, &to).unwrap(); // keeps the mode bits
        n += 1;
    }
    assert!(n > 50, "only {n} tracked files copied");
    assert!(!dst.join(".dev").exists() && !dst.join("target").exists());
}

fn dev_sh(repo: &Path, port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/dev.sh")
        .args(args)
        .current_dir(repo)
        .env("PORT", port.to_string())
        .env("PROGRESSDB_DEV_BIN_DIR", progressdb_e2e::bin_dir())
        .env_remove("SOFTHSM2_CONF")
        .env_remove("CARGO_TARGET_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` up to `limit` (killing it after that) and returns (exit code, stdout+stderr).
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                p.read_to_string(&mut s).unwrap();
            }
            s
        })
    };
    let out_t = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err_t = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!("{}{}", out_t.join().unwrap(), err_t.join().unwrap());
    (status.code(), text)
}

fn run(repo: &Path, port: u16, args: &[&str]) -> String {
    let child = dev_sh(repo, port, args).spawn().unwrap();
    let (code, out) = finish(child, Duration::from_secs(120));
    assert_eq!(code, Some(0), "dev.sh {args:?} failed:\n{out}");
    out
}

fn key_of(keys_toml: &str, role: &str) -> String {
    let line = keys_toml
        .lines()
        .find(|l| l.starts_with(&format!("{role} = ")))
        .unwrap_or_else(|| panic!("no {role} in keys.toml"));
    line.split('"').nth(1).unwrap().to_owned()
}

/// What every demo run must show, whatever the mode.
fn check_demo(out: &str, repo: &Path, port: u16, mode: &str) {
    let base = format!("http://127.0.0.1:{port}");
    // Both messages went in and came back decrypted in one page.
    let page = out
        .lines()
        .find(|l| l.starts_with("{\"messages\":["))
        .unwrap_or_else(|| panic!("no message page in the output:\n{out}"));
    assert!(
        page.contains("top secret demo message one")
            && page.contains("top secret demo message two"),
        "{page}"
    );
    // The admin view shows the wrapped DEK and the KEK it is under.
    assert!(out.contains("\"wrapped_dek\":\""), "{out}");
    assert!(
        out.contains(": no match"),
        "plaintext check missing:\n{out}"
    );
    assert!(out.contains(&format!("endpoints ({mode} mode)")), "{out}");
    assert!(out.contains(&format!("API:        {base}")), "{out}");
    // The dev API keys printed are the ones in .dev/keys.toml, and the curl line uses one.
    let keys = std::fs::read_to_string(repo.join(".dev/keys.toml")).unwrap();
    for role in ["admin", "backend", "frontend"] {
        let k = key_of(&keys, role);
        assert!(out.contains(&k), "{role} key not printed:\n{out}");
    }
    let curl = format!(
        "curl -s {base}/v1/threads -H 'Authorization: Bearer {}' -H 'X-User-ID: alice'",
        key_of(&keys, "backend")
    );
    assert!(out.contains(&curl), "no ready curl line:\n{out}");
    assert!(
        out.contains(&format!("demo done ({mode} mode); stopping")),
        "{out}"
    );
    // Everything it started is stopped: nothing answers on the port any more.
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server still listens after dev.sh --demo exited"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn dev_sh_external_demo_from_a_clean_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    clean_copy(&repo);
    let port = testkit::free_port();

    let out = run(&repo, port, &["--demo"]);
    check_demo(&out, &repo, port, "external");
    assert!(out.contains("initialised"), "a new token is made:\n{out}");
    assert!(out.contains("\"kek_id\":\"progressdb-kek\""), "{out}");
    assert!(out.contains("KMS:        unix://"), "{out}");
    let dev = repo.join(".dev");
    assert_eq!(mode_of(&dev), 0o700);
    assert_eq!(mode_of(&dev.join("keys.toml")), 0o600);
    assert_eq!(mode_of(&dev.join("softhsm/user-pin")), 0o600);
    // No plaintext in the store, checked here too, not only by the script.
    let store = std::fs::read(dev.join("server-store/data.mdb")).unwrap();
    assert!(!store
        .windows(b"top secret demo".len())
        .any(|w| w == b"top secret demo"));
    // The PIN is nowhere in the output or the logs.
    let pin = std::fs::read_to_string(dev.join("softhsm/user-pin")).unwrap();
    let logs = std::fs::read_to_string(dev.join("kms.log")).unwrap()
        + &std::fs::read_to_string(dev.join("server.log")).unwrap();
    assert!(!out.contains(pin.trim()) && !logs.contains(pin.trim()));

    // The old flag is an alias, and a second run reuses the token, KEK and keys.
    let keys_before = std::fs::read(dev.join("keys.toml")).unwrap();
    let again = run(&repo, port, &["--demo-only"]);
    check_demo(&again, &repo, port, "external");
    assert!(again.contains("already present"), "token reused:\n{again}");
    assert_eq!(std::fs::read(dev.join("keys.toml")).unwrap(), keys_before);
}

#[test]
fn dev_sh_embedded_demo_from_a_clean_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    clean_copy(&repo);
    let port = testkit::free_port();

    let out = run(&repo, port, &["--demo", "--embedded"]);
    check_demo(&out, &repo, port, "embedded");
    assert!(out.contains("created the dev master key"), "{out}");
    assert!(out.contains("KMS:        none (embedded provider"), "{out}");
    let dev = repo.join(".dev");
    assert!(
        !dev.join("softhsm").exists(),
        "embedded mode needs no token"
    );
    let key_path = dev.join("master.key");
    assert_eq!(mode_of(&key_path), 0o600);
    let key = std::fs::read_to_string(&key_path).unwrap();
    assert_eq!(key.len(), 64, "32 bytes, hex");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    // The master key is never printed or logged.
    let log = std::fs::read_to_string(dev.join("server-embedded.log")).unwrap();
    assert!(!out.contains(&key) && !log.contains(&key));

    // Created once and reused: the second run reads what the first wrote, and the first
    // run's thread still decrypts (its messages are in the store under that key).
    let again = run(&repo, port, &["--embedded", "--demo-only"]);
    check_demo(&again, &repo, port, "embedded");
    assert!(again.contains("reusing the dev master key"), "{again}");
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key);
}

#[test]
fn dev_sh_runs_until_ctrl_c_then_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    clean_copy(&repo);
    let port = testkit::free_port();

    let out_path = tmp.path().join("dev.out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let mut cmd = dev_sh(&repo, port, &[]);
    cmd.stdout(out_file.try_clone().unwrap()).stderr(out_file);
    let mut child = cmd.spawn().unwrap();
    let socket = repo.join(".dev/softhsm/kms.sock");
    let start = Instant::now();
    // The script says it keeps running once the demo is done.
    while !std::fs::read_to_string(&out_path)
        .unwrap()
        .contains("running; Ctrl-C stops")
    {
        assert!(child.try_wait().unwrap().is_none(), "dev.sh exited early");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "dev.sh did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none(),
        "dev.sh stopped on its own"
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());

    // Ctrl-C: SIGINT to the script.
    let rc = unsafe_free_kill(child.id(), libc::SIGINT);
    assert_eq!(rc, 0);
    let (code, _) = finish(child, Duration::from_secs(30));
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(code, Some(130), "{out}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server left running"
    );
    // The KMS stopped too: its socket no longer accepts.
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_err(),
        "KMS left running"
    );
}

#[test]
fn dev_sh_refuses_an_unknown_option() {
    let child = dev_sh(&repo_root(), testkit::free_port(), &["--bogus"])
        .spawn()
        .unwrap();
    let (code, out) = finish(child, Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("unknown option '--bogus'"), "{out}");
}

/// `kill(2)` through the `kill` command, so the test needs no `unsafe`.
fn unsafe_free_kill(pid: u32, sig: i32) -> i32 {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

//! The command lines of both binaries: `--help` for every subcommand, `check-config` on good
//! and broken configs (real SoftHSM token, real files, real sockets), and `status` text and
//! `--json` against a running KMS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use progressdb_e2e::{bin, KmsBuilder, ServerBuilder, Token};

/// (what, environment overrides, text a problem line must contain).
type Case<V, E> = (&'static str, Vec<(&'static str, V)>, E);

fn run(binary: &str, hsm: Option<&Token>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args).env_remove("RUST_LOG");
    if let Some(h) = hsm {
        cmd.env(h.conf_var, &h.conf);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The subcommand names of `binary [prefix...] --help` (clap's "Commands:" section).
fn subcommands(binary: &str, prefix: &[&str]) -> Vec<String> {
    let mut args: Vec<&str> = prefix.to_vec();
    args.push("--help");
    let out = run(binary, None, &args, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .filter(|c| c != "help")
        .collect()
}

/// Every subcommand (and nested subcommand) prints its help, with a description of each
/// option, and exits 0.
fn check_help_tree(binary: &str, prefix: Vec<&str>, seen: &mut Vec<String>) {
    for sub in subcommands(binary, &prefix) {
        let mut path = prefix.clone();
        path.push(&sub);
        let mut args = path.clone();
        args.push("--help");
        let out = run(binary, None, &args, &[]);
        let help = text(&out);
        assert!(out.status.success(), "{binary} {args:?}: {help}");
        assert!(
            help.contains(&format!("Usage: {binary} {}", path.join(" "))),
            "{binary} {args:?}: {help}"
        );
        // No option without a description: clap prints a bare "--flag <X>" line then.
        for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let words = line.split_whitespace().count();
            assert!(words > 2, "{binary} {args:?}: undocumented option: {line}");
        }
        seen.push(path.join(" "));
        check_help_tree(binary, path.clone(), seen);
    }
}

#[test]
fn every_subcommand_of_both_binaries_has_help() {
    let mut kms = Vec::new();
    check_help_tree("progressdb-kms", vec![], &mut kms);
    for expected in [
        "serve",
        "init-kek",
        "check-config",
        "status",
        "rotate-kek",
        "verify",
        "jobs",
        "kek destroy",
        "backup",
        "restore",
        "import-copies",
        "compact",
        "audit verify",
        "audit list",
    ] {
        assert!(
            kms.iter().any(|s| s == expected),
            "missing {expected} in {kms:?}"
        );
    }
    let mut server = Vec::new();
    check_help_tree("progressdb", vec![], &mut server);
    for expected in ["serve", "check-config", "compact"] {
        assert!(
            server.iter().any(|s| s == expected),
            "missing {expected} in {server:?}"
        );
    }
    // A wrong subcommand is a usage error, not a crash.
    let out = run("progressdb-kms", None, &["bogus"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// Every line of a check-config report is a finding or the summary.
fn assert_report_shape(out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines[..lines.len() - 1] {
        assert!(
            l.starts_with("ok: ") || l.starts_with("warning: ") || l.starts_with("problem: "),
            "not a finding: {l}"
        );
        if l.starts_with("problem: ") {
            assert!(l.contains("; fix: "), "a problem without its fix: {l}");
        }
    }
    let last = lines[lines.len() - 1];
    assert!(
        last.contains(": OK (") || last.contains(": NOT OK ("),
        "{last}"
    );
}

fn problems(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("problem: ")).collect()
}

fn check_kms(hsm: &Token, config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let out = run(
        "progressdb-kms",
        Some(hsm),
        &["check-config", "--config", config.to_str().unwrap()],
        env,
    );
    let t = text(&out);
    assert_report_shape(&t);
    (out.status.code().unwrap(), t)
}

#[test]
fn kms_check_config_on_good_and_broken_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let config = KmsBuilder::new(tmp.path()).token(&hsm).provision().config;

    let (code, out) = check_kms(&hsm, &config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok: hsm.token_label progressdb-e2e: token found; the PIN logs in"),
        "{out}"
    );
    assert!(
        out.contains("ok: hsm.kek_label progressdb-kek: current version 1"),
        "{out}"
    );
    assert!(out.contains("audit key present and hardened"), "{out}");
    assert!(!out.contains(&hsm.pin), "the PIN is printed: {out}");

    // Each broken thing is one problem line naming the key (and file) and the fix.
    let cases: Vec<Case<&str, &str>> = vec![
        (
            "bad value",
            vec![("PROGRESSDB_KMS__CACHE__TTL_SECS", "soon")],
            "cache.ttl_secs",
        ),
        (
            "unknown key",
            vec![("PROGRESSDB_KMS__HSM__PINFILE", "x")],
            "pinfile",
        ),
        (
            "no such token",
            vec![("PROGRESSDB_KMS__HSM__TOKEN_LABEL", "no-such-token")],
            "token 'no-such-token'",
        ),
        (
            "no KEK with that label",
            vec![("PROGRESSDB_KMS__HSM__KEK_LABEL", "other-kek")],
            "fix: progressdb-kms init-kek --config",
        ),
        (
            "no module",
            vec![("PROGRESSDB_KMS__HSM__MODULE", "/nonexistent/libpkcs11.so")],
            "problem: hsm.module /nonexistent/libpkcs11.so",
        ),
        (
            "socket directory missing",
            vec![("PROGRESSDB_KMS__LISTEN__UNIX", "/nonexistent-dir/kms.sock")],
            "problem: listen.unix /nonexistent-dir/kms.sock: directory /nonexistent-dir does not exist",
        ),
    ];
    for (what, env, expect) in cases {
        let (code, out) = check_kms(&hsm, &config, &env);
        assert_eq!(code, 2, "{what}: {out}");
        let p = problems(&out);
        assert!(!p.is_empty(), "{what}: {out}");
        assert!(
            p.iter().any(|l| l.contains(expect)),
            "{what}: want {expect:?} in {out}"
        );
    }

    // A PIN file readable by others, then a wrong PIN.
    let pin_file = &hsm.pin_file;
    std::fs::set_permissions(pin_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out) = check_kms(&hsm, &config, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "problem: hsm.pin_file {}: mode 0640 is readable by group or others; fix: chmod 600 {}",
            pin_file.display(),
            pin_file.display()
        )),
        "{out}"
    );
    std::fs::set_permissions(pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(pin_file, "000000000000\n").unwrap();
    let (code, out) = check_kms(&hsm, &config, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("problem: hsm.pin_file: token 'progressdb-e2e' refused the PIN"),
        "{out}"
    );
    assert!(!out.contains("000000000000"), "the PIN is printed: {out}");
    std::fs::write(pin_file, format!("{}\n", hsm.pin)).unwrap();

    // A config file that does not exist, or is not TOML.
    let (code, out) = check_kms(&hsm, &tmp.path().join("absent.toml"), &[]);
    assert_eq!(code, 2, "{out}");
    let garbage = tmp.path().join("garbage.toml");
    std::fs::write(&garbage, "[listen\nunix = ").unwrap();
    let (code, out) = check_kms(&hsm, &garbage, &[]);
    assert_eq!((code, problems(&out).len()), (2, 1), "{out}");

    // With the KMS running: still OK, the admin socket is seen serving, the store is in use.
    let kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    let (code, out) = check_kms(&hsm, &kms.config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("a KMS is serving on it now"), "{out}");
    assert!(out.contains("warning: store.path"), "{out}");
}

#[test]
fn kms_check_config_checks_tls_files() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let certs = testkit::Certs::generate(&tmp.path().join("certs"));
    let config = KmsBuilder::new(tmp.path())
        .token(&hsm)
        .mtls(&certs)
        .provision()
        .config;
    let (code, out) = check_kms(&hsm, &config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: tls.cert"), "{out}");
    // The key of another certificate: each file reads, but they do not go together.
    let client_key = certs.client_key.to_str().unwrap();
    let (code, out) = check_kms(&hsm, &config, &[("PROGRESSDB_KMS__TLS__KEY", client_key)]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("problem: tls: the TLS files do not make a server configuration"),
        "{out}"
    );
    // A CA file that is not PEM.
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let (code, out) = check_kms(
        &hsm,
        &config,
        &[("PROGRESSDB_KMS__TLS__CLIENT_CA", junk.to_str().unwrap())],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("problem: tls.client_ca {}", junk.display())),
        "{out}"
    );
}

fn check_server(config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let out = run(
        "progressdb",
        None,
        &["check-config", "--config", config.to_str().unwrap()],
        env,
    );
    let t = text(&out);
    assert_report_shape(&t);
    (out.status.code().unwrap(), t)
}

#[test]
fn server_check_config_on_good_and_broken_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let server = ServerBuilder::new(tmp.path()).kms(&kms).provision();
    let (config, keys) = (server.config.clone(), server.keys.clone());
    let (code, out) = check_server(&config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("a KMS accepts connections there now"), "{out}");
    for secret in [
        &keys.admin,
        &keys.backend,
        &keys.frontend,
        &keys.signing_secret,
    ] {
        assert!(!out.contains(secret.as_str()), "a key is printed: {out}");
    }

    // The KMS gone: a warning, not a problem (the server starts and answers 503).
    let other = tmp.path().join("nowhere.sock");
    let endpoint = format!("unix://{}", other.display());
    let (code, out) = check_server(&config, &[("PROGRESSDB__KMS__ENDPOINT", &endpoint)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: kms.endpoint unix://"), "{out}");

    let keys_file: PathBuf = tmp.path().join("server/keys.toml");
    let cases: Vec<Case<String, String>> = vec![
        (
            "bad value",
            vec![("PROGRESSDB__LIMITS__MAX_PAGE_SIZE", "0".into())],
            "limits.max_page_size".into(),
        ),
        (
            "bad log level",
            vec![("PROGRESSDB__LOG__LEVEL", "=loud=".into())],
            "log.level".into(),
        ),
        (
            "keys file missing",
            vec![(
                "PROGRESSDB__AUTH__KEYS_FILE",
                "/nonexistent/keys.toml".into(),
            )],
            "problem: auth.keys_file /nonexistent/keys.toml: does not exist".into(),
        ),
        (
            "https without TLS files",
            vec![("PROGRESSDB__KMS__ENDPOINT", "https://localhost:1".into())],
            "kms.client_cert".into(),
        ),
        (
            "store path is a file",
            vec![("PROGRESSDB__STORE__PATH", keys_file.display().to_string())],
            "exists but is not a directory".into(),
        ),
    ];
    for (what, env, expect) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, out) = check_server(&config, &env);
        assert_eq!(code, 2, "{what}: {out}");
        assert!(
            problems(&out).iter().any(|l| l.contains(&expect)),
            "{what}: want {expect:?} in {out}"
        );
    }

    // A keys file readable by the group.
    std::fs::set_permissions(&keys_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check_server(&config, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("mode 0644 is readable by group or others; fix: chmod 600"),
        "{out}"
    );
    std::fs::set_permissions(&keys_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Relative paths are resolved against the config file's directory, not the cwd.
    let rel = tmp.path().join("server/rel.toml");
    let body = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&keys_file.display().to_string(), "keys.toml")
        .replace(
            &tmp.path().join("server/store").display().to_string(),
            "store",
        );
    assert!(body.contains("keys_file = \"keys.toml\""), "{body}");
    std::fs::write(&rel, body).unwrap();
    let out = Command::new(bin("progressdb"))
        .args(["check-config", "--config", rel.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn kms_status_text_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let kms = KmsBuilder::new(tmp.path()).token(&hsm).start();
    // Some keys, one of them used (so it is cached).
    let api = &kms;
    let mut key = String::new();
    for i in 0..3 {
        let (s, v) = api.call(
            "POST",
            "/create_dek_for_thread",
            Some(serde_json::json!({ "thread_id": format!("t-status-{i}") })),
        );
        assert_eq!(s, 200, "{v}");
        key = v["key_id"].as_str().unwrap().to_owned();
    }
    let (s, v) = api.call(
        "POST",
        "/encrypt",
        Some(serde_json::json!({ "key_id": key, "plaintext": "aGVsbG8=" })),
    );
    assert_eq!(s, 200, "{v}");

    let config_path = kms.config.clone();
    let config = config_path.to_str().unwrap();
    let out = run(
        "progressdb-kms",
        Some(&hsm),
        &["status", "--config", config, "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["active_deks"], 3, "{j}");
    assert_eq!(j["versions"][0]["deks"], 3, "{j}");
    assert_eq!(j["versions"][0]["current"], true, "{j}");
    assert!(j["cache"]["entries"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(j["cache"]["max_entries"], 1000, "{j}");
    assert_eq!(j["cache"]["ttl_secs"], 300, "{j}");
    assert_eq!(j["hsm"]["state"], "ready", "{j}");
    assert_eq!(j["hsm"]["workers"], 4, "{j}");
    assert!(j["hsm"]["sessions_open"].as_u64().unwrap() >= 1, "{j}");
    assert!(j["hsm"]["calls"].as_u64().unwrap() >= 3, "{j}");
    // The token's capability profile, read and probed at start.
    let t = &j["hsm"]["token"];
    assert_eq!(t["sensitive_values_enforced"], true, "{j}");
    assert!(
        t["dek_wrap"].as_str().unwrap().starts_with("CKM_AES_GCM"),
        "{j}"
    );
    let wraps: Vec<&str> = t["key_wrap"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    let expected_library = match testkit::token::kind() {
        testkit::token::Kind::SoftHsm => "SoftHSM",
        testkit::token::Kind::Kryoptic => "Kryoptic",
    };
    assert!(
        t["library"].as_str().unwrap().contains(expected_library),
        "{j}"
    );
    assert!(wraps.contains(&"CKM_AES_KEY_WRAP"), "{j}");
    // The DEK cache (1000) plus headroom, locked; the cached DEK holds a slot.
    assert_eq!(j["key_memory"]["locked"], true, "{j}");
    assert_eq!(j["key_memory"]["slots"], 1000 + 8192, "{j}");
    assert_eq!(t["dek_residency"], progressdb_e2e::residency(), "{j}");
    if progressdb_e2e::residency() == "hsm" {
        // No DEK in the KMS: not one slot of key memory in use.
        assert_eq!(j["key_memory"]["in_use"], 0, "{j}");
    } else {
        assert!(j["key_memory"]["in_use"].as_u64().unwrap() >= 1, "{j}");
    }
    assert_eq!(j["key_memory"]["unlocked_keys"], 0, "{j}");

    let out = run(
        "progressdb-kms",
        Some(&hsm),
        &["status", "--config", config],
        &[],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("KEK progressdb-kek (current version 1)"), "{t}");
    assert!(t.contains("DEKs: 3 active, 0 destroyed"), "{t}");
    assert!(
        t.contains("cache: ") && t.contains("of 1000 DEKs held, ttl 300 s"),
        "{t}"
    );
    assert!(
        t.contains("key memory: locked (mlock), ") && t.contains(" of 9192 slots in use"),
        "{t}"
    );
    assert!(t.contains("HSM: ready, 4 workers"), "{t}");
    assert!(
        t.contains("sensitive values stay in the token (probed)"),
        "{t}"
    );

    // No KMS: exit 3 with one line.
    drop(kms);
    let out = run(
        "progressdb-kms",
        Some(&hsm),
        &["status", "--config", config],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

/// Both services run with core dumps off (soft and hard `RLIMIT_CORE` 0), set by the binaries
/// themselves whatever limit they were started with.
#[test]
fn both_services_run_without_core_dumps() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, server) = progressdb_e2e::system(tmp.path());
    for (name, pid) in [
        ("progressdb-kms", kms.proc.pid()),
        ("progressdb", server.proc.pid()),
    ] {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        let fields: Vec<&str> = core.split_whitespace().collect();
        assert_eq!(&fields[4..6], ["0", "0"], "{name}: {core}");
    }
}

/// The KMS holds its DEKs in memory locked into RAM: the kernel counts the arena (one 32-byte
/// slot per cache entry plus 8192) as locked in the process (`VmLck`), and `/metrics` agrees.
#[test]
fn the_kms_locks_its_key_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", kms.proc.pid())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    let arena_kb = (1000 + 8192) * 32 / 1024;
    assert!(
        locked_kb >= arena_kb,
        "VmLck {locked_kb} kB < {arena_kb} kB"
    );
    let m = kms.metrics();
    assert_eq!(
        progressdb_e2e::metric(&m, "progressdb_kms_key_memory_locked"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        progressdb_e2e::metric(&m, "progressdb_kms_key_memory_slots"),
        Some(9192.0)
    );
    assert!(kms.proc.log_text().contains("key memory locked into RAM"));
}

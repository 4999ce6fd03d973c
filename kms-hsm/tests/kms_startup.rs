//! Start-up and configuration: the reference config file, refused configurations and secret
//! files, the PIN from the environment, and `init-kek`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::kms;
use progressdb_kms::config::{Config, ListenConfig, LogFormat};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("progressdb-kms.example.toml")
}

#[test]
fn reference_config_file_loads_and_documents_every_key() {
    let c = Config::load_with_env(&example(), Some(HashMap::new())).unwrap();
    assert_eq!(
        c.listen,
        ListenConfig::Unix {
            path: "/run/progressdb/kms.sock".into(),
            access: progressdb_kms::config::SocketAccess::Group,
            allowed_uids: Some(vec![4294967294])
        }
    );
    assert_eq!(c.admin.users, progressdb_kms::config::Users::Separate);
    assert_eq!(
        c.hsm.module,
        PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
    );
    assert_eq!(c.hsm.token_label, "progressdb");
    assert_eq!(c.hsm.kek_label.as_str(), "progressdb-kek");
    assert_eq!(
        c.hsm.pin_file.as_deref(),
        Some(Path::new("/etc/progressdb-kms/hsm.pin"))
    );
    assert_eq!(c.hsm.sessions, 4);
    assert_eq!(c.store.path, PathBuf::from("/var/lib/progressdb-kms"));
    assert!(
        matches!(
            c.store.backend,
            progressdb_kms::config::StoreBackend::Lmdb { map_size_mb: 1024 }
        ),
        "{:?}",
        c.store.backend
    );
    assert_eq!(c.cache.ttl.as_secs(), 300);
    assert_eq!(c.cache.max_entries, 10_000);
    assert_eq!(c.limits.max_body_bytes, 4 << 20);
    assert_eq!(c.limits.read_timeout.as_secs(), 10);
    assert_eq!(c.limits.shutdown_timeout.as_secs(), 10);
    assert_eq!(c.limits.max_connections, 4096);
    assert_eq!(c.limits.max_connections_per_peer, 1024);
    assert_eq!(c.hsm.limits.queue_depth, 64);
    assert_eq!(c.hsm.limits.job_timeout.as_millis(), 5000);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(
        c.admin.unix,
        PathBuf::from("/run/progressdb/kms.admin.sock")
    );
    assert_eq!(c.lifecycle.concurrency, 2);
    assert_eq!(c.lifecycle.batch, 128);

    // Every key is documented (commented-out ones included).
    let text = std::fs::read_to_string(example()).unwrap();
    for key in [
        "unix =",
        "allowed_uids =",
        "tcp =",
        "cert =",
        "key =",
        "client_ca =",
        "module =",
        "token_label =",
        "pin_file =",
        "kek_label =",
        "sessions =",
        "path =",
        "map_size_mb =",
        "ttl_secs =",
        "max_entries =",
        "max_body_bytes =",
        "read_timeout_secs =",
        "shutdown_timeout_secs =",
        "max_connections =",
        "max_connections_per_peer =",
        "queue_depth =",
        "job_timeout_ms =",
        "admin_unix =",
        "admin_uids =",
        "single_user =",
        "admin_subjects =",
        "rewrap_concurrency =",
        "rewrap_batch =",
        "format =",
        "level =",
    ] {
        assert!(text.contains(key), "{key} is not documented in the example");
    }

    // Environment overrides, switching to mutual TLS.
    let env: HashMap<String, String> = [
        ("PROGRESSDB_KMS__LISTEN__UNIX", ""),
        ("PROGRESSDB_KMS__CACHE__TTL_SECS", "5"),
        ("PROGRESSDB_KMS__LOG__FORMAT", "json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let e = Config::load_with_env(&example(), Some(env))
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen.unix"), "{e}");
    let env: HashMap<String, String> = [
        ("PROGRESSDB_KMS__CACHE__TTL_SECS", "5"),
        ("PROGRESSDB_KMS__LOG__FORMAT", "json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let c = Config::load_with_env(&example(), Some(env)).unwrap();
    assert_eq!(c.cache.ttl.as_secs(), 5);
    assert_eq!(c.log.format, LogFormat::Json);
}

fn one_line(out: &str) -> &str {
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("progressdb-kms: error"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected in:\n{out}");
    lines[0]
}

#[test]
fn group_or_world_readable_pin_file_stops_start_up() {
    let kms = kms().provision();
    std::fs::set_permissions(&kms.token.pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, out) = kms.serve_expecting_exit();
    assert!(!status.success());
    let line = one_line(&out);
    assert!(
        line.contains(kms.token.pin_file.to_str().unwrap()) && line.contains("0644"),
        "{line}"
    );
    assert!(!kms.socket().exists(), "nothing was served");
    testkit::assert_absent("KMS output", out.as_bytes(), &[kms.token.pin.as_bytes()]);
    // init-kek refuses it too.
    let out = kms.command(&["init-kek"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(kms.token.pin_file.to_str().unwrap()));
}

/// The default layout (no allow-list: the KMS's uid and root reach the client socket; the
/// KMS's uid is the admin) would let the server's identity use the admin API: refused,
/// naming both keys. `listen.single_user = true` starts, and says so in `/readyz` and
/// `status`.
#[tokio::test]
async fn the_servers_identity_is_never_an_admin_by_default() {
    let mut kms = kms().provision();
    kms.edit_config(|t| t.replace("single_user = true\n", ""));
    let (status, out) = kms.serve_expecting_exit();
    assert_eq!(status.code(), Some(2), "{out}");
    let line = one_line(&out);
    assert!(
        line.contains("listen.admin_uids")
            && line.contains("listen.allowed_uids")
            && line.contains("single_user"),
        "{line}"
    );
    assert!(!kms.socket().exists(), "nothing was served");

    kms.edit_config(|t| t.replace("[listen]\n", "[listen]\nsingle_user = true\n"));
    kms.spawn();
    kms.wait_ready().await;
    let (s, body) = kms
        .client()
        .raw(http::Method::GET, "/readyz", Vec::new())
        .await
        .unwrap();
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        v["alerts"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("single_user")),
        "{v}"
    );
    let out = kms.command(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ALERTS: ") && text.contains("single_user"),
        "{text}"
    );
}

#[test]
fn plain_tcp_is_refused() {
    let kms = kms().provision();
    kms.edit_config(|t| {
        t.lines()
            .map(|l| {
                if l.starts_with("unix =") {
                    "tcp = \"127.0.0.1:7443\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (status, out) = kms.serve_expecting_exit();
    assert_eq!(status.code(), Some(2));
    let line = one_line(&out);
    assert!(
        line.contains("listen.tcp") && line.contains("tls.cert"),
        "{line}"
    );
}

#[test]
fn config_errors_name_the_key_or_file() {
    let kms = kms().provision();
    let run = |env: &[(&str, &str)]| {
        let mut c = kms.command(&["serve"]);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        one_line(&run(&[("PROGRESSDB_KMS__CACHE__TTL_SECS", "soon")])).contains("cache.ttl_secs")
    );
    assert!(one_line(&run(&[("PROGRESSDB_KMS__HSM__SESSIONS", "0")])).contains("hsm.sessions"));
    assert!(
        one_line(&run(&[("PROGRESSDB_KMS__LISTEN__TCP", "127.0.0.1:1")])).contains("listen.unix")
    );
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--config", "/nonexistent/kms.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&String::from_utf8_lossy(&out.stderr)).contains("/nonexistent/kms.toml"));
    // A typo in a key.
    kms.edit_config(|t| t.replace("ttl_secs", "ttl_seconds"));
    let out = kms.command(&["serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&String::from_utf8_lossy(&out.stderr)).contains("ttl_seconds"));
}

#[tokio::test]
async fn pin_from_the_environment_and_wrong_pin() {
    let mut kms = kms().provision();
    kms.edit_config(|t| {
        t.lines()
            .filter(|l| !l.starts_with("pin_file"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    // Neither file nor environment.
    let (status, out) = kms.serve_expecting_exit();
    assert_eq!(status.code(), Some(2));
    assert!(one_line(&out).contains("PROGRESSDB_KMS_HSM_PIN"), "{out}");
    // A wrong PIN is refused at start-up, without echoing it.
    kms.env = vec![("PROGRESSDB_KMS_HSM_PIN".into(), "00000000-wrong".into())];
    let (status, out) = kms.serve_expecting_exit();
    assert_eq!(
        status.code(),
        Some(2),
        "a refused PIN is a provisioning error: {out}"
    );
    assert!(one_line(&out).contains("PIN"), "{out}");
    testkit::assert_absent("KMS output", out.as_bytes(), &[b"00000000-wrong"]);
    // The right PIN from the environment works.
    kms.env = vec![("PROGRESSDB_KMS_HSM_PIN".into(), kms.token.pin.clone())];
    kms.spawn();
    kms.wait_ready().await;
    let k = kms
        .client()
        .create_dek_for_thread(&kms_api::ThreadId::parse("env-pin").unwrap())
        .await
        .unwrap();
    assert_eq!(k.kek_version.get(), 1);
    kms.finish(&[b"00000000-wrong"]);
}

#[test]
fn init_kek_is_idempotent_and_serve_needs_it() {
    let kms = kms().init_kek_runs(0).provision();
    let (status, out) = kms.serve_expecting_exit();
    assert!(!status.success());
    assert!(one_line(&out).contains("init-kek"), "{out}");
    let first = kms.command(&["init-kek"]).output().unwrap();
    assert!(first.status.success());
    assert!(String::from_utf8_lossy(&first.stdout).contains("created KEK"));
    let second = kms.command(&["init-kek"]).output().unwrap();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("already present"));
    kms.proc.append_log(&first.stderr);
    kms.proc.append_log(&second.stderr);
    testkit::assert_absent(
        "KMS log",
        &std::fs::read(kms.log()).unwrap(),
        &[kms.token.pin.as_bytes()],
    );
}

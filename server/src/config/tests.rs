//! Unit tests of `config`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn write(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("progressdb.toml");
    std::fs::write(&p, body).unwrap();
    p
}

const MINIMAL: &str = r#"
        [store]
        path = "/tmp/x"
        [auth]
        keys_file = "/tmp/keys.toml"
        [kms]
        endpoint = "unix:///run/kms.sock"
    "#;

#[test]
fn example_file_loads() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("progressdb.example.toml");
    let cfg = Config::load_with_env(&p, Some(HashMap::new())).expect("example loads");
    assert_eq!(cfg.kms.mode, KmsMode::External);
    assert!(cfg.encryption.enabled);
    assert_eq!(
        cfg.kms.parsed_endpoints().unwrap(),
        vec![Endpoint::Unix("/run/progressdb-kms/kms.sock".into())]
    );
}

#[test]
fn defaults_and_env_overrides() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), MINIMAL);
    let cfg = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
    assert_eq!(cfg.http.listen.port(), 8080);
    assert_eq!(cfg.limits.max_page_size, 500);
    assert_eq!(cfg.http.metrics_access, MetricsAccess::Admin);
    let env = HashMap::from([
        (
            "PROGRESSDB__HTTP__LISTEN".to_owned(),
            "0.0.0.0:9999".to_owned(),
        ),
        (
            "PROGRESSDB__ENCRYPTION__ENABLED".to_owned(),
            "false".to_owned(),
        ),
        (
            "PROGRESSDB__LIMITS__MAX_PAGE_SIZE".to_owned(),
            "100".to_owned(),
        ),
        (
            "PROGRESSDB__HTTP__METRICS_ACCESS".to_owned(),
            "public".to_owned(),
        ),
        (
            "PROGRESSDB__HTTP__CORS_ALLOWED_ORIGINS".to_owned(),
            "https://a.example, http://localhost:3000".to_owned(),
        ),
        // Another binary's prefix is ignored.
        ("PROGRESSDB_KMS__STORE__PATH".to_owned(), "/nope".to_owned()),
    ]);
    let cfg = Config::load_with_env(&p, Some(env)).unwrap();
    assert_eq!(cfg.http.listen.port(), 9999);
    assert!(!cfg.encryption.enabled);
    assert_eq!(cfg.limits.max_page_size, 100);
    assert_eq!(cfg.http.metrics_access, MetricsAccess::Public);
    assert_eq!(cfg.store.path, Path::new("/tmp/x"));
    assert_eq!(
        cfg.http.cors_allowed_origins,
        ["https://a.example", "http://localhost:3000"]
    );
}

#[test]
fn cors_origins_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), MINIMAL);
    let text = std::fs::read_to_string(&p).unwrap();
    let with = |list: &str| {
        std::fs::write(
            &p,
            format!("{text}\n[http]\ncors_allowed_origins = {list}\n"),
        )
        .unwrap();
        Config::load_with_env(&p, Some(HashMap::new()))
    };
    let ok = with(r#"["https://app.example", "*"]"#).unwrap();
    assert_eq!(ok.http.cors_allowed_origins, ["https://app.example", "*"]);
    let e = with(r#"["https://app.example/path"]"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("http.cors_allowed_origins"), "{e}");
}

fn err(body: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), body);
    let e = Config::load_with_env(&p, Some(HashMap::new()))
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

#[test]
fn errors_name_the_key_or_file() {
    let e = Config::load_with_env(Path::new("/nonexistent/p.toml"), Some(HashMap::new()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/p.toml"), "{e}");

    let e = err("[store]\npath = \"/x\"\n");
    assert!(e.contains("auth"), "{e}");

    let e = err(&format!("{MINIMAL}\n[http]\nlisten = \"not an address\"\n"));
    assert!(e.contains("http.listen") || e.contains("listen"), "{e}");

    let e = err(&MINIMAL.replace("unix:///run/kms.sock", "http://kms:1"));
    assert!(e.contains("kms.endpoint"), "{e}");

    let e = err(&MINIMAL.replace("unix:///run/kms.sock", "https://kms:7443"));
    assert!(e.contains("kms.client_cert"), "{e}");

    let e = err(&MINIMAL.replace("endpoint = \"unix:///run/kms.sock\"", ""));
    assert!(e.contains("kms.endpoint"), "{e}");

    let e = err(&MINIMAL.replace("endpoint = \"unix:///run/kms.sock\"", "mode = \"embedded\""));
    #[cfg(feature = "dev-embedded")]
    assert!(e.contains("kms.master_key_file"), "{e}");
    #[cfg(not(feature = "dev-embedded"))]
    assert!(
        e.contains("kms.mode") && e.contains("--features dev-embedded"),
        "{e}"
    );

    let e = err(&MINIMAL.replace("endpoint =", "mode = \"hsm\"\nendpoint ="));
    assert!(e.contains("mode") || e.contains("hsm"), "{e}");

    let e = err(&format!("{MINIMAL}\n[limits]\nmax_page_size = 5000\n"));
    assert!(e.contains("limits.max_page_size"), "{e}");

    let e = err(&format!("{MINIMAL}\n[http]\nlistn = \"x\"\n"));
    assert!(e.contains("listn"), "{e}");
    // kms.peer_uid is for Unix sockets only.
    let e = err(&MINIMAL.replace(
        "endpoint = \"unix:///run/kms.sock\"",
        "endpoint = \"https://kms:7443\"\npeer_uid = 7",
    ));
    assert!(e.contains("kms.peer_uid"), "{e}");
}

#[test]
fn encryption_off_needs_no_kms() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "[store]\npath = \"/x\"\n[auth]\nkeys_file = \"/k\"\n[encryption]\nenabled = false\n",
    );
    let cfg = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
    assert!(!cfg.encryption.enabled);
    assert!(cfg.kms.parsed_endpoints().unwrap().is_empty());
}

#[test]
fn replicas_are_listed_once_and_not_with_a_single_endpoint() {
    let k = |endpoint: Option<&str>, endpoints: Option<Vec<&str>>| KmsConfig {
        endpoint: endpoint.map(str::to_owned),
        endpoints: endpoints.map(|v| v.into_iter().map(str::to_owned).collect()),
        ..KmsConfig::default()
    };
    let two = k(None, Some(vec!["unix:///run/a.sock", "unix:///run/b.sock"]));
    assert_eq!(two.parsed_endpoints().unwrap().len(), 2);
    for (bad, why) in [
        (
            k(Some("unix:///run/a.sock"), Some(vec!["unix:///run/b.sock"])),
            "not both",
        ),
        (k(None, Some(vec![])), "at least one"),
        (
            k(None, Some(vec!["unix:///run/a.sock", "unix:///run/a.sock"])),
            "twice",
        ),
        (k(None, Some(vec!["http://x:1"])), "invalid KMS endpoint"),
    ] {
        let e = bad.parsed_endpoints().unwrap_err().to_string();
        assert!(e.contains("kms.endpoints") && e.contains(why), "{e}");
    }
}

#[test]
fn a_postgres_store_needs_its_url_and_no_path() {
    let pg = |store: &str| MINIMAL.replace("path = \"/tmp/x\"", store);
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        &pg("backend = \"postgres\"\nurl = \"host=/run/postgresql dbname=progressdb\"\npassword_file = \"pw\""),
    );
    let cfg = Config::load_with_env(&p, Some(HashMap::new())).unwrap();
    let c = cfg.store.postgres().unwrap().expect("a postgres store");
    assert_eq!(c.display_target(), "postgres://@/run/postgresql/progressdb");
    // Relative files are the config file's neighbours.
    assert_eq!(cfg.store.password_file, Some(d.path().join("pw")));
    let e = err(&pg("backend = \"postgres\""));
    assert!(e.contains("store.url"), "{e}");
    let e = err(&MINIMAL.replace(
        "path = \"/tmp/x\"",
        "backend = \"postgres\"\npath = \"/tmp/x\"\nurl = \"host=/tmp dbname=x\"",
    ));
    assert!(e.contains("store.path"), "{e}");
    // A password in the URL, or plain text across a network, is refused.
    let e = err(&pg(
        "backend = \"postgres\"\nurl = \"postgresql://u:secret@db.example/x\"",
    ));
    assert!(e.contains("store.url") && !e.contains("secret"), "{e}");
    let e = err(&pg(
        "backend = \"postgres\"\nurl = \"host=db.example dbname=x\"",
    ));
    assert!(e.contains("store.ca_file"), "{e}");
    let e = err(&MINIMAL.replace(
        "path = \"/tmp/x\"",
        "path = \"/tmp/x\"\nurl = \"host=/tmp dbname=x\"",
    ));
    assert!(e.contains("store.url"), "{e}");
    let e = err(&pg(
        "backend = \"postgres\"\nurl = \"host=/tmp dbname=x\"\npool_size = 2",
    ));
    assert!(e.contains("store.pool_size"), "{e}");
    let e = err(&pg("backend = \"nosql\""));
    assert!(e.contains("backend"), "{e}");
}

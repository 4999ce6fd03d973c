//! Unit tests of `config`.

use super::*;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("kms.toml");
    std::fs::write(&p, toml).unwrap();
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::load_with_env(&p, Some(env))
}

const BASE: &str = r#"
        [listen]
        unix = "kms.sock"
        single_user = true
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "progressdb"
        pin_file = "pin"
        kek_label = "progressdb-kek"
        [store]
        path = "/var/lib/progressdb-kms"
    "#;

#[test]
fn minimal_file_gets_defaults() {
    let c = load(BASE, &[]).unwrap();
    match &c.listen {
        ListenConfig::Unix {
            path, allowed_uids, ..
        } => {
            assert!(path.is_absolute() && path.ends_with("kms.sock"));
            assert!(allowed_uids.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.hsm.sessions, 4);
    assert_eq!(c.cache.max_entries, 10_000);
    assert_eq!(c.limits.max_body_bytes, 4 << 20);
    assert_eq!(c.log.format, LogFormat::Text);
}

#[test]
fn env_overrides_every_section() {
    let c = load(
        BASE,
        &[
            ("PROGRESSDB_KMS__CACHE__TTL_SECS", "7"),
            ("PROGRESSDB_KMS__CACHE__MAX_ENTRIES", "0"),
            ("PROGRESSDB_KMS__HSM__SESSIONS", "2"),
            ("PROGRESSDB_KMS__LISTEN__ALLOWED_UIDS", "1000,1001"),
            ("PROGRESSDB_KMS__LOG__FORMAT", "json"),
            ("PROGRESSDB_KMS__LIMITS__MAX_BODY_BYTES", "65536"),
            ("PROGRESSDB_KMS__STORE__PATH", "/tmp/other"),
            ("PROGRESSDB_KMS_HSM_PIN", "ignored-by-config"),
        ],
    )
    .unwrap();
    assert_eq!(c.cache.ttl, Duration::from_secs(7));
    assert_eq!(c.cache.max_entries, 0);
    assert_eq!(c.hsm.sessions, 2);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.limits.max_body_bytes, 65536);
    assert_eq!(c.store.path, PathBuf::from("/tmp/other"));
    match c.listen {
        ListenConfig::Unix { allowed_uids, .. } => {
            assert_eq!(allowed_uids, Some(vec![1000, 1001]))
        }
        other => panic!("{other:?}"),
    }
    let one = load(BASE, &[("PROGRESSDB_KMS__LISTEN__ALLOWED_UIDS", "42")]).unwrap();
    assert!(
        matches!(one.listen, ListenConfig::Unix { allowed_uids: Some(ref v), .. } if v == &[42])
    );
}

#[test]
fn the_servers_identity_is_never_an_admin_by_default() {
    let me = rustix::process::geteuid().as_raw();
    let two_users =
        |listen: &str| BASE.replace("unix = \"kms.sock\"\n        single_user = true", listen);
    // The default: no allow-list (the KMS's uid and root reach the socket), the KMS's
    // uid the admin.
    let e = load(&two_users("unix = \"kms.sock\""), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listen.admin_uids")
            && e.contains("listen.allowed_uids")
            && e.contains(&format!("uid {me}"))
            && e.contains("single_user"),
        "{e}"
    );
    // Root is in the unset allow-list: an admin list naming root is refused too.
    let e = load(
        &two_users("unix = \"kms.sock\"\nadmin_uids = [0, 4242]"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("uid 0") || e.contains(&format!("uid {me}")),
        "{e}"
    );
    // An allow-list that names an admin.
    let e = load(
        &two_users("unix = \"kms.sock\"\nallowed_uids = [1001, 4242]\nadmin_uids = [4242]"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("uid 4242"), "{e}");
    // The two-user layout loads, and its client socket refuses the admins.
    let c = load(
        &two_users("unix = \"kms.sock\"\nallowed_uids = [4294967294]"),
        &[],
    )
    .unwrap();
    assert_eq!(c.admin.users, Users::Separate);
    assert_eq!(c.admin.uids, vec![me]);
    // Single-user development says so.
    let c = load(BASE, &[]).unwrap();
    assert_eq!(c.admin.users, Users::SingleUser);
    // mutual TLS clients are certificates, not uids.
    let tcp =
        two_users("tcp = \"127.0.0.1:7443\"\n[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"a\"");
    assert!(load(&tcp, &[]).is_ok());
}

#[test]
fn plain_tcp_is_refused() {
    let toml = BASE.replace("unix = \"kms.sock\"", "tcp = \"127.0.0.1:7443\"");
    let e = load(&toml, &[]).unwrap_err().to_string();
    assert!(e.contains("listen.tcp") && e.contains("tls.cert"), "{e}");
}

#[test]
fn errors_name_the_key() {
    let e = load(&BASE.replace("token_label = \"progressdb\"", ""), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("hsm.token_label"), "{e}");
    let e = load(BASE, &[("PROGRESSDB_KMS__CACHE__TTL_SECS", "soon")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cache.ttl_secs"), "{e}");
    let e = load(&format!("{BASE}\n[cache]\nttl = 3\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("ttl"), "{e}");
    let e = load(BASE, &[("PROGRESSDB_KMS__LOG__FORMAT", "xml")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("log.format"), "{e}");
    let e = load(BASE, &[("PROGRESSDB_KMS__HSM__KEK_LABEL", "a b")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("hsm.kek_label"), "{e}");
    let e = load(
        &BASE.replace(
            "unix = \"kms.sock\"",
            "unix = \"kms.sock\"\ntcp = \"127.0.0.1:1\"",
        ),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("listen.unix") && e.contains("listen.tcp"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn missing_file_is_named() {
    let e = Config::load(Path::new("/nonexistent/kms.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/kms.toml"), "{e}");
}

#[test]
fn postgres_store_settings_are_checked() {
    let pg = |extra: &str| load(&format!("{BASE}\n{extra}"), &[]);
    // BASE's [store] gets the keys appended.
    let c =
        pg("backend = \"postgres\"\nurl = \"host=/run/postgresql dbname=kms user=kms\"").unwrap();
    let StoreBackend::Postgres(p) = &c.store.backend else {
        panic!("{:?}", c.store.backend)
    };
    assert_eq!(p.pool_size, 16);
    assert_eq!(p.timeout, Duration::from_secs(5));
    assert_eq!(p.display_target(), "postgres://kms@/run/postgresql/kms");
    assert!(p.pg_config("progressdb-kms").is_ok());
    let err = |extra: &str| pg(extra).unwrap_err().to_string();
    let e = err("backend = \"postgres\"");
    assert!(e.contains("store.url is required"), "{e}");
    let e =
        err("backend = \"postgres\"\nurl = \"postgresql://kms:hunter2@db/kms?sslmode=disable\"");
    assert!(
        e.contains("store.url") && e.contains("must not hold a password"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    let e = err("backend = \"postgres\"\nurl = \"postgresql://kms@db.example/kms\"");
    assert!(
        e.contains("store.ca_file") && e.contains("sslmode=disable"),
        "{e}"
    );
    // Plain text across the network is refused even when asked for.
    for url in [
        "postgresql://kms@db.example/kms?sslmode=disable",
        "postgresql://kms@10.0.0.5/kms?sslmode=disable",
        "host=localhost,db.example dbname=kms sslmode=disable",
        "host=localhost hostaddr=10.0.0.5 dbname=kms sslmode=disable",
    ] {
        let e = err(&format!("backend = \"postgres\"\nurl = \"{url}\""));
        assert!(
            e.contains("store.url") && e.contains("not on this host"),
            "{url}: {e}"
        );
    }
    for url in [
        "postgresql://kms@localhost/kms?sslmode=disable",
        "postgresql://kms@127.0.0.1:5433/kms?sslmode=disable",
        "postgresql://kms@[::1]/kms?sslmode=disable",
    ] {
        assert!(
            pg(&format!("backend = \"postgres\"\nurl = \"{url}\"")).is_ok(),
            "{url}"
        );
    }
    let e = err("backend = \"postgres\"\nurl = \"host=/tmp dbname=kms\"\nmap_size_mb = 8");
    assert!(e.contains("store.map_size_mb") && e.contains("lmdb"), "{e}");
    let e = err("url = \"host=/tmp dbname=kms\"");
    assert!(e.contains("store.url") && e.contains("postgres"), "{e}");
    let e = err("backend = \"sqlite\"");
    assert!(e.contains("store.backend"), "{e}");
    let e = err("backend = \"postgres\"\nurl = \"host=/tmp\"\npool_size = 0");
    assert!(e.contains("store.pool_size"), "{e}");
    // The environment can choose the backend too.
    let c = load(
        BASE,
        &[
            ("PROGRESSDB_KMS__STORE__BACKEND", "postgres"),
            (
                "PROGRESSDB_KMS__STORE__URL",
                "postgresql://kms@localhost/kms?sslmode=disable",
            ),
        ],
    )
    .unwrap();
    assert!(matches!(c.store.backend, StoreBackend::Postgres(_)));
    assert!(
        !format!("{c:?}").contains("sslmode"),
        "no URL detail in Debug"
    );
}

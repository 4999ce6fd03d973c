//! `softhsm-setup/setup.sh`: idempotent, and the token and config it writes serve the backend.
//! Its own process: `SOFTHSM2_CONF` points at the script's config before PKCS#11 starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod hsm_common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kms_api::{KekId, KekVersion, KeyId};
use progressdb_kms::backend::pkcs11::{init_kek, kek_attributes, InitKekOutcome, Pkcs11Backend};
use progressdb_kms::backend::{HsmSettings, KeyBackend};
use secrecy::SecretString;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-setup/setup.sh")
}

fn run_setup(dir: &Path, fake_bin: &Path) -> Output {
    let out = Command::new("bash")
        .arg(script())
        .arg(dir)
        .env("PROGRESSDB_KMS_BIN", fake_bin)
        .env("PROGRESSDB_HSM_TOKEN_LABEL", "t-script")
        .env("PROGRESSDB_HSM_KEK_LABEL", "script-kek")
        .env("PROGRESSDB_HSM_MODULE", hsm_common::module())
        // Must not reach init-kek: the generated config is the whole truth.
        .env("PROGRESSDB_KMS_HSM_PIN", "leaked-pin")
        .env("PROGRESSDB_KMS__HSM__TOKEN_LABEL", "wrong-token")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Path → (mode, mtime, content) of every file and directory under `dir`: a new token, a new
/// object or a rewritten file shows up.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, i128, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            // SoftHSM rewrites its bookkeeping files (same content) whenever a process opens
            // the token, so inside tokens/ only content and modes count.
            let mtime = if p.starts_with(dir.join("tokens")) {
                0
            } else {
                md.modified()
                    .unwrap()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as i128
            };
            let hash = if md.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else {
                std::fs::read(&p).unwrap()
            };
            out.insert(p, (md.permissions().mode() & 0o7777, mtime, hash));
        }
    }
    out
}

#[test]
fn setup_script_is_idempotent_and_its_token_serves_the_backend() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let root = tempfile::Builder::new()
        .prefix("hsm-setup-")
        .tempdir_in(&base)
        .unwrap();
    let dir = root.path().join("softhsm");

    // Stands in for `progressdb-kms`: records how it was called.
    let bin_dir = root.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let fake = bin_dir.join("progressdb-kms");
    let calls = bin_dir.join("calls.log");
    std::fs::write(
        &fake,
        format!(
            "#!/usr/bin/env bash\n\
             if [ \"$1\" = --help ]; then echo 'Commands: serve init-kek'; exit 0; fi\n\
             echo \"$* conf=$SOFTHSM2_CONF pin=${{PROGRESSDB_KMS_HSM_PIN:-unset}} \
             override=${{PROGRESSDB_KMS__HSM__TOKEN_LABEL:-unset}}\" >> {}\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let first = run_setup(&dir, &fake);
    let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
    let dir = dir.canonicalize().unwrap();
    let conf = dir.join("softhsm2.conf");
    assert!(
        stdout.contains(&format!("export SOFTHSM2_CONF={}", conf.display())),
        "{stdout}"
    );
    assert!(stdout.contains("token 't-script' initialised"), "{stdout}");
    for secret in ["user-pin", "so-pin"] {
        let md = std::fs::metadata(dir.join(secret)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600, "{secret}");
    }
    assert!(std::fs::read_to_string(&conf).unwrap().contains(&format!(
        "directories.tokendir = {}",
        dir.join("tokens").display()
    )));

    // Second run: nothing changes, no second token.
    let before = snapshot(&dir);
    let second = run_setup(&dir, &fake);
    let stdout2 = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(stdout2.contains("already present"), "{stdout2}");
    assert_eq!(snapshot(&dir), before, "a second run changed files");
    let slots = Command::new("softhsm2-util")
        .arg("--show-slots")
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    let slots = String::from_utf8_lossy(&slots.stdout);
    assert_eq!(
        slots
            .lines()
            .filter(|l| l.trim_start().starts_with("Label:") && l.contains("t-script"))
            .count(),
        1
    );

    // init-kek was asked for both times, with the generated config and a clean environment.
    let kms_toml = dir.join("kms.toml");
    let log = std::fs::read_to_string(&calls).unwrap();
    let expected = format!(
        "init-kek --config {} conf={} pin=unset override=unset",
        kms_toml.display(),
        conf.display()
    );
    assert_eq!(log.lines().collect::<Vec<_>>(), vec![expected.as_str(); 2]);

    // The generated KMS config names the token, PIN file and KEK.
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(&kms_toml).unwrap()).unwrap();
    let hsm = &cfg["hsm"];
    assert_eq!(hsm["token_label"].as_str(), Some("t-script"));
    assert_eq!(hsm["kek_label"].as_str(), Some("script-kek"));
    let pin_file = PathBuf::from(hsm["pin_file"].as_str().unwrap());
    assert_eq!(pin_file, dir.join("user-pin"));
    assert!(cfg["listen"]["unix"].as_str().is_some());
    assert!(cfg["store"]["path"].as_str().is_some());

    // The backend works against that token with that config.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let settings = HsmSettings {
        module: PathBuf::from(hsm["module"].as_str().unwrap()),
        token_label: "t-script".into(),
        pin: SecretString::from(
            std::fs::read_to_string(&pin_file)
                .unwrap()
                .trim()
                .to_owned(),
        ),
        kek_label: KekId::parse("script-kek").unwrap(),
        audit_key_label: "script-kek-audit".into(),
        binding_key_label: "script-kek-binding".into(),
        sessions: 2,
        residency: Default::default(),
        resident_keys_per_session: 64,
        limits: Default::default(),
    };
    assert!(matches!(
        init_kek(&settings).unwrap(),
        InitKekOutcome::Created(_)
    ));
    assert!(matches!(
        init_kek(&settings).unwrap(),
        InitKekOutcome::AlreadyPresent(_)
    ));
    let attrs = kek_attributes(&settings, KekVersion::FIRST).unwrap();
    assert!(attrs.sensitive && !attrs.extractable && attrs.wrap_by_other_key_refused);
    let backend = Pkcs11Backend::open(settings).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let k = KeyId::from_random([9; 16]);
        let (dek, w, kek) = backend.generate_dek(&k).await.unwrap();
        let back = backend.unwrap_dek(&k, &kek.id, &w).await.unwrap();
        assert_eq!(back.expose(), dek.expose());
    });

    // A run after the KEK exists still changes nothing.
    let before = snapshot(&dir);
    run_setup(&dir, &fake);
    assert_eq!(snapshot(&dir), before, "a third run changed files");
}

//! The operator documents against the code:
//!
//! * `docs/configuration.md` has one row for every key of both binaries' config structs and
//!   no row for a key that does not exist, with the right environment variable. The keys are
//!   read from the loaders themselves: every section refuses unknown keys
//!   (`deny_unknown_fields`), and serde's refusal lists the keys it expects.
//! * the deployment examples in `docs/deploy/`: both configs load; both systemd units carry the
//!   hardening the guide promises and pass `systemd-analyze verify` (a missing
//!   `systemd-analyze` fails the test) with the real binaries in place of `/usr/local/bin/...`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The keys serde expected, from an "unknown field `zz`, expected one of `a`, `b`" refusal.
fn expected_keys(err: &str) -> Option<Vec<String>> {
    if !err.contains("unknown field `zz`") {
        return None;
    }
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))?;
    let list = list.split(" for key").next().unwrap();
    Some(
        // serde: "`a`", "`a` or `b`", "one of `a`, `b`, `c`".
        list.replace(" or ", ", ")
            .split(", ")
            .map(|k| k.trim().trim_matches('`').to_owned())
            .filter(|k| !k.is_empty())
            .collect(),
    )
}

/// Every dotted key a loader accepts. `load` loads a TOML text and returns its error, if any.
fn keys_of(load: &dyn Fn(&str) -> Option<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let top = expected_keys(&load("[zz]\n").expect("an unknown section is refused"))
        .expect("the refusal lists the sections");
    for section in top {
        let err = load(&format!("[{section}]\nzz = 1\n")).unwrap();
        match expected_keys(&err) {
            Some(keys) => {
                for k in keys {
                    // A key that is itself a table has keys of its own.
                    match load(&format!("[{section}.{k}]\nzz = 1\n"))
                        .and_then(|e| expected_keys(&e))
                    {
                        Some(inner) => {
                            out.extend(inner.into_iter().map(|i| format!("{section}.{k}.{i}")))
                        }
                        None => {
                            out.insert(format!("{section}.{k}"));
                        }
                    }
                }
            }
            None => {
                out.insert(section);
            }
        }
    }
    out
}

/// The rows of `## {title}` in docs/configuration.md: key → env column.
fn documented(title: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with(&format!("{title}\n")))
        .unwrap_or_else(|| panic!("no `## {title}` in docs/configuration.md"));
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_owned();
        let env = cells
            .get(2)
            .map(|c| c.trim_matches('`').to_owned())
            .unwrap_or_default();
        assert!(
            rows.insert(key.clone(), env).is_none(),
            "{title}: {key} documented twice"
        );
    }
    rows
}

fn check_doc(title: &str, prefix: &str, code: &BTreeSet<String>) {
    let doc = documented(title);
    let doc_keys: BTreeSet<String> = doc.keys().cloned().collect();
    let missing: Vec<_> = code.difference(&doc_keys).collect();
    let extra: Vec<_> = doc_keys.difference(code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/configuration.md `## {title}`: keys in the config structs but not documented: {missing:?}; documented but not in the code: {extra:?}"
    );
    for (key, env) in &doc {
        let want = format!("{prefix}__{}", key.replace('.', "__").to_ascii_uppercase());
        assert_eq!(env, &want, "{title}: env override of {key}");
    }
    assert!(code.len() > 20, "{title}: only {} keys found", code.len());
}

fn write_tmp(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

#[test]
fn configuration_md_documents_every_kms_key() {
    let load = |text: &str| {
        let (_d, p) = write_tmp(text);
        progressdb_kms::Config::load_with_env(&p, Some(HashMap::new()))
            .err()
            .map(|e| e.to_string())
    };
    let keys = keys_of(&load);
    for k in [
        "listen.unix",
        "listen.socket_access",
        "hsm.pin_file",
        "cache.ttl_secs",
        "tls.admin_subjects",
    ] {
        assert!(keys.contains(k), "{k} not found in {keys:?}");
    }
    check_doc("progressdb-kms", "PROGRESSDB_KMS", &keys);
}

#[test]
fn configuration_md_documents_every_server_key() {
    let load = |text: &str| {
        let (_d, p) = write_tmp(text);
        progressdb::Config::load_with_env(&p, Some(HashMap::new()))
            .err()
            .map(|e| e.to_string())
    };
    let keys = keys_of(&load);
    for k in [
        "http.listen",
        "kms.endpoint",
        "auth.keys_file",
        "kms.master_key_file",
    ] {
        assert!(keys.contains(k), "{k} not found in {keys:?}");
    }
    check_doc("progressdb", "PROGRESSDB", &keys);
}

#[test]
fn deployment_configs_load() {
    let d = root().join("docs/deploy");
    progressdb_kms::Config::load_with_env(&d.join("kms.toml"), Some(HashMap::new()))
        .unwrap_or_else(|e| panic!("docs/deploy/kms.toml: {e}"));
    progressdb::Config::load_with_env(&d.join("server.toml"), Some(HashMap::new()))
        .unwrap_or_else(|e| panic!("docs/deploy/server.toml: {e}"));
    if d.join("softhsm-kms.toml").exists() {
        progressdb_kms::Config::load_with_env(&d.join("softhsm-kms.toml"), Some(HashMap::new()))
            .unwrap_or_else(|e| panic!("docs/deploy/softhsm-kms.toml: {e}"));
    }
}

const UNITS: [(&str, &str); 2] = [
    ("progressdb-kms.service", "progressdb-kms"),
    ("progressdb.service", "progressdb"),
];

#[test]
fn systemd_units_are_hardened_and_verify() {
    let d = root().join("docs/deploy");
    for (unit, binary) in UNITS {
        let text = std::fs::read_to_string(d.join(unit)).unwrap();
        let set: BTreeSet<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .map(|l| l.replace(' ', ""))
            .collect();
        for want in [
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "MemoryDenyWriteExecute=yes",
            "LockPersonality=yes",
            "MemorySwapMax=0",
            "LimitCORE=0",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "RestrictSUIDSGID=yes",
            "CapabilityBoundingSet=",
            "UMask=0077",
        ] {
            assert!(set.contains(want), "{unit}: no `{want}`");
        }
        assert!(
            set.iter().any(|l| l == &format!("User={binary}")),
            "{unit}: runs as its own user"
        );
        assert!(
            text.contains(&format!("/usr/local/bin/{binary} check-config")),
            "{unit}: checks its config before starting"
        );
        assert!(
            text.contains(&format!("/usr/local/bin/{binary} serve --config")),
            "{unit}: ExecStart"
        );
    }

    // `systemd-analyze verify`, with the real binaries where the units expect them.
    // scripts/ensure-deps.sh installs it: a check that quietly did not run proves nothing.
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .expect("systemd-analyze is not installed (scripts/ensure-deps.sh installs it)");
    assert!(out.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let bins = progressdb_e2e::bin_dir();
    let mut paths = Vec::new();
    for (unit, _) in UNITS {
        let text = std::fs::read_to_string(d.join(unit))
            .unwrap()
            .replace("/usr/local/bin/", &format!("{}/", bins.display()));
        let p = tmp.path().join(unit);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Messages about the host (no such user on this machine) are not about the units.
    let real: Vec<&str> = msg
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Failed to resolve user") && !l.contains("Failed to resolve group"))
        .collect();
    assert!(
        out.status.success() && real.is_empty(),
        "systemd-analyze verify: {msg}"
    );
}

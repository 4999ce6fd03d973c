//! A build without the `dev-embedded` feature refuses the embedded provider and the dev
//! master key, with a one-line message that says how to build for development.
#![cfg(not(feature = "dev-embedded"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Kms, TestEnv};

fn run(cfg: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_progressdb"))
        .args(["serve", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn embedded_mode_is_refused_with_a_clear_message() {
    let env = TestEnv::new();
    let (code, err) = run(&env.config(&Kms::Embedded, ""));
    assert_eq!(code, Some(2));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("kms.mode"), "{err}");
    assert!(err.contains("--features dev-embedded"), "{err}");
    assert!(
        !env.store_path().exists(),
        "nothing may be created before refusing"
    );
}

#[test]
fn dev_master_key_is_refused_in_external_mode() {
    let env = TestEnv::new();
    let endpoint = format!("unix://{}", env.path().join("kms.sock").display());
    let (code, err) = run(&env.config(
        &Kms::External {
            endpoint,
            master_key: true,
        },
        "",
    ));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("kms.master_key_file") && err.contains("dev-embedded"),
        "{err}"
    );
}

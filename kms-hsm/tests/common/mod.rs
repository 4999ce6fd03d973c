//! The KMS's own process tests (`kms_api`, `kms_startup`, `kms_transport`) run this package's
//! `progressdb-kms` binary through testkit's one KMS harness ([`testkit::kms`], shared with
//! the end-to-end tests): each test gets its own temp directory with a token, a 0600 PIN file,
//! an LMDB store and a config, `init-kek`, and `progressdb-kms serve` as a child process
//! (PKCS#11 can be initialised only once per process), with its output in one log file that
//! tests scan for secrets. A missing token module is a failure, never a skip.
// Each test file uses part of this module.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use base64::Engine as _;

pub(crate) use testkit::kms::{client_tls, KmsBuilder, KEK_LABEL};
pub(crate) use testkit::random_hex;

/// This package's `progressdb-kms`.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_progressdb-kms");

/// A KMS of these suites, not started: this package's binary in a temp directory, 2 HSM
/// sessions, a 60 s cache of 1,000 DEKs, a 16 MiB store, a 1 MiB body limit, 10 s timeouts,
/// `RUST_LOG=info`, `init-kek` run once.
pub(crate) fn kms() -> KmsBuilder {
    KmsBuilder::temp()
        .binary(BIN)
        .sessions(2)
        .cache(60, 1000)
        .map_size_mb(16)
        .max_body_bytes(1 << 20)
        .timeouts(10, 10)
        .rust_log("info")
        .init_kek_runs(1)
}

pub(crate) fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub(crate) fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Whether the suites run in hsm residency (`PROGRESSDB_TEST_RESIDENCY=hsm`).
pub(crate) fn residency_is_hsm() -> bool {
    testkit::kms::Residency::of_run() == testkit::kms::Residency::Hsm
}

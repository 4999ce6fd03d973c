//! Shared set-up of the in-process HSM tests: one token directory per test process, on the
//! PKCS#11 implementation of this run (`testkit::token`: SoftHSM, or Kryoptic with
//! `PROGRESSDB_TEST_TOKEN=kryoptic`).
//!
//! Every integration-test file is its own process and PKCS#11 can be initialised only once per
//! process, so each file builds its tokens once (before the first `C_Initialize`), points the
//! module's config variable (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`) at its own config and shares
//! the context among its tests. A missing module is a test failure, never a skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kms_api::KekId;
use progressdb_kms::backend::HsmSettings;
use secrecy::SecretString;

/// The PKCS#11 module of this run (`PROGRESSDB_TEST_PKCS11_MODULE` overrides it).
pub(crate) fn module() -> PathBuf {
    testkit::token::kind().module()
}

pub(crate) const KEK_LABEL: &str = "progressdb-kek";

/// Token labels made for every test process. Each test that depends on login state or on
/// the absence of a KEK gets a token of its own.
pub(crate) const TOKENS: &[&str] = &[
    "t-main",
    "t-initkek",
    "t-pin",
    "t-nokek",
    "t-conc",
    "t-queue",
    "t-legacy",
];

#[derive(Debug)]
pub(crate) struct TestHsm {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub tokendir: PathBuf,
    pins: Vec<(String, String)>,
}

impl TestHsm {
    pub(crate) fn pin(&self, token: &str) -> String {
        self.pins
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no test token {token}"))
    }

    pub(crate) fn settings(&self, token: &str, sessions: usize) -> HsmSettings {
        HsmSettings {
            module: module(),
            token_label: token.to_owned(),
            pin: SecretString::from(self.pin(token)),
            kek_label: KekId::parse(KEK_LABEL).unwrap(),
            audit_key_label: format!("{KEK_LABEL}-audit"),
            binding_key_label: format!("{KEK_LABEL}-binding"),
            sessions,
            residency: residency(),
            resident_keys_per_session: 64,
            limits: Default::default(),
        }
    }

    /// Every PIN of this process, for log scans.
    pub(crate) fn all_pins(&self) -> Vec<String> {
        self.pins.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Writes the module's config with `tokendir` as its token directory.
    pub(crate) fn write_conf(&self, tokendir: &Path) {
        testkit::token::kind().write_conf(&self.conf, tokendir);
    }
}

/// Builds this process's tokens once and sets the module's config variable. Call before any
/// PKCS#11 use.
pub(crate) fn hsm() -> &'static TestHsm {
    static HSM: OnceLock<TestHsm> = OnceLock::new();
    HSM.get_or_init(|| {
        let kind = testkit::token::kind();
        // Fails the test, saying what to install, when the module is missing.
        let _ = kind.module();
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("hsm-test-")
            .tempdir_in(&base)
            .unwrap()
            .keep();
        let tokendir = dir.join("tokens");
        std::fs::create_dir_all(&tokendir).unwrap();
        let conf = dir.join("token.conf");
        kind.write_conf(&conf, &tokendir);
        // Before the first C_Initialize of this process, which reads it.
        std::env::set_var(kind.conf_var(), &conf);

        let mut pins = Vec::new();
        for label in TOKENS {
            pins.push(((*label).to_owned(), kind.init_token(&conf, label)));
        }
        TestHsm {
            dir,
            conf,
            tokendir,
            pins,
        }
    })
}

/// The residency the suites run the backend in: `PROGRESSDB_TEST_RESIDENCY` (`memory`, the
/// default, or `hsm`).
pub(crate) fn residency() -> progressdb_kms::backend::DekResidency {
    match std::env::var("PROGRESSDB_TEST_RESIDENCY").as_deref() {
        Ok("hsm") => progressdb_kms::backend::DekResidency::Hsm,
        Ok("memory") | Err(_) => progressdb_kms::backend::DekResidency::Memory,
        Ok(other) => panic!("PROGRESSDB_TEST_RESIDENCY={other}: memory or hsm"),
    }
}

/// An `AesKwV2` blob (the key part, then AES-GCM under the DEK of an empty message with the
/// wrap AAD: what earlier releases wrote) for `id`, made from the key part of `v3`.
pub(crate) fn legacy_blob(
    dek: &progressdb_kms::backend::Dek,
    v3: &kms_api::WrappedDek,
    id: &kms_api::KeyId,
    kek: &progressdb_kms::backend::KekRef,
) -> kms_api::WrappedDek {
    let check = service_kit::aead::seal(
        &ring::rand::SystemRandom::new(),
        dek,
        b"",
        &progressdb_kms::backend::wrap_aad(id, kek),
    )
    .unwrap();
    let mut blob = vec![0x02];
    blob.extend_from_slice(&v3.as_bytes()[1..5 + progressdb_kms::backend::AES_KW_LEN]);
    blob.extend_from_slice(&check);
    assert_eq!(blob.len(), progressdb_kms::backend::AES_KW_V2_LEN);
    kms_api::WrappedDek::new(blob)
}

/// One message for the resident (hsm residency) methods.
pub(crate) fn item(data: &[u8], aad: &[u8]) -> progressdb_kms::backend::ResidentItem {
    progressdb_kms::backend::ResidentItem {
        data: zeroize::Zeroizing::new(data.to_vec()),
        aad: aad.to_vec(),
    }
}

/// Seals `msgs` under `k` with the HSM; every item must succeed.
pub(crate) async fn seal(
    b: &progressdb_kms::backend::pkcs11::Pkcs11Backend,
    k: &progressdb_kms::backend::ResidentKey,
    msgs: &[&[u8]],
    aad: &[u8],
) -> Vec<Vec<u8>> {
    use progressdb_kms::backend::KeyBackend as _;
    b.seal_resident(k, msgs.iter().map(|m| item(m, aad)).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// Opens one message under `k` with the HSM.
pub(crate) async fn open(
    b: &progressdb_kms::backend::pkcs11::Pkcs11Backend,
    k: &progressdb_kms::backend::ResidentKey,
    ct: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, progressdb_kms::backend::BackendError> {
    use progressdb_kms::backend::KeyBackend as _;
    let mut out = b.open_resident(k, vec![item(ct, aad)]).await?;
    out.pop().unwrap().map(|p| p.to_vec())
}

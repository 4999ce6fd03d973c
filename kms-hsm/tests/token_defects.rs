//! A token that does not keep a sensitive key's value inside is refused at start. Kryoptic
//! 1.2.0 as released (`scripts/build-kryoptic.sh` builds it next to the fixed one) answers
//! `C_GetAttributeValue(CKA_VALUE)` of a sensitive, non-extractable key with
//! `CKR_ATTRIBUTE_SENSITIVE` but copies the value into the caller's buffer anyway. The KMS's
//! capability probe finds that with a throwaway key and refuses the token; this test also
//! reads the KEK's value through its own session, to show the defect is real (the test
//! fails if that token ever stops leaking, so the probe's test keeps meaning something).
//!
//! Its own process: the one PKCS#11 module it loads is that build.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use kms_api::KekId;
use progressdb_kms::backend::pkcs11::{init_kek, Pkcs11Backend};
use progressdb_kms::backend::{BackendError, HsmSettings};
use secrecy::SecretString;
use testkit::token::Kind;
use zeroize::Zeroize as _;

#[test]
fn a_token_that_hands_out_sensitive_values_is_refused_at_start() {
    let module = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/kryoptic/libkryoptic_pkcs11-unpatched.so");
    assert!(
        module.exists(),
        "{} not found: run scripts/build-kryoptic.sh (scripts/test.sh does)",
        module.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.path().join("kryoptic.conf");
    Kind::Kryoptic.write_conf(&conf, &tokens);
    let pin = Kind::Kryoptic.init_token(&conf, "leaky");
    // Before the first C_Initialize of this process, which reads it.
    std::env::set_var("KRYOPTIC_CONF", &conf);
    let settings = HsmSettings {
        module: module.clone(),
        token_label: "leaky".into(),
        pin: SecretString::from(pin.clone()),
        kek_label: KekId::parse("progressdb-kek").unwrap(),
        audit_key_label: "progressdb-kek-audit".into(),
        binding_key_label: "progressdb-kek-binding".into(),
        sessions: 1,
        residency: Default::default(),
        resident_keys_per_session: 64,
        limits: Default::default(),
    };
    init_kek(&settings).unwrap();
    let e = Pkcs11Backend::open(settings).unwrap_err();
    assert!(
        matches!(&e, BackendError::Config(m) if m.contains("hands out the value of a sensitive")),
        "{e}"
    );
    assert!(!e.to_string().contains(&pin), "the PIN in an error: {e}");

    // The defect is real: this token gives out the KEK itself.
    let p = Pkcs11::new(&module).unwrap();
    match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = p
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).unwrap().label().trim_end() == "leaky")
        .unwrap();
    let session = p.open_ro_session(slot).unwrap();
    match session.login(UserType::User, Some(&SecretString::from(pin))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    let kek = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"progressdb-kek".to_vec()),
        ])
        .unwrap();
    assert_eq!(kek.len(), 1);
    let mut attrs = session
        .get_attributes(kek[0], &[AttributeType::Value])
        .unwrap();
    let leaked = attrs
        .iter()
        .any(|a| matches!(a, Attribute::Value(v) if v.len() == 32));
    for a in &mut attrs {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
    assert!(
        leaked,
        "this token no longer hands out the KEK: the probe's test proves nothing"
    );
}

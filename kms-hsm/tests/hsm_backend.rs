//! The PKCS#11 backend against a real SoftHSM token made for this test run.
//!
//! All tests of this file share one process, hence one PKCS#11 context and one token
//! directory (see `hsm_common`). The session-loss test lives in `hsm_recovery.rs` because it
//! resets the library for the whole process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod hsm_common;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::Ulong;
use hsm_common::{hsm, item, open, seal, KEK_LABEL};
use kms_api::{KekId, KekVersion, KeyId, WrappedDek};
use progressdb_kms::backend::pkcs11::{
    ensure_hmac_keys, init_kek, kek_attributes, list_kek_versions, InitKekOutcome, Pkcs11Backend,
};
use progressdb_kms::backend::{
    BackendError, DekResidency, HmacRole, KekMissing, KeyBackend, ResidentKey, AES_GCM_V1_LEN,
};
use secrecy::SecretString;

fn key_id(n: u8) -> KeyId {
    KeyId::from_random([n; 16])
}

fn random_key_id() -> KeyId {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    KeyId::from_random(b)
}

/// Makes sure `token` has a KEK (idempotent) and returns its settings.
fn ready_token(token: &str, sessions: usize) -> progressdb_kms::backend::HsmSettings {
    let s = hsm().settings(token, sessions);
    init_kek(&s).unwrap();
    s
}

/// A second, independent handle on the same (already loaded) module, to check the token
/// without going through the code under test.
fn raw() -> &'static Pkcs11 {
    static RAW: OnceLock<Pkcs11> = OnceLock::new();
    RAW.get_or_init(|| {
        hsm();
        let p = Pkcs11::new(hsm_common::module()).unwrap();
        match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        p
    })
}

fn raw_session(token: &str) -> Session {
    let p = raw();
    let slot = p
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).unwrap().label().trim_end() == token)
        .expect("token by label");
    let session = p.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&SecretString::from(hsm().pin(token)))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    session
}

fn kek_objects(session: &Session) -> usize {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(KEK_LABEL.as_bytes().to_vec()),
        ])
        .unwrap()
        .len()
}

#[test]
fn init_kek_is_idempotent_and_creates_one_object() {
    let s = hsm().settings("t-initkek", 1);
    let first = init_kek(&s).unwrap();
    let InitKekOutcome::Created(kek) = first else {
        panic!("first init_kek must create the KEK, got {first:?}");
    };
    assert_eq!(kek.version, KekVersion::FIRST);
    assert_eq!(kek.id.as_str(), KEK_LABEL);
    assert_eq!(
        init_kek(&s).unwrap(),
        InitKekOutcome::AlreadyPresent(kek.clone())
    );
    assert_eq!(
        init_kek(&s).unwrap(),
        InitKekOutcome::AlreadyPresent(kek.clone())
    );
    assert_eq!(list_kek_versions(&s).unwrap(), vec![KekVersion::FIRST]);
    // Counted independently of the code under test.
    let session = raw_session("t-initkek");
    assert_eq!(kek_objects(&session), 1);
    let h = session
        .find_objects(&[Attribute::Label(KEK_LABEL.as_bytes().to_vec())])
        .unwrap()[0];
    let id = session.get_attributes(h, &[AttributeType::Id]).unwrap();
    assert_eq!(id, vec![Attribute::Id(vec![0, 0, 0, 1])]);
}

#[test]
fn kek_is_sensitive_non_extractable_and_cannot_be_wrapped() {
    let s = ready_token("t-main", 1);
    let a = kek_attributes(&s, KekVersion::FIRST).unwrap();
    assert!(a.token, "token object");
    assert!(a.private, "private");
    assert!(a.sensitive, "sensitive");
    assert!(!a.extractable, "not extractable");
    assert!(a.always_sensitive, "always sensitive");
    assert!(a.never_extractable, "never extractable");
    assert!(a.local, "generated inside the token");
    assert!(!a.modifiable, "not modifiable");
    assert!(a.encrypt && a.decrypt, "encrypt/decrypt");
    assert!(!a.wrap && !a.unwrap, "no wrap/unwrap usage");
    assert!(!a.sign && !a.verify && !a.derive, "no sign/verify/derive");
    assert_eq!(a.key_len, 32, "AES-256");
    assert!(!a.value_readable, "CKA_VALUE must not be readable");
    assert!(
        a.wrap_by_other_key_refused,
        "C_WrapKey of the KEK must fail"
    );

    // The same facts, checked with raw PKCS#11 calls.
    let session = raw_session("t-main");
    let kek = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(KEK_LABEL.as_bytes().to_vec()),
            Attribute::Id(vec![0, 0, 0, 1]),
        ])
        .unwrap();
    assert_eq!(kek.len(), 1);
    let kek = kek[0];
    assert!(matches!(
        session
            .get_attribute_info(kek, &[AttributeType::Value])
            .unwrap()
            .as_slice(),
        [AttributeInfo::Sensitive]
    ));
    assert!(session
        .get_attributes(kek, &[AttributeType::Value])
        .unwrap()
        .is_empty());
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::new(32)),
                Attribute::Token(false),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();
    // Tokens differ in which key-wrap mechanisms they have (SoftHSM: AES_KEY_WRAP and
    // AES_KEY_WRAP_PAD; Kryoptic: AES_KEY_WRAP and KWP): one it lacks proves nothing, one it
    // has must refuse the KEK as unextractable, and none may wrap it.
    let mut refused = 0;
    for mech in [Mechanism::AesKeyWrapPad, Mechanism::AesKeyWrap] {
        let err = session.wrap_key(&mech, wrapping, kek).unwrap_err();
        match err {
            Error::Pkcs11(RvError::KeyUnextractable, _) => refused += 1,
            Error::Pkcs11(RvError::MechanismInvalid, _) => {}
            other => panic!("wrapping the KEK must be refused as unextractable, got {other:?}"),
        }
    }
    assert!(refused >= 1, "no key-wrap mechanism refused the KEK");
    // Attributes cannot be weakened.
    assert!(session
        .update_attributes(kek, &[Attribute::Extractable(true)])
        .is_err());
    assert!(session
        .update_attributes(kek, &[Attribute::Sensitive(false)])
        .is_err());
    // And the token still holds exactly one KEK.
    assert_eq!(kek_objects(&session), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_unwrap_round_trip() {
    let s = ready_token("t-main", 2);
    let backend = Pkcs11Backend::open(s).unwrap();
    assert!(backend.is_ready());
    backend.health_check().await.unwrap();
    let current = backend.current_kek();
    assert_eq!(current.version, KekVersion::FIRST);
    assert_eq!(current.id.as_str(), KEK_LABEL);

    let k = key_id(1);
    let (dek, wrapped, kek) = backend.generate_dek(&k).await.unwrap();
    assert_eq!(kek, current);
    let b = wrapped.as_bytes();
    assert_eq!(b.len(), AES_GCM_V1_LEN);
    assert_eq!(b.len(), 65);
    assert_eq!(b[0], 0x01);
    assert_eq!(&b[1..5], &[0, 0, 0, 1]);
    assert_ne!(dek.expose(), &[0u8; 32]);
    // The DEK is not in the blob in clear.
    assert!(!b.windows(32).any(|w| w == dek.expose()));

    let back = backend.unwrap_dek(&k, &kek.id, &wrapped).await.unwrap();
    assert_eq!(back.expose(), dek.expose());

    // Fresh DEKs and IVs every time.
    let (dek2, wrapped2, _) = backend.generate_dek(&k).await.unwrap();
    assert_ne!(dek2.expose(), dek.expose());
    assert_ne!(&wrapped2.as_bytes()[5..17], &b[5..17]);

    let dbg = format!("{dek:?} {wrapped:?} {backend:?}");
    assert!(!dbg.contains(&hex::encode(dek.expose())));
    assert!(!dbg.contains(&wrapped.to_base64()));
    assert!(!dbg.contains(&hsm().pin("t-main")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_and_misuse_fail_cleanly() {
    let s = ready_token("t-main", 2);
    let backend = Pkcs11Backend::open(s).unwrap();
    let k = key_id(2);
    let (dek, wrapped, kek) = backend.generate_dek(&k).await.unwrap();

    // Bound to its key id.
    let err = backend
        .unwrap_dek(&key_id(3), &kek.id, &wrapped)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidWrapped), "{err:?}");

    // Any flipped bit of iv | ciphertext | tag fails authentication.
    for i in 5..AES_GCM_V1_LEN {
        let mut t = wrapped.as_bytes().to_vec();
        t[i] ^= 0x01;
        let err = backend
            .unwrap_dek(&k, &kek.id, &WrappedDek::new(t))
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::InvalidWrapped),
            "byte {i}: {err:?}"
        );
    }

    // Unknown format tag, bad lengths, version 0.
    let mut t = wrapped.as_bytes().to_vec();
    t[0] = 0x02;
    let mut short = wrapped.as_bytes().to_vec();
    short.pop();
    let mut long = wrapped.as_bytes().to_vec();
    long.push(0);
    let mut v0 = wrapped.as_bytes().to_vec();
    v0[1..5].copy_from_slice(&[0, 0, 0, 0]);
    for bad in [t, short, long, v0, vec![0x01]] {
        let err = backend
            .unwrap_dek(&k, &kek.id, &WrappedDek::new(bad))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::InvalidWrapped), "{err:?}");
    }

    // A version whose KEK is not in the token.
    let mut v2 = wrapped.as_bytes().to_vec();
    v2[1..5].copy_from_slice(&2u32.to_be_bytes());
    let err = backend
        .unwrap_dek(&k, &kek.id, &WrappedDek::new(v2))
        .await
        .unwrap_err();
    match err {
        BackendError::KekNotFound { id, version } => {
            assert_eq!(id, kek.id);
            assert_eq!(version.get(), 2);
        }
        other => panic!("expected KekNotFound, got {other:?}"),
    }
    // A record naming a KEK label other than hsm.kek_label (which would choose the token
    // object that unwraps it) is refused before any lookup, for every use of a blob.
    let other = KekId::parse("no-such-kek").unwrap();
    let err = backend.unwrap_dek(&k, &other, &wrapped).await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidWrapped), "{err:?}");
    let err = backend.rewrap_dek(&k, &other, &wrapped).await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidWrapped), "{err:?}");
    let err = backend
        .check_wrapped(&k, &other, &wrapped)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::InvalidWrapped), "{err:?}");

    // Failed decryptions left no operation active: the original still unwraps on every worker.
    for _ in 0..4 {
        let back = backend.unwrap_dek(&k, &kek.id, &wrapped).await.unwrap();
        assert_eq!(back.expose(), dek.expose());
    }
    backend.health_check().await.unwrap();
    let st = backend.stats();
    assert_eq!(st.recoveries, 0);
    // Authentication failures and foreign KEK ids are the caller's data, not HSM errors; the
    // missing KEK version counts.
    assert_eq!(st.errors, 1, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_generate_and_unwrap() {
    let s = ready_token("t-conc", 4);
    let backend = Arc::new(Pkcs11Backend::open(s).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let b = Arc::clone(&backend);
        tasks.push(tokio::spawn(async move {
            let k = random_key_id();
            let (dek, wrapped, kek) = b.generate_dek(&k).await?;
            let back = b.unwrap_dek(&k, &kek.id, &wrapped).await?;
            assert_eq!(back.expose(), dek.expose());
            Ok::<_, BackendError>(wrapped)
        }));
    }
    let mut ivs = HashSet::new();
    for t in tasks {
        let wrapped = t.await.unwrap().unwrap();
        ivs.insert(wrapped.as_bytes()[5..17].to_vec());
    }
    assert_eq!(ivs.len(), 200, "every wrap uses a fresh IV");
    let st = backend.stats();
    assert_eq!(st.calls, 400);
    assert_eq!(st.errors, 0);
    assert_eq!(st.recoveries, 0);
    assert!(backend.is_ready());
}

#[test]
fn open_refuses_bad_configuration() {
    let h = hsm();

    let mut s = h.settings("t-pin", 1);
    s.pin = SecretString::from("wrong-pin".to_owned());
    let err = Pkcs11Backend::open(s.clone()).unwrap_err();
    assert!(matches!(err, BackendError::PinRejected(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-pin"));
    // The refused PIN is not tried again in this process, not even with another PIN.
    s.pin = SecretString::from("another-wrong-pin".to_owned());
    let err = Pkcs11Backend::open(s).unwrap_err();
    assert!(
        matches!(&err, BackendError::PinRejected(m) if m.contains("earlier login")),
        "{err:?}"
    );

    let s = h.settings("t-main", 1);
    let mut unknown = s.clone();
    unknown.token_label = "no-such-token".into();
    let err = Pkcs11Backend::open(unknown).unwrap_err();
    assert!(
        matches!(&err, BackendError::Config(m) if m.contains("no-such-token")),
        "{err:?}"
    );

    let err = Pkcs11Backend::open(h.settings("t-nokek", 1)).unwrap_err();
    assert!(
        matches!(&err, BackendError::Config(m) if m.contains("init-kek")),
        "{err:?}"
    );
    // Nothing was created by the failed open.
    assert!(list_kek_versions(&h.settings("t-nokek", 1))
        .unwrap()
        .is_empty());

    let mut zero = s.clone();
    zero.sessions = 0;
    assert!(matches!(
        Pkcs11Backend::open(zero).unwrap_err(),
        BackendError::Config(_)
    ));

    let mut other_module = s.clone();
    other_module.module = "/nonexistent/libpkcs11.so".into();
    assert!(matches!(
        Pkcs11Backend::open(other_module).unwrap_err(),
        BackendError::Config(_)
    ));

    let mut unknown = s;
    unknown.token_label = "no-such-token".into();
    assert!(matches!(
        init_kek(&unknown).unwrap_err(),
        BackendError::Config(_)
    ));
    assert!(matches!(
        kek_attributes(&h.settings("t-nokek", 1), KekVersion::FIRST).unwrap_err(),
        BackendError::KekNotFound { .. }
    ));
}

#[test]
fn settings_debug_hides_the_pin() {
    let s = hsm().settings("t-main", 1);
    let d = format!("{s:?}");
    assert!(!d.contains(&hsm().pin("t-main")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_hsm_queue_answers_overloaded_at_once() {
    let mut s = ready_token("t-queue", 1);
    s.limits = progressdb_kms::backend::HsmLimits {
        queue_depth: 1,
        job_timeout: std::time::Duration::from_secs(5),
    };
    let backend = Arc::new(Pkcs11Backend::open(s).unwrap());
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let b = Arc::clone(&backend);
            tokio::spawn(async move { b.generate_dek(&random_key_id()).await.map(|_| ()) })
        })
        .collect();
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(BackendError::Overloaded) => overloaded += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(ok >= 1, "some jobs ran");
    assert!(
        overloaded >= 1,
        "a one-slot queue under 400 callers refused some"
    );
    assert_eq!(backend.stats().overloaded, overloaded as u64);
    assert!(backend.is_ready(), "overload is not an outage");
}

/// A token provisioned by an earlier release: its wrap-class KEK existed before the binding
/// key, which records that version when it is made. AesKwV2 blobs under that version are
/// read (in both residencies), bound to their key id, and rewrapped as AesKwV3; one under a
/// later version is forged and refused.
#[tokio::test]
async fn legacy_aes_kw_v2_blobs_are_read_up_to_the_binding_keys_version_and_rotated_away() {
    let mut s = hsm().settings("t-legacy", 1);
    s.residency = DekResidency::Hsm;
    init_kek(&s).unwrap();
    // As before the binding key existed: no such object, then it is made (at start).
    let own = raw_session("t-legacy");
    for h in own
        .find_objects(&[Attribute::Label(s.binding_key_label.as_bytes().to_vec())])
        .unwrap()
    {
        own.destroy_object(h).unwrap();
    }
    assert_eq!(ensure_hmac_keys(&s).unwrap(), vec![HmacRole::Binding]);

    let mut ms = s.clone();
    ms.residency = DekResidency::Memory;
    let mb = Pkcs11Backend::open(ms).unwrap();
    let hb = Pkcs11Backend::open(s).unwrap();
    let k = key_id(20);
    let (dek, v3, v1) = mb.generate_dek(&k).await.unwrap();
    assert_eq!(v1.version, KekVersion::FIRST);
    let legacy = hsm_common::legacy_blob(&dek, &v3, &k, &v1);
    let back = mb.unwrap_dek(&k, &v1.id, &legacy).await.unwrap();
    assert_eq!(back.expose(), dek.expose());
    assert!(matches!(
        mb.unwrap_dek(&key_id(21), &v1.id, &legacy).await,
        Err(BackendError::InvalidWrapped)
    ));
    // Hsm residency reads it too; a rotation rewraps it as AesKwV3 inside the HSM.
    let resident = ResidentKey {
        key_id: k.clone(),
        kek_id: v1.id.clone(),
        wrapped: legacy.clone(),
    };
    let sealed = seal(&hb, &resident, &[b"legacy"], b"l").await;
    let v2 = hb
        .ensure_kek_version(KekVersion::new(2).unwrap(), KekMissing::Generate)
        .await
        .unwrap();
    let (moved, under) = hb.rewrap_dek(&k, &v1.id, &legacy).await.unwrap();
    assert_eq!(under, v2);
    assert_eq!(moved.as_bytes()[0], 0x03);
    hb.forget_resident(&k);
    let moved_key = ResidentKey {
        wrapped: moved.clone(),
        ..resident
    };
    assert_eq!(
        open(&hb, &moved_key, &sealed[0], b"l").await.unwrap(),
        b"legacy"
    );
    // Under version 2, made after the binding key, an AesKwV2 blob is forged: refused, in
    // both residencies, though its key part and check are right.
    let forged = hsm_common::legacy_blob(&dek, &moved, &k, &v2);
    assert!(matches!(
        mb.unwrap_dek(&k, &v2.id, &forged).await,
        Err(BackendError::InvalidWrapped)
    ));
    hb.forget_resident(&k);
    let forged_key = ResidentKey {
        wrapped: forged,
        ..moved_key
    };
    assert!(matches!(
        hb.seal_resident(&forged_key, vec![item(b"x", b"")]).await,
        Err(BackendError::InvalidWrapped)
    ));
}

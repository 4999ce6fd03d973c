//! The PKCS#11 backend in `hsm.dek_residency = "hsm"`, against a real token of this run
//! (SoftHSM, or Kryoptic with `PROGRESSDB_TEST_TOKEN=kryoptic`): DEKs generated and wrapped
//! inside the HSM (`AesKwV3`), messages encrypted and decrypted by the HSM, blobs bound to
//! their key id by the HSM's binding key, no `AesKwV2` blob (an earlier release's format)
//! accepted on a token provisioned with that key, session objects sensitive and non-extractable, the bytes-returning methods
//! refused, rotation between wrap-class KEKs inside the HSM, and the session objects made
//! again after the library lost every session.
//!
//! One test: it ends by resetting the library for the whole process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod hsm_common;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use hsm_common::{hsm, item, open, seal};
use kms_api::{KekVersion, KeyId, WrappedDek};
use progressdb_kms::backend::pkcs11::{init_kek, Pkcs11Backend};
use progressdb_kms::backend::{
    BackendError, DekResidency, KekMissing, KeyBackend, ResidentKey, AES_KW_LEN, AES_KW_V3_LEN,
};
use secrecy::SecretString;

fn key_id(n: u8) -> KeyId {
    KeyId::from_random([n; 16])
}

/// A session of the test's own on the already-initialised module (the same application as
/// the backend, so its session objects are visible).
fn own_session(token: &str) -> Session {
    let p = Pkcs11::new(hsm_common::module()).unwrap();
    match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = p
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).unwrap().label().trim_end() == token)
        .unwrap();
    let s = p.open_ro_session(slot).unwrap();
    match s.login(UserType::User, Some(&SecretString::from(hsm().pin(token)))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    std::mem::forget(p);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deks_live_and_work_only_inside_the_hsm() {
    let mut s = hsm().settings("t-main", 4);
    s.residency = DekResidency::Hsm;
    s.resident_keys_per_session = 8;
    init_kek(&s).unwrap();
    let b = Pkcs11Backend::open(s).unwrap();
    assert_eq!(b.residency(), DekResidency::Hsm);

    // A new DEK: an AesKwV3 blob under KEK version 1, nothing else.
    let k1 = key_id(1);
    let (wrapped, kek) = b.generate_resident(&k1).await.unwrap();
    assert_eq!(kek.version, KekVersion::FIRST);
    let bytes = wrapped.as_bytes();
    assert_eq!(bytes.len(), AES_KW_V3_LEN);
    assert_eq!(bytes[0], 0x03);
    assert_eq!(&bytes[1..5], &[0, 0, 0, 1]);
    let key = ResidentKey {
        key_id: k1.clone(),
        kek_id: kek.id.clone(),
        wrapped: wrapped.clone(),
    };

    // The bytes-returning methods are refused in this residency.
    assert!(matches!(
        b.generate_dek(&k1).await,
        Err(BackendError::Config(_))
    ));
    assert!(matches!(
        b.unwrap_dek(&k1, &kek.id, &wrapped).await,
        Err(BackendError::Config(_))
    ));

    // Messages: `nonce | ciphertext | tag`, fresh nonces, wrong AAD or a flipped bit is that
    // item's InvalidWrapped, a short one too.
    let cts = seal(&b, &key, &[b"hello", b"hello"], b"aad").await;
    assert_eq!(cts[0].len(), 12 + 5 + 16);
    assert_ne!(cts[0][..12], cts[1][..12]);
    assert_eq!(open(&b, &key, &cts[0], b"aad").await.unwrap(), b"hello");
    assert!(matches!(
        open(&b, &key, &cts[0], b"other").await,
        Err(BackendError::InvalidWrapped)
    ));
    let mut bad = cts[1].clone();
    bad[20] ^= 1;
    assert!(matches!(
        open(&b, &key, &bad, b"aad").await,
        Err(BackendError::InvalidWrapped)
    ));
    assert!(matches!(
        open(&b, &key, &[0u8; 27], b"aad").await,
        Err(BackendError::InvalidWrapped)
    ));

    // A batch of 200 (spread over the four sessions, each unwrapping its own object) keeps
    // its order.
    let msgs: Vec<Vec<u8>> = (0..200).map(|i| format!("item {i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    let sealed = seal(&b, &key, &refs, b"batch").await;
    let opened = b
        .open_resident(&key, sealed.iter().map(|c| item(c, b"batch")).collect())
        .await
        .unwrap();
    for (m, o) in msgs.iter().zip(opened) {
        assert_eq!(&o.unwrap()[..], &m[..]);
    }

    // The blob is bound to its key id, and any flipped byte after the header is refused
    // (each tried under a key id of its own, so no session object of k1 answers for it).
    let other = ResidentKey {
        key_id: key_id(2),
        ..key.clone()
    };
    assert!(matches!(
        b.seal_resident(&other, vec![item(b"x", b"")]).await,
        Err(BackendError::InvalidWrapped)
    ));
    for i in 5..AES_KW_V3_LEN {
        let mut t = bytes.to_vec();
        t[i] ^= 0x01;
        let forged = ResidentKey {
            key_id: k1.clone(),
            kek_id: kek.id.clone(),
            wrapped: WrappedDek::new(t),
        };
        b.forget_resident(&k1);
        let r = b.open_resident(&forged, vec![item(&cts[0], b"aad")]).await;
        assert!(
            matches!(r, Err(BackendError::InvalidWrapped)),
            "byte {i}: {r:?}"
        );
        assert!(matches!(
            b.check_wrapped(
                &k1,
                &kek.id,
                &WrappedDek::new({
                    let mut t = bytes.to_vec();
                    t[i] ^= 0x01;
                    t
                })
            )
            .await,
            Err(BackendError::InvalidWrapped)
        ));
    }
    b.check_wrapped(&k1, &kek.id, &wrapped).await.unwrap();

    // What the HSM holds: every DEK object of this process is sensitive and
    // non-extractable, its value unreadable; the map is bounded (8 per session).
    for n in 10..30 {
        let k = key_id(n);
        let (w, kek) = b.generate_resident(&k).await.unwrap();
        let rk = ResidentKey {
            key_id: k,
            kek_id: kek.id,
            wrapped: w,
        };
        seal(&b, &rk, &[b"m"], b"").await;
    }
    let own = own_session("t-main");
    let objects = own
        .find_objects(&[
            Attribute::Token(false),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ])
        .unwrap();
    assert!(!objects.is_empty());
    assert!(objects.len() <= 4 * 8, "{} session objects", objects.len());
    for o in &objects {
        let attrs = own
            .get_attributes(*o, &[AttributeType::Sensitive, AttributeType::Extractable])
            .unwrap();
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
        let info = own.get_attribute_info(*o, &[AttributeType::Value]).unwrap();
        assert!(
            !matches!(info[0], AttributeInfo::Available(_)),
            "a DEK value is readable"
        );
    }

    // Rotation to a second wrap-class KEK happens inside the HSM; the new blob holds the
    // same DEK (old messages open under it).
    let v2 = b
        .ensure_kek_version(KekVersion::new(2).unwrap(), KekMissing::Generate)
        .await
        .unwrap();
    let (rewrapped, under) = b.rewrap_dek(&k1, &kek.id, &wrapped).await.unwrap();
    assert_eq!(under, v2);
    assert_eq!(rewrapped.as_bytes()[0], 0x03);
    assert_eq!(&rewrapped.as_bytes()[1..5], &[0, 0, 0, 2]);
    let moved = ResidentKey {
        key_id: k1.clone(),
        kek_id: v2.id.clone(),
        wrapped: rewrapped,
    };
    b.forget_resident(&k1);
    assert_eq!(open(&b, &moved, &cts[0], b"aad").await.unwrap(), b"hello");

    // This token was provisioned with its binding key (before any KEK): an AesKwV2 blob,
    // which only earlier releases wrote, is refused under every version, here version 2.
    let mut ms = hsm().settings("t-main", 1);
    ms.residency = DekResidency::Memory;
    let mb = Pkcs11Backend::open(ms).unwrap();
    let k9 = key_id(9);
    let (dek, v3, now) = mb.generate_dek(&k9).await.unwrap();
    assert_eq!(now, v2);
    let legacy = hsm_common::legacy_blob(&dek, &v3, &k9, &now);
    assert!(matches!(
        mb.unwrap_dek(&k9, &now.id, &legacy).await,
        Err(BackendError::InvalidWrapped)
    ));
    // An AesKwV3 binding cannot be moved to another key id: only the HSM's binding key,
    // which no call drives, makes one; knowing the DEK and the key part does not help.
    let mut swapped = v3.as_bytes().to_vec();
    assert!(matches!(
        mb.unwrap_dek(&key_id(11), &now.id, &WrappedDek::new(swapped.clone()))
            .await,
        Err(BackendError::InvalidWrapped)
    ));
    swapped[5 + AES_KW_LEN] ^= 1;
    assert!(matches!(
        mb.unwrap_dek(&k9, &now.id, &WrappedDek::new(swapped)).await,
        Err(BackendError::InvalidWrapped)
    ));
    drop(mb);

    // Every session lost at once: the objects are gone with them; the backend reopens and
    // unwraps them again.
    let loads = b.stats().resident_loads;
    b.simulate_session_loss().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let back = loop {
        match open(&b, &moved, &cts[1], b"aad").await {
            Ok(p) => break p,
            Err(BackendError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("after the session loss: {e:?}"),
        }
    };
    assert_eq!(back, b"hello");
    assert!(
        b.stats().resident_loads > loads,
        "the object was made again"
    );
    assert_eq!(b.stats().imports, 0, "no DEK passed through the process");
}

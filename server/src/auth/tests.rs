//! Unit tests of `auth`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn keys() -> ApiKeys {
    ApiKeys::from_parts(&["adm-1"], &["be-1", "be-2"], &["fe-1"], b"s3cret").unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().unwrap());
    }
    h
}

#[test]
fn roles_by_key() {
    let k = keys();
    assert_eq!(k.role_of(b"adm-1"), Some(Role::Admin));
    assert_eq!(k.role_of(b"be-2"), Some(Role::Backend));
    assert_eq!(k.role_of(b"fe-1"), Some(Role::Frontend));
    assert_eq!(k.role_of(b"fe-"), None);
    assert_eq!(k.role_of(b"fe-11"), None);
    assert_eq!(k.role_of(b""), None);
}

#[test]
fn hmac_signature_matches_reference() {
    // RFC 4231-style check against an independently computed HMAC-SHA256.
    let k = ApiKeys::from_parts(&["a"], &[], &[], b"key").unwrap();
    let u = UserId::parse("The_quick_brown_fox").unwrap();
    let mut m = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
    m.update(b"The_quick_brown_fox");
    let expect = hex::encode(m.finalize().into_bytes());
    assert_eq!(k.sign(&u), expect);
    assert!(k.verify(&u, &expect, SignatureGeneration(0)));
    assert!(k.verify(&u, &expect.to_uppercase(), SignatureGeneration(0)));
    assert!(!k.verify(&u, &expect[..62], SignatureGeneration(0)));
    assert!(!k.verify(
        &UserId::parse("other").unwrap(),
        &expect,
        SignatureGeneration(0)
    ));
    assert!(!k.verify(&u, "zz", SignatureGeneration(0)));
}

#[test]
fn several_secrets_verify_and_the_first_signs() {
    let k = ApiKeys::with_secrets(&["a"], &[], &[], &[b"new", b"old"]).unwrap();
    let only_old = ApiKeys::from_parts(&["a"], &[], &[], b"old").unwrap();
    let only_new = ApiKeys::from_parts(&["a"], &[], &[], b"new").unwrap();
    let u = UserId::parse("alice").unwrap();
    assert_eq!(k.sign(&u), only_new.sign(&u));
    assert!(k.verify(&u, &only_old.sign(&u), SignatureGeneration(0)));
    assert!(k.verify(&u, &only_new.sign(&u), SignatureGeneration(0)));
    assert!(!only_old.verify(&u, &k.sign(&u), SignatureGeneration(0)));
    assert!(ApiKeys::with_secrets(&["a"], &[], &[], &[]).is_err());
    assert!(ApiKeys::with_secrets(&["a"], &[], &[], &[b"x", b"x"]).is_err());
    assert!(ApiKeys::with_secrets(&["a"], &[], &[], &[b"x", b""]).is_err());
}

#[test]
fn expiring_signatures() {
    let k = ApiKeys::with_secrets(&["a"], &[], &[], &[b"new", b"old"]).unwrap();
    let old = ApiKeys::from_parts(&["a"], &[], &[], b"old").unwrap();
    let u = UserId::parse("alice").unwrap();
    let sig = k.sign_until(&u, 1000, SignatureGeneration(0));
    assert!(sig.starts_with("v2.1000."));
    assert!(k.verify_at(&u, &sig, 999, SignatureGeneration(0)));
    assert!(k.verify_at(&u, &sig, 1000, SignatureGeneration(0)));
    assert!(
        !k.verify_at(&u, &sig, 1001, SignatureGeneration(0)),
        "expired"
    );
    assert!(
        k.verify_at(
            &u,
            &old.sign_until(&u, 1000, SignatureGeneration(0)),
            10,
            SignatureGeneration(0)
        ),
        "older secret"
    );
    assert!(!k.verify_at(
        &UserId::parse("bob").unwrap(),
        &sig,
        10,
        SignatureGeneration(0)
    ));
    let tag = sig.rsplit('.').next().unwrap();
    for forged in [
        format!("v2.2000.{tag}"),
        format!("v2.01000.{tag}"),
        format!("v2.+1000.{tag}"),
        format!("v2..{tag}"),
        "v2.1000".to_owned(),
        tag.to_owned(),
        "v2.1000.zz".to_owned(),
    ] {
        assert!(
            !k.verify_at(&u, &forged, 10, SignatureGeneration(0)),
            "{forged}"
        );
    }
    // A plain signature is not an expiring one and vice versa.
    assert!(!k.verify_at(
        &u,
        &format!("v2.1000.{}", k.sign(&u)),
        10,
        SignatureGeneration(0)
    ));
}

#[test]
fn keys_file_takes_one_or_several_secrets() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("keys.toml");
    let write = |body: &str| {
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write("admin = [\"a\"]\nsigning_secrets = [\"s2\", \"s1\"]\n");
    let k = ApiKeys::load(&p).unwrap();
    let s1 = ApiKeys::from_parts(&["a"], &[], &[], b"s1").unwrap();
    let u = UserId::parse("u").unwrap();
    assert!(k.verify(&u, &s1.sign(&u), SignatureGeneration(0)));
    write("admin = [\"a\"]\nsigning_secret = \"s\"\nsigning_secrets = [\"t\"]\n");
    let e = ApiKeys::load(&p).unwrap_err().to_string();
    assert!(e.contains("not both"), "{e}");
}

#[test]
fn authenticate_rules() {
    let k = keys();
    let none = SignatureGenerations::default();
    let auth = |pairs: &[(&'static str, &str)]| k.authenticate(&headers(pairs), &none);
    let alice = UserId::parse("alice").unwrap();
    let sig = k.sign(&alice);
    assert_eq!(auth(&[]), Err(AuthError::MissingKey));
    assert_eq!(
        auth(&[("authorization", "Basic adm-1")]),
        Err(AuthError::MissingKey)
    );
    assert_eq!(
        auth(&[("authorization", "Bearer nope")]),
        Err(AuthError::UnknownKey)
    );
    let p = auth(&[("authorization", "bearer be-1")]).unwrap();
    assert_eq!((p.role, p.user), (Role::Backend, None));
    // ProgressDB's header; both headers must then name the same key.
    let p = auth(&[("x-api-key", "be-1")]).unwrap();
    assert_eq!((p.role, p.user), (Role::Backend, None));
    let p = auth(&[("x-api-key", "be-1"), ("authorization", "Bearer be-1")]).unwrap();
    assert_eq!(p.role, Role::Backend);
    assert_eq!(
        auth(&[("x-api-key", "be-1"), ("authorization", "Bearer adm-1")]),
        Err(AuthError::UnknownKey)
    );
    assert_eq!(auth(&[("x-api-key", "")]), Err(AuthError::UnknownKey));
    let p = auth(&[
        ("authorization", "Bearer be-1"),
        ("x-user-id", "google-oauth2|1234"),
    ])
    .unwrap();
    assert_eq!(p.user.unwrap().as_str(), "google-oauth2|1234");
    let p = auth(&[("authorization", "Bearer be-1"), ("x-user-id", "alice")]).unwrap();
    assert_eq!(p.user, Some(alice.clone()));
    assert_eq!(
        auth(&[("authorization", "Bearer be-1"), ("x-user-id", " a"),]),
        Err(AuthError::BadUserId)
    );
    // Frontend: user and signature required and checked.
    assert_eq!(
        auth(&[("authorization", "Bearer fe-1")]),
        Err(AuthError::MissingUser)
    );
    assert_eq!(
        auth(&[("authorization", "Bearer fe-1"), ("x-user-id", "alice"),]),
        Err(AuthError::MissingUser)
    );
    assert_eq!(
        auth(&[
            ("authorization", "Bearer fe-1"),
            ("x-user-id", "mallory"),
            ("x-user-signature", &sig),
        ]),
        Err(AuthError::BadSignature)
    );
    let p = auth(&[
        ("authorization", "Bearer fe-1"),
        ("x-user-id", "alice"),
        ("x-user-signature", &sig),
    ])
    .unwrap();
    assert_eq!((p.role, p.user.as_ref()), (Role::Frontend, Some(&alice)));
    assert!(p.may_access(&alice));
    assert!(!p.may_access(&UserId::parse("bob").unwrap()));
}

#[test]
fn the_policy_caps_lifetimes_and_can_refuse_plain_signatures() {
    let u = UserId::parse("alice").unwrap();
    let g0 = SignatureGeneration(0);
    let now = 1_000_000;
    let k = keys().with_policy(SignaturePolicy {
        forms: SignatureForms::ExpiringOnly,
        max_ttl_secs: 3600,
    });
    assert!(!k.verify_at(&u, &k.sign(&u), now, g0), "plain refused");
    let ok = k.sign_until(&u, now + 3600, g0);
    assert!(k.verify_at(&u, &ok, now, g0));
    // Within a minute of skew over the cap, still; beyond, refused (a signature made for
    // years ahead, under an older cap or with a leaked secret).
    assert!(k.verify_at(&u, &k.sign_until(&u, now + 3660, g0), now, g0));
    assert!(!k.verify_at(&u, &k.sign_until(&u, now + 3661, g0), now, g0));
    assert!(!k.verify_at(&u, &k.sign_until(&u, now + 86_400 * 365, g0), now, g0));
    // What /v1/sign hands out follows the policy.
    let (sig, exp) = k.sign_for(&u, None, g0, now).unwrap();
    assert_eq!(exp, Some(now + 3600));
    assert!(k.verify_at(&u, &sig, now, g0));
    assert!(k
        .sign_for(&u, Some(3601), g0, now)
        .unwrap_err()
        .contains("1 to 3600"));
    assert!(k.sign_for(&u, Some(0), g0, now).is_err());
    // The default policy keeps the plain form for compatibility.
    let plain = keys();
    let (sig, exp) = plain.sign_for(&u, None, g0, now).unwrap();
    assert_eq!((sig.as_str(), exp), (plain.sign(&u).as_str(), None));
    assert!(plain.verify_at(&u, &sig, now, g0));
}

#[test]
fn a_revocation_invalidates_every_earlier_signature_of_that_user_only() {
    let k = keys();
    let (alice, bob) = (
        UserId::parse("alice").unwrap(),
        UserId::parse("bob").unwrap(),
    );
    let now = 1_000_000;
    let gens = SignatureGenerations::default();
    let before = k.sign_until(&alice, now + 600, gens.of(&alice));
    let plain = k.sign(&alice);
    let bobs = k.sign_until(&bob, now + 600, gens.of(&bob));
    gens.set(&alice, SignatureGeneration(1));
    // A late answer of an earlier revocation does not lower it.
    gens.set(&alice, SignatureGeneration(0));
    assert_eq!(gens.of(&alice), SignatureGeneration(1));
    assert!(!k.verify_at(&alice, &before, now, gens.of(&alice)));
    assert!(
        !k.verify_at(&alice, &plain, now, gens.of(&alice)),
        "a revoked user has no plain signature"
    );
    assert!(k.verify_at(&bob, &bobs, now, gens.of(&bob)));
    // New signatures bind the new generation; /v1/sign gives a revoked user an expiring one.
    let (after, exp) = k.sign_for(&alice, None, gens.of(&alice), now).unwrap();
    assert!(exp.is_some());
    assert!(k.verify_at(&alice, &after, now, gens.of(&alice)));
    assert!(!k.verify_at(&alice, &after, now, SignatureGeneration(0)));
}

#[test]
fn keys_file_rules() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("keys.toml");
    std::fs::write(
            &p,
            "admin = [\"a-key\"]\nbackend = [\"b-key\"]\nfrontend = [\"f-key\"]\nsigning_secret = \"sss\"\n",
        )
        .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = ApiKeys::load(&p).unwrap_err().to_string();
    assert!(e.contains("keys.toml") && e.contains("0644"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = ApiKeys::load(&p).unwrap();
    assert_eq!(k.role_of(b"b-key"), Some(Role::Backend));
    assert!(!format!("{k:?}").contains("key\""));

    std::fs::write(
        &p,
        "admin = [\"dup\"]\nbackend = [\"dup\"]\nsigning_secret = \"s\"\n",
    )
    .unwrap();
    let e = ApiKeys::load(&p).unwrap_err().to_string();
    assert!(e.contains("more than once") && !e.contains("dup\""), "{e}");

    std::fs::write(&p, "admin = [\"supersecretkey\"]\n").unwrap();
    let e = ApiKeys::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("signing_secret") && !e.contains("supersecretkey"),
        "{e}"
    );

    std::fs::write(&p, "admin = \"supersecretkey\nsigning_secret = \"s\"\n").unwrap();
    let e = ApiKeys::load(&p).unwrap_err().to_string();
    assert!(!e.contains("supersecretkey"), "{e}");
    // A type error (a string where a list belongs) must not quote the value either.
    std::fs::write(
        &p,
        "admin = [\"a\"]\nsigning_secrets = \"s3cret-value-77\"\n",
    )
    .unwrap();
    let e = ApiKeys::load(&p).unwrap_err().to_string();
    assert!(
        !e.contains("s3cret-value-77") && e.contains("line 2"),
        "{e}"
    );
}

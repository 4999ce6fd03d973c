//! Fail-closed behaviour of the server against a hostile disk writer and hostile callers, over
//! real LMDB files with the dev-only embedded provider: planted plain records, re-attributed
//! ciphertext, other users' messages, racing writes, request text in error answers, signature
//! rotation and expiry.
#![cfg(feature = "dev-embedded")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{Caller, Client, InProc, Kms, TestEnv};
use kms_api::wire::SecretBytes;
use kms_api::ThreadId;
use progressdb::ids::MessageId;
use progressdb::provider::EncryptItem;
use progressdb::store::{keys, RawPut};
use serde_json::{json, Value};

fn msg_key(t: &str, m: &str) -> Vec<u8> {
    format!("thread:{t}:msg:{m}").into_bytes()
}

async fn raw_json(s: &InProc, key: Vec<u8>) -> Value {
    serde_json::from_slice(&s.app.store().raw_get(key).await.unwrap().unwrap()).unwrap()
}

async fn put_json(s: &InProc, key: Vec<u8>, v: &Value) {
    s.app
        .store()
        .write(RawPut {
            key,
            value: serde_json::to_vec(v).unwrap(),
        })
        .await
        .unwrap();
}

fn assert_unreadable(r: &common::Resp, secret: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (500, "message_unreadable"),
        "{:?}",
        r.json()
    );
    assert!(!String::from_utf8_lossy(&r.body).contains(secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_record_planted_in_an_encrypted_thread_is_refused() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "t").await;
    let m1 = c.post_message(&u, &t, json!("genuine one")).await;
    let m2 = c.post_message(&u, &t, json!("genuine two")).await;

    // Replace m1's {"enc": ..} by {"plain": ..}, keeping everything else.
    let mut v = raw_json(&s, msg_key(&t, &m1)).await;
    v["content"] = json!({"plain": "FORGED-PLAIN-TEXT"});
    put_json(&s, msg_key(&t, &m1), &v).await;

    let r = c.get(&u, &format!("/v1/threads/{t}/messages/{m1}")).await;
    assert_unreadable(&r, "FORGED");
    let page = c.all_messages(&u, &t, "asc", 10).await;
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["error"]["code"], "message_unreadable");
    assert!(!page[0].to_string().contains("FORGED"));
    assert_eq!(page[1]["body"], "genuine two");
    let _ = m2;
    let metrics =
        String::from_utf8(c.get(&Caller::admin(), "/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("progressdb_plain_records_refused_total ")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    s.stop().await;
}

/// A disk writer forges the thread's `rotation` with no retiring key: the rule then names
/// "plain" for the old messages, and an edit of one used to be stored in plaintext in a
/// thread that has a DEK. (A forged retiring key at delete: `e2e_tamper.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_rotation_never_stores_an_edit_in_plaintext() {
    let env = TestEnv::new();
    let config = env.config(&Kms::Embedded, "");
    let s = InProc::start(&config).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "t").await;
    let m1 = c.post_message(&u, &t, json!("genuine one")).await;
    let meta_key = format!("thread:{t}:meta").into_bytes();
    let mut meta = raw_json(&s, meta_key.clone()).await;
    assert!(meta["kms"].is_object(), "{meta}");
    meta["rotation"] = json!({
        "job": kms_api::admin::JobId::from_random([7; 8]).as_str(),
        "start": "09999999999999999999-000000",
    });
    put_json(&s, meta_key.clone(), &meta).await;
    // The cache holds the genuine record: start again to read the forged one.
    s.stop().await;
    let s = InProc::start(&config).await;
    let c = Client::new(s.addr);

    let r = c
        .call(
            &u,
            "PUT",
            &format!("/v1/threads/{t}/messages/{m1}"),
            Some(json!({ "body": "EDITED-SECRET" })),
        )
        .await;
    assert_eq!(r.status, 503, "{:?}", r.json());
    let stored = raw_json(&s, msg_key(&t, &m1)).await;
    assert!(stored["content"]["enc"].is_string(), "{stored}");
    assert!(!stored.to_string().contains("EDITED-SECRET"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_messages_from_before_the_dek_stay_readable_and_later_plain_ones_do_not() {
    let env = TestEnv::new();
    let u = Caller::backend_as("u");
    let s = InProc::start(&env.config(&Kms::Plain, "")).await;
    let c = Client::new(s.addr);
    let t = c.create_thread(&u, "t").await;
    let old = c.post_message(&u, &t, json!("written in plain")).await;
    s.stop().await;

    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let new = c.post_message(&u, &t, json!("written encrypted")).await;
    let meta = raw_json(&s, keys::meta(&ThreadId::parse(&t).unwrap())).await;
    let boundary = meta["plain_migration"]["plain_before"].as_str().unwrap();
    assert!(
        old.as_str() < boundary && boundary <= new.as_str(),
        "{meta}"
    );
    let page = c.all_messages(&u, &t, "asc", 10).await;
    assert_eq!(page[0]["body"], "written in plain");
    assert_eq!(page[1]["body"], "written encrypted");

    // A plain record after the boundary is a forgery.
    let mut v = raw_json(&s, msg_key(&t, &new)).await;
    v["content"] = json!({"plain": "FORGED-AFTER-BOUNDARY"});
    put_json(&s, msg_key(&t, &new), &v).await;
    assert_unreadable(
        &c.get(&u, &format!("/v1/threads/{t}/messages/{new}")).await,
        "FORGED",
    );
    assert_eq!(
        c.get(&u, &format!("/v1/threads/{t}/messages/{old}"))
            .await
            .json()["body"],
        "written in plain"
    );
    s.stop().await;

    // With encryption switched off again, a thread that has a DEK is still encrypted.
    let s = InProc::try_start_with_env(
        &env.config(&Kms::Embedded, ""),
        &[("PROGRESSDB__ENCRYPTION__ENABLED", "false")],
    )
    .await
    .unwrap();
    let c = Client::new(s.addr);
    let later = c.post_message(&u, &t, json!("OFF-BUT-ENCRYPTED")).await;
    let v = raw_json(&s, msg_key(&t, &later)).await;
    assert!(v["content"].get("enc").is_some(), "{v}");
    assert_eq!(
        c.get(&u, &format!("/v1/threads/{t}/messages/{later}"))
            .await
            .json()["body"],
        "OFF-BUT-ENCRYPTED"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_attributed_ciphertext_is_unreadable_and_old_records_still_read() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let alice = Caller::backend_as("alice");
    let t = c.create_thread(&alice, "t").await;
    let m1 = c.post_message(&alice, &t, json!("said by alice")).await;
    let m2 = c.post_message(&alice, &t, json!("also alice")).await;
    let m3 = c.post_message(&alice, &t, json!("alice again")).await;
    let v1 = raw_json(&s, msg_key(&t, &m1)).await;
    assert_eq!(v1["v"], 4, "new records carry their format");

    // m1: the author is changed to bob.
    let mut v = v1.clone();
    v["author"] = json!("bob");
    put_json(&s, msg_key(&t, &m1), &v).await;
    assert_unreadable(
        &c.get(&alice, &format!("/v1/threads/{t}/messages/{m1}"))
            .await,
        "said by alice",
    );
    // m2: the creation time is moved.
    let mut v = raw_json(&s, msg_key(&t, &m2)).await;
    v["created_at"] = json!(v["created_at"].as_u64().unwrap() - 1_000_000_000);
    put_json(&s, msg_key(&t, &m2), &v).await;
    assert_unreadable(
        &c.get(&alice, &format!("/v1/threads/{t}/messages/{m2}"))
            .await,
        "also alice",
    );
    // m3: downgraded to the old format (no "v"): the AAD no longer matches either.
    let mut v = raw_json(&s, msg_key(&t, &m3)).await;
    v.as_object_mut().unwrap().remove("v");
    put_json(&s, msg_key(&t, &m3), &v).await;
    assert_unreadable(
        &c.get(&alice, &format!("/v1/threads/{t}/messages/{m3}"))
            .await,
        "alice again",
    );

    // A record written by the previous format (AAD = the message key, no "v") still reads.
    let tid = ThreadId::parse(&t).unwrap();
    let thread = s.app.store().get_thread(&tid).await.unwrap().unwrap();
    let id = MessageId::parse("00000000000000000042-000000").unwrap();
    let ct = s
        .app
        .key_provider()
        .unwrap()
        .encrypt(EncryptItem {
            key: Arc::new(thread.kms.clone().unwrap()),
            plaintext: SecretBytes::new(br#""an old v1 record""#.to_vec()),
            aad: keys::msg(&tid, id),
        })
        .await
        .unwrap();
    let old = json!({
        "author": "alice", "created_at": 42, "updated_at": 42,
        "content": {"enc": base64(&ct.0)},
    });
    put_json(&s, keys::msg(&tid, id), &old).await;
    assert_eq!(
        c.get(&alice, &format!("/v1/threads/{t}/messages/{id}"))
            .await
            .json()["body"],
        "an old v1 record"
    );

    // m3 again, downgraded to formats 2 and 3: their tags differ, so those fail too.
    for older in [2, 3] {
        let mut v = raw_json(&s, msg_key(&t, &m3)).await;
        v["v"] = json!(older);
        put_json(&s, msg_key(&t, &m3), &v).await;
        assert_unreadable(
            &c.get(&alice, &format!("/v1/threads/{t}/messages/{m3}"))
                .await,
            "alice again",
        );
    }

    // Formats 3 and 4 bind the edit: its time and count. A message edited once by three
    // concurrent edits counts three (none is lost unseen: each edit is sealed for the count
    // it read and sealed again when another landed first).
    let m5 = c.post_message(&alice, &t, json!("first version")).await;
    let path5 = format!("/v1/threads/{t}/messages/{m5}");
    let first = raw_json(&s, msg_key(&t, &m5)).await;
    assert!(first.get("edits").is_none(), "{first}");
    let edits: Vec<_> = (0..3)
        .map(|i| {
            let (c, alice, path) = (c, alice.clone(), path5.clone());
            tokio::spawn(async move {
                c.call(
                    &alice,
                    "PUT",
                    &path,
                    Some(json!({"body": format!("version {i}")})),
                )
                .await
                .status
            })
        })
        .collect();
    for e in edits {
        assert_eq!(e.await.unwrap(), 200);
    }
    let edited = raw_json(&s, msg_key(&t, &m5)).await;
    assert_eq!(
        (edited["v"].clone(), edited["edits"].clone()),
        (json!(4), json!(3))
    );
    let body = c.get(&alice, &path5).await.json()["body"].clone();
    assert!(body.as_str().unwrap().starts_with("version "), "{body}");
    // The first version's ciphertext under the current edit state: unreadable.
    let mut mixed = edited.clone();
    mixed["content"] = first["content"].clone();
    put_json(&s, msg_key(&t, &m5), &mixed).await;
    assert_unreadable(&c.get(&alice, &path5).await, "first version");
    // The current ciphertext shown as never edited: unreadable.
    let mut unedited = edited.clone();
    unedited.as_object_mut().unwrap().remove("edits");
    unedited["updated_at"] = edited["created_at"].clone();
    put_json(&s, msg_key(&t, &m5), &unedited).await;
    assert_unreadable(&c.get(&alice, &path5).await, "version");
    // Its edit time moved: unreadable.
    let mut moved = edited.clone();
    moved["updated_at"] = json!(edited["updated_at"].as_u64().unwrap() + 1);
    put_json(&s, msg_key(&t, &m5), &moved).await;
    assert_unreadable(&c.get(&alice, &path5).await, "version");
    put_json(&s, msg_key(&t, &m5), &edited).await;
    assert_eq!(c.get(&alice, &path5).await.json()["body"], body);

    // The thread's author is bound too: re-attributing the thread breaks every v2 message.
    let m4 = c.post_message(&alice, &t, json!("fourth")).await;
    let mut meta = raw_json(&s, keys::meta(&tid)).await;
    meta["author"] = json!("mallory");
    put_json(&s, keys::meta(&tid), &meta).await;
    s.app.cache().invalidate(&tid);
    assert_unreadable(
        &c.get(&alice, &format!("/v1/threads/{t}/messages/{m4}"))
            .await,
        "fourth",
    );
    s.stop().await;
}

fn base64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_user_changes_only_the_messages_they_wrote() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let alice = Caller::frontend("alice");
    let t = c.create_thread(&alice, "alice's thread").await;
    let mine = c.post_message(&alice, &t, json!("by alice")).await;
    // A backend posts in alice's thread on behalf of a support agent.
    let agent = Caller::backend_as("agent");
    let theirs = c.post_message(&agent, &t, json!("by the agent")).await;

    let path = |m: &str| format!("/v1/threads/{t}/messages/{m}");
    let r = c
        .call(
            &alice,
            "PUT",
            &path(&theirs),
            Some(json!({"body": "hijacked"})),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = c.call(&alice, "DELETE", &path(&theirs), None).await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = c.get(&alice, &path(&theirs)).await;
    assert_eq!(r.json()["body"], "by the agent", "nothing changed");

    let r = c
        .call(&alice, "PUT", &path(&mine), Some(json!({"body": "edited"})))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(c.get(&alice, &path(&mine)).await.json()["body"], "edited");
    // Backend keys may moderate any message.
    let r = c
        .call(
            &Caller::backend(),
            "PUT",
            &path(&theirs),
            Some(json!({"body": "moderated"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["author"], "agent", "the author is kept");
    let r = c.call(&alice, "DELETE", &path(&mine), None).await;
    assert_eq!(r.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_patches_and_deletes_never_leave_a_stale_thread_cached() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    for round in 0..25 {
        let t = c.create_thread(&u, "start").await;
        let path = format!("/v1/threads/{t}");
        let patches: Vec<_> = (0..4)
            .map(|i| {
                let (c, u, path) = (c, u.clone(), path.clone());
                tokio::spawn(async move {
                    c.call(
                        &u,
                        "PATCH",
                        &path,
                        Some(json!({"title": format!("r{round}-{i}")})),
                    )
                    .await
                })
            })
            .collect();
        for p in patches {
            assert_eq!(p.await.unwrap().status, 200);
        }
        // What the API shows is what is stored (sealed: the stored title is empty).
        let tid = ThreadId::parse(&t).unwrap();
        let stored = s.app.store().get_thread(&tid).await.unwrap().unwrap();
        assert_eq!(stored.title, "");
        let opened = progressdb::meta::open(s.app.key_provider(), stored)
            .await
            .unwrap();
        assert_eq!(c.get(&u, &path).await.json()["title"], opened.title);

        // A PATCH racing a DELETE: once the delete answered 200, the thread is gone.
        let (p, d) = tokio::join!(
            c.call(&u, "PATCH", &path, Some(json!({"title": "late"}))),
            c.call(&u, "DELETE", &path, None)
        );
        assert_eq!(d.status, 200, "{:?}", d.json());
        assert!(p.status == 200 || p.status == 404, "{:?}", p.json());
        assert_eq!(c.get(&u, &path).await.status, 404, "round {round}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_errors_do_not_echo_what_the_caller_sent() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    for body in [
        json!({"title": 98765432123_u64}),
        json!({"title": "ok", "metadata": 1, "x": "SECRET-VALUE-77"}),
        json!({"title": {"SECRET-KEY-77": true}}),
    ] {
        let r = c.post(&u, "/v1/threads", body.clone()).await;
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert!(
            !text.contains("98765432123") && !text.contains("SECRET"),
            "{text}"
        );
        if r.status != 201 {
            assert_eq!(
                (r.status, r.code().as_str()),
                (400, "malformed_request"),
                "{text}"
            );
        }
    }
    let t = c.create_thread(&u, "t").await;
    let r = c
        .call(
            &u,
            "POST",
            &format!("/v1/threads/{t}/messages"),
            Some(json!({"bdy": "SECRET-BODY-TEXT"})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(!String::from_utf8_lossy(&r.body).contains("SECRET"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_secrets_rotate_and_expiring_signatures_expire() {
    let env = TestEnv::new();
    // Rotate: a new secret first, the test suite's old one kept for existing signatures.
    common::write_keys(
        env.path(),
        &format!(
            "signing_secrets = [\"brand-new-signing-secret\", \"{}\"]\n",
            common::SIGNING_SECRET
        ),
    );
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    // A signature under the old secret still works.
    let old = Caller::frontend("alice");
    let t = c.create_thread(&old, "t").await;
    // /v1/sign now signs with the new secret; it differs from the old one and works.
    let r = c
        .post(&Caller::backend(), "/v1/sign", json!({"user_id": "alice"}))
        .await;
    let new_sig = r.json()["signature"].as_str().unwrap().to_owned();
    assert_ne!(Some(new_sig.clone()), old.sig);
    let with = |sig: String| Caller {
        key: common::FRONTEND.into(),
        user: Some("alice".into()),
        sig: Some(sig),
    };
    assert_eq!(
        c.get(&with(new_sig), &format!("/v1/threads/{t}"))
            .await
            .status,
        200
    );

    // Expiring form.
    let r = c
        .post(
            &Caller::backend(),
            "/v1/sign",
            json!({"user_id": "alice", "expires_in_secs": 600}),
        )
        .await;
    assert_eq!(r.status, 200);
    let sig = r.json()["signature"].as_str().unwrap().to_owned();
    assert!(
        sig.starts_with("v2.") && r.json()["expires_at"].is_string(),
        "{sig}"
    );
    assert_eq!(
        c.get(&with(sig.clone()), &format!("/v1/threads/{t}"))
            .await
            .status,
        200
    );
    // Not for another user, not with a changed expiry.
    let bob = Caller {
        key: common::FRONTEND.into(),
        user: Some("bob".into()),
        sig: Some(sig.clone()),
    };
    assert_eq!(c.get(&bob, "/v1/threads").await.status, 401);
    let parts: Vec<&str> = sig.split('.').collect();
    let later = format!(
        "v2.{}.{}",
        parts[1].parse::<u64>().unwrap() + 1000,
        parts[2]
    );
    assert_eq!(c.get(&with(later), "/v1/threads").await.status, 401);
    // An expired one (signed by hand with the new secret, an hour ago).
    let keys =
        progressdb::auth::ApiKeys::with_secrets(&["a"], &[], &[], &[b"brand-new-signing-secret"])
            .unwrap();
    let alice = progressdb::ids::UserId::parse("alice").unwrap();
    let expired = keys.sign_until(
        &alice,
        progressdb::auth::unix_now() - 3600,
        progressdb::auth::SignatureGeneration(0),
    );
    assert_eq!(c.get(&with(expired), "/v1/threads").await.status, 401);
    let r = c
        .post(
            &Caller::backend(),
            "/v1/sign",
            json!({"user_id": "alice", "expires_in_secs": 0}),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_argument"));
    // An integer written with a zero fraction is an integer (JSON Schema's view); a fraction
    // or a negative number is not.
    let r = c
        .post(
            &Caller::backend(),
            "/v1/sign",
            json!({"user_id": "alice", "expires_in_secs": 600.0}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    for bad in [json!(600.5), json!(-1), json!("600")] {
        let r = c
            .post(
                &Caller::backend(),
                "/v1/sign",
                json!({"user_id": "alice", "expires_in_secs": bad}),
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "malformed_request"),
            "{bad}"
        );
    }
    s.stop().await;
}

/// One user cannot make the server hold unbounded memory: thread metadata is capped by bytes
/// and depth (it is held parsed, many times its text), and a page of large messages stops at
/// `limits.max_page_bytes` with a cursor instead of holding `max_page_size` of them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_pages_are_bounded_by_bytes() {
    let env = TestEnv::new();
    let config = env.config(
        &Kms::Embedded,
        "[limits]\nmax_page_bytes = 200000\nmax_metadata_bytes = 1024\nmax_metadata_depth = 4\n",
    );
    let s = InProc::start(&config).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let create = |meta: Value| {
        let c = &c;
        let u = &u;
        async move {
            c.call(
                u,
                "POST",
                "/v1/threads",
                Some(json!({ "title": "t", "metadata": meta })),
            )
            .await
        }
    };
    // 256 KiB of [0,0,...] used to be accepted (and held as ~4 MiB of parsed JSON).
    let zeros: Vec<u8> = vec![0; 600];
    let r = create(json!(zeros)).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_argument"));
    let r = create(json!([[[[["deep"]]]]])).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_argument"));
    let r = create(json!({"a": [[["ok"]]], "n": 1})).await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let t = r.json()["id"].as_str().unwrap().to_owned();
    // A patch is held to the same caps.
    let r = c
        .call(
            &u,
            "PATCH",
            &format!("/v1/threads/{t}"),
            Some(json!({ "metadata": vec![1u8; 600] })),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_argument"));

    // Ten messages of ~60 KB: a page of 500 stops near 200 KB, and the cursor goes on.
    for i in 0..10 {
        c.post_message(&u, &t, json!(format!("{i}{}", "x".repeat(60_000))))
            .await;
    }
    let mut seen = 0;
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .get(
                &u,
                &format!("/v1/threads/{t}/messages?limit=500&cursor={cursor}"),
            )
            .await;
        assert_eq!(r.status, 200);
        let v = r.json();
        let n = v["messages"].as_array().unwrap().len();
        assert!((1..=3).contains(&n), "a page held {n} messages of 60 KB");
        seen += n;
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, 10);
    assert!(pages >= 4, "{pages}");
    s.stop().await;
}

/// With `auth.require_expiring_signatures`, a plain signature (a bearer credential forever)
/// is refused and `/v1/sign` hands out expiring ones only, capped at
/// `auth.max_signature_ttl_secs`, and a signature made for a year ahead is refused. Revoking
/// one user's signatures makes every earlier one of that user fail at once, durably (after a
/// restart too); other users keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_expire_within_the_cap_and_one_user_can_be_revoked() {
    let env = TestEnv::new();
    let config = env.config(&Kms::Embedded, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[auth]\n",
        "[auth]\nrequire_expiring_signatures = true\nmax_signature_ttl_secs = 3600\n",
    );
    std::fs::write(&config, text).unwrap();
    let s = InProc::start(&config).await;
    let c = Client::new(s.addr);
    let as_user = |user: &str, sig: &str| Caller {
        key: common::FRONTEND.into(),
        user: Some(user.into()),
        sig: Some(sig.into()),
    };
    let sign = |user: &'static str, ttl: Option<u64>| {
        let c = &c;
        async move {
            let body = match ttl {
                Some(t) => json!({"user_id": user, "expires_in_secs": t}),
                None => json!({"user_id": user}),
            };
            c.post(&Caller::backend(), "/v1/sign", body).await
        }
    };

    // The plain form is refused.
    assert_eq!(
        c.get(&Caller::frontend("alice"), "/v1/threads")
            .await
            .status,
        401
    );
    // Asked without a lifetime, /v1/sign gives the longest allowed.
    let r = sign("alice", None).await;
    assert_eq!(r.status, 200);
    let alice_sig = r.json()["signature"].as_str().unwrap().to_owned();
    let expires: u64 = alice_sig.split('.').nth(1).unwrap().parse().unwrap();
    let now = progressdb::auth::unix_now();
    assert!(expires > now + 3500 && expires <= now + 3600, "{alice_sig}");
    assert_eq!(
        c.get(&as_user("alice", &alice_sig), "/v1/threads")
            .await
            .status,
        200
    );
    let r = sign("alice", Some(3601)).await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_argument"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1 to 3600"));
    // A signature for a year ahead, made with the real secret (a leak, or an older cap).
    let keys = progressdb::auth::ApiKeys::with_secrets(
        &["a"],
        &[],
        &[],
        &[common::SIGNING_SECRET.as_bytes()],
    )
    .unwrap();
    let alice = progressdb::ids::UserId::parse("alice").unwrap();
    let long = keys.sign_until(
        &alice,
        now + 366 * 86_400,
        progressdb::auth::SignatureGeneration(0),
    );
    assert_eq!(
        c.get(&as_user("alice", &long), "/v1/threads").await.status,
        401
    );

    // Revocation: not by a frontend key; by the backend, for alice only.
    let bob_sig = sign("bob", Some(600)).await.json()["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoke = "/v1/users/alice/revoke-signatures";
    let r = c
        .post(&as_user("alice", &alice_sig), revoke, json!({}))
        .await;
    assert_eq!(r.status, 403);
    let r = c.post(&Caller::backend(), revoke, json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["signature_generation"], 1);
    assert_eq!(
        c.get(&as_user("alice", &alice_sig), "/v1/threads")
            .await
            .status,
        401
    );
    assert_eq!(
        c.get(&as_user("bob", &bob_sig), "/v1/threads").await.status,
        200
    );
    let fresh = sign("alice", Some(600)).await.json()["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        c.get(&as_user("alice", &fresh), "/v1/threads").await.status,
        200
    );
    let r = c
        .post(
            &Caller::backend(),
            "/v1/users/%20a/revoke-signatures",
            json!({}),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_argument"));
    s.stop().await;

    // Durable: after a restart the revoked signature stays refused.
    let s = InProc::start(&config).await;
    let c = Client::new(s.addr);
    assert_eq!(
        c.get(&as_user("alice", &alice_sig), "/v1/threads")
            .await
            .status,
        401
    );
    assert_eq!(
        c.get(&as_user("alice", &fresh), "/v1/threads").await.status,
        200
    );
    s.stop().await;
}

/// Rate limits count per API key *and user*: every browser shares the frontend key, so one
/// user at its limit (429 with `Retry-After`) leaves the others served. And one user has at
/// most `limits.max_threads_per_user` threads (403 `thread_limit`, no key made at the KMS
/// for the refused create).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_use_up_the_frontend_keys_rate_or_thread_room() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(
        &Kms::Embedded,
        "[limits]\nkey_rate_per_sec = 1\nkey_rate_burst = 6\nmax_threads_per_user = 2\n",
    ))
    .await;
    let c = Client::new(s.addr);
    let alice = Caller::frontend("alice");
    c.create_thread(&alice, "one").await;
    c.create_thread(&alice, "two").await;
    let r = c
        .post(&alice, "/v1/threads", json!({"title": "three"}))
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "thread_limit"));
    let mut limited = None;
    for _ in 0..20 {
        let r = c.get(&alice, "/v1/threads").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200);
    }
    let r = limited.expect("alice reached her rate limit");
    assert_eq!(r.code(), "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    // Bob shares the frontend key and is served, and may create threads.
    let bob = Caller::frontend("bob");
    assert_eq!(c.get(&bob, "/v1/threads").await.status, 200);
    c.create_thread(&bob, "bob's").await;
    s.stop().await;
}

/// Thread titles and metadata are content: a thread with a DEK stores them sealed under it,
/// bound to the thread. They are not in the store's bytes; a record whose author or creation
/// time was edited (or whose sealed part was swapped with another thread's) shows neither
/// (500 `message_unreadable`, left out of listings) but can still be deleted; a record
/// written before sealing (plain title, with a DEK) still reads, and a DEK rotation seals it
/// under the new key before the old one is destroyed; patches reseal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_and_metadata_are_sealed_under_the_threads_key() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let r = c
        .post(
            &u,
            "/v1/threads",
            json!({"title": "TITLE-MARKER-7", "metadata": {"note": "META-MARKER-9"}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let t = r.json()["id"].as_str().unwrap().to_owned();
    let tid = ThreadId::parse(&t).unwrap();
    let other = c.create_thread(&u, "OTHER-TITLE").await;
    let other_id = ThreadId::parse(&other).unwrap();
    let stored = raw_json(&s, keys::meta(&tid)).await;
    assert_eq!(stored["title"], "");
    assert!(stored.get("metadata").is_none());
    assert!(stored["sealed_meta"]["ct"].is_string());
    let raw = String::from_utf8_lossy(
        &s.app
            .store()
            .raw_get(keys::meta(&tid))
            .await
            .unwrap()
            .unwrap(),
    )
    .into_owned();
    assert!(
        !raw.contains("TITLE-MARKER") && !raw.contains("META-MARKER"),
        "{raw}"
    );
    let r = c.get(&u, &format!("/v1/threads/{t}")).await;
    assert_eq!(r.json()["title"], "TITLE-MARKER-7");
    assert_eq!(r.json()["metadata"]["note"], "META-MARKER-9");

    // A patch reseals; the title reads back, still not in the store.
    let r = c
        .call(
            &u,
            "PATCH",
            &format!("/v1/threads/{t}"),
            Some(json!({"title": "RENAMED-5"})),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["title"].as_str()),
        (200, Some("RENAMED-5"))
    );
    assert_eq!(r.json()["metadata"]["note"], "META-MARKER-9");
    let stored = raw_json(&s, keys::meta(&tid)).await;
    assert_eq!(stored["title"], "");

    // Another thread's sealed part planted here does not open (another key, another AAD).
    let mut forged = raw_json(&s, keys::meta(&tid)).await;
    forged["sealed_meta"] = raw_json(&s, keys::meta(&other_id)).await["sealed_meta"].clone();
    put_json(&s, keys::meta(&tid), &forged).await;
    s.app.cache().invalidate(&tid);
    let r = c.get(&u, &format!("/v1/threads/{t}")).await;
    assert_eq!((r.status, r.code().as_str()), (500, "message_unreadable"));
    // The creation time edited: the AAD no longer matches either.
    let mut moved = raw_json(&s, keys::meta(&other_id)).await;
    moved["created_at"] = json!(moved["created_at"].as_u64().unwrap_or(0) + 1);
    put_json(&s, keys::meta(&other_id), &moved).await;
    s.app.cache().invalidate(&other_id);
    let r = c.get(&u, &format!("/v1/threads/{other}")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (500, "message_unreadable"),
        "{:?}",
        r.json()
    );
    let r = c.get(&u, "/v1/threads").await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["threads"].as_array().unwrap().is_empty(),
        "left out: {:?}",
        r.json()
    );
    // Neither blocks its delete (the shred).
    for id in [&t, &other] {
        let r = c
            .call(&u, "DELETE", &format!("/v1/threads/{id}"), None)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }

    // A record from before sealing: plain title and metadata, with a DEK.
    let legacy = c.create_thread(&u, "x").await;
    let lid = ThreadId::parse(&legacy).unwrap();
    let mut rec = raw_json(&s, keys::meta(&lid)).await;
    rec.as_object_mut().unwrap().remove("sealed_meta");
    rec["title"] = json!("LEGACY-TITLE");
    put_json(&s, keys::meta(&lid), &rec).await;
    s.app.cache().invalidate(&lid);
    assert_eq!(
        c.get(&u, &format!("/v1/threads/{legacy}")).await.json()["title"],
        "LEGACY-TITLE"
    );
    let old_key = rec["kms"]["key_id"].as_str().unwrap().to_owned();
    let r = c
        .call(
            &Caller::admin(),
            "POST",
            &format!("/admin/threads/{legacy}/rotate-dek"),
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let job = r.json()["job_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let j = c
            .get(&Caller::admin(), &format!("/admin/jobs/{job}"))
            .await
            .json();
        if j["state"] == "succeeded" {
            break;
        }
        assert!(j["state"] != "failed", "{j}");
        assert!(std::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stored = raw_json(&s, keys::meta(&lid)).await;
    assert_eq!(stored["title"], "");
    assert_ne!(stored["sealed_meta"]["key_id"], json!(old_key));
    assert_eq!(stored["sealed_meta"]["key_id"], stored["kms"]["key_id"]);
    assert_eq!(
        c.get(&u, &format!("/v1/threads/{legacy}")).await.json()["title"],
        "LEGACY-TITLE"
    );
    s.stop().await;
}

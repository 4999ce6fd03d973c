//! Encryption properties over real LMDB files, with the embedded provider: no plaintext at
//! rest, ciphertext bound to its message, crypto-shredding, and the dev fallback.
#![cfg(feature = "dev-embedded")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Caller, Client, InProc, Kms, TestEnv};
use progressdb::store::RawPut;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmdb_files_hold_no_plaintext() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let mut markers = Vec::new();
    for t in 0..3 {
        let tid = c.create_thread(&u, &format!("thread {t}")).await;
        for i in 0..20 {
            let marker = format!("ZQX-MARKER-{t}-{i}-PLAINTEXT");
            let mid = c
                .post_message(&u, &tid, json!({"text": marker, "n": i}))
                .await;
            if i % 5 == 0 {
                // Edits too.
                let edited = format!("ZQX-EDITED-{t}-{i}-PLAINTEXT");
                let r = c
                    .call(
                        &u,
                        "PUT",
                        &format!("/v1/threads/{tid}/messages/{mid}"),
                        Some(json!({"body": edited})),
                    )
                    .await;
                assert_eq!(r.status, 200);
                markers.push(edited);
            }
            markers.push(marker);
        }
        // And it all reads back.
        let all = c.all_messages(&u, &tid, "asc", 7).await;
        assert_eq!(all.len(), 20);
        assert!(all.iter().all(|m| m.get("body").is_some()));
    }
    s.stop().await;
    let store = env.store_path();
    assert!(store.join("data.mdb").is_file());
    assert!(
        !common::dir_contains(&store, b"ZQX-"),
        "plaintext marker found in the LMDB files"
    );
    assert!(common::dir_contains(&store, b"\"enc\":"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_ciphertext_is_unreadable_never_wrong_content() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let ta = c.create_thread(&u, "a").await;
    let tb = c.create_thread(&u, "b").await;
    let a1 = c.post_message(&u, &ta, json!("first of a")).await;
    let a2 = c.post_message(&u, &ta, json!("second of a")).await;
    let a3 = c.post_message(&u, &ta, json!("third of a")).await;
    let b1 = c.post_message(&u, &tb, json!("first of b")).await;
    let store = s.app.store();
    let key = |t: &str, m: &str| format!("thread:{t}:msg:{m}").into_bytes();
    let a1_value = store.raw_get(key(&ta, &a1)).await.unwrap().unwrap();

    // 1. a1's stored value copied over a2 (same thread, same DEK).
    store
        .write(RawPut {
            key: key(&ta, &a2),
            value: a1_value.clone(),
        })
        .await
        .unwrap();
    // 2. a1's value copied into thread b over b1 (other thread, other DEK).
    store
        .write(RawPut {
            key: key(&tb, &b1),
            value: a1_value.clone(),
        })
        .await
        .unwrap();
    // 3. a1's value copied under a new id in thread a.
    let forged = "00000000000000000001-000000";
    store
        .write(RawPut {
            key: key(&ta, forged),
            value: a1_value.clone(),
        })
        .await
        .unwrap();
    // 4. a3's ciphertext flipped by one bit.
    let mut a3_value: serde_json::Value =
        serde_json::from_slice(&store.raw_get(key(&ta, &a3)).await.unwrap().unwrap()).unwrap();
    let ct = a3_value["content"]["enc"].as_str().unwrap().to_owned();
    let mut bytes = base64_decode(&ct);
    bytes[14] ^= 0x01;
    a3_value["content"]["enc"] = json!(base64_encode(&bytes));
    store
        .write(RawPut {
            key: key(&ta, &a3),
            value: serde_json::to_vec(&a3_value).unwrap(),
        })
        .await
        .unwrap();

    for (t, m) in [
        (&ta, &a2),
        (&tb, &b1),
        (&ta, &forged.to_owned()),
        (&ta, &a3),
    ] {
        let r = c.get(&u, &format!("/v1/threads/{t}/messages/{m}")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (500, "message_unreadable"),
            "{t}/{m}"
        );
        assert!(!String::from_utf8_lossy(&r.body).contains("first of a"));
    }
    // The original still reads.
    let r = c.get(&u, &format!("/v1/threads/{ta}/messages/{a1}")).await;
    assert_eq!(r.json()["body"], "first of a");

    // In a page, the bad items are marked and the good ones are intact.
    let page = c.all_messages(&u, &ta, "asc", 10).await;
    assert_eq!(page.len(), 4);
    assert_eq!(
        page[0],
        json!({"id": forged, "thread_id": ta, "error": {"code": "message_unreadable"}})
    );
    assert_eq!(page[1]["body"], "first of a");
    assert_eq!(
        page[2],
        json!({"id": a2, "thread_id": ta, "error": {"code": "message_unreadable"}})
    );
    assert_eq!(page[3]["error"]["code"], "message_unreadable");
    assert!(page[3].get("body").is_none());
    let page = c.all_messages(&u, &tb, "desc", 10).await;
    assert_eq!(
        page,
        vec![json!({"id": b1, "thread_id": tb, "error": {"code": "message_unreadable"}})]
    );

    // A record that is not even JSON is unreadable too.
    store
        .write(RawPut {
            key: key(&ta, &a1),
            value: b"garbage".to_vec(),
        })
        .await
        .unwrap();
    let r = c.get(&u, &format!("/v1/threads/{ta}/messages/{a1}")).await;
    assert_eq!(r.code(), "message_unreadable");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_thread_removes_every_key_and_its_wrapped_dek() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let keep = c.create_thread(&u, "keep").await;
    let gone = c.create_thread(&u, "gone").await;
    for i in 0..10 {
        c.post_message(&u, &keep, json!(i)).await;
        c.post_message(&u, &gone, json!(i)).await;
    }
    let r = c
        .call(&u, "DELETE", &format!("/v1/threads/{gone}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert!(s
        .app
        .store()
        .raw_get(format!("thread:{gone}:meta").into_bytes())
        .await
        .unwrap()
        .is_none());
    let page = s
        .app
        .store()
        .list_messages(
            &kms_api::ThreadId::parse(&gone).unwrap(),
            progressdb::store::Order::Asc,
            None,
            100,
        )
        .await
        .unwrap();
    assert!(page.items.is_empty());
    assert_eq!(c.all_messages(&u, &keep, "asc", 100).await.len(), 10);
    let r = c.get(&u, "/v1/threads").await;
    assert_eq!(r.json()["threads"].as_array().unwrap().len(), 1);
    // The thread record held the wrapped DEK: it went with it.
    let r = c
        .get(&Caller::admin(), &format!("/admin/threads/{gone}/kms"))
        .await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_fallback_reads_embedded_threads_while_the_kms_is_down() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "dev thread").await;
    let m = c.post_message(&u, &t, json!("readable offline")).await;
    s.stop().await;

    // External mode, KMS unreachable, dev master key configured: reads fall back locally.
    let endpoint = format!("unix://{}", env.path().join("no-kms.sock").display());
    let s = InProc::start(&env.config(
        &Kms::External {
            endpoint: endpoint.clone(),
            master_key: true,
        },
        "",
    ))
    .await;
    let c = Client::new(s.addr);
    let r = c.get(&u, &format!("/v1/threads/{t}/messages/{m}")).await;
    assert_eq!(
        (r.status, r.json()["body"].clone()),
        (200, json!("readable offline"))
    );
    assert_eq!(
        c.all_messages(&u, &t, "asc", 10).await[0]["body"],
        "readable offline"
    );
    // Writes still need the KMS.
    let r = c
        .post(&u, &format!("/v1/threads/{t}/messages"), json!({"body": 1}))
        .await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    let r = c.post(&u, "/v1/threads", json!({"title": "new"})).await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    let r = c.get(&Caller::anonymous(), "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["kms"], "unavailable");
    s.stop().await;

    // Without the master key, the same read is a 503.
    let s = InProc::start(&env.config(
        &Kms::External {
            endpoint,
            master_key: false,
        },
        "",
    ))
    .await;
    let c = Client::new(s.addr);
    let r = c.get(&u, &format!("/v1/threads/{t}/messages/{m}")).await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    s.stop().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A role or reply planted on disk is refused: on a record whose format binds them, the
/// ciphertext no longer opens; on an older record, whose AAD never covered them, the record
/// is refused whole, and an edit or a rotation does not launder it into a valid one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_role_or_reply_is_refused_never_shown() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "a").await;
    let m1 = c.post_message(&u, &t, json!("plain question")).await;
    let r = c
        .post(
            &u,
            &format!("/v1/threads/{t}/messages"),
            json!({"body": "answer", "role": "assistant"}),
        )
        .await;
    let m2 = r.json()["id"].as_str().unwrap().to_owned();
    let store = s.app.store();
    async fn edit(
        store: &progressdb::store::Store,
        t: &str,
        m: &str,
        f: impl Fn(&mut serde_json::Value),
    ) {
        let k = format!("thread:{t}:msg:{m}").into_bytes();
        let mut v: serde_json::Value =
            serde_json::from_slice(&store.raw_get(k.clone()).await.unwrap().unwrap()).unwrap();
        f(&mut v);
        store
            .write(RawPut {
                key: k,
                value: serde_json::to_vec(&v).unwrap(),
            })
            .await
            .unwrap();
    }
    // A role added to a current record, and a role changed.
    edit(store, &t, &m1, |v| v["role"] = json!("system")).await;
    edit(store, &t, &m2, |v| v["role"] = json!("user")).await;
    for m in [&m1, &m2] {
        let r = c.get(&u, &format!("/v1/threads/{t}/messages/{m}")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (500, "message_unreadable"),
            "{m}"
        );
    }
    // A role on a record of the format before roles existed: refused, and not re-sealed by
    // an edit.
    edit(store, &t, &m2, |v| {
        v["role"] = json!("assistant");
        v["v"] = json!(3);
    })
    .await;
    let r = c.get(&u, &format!("/v1/threads/{t}/messages/{m2}")).await;
    assert_eq!((r.status, r.code().as_str()), (500, "message_unreadable"));
    let r = c
        .call(
            &u,
            "PUT",
            &format!("/v1/threads/{t}/messages/{m2}"),
            Some(json!({"body": "laundered"})),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (500, "message_unreadable"));
    let r = c.get(&u, &format!("/v1/threads/{t}/messages")).await.json();
    assert_eq!(
        r["messages"][1]["error"]["code"], "message_unreadable",
        "{r}"
    );
    s.stop().await;
}

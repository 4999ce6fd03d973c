//! The external provider against a stand-in KMS on a Unix socket (the real `progressdb-kms`
//! with SoftHSM is covered by the workspace's end-to-end tests): round trip, coalescing into
//! batch calls, one batch call per page, crypto-shredding, KMS outages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/fake_kms.rs"]
mod fake_kms;

use std::sync::Arc;

use common::{Caller, Client, InProc, Kms, TestEnv};
use fake_kms::{FakeKms, State};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_coalescing_and_one_batch_per_page() {
    let env = TestEnv::new();
    let state = Arc::new(State::default());
    let mut kms = FakeKms::start(&env.path().join("kms.sock"), state.clone());
    let s = InProc::start(&env.config(
        &Kms::External {
            endpoint: kms.endpoint(),
            master_key: false,
        },
        "",
    ))
    .await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let r = c.get(&Caller::anonymous(), "/readyz").await;
    assert_eq!(
        r.json(),
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "ready": true, "store": "ok", "kms": "ok"})
    );

    let t = c.create_thread(&u, "t").await;
    assert_eq!(state.calls("/create_dek_for_thread"), 1);
    let r = c
        .get(&Caller::admin(), &format!("/admin/threads/{t}/kms"))
        .await;
    assert_eq!(r.json()["kek_id"], "test-kek");

    let n = 120;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, u, t) = (c, u.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            c.post_message(&u, &t, json!({"i": i})).await
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let enc_calls = state.calls("/encrypt_batch") + state.calls("/encrypt");
    assert!(
        enc_calls < n,
        "{n} concurrent posts took {enc_calls} KMS calls"
    );
    // The posts, and the thread's title and metadata sealed when it was created.
    assert_eq!(
        state.batch_sizes.lock().unwrap().iter().sum::<usize>(),
        n + 1
    );

    let before = state.calls("/decrypt_batch");
    let r = c
        .get(&u, &format!("/v1/threads/{t}/messages?limit=100"))
        .await;
    assert_eq!(r.status, 200);
    let page = r.json()["messages"].as_array().unwrap().clone();
    assert_eq!(page.len(), 100);
    assert!(page.iter().all(|m| m.get("body").is_some()));
    assert_eq!(
        state.calls("/decrypt_batch"),
        before + 1,
        "a page must be one batch call"
    );
    assert_eq!(state.calls("/decrypt"), 0);

    // Single reads are coalesced too and round-trip.
    let mid = page[7]["id"].as_str().unwrap();
    let r = c.get(&u, &format!("/v1/threads/{t}/messages/{mid}")).await;
    assert_eq!(r.json()["body"], page[7]["body"]);

    // Delete destroys the DEK in the KMS, then the data.
    let key_id = c
        .get(&Caller::admin(), &format!("/admin/threads/{t}/kms"))
        .await
        .json()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = c
        .call(&u, "DELETE", &format!("/v1/threads/{t}"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(*state.destroyed.lock().unwrap(), vec![key_id]);

    // A thread whose DEK the KMS has never heard of (a forged key id, or the wrong KMS) is not
    // "shredded" by deleting its record: the delete is refused and the thread kept.
    let t2 = c.create_thread(&u, "t2").await;
    let tid = kms_api::ThreadId::parse(&t2).unwrap();
    let meta_key = progressdb::store::keys::meta(&tid);
    let mut meta: serde_json::Value = serde_json::from_slice(
        &s.app
            .store()
            .raw_get(meta_key.clone())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    meta["kms"]["key_id"] = json!("dek_0123456789abcdef0123456789abcdef");
    s.app
        .store()
        .write(progressdb::store::RawPut {
            key: meta_key,
            value: serde_json::to_vec(&meta).unwrap(),
        })
        .await
        .unwrap();
    s.app.cache().invalidate(&tid);
    let r = c
        .call(&u, "DELETE", &format!("/v1/threads/{t2}"), None)
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (500, "shred_failed"),
        "{:?}",
        r.json()
    );
    // The thread is kept; its sealed title names the real key, which the forged record no
    // longer has, so it is not shown either.
    assert!(s.app.store().get_thread(&tid).await.unwrap().is_some());
    let r = c.get(&u, &format!("/v1/threads/{t2}")).await;
    assert_eq!((r.status, r.code().as_str()), (500, "message_unreadable"));
    s.stop().await;
    kms.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_down_gives_503_stores_nothing_and_recovers() {
    let env = TestEnv::new();
    let state = Arc::new(State::default());
    let sock = env.path().join("kms.sock");
    let mut kms = FakeKms::start(&sock, state.clone());
    let s = InProc::start(&env.config(
        &Kms::External {
            endpoint: kms.endpoint(),
            master_key: false,
        },
        "",
    ))
    .await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = c.create_thread(&u, "t").await;
    let m = c.post_message(&u, &t, json!("before the outage")).await;

    kms.stop().await;
    let r = c.post(&u, "/v1/threads", json!({"title": "during"})).await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    assert!(
        !String::from_utf8_lossy(&r.body).contains("sock"),
        "5xx body leaks detail"
    );
    let r = c
        .post(
            &u,
            &format!("/v1/threads/{t}/messages"),
            json!({"body": "during"}),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    let r = c.get(&u, &format!("/v1/threads/{t}/messages")).await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    let r = c
        .call(&u, "DELETE", &format!("/v1/threads/{t}"), None)
        .await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    let r = c.get(&Caller::anonymous(), "/readyz").await;
    assert_eq!(
        (r.status, r.json()["kms"].clone()),
        (503, json!("unavailable"))
    );
    // Listing threads opens their sealed titles: that needs the KMS too.
    let r = c.get(&u, "/v1/threads").await;
    assert_eq!((r.status, r.code().as_str()), (503, "kms_unavailable"));
    // Nothing was stored: one thread, one message.
    let threads = s
        .app
        .store()
        .list_threads(progressdb::store::ThreadFilter::All, None, 10)
        .await
        .unwrap();
    assert_eq!(threads.items.len(), 1);
    let page = s
        .app
        .store()
        .list_messages(
            &kms_api::ThreadId::parse(&t).unwrap(),
            progressdb::store::Order::Asc,
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);

    // The KMS comes back: the server recovers by itself.
    let kms2 = FakeKms::start(&sock, state.clone());
    let r = c.get(&Caller::anonymous(), "/readyz").await;
    assert_eq!(r.status, 200);
    let t2 = c.create_thread(&u, "after").await;
    c.post_message(&u, &t2, json!("after the outage")).await;
    let all = c.all_messages(&u, &t, "asc", 10).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["id"], m.as_str());
    assert_eq!(all[0]["body"], "before the outage");
    s.stop().await;
    let mut kms2 = kms2;
    kms2.stop().await;
}

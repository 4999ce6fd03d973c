//! Stored ciphertext is bound to its place: with the real KMS and SoftHSM, a message value
//! copied onto another message or into another thread is reported unreadable, never served as
//! the wrong content.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use progressdb::store::RawPut;
use progressdb_e2e::Role;
use serde_json::json;

#[test]
fn moved_ciphertext_is_refused_with_the_real_kms() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Frontend, "alice");
    let ta = alice.create_thread("a")["id"].as_str().unwrap().to_owned();
    let tb = alice.create_thread("b")["id"].as_str().unwrap().to_owned();
    let id = |v: serde_json::Value| v["id"].as_str().unwrap().to_owned();
    let a1 = id(alice.post_message(&ta, json!("secret of a1")));
    let a2 = id(alice.post_message(&ta, json!("secret of a2")));
    let b1 = id(alice.post_message(&tb, json!("secret of b1")));

    assert!(server.proc.sigterm().success());
    let key = |t: &str, m: &str| format!("thread:{t}:msg:{m}").into_bytes();
    server.with_store(|store, rt| {
        let v = rt
            .block_on(store.raw_get(key(&ta, &a1)))
            .unwrap()
            .expect("a1 stored");
        rt.block_on(store.write(RawPut {
            key: key(&ta, &a2),
            value: v.clone(),
        }))
        .unwrap();
        rt.block_on(store.write(RawPut {
            key: key(&tb, &b1),
            value: v,
        }))
        .unwrap();
    });
    server.restart();

    for (t, m) in [(&ta, &a2), (&tb, &b1)] {
        let (s, v) = alice.call("GET", &format!("/v1/threads/{t}/messages/{m}"), None);
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (500, Some("message_unreadable")),
            "{v}"
        );
        assert!(
            !v.to_string().contains("secret of a1"),
            "moved content was served: {v}"
        );
    }
    let page = alice.all_messages(&ta);
    assert_eq!(page[0]["body"], "secret of a1");
    assert_eq!(page[1]["error"]["code"], "message_unreadable");
    assert!(page[1].get("body").is_none());
    drop(kms);
}

/// A disk writer names a retiring key the KMS never made in the thread's `rotation`: a delete
/// used to take the KMS's "unknown key" as destroyed and drop the thread, leaving the real
/// retiring DEK (had the writer removed it) alive. Now it is a shred failure and the thread
/// stays.
#[test]
fn a_forged_retiring_key_is_a_shred_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hsm, _kms, mut server) = progressdb_e2e::system(tmp.path());
    let alice = server.as_role(Role::Frontend, "alice");
    let t = alice.create_thread("a")["id"].as_str().unwrap().to_owned();
    alice.post_message(&t, json!("secret"));
    assert!(server.proc.sigterm().success());
    let meta_key = format!("thread:{t}:meta").into_bytes();
    server.with_store(|store, rt| {
        let raw = rt
            .block_on(store.raw_get(meta_key.clone()))
            .unwrap()
            .unwrap();
        let mut meta: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        let mut forged = meta["kms"].clone();
        forged["key_id"] = json!(kms_api::KeyId::from_random([9; 16]).as_str());
        meta["rotation"] = json!({
            "job": kms_api::admin::JobId::from_random([7; 8]).as_str(),
            "start": "00000000000000000000-000000",
            "retiring": forged,
        });
        rt.block_on(store.write(RawPut {
            key: meta_key.clone(),
            value: serde_json::to_vec(&meta).unwrap(),
        }))
        .unwrap();
    });
    server.restart();
    let (s, v) = alice.call("DELETE", &format!("/v1/threads/{t}"), None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (500, Some("shred_failed")),
        "{v}"
    );
    let (s, _) = alice.call("GET", &format!("/v1/threads/{t}"), None);
    assert_eq!(s, 200, "the thread is kept");
}

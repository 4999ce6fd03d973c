//! Big bodies and big pages through the real KMS (external provider over its Unix socket): every
//! batch the server sends must fit under the KMS's body limit, however large the messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use progressdb_e2e::{Kms, KmsListen, Provider, Role, Server, SoftHsm};
use serde_json::json;

/// Posts `n` messages of `size` bytes to `tid`, then reads them back as one page and checks
/// every body came back, in order.
fn post_then_read_in_pages(api: &progressdb_e2e::Api, tid: &str, n: usize, size: usize) {
    let mut sent = Vec::new();
    for i in 0..n {
        let body = text(size, i);
        api.post_message(tid, json!(body));
        sent.push(body);
    }
    // Asked for all of them at once, the server answers pages of at most
    // `limits.max_page_bytes` (4 MiB) of stored messages, each with the cursor to the next.
    let mut got: Vec<String> = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, v) = api.call(
            "GET",
            &format!("/v1/threads/{tid}/messages?limit={n}&cursor={cursor}"),
            None,
        );
        assert_eq!(s, 200, "{}", &v.to_string()[..v.to_string().len().min(300)]);
        let items = v["messages"].as_array().unwrap();
        let page_bytes: usize = items
            .iter()
            .map(|m| m["body"].as_str().expect("every item readable").len())
            .sum();
        assert!(page_bytes <= 4 << 20, "a page of {page_bytes} bytes");
        got.extend(items.iter().map(|m| m["body"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(got, sent);
}

/// A JSON string body of about `n` bytes (random, so it does not compress into anything).
fn text(n: usize, tag: usize) -> String {
    let mut s = format!("m{tag}-");
    while s.len() < n {
        s.push_str(&progressdb_e2e::random_hex(32));
    }
    s.truncate(n);
    s
}

#[test]
fn pages_of_large_messages_and_concurrent_large_posts_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(tmp.path());
    let kms = Kms::start(tmp.path(), &hsm, KmsListen::Unix, None);
    let provider = Provider::External {
        endpoint: kms.endpoint.clone(),
        tls: None,
    };
    let server = Server::start(tmp.path(), "progressdb", &provider, true);
    let alice = server.as_role(Role::Backend, "alice");
    let t = alice.create_thread("large");
    let tid = t["id"].as_str().unwrap().to_owned();

    // 50 messages of 64 KiB: one page of them is about 4.3 MiB of base64 ciphertext, over the
    // KMS's default 4 MiB body limit if sent as one batch.
    post_then_read_in_pages(&alice, &tid, 50, 64 * 1024);

    // 24 concurrent posts of about 240 KB each (under the server's 256 KiB body limit): they
    // are coalesced into batches, which must be split to fit.
    let t2 = alice.create_thread("concurrent");
    let tid2 = t2["id"].as_str().unwrap().to_owned();
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let api = server.as_role(Role::Backend, "alice");
            let tid2 = tid2.clone();
            std::thread::spawn(move || {
                let (s, v) = api.call(
                    "POST",
                    &format!("/v1/threads/{tid2}/messages"),
                    Some(json!({ "body": text(240_000, i) })),
                );
                (s, v["error"].clone())
            })
        })
        .collect();
    for h in handles {
        let (s, e) = h.join().unwrap();
        assert_eq!(s, 201, "{e}");
    }
    let all = alice.all_messages(&tid2);
    assert_eq!(all.len(), 24);
    assert!(all
        .iter()
        .all(|m| m["body"].as_str().map(str::len) == Some(240_000)));
    std::thread::sleep(Duration::from_millis(10));
    assert!(
        !server.proc.log_text().contains("answering 500"),
        "no internal errors"
    );
    drop(kms);
}

#[test]
fn a_kms_with_a_smaller_body_limit_than_the_servers_batches_still_serves_large_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(tmp.path());
    // The KMS refuses bodies over 1 MiB; the server's batches are cut at 3 MiB by default, so
    // a page of 20 x 64 KiB (about 1.7 MiB of base64) is refused with 413 and must be split.
    let kms = Kms::start_with(
        tmp.path(),
        &hsm,
        KmsListen::Unix,
        None,
        "[limits]\nmax_body_bytes = 1048576\n",
    );
    let provider = Provider::External {
        endpoint: kms.endpoint.clone(),
        tls: None,
    };
    let server = Server::start(tmp.path(), "progressdb", &provider, true);
    let alice = server.as_role(Role::Backend, "alice");
    let tid = alice.create_thread("split")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    post_then_read_in_pages(&alice, &tid, 20, 64 * 1024);
    assert!(
        server.proc.log_text().contains("splitting it"),
        "the 413 was answered by splitting the batch"
    );
}

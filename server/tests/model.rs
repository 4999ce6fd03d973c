//! Pagination equals a model: random operation sequences (seeded) against the server, with a
//! sorted map as the reference. Cursors are also continued after mutations.
#![cfg(feature = "dev-embedded")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{Caller, Client, InProc, Kms, TestEnv};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{json, Value};

/// One page as (ids, bodies) and its cursor.
async fn page(
    c: &Client,
    who: &Caller,
    t: &str,
    order: &str,
    limit: usize,
    cursor: Option<&str>,
) -> (Vec<(String, Value)>, Option<String>) {
    let mut path = format!("/v1/threads/{t}/messages?order={order}&limit={limit}");
    if let Some(cur) = cursor {
        path.push_str(&format!("&cursor={cur}"));
    }
    let r = c.get(who, &path).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let j = r.json();
    let items = j["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_owned(), m["body"].clone()))
        .collect();
    (items, j["next_cursor"].as_str().map(str::to_owned))
}

/// The model's items strictly after `cursor` in `order`.
fn model_after(
    model: &BTreeMap<String, Value>,
    order: &str,
    cursor: Option<&str>,
) -> Vec<(String, Value)> {
    let all: Vec<(String, Value)> = match order {
        "asc" => model.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => model
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    all.into_iter()
        .filter(|(k, _)| match (cursor, order) {
            (None, _) => true,
            (Some(c), "asc") => k.as_str() > c,
            (Some(c), _) => k.as_str() < c,
        })
        .collect()
}

/// Which store the server keeps its messages in: the same model holds for both.
#[derive(Clone, Copy)]
enum Backend {
    Lmdb,
    Postgres,
}

/// The server's config: LMDB in the env's directory, or a database of its own on the shared
/// test cluster.
fn config(env: &TestEnv, backend: Backend) -> std::path::PathBuf {
    let p = env.config(&Kms::Embedded, "");
    if let Backend::Postgres = backend {
        let url = testkit::pg::PgCluster::shared().new_database();
        let text = std::fs::read_to_string(&p).unwrap().replace(
            &format!("path = \"{}\"", env.store_path().display()),
            &format!("backend = \"postgres\"\nurl = \"{url}\""),
        );
        assert!(text.contains("postgres"));
        std::fs::write(&p, text).unwrap();
    }
    p
}

/// `test` as `test::lmdb` and `test::postgres`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lmdb() {
                super::$test(super::Backend::Lmdb).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(super::Backend::Postgres).await;
            }
        }
    )*};
}

on_both_backends!(
    message_pages_equal_a_sorted_map,
    thread_pages_equal_a_sorted_map
);

async fn message_pages_equal_a_sorted_map(backend: Backend) {
    let env = TestEnv::new();
    let s = InProc::start(&config(&env, backend)).await;
    let c = Client::new(s.addr);
    let who = Caller::frontend("modeler");
    let t = c.create_thread(&who, "model").await;
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let mut model: BTreeMap<String, Value> = BTreeMap::new();

    for step in 0..300 {
        match rng.gen_range(0..10) {
            0..=4 => {
                let body = json!({"step": step, "r": rng.gen::<u32>()});
                let id = c.post_message(&who, &t, body.clone()).await;
                // New ids sort after every existing one.
                assert!(model.keys().all(|k| k < &id));
                model.insert(id, body);
            }
            5 if !model.is_empty() => {
                let k = model
                    .keys()
                    .nth(rng.gen_range(0..model.len()))
                    .unwrap()
                    .clone();
                let r = c
                    .call(
                        &who,
                        "DELETE",
                        &format!("/v1/threads/{t}/messages/{k}"),
                        None,
                    )
                    .await;
                assert_eq!(r.status, 200);
                model.remove(&k);
            }
            6 if !model.is_empty() => {
                let k = model
                    .keys()
                    .nth(rng.gen_range(0..model.len()))
                    .unwrap()
                    .clone();
                let body = json!(format!("edit {step}"));
                let r = c
                    .call(
                        &who,
                        "PUT",
                        &format!("/v1/threads/{t}/messages/{k}"),
                        Some(json!({"body": body})),
                    )
                    .await;
                assert_eq!(r.status, 200);
                model.insert(k, body);
            }
            7 => {
                // A full traversal with a random page size and order.
                let order = if rng.gen_bool(0.5) { "asc" } else { "desc" };
                let limit = rng.gen_range(1..8);
                let mut got = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let (items, next) = page(&c, &who, &t, order, limit, cursor.as_deref()).await;
                    assert!(items.len() <= limit);
                    if next.is_some() {
                        assert_eq!(items.len(), limit);
                    }
                    got.extend(items);
                    match next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
                assert_eq!(
                    got,
                    model_after(&model, order, None),
                    "step {step} {order} {limit}"
                );
            }
            _ => {
                // One page, a mutation, then the next page from the cursor reflects the
                // current state after the cursor.
                let order = if rng.gen_bool(0.5) { "asc" } else { "desc" };
                let limit = rng.gen_range(1..5);
                let (first, next) = page(&c, &who, &t, order, limit, None).await;
                assert_eq!(
                    first,
                    model_after(&model, order, None)
                        .into_iter()
                        .take(limit)
                        .collect::<Vec<_>>()
                );
                let Some(cursor) = next else { continue };
                if rng.gen_bool(0.5) {
                    let body = json!({"mid-page": step});
                    let id = c.post_message(&who, &t, body.clone()).await;
                    model.insert(id, body);
                } else if let Some(k) = model.keys().next_back().cloned() {
                    let r = c
                        .call(
                            &who,
                            "DELETE",
                            &format!("/v1/threads/{t}/messages/{k}"),
                            None,
                        )
                        .await;
                    assert_eq!(r.status, 200);
                    model.remove(&k);
                }
                let (second, _) = page(&c, &who, &t, order, limit, Some(&cursor)).await;
                let expect: Vec<_> = model_after(&model, order, Some(&cursor))
                    .into_iter()
                    .take(limit)
                    .collect();
                assert_eq!(second, expect, "step {step} after cursor {cursor}");
            }
        }
    }
    s.stop().await;
}

async fn thread_pages_equal_a_sorted_map(backend: Backend) {
    let env = TestEnv::new();
    let s = InProc::start(&config(&env, backend)).await;
    let c = Client::new(s.addr);
    let users = ["ann", "ben", "cid"];
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    // thread id -> (author, title)
    let mut model: BTreeMap<String, (String, String)> = BTreeMap::new();

    async fn traverse(c: &Client, who: &Caller, limit: usize) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/threads?limit={limit}");
            if let Some(cur) = &cursor {
                path.push_str(&format!("&cursor={cur}"));
            }
            let r = c.get(who, &path).await;
            assert_eq!(r.status, 200);
            let j = r.json();
            let items = j["threads"].as_array().unwrap();
            assert!(items.len() <= limit);
            for t in items {
                out.push((
                    t["id"].as_str().unwrap().to_owned(),
                    t["author"].as_str().unwrap().to_owned(),
                    t["title"].as_str().unwrap().to_owned(),
                ));
            }
            match j["next_cursor"].as_str() {
                Some(n) => cursor = Some(n.to_owned()),
                None => return out,
            }
        }
    }

    for step in 0..150 {
        match rng.gen_range(0..6) {
            0..=2 => {
                let u = users[rng.gen_range(0..users.len())];
                let title = format!("t{step}");
                let id = c.create_thread(&Caller::frontend(u), &title).await;
                model.insert(id, (u.to_owned(), title));
            }
            3 if !model.is_empty() => {
                let k = model
                    .keys()
                    .nth(rng.gen_range(0..model.len()))
                    .unwrap()
                    .clone();
                let author = model[&k].0.clone();
                let r = c
                    .call(
                        &Caller::frontend(&author),
                        "DELETE",
                        &format!("/v1/threads/{k}"),
                        None,
                    )
                    .await;
                assert_eq!(r.status, 200);
                model.remove(&k);
            }
            4 if !model.is_empty() => {
                let k = model
                    .keys()
                    .nth(rng.gen_range(0..model.len()))
                    .unwrap()
                    .clone();
                let title = format!("renamed {step}");
                let r = c
                    .call(
                        &Caller::admin(),
                        "PATCH",
                        &format!("/v1/threads/{k}"),
                        Some(json!({"title": title})),
                    )
                    .await;
                assert_eq!(r.status, 200);
                model.get_mut(&k).unwrap().1 = title;
            }
            _ => {
                let limit = rng.gen_range(1..6);
                // Everything, for an admin without a user.
                let expect: Vec<_> = model
                    .iter()
                    .map(|(k, (a, t))| (k.clone(), a.clone(), t.clone()))
                    .collect();
                assert_eq!(
                    traverse(&c, &Caller::admin(), limit).await,
                    expect,
                    "step {step}"
                );
                // Each user's own, for frontends.
                for u in users {
                    let expect: Vec<_> = model
                        .iter()
                        .filter(|(_, (a, _))| a == u)
                        .map(|(k, (a, t))| (k.clone(), a.clone(), t.clone()))
                        .collect();
                    assert_eq!(
                        traverse(&c, &Caller::frontend(u), limit).await,
                        expect,
                        "step {step} {u}"
                    );
                }
            }
        }
    }
    s.stop().await;
}

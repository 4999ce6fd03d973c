//! ProgressDB's public API (`/frontend/v1`, `/backend/v1/sign`, `/admin/health|stats`) over a
//! real TCP socket and real LMDB files, with the embedded provider: shapes, status codes,
//! paging in both directions, the callers' rules and isolation between users, errors, CORS.
//! The published Python SDK is driven against the real binaries in
//! `tests/tests/e2e_progressdb_sdk.rs`.
#![cfg(feature = "dev-embedded")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{raw, sign, Caller, Client, InProc, Kms, TestEnv, ADMIN, BACKEND, FRONTEND};
use serde_json::{json, Value};

const THREADS: &str = "/frontend/v1/threads";

/// A ProgressDB error: `{"error": "<message>", "code": "<code>"}`.
fn pdb_error(r: &common::Resp) -> (u16, String) {
    let j = r.json();
    assert!(j["error"].is_string(), "error is not a string: {j}");
    (r.status, j["code"].as_str().unwrap_or("").to_owned())
}

/// A caller sending its key as ProgressDB's TypeScript SDK does (`X-API-Key`).
fn api_key_headers(key: &str, user: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![("x-api-key", key.to_owned())];
    if let Some(u) = user {
        h.push(("x-user-id", u.to_owned()));
    }
    h
}

async fn create_thread(c: &Client, who: &Caller, title: &str) -> String {
    let r = c.post(who, THREADS, json!({ "title": title })).await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    r.json()["key"].as_str().unwrap().to_owned()
}

async fn create_message(c: &Client, who: &Caller, thread: &str, body: Value) -> String {
    let r = c
        .post(
            who,
            &format!("{THREADS}/{thread}/messages"),
            json!({ "body": body }),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    r.json()["key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_and_messages_in_progressdb_shapes() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let alice = Caller::backend_as("alice");

    // Create: 202 with the key the SDKs read, and the stored thread.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let r = c.post(&alice, THREADS, json!({"title": "General"})).await;
    assert_eq!(r.status, 202);
    let j = r.json();
    let key = j["key"].as_str().unwrap().to_owned();
    let t = &j["thread"];
    assert_eq!(t["key"], key.as_str());
    assert_eq!(
        (t["title"].as_str(), t["author"].as_str()),
        (Some("General"), Some("alice"))
    );
    let created = t["created_ts"].as_u64().unwrap();
    assert!(
        created >= before && created < before + 60_000_000_000,
        "{created} ns"
    );
    assert_eq!(t["updated_ts"].as_u64(), Some(created));
    assert!(
        t.get("kms").is_none(),
        "kms shown to a non-admin caller: {t}"
    );

    // Read at once (the write was durable before the answer).
    let r = c.get(&alice, &format!("{THREADS}/{key}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["thread"]["title"], "General");

    // Update: 200 with the thread as stored.
    let r = c
        .call(
            &alice,
            "PUT",
            &format!("{THREADS}/{key}"),
            Some(json!({"title": "Renamed"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["thread"]["title"], "Renamed");
    assert!(r.json()["thread"]["updated_ts"].as_u64().unwrap() >= created);
    assert_eq!(
        c.get(&alice, &format!("{THREADS}/{key}")).await.json()["thread"]["title"],
        "Renamed"
    );

    // Messages: any JSON body, 202 with the key; read back decrypted.
    let r = c
        .post(
            &alice,
            &format!("{THREADS}/{key}/messages"),
            json!({"body": {"text": "hi"}}),
        )
        .await;
    assert_eq!(r.status, 202);
    let m = r.json();
    let mkey = m["key"].as_str().unwrap().to_owned();
    assert_eq!(m["message"]["key"], mkey.as_str());
    assert_eq!(m["message"]["thread"], key.as_str());
    assert_eq!(m["message"]["author"], "alice");
    assert_eq!(m["message"]["body"], json!({"text": "hi"}));
    assert!(m["message"]["created_ts"].as_u64().unwrap() >= created);
    let r = c
        .get(&alice, &format!("{THREADS}/{key}/messages/{mkey}"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["message"]["body"], json!({"text": "hi"}));
    // A key percent-encoded as the SDKs send it (`quote(key, safe='')`) is the same key.
    let r = c
        .get(
            &alice,
            &format!("{THREADS}/{key}/messages/{}", mkey.replace('-', "%2D")),
        )
        .await;
    assert_eq!(r.status, 200);

    let r = c
        .call(
            &alice,
            "PUT",
            &format!("{THREADS}/{key}/messages/{mkey}"),
            Some(json!({"body": "edited"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["message"]["body"], "edited");
    let list = c
        .get(&alice, &format!("{THREADS}/{key}/messages"))
        .await
        .json();
    assert_eq!(list["thread"], key.as_str());
    assert_eq!(list["messages"][0]["body"], "edited");

    // ProgressDB's benchmark client's payload: its `id` and extra fields are ignored.
    let r = c
        .post(
            &alice,
            &format!("{THREADS}/{key}/messages"),
            json!({"id": "msg-1-abc", "content": "xyz", "checksum": "00", "body": {}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    assert_ne!(r.json()["key"], "msg-1-abc");
    assert_eq!(r.json()["message"]["body"], json!({}));

    // Deletes: 204 with no body; gone afterwards.
    let r = c
        .call(
            &alice,
            "DELETE",
            &format!("{THREADS}/{key}/messages/{mkey}"),
            None,
        )
        .await;
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = c
        .get(&alice, &format!("{THREADS}/{key}/messages/{mkey}"))
        .await;
    assert_eq!(pdb_error(&r), (404, "not_found".into()));
    let r = c
        .call(&alice, "DELETE", &format!("{THREADS}/{key}"), None)
        .await;
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = c.get(&alice, &format!("{THREADS}/{key}")).await;
    assert_eq!(pdb_error(&r), (404, "not_found".into()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_follow_progressdb_rules() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);

    // The key in X-API-Key, as the TypeScript SDK sends it.
    let r = raw(
        s.addr,
        "POST",
        THREADS,
        &api_key_headers(BACKEND, Some("alice")),
        Some(br#"{"title":"via x-api-key"}"#.to_vec()),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let key = r.json()["key"].as_str().unwrap().to_owned();

    // A backend key names one user, by header or `?author=`.
    let r = c.get(&Caller::backend(), THREADS).await;
    assert_eq!(pdb_error(&r), (400, "invalid_argument".into()));
    let r = c
        .get(&Caller::backend(), &format!("{THREADS}?author=alice"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["threads"][0]["key"], key.as_str());

    // A signed frontend user sees its own; `author` may only repeat its id.
    let r = c.get(&Caller::frontend("alice"), THREADS).await;
    assert_eq!(r.json()["threads"][0]["key"], key.as_str());
    let r = c
        .get(
            &Caller::frontend("alice"),
            &format!("{THREADS}?author=alice"),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c
        .get(&Caller::frontend("bob"), &format!("{THREADS}?author=alice"))
        .await;
    assert_eq!(pdb_error(&r), (403, "forbidden".into()));
    let mut forged = Caller::frontend("bob");
    forged.user = Some("alice".into());
    assert_eq!(
        pdb_error(&c.get(&forged, THREADS).await),
        (401, "unauthorized".into())
    );
    assert_eq!(
        pdb_error(&c.get(&Caller::anonymous(), THREADS).await),
        (401, "unauthorized".into())
    );

    // Admin keys serve /admin only; signing is for backend keys.
    assert_eq!(
        pdb_error(&c.get(&Caller::admin_as("alice"), THREADS).await),
        (403, "forbidden".into())
    );
    let r = c
        .post(
            &Caller::backend(),
            "/backend/v1/sign",
            json!({"userId": "carol"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"userId": "carol", "signature": sign("carol")})
    );
    for who in [Caller::admin(), Caller::frontend("carol")] {
        let r = c
            .post(&who, "/backend/v1/sign", json!({"userId": "carol"}))
            .await;
        assert_eq!(pdb_error(&r), (403, "forbidden".into()));
    }
    // The signature it gives is one a frontend caller can use.
    let r = raw(
        s.addr,
        "GET",
        THREADS,
        &[
            ("x-api-key", FRONTEND.to_owned()),
            ("x-user-id", "carol".into()),
            ("x-user-signature", sign("carol")),
        ],
        None,
    )
    .await;
    assert_eq!((r.status, r.json()["threads"].clone()), (200, json!([])));

    // Admin reads.
    let r = c.get(&Caller::admin(), "/admin/health").await;
    assert_eq!(r.json(), json!({"status": "ok", "service": "progressdb"}));
    create_message(&c, &Caller::backend_as("alice"), &key, json!(1)).await;
    let r = c.get(&Caller::admin(), "/admin/stats").await;
    assert_eq!(r.json(), json!({"threads": 1, "messages": 1}));
    for who in [Caller::backend(), Caller::frontend("alice")] {
        assert_eq!(
            pdb_error(&c.get(&who, "/admin/stats").await),
            (403, "forbidden".into())
        );
    }
    let r = raw(
        s.addr,
        "GET",
        "/admin/health",
        &api_key_headers(ADMIN, None),
        None,
    )
    .await;
    assert_eq!(r.status, 200);

    // The longest non-ASCII id accepted: its store keys fit (a thread, a revocation); one
    // character more is refused as a bad id, never a failed write.
    let long = "%E7%94%A8".repeat(35);
    let r = c
        .post(
            &Caller::backend(),
            &format!("{THREADS}?author={long}"),
            json!({"title": "t"}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let r = c
        .post(
            &Caller::backend(),
            &format!("/v1/users/{long}/revoke-signatures"),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = c
        .post(
            &Caller::backend(),
            &format!("{THREADS}?author={long}%E7%94%A8"),
            json!({"title": "t"}),
        )
        .await;
    assert_eq!(pdb_error(&r), (400, "invalid_argument".into()));

    // Readiness as ProgressDB's clients read it.
    let r = c.get(&Caller::anonymous(), "/readyz").await;
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["version"], env!("CARGO_PKG_VERSION"));
    s.stop().await;
}

/// User B — signed, or through a backend key acting for B — can neither see nor change
/// anything of user A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_reach_another_users_threads() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    // Ids as identity providers issue them; one is a prefix of the other in store keys'
    // terms if the separator were not encoded.
    let a = Caller::backend_as("auth0:alice|1");
    let t = create_thread(&c, &a, "private").await;
    let m = create_message(&c, &a, &t, json!({"secret": "s3cret"})).await;
    for b in [
        Caller::backend_as("auth0"),
        Caller::backend_as("bob"),
        Caller::frontend("bob"),
    ] {
        let r = c.get(&b, THREADS).await;
        assert_eq!((r.status, r.json()["threads"].clone()), (200, json!([])));
        assert_eq!(r.json()["pagination"]["total"], 0);
        for (method, path, body) in [
            ("GET", format!("{THREADS}/{t}"), None),
            (
                "PUT",
                format!("{THREADS}/{t}"),
                Some(json!({"title": "mine"})),
            ),
            ("DELETE", format!("{THREADS}/{t}"), None),
            ("GET", format!("{THREADS}/{t}/messages"), None),
            (
                "POST",
                format!("{THREADS}/{t}/messages"),
                Some(json!({"body": "x"})),
            ),
            ("GET", format!("{THREADS}/{t}/messages/{m}"), None),
            (
                "PUT",
                format!("{THREADS}/{t}/messages/{m}"),
                Some(json!({"body": "x"})),
            ),
            ("DELETE", format!("{THREADS}/{t}/messages/{m}"), None),
        ] {
            let r = c.call(&b, method, &path, body).await;
            assert_eq!(pdb_error(&r), (404, "not_found".into()), "{method} {path}");
            assert!(!String::from_utf8_lossy(&r.body).contains("s3cret"));
        }
    }
    // Nothing of A's changed.
    let r = c.get(&a, &format!("{THREADS}/{t}/messages")).await;
    assert_eq!(r.json()["messages"][0]["body"], json!({"secret": "s3cret"}));
    assert_eq!(r.json()["pagination"]["total"], 1);
    assert_eq!(
        c.get(&a, &format!("{THREADS}/{t}")).await.json()["thread"]["title"],
        "private"
    );
    s.stop().await;
}

/// Messages page in time order from the newest window; `before` goes to older messages,
/// `after` to newer ones, `anchor` around one. Threads page newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_as_the_sdks_and_hooks_walk_them() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::frontend("pager");
    let t = create_thread(&c, &u, "paged").await;
    let mut keys = Vec::new();
    for i in 0..7 {
        keys.push(create_message(&c, &u, &t, json!(i)).await);
    }
    let page = |q: String| {
        let u = u.clone();
        let t = t.clone();
        async move {
            let r = c.get(&u, &format!("{THREADS}/{t}/messages?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {:?}", r.json());
            let j = r.json();
            let bodies: Vec<i64> = j["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["body"].as_i64().unwrap())
                .collect();
            (bodies, j["pagination"].clone())
        }
    };
    // First page: the newest 3, oldest first.
    let (b, p) = page("limit=3".into()).await;
    assert_eq!(b, vec![4, 5, 6]);
    assert_eq!(
        p,
        json!({"before_anchor": keys[4], "after_anchor": keys[6], "has_before": true,
               "has_after": false, "count": 3, "total": 7})
    );
    // Older, as useMessages.loadOlder does.
    let (b, p) = page(format!("limit=3&before={}", keys[4])).await;
    assert_eq!(
        (b, &p["has_before"], &p["has_after"]),
        (vec![1, 2, 3], &json!(true), &json!(true))
    );
    let (b, p) = page(format!("limit=3&before={}", keys[1])).await;
    assert_eq!(
        (b, &p["has_before"], &p["has_after"]),
        (vec![0], &json!(false), &json!(true))
    );
    // Newer, as loadNewer does.
    let (b, p) = page(format!("limit=3&after={}", keys[0])).await;
    assert_eq!(
        (b, &p["has_before"], &p["has_after"]),
        (vec![1, 2, 3], &json!(true), &json!(true))
    );
    let (b, p) = page(format!("limit=3&after={}", keys[4])).await;
    assert_eq!(
        (b, &p["has_before"], &p["has_after"]),
        (vec![5, 6], &json!(true), &json!(false))
    );
    // Around one message.
    let (b, p) = page(format!("limit=2&anchor={}", keys[3])).await;
    assert_eq!(
        (b, &p["has_before"], &p["has_after"]),
        (vec![1, 2, 3, 4, 5], &json!(true), &json!(true))
    );
    // Bad paging is a 400 in ProgressDB's error shape.
    for q in [
        format!("before={}&after={}", keys[1], keys[2]),
        "before=nope".into(),
        "limit=0".into(),
        "limit=-1".into(),
        "sort_by=title".into(),
        "include_deleted=maybe".into(),
        "include_deleted=".into(),
        "sort_by=".into(),
    ] {
        let r = c.get(&u, &format!("{THREADS}/{t}/messages?{q}")).await;
        assert_eq!(pdb_error(&r), (400, "invalid_argument".into()), "{q}");
    }

    // Threads: newest first; `after` goes to older threads, `before` to newer ones.
    let mut threads = vec![t.clone()];
    for i in 1..5 {
        threads.push(create_thread(&c, &u, &format!("t{i}")).await);
    }
    let tpage = |q: String| {
        let u = u.clone();
        async move {
            let r = c.get(&u, &format!("{THREADS}?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {:?}", r.json());
            let j = r.json();
            let keys: Vec<String> = j["threads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["key"].as_str().unwrap().to_owned())
                .collect();
            (keys, j["pagination"].clone())
        }
    };
    let (k, p) = tpage("limit=2".into()).await;
    assert_eq!(k, vec![threads[4].clone(), threads[3].clone()]);
    assert_eq!(
        (&p["has_before"], &p["has_after"], &p["total"]),
        (&json!(false), &json!(true), &json!(5))
    );
    let (k, p) = tpage(format!(
        "limit=2&after={}",
        p["after_anchor"].as_str().unwrap()
    ))
    .await;
    assert_eq!(k, vec![threads[2].clone(), threads[1].clone()]);
    assert_eq!(
        (&p["has_before"], &p["has_after"]),
        (&json!(true), &json!(true))
    );
    let (k, _) = tpage(format!("limit=2&before={}", threads[2])).await;
    assert_eq!(k, vec![threads[4].clone(), threads[3].clone()]);
    // Updated most recently first.
    let r = c
        .call(
            &u,
            "PUT",
            &format!("{THREADS}/{}", threads[0]),
            Some(json!({"title": "bumped"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let (k, _) = tpage("sort_by=updated_ts".into()).await;
    assert_eq!(k[0], threads[0]);
    // Re-sorted by update, a page still continues from its creation-order edges.
    let r = c
        .call(
            &u,
            "PUT",
            &format!("{THREADS}/{}", threads[3]),
            Some(json!({"title": "b2"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let (k, p) = tpage("sort_by=updated_ts&limit=2".into()).await;
    assert_eq!(k, vec![threads[3].clone(), threads[4].clone()]);
    assert_eq!(
        (p["before_anchor"].as_str(), p["after_anchor"].as_str()),
        (Some(threads[4].as_str()), Some(threads[3].as_str()))
    );
    let (k, _) = tpage(format!("sort_by=updated_ts&limit=2&after={}", threads[3])).await;
    assert_eq!(k, vec![threads[2].clone(), threads[1].clone()]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_progressdb_errors_and_lose_nothing() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "[limits]\nmax_body_bytes = 4096\n")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = create_thread(&c, &u, "t").await;
    let msgs = format!("{THREADS}/{t}/messages");
    for (path, body) in [
        (THREADS.to_owned(), json!({})),
        (THREADS.to_owned(), json!({"title": ""})),
        (THREADS.to_owned(), json!({"title": 7})),
        (THREADS.to_owned(), json!({"title": "x", "slug": "a b"})),
        (THREADS.to_owned(), json!({"title": "x", "slug": ""})),
        (msgs.clone(), json!({})),
        (msgs.clone(), json!({"body": null})),
        (msgs.clone(), json!({"body": 1, "reply_to": "m"})),
        (msgs.clone(), json!({"body": 1, "role": ""})),
        (msgs.clone(), json!({"body": 1, "role": "a\nb"})),
        (msgs.clone(), json!({"body": 1, "role": 7})),
        (msgs.clone(), json!({"body": "x".repeat(5000)})),
    ] {
        let r = c.post(&u, &path, body.clone()).await;
        let (status, code) = pdb_error(&r);
        assert!((400..500).contains(&status), "{path} {body}: {status}");
        assert!(!code.is_empty(), "{path} {body}");
    }
    // Unknown keys and paths, and methods a path does not take: ProgressDB's shape too.
    for path in [
        format!("{THREADS}/nope:nope"),
        format!("{msgs}/nope"),
        "/frontend/v1/nope".to_owned(),
        "/backend/v2".to_owned(),
    ] {
        assert_eq!(
            pdb_error(&c.get(&u, &path).await),
            (404, "not_found".into()),
            "{path}"
        );
    }
    for (method, path) in [
        ("PATCH", THREADS),
        ("GET", "/backend/v1/sign"),
        ("POST", "/admin/health"),
    ] {
        let r = c.call(&Caller::admin(), method, path, None).await;
        assert_eq!(
            pdb_error(&r),
            (405, "method_not_allowed".into()),
            "{method} {path}"
        );
        assert!(r.headers.contains_key("allow"), "{method} {path}");
    }
    // /v1 keeps its own shape.
    let r = c.get(&u, "/v1/nope").await;
    assert_eq!((r.status, r.code()), (404, "not_found".to_owned()));
    // None of it was stored.
    let r = c.get(&u, THREADS).await;
    assert_eq!(r.json()["pagination"]["total"], 1);
    assert_eq!(c.get(&u, &msgs).await.json()["pagination"]["total"], 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_of_listed_origins_get_cors_answers_before_authentication() {
    let env = TestEnv::new();
    let conf = env.config(&Kms::Embedded, "");
    let text = std::fs::read_to_string(&conf).unwrap().replacen(
        "[http]\n",
        "[http]\ncors_allowed_origins = [\"https://app.example\"]\n",
        1,
    );
    std::fs::write(&conf, text).unwrap();
    let s = InProc::start(&conf).await;
    let addr = s.addr;
    let preflight = |origin: &'static str| async move {
        let h = [
            ("origin", origin.to_owned()),
            ("access-control-request-method", "POST".to_owned()),
            (
                "access-control-request-headers",
                "x-api-key,x-user-id,x-user-signature,content-type".to_owned(),
            ),
        ];
        raw(addr, "OPTIONS", THREADS, &h, None).await
    };
    // No key: the preflight is answered before authentication.
    let r = preflight("https://app.example").await;
    assert!(r.status < 300, "{}", r.status);
    let h = |r: &common::Resp, n: &str| {
        r.headers
            .get(n)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .unwrap_or_default()
    };
    assert_eq!(h(&r, "access-control-allow-origin"), "https://app.example");
    for needed in ["x-api-key", "x-user-id", "x-user-signature", "content-type"] {
        assert!(
            h(&r, "access-control-allow-headers").contains(needed),
            "{needed}"
        );
    }
    assert!(h(&r, "access-control-allow-methods").contains("put"));
    // Another origin gets no permission.
    let r = preflight("https://evil.example").await;
    assert_eq!(h(&r, "access-control-allow-origin"), "");
    // Real answers, errors included, carry the header for the listed origin only.
    let mut hdrs = api_key_headers(BACKEND, Some("u"));
    hdrs.push(("origin", "https://app.example".into()));
    let r = raw(s.addr, "GET", THREADS, &hdrs, None).await;
    assert_eq!(
        (r.status, h(&r, "access-control-allow-origin")),
        (200, "https://app.example".into())
    );
    let r = raw(
        s.addr,
        "GET",
        THREADS,
        &[("origin", "https://app.example".into())],
        None,
    )
    .await;
    assert_eq!(
        (r.status, h(&r, "access-control-allow-origin")),
        (401, "https://app.example".into())
    );
    s.stop().await;

    // Without the setting: no CORS headers at all.
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let mut hdrs = api_key_headers(BACKEND, Some("u"));
    hdrs.push(("origin", "https://app.example".into()));
    let r = raw(s.addr, "GET", THREADS, &hdrs, None).await;
    assert_eq!(
        (r.status, r.headers.get("access-control-allow-origin")),
        (200, None)
    );
    s.stop().await;
}

/// A message's `role` and `reply_to` are stored with it (bound to its ciphertext), returned on
/// every read by both APIs, and fixed once posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_reply_are_kept_and_fixed() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = create_thread(&c, &u, "chat").await;
    let q = create_message(&c, &u, &t, json!("question")).await;
    let r = c
        .post(
            &u,
            &format!("{THREADS}/{t}/messages"),
            json!({"body": {"text": "answer"}, "role": "assistant", "reply_to": q}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let a = r.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["message"]["role"], "assistant");
    assert_eq!(r.json()["message"]["reply_to"], q.as_str());
    let m = c
        .get(&u, &format!("{THREADS}/{t}/messages/{a}"))
        .await
        .json();
    assert_eq!(
        (&m["message"]["role"], &m["message"]["reply_to"]),
        (&json!("assistant"), &json!(q))
    );
    let list = c.get(&u, &format!("{THREADS}/{t}/messages")).await.json();
    assert!(list["messages"][0].get("role").is_none(), "{list}");
    assert_eq!(list["messages"][1]["role"], "assistant");
    // The same message through /v1.
    let v1 = c
        .get(&u, &format!("/v1/threads/{t}/messages/{a}"))
        .await
        .json();
    assert_eq!(
        (&v1["role"], &v1["reply_to"]),
        (&json!("assistant"), &json!(q))
    );
    // An edit keeps them and cannot change them.
    let r = c
        .call(
            &u,
            "PUT",
            &format!("{THREADS}/{t}/messages/{a}"),
            Some(json!({"body": "better"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (&r.json()["message"]["role"], &r.json()["message"]["body"]),
        (&json!("assistant"), &json!("better"))
    );
    for body in [
        json!({"body": 1, "role": "user"}),
        json!({"body": 1, "reply_to": a}),
    ] {
        let r = c
            .call(
                &u,
                "PUT",
                &format!("{THREADS}/{t}/messages/{a}"),
                Some(body),
            )
            .await;
        assert_eq!(pdb_error(&r), (400, "invalid_argument".into()));
        let r = c
            .call(
                &u,
                "PUT",
                &format!("/v1/threads/{t}/messages/{a}"),
                Some(json!({"body": 1, "role": "user"})),
            )
            .await;
        assert_eq!(r.status, 400);
    }
    let m = c
        .get(&u, &format!("{THREADS}/{t}/messages/{a}"))
        .await
        .json();
    assert_eq!(
        (&m["message"]["role"], &m["message"]["body"]),
        (&json!("assistant"), &json!("better"))
    );
    // /v1 posts take them too.
    let r = c
        .post(
            &u,
            &format!("/v1/threads/{t}/messages"),
            json!({"body": 2, "role": "system"}),
        )
        .await;
    assert_eq!((r.status, &r.json()["role"]), (201, &json!("system")));
    s.stop().await;
}

/// A deleted message leaves a tombstone with no content: listed only with
/// `include_deleted=true`, never readable, editable or deletable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_messages_stay_as_tombstones_without_content() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::frontend("u");
    let t = create_thread(&c, &u, "t").await;
    let keep = create_message(&c, &u, &t, json!("kept")).await;
    let gone = create_message(&c, &u, &t, json!({"text": "gone-marker"})).await;
    let after = create_message(&c, &u, &t, json!("after")).await;
    let path = format!("{THREADS}/{t}/messages/{gone}");
    assert_eq!(c.call(&u, "DELETE", &path, None).await.status, 204);

    let list = c.get(&u, &format!("{THREADS}/{t}/messages")).await.json();
    let keys: Vec<&str> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, [keep.as_str(), after.as_str()]);
    assert_eq!(list["pagination"]["total"], 2);
    let list = c
        .get(&u, &format!("{THREADS}/{t}/messages?include_deleted=true"))
        .await
        .json();
    let m = &list["messages"];
    assert_eq!(list["pagination"]["total"], 3);
    assert_eq!(
        (m[1]["key"].as_str(), &m[1]["deleted"]),
        (Some(gone.as_str()), &json!(true))
    );
    assert!(m[1].get("body").is_none(), "{m}");
    assert_eq!(m[1]["author"], "u");
    assert!(m[1]["updated_ts"].as_u64() >= m[1]["created_ts"].as_u64());
    assert!(m[0].get("deleted").is_none() && m[0]["body"] == "kept");
    // Paging steps over a hidden tombstone and counts only what it shows.
    let p = c
        .get(
            &u,
            &format!("{THREADS}/{t}/messages?limit=1&before={after}"),
        )
        .await
        .json();
    assert_eq!(p["messages"][0]["key"], keep.as_str());
    let p = c
        .get(
            &u,
            &format!("{THREADS}/{t}/messages?limit=1&before={after}&include_deleted=true"),
        )
        .await
        .json();
    assert_eq!(p["messages"][0]["key"], gone.as_str());
    let p = c
        .get(&u, &format!("{THREADS}/{t}/messages?anchor={gone}&limit=1"))
        .await
        .json();
    assert_eq!(
        p["messages"].as_array().unwrap().len(),
        2,
        "the hidden anchor itself is left out: {p}"
    );

    // Not a message any more, through either API.
    assert_eq!(
        pdb_error(&c.get(&u, &path).await),
        (404, "not_found".into())
    );
    let r = c
        .call(&u, "PUT", &path, Some(json!({"body": "revived"})))
        .await;
    assert_eq!(pdb_error(&r), (404, "not_found".into()));
    assert_eq!(
        pdb_error(&c.call(&u, "DELETE", &path, None).await),
        (404, "not_found".into())
    );
    assert_eq!(
        c.get(&u, &format!("/v1/threads/{t}/messages/{gone}"))
            .await
            .status,
        404
    );
    let v1 = c.get(&u, &format!("/v1/threads/{t}/messages")).await.json();
    assert_eq!(v1["messages"].as_array().unwrap().len(), 2, "{v1}");
    assert_eq!(
        c.get(&Caller::admin(), "/admin/stats").await.json()["messages"],
        2
    );
    // The live count is kept by every post and delete (a page does not count the thread).
    create_message(&c, &u, &t, json!("later")).await;
    let l = c
        .get(&u, &format!("{THREADS}/{t}/messages?limit=1"))
        .await
        .json();
    assert_eq!(l["pagination"]["total"], 3);
    let l = c
        .get(
            &u,
            &format!("{THREADS}/{t}/messages?limit=1&include_deleted=true"),
        )
        .await
        .json();
    assert_eq!(l["pagination"]["total"], 4);
    // The content is gone from the store, not only hidden.
    let raw = s
        .app
        .store()
        .raw_get(format!("thread:{t}:msg:{gone}").into_bytes())
        .await
        .unwrap()
        .unwrap();
    let rec: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(rec["content"], "deleted", "{rec}");
    s.stop().await;
}

/// A thread's slug is kept (sealed with its title) and returned by both APIs; listings filter
/// by title (case-insensitive substring) and slug (exact), paged like any listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slugs_are_kept_and_listings_filter_by_title_and_slug() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let r = c
        .post(
            &u,
            THREADS,
            json!({"title": "Trip to Lisbon", "slug": "lisbon-2026"}),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["thread"]["slug"], "lisbon-2026");
    let lisbon = r.json()["key"].as_str().unwrap().to_owned();
    let mut others = Vec::new();
    for title in ["Groceries", "lisbon hotels", "Work", "LISBON flights"] {
        others.push(create_thread(&c, &u, title).await);
    }
    assert_eq!(
        c.get(&u, &format!("{THREADS}/{lisbon}")).await.json()["thread"]["slug"],
        "lisbon-2026"
    );
    assert_eq!(
        c.get(&u, &format!("/v1/threads/{lisbon}")).await.json()["slug"],
        "lisbon-2026"
    );
    // Sealed at rest like the title.
    let raw = s
        .app
        .store()
        .raw_get(format!("thread:{lisbon}:meta").into_bytes())
        .await
        .unwrap()
        .unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("lisbon-2026"));

    let titles = |q: &str| {
        let u = u.clone();
        let q = q.to_owned();
        async move {
            let j = c.get(&u, &format!("{THREADS}?{q}")).await.json();
            let t: Vec<String> = j["threads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["title"].as_str().unwrap().to_owned())
                .collect();
            (t, j["pagination"].clone())
        }
    };
    let (t, p) = titles("title=LisBon").await;
    assert_eq!(t, ["LISBON flights", "lisbon hotels", "Trip to Lisbon"]);
    assert_eq!((&p["total"], &p["has_after"]), (&json!(3), &json!(false)));
    let (t, p) = titles("title=lisbon&limit=2").await;
    assert_eq!(t, ["LISBON flights", "lisbon hotels"]);
    assert_eq!(
        (&p["total"], &p["has_after"], &p["has_before"]),
        (&json!(3), &json!(true), &json!(false))
    );
    let (t, p) = titles(&format!(
        "title=lisbon&limit=2&after={}",
        p["after_anchor"].as_str().unwrap()
    ))
    .await;
    assert_eq!(
        (t, &p["has_before"], &p["has_after"]),
        (
            vec!["Trip to Lisbon".to_owned()],
            &json!(true),
            &json!(false)
        )
    );
    let (t, _) = titles("slug=lisbon-2026").await;
    assert_eq!(t, ["Trip to Lisbon"]);
    let (t, p) = titles("slug=lisbon").await;
    assert_eq!((t.len(), &p["total"]), (0, &json!(0)));
    // Another user's titles never match.
    let j = c
        .get(&Caller::backend_as("v"), &format!("{THREADS}?title=lisbon"))
        .await
        .json();
    assert_eq!(j["threads"], json!([]));

    // Renamed, then removed with null.
    let r = c
        .call(
            &u,
            "PUT",
            &format!("{THREADS}/{lisbon}"),
            Some(json!({"slug": "lisbon"})),
        )
        .await;
    assert_eq!(
        (
            r.status,
            &r.json()["thread"]["slug"],
            &r.json()["thread"]["title"]
        ),
        (200, &json!("lisbon"), &json!("Trip to Lisbon"))
    );
    let r = c
        .call(
            &u,
            "PUT",
            &format!("{THREADS}/{lisbon}"),
            Some(json!({"slug": null})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["thread"].get("slug").is_none(), "{:?}", r.json());
    assert!(
        c.get(&u, &format!("{THREADS}/{lisbon}")).await.json()["thread"]
            .get("slug")
            .is_none()
    );
    s.stop().await;
}

/// Admin reads: the users who have threads, and one user's threads (with their `kms` block)
/// and messages, decrypted and paged as the user would page them; never raw store values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_read_a_users_threads_and_messages() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let odd = Caller::backend_as("auth0:a|1");
    let bob = Caller::backend_as("bob");
    let to = create_thread(&c, &odd, "odd's").await;
    let tb = create_thread(&c, &bob, "bob's").await;
    let mb = create_message(&c, &bob, &tb, json!({"text": "hello"})).await;
    let admin = Caller::admin();

    let r = c.get(&admin, "/admin/users").await.json();
    assert_eq!(r["users"], json!(["auth0:a|1", "bob"]));
    assert_eq!(
        (&r["pagination"]["count"], &r["pagination"]["has_after"]),
        (&json!(2), &json!(false))
    );
    let r = c.get(&admin, "/admin/users?limit=1").await.json();
    assert_eq!(
        (&r["users"], &r["pagination"]["has_after"]),
        (&json!(["auth0:a|1"]), &json!(true))
    );
    assert_eq!(r["pagination"]["total"], 2);
    let r = c
        .get(&admin, "/admin/users?limit=1&after=auth0:a%7C1")
        .await
        .json();
    assert_eq!(
        (&r["users"], &r["pagination"]["has_after"]),
        (&json!(["bob"]), &json!(false))
    );

    let r = c.get(&admin, "/admin/users/bob/threads").await.json();
    assert_eq!(r["threads"][0]["key"], tb.as_str());
    assert!(
        r["threads"][0]["kms"]["key_id"]
            .as_str()
            .unwrap()
            .starts_with("dek_"),
        "{r}"
    );
    let r = c
        .get(&admin, "/admin/users/auth0%3Aa%7C1/threads")
        .await
        .json();
    assert_eq!(
        (&r["threads"][0]["key"], &r["pagination"]["total"]),
        (&json!(to), &json!(1))
    );
    let r = c
        .get(&admin, &format!("/admin/users/bob/threads/{tb}/messages"))
        .await
        .json();
    assert_eq!(r["messages"][0]["body"], json!({"text": "hello"}));
    let r = c
        .get(
            &admin,
            &format!("/admin/users/bob/threads/{tb}/messages/{mb}"),
        )
        .await;
    assert_eq!(
        (r.status, &r.json()["message"]["body"]),
        (200, &json!({"text": "hello"}))
    );
    // Another user's thread under bob's path: not found.
    let r = c
        .get(&admin, &format!("/admin/users/bob/threads/{to}/messages"))
        .await;
    assert_eq!(pdb_error(&r), (404, "not_found".into()));
    let r = c.get(&admin, "/admin/users/%20bad/threads").await;
    assert_eq!(pdb_error(&r), (400, "invalid_argument".into()));

    // Every thread has its key already: nothing to encrypt.
    let r = c
        .post(&admin, "/admin/encryption/encrypt-threads", json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json()["summary"],
        json!({"total": 2, "success": 0, "skipped": 2, "errors": 0})
    );
    // Admin paths are for admin keys.
    for path in [
        "/admin/users".to_owned(),
        "/admin/users/bob/threads".to_owned(),
        format!("/admin/users/bob/threads/{tb}/messages/{mb}"),
    ] {
        assert_eq!(
            pdb_error(&c.get(&bob, &path).await),
            (403, "forbidden".into()),
            "{path}"
        );
    }
    let r = c
        .post(&bob, "/admin/encryption/encrypt-threads", json!({}))
        .await;
    assert_eq!(pdb_error(&r), (403, "forbidden".into()));
    s.stop().await;
}

/// A DEK rotation passes over tombstones: they are neither migrated nor counted as
/// unreadable (which would widen the verification's allowance), and stay tombstones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dek_rotation_leaves_tombstones_as_they_are_and_counts_none_unreadable() {
    let env = TestEnv::new();
    let s = InProc::start(&env.config(&Kms::Embedded, "")).await;
    let c = Client::new(s.addr);
    let u = Caller::backend_as("u");
    let t = create_thread(&c, &u, "rotated").await;
    let mut keys = Vec::new();
    for i in 0..6 {
        keys.push(create_message(&c, &u, &t, json!(i)).await);
    }
    for k in [&keys[1], &keys[4]] {
        let r = c
            .call(&u, "DELETE", &format!("{THREADS}/{t}/messages/{k}"), None)
            .await;
        assert_eq!(r.status, 204);
    }
    let r = c
        .call(
            &Caller::admin(),
            "POST",
            &format!("/admin/threads/{t}/rotate-dek"),
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let job = r.json()["job_id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let done = loop {
        let j = c
            .get(&Caller::admin(), &format!("/admin/jobs/{job}"))
            .await
            .json();
        if j["state"] == "succeeded" || j["state"] == "failed" {
            break j;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{j}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"]["total"], 4, "{done}");
    assert_eq!(
        (
            &done["progress"]["migrated"],
            &done["progress"]["unreadable"]
        ),
        (&json!(4), &json!(0)),
        "{done}"
    );
    let l = c
        .get(&u, &format!("{THREADS}/{t}/messages?include_deleted=true"))
        .await
        .json();
    let m = l["messages"].as_array().unwrap();
    assert_eq!(m.len(), 6);
    assert_eq!(
        (&m[1]["deleted"], &m[4]["deleted"]),
        (&json!(true), &json!(true))
    );
    let bodies: Vec<&Value> = m.iter().filter_map(|m| m.get("body")).collect();
    assert_eq!(bodies, [&json!(0), &json!(2), &json!(3), &json!(5)]);
    s.stop().await;
}

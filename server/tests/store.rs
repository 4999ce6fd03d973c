//! The LMDB store on its own: group commit, durability across reopen, map growth and the
//! full-map error, and thread key-prefix isolation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kms_api::ThreadId;
use progressdb::ids::{MessageId, Timestamp, UserId};
use progressdb::metrics::StoreMetrics;
use progressdb::store::{
    Content, CreateThread, DeleteThread, MessageRecord, Order, PutMessage, RawPut, RecordFormat,
    Store, StoreError, StoreOptions, ThreadFilter, ThreadRecord, ThreadsPerAuthor,
};

fn thread(id: &str, author: &str) -> ThreadRecord {
    ThreadRecord {
        id: ThreadId::parse(id).unwrap(),
        title: format!("title of {id}"),
        slug: None,
        author: UserId::parse(author).unwrap(),
        created_at: Timestamp::from_nanos(1),
        updated_at: Timestamp::from_nanos(1),
        metadata: None,
        kms: None,
        plain_migration: None,
        rotation: None,
        sealed: 0,
        key_since: None,
        live_messages: None,
        sealed_meta: None,
    }
}

fn message(n: u64, pad: usize) -> (MessageId, MessageRecord) {
    let id = MessageId::new(Timestamp::from_nanos(1_000 + n), 0).unwrap();
    let rec = MessageRecord {
        role: None,
        reply_to: None,
        format: RecordFormat::CURRENT,
        author: UserId::parse("u").unwrap(),
        created_at: id.timestamp(),
        updated_at: id.timestamp(),
        edits: 0,
        content: Content::Plain(serde_json::json!({"n": n, "pad": "x".repeat(pad)})),
    };
    (id, rec)
}

async fn open(dir: &std::path::Path, map_mb: u64, max_mb: u64) -> (Store, StoreMetrics) {
    let opts = StoreOptions::new(dir, map_mb, max_mb);
    let m = StoreMetrics::default();
    let m2 = m.clone();
    let s = tokio::task::spawn_blocking(move || Store::open(&opts, m2))
        .await
        .unwrap()
        .unwrap();
    (s, m)
}

/// Where a test's store lives: both backends run the same tests (the map's growth is
/// LMDB's own).
enum Backend {
    Lmdb(tempfile::TempDir),
    /// A database of its own on the shared test cluster.
    Postgres(String),
}

impl Backend {
    fn lmdb() -> Self {
        Backend::Lmdb(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Self {
        Backend::Postgres(testkit::pg::PgCluster::shared().new_database())
    }

    /// Opens the store (again: the data stays).
    async fn open(&self) -> (Store, StoreMetrics) {
        match self {
            Backend::Lmdb(dir) => open(dir.path(), 8, 64).await,
            Backend::Postgres(url) => {
                let cfg = service_kit::postgres::PostgresConfig::new(
                    url.clone(),
                    None,
                    None,
                    4,
                    std::time::Duration::from_secs(10),
                    std::time::Duration::from_millis(500),
                )
                .unwrap();
                let m = StoreMetrics::default();
                let s = Store::open_postgres(&cfg, 1024, m.clone()).await.unwrap();
                (s, m)
            }
        }
    }
}

/// `test` as two tests, `test::lmdb` and `test::postgres`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lmdb() {
                super::$test(super::Backend::lmdb()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(super::Backend::postgres()).await;
            }
        }
    )*};
}

on_both_backends!(
    concurrent_writes_are_group_committed_and_survive_reopen,
    a_thread_prefix_never_matches_another_thread,
    a_rotation_start_never_claims_a_message_sealed_before_it,
    threads_per_author_are_bounded_inside_the_write,
    an_unreadable_record_is_reported_without_its_text,
    patches_write_only_over_what_they_read_and_under_the_current_key,
);

async fn close(s: Store) {
    tokio::task::spawn_blocking(move || drop(s)).await.unwrap();
}

async fn concurrent_writes_are_group_committed_and_survive_reopen(b: Backend) {
    let (s, metrics) = b.open().await;
    let t = ThreadId::parse("t1").unwrap();
    s.write(CreateThread::new(
        thread("t1", "u"),
        ThreadsPerAuthor::Unlimited,
    ))
    .await
    .unwrap();
    let n = 400u64;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (s, t) = (s.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let (id, rec) = message(i, 10);
            s.write(PutMessage::new(&t, id, &rec, None).unwrap()).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let commits = metrics.commits.get();
    assert!(commits < n + 1, "{commits} commits for {} writes", n + 1);
    // A second write of the same id is a conflict, and leaves the first intact.
    let (id, rec) = message(0, 10);
    assert_eq!(
        s.write(PutMessage::new(&t, id, &rec, None).unwrap()).await,
        Err(StoreError::Conflict("message id exists"))
    );
    // No message without its thread.
    let other = ThreadId::parse("ghost").unwrap();
    assert_eq!(
        s.write(PutMessage::new(&other, id, &rec, None).unwrap())
            .await,
        Err(StoreError::NotFound)
    );
    close(s).await;

    let (s, _) = b.open().await;
    let page = s.list_messages(&t, Order::Asc, None, 1000).await.unwrap();
    assert_eq!(page.items.len(), n as usize);
    assert!(!page.more);
    let ids: Vec<MessageId> = page.items.iter().map(|m| m.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    // Newest first, in one page and page by page (a backend that reads a range in chunks
    // crosses their edges here).
    let desc = s.list_messages(&t, Order::Desc, None, 1000).await.unwrap();
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(
        desc.items.iter().map(|m| m.id).collect::<Vec<_>>(),
        reversed
    );
    let mut walked = Vec::new();
    let mut cursor = None;
    loop {
        let p = s.list_messages(&t, Order::Desc, cursor, 37).await.unwrap();
        walked.extend(p.items.iter().map(|m| m.id));
        cursor = p.items.last().map(|m| m.id);
        if !p.more {
            break;
        }
    }
    assert_eq!(walked, reversed);
    let page = s
        .list_messages(&t, Order::Desc, Some(ids[10]), 3)
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[9], ids[8], ids[7]]
    );
    assert!(page.more);
    close(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_grows_then_refuses_without_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (s, metrics) = open(dir.path(), 1, 4).await;
    let t = ThreadId::parse("t").unwrap();
    s.write(CreateThread::new(
        thread("t", "u"),
        ThreadsPerAuthor::Unlimited,
    ))
    .await
    .unwrap();
    let mut stored = 0u64;
    let full = loop {
        let (id, rec) = message(stored, 100_000);
        match s.write(PutMessage::new(&t, id, &rec, None).unwrap()).await {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1000, "never full");
    };
    assert_eq!(full, StoreError::Full);
    assert!(metrics.resizes.get() >= 2, "the map did not grow");
    assert_eq!(s.map_size(), Some(4 << 20));
    // Small writes still fit; everything stored is intact.
    let (id, rec) = message(10_000, 1);
    s.write(PutMessage::new(&t, id, &rec, None).unwrap())
        .await
        .unwrap();
    let page = s.list_messages(&t, Order::Asc, None, 1000).await.unwrap();
    assert_eq!(page.items.len() as u64, stored + 1);
    assert!(page.items.iter().all(|m| m.record.is_ok()));
    close(s).await;

    // Reopened with a larger limit, it takes more.
    let (s, _) = open(dir.path(), 1, 16).await;
    let (id, rec) = message(20_000, 100_000);
    s.write(PutMessage::new(&t, id, &rec, None).unwrap())
        .await
        .unwrap();
    close(s).await;
}

async fn a_thread_prefix_never_matches_another_thread(b: Backend) {
    let (s, _) = b.open().await;
    let names = ["ab", "abc", "ab-", "a", "ab_"];
    for (i, name) in names.iter().enumerate() {
        let t = ThreadId::parse(name).unwrap();
        s.write(CreateThread::new(
            thread(name, if i % 2 == 0 { "x" } else { "y" }),
            ThreadsPerAuthor::Unlimited,
        ))
        .await
        .unwrap();
        for j in 0..=i as u64 {
            let (id, rec) = message(j, 1);
            s.write(PutMessage::new(&t, id, &rec, None).unwrap())
                .await
                .unwrap();
        }
    }
    for (i, name) in names.iter().enumerate() {
        let t = ThreadId::parse(name).unwrap();
        let page = s.list_messages(&t, Order::Asc, None, 100).await.unwrap();
        assert_eq!(page.items.len(), i + 1, "{name}");
        let page = s.list_messages(&t, Order::Desc, None, 100).await.unwrap();
        assert_eq!(page.items.len(), i + 1, "{name}");
    }
    let all = s.list_threads(ThreadFilter::All, None, 100).await.unwrap();
    assert_eq!(all.items.len(), names.len());
    let xs = s
        .list_threads(ThreadFilter::Author(UserId::parse("x").unwrap()), None, 100)
        .await
        .unwrap();
    assert_eq!(xs.items.len(), 3);
    // Paging through all threads one at a time visits each exactly once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = s
            .list_threads(ThreadFilter::All, after.clone(), 1)
            .await
            .unwrap();
        seen.extend(p.items.iter().map(|t| t.id.to_string()));
        if !p.more {
            break;
        }
        after = p.items.last().map(|t| t.id.clone());
    }
    let mut expect: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    expect.sort();
    seen.sort();
    assert_eq!(seen, expect);

    s.write(DeleteThread {
        id: ThreadId::parse("ab").unwrap(),
    })
    .await
    .unwrap();
    for (i, name) in names.iter().enumerate().skip(1) {
        let t = ThreadId::parse(name).unwrap();
        let page = s.list_messages(&t, Order::Asc, None, 100).await.unwrap();
        assert_eq!(page.items.len(), i + 1, "{name} lost messages");
        assert!(s.get_thread(&t).await.unwrap().is_some());
    }
    assert!(s
        .get_thread(&ThreadId::parse("ab").unwrap())
        .await
        .unwrap()
        .is_none());
    close(s).await;
}

fn key(n: u8) -> progressdb::provider::ThreadKey {
    progressdb::provider::ThreadKey {
        key_id: kms_api::KeyId::from_random([n; 16]),
        wrapped_dek: kms_api::WrappedDek::new(vec![n]),
        kek_id: kms_api::KekId::parse("kek").unwrap(),
        kek_version: kms_api::KekVersion::FIRST,
    }
}

/// The rotation rule stays true at its edges: a message stored under the old key with an id
/// after the start the job chose (a post that committed first) moves the start past it, and
/// a post below the start once the rotation runs is refused.
async fn a_rotation_start_never_claims_a_message_sealed_before_it(b: Backend) {
    use progressdb::store::{
        JobKind, JobProgress, JobRecord, JobState, RotationStart, SealedBy, StartRotation,
    };
    let (s, _) = b.open().await;
    let t = ThreadId::parse("t1").unwrap();
    let mut rec = thread("t1", "u");
    rec.kms = Some(key(1));
    s.write(CreateThread::new(rec, ThreadsPerAuthor::Unlimited))
        .await
        .unwrap();
    let chosen_start = MessageId::new(Timestamp::from_nanos(2_000), 0).unwrap();
    // A post that took its id after the job chose its start, and committed first.
    let late = MessageId::new(Timestamp::from_nanos(3_000), 0).unwrap();
    let (_, mut m) = message(0, 1);
    m.content = Content::Enc(kms_api::wire::Bytes64(vec![9; 40]));
    s.write(PutMessage::new(&t, late, &m, Some(key(1).key_id)).unwrap())
        .await
        .unwrap();
    let job = JobRecord {
        id: kms_api::admin::JobId::from_random([7; 8]),
        kind: JobKind::RotateDek,
        thread: t.clone(),
        state: JobState::Migrating,
        progress: JobProgress::default(),
        old_key_id: None,
        new_key_id: key(2).key_id,
        error: None,
        reason: "test".into(),
        created_at: Timestamp::from_nanos(1),
        updated_at: Timestamp::from_nanos(1),
        finished_at: None,
    };
    let out = s
        .write(StartRotation {
            thread: t.clone(),
            new_key: key(2),
            start: chosen_start,
            job,
        })
        .await
        .unwrap();
    assert!(matches!(out, RotationStart::Started(_)));
    let th = s.get_thread(&t).await.unwrap().unwrap();
    let start = th.rotation.as_ref().unwrap().start;
    assert!(
        start > late,
        "the start moved past the message sealed before it"
    );
    assert_eq!(th.sealed_by(late), SealedBy::Key(&key(1)));
    // A post below the start now is refused (it would be skipped by the job).
    let below = MessageId::new(Timestamp::from_nanos(2_500), 0).unwrap();
    assert_eq!(
        s.write(PutMessage::new(&t, below, &m, Some(key(1).key_id)).unwrap())
            .await,
        Err(StoreError::StaleKey)
    );
    close(s).await;
}

/// `limits.max_threads_per_user` is checked inside the create's write transaction: eight
/// concurrent creates by one author against a bound of three store exactly three; another
/// author is not affected, and a delete makes room again.
async fn threads_per_author_are_bounded_inside_the_write(b: Backend) {
    let (s, _) = b.open().await;
    let limit = ThreadsPerAuthor::AtMost(3);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.write(CreateThread::new(thread(&format!("a{i}"), "alice"), limit))
                    .await
            })
        })
        .collect();
    let mut stored = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(()) => stored.push(i),
            Err(StoreError::ThreadLimit) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(stored.len(), 3, "{stored:?}");
    let alice = UserId::parse("alice").unwrap();
    assert!(s.author_has_at_least(&alice, 3).await.unwrap());
    assert!(!s.author_has_at_least(&alice, 4).await.unwrap());
    s.write(CreateThread::new(thread("b0", "bob"), limit))
        .await
        .unwrap();
    s.write(DeleteThread {
        id: ThreadId::parse(&format!("a{}", stored[0])).unwrap(),
    })
    .await
    .unwrap();
    s.write(CreateThread::new(thread("a9", "alice"), limit))
        .await
        .unwrap();
    close(s).await;
}

/// A planted record that does not parse gives an error saying what failed and where, never
/// the text it holds (serde's own message quotes it: `invalid type: string "..."`), since
/// that text can be a title, which logs must not carry.
async fn an_unreadable_record_is_reported_without_its_text(b: Backend) {
    let (s, _) = b.open().await;
    let t = ThreadId::parse("t1").unwrap();
    let marker = "TITLE-TEXT-THAT-MUST-NOT-BE-LOGGED";
    let planted = format!(r#"{{"id":"t1","title":"x","author":"u","created_at":"{marker}"}}"#);
    assert!(
        serde_json::from_str::<ThreadRecord>(&planted)
            .unwrap_err()
            .to_string()
            .contains(marker),
        "serde's message quotes the input: the hazard this guards against"
    );
    s.write(RawPut {
        key: progressdb::store::keys::meta(&t),
        value: planted.into_bytes(),
    })
    .await
    .unwrap();
    let err = s.get_thread(&t).await.unwrap_err().to_string();
    assert!(err.contains("corrupt record"), "{err}");
    assert!(!err.contains(marker), "{err}");
    // Damaged records before a good one neither shorten a page nor end a walk.
    s.write(RawPut {
        key: progressdb::store::keys::meta(&ThreadId::parse("t2").unwrap()),
        value: b"{".to_vec(),
    })
    .await
    .unwrap();
    s.write(CreateThread::new(
        thread("t3", "u"),
        ThreadsPerAuthor::Unlimited,
    ))
    .await
    .unwrap();
    let page = s.list_threads(ThreadFilter::All, None, 1).await.unwrap();
    assert_eq!(
        page.items.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["t3"]
    );
    assert!(!page.more);
    let entries = s.thread_entries(None, 10).await.unwrap();
    assert_eq!(entries.items.len(), 3, "verify sees every record");
    assert_eq!(entries.items.iter().filter(|(_, r)| r.is_err()).count(), 2);
    close(s).await;
}

/// A patch writes only over the state it read: a sealed title and metadata only over the
/// sealed part given and only under the thread's key now (a seal under a key a rotation is
/// retiring would be shredded with it), and plain ones only while the thread has no key.
async fn patches_write_only_over_what_they_read_and_under_the_current_key(b: Backend) {
    use progressdb::store::{PatchThread, SealedMeta};
    let (s, _) = b.open().await;
    let t = ThreadId::parse("t").unwrap();
    let mut rec = thread("t", "u");
    rec.kms = Some(key(2));
    s.write(CreateThread::new(rec, ThreadsPerAuthor::Unlimited))
        .await
        .unwrap();
    let sealed = |k: u8| SealedMeta {
        key_id: key(k).key_id,
        ct: kms_api::wire::Bytes64(vec![k; 40]),
    };
    let patch =
        |expected: Option<SealedMeta>, new: Option<SealedMeta>, title: Option<&str>| PatchThread {
            id: t.clone(),
            title: title.map(str::to_owned),
            slug: None,
            metadata: None,
            sealed: new.map(|n| (expected, n)),
            now: Timestamp::from_nanos(9),
        };
    // Under another key (the retiring one of a rotation): refused.
    assert!(matches!(
        s.write(patch(None, Some(sealed(1)), None)).await,
        Err(StoreError::Conflict(_))
    ));
    // Plain, on a thread with a key: refused.
    assert!(matches!(
        s.write(patch(None, None, Some("plain"))).await,
        Err(StoreError::Conflict(_))
    ));
    let r = s.write(patch(None, Some(sealed(2)), None)).await.unwrap();
    assert_eq!(
        (r.title.as_str(), r.sealed_meta.as_ref()),
        ("", Some(&sealed(2)))
    );
    // Over a sealed part other than the one stored: refused.
    assert!(matches!(
        s.write(patch(None, Some(sealed(2)), None)).await,
        Err(StoreError::Conflict(_))
    ));
    s.write(patch(Some(sealed(2)), Some(sealed(2)), None))
        .await
        .unwrap();
    assert_eq!(
        s.get_thread(&t).await.unwrap().unwrap().sealed_meta,
        Some(sealed(2))
    );
    close(s).await;
}

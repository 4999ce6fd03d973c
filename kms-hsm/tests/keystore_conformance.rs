//! The key-store contract ([`KeyStore`]) checked against both backends: every case runs on a
//! real LMDB store in a temp dir and on a real PostgreSQL database (a private cluster started
//! by this test process, `testkit::pg`). Then what only PostgreSQL has: migrations, a server
//! whose commits are not durable, two stores (replicas) on one database, planted rows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kms_api::admin::{AuditEntry, Job, JobId, JobKind, JobProgress, JobState};
use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use progressdb_kms::config::PostgresConfig;
use progressdb_kms::keystore::lmdb::LmdbStore;
use progressdb_kms::keystore::postgres::PostgresStore;
use progressdb_kms::keystore::{
    AnyStore, AuditAnchor, AuditHead, DestroyOutcome, KekState, KekVersionRecord, KeyRecord,
    KeyState, KeyStore, LeaseOutcome, StoreError,
};
use progressdb_kms::metrics::StoreMetrics;
use testkit::pg::PgCluster;

fn record(n: u8, thread: &str) -> KeyRecord {
    KeyRecord {
        key_id: KeyId::from_random([n; 16]),
        kek_id: KekId::parse("kek").unwrap(),
        kek_version: KekVersion::FIRST,
        thread_id: ThreadId::parse(thread).unwrap(),
        created_at: 1_700_000_000 + u64::from(n),
        state: KeyState::Active {
            wrapped: WrappedDek::new(vec![n; 60]),
        },
    }
}

fn rand_bytes() -> [u8; 8] {
    let h = testkit::random_hex(8);
    let mut b = [0u8; 8];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap();
    }
    b
}

fn pg_config(url: &str) -> PostgresConfig {
    PostgresConfig::new(
        url.to_owned(),
        None,
        None,
        8,
        Duration::from_secs(5),
        Duration::from_millis(500),
    )
    .unwrap()
}

async fn pg_store_at(url: &str) -> AnyStore {
    AnyStore::Postgres(
        PostgresStore::open(&pg_config(url), StoreMetrics::default())
            .await
            .unwrap(),
    )
}

fn entry(seq: u64, action: &str) -> AuditEntry {
    AuditEntry {
        seq,
        at: 1_700_000_000 + seq,
        action: action.to_owned(),
        actor: "test".into(),
        outcome: "ok".into(),
        detail: Default::default(),
        mac: format!("{seq:064x}"),
    }
}

fn head(seq: u64) -> AuditHead {
    AuditHead {
        seq,
        mac: [u8::try_from(seq % 256).unwrap(); 32],
    }
}

/// Appends entries `from..=to` on `prev`, with `records`, and waits for the commit.
async fn append(
    s: &AnyStore,
    prev: Option<AuditHead>,
    to: u64,
    chained: Vec<String>,
    records: Vec<KeyRecord>,
) -> Result<(), StoreError> {
    let from = prev.map_or(1, |h| h.seq + 1);
    let entries = (from..=to).map(|i| entry(i, "test.append")).collect();
    s.queue_audit(entries, prev, head(to), chained, records)
        .await?
        .await
}

mod cases {
    use super::*;

    pub(crate) async fn put_get_and_refuse_a_second_put(s: Arc<AnyStore>) {
        let r = record(1, "t1");
        assert!(s.get(&r.key_id).await.unwrap().is_none());
        s.put_new(r.clone()).await.unwrap();
        assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r.clone()));
        let mut other = record(1, "t-other");
        other.created_at = 5;
        assert!(matches!(
            s.put_new(other).await,
            Err(StoreError::AlreadyExists(k)) if k == r.key_id
        ));
        assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r), "unchanged");
        assert_eq!(s.key_count().await.unwrap(), 1);
        s.check().await.unwrap();
    }

    pub(crate) async fn compare_and_swap_only_on_the_expected_record(s: Arc<AnyStore>) {
        let r = record(2, "t2");
        s.put_new(r.clone()).await.unwrap();
        let mut v2 = r.clone();
        v2.kek_version = KekVersion::new(2).unwrap();
        v2.state = KeyState::Active {
            wrapped: WrappedDek::new(vec![9; 60]),
        };
        s.compare_and_swap(&r, v2.clone()).await.unwrap();
        assert_eq!(s.get(&r.key_id).await.unwrap(), Some(v2.clone()));
        // A stale expectation writes nothing.
        let mut v3 = v2.clone();
        v3.created_at = 1;
        assert!(matches!(
            s.compare_and_swap(&r, v3.clone()).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.get(&r.key_id).await.unwrap(), Some(v2.clone()));
        // Unknown key; a new record under another id.
        let ghost = record(3, "t3");
        assert!(matches!(
            s.compare_and_swap(&ghost, ghost.clone()).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.compare_and_swap(&v2, ghost).await,
            Err(StoreError::Conflict(_))
        ));
    }

    pub(crate) async fn list_pages_in_key_order(s: Arc<AnyStore>) {
        let mut ids = Vec::new();
        for n in (10..60).rev() {
            let r = record(n, &format!("t{n}"));
            ids.push(r.key_id.clone());
            s.put_new(r).await.unwrap();
        }
        ids.sort();
        let mut seen = Vec::new();
        let mut after: Option<KeyId> = None;
        loop {
            let page = s.list(after.as_ref(), 7).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 7);
            after = page.last().map(|r| r.key_id.clone());
            seen.extend(page.into_iter().map(|r| r.key_id));
        }
        assert_eq!(seen, ids);
        assert_eq!(s.key_count().await.unwrap(), 50);
    }

    pub(crate) async fn destroy_is_idempotent_and_drops_the_wrapped_dek(s: Arc<AnyStore>) {
        let r = record(4, "t4");
        s.put_new(r.clone()).await.unwrap();
        assert_eq!(
            s.mark_destroyed(&r.key_id).await.unwrap(),
            DestroyOutcome::Destroyed
        );
        let got = s.get(&r.key_id).await.unwrap().unwrap();
        assert!(got.wrapped().is_none());
        assert!(matches!(got.state, KeyState::Destroyed { .. }));
        assert_eq!(
            s.mark_destroyed(&r.key_id).await.unwrap(),
            DestroyOutcome::AlreadyDestroyed
        );
        assert_eq!(
            s.mark_destroyed(&record(5, "t5").key_id).await.unwrap(),
            DestroyOutcome::Unknown
        );
        // A rewrap prepared before the destroy cannot bring the key back.
        let mut rewrapped = r.clone();
        rewrapped.kek_version = KekVersion::new(2).unwrap();
        assert!(matches!(
            s.compare_and_swap(&r, rewrapped).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(s.get(&r.key_id).await.unwrap().unwrap().wrapped().is_none());
    }

    pub(crate) async fn a_rewrap_racing_a_destroy_never_resurrects(s: Arc<AnyStore>) {
        for round in 0..20u8 {
            let r = record(100 + round, "race");
            s.put_new(r.clone()).await.unwrap();
            let mut rewrapped = r.clone();
            rewrapped.kek_version = KekVersion::new(2).unwrap();
            let (a, b) = (s.clone(), s.clone());
            let (r1, k) = (r.clone(), r.key_id.clone());
            let cas = tokio::spawn(async move { a.compare_and_swap(&r1, rewrapped).await });
            let destroy = tokio::spawn(async move { b.mark_destroyed(&k).await });
            let _ = cas.await.unwrap();
            assert_eq!(destroy.await.unwrap().unwrap(), DestroyOutcome::Destroyed);
            let got = s.get(&r.key_id).await.unwrap().unwrap();
            assert!(got.wrapped().is_none(), "round {round}: resurrected");
        }
    }

    pub(crate) async fn concurrent_creates_are_all_durable(s: Arc<AnyStore>) {
        let mut tasks = Vec::new();
        for n in 0..64u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = record(n, "many");
                r.key_id =
                    KeyId::from_random([n, 0xee, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
                s.put_new(r.clone()).await.map(|()| r)
            }));
        }
        for t in tasks {
            let r = t.await.unwrap().unwrap();
            assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r));
        }
        assert_eq!(s.key_count().await.unwrap(), 64);
    }

    pub(crate) async fn kek_versions_are_replaced_and_ordered(s: Arc<AnyStore>) {
        assert!(s.kek_versions().await.unwrap().is_empty());
        for v in [3u32, 1, 2] {
            s.put_kek_version(KekVersionRecord {
                version: KekVersion::new(v).unwrap(),
                state: KekState::Active,
                created_at: u64::from(v),
                retired_at: None,
                destroyed_at: None,
            })
            .await
            .unwrap();
        }
        s.put_kek_version(KekVersionRecord {
            version: KekVersion::new(1).unwrap(),
            state: KekState::Retired,
            created_at: 1,
            retired_at: Some(9),
            destroyed_at: None,
        })
        .await
        .unwrap();
        let got = s.kek_versions().await.unwrap();
        let versions: Vec<u32> = got.iter().map(|r| r.version.get()).collect();
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(got[0].state, KekState::Retired);
        assert_eq!(got[0].retired_at, Some(9));
    }

    pub(crate) async fn jobs_are_replaced_and_oldest_first(s: Arc<AnyStore>) {
        let job = |created_at: u64, state: JobState| Job {
            id: JobId::from_random(rand_bytes()),
            kind: JobKind::Verify,
            state,
            cursor: None,
            progress: JobProgress::default(),
            created_at,
            updated_at: created_at,
            finished_at: None,
        };
        let late = job(20, JobState::Verifying);
        let early = job(10, JobState::Verifying);
        s.put_job(late.clone()).await.unwrap();
        s.put_job(early.clone()).await.unwrap();
        let mut done = late.clone();
        done.state = JobState::Succeeded;
        s.put_job(done.clone()).await.unwrap();
        assert_eq!(s.jobs().await.unwrap(), vec![early, done]);
    }

    pub(crate) async fn leases_exclude_expire_and_fence_job_writes(s: Arc<AnyStore>) {
        // Whatever must still be held is held for a minute (a stalled machine cannot make it
        // lapse); a lapse is a holder's renewal for `short`, then a wait of more than that
        // (leases run on the database's clock, on this machine: a sleep is at least as long).
        let ttl = Duration::from_secs(60);
        let short = Duration::from_millis(300);
        let lapse = || tokio::time::sleep(short + Duration::from_millis(150));
        let job = Job {
            id: JobId::from_random(rand_bytes()),
            kind: JobKind::Verify,
            state: JobState::Verifying,
            cursor: None,
            progress: JobProgress::default(),
            created_at: 1,
            updated_at: 1,
            finished_at: None,
        };
        let name = format!("job/{}", job.id);
        assert_eq!(
            s.acquire_lease(&name, "a", ttl).await.unwrap(),
            LeaseOutcome::Acquired
        );
        assert_eq!(
            s.acquire_lease(&name, "a", ttl).await.unwrap(),
            LeaseOutcome::Renewed
        );
        assert_eq!(
            s.acquire_lease(&name, "b", ttl).await.unwrap(),
            LeaseOutcome::HeldBy("a".into())
        );
        // Another lease is independent.
        assert_eq!(
            s.acquire_lease("admin", "b", ttl).await.unwrap(),
            LeaseOutcome::Acquired
        );
        // Only the holder's fenced write lands, and it extends the lease.
        s.put_job_leased(job.clone(), &name, "a", ttl)
            .await
            .unwrap();
        let mut by_b = job.clone();
        by_b.progress.scanned = 99;
        assert!(matches!(
            s.put_job_leased(by_b.clone(), &name, "b", ttl).await,
            Err(StoreError::LeaseLost(n)) if n == name
        ));
        assert_eq!(s.jobs().await.unwrap(), vec![job.clone()]);
        // Expired: b takes over, and a's stale write is refused from then on.
        assert_eq!(
            s.acquire_lease(&name, "a", short).await.unwrap(),
            LeaseOutcome::Renewed
        );
        lapse().await;
        assert_eq!(
            s.acquire_lease(&name, "b", ttl).await.unwrap(),
            LeaseOutcome::Acquired
        );
        let mut by_a = job.clone();
        by_a.progress.scanned = 7;
        assert!(matches!(
            s.put_job_leased(by_a, &name, "a", ttl).await,
            Err(StoreError::LeaseLost(_))
        ));
        s.put_job_leased(by_b.clone(), &name, "b", ttl)
            .await
            .unwrap();
        assert_eq!(s.jobs().await.unwrap(), vec![by_b]);
        // A lease that lapsed and is taken again by its old holder is not a renewal.
        assert_eq!(
            s.acquire_lease(&name, "b", short).await.unwrap(),
            LeaseOutcome::Renewed
        );
        lapse().await;
        assert_eq!(
            s.acquire_lease(&name, "b", ttl).await.unwrap(),
            LeaseOutcome::Acquired
        );
        // Release: only by the holder; then anyone takes it at once.
        s.release_lease(&name, "a").await.unwrap();
        assert_eq!(
            s.acquire_lease(&name, "a", ttl).await.unwrap(),
            LeaseOutcome::HeldBy("b".into())
        );
        s.release_lease(&name, "b").await.unwrap();
        s.release_lease(&name, "b").await.unwrap();
        assert_eq!(
            s.acquire_lease(&name, "a", ttl).await.unwrap(),
            LeaseOutcome::Acquired
        );
        // Writing without ever holding the lease is refused too.
        assert!(matches!(
            s.put_job_leased(job.clone(), "job/none", "a", ttl).await,
            Err(StoreError::LeaseLost(_))
        ));
    }

    /// A compaction removes the entries through the anchor and the tombstones destroyed by
    /// its time, keeps everything else, records the anchor, and refuses (removing nothing) an
    /// anchor beyond the head, at or before the stored one, or whose MAC is not the entry's.
    pub(crate) async fn audit_compaction_removes_a_prefix_and_old_tombstones_only(
        s: Arc<AnyStore>,
    ) {
        let tombstone = |n: u8, at: u64| KeyRecord {
            state: KeyState::Destroyed { destroyed_at: at },
            ..record(n, "gone")
        };
        let (old, kept, live) = (tombstone(21, 100), tombstone(22, 200), record(23, "live"));
        append(
            &s,
            None,
            6,
            vec![],
            vec![old.clone(), kept.clone(), live.clone()],
        )
        .await
        .unwrap();
        let cutoff = 150;
        assert_eq!(s.audit_anchor().await.unwrap(), None);
        let anchor = |seq: u64, mac: [u8; 32]| AuditAnchor {
            seq,
            mac,
            seal: [7; 32],
        };
        // The stored entry 4's MAC is the one `entry` wrote: 4 as 64 hex digits.
        let mac4 = {
            let mut m = [0u8; 32];
            m[31] = 4;
            m
        };
        for bad in [anchor(7, [0; 32]), anchor(4, [9; 32])] {
            assert!(matches!(
                s.compact_audit(bad, cutoff).await,
                Err(StoreError::AuditHeadMoved)
            ));
        }
        assert_eq!(
            s.audit_range(0, 100).await.unwrap().len(),
            6,
            "nothing removed"
        );
        let done = s.compact_audit(anchor(4, mac4), cutoff).await.unwrap();
        assert_eq!((done.entries, done.tombstones), (4, 1));
        let left: Vec<u64> = s
            .audit_range(0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(left, vec![5, 6]);
        assert_eq!(s.audit_anchor().await.unwrap(), Some(anchor(4, mac4)));
        assert_eq!(s.audit_head().await.unwrap(), Some(head(6)));
        assert!(
            s.get(&old.key_id).await.unwrap().is_none(),
            "old tombstone removed"
        );
        assert!(matches!(
            s.get(&kept.key_id).await.unwrap().unwrap().state,
            KeyState::Destroyed { .. }
        ));
        assert_eq!(s.get(&live.key_id).await.unwrap(), Some(live.clone()));
        // Again at or before the anchor: refused.
        assert!(matches!(
            s.compact_audit(anchor(4, mac4), u64::MAX).await,
            Err(StoreError::AuditHeadMoved)
        ));
        assert!(s.get(&kept.key_id).await.unwrap().is_some());
        // Appends go on after the anchor.
        append(&s, Some(head(6)), 7, vec![], vec![]).await.unwrap();
        assert_eq!(s.audit_range(4, 100).await.unwrap().len(), 3);
    }

    pub(crate) async fn audit_appends_chain_on_the_stored_head_only(s: Arc<AnyStore>) {
        assert_eq!(s.audit_head().await.unwrap(), None);
        let r = record(7, "audited");
        append(&s, None, 3, vec![], vec![r.clone()]).await.unwrap();
        assert_eq!(s.audit_head().await.unwrap(), Some(head(3)));
        assert_eq!(
            s.get(&r.key_id).await.unwrap(),
            Some(r.clone()),
            "record shares the commit"
        );
        // On a stale head, or again on none: nothing written.
        assert!(matches!(
            append(&s, None, 2, vec![], vec![]).await,
            Err(StoreError::AuditHeadMoved)
        ));
        assert!(matches!(
            append(&s, Some(head(2)), 5, vec![], vec![]).await,
            Err(StoreError::AuditHeadMoved)
        ));
        // A record that exists: the whole append is refused, entries included.
        let fresh = record(8, "fresh");
        assert!(matches!(
            append(&s, Some(head(3)), 5, vec![], vec![fresh.clone(), r.clone()]).await,
            Err(StoreError::AlreadyExists(k)) if k == r.key_id
        ));
        assert!(
            s.get(&fresh.key_id).await.unwrap().is_none(),
            "nothing of it written"
        );
        // One key id twice in a group: refused the same way.
        assert!(matches!(
            append(&s, Some(head(3)), 5, vec![], vec![fresh.clone(), fresh.clone()]).await,
            Err(StoreError::AlreadyExists(k)) if k == fresh.key_id
        ));
        assert!(s.get(&fresh.key_id).await.unwrap().is_none());
        assert_eq!(s.audit_head().await.unwrap(), Some(head(3)));
        assert_eq!(s.audit_range(0, 100).await.unwrap().len(), 3);
        // Pending entries: chained once, removed by that append, never chained twice.
        s.put_pending_audit(entry(0, "hsm.pin_rejected"))
            .await
            .unwrap();
        let pending = s.pending_audits(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].1.as_ref().unwrap().action, "hsm.pin_rejected");
        let key = pending[0].0.clone();
        append(&s, Some(head(3)), 5, vec![key.clone()], vec![])
            .await
            .unwrap();
        assert!(s.pending_audits(10).await.unwrap().is_empty());
        assert!(matches!(
            append(&s, Some(head(5)), 6, vec![key], vec![]).await,
            Err(StoreError::AuditHeadMoved)
        ));
        assert_eq!(s.audit_head().await.unwrap(), Some(head(5)));
        // Ranges page in order, as stored.
        let all = s.audit_range(0, 100).await.unwrap();
        assert_eq!(
            all.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let page = s.audit_range(2, 2).await.unwrap();
        assert_eq!(page.iter().map(|(q, _)| *q).collect::<Vec<_>>(), [3, 4]);
        let decoded: AuditEntry = serde_json::from_slice(&page[0].1).unwrap();
        assert_eq!(decoded, entry(3, "test.append"));
    }

    pub(crate) async fn queued_appends_apply_in_queue_order(s: Arc<AnyStore>) {
        // Queue ten groups, each chained on the previous one, before awaiting any commit.
        let mut commits = Vec::new();
        let mut prev = None;
        for g in 1..=10u64 {
            let to = g * 3;
            let from = prev.map_or(1, |h: AuditHead| h.seq + 1);
            let entries = (from..=to).map(|i| entry(i, "queued")).collect();
            commits.push(
                s.queue_audit(entries, prev, head(to), vec![], vec![])
                    .await
                    .unwrap(),
            );
            prev = Some(head(to));
        }
        for c in commits {
            c.await.unwrap();
        }
        assert_eq!(s.audit_head().await.unwrap(), Some(head(30)));
        assert_eq!(s.audit_range(0, 1000).await.unwrap().len(), 30);
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_lmdb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = LmdbStore::open(dir.path(), 64, StoreMetrics::default()).unwrap();
                    super::cases::$case(Arc::new(AnyStore::Lmdb(store))).await;
                }
            )*
            use super::*;
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let url = PgCluster::shared().new_database();
                    super::cases::$case(Arc::new(pg_store_at(&url).await)).await;
                }
            )*
            use super::*;
        }
    };
}

conformance!(
    put_get_and_refuse_a_second_put,
    compare_and_swap_only_on_the_expected_record,
    list_pages_in_key_order,
    destroy_is_idempotent_and_drops_the_wrapped_dek,
    a_rewrap_racing_a_destroy_never_resurrects,
    concurrent_creates_are_all_durable,
    kek_versions_are_replaced_and_ordered,
    jobs_are_replaced_and_oldest_first,
    leases_exclude_expire_and_fence_job_writes,
    audit_appends_chain_on_the_stored_head_only,
    audit_compaction_removes_a_prefix_and_old_tombstones_only,
    queued_appends_apply_in_queue_order,
);

// ---- PostgreSQL only ---------------------------------------------------------------------

#[tokio::test]
async fn migrations_are_versioned_applied_once_and_a_newer_schema_is_refused() {
    let pg = PgCluster::shared();
    let url = pg.new_database();
    let dbname = url.rsplit("dbname=").next().unwrap().to_owned();
    // Two replicas starting at once: one applies the migrations, the other finds them.
    let (a, b) = tokio::join!(pg_store_at(&url), pg_store_at(&url));
    drop((a, b));
    assert_eq!(
        pg.psql(
            &dbname,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM kms_schema_migrations"
        ),
        (1..=progressdb_kms::keystore::postgres::SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(
        progressdb_kms::keystore::postgres::MIGRATIONS
            .last()
            .unwrap()
            .0,
        progressdb_kms::keystore::postgres::SCHEMA_VERSION
    );
    // A schema from a newer KMS: refused, naming why.
    pg.psql(
        &dbname,
        "INSERT INTO kms_schema_migrations (version, description) VALUES (99, 'future')",
    );
    let e = PostgresStore::open(&pg_config(&url), StoreMetrics::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("newer than this binary knows"),
        "{e}"
    );
    assert!(!e.to_string().contains("password"), "{e}");
}

#[tokio::test]
async fn a_server_whose_commits_are_not_durable_is_refused() {
    let pg = PgCluster::start_with(false, &["fsync=off"]);
    let url = pg.new_database();
    let e = PostgresStore::open(&pg_config(&url), StoreMetrics::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fsync = off"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_see_each_other_and_never_fork_the_audit_log() {
    let url = PgCluster::shared().new_database();
    let a = Arc::new(pg_store_at(&url).await);
    let b = Arc::new(pg_store_at(&url).await);
    let r = record(1, "shared");
    a.put_new(r.clone()).await.unwrap();
    assert_eq!(b.get(&r.key_id).await.unwrap(), Some(r.clone()));
    assert!(matches!(
        b.put_new(r.clone()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    // A destroy on one makes a rewrap prepared on the other fail.
    assert_eq!(
        b.mark_destroyed(&r.key_id).await.unwrap(),
        DestroyOutcome::Destroyed
    );
    let mut rewrapped = r.clone();
    rewrapped.kek_version = KekVersion::new(2).unwrap();
    assert!(matches!(
        a.compare_and_swap(&r, rewrapped).await,
        Err(StoreError::Conflict(_))
    ));
    // Both append on the same head at once: exactly one wins, the log has no fork.
    for round in 0..10u64 {
        let prev = a.audit_head().await.unwrap();
        let to = prev.map_or(0, |h| h.seq) + 2;
        let (ra, rb) = tokio::join!(
            append(&a, prev, to, vec![], vec![]),
            append(&b, prev, to, vec![], vec![])
        );
        assert!(
            ra.is_ok() ^ rb.is_ok(),
            "round {round}: exactly one append wins ({ra:?}, {rb:?})"
        );
        let lost = if ra.is_ok() { rb } else { ra };
        assert!(matches!(lost, Err(StoreError::AuditHeadMoved)), "{lost:?}");
        assert_eq!(a.audit_head().await.unwrap(), Some(head(to)));
    }
    let seqs: Vec<u64> = a
        .audit_range(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_planted_or_moved_row_is_refused_not_used() {
    let pg = PgCluster::shared();
    let url = pg.new_database();
    let dbname = url.rsplit("dbname=").next().unwrap().to_owned();
    let s = pg_store_at(&url).await;
    let a = record(1, "a");
    let b = record(2, "b");
    s.put_new(a.clone()).await.unwrap();
    s.put_new(b.clone()).await.unwrap();
    // b's record copied under a's key id: a record naming another key is corrupt.
    pg.psql(
        &dbname,
        &format!(
            "UPDATE kms_key_records SET record = (SELECT record FROM kms_key_records WHERE key_id = '{}') WHERE key_id = '{}'",
            b.key_id, a.key_id
        ),
    );
    assert!(matches!(
        s.get(&a.key_id).await,
        Err(StoreError::Corrupt { .. })
    ));
    // Garbage in place of a record.
    pg.psql(
        &dbname,
        &format!(
            "UPDATE kms_key_records SET record = '\\x00ff' WHERE key_id = '{}'",
            b.key_id
        ),
    );
    assert!(matches!(
        s.get(&b.key_id).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        s.list(None, 10).await,
        Err(StoreError::Corrupt { .. })
    ));
    // A head whose MAC is not 32 bytes.
    pg.psql(&dbname, "UPDATE kms_audit_head SET seq = 1, mac = '\\x00'");
    assert!(matches!(
        s.audit_head().await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_gives_io_errors_then_the_store_recovers_by_itself() {
    let pg = PgCluster::start();
    let url = pg.new_database();
    let s = pg_store_at(&url).await;
    let r = record(1, "before");
    s.put_new(r.clone()).await.unwrap();
    pg.stop();
    let e = s.put_new(record(2, "during")).await.unwrap_err();
    assert!(matches!(e, StoreError::Io(_)), "{e:?}");
    assert!(s.check().await.is_err());
    pg.start_server();
    // Pooled connections broken by the restart are replaced; no reopen of the store.
    let mut ok = false;
    for _ in 0..50 {
        if s.check().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the store did not recover");
    s.put_new(record(3, "after")).await.unwrap();
    assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r));
    assert!(s.get(&record(2, "during").key_id).await.unwrap().is_none());
    // The audit writer recovers too.
    append(&s, None, 2, vec![], vec![]).await.unwrap();
}

/// Two replicas destroy a key each; the destroy that took the lower `seq` commits last. A
/// feed that advanced by `seq` read the second destroy, moved past the first one's `seq`
/// while its transaction was open, and never delivered it (the other replica kept serving
/// the destroyed DEK from its cache until the TTL).
#[tokio::test]
async fn the_change_feed_delivers_destroys_whose_commits_are_reordered() {
    let url = PgCluster::shared().new_database();
    let reader = pg_store_at(&url).await;
    let first = record(1, "t1");
    let second = record(2, "t2");
    reader.put_new(first.clone()).await.unwrap();
    reader.put_new(second.clone()).await.unwrap();
    let start = reader.changes_after(None, 10).await.unwrap();

    // Each "replica" is a connection of its own, running the store's destroy statement
    // inside a transaction the test commits when it chooses.
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let (a, b) = (connect().await, connect().await);
    let destroy = "INSERT INTO kms_changes (kind, subject) VALUES ('key_destroyed', $1) \
                   RETURNING seq";
    a.batch_execute("BEGIN").await.unwrap();
    let seq_a: i64 = a
        .query_one(destroy, &[&first.key_id.as_str()])
        .await
        .unwrap()
        .get(0);
    b.batch_execute("BEGIN").await.unwrap();
    let seq_b: i64 = b
        .query_one(destroy, &[&second.key_id.as_str()])
        .await
        .unwrap()
        .get(0);
    assert!(seq_a < seq_b);
    b.batch_execute("COMMIT").await.unwrap();

    // The later seq is committed, the earlier is not yet.
    let mut seen = Vec::new();
    let page = reader.changes_after(Some(start.cursor), 10).await.unwrap();
    seen.extend(page.changes);
    assert!(
        seen.contains(&progressdb_kms::keystore::Change::KeyDestroyed(
            second.key_id.clone()
        )),
        "a committed destroy is delivered at once: {seen:?}"
    );
    let mut cursor = page.cursor;
    // Polls while the first transaction is still open move nothing past it.
    for _ in 0..3 {
        let page = reader.changes_after(Some(cursor), 10).await.unwrap();
        cursor = page.cursor;
        seen.extend(page.changes);
    }
    // More committed changes above the open transaction than a page holds: a page of one
    // still delivers them all (paging could not move past the open transaction).
    let extra: Vec<KeyRecord> = (10..13).map(|n| record(n, "tx")).collect();
    for r in &extra {
        b.query_one(destroy, &[&r.key_id.as_str()]).await.unwrap();
    }
    let page = reader.changes_after(Some(cursor), 1).await.unwrap();
    for r in &extra {
        assert!(
            page.changes
                .contains(&progressdb_kms::keystore::Change::KeyDestroyed(
                    r.key_id.clone()
                )),
            "{:?}",
            page.changes
        );
    }
    assert!(!page.more);
    a.batch_execute("COMMIT").await.unwrap();
    let page = reader.changes_after(Some(cursor), 10).await.unwrap();
    seen.extend(page.changes);
    assert!(
        seen.contains(&progressdb_kms::keystore::Change::KeyDestroyed(
            first.key_id.clone()
        )),
        "the destroy that committed last is delivered too: {seen:?}"
    );
    settles(&reader, page.cursor).await;
}

/// Once the transactions that made them have ended (on the whole cluster: tests running
/// beside this one hold the horizon back for a moment), delivered changes are not delivered
/// again.
async fn settles(store: &AnyStore, mut cursor: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = store.changes_after(Some(cursor), 10).await.unwrap();
        assert!(!page.more);
        if page.changes.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "changes delivered again after 10 s: {:?}",
            page.changes
        );
        cursor = page.cursor;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_change_feed_lists_destroys_and_kek_changes_in_order() {
    let url = PgCluster::shared().new_database();
    let a = pg_store_at(&url).await;
    let b = pg_store_at(&url).await;
    let start = b.changes_after(None, 10).await.unwrap();
    assert!(start.changes.is_empty());
    let r = record(1, "t");
    a.put_new(r.clone()).await.unwrap();
    a.mark_destroyed(&r.key_id).await.unwrap();
    // Idempotent: a second destroy records nothing.
    a.mark_destroyed(&r.key_id).await.unwrap();
    a.put_kek_version(KekVersionRecord {
        version: KekVersion::new(2).unwrap(),
        state: KekState::Retired,
        created_at: 1,
        retired_at: Some(2),
        destroyed_at: None,
    })
    .await
    .unwrap();
    let page = b.changes_after(Some(start.cursor), 10).await.unwrap();
    assert_eq!(
        page.changes,
        vec![
            progressdb_kms::keystore::Change::KeyDestroyed(r.key_id.clone()),
            progressdb_kms::keystore::Change::KekVersion(KekVersion::new(2).unwrap()),
        ]
    );
    let one = b.changes_after(Some(start.cursor), 1).await.unwrap();
    if one.more {
        // The horizon is past the first change's transaction: pages of `limit`.
        assert_eq!(one.changes.len(), 1, "pages of `limit`");
        let rest = b.changes_after(Some(one.cursor), 10).await.unwrap();
        assert!(rest
            .changes
            .contains(&progressdb_kms::keystore::Change::KekVersion(
                KekVersion::new(2).unwrap()
            )));
    } else {
        // A transaction of a test running beside this one holds the cluster-wide horizon
        // below both: a page the cursor cannot pass is read whole.
        assert_eq!(one.changes, page.changes);
    }
    settles(&b, page.cursor).await;
    // LMDB has no other writer: its feed is always empty.
    let dir = tempfile::tempdir().unwrap();
    let l = AnyStore::Lmdb(LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap());
    assert!(l
        .changes_after(Some(0), 10)
        .await
        .unwrap()
        .changes
        .is_empty());
}

/// Over TCP the store speaks TLS only, verifies the server by `store.ca_file`, and
/// authenticates with the password from a 0600 file: the pooled sessions are TLS sessions
/// (pg_stat_ssl), a server certificate from another CA, a wrong password and a server that
/// offers no TLS are refused at open, and no error shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_the_store_uses_verified_tls_and_a_password_file() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = testkit::Certs::generate(&tmp.path().join("certs"));
    let password = "pw-9f3c1e7a-not-in-logs";
    let pg = PgCluster::start_tls(&certs, password);
    let url = pg.new_database();
    let db = url.rsplit("dbname=").next().unwrap().to_owned();
    let tcp = pg.tcp_url(&db);
    let pw_file = tmp.path().join("pg.pw");
    testkit::write_secret(&pw_file, password.as_bytes());
    let cfg = |ca: &std::path::Path, pw: &std::path::Path, url: &str| {
        PostgresConfig::new(
            url.to_owned(),
            Some(pw.to_owned()),
            Some(ca.to_owned()),
            2,
            Duration::from_secs(5),
            Duration::from_millis(500),
        )
        .unwrap()
    };
    let store = AnyStore::Postgres(
        PostgresStore::open(&cfg(&certs.ca, &pw_file, &tcp), StoreMetrics::default())
            .await
            .unwrap(),
    );
    let r = record(42, "over-tls");
    store.put_new(r.clone()).await.unwrap();
    assert_eq!(store.get(&r.key_id).await.unwrap(), Some(r));
    let tls_sessions: u32 = pg
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = '{db}' AND s.ssl"
            ),
        )
        .parse()
        .unwrap();
    let plain_sessions: u32 = pg
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = '{db}' AND NOT s.ssl"
            ),
        )
        .parse()
        .unwrap();
    assert!(tls_sessions >= 1, "no TLS session");
    assert_eq!(plain_sessions, 0, "a plain-text session");

    let refused = |e: StoreError| {
        let text = e.to_string();
        assert!(matches!(e, StoreError::Open { .. }), "{text}");
        assert!(!text.contains(password), "the password leaked: {text}");
        text
    };
    // A server certificate the configured CA did not sign.
    let e = PostgresStore::open(
        &cfg(&certs.other_ca, &pw_file, &tcp),
        StoreMetrics::default(),
    )
    .await
    .unwrap_err();
    let text = refused(e);
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    // A wrong password.
    let bad_pw = tmp.path().join("bad.pw");
    testkit::write_secret(&bad_pw, b"not-the-password");
    let text = refused(
        PostgresStore::open(&cfg(&certs.ca, &bad_pw, &tcp), StoreMetrics::default())
            .await
            .unwrap_err(),
    );
    assert!(text.contains("password"), "{text}");
    // A server on TCP that offers no TLS: with a CA configured the store never falls back to
    // plain text.
    let plain = PgCluster::start_with(true, &[]);
    let plain_url = plain.tcp_url("postgres");
    refused(
        PostgresStore::open(
            &cfg(&certs.ca, &pw_file, &plain_url),
            StoreMetrics::default(),
        )
        .await
        .unwrap_err(),
    );
}

/// Waits (at most 10 s) until a session of the database at `url` waits for an advisory
/// lock.
async fn wait_for_an_advisory_lock_wait(url: &str) {
    let db = url
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .unwrap()
        .to_owned();
    let sql = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = '{db}'"
    );
    let t = std::time::Instant::now();
    loop {
        let sql = sql.clone();
        let waiting =
            tokio::task::spawn_blocking(move || PgCluster::shared().psql("postgres", &sql))
                .await
                .unwrap();
        if waiting != "0" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no session waits for the audit turn"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A replica whose request goes away while it waits for its audit turn must not keep the
/// turn: the wait is abandoned, the turn comes free for everyone else once its holder ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_wait_for_the_audit_turn_never_keeps_it() {
    let url = PgCluster::shared().new_database();
    let (a, b, c) = (
        pg_store_at(&url).await,
        Arc::new(pg_store_at(&url).await),
        pg_store_at(&url).await,
    );
    let held = a.lock_audit().await.unwrap();
    assert!(held.is_shared());
    // b waits for the turn, and its caller goes away (a dropped request).
    let waiting = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.lock_audit().await.map(drop) })
    };
    // Until b's session is queued for the lock (an event, not a moment).
    wait_for_an_advisory_lock_wait(&url).await;
    waiting.abort();
    let _ = waiting.await;
    held.release().await;
    // The turn is free: c gets it at once, and b too after it.
    let t = std::time::Instant::now();
    let turn = tokio::time::timeout(Duration::from_secs(3), c.lock_audit())
        .await
        .expect("the audit turn was kept by an abandoned wait")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    turn.release().await;
    let turn = tokio::time::timeout(Duration::from_secs(3), b.lock_audit())
        .await
        .unwrap()
        .unwrap();
    turn.release().await;
    // b's pool is sound: it appends.
    append(&b, None, 1, vec![], vec![]).await.unwrap();
}

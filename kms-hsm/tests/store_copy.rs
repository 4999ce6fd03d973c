//! `store copy` between real stores: an LMDB store in a temp dir and databases on a private
//! PostgreSQL cluster (`testkit::pg`). A full state (active and destroyed records, KEK
//! versions, jobs, a multi-page audit log, pending entries) goes LMDB → PostgreSQL → LMDB and
//! comes back equal; a non-empty target, a source whose audit head is not its last entry, and
//! a copy that differs are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kms_api::admin::{AuditEntry, Job, JobId, JobKind, JobProgress, JobState};
use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use progressdb_kms::config::PostgresConfig;
use progressdb_kms::keystore::lmdb::LmdbStore;
use progressdb_kms::keystore::postgres::PostgresStore;
use progressdb_kms::keystore::{
    AnyStore, AuditHead, KekState, KekVersionRecord, KeyRecord, KeyState, KeyStore,
};
use progressdb_kms::metrics::StoreMetrics;
use progressdb_kms::storecopy::{self, CopyError};
use testkit::pg::PgCluster;

fn lmdb(dir: &std::path::Path) -> AnyStore {
    AnyStore::Lmdb(LmdbStore::open(dir, 64, StoreMetrics::default()).unwrap())
}

async fn pg(url: &str) -> AnyStore {
    let cfg = PostgresConfig::new(
        url.to_owned(),
        None,
        None,
        4,
        Duration::from_secs(5),
        Duration::from_millis(500),
    )
    .unwrap();
    AnyStore::Postgres(
        PostgresStore::open(&cfg, StoreMetrics::default())
            .await
            .unwrap(),
    )
}

fn record(i: u32) -> KeyRecord {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    KeyRecord {
        key_id: KeyId::from_random(id),
        kek_id: KekId::parse("kek").unwrap(),
        kek_version: KekVersion::new(1 + i % 2).unwrap(),
        thread_id: ThreadId::parse(&format!("t{i}")).unwrap(),
        created_at: 1_700_000_000 + u64::from(i),
        state: if i.is_multiple_of(7) {
            KeyState::Destroyed {
                destroyed_at: 1_800_000_000,
            }
        } else {
            KeyState::Active {
                wrapped: WrappedDek::new(vec![(i % 251) as u8; 60]),
            }
        },
    }
}

fn entry(seq: u64) -> AuditEntry {
    AuditEntry {
        seq,
        at: 1_700_000_000 + seq,
        action: "key.create".into(),
        actor: "test".into(),
        outcome: "ok".into(),
        detail: [("n".to_owned(), seq.to_string())].into_iter().collect(),
        mac: format!("{seq:064x}"),
    }
}

fn head(seq: u64) -> AuditHead {
    let mut mac = [0u8; 32];
    mac[24..].copy_from_slice(&seq.to_be_bytes());
    AuditHead { seq, mac }
}

/// 1,300 records (every seventh destroyed), two KEK versions, two jobs, 1,100 audit entries
/// in uneven groups, two pending entries.
async fn fill(s: &AnyStore) {
    for chunk in (0..1300).collect::<Vec<u32>>().chunks(100) {
        for r in futures_util::future::join_all(chunk.iter().map(|i| s.put_new(record(*i)))).await {
            r.unwrap();
        }
    }
    for (v, state) in [(1, KekState::Retired), (2, KekState::Active)] {
        s.put_kek_version(KekVersionRecord {
            version: KekVersion::new(v).unwrap(),
            state,
            created_at: 10 * u64::from(v),
            retired_at: (state == KekState::Retired).then_some(99),
            destroyed_at: None,
        })
        .await
        .unwrap();
    }
    for (n, state) in [(1u8, JobState::Succeeded), (2, JobState::Rewrapping)] {
        s.put_job(Job {
            id: JobId::from_random([n; 8]),
            kind: JobKind::RotateKek {
                target: KekVersion::new(2).unwrap(),
            },
            state,
            cursor: Some(record(5).key_id),
            progress: JobProgress::default(),
            created_at: u64::from(n),
            updated_at: u64::from(n),
            finished_at: None,
        })
        .await
        .unwrap();
    }
    let mut prev = None;
    let mut seq = 0;
    for size in [1u64, 300, 250, 549] {
        let entries: Vec<AuditEntry> = (seq + 1..=seq + size).map(entry).collect();
        seq += size;
        s.queue_audit(entries, prev, head(seq), vec![], vec![])
            .await
            .unwrap()
            .await
            .unwrap();
        prev = Some(head(seq));
    }
    for at in [5, 6] {
        let mut e = entry(0);
        e.at = at;
        e.action = "hsm.pin_rejected".into();
        e.mac = String::new();
        s.put_pending_audit(e).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_goes_lmdb_to_postgres_and_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let source = lmdb(&dir.path().join("a"));
    fill(&source).await;
    let cluster = PgCluster::shared();
    let middle = pg(&cluster.new_database()).await;
    let report = storecopy::copy(&source, &middle).await.unwrap();
    assert_eq!(report.key_records, 1300);
    assert_eq!(report.destroyed, 186);
    assert_eq!(report.active, 1300 - 186);
    assert_eq!(report.kek_versions, 2);
    assert_eq!(report.jobs, 2);
    assert_eq!(report.audit_entries, 1100);
    assert_eq!(report.audit_head_seq, Some(1100));
    assert_eq!(report.pending_audits, 2);
    assert!(report.verified);
    // The records read the same through the other backend.
    let r = record(12);
    assert_eq!(middle.get(&r.key_id).await.unwrap(), Some(r));
    assert_eq!(middle.audit_head().await.unwrap(), Some(head(1100)));

    let back = lmdb(&dir.path().join("b"));
    let again = storecopy::copy(&middle, &back).await.unwrap();
    assert_eq!(again, report);
    storecopy::verify(&source, &back).await.unwrap();
    // A copied store keeps working: the audit log continues on the copied head.
    back.queue_audit(
        vec![entry(1101)],
        Some(head(1100)),
        head(1101),
        vec![],
        vec![],
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_not_empty_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let source = lmdb(&dir.path().join("a"));
    fill(&source).await;
    let target = pg(&PgCluster::shared().new_database()).await;
    target.put_new(record(5000)).await.unwrap();
    let e = storecopy::copy(&source, &target).await.unwrap_err();
    assert!(
        matches!(&e, CopyError::TargetNotEmpty(what) if what.contains("1 key record")),
        "{e}"
    );
    assert_eq!(target.key_count().await.unwrap(), 1);
    // Only an audit log (no records) counts too.
    let other = lmdb(&dir.path().join("c"));
    other
        .queue_audit(vec![entry(1)], None, head(1), vec![], vec![])
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(
        storecopy::copy(&source, &other).await,
        Err(CopyError::TargetNotEmpty(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_audit_head_is_not_its_last_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = lmdb(&dir.path().join("a"));
    // The head says 3 entries; only 2 are there (the tail was cut).
    source
        .queue_audit(vec![entry(1), entry(2)], None, head(3), vec![], vec![])
        .await
        .unwrap()
        .await
        .unwrap();
    let target = lmdb(&dir.path().join("b"));
    let e = storecopy::copy(&source, &target).await.unwrap_err();
    assert!(
        matches!(&e, CopyError::Source(why) if why.contains("seq 3") && why.contains("seq 2")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_names_the_first_difference() {
    let dir = tempfile::tempdir().unwrap();
    let a = lmdb(&dir.path().join("a"));
    fill(&a).await;
    let b = pg(&PgCluster::shared().new_database()).await;
    storecopy::copy(&a, &b).await.unwrap();
    // One record changed in the copy afterwards.
    let old = record(8);
    let mut changed = old.clone();
    changed.created_at += 1;
    b.compare_and_swap(&old, changed).await.unwrap();
    let e = storecopy::verify(&a, &b).await.unwrap_err();
    assert!(
        matches!(&e, CopyError::Mismatch(what) if what.contains(old.key_id.as_str())),
        "{e}"
    );
    // One extra record only in the source.
    let c = lmdb(&dir.path().join("c"));
    storecopy::copy(&a, &c).await.unwrap();
    a.put_new(record(9999)).await.unwrap();
    assert!(matches!(
        storecopy::verify(&a, &c).await,
        Err(CopyError::Mismatch(_))
    ));
}

//! Unit tests of `audit`.

use std::sync::Arc;

use super::pending::PIN_REJECTED;
use super::*;
use crate::backend::mock::MockBackend;
use crate::keystore::lmdb::LmdbStore;
use crate::metrics::StoreMetrics;
use kms_api::admin::AuditVerifyResponse;

async fn filled(n: usize) -> (tempfile::TempDir, MockBackend, LmdbStore, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), 16, StoreMetrics::default()).unwrap();
    let backend = MockBackend::new();
    let log = AuditLog::default();
    for i in 0..n {
        log.append(
            &backend,
            &store,
            AuditEvent::new("dek.create").with("key_id", format!("k{i}")),
        )
        .await
        .unwrap();
    }
    (dir, backend, store, log)
}

/// On a shared store (PostgreSQL) a turn whose commit fails, here because another
/// replica committed the same key first (a create retried after a replica died), answers
/// its caller at once: settling it used to wait for the head lock its own caller held,
/// and the create hung until its request went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_turn_on_a_shared_store_answers_at_once() {
    let url = testkit::pg::PgCluster::shared().new_database();
    let cfg = crate::config::PostgresConfig::new(
        url,
        None,
        None,
        4,
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(500),
    )
    .unwrap();
    let store = crate::keystore::postgres::PostgresStore::open(&cfg, StoreMetrics::default())
        .await
        .unwrap();
    let backend = MockBackend::new();
    let log = AuditLog::default();
    let record = crate::keystore::KeyRecord {
        key_id: kms_api::KeyId::from_random([7; 16]),
        kek_id: kms_api::KekId::parse("kek").unwrap(),
        kek_version: kms_api::KekVersion::FIRST,
        thread_id: kms_api::ThreadId::parse("t").unwrap(),
        created_at: 1_700_000_000,
        state: crate::keystore::KeyState::Active {
            wrapped: kms_api::WrappedDek::new(vec![7; 65]),
        },
    };
    // "The other replica" committed it.
    store.put_new(record.clone()).await.unwrap();
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        log.append_with(
            &backend,
            &store,
            AuditEvent::new("dek.create").with("key_id", &record.key_id),
            Some(record.clone()),
        ),
    )
    .await
    .expect("a failed audit turn hung");
    assert!(
        matches!(r, Err(AuditError::Store(StoreError::AlreadyExists(_)))),
        "{r:?}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    // And the log goes on.
    log.append(&backend, &store, AuditEvent::new("dek.destroy"))
        .await
        .unwrap();
}

/// A store writer plants pending entries: a fabricated `kek.destroy` by an operator, a
/// refused PIN with extra fields, one from the future, garbage, and a flood. Only the
/// refused PIN in its fixed form is chained (marked unverified); the rest is removed and
/// counted; no group takes more than its share of the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_pending_entries_are_refused_and_bounded() {
    let (_d, backend, store, log) = filled(1).await;
    let mut pin = pending_entry(
        AuditEvent::new(PIN_REJECTED)
            .outcome(Outcome::Failed)
            .with("token", "progressdb")
            .with("when", "start-up"),
    );
    pin.at -= 5;
    let mut forged = pin.clone();
    forged.action = "kek.destroy".into();
    forged.actor = "admin:uid:0".into();
    forged.outcome = "ok".into();
    let mut extra = pin.clone();
    extra.detail.insert("note".into(), "x".into());
    let mut future = pin.clone();
    future.at = now_secs() + 3600;
    let mut other_actor = pin.clone();
    other_actor.actor = "admin:uid:0".into();
    // Keys order by time: the legitimate entry is read first.
    store.put_pending_audit(pin.clone()).await.unwrap();
    for e in [forged, extra, future, other_actor] {
        store.put_pending_audit(e).await.unwrap();
    }
    log.append(&backend, &store, AuditEvent::new("dek.create"))
        .await
        .unwrap();
    let page = store.audit_range(1, 100).await.unwrap();
    let entries: Vec<AuditEntry> = page
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["hsm.pin_rejected", "audit.pending_refused", "dek.create"],
        "{entries:?}"
    );
    assert_eq!(entries[0].detail["pending"], "unverified");
    assert_eq!(entries[0].detail["token"], "progressdb");
    assert_eq!(entries[0].at, pin.at);
    assert_eq!(entries[1].detail["entries"], "4");
    assert!(store.pending_audits(100).await.unwrap().is_empty());
    // A flood: each append removes at most its share, and appends go on.
    for i in 0..40u64 {
        let mut e = pin.clone();
        e.action = "kek.destroy".into();
        e.at -= i;
        store.put_pending_audit(e).await.unwrap();
    }
    log.append(&backend, &store, AuditEvent::new("dek.create"))
        .await
        .unwrap();
    let left = store.pending_audits(100).await.unwrap().len();
    assert_eq!(left, 40 - MAX_PENDING_PER_GROUP);
    let v = verify(&backend, &store).await.unwrap();
    assert!(v.ok, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_chain_and_verify() {
    let (_d, backend, store, log) = filled(3).await;
    // Concurrent appends share commits and stay gapless.
    let (backend, store, log) = (Arc::new(backend), Arc::new(store), Arc::new(log));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (b, s, l) = (backend.clone(), store.clone(), log.clone());
            tokio::spawn(
                ACTOR.scope(std::sync::Arc::from(format!("uid:{i}")), async move {
                    l.append(
                        &*b,
                        &*s,
                        AuditEvent::new("admin.refused").outcome(Outcome::Refused),
                    )
                    .await
                    .unwrap();
                }),
            )
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = verify(&*backend, &*store).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.verified, v.head_seq), (23, 23));
    let page = store.audit_range(0, 100).await.unwrap();
    let seqs: Vec<u64> = page.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=23).collect::<Vec<_>>());
    let e: AuditEntry = serde_json::from_slice(&page[5].1).unwrap();
    assert!(e.actor.starts_with("uid:"), "{e:?}");
    assert_eq!(e.outcome, "refused");
    let first: AuditEntry = serde_json::from_slice(&page[0].1).unwrap();
    assert_eq!(first.actor, "kms");
    assert_eq!(first.detail["key_id"], "k0");
}

/// Groups pipelined behind a group whose commit fails (a duplicate key record) fail
/// with it, never fork the chain, and the log goes on: every append that answered Ok is
/// in the log, in one gapless chain that verifies, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_in_the_pipeline_never_forks_the_chain() {
    let (_d, backend, store, log) = filled(1).await;
    let dup = crate::keystore::KeyRecord {
        key_id: kms_api::KeyId::from_random([9; 16]),
        kek_id: kms_api::KekId::parse("kek").unwrap(),
        kek_version: kms_api::KekVersion::new(1).unwrap(),
        thread_id: kms_api::ThreadId::parse("t").unwrap(),
        created_at: 1,
        state: crate::keystore::KeyState::Destroyed { destroyed_at: 1 },
    };
    store.put_new(dup.clone()).await.unwrap();
    let (backend, store, log) = (Arc::new(backend), Arc::new(store), Arc::new(log));
    let tasks: Vec<_> = (0..33)
        .map(|i| {
            let (b, s, l, dup) = (backend.clone(), store.clone(), log.clone(), dup.clone());
            tokio::spawn(async move {
                let mut ok = 0u64;
                for j in 0..15 {
                    // One task keeps re-creating an existing key: its groups fail.
                    let record = (i == 0 && j % 3 == 0).then(|| dup.clone());
                    let ev = AuditEvent::new("dek.create").with("n", format!("{i}-{j}"));
                    if l.append_with(&*b, &*s, ev, record).await.is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 1; // the one `filled` wrote
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert!(
        ok < 1 + 33 * 15,
        "no append failed: the duplicate was accepted"
    );
    // A failure takes down only its group and those already chained on it: the log
    // goes on under load (a reset that never happened would fail nearly everything
    // after the first failure).
    assert!(
        ok > 33 * 15 / 2,
        "only {ok} of {} appends succeeded",
        33 * 15
    );
    log.append(&*backend, &*store, AuditEvent::new("after"))
        .await
        .unwrap();
    ok += 1;
    let v = verify(&*backend, &*store).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.verified, v.head_seq), (ok, ok), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_chained_on_a_stale_head_writes_nothing() {
    let (_d, backend, store, _log) = filled(3).await;
    let e = AuditEntry {
        seq: 1,
        at: 0,
        action: "forged".into(),
        actor: "x".into(),
        outcome: "ok".into(),
        detail: BTreeMap::new(),
        mac: "00".into(),
    };
    let stale = AuditHead {
        seq: 1,
        mac: [0; 32],
    };
    let r = match store
        .queue_audit(vec![e.clone()], None, stale, vec![], vec![])
        .await
    {
        Ok(commit) => commit.await,
        Err(e) => Err(e),
    };
    assert!(matches!(r, Err(StoreError::AuditHeadMoved)), "{r:?}");
    let v = verify(&backend, &store).await.unwrap();
    assert!(v.ok && v.head_seq == 3, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hsm_appends_nothing_and_the_chain_continues() {
    let (_d, backend, store, log) = filled(2).await;
    backend.set_down(true);
    assert!(log
        .append(&backend, &store, AuditEvent::new("kek.rotate"))
        .await
        .is_err());
    backend.set_down(false);
    log.append(&backend, &store, AuditEvent::new("kek.rotate"))
        .await
        .unwrap();
    let v = verify(&backend, &store).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.head_seq, 3);
}

/// Runs `f` on a fresh log of 6 entries and returns what verification says.
async fn tampered(
    f: impl FnOnce(
        &mut heed::RwTxn<'_>,
        heed::Database<heed::types::Bytes, heed::types::Bytes>,
        heed::Database<heed::types::Str, heed::types::Bytes>,
    ),
) -> AuditVerifyResponse {
    let (_d, backend, store, _log) = filled(6).await;
    store.tamper_audit(f);
    verify(&backend, &store).await.unwrap()
}

fn get(
    w: &heed::RwTxn<'_>,
    db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
    seq: u64,
) -> AuditEntry {
    serde_json::from_slice(db.get(w, &seq.to_be_bytes()).unwrap().unwrap()).unwrap()
}

fn put(
    w: &mut heed::RwTxn<'_>,
    db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
    seq: u64,
    e: &AuditEntry,
) {
    db.put(w, &seq.to_be_bytes(), &serde_json::to_vec(e).unwrap())
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tampering_is_found_and_named() {
    // Edited.
    let v = tampered(|w, db, _| {
        let mut e = get(w, db, 3);
        e.detail.insert("key_id".into(), "someone-else".into());
        put(w, db, 3, &e);
    })
    .await;
    let p = v.problem.unwrap();
    assert_eq!((p.kind.as_str(), p.seq, v.verified), ("mac_mismatch", 3, 2));
    // Removed from the middle.
    let v = tampered(|w, db, _| {
        db.delete(w, &4u64.to_be_bytes()).unwrap();
    })
    .await;
    let p = v.problem.unwrap();
    assert_eq!((p.kind.as_str(), p.seq), ("gap", 4), "{p:?}");
    // Removed from the middle and renumbered to hide the gap.
    let v = tampered(|w, db, _| {
        for seq in 4..6 {
            let mut e = get(w, db, seq + 1);
            e.seq = seq;
            put(w, db, seq, &e);
        }
        db.delete(w, &6u64.to_be_bytes()).unwrap();
    })
    .await;
    assert_eq!(v.problem.unwrap().kind, "mac_mismatch");
    // Inserted (a forged entry with a made-up MAC, the rest renumbered).
    let v = tampered(|w, db, _| {
        for seq in (3..=6).rev() {
            let mut e = get(w, db, seq);
            e.seq = seq + 1;
            put(w, db, seq + 1, &e);
        }
        let mut forged = get(w, db, 2);
        forged.seq = 3;
        forged.action = "kek.destroy".into();
        put(w, db, 3, &forged);
    })
    .await;
    let p = v.problem.unwrap();
    assert_eq!((p.kind.as_str(), p.seq), ("mac_mismatch", 3));
    // Reordered (two entries swapped, keys only).
    let v = tampered(|w, db, _| {
        let (a, b) = (get(w, db, 2), get(w, db, 5));
        put(w, db, 2, &b);
        put(w, db, 5, &a);
    })
    .await;
    let p = v.problem.unwrap();
    assert_eq!((p.kind.as_str(), p.seq), ("moved", 2));
    // Reordered with the sequence numbers rewritten too.
    let v = tampered(|w, db, _| {
        let (mut a, mut b) = (get(w, db, 2), get(w, db, 5));
        a.seq = 5;
        b.seq = 2;
        put(w, db, 2, &b);
        put(w, db, 5, &a);
    })
    .await;
    let p = v.problem.unwrap();
    assert_eq!((p.kind.as_str(), p.seq), ("mac_mismatch", 2));
    // Truncated tail.
    let v = tampered(|w, db, _| {
        db.delete(w, &6u64.to_be_bytes()).unwrap();
        db.delete(w, &5u64.to_be_bytes()).unwrap();
    })
    .await;
    let p = v.problem.unwrap();
    assert_eq!(
        (p.kind.as_str(), p.seq, v.verified),
        ("truncated_tail", 5, 4)
    );
    // Undecodable.
    let v = tampered(|w, db, _| {
        db.put(w, &2u64.to_be_bytes(), b"{not json").unwrap();
    })
    .await;
    assert_eq!(v.problem.unwrap().kind, "undecodable");
    // Untouched: fine.
    let v = tampered(|_, _, _| {}).await;
    assert!(v.ok && v.verified == 6 && v.head_seq == 6, "{v:?}");
}

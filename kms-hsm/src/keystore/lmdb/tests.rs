//! Unit tests of `lmdb`.

use super::*;
use crate::keystore::{now_secs, KeyStore};
use kms_api::{KekId, KekVersion, ThreadId, WrappedDek};
use std::sync::Arc;

fn rec(n: u8) -> KeyRecord {
    KeyRecord {
        key_id: KeyId::from_random([n; 16]),
        kek_id: KekId::parse("kek").unwrap(),
        kek_version: KekVersion::FIRST,
        thread_id: ThreadId::parse("thread-1").unwrap(),
        created_at: now_secs(),
        state: KeyState::Active {
            wrapped: WrappedDek::new(vec![n; 65]),
        },
    }
}

#[tokio::test]
async fn put_get_destroy_update_list() {
    let dir = tempfile::tempdir().unwrap();
    let s = LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap();
    let r = rec(1);
    s.put_new(r.clone()).await.unwrap();
    assert!(matches!(
        s.put_new(r.clone()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r.clone()));
    assert_eq!(s.get(&rec(2).key_id).await.unwrap(), None);
    assert!(matches!(
        s.compare_and_swap(&rec(2), rec(2)).await,
        Err(StoreError::NotFound(_))
    ));
    let mut r2 = r.clone();
    r2.kek_version = KekVersion::new(2).unwrap();
    s.compare_and_swap(&r, r2.clone()).await.unwrap();
    assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r2.clone()));
    // A swap from a stale copy is refused and writes nothing.
    let mut r3 = r.clone();
    r3.kek_version = KekVersion::new(3).unwrap();
    assert!(matches!(
        s.compare_and_swap(&r, r3).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r2.clone()));
    assert_eq!(
        s.mark_destroyed(&r.key_id).await.unwrap(),
        DestroyOutcome::Destroyed
    );
    assert_eq!(
        s.mark_destroyed(&r.key_id).await.unwrap(),
        DestroyOutcome::AlreadyDestroyed
    );
    assert_eq!(
        s.mark_destroyed(&rec(3).key_id).await.unwrap(),
        DestroyOutcome::Unknown
    );
    let got = s.get(&r.key_id).await.unwrap().unwrap();
    assert!(got.wrapped().is_none());
    for n in 4..10 {
        s.put_new(rec(n)).await.unwrap();
    }
    let first = s.list(None, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    let rest = s.list(Some(&first[2].key_id), 100).await.unwrap();
    assert_eq!(first.len() + rest.len(), 7);
    s.check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_racing_a_destroy_never_resurrects_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap());
    for round in 0..50u8 {
        let r = rec(round);
        s.put_new(r.clone()).await.unwrap();
        // A rewrap that read the record before the destroy, and writes after it.
        let mut rewrapped = r.clone();
        rewrapped.kek_version = KekVersion::new(2).unwrap();
        rewrapped.state = KeyState::Active {
            wrapped: WrappedDek::new(vec![0xee; 65]),
        };
        let (s1, s2) = (s.clone(), s.clone());
        let (k, r2) = (r.key_id.clone(), r.clone());
        let destroy = tokio::spawn(async move { s1.mark_destroyed(&k).await });
        let swap = tokio::spawn(async move { s2.compare_and_swap(&r2, rewrapped).await });
        let (d, w) = (destroy.await.unwrap().unwrap(), swap.await.unwrap());
        assert_eq!(d, DestroyOutcome::Destroyed);
        let after = s.get(&r.key_id).await.unwrap().unwrap();
        assert!(
            after.wrapped().is_none(),
            "round {round}: destroyed key came back ({w:?})"
        );
    }
}

#[tokio::test]
async fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let r = rec(7);
    {
        let s = LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap();
        s.put_new(r.clone()).await.unwrap();
    }
    let s = LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap();
    assert_eq!(s.get(&r.key_id).await.unwrap(), Some(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let m = StoreMetrics::default();
    let s = Arc::new(LmdbStore::open(dir.path(), 8, m.clone()).unwrap());
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = rec(0);
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            r.key_id = KeyId::from_random(b);
            s.put_new(r).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(m.writes.get(), 200);
    assert!(m.commits.get() < 200, "commits = {}", m.commits.get());
    assert_eq!(s.list(None, 1000).await.unwrap().len(), 200);
}

#[tokio::test]
async fn full_map_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(LmdbStore::open(dir.path(), 1, StoreMetrics::default()).unwrap());
    let mut stored = Vec::new();
    let mut full = false;
    // Concurrent puts (grouped into few commits) fill the map quickly.
    for round in 0..100u32 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..256u32 {
            let mut r = rec(0);
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&round.to_be_bytes());
            b[4..8].copy_from_slice(&i.to_be_bytes());
            r.key_id = KeyId::from_random(b);
            let s = s.clone();
            set.spawn(async move { (s.put_new(r.clone()).await, r) });
        }
        while let Some(j) = set.join_next().await {
            match j.unwrap() {
                (Ok(()), r) => stored.push(r),
                (Err(StoreError::Full { limit }), _) => {
                    assert_eq!(limit, "store.map_size_mb = 1");
                    full = true;
                }
                (Err(e), _) => panic!("{e}"),
            }
        }
        if full {
            break;
        }
    }
    assert!(full, "a 1 MiB map must fill up");
    assert!(s.check().await.is_ok());
    for r in stored.iter().step_by(97) {
        assert_eq!(s.get(&r.key_id).await.unwrap().as_ref(), Some(r));
    }
    drop(s);
    let s = LmdbStore::open(dir.path(), 1, StoreMetrics::default()).unwrap();
    assert_eq!(s.list(None, 100_000).await.unwrap().len(), stored.len());
    // Nothing of the failed batches was half-written, and reads keep working.
    assert_eq!(
        s.get(&stored[0].key_id).await.unwrap().as_ref(),
        Some(&stored[0])
    );
}

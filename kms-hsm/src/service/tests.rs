//! Unit tests of `service`.

use super::readiness::READY_CACHE;
use super::*;
use crate::backend::mock::MockBackend;
use crate::cache::CacheMetrics;
use crate::keystore::lmdb::LmdbStore;
use crate::metrics::StoreMetrics;
use kms_api::ErrorCode;
use std::time::Duration;
use zeroize::Zeroizing;

fn service(cache_entries: usize) -> (tempfile::TempDir, KeyService<MockBackend, LmdbStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap();
    let cache = DekCache::new(
        Duration::from_secs(60),
        cache_entries,
        CacheMetrics::default(),
    );
    (
        dir,
        KeyService::new(Arc::new(MockBackend::new()), store, cache),
    )
}

fn tid(s: &str) -> ThreadId {
    ThreadId::parse(s).unwrap()
}

/// A key store filled by creates keeps room for destroys: creates answer `Full` while
/// the map's last part is still free, and then every key can still be destroyed (each
/// with its audit entry), one at a time, and the audit log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_still_destroys_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), 2, StoreMetrics::default()).unwrap();
    let cache = DekCache::new(Duration::from_secs(60), 10, CacheMetrics::default());
    let backend = Arc::new(MockBackend::new());
    let svc = Arc::new(KeyService::new(Arc::clone(&backend), store, cache));
    let mut made = Vec::new();
    // In waves of 64 concurrent creates: they share audit groups and commits, and must
    // not pass the room check together.
    let mut full = None;
    for wave in 0..1000 {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let svc = Arc::clone(&svc);
                tokio::spawn(async move {
                    svc.create_dek_for_thread(tid(&format!("t{wave}-{i}")), None)
                        .await
                })
            })
            .collect();
        for t in tasks {
            match t.await.unwrap() {
                Ok(k) => made.push(k.key_id),
                Err(e) => full = Some(e),
            }
        }
        if full.is_some() {
            break;
        }
    }
    let full = full.expect("a 2 MiB map must fill");
    assert!(
        matches!(&full, ServiceError::Store(StoreError::Full { limit }) if limit.contains("kept for destroying every key")),
        "{full:?}"
    );
    assert!(made.len() > 500, "{}", made.len());
    eprintln!("a 2 MiB key store took {} creates", made.len());
    for k in &made {
        svc.destroy_key(k).await.unwrap();
    }
    let v = crate::audit::verify(&*backend, svc.store()).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.verified as usize, 2 * made.len());
    // Archived and compacted, the log and the tombstones give the room back: as many
    // creates fit again (within the B-trees' slack).
    let (_, bytes) = svc
        .store()
        .audit_range(v.head_seq - 1, 1)
        .await
        .unwrap()
        .remove(0);
    let last: kms_api::admin::AuditEntry = serde_json::from_slice(&bytes).unwrap();
    let done = crate::audit_archive::compact(&svc, last.seq, &last.mac, &"0".repeat(64))
        .await
        .unwrap();
    assert_eq!(done.entries_removed as usize, 2 * made.len());
    assert_eq!(done.tombstones_removed as usize, made.len());
    for i in 0..made.len() * 9 / 10 {
        svc.create_dek_for_thread(tid(&format!("again-{i}")), None)
            .await
            .unwrap();
    }
    assert!(
        crate::audit::verify(&*backend, svc.store())
            .await
            .unwrap()
            .ok
    );
}

#[tokio::test]
async fn create_encrypt_decrypt() {
    for entries in [0, 100] {
        let (_d, s) = service(entries);
        let k = s.create_dek_for_thread(tid("t1"), None).await.unwrap();
        let e = s.encrypt(&k.key_id, b"hello", b"aad").await.unwrap();
        assert_eq!(e.kek_version, KekVersion::FIRST);
        let p = s.decrypt(&k.key_id, &e.ciphertext, b"aad").await.unwrap();
        assert_eq!(p.expose(), b"hello");
        assert!(matches!(
            s.decrypt(&k.key_id, &e.ciphertext, b"other").await,
            Err(ServiceError::DecryptionFailed)
        ));
        let w = s.get_wrapped(&k.key_id).await.unwrap();
        assert_eq!(w.wrapped, k.wrapped);
        let unwraps = s.backend().unwraps();
        if entries == 0 {
            assert!(unwraps >= 2, "no cache: every call unwraps");
        } else {
            assert_eq!(unwraps, 0, "seeded cache: no unwrap");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_create_answers_the_key_it_made() {
    let (_d, s) = service(100);
    let s = Arc::new(s);
    let idem = || Some(IdempotencyKey::parse("retry-1").unwrap());
    let first = s.create_dek_for_thread(tid("t1"), idem()).await.unwrap();
    let again = s.create_dek_for_thread(tid("t1"), idem()).await.unwrap();
    assert_eq!(again.key_id, first.key_id);
    assert_eq!(again.wrapped, first.wrapped);
    assert_eq!(again.kek, first.kek);
    assert_eq!(first.key_id, KeyId::derived(&tid("t1"), &idem().unwrap()));
    assert_eq!(s.store().key_count().await.unwrap(), 1, "one key, not two");
    // Repeats racing each other: all get the one key.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.create_dek_for_thread(tid("t2"), Some(IdempotencyKey::parse("race").unwrap()))
                    .await
                    .unwrap()
                    .key_id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for r in racers {
        ids.push(r.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(s.store().key_count().await.unwrap(), 2);
    // The same key for another thread names another key id (no conflict), and without a
    // key every call makes a new one.
    let other = s.create_dek_for_thread(tid("t3"), idem()).await.unwrap();
    assert_ne!(other.key_id, first.key_id);
    let a = s.create_dek_for_thread(tid("t1"), None).await.unwrap();
    let b = s.create_dek_for_thread(tid("t1"), None).await.unwrap();
    assert_ne!(a.key_id, b.key_id);
    // A repeat after the key was destroyed (its thread deleted) makes nothing new.
    s.destroy_key(&first.key_id).await.unwrap();
    assert_eq!(
        s.create_dek_for_thread(tid("t1"), idem())
            .await
            .unwrap_err()
            .code(),
        ErrorCode::UnknownKey
    );
    assert_eq!(s.store().key_count().await.unwrap(), 5);
}

#[test]
fn a_record_of_another_thread_is_an_idempotency_conflict() {
    let mut r = KeyRecord {
        key_id: KeyId::from_random([1; 16]),
        kek_id: KekId::parse("kek").unwrap(),
        kek_version: KekVersion::FIRST,
        thread_id: tid("owner"),
        created_at: 0,
        state: KeyState::Active {
            wrapped: WrappedDek::new(vec![1; 8]),
        },
    };
    assert!(replay(r.clone(), &tid("owner")).is_ok());
    assert!(matches!(
        replay(r.clone(), &tid("intruder")),
        Err(ServiceError::IdempotencyConflict(_))
    ));
    r.state = KeyState::Destroyed { destroyed_at: 1 };
    assert!(matches!(
        replay(r, &tid("owner")),
        Err(ServiceError::UnknownKey(_))
    ));
}

#[tokio::test]
async fn other_keys_ciphertext_fails() {
    let (_d, s) = service(100);
    let a = s.create_dek_for_thread(tid("a"), None).await.unwrap();
    let b = s.create_dek_for_thread(tid("b"), None).await.unwrap();
    let e = s.encrypt(&a.key_id, b"x", b"").await.unwrap();
    let err = s.decrypt(&b.key_id, &e.ciphertext, b"").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::DecryptionFailed);
}

#[tokio::test]
async fn unknown_and_destroyed() {
    let (_d, s) = service(100);
    let unknown = KeyId::from_random([9; 16]);
    assert_eq!(
        s.encrypt(&unknown, b"x", b"").await.unwrap_err().code(),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        s.destroy_key(&unknown).await.unwrap_err().code(),
        ErrorCode::UnknownKey
    );
    let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
    let e = s.encrypt(&k.key_id, b"x", b"").await.unwrap();
    s.destroy_key(&k.key_id).await.unwrap();
    s.destroy_key(&k.key_id).await.unwrap();
    for r in [
        s.decrypt(&k.key_id, &e.ciphertext, b"").await.map(|_| ()),
        s.encrypt(&k.key_id, b"x", b"").await.map(|_| ()),
        s.get_wrapped(&k.key_id).await.map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().code(), ErrorCode::UnknownKey);
    }
}

#[tokio::test]
async fn batch_shares_unwraps() {
    let (_d, s) = service(0);
    let a = s.create_dek_for_thread(tid("a"), None).await.unwrap();
    let b = s.create_dek_for_thread(tid("b"), None).await.unwrap();
    let unknown = KeyId::from_random([7; 16]);
    let before = s.backend().unwraps();
    let items = [
        EncryptItem {
            key_id: &a.key_id,
            plaintext: b"1",
            aad: b"",
        },
        EncryptItem {
            key_id: &a.key_id,
            plaintext: b"2",
            aad: b"",
        },
        EncryptItem {
            key_id: &b.key_id,
            plaintext: b"3",
            aad: b"x",
        },
        EncryptItem {
            key_id: &unknown,
            plaintext: b"4",
            aad: b"",
        },
    ];
    let r = s.encrypt_batch(&items).await;
    assert_eq!(s.backend().unwraps() - before, 2);
    assert_eq!(r[3].as_ref().unwrap_err().code(), ErrorCode::UnknownKey);
    let cts: Vec<Vec<u8>> = r[..3]
        .iter()
        .map(|x| x.as_ref().unwrap().ciphertext.clone())
        .collect();
    let d = [
        DecryptItem {
            key_id: &a.key_id,
            ciphertext: &cts[0],
            aad: b"",
        },
        DecryptItem {
            key_id: &a.key_id,
            ciphertext: &cts[1],
            aad: b"",
        },
        DecryptItem {
            key_id: &b.key_id,
            ciphertext: &cts[2],
            aad: b"",
        },
    ];
    let out = s.decrypt_batch(&d).await;
    assert_eq!(out[0].as_ref().unwrap().expose(), b"1");
    assert_eq!(out[1].as_ref().unwrap().expose(), b"2");
    assert_eq!(
        out[2].as_ref().unwrap_err().code(),
        ErrorCode::DecryptionFailed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_cold_key_share_one_unwrap() {
    let (_d, s) = service(100);
    let s = Arc::new(s);
    let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
    let ct = s.encrypt(&k.key_id, b"cold", b"").await.unwrap().ciphertext;
    s.cache().evict(&k.key_id);
    s.backend().set_unwrap_delay_ms(100);
    let before = s.backend().unwraps();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (s, id, ct) = (s.clone(), k.key_id.clone(), ct.clone());
            tokio::spawn(async move { s.decrypt(&id, &ct, b"").await.map(|p| p.expose().to_vec()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), b"cold");
    }
    assert_eq!(
        s.backend().unwraps() - before,
        1,
        "one HSM unwrap for 32 misses"
    );
    // The flight is gone once it landed: a later miss unwraps again.
    s.cache().evict(&k.key_id);
    s.decrypt(&k.key_id, &ct, b"").await.unwrap();
    assert_eq!(s.backend().unwraps() - before, 2);
    assert!(s.flights.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_unwrap_leaves_no_flight_behind() {
    let (_d, s) = service(100);
    let s = Arc::new(s);
    let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
    let ct = s.encrypt(&k.key_id, b"x", b"").await.unwrap().ciphertext;
    s.cache().evict(&k.key_id);
    s.backend().set_unwrap_delay_ms(500);
    let (s2, id, ct2) = (s.clone(), k.key_id.clone(), ct.clone());
    let waiter = tokio::spawn(async move { s2.decrypt(&id, &ct2, b"").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.flights.lock().unwrap().len(), 1);
    waiter.abort();
    let _ = waiter.await;
    assert!(
        s.flights.lock().unwrap().is_empty(),
        "the flight left with its last waiter"
    );
}

#[tokio::test]
async fn readiness_round_trips_are_cached_for_a_second() {
    let (_d, s) = service(100);
    let before = s.backend().calls();
    for _ in 0..50 {
        assert_eq!(s.readiness().await, Readiness::Ready);
    }
    assert_eq!(
        s.backend().calls() - before,
        1,
        "50 probes, one HSM round trip"
    );
    tokio::time::sleep(READY_CACHE + Duration::from_millis(50)).await;
    assert_eq!(s.readiness().await, Readiness::Ready);
    assert_eq!(s.backend().calls() - before, 2);
}

#[tokio::test]
async fn a_cold_key_in_an_outage_fails_alone_in_its_batch() {
    let (_d, s) = service(100);
    let warm = s.create_dek_for_thread(tid("warm"), None).await.unwrap();
    let cold = s.create_dek_for_thread(tid("cold"), None).await.unwrap();
    s.cache().evict(&cold.key_id);
    s.backend().set_down(true);
    let items = [
        EncryptItem {
            key_id: &warm.key_id,
            plaintext: b"a",
            aad: b"",
        },
        EncryptItem {
            key_id: &cold.key_id,
            plaintext: b"b",
            aad: b"",
        },
    ];
    let out = s.encrypt_batch(&items).await;
    assert!(out[0].is_ok(), "the cached key keeps serving");
    assert_eq!(out[1].as_ref().unwrap_err().code(), ErrorCode::Unavailable);
}

#[tokio::test]
async fn hsm_down_is_unavailable_and_not_ready() {
    let (_d, s) = service(0);
    assert_eq!(s.readiness().await, Readiness::Ready);
    let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
    s.backend().set_down(true);
    assert_eq!(
        s.encrypt(&k.key_id, b"x", b"").await.unwrap_err().code(),
        ErrorCode::Unavailable
    );
    assert_eq!(
        s.create_dek_for_thread(tid("t"), None)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::Unavailable
    );
    assert!(matches!(s.readiness().await, Readiness::NotReady(_)));
    s.backend().set_down(false);
    assert_eq!(s.readiness().await, Readiness::Ready);
}

#[tokio::test]
async fn destroy_wins_over_a_racing_cache_fill() {
    let (_d, s) = service(100);
    let k = s.create_dek_for_thread(tid("t"), None).await.unwrap();
    s.cache().evict(&k.key_id);
    // A reader that took its epoch before the destroy must not re-populate the cache.
    let epoch = s.cache().epoch();
    s.destroy_key(&k.key_id).await.unwrap();
    s.cache().insert(
        epoch,
        k.key_id.clone(),
        Arc::new(CachedDek {
            material: crate::cache::DekMaterial::Memory(crate::backend::Dek::from_bytes(
                Zeroizing::new([0; 32]),
            )),
            kek_version: KekVersion::FIRST,
        }),
    );
    assert_eq!(
        s.encrypt(&k.key_id, b"x", b"").await.unwrap_err().code(),
        ErrorCode::UnknownKey
    );
}

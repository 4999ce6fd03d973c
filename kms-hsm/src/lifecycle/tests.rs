//! The lifecycle engine against the mock backend and a real LMDB store: rotation, resume
//! after a kill, takeover across replicas, the admin lease, destroy rules and outages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::status::record_version;
use super::*;
use crate::backend::mock::MockBackend;
use crate::cache::{CacheMetrics, DekCache};
use crate::keystore::lmdb::LmdbStore;
use crate::keystore::{KekState, KeyState};
use crate::metrics::StoreMetrics;
use kms_api::admin::HsmStatus;
use kms_api::ThreadId;
use std::collections::BTreeMap;

struct Fixture {
    dir: tempfile::TempDir,
    backend: Arc<MockBackend>,
    svc: Arc<KeyService<MockBackend, LmdbStore>>,
}

fn fixture_in(dir: tempfile::TempDir, backend: Arc<MockBackend>) -> Fixture {
    let store = LmdbStore::open(dir.path(), 64, StoreMetrics::default()).unwrap();
    // No cache: every decrypt unwraps the stored blob, so the tests see what rewrap wrote.
    let cache = DekCache::new(Duration::from_secs(60), 0, CacheMetrics::default());
    let svc = Arc::new(KeyService::new(Arc::clone(&backend), store, cache));
    Fixture { dir, backend, svc }
}

fn fixture() -> Fixture {
    fixture_in(tempfile::tempdir().unwrap(), Arc::new(MockBackend::new()))
}

fn opts() -> LifecycleOptions {
    LifecycleOptions {
        concurrency: 3,
        batch: 7,
        ..LifecycleOptions::default()
    }
}

/// `n` DEKs, each with one ciphertext of its own key id.
async fn seed(f: &Fixture, n: usize) -> Vec<(KeyId, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = f
            .svc
            .create_dek_for_thread(ThreadId::parse(&format!("t{i}")).unwrap(), None)
            .await
            .unwrap();
        let ct = f
            .svc
            .encrypt(&k.key_id, k.key_id.as_str().as_bytes(), b"aad")
            .await
            .unwrap();
        out.push((k.key_id, ct.ciphertext));
    }
    out
}

async fn wait_final(lc: &Lifecycle<MockBackend, LmdbStore>, id: &JobId) -> Job {
    for _ in 0..2000 {
        let j = lc.job(id).await.unwrap();
        if j.state.is_final() {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("job {id} did not finish");
}

async fn all_decrypt(f: &Fixture, keys: &[(KeyId, Vec<u8>)]) {
    for (k, ct) in keys {
        let p = f.svc.decrypt(k, ct, b"aad").await.unwrap();
        assert_eq!(p.expose(), k.as_str().as_bytes());
    }
}

async fn versions_of(f: &Fixture) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for r in f.svc.store().list(None, usize::MAX).await.unwrap() {
        if let KeyState::Active { .. } = r.state {
            let v = record_version(&r);
            assert_eq!(v, r.kek_version, "record and blob agree");
            *m.entry(v.get()).or_insert(0) += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewraps_verifies_and_retires() {
    let f = fixture();
    let keys = seed(&f, 40).await;
    f.svc.destroy_key(&keys[3].0).await.unwrap();
    let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
    let (job, started) = lc.rotate_kek().await.unwrap();
    assert!(started);
    assert_eq!(
        job.kind,
        JobKind::RotateKek {
            target: KekVersion::new(2).unwrap()
        }
    );
    // Asked again while it runs (or just after): the same job, not a second rotation.
    let (again, started_again) = lc.rotate_kek().await.unwrap();
    if !started_again {
        assert_eq!(again.id, job.id);
    }
    let done = wait_final(&lc, &job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.progress.rewrapped, 39);
    assert_eq!(f.backend.rewraps(), 39, "each DEK rewrapped exactly once");
    assert_eq!(done.progress.failed, 0);
    assert_eq!(done.progress.verified, 39);
    assert_eq!(done.progress.per_version, BTreeMap::from([(2, 39)]));
    assert_eq!(f.backend.current_kek().version.get(), 2);
    assert_eq!(versions_of(&f).await, BTreeMap::from([(2, 39)]));
    let live: Vec<_> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, k)| k.clone())
        .collect();
    all_decrypt(&f, &live).await;
    // New DEKs are under the new version.
    let new = seed(&f, 1).await;
    all_decrypt(&f, &new).await;
    let status = lc.status(HsmStatus::default()).await.unwrap();
    assert_eq!(status.current_version.get(), 2);
    let v1 = status
        .versions
        .iter()
        .find(|v| v.version.get() == 1)
        .unwrap();
    assert_eq!(
        (v1.state.as_str(), v1.deks, v1.in_hsm),
        ("retired", 0, true)
    );
    let v2 = status
        .versions
        .iter()
        .find(|v| v.version.get() == 2)
        .unwrap();
    assert_eq!(
        (v2.state.as_str(), v2.deks, v2.current),
        ("active", 40, true)
    );
    assert_eq!((status.active_deks, status.destroyed_deks), (40, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rotation_resumes_and_ends_consistent() {
    let f = fixture();
    let keys = seed(&f, 60).await;
    let (dir, backend) = {
        let lc = Lifecycle::new(
            Arc::clone(&f.svc),
            LifecycleOptions {
                concurrency: 2,
                batch: 5,
                ..LifecycleOptions::default()
            },
        );
        let (job, _) = lc.rotate_kek().await.unwrap();
        // Let it get part of the way, then "kill" it: the engine and its tasks go away
        // wherever they are, like a SIGKILL (only what was committed remains).
        loop {
            let j = lc.job(&job.id).await.unwrap();
            if j.progress.rewrapped >= 15 || j.state.is_final() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(lc);
        let Fixture { dir, backend, svc } = f;
        // Every task held only a weak reference: the service (and the store) close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(svc);
        (dir, backend)
    };
    let f = fixture_in(dir, backend);
    let mid = versions_of(&f).await;
    assert_eq!(mid.values().sum::<u64>(), 60, "no record lost: {mid:?}");
    let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
    assert_eq!(
        lc.resume().await.unwrap(),
        usize::from(lc.jobs().await.unwrap().iter().any(|j| !j.state.is_final()))
    );
    let job = lc.jobs().await.unwrap().pop().unwrap();
    let done = wait_final(&lc, &job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(versions_of(&f).await, BTreeMap::from([(2, 60)]));
    all_decrypt(&f, &keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_start_one_rotation_and_a_dead_drivers_job_is_taken_over() {
    let f = fixture();
    let keys = seed(&f, 40).await;
    f.backend.set_unwrap_delay_ms(10);
    let short = LifecycleOptions {
        concurrency: 1,
        batch: 1,
        lease: Duration::from_millis(300),
        settle: Duration::ZERO,
    };
    // Two engines on one store and one HSM: two replicas.
    let a = Lifecycle::new(Arc::clone(&f.svc), short);
    let b = Lifecycle::new(Arc::clone(&f.svc), short);
    assert_ne!(a.holder(), b.holder());
    let (ra, rb) = tokio::join!(a.rotate_kek(), b.rotate_kek());
    let ((ja, started_a), (jb, started_b)) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ja.id, jb.id, "one rotation, seen by both");
    assert!(started_a ^ started_b, "exactly one started it");
    let id = ja.id.clone();
    // Exactly one drives it (the other's driver found the lease taken and stopped).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.running.contains(&id) ^ b.running.contains(&id));
    let (driver, other) = if a.running.contains(&id) {
        (a, b)
    } else {
        (b, a)
    };
    loop {
        let j = other.job(&id).await.unwrap();
        assert!(
            !j.state.is_final(),
            "the test needs the job still running: {j:?}"
        );
        if j.progress.rewrapped >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The driver dies without releasing anything; the other replica's watcher takes the
    // job over once the lease lapses, and finishes it.
    drop(driver);
    let watcher = tokio::spawn(Arc::clone(&other).watch());
    let done = wait_final(&other, &id).await;
    watcher.abort();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(
        f.backend.kek_versions().await.unwrap().len(),
        2,
        "one new KEK"
    );
    assert_eq!(versions_of(&f).await, BTreeMap::from([(2, 40)]));
    all_decrypt(&f, &keys).await;
    // A write fenced by the dead driver's lease is refused now.
    let lease = job_lease(&id);
    let store = f.svc.store();
    assert!(matches!(
        store
            .put_job_leased(ja, &lease, "dead-replica", short.lease)
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    assert_eq!(other.job(&id).await.unwrap().state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_role_is_exclusive_across_replicas() {
    let f = fixture();
    let short = LifecycleOptions {
        lease: Duration::from_millis(200),
        ..opts()
    };
    let a = Lifecycle::new(Arc::clone(&f.svc), short);
    let b = Lifecycle::new(Arc::clone(&f.svc), short);
    let held = a.admin_lock().await.unwrap();
    // b waits up to two leases, renewed by a all along, then gives up.
    let t = std::time::Instant::now();
    assert!(matches!(
        b.admin_lock().await,
        Err(LifecycleError::Busy { holder }) if holder.starts_with(a.holder())
    ));
    assert!(t.elapsed() >= Duration::from_millis(400));
    drop(held);
    // Released: b gets it at once.
    let t = std::time::Instant::now();
    let _g = b.admin_lock().await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_is_refused_until_retired_and_unused() {
    let f = fixture();
    let keys = seed(&f, 5).await;
    let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
    let v1 = KekVersion::FIRST;
    assert!(matches!(
        lc.destroy_kek(v1).await,
        Err(LifecycleError::KekNotRetired { .. })
    ));
    let (job, _) = lc.rotate_kek().await.unwrap();
    assert_eq!(wait_final(&lc, &job.id).await.state, JobState::Succeeded);
    let v2 = KekVersion::new(2).unwrap();
    assert!(matches!(
        lc.destroy_kek(v2).await,
        Err(LifecycleError::KekNotRetired { .. })
    ));
    // Plant a record that still depends on v1 (as a restore of an old backup would).
    let rec = f.svc.store().get(&keys[0].0).await.unwrap().unwrap();
    let old_blob = f.backend.generate_dek_under(&rec.key_id, v1);
    let planted = KeyRecord {
        kek_version: v1,
        state: KeyState::Active { wrapped: old_blob },
        ..rec.clone()
    };
    f.svc
        .store()
        .compare_and_swap(&rec, planted.clone())
        .await
        .unwrap();
    match lc.destroy_kek(v1).await {
        Err(LifecycleError::KekInUse { count, .. }) => assert_eq!(count, 1),
        other => panic!("{other:?}"),
    }
    f.svc.store().compare_and_swap(&planted, rec).await.unwrap();
    lc.destroy_kek(v1).await.unwrap();
    // Idempotent, and the version is gone from the backend.
    lc.destroy_kek(v1).await.unwrap();
    assert_eq!(f.backend.kek_versions().await.unwrap(), vec![v2]);
    let status = lc.status(HsmStatus::default()).await.unwrap();
    let s1 = status.versions.iter().find(|v| v.version == v1).unwrap();
    assert_eq!((s1.state.as_str(), s1.in_hsm), ("destroyed", false));
    all_decrypt(&f, &keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dek_that_does_not_unwrap_fails_the_job_and_retires_nothing() {
    let f = fixture();
    let keys = seed(&f, 6).await;
    // Tamper with one stored blob (flip a ciphertext byte).
    let rec = f.svc.store().get(&keys[2].0).await.unwrap().unwrap();
    let KeyState::Active { wrapped } = &rec.state else {
        panic!()
    };
    let mut bytes = wrapped.as_bytes().to_vec();
    bytes[20] ^= 1;
    let bad = KeyRecord {
        state: KeyState::Active {
            wrapped: kms_api::WrappedDek::new(bytes),
        },
        ..rec.clone()
    };
    f.svc.store().compare_and_swap(&rec, bad).await.unwrap();
    let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
    let (verify, _) = lc.verify().await.unwrap();
    let v = wait_final(&lc, &verify.id).await;
    assert_eq!(v.state, JobState::Failed);
    assert_eq!((v.progress.verified, v.progress.failed), (5, 1));
    assert_eq!(v.progress.failed_keys, vec![keys[2].0.clone()]);
    let (job, _) = lc.rotate_kek().await.unwrap();
    let done = wait_final(&lc, &job.id).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert!(done.progress.error.as_deref().unwrap().contains("1 DEK"));
    let records = f.svc.store().kek_versions().await.unwrap();
    assert!(
        records.iter().all(|r| r.state == KekState::Active),
        "nothing retired: {records:?}"
    );
    assert!(matches!(
        lc.destroy_kek(KekVersion::FIRST).await,
        Err(LifecycleError::KekNotRetired { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_outage_pauses_the_job_instead_of_failing_it() {
    let f = fixture();
    let keys = seed(&f, 12).await;
    f.backend.set_down(true);
    let lc = Lifecycle::new(Arc::clone(&f.svc), opts());
    // The KEK versions cannot even be listed: nothing is started.
    assert!(matches!(
        lc.rotate_kek().await,
        Err(LifecycleError::Backend(_))
    ));
    f.backend.set_down(false);
    let (job, _) = lc.rotate_kek().await.unwrap();
    f.backend.set_down(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = lc.job(&job.id).await.unwrap();
    assert!(!paused.state.is_final(), "{paused:?}");
    f.backend.set_down(false);
    let done = wait_final(&lc, &job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    all_decrypt(&f, &keys).await;
    let _ = &f.dir;
}

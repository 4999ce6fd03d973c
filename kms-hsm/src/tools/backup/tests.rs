//! Unit tests of `backup`.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::mock::MockBackend;
use crate::cache::{CacheMetrics, DekCache};
use crate::keystore::lmdb::LmdbStore;
use crate::metrics::StoreMetrics;
use kms_api::ThreadId;

fn service(backend: &Arc<MockBackend>) -> (tempfile::TempDir, KeyService<MockBackend, LmdbStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), 16, StoreMetrics::default()).unwrap();
    let cache = DekCache::new(Duration::from_secs(60), 0, CacheMetrics::default());
    (dir, KeyService::new(Arc::clone(backend), store, cache))
}

/// The whole audit log of `svc`'s store, as `audit list` exports it.
async fn export_of(svc: &KeyService<MockBackend, LmdbStore>) -> Vec<AuditEntry> {
    svc.store()
        .audit_range(0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect()
}

async fn seed(svc: &KeyService<MockBackend, LmdbStore>, n: usize) -> Vec<(KeyId, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = svc
            .create_dek_for_thread(ThreadId::parse(&format!("t{i}")).unwrap(), None)
            .await
            .unwrap();
        let ct = svc.encrypt(&k.key_id, b"secret", b"").await.unwrap();
        out.push((k.key_id, ct.ciphertext));
    }
    out
}

#[tokio::test]
async fn backup_then_restore_into_an_empty_store_decrypts_everything() {
    let backend = Arc::new(MockBackend::new());
    let (_a, svc) = service(&backend);
    let keys = seed(&svc, 12).await;
    svc.destroy_key(&keys[0].0).await.unwrap();
    let stale = export_of(&svc).await;
    let file = backup(&svc).await.unwrap();
    assert!(!String::from_utf8_lossy(&file).contains("secret"));
    // Destroyed after the backup.
    svc.destroy_key(&keys[1].0).await.unwrap();
    let export = export_of(&svc).await;

    // A wiped store, the same HSM: its log is not the backup's, so the destroys since
    // cannot be known without the export.
    let (_b, fresh) = service(&backend);
    assert!(matches!(
        restore(&fresh, &file, &BTreeSet::new(), DestroyCheck::Store).await,
        Err(BackupError::DestroysUnknown(_))
    ));
    // An export made before the backup (or an empty one) proves nothing.
    for old in [stale, Vec::new()] {
        assert!(matches!(
            restore(&fresh, &file, &BTreeSet::new(), DestroyCheck::StoreOrExport(old)).await,
            Err(BackupError::DestroysUnknown(m)) if m.contains("ends before")
        ));
    }
    assert_eq!(fresh.store().key_count().await.unwrap(), 0);
    let r = restore(
        &fresh,
        &file,
        &BTreeSet::new(),
        DestroyCheck::StoreOrExport(export.clone()),
    )
    .await
    .unwrap();
    assert_eq!((r.records, r.imported, r.tombstones_imported), (12, 10, 2));
    assert_eq!(r.destroyed_after_backup, vec![keys[1].0.clone()]);
    for (k, ct) in &keys[2..] {
        assert_eq!(fresh.decrypt(k, ct, b"").await.unwrap().expose(), b"secret");
    }
    assert!(fresh.decrypt(&keys[0].0, &keys[0].1, b"").await.is_err());
    assert!(fresh.decrypt(&keys[1].0, &keys[1].1, b"").await.is_err());
    // Idempotent.
    let again = restore(
        &fresh,
        &file,
        &BTreeSet::new(),
        DestroyCheck::StoreOrExport(export),
    )
    .await
    .unwrap();
    // The tombstone made for the key destroyed after the backup now holds by itself.
    assert_eq!(
        (again.imported, again.unchanged, again.tombstoned.clone()),
        (0, 11, vec![keys[1].0.clone()])
    );
    // Into the store it came from, its own log says what was destroyed since.
    let back = restore(&svc, &file, &BTreeSet::new(), DestroyCheck::Store)
        .await
        .unwrap();
    assert_eq!(back.destroys_checked_by, "store");
    assert_eq!(back.tombstoned, vec![keys[1].0.clone()]);
}

#[tokio::test]
async fn a_tampered_backup_is_refused_whole() {
    let backend = Arc::new(MockBackend::new());
    let (_a, svc) = service(&backend);
    seed(&svc, 3).await;
    let file = backup(&svc).await.unwrap();
    let text = String::from_utf8(file).unwrap();
    let (_b, fresh) = service(&backend);
    for forged in [
        text.replacen("\"t1\"", "\"t9\"", 1),
        text.replacen("progressdb-kms-backup/2", "progressdb-kms-backup/9", 1),
        text[..text.len() - 10].to_owned(),
        text.replacen("\"mac\":\"", "\"mac\":\"00", 1),
    ] {
        assert!(
            matches!(
                restore(
                    &fresh,
                    forged.as_bytes(),
                    &BTreeSet::new(),
                    DestroyCheck::Unchecked
                )
                .await,
                Err(BackupError::Invalid(_))
            ),
            "{}",
            &forged[..80]
        );
    }
    assert_eq!(
        fresh.store().key_count().await.unwrap(),
        0,
        "nothing restored"
    );
    // Made under another HSM's audit key: refused too.
    let other = Arc::new(MockBackend::new());
    let (_c, elsewhere) = service(&other);
    assert!(matches!(
        restore(
            &elsewhere,
            text.as_bytes(),
            &BTreeSet::new(),
            DestroyCheck::Unchecked
        )
        .await,
        Err(BackupError::Invalid(_))
    ));
}

#[tokio::test]
async fn tombstones_are_honoured_unless_a_key_is_named() {
    let backend = Arc::new(MockBackend::new());
    let (_a, svc) = service(&backend);
    let keys = seed(&svc, 3).await;
    let file = backup(&svc).await.unwrap();
    svc.destroy_key(&keys[1].0).await.unwrap();
    svc.destroy_key(&keys[2].0).await.unwrap();
    let r = restore(&svc, &file, &BTreeSet::new(), DestroyCheck::Store)
        .await
        .unwrap();
    assert_eq!(r.tombstoned.len(), 2);
    assert!(svc.decrypt(&keys[1].0, &keys[1].1, b"").await.is_err());
    let named: BTreeSet<KeyId> = [keys[1].0.clone()].into();
    let r = restore(&svc, &file, &named, DestroyCheck::Store)
        .await
        .unwrap();
    assert_eq!(r.resurrected, vec![keys[1].0.clone()]);
    assert_eq!(r.tombstoned, vec![keys[2].0.clone()]);
    assert_eq!(
        svc.decrypt(&keys[1].0, &keys[1].1, b"")
            .await
            .unwrap()
            .expose(),
        b"secret"
    );
    assert!(svc.decrypt(&keys[2].0, &keys[2].1, b"").await.is_err());
    // The resurrection is in the log after the destroy: a later restore finds nothing
    // wrong with keys[1]. keys[2]'s tombstone replaced behind the KMS's back by its
    // active record: reported, and left for the operator.
    let tomb = svc.store().get(&keys[2].0).await.unwrap().unwrap();
    let active = KeyRecord {
        state: KeyState::Active {
            wrapped: backend.generate_dek_under(&keys[2].0, kms_api::KekVersion::FIRST),
        },
        ..tomb.clone()
    };
    svc.store().compare_and_swap(&tomb, active).await.unwrap();
    let r = restore(&svc, &file, &BTreeSet::new(), DestroyCheck::Store)
        .await
        .unwrap();
    assert_eq!(r.active_but_destroyed, vec![keys[2].0.clone()]);
    assert!(r.tombstoned.is_empty() && r.resurrected.is_empty(), "{r:?}");
}

#[tokio::test]
async fn lost_records_are_rebuilt_from_verified_copies_only() {
    let backend = Arc::new(MockBackend::new());
    let (_a, svc) = service(&backend);
    let keys = seed(&svc, 4).await;
    let mut copies = Vec::new();
    for (k, _) in &keys {
        let r = svc.store().get(k).await.unwrap().unwrap();
        copies.push(kms_api::admin::KeyCopy {
            thread_id: r.thread_id.clone(),
            key_id: r.key_id.clone(),
            wrapped_dek: r.wrapped().unwrap().clone(),
            kek_id: r.kek_id.clone(),
            kek_version: r.kek_version,
        });
    }
    svc.destroy_key(&keys[3].0).await.unwrap();
    // A forged copy: another key's blob under key 2's id.
    copies[2].wrapped_dek = copies[1].wrapped_dek.clone();
    // The store loses records 0..2 (keeps 3's tombstone): a fresh store with it only.
    let (_b, fresh) = service(&backend);
    let tomb = svc.store().get(&keys[3].0).await.unwrap().unwrap();
    fresh.store().put_new(tomb).await.unwrap();
    let r = import_copies(&fresh, copies).await.unwrap();
    assert_eq!((r.copies, r.imported, r.present), (4, 2, 0));
    let reasons: Vec<&str> = r.unrecovered.iter().map(|u| u.reason.as_str()).collect();
    assert_eq!(reasons, vec!["does_not_unwrap", "destroyed"]);
    for (k, ct) in &keys[..2] {
        assert_eq!(fresh.decrypt(k, ct, b"").await.unwrap().expose(), b"secret");
    }
    assert!(fresh.decrypt(&keys[3].0, &keys[3].1, b"").await.is_err());
}

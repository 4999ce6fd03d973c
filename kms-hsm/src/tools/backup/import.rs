//! `import-copies`: lost key records rebuilt from the server's copies of its threads' keys.

use crate::audit::AuditEvent;
use crate::backend::{parse_wrapped_header, KeyBackend};
use crate::keystore::{now_secs, KeyRecord, KeyState, KeyStore};
use crate::service::{KeyService, ServiceError};

use super::{unusable_versions, BackupError};

/// Rebuilds lost key records from the server's copies of its threads' keys. A copy is
/// imported only when the store has no record of that key id and the copy unwraps in the HSM
/// (the wrap's AAD binds key id and KEK version, so a forged copy fails); a destroyed key
/// (tombstone) is never brought back this way.
///
/// # Errors
/// `Service` when the store, the HSM or the audit log fails (a rerun completes it).
pub async fn import_copies<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    copies: Vec<kms_api::admin::KeyCopy>,
) -> Result<kms_api::admin::ImportReport, BackupError> {
    use kms_api::admin::{ImportReport, Unrecovered};
    svc.audit(AuditEvent::new("import_copies").with("copies", copies.len()))
        .await?;
    let store = svc.store();
    let known = store.kek_versions().await.map_err(ServiceError::from)?;
    let destroyed = unusable_versions(svc, &known, &[]).await?;
    let mut report = ImportReport {
        copies: copies.len() as u64,
        ..ImportReport::default()
    };
    for c in copies {
        let lost = |reason: &str| Unrecovered {
            thread_id: c.thread_id.clone(),
            key_id: c.key_id.clone(),
            reason: reason.to_owned(),
        };
        match store.get(&c.key_id).await.map_err(ServiceError::from)? {
            Some(r) if matches!(r.state, KeyState::Destroyed { .. }) => {
                report.unrecovered.push(lost("destroyed"));
                continue;
            }
            Some(_) => {
                report.present += 1;
                continue;
            }
            None => {}
        }
        let header = match parse_wrapped_header(&c.wrapped_dek) {
            Ok(h) if h.kek_version == c.kek_version => h,
            _ => {
                report.unrecovered.push(lost("does_not_unwrap"));
                continue;
            }
        };
        if destroyed.contains(&header.kek_version.get()) {
            report.unrecovered.push(lost("kek_destroyed"));
            continue;
        }
        match svc
            .backend()
            .check_wrapped(&c.key_id, &c.kek_id, &c.wrapped_dek)
            .await
        {
            Ok(()) => {}
            Err(
                crate::backend::BackendError::InvalidWrapped
                | crate::backend::BackendError::KekNotFound { .. },
            ) => {
                report.unrecovered.push(lost("does_not_unwrap"));
                continue;
            }
            Err(e) => return Err(ServiceError::from(e).into()),
        }
        svc.audit(
            AuditEvent::new("dek.import")
                .with("key_id", &c.key_id)
                .with("thread_id", &c.thread_id),
        )
        .await?;
        let record = KeyRecord {
            key_id: c.key_id.clone(),
            kek_id: c.kek_id,
            kek_version: c.kek_version,
            thread_id: c.thread_id,
            created_at: now_secs(),
            state: KeyState::Active {
                wrapped: c.wrapped_dek,
            },
        };
        match store.put_new(record).await {
            Ok(()) => report.imported += 1,
            Err(crate::keystore::StoreError::AlreadyExists(_)) => report.present += 1,
            Err(e) => return Err(ServiceError::from(e).into()),
        }
    }
    tracing::info!(
        copies = report.copies,
        imported = report.imported,
        present = report.present,
        unrecovered = report.unrecovered.len(),
        "key records rebuilt from the server's copies"
    );
    Ok(report)
}

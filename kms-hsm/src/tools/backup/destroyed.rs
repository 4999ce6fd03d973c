//! Which keys were destroyed after a backup: read from the audit log after the backup's head,
//! the store's own log when it continues the backup's, or else an audit export verified in
//! the HSM.

use std::collections::BTreeMap;

use kms_api::admin::{AuditEntry, AuditMark};
use kms_api::KeyId;

use super::{BackupError, DestroyCheck};
use crate::backend::KeyBackend;
use crate::keystore::KeyStore;
use crate::service::{KeyService, ServiceError};

/// The keys destroyed after the backup's `head` (with when), how that was established, and
/// the last entry checked.
///
/// # Errors
/// `DestroysUnknown` when it cannot be established and the caller did not accept that;
/// `Service` when the store or the HSM fails.
pub(super) async fn destroyed_after_backup<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    head: Option<&AuditMark>,
    check: DestroyCheck,
) -> Result<(BTreeMap<KeyId, u64>, &'static str, u64), BackupError> {
    if matches!(check, DestroyCheck::Unchecked) {
        tracing::warn!(
            "restore without a destroy check: keys destroyed since the backup come back"
        );
        return Ok((BTreeMap::new(), "unchecked", 0));
    }
    let Some(head) = head else {
        return Err(BackupError::DestroysUnknown(
            "this backup (format /1) does not record its audit head, so the keys destroyed \
             after it cannot be known; restore it with --accept-unchecked-destroys"
                .into(),
        ));
    };
    // The store's own log, when it is the backup's and reaches its head (or its anchor is the
    // head: the entries up to it were archived and removed).
    let mut destroyed = BTreeMap::new();
    if store_continues(svc, head).await? {
        let after = scan_store(svc, head.seq, &mut destroyed).await?;
        return Ok((destroyed, "store", after));
    }
    let DestroyCheck::StoreOrExport(entries) = check else {
        return Err(BackupError::DestroysUnknown(format!(
            "this store's audit log does not continue the backup's (its entry {} is missing or \
             differs), so the keys destroyed after the backup cannot be known from it: give the \
             audit log exported since (--audit FILE, from `audit list`), or accept that they \
             come back (--accept-unchecked-destroys)",
            head.seq
        )));
    };
    let entries: Vec<AuditEntry> = entries.into_iter().filter(|e| e.seq > head.seq).collect();
    match crate::audit::verify_continuation(&**svc.backend(), head, &entries)
        .await
        .map_err(|e| BackupError::Service(e.into()))?
    {
        Ok(()) => {}
        Err(why) => {
            return Err(BackupError::DestroysUnknown(format!(
                "the audit export does not continue the backup's log from entry {}: {why}",
                head.seq
            )))
        }
    }
    // The backup appends its own `backup` entry after reading its head: an export that does
    // not reach it is older than the backup (or empty), and proves nothing.
    if !entries.iter().any(|e| e.action == "backup") {
        return Err(BackupError::DestroysUnknown(format!(
            "the audit export ends before this backup's own entry (after entry {}): export the \
             log again after the backup",
            head.seq
        )));
    }
    for e in &entries {
        note_destroy(e, &mut destroyed);
    }
    let through = entries.last().map_or(head.seq, |e| e.seq);
    // An archive ends where the store's log was compacted: the store's entries after it
    // complete the check.
    let last = AuditMark {
        seq: through,
        mac: entries
            .last()
            .map_or_else(|| head.mac.clone(), |e| e.mac.clone()),
    };
    if store_continues(svc, &last).await? {
        let after = scan_store(svc, through, &mut destroyed).await?;
        return Ok((destroyed, "export and store", after));
    }
    Ok((destroyed, "export", through))
}

/// Follows `e` in `destroyed`: a DEK destroy adds its key, a resurrection (named in an
/// earlier restore) takes it out again.
fn note_destroy(e: &AuditEntry, destroyed: &mut BTreeMap<KeyId, u64>) {
    if e.outcome != "ok" {
        return;
    }
    let key = || e.detail.get("key_id").and_then(|k| KeyId::parse(k).ok());
    match e.action.as_str() {
        "dek.destroy" => {
            if let Some(k) = key() {
                destroyed.insert(k, e.at);
            }
        }
        "dek.resurrect" => {
            if let Some(k) = key() {
                destroyed.remove(&k);
            }
        }
        _ => {}
    }
}

/// Whether the store's audit log continues from entry `mark`: it holds that entry with that
/// MAC, or its (sealed) anchor is that entry, or `mark` is the empty log's start and nothing
/// was removed.
async fn store_continues<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    mark: &AuditMark,
) -> Result<bool, BackupError> {
    let store = svc.store();
    let anchor = store.audit_anchor().await.map_err(ServiceError::from)?;
    let mac = hex::decode(&mark.mac).ok();
    match anchor {
        Some(a) if a.seq > mark.seq => return Ok(false),
        Some(a) if a.seq == mark.seq => {
            let sealed = crate::audit_archive::is_sealed(&**svc.backend(), &a)
                .await
                .map_err(|e| BackupError::Service(e.into()))?;
            return Ok(sealed && mac.as_deref() == Some(&a.mac[..]));
        }
        _ => {}
    }
    if mark.seq == 0 {
        return Ok(true);
    }
    let at = store
        .audit_range(mark.seq - 1, 1)
        .await
        .map_err(ServiceError::from)?;
    Ok(at.first().is_some_and(|(seq, bytes)| {
        *seq == mark.seq
            && serde_json::from_slice::<AuditEntry>(bytes).is_ok_and(|e| e.mac == mark.mac)
    }))
}

/// Notes the destroys of the store's entries after `after`; returns the last entry read.
async fn scan_store<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    mut after: u64,
    destroyed: &mut BTreeMap<KeyId, u64>,
) -> Result<u64, BackupError> {
    loop {
        let page = svc
            .store()
            .audit_range(after, 1000)
            .await
            .map_err(ServiceError::from)?;
        let Some(&(last, _)) = page.last() else {
            return Ok(after);
        };
        for (_, bytes) in &page {
            // An entry that cannot be read may be a destroy: refuse rather than guess.
            let e: AuditEntry = serde_json::from_slice(bytes).map_err(|_| {
                BackupError::DestroysUnknown(format!(
                    "the store's audit entry after {after} cannot be read; run `audit verify`"
                ))
            })?;
            note_destroy(&e, destroyed);
        }
        after = last;
    }
}

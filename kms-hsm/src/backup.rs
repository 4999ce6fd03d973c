//! Backup and restore of the key store: every key record (wrapped DEKs and metadata only,
//! tombstones included) and the KEK version records, in one versioned JSON file whose
//! integrity is protected by an HMAC made in the HSM.
//!
//! # File
//! ```json
//! {"format":"progressdb-kms-backup/2","created_at":…,"kek_id":"…",
//!  "audit_head":{"seq":…,"mac":"<hex>"},"kek_versions":[…],"records":[…],"mac":"<hex>"}
//! ```
//! `audit_head` is the audit log's head when the records were listed (read while no destroy
//! of this process was between its audit entry and its store write): its `seq` is the
//! backup's serial, and every key destroyed after the backup has a `dek.destroy` entry after
//! it. Files of format `/1` (no `audit_head`) are still read.
//! `mac = HMAC-SHA256(audit key, 32 zero bytes || "progressdb-kms:backup:v1" 0x00 || JSON of
//! the file without "mac")`, made inside the HSM under the audit key (domain-separated from
//! the audit chain). A file that does not verify is refused as a whole: nothing is restored.
//! No raw DEK and no KEK is ever in a backup; the file is only useful together with the HSM
//! token that holds the KEK versions it names.
//!
//! # Restore
//! Record by record, never overwriting: a key the store lacks is added; an identical one is
//! left alone; a different one is reported as a conflict and the store's kept; a key
//! destroyed in the store stays destroyed (a tombstone is honoured) unless the operator
//! names it to be resurrected; a key under a KEK version destroyed in the HSM is reported
//! and skipped.
//!
//! Shredding survives a restore into a store that lost its tombstones (disaster recovery):
//! the keys destroyed after the backup are read from the audit log after the backup's
//! `audit_head`, from the store's own log when it continues the backup's (same entry, same
//! MAC at that seq), or else from an audit export given with the restore, verified in the HSM
//! as a continuation of the chain from that head. Each such key is imported as a tombstone
//! unless named to be resurrected. With neither, the restore is refused ([`DestroyCheck`]),
//! unless the operator accepts that keys destroyed since the backup come back.

use std::collections::{BTreeMap, BTreeSet};

use kms_api::admin::{AuditEntry, AuditMark, RestoreReport};
use kms_api::{KekId, KeyId};
use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;
use crate::backend::{parse_wrapped_header, KeyBackend};
use crate::keystore::{now_secs, KekState, KekVersionRecord, KeyRecord, KeyState, KeyStore};
use crate::service::{KeyService, ServiceError};

/// The `format` of this build's backups.
pub const FORMAT: &str = "progressdb-kms-backup/2";
/// The format before backups carried their audit head; still read.
const FORMAT_V1: &str = "progressdb-kms-backup/1";
const DOMAIN: &[u8] = b"progressdb-kms:backup:v1\0";

/// Failures of backup and restore.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Not a backup of this format, or its HMAC does not verify.
    #[error("the backup file is invalid: {0}")]
    Invalid(String),
    /// The keys destroyed after the backup cannot be known (or the audit export given does
    /// not verify): nothing was restored.
    #[error("{0}")]
    DestroysUnknown(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    format: String,
    created_at: u64,
    kek_id: KekId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_head: Option<AuditMark>,
    kek_versions: Vec<KekVersionRecord>,
    records: Vec<KeyRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(flatten)]
    body: Body,
    mac: String,
}

async fn mac_of<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    body: &Body,
) -> Result<[u8; 32], ServiceError> {
    let mut msg = DOMAIN.to_vec();
    msg.extend(
        serde_json::to_vec(body).map_err(|_| ServiceError::Internal("cannot encode the backup"))?,
    );
    let macs = svc.backend().audit_chain([0u8; 32], vec![msg]).await?;
    macs.first()
        .copied()
        .ok_or(ServiceError::Internal("the HSM returned no MAC"))
}

/// KEK versions nothing may be restored or imported under: destroyed by the store's or the
/// backup's records, or simply absent from the HSM.
struct Unusable {
    destroyed: BTreeSet<u32>,
    in_hsm: BTreeSet<u32>,
}

impl Unusable {
    fn contains(&self, v: &u32) -> bool {
        self.destroyed.contains(v) || !self.in_hsm.contains(v)
    }
}

async fn unusable_versions<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    known: &[KekVersionRecord],
    from_backup: &[KekVersionRecord],
) -> Result<Unusable, ServiceError> {
    let in_hsm = svc
        .backend()
        .kek_versions()
        .await?
        .into_iter()
        .map(|v| v.get())
        .collect();
    let destroyed = known
        .iter()
        .chain(from_backup)
        .filter(|r| r.state == KekState::Destroyed)
        .map(|r| r.version.get())
        .collect();
    Ok(Unusable { destroyed, in_hsm })
}

/// Every key record and KEK version record, as a backup file.
///
/// # Errors
/// `Service` when the store, the HSM (for the MAC) or the audit log cannot be used.
pub async fn backup<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
) -> Result<Vec<u8>, BackupError> {
    // Before listing: a key destroyed at or before this head is destroyed in the listing;
    // one destroyed after has its entry after it.
    // An empty log is the chain's start: seq 0, whose "MAC" is 32 zero bytes.
    let audit_head = Some(svc.quiesced_audit_head().await?.map_or(
        AuditMark {
            seq: 0,
            mac: hex::encode([0u8; 32]),
        },
        |h| AuditMark {
            seq: h.seq,
            mac: hex::encode(h.mac),
        },
    ));
    let mut records = Vec::new();
    let mut after: Option<KeyId> = None;
    loop {
        let page = svc
            .store()
            .list(after.as_ref(), 4096)
            .await
            .map_err(ServiceError::from)?;
        let Some(last) = page.last() else { break };
        after = Some(last.key_id.clone());
        records.extend(page);
    }
    svc.audit(AuditEvent::new("backup").with("records", records.len()))
        .await?;
    let body = Body {
        format: FORMAT.to_owned(),
        created_at: now_secs(),
        kek_id: svc.backend().current_kek().id,
        audit_head,
        kek_versions: svc
            .store()
            .kek_versions()
            .await
            .map_err(ServiceError::from)?,
        records,
    };
    let mac = hex::encode(mac_of(svc, &body).await?);
    serde_json::to_vec(&File { body, mac })
        .map_err(|_| BackupError::Service(ServiceError::Internal("cannot encode the backup")))
}

/// Where a restore learns which keys were destroyed after the backup.
#[derive(Debug)]
pub enum DestroyCheck {
    /// The store's own audit log, which must continue the backup's; refused otherwise.
    Store,
    /// The store's log when it continues the backup's, else these exported entries (those
    /// after the backup's head; verified in the HSM as the chain's continuation).
    StoreOrExport(Vec<AuditEntry>),
    /// The operator accepts that keys destroyed since the backup come back.
    Unchecked,
}

/// Restores `file` into the store (see the module docs). `resurrect` names destroyed keys
/// whose backup copy may replace the tombstone.
///
/// # Errors
/// `Invalid` for a file of another format or that does not verify, `DestroysUnknown` when
/// the destroys after the backup cannot be established (nothing restored in both cases);
/// `Service` when the store, the HSM or the audit log fails (what was restored before the
/// failure stays, and a second run completes it: restore is idempotent).
pub async fn restore<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    file: &[u8],
    resurrect: &BTreeSet<KeyId>,
    check: DestroyCheck,
) -> Result<RestoreReport, BackupError> {
    let file: File = serde_json::from_slice(file).map_err(|e| {
        BackupError::Invalid(format!(
            "not a backup file (line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    if file.body.format != FORMAT && file.body.format != FORMAT_V1 {
        return Err(BackupError::Invalid(format!(
            "format {:?}, this build reads {FORMAT:?} and {FORMAT_V1:?}",
            file.body.format
        )));
    }
    let expected = mac_of(svc, &file.body).await?;
    let stored = hex::decode(&file.mac).unwrap_or_default();
    if stored.len() != 32
        || stored
            .iter()
            .zip(&expected)
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            != 0
    {
        return Err(BackupError::Invalid(
            "its HMAC does not verify: the file was changed, or made under another HSM audit key"
                .into(),
        ));
    }
    let (destroyed_after, checked_by, checked_through) =
        destroyed_after_backup(svc, file.body.audit_head.as_ref(), check).await?;
    svc.audit(
        AuditEvent::new("restore")
            .with("records", file.body.records.len())
            .with("created_at", file.body.created_at)
            .with("resurrect", resurrect.len())
            .with("destroys_checked_by", checked_by)
            .with("destroys_checked_through", checked_through),
    )
    .await?;
    let store = svc.store();
    let known = store.kek_versions().await.map_err(ServiceError::from)?;
    let destroyed = unusable_versions(svc, &known, &file.body.kek_versions).await?;
    for v in &file.body.kek_versions {
        if !known.iter().any(|k| k.version == v.version) {
            store
                .put_kek_version(v.clone())
                .await
                .map_err(ServiceError::from)?;
        }
    }
    let mut report = RestoreReport {
        records: file.body.records.len() as u64,
        destroys_checked_by: checked_by.to_owned(),
        destroys_checked_through: checked_through,
        ..RestoreReport::default()
    };
    for mut r in file.body.records {
        let current = store.get(&r.key_id).await.map_err(ServiceError::from)?;
        // Destroyed after the backup and absent here (its tombstone lost with the store): it
        // comes back only when named; else it is imported as a tombstone, so the shred is
        // recorded in this store too. (A tombstone the store has is honoured below.)
        let mut resurrecting = false;
        if let (None, Some(at), KeyState::Active { .. }) =
            (&current, destroyed_after.get(&r.key_id), &r.state)
        {
            if resurrect.contains(&r.key_id) {
                resurrecting = true;
            } else {
                report.destroyed_after_backup.push(r.key_id.clone());
                r.state = KeyState::Destroyed { destroyed_at: *at };
            }
        }
        let under_destroyed = match &r.state {
            KeyState::Active { wrapped } => parse_wrapped_header(wrapped).map_or(true, |h| {
                destroyed.contains(&h.kek_version.get()) || destroyed.contains(&r.kek_version.get())
            }),
            KeyState::Destroyed { .. } => false,
        };
        match current {
            None if under_destroyed => report.kek_unavailable.push(r.key_id),
            None => {
                let tombstone = matches!(r.state, KeyState::Destroyed { .. });
                let key_id = r.key_id.clone();
                if resurrecting {
                    svc.audit(AuditEvent::new("dek.resurrect").with("key_id", &key_id))
                        .await?;
                }
                match store.put_new(r).await {
                    Ok(()) if resurrecting => report.resurrected.push(key_id),
                    Ok(()) if tombstone => report.tombstones_imported += 1,
                    Ok(()) => report.imported += 1,
                    Err(crate::keystore::StoreError::AlreadyExists(k)) => report.conflicts.push(k),
                    Err(e) => return Err(ServiceError::from(e).into()),
                }
            }
            Some(c)
                if matches!(c.state, KeyState::Active { .. })
                    && destroyed_after.contains_key(&c.key_id) =>
            {
                tracing::warn!(key_id = %c.key_id, "restore: the store holds an active record of a key the audit log records destroyed");
                report.active_but_destroyed.push(c.key_id);
            }
            Some(c) if c == r => report.unchanged += 1,
            Some(c) => match (&c.state, &r.state) {
                (KeyState::Destroyed { .. }, KeyState::Active { .. }) => {
                    if resurrect.contains(&r.key_id) && !under_destroyed {
                        svc.audit(AuditEvent::new("dek.resurrect").with("key_id", &r.key_id))
                            .await?;
                        let key_id = r.key_id.clone();
                        match store.compare_and_swap(&c, r).await {
                            Ok(()) => report.resurrected.push(key_id),
                            Err(crate::keystore::StoreError::Conflict(k)) => {
                                report.conflicts.push(k)
                            }
                            Err(e) => return Err(ServiceError::from(e).into()),
                        }
                    } else {
                        report.tombstoned.push(r.key_id);
                    }
                }
                // Destroyed in the backup, active here (or both active and different, e.g.
                // rewrapped since): the store is newer; keep it and say so.
                _ => report.conflicts.push(r.key_id),
            },
        }
    }
    tracing::info!(
        records = report.records,
        imported = report.imported,
        unchanged = report.unchanged,
        conflicts = report.conflicts.len(),
        tombstoned = report.tombstoned.len(),
        resurrected = report.resurrected.len(),
        "restore finished"
    );
    Ok(report)
}

/// The keys destroyed after the backup's `head` (with when), how that was established, and
/// the last entry checked.
///
/// # Errors
/// `DestroysUnknown` when it cannot be established and the caller did not accept that;
/// `Service` when the store or the HSM fails.
async fn destroyed_after_backup<B: KeyBackend, S: KeyStore>(
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

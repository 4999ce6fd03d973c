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

use std::collections::BTreeSet;

use kms_api::admin::{AuditEntry, AuditMark, RestoreReport};
use kms_api::{KekId, KeyId};
use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;
use crate::backend::{parse_wrapped_header, KeyBackend};
use crate::keystore::{now_secs, KekState, KekVersionRecord, KeyRecord, KeyState, KeyStore};
use crate::service::{KeyService, ServiceError};

mod destroyed;
mod import;

use destroyed::destroyed_after_backup;
pub use import::import_copies;

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

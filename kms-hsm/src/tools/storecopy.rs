//! `progressdb-kms store copy`: moves a KMS's whole state from one key-store backend to
//! another (LMDB to PostgreSQL when a deployment grows to several replicas, and back), then
//! proves the copy is the same.
//!
//! What is copied: every key record as it is (active records with their wrapped DEK,
//! destroyed ones as tombstones), every KEK-version record, every lifecycle job, the audit
//! log entry by entry with its head, and the pending audit entries. Nothing is unwrapped or
//! re-MACed: the HSM is not needed, and the copy holds exactly what the source held.
//!
//! Rules, all fail-closed:
//! * the target must be empty (no record, version, job or audit entry): a copy never merges
//!   into or overwrites a live store;
//! * the source must be quiescent: an LMDB source is opened with its exclusive lock (refused
//!   while its KMS runs); for a PostgreSQL source every replica must be stopped, and a
//!   change during the copy is caught by the verification;
//! * afterwards both stores are read again in full and compared: record by record, version
//!   by version, job by job, every audit entry byte for byte, the head and the pending
//!   entries. Any difference is an error naming the first one.

use kms_api::admin::AuditEntry;
use kms_api::KeyId;
use serde::Serialize;

use crate::keystore::{AnyStore, AuditHead, KeyState, KeyStore, StoreError};

/// Key records or audit entries read (and written) at a time.
const PAGE: usize = 512;

pub use service_kit::store_spec::StoreSpec;

/// Why a copy was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The target holds state already: nothing was written.
    #[error("the target store is not empty ({0}); copy only into a new, empty store")]
    TargetNotEmpty(String),
    /// The source cannot be copied faithfully (e.g. its audit head is not its last entry).
    #[error("the source cannot be copied as it is: {0}")]
    Source(String),
    /// The copy, read back, differs from the source (the source changed during the copy,
    /// or the target did not store what it was given).
    #[error("the copy does not match the source: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was copied and verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub key_records: u64,
    pub active: u64,
    pub destroyed: u64,
    pub kek_versions: u64,
    pub jobs: u64,
    pub audit_entries: u64,
    /// The audit head's sequence number (none: the log is empty).
    pub audit_head_seq: Option<u64>,
    pub pending_audits: u64,
    /// Both stores were read again in full and found equal.
    pub verified: bool,
}

/// Copies everything in `from` into the empty `to`, then verifies the copy.
///
/// # Errors
/// `TargetNotEmpty` (nothing written); `Source`; `Store` for a read or write that failed
/// (the target is then partial: drop it and copy again); `Mismatch` after a copy that does
/// not read back equal.
pub async fn copy(from: &AnyStore, to: &AnyStore) -> Result<CopyReport, CopyError> {
    ensure_empty(to).await?;
    let mut report = CopyReport::default();

    // Key records, a page at a time; each page's writes share commits.
    let mut after: Option<KeyId> = None;
    loop {
        let page = from.list(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key_id.clone());
        for r in &page {
            match r.state {
                KeyState::Active { .. } => report.active += 1,
                KeyState::Destroyed { .. } => report.destroyed += 1,
            }
        }
        report.key_records += page.len() as u64;
        for res in futures_util::future::join_all(page.into_iter().map(|r| to.put_new(r))).await {
            res?;
        }
    }

    for v in from.kek_versions().await? {
        to.put_kek_version(v).await?;
        report.kek_versions += 1;
    }
    for j in from.jobs().await? {
        to.put_job(j).await?;
        report.jobs += 1;
    }

    // The audit log, in order, each page appended on the head the previous one left.
    let source_head = from.audit_head().await?;
    let mut prev: Option<AuditHead> = None;
    let mut seq = 0;
    loop {
        let page = from.audit_range(seq, PAGE).await?;
        let Some(&(last_seq, _)) = page.last() else {
            break;
        };
        let entries = page
            .iter()
            .map(|(s, bytes)| decode_entry(*s, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let head = head_of(
            entries
                .last()
                .ok_or_else(|| CopyError::Source("an audit page without entries".into()))?,
        )?;
        to.queue_audit(entries, prev, head, Vec::new(), Vec::new())
            .await?
            .await?;
        report.audit_entries += page.len() as u64;
        prev = Some(head);
        seq = last_seq;
    }
    if prev != source_head {
        return Err(CopyError::Source(format!(
            "its audit head ({}) is not its last entry ({}): run `audit verify` on it",
            describe_head(source_head),
            describe_head(prev)
        )));
    }
    report.audit_head_seq = source_head.map(|h| h.seq);

    for (key, entry) in from.pending_audits(usize::MAX).await? {
        let entry = entry.ok_or_else(|| StoreError::Corrupt {
            key,
            detail: "undecodable pending audit entry".into(),
        })?;
        to.put_pending_audit(entry).await?;
        report.pending_audits += 1;
    }

    verify(from, to).await?;
    report.verified = true;
    Ok(report)
}

/// `Ok` when `store` holds nothing at all.
async fn ensure_empty(store: &AnyStore) -> Result<(), CopyError> {
    let n = store.key_count().await?;
    if n > 0 {
        return Err(CopyError::TargetNotEmpty(format!("{n} key record(s)")));
    }
    let checks = [
        (
            !store.kek_versions().await?.is_empty(),
            "KEK-version records",
        ),
        (!store.jobs().await?.is_empty(), "lifecycle jobs"),
        (store.audit_head().await?.is_some(), "an audit log"),
        (!store.audit_range(0, 1).await?.is_empty(), "audit entries"),
        (
            !store.pending_audits(1).await?.is_empty(),
            "pending audit entries",
        ),
    ];
    match checks.iter().find(|(found, _)| *found) {
        Some((_, what)) => Err(CopyError::TargetNotEmpty((*what).to_owned())),
        None => Ok(()),
    }
}

/// Reads both stores again in full and names the first difference.
///
/// # Errors
/// `Mismatch`; `Store`.
pub async fn verify(a: &AnyStore, b: &AnyStore) -> Result<(), CopyError> {
    let mismatch = |what: String| Err(CopyError::Mismatch(what));
    let mut after: Option<KeyId> = None;
    loop {
        let (pa, pb) = (
            a.list(after.as_ref(), PAGE).await?,
            b.list(after.as_ref(), PAGE).await?,
        );
        if let Some(i) = (0..pa.len().max(pb.len())).find(|&i| pa.get(i) != pb.get(i)) {
            let key = pa.get(i).or(pb.get(i)).map(|r| r.key_id.to_string());
            return mismatch(format!("key record {}", key.unwrap_or_default()));
        }
        let Some(last) = pa.last() else { break };
        after = Some(last.key_id.clone());
    }
    if a.key_count().await? != b.key_count().await? {
        return mismatch("the number of key records".into());
    }
    if a.kek_versions().await? != b.kek_versions().await? {
        return mismatch("the KEK-version records".into());
    }
    if a.jobs().await? != b.jobs().await? {
        return mismatch("the lifecycle jobs".into());
    }
    let mut seq = 0;
    loop {
        let (pa, pb) = (
            a.audit_range(seq, PAGE).await?,
            b.audit_range(seq, PAGE).await?,
        );
        if let Some(i) = (0..pa.len().max(pb.len())).find(|&i| pa.get(i) != pb.get(i)) {
            let at = pa.get(i).or(pb.get(i)).map_or(0, |(s, _)| *s);
            return mismatch(format!("audit entry {at}"));
        }
        let Some(&(last, _)) = pa.last() else { break };
        seq = last;
    }
    if a.audit_head().await? != b.audit_head().await? {
        return mismatch("the audit head".into());
    }
    let pending = |p: Vec<crate::keystore::PendingAudit>| -> Vec<Option<AuditEntry>> {
        p.into_iter().map(|(_, e)| e).collect()
    };
    if pending(a.pending_audits(usize::MAX).await?) != pending(b.pending_audits(usize::MAX).await?)
    {
        return mismatch("the pending audit entries".into());
    }
    Ok(())
}

fn decode_entry(seq: u64, bytes: &[u8]) -> Result<AuditEntry, CopyError> {
    let e: AuditEntry = serde_json::from_slice(bytes).map_err(|_| {
        CopyError::Store(StoreError::Corrupt {
            key: format!("audit/{seq}"),
            detail: "undecodable audit entry".into(),
        })
    })?;
    if e.seq != seq {
        return Err(CopyError::Source(format!(
            "audit entry stored under {seq} says it is {}",
            e.seq
        )));
    }
    Ok(e)
}

/// The head an entry leaves: its sequence number and MAC.
fn head_of(e: &AuditEntry) -> Result<AuditHead, CopyError> {
    let mac = hex::decode(&e.mac)
        .ok()
        .and_then(|m| <[u8; 32]>::try_from(m.as_slice()).ok())
        .ok_or_else(|| CopyError::Source(format!("audit entry {} has no valid MAC", e.seq)))?;
    Ok(AuditHead { seq: e.seq, mac })
}

fn describe_head(h: Option<AuditHead>) -> String {
    h.map_or_else(|| "none".into(), |h| format!("seq {}", h.seq))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            "lmdb:/var/lib/kms/store".parse::<StoreSpec>().unwrap(),
            StoreSpec::Lmdb("/var/lib/kms/store".into())
        );
        assert_eq!(
            "postgres://kms@db/kms".parse::<StoreSpec>().unwrap(),
            StoreSpec::Postgres("postgres://kms@db/kms".into())
        );
        assert_eq!(
            "postgres:host=/run/pg dbname=kms"
                .parse::<StoreSpec>()
                .unwrap(),
            StoreSpec::Postgres("host=/run/pg dbname=kms".into())
        );
        assert_eq!(
            "postgresql://kms@db/kms".parse::<StoreSpec>().unwrap(),
            StoreSpec::Postgres("postgresql://kms@db/kms".into())
        );
        for bad in ["", "lmdb:", "postgres:", "/var/lib/kms", "mysql://x"] {
            assert!(bad.parse::<StoreSpec>().is_err(), "{bad:?}");
        }
    }
}

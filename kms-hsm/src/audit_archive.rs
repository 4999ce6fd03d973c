//! Audit retention: a prefix of the audit log, once archived to a file off the host, is
//! removed from the key store with the tombstones of the keys it records destroyed.
//!
//! The operator archives first (`scripts/export-audit.sh FILE` appends every entry the file
//! does not hold yet, as JSON lines), then asks for the compaction through the archive's last
//! entry ([`compact`], `progressdb-kms audit compact --archive FILE`). The KMS:
//!
//! 1. checks that the store holds that entry with the archive's MAC, below the head and after
//!    the current anchor (so the archive reaches exactly where the store stops);
//! 2. verifies the stored chain from the current anchor through it in the HSM (an entry that
//!    does not verify is never removed: it is evidence);
//! 3. logs `audit.compact` (append before act) with the archive's SHA-256;
//! 4. in one transaction removes the entries and the tombstones of keys destroyed at or before
//!    the archived entry's time, and records the *anchor*: the archived entry's sequence
//!    number and MAC, sealed with the audit key in the HSM ([`seal`]).
//!
//! `audit verify` then starts from the anchor after checking its seal, so a store writer can
//! neither move the anchor forward (to hide entries) nor make one up; removing it shows as a
//! gap. A restore of a backup older than the anchor reads the keys destroyed after the backup
//! from the archive (`restore --audit FILE`): the archive is what a tombstone was.

use kms_api::admin::{AuditCompactResponse, AuditEntry, AuditMark};

use crate::audit::{verify_continuation, AuditError, AuditEvent};
use crate::backend::KeyBackend;
use crate::keystore::{AuditAnchor, KeyStore};
use crate::service::{KeyService, ServiceError};

/// Domain of the anchor's seal (the chain's own entries are MACed under another).
const ANCHOR_DOMAIN: &[u8] = b"progressdb-kms:audit-anchor:v1\0";
/// Entries read and verified per HSM job.
const PAGE: usize = 256;

/// Why a compaction was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The request does not match the log (nothing was removed): see
    /// [`kms_api::ErrorCode::ArchiveMismatch`].
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<AuditError> for CompactError {
    fn from(e: AuditError) -> Self {
        CompactError::Service(e.into())
    }
}

impl From<crate::keystore::StoreError> for CompactError {
    fn from(e: crate::keystore::StoreError) -> Self {
        CompactError::Service(e.into())
    }
}

/// What the anchor's seal authenticates: `ANCHOR_DOMAIN | seq (u64 BE) | mac`.
fn seal_input(seq: u64, mac: &[u8; 32]) -> Vec<u8> {
    let mut m = ANCHOR_DOMAIN.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(mac);
    m
}

/// The seal of an anchor at entry `seq` with MAC `mac`: `HMAC-SHA256(K, 0^32 | seal_input)`,
/// made in the HSM under the audit key.
///
/// # Errors
/// [`AuditError`] when the HSM cannot be used.
pub async fn seal<B: KeyBackend>(
    backend: &B,
    seq: u64,
    mac: &[u8; 32],
) -> Result<[u8; 32], AuditError> {
    let macs = backend
        .audit_chain([0u8; 32], vec![seal_input(seq, mac)])
        .await?;
    macs.first().copied().ok_or_else(|| {
        AuditError::Backend(crate::backend::BackendError::Internal("no seal".into()))
    })
}

/// Whether `anchor`'s seal is the HSM's.
///
/// # Errors
/// [`AuditError`] when the HSM cannot be used (nothing was judged).
pub async fn is_sealed<B: KeyBackend>(
    backend: &B,
    anchor: &AuditAnchor,
) -> Result<bool, AuditError> {
    let expected = seal(backend, anchor.seq, &anchor.mac).await?;
    Ok(crate::audit::constant_time_eq(&expected, &anchor.seal))
}

/// Compacts the log through entry `through`, the last entry of the operator's archive, whose
/// MAC is `mac` (see the module documentation).
///
/// # Errors
/// [`CompactError::Refused`] when the request does not match the log; `Service` when the HSM
/// or the store cannot be used. Either way nothing was removed.
pub async fn compact<B: KeyBackend, S: KeyStore>(
    svc: &KeyService<B, S>,
    through: u64,
    mac: &str,
    archive_sha256: &str,
) -> Result<AuditCompactResponse, CompactError> {
    let refused = |m: String| Err(CompactError::Refused(m));
    let Some(mac) = hex::decode(mac)
        .ok()
        .and_then(|m| <[u8; 32]>::try_from(m.as_slice()).ok())
    else {
        return refused("mac: 64 hex digits".into());
    };
    if archive_sha256.len() != 64 || !archive_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refused("archive_sha256: 64 hex digits".into());
    }
    let store = svc.store();
    let anchor = store.audit_anchor().await?;
    if let Some(a) = &anchor {
        if !is_sealed(&**svc.backend(), a).await? {
            return refused(
                "the stored audit anchor's seal does not verify; run `audit verify`".into(),
            );
        }
    }
    let from = anchor.map_or(0, |a| a.seq);
    if through <= from {
        return refused(format!(
            "entries through {from} are archived and removed already"
        ));
    }
    let head = store.audit_head().await?.map_or(0, |h| h.seq);
    if through > head {
        return refused(format!("the log ends at entry {head}"));
    }
    // The stored chain from the anchor through `through`, verified in the HSM page by page.
    let mut mark = AuditMark {
        seq: from,
        mac: hex::encode(anchor.map_or([0u8; 32], |a| a.mac)),
    };
    let mut last: Option<AuditEntry> = None;
    while mark.seq < through {
        let want = usize::try_from(through - mark.seq)
            .unwrap_or(usize::MAX)
            .min(PAGE);
        let page = store.audit_range(mark.seq, want).await?;
        let mut entries = Vec::with_capacity(page.len());
        for (seq, bytes) in page {
            match serde_json::from_slice::<AuditEntry>(&bytes) {
                Ok(e) if e.seq == seq && seq <= through => entries.push(e),
                _ => return refused(format!("entry {seq} cannot be read; run `audit verify`")),
            }
        }
        if entries.is_empty() {
            return refused(format!(
                "entry {} is missing; run `audit verify`",
                mark.seq + 1
            ));
        }
        if let Err(why) = verify_continuation(&**svc.backend(), &mark, &entries).await? {
            return refused(format!("{why}; run `audit verify`"));
        }
        let Some(e) = entries.pop() else {
            return refused(format!("entry {} is missing", mark.seq + 1));
        };
        mark = AuditMark {
            seq: e.seq,
            mac: e.mac.clone(),
        };
        last = Some(e);
    }
    let Some(last) = last else {
        return refused(format!("entry {through} is missing"));
    };
    if hex::decode(&mark.mac).ok().as_deref() != Some(&mac[..]) {
        return refused(format!(
            "the archive's last entry is not the stored entry {through} (another MAC): it is \
             not an export of this log, or not the latest"
        ));
    }
    svc.audit(
        AuditEvent::new("audit.compact")
            .with("through", through)
            .with("archive_sha256", archive_sha256)
            .with("tombstones_through", last.at),
    )
    .await?;
    let anchor = AuditAnchor {
        seq: through,
        mac,
        seal: seal(&**svc.backend(), through, &mac).await?,
    };
    let removed = match store.compact_audit(anchor, last.at).await {
        Ok(r) => r,
        Err(crate::keystore::StoreError::AuditHeadMoved) => {
            return refused(format!(
                "the log changed while it was compacted (entry {through} was compacted by \
                 another request); nothing more was removed"
            ))
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        through,
        entries = removed.entries,
        tombstones = removed.tombstones,
        "audit log compacted"
    );
    Ok(AuditCompactResponse {
        through,
        entries_removed: removed.entries,
        tombstones_removed: removed.tombstones,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kms_api::ThreadId;

    use super::*;
    use crate::backend::mock::MockBackend;
    use crate::cache::{CacheMetrics, DekCache};
    use crate::keystore::lmdb::LmdbStore;
    use crate::metrics::StoreMetrics;

    async fn service() -> (tempfile::TempDir, KeyService<MockBackend, LmdbStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap();
        let cache = DekCache::new(Duration::from_secs(60), 10, CacheMetrics::default());
        (
            dir,
            KeyService::new(Arc::new(MockBackend::new()), store, cache),
        )
    }

    async fn entries(svc: &KeyService<MockBackend, LmdbStore>) -> Vec<AuditEntry> {
        svc.store()
            .audit_range(0, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, b)| serde_json::from_slice(&b).unwrap())
            .collect()
    }

    const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[tokio::test]
    async fn a_verified_archived_prefix_is_removed_and_the_log_still_verifies() {
        let (_d, svc) = service().await;
        let a = svc
            .create_dek_for_thread(ThreadId::parse("a").unwrap(), None)
            .await
            .unwrap();
        svc.create_dek_for_thread(ThreadId::parse("b").unwrap(), None)
            .await
            .unwrap();
        svc.destroy_key(&a.key_id).await.unwrap();
        let log = entries(&svc).await;
        let last = log.last().unwrap().clone();
        // Refused, nothing removed: a MAC that is not the entry's, an entry past the head,
        // a malformed MAC.
        for (through, mac) in [
            (last.seq, hex::encode([1u8; 32])),
            (last.seq + 1, last.mac.clone()),
            (last.seq, "zz".into()),
        ] {
            assert!(matches!(
                compact(&svc, through, &mac, SHA).await,
                Err(CompactError::Refused(_))
            ));
        }
        assert_eq!(entries(&svc).await.len(), log.len());

        let done = compact(&svc, last.seq, &last.mac, SHA).await.unwrap();
        assert_eq!(done.entries_removed, last.seq);
        assert_eq!(done.tombstones_removed, 1, "a's tombstone");
        assert!(svc.store().get(&a.key_id).await.unwrap().is_none());
        // What is left: the compaction's own entry, after the sealed anchor.
        let left = entries(&svc).await;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].action, "audit.compact");
        assert_eq!(left[0].detail["through"], last.seq.to_string());
        let v = crate::audit::verify(&**svc.backend(), svc.store())
            .await
            .unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.archived_through, Some(last.seq));
        // The same archive again: refused.
        assert!(matches!(
            compact(&svc, last.seq, &last.mac, SHA).await,
            Err(CompactError::Refused(_))
        ));
        // Appends go on and verify.
        svc.create_dek_for_thread(ThreadId::parse("c").unwrap(), None)
            .await
            .unwrap();
        assert!(
            crate::audit::verify(&**svc.backend(), svc.store())
                .await
                .unwrap()
                .ok
        );
    }

    #[tokio::test]
    async fn a_moved_forged_or_removed_anchor_is_found() {
        let (_d, svc) = service().await;
        for t in ["a", "b", "c"] {
            svc.create_dek_for_thread(ThreadId::parse(t).unwrap(), None)
                .await
                .unwrap();
        }
        let log = entries(&svc).await;
        let mid = log[1].clone();
        compact(&svc, mid.seq, &mid.mac, SHA).await.unwrap();
        let stored = svc.store().audit_anchor().await.unwrap().unwrap();
        // Moved forward over an entry (to hide it), with the old seal: does not verify.
        let third = log[2].clone();
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&hex::decode(&third.mac).unwrap());
        let moved = AuditAnchor {
            seq: third.seq,
            mac,
            seal: stored.seal,
        };
        let put = |a: Option<AuditAnchor>| {
            svc.store().tamper_audit(|w, audit, lifecycle| {
                match a {
                    Some(a) => lifecycle
                        .put(w, "audit/anchor", &serde_json::to_vec(&a).unwrap())
                        .unwrap(),
                    None => {
                        lifecycle.delete(w, "audit/anchor").unwrap();
                    }
                }
                if a.is_some_and(|a| a.seq == third.seq) {
                    audit.delete(w, &third.seq.to_be_bytes()).unwrap();
                }
            })
        };
        put(Some(moved));
        let v = crate::audit::verify(&**svc.backend(), svc.store())
            .await
            .unwrap();
        assert_eq!(v.problem.unwrap().kind, "anchor_forged");
        // Removed: the log then starts with a gap.
        put(None);
        let v = crate::audit::verify(&**svc.backend(), svc.store())
            .await
            .unwrap();
        assert_eq!(v.problem.unwrap().kind, "gap");
        // A compaction on a forged anchor is refused.
        put(Some(AuditAnchor {
            seal: [0; 32],
            ..stored
        }));
        let last = entries(&svc).await.last().unwrap().clone();
        assert!(matches!(
            compact(&svc, last.seq, &last.mac, SHA).await,
            Err(CompactError::Refused(m)) if m.contains("seal")
        ));
    }
}

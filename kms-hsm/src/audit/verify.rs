//! Verification: the whole stored log against its chain, its head and its anchor, and an
//! export against the chain it claims to continue.

use kms_api::admin::{AuditEntry, AuditProblem, AuditVerifyResponse};

use crate::backend::KeyBackend;
use crate::keystore::KeyStore;

use super::*;

/// Checks that `entries` continue the chain from `anchor` (the entry before the first, with
/// its MAC): numbered `anchor.seq + 1` on without gaps, each MAC the HSM's over its
/// predecessor's. Used for audit exports given to a restore, anchored at the head the backup
/// recorded under its own HMAC.
///
/// # Errors
/// `Ok(Err(reason))` when the entries do not verify; [`AuditError`] when the HSM cannot be
/// used (nothing was judged).
pub async fn verify_continuation<B: KeyBackend>(
    backend: &B,
    anchor: &kms_api::admin::AuditMark,
    entries: &[AuditEntry],
) -> Result<Result<(), String>, AuditError> {
    let Some(mut prev) = hex::decode(&anchor.mac)
        .ok()
        .and_then(|m| <[u8; 32]>::try_from(m.as_slice()).ok())
    else {
        return Ok(Err("the anchor's MAC is not 32 bytes of hex".into()));
    };
    for (i, e) in entries.iter().enumerate() {
        let want = anchor.seq + 1 + i as u64;
        if e.seq != want {
            return Ok(Err(format!(
                "entry {want} is missing (the export has {} there)",
                e.seq
            )));
        }
    }
    for chunk in entries.chunks(VERIFY_CHUNK) {
        let macs = backend
            .audit_chain(prev, chunk.iter().map(mac_input).collect())
            .await?;
        for (e, m) in chunk.iter().zip(&macs) {
            let stored = hex::decode(&e.mac).unwrap_or_default();
            if !constant_time_eq(&stored, m) {
                return Ok(Err(format!(
                    "entry {} does not verify: it, or one before it, was edited, inserted or reordered, or the export is of another log",
                    e.seq
                )));
            }
            prev = *m;
        }
    }
    Ok(Ok(()))
}

/// Checks the whole log against its chain and its head.
///
/// # Errors
/// [`AuditError`] when the HSM or the store cannot be used (then nothing was judged).
pub async fn verify<B: KeyBackend, S: KeyStore>(
    backend: &B,
    store: &S,
) -> Result<AuditVerifyResponse, AuditError> {
    let head = store.audit_head().await?;
    let head_seq = head.map_or(0, |h| h.seq);
    let problem = |kind: &str, seq: u64, message: String| AuditProblem {
        kind: kind.to_owned(),
        seq,
        message,
    };
    // Once a prefix was archived and removed, the log starts after its sealed anchor.
    let anchor = store.audit_anchor().await?;
    let archived_through = anchor.map(|a| a.seq);
    let answer = |verified: u64, p: Option<AuditProblem>| AuditVerifyResponse {
        ok: p.is_none(),
        verified,
        head_seq,
        archived_through,
        problem: p,
    };
    let (mut expected, mut prev) = match &anchor {
        None => (1u64, [0u8; 32]),
        Some(a) => {
            if !crate::audit_archive::is_sealed(backend, a).await? {
                return Ok(answer(
                    0,
                    Some(problem(
                        "anchor_forged",
                        a.seq,
                        format!(
                            "the anchor at entry {} does not verify: it was made or moved outside the KMS",
                            a.seq
                        ),
                    )),
                ));
            }
            (a.seq.saturating_add(1), a.mac)
        }
    };
    let mut verified = 0u64;
    let mut after = expected - 1;
    // Up to the head read first: entries appended while this runs are not judged against it.
    while after < head_seq {
        let mut page = store.audit_range(after, VERIFY_CHUNK).await?;
        page.retain(|(k, _)| *k <= head_seq);
        let Some(&(last, _)) = page.last() else { break };
        let mut entries = Vec::with_capacity(page.len());
        for (key, bytes) in page {
            if key != expected {
                let p = if key > expected {
                    problem(
                        "gap",
                        expected,
                        format!("entries {expected}..{} are missing (removed)", key - 1),
                    )
                } else {
                    problem("moved", key, format!("unexpected entry key {key}"))
                };
                return Ok(answer(verified, Some(p)));
            }
            let Ok(e) = serde_json::from_slice::<AuditEntry>(&bytes) else {
                return Ok(answer(
                    verified,
                    Some(problem(
                        "undecodable",
                        key,
                        format!("entry {key} cannot be read"),
                    )),
                ));
            };
            if e.seq != key {
                return Ok(answer(
                    verified,
                    Some(problem(
                        "moved",
                        key,
                        format!(
                            "the entry stored as {key} says it is {} (moved or reordered)",
                            e.seq
                        ),
                    )),
                ));
            }
            entries.push(e);
            expected += 1;
        }
        let macs = backend
            .audit_chain(prev, entries.iter().map(mac_input).collect())
            .await?;
        for (e, m) in entries.iter().zip(&macs) {
            let stored = hex::decode(&e.mac).unwrap_or_default();
            if !constant_time_eq(&stored, m) {
                return Ok(answer(
                    verified,
                    Some(problem(
                        "mac_mismatch",
                        e.seq,
                        format!(
                            "entry {} does not verify: it, or one before it, was edited, inserted or reordered",
                            e.seq
                        ),
                    )),
                ));
            }
            verified += 1;
            prev = *m;
        }
        after = last;
    }
    let last = expected - 1;
    let p = match head {
        None if last == 0 && anchor.is_none() => None,
        None => Some(problem(
            "head_missing",
            1,
            format!("{last} entries but no recorded head"),
        )),
        Some(h) if h.seq > last => Some(problem(
            "truncated_tail",
            last + 1,
            format!(
                "the log ends at {last} but its head says {}: entries {}..{} were cut off",
                h.seq,
                last + 1,
                h.seq
            ),
        )),
        Some(h) if h.seq < last => Some(problem(
            "beyond_head",
            h.seq + 1,
            format!("entries after the recorded head {} were added", h.seq),
        )),
        // Entries past the head that a live append has not covered by a newer head.
        Some(h) if beyond_current_head(store, h.seq).await? => Some(problem(
            "beyond_head",
            h.seq + 1,
            format!("entries after the recorded head {} were added", h.seq),
        )),
        Some(h) if !constant_time_eq(&h.mac, &prev) => Some(problem(
            "head_mismatch",
            h.seq,
            "the last entry's MAC is not the recorded head's".into(),
        )),
        Some(_) => None,
    };
    Ok(answer(verified, p))
}

/// Whether an entry exists past the head as it is *now* (re-read: appends go on while a
/// verification runs).
pub(super) async fn beyond_current_head<S: KeyStore>(
    store: &S,
    verified_to: u64,
) -> Result<bool, AuditError> {
    let now = store
        .audit_head()
        .await?
        .map_or(0, |h| h.seq)
        .max(verified_to);
    Ok(!store.audit_range(now, 1).await?.is_empty())
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

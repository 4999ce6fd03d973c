//! Events the HSM could not MAC when they happened (a refused PIN): stored unauthenticated,
//! chained later, and only in the one fixed form the KMS writes.

use kms_api::admin::AuditEntry;

use crate::keystore::now_secs;

use super::*;

/// Pending entries one append group reads and removes at most: a store writer who fills
/// the pending area slows no append by more than this many.
pub(super) const MAX_PENDING_PER_GROUP: usize = 16;

/// The one action the KMS stores as pending: a PIN the token refused.
pub(super) const PIN_REJECTED: &str = "hsm.pin_rejected";

/// A pending entry as it may be chained. The pending area is not authenticated (the HSM could
/// not MAC the event when it happened), so only the one legitimate kind is taken, in the fixed
/// form the KMS writes it ([`pending_entry`] of `hsm.pin_rejected`, by `kms`, `failed`, with
/// `when` and at most a token label), rebuilt field by field and marked `unverified`; its time
/// may not be in the future. Anything else (a fabricated `kek.destroy`, say) is `None`.
pub(super) fn admit_pending(e: &AuditEntry, now: u64) -> Option<AuditEntry> {
    let fixed = e.action == PIN_REJECTED
        && e.actor == "kms"
        && e.outcome == Outcome::Failed.as_str()
        && e.at <= now
        && e.detail.keys().all(|k| k == "when" || k == "token");
    if !fixed {
        return None;
    }
    let when = match e.detail.get("when").map(String::as_str) {
        Some(w @ ("start-up" | "running")) => w,
        _ => return None,
    };
    let mut ev = AuditEvent::new(PIN_REJECTED)
        .outcome(Outcome::Failed)
        .with("when", when)
        .with("pending", "unverified");
    if let Some(token) = e.detail.get("token") {
        // A token label: 1 to 32 printable characters (PKCS#11's field).
        let ok = (1..=32).contains(&token.len()) && token.chars().all(|c| !c.is_control());
        if !ok {
            return None;
        }
        ev = ev.with("token", token.as_str());
    }
    let mut admitted = pending_entry(ev);
    admitted.actor = "kms".into();
    admitted.at = e.at;
    Some(admitted)
}

/// `ev` as an entry not numbered or MACed yet: what an append queues, and what is stored as
/// pending when the HSM cannot MAC it now (see [`KeyStore::put_pending_audit`]).
pub fn pending_entry(ev: AuditEvent) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at: now_secs(),
        action: ev.action.to_owned(),
        actor: current_actor(),
        outcome: ev.outcome.as_str().to_owned(),
        detail: ev
            .detail
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        mac: String::new(),
    }
}

//! The tamper-evident audit log: every key lifecycle event and admin action, appended
//! durably to the key store and chained with an HMAC made inside the HSM.
//!
//! # Format
//! Entries ([`AuditEntry`]) are numbered 1, 2, 3, ... without gaps. Entry `n` carries
//! `mac_n = HMAC-SHA256(K, mac_{n-1} || "progressdb-kms:audit:v1" 0x00 || body_n)` where `K` is
//! the audit key (a generic-secret token object in the HSM, sensitive and never extractable,
//! labelled `hsm.audit_key_label`), `mac_0` is 32 zero bytes and `body_n` is the JSON of the
//! entry without its `mac` (fields in declaration order, `detail` sorted by key). The store
//! keeps the head (`seq`, `mac` of the last entry) in the same transaction as the entries.
//!
//! Without the HSM nobody can make a valid MAC, so [`verify`] finds an edited, removed,
//! inserted or reordered entry and names the first bad one; a log that ends before its
//! recorded head is reported as a truncated tail. (Someone able to rewrite the whole store
//! can still cut the tail *and* the head together; export the head (`audit verify` prints
//! it) to keep that detectable too.)
//!
//! # Fail closed
//! [`AuditLog::append`] returns only once the entry is durable. Callers append *before* they
//! act (create or destroy a DEK, create, retire or destroy a KEK version, start a job): no
//! audit, no action. Concurrent appends share one HSM job and one commit: the caller that
//! takes the sequencer lock writes everything queued.
//!
//! # Events the HSM cannot MAC
//! A refused PIN leaves the HSM unusable, so its entry cannot be chained when it happens: it
//! is stored as *pending* (unauthenticated) and chained, with its own time, by the next
//! append once the HSM is usable again (after the PIN is fixed and the KMS restarted).
//!
//! # Who
//! The HTTP layer runs every request inside [`ACTOR`] (the peer uid or certificate, and
//! whether it came through the admin endpoint); lifecycle jobs append as `kms`.

use std::collections::BTreeMap;
use std::sync::PoisonError;

use kms_api::admin::AuditEntry;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::backend::{BackendError, KeyBackend};
use crate::keystore::{now_secs, AuditHead, KeyStore, StoreError};

mod pending;
mod verify;

pub use pending::pending_entry;
use pending::{admit_pending, MAX_PENDING_PER_GROUP};
pub(crate) use verify::constant_time_eq;
pub use verify::{verify, verify_continuation};

tokio::task_local! {
    /// Who the current request comes from (set by the HTTP layer for each request).
    pub static ACTOR: std::sync::Arc<str>;
}

/// The actor of the current task: the request's peer, or `kms` outside a request.
pub fn current_actor() -> String {
    ACTOR
        .try_with(|a| a.to_string())
        .unwrap_or_else(|_| "kms".into())
}

/// Domain separation of the MAC input.
const DOMAIN: &[u8] = b"progressdb-kms:audit:v1\0";
/// Entries MACed per HSM job during verification.
const VERIFY_CHUNK: usize = 256;

/// Whether the audited action went ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Refused,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// One thing to audit. `detail` holds ids and versions only, never key material.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub action: &'static str,
    pub outcome: Outcome,
    pub detail: Vec<(&'static str, String)>,
}

impl AuditEvent {
    pub fn new(action: &'static str) -> Self {
        Self {
            action,
            outcome: Outcome::Ok,
            detail: Vec::new(),
        }
    }

    #[must_use]
    pub fn outcome(mut self, o: Outcome) -> Self {
        self.outcome = o;
        self
    }

    #[must_use]
    pub fn with(mut self, key: &'static str, value: impl ToString) -> Self {
        self.detail.push((key, value.to_string()));
        self
    }
}

/// Why an entry could not be appended. The action it guarded must not happen.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log: {0}")]
    Backend(#[from] BackendError),
    #[error("audit log: {0}")]
    Store(#[from] StoreError),
    #[error("audit log: the sequencer stopped before answering")]
    Dropped,
}

/// The body that is MACed: an entry without its `mac`.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    at: u64,
    action: &'a str,
    actor: &'a str,
    outcome: &'a str,
    detail: &'a BTreeMap<String, String>,
}

fn mac_input(e: &AuditEntry) -> Vec<u8> {
    let body = Body {
        seq: e.seq,
        at: e.at,
        action: &e.action,
        actor: &e.actor,
        outcome: &e.outcome,
        detail: &e.detail,
    };
    let mut out = DOMAIN.to_vec();
    // Serializing a struct of strings, integers and a string map cannot fail.
    out.extend(serde_json::to_vec(&body).unwrap_or_default());
    out
}

/// Times an entry is appended again after its group failed for another entry's cause (a
/// concurrent append by another replica, a conflicting record of another member).
const MAX_REQUEUES: u32 = 16;

struct Queued {
    entry: AuditEntry,
    /// A new key record written in the same transaction as the entry.
    record: Option<crate::keystore::KeyRecord>,
    /// The batch's outcome: a store failure as it is (so a full store stays `storage_full`),
    /// anything else as an I/O failure of the log.
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The audit sequencer of one process.
#[derive(Default)]
pub struct AuditLog {
    queue: std::sync::Mutex<Vec<Queued>>,
    chain: std::sync::Arc<ChainState>,
}

/// What the sequencer and the tasks settling its queued groups share.
#[derive(Default)]
struct ChainState {
    head: tokio::sync::Mutex<HeadState>,
    /// Keys of pending entries a queued group chains and has not settled yet: no other group
    /// chains them again.
    chaining: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[derive(Default)]
struct HeadState {
    /// The head the next group chains on: that of the last group queued, committed or not
    /// (`None`: read the committed one from the store first).
    head: Option<Option<AuditHead>>,
    /// Bumped when a failed commit voids the chain of groups queued since the head was last
    /// read from the store: the first failure of an epoch resets the head, later failures
    /// of the same epoch (groups chained on the failed one) do not.
    epoch: u64,
}

/// A group queued in the store and not settled yet.
struct InFlight {
    commit: crate::keystore::Commit,
    /// The epoch it was chained in.
    epoch: u64,
    batch: Vec<Queued>,
    /// The pending-entry keys it chains, released once it is settled.
    chained: Vec<String>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Appends `ev` (as the current [`ACTOR`]) and returns once it is durable.
    ///
    /// # Errors
    /// [`AuditError`] when the HSM cannot MAC it or the store cannot write it; nothing of the
    /// entry is then in the log, and the guarded action must not happen.
    pub async fn append<B: KeyBackend, S: KeyStore>(
        &self,
        backend: &B,
        store: &S,
        ev: AuditEvent,
    ) -> Result<(), AuditError> {
        self.append_with(backend, store, ev, None).await
    }

    /// Like [`AuditLog::append`], storing `record` (a new key) in the same transaction as
    /// the entry: the key exists if and only if its creation is in the log, for one commit.
    ///
    /// # Errors
    /// As [`AuditLog::append`]; `record` is not stored when this fails.
    pub async fn append_with<B: KeyBackend, S: KeyStore>(
        &self,
        backend: &B,
        store: &S,
        ev: AuditEvent,
        record: Option<crate::keystore::KeyRecord>,
    ) -> Result<(), AuditError> {
        let entry = pending_entry(ev);
        let own_key = record.as_ref().map(|r| r.key_id.clone());
        let mut attempt = 0u32;
        loop {
            let answer = self
                .append_once(backend, store, entry.clone(), record.clone())
                .await;
            // A group fails whole: when the cause was not this entry's (another group or
            // replica appended first, or another member's record exists), it goes again in
            // a later group, chained on the head as it is now.
            let someone_elses = match &answer {
                Err(AuditError::Store(StoreError::AuditHeadMoved)) => true,
                Err(AuditError::Store(StoreError::AlreadyExists(k))) => own_key.as_ref() != Some(k),
                _ => false,
            };
            if !someone_elses || attempt >= MAX_REQUEUES {
                return answer;
            }
            attempt += 1;
            tracing::debug!(
                attempt,
                "audit group failed for another entry's cause; appending again"
            );
        }
    }

    /// One try of [`AuditLog::append_with`].
    async fn append_once<B: KeyBackend, S: KeyStore>(
        &self,
        backend: &B,
        store: &S,
        entry: AuditEntry,
        record: Option<crate::keystore::KeyRecord>,
    ) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Queued {
                entry,
                record,
                reply: tx,
            });
        // Leader and followers: whoever takes the lock writes everything queued, including
        // the entries of callers still waiting for it (one HSM job and one commit for the
        // group); a caller whose entry a leader wrote meanwhile leaves the line at once.
        //
        // Pipelined: the head lock is held to number, MAC and queue a group, not while it
        // commits, so the next group is MACed by the HSM while this one is fsynced (and
        // groups queued meanwhile can share a commit). The store applies groups in the order
        // queued, and each one only on the head it was chained on, so a group chained on one
        // that then failed fails too: the chain never forks or has a gap.
        let mut rx = rx;
        let answer = tokio::select! {
            biased;
            r = &mut rx => r,
            mut head = self.chain.head.lock() => {
                let mut batch =
                    std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
                // A group holds each key record once: two creates racing with one idempotency
                // key would otherwise fail their group together and find no record to answer
                // with. The repeats go in the next group, which then finds the first one's.
                while !batch.is_empty() {
                    let (group, repeats) = one_record_per_key(batch);
                    self.lead(backend, store, &mut head, group).await;
                    batch = repeats;
                }
                drop(head);
                // Our entry was in this batch or an earlier one: its answer is there.
                rx.await
            }
        };
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Store(e)),
            Err(_) => Err(AuditError::Dropped),
        }
    }

    /// Appends `batch` as one group, `head` held by the caller. On a store several
    /// processes append to, the group is chained on the head read under the store's audit
    /// lock, and the lock is held until the group is committed: replicas take turns. On a
    /// store this process owns, groups are pipelined on the head in memory.
    async fn lead<B: KeyBackend, S: KeyStore>(
        &self,
        backend: &B,
        store: &S,
        head: &mut HeadState,
        batch: Vec<Queued>,
    ) {
        let lock = match store.lock_audit().await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "cannot take a turn at the audit log; the audited actions are refused");
                for q in batch {
                    let _ = q.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        if lock.is_shared() {
            // Another replica may have appended since this process last did.
            head.head = None;
        }
        let Some(group) = self.queue_group(backend, store, head, batch).await else {
            lock.release().await;
            return;
        };
        // Settled by its own task, so a caller that goes away (a dropped request) never
        // abandons a queued group, its followers, or the store's lock.
        let chain = std::sync::Arc::clone(&self.chain);
        if lock.is_shared() {
            let turn = tokio::spawn(async move {
                // The caller holds the head (a turn's groups are one at a time), and a shared
                // head is read again at the next turn: settling must not wait for it.
                settle(chain, group, AfterFailure::KeepHead).await;
                lock.release().await;
            });
            // The next group of this process waits for this commit anyway (the lock).
            let _ = turn.await;
        } else {
            tokio::spawn(settle(chain, group, AfterFailure::ResetHead));
        }
    }

    /// Numbers, chains, MACs and queues `batch` on `head` (held by the caller). Nothing is
    /// queued when this fails: the batch's callers are answered, and `head` is still the one
    /// to chain on.
    async fn queue_group<B: KeyBackend, S: KeyStore>(
        &self,
        backend: &B,
        store: &S,
        state: &mut HeadState,
        batch: Vec<Queued>,
    ) -> Option<InFlight> {
        let result = async {
            // The head (when it must be read) and the pending entries, read at once.
            let (current, pending) = match state.head {
                Some(h) => (h, store.pending_audits(MAX_PENDING_PER_GROUP).await?),
                None => {
                    let (h, p) = tokio::join!(
                        store.audit_head(),
                        store.pending_audits(MAX_PENDING_PER_GROUP)
                    );
                    (h?, p?)
                }
            };
            // Events recorded while the HSM could not MAC them go first, with their own time,
            // unless a group still committing chains them already.
            let taken = self
                .chain
                .chaining
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let pending: Vec<_> = pending
                .into_iter()
                .filter(|(k, _)| !taken.contains(k))
                .collect();
            // Every pending key read here is removed by this group; only refused PINs in
            // their fixed form are chained, the rest is counted in one entry.
            let chained: Vec<String> = pending.iter().map(|(k, _)| k.clone()).collect();
            let now = now_secs();
            let mut entries: Vec<AuditEntry> = Vec::new();
            let mut refused = 0usize;
            for (_, e) in &pending {
                match e.as_ref().and_then(|e| admit_pending(e, now)) {
                    Some(e) => entries.push(e),
                    None => refused += 1,
                }
            }
            if refused > 0 {
                tracing::warn!(
                    refused,
                    "pending audit entries not in the form the KMS writes were removed unchained"
                );
                entries.push(pending_entry(
                    AuditEvent::new("audit.pending_refused")
                        .outcome(Outcome::Refused)
                        .with("entries", refused),
                ));
            }
            entries.extend(batch.iter().map(|q| q.entry.clone()));
            let (mut seq, prev) = current.map_or((0, [0u8; 32]), |h| (h.seq, h.mac));
            for e in &mut entries {
                seq += 1;
                e.seq = seq;
            }
            let messages = entries.iter().map(mac_input).collect();
            let macs = backend.audit_chain(prev, messages).await?;
            if macs.len() != entries.len() {
                return Err(AuditError::Backend(BackendError::Internal(
                    "the HSM returned a MAC count different from the entry count".into(),
                )));
            }
            for (e, m) in entries.iter_mut().zip(&macs) {
                e.mac = hex::encode(m);
            }
            let new_head = AuditHead {
                seq,
                mac: macs.last().copied().unwrap_or(prev),
            };
            let records = batch.iter().filter_map(|q| q.record.clone()).collect();
            // `current` is the head these entries chain on: if the stored one differs when
            // the store applies them (an append whose caller went away after queueing it, or
            // a group before this one that failed), nothing is written.
            let commit = store
                .queue_audit(entries, current, new_head, chained.clone(), records)
                .await?;
            Ok::<_, AuditError>((commit, new_head, chained))
        }
        .await;
        match result {
            Ok((commit, new_head, chained)) => {
                state.head = Some(Some(new_head));
                self.chain
                    .chaining
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(chained.iter().cloned());
                Some(InFlight {
                    commit,
                    epoch: state.epoch,
                    batch,
                    chained,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "cannot append to the audit log; the audited actions are refused");
                let failure = match &e {
                    AuditError::Store(s) => s.clone(),
                    other => StoreError::Io(other.to_string()),
                };
                for q in batch {
                    let _ = q.reply.send(Err(failure.clone()));
                }
                None
            }
        }
    }
}

/// Waits until `group` is durable, answers its callers and releases the pending entries it
/// chained.
/// Splits `batch` into a group where no key record appears twice, and the repeats.
fn one_record_per_key(batch: Vec<Queued>) -> (Vec<Queued>, Vec<Queued>) {
    let mut seen = std::collections::HashSet::new();
    batch.into_iter().partition(|q| match &q.record {
        Some(r) => seen.insert(r.key_id.clone()),
        None => true,
    })
}

/// What a failed commit does to the head in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterFailure {
    /// Pipelined groups (a store this process owns): the next group must chain on the
    /// committed head, so the head is reset (taking its lock).
    ResetHead,
    /// A shared store's turn: the caller holds the head lock while this settles, and the
    /// next turn reads the head from the store anyway. Taking the lock here would wait for
    /// the caller, which waits for this: a turn whose commit failed (a key another replica
    /// committed first) would hang until its request went away.
    KeepHead,
}

async fn settle(chain: std::sync::Arc<ChainState>, group: InFlight, after: AfterFailure) {
    let result = group.commit.await;
    if result.is_err() && after == AfterFailure::ResetHead {
        // Every group queued before this one is applied by now (the store applies them in
        // order) and every one queued after it in this epoch chains on it and fails too: the
        // first failure of the epoch makes the next group chain on the committed head again.
        let mut state = chain.head.lock().await;
        if state.epoch == group.epoch {
            state.head = None;
            state.epoch += 1;
        }
    }
    {
        let mut set = chain
            .chaining
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for k in &group.chained {
            set.remove(k);
        }
    }
    match result {
        Ok(()) => {
            for q in group.batch {
                let _ = q.reply.send(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, entries = group.batch.len(), "cannot append to the audit log; the audited actions are refused");
            for q in group.batch {
                let _ = q.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

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

use kms_api::admin::{AuditEntry, AuditProblem, AuditVerifyResponse};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::backend::{BackendError, KeyBackend};
use crate::keystore::{now_secs, AuditHead, KeyStore, StoreError};

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
    shared: std::sync::Arc<Shared>,
}

/// What the sequencer and the tasks settling its queued groups share.
#[derive(Default)]
struct Shared {
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
            mut head = self.shared.head.lock() => {
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
        let shared = std::sync::Arc::clone(&self.shared);
        if lock.is_shared() {
            let turn = tokio::spawn(async move {
                // The caller holds the head (a turn's groups are one at a time), and a shared
                // head is read again at the next turn: settling must not wait for it.
                settle(shared, group, AfterFailure::KeepHead).await;
                lock.release().await;
            });
            // The next group of this process waits for this commit anyway (the lock).
            let _ = turn.await;
        } else {
            tokio::spawn(settle(shared, group, AfterFailure::ResetHead));
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
                .shared
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
                self.shared
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

async fn settle(shared: std::sync::Arc<Shared>, group: InFlight, after: AfterFailure) {
    let result = group.commit.await;
    if result.is_err() && after == AfterFailure::ResetHead {
        // Every group queued before this one is applied by now (the store applies them in
        // order) and every one queued after it in this epoch chains on it and fails too: the
        // first failure of the epoch makes the next group chain on the committed head again.
        let mut state = shared.head.lock().await;
        if state.epoch == group.epoch {
            state.head = None;
            state.epoch += 1;
        }
    }
    {
        let mut set = shared
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

/// Pending entries one append group reads and removes at most: a store writer who fills
/// the pending area slows no append by more than this many.
const MAX_PENDING_PER_GROUP: usize = 16;

/// The one action the KMS stores as pending: a PIN the token refused.
const PIN_REJECTED: &str = "hsm.pin_rejected";

/// A pending entry as it may be chained. The pending area is not authenticated (the HSM could
/// not MAC the event when it happened), so only the one legitimate kind is taken, in the fixed
/// form the KMS writes it ([`pending_entry`] of `hsm.pin_rejected`, by `kms`, `failed`, with
/// `when` and at most a token label), rebuilt field by field and marked `unverified`; its time
/// may not be in the future. Anything else (a fabricated `kek.destroy`, say) is `None`.
fn admit_pending(e: &AuditEntry, now: u64) -> Option<AuditEntry> {
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
async fn beyond_current_head<S: KeyStore>(store: &S, verified_to: u64) -> Result<bool, AuditError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::keystore::lmdb::LmdbStore;
    use crate::metrics::StoreMetrics;
    use crate::testing::MockBackend;

    async fn filled(n: usize) -> (tempfile::TempDir, MockBackend, LmdbStore, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), 16, StoreMetrics::unregistered()).unwrap();
        let backend = MockBackend::new();
        let log = AuditLog::default();
        for i in 0..n {
            log.append(
                &backend,
                &store,
                AuditEvent::new("dek.create").with("key_id", format!("k{i}")),
            )
            .await
            .unwrap();
        }
        (dir, backend, store, log)
    }

    /// On a shared store (PostgreSQL) a turn whose commit fails, here because another
    /// replica committed the same key first (a create retried after a replica died), answers
    /// its caller at once: settling it used to wait for the head lock its own caller held,
    /// and the create hung until its request went away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_turn_on_a_shared_store_answers_at_once() {
        let url = testkit::pg::PgCluster::shared().new_database();
        let cfg = crate::config::PostgresConfig::new(
            url,
            None,
            None,
            4,
            std::time::Duration::from_secs(5),
            std::time::Duration::from_millis(500),
        )
        .unwrap();
        let store =
            crate::keystore::postgres::PostgresStore::open(&cfg, StoreMetrics::unregistered())
                .await
                .unwrap();
        let backend = MockBackend::new();
        let log = AuditLog::default();
        let record = crate::keystore::KeyRecord {
            key_id: kms_api::KeyId::from_random([7; 16]),
            kek_id: kms_api::KekId::parse("kek").unwrap(),
            kek_version: kms_api::KekVersion::FIRST,
            thread_id: kms_api::ThreadId::parse("t").unwrap(),
            created_at: 1_700_000_000,
            state: crate::keystore::KeyState::Active {
                wrapped: kms_api::WrappedDek::new(vec![7; 65]),
            },
        };
        // "The other replica" committed it.
        store.put_new(record.clone()).await.unwrap();
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            log.append_with(
                &backend,
                &store,
                AuditEvent::new("dek.create").with("key_id", &record.key_id),
                Some(record.clone()),
            ),
        )
        .await
        .expect("a failed audit turn hung");
        assert!(
            matches!(r, Err(AuditError::Store(StoreError::AlreadyExists(_)))),
            "{r:?}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        // And the log goes on.
        log.append(&backend, &store, AuditEvent::new("dek.destroy"))
            .await
            .unwrap();
    }

    /// A store writer plants pending entries: a fabricated `kek.destroy` by an operator, a
    /// refused PIN with extra fields, one from the future, garbage, and a flood. Only the
    /// refused PIN in its fixed form is chained (marked unverified); the rest is removed and
    /// counted; no group takes more than its share of the flood.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn planted_pending_entries_are_refused_and_bounded() {
        let (_d, backend, store, log) = filled(1).await;
        let mut pin = pending_entry(
            AuditEvent::new(PIN_REJECTED)
                .outcome(Outcome::Failed)
                .with("token", "progressdb")
                .with("when", "start-up"),
        );
        pin.at -= 5;
        let mut forged = pin.clone();
        forged.action = "kek.destroy".into();
        forged.actor = "admin:uid:0".into();
        forged.outcome = "ok".into();
        let mut extra = pin.clone();
        extra.detail.insert("note".into(), "x".into());
        let mut future = pin.clone();
        future.at = now_secs() + 3600;
        let mut other_actor = pin.clone();
        other_actor.actor = "admin:uid:0".into();
        // Keys order by time: the legitimate entry is read first.
        store.put_pending_audit(pin.clone()).await.unwrap();
        for e in [forged, extra, future, other_actor] {
            store.put_pending_audit(e).await.unwrap();
        }
        log.append(&backend, &store, AuditEvent::new("dek.create"))
            .await
            .unwrap();
        let page = store.audit_range(1, 100).await.unwrap();
        let entries: Vec<AuditEntry> = page
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect();
        let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            ["hsm.pin_rejected", "audit.pending_refused", "dek.create"],
            "{entries:?}"
        );
        assert_eq!(entries[0].detail["pending"], "unverified");
        assert_eq!(entries[0].detail["token"], "progressdb");
        assert_eq!(entries[0].at, pin.at);
        assert_eq!(entries[1].detail["entries"], "4");
        assert!(store.pending_audits(100).await.unwrap().is_empty());
        // A flood: each append removes at most its share, and appends go on.
        for i in 0..40u64 {
            let mut e = pin.clone();
            e.action = "kek.destroy".into();
            e.at -= i;
            store.put_pending_audit(e).await.unwrap();
        }
        log.append(&backend, &store, AuditEvent::new("dek.create"))
            .await
            .unwrap();
        let left = store.pending_audits(100).await.unwrap().len();
        assert_eq!(left, 40 - MAX_PENDING_PER_GROUP);
        let v = verify(&backend, &store).await.unwrap();
        assert!(v.ok, "{v:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_chain_and_verify() {
        let (_d, backend, store, log) = filled(3).await;
        // Concurrent appends share commits and stay gapless.
        let (backend, store, log) = (Arc::new(backend), Arc::new(store), Arc::new(log));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (b, s, l) = (backend.clone(), store.clone(), log.clone());
                tokio::spawn(
                    ACTOR.scope(std::sync::Arc::from(format!("uid:{i}")), async move {
                        l.append(
                            &*b,
                            &*s,
                            AuditEvent::new("admin.refused").outcome(Outcome::Refused),
                        )
                        .await
                        .unwrap();
                    }),
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let v = verify(&*backend, &*store).await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.verified, v.head_seq), (23, 23));
        let page = store.audit_range(0, 100).await.unwrap();
        let seqs: Vec<u64> = page.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=23).collect::<Vec<_>>());
        let e: AuditEntry = serde_json::from_slice(&page[5].1).unwrap();
        assert!(e.actor.starts_with("uid:"), "{e:?}");
        assert_eq!(e.outcome, "refused");
        let first: AuditEntry = serde_json::from_slice(&page[0].1).unwrap();
        assert_eq!(first.actor, "kms");
        assert_eq!(first.detail["key_id"], "k0");
    }

    /// Groups pipelined behind a group whose commit fails (a duplicate key record) fail
    /// with it, never fork the chain, and the log goes on: every append that answered Ok is
    /// in the log, in one gapless chain that verifies, and nothing else is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_in_the_pipeline_never_forks_the_chain() {
        let (_d, backend, store, log) = filled(1).await;
        let dup = crate::keystore::KeyRecord {
            key_id: kms_api::KeyId::from_random([9; 16]),
            kek_id: kms_api::KekId::parse("kek").unwrap(),
            kek_version: kms_api::KekVersion::new(1).unwrap(),
            thread_id: kms_api::ThreadId::parse("t").unwrap(),
            created_at: 1,
            state: crate::keystore::KeyState::Destroyed { destroyed_at: 1 },
        };
        store.put_new(dup.clone()).await.unwrap();
        let (backend, store, log) = (Arc::new(backend), Arc::new(store), Arc::new(log));
        let tasks: Vec<_> = (0..33)
            .map(|i| {
                let (b, s, l, dup) = (backend.clone(), store.clone(), log.clone(), dup.clone());
                tokio::spawn(async move {
                    let mut ok = 0u64;
                    for j in 0..15 {
                        // One task keeps re-creating an existing key: its groups fail.
                        let record = (i == 0 && j % 3 == 0).then(|| dup.clone());
                        let ev = AuditEvent::new("dek.create").with("n", format!("{i}-{j}"));
                        if l.append_with(&*b, &*s, ev, record).await.is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut ok = 1; // the one `filled` wrote
        for t in tasks {
            ok += t.await.unwrap();
        }
        assert!(
            ok < 1 + 33 * 15,
            "no append failed: the duplicate was accepted"
        );
        // A failure takes down only its group and those already chained on it: the log
        // goes on under load (a reset that never happened would fail nearly everything
        // after the first failure).
        assert!(
            ok > 33 * 15 / 2,
            "only {ok} of {} appends succeeded",
            33 * 15
        );
        log.append(&*backend, &*store, AuditEvent::new("after"))
            .await
            .unwrap();
        ok += 1;
        let v = verify(&*backend, &*store).await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.verified, v.head_seq), (ok, ok), "{v:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_chained_on_a_stale_head_writes_nothing() {
        let (_d, backend, store, _log) = filled(3).await;
        let e = AuditEntry {
            seq: 1,
            at: 0,
            action: "forged".into(),
            actor: "x".into(),
            outcome: "ok".into(),
            detail: BTreeMap::new(),
            mac: "00".into(),
        };
        let stale = AuditHead {
            seq: 1,
            mac: [0; 32],
        };
        let r = match store
            .queue_audit(vec![e.clone()], None, stale, vec![], vec![])
            .await
        {
            Ok(commit) => commit.await,
            Err(e) => Err(e),
        };
        assert!(matches!(r, Err(StoreError::AuditHeadMoved)), "{r:?}");
        let v = verify(&backend, &store).await.unwrap();
        assert!(v.ok && v.head_seq == 3, "{v:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_hsm_appends_nothing_and_the_chain_continues() {
        let (_d, backend, store, log) = filled(2).await;
        backend.set_down(true);
        assert!(log
            .append(&backend, &store, AuditEvent::new("kek.rotate"))
            .await
            .is_err());
        backend.set_down(false);
        log.append(&backend, &store, AuditEvent::new("kek.rotate"))
            .await
            .unwrap();
        let v = verify(&backend, &store).await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.head_seq, 3);
    }

    /// Runs `f` on a fresh log of 6 entries and returns what verification says.
    async fn tampered(
        f: impl FnOnce(
            &mut heed::RwTxn<'_>,
            heed::Database<heed::types::Bytes, heed::types::Bytes>,
            heed::Database<heed::types::Str, heed::types::Bytes>,
        ),
    ) -> AuditVerifyResponse {
        let (_d, backend, store, _log) = filled(6).await;
        store.tamper_audit(f);
        verify(&backend, &store).await.unwrap()
    }

    fn get(
        w: &heed::RwTxn<'_>,
        db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
        seq: u64,
    ) -> AuditEntry {
        serde_json::from_slice(db.get(w, &seq.to_be_bytes()).unwrap().unwrap()).unwrap()
    }

    fn put(
        w: &mut heed::RwTxn<'_>,
        db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
        seq: u64,
        e: &AuditEntry,
    ) {
        db.put(w, &seq.to_be_bytes(), &serde_json::to_vec(e).unwrap())
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_tampering_is_found_and_named() {
        // Edited.
        let v = tampered(|w, db, _| {
            let mut e = get(w, db, 3);
            e.detail.insert("key_id".into(), "someone-else".into());
            put(w, db, 3, &e);
        })
        .await;
        let p = v.problem.unwrap();
        assert_eq!((p.kind.as_str(), p.seq, v.verified), ("mac_mismatch", 3, 2));
        // Removed from the middle.
        let v = tampered(|w, db, _| {
            db.delete(w, &4u64.to_be_bytes()).unwrap();
        })
        .await;
        let p = v.problem.unwrap();
        assert_eq!((p.kind.as_str(), p.seq), ("gap", 4), "{p:?}");
        // Removed from the middle and renumbered to hide the gap.
        let v = tampered(|w, db, _| {
            for seq in 4..6 {
                let mut e = get(w, db, seq + 1);
                e.seq = seq;
                put(w, db, seq, &e);
            }
            db.delete(w, &6u64.to_be_bytes()).unwrap();
        })
        .await;
        assert_eq!(v.problem.unwrap().kind, "mac_mismatch");
        // Inserted (a forged entry with a made-up MAC, the rest renumbered).
        let v = tampered(|w, db, _| {
            for seq in (3..=6).rev() {
                let mut e = get(w, db, seq);
                e.seq = seq + 1;
                put(w, db, seq + 1, &e);
            }
            let mut forged = get(w, db, 2);
            forged.seq = 3;
            forged.action = "kek.destroy".into();
            put(w, db, 3, &forged);
        })
        .await;
        let p = v.problem.unwrap();
        assert_eq!((p.kind.as_str(), p.seq), ("mac_mismatch", 3));
        // Reordered (two entries swapped, keys only).
        let v = tampered(|w, db, _| {
            let (a, b) = (get(w, db, 2), get(w, db, 5));
            put(w, db, 2, &b);
            put(w, db, 5, &a);
        })
        .await;
        let p = v.problem.unwrap();
        assert_eq!((p.kind.as_str(), p.seq), ("moved", 2));
        // Reordered with the sequence numbers rewritten too.
        let v = tampered(|w, db, _| {
            let (mut a, mut b) = (get(w, db, 2), get(w, db, 5));
            a.seq = 5;
            b.seq = 2;
            put(w, db, 2, &b);
            put(w, db, 5, &a);
        })
        .await;
        let p = v.problem.unwrap();
        assert_eq!((p.kind.as_str(), p.seq), ("mac_mismatch", 2));
        // Truncated tail.
        let v = tampered(|w, db, _| {
            db.delete(w, &6u64.to_be_bytes()).unwrap();
            db.delete(w, &5u64.to_be_bytes()).unwrap();
        })
        .await;
        let p = v.problem.unwrap();
        assert_eq!(
            (p.kind.as_str(), p.seq, v.verified),
            ("truncated_tail", 5, 4)
        );
        // Undecodable.
        let v = tampered(|w, db, _| {
            db.put(w, &2u64.to_be_bytes(), b"{not json").unwrap();
        })
        .await;
        assert_eq!(v.problem.unwrap().kind, "undecodable");
        // Untouched: fine.
        let v = tampered(|_, _, _| {}).await;
        assert!(v.ok && v.verified == 6 && v.head_seq == 6, "{v:?}");
    }
}

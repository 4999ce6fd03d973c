//! The [`KeyStore`] boundary: the trait both stores implement, and the values its methods
//! answer (change-feed pages, the audit turn, lease and destroy outcomes, queued commits).

use std::future::Future;

use kms_api::{KekVersion, KeyId};

use super::{
    postgres, AuditAnchor, AuditHead, Compacted, JobRecord, KekVersionRecord, KeyRecord,
    PendingAudit, StoreError,
};

/// The durability of a queued write ([`KeyStore::queue_audit`]): resolves once it is
/// committed, or with why nothing of it was written.
pub type Commit = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A change another process made to the store, as its change feed reports it
/// ([`KeyStore::changes_after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key was destroyed: no cache may serve it any more.
    KeyDestroyed(KeyId),
    /// A KEK version's record changed (retired or destroyed).
    KekVersion(KekVersion),
}

/// A page of the change feed: the changes after the cursor given, and the cursor to give
/// next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    pub cursor: u64,
    pub changes: Vec<Change>,
    /// More changes can be read now, from the new cursor.
    pub more: bool,
}

/// A process's turn at appending to the audit log ([`KeyStore::lock_audit`]).
#[derive(Debug)]
pub enum AuditLock {
    /// The store has one writer process (LMDB): there is nothing to take turns with.
    Unshared,
    /// A PostgreSQL advisory lock, held until released.
    Postgres(Box<postgres::AuditLock>),
}

impl AuditLock {
    /// Whether other processes append to the same log (the head must then be read from the
    /// store under the lock, never taken from memory).
    pub fn is_shared(&self) -> bool {
        matches!(self, AuditLock::Postgres(_))
    }

    /// Ends the turn.
    pub async fn release(self) {
        match self {
            AuditLock::Unshared => {}
            AuditLock::Postgres(l) => l.release().await,
        }
    }
}

/// Outcome of [`KeyStore::acquire_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The caller held the lease and it had not expired: it is extended.
    Renewed,
    /// The caller holds the lease now, and did not just before (it was free, released, or
    /// expired): whatever it guards may have changed since the caller last held it.
    Acquired,
    /// Another holder's lease has not expired.
    HeldBy(String),
}

/// Outcome of [`KeyStore::mark_destroyed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestroyOutcome {
    Destroyed,
    AlreadyDestroyed,
    Unknown,
}

/// Where key records live.
pub trait KeyStore: Send + Sync + 'static {
    /// The record of `key_id`, if any (active or destroyed).
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn get(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<Option<KeyRecord>, StoreError>> + Send;

    /// Stores a new record durably; concurrent calls may share one commit.
    ///
    /// # Errors
    /// `AlreadyExists` when the key id is taken; `Full`, `Io`, `Closed`.
    fn put_new(&self, record: KeyRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces `expected` by `new` durably, only if the stored record is still exactly
    /// `expected` (compare-and-swap; KEK rotation rewraps this way). A destroy that raced the
    /// caller therefore wins: a destroyed key is never brought back by a late rewrap.
    ///
    /// # Errors
    /// `NotFound` when there is no such record; `Conflict` when it changed since `expected`
    /// was read (nothing written); `Full`, `Io`, `Closed`.
    fn compare_and_swap(
        &self,
        expected: &KeyRecord,
        new: KeyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` records with key ids greater than `after`, in key-id order.
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn list(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<KeyRecord>, StoreError>> + Send;

    /// Removes the wrapped DEK of `key_id` and marks it destroyed, durably. Idempotent.
    ///
    /// # Errors
    /// `Full`, `Io`, `Closed`.
    fn mark_destroyed(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<DestroyOutcome, StoreError>> + Send;

    /// How many key records (active and destroyed) the store holds.
    ///
    /// # Errors
    /// `Io`.
    fn key_count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Every KEK version record, ascending.
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn kek_versions(
        &self,
    ) -> impl Future<Output = Result<Vec<KekVersionRecord>, StoreError>> + Send;

    /// Stores (creates or replaces) the record of one KEK version, durably.
    ///
    /// # Errors
    /// `Full`, `Io`, `Closed`.
    fn put_kek_version(
        &self,
        record: KekVersionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every job record, oldest first.
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn jobs(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send;

    /// Stores (creates or replaces) a job record, durably.
    ///
    /// # Errors
    /// `Full`, `Io`, `Closed`.
    fn put_job(&self, job: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes this process's turn at the audit log: until the lock is released, no other
    /// process appends. The audit sequencer holds it from reading the head to the commit of
    /// the group it chains on that head, so replicas appending at once take turns instead
    /// of voiding each other's groups (which [`KeyStore::queue_audit`] still refuses, as the
    /// last line). A store one process owns answers [`AuditLock::Unshared`] at once.
    ///
    /// # Errors
    /// `Io` (the database cannot be reached, or the wait exceeded its statement timeout).
    fn lock_audit(&self) -> impl Future<Output = Result<AuditLock, StoreError>> + Send;

    /// Takes lease `name` for `holder` for `ttl`, measured on the store's clock (so the
    /// replicas' clocks do not matter), or renews it when `holder` holds it already. An
    /// expired lease is taken over. Leases coordinate replicas: `admin` serialises job starts
    /// and KEK changes, `job/<id>` names the one replica that drives a job
    /// ([`crate::lifecycle`]).
    ///
    /// # Errors
    /// `Io`; nothing is held then.
    fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<LeaseOutcome, StoreError>> + Send;

    /// Gives up lease `name` when `holder` holds it. Idempotent.
    ///
    /// # Errors
    /// `Io` (the lease then lapses at its expiry).
    fn release_lease(
        &self,
        name: &str,
        holder: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores `job` and extends lease `name` by `ttl`, in one transaction, only while
    /// `holder` holds that lease: a replica that lost a job to another (it stalled past the
    /// lease) can never write over the new driver's progress.
    ///
    /// # Errors
    /// `LeaseLost` when the lease expired or another holds it (nothing written); `Full`,
    /// `Io`, `Closed`.
    fn put_job_leased(
        &self,
        job: JobRecord,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The audit log's head, if any entry was ever written.
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn audit_head(&self) -> impl Future<Output = Result<Option<AuditHead>, StoreError>> + Send;

    /// The audit log's anchor, once a prefix of it was removed ([`KeyStore::compact_audit`]).
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn audit_anchor(&self) -> impl Future<Output = Result<Option<AuditAnchor>, StoreError>> + Send;

    /// In one transaction: removes the audit entries up to and including `anchor.seq` and the
    /// key records of keys destroyed at or before `tombstones_through` (unix seconds), and
    /// records `anchor`. The caller verified those entries in the HSM, archived them and
    /// logged the compaction first; a restore of a backup older than the anchor then reads
    /// the keys destroyed after it from the archive (`restore --audit`).
    ///
    /// # Errors
    /// `AuditHeadMoved` (nothing removed) when the log does not hold entry `anchor.seq` with
    /// MAC `anchor.mac` below its head, or the stored anchor is at or past it; `Io`,
    /// `Corrupt`, `NoSpace`, `Closed`.
    fn compact_audit(
        &self,
        anchor: AuditAnchor,
        tombstones_through: u64,
    ) -> impl Future<Output = Result<Compacted, StoreError>> + Send;

    /// Queues an append of audit entries that moves the head, as one durable transaction
    /// that also removes the pending entries named in `chained` (now part of the chain) and
    /// stores the new key `records` the entries record (so a created key and its audit entry
    /// share one commit). The caller (the one audit sequencer) numbers and chains the
    /// entries.
    ///
    /// Two steps, so that the sequencer can chain the next group while this one commits:
    /// the returned future resolves once the append is queued, behind every append queued
    /// before it (the store applies them in that order), and the [`Commit`] it yields
    /// resolves once the append is durable, or failed.
    ///
    /// `prev` is the head the entries were chained on (`None`: the log was empty): when the
    /// stored head is another one when the append is applied (an append the caller did not
    /// see, or a group queued before this one that then failed), nothing is written and the
    /// commit answers `AuditHeadMoved`, so the chain never forks and never has a gap.
    ///
    /// # Errors
    /// Queueing: `Io` (an entry cannot be encoded) or `Closed`; nothing is queued. The
    /// commit: `AuditHeadMoved` as above, `AlreadyExists` when one of `records` exists or two
    /// of them share a key id, `Full`, `NoSpace`, `Io`, `Closed`; in every case nothing was
    /// written.
    fn queue_audit(
        &self,
        entries: Vec<kms_api::admin::AuditEntry>,
        prev: Option<AuditHead>,
        head: AuditHead,
        chained: Vec<String>,
        records: Vec<KeyRecord>,
    ) -> impl Future<Output = Result<Commit, StoreError>> + Send;

    /// Records an event that must be audited but cannot be MACed now (the HSM refused the
    /// PIN): it is chained, with its own time, by the next append once the HSM is usable.
    ///
    /// # Errors
    /// `Full`, `Io`, `Closed`.
    fn put_pending_audit(
        &self,
        entry: kms_api::admin::AuditEntry,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` pending entries (see [`KeyStore::put_pending_audit`]) with their keys,
    /// oldest first; one that does not decode is returned as `None` (the audit log refuses
    /// it: the pending area is not authenticated, so what it holds is never trusted).
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn pending_audits(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PendingAudit>, StoreError>> + Send;

    /// Up to `limit` audit records stored under sequence numbers greater than `after`, in
    /// order, as stored (undecoded: verification must see what is on disk).
    ///
    /// # Errors
    /// `Io`.
    fn audit_range(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, StoreError>> + Send;

    /// The change feed: up to about `limit` changes recorded after `cursor` (`None`: none,
    /// just the current cursor), oldest first, including every change committed after the
    /// cursor was given, whatever order the changes' transactions committed in. A change may
    /// be delivered more than once (acting on one is idempotent). A store one process owns (LMDB) has no other
    /// writer and answers an empty page at cursor 0.
    ///
    /// # Errors
    /// `Io` or `Corrupt`.
    fn changes_after(
        &self,
        cursor: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<ChangePage, StoreError>> + Send;

    /// `Ok` when the store can serve reads and writes now.
    ///
    /// # Errors
    /// The reason it cannot.
    fn check(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

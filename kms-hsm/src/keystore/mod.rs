//! Durable records of the DEKs the KMS has created (key id → wrapped DEK, KEK id and version,
//! thread id, creation time and state), and of the key lifecycle: what happened to each KEK
//! version and the lifecycle jobs with their progress.
//!
//! [`KeyStore`] is the boundary, with two implementations: [`lmdb::LmdbStore`] (embedded,
//! one host, the default) and [`postgres::PostgresStore`] (shared by several KMS replicas);
//! [`AnyStore`] is the one the KMS runs on, picked by `store.backend`. A store promises:
//! * a write returns only once it is durable (committed and synced);
//! * writes are linearizable per key (one writer);
//! * it never holds raw key material: records carry the *wrapped* DEK only, and a destroyed
//!   record keeps no wrapped DEK at all (crypto-shredding).

use std::future::Future;

use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use serde::{Deserialize, Serialize};

pub mod lmdb;
pub mod postgres;

/// One DEK's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub kek_id: KekId,
    /// The KEK version the DEK is (or was, when destroyed) wrapped under.
    pub kek_version: KekVersion,
    pub thread_id: ThreadId,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(flatten)]
    pub state: KeyState,
}

/// Lifecycle state of a DEK. An active key has its wrapped form; a destroyed key has none,
/// so no one (not even the HSM) can recover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    Active {
        wrapped: WrappedDek,
    },
    Destroyed {
        /// Seconds since the Unix epoch.
        destroyed_at: u64,
    },
}

impl KeyRecord {
    /// The wrapped DEK of an active key.
    pub fn wrapped(&self) -> Option<&WrappedDek> {
        match &self.state {
            KeyState::Active { wrapped } => Some(wrapped),
            KeyState::Destroyed { .. } => None,
        }
    }
}

/// What the KMS did with a KEK version (the key itself lives in the HSM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KekState {
    /// Usable: the current version, or an older one that records may still depend on.
    Active,
    /// A rotation moved every DEK off it and verified them; it only stays for old backups
    /// until `kek destroy` removes it from the HSM.
    Retired,
    /// Removed from the HSM; nothing can be unwrapped under it any more.
    Destroyed,
}

/// The store's record of one KEK version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekVersionRecord {
    pub version: KekVersion,
    pub state: KekState,
    /// Seconds since the Unix epoch; 0 when the version predates these records.
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<u64>,
}

/// A lifecycle job's record (see [`crate::lifecycle`]): the admin API's [`kms_api::admin::Job`]
/// as it is, persisted after every step, so a restarted KMS resumes it where it stopped.
pub type JobRecord = kms_api::admin::Job;

/// The durability of a queued write ([`KeyStore::queue_audit`]): resolves once it is
/// committed, or with why nothing of it was written.
pub type Commit = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// The last audit entry: its sequence number and MAC. Written in the same transaction as the
/// entries, so a log shorter than its head was cut after the fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    #[serde(with = "hex_mac")]
    pub mac: [u8; 32],
}

/// Where the stored audit log begins once a prefix of it was archived and removed
/// ([`KeyStore::compact_audit`]): the last removed entry's sequence number and MAC, and a seal
/// over both made in the HSM under the audit key ([`crate::audit::anchor_seal_input`]), so that
/// no store writer can move the anchor (to hide entries) or make one up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    pub seq: u64,
    #[serde(with = "hex_mac")]
    pub mac: [u8; 32],
    #[serde(with = "hex_mac")]
    pub seal: [u8; 32],
}

/// What a compaction removed ([`KeyStore::compact_audit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compacted {
    /// Audit entries.
    pub entries: u64,
    /// Key records of destroyed keys (tombstones).
    pub tombstones: u64,
}

mod hex_mac {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(m))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        <[u8; 32]>::try_from(v.as_slice()).map_err(|_| serde::de::Error::custom("32 bytes"))
    }
}

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

/// Failures of a key store. Messages name keys and paths, never key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened at start-up (`target`: its path, or its database URL
    /// without the password).
    #[error("key store {target}: {detail}")]
    Open { target: String, detail: String },
    /// The store reached its configured size (`limit` names the setting to raise, e.g.
    /// `store.map_size_mb = 64`): nothing was written.
    #[error("key store is full ({limit}); nothing was written")]
    Full { limit: String },
    /// The file system under the store is full (or a quota or file-size limit was hit):
    /// nothing was written; writes work again once space is freed.
    #[error("the key store's file system is full; nothing was written: {0}")]
    NoSpace(String),
    /// A record with this key id already exists (`put_new`).
    #[error("key {0} already exists in the key store")]
    AlreadyExists(KeyId),
    /// No record with this key id (`compare_and_swap`).
    #[error("key {0} is not in the key store")]
    NotFound(KeyId),
    /// The record changed since the caller read it (`compare_and_swap`); nothing was written.
    #[error("key {0} changed concurrently; nothing was written")]
    Conflict(KeyId),
    /// The audit head moved since the appender read it (an append it did not see); nothing
    /// was written.
    #[error("the audit log's head moved; nothing was written")]
    AuditHeadMoved,
    /// A stored record cannot be decoded.
    #[error("key record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    /// Reading or writing failed (I/O, the database unreachable or refusing).
    #[error("key store I/O: {0}")]
    Io(String),
    /// The writer has stopped (shutting down or crashed).
    #[error("key store writer is not running")]
    Closed,
    /// A write fenced by a lease ([`KeyStore::put_job_leased`]) found the lease expired or
    /// held by another: nothing was written.
    #[error("lease {0} is no longer held; nothing was written")]
    LeaseLost(String),
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

/// Decodes the stored JSON of the record under `key`, refusing one that holds another key id
/// (a record planted or moved under the wrong key). Both backends store this encoding.
///
/// # Errors
/// `Corrupt`.
pub(crate) fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    let rec: KeyRecord = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        detail: format!(
            "undecodable record at line {} column {}",
            e.line(),
            e.column()
        ),
    })?;
    if rec.key_id.as_str() != key {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            detail: "record holds another key id".into(),
        });
    }
    Ok(rec)
}

/// The stored JSON of `rec`.
///
/// # Errors
/// `Io` (never seen: every field encodes).
pub(crate) fn encode_record(rec: &KeyRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|e| StoreError::Io(format!("cannot encode record: {e}")))
}

/// Whether the stored audit entry `bytes` has MAC `mac` (both backends check the entry a
/// compaction ends at).
pub(crate) fn entry_has_mac(bytes: &[u8], mac: &[u8; 32]) -> bool {
    serde_json::from_slice::<kms_api::admin::AuditEntry>(bytes)
        .ok()
        .and_then(|e| hex::decode(e.mac).ok())
        .is_some_and(|m| m == mac)
}

/// The stored JSON of each audit entry, with its sequence number (both backends).
///
/// # Errors
/// `Io` (never seen: every field encodes).
pub(crate) fn encode_audit_entries(
    entries: &[kms_api::admin::AuditEntry],
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    entries
        .iter()
        .map(|e| {
            serde_json::to_vec(e)
                .map(|v| (e.seq, v))
                .map_err(|e| StoreError::Io(format!("cannot encode an audit entry: {e}")))
        })
        .collect()
}

/// The key a pending audit entry is stored under: its time first, so pending entries list
/// oldest first, then a random suffix (both backends).
/// A pending audit entry's key and, when it decodes, the entry.
pub type PendingAudit = (String, Option<kms_api::admin::AuditEntry>);

pub(crate) fn pending_audit_key(entry: &kms_api::admin::AuditEntry) -> String {
    format!(
        "audit-pending/{:020}-{:016x}",
        entry.at,
        rand::random::<u64>()
    )
}

/// The store a KMS runs on, chosen by `store.backend`: one type, so the service, the
/// lifecycle jobs and the HTTP layer are built once for both.
#[derive(Debug)]
pub enum AnyStore {
    Lmdb(lmdb::LmdbStore),
    Postgres(postgres::PostgresStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Lmdb($s) => $e,
            AnyStore::Postgres($s) => $e,
        }
    };
}

impl KeyStore for AnyStore {
    async fn get(&self, key_id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        dispatch!(self, s => s.get(key_id).await)
    }
    async fn put_new(&self, record: KeyRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_new(record).await)
    }
    async fn compare_and_swap(
        &self,
        expected: &KeyRecord,
        new: KeyRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.compare_and_swap(expected, new).await)
    }
    async fn list(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        dispatch!(self, s => s.list(after, limit).await)
    }
    async fn mark_destroyed(&self, key_id: &KeyId) -> Result<DestroyOutcome, StoreError> {
        dispatch!(self, s => s.mark_destroyed(key_id).await)
    }
    async fn key_count(&self) -> Result<u64, StoreError> {
        dispatch!(self, s => s.key_count().await)
    }
    async fn kek_versions(&self) -> Result<Vec<KekVersionRecord>, StoreError> {
        dispatch!(self, s => s.kek_versions().await)
    }
    async fn put_kek_version(&self, record: KekVersionRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_kek_version(record).await)
    }
    async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        dispatch!(self, s => s.jobs().await)
    }
    async fn put_job(&self, job: JobRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_job(job).await)
    }
    async fn lock_audit(&self) -> Result<AuditLock, StoreError> {
        dispatch!(self, s => s.lock_audit().await)
    }
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        dispatch!(self, s => s.acquire_lease(name, holder, ttl).await)
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.release_lease(name, holder).await)
    }
    async fn put_job_leased(
        &self,
        job: JobRecord,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_job_leased(job, name, holder, ttl).await)
    }
    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        dispatch!(self, s => s.audit_head().await)
    }
    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        dispatch!(self, s => s.audit_anchor().await)
    }
    async fn compact_audit(
        &self,
        anchor: AuditAnchor,
        tombstones_through: u64,
    ) -> Result<Compacted, StoreError> {
        dispatch!(self, s => s.compact_audit(anchor, tombstones_through).await)
    }
    async fn queue_audit(
        &self,
        entries: Vec<kms_api::admin::AuditEntry>,
        prev: Option<AuditHead>,
        head: AuditHead,
        chained: Vec<String>,
        records: Vec<KeyRecord>,
    ) -> Result<Commit, StoreError> {
        dispatch!(self, s => s.queue_audit(entries, prev, head, chained, records).await)
    }
    async fn put_pending_audit(&self, entry: kms_api::admin::AuditEntry) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_pending_audit(entry).await)
    }
    async fn pending_audits(&self, limit: usize) -> Result<Vec<PendingAudit>, StoreError> {
        dispatch!(self, s => s.pending_audits(limit).await)
    }
    async fn audit_range(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        dispatch!(self, s => s.audit_range(after, limit).await)
    }
    async fn changes_after(
        &self,
        cursor: Option<u64>,
        limit: usize,
    ) -> Result<ChangePage, StoreError> {
        dispatch!(self, s => s.changes_after(cursor, limit).await)
    }
    async fn check(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.check().await)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn record_json_shape() {
        let r = KeyRecord {
            key_id: KeyId::from_random([1; 16]),
            kek_id: KekId::parse("kek").unwrap(),
            kek_version: KekVersion::FIRST,
            thread_id: ThreadId::parse("t1").unwrap(),
            created_at: 5,
            state: KeyState::Active {
                wrapped: WrappedDek::new(vec![1, 2, 3]),
            },
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["state"], "active");
        assert_eq!(j["wrapped"], "AQID");
        assert_eq!(j["kek_version"], 1);
        let back: KeyRecord = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
        let d = KeyRecord {
            state: KeyState::Destroyed { destroyed_at: 9 },
            ..r
        };
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["state"], "destroyed");
        assert!(j.get("wrapped").is_none());
        assert!(!format!("{d:?}").contains("AQID"));
    }
}

//! [`AnyStore`]: the store a KMS runs on, LMDB or PostgreSQL, behind one type.

use kms_api::KeyId;

use super::{
    lmdb, postgres, AuditAnchor, AuditHead, AuditLock, ChangePage, Commit, Compacted,
    DestroyOutcome, JobRecord, KekVersionRecord, KeyRecord, KeyStore, LeaseOutcome, PendingAudit,
    StoreError,
};

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

//! [`KeyStore`] for [`LmdbStore`]: reads in short read transactions on the calling thread,
//! every write queued to the group-commit writer as one [`Op`].

use std::ops::Bound;

use kms_api::KeyId;

use super::ops::read_json;
use super::{io_err, LmdbStore, Op, OpOutput, AUDIT_ANCHOR, AUDIT_HEAD};
use crate::keystore::{
    encode_audit_entries, now_secs, pending_audit_key, AuditAnchor, AuditHead, AuditLock,
    ChangePage, Commit, Compacted, DestroyOutcome, JobRecord, KekVersionRecord, KeyRecord,
    KeyStore, LeaseOutcome, PendingAudit, StoreError,
};

impl KeyStore for LmdbStore {
    async fn get(&self, key_id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.get_sync(key_id)
    }

    async fn put_new(&self, record: KeyRecord) -> Result<(), StoreError> {
        self.submit(Op::PutNew(record)).await.map(|_| ())
    }

    async fn compare_and_swap(
        &self,
        expected: &KeyRecord,
        new: KeyRecord,
    ) -> Result<(), StoreError> {
        if expected.key_id != new.key_id {
            return Err(StoreError::Conflict(new.key_id));
        }
        let op = Op::CompareAndSwap {
            expected: Box::new(expected.clone()),
            new: Box::new(new),
        };
        self.submit(op).await.map(|_| ())
    }

    async fn list(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.list_sync(after, limit)
    }

    async fn mark_destroyed(&self, key_id: &KeyId) -> Result<DestroyOutcome, StoreError> {
        let op = Op::Destroy {
            key_id: key_id.clone(),
            at: now_secs(),
        };
        match self.submit(op).await? {
            OpOutput::Destroy(o) => Ok(o),
            OpOutput::Written => Ok(DestroyOutcome::Destroyed),
            OpOutput::Compacted(_) => Err(StoreError::Io("unexpected destroy outcome".into())),
        }
    }

    async fn key_count(&self) -> Result<u64, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        self.keys.len(&rtxn).map_err(io_err)
    }

    async fn kek_versions(&self) -> Result<Vec<KekVersionRecord>, StoreError> {
        self.lifecycle_prefix("kek/")
    }

    async fn put_kek_version(&self, record: KekVersionRecord) -> Result<(), StoreError> {
        let key = format!("kek/{:010}", record.version.get());
        self.put_lifecycle(key, &record).await
    }

    async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs: Vec<JobRecord> = self.lifecycle_prefix("job/")?;
        jobs.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(jobs)
    }

    async fn put_job(&self, job: JobRecord) -> Result<(), StoreError> {
        let key = format!("job/{}", job.id);
        self.put_lifecycle(key, &job).await
    }

    async fn lock_audit(&self) -> Result<AuditLock, StoreError> {
        Ok(AuditLock::Unshared)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        let now = std::time::Instant::now();
        let mut leases = self
            .leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = match leases.get(name) {
            Some((h, until)) if *until > now && h != holder => {
                return Ok(LeaseOutcome::HeldBy(h.clone()))
            }
            Some((_, until)) if *until > now => LeaseOutcome::Renewed,
            _ => LeaseOutcome::Acquired,
        };
        leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
        Ok(outcome)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let mut leases = self
            .leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if leases.get(name).is_some_and(|(h, _)| h == holder) {
            leases.remove(name);
        }
        Ok(())
    }

    async fn put_job_leased(
        &self,
        job: JobRecord,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        // One process: the check and the write cannot interleave with another replica.
        {
            let now = std::time::Instant::now();
            let mut leases = self
                .leases
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match leases.get_mut(name) {
                Some((h, until)) if h == holder && *until > now => *until = now + ttl,
                _ => return Err(StoreError::LeaseLost(name.to_owned())),
            }
        }
        self.put_job(job).await
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let Some(v) = self.lifecycle.get(&rtxn, AUDIT_HEAD).map_err(io_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v)
            .map(Some)
            .map_err(|_| StoreError::Corrupt {
                key: AUDIT_HEAD.into(),
                detail: "undecodable audit head".into(),
            })
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        read_json(
            self.lifecycle,
            &rtxn,
            AUDIT_ANCHOR,
            "undecodable audit anchor",
        )
        .map_err(io_err)?
    }

    async fn compact_audit(
        &self,
        anchor: AuditAnchor,
        tombstones_through: u64,
    ) -> Result<Compacted, StoreError> {
        match self
            .submit(Op::CompactAudit {
                anchor,
                tombstones_through,
            })
            .await?
        {
            OpOutput::Compacted(c) => Ok(c),
            _ => Err(StoreError::Io("unexpected compaction outcome".into())),
        }
    }

    async fn queue_audit(
        &self,
        entries: Vec<kms_api::admin::AuditEntry>,
        prev: Option<AuditHead>,
        head: AuditHead,
        chained: Vec<String>,
        records: Vec<KeyRecord>,
    ) -> Result<Commit, StoreError> {
        let entries = encode_audit_entries(&entries)?;
        let head = serde_json::to_vec(&head)
            .map_err(|e| StoreError::Io(format!("cannot encode the audit head: {e}")))?;
        let rx = self
            .enqueue(Op::AppendAudit {
                entries,
                prev,
                head,
                chained,
                records,
            })
            .await?;
        Ok(Box::pin(async move {
            rx.await.map_err(|_| StoreError::Closed)?.map(|_| ())
        }))
    }

    async fn put_pending_audit(&self, entry: kms_api::admin::AuditEntry) -> Result<(), StoreError> {
        let key = pending_audit_key(&entry);
        self.put_lifecycle(key, &entry).await
    }

    async fn pending_audits(&self, limit: usize) -> Result<Vec<PendingAudit>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let mut out = Vec::new();
        for item in self
            .lifecycle
            .prefix_iter(&rtxn, "audit-pending/")
            .map_err(io_err)?
            .take(limit)
        {
            let (k, v) = item.map_err(io_err)?;
            out.push((k.to_owned(), serde_json::from_slice(v).ok()));
        }
        Ok(out)
    }

    async fn audit_range(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let start = after.saturating_add(1).to_be_bytes();
        let range = (Bound::Included(&start[..]), Bound::<&[u8]>::Unbounded);
        let mut out = Vec::new();
        for item in self.audit.range(&rtxn, &range).map_err(io_err)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io_err)?;
            // A key that is not 8 bytes was planted: report it as what it claims, in order.
            let seq = <[u8; 8]>::try_from(k).map_or(u64::MAX, u64::from_be_bytes);
            out.push((seq, v.to_vec()));
        }
        Ok(out)
    }

    async fn changes_after(
        &self,
        _cursor: Option<u64>,
        _limit: usize,
    ) -> Result<ChangePage, StoreError> {
        // One process per store (its lock file): nothing changes behind this one's back.
        Ok(ChangePage {
            cursor: 0,
            changes: Vec::new(),
            more: false,
        })
    }

    async fn check(&self) -> Result<(), StoreError> {
        match &self.tx {
            Some(tx) if !tx.is_closed() => {}
            _ => return Err(StoreError::Closed),
        }
        let rtxn = self.env.read_txn().map_err(io_err)?;
        self.keys.len(&rtxn).map_err(io_err)?;
        Ok(())
    }
}

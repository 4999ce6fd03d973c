//! The [`KeyStore`] operations on PostgreSQL: records by compare-and-swap on their revision,
//! the change feed (`changes.rs`), leases on the database's clock (`lease.rs`), the audit
//! log's reads and compaction.

use kms_api::KeyId;
use tokio::sync::oneshot;

use super::{
    decode_record, encode_record, now_secs, AuditAnchor, AuditHead, ChangePage, Compacted,
    DestroyOutcome, JobRecord, KekVersionRecord, KeyRecord, KeyState, KeyStore, LeaseOutcome,
    StoreError,
};

use audit::{head_from_row, AuditAppend, AUDIT_LOCK};

mod changes;
mod lease;

use super::*;

impl KeyStore for PostgresStore {
    async fn get(&self, key_id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.get_versioned(key_id).await?.map(|(r, _)| r))
    }

    async fn put_new(&self, record: KeyRecord) -> Result<(), StoreError> {
        let value = encode_record(&record)?;
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO kms_key_records (key_id, revision, record) VALUES ($1, 1, $2) \
                 ON CONFLICT (key_id) DO NOTHING",
            )
            .await
            .map_err(|e| db_err(&e))?;
        let n = c
            .execute(&st, &[&record.key_id.as_str(), &value])
            .await
            .map_err(|e| {
                self.metrics.commit_errors.inc();
                db_err(&e)
            })?;
        if n == 0 {
            return Err(StoreError::AlreadyExists(record.key_id));
        }
        self.metrics.commits.inc();
        self.metrics.writes.inc();
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        expected: &KeyRecord,
        new: KeyRecord,
    ) -> Result<(), StoreError> {
        if expected.key_id != new.key_id {
            return Err(StoreError::Conflict(new.key_id));
        }
        let Some((current, revision)) = self.get_versioned(&new.key_id).await? else {
            return Err(StoreError::NotFound(new.key_id));
        };
        if current != *expected {
            return Err(StoreError::Conflict(new.key_id));
        }
        if self.update_if(&new.key_id, revision, &new).await? {
            Ok(())
        } else {
            Err(StoreError::Conflict(new.key_id))
        }
    }

    async fn list(
        &self,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let c = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            Some(a) => {
                let st = c
                    .prepare_cached(
                        "SELECT key_id, record FROM kms_key_records WHERE key_id > $1 \
                         ORDER BY key_id LIMIT $2",
                    )
                    .await
                    .map_err(|e| db_err(&e))?;
                c.query(&st, &[&a.as_str(), &limit]).await
            }
            None => {
                let st = c
                    .prepare_cached(
                        "SELECT key_id, record FROM kms_key_records \
                         ORDER BY key_id LIMIT $1",
                    )
                    .await
                    .map_err(|e| db_err(&e))?;
                c.query(&st, &[&limit]).await
            }
        }
        .map_err(|e| db_err(&e))?;
        rows.iter()
            .map(|r| {
                let key: String = r.get(0);
                let bytes: Vec<u8> = r.get(1);
                decode_record(&key, &bytes)
            })
            .collect()
    }

    async fn mark_destroyed(&self, key_id: &KeyId) -> Result<DestroyOutcome, StoreError> {
        // A concurrent change (a rewrap on another replica) moves the revision: read again
        // and retry, so the destroy always wins.
        for _ in 0..16 {
            let Some((current, revision)) = self.get_versioned(key_id).await? else {
                return Ok(DestroyOutcome::Unknown);
            };
            if matches!(current.state, KeyState::Destroyed { .. }) {
                return Ok(DestroyOutcome::AlreadyDestroyed);
            }
            let destroyed = KeyRecord {
                state: KeyState::Destroyed {
                    destroyed_at: now_secs(),
                },
                ..current
            };
            if self.destroy_if(key_id, revision, &destroyed).await? {
                return Ok(DestroyOutcome::Destroyed);
            }
        }
        Err(StoreError::Conflict(key_id.clone()))
    }

    async fn key_count(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT count(*) FROM kms_key_records", &[])
            .await
            .map_err(|e| db_err(&e))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn kek_versions(&self) -> Result<Vec<KekVersionRecord>, StoreError> {
        self.decode_all(
            "SELECT version::text, record FROM kms_kek_versions ORDER BY version",
            "undecodable KEK version record",
        )
        .await
    }

    async fn put_kek_version(&self, record: KekVersionRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(&record)
            .map_err(|e| StoreError::Io(format!("cannot encode a KEK version record: {e}")))?;
        let version = i32::try_from(record.version.get())
            .map_err(|_| StoreError::Io("KEK version beyond PostgreSQL's integer".into()))?;
        self.upsert(
            "WITH v AS (INSERT INTO kms_kek_versions (version, record) VALUES ($1, $2) \
             ON CONFLICT (version) DO UPDATE SET record = EXCLUDED.record RETURNING version) \
             INSERT INTO kms_changes (kind, subject) SELECT 'kek_version', version::text FROM v",
            &version,
            &value,
        )
        .await
    }

    async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs: Vec<JobRecord> = self
            .decode_all("SELECT id, record FROM kms_jobs", "undecodable job record")
            .await?;
        jobs.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(jobs)
    }

    async fn put_job(&self, job: JobRecord) -> Result<(), StoreError> {
        let value = encode_job(&job)?;
        self.upsert(
            "INSERT INTO kms_jobs (id, record) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            &job.id.as_str(),
            &value,
        )
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        self.take_lease(name, holder, ttl).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM kms_leases WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .await
        .map_err(|e| db_err(&e))?;
        Ok(())
    }

    async fn put_job_leased(
        &self,
        job: JobRecord,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        let value = encode_job(&job)?;
        let ttl_ms = lease_ms(ttl)?;
        let c = self.client().await?;
        // One statement: the lease row is locked by the UPDATE, so a takeover waits for it
        // and then sees the extended lease, or this write sees the takeover and does nothing.
        let st = c
            .prepare_cached(
                "WITH l AS ( \
                     UPDATE kms_leases \
                     SET expires_at = clock_timestamp() + $5::bigint * interval '1 millisecond' \
                     WHERE name = $3 AND holder = $4 AND expires_at > clock_timestamp() \
                     RETURNING 1) \
                 INSERT INTO kms_jobs (id, record) SELECT $1::text, $2::bytea FROM l \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            )
            .await
            .map_err(|e| db_err(&e))?;
        let n = c
            .execute(&st, &[&job.id.as_str(), &value, &name, &holder, &ttl_ms])
            .await
            .map_err(|e| {
                self.metrics.commit_errors.inc();
                db_err(&e)
            })?;
        if n == 0 {
            return Err(StoreError::LeaseLost(name.to_owned()));
        }
        self.metrics.commits.inc();
        self.metrics.writes.inc();
        Ok(())
    }

    async fn lock_audit(&self) -> Result<crate::keystore::AuditLock, StoreError> {
        let pool = self.pool.clone();
        // On a task of its own: when the caller goes away while the lock is being granted,
        // the task still ends with an `AuditLock`, whose drop closes the connection (and so
        // unlocks) instead of returning it to the pool locked.
        let taken = tokio::spawn(async move {
            let c = pool.get().await.map_err(|e| pool_err(&e))?;
            // Waits for another replica's turn to end (bounded by `statement_timeout`).
            c.execute("SELECT pg_advisory_lock($1)", &[&AUDIT_LOCK])
                .await
                .map_err(|e| db_err(&e))?;
            Ok::<_, StoreError>(AuditLock(Some(c)))
        })
        .await
        .map_err(|e| StoreError::Io(format!("audit lock task: {e}")))??;
        Ok(crate::keystore::AuditLock::Postgres(Box::new(taken)))
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT seq, mac FROM kms_audit_head WHERE singleton", &[])
            .await
            .map_err(|e| db_err(&e))?;
        head_from_row(&row)
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT anchor FROM kms_audit_anchor WHERE singleton", &[])
            .await
            .map_err(|e| db_err(&e))?;
        row.map(|r| {
            serde_json::from_slice(&r.get::<_, Vec<u8>>(0))
                .map_err(|_| corrupt("audit anchor", "undecodable"))
        })
        .transpose()
    }

    async fn compact_audit(
        &self,
        anchor: AuditAnchor,
        tombstones_through: u64,
    ) -> Result<Compacted, StoreError> {
        let value = serde_json::to_vec(&anchor)
            .map_err(|e| StoreError::Io(format!("cannot encode the audit anchor: {e}")))?;
        let seq = i64::try_from(anchor.seq).map_err(|_| StoreError::AuditHeadMoved)?;
        let through = i64::try_from(tombstones_through).unwrap_or(i64::MAX);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| db_err(&e))?;
        // The head row is locked as by an append: no replica appends while this runs.
        let head = head_from_row(
            &tx.query_one(
                "SELECT seq, mac FROM kms_audit_head WHERE singleton FOR UPDATE",
                &[],
            )
            .await
            .map_err(|e| db_err(&e))?,
        )?;
        let stored: Option<AuditAnchor> = tx
            .query_opt(
                "SELECT anchor FROM kms_audit_anchor WHERE singleton FOR UPDATE",
                &[],
            )
            .await
            .map_err(|e| db_err(&e))?
            .map(|r| {
                serde_json::from_slice(&r.get::<_, Vec<u8>>(0))
                    .map_err(|_| corrupt("audit anchor", "undecodable"))
            })
            .transpose()?;
        let ends_at_entry = tx
            .query_opt("SELECT entry FROM kms_audit WHERE seq = $1", &[&seq])
            .await
            .map_err(|e| db_err(&e))?
            .is_some_and(|r| crate::keystore::entry_has_mac(&r.get::<_, Vec<u8>>(0), &anchor.mac));
        if stored.is_some_and(|a| a.seq >= anchor.seq)
            || head.is_none_or(|h| h.seq < anchor.seq)
            || !ends_at_entry
        {
            return Err(StoreError::AuditHeadMoved);
        }
        let entries = tx
            .execute("DELETE FROM kms_audit WHERE seq <= $1", &[&seq])
            .await
            .map_err(|e| db_err(&e))?;
        // Records are JSON (`"state":"destroyed","destroyed_at":<secs>` for a tombstone); one
        // that does not parse fails the whole compaction (nothing is removed).
        let tombstones = tx
            .execute(
                "DELETE FROM kms_key_records WHERE \
                 convert_from(record, 'UTF8')::jsonb ->> 'state' = 'destroyed' AND \
                 (convert_from(record, 'UTF8')::jsonb ->> 'destroyed_at')::bigint <= $1",
                &[&through],
            )
            .await
            .map_err(|e| db_err(&e))?;
        tx.execute(
            "INSERT INTO kms_audit_anchor (singleton, anchor) VALUES (true, $1) \
             ON CONFLICT (singleton) DO UPDATE SET anchor = EXCLUDED.anchor",
            &[&value],
        )
        .await
        .map_err(|e| db_err(&e))?;
        tx.commit().await.map_err(|e| db_err(&e))?;
        Ok(Compacted {
            entries,
            tombstones,
        })
    }

    async fn queue_audit(
        &self,
        entries: Vec<kms_api::admin::AuditEntry>,
        prev: Option<AuditHead>,
        head: AuditHead,
        chained: Vec<String>,
        records: Vec<KeyRecord>,
    ) -> Result<crate::keystore::Commit, StoreError> {
        let entries = crate::keystore::encode_audit_entries(&entries)?;
        let records = records
            .iter()
            .map(|r| encode_record(r).map(|v| (r.key_id.clone(), v)))
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, rx) = oneshot::channel();
        self.audit
            .send(AuditAppend {
                entries,
                prev,
                head,
                chained,
                records,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Box::pin(async move {
            rx.await.map_err(|_| StoreError::Closed)?
        }))
    }

    async fn put_pending_audit(&self, entry: kms_api::admin::AuditEntry) -> Result<(), StoreError> {
        let key = crate::keystore::pending_audit_key(&entry);
        let value = serde_json::to_vec(&entry)
            .map_err(|e| StoreError::Io(format!("cannot encode an audit entry: {e}")))?;
        self.upsert(
            "INSERT INTO kms_audit_pending (key, entry) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET entry = EXCLUDED.entry",
            &key,
            &value,
        )
        .await
    }

    async fn pending_audits(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::keystore::PendingAudit>, StoreError> {
        let c = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT key, entry FROM kms_audit_pending ORDER BY key LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(|e| db_err(&e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let key: String = r.get(0);
                let bytes: Vec<u8> = r.get(1);
                (key, serde_json::from_slice(&bytes).ok())
            })
            .collect())
    }

    async fn audit_range(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT seq, entry FROM kms_audit WHERE seq > $1 ORDER BY seq LIMIT $2")
            .await
            .map_err(|e| db_err(&e))?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .query(&st, &[&after, &limit])
            .await
            .map_err(|e| db_err(&e))?;
        Ok(rows
            .iter()
            .map(|r| {
                // A negative seq was planted: report it as what it claims, in order.
                let seq = u64::try_from(r.get::<_, i64>(0)).unwrap_or(u64::MAX);
                (seq, r.get::<_, Vec<u8>>(1))
            })
            .collect())
    }

    async fn changes_after(
        &self,
        cursor: Option<u64>,
        limit: usize,
    ) -> Result<ChangePage, StoreError> {
        self.read_changes(cursor, limit).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        if self.audit.is_closed() {
            return Err(StoreError::Closed);
        }
        let c = self.client().await?;
        c.query_one("SELECT 1", &[]).await.map_err(|e| db_err(&e))?;
        Ok(())
    }
}

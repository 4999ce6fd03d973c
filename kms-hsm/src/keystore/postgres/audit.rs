//! The audit log on PostgreSQL: the replicas' turn at appending (an advisory lock on a
//! connection of its own) and the writer task that applies appends in queue order, each on
//! the head it was chained on, with the head row locked.

use deadpool_postgres::Pool;
use kms_api::KeyId;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use super::*;
use super::{AuditHead, StoreError};

/// Advisory-lock key that gives replicas' audit appends turns ("pdbaud").
pub(super) const AUDIT_LOCK: i64 = 0x7064_6261_7564;

/// This process's turn at the audit log ([`KeyStore::lock_audit`]): a session-level advisory
/// lock on a connection taken out of the pool's rotation until [`AuditLock::release`].
pub struct AuditLock(pub(super) Option<deadpool_postgres::Object>);

impl std::fmt::Debug for AuditLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLock")
            .field("held", &self.0.is_some())
            .finish()
    }
}

impl AuditLock {
    /// Ends the turn. A connection that cannot unlock is closed (which unlocks). The unlock
    /// runs on a task of its own: a caller that goes away mid-way cannot return the
    /// connection to the pool still holding the lock.
    pub async fn release(mut self) {
        if let Some(c) = self.0.take() {
            let _ = tokio::spawn(async move {
                if c.execute("SELECT pg_advisory_unlock($1)", &[&AUDIT_LOCK])
                    .await
                    .is_err()
                {
                    drop(deadpool_postgres::Object::take(c));
                }
            })
            .await;
        }
    }
}

impl Drop for AuditLock {
    /// Dropped without a release (its task cancelled): the connection is closed rather than
    /// returned to the pool still holding the lock.
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// Appends queued behind the audit writer before callers wait (back-pressure).
pub(super) const AUDIT_QUEUE: usize = 1024;

pub(super) struct AuditAppend {
    pub(super) entries: Vec<(u64, Vec<u8>)>,
    pub(super) prev: Option<AuditHead>,
    pub(super) head: AuditHead,
    pub(super) chained: Vec<String>,
    pub(super) records: Vec<(KeyId, Vec<u8>)>,
    pub(super) reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Applies queued audit appends one at a time, in order.
pub(super) async fn audit_writer(
    pool: Pool,
    mut rx: mpsc::Receiver<AuditAppend>,
    metrics: StoreMetrics,
) {
    while let Some(job) = rx.recv().await {
        // Applied even when its caller went away: a group queued behind it chains on it.
        let result = append(&pool, &job).await;
        match &result {
            Ok(()) => {
                metrics.commits.inc();
                metrics.writes.inc();
            }
            Err(_) => {
                metrics.commit_errors.inc();
            }
        }
        let _ = job.reply.send(result);
    }
}

/// The head in a `(seq, mac)` row of `kms_audit_head`: both NULL while the log is empty.
pub(super) fn head_from_row(row: &tokio_postgres::Row) -> Result<Option<AuditHead>, StoreError> {
    match (
        row.get::<_, Option<i64>>(0),
        row.get::<_, Option<Vec<u8>>>(1),
    ) {
        (None, None) => Ok(None),
        (Some(seq), Some(mac)) => Ok(Some(AuditHead {
            seq: u64::try_from(seq).map_err(|_| corrupt("audit head", "negative seq"))?,
            mac: <[u8; 32]>::try_from(mac.as_slice())
                .map_err(|_| corrupt("audit head", "a MAC that is not 32 bytes"))?,
        })),
        _ => Err(corrupt("audit head", "seq and mac disagree")),
    }
}

/// One append: all of it in one transaction, or nothing.
pub(super) async fn append(pool: &Pool, job: &AuditAppend) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(|e| pool_err(&e))?;
    let tx = client.transaction().await.map_err(|e| db_err(&e))?;
    let row = tx
        .query_one(
            "SELECT seq, mac FROM kms_audit_head WHERE singleton FOR UPDATE",
            &[],
        )
        .await
        .map_err(|e| db_err(&e))?;
    let stored = head_from_row(&row)?;
    if stored != job.prev {
        return Err(StoreError::AuditHeadMoved);
    }
    if !job.chained.is_empty() {
        let n = tx
            .execute(
                "DELETE FROM kms_audit_pending WHERE key = ANY($1)",
                &[&job.chained],
            )
            .await
            .map_err(|e| db_err(&e))?;
        // A pending entry this group chains that is gone was chained by another append:
        // chaining it again would log the event twice (the transaction rolls back on drop).
        if n != job.chained.len() as u64 {
            return Err(StoreError::AuditHeadMoved);
        }
    }
    // The key records, the entries and the new head in one statement (one round trip):
    // the records that went in are returned, so a key id that was taken (or repeated in the
    // group) is named, and the transaction rolls back on drop.
    let seqs = job
        .entries
        .iter()
        .map(|(s, _)| to_i64(*s, "audit seq"))
        .collect::<Result<Vec<i64>, _>>()?;
    let values: Vec<&[u8]> = job.entries.iter().map(|(_, v)| v.as_slice()).collect();
    let key_ids: Vec<&str> = job.records.iter().map(|(k, _)| k.as_str()).collect();
    let records: Vec<&[u8]> = job.records.iter().map(|(_, v)| v.as_slice()).collect();
    let st = tx
        .prepare_cached(
            "WITH r AS ( \
                 INSERT INTO kms_key_records (key_id, revision, record) \
                 SELECT k, 1, v FROM unnest($1::text[], $2::bytea[]) AS t(k, v) \
                 ON CONFLICT (key_id) DO NOTHING \
                 RETURNING key_id), \
             a AS ( \
                 INSERT INTO kms_audit (seq, entry) \
                 SELECT * FROM unnest($3::bigint[], $4::bytea[]) RETURNING seq), \
             h AS ( \
                 UPDATE kms_audit_head SET seq = $5, mac = $6 WHERE singleton RETURNING 1) \
             SELECT key_id, (SELECT count(*) FROM a), (SELECT count(*) FROM h) FROM r \
             UNION ALL SELECT NULL, (SELECT count(*) FROM a), (SELECT count(*) FROM h)",
        )
        .await
        .map_err(|e| db_err(&e))?;
    let head_seq = to_i64(job.head.seq, "audit seq")?;
    let head_mac = job.head.mac.as_slice();
    let rows = tx
        .query(
            &st,
            &[&key_ids, &records, &seqs, &values, &head_seq, &head_mac],
        )
        .await
        .map_err(|e| match e.code() {
            // Another replica appended these numbers in between: nothing is written.
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::AuditHeadMoved,
            _ => db_err(&e),
        })?;
    let mut inserted: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut counts = (0i64, 0i64);
    for row in &rows {
        counts = (row.get(1), row.get(2));
        if let Some(k) = row.get::<_, Option<String>>(0) {
            *inserted.entry(k).or_insert(0) += 1;
        }
    }
    for (key_id, _) in &job.records {
        match inserted.get_mut(key_id.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => return Err(StoreError::AlreadyExists(key_id.clone())),
        }
    }
    if counts != (job.entries.len() as i64, 1) {
        return Err(StoreError::Io(
            "the audit append did not write every entry and the head".into(),
        ));
    }
    tx.commit().await.map_err(|e| db_err(&e))
}

//! The PostgreSQL key store (`store.backend = "postgres"`): the shared state of several KMS
//! replicas, through `tokio-postgres` and a `deadpool-postgres` pool.
//!
//! * **Schema**: versioned migrations ([`MIGRATIONS`]), applied at start inside one
//!   transaction under an advisory lock, so replicas starting together apply each once. A
//!   database whose schema is newer than this binary knows is refused (fail closed).
//! * **Records** are the same JSON documents as in the LMDB store, in `bytea` columns, and
//!   are decoded with the same checks (a record under another key id is corrupt).
//! * **Compare-and-swap by record version**: every key record carries a `revision` that each
//!   change increments. A CAS reads the record and its revision, compares the record with the
//!   caller's, and updates `WHERE revision = <read>`: a change in between (a destroy on
//!   another replica) makes it touch no row, and the caller gets `Conflict`.
//! * **Audit appends** run one at a time, in the order they were queued, on one writer task
//!   ([`KeyStore::queue_audit`]'s contract). Each is one transaction that locks the head row
//!   (`SELECT … FOR UPDATE`), so appends of several replicas are serialised by the database
//!   and one that chained on a stale head writes nothing (`AuditHeadMoved`).
//! * **Durability**: a write returns after its `COMMIT`. The store refuses to start on a
//!   server with `fsync` or `synchronous_commit` off, where a commit is not durable.
//! * **Errors**: connection and server failures are `Io` (503 to callers, retried by jobs);
//!   `disk_full` is `NoSpace` (507); nothing is half-written, as every change is one
//!   statement or one transaction.

use std::sync::Arc;

use deadpool_postgres::Pool;
use kms_api::KeyId;
use tokio::sync::mpsc;

use super::{
    decode_record, encode_record, now_secs, AuditAnchor, AuditHead, Change, ChangePage, Compacted,
    DestroyOutcome, JobRecord, KekVersionRecord, KeyRecord, KeyState, KeyStore, LeaseOutcome,
    StoreError,
};
mod audit;
mod key_store;
mod schema;

pub use audit::AuditLock;
use audit::{audit_writer, AuditAppend, AUDIT_QUEUE};
pub use schema::{probe, MIGRATIONS, SCHEMA, SCHEMA_VERSION};

use crate::metrics::StoreMetrics;
pub use service_kit::postgres::{InvalidPostgresConfig, PostgresConfig, PG_PASSWORD_ENV};

/// Most connections a store opens when `store.pool_size` is not set.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// The PostgreSQL store. Cheap to share: the pool and the audit writer are behind handles.
pub struct PostgresStore {
    pool: Pool,
    target: String,
    audit: mpsc::Sender<AuditAppend>,
    metrics: StoreMetrics,
    _writer: Arc<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A database error as a store error: `disk_full` is `NoSpace`, everything else `Io`, with
/// [`service_kit::postgres::describe`]'s text (never a parameter value).
fn db_err(e: &tokio_postgres::Error) -> StoreError {
    if service_kit::postgres::is_disk_full(e) {
        StoreError::NoSpace(e.to_string())
    } else {
        StoreError::Io(service_kit::postgres::describe(e))
    }
}

fn pool_err(e: &deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(b) => db_err(b),
        other => StoreError::Io(service_kit::postgres::describe_pool(other)),
    }
}

fn corrupt(key: impl Into<String>, what: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.into(),
        detail: what.to_owned(),
    }
}

/// A lease's length in milliseconds, for the database's interval arithmetic.
fn lease_ms(ttl: std::time::Duration) -> Result<i64, StoreError> {
    to_i64(
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        "lease ttl",
    )
}

/// The stored JSON of a job record.
fn encode_job(job: &JobRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(job).map_err(|e| StoreError::Io(format!("cannot encode a job record: {e}")))
}

/// The change-feed rows `sql` selects (`seq, xid::text, kind, subject`, one text
/// parameter: a transaction id), as `(xid, change)`.
async fn query_changes(
    c: &deadpool_postgres::Client,
    sql: &str,
    xid: u64,
) -> Result<Vec<(u64, Change)>, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(|e| db_err(&e))?;
    let rows = c
        .query(&st, &[&xid.to_string()])
        .await
        .map_err(|e| db_err(&e))?;
    rows.iter().map(read_change).collect()
}

/// A transaction id as PostgreSQL prints an `xid8` (a 64-bit number, epoch included).
fn parse_xid(text: &str, what: &str) -> Result<u64, StoreError> {
    text.parse::<u64>()
        .map_err(|_| corrupt("change feed", &format!("{what} is not a transaction id")))
}

/// One change-feed row as `(xid, change)`. Fail closed: a change that cannot be read stops
/// the feed (the caller then stops trusting its cache) instead of being skipped.
fn read_change(r: &tokio_postgres::Row) -> Result<(u64, Change), StoreError> {
    let seq: i64 = r.get(0);
    let xid = parse_xid(&r.get::<_, String>(1), "a change's xid")?;
    let kind: String = r.get(2);
    let subject: String = r.get(3);
    let change = match kind.as_str() {
        "key_destroyed" => Change::KeyDestroyed(
            KeyId::parse(&subject).map_err(|_| corrupt(format!("change {seq}"), "not a key id"))?,
        ),
        "kek_version" => Change::KekVersion(
            subject
                .parse::<u32>()
                .ok()
                .and_then(|v| kms_api::KekVersion::new(v).ok())
                .ok_or_else(|| corrupt(format!("change {seq}"), "not a KEK version"))?,
        ),
        _ => return Err(corrupt(format!("change {seq}"), "unknown kind")),
    };
    Ok((xid, change))
}

fn to_i64(n: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(n)
        .map_err(|_| StoreError::Io(format!("{what} {n} is beyond PostgreSQL's bigint")))
}

impl PostgresStore {
    /// Connects, checks the server keeps commits durable, applies pending migrations and
    /// starts the audit writer.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming the database (never its password) and what failed.
    pub async fn open(cfg: &PostgresConfig, metrics: StoreMetrics) -> Result<Self, StoreError> {
        let target = cfg.display_target();
        let open_err = |detail: String| StoreError::Open {
            target: target.clone(),
            detail,
        };
        let pool = service_kit::postgres::open_pool(cfg, "progressdb-kms").map_err(&open_err)?;
        let mut client = pool
            .get()
            .await
            .map_err(|e| open_err(pool_err(&e).to_string()))?;
        service_kit::postgres::require_durable(&client)
            .await
            .map_err(&open_err)?;
        SCHEMA.migrate(&mut client).await.map_err(&open_err)?;
        drop(client);
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        let writer = tokio::spawn(audit_writer(pool.clone(), rx, metrics.clone()));
        tracing::info!(store = %target, "key store open (postgres)");
        Ok(Self {
            pool,
            target,
            audit: tx,
            metrics,
            _writer: Arc::new(writer),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| pool_err(&e))
    }

    /// The record of `key_id` and its revision.
    async fn get_versioned(&self, key_id: &KeyId) -> Result<Option<(KeyRecord, i64)>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT record, revision FROM kms_key_records WHERE key_id = $1")
            .await
            .map_err(|e| db_err(&e))?;
        let row = c
            .query_opt(&st, &[&key_id.as_str()])
            .await
            .map_err(|e| db_err(&e))?;
        match row {
            None => Ok(None),
            Some(r) => {
                let bytes: Vec<u8> = r.get(0);
                Ok(Some((decode_record(key_id.as_str(), &bytes)?, r.get(1))))
            }
        }
    }

    /// Replaces the record of `key_id` if its revision is still `revision`; `false` when it
    /// is not (a concurrent change).
    async fn update_if(
        &self,
        key_id: &KeyId,
        revision: i64,
        new: &KeyRecord,
    ) -> Result<bool, StoreError> {
        let value = encode_record(new)?;
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "UPDATE kms_key_records SET record = $3, revision = revision + 1 \
                 WHERE key_id = $1 AND revision = $2",
            )
            .await
            .map_err(|e| db_err(&e))?;
        let n = c
            .execute(&st, &[&key_id.as_str(), &revision, &value])
            .await
            .map_err(|e| db_err(&e))?;
        self.metrics.commits.inc();
        self.metrics.writes.inc();
        Ok(n == 1)
    }

    /// Like [`PostgresStore::update_if`] for a destroy, recording it in the change feed in
    /// the same statement (so other replicas evict the key exactly when it is destroyed).
    async fn destroy_if(
        &self,
        key_id: &KeyId,
        revision: i64,
        destroyed: &KeyRecord,
    ) -> Result<bool, StoreError> {
        let value = encode_record(destroyed)?;
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "WITH u AS (UPDATE kms_key_records SET record = $3, revision = revision + 1 \
                 WHERE key_id = $1 AND revision = $2 RETURNING key_id) \
                 INSERT INTO kms_changes (kind, subject) SELECT 'key_destroyed', key_id FROM u",
            )
            .await
            .map_err(|e| db_err(&e))?;
        let n = c
            .execute(&st, &[&key_id.as_str(), &revision, &value])
            .await
            .map_err(|e| {
                self.metrics.commit_errors.inc();
                db_err(&e)
            })?;
        self.metrics.commits.inc();
        self.metrics.writes.inc();
        Ok(n == 1)
    }

    async fn decode_all<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        let c = self.client().await?;
        let rows = c.query(sql, &[]).await.map_err(|e| db_err(&e))?;
        rows.iter()
            .map(|r| {
                let key: String = r.get(0);
                let bytes: Vec<u8> = r.get(1);
                serde_json::from_slice(&bytes).map_err(|_| corrupt(key, what))
            })
            .collect()
    }

    async fn upsert(
        &self,
        sql: &str,
        key: &(dyn tokio_postgres::types::ToSql + Sync),
        value: &[u8],
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        let st = c.prepare_cached(sql).await.map_err(|e| db_err(&e))?;
        c.execute(&st, &[key, &value]).await.map_err(|e| {
            self.metrics.commit_errors.inc();
            db_err(&e)
        })?;
        self.metrics.commits.inc();
        self.metrics.writes.inc();
        Ok(())
    }
}

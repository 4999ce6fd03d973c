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

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use kms_api::KeyId;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use super::{
    decode_record, encode_record, now_secs, AuditAnchor, AuditHead, Change, ChangePage, Compacted,
    DestroyOutcome, JobRecord, KekVersionRecord, KeyRecord, KeyState, KeyStore, LeaseOutcome,
    StoreError,
};
mod audit;
mod connection;
mod schema;

pub use audit::AuditLock;
use audit::{audit_writer, head_from_row, AuditAppend, AUDIT_LOCK, AUDIT_QUEUE};
use schema::migrate;
pub use schema::{probe, MIGRATIONS, SCHEMA_VERSION};

use crate::metrics::StoreMetrics;
pub use connection::{InvalidPostgresConfig, PostgresConfig, PG_PASSWORD_ENV};

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

/// A database error as a store error: `disk_full` is `NoSpace`, everything else `Io`. The
/// text is the server's message (never a parameter value: statements carry records as
/// parameters, and PostgreSQL does not echo them in errors of these statements).
fn db_err(e: &tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::DISK_FULL => StoreError::NoSpace(e.to_string()),
        _ => StoreError::Io(match e.as_db_error() {
            Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
            None => {
                // The causes say what failed (e.g. which certificate check).
                let mut text = format!("postgres: {e}");
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                text
            }
        }),
    }
}

fn pool_err(e: &deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(b) => db_err(b),
        other => StoreError::Io(format!("postgres pool: {other}")),
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

/// How often the server checks, while it runs a statement of this process, that the
/// process is still there (`client_connection_check_interval`, PostgreSQL 14 and later).
const CLIENT_CHECK_MS: u32 = 250;

/// Makes the server give up a statement of a KMS that died mid-statement (SIGKILL, host
/// loss) within [`CLIENT_CHECK_MS`]. Without it, a statement waiting for a lock runs on until
/// it gets the lock and only then finds its client gone; meanwhile the uncommitted rows it
/// wrote (an idempotent create, an audit head) block the replica that took over for seconds.
/// On a server older than 14 the setting does not exist: the connection is used without it.
async fn check_client_connection(
    client: &mut deadpool_postgres::ClientWrapper,
) -> Result<(), deadpool_postgres::HookError> {
    match client
        .batch_execute(&format!(
            "SET client_connection_check_interval = {CLIENT_CHECK_MS}"
        ))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(()),
        Err(e) => Err(deadpool_postgres::HookError::Backend(e)),
    }
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
        let pg_config = cfg.pg_config().map_err(&open_err)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // Without `store.ca_file` the configuration has only Unix sockets or
        // `sslmode=disable` (checked when it was loaded): no TLS to offer.
        let manager = match &cfg.ca_file {
            Some(_) => Manager::from_config(
                pg_config,
                tokio_postgres_rustls::MakeRustlsConnect::new(
                    cfg.tls_client_config().map_err(&open_err)?,
                ),
                manager_config,
            ),
            None => Manager::from_config(pg_config, tokio_postgres::NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.timeout))
            .create_timeout(Some(cfg.timeout))
            .recycle_timeout(Some(cfg.timeout))
            .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
                Box::pin(async move { check_client_connection(client).await })
            }))
            .build()
            .map_err(|e| open_err(e.to_string()))?;
        let mut client = pool
            .get()
            .await
            .map_err(|e| open_err(pool_err(&e).to_string()))?;
        for setting in ["fsync", "synchronous_commit"] {
            let row = client
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .map_err(|e| open_err(db_err(&e).to_string()))?;
            let value: String = row.get(0);
            if value == "off" {
                return Err(open_err(format!(
                    "the server runs with {setting} = off: a commit would not be durable"
                )));
            }
        }
        migrate(&mut client)
            .await
            .map_err(|e| open_err(e.to_string()))?;
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
        let ttl_ms = lease_ms(ttl)?;
        let mut c = self.client().await?;
        // One transaction; the lease row is locked while the outcome is decided. The
        // database's clock decides expiry, so replicas' clocks need not agree.
        let tx = c.transaction().await.map_err(|e| db_err(&e))?;
        let row = tx
            .query_opt(
                "SELECT holder, expires_at > clock_timestamp() FROM kms_leases \
                 WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await
            .map_err(|e| db_err(&e))?;
        let outcome = match row {
            Some(r) => {
                let (current, live): (String, bool) = (r.get(0), r.get(1));
                if live && current != holder {
                    return Ok(LeaseOutcome::HeldBy(current));
                }
                tx.execute(
                    "UPDATE kms_leases SET holder = $2, \
                     expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond' \
                     WHERE name = $1",
                    &[&name, &holder, &ttl_ms],
                )
                .await
                .map_err(|e| db_err(&e))?;
                if live {
                    LeaseOutcome::Renewed
                } else {
                    LeaseOutcome::Acquired
                }
            }
            None => {
                let n = tx
                    .execute(
                        "INSERT INTO kms_leases (name, holder, expires_at) VALUES \
                         ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond') \
                         ON CONFLICT (name) DO NOTHING",
                        &[&name, &holder, &ttl_ms],
                    )
                    .await
                    .map_err(|e| db_err(&e))?;
                if n == 0 {
                    // Another replica inserted it first: its lease is live.
                    return Ok(LeaseOutcome::HeldBy(String::new()));
                }
                LeaseOutcome::Acquired
            }
        };
        tx.commit().await.map_err(|e| db_err(&e))?;
        Ok(outcome)
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

    async fn lock_audit(&self) -> Result<super::AuditLock, StoreError> {
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
        Ok(super::AuditLock::Postgres(Box::new(taken)))
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
            .is_some_and(|r| super::entry_has_mac(&r.get::<_, Vec<u8>>(0), &anchor.mac));
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
    ) -> Result<super::Commit, StoreError> {
        let entries = super::encode_audit_entries(&entries)?;
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
        let key = super::pending_audit_key(&entry);
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

    async fn pending_audits(&self, limit: usize) -> Result<Vec<super::PendingAudit>, StoreError> {
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
        // Commit-order safe. A `bigserial` is taken when a row is inserted, not when its
        // transaction commits, so a cursor on `seq` would step over a row whose transaction
        // commits after a later one's. The cursor is instead a transaction-id horizon: every
        // change made by a transaction older than it has been delivered. It advances only to
        // the oldest transaction still running (`pg_snapshot_xmin`), below which every
        // transaction has ended and what it committed is visible to this statement. Changes of
        // newer transactions that have already committed are delivered at once as well, and
        // again by the next polls until the horizon passes them (acting on a change twice is
        // harmless: an eviction or a cache clear), so a long transaction elsewhere delays
        // nothing.
        let c = self.client().await?;
        let horizon_row = c
            .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
            .await
            .map_err(|e| db_err(&e))?;
        let horizon = parse_xid(&horizon_row.get::<_, String>(0), "the snapshot horizon")?;
        let Some(after) = cursor else {
            return Ok(ChangePage {
                cursor: horizon,
                changes: Vec::new(),
                more: false,
            });
        };
        let st = c
            .prepare_cached(
                "SELECT seq, xid::text, kind, subject FROM kms_changes \
                 WHERE xid >= $1::text::xid8 ORDER BY xid, seq LIMIT $2",
            )
            .await
            .map_err(|e| db_err(&e))?;
        let limit = limit.max(1);
        let rows = c
            .query(
                &st,
                &[
                    &after.to_string(),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| db_err(&e))?;
        let mut changes = rows
            .iter()
            .map(read_change)
            .collect::<Result<Vec<_>, _>>()?;
        let (next, more) = if changes.len() < limit {
            // Everything from the cursor on was read.
            (after.max(horizon), false)
        } else {
            // A full page: deliver whole transactions only, so the cursor can pass them.
            let last = changes.last().map_or(after, |c| c.0);
            if changes.iter().any(|c| c.0 < last) {
                changes.retain(|c| c.0 < last);
                let next = after.max(last.min(horizon));
                (next, next > after)
            } else {
                // One transaction filled the page: read all of it.
                changes = query_changes(
                    &c,
                    "SELECT seq, xid::text, kind, subject FROM kms_changes \
                     WHERE xid = $1::text::xid8 ORDER BY seq",
                    last,
                )
                .await?;
                let next = after.max(last.saturating_add(1).min(horizon));
                (next, next > after)
            }
        };
        if next == after && changes.len() >= limit {
            // A full page the cursor cannot pass: at least `limit` committed changes wait
            // above a transaction that is still running. Paging would return this same page
            // forever; read all of them instead (as many as were committed while that
            // transaction ran).
            let changes = query_changes(
                &c,
                "SELECT seq, xid::text, kind, subject FROM kms_changes \
                 WHERE xid >= $1::text::xid8 ORDER BY xid, seq",
                after,
            )
            .await?;
            return Ok(ChangePage {
                cursor: after.max(horizon),
                changes: changes.into_iter().map(|c| c.1).collect(),
                more: false,
            });
        }
        Ok(ChangePage {
            cursor: next,
            changes: changes.into_iter().map(|c| c.1).collect(),
            more,
        })
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

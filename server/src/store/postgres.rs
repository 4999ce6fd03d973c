//! The PostgreSQL backend (`store.backend = "postgres"`): the same keys and values as LMDB,
//! in one table (`progressdb_kv`), through a `deadpool-postgres` pool
//! ([`service_kit::postgres`], shared with the KMS's key store).
//!
//! * **Reads**: each in one `REPEATABLE READ, READ ONLY` transaction on tokio's blocking
//!   pool: one snapshot, as an LMDB read transaction.
//! * **Writes**: one writer thread takes queued writes in groups (up to
//!   `store.max_batch_ops`), applies them in one `SERIALIZABLE` transaction and commits once;
//!   a caller is answered after the commit. A group that meets a serialization failure or a
//!   deadlock is tried again whole (the ops are written to be applied more than once); any
//!   other failure is the database's (unreachable, full), and every write of the group gets
//!   it at once.
//! * **Durability**: the store refuses a server with `fsync` or `synchronous_commit` off.
//! * **One server per database**, for now: the server holds a session advisory lock on the
//!   database for as long as it runs, and a second server is refused at start. A restart of
//!   the database releases it: the writer takes it again before its next group, and writes
//!   nothing (and the store is not ready) if another server took the database meanwhile.
//!   Every group is written on the connection that holds the lock.
//! * **A commit whose connection broke** is looked up by its transaction id on another
//!   connection: written only if the database says it committed. The thread
//!   cache, message ids and job drivers of several servers on one database are not yet made
//!   coherent (docs/scaling.md).
//! * **Errors**: a database that cannot be reached or fails is [`StoreError::Unavailable`]
//!   (503); `disk_full` is [`StoreError::Full`] (507). Nothing is half-written: every write
//!   is in its group's transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use service_kit::postgres::{describe_pool, PostgresConfig, Schema};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::IsolationLevel;

use super::kv::postgres::PgKv;
use super::kv::{KvError, KvRead};
use super::queue::WriteQueue;
use super::writer::Queued;
use super::{OpenError, StoreError};
use crate::metrics::StoreMetrics;

/// The message store's schema.
pub const SCHEMA: Schema = Schema {
    table: "progressdb_schema_migrations",
    // "pdbsrv" in ASCII.
    lock: 0x7064_6273_7276,
    migrations: &[(
        1,
        "the key-value table",
        r#"
CREATE TABLE progressdb_kv (
    k bytea PRIMARY KEY,
    v bytea NOT NULL
);
"#,
    )],
    owner: "the server",
};

/// The session advisory lock a server holds on its database ("pdbone" in ASCII).
const ONE_SERVER_LOCK: i64 = 0x7064_626f_6e65;

/// How many times a group that meets a serialization failure is tried before it fails.
const TRIES: u32 = 8;

pub(crate) struct PgBackend {
    pool: Pool,
    target: String,
    queue: WriteQueue<Box<dyn Queued>>,
    /// Whether the writer holds the database (false once another server took it).
    holds: Arc<AtomicBool>,
}

fn unavailable(e: &deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(describe_pool(e))
}

/// Whether the group may succeed when tried again as it is.
fn retryable(e: &KvError) -> bool {
    match e {
        KvError::Postgres(p) => matches!(
            p.code(),
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        ),
        KvError::Lmdb(_) | KvError::Pool(_) => false,
    }
}

impl PgBackend {
    /// Connects, checks commits are durable, applies pending migrations, takes the
    /// one-server lock and starts the writer thread.
    pub(crate) async fn open(
        cfg: &PostgresConfig,
        max_batch: usize,
        metrics: StoreMetrics,
    ) -> Result<Self, OpenError> {
        let target = cfg.display_target();
        let err = |message: String| OpenError::at_url(&target, message);
        let pool = service_kit::postgres::open_pool(cfg, "progressdb").map_err(err)?;
        let mut client = pool.get().await.map_err(|e| err(describe_pool(&e)))?;
        service_kit::postgres::require_durable(&client)
            .await
            .map_err(err)?;
        // The lock first: a second server (perhaps a newer one) migrates nothing under the
        // running one. A server that just stopped or died may hold it for a moment more
        // (until the database sees its connection close): tried until `store.timeout_secs`.
        let started = std::time::Instant::now();
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&ONE_SERVER_LOCK])
                .await
                .map_err(|e| err(service_kit::postgres::describe(&e)))?
                .get(0);
            if locked {
                break;
            }
            if started.elapsed() >= cfg.timeout {
                return Err(err(
                    "another progressdb server uses this database: one server per database (docs/scaling.md)"
                        .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        SCHEMA.migrate(&mut client).await.map_err(err)?;
        let handle = Handle::current();
        let holds = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            handle,
            pool: pool.clone(),
            lock: client,
            holds: Arc::clone(&holds),
            metrics,
        };
        let max_batch = max_batch.max(1);
        let queue = WriteQueue::start("progressdb-pg-writer", max_batch * 4, move |rx| {
            writer.run(rx, max_batch);
        })
        .map_err(err)?;
        tracing::info!(store = %target, "message store open (postgres)");
        Ok(Self {
            pool,
            target,
            queue,
            holds,
        })
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    pub(crate) async fn write(&self, w: Box<dyn Queued>) -> Result<(), StoreError> {
        self.queue.send(w).await
    }

    /// The writer runs and holds the database: a server that lost it to another is not
    /// ready (its writes would all be refused).
    pub(crate) fn alive(&self) -> bool {
        self.queue.alive() && self.holds.load(Ordering::Relaxed)
    }

    /// Runs `f` in one `REPEATABLE READ, READ ONLY` transaction on the blocking pool.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KvRead) -> Result<T, StoreError> + Send + 'static,
    {
        let mut client = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let handle = Handle::current();
        tokio::task::spawn_blocking(move || {
            let tx = handle
                .block_on(
                    client
                        .build_transaction()
                        .isolation_level(IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start(),
                )
                .map_err(|e| StoreError::from(KvError::from(e)))?;
            let out = f(&PgKv::new(handle.clone(), &tx))?;
            handle
                .block_on(tx.commit())
                .map_err(|e| StoreError::from(KvError::from(e)))?;
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

/// The writer thread's state: the pool, and the connection that holds [`ONE_SERVER_LOCK`],
/// on which every group is written (so no write is made by a session that does not hold the
/// database).
struct Writer {
    handle: Handle,
    pool: Pool,
    /// Released by the database when this connection closes (a restart of the database):
    /// taken again before the next group, or no group is written.
    lock: deadpool_postgres::Object,
    holds: Arc<AtomicBool>,
    metrics: StoreMetrics,
}

impl Writer {
    /// Groups of queued writes, each group in one serializable transaction.
    fn run(mut self, mut rx: mpsc::Receiver<Box<dyn Queued>>, max_batch: usize) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < max_batch {
                match rx.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            let result = self
                .hold_lock()
                .and_then(|()| self.commit_retrying(&mut group));
            match &result {
                Ok(()) => self.metrics.committed(group.len(), started.elapsed()),
                Err(_) => {
                    self.metrics.commit_errors.inc();
                }
            }
            // A failure is the database's (unreachable, full, failing, or another server
            // holds it now), not one write's: every write of the group gets it, at once.
            for w in group {
                w.finish(result.clone());
            }
        }
    }

    /// Makes sure this server still holds the database: a lock whose connection closed (the
    /// database restarted) is taken again on a new connection. Fail closed: when another
    /// server took the database meanwhile, no write is made.
    fn hold_lock(&mut self) -> Result<(), StoreError> {
        if !self.lock.is_closed() {
            return Ok(());
        }
        let client = self
            .handle
            .block_on(self.pool.get())
            .map_err(|e| unavailable(&e))?;
        let locked: bool = self
            .handle
            .block_on(client.query_one("SELECT pg_try_advisory_lock($1)", &[&ONE_SERVER_LOCK]))
            .map_err(|e| StoreError::from(KvError::from(e)))?
            .get(0);
        if !locked {
            self.holds.store(false, Ordering::Relaxed);
            tracing::error!("another progressdb server took this database: no write is made");
            return Err(StoreError::Unavailable(
                "another progressdb server took this database".into(),
            ));
        }
        tracing::warn!("the database's connection was lost: this server holds it again");
        self.lock = client;
        self.holds.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// [`Writer::commit`], tried again after a serialization failure or deadlock (with a
    /// short growing pause), up to [`TRIES`] times.
    fn commit_retrying(&mut self, group: &mut [Box<dyn Queued>]) -> Result<(), StoreError> {
        let mut tried = 0;
        loop {
            tried += 1;
            match self.commit(group) {
                Ok(()) => return Ok(()),
                Err(e) if retryable(&e) && tried < TRIES => {
                    tracing::debug!(error = %e, tried, "write group tried again");
                    std::thread::sleep(Duration::from_millis(u64::from(tried) * 5));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "write group failed");
                    return Err(e.into());
                }
            }
        }
    }

    /// Applies `group` in one serializable transaction on the lock's connection and commits
    /// it. A commit whose connection broke has an unknown outcome: it is looked up by its
    /// transaction id on another connection, and counts as written only when the database
    /// says it committed.
    fn commit(&mut self, group: &mut [Box<dyn Queued>]) -> Result<(), KvError> {
        let handle = self.handle.clone();
        let tx = handle.block_on(
            self.lock
                .build_transaction()
                .isolation_level(IsolationLevel::Serializable)
                .start(),
        )?;
        let xid: i64 = handle
            .block_on(tx.query_one("SELECT txid_current()", &[]))?
            .get(0);
        let mut kv = PgKv::new(handle.clone(), &tx);
        for w in group.iter_mut() {
            w.apply(&mut kv)?;
        }
        kv.flush()?;
        drop(kv);
        match handle.block_on(tx.commit()) {
            Ok(()) => Ok(()),
            Err(e) if e.as_db_error().is_none() && self.committed(xid) => {
                tracing::warn!(error = %e, "the commit's connection broke after the commit: written");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the transaction `xid` committed, asked on a new connection; `false` when the
    /// database cannot say (then the writes are answered as failed, and may be stored).
    fn committed(&self, xid: i64) -> bool {
        let status = self.handle.block_on(async {
            let c = self.pool.get().await.ok()?;
            let row = c
                .query_one("SELECT txid_status($1)::text", &[&xid])
                .await
                .ok()?;
            row.get::<_, Option<String>>(0)
        });
        status.as_deref() == Some("committed")
    }
}

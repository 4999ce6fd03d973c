//! The LMDB backend (heed): one [`heed::Env`] per process, one database. Reads run each in
//! its own read transaction on tokio's blocking pool; writes go to the shared group-commit
//! writer ([`service_kit::group_commit`]): one thread, one transaction and one fsync per
//! group, map growth while no transaction is open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use heed::{Env, EnvOpenOptions, WithoutTls};
use service_kit::group_commit::{self, GroupCommitWriter, Write};

use super::kv::lmdb::LmdbRead;
use super::kv::KvRead;
use super::queue::WriteQueue;
use super::writer::{LmdbQueued, Queued};
use super::{Db, OpenError, StoreError, StoreOptions, LOCK_FILE};
use crate::metrics::StoreMetrics;

pub(crate) struct StoreEnv {
    env: Env<WithoutTls>,
    db: Db,
    /// Read transactions hold it shared; a map resize holds it exclusively, because
    /// `mdb_env_set_mapsize` requires that no transaction is open in the process.
    gate: Arc<RwLock<()>>,
    path: PathBuf,
}

pub(crate) struct LmdbBackend {
    shared: Arc<StoreEnv>,
    queue: WriteQueue<Box<dyn Write>>,
    /// `progressdb.lock`, exclusively `flock`ed: one process per store.
    _lock: std::fs::File,
}

fn read_guard(gate: &RwLock<()>) -> std::sync::RwLockReadGuard<'_, ()> {
    gate.read().unwrap_or_else(|p| p.into_inner())
}

impl LmdbBackend {
    /// Opens (creating if needed) the LMDB environment at `opts.path` and starts the writer
    /// thread. Open each path once per process.
    pub(crate) fn open(opts: &StoreOptions, metrics: StoreMetrics) -> Result<Self, OpenError> {
        let err = |message: String| OpenError::at_path(&opts.path, message);
        let mut o = EnvOpenOptions::new().read_txn_without_tls();
        o.map_size(opts.map_size).max_readers(1024).max_dbs(1);
        let service_kit::lmdb::Opened { env, lock } =
            service_kit::lmdb::open(&opts.path, LOCK_FILE, &o).map_err(err)?;
        let mut wtxn = env.write_txn().map_err(|e| err(e.to_string()))?;
        let db: Db = env
            .create_database(&mut wtxn, None)
            .map_err(|e| err(e.to_string()))?;
        wtxn.commit().map_err(|e| err(e.to_string()))?;
        let map_size = env.info().map_size;
        metrics
            .map_size_bytes
            .set(i64::try_from(map_size).unwrap_or(i64::MAX));
        let gate = Arc::new(RwLock::new(()));
        let shared = Arc::new(StoreEnv {
            env: env.clone(),
            db,
            gate: gate.clone(),
            path: opts.path.clone(),
        });
        let max_batch = opts.max_batch_ops.max(1);
        let options = group_commit::Options {
            max_batch,
            max_map_size: opts.max_map_size.max(map_size),
        };
        let queue = WriteQueue::start("progressdb-writer", max_batch * 4, move |rx| {
            GroupCommitWriter::new(
                env,
                gate,
                rx,
                options,
                service_kit::group_commit::MetricsObserver {
                    metrics,
                    store: "store",
                    map_setting: "store.max_map_size_mb",
                },
            )
            .run();
        })
        .map_err(err)?;
        Ok(Self {
            shared,
            queue,
            _lock: lock,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Current map size in bytes.
    pub(crate) fn map_size(&self) -> usize {
        self.shared.env.info().map_size
    }

    pub(crate) async fn write(&self, w: Box<dyn Queued>) -> Result<(), StoreError> {
        self.queue
            .send(Box::new(LmdbQueued {
                db: self.shared.db,
                inner: w,
            }))
            .await
    }

    pub(crate) fn alive(&self) -> bool {
        self.queue.alive()
    }

    /// Runs `f` in a read transaction on the blocking pool.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KvRead) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let _gate = read_guard(&shared.gate);
            let txn = shared.env.read_txn()?;
            f(&LmdbRead {
                db: shared.db,
                txn: &txn,
            })
        })
        .await
        .map_err(|e| StoreError::Lmdb(format!("read task failed: {e}")))?
    }

    /// Writes LMDB's compacting copy of the store to `path` (a new file), under one read
    /// transaction, and syncs it.
    pub(crate) async fn copy_compacted(&self, path: &Path) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let _gate = read_guard(&shared.gate);
            let f = shared
                .env
                .copy_to_path(&path, heed::CompactionOption::Enabled)?;
            f.sync_all()
                .map_err(|e| StoreError::Lmdb(format!("syncing the copy: {e}")))
        })
        .await
        .map_err(|e| StoreError::Lmdb(format!("copy task failed: {e}")))?
    }
}

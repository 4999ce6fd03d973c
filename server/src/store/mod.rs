//! The LMDB store (heed): one [`heed::Env`] per process, one database, keys as in [`keys`].
//!
//! * **Reads** run on tokio's blocking pool ([`tokio::task::spawn_blocking`]), each in its own
//!   short read transaction that never crosses an `.await`.
//! * **Writes** go to a single dedicated writer thread (the shared
//!   [`service_kit::group_commit`] writer, running the ops of [`writer`]) through a bounded
//!   queue. The writer drains whatever is queued (up to `store.max_batch_ops`) into **one**
//!   write transaction and commits it once: group commit. LMDB's commit fsyncs (no `NO_SYNC`-like
//!   flags are set), and a caller is answered only after that commit returned, so an
//!   acknowledged write is durable.
//! * **Full map**: when a commit hits `MDB_MAP_FULL` the transaction is aborted (nothing is
//!   written), the writer doubles the map (up to `store.max_map_size_mb`) while no transaction
//!   is open in the process, and retries. At the limit, each write of the group is retried
//!   alone and those that still do not fit fail with [`StoreError::Full`] (HTTP 507).

pub mod aad;
pub mod keys;
pub mod kv;
mod pages;
pub mod records;
mod scan;
mod types;
mod writer;
pub use pages::ThreadPages;
pub use types::*;

/// serde_json's error without the input it may quote.
pub(crate) use scan::serde_error_text as scan_error_text;
pub use scan::window_of_sorted;
use scan::*;

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use kms_api::ThreadId;
use kv::lmdb::LmdbRead;
use kv::KvRead;
use service_kit::group_commit::{self, GroupCommitWriter, Write};
use tokio::sync::{mpsc, oneshot};

use crate::ids::{MessageId, UserId};
use crate::metrics::StoreMetrics;
pub use records::{
    Content, DekRotation, JobKind, JobProgress, JobRecord, JobState, MessageAttrs, MessageRecord,
    MessageRole, PlainMigration, RawJson, RecordFormat, SealedBy, SealedMeta, ThreadRecord,
};
pub use writer::{
    AuthorRule, CreateThread, DeleteMessage, DeleteThread, FinishRotation, MigrateBatch, Migrated,
    PatchThread, PutJob, PutMessage, RawPut, RefreshKeyCopy, ReviveJob, RevokeSignatures,
    RotationStart, SetThreadKeyIfAbsent, StartRotation, ThreadsPerAuthor, UpdateMessage, WriteOp,
};

/// The one LMDB database: raw byte keys and values.
pub type Db = Database<Bytes, Bytes>;

pub(crate) struct StoreEnv {
    env: Env<WithoutTls>,
    db: Db,
    /// Read transactions hold it shared; a map resize holds it exclusively, because
    /// `mdb_env_set_mapsize` requires that no transaction is open in the process.
    gate: Arc<RwLock<()>>,
    path: PathBuf,
}

struct Inner {
    shared: Arc<StoreEnv>,
    tx: Mutex<Option<mpsc::Sender<Box<dyn Write>>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// `progressdb.lock`, exclusively `flock`ed: one process per store.
    _lock: std::fs::File,
}

/// The store's lock file.
pub const LOCK_FILE: &str = "progressdb.lock";

/// Offline compaction of the store in `dir` (the server must be stopped; the store's lock
/// says whether it is): the bytes of replaced and deleted records (free pages) are dropped.
///
/// # Errors
/// A one-line reason.
pub fn compact(dir: &Path) -> Result<(u64, u64), String> {
    service_kit::lmdb::compact(dir, LOCK_FILE, 1)
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("LMDB writer thread panicked");
            }
        }
    }
}

/// A cheap-to-clone handle to the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.shared.path)
            .finish()
    }
}

fn read_guard(gate: &RwLock<()>) -> std::sync::RwLockReadGuard<'_, ()> {
    gate.read().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens (creating if needed) the LMDB environment at `opts.path` and starts the writer
    /// thread. Open each path once per process.
    ///
    /// # Errors
    /// [`OpenError`] naming the directory.
    pub fn open(opts: &StoreOptions, metrics: StoreMetrics) -> Result<Self, OpenError> {
        let err = |message: String| OpenError {
            path: opts.path.clone(),
            message,
        };
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
        let (tx, rx) = mpsc::channel(opts.max_batch_ops.max(1) * 4);
        let w = GroupCommitWriter::new(
            env,
            gate,
            rx,
            group_commit::Options {
                max_batch: opts.max_batch_ops.max(1),
                max_map_size: opts.max_map_size.max(map_size),
            },
            service_kit::group_commit::MetricsObserver {
                metrics,
                store: "store",
                map_setting: "store.max_map_size_mb",
            },
        );
        let handle = std::thread::Builder::new()
            .name("progressdb-writer".into())
            .spawn(move || w.run())
            .map_err(|e| err(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                tx: Mutex::new(Some(tx)),
                _lock: lock,
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    /// Current map size in bytes.
    pub fn map_size(&self) -> usize {
        self.inner.shared.env.info().map_size
    }

    /// Queues `op` for the writer and waits until its group commit is durable.
    ///
    /// # Errors
    /// The op's own error ([`StoreError::NotFound`]...), or the commit's.
    pub async fn write<O: WriteOp>(&self, op: O) -> Result<O::Out, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = writer::pending(op, self.inner.shared.db, reply);
        let tx = {
            let guard = self.inner.tx.lock().unwrap_or_else(|p| p.into_inner());
            guard.clone().ok_or(StoreError::Closed)?
        };
        tx.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KvRead) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.inner.shared.clone();
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
    ///
    /// # Errors
    /// [`StoreError`] when the copy fails.
    pub async fn copy_compacted(&self, path: &Path) -> Result<(), StoreError> {
        let shared = self.inner.shared.clone();
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

    /// Checks that a read transaction can be opened and that the writer is running.
    ///
    /// # Errors
    /// [`StoreError`] when not.
    pub async fn check(&self) -> Result<(), StoreError> {
        let writer_alive = self
            .inner
            .writer
            .lock()
            .map(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false);
        if !writer_alive {
            return Err(StoreError::Closed);
        }
        self.read(|kv| {
            kv.range(Bound::Unbounded, Bound::Unbounded)?
                .next()
                .transpose()?;
            Ok(())
        })
        .await
    }

    /// The thread record of `id`.
    ///
    /// # Errors
    /// [`StoreError`]; a record that does not parse is [`StoreError::Corrupt`].
    pub async fn get_thread(&self, id: &ThreadId) -> Result<Option<ThreadRecord>, StoreError> {
        let key = keys::meta(id);
        self.read(move |kv| match kv.get(&key)? {
            None => Ok(None),
            Some(v) => parse_thread(&key, &v).map(Some),
        })
        .await
    }

    /// Up to `limit` threads after `after` (exclusive), in id order (creation order for
    /// server-made ids).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list_threads(
        &self,
        filter: ThreadFilter,
        after: Option<ThreadId>,
        limit: usize,
    ) -> Result<Page<ThreadRecord>, StoreError> {
        self.read(move |kv| match filter {
            ThreadFilter::All => list_all_threads(kv, after.as_ref(), limit),
            ThreadFilter::Author(u) => list_author_threads(kv, &u, after.as_ref(), limit),
        })
        .await
    }

    /// Up to `limit` threads after `after` (exclusive) in id order, each with its record or,
    /// for a record that does not parse, why ([`Store::list_threads`] leaves those out).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn thread_entries(
        &self,
        after: Option<ThreadId>,
        limit: usize,
    ) -> Result<Page<ThreadEntry>, StoreError> {
        self.read(move |kv| thread_entries(kv, after.as_ref(), limit))
            .await
    }

    /// One message, or `None`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn get_message(
        &self,
        thread: &ThreadId,
        id: MessageId,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let key = keys::msg(thread, id);
        self.read(move |kv| {
            Ok(kv.get(&key)?.map(|v| StoredMessage {
                id,
                record: serde_json::from_slice(&v).map_err(|e| serde_error_text(&e)),
            }))
        })
        .await
    }

    /// Up to `limit` messages of `thread` after the cursor `after` (exclusive) in `order`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list_messages(
        &self,
        thread: &ThreadId,
        order: Order,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<StoredMessage>, StoreError> {
        let thread = thread.clone();
        self.read(move |kv| {
            list_messages(
                kv,
                &thread,
                order,
                after,
                limit,
                usize::MAX,
                Tombstones::Hide,
            )
        })
        .await
    }

    /// Up to `limit` messages of `thread` with ids after `after` and before `before`, in id
    /// order, as stored (raw bytes: a migration compares them when it writes back).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn raw_messages(
        &self,
        thread: &ThreadId,
        after: Option<MessageId>,
        before: MessageId,
        limit: usize,
    ) -> Result<Vec<(MessageId, Vec<u8>)>, StoreError> {
        let thread = thread.clone();
        self.read(move |kv| {
            let prefix = keys::msg_prefix(&thread);
            let lo = match after {
                Some(a) => std::ops::Bound::Excluded(keys::msg(&thread, a)),
                None => std::ops::Bound::Included(prefix.clone()),
            };
            let hi = std::ops::Bound::Excluded(keys::msg(&thread, before));
            let range = (
                lo.as_ref().map(Vec::as_slice),
                hi.as_ref().map(Vec::as_slice),
            );
            let mut out = Vec::new();
            for r in kv.range(range.0, range.1)? {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = r?;
                if let Some(id) = keys::parse_msg(&prefix, &k) {
                    out.push((id, v.to_vec()));
                }
            }
            Ok(out)
        })
        .await
    }

    /// How many messages `thread` holds before `before` (deleted messages' tombstones not
    /// counted).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn count_messages(
        &self,
        thread: &ThreadId,
        before: MessageId,
    ) -> Result<u64, StoreError> {
        let thread = thread.clone();
        self.read(move |kv| {
            let lo = keys::msg_prefix(&thread);
            let hi = keys::msg(&thread, before);
            let range = (
                std::ops::Bound::Included(lo.as_slice()),
                std::ops::Bound::Excluded(hi.as_slice()),
            );
            let mut n = 0u64;
            for r in kv.range(range.0, range.1)? {
                let (_, v) = r?;
                if !records::is_tombstone_bytes(&v) {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    /// The job `id`, if any.
    ///
    /// # Errors
    /// [`StoreError`]; a record that does not parse is [`StoreError::Corrupt`].
    pub async fn get_job(
        &self,
        id: &kms_api::admin::JobId,
    ) -> Result<Option<JobRecord>, StoreError> {
        let key = keys::job(id);
        self.read(move |kv| match kv.get(&key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("job record".into())),
        })
        .await
    }

    /// Every job record (undecodable ones are skipped and logged).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read(move |kv| {
            let (lo, hi) = keys::all_jobs();
            let range = (
                std::ops::Bound::Included(lo.as_slice()),
                std::ops::Bound::Excluded(hi.as_slice()),
            );
            let mut out = Vec::new();
            for r in kv.range(range.0, range.1)? {
                let (k, v) = r?;
                match serde_json::from_slice::<JobRecord>(&v) {
                    Ok(j) => out.push(j),
                    Err(_) => {
                        tracing::error!(key = %String::from_utf8_lossy(&k), "undecodable job record")
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Like [`Store::list_messages`], with the thread record read in the **same** read
    /// transaction: which key sealed each message follows that record's rotation state, so
    /// a reader must judge messages by the record of the same snapshot.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn messages_with_thread(
        &self,
        thread: &ThreadId,
        order: Order,
        after: Option<MessageId>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Option<ThreadRecord>, Page<StoredMessage>), StoreError> {
        let thread = thread.clone();
        self.read(move |kv| {
            let rec = scan::read_meta(kv, &thread)?;
            Ok((
                rec,
                list_messages(
                    kv,
                    &thread,
                    order,
                    after,
                    limit,
                    max_bytes,
                    Tombstones::Hide,
                )?,
            ))
        })
        .await
    }

    /// One message and the thread record, from one read transaction (see
    /// [`Store::messages_with_thread`]).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn message_with_thread(
        &self,
        thread: &ThreadId,
        id: MessageId,
    ) -> Result<(Option<ThreadRecord>, Option<StoredMessage>), StoreError> {
        let thread = thread.clone();
        self.read(move |kv| {
            let rec = scan::read_meta(kv, &thread)?;
            let msg = kv.get(&keys::msg(&thread, id))?.map(|v| StoredMessage {
                id,
                record: serde_json::from_slice(&v).map_err(|e| serde_error_text(&e)),
            });
            Ok((rec, msg))
        })
        .await
    }

    /// Whether `user` has at least `max` threads (a cheap check before a create asks the
    /// KMS for a key; the create checks again in its write transaction).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn author_has_at_least(&self, user: &UserId, max: usize) -> Result<bool, StoreError> {
        let user = user.clone();
        self.read(move |kv| Ok(writer::author_has_at_least(kv, &user, max)?))
            .await
    }

    /// Every user whose signatures were revoked, with its generation (read once at start).
    ///
    /// # Errors
    /// [`StoreError`]; a value that is not a decimal number is [`StoreError::Corrupt`]
    /// (a generation that cannot be read would let revoked signatures back in).
    pub async fn signature_generations(&self) -> Result<Vec<(UserId, u64)>, StoreError> {
        self.read(|kv| {
            let (lo, hi) = keys::all_users();
            let mut out = Vec::new();
            for r in kv.range(
                Bound::Included(lo.as_slice()),
                Bound::Excluded(hi.as_slice()),
            )? {
                let (k, v) = r?;
                let Some(user) = keys::parse_signature_generation(&k) else {
                    continue;
                };
                let generation = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("{user}'s signature generation")))?;
                out.push((user, generation));
            }
            Ok(out)
        })
        .await
    }

    /// The raw value stored under `key`: for operator tools and tests.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn raw_get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(move |kv| Ok(kv.get(&key)?.map(std::borrow::Cow::into_owned)))
            .await
    }
}

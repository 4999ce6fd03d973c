//! The message store: threads and messages under the keys of [`keys`], in one of two
//! backends behind one ordered key-value transaction ([`kv`]), so every write op
//! (`writer`), scan and page is written once:
//!
//! * **LMDB** (`lmdb`, the default): one [`heed::Env`] per process. Reads run on tokio's
//!   blocking pool, each in its own short read transaction that never crosses an `.await`.
//!   Writes go to a single writer thread (the shared [`service_kit::group_commit`] writer)
//!   through a bounded queue; it drains what is queued (up to `store.max_batch_ops`) into
//!   **one** write transaction and commits it once: group commit. LMDB's commit fsyncs, and a
//!   caller is answered only after it returned, so an acknowledged write is durable. When a
//!   commit hits `MDB_MAP_FULL` nothing is written, the map doubles (up to
//!   `store.max_map_size_mb`) while no transaction is open, and the group is retried; at the
//!   limit each write is retried alone and those that do not fit fail with
//!   [`StoreError::Full`] (HTTP 507).
//! * **PostgreSQL** (`postgres`, `store.backend = "postgres"`): the same keys and values in
//!   one table; snapshot reads, serializable group commits, one server per database for now
//!   (docs/scaling.md).

pub mod aad;
pub mod keys;
pub mod kv;
mod lmdb;
mod pages;
pub mod postgres;
mod queue;
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
use std::sync::Arc;

use heed::types::Bytes;
use heed::Database;
use kms_api::ThreadId;
use kv::KvRead;
use tokio::sync::oneshot;

use crate::ids::{MessageId, UserId};
use crate::metrics::StoreMetrics;
pub use records::{
    Content, DekRotation, JobKind, JobProgress, JobRecord, JobState, MessageAttrs, MessageRecord,
    MessageRole, PlainMigration, RawJson, RecordFormat, SealedBy, SealedMeta, ThreadRecord,
};
pub use writer::{
    AuthorRule, CreateThread, DeleteMessage, DeleteThread, FinishRotation, MigrateBatch, Migrated,
    PatchThread, PutJob, PutMessage, RawPut, RawPuts, RefreshKeyCopy, ReviveJob, RevokeSignatures,
    RotationStart, SetThreadKeyIfAbsent, StartRotation, ThreadsPerAuthor, UpdateMessage, WriteOp,
};

/// The one LMDB database: raw byte keys and values.
pub type Db = Database<Bytes, Bytes>;

/// Where the store's data lives.
enum Backend {
    Lmdb(lmdb::LmdbBackend),
    Postgres(Box<postgres::PgBackend>),
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

/// A cheap-to-clone handle to the store.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.backend {
            Backend::Lmdb(l) => f.debug_struct("Store").field("path", &l.path()).finish(),
            Backend::Postgres(p) => f.debug_struct("Store").field("url", &p.target()).finish(),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the LMDB environment at `opts.path` and starts the writer
    /// thread. Open each path once per process.
    ///
    /// # Errors
    /// [`OpenError`] naming the directory.
    pub fn open(opts: &StoreOptions, metrics: StoreMetrics) -> Result<Self, OpenError> {
        Ok(Self {
            backend: Arc::new(Backend::Lmdb(lmdb::LmdbBackend::open(opts, metrics)?)),
        })
    }

    /// Opens the store in the PostgreSQL database `cfg` names (applying pending migrations)
    /// and starts the writer thread: groups of up to `max_batch_ops` writes.
    ///
    /// # Errors
    /// [`OpenError`] naming the database (never its password): unreachable, commits not
    /// durable, a schema newer than this binary, or another server using it.
    pub async fn open_postgres(
        cfg: &service_kit::postgres::PostgresConfig,
        max_batch_ops: usize,
        metrics: StoreMetrics,
    ) -> Result<Self, OpenError> {
        Ok(Self {
            backend: Arc::new(Backend::Postgres(Box::new(
                postgres::PgBackend::open(cfg, max_batch_ops, metrics).await?,
            ))),
        })
    }

    /// The LMDB store's directory; `None` on PostgreSQL.
    pub fn lmdb_dir(&self) -> Option<&Path> {
        match &*self.backend {
            Backend::Lmdb(l) => Some(l.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// The LMDB map's current size in bytes; `None` on PostgreSQL.
    pub fn map_size(&self) -> Option<usize> {
        match &*self.backend {
            Backend::Lmdb(l) => Some(l.map_size()),
            Backend::Postgres(_) => None,
        }
    }

    /// Queues `op` for the writer and waits until its group commit is durable.
    ///
    /// # Errors
    /// The op's own error ([`StoreError::NotFound`]...), or the commit's.
    pub async fn write<O: WriteOp>(&self, op: O) -> Result<O::Out, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = writer::pending(op, reply);
        match &*self.backend {
            Backend::Lmdb(l) => l.write(job).await?,
            Backend::Postgres(p) => p.write(job).await?,
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` in a read transaction (one snapshot) on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KvRead) -> Result<T, StoreError> + Send + 'static,
    {
        match &*self.backend {
            Backend::Lmdb(l) => l.read(f).await,
            Backend::Postgres(p) => p.read(f).await,
        }
    }

    /// Writes LMDB's compacting copy of the store to `path` (a new file), under one read
    /// transaction, and syncs it.
    ///
    /// # Errors
    /// [`StoreError`] when the copy fails; on PostgreSQL, always (backed up with its own
    /// tools).
    pub async fn copy_compacted(&self, path: &Path) -> Result<(), StoreError> {
        match &*self.backend {
            Backend::Lmdb(l) => l.copy_compacted(path).await,
            Backend::Postgres(_) => Err(StoreError::Unavailable(
                "a PostgreSQL store is backed up with PostgreSQL's tools (docs/operations.md)"
                    .into(),
            )),
        }
    }

    /// Checks that a read transaction can be opened and that the writer is running.
    ///
    /// # Errors
    /// [`StoreError`] when not.
    pub async fn check(&self) -> Result<(), StoreError> {
        let writer_alive = match &*self.backend {
            Backend::Lmdb(l) => l.alive(),
            Backend::Postgres(p) => p.alive(),
        };
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

    /// Up to `limit` raw pairs after the key `after` (exclusive), in key order: everything
    /// the store holds, for `store copy`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn raw_pairs(
        &self,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.read(move |kv| {
            let lo = match &after {
                Some(a) => Bound::Excluded(a.as_slice()),
                None => Bound::Unbounded,
            };
            let mut out = Vec::new();
            for r in kv.range(lo, Bound::Unbounded)?.take(limit) {
                let (k, v) = r?;
                out.push((k.into_owned(), v.into_owned()));
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

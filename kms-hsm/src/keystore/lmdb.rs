//! The LMDB key store (heed), with group commit.
//!
//! * Layout: database `keys` maps the key id (UTF-8) to the JSON of a [`KeyRecord`]; database
//!   `meta` holds `format = "1"`.
//! * Reads open a short read transaction on the calling thread; no transaction ever lives
//!   across an `.await`.
//! * Every write goes through the shared group-commit writer ([`service_kit::group_commit`]):
//!   one thread drains whatever is queued (up to [`MAX_BATCH`]) into one write transaction,
//!   commits it with LMDB's default durable sync, then answers each caller through its oneshot
//!   channel. Concurrent creates therefore share one fsync instead of paying one each, and a
//!   caller is answered only after its record is on disk.
//! * A full map (`MDB_MAP_FULL`) aborts the transaction: nothing of it is written; each write
//!   of the group is then retried alone and those that still do not fit get
//!   [`StoreError::Full`] (the map is not grown: its size is `store.map_size_mb`). LMDB never
//!   leaves a half-applied transaction.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use heed::types::{Bytes, Str};
use heed::{Database, Env, EnvOpenOptions};
use kms_api::KeyId;
use service_kit::group_commit::{self, GroupCommitWriter, Write};
use tokio::sync::{mpsc, oneshot};

use super::{
    decode_record, encode_record, AuditAnchor, AuditHead, Compacted, DestroyOutcome, KeyRecord,
    KeyState, StoreError,
};
use crate::metrics::StoreMetrics;

mod key_store;
mod ops;
mod room;

use room::{Creating, Room};

/// Most writes applied in one transaction.
pub const MAX_BATCH: usize = 256;
/// Pending writes queued before callers wait for room (back-pressure).
const QUEUE_DEPTH: usize = 4096;
/// Value of `meta/format`.
const FORMAT: &str = "1";
/// The store's lock file (one process per store).
pub const LOCK_FILE: &str = "kms.lock";
/// Key of the audit head in the `lifecycle` database.
const AUDIT_HEAD: &str = "audit/head";
/// Key of the audit anchor in the `lifecycle` database ([`AuditAnchor`]).
const AUDIT_ANCHOR: &str = "audit/anchor";

enum Op {
    PutNew(KeyRecord),
    CompareAndSwap {
        expected: Box<KeyRecord>,
        new: Box<KeyRecord>,
    },
    Destroy {
        key_id: KeyId,
        at: u64,
    },
    /// Creates or replaces one record of the `lifecycle` database.
    PutLifecycle {
        key: String,
        value: Vec<u8>,
    },
    /// Appends encoded audit entries and replaces the head.
    AppendAudit {
        entries: Vec<(u64, Vec<u8>)>,
        prev: Option<AuditHead>,
        head: Vec<u8>,
        chained: Vec<String>,
        records: Vec<KeyRecord>,
    },
    /// Removes audit entries and tombstones, records the anchor ([`KeyStore::compact_audit`]).
    ///
    /// [`KeyStore::compact_audit`]: super::KeyStore::compact_audit
    CompactAudit {
        anchor: AuditAnchor,
        tombstones_through: u64,
    },
}

enum OpOutput {
    Written,
    Destroy(DestroyOutcome),
    Compacted(Compacted),
}

struct Pending {
    op: Op,
    /// This write's place in [`LmdbStore::creating`], given back when it is answered.
    _creating: Option<Creating>,
    keys: Database<Str, Bytes>,
    lifecycle: Database<Str, Bytes>,
    audit: Database<Bytes, Bytes>,
    map_size_mb: u64,

    result: Option<Result<OpOutput, StoreError>>,
    reply: oneshot::Sender<Result<OpOutput, StoreError>>,
}

/// The LMDB store. Dropping it stops the writer after the writes already queued.
pub struct LmdbStore {
    env: Env,
    keys: Database<Str, Bytes>,
    lifecycle: Database<Str, Bytes>,
    audit: Database<Bytes, Bytes>,
    path: PathBuf,
    map_size_mb: u64,
    tx: Option<mpsc::Sender<Box<dyn Write>>>,
    writer: Option<JoinHandle<()>>,
    /// `kms.lock`, exclusively `flock`ed for the store's life: one process per store.
    _lock: std::fs::File,
    /// Leases ([`KeyStore::acquire_lease`]): this process is the store's only user, so they
    /// live in memory (holder, expiry) and end with it.
    ///
    /// [`KeyStore::acquire_lease`]: super::KeyStore::acquire_lease
    leases: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    /// Key records queued to be created and not committed (or refused) yet: counted against
    /// the map's room as if written, so creates queued together cannot pass the room check
    /// together ([`Room`]).
    creating: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for LmdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbStore")
            .field("path", &self.path)
            .field("map_size_mb", &self.map_size_mb)
            .finish()
    }
}

fn io_err(e: heed::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl LmdbStore {
    /// Opens (creating if needed) the store in directory `path` with a map of `map_size_mb`
    /// MiB, and starts its writer thread.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming the path.
    pub fn open(path: &Path, map_size_mb: u64, metrics: StoreMetrics) -> Result<Self, StoreError> {
        let open_err = |detail: String| StoreError::Open {
            target: path.display().to_string(),
            detail,
        };
        let map_size = usize::try_from(map_size_mb)
            .ok()
            .and_then(|mb| mb.checked_mul(1024 * 1024))
            .ok_or_else(|| open_err("store.map_size_mb is too large".into()))?;
        let mut opts = EnvOpenOptions::new();
        opts.map_size(map_size).max_dbs(8);
        let service_kit::lmdb::Opened { env, lock } =
            service_kit::lmdb::open(path, LOCK_FILE, &opts).map_err(open_err)?;

        let mut wtxn = env.write_txn().map_err(|e| open_err(e.to_string()))?;
        let keys: Database<Str, Bytes> = env
            .create_database(&mut wtxn, Some("keys"))
            .map_err(|e| open_err(e.to_string()))?;
        let lifecycle: Database<Str, Bytes> = env
            .create_database(&mut wtxn, Some("lifecycle"))
            .map_err(|e| open_err(e.to_string()))?;
        let audit: Database<Bytes, Bytes> = env
            .create_database(&mut wtxn, Some("audit"))
            .map_err(|e| open_err(e.to_string()))?;
        let meta: Database<Str, Str> = env
            .create_database(&mut wtxn, Some("meta"))
            .map_err(|e| open_err(e.to_string()))?;
        match meta
            .get(&wtxn, "format")
            .map_err(|e| open_err(e.to_string()))?
        {
            None => meta
                .put(&mut wtxn, "format", FORMAT)
                .map_err(|e| open_err(e.to_string()))?,
            Some(FORMAT) => {}
            Some(other) => {
                return Err(open_err(format!(
                    "unsupported store format {other:?} (this build reads format {FORMAT})"
                )))
            }
        }
        wtxn.commit().map_err(|e| open_err(e.to_string()))?;

        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        // The map never grows (its size is `store.map_size_mb`), so reads need no gate.
        let w = GroupCommitWriter::new(
            env.clone(),
            Arc::new(RwLock::new(())),
            rx,
            group_commit::Options {
                max_batch: MAX_BATCH,
                max_map_size: map_size,
            },
            service_kit::group_commit::MetricsObserver {
                metrics,
                store: "key store",
                map_setting: "store.map_size_mb",
            },
        );
        let writer = std::thread::Builder::new()
            .name("kms-store-writer".into())
            .spawn(move || w.run())
            .map_err(|e| open_err(format!("cannot start writer thread: {e}")))?;
        tracing::info!(path = %path.display(), map_size_mb, "key store opened");
        Ok(Self {
            env,
            keys,
            lifecycle,
            audit,
            path: path.to_owned(),
            map_size_mb,
            tx: Some(tx),
            writer: Some(writer),
            _lock: lock,
            leases: std::sync::Mutex::default(),
            creating: std::sync::Arc::default(),
        })
    }

    /// Offline compaction (the KMS must be stopped: the store's lock says whether it is):
    /// see [`service_kit::lmdb::compact`]. After it, a destroyed key's wrapped DEK is gone
    /// from the files. Returns the file size before and after.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the store is in use or cannot be copied.
    pub fn compact(path: &Path) -> Result<(u64, u64), StoreError> {
        service_kit::lmdb::compact(path, LOCK_FILE, 8).map_err(|detail| StoreError::Open {
            target: path.display().to_string(),
            detail,
        })
    }

    fn get_sync(&self, key_id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let Some(bytes) = self.keys.get(&rtxn, key_id.as_str()).map_err(io_err)? else {
            return Ok(None);
        };
        decode_record(key_id.as_str(), bytes).map(Some)
    }

    fn list_sync(&self, after: Option<&KeyId>, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let start = match after {
            Some(k) => Bound::Excluded(k.as_str()),
            None => Bound::Unbounded,
        };
        let range = (start, Bound::<&str>::Unbounded);
        let mut out = Vec::new();
        for item in self.keys.range(&rtxn, &range).map_err(io_err)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io_err)?;
            out.push(decode_record(k, v)?);
        }
        Ok(out)
    }

    /// Every `lifecycle` record whose key starts with `prefix`, decoded, in key order.
    fn lifecycle_prefix<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let mut out = Vec::new();
        for item in self.lifecycle.prefix_iter(&rtxn, prefix).map_err(io_err)? {
            let (k, v) = item.map_err(io_err)?;
            out.push(serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
                key: k.to_owned(),
                detail: format!(
                    "undecodable record at line {} column {}",
                    e.line(),
                    e.column()
                ),
            })?);
        }
        Ok(out)
    }

    async fn put_lifecycle<T: serde::Serialize>(
        &self,
        key: String,
        value: &T,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(value)
            .map_err(|e| StoreError::Io(format!("cannot encode {key}: {e}")))?;
        self.submit(Op::PutLifecycle { key, value })
            .await
            .map(|_| ())
    }

    async fn submit(&self, op: Op) -> Result<OpOutput, StoreError> {
        self.enqueue(op)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues `op` for the writer (behind everything queued before it, which the writer
    /// applies first) and returns the receiver of its outcome.
    async fn enqueue(
        &self,
        op: Op,
    ) -> Result<oneshot::Receiver<Result<OpOutput, StoreError>>, StoreError> {
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        // New keys stop short of the end of the map: its last part is kept for destroys and
        // their audit entries, so a full store still shreds. (Checked here, on the caller's
        // thread with no transaction open; a batch in flight can pass it together, which the
        // reserve absorbs.)
        let mut creating = None;
        if let Op::AppendAudit { records, .. } = &op {
            if !records.is_empty() {
                // Counted before the check: of creates checked at once, each sees the others.
                let slot = Creating::take(&self.creating, records.len());
                let room = Room {
                    env: self.env.clone(),
                    keys: self.keys,
                };
                let reserve = room.reserve(slot.queued())?;
                if !room.for_new_keys(reserve, slot.queued()) {
                    return Err(StoreError::Full {
                        limit: format!(
                            "store.map_size_mb = {} ({} KiB of it are kept for destroying every key)",
                            self.map_size_mb,
                            reserve >> 10
                        ),
                    });
                }
                creating = Some(slot);
            }
        }
        let (reply, rx) = oneshot::channel();
        let pending = Box::new(Pending {
            op,
            _creating: creating,
            keys: self.keys,
            lifecycle: self.lifecycle,
            audit: self.audit,
            map_size_mb: self.map_size_mb,
            result: None,
            reply,
        });
        tx.send(pending).await.map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }
}

impl Drop for LmdbStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit.
        self.tx.take();
        if let Some(w) = self.writer.take() {
            if w.join().is_err() {
                tracing::error!("key store writer thread panicked");
            }
        }
    }
}

#[cfg(test)]
impl LmdbStore {
    /// Test hook: edits the audit database and the head behind the store's back, as someone
    /// with write access to the files would.
    pub(crate) fn tamper_audit(
        &self,
        f: impl FnOnce(&mut heed::RwTxn<'_>, Database<Bytes, Bytes>, Database<Str, Bytes>),
    ) {
        let mut w = self.env.write_txn().unwrap();
        f(&mut w, self.audit, self.lifecycle);
        w.commit().unwrap();
    }
}

/// Restricts the store directory to its owner.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

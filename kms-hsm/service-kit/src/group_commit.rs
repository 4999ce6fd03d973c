//! The single LMDB writer of both stores: one thread, group commit, map growth.
//!
//! Callers queue [`Write`]s (bounded queue: a full queue makes callers wait, it never grows).
//! The writer thread takes the first pending write, drains whatever else is queued (up to
//! [`Options::max_batch`]) into **one** write transaction, commits it once and answers every
//! caller ([`Write::finish`]) only after the commit returned: LMDB's commit fsyncs (no
//! `NO_SYNC`-like flags are ever set), so an acknowledged write is durable, and concurrent
//! writers share one fsync instead of paying one each.
//!
//! * A write validates before it writes: a logical failure (not found, exists, conflict) is the
//!   write's own answer and leaves the shared transaction untouched, so the other writes of the
//!   group are unaffected. An LMDB failure (`Err` from [`Write::apply`]) aborts the whole group:
//!   nothing of it is written and every caller gets the error.
//! * **Full map** (`MDB_MAP_FULL`): the transaction is aborted (nothing written), the map
//!   doubles up to [`Options::max_map_size`] while no transaction is open in the process (read
//!   transactions hold the shared `gate`; the resize takes it exclusively) and the group is
//!   applied again. At the limit, each write of the group is retried alone, so one large write
//!   does not fail small ones that still fit; those that do not fit get
//!   [`CommitError::MapFull`].
//! * **Full file system** (`ENOSPC`, `EDQUOT`, `EFBIG`, or the `EIO` LMDB reports for a write
//!   cut short, when the disk or the file-size limit leaves under 1 MiB): [`CommitError::NoSpace`], nothing
//!   written; the next group tries again, so writes work once space is freed. An `fsync`
//!   failure is an error like any other: no write of the group is acknowledged.
//!
//! `apply` may therefore run more than once for the same write: it must depend only on the
//! write itself and the transaction.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use heed::{Env, RwTxn, TlsUsage};
use tokio::sync::mpsc;

/// A failed group commit. Nothing of the group was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The map is full at its largest allowed size.
    #[error("the LMDB map is full at its largest allowed size")]
    MapFull,
    /// The file system refused to grow the store: no space left (`ENOSPC`), a quota
    /// (`EDQUOT`) or a file-size limit (`EFBIG`). Freeing space makes writes work again.
    #[error("the file system is full: {0}")]
    NoSpace(String),
    /// Any other LMDB failure (I/O, a full file system, ...).
    #[error("LMDB: {0}")]
    Lmdb(String),
}

/// One queued write.
pub trait Write: Send {
    /// Applies the write inside the group's transaction. Logical outcomes are kept by the
    /// write for [`Write::finish`]; `Err` is an LMDB failure and aborts the group.
    ///
    /// # Errors
    /// [`heed::Error`] from LMDB.
    fn apply(&mut self, txn: &mut RwTxn<'_>) -> heed::Result<()>;

    /// Answers the caller once the group's outcome is known: `Ok` when the commit succeeded
    /// (the write's own result stands), the commit's error otherwise.
    fn finish(self: Box<Self>, commit: Result<(), CommitError>);
}

/// Whether `e` says the file system has no room (or the process may not grow the file).
pub fn is_no_space(e: &heed::Error) -> bool {
    use rustix::io::Errno;
    let code = match e {
        heed::Error::Io(io) => io.raw_os_error(),
        heed::Error::Mdb(heed::MdbError::Other(c)) => Some(*c),
        _ => None,
    };
    matches!(code, Some(c) if [Errno::NOSPC, Errno::DQUOT, Errno::FBIG]
        .iter()
        .any(|e| e.raw_os_error() == c))
}

/// Whether `e` is `EIO`, which LMDB also reports for a short write: a page write that the
/// file system cut off when it ran out of room.
fn is_eio(e: &heed::Error) -> bool {
    let code = match e {
        heed::Error::Io(io) => io.raw_os_error(),
        heed::Error::Mdb(heed::MdbError::Other(c)) => Some(*c),
        _ => None,
    };
    code == Some(rustix::io::Errno::IO.raw_os_error())
}

/// Whether the store in `dir` cannot grow now: less than 1 MiB free on its file system, or its
/// data file within 1 MiB of the process's file-size limit. Tells a short write from a
/// failing disk (an `EIO` with room to spare stays an I/O error).
fn space_exhausted(dir: &std::path::Path) -> bool {
    const MARGIN: u64 = 1 << 20;
    let free = crate::disk::free_bytes(dir).unwrap_or(u64::MAX);
    let limited = match rustix::process::getrlimit(rustix::process::Resource::Fsize).current {
        Some(limit) => std::fs::metadata(dir.join("data.mdb"))
            .map(|m| m.len().saturating_add(MARGIN) > limit)
            .unwrap_or(false),
        None => false,
    };
    free < MARGIN || limited
}

/// Settings of the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Most writes per transaction.
    pub max_batch: usize,
    /// Largest map size in bytes; a map already this large is never grown.
    pub max_map_size: usize,
}

/// Hooks for the store's metrics and logs.
pub trait Observer: Send {
    /// A group of `writes` writes was committed in `took`.
    fn committed(&self, writes: usize, took: Duration);
    /// A group of `writes` writes failed with `error`.
    fn failed(&self, error: &CommitError, writes: usize);
    /// The map grew to `bytes`.
    fn resized(&self, bytes: usize);
}

/// The writer loop. Build it, then [`GroupCommitWriter::run`] it on a thread of its own.
pub struct GroupCommitWriter<T: TlsUsage, O> {
    env: Env<T>,
    gate: Arc<RwLock<()>>,
    rx: mpsc::Receiver<Box<dyn Write>>,
    opts: Options,
    observer: O,
}

impl<T: TlsUsage, O> std::fmt::Debug for GroupCommitWriter<T, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommitWriter")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<T: TlsUsage, O: Observer> GroupCommitWriter<T, O> {
    /// `gate` must be held shared by every read transaction of the process, so the map can
    /// be resized while no transaction is open.
    pub fn new(
        env: Env<T>,
        gate: Arc<RwLock<()>>,
        rx: mpsc::Receiver<Box<dyn Write>>,
        opts: Options,
        observer: O,
    ) -> Self {
        Self {
            env,
            gate,
            rx,
            opts: Options {
                max_batch: opts.max_batch.max(1),
                max_map_size: opts.max_map_size,
            },
            observer,
        }
    }

    /// Runs until every sender is gone and the queue is drained.
    pub fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < self.opts.max_batch {
                match self.rx.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let n = group.len();
            match self.commit(&mut group) {
                Ok(()) => {
                    self.observer.committed(n, started.elapsed());
                    for w in group {
                        w.finish(Ok(()));
                    }
                }
                Err(CommitError::MapFull) if n > 1 => {
                    for mut w in group {
                        let started = Instant::now();
                        let r = self.commit(std::slice::from_mut(&mut w));
                        match &r {
                            Ok(()) => self.observer.committed(1, started.elapsed()),
                            Err(e) => self.observer.failed(e, 1),
                        }
                        w.finish(r);
                    }
                }
                Err(e) => {
                    self.observer.failed(&e, n);
                    for w in group {
                        w.finish(Err(e.clone()));
                    }
                }
            }
        }
        tracing::debug!("LMDB writer stopped");
    }

    /// Applies and commits `group` in one transaction, growing the map on `MDB_MAP_FULL`.
    fn commit(&self, group: &mut [Box<dyn Write>]) -> Result<(), CommitError> {
        loop {
            match self.try_commit(group) {
                Ok(()) => return Ok(()),
                Err(heed::Error::Mdb(heed::MdbError::MapFull)) => {
                    if !self.grow()? {
                        return Err(CommitError::MapFull);
                    }
                }
                Err(e) if is_no_space(&e) || (is_eio(&e) && space_exhausted(self.env.path())) => {
                    return Err(CommitError::NoSpace(e.to_string()))
                }
                Err(e) => return Err(CommitError::Lmdb(e.to_string())),
            }
        }
    }

    fn try_commit(&self, group: &mut [Box<dyn Write>]) -> heed::Result<()> {
        let mut txn = self.env.write_txn()?;
        for w in group.iter_mut() {
            w.apply(&mut txn)?;
        }
        // On error, `txn` is dropped here, which aborts it: nothing of the group is written.
        txn.commit()
    }

    /// Doubles the map (up to the limit). `Ok(false)` when already at the limit.
    fn grow(&self) -> Result<bool, CommitError> {
        const MIB: usize = 1 << 20;
        let current = self.env.info().map_size;
        if current >= self.opts.max_map_size {
            return Ok(false);
        }
        let doubled = current.saturating_mul(2).div_ceil(MIB).saturating_mul(MIB);
        let new_size = doubled.min(self.opts.max_map_size);
        {
            let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
            #[allow(unsafe_code)]
            // SAFETY: `mdb_env_set_mapsize` needs no transaction open in this process. This
            // thread is the only writer and has no transaction open (`try_commit` dropped or
            // committed it); every read transaction is opened and closed while holding `gate`
            // shared (the contract of `GroupCommitWriter::new`), and we hold it exclusively.
            // The size is a multiple of 1 MiB, hence of the page size.
            unsafe { self.env.resize(new_size) }.map_err(|e| CommitError::Lmdb(e.to_string()))?;
        }
        tracing::info!(from = current, to = new_size, "grew the LMDB map");
        self.observer.resized(new_size);
        Ok(true)
    }
}

/// The observer both stores use: counts in [`crate::metrics::CommitMetrics`] and logs each
/// failed group, naming the store and the setting that bounds its map.
#[derive(Debug, Clone)]
pub struct MetricsObserver {
    pub metrics: crate::metrics::CommitMetrics,
    /// What the log calls the store (`"store"`, `"key store"`).
    pub store: &'static str,
    /// The setting that raises the map's limit (`store.max_map_size_mb`).
    pub map_setting: &'static str,
}

impl Observer for MetricsObserver {
    fn committed(&self, writes: usize, took: Duration) {
        self.metrics.committed(writes, took);
    }

    fn failed(&self, error: &CommitError, writes: usize) {
        self.metrics.commit_errors.inc();
        let store = self.store;
        match error {
            CommitError::MapFull => tracing::error!(
                writes,
                "the {store} is full: raise {}; the writes were not stored",
                self.map_setting
            ),
            CommitError::NoSpace(_) => tracing::error!(
                error = %error,
                writes,
                alert = "disk_full",
                "the {store}'s file system is full: writes answer 507 until space is freed"
            ),
            CommitError::Lmdb(_) => tracing::error!(
                error = %error,
                writes,
                "the {store}'s commit failed; the writes were not stored"
            ),
        }
    }

    fn resized(&self, bytes: usize) {
        self.metrics.resizes.inc();
        self.metrics
            .map_size_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

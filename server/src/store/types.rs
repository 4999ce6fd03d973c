//! What the store's callers see: its errors, its open options, page order and filters, and
//! the pages and messages it returns.

use super::*;

/// A failed store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// LMDB's map at `store.max_map_size_mb`, or PostgreSQL's `disk_full`.
    #[error("the store is full")]
    Full,
    #[error("the store is closed")]
    Closed,
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// A frontend caller tried to change a message written by someone else.
    #[error("the message was written by another user")]
    NotAuthor,
    /// The content was sealed under a key the thread no longer names for that message (a
    /// rotation moved on meanwhile); nothing was written: seal again.
    #[error("sealed under a key the thread's rotation no longer names for this message")]
    StaleKey,
    /// The author has `limits.max_threads_per_user` threads already; nothing was written.
    #[error("the user has as many threads as allowed")]
    ThreadLimit,
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("LMDB: {0}")]
    Lmdb(String),
    /// The database cannot be reached or failed (PostgreSQL): nothing was written; retry.
    #[error("{0}")]
    Unavailable(String),
}

impl From<heed::Error> for StoreError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::Full,
            other => StoreError::Lmdb(other.to_string()),
        }
    }
}

/// Why the store could not be opened: names the directory or the database (never a
/// password).
#[derive(Debug, thiserror::Error)]
#[error("{place}: {message}")]
pub struct OpenError {
    /// `store.path <dir>` or `store.url <database>`.
    pub place: String,
    pub message: String,
}

impl OpenError {
    pub fn at_path(path: &std::path::Path, message: String) -> Self {
        Self {
            place: format!("store.path {}", path.display()),
            message,
        }
    }

    pub fn at_url(target: &str, message: String) -> Self {
        Self {
            place: format!("store.url {target}"),
            message,
        }
    }
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    /// Initial map size in bytes (a multiple of 1 MiB).
    pub map_size: usize,
    /// Largest map size in bytes (a multiple of 1 MiB).
    pub max_map_size: usize,
    /// Most writes per group commit.
    pub max_batch_ops: usize,
}

impl StoreOptions {
    /// Options from sizes in MiB.
    pub fn new(path: impl Into<PathBuf>, map_size_mb: u64, max_map_size_mb: u64) -> Self {
        let mib = |m: u64| usize::try_from(m.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        Self {
            path: path.into(),
            map_size: mib(map_size_mb),
            max_map_size: mib(max_map_size_mb),
            max_batch_ops: 1024,
        }
    }
}

/// Newest or oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// Which threads to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadFilter {
    All,
    Author(UserId),
}

/// One page of a listing: `more` tells whether items follow the last one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

/// A thread as listed for a check: its id (from its key) and its record, or why the record
/// cannot be used.
pub type ThreadEntry = (ThreadId, Result<ThreadRecord, StoreError>);

/// A message as read: its id (from its key) and its record, or why the record is unreadable.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: MessageId,
    pub record: Result<MessageRecord, String>,
}

/// Which part of an ordered listing a page shows, in the listing's own order (oldest to
/// newest: creation order for threads, time order for messages). ProgressDB's paging: the
/// HTTP layer maps its `before`/`after`/`anchor` onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window<C> {
    /// The newest `limit` items.
    Latest,
    /// The `limit` items just older than the cursor (the cursor itself excluded).
    Older(C),
    /// The `limit` items just newer than the cursor (excluded).
    Newer(C),
    /// Up to `limit` items older than the cursor, the cursor's item if it exists, and up to
    /// `limit` newer.
    Around(C),
}

/// A page of a [`Window`]: items oldest first, whether any item is older than the first or
/// newer than the last (false on an empty page), and how many items the whole listing holds.
#[derive(Debug, Clone)]
pub struct Windowed<T> {
    pub items: Vec<T>,
    pub older: bool,
    pub newer: bool,
    pub total: u64,
}

/// Whether a listing of messages shows deleted messages' tombstones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tombstones {
    Hide,
    Show,
}

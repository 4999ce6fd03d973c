//! What the store's logic sees of a database: an ordered map of byte keys to byte values,
//! read and written inside one transaction. Every write op (`writer`), scan
//! (`scan`) and page (`pages`) is written once against these traits; a
//! backend implements them (`lmdb`: LMDB through heed; `postgres`: a table of a
//! PostgreSQL database).
//!
//! Keys compare as byte strings (memcmp order, shorter first on a common prefix), which is
//! what the key layout of `keys` relies on.

pub(crate) mod lmdb;
pub(crate) mod postgres;

use std::borrow::Cow;
use std::ops::Bound;

/// A key or value as read: borrowed from the transaction where the backend maps its data,
/// owned where it copies it.
pub type Bytes<'a> = Cow<'a, [u8]>;

/// The pairs of a range, in key order or reversed.
pub type KvIter<'a> = Box<dyn Iterator<Item = KvResult<(Bytes<'a>, Bytes<'a>)>> + 'a>;

pub type KvResult<T> = Result<T, KvError>;

/// A failure of the database itself (not of a record's content): the transaction it
/// happened in is abandoned and nothing of it is written.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("{}", service_kit::postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to the database within `store.timeout_secs`.
    #[error("{0}")]
    Pool(String),
}

impl From<KvError> for super::StoreError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Lmdb(e) => e.into(),
            KvError::Postgres(e) if service_kit::postgres::is_disk_full(&e) => {
                super::StoreError::Full
            }
            KvError::Postgres(e) => {
                super::StoreError::Unavailable(service_kit::postgres::describe(&e))
            }
            KvError::Pool(m) => super::StoreError::Unavailable(m),
        }
    }
}

/// Reads inside one transaction: every read sees the same snapshot.
pub trait KvRead {
    /// The value under `key`.
    ///
    /// # Errors
    /// [`KvError`] from the database.
    fn get(&self, key: &[u8]) -> KvResult<Option<Bytes<'_>>>;

    /// The pairs with keys within `(lo, hi)`, in ascending key order, read as the iterator is
    /// advanced (stopping early reads no more).
    ///
    /// # Errors
    /// [`KvError`] from the database, here or from the iterator.
    fn range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>>;

    /// [`KvRead::range`] in descending key order.
    ///
    /// # Errors
    /// [`KvError`] from the database, here or from the iterator.
    fn rev_range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>>;
}

/// Writes inside one transaction, seen by its later reads and by nobody else until it
/// commits.
pub trait KvWrite: KvRead {
    /// Stores `value` under `key`, replacing any value.
    ///
    /// # Errors
    /// [`KvError`] from the database (LMDB's map full among them).
    fn put(&mut self, key: &[u8], value: &[u8]) -> KvResult<()>;

    /// Removes `key`; whether it was there.
    ///
    /// # Errors
    /// [`KvError`] from the database.
    fn delete(&mut self, key: &[u8]) -> KvResult<bool>;

    /// Removes every key within `(lo, hi)`; how many there were.
    ///
    /// # Errors
    /// [`KvError`] from the database.
    fn delete_range(&mut self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<usize>;
}

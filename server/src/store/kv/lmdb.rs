//! [`KvRead`] and [`KvWrite`] over an LMDB read or write transaction (heed): values are
//! borrowed from LMDB's memory map for as long as the transaction lives.

use std::borrow::Cow;
use std::ops::Bound;

use heed::{RoTxn, RwTxn, WithoutTls};

use super::{Bytes, KvIter, KvRead, KvResult, KvWrite};
use crate::store::Db;

/// The store's database seen through a read transaction.
pub(crate) struct LmdbRead<'t, 'e> {
    pub(crate) db: Db,
    pub(crate) txn: &'t RoTxn<'e, WithoutTls>,
}

/// The store's database seen through the writer's transaction.
pub(crate) struct LmdbWrite<'t, 'p> {
    pub(crate) db: Db,
    pub(crate) txn: &'t mut RwTxn<'p>,
}

fn iter<'a>(it: impl Iterator<Item = heed::Result<(&'a [u8], &'a [u8])>> + 'a) -> KvIter<'a> {
    Box::new(it.map(|r| {
        r.map(|(k, v)| (Cow::Borrowed(k), Cow::Borrowed(v)))
            .map_err(Into::into)
    }))
}

fn get<'a>(db: &Db, txn: &'a RoTxn<'_, WithoutTls>, key: &[u8]) -> KvResult<Option<Bytes<'a>>> {
    Ok(db.get(txn, key)?.map(Cow::Borrowed))
}

fn range<'a>(
    db: &Db,
    txn: &'a RoTxn<'_, WithoutTls>,
    lo: Bound<&[u8]>,
    hi: Bound<&[u8]>,
) -> KvResult<KvIter<'a>> {
    Ok(iter(db.range(txn, &(lo, hi))?))
}

fn rev_range<'a>(
    db: &Db,
    txn: &'a RoTxn<'_, WithoutTls>,
    lo: Bound<&[u8]>,
    hi: Bound<&[u8]>,
) -> KvResult<KvIter<'a>> {
    Ok(iter(db.rev_range(txn, &(lo, hi))?))
}

impl KvRead for LmdbRead<'_, '_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Bytes<'_>>> {
        get(&self.db, self.txn, key)
    }

    fn range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>> {
        range(&self.db, self.txn, lo, hi)
    }

    fn rev_range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>> {
        rev_range(&self.db, self.txn, lo, hi)
    }
}

impl KvRead for LmdbWrite<'_, '_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Bytes<'_>>> {
        get(&self.db, self.txn, key)
    }

    fn range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>> {
        range(&self.db, self.txn, lo, hi)
    }

    fn rev_range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>> {
        rev_range(&self.db, self.txn, lo, hi)
    }
}

impl KvWrite for LmdbWrite<'_, '_> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> KvResult<()> {
        Ok(self.db.put(self.txn, key, value)?)
    }

    fn delete(&mut self, key: &[u8]) -> KvResult<bool> {
        Ok(self.db.delete(self.txn, key)?)
    }

    fn delete_range(&mut self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<usize> {
        Ok(self.db.delete_range(self.txn, &(lo, hi))?)
    }
}

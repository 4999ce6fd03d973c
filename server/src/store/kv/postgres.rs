//! [`KvRead`] and [`KvWrite`] over a PostgreSQL transaction, on the table `progressdb_kv`
//! (`k bytea PRIMARY KEY, v bytea`). `bytea` compares bytewise, shorter first on a common
//! prefix: the order the key layout needs.
//!
//! Writes are held in the transaction's buffer and sent together (one statement for the puts,
//! one for the deletes) before the next range read, range delete or commit
//! ([`PgKv::flush`]); a read of one key sees the buffer first. So a group of posts to one
//! thread costs about one round trip per post (its message key's check) instead of four. The methods are called on blocking threads (a
//! read on tokio's blocking pool, the writer on its own thread) and wait on the runtime with
//! [`Handle::block_on`]; never call them on a runtime thread.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use deadpool_postgres::Transaction;
use tokio::runtime::Handle;
use tokio_postgres::types::ToSql;

use super::{Bytes, KvIter, KvRead, KvResult, KvWrite};

/// Rows a range reads in its first statement, and at most in one: each statement reads twice
/// as many as the one before, so a walk that stops after a row or two (a seek to the next
/// thread, a probe) reads a few rows, and a long scan costs one round trip per 1,024.
const FIRST_CHUNK: i64 = 4;
const MAX_CHUNK: i64 = 1024;

/// The store seen through one PostgreSQL transaction.
pub(crate) struct PgKv<'t, 'c> {
    handle: Handle,
    tx: &'t Transaction<'c>,
    /// Writes not sent yet: `Some(value)` a put, `None` a delete.
    pending: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

/// `WHERE` conditions for `(lo, hi)` on `k`, numbered from `$1`, and their parameters.
fn conditions(lo: &Bound<Vec<u8>>, hi: &Bound<Vec<u8>>) -> (String, Vec<Vec<u8>>) {
    let mut cond = Vec::new();
    let mut params = Vec::new();
    for (b, incl, excl) in [(lo, ">=", ">"), (hi, "<=", "<")] {
        let (op, v) = match b {
            Bound::Included(v) => (incl, v),
            Bound::Excluded(v) => (excl, v),
            Bound::Unbounded => continue,
        };
        params.push(v.clone());
        cond.push(format!("k {op} ${}", params.len()));
    }
    let sql = if cond.is_empty() {
        "TRUE".to_owned()
    } else {
        cond.join(" AND ")
    };
    (sql, params)
}

fn owned(b: Bound<&[u8]>) -> Bound<Vec<u8>> {
    b.map(<[u8]>::to_vec)
}

impl<'t, 'c> PgKv<'t, 'c> {
    pub(crate) fn new(handle: Handle, tx: &'t Transaction<'c>) -> Self {
        Self {
            handle,
            tx,
            pending: RefCell::new(BTreeMap::new()),
        }
    }

    /// Sends the buffered writes: the puts in one upsert, the deletes in one delete. Call it
    /// before committing.
    ///
    /// # Errors
    /// [`KvError`](super::KvError) from the database.
    pub(crate) fn flush(&self) -> KvResult<()> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        if pending.is_empty() {
            return Ok(());
        }
        let (mut keys, mut values, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (k, v) in pending {
            match v {
                Some(v) => {
                    keys.push(k);
                    values.push(v);
                }
                None => gone.push(k),
            }
        }
        self.handle.block_on(async {
            if !keys.is_empty() {
                let st = self
                    .tx
                    .prepare_cached(
                        "INSERT INTO progressdb_kv (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                         ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                    )
                    .await?;
                self.tx.execute(&st, &[&keys, &values]).await?;
            }
            if !gone.is_empty() {
                let st = self
                    .tx
                    .prepare_cached("DELETE FROM progressdb_kv WHERE k = ANY($1::bytea[])")
                    .await?;
                self.tx.execute(&st, &[&gone]).await?;
            }
            Ok(())
        })
    }

    fn query(&self, sql: &str, params: &[Vec<u8>]) -> KvResult<Vec<tokio_postgres::Row>> {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        self.handle.block_on(async {
            let st = self.tx.prepare_cached(sql).await?;
            Ok(self.tx.query(&st, &refs).await?)
        })
    }

    fn execute(&self, sql: &str, params: &[Vec<u8>]) -> KvResult<u64> {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        self.handle.block_on(async {
            let st = self.tx.prepare_cached(sql).await?;
            Ok(self.tx.execute(&st, &refs).await?)
        })
    }

    fn pairs(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>, desc: bool) -> KvResult<KvIter<'_>> {
        // A range sees the buffered writes once they are sent.
        self.flush()?;
        Ok(Box::new(Pairs {
            kv: self,
            lo: owned(lo),
            hi: owned(hi),
            desc,
            buf: VecDeque::new(),
            done: false,
            chunk: FIRST_CHUNK,
        }))
    }
}

/// A range read a chunk at a time, each chunk after the last key of the one before.
struct Pairs<'a, 't, 'c> {
    kv: &'a PgKv<'t, 'c>,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    desc: bool,
    buf: VecDeque<(Vec<u8>, Vec<u8>)>,
    done: bool,
    /// Rows the next statement reads.
    chunk: i64,
}

impl Pairs<'_, '_, '_> {
    fn fetch(&mut self) -> KvResult<()> {
        let (cond, params) = conditions(&self.lo, &self.hi);
        let order = if self.desc { "DESC" } else { "ASC" };
        let chunk = self.chunk;
        self.chunk = (chunk * 2).min(MAX_CHUNK);
        let rows = self.kv.query(
            &format!(
                "SELECT k, v FROM progressdb_kv WHERE {cond} ORDER BY k {order} LIMIT {chunk}"
            ),
            &params,
        )?;
        self.done = rows.len() < usize::try_from(chunk).unwrap_or(usize::MAX);
        for r in rows {
            self.buf.push_back((r.try_get(0)?, r.try_get(1)?));
        }
        if let Some((last, _)) = self.buf.back() {
            if self.desc {
                self.hi = Bound::Excluded(last.clone());
            } else {
                self.lo = Bound::Excluded(last.clone());
            }
        }
        Ok(())
    }
}

impl<'a> Iterator for Pairs<'a, '_, '_> {
    type Item = KvResult<(Bytes<'a>, Bytes<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() && !self.done {
            if let Err(e) = self.fetch() {
                self.done = true;
                return Some(Err(e));
            }
        }
        self.buf
            .pop_front()
            .map(|(k, v)| Ok((Cow::Owned(k), Cow::Owned(v))))
    }
}

impl KvRead for PgKv<'_, '_> {
    fn get(&self, key: &[u8]) -> KvResult<Option<Bytes<'_>>> {
        if let Some(v) = self.pending.borrow().get(key) {
            return Ok(v.clone().map(Cow::Owned));
        }
        let rows = self.query("SELECT v FROM progressdb_kv WHERE k = $1", &[key.to_vec()])?;
        match rows.first() {
            None => Ok(None),
            Some(r) => Ok(Some(Cow::Owned(r.try_get(0)?))),
        }
    }

    fn range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>> {
        self.pairs(lo, hi, false)
    }

    fn rev_range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<KvIter<'_>> {
        self.pairs(lo, hi, true)
    }
}

impl KvWrite for PgKv<'_, '_> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> KvResult<()> {
        self.pending
            .borrow_mut()
            .insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> KvResult<bool> {
        let was = self.get(key)?.is_some();
        self.pending.borrow_mut().insert(key.to_vec(), None);
        Ok(was)
    }

    fn delete_range(&mut self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> KvResult<usize> {
        self.flush()?;
        let (cond, params) = conditions(&owned(lo), &owned(hi));
        let n = self.execute(&format!("DELETE FROM progressdb_kv WHERE {cond}"), &params)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}

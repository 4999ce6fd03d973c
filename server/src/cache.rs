//! A small in-memory cache of thread records, so a request reads its thread's metadata (and
//! key id) once, and hot threads are not read from LMDB on every message.
//!
//! Staleness is prevented with a generation counter: every invalidation bumps it, and a
//! record read from LMDB is inserted only if no invalidation happened since the read began.
//! (A read that started before a write committed may return the old record; if that write's
//! invalidation came after the read began, the generation differs and the old record is not
//! cached.) Writers insert the committed record themselves with [`ThreadCache::put_fresh`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kms_api::ThreadId;

use crate::store::ThreadRecord;

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<ThreadId, Arc<ThreadRecord>>,
    generation: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct ThreadCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

/// The generation observed before a read from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

impl ThreadCache {
    /// A cache of at most `capacity` records (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &ThreadId) -> Option<Arc<ThreadRecord>> {
        self.lock().map.get(id).cloned()
    }

    /// Call before reading a record from the store; pass the result to [`Self::insert_read`].
    pub fn generation(&self) -> Generation {
        Generation(self.lock().generation)
    }

    /// Caches a record read from the store, unless an invalidation happened since `seen`.
    pub fn insert_read(&self, seen: Generation, rec: Arc<ThreadRecord>) {
        let mut g = self.lock();
        if g.generation == seen.0 {
            Self::insert(&mut g, self.capacity, rec);
        }
    }

    /// Caches a record just committed by this process (and invalidates concurrent readers).
    pub fn put_fresh(&self, rec: Arc<ThreadRecord>) {
        let mut g = self.lock();
        g.generation = g.generation.wrapping_add(1);
        Self::insert(&mut g, self.capacity, rec);
    }

    /// Forgets `id` (after it changed or was deleted).
    pub fn invalidate(&self, id: &ThreadId) {
        let mut g = self.lock();
        g.generation = g.generation.wrapping_add(1);
        g.map.remove(id);
    }

    fn insert(g: &mut Inner, capacity: usize, rec: Arc<ThreadRecord>) {
        if capacity == 0 {
            return;
        }
        if g.map.len() >= capacity && !g.map.contains_key(&rec.id) {
            // Evict an arbitrary entry: cheap, and good enough for a metadata cache.
            if let Some(k) = g.map.keys().next().cloned() {
                g.map.remove(&k);
            }
        }
        g.map.insert(rec.id.clone(), rec);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::{Timestamp, UserId};

    fn rec(id: &str, title: &str) -> Arc<ThreadRecord> {
        Arc::new(ThreadRecord {
            id: ThreadId::parse(id).unwrap(),
            title: title.into(),
            author: UserId::parse("u").unwrap(),
            created_at: Timestamp::from_nanos(1),
            updated_at: Timestamp::from_nanos(1),
            metadata: None,
            kms: None,
            plain_migration: None,
            rotation: None,
            sealed: 0,
            key_since: None,
        })
    }

    #[test]
    fn stale_read_is_not_cached() {
        let c = ThreadCache::new(10);
        let seen = c.generation();
        // A write commits and invalidates while the read is in flight...
        c.invalidate(&ThreadId::parse("a").unwrap());
        // ...so the (possibly old) record the read returns is not cached.
        c.insert_read(seen, rec("a", "old"));
        assert!(c.get(&ThreadId::parse("a").unwrap()).is_none());
        let seen = c.generation();
        c.insert_read(seen, rec("a", "new"));
        assert_eq!(c.get(&ThreadId::parse("a").unwrap()).unwrap().title, "new");
    }

    #[test]
    fn bounded() {
        let c = ThreadCache::new(2);
        for i in 0..5 {
            c.put_fresh(rec(&format!("t{i}"), "x"));
        }
        assert_eq!(c.lock().map.len(), 2);
        let off = ThreadCache::new(0);
        off.put_fresh(rec("a", "x"));
        assert!(off.get(&ThreadId::parse("a").unwrap()).is_none());
    }
}

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
    /// Each record with the bytes it is charged.
    map: HashMap<ThreadId, (Arc<ThreadRecord>, usize)>,
    generation: u64,
    /// Sum of the charges in `map`.
    bytes: usize,
}

/// See the module documentation. Bounded by entries and by (estimated) bytes.
#[derive(Debug)]
pub struct ThreadCache {
    inner: Mutex<Inner>,
    capacity: usize,
    max_bytes: usize,
}

/// What a record is charged: its strings, its metadata (kept as JSON text) and a fixed
/// overhead.
fn charge(rec: &ThreadRecord) -> usize {
    512 + rec.title.len()
        + rec.slug.as_ref().map_or(0, String::len)
        + rec.metadata.as_ref().map_or(0, |m| m.len())
}

/// The generation observed before a read from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

impl ThreadCache {
    /// A cache of at most `capacity` records and `max_bytes` of them (0 disables caching).
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &ThreadId) -> Option<Arc<ThreadRecord>> {
        self.lock().map.get(id).map(|(r, _)| r.clone())
    }

    /// Bytes the cached records are charged now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Call before reading a record from the store; pass the result to [`Self::insert_read`].
    pub fn generation(&self) -> Generation {
        Generation(self.lock().generation)
    }

    /// Caches a record read from the store, unless an invalidation happened since `seen`.
    pub fn insert_read(&self, seen: Generation, rec: Arc<ThreadRecord>) {
        let mut g = self.lock();
        if g.generation == seen.0 {
            self.insert(&mut g, rec);
        }
    }

    /// Caches a record just committed by this process (and invalidates concurrent readers).
    pub fn put_fresh(&self, rec: Arc<ThreadRecord>) {
        let mut g = self.lock();
        g.generation = g.generation.wrapping_add(1);
        self.insert(&mut g, rec);
    }

    /// Forgets `id` (after it changed or was deleted).
    pub fn invalidate(&self, id: &ThreadId) {
        let mut g = self.lock();
        g.generation = g.generation.wrapping_add(1);
        if let Some((_, c)) = g.map.remove(id) {
            g.bytes -= c;
        }
    }

    fn insert(&self, g: &mut Inner, rec: Arc<ThreadRecord>) {
        let c = charge(&rec);
        if self.capacity == 0 || c > self.max_bytes {
            return;
        }
        if let Some((_, old)) = g.map.remove(&rec.id) {
            g.bytes -= old;
        }
        // Evict arbitrary entries until it fits: cheap, and good enough for a metadata cache.
        while g.map.len() >= self.capacity || g.bytes + c > self.max_bytes {
            let Some(k) = g.map.keys().next().cloned() else {
                break;
            };
            if let Some((_, old)) = g.map.remove(&k) {
                g.bytes -= old;
            }
        }
        g.bytes += c;
        g.map.insert(rec.id.clone(), (rec, c));
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
            slug: None,
            metadata: None,
            kms: None,
            plain_migration: None,
            rotation: None,
            sealed: 0,
            key_since: None,
            live_messages: None,
            sealed_meta: None,
        })
    }

    #[test]
    fn stale_read_is_not_cached() {
        let c = ThreadCache::new(10, 1 << 20);
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
        let c = ThreadCache::new(2, 1 << 20);
        for i in 0..5 {
            c.put_fresh(rec(&format!("t{i}"), "x"));
        }
        assert_eq!(c.lock().map.len(), 2);
        let off = ThreadCache::new(0, 1 << 20);
        off.put_fresh(rec("a", "x"));
        assert!(off.get(&ThreadId::parse("a").unwrap()).is_none());
    }

    #[test]
    fn bounded_by_bytes_too() {
        let big = |id: &str| {
            let mut r = (*rec(id, "x")).clone();
            r.metadata = Some(
                crate::store::RawJson::from_value(&serde_json::json!({ "k": "v".repeat(64_000) }))
                    .unwrap(),
            );
            Arc::new(r)
        };
        // Each is charged about 63 KiB (its metadata's JSON text): 4 fit in 300 KiB.
        let c = ThreadCache::new(10_000, 300 << 10);
        for i in 0..50 {
            c.put_fresh(big(&format!("t{i}")));
            assert!(c.bytes() <= 300 << 10);
        }
        assert_eq!(c.lock().map.len(), 4);
        // Invalidation gives the bytes back; a record larger than the whole cache is not held.
        for i in 0..50 {
            c.invalidate(&ThreadId::parse(&format!("t{i}")).unwrap());
        }
        assert_eq!(c.bytes(), 0);
        let tiny = ThreadCache::new(10, 1024);
        tiny.put_fresh(big("a"));
        assert!(tiny.get(&ThreadId::parse("a").unwrap()).is_none());
    }
}

//! Bounded cache of unwrapped DEKs, so hot keys are not unwrapped by the HSM on every call.
//!
//! * Bounded by entry count and by age (TTL from insertion); either set to 0 disables it.
//! * Entries hold a [`Dek`], whose bytes are zeroized when the last reference is dropped:
//!   on eviction, expiry, [`DekCache::evict`] or when the cache itself is dropped.
//! * When full, the oldest entry is evicted (FIFO by insertion; a hit does not refresh it, so
//!   a key never outlives its TTL in memory).
//! * Destroying a key must not be undone by a concurrent request that read the key record
//!   just before the destruction and inserts its DEK just after. Callers take an
//!   [`Epoch`] before reading the key store and insert with it; [`DekCache::evict`] advances
//!   the epoch, so such a late insert is dropped.
//! * With several replicas, a key destroyed by another replica must stop being served from
//!   this cache within a bound. The replica's coherence task ([`crate::coherence`]) evicts
//!   what the store's change feed names and, after each successful poll, extends the cache's
//!   *validity* ([`DekCache::valid_until`]). Past it (the feed could not be read in time)
//!   the cache answers nothing and takes nothing: every call reads the store and the HSM.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kms_api::{KekVersion, KeyId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::backend::{Dek, ResidentKey};

/// A cached DEK and the KEK version it is wrapped under.
#[derive(Debug)]
pub struct CachedDek {
    pub material: DekMaterial,
    pub kek_version: KekVersion,
}

/// What the cache holds of a DEK, by residency ([`crate::backend::DekResidency`]).
#[derive(Debug)]
pub enum DekMaterial {
    /// `memory`: the unwrapped DEK.
    Memory(Dek),
    /// `hsm`: no DEK bytes, only what the HSM needs to find (or re-create) its session
    /// object; the entry means "this key's record was read and is active".
    Resident(ResidentKey),
}

/// Counters exported by `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub entries: Gauge,
}

/// Token from [`DekCache::epoch`]; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

struct Entry {
    value: Arc<CachedDek>,
    inserted: Instant,
    seq: u64,
}

struct Inner {
    map: HashMap<KeyId, Entry>,
    /// `None`: always valid (one process owns the store). Otherwise the instant after which
    /// the cache is not trusted (see the module docs).
    valid_until: Option<Instant>,
    /// Insertion order; `(key, seq)` pairs whose seq no longer matches the map are stale.
    order: VecDeque<(KeyId, u64)>,
    next_seq: u64,
    epoch: u64,
}

/// The DEK cache. Cheap operations under one mutex; never held across an `.await`.
pub struct DekCache {
    ttl: Duration,
    max_entries: usize,
    inner: Mutex<Inner>,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for DekCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekCache")
            .field("ttl", &self.ttl)
            .field("max_entries", &self.max_entries)
            .field("len", &self.len())
            .finish()
    }
}

impl DekCache {
    /// A cache of at most `max_entries` DEKs, each kept at most `ttl`. Zero for either
    /// disables caching (every lookup misses, inserts are dropped).
    pub fn new(ttl: Duration, max_entries: usize, metrics: CacheMetrics) -> Self {
        Self {
            ttl,
            max_entries,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                valid_until: None,
                order: VecDeque::new(),
                next_seq: 0,
                epoch: 0,
            }),
            metrics,
        }
    }

    /// The most DEKs it holds.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// How long it keeps a DEK.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn enabled(&self) -> bool {
        self.max_entries > 0 && !self.ttl.is_zero()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent in a way that
        // matters (worst case a stale order entry), so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current epoch, to pass to [`DekCache::insert`] after reading the key store.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.lock().epoch)
    }

    /// The cached DEK of `key_id`, counting a hit or a miss.
    pub fn get(&self, key_id: &KeyId) -> Option<Arc<CachedDek>> {
        if !self.enabled() {
            self.metrics.misses.inc();
            return None;
        }
        let mut inner = self.lock();
        if inner.valid_until.is_some_and(|t| Instant::now() >= t) {
            // Lapsed: what it holds may be stale, and DEKs that cannot be served do not stay
            // in memory.
            if !inner.map.is_empty() {
                inner.epoch += 1;
                inner.map.clear();
                inner.order.clear();
                self.metrics.entries.set(0);
            }
            drop(inner);
            self.metrics.misses.inc();
            return None;
        }
        let found = match inner.map.get(key_id) {
            Some(e) if e.inserted.elapsed() < self.ttl => Some(e.value.clone()),
            Some(_) => {
                inner.map.remove(key_id);
                None
            }
            None => None,
        };
        self.metrics.entries.set(gauge_value(inner.map.len()));
        drop(inner);
        match &found {
            Some(_) => self.metrics.hits.inc(),
            None => self.metrics.misses.inc(),
        };
        tracing::trace!(key_id = %key_id, hit = found.is_some(), "DEK cache lookup");
        found
    }

    /// Caches `value` for `key_id`, unless a key was evicted since `epoch` was taken.
    pub fn insert(&self, epoch: Epoch, key_id: KeyId, value: Arc<CachedDek>) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.lock();
        if inner.epoch != epoch.0 || inner.valid_until.is_some_and(|t| Instant::now() >= t) {
            return;
        }
        let now = Instant::now();
        // Make room: drop expired and stale entries from the front, then the oldest.
        while inner.map.len() >= self.max_entries && !inner.map.contains_key(&key_id) {
            let Some((k, seq)) = inner.order.pop_front() else {
                break;
            };
            if inner.map.get(&k).is_some_and(|e| e.seq == seq) {
                inner.map.remove(&k);
            }
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.order.push_back((key_id.clone(), seq));
        inner.map.insert(
            key_id,
            Entry {
                value,
                inserted: now,
                seq,
            },
        );
        // Keep the order queue proportional to the map.
        if inner.order.len() > 2 * self.max_entries + 16 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
        self.metrics.entries.set(gauge_value(inner.map.len()));
    }

    /// Removes `key_id` (its DEK is zeroized once no request uses it) and advances the epoch.
    pub fn evict(&self, key_id: &KeyId) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.map.remove(key_id);
        self.metrics.entries.set(gauge_value(inner.map.len()));
    }

    /// Trusts the cache until `until` (a replica's coherence task, after a poll of the
    /// change feed). Once `until` has passed nothing is served or cached, and the entries
    /// held then are dropped when it is extended again.
    pub fn valid_until(&self, until: Instant) {
        let mut inner = self.lock();
        if inner.valid_until.is_some_and(|t| Instant::now() >= t) {
            // It lapsed: what it holds may be stale; start empty.
            inner.epoch += 1;
            inner.map.clear();
            inner.order.clear();
        }
        inner.valid_until = Some(until);
        self.metrics.entries.set(gauge_value(inner.map.len()));
    }

    /// Drops every entry and advances the epoch (a KEK version changed elsewhere, or the
    /// change feed cannot be trusted).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.map.clear();
        inner.order.clear();
        self.metrics.entries.set(0);
    }

    /// Removes expired entries (called periodically so idle keys do not linger in memory).
    pub fn purge_expired(&self) {
        let mut inner = self.lock();
        let ttl = self.ttl;
        inner.map.retain(|_, e| e.inserted.elapsed() < ttl);
        let Inner { map, order, .. } = &mut *inner;
        order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        self.metrics.entries.set(gauge_value(inner.map.len()));
    }

    /// Entries currently held (expired ones included until purged).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn kid(n: u8) -> KeyId {
        KeyId::from_random([n; 16])
    }

    fn val(n: u8) -> Arc<CachedDek> {
        Arc::new(CachedDek {
            material: DekMaterial::Memory(Dek::from_bytes(Zeroizing::new([n; 32]))),
            kek_version: KekVersion::FIRST,
        })
    }

    #[test]
    fn hit_miss_and_capacity() {
        let m = CacheMetrics::default();
        let c = DekCache::new(Duration::from_secs(60), 2, m.clone());
        assert!(c.get(&kid(1)).is_none());
        c.insert(c.epoch(), kid(1), val(1));
        c.insert(c.epoch(), kid(2), val(2));
        let hit = c.get(&kid(1)).unwrap();
        let DekMaterial::Memory(dek) = &hit.material else {
            panic!("a memory entry");
        };
        assert_eq!(dek.expose()[0], 1);
        c.insert(c.epoch(), kid(3), val(3));
        assert_eq!(c.len(), 2);
        assert!(c.get(&kid(1)).is_none(), "oldest evicted");
        assert!(c.get(&kid(3)).is_some());
        assert_eq!(m.hits.get(), 2);
        assert_eq!(m.misses.get(), 2);
        assert_eq!(m.entries.get(), 2);
    }

    #[test]
    fn reinserting_many_times_stays_bounded() {
        let c = DekCache::new(Duration::from_secs(60), 4, CacheMetrics::default());
        for i in 0..200u8 {
            c.insert(c.epoch(), kid(i % 6), val(i));
        }
        assert!(c.len() <= 4);
        assert!(c.lock().order.len() <= 2 * 4 + 16 + 1);
    }

    #[test]
    fn ttl_expires() {
        let c = DekCache::new(Duration::from_millis(20), 10, CacheMetrics::default());
        c.insert(c.epoch(), kid(1), val(1));
        assert!(c.get(&kid(1)).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get(&kid(1)).is_none());
        c.insert(c.epoch(), kid(2), val(2));
        std::thread::sleep(Duration::from_millis(30));
        c.purge_expired();
        assert!(c.is_empty());
    }

    #[test]
    fn zero_disables() {
        for c in [
            DekCache::new(Duration::ZERO, 10, CacheMetrics::default()),
            DekCache::new(Duration::from_secs(10), 0, CacheMetrics::default()),
        ] {
            c.insert(c.epoch(), kid(1), val(1));
            assert!(c.get(&kid(1)).is_none());
            assert!(c.is_empty());
        }
    }

    #[test]
    fn a_lapsed_validity_serves_and_takes_nothing_until_renewed() {
        let c = DekCache::new(Duration::from_secs(60), 10, CacheMetrics::default());
        c.valid_until(Instant::now() + Duration::from_millis(30));
        c.insert(c.epoch(), kid(1), val(1));
        assert!(c.get(&kid(1)).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get(&kid(1)).is_none(), "lapsed: not served");
        c.insert(c.epoch(), kid(2), val(2));
        // Renewed: the entries held before the lapse are gone, new ones are kept.
        c.valid_until(Instant::now() + Duration::from_secs(60));
        assert!(c.get(&kid(1)).is_none());
        assert!(c.get(&kid(2)).is_none(), "not taken while lapsed");
        c.insert(c.epoch(), kid(3), val(3));
        assert!(c.get(&kid(3)).is_some());
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn evict_blocks_late_insert() {
        let c = DekCache::new(Duration::from_secs(60), 10, CacheMetrics::default());
        let e = c.epoch();
        c.evict(&kid(1));
        c.insert(e, kid(1), val(1));
        assert!(c.get(&kid(1)).is_none());
        c.insert(c.epoch(), kid(1), val(1));
        assert!(c.get(&kid(1)).is_some());
        c.evict(&kid(1));
        assert!(c.get(&kid(1)).is_none());
    }
}

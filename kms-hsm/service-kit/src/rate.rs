//! Request rate limits per caller: a token bucket for each key (an API key on the server, a
//! peer on the KMS). A bucket holds up to `burst` tokens and refills at `per_sec` tokens a
//! second; each request takes one, and a request that finds none is refused with the time
//! until the next token (the `Retry-After` of its 429).
//!
//! Memory is bounded: the callers tracked are at most [`MAX_TRACKED`]; when a new caller
//! would exceed it, the buckets that have refilled completely (callers idle long enough to be
//! indistinguishable from new ones) are dropped first, and if that is not enough every bucket
//! is reset. Callers are authenticated identities (API keys, peer uids, client
//! certificates), so in practice the map holds one entry per configured identity.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The most callers tracked at once (see the module docs).
pub const MAX_TRACKED: usize = 65_536;

/// A rate limit: `per_sec` requests a second on average, bursts of up to `burst`.
/// `per_sec == 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_sec: u32,
    pub burst: u32,
}

impl RateLimit {
    /// No limit.
    pub const OFF: RateLimit = RateLimit {
        per_sec: 0,
        burst: 0,
    };

    pub fn is_on(self) -> bool {
        self.per_sec > 0
    }

    /// The bucket size: `burst`, or `per_sec` when `burst` is 0.
    fn capacity(self) -> f64 {
        f64::from(if self.burst == 0 {
            self.per_sec
        } else {
            self.burst
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by caller.
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token for `key`.
    ///
    /// # Errors
    /// The time until a token is free, when none is (at least one second, as `Retry-After`
    /// counts whole seconds).
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.limit.is_on() {
            return Ok(());
        }
        let cap = self.limit.capacity();
        let rate = f64::from(self.limit.per_sec);
        let refill = |b: &Bucket| {
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(cap)
        };
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !map.contains_key(key) && map.len() >= MAX_TRACKED {
            map.retain(|_, b| refill(b) < cap);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        let tokens = refill(b);
        b.at = now;
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            Ok(())
        } else {
            b.tokens = tokens;
            let wait = (1.0 - tokens) / rate;
            Err(Duration::from_secs_f64(wait.max(1.0).ceil()))
        }
    }

    /// Callers tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_per_caller() {
        let r = RateLimiter::new(RateLimit {
            per_sec: 10,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.check_at(&"a", t0).is_ok());
        }
        let wait = r.check_at(&"a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // Another caller has its own bucket.
        assert!(r.check_at(&"b", t0).is_ok());
        // 10 a second: one token after 100 ms, not before.
        assert!(r.check_at(&"a", t0 + Duration::from_millis(50)).is_err());
        assert!(r.check_at(&"a", t0 + Duration::from_millis(160)).is_ok());
        // A long pause refills up to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(r.check_at(&"a", later).is_ok());
        }
        assert!(r.check_at(&"a", later).is_err());
    }

    #[test]
    fn off_admits_everything_and_tracks_nothing() {
        let r = RateLimiter::new(RateLimit::OFF);
        for i in 0..1000 {
            assert!(r.check(&i).is_ok());
        }
        assert_eq!(r.tracked(), 0);
    }

    #[test]
    fn memory_stays_bounded() {
        let r = RateLimiter::new(RateLimit {
            per_sec: 1,
            burst: 1,
        });
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED + 10) {
            let _ = r.check_at(&i, t0);
        }
        assert!(r.tracked() <= MAX_TRACKED);
    }
}

//! Cache coherence across KMS replicas that share a PostgreSQL key store.
//!
//! Each replica caches unwrapped DEKs ([`crate::cache`]). A key destroyed (or a KEK version
//! retired or destroyed) through another replica must stop being served from this cache
//! within a bound, not after the cache TTL. The store records those changes in its change
//! feed in the same statement that makes them ([`KeyStore::changes_after`]); this task polls
//! the feed every `store.coherence_ms` (*P*):
//!
//! * a destroyed key is evicted (and the cache's epoch advanced, so an unwrap that read the
//!   record before the destroy cannot put it back); a KEK version change clears the cache;
//! * each poll that succeeds within *P* extends the cache's validity to its start + 2*P;
//!   past it the cache serves and takes nothing ([`crate::cache::DekCache::valid_until`]),
//!   so a feed that cannot be read (database down, poll stuck) makes every call read the
//!   store and the HSM instead of trusting what may be stale.
//!
//! * a KEK version newer than the current one (a rotation another replica started) is
//!   adopted: checked in the HSM and made current for new wraps here too, so no replica
//!   keeps wrapping new DEKs under the version being rotated away from (the rotation waits
//!   2*P for this before it rewraps).
//!
//! Bound: a change committed at *T* is acted on by the first poll that starts after *T*
//! (by *T* + *P*, done by *T* + 2*P*), or the cache has lapsed by then: **2 × P**. This holds
//! whatever order concurrent changes commit in: the feed delivers every change committed
//! after its cursor, and its cursor never passes a transaction still running
//! ([`crate::keystore::postgres`]'s `changes_after`).
//! Until the first poll succeeds at start-up, nothing is cached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{KekMissing, KeyBackend};
use crate::keystore::{Change, KeyStore};
use crate::service::KeyService;

/// Changes read per poll (more are read at once by the next one).
const PAGE: usize = 1000;

/// Polls the change feed forever (see the module docs). Spawn it; abort it at shutdown.
pub async fn run<B: KeyBackend, S: KeyStore>(svc: Arc<KeyService<B, S>>, every: Duration) {
    let cache = svc.cache();
    let mut cursor: Option<u64> = None;
    let mut failing = false;
    // A newer KEK version seen in the feed and not adopted yet.
    let mut adopt = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let polled = tokio::time::timeout(every, async {
            let mut evicted = 0usize;
            loop {
                let page = svc.store().changes_after(cursor, PAGE).await?;
                let more = page.more;
                for change in page.changes {
                    match change {
                        Change::KeyDestroyed(k) => {
                            cache.evict(&k);
                            // In hsm residency its session objects go too.
                            svc.backend().forget_resident(&k);
                            evicted += 1;
                        }
                        Change::KekVersion(v) => {
                            tracing::info!(kek_version = %v, "a KEK version changed elsewhere: DEK cache cleared");
                            cache.clear();
                            if v > svc.backend().current_kek().version {
                                adopt = adopt.max(Some(v));
                            }
                        }
                    }
                }
                cursor = Some(page.cursor);
                if !more {
                    return Ok::<_, crate::keystore::StoreError>(evicted);
                }
            }
        })
        .await;
        if let Some(v) = adopt {
            // A rotation on another replica made a newer KEK current: wrap under it here too.
            // Retried every poll until the HSM answers.
            match svc.backend().ensure_kek_version(v, KekMissing::Adopt).await {
                Ok(_) => {
                    tracing::info!(kek_version = %v, "adopted the KEK version another replica made current");
                    adopt = None;
                }
                Err(e) => {
                    tracing::warn!(kek_version = %v, error = %e, "cannot adopt the new KEK version yet")
                }
            }
        }
        match polled {
            Ok(Ok(evicted)) => {
                cache.valid_until(started + 2 * every);
                if failing {
                    tracing::info!("change feed readable again: the DEK cache is in use");
                    failing = false;
                }
                if evicted > 0 {
                    tracing::debug!(evicted, "DEKs destroyed elsewhere evicted from the cache");
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the change feed: the DEK cache is not used until it can");
                    failing = true;
                }
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(poll_ms = every.as_millis() as u64, "the change feed did not answer within a poll: the DEK cache is not used until it does");
                    failing = true;
                }
            }
        }
    }
}

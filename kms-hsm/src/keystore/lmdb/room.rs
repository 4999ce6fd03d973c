//! The room kept for destroys: new keys stop while the map would have less than a reserve
//! per key record left, so a full store can still destroy every key it holds (and log it).

use heed::types::{Bytes, Str};
use heed::{Database, Env};

use super::StoreError;

use super::*;

/// The map's room for writes that add key records (see [`Room::for_new_keys`]).
pub(super) struct Room {
    pub(super) env: Env,
    pub(super) keys: Database<Str, Bytes>,
}

/// Bytes of map one destroy may take: its audit entry (about 350 bytes of JSON) and the
/// B-tree's slack around it. Kept free for every key record, so every key can be destroyed.
pub(super) const DESTROY_ROOM: usize = 1024;
/// Bytes of map a create takes at most (its record, its audit entry, the B-trees' slack),
/// counted for creates queued and not committed yet.
pub(super) const CREATE_ROOM: usize = 2048;
/// Kept free beyond that, for the pages a commit copies on write.
pub(super) const BASE_ROOM: usize = 256 << 10;

/// Key records queued for creation: taken before a create's room check, given back when the
/// write is answered (committed or not).
pub(super) struct Creating {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    n: usize,
    queued: usize,
}

impl Creating {
    pub(super) fn take(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>, n: usize) -> Self {
        let before = count.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        Self {
            count: std::sync::Arc::clone(count),
            n,
            queued: before.saturating_add(n),
        }
    }

    /// Records queued for creation, this write's included.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        self.count
            .fetch_sub(self.n, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Room {
    /// What must stay free: [`DESTROY_ROOM`] per key record (stored or `queued`), plus
    /// [`BASE_ROOM`].
    pub(super) fn reserve(&self, queued: usize) -> Result<usize, StoreError> {
        let rtxn = self.env.read_txn().map_err(io_err)?;
        let records = usize::try_from(self.keys.len(&rtxn).map_err(io_err)?).unwrap_or(usize::MAX);
        Ok(records
            .saturating_add(queued)
            .saturating_mul(DESTROY_ROOM)
            .saturating_add(BASE_ROOM))
    }

    /// Whether the creates `queued` leave room to destroy every key afterwards. The file's
    /// high-water mark is checked first (cheap); only near the end are the pages really in
    /// use counted (freed pages are reused).
    pub(super) fn for_new_keys(&self, reserve: usize, queued: usize) -> bool {
        let info = self.env.info();
        let page = self.env.stat().page_size as usize;
        let limit = info
            .map_size
            .saturating_sub(reserve)
            .saturating_sub(queued.saturating_mul(CREATE_ROOM));
        if (info.last_page_number + 1).saturating_mul(page) <= limit {
            return true;
        }
        // Unreadable: refuse the create rather than risk the destroys' room.
        self.env
            .non_free_pages_size()
            .is_ok_and(|used| usize::try_from(used).unwrap_or(usize::MAX) <= limit)
    }
}

//! Range scans inside a read transaction: threads (all, or one author's through the author
//! index), and a thread's messages in either direction from a cursor, stopping at a page's
//! size or byte budget.

use std::ops::Bound;

use super::kv::KvRead;
use kms_api::ThreadId;

use crate::ids::{MessageId, UserId};

use super::*;

/// The thread record of `thread` in this transaction, if any.
pub(super) fn read_meta(
    kv: &(impl KvRead + ?Sized),
    thread: &ThreadId,
) -> Result<Option<ThreadRecord>, StoreError> {
    let key = keys::meta(thread);
    kv.get(&key)?.map(|v| parse_thread(&key, &v)).transpose()
}

pub(super) fn parse_thread(key: &[u8], v: &[u8]) -> Result<ThreadRecord, StoreError> {
    let rec: ThreadRecord = serde_json::from_slice(v).map_err(|e| {
        StoreError::Corrupt(format!(
            "{}: {}",
            String::from_utf8_lossy(key),
            serde_error_text(&e)
        ))
    })?;
    // A record copied under another thread's key names its own thread: refused, never used
    // as the thread of the key.
    if keys::parse_meta(key).as_ref() != Some(&rec.id) {
        return Err(StoreError::Corrupt(format!(
            "{}: the record is thread {}'s",
            String::from_utf8_lossy(key),
            rec.id
        )));
    }
    Ok(rec)
}

/// serde_json's error without the input it may quote (its `Display` says e.g. `invalid
/// type: string "<a title>"`): what failed and where, for logs and errors.
pub(crate) fn serde_error_text(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// Up to `limit` readable threads after `after` (exclusive) in id order. A record that does
/// not parse is logged and stepped over without counting, so planted or damaged records never
/// shorten a page or end a walk early.
pub(super) fn list_all_threads(
    kv: &(impl KvRead + ?Sized),
    after: Option<&ThreadId>,
    limit: usize,
) -> Result<Page<ThreadRecord>, StoreError> {
    let mut items = Vec::new();
    let mut after = after.cloned();
    loop {
        let page = thread_entries(kv, after.as_ref(), limit.saturating_sub(items.len()))?;
        after = page.items.last().map(|(id, _)| id.clone());
        for (_, r) in page.items {
            match r {
                Ok(t) => items.push(t),
                Err(e) => tracing::error!(error = %e, "skipping unreadable thread record"),
            }
        }
        // `more` with no entry only for a limit of 0: nothing to walk on from.
        if !page.more || items.len() >= limit || after.is_none() {
            return Ok(Page {
                items,
                more: page.more,
            });
        }
    }
}

/// Up to `limit` threads after `after` (exclusive) in id order, each with its record or why
/// the record does not parse (a listing leaves those out; a verification reports them).
pub(super) fn thread_entries(
    kv: &(impl KvRead + ?Sized),
    after: Option<&ThreadId>,
    limit: usize,
) -> Result<Page<ThreadEntry>, StoreError> {
    let (lo, hi) = keys::all_threads();
    // Seek from thread to thread: after a thread's first key (its meta), jump past all of its
    // keys instead of walking its messages.
    let mut lower = match after {
        Some(t) => keys::thread_end(t),
        None => lo,
    };
    let mut items = Vec::new();
    loop {
        let next = {
            let mut it = kv.range(
                Bound::Included(lower.as_slice()),
                Bound::Excluded(hi.as_slice()),
            )?;
            match it.next() {
                None => None,
                Some(r) => {
                    let (k, v) = r?;
                    Some((k.to_vec(), keys::parse_meta(&k).map(|_| v.to_vec())))
                }
            }
        };
        let Some((k, meta)) = next else {
            return Ok(Page { items, more: false });
        };
        let tid = match keys::parse_thread_of(&k) {
            Some(tid) => tid,
            None => {
                // Not a key this server writes; step over it.
                lower = k;
                lower.push(0);
                continue;
            }
        };
        lower = keys::thread_end(&tid);
        if let Some(v) = meta {
            if items.len() == limit {
                return Ok(Page { items, more: true });
            }
            let record = parse_thread(&k, &v);
            items.push((tid, record));
        }
    }
}

pub(super) fn list_author_threads(
    kv: &(impl KvRead + ?Sized),
    user: &UserId,
    after: Option<&ThreadId>,
    limit: usize,
) -> Result<Page<ThreadRecord>, StoreError> {
    author_threads(kv, user, Order::Asc, after, limit)
}

/// Up to `limit` of `user`'s threads from the cursor `after` (exclusive) in `order` of thread
/// id (creation order for server-made ids), through the author index.
pub(super) fn author_threads(
    kv: &(impl KvRead + ?Sized),
    user: &UserId,
    order: Order,
    after: Option<&ThreadId>,
    limit: usize,
) -> Result<Page<ThreadRecord>, StoreError> {
    let (lo, hi) = keys::author_index_bounds(user);
    let start = after.map(|t| keys::author_index(user, t));
    let from = |s: &Option<Vec<u8>>, edge: &[u8], included: bool| match s {
        Some(s) => Bound::Excluded(s.clone()),
        None if included => Bound::Included(edge.to_vec()),
        None => Bound::Excluded(edge.to_vec()),
    };
    let range = match order {
        Order::Asc => (from(&start, &lo, true), Bound::Excluded(hi.clone())),
        Order::Desc => (Bound::Included(lo.clone()), from(&start, &hi, false)),
    };
    let range = (
        range.0.as_ref().map(Vec::as_slice),
        range.1.as_ref().map(Vec::as_slice),
    );
    let mut items = Vec::new();
    let mut visit = |k: &[u8]| -> Result<bool, StoreError> {
        let Some(tid) = keys::parse_author_index(&lo, k) else {
            return Ok(true);
        };
        let mk = keys::meta(&tid);
        let Some(v) = kv.get(&mk)? else {
            return Ok(true);
        };
        if items.len() == limit {
            return Ok(false);
        }
        match parse_thread(&mk, &v) {
            Ok(t) => items.push(t),
            Err(e) => tracing::error!(error = %e, "skipping unreadable thread record"),
        }
        Ok(true)
    };
    let more = match order {
        Order::Asc => {
            let mut more = false;
            for r in kv.range(range.0, range.1)? {
                if !visit(&r?.0)? {
                    more = true;
                    break;
                }
            }
            more
        }
        Order::Desc => {
            let mut more = false;
            for r in kv.rev_range(range.0, range.1)? {
                if !visit(&r?.0)? {
                    more = true;
                    break;
                }
            }
            more
        }
    };
    Ok(Page { items, more })
}

/// How many messages `thread` holds (tombstones counted or not).
pub(super) fn count_messages(
    kv: &(impl KvRead + ?Sized),
    thread: &ThreadId,
    tombstones: Tombstones,
) -> Result<u64, StoreError> {
    let (lo, hi) = (keys::msg_prefix(thread), keys::msg_end(thread));
    let mut n = 0u64;
    for r in kv.range(
        Bound::Included(lo.as_slice()),
        Bound::Excluded(hi.as_slice()),
    )? {
        let (_, v) = r?;
        if tombstones == Tombstones::Show || !records::is_tombstone_bytes(&v) {
            n += 1;
        }
    }
    Ok(n)
}

/// How many keys lie in `[lo, hi)`.
pub(super) fn count_range(
    kv: &(impl KvRead + ?Sized),
    lo: &[u8],
    hi: &[u8],
) -> Result<u64, StoreError> {
    let mut n = 0u64;
    for r in kv.range(Bound::Included(lo), Bound::Excluded(hi))? {
        r?;
        n += 1;
    }
    Ok(n)
}

/// The page of `w` over one ordered listing: `list(order, cursor, limit)` pages it from a
/// cursor (exclusive) in either direction, `get` reads the item at a cursor, `id` is an item's
/// cursor. Every call runs in the caller's read transaction, so the page is one snapshot.
pub(super) fn window<T, C: Clone>(
    w: Window<C>,
    limit: usize,
    mut list: impl FnMut(Order, Option<C>, usize) -> Result<Page<T>, StoreError>,
    get: impl FnOnce(C) -> Result<Option<T>, StoreError>,
    id: impl Fn(&T) -> C,
) -> Result<(Vec<T>, bool, bool), StoreError> {
    let oldest_first = |mut p: Page<T>| {
        p.items.reverse();
        p
    };
    Ok(match w {
        Window::Latest => {
            let p = oldest_first(list(Order::Desc, None, limit)?);
            (p.items, p.more, false)
        }
        Window::Older(c) => {
            let p = oldest_first(list(Order::Desc, Some(c), limit)?);
            let newer = match p.items.last() {
                Some(l) => !list(Order::Asc, Some(id(l)), 1)?.items.is_empty(),
                None => false,
            };
            (p.items, p.more, newer)
        }
        Window::Newer(c) => {
            let p = list(Order::Asc, Some(c), limit)?;
            let older = match p.items.first() {
                Some(f) => !list(Order::Desc, Some(id(f)), 1)?.items.is_empty(),
                None => false,
            };
            (p.items, older, p.more)
        }
        Window::Around(c) => {
            let before = oldest_first(list(Order::Desc, Some(c.clone()), limit)?);
            let after = list(Order::Asc, Some(c.clone()), limit)?;
            let mut items = before.items;
            items.extend(get(c)?);
            items.extend(after.items);
            (items, before.more, after.more)
        }
    })
}

/// Up to `limit` messages, and no more stored bytes than `max_bytes` (at least one message:
/// a page always moves on); `more` when the page stopped before the end. Hidden tombstones
/// are stepped over (they count toward neither).
#[allow(clippy::too_many_arguments)]
pub(super) fn list_messages(
    kv: &(impl KvRead + ?Sized),
    thread: &ThreadId,
    order: Order,
    after: Option<MessageId>,
    limit: usize,
    max_bytes: usize,
    tombstones: Tombstones,
) -> Result<Page<StoredMessage>, StoreError> {
    let prefix = keys::msg_prefix(thread);
    let end = keys::msg_end(thread);
    let cursor = after.map(|a| keys::msg(thread, a));
    let mut items = Vec::with_capacity(limit.min(1024));
    let mut bytes = 0usize;
    let mut push = |k: &[u8], v: &[u8]| -> bool {
        let Some(id) = keys::parse_msg(&prefix, k) else {
            return true;
        };
        if tombstones == Tombstones::Hide && records::is_tombstone_bytes(v) {
            return true;
        }
        if items.len() == limit || (!items.is_empty() && bytes.saturating_add(v.len()) > max_bytes)
        {
            return false;
        }
        bytes = bytes.saturating_add(v.len());
        items.push(StoredMessage {
            id,
            record: serde_json::from_slice(v).map_err(|e| serde_error_text(&e)),
        });
        true
    };
    let mut more = false;
    match order {
        Order::Asc => {
            let lower = match &cursor {
                Some(c) => Bound::Excluded(c.as_slice()),
                None => Bound::Included(prefix.as_slice()),
            };
            for r in kv.range(lower, Bound::Excluded(end.as_slice()))? {
                let (k, v) = r?;
                if !push(&k, &v) {
                    more = true;
                    break;
                }
            }
        }
        Order::Desc => {
            let upper = match &cursor {
                Some(c) => Bound::Excluded(c.as_slice()),
                None => Bound::Excluded(end.as_slice()),
            };
            for r in kv.rev_range(Bound::Included(prefix.as_slice()), upper)? {
                let (k, v) = r?;
                if !push(&k, &v) {
                    more = true;
                    break;
                }
            }
        }
    }
    Ok(Page { items, more })
}

/// The page of `w` over `items`, a listing already in memory in ascending order of `id`
/// (the same windows as the store's own listings, by the same `window`).
pub fn window_of_sorted<T: Clone, C: Clone + Ord>(
    items: &[T],
    id: impl Fn(&T) -> C,
    w: Window<C>,
    limit: usize,
) -> (Vec<T>, bool, bool) {
    let list = |order: Order, cursor: Option<C>, n: usize| -> Result<Page<T>, StoreError> {
        let picked: Vec<T> = match order {
            Order::Asc => items
                .iter()
                .filter(|t| cursor.as_ref().is_none_or(|c| id(t) > *c))
                .take(n.saturating_add(1))
                .cloned()
                .collect(),
            Order::Desc => items
                .iter()
                .rev()
                .filter(|t| cursor.as_ref().is_none_or(|c| id(t) < *c))
                .take(n.saturating_add(1))
                .cloned()
                .collect(),
        };
        let more = picked.len() > n;
        Ok(Page {
            items: picked.into_iter().take(n).collect(),
            more,
        })
    };
    let get = |c: C| Ok(items.iter().find(|t| id(t) == c).cloned());
    // The closures above cannot fail.
    window(w, limit, list, get, &id).unwrap_or((Vec::new(), false, false))
}

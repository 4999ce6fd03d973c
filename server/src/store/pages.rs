//! Reads for paging as ProgressDB's clients page: windows of one user's threads and of one
//! thread's messages (each page, its neighbours' existence and the listing's size from one
//! read transaction), the users who have threads, and the store's counts.

use super::*;

/// Every thread a filter selects, a page at a time, in id order: `while let Some(page) =
/// pages.next().await? { .. }`. Each page is its own read transaction.
#[derive(Debug)]
pub struct ThreadPages {
    store: Store,
    filter: ThreadFilter,
    after: Option<ThreadId>,
    batch: usize,
    done: bool,
}

impl ThreadPages {
    /// The next page, or `None` after the last.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn next(&mut self) -> Result<Option<Vec<ThreadRecord>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .store
            .list_threads(self.filter.clone(), self.after.take(), self.batch)
            .await?;
        self.after = page.items.last().map(|t| t.id.clone());
        self.done = !page.more || self.after.is_none();
        Ok(Some(page.items))
    }
}

impl Store {
    /// Walks every thread `filter` selects, `batch` at a time ([`ThreadPages`]).
    pub fn thread_pages(&self, filter: ThreadFilter, batch: usize) -> ThreadPages {
        ThreadPages {
            store: self.clone(),
            filter,
            after: None,
            batch: batch.max(1),
            done: false,
        }
    }

    /// A [`Window`] of `user`'s threads (oldest first) and how many threads the user has,
    /// from one read transaction.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn thread_window(
        &self,
        user: &UserId,
        w: Window<ThreadId>,
        limit: usize,
    ) -> Result<Windowed<ThreadRecord>, StoreError> {
        let user = user.clone();
        self.read(move |kv| {
            let (items, older, newer) = scan::window(
                w,
                limit,
                |order, after, n| scan::author_threads(kv, &user, order, after.as_ref(), n),
                |t| {
                    // Only a thread of this user: the index says so.
                    if kv.get(&keys::author_index(&user, &t))?.is_none() {
                        return Ok(None);
                    }
                    let k = keys::meta(&t);
                    kv.get(&k)?.map(|v| parse_thread(&k, &v)).transpose()
                },
                |t: &ThreadRecord| t.id.clone(),
            )?;
            let (lo, hi) = keys::author_index_bounds(&user);
            let total = scan::count_range(kv, &lo, &hi)?;
            Ok(Windowed {
                items,
                older,
                newer,
                total,
            })
        })
        .await
    }

    /// A [`Window`] of `thread`'s messages (oldest first) within `max_bytes` per direction,
    /// how many messages the thread holds, and the thread record: one read transaction (see
    /// [`Store::messages_with_thread`]).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn message_window(
        &self,
        thread: &ThreadId,
        w: Window<MessageId>,
        limit: usize,
        max_bytes: usize,
        tombstones: Tombstones,
    ) -> Result<(Option<ThreadRecord>, Windowed<StoredMessage>), StoreError> {
        let thread = thread.clone();
        self.read(move |kv| {
            let rec = scan::read_meta(kv, &thread)?;
            let (items, older, newer) = scan::window(
                w,
                limit,
                |order, after, n| {
                    list_messages(kv, &thread, order, after, n, max_bytes, tombstones)
                },
                |id| {
                    Ok(kv
                        .get(&keys::msg(&thread, id))?
                        .filter(|v| {
                            tombstones == Tombstones::Show || !records::is_tombstone_bytes(v)
                        })
                        .map(|v| StoredMessage {
                            id,
                            record: serde_json::from_slice(&v).map_err(|e| serde_error_text(&e)),
                        }))
                },
                |m: &StoredMessage| m.id,
            )?;
            // The thread's counter when it has one and only live messages are listed: a page
            // costs its size, not the thread's.
            let total = match (&rec, tombstones) {
                (
                    Some(ThreadRecord {
                        live_messages: Some(n),
                        ..
                    }),
                    Tombstones::Hide,
                ) => *n,
                _ => scan::count_messages(kv, &thread, tombstones)?,
            };
            Ok((
                rec,
                Windowed {
                    items,
                    older,
                    newer,
                    total,
                },
            ))
        })
        .await
    }

    /// How many threads and messages the store holds (one pass over every key: for
    /// `GET /admin/stats`).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn stats(&self) -> Result<(u64, u64), StoreError> {
        self.read(move |kv| {
            let (lo, hi) = keys::all_threads();
            let (mut threads, mut messages) = (0u64, 0u64);
            for r in kv.range(
                std::ops::Bound::Included(lo.as_slice()),
                std::ops::Bound::Excluded(hi.as_slice()),
            )? {
                let (k, v) = r?;
                if keys::parse_meta(&k).is_some() {
                    threads += 1;
                } else if k.split(|b| *b == b':').nth(2) == Some(b"msg")
                    && !records::is_tombstone_bytes(&v)
                {
                    messages += 1;
                }
            }
            Ok((threads, messages))
        })
        .await
    }

    /// Up to `limit` users who have threads, in order of their store key, after `after`
    /// (exclusive), whether others follow, and how many users have threads in all: one read
    /// transaction.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn users(
        &self,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<(Page<UserId>, u64), StoreError> {
        self.read(move |kv| {
            let mut items = Vec::new();
            let mut more = false;
            each_user(kv, after.as_ref(), |u| {
                if items.len() == limit {
                    more = true;
                    return false;
                }
                items.push(u);
                true
            })?;
            let mut total = 0u64;
            each_user(kv, None, |_| {
                total += 1;
                true
            })?;
            Ok((Page { items, more }, total))
        })
        .await
    }
}

/// Calls `f` with each user who has threads, in store-key order, after `after`, until it
/// answers `false`: one seek per user, past that user's index keys to the next user's.
fn each_user(
    kv: &(impl KvRead + ?Sized),
    after: Option<&UserId>,
    mut f: impl FnMut(UserId) -> bool,
) -> Result<(), StoreError> {
    let (lo, hi) = keys::all_author_index();
    let mut lower = match after {
        Some(u) => keys::author_index_bounds(u).1,
        None => lo,
    };
    loop {
        let next = {
            let mut it = kv.range(
                std::ops::Bound::Included(lower.as_slice()),
                std::ops::Bound::Excluded(hi.as_slice()),
            )?;
            match it.next() {
                None => None,
                Some(r) => Some(r?.0.to_vec()),
            }
        };
        let Some(k) = next else {
            return Ok(());
        };
        match keys::parse_author_of_index(&k) {
            Some(u) => {
                lower = keys::author_index_bounds(&u).1;
                if !f(u) {
                    return Ok(());
                }
            }
            None => {
                // Not a key this server writes; step over it.
                lower = k;
                lower.push(0);
            }
        }
    }
}

//! Pages as ProgressDB's clients ask for them: a [`Window`] of one user's threads or of one
//! thread's messages (oldest first), with whether more lie on either side and the listing's
//! size. Access and decryption are the same as for the `/v1` listings.

use kms_api::ThreadId;

use crate::api::MessageItem;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::ids::MessageId;
use crate::store::{ThreadRecord, Tombstones, Window, Windowed};

use super::*;

/// ProgressDB's thread filters: a case-insensitive substring of the title, and the exact
/// slug. Titles and slugs are sealed, so a filtered listing opens every thread of the user
/// (at most `limits.max_threads_per_user`) before it pages.
#[derive(Debug, Clone, Default)]
pub struct ThreadMatch {
    title: Option<String>,
    slug: Option<String>,
}

impl ThreadMatch {
    /// The filter of `title` and `slug` (empty ones are no filter).
    pub fn new(title: Option<&str>, slug: Option<&str>) -> Self {
        ThreadMatch {
            title: title.filter(|t| !t.is_empty()).map(str::to_lowercase),
            slug: slug.filter(|s| !s.is_empty()).map(str::to_owned),
        }
    }

    fn is_all(&self) -> bool {
        self.title.is_none() && self.slug.is_none()
    }

    fn matches(&self, t: &ThreadRecord) -> bool {
        self.title
            .as_ref()
            .is_none_or(|q| t.title.to_lowercase().contains(q.as_str()))
            && self
                .slug
                .as_ref()
                .is_none_or(|s| t.slug.as_ref() == Some(s))
    }
}

/// Threads read from the store per step of a filtered listing.
const FILTER_BATCH: usize = 500;

impl MessageService {
    /// A window of the caller's own threads that match `filter`, opened. Every caller here
    /// acts for one user: a signed frontend user, or a backend key naming one.
    ///
    /// # Errors
    /// 400 without a user or with a bad limit; 503 when the KMS cannot open the titles.
    pub async fn thread_window(
        &self,
        p: &Principal,
        w: Window<ThreadId>,
        limit: Option<usize>,
        filter: &ThreadMatch,
    ) -> Result<Windowed<ThreadRecord>, ApiError> {
        let user = require_user(p, "list threads")?;
        let limit = self.page_size(limit)?;
        if !filter.is_all() {
            return self.filtered_thread_window(&user, w, limit, filter).await;
        }
        let page = self.store.thread_window(&user, w, limit).await?;
        Ok(Windowed {
            items: self.open_threads(page.items).await?,
            older: page.older,
            newer: page.newer,
            total: page.total,
        })
    }

    /// [`MessageService::thread_window`] with a filter: every thread of `user`, opened in
    /// batches and matched, then paged in memory.
    async fn filtered_thread_window(
        &self,
        user: &crate::ids::UserId,
        w: Window<ThreadId>,
        limit: usize,
        filter: &ThreadMatch,
    ) -> Result<Windowed<ThreadRecord>, ApiError> {
        let mut matched = Vec::new();
        let mut pages = self.store.thread_pages(
            crate::store::ThreadFilter::Author(user.clone()),
            FILTER_BATCH,
        );
        while let Some(page) = pages.next().await? {
            matched.extend(
                self.open_threads(page)
                    .await?
                    .into_iter()
                    .filter(|t| filter.matches(t)),
            );
        }
        let total = matched.len() as u64;
        let (items, older, newer) =
            crate::store::window_of_sorted(&matched, |t: &ThreadRecord| t.id.clone(), w, limit);
        Ok(Windowed {
            items,
            older,
            newer,
            total,
        })
    }

    /// A window of thread `tid`'s messages, decrypted (an item that does not open is shown
    /// as unreadable, never as wrong content), with deleted messages' tombstones or without.
    ///
    /// # Errors
    /// 404 (also another user's thread), 400 for a bad limit, 503 when the KMS is down.
    pub async fn message_window(
        &self,
        p: &Principal,
        tid: &ThreadId,
        w: Window<MessageId>,
        limit: Option<usize>,
        tombstones: Tombstones,
    ) -> Result<Windowed<MessageItem>, ApiError> {
        let limit = self.page_size(limit)?;
        self.thread_for(p, tid).await?;
        let (thread, page) = self
            .store
            .message_window(tid, w, limit, self.limits.max_page_bytes, tombstones)
            .await?;
        let thread = thread.ok_or(ApiError::NotFound)?;
        Ok(Windowed {
            items: self.open_page(&thread, page.items).await?,
            older: page.older,
            newer: page.newer,
            total: page.total,
        })
    }

    /// How many threads and messages the store holds (admin callers).
    ///
    /// # Errors
    /// 403 for other callers; a store error.
    pub async fn stats(&self, p: &Principal) -> Result<(u64, u64), ApiError> {
        if p.role != crate::auth::Role::Admin {
            return Err(ApiError::Forbidden);
        }
        Ok(self.store.stats().await?)
    }
}

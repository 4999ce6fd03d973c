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

impl MessageService {
    /// A window of the caller's own threads, opened. Every caller here acts for one user:
    /// a signed frontend user, or a backend key naming one.
    ///
    /// # Errors
    /// 400 without a user or with a bad limit; 503 when the KMS cannot open the titles.
    pub async fn thread_window(
        &self,
        p: &Principal,
        w: Window<ThreadId>,
        limit: Option<usize>,
    ) -> Result<Windowed<ThreadRecord>, ApiError> {
        let user = require_user(p, "list threads")?;
        let limit = self.page_size(limit)?;
        let page = self.store.thread_window(&user, w, limit).await?;
        Ok(Windowed {
            items: self.open_threads(page.items).await?,
            older: page.older,
            newer: page.newer,
            total: page.total,
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

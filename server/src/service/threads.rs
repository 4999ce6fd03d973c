//! Threads: create (with their DEK), list, rename and re-describe (sealed under the
//! thread's key), delete (shredding every key of the thread first).

use std::sync::Arc;

use kms_api::ThreadId;
use serde_json::Value;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::ids::{new_thread_id, Timestamp};
use crate::provider::{ProviderError, ThreadKey};
use crate::store::{
    CreateThread, DeleteThread, Page, PatchThread, SetThreadKeyIfAbsent, StoreError, ThreadFilter,
    ThreadRecord,
};

use super::*;

impl MessageService {
    /// # Errors
    /// 400 without a user or with a bad title, 503 when the DEK cannot be created.
    pub async fn create_thread(
        &self,
        p: &Principal,
        title: String,
        slug: Option<String>,
        metadata: Option<Value>,
    ) -> Result<Arc<ThreadRecord>, ApiError> {
        let author = require_user(p, "create a thread")?;
        self.check_title(&title)?;
        if let Some(s) = &slug {
            check_slug(s)?;
        }
        if let Some(m) = &metadata {
            self.check_metadata(m)?;
        }
        let metadata = raw_metadata(metadata)?;
        // Refused before the KMS makes a key for it (the write checks again, atomically).
        if let crate::store::ThreadsPerAuthor::AtMost(max) = self.limits.threads_per_user {
            if self.store.author_has_at_least(&author, max).await? {
                return Err(ApiError::ThreadLimit);
            }
        }
        let now = Timestamp::now();
        let id = new_thread_id(now);
        let kms = match self.encryption {
            Encryption::Disabled => None,
            Encryption::Enabled => {
                let key = self.provider()?.create_dek_for_thread(&id).await.map_err(|e| {
                    tracing::warn!(thread = %id, error = %e, "cannot provision the thread's DEK");
                    ApiError::KmsUnavailable
                })?;
                Some(key)
            }
        };
        let mut rec = ThreadRecord {
            id,
            title,
            slug,
            author,
            created_at: now,
            updated_at: now,
            metadata,
            kms,
            plain_migration: None,
            rotation: None,
            sealed: 0,
            key_since: None,
            live_messages: None,
            sealed_meta: None,
        };
        // The title and metadata are stored sealed under the new DEK.
        let stored = match &rec.kms {
            None => rec.clone(),
            Some(key) => {
                let sealed = match crate::meta::seal(self.provider()?.as_ref(), key, &rec).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(thread = %rec.id, error = %e, "cannot seal the thread's metadata");
                        self.discard_key(key.clone());
                        return Err(ApiError::KmsUnavailable);
                    }
                };
                rec.sealed_meta = Some(sealed.clone());
                crate::meta::stored(rec.clone(), sealed)
            }
        };
        if let Err(e) = self
            .store
            .write(CreateThread::new(stored, self.limits.threads_per_user))
            .await
        {
            if let Some(k) = rec.kms {
                self.discard_key(k);
            }
            return Err(e.into());
        }
        let rec = Arc::new(rec);
        self.cache.put_fresh(rec.clone());
        Ok(rec)
    }

    /// # Errors
    /// 400 for a bad cursor.
    pub async fn list_threads(
        &self,
        p: &Principal,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Page<ThreadRecord>, ApiError> {
        let limit = self.page_size(limit)?;
        // An empty cursor is no cursor (a client passing back a missing `next_cursor`).
        let after = cursor
            .filter(|c| !c.is_empty())
            .map(|c| ThreadId::parse(c).map_err(|_| ApiError::invalid("invalid cursor")))
            .transpose()?;
        let filter = match &p.user {
            Some(u) => ThreadFilter::Author(u.clone()),
            None => ThreadFilter::All,
        };
        let page = self.store.list_threads(filter, after, limit).await?;
        Ok(Page {
            items: self.open_threads(page.items).await?,
            more: page.more,
        })
    }

    /// The listed records with their sealed titles and metadata opened (one batch call).
    /// Fail closed: a record whose sealed part does not open is left out, and said so in the
    /// log (like an unreadable record).
    ///
    /// # Errors
    /// 503 when the KMS cannot open them now.
    pub(super) async fn open_threads(
        &self,
        recs: Vec<ThreadRecord>,
    ) -> Result<Vec<ThreadRecord>, ApiError> {
        let opened = crate::meta::open_all(self.provider.as_deref(), recs)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot open the listed threads' metadata");
                ApiError::KmsUnavailable
            })?;
        let mut items = Vec::with_capacity(opened.len());
        for r in opened {
            match r {
                Ok(t) => items.push(t),
                Err(ProviderError::Unavailable(m)) => {
                    tracing::warn!(error = %m, "cannot open a listed thread's metadata");
                    return Err(ApiError::KmsUnavailable);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a listed thread's metadata does not open; it is left out");
                }
            }
        }
        Ok(items)
    }

    /// A patch that changes nothing (no title, no metadata) answers the thread as it is and
    /// writes nothing (`updated_at` stays).
    ///
    /// # Errors
    /// 404, 400 for a bad title.
    pub async fn patch_thread(
        &self,
        p: &Principal,
        id: &ThreadId,
        title: Option<String>,
        slug: Option<Option<String>>,
        metadata: Option<Option<Value>>,
    ) -> Result<Arc<ThreadRecord>, ApiError> {
        let current = self.thread_for(p, id).await?;
        if title.is_none() && slug.is_none() && metadata.is_none() {
            return Ok(current);
        }
        if let Some(t) = &title {
            self.check_title(t)?;
        }
        if let Some(Some(s)) = &slug {
            check_slug(s)?;
        }
        if let Some(Some(m)) = &metadata {
            self.check_metadata(m)?;
        }
        let metadata = metadata.map(raw_metadata).transpose()?;
        // Each try writes over the state it read: plain only while the thread has no key,
        // sealed only over the sealed part it opened and under the thread's key now. Another
        // writer in between (a patch, a rotation, a new key) makes it read again.
        let mut base = current;
        for _ in 0..8 {
            let mut next = (*base).clone();
            if let Some(t) = &title {
                next.title.clone_from(t);
            }
            if let Some(s) = &slug {
                next.slug.clone_from(s);
            }
            if let Some(m) = &metadata {
                next.metadata.clone_from(m);
            }
            let op = match &base.kms {
                None => PatchThread {
                    id: id.clone(),
                    title: title.clone(),
                    slug: slug.clone(),
                    metadata: metadata.clone(),
                    sealed: None,
                    now: Timestamp::now(),
                },
                Some(key) => {
                    let sealed = crate::meta::seal(self.provider()?.as_ref(), key, &next)
                        .await
                        .map_err(|e| meta_error(id, e))?;
                    next.sealed_meta = Some(sealed.clone());
                    PatchThread {
                        id: id.clone(),
                        title: None,
                        slug: None,
                        metadata: None,
                        sealed: Some((base.sealed_meta.clone(), sealed)),
                        now: Timestamp::now(),
                    }
                }
            };
            // Invalidate, never insert: two writers may finish in the other order than they
            // committed, and only the store knows which record is the newer one.
            let r = self.store.write(op).await;
            self.cache.invalidate(id);
            match r {
                Ok(stored) => {
                    next.updated_at = stored.updated_at;
                    return Ok(Arc::new(next));
                }
                Err(StoreError::Conflict(_)) => {
                    let fresh = self.store.get_thread(id).await?.ok_or(ApiError::NotFound)?;
                    base = Arc::new(
                        crate::meta::open(self.provider.as_deref(), fresh)
                            .await
                            .map_err(|e| meta_error(id, e))?,
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable)
    }

    /// Crypto-shreds the thread's DEK, then deletes the thread and its messages.
    ///
    /// # Errors
    /// 404; 503 when the DEK cannot be destroyed now; 500 `shred_failed` when the KMS does not
    /// know the DEK at all (a wrong KMS, or a forged record): the key cannot be shown to be
    /// destroyed, so nothing is deleted and the operator is told.
    pub async fn delete_thread(
        &self,
        p: &Principal,
        id: &ThreadId,
    ) -> Result<ThreadRecord, ApiError> {
        let rec = self.thread_for_delete(p, id).await?;
        // A rotation's retiring key goes too. A destroyed key is a tombstone the KMS answers
        // as destroyed again; "unknown" means the record names a key the KMS never made (a
        // forged or edited `rotation.retiring`, or a wrong KMS), while the real DEK may live
        // on: the same shred failure as for the thread's key.
        let keys = rec
            .rotation
            .as_ref()
            .and_then(|r| r.retiring.as_ref())
            .into_iter()
            .chain(rec.kms.as_ref());
        for k in keys {
            self.shred(id, k).await?;
        }
        let r = self.store.write(DeleteThread { id: id.clone() }).await;
        self.cache.invalidate(id);
        let mut deleted = r?;
        if deleted.sealed_meta.is_some() {
            // Answered with the title and metadata as they were opened before the shred: the
            // deleted record's own are sealed under a key that is gone (or about to go). A DEK
            // rotation may have resealed them meanwhile (the same title under a new key); a
            // rename racing the delete is not shown.
            deleted.title.clone_from(&rec.title);
            deleted.slug.clone_from(&rec.slug);
            deleted.metadata.clone_from(&rec.metadata);
        }
        // A rotation that started after our read gave the thread a key we did not destroy:
        // shred whatever the deleted record named too.
        let shredded: Vec<&kms_api::KeyId> = rec
            .kms
            .iter()
            .chain(rec.rotation.as_ref().and_then(|r| r.retiring.as_ref()))
            .map(|k| &k.key_id)
            .collect();
        let named = deleted
            .kms
            .iter()
            .chain(deleted.rotation.as_ref().and_then(|r| r.retiring.as_ref()));
        for k in named.filter(|k| !shredded.contains(&&k.key_id)) {
            match self.provider()?.destroy_key(k).await {
                Ok(()) | Err(ProviderError::UnknownKey) => {}
                Err(e) => {
                    tracing::error!(thread = %id, key_id = %k.key_id, error = %e, "a deleted thread's newer DEK could not be destroyed; destroy it with the KMS's destroy_key");
                    self.metrics.kms.shred_failures.inc();
                }
            }
        }
        Ok(deleted)
    }

    /// Destroys one of thread `id`'s DEKs at the KMS, or says why it cannot be shown to be
    /// destroyed.
    pub(super) async fn shred(&self, id: &ThreadId, k: &ThreadKey) -> Result<(), ApiError> {
        self.provider()?.destroy_key(k).await.map_err(|e| match e {
            ProviderError::Unavailable(_) => {
                tracing::warn!(thread = %id, error = %e, "cannot destroy the thread's DEK");
                ApiError::KmsUnavailable
            }
            ProviderError::UnknownKey => {
                tracing::error!(
                    thread = %id,
                    key_id = %k.key_id,
                    "the KMS does not know this thread's DEK: it cannot be shown to be \
                     shredded, so the thread is kept (is kms.endpoint the right KMS? was the \
                     thread record edited?)"
                );
                self.metrics.kms.shred_failures.inc();
                ApiError::ShredFailed
            }
            other => {
                tracing::error!(thread = %id, error = %other, "cannot destroy the thread's DEK");
                ApiError::from(other)
            }
        })
    }

    /// The thread's key, provisioning one for a thread created while encryption was off.
    pub(super) async fn thread_key(
        &self,
        thread: &ThreadRecord,
    ) -> Result<Arc<ThreadKey>, ApiError> {
        if let Some(k) = &thread.kms {
            return Ok(Arc::new(k.clone()));
        }
        let key = self
            .provider()?
            .create_dek_for_thread(&thread.id)
            .await
            .map_err(|e| {
                tracing::warn!(thread = %thread.id, error = %e, "cannot provision a DEK");
                ApiError::KmsUnavailable
            })?;
        let op = SetThreadKeyIfAbsent {
            id: thread.id.clone(),
            key: key.clone(),
        };
        let rec = match self.store.write(op).await {
            Ok(r) => r,
            Err(e) => {
                self.discard_key(key);
                return Err(e.into());
            }
        };
        let stored = rec.kms.clone().ok_or(ApiError::Internal)?;
        if stored.key_id != key.key_id {
            // Another request provisioned the thread first; ours is unused.
            self.discard_key(key);
        }
        self.cache.invalidate(&thread.id);
        Ok(Arc::new(stored))
    }
}

/// A slug: 1 to 128 bytes of UTF-8 without control characters or white space.
fn check_slug(s: &str) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(
            "slug must be 1 to 128 bytes of UTF-8 without control characters or white space",
        ));
    }
    Ok(())
}

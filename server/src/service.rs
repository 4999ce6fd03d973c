//! The flows of the API (seed guide section 3), independent of HTTP.
//!
//! * **Create thread**: the DEK is provisioned first (`create_dek_for_thread`), then the thread
//!   record with its `kms` fields and its index entry are committed in one transaction. If
//!   the provider fails, nothing is stored and the answer is 503 `kms_unavailable`.
//! * **Post / edit message**: the JSON bytes of `body` are encrypted under the thread's key
//!   with AAD = the message's full key `thread:<id>:msg:<ts>-<seq>`, so a ciphertext moved to
//!   another message or thread no longer decrypts. Only the ciphertext is stored.
//! * **Read a page**: every encrypted item of the page is decrypted in **one** batch call; an
//!   item that fails to authenticate is returned as `message_unreadable`, never as content.
//! * **Delete thread**: the DEK is destroyed first (crypto-shredding), then the thread and all
//!   its messages are deleted in one transaction. A crash in between leaves a thread whose
//!   key is gone; deleting it again finishes the job.
//! * Thread records are read once per request, through [`ThreadCache`].

use std::sync::Arc;
use std::time::Duration;

use kms_api::wire::{Bytes64, SecretBytes};
use kms_api::ThreadId;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::{DeletedMessageView, ItemError, MessageItem, MessageView};
use crate::auth::{ApiKeys, Principal, Role};
use crate::cache::ThreadCache;
use crate::error::{ApiError, ErrorCode};
use crate::ids::{new_thread_id, MessageId, MessageIdGen, Timestamp, UserId};
use crate::metrics::Metrics;
use crate::provider::{DecryptItem, EncryptItem, KeyProvider, ProviderError, ThreadKey};
use crate::store::aad::{message_aad, MessageBinding};
use crate::store::{
    AuthorRule, Content, CreateThread, DeleteMessage, DeleteThread, MessageRecord, Order, Page,
    PatchThread, PutMessage, RecordFormat, SealedBy, SetThreadKeyIfAbsent, Store, StoreError,
    StoredMessage, ThreadFilter, ThreadRecord, UpdateMessage,
};

/// Times a post or edit is sealed again when a rotation moved on under it.
const SEAL_ATTEMPTS: usize = 4;

/// How new message content is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Encrypted through the key provider (`encryption.enabled = true`).
    Enabled,
    /// Stored as `{"plain": ...}` (`encryption.enabled = false`).
    Disabled,
}

/// Limits applied by the flows.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Stored bytes one page of messages holds at most (at least one message).
    pub max_page_bytes: usize,
    pub max_title_bytes: usize,
    /// Thread metadata: its JSON text and its nesting depth.
    pub max_metadata_bytes: usize,
    pub max_metadata_depth: usize,
    /// Threads one user may have (`limits.max_threads_per_user`).
    pub threads_per_user: crate::store::ThreadsPerAuthor,
}

/// Health of each dependency, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Unavailable,
    /// No key provider is configured (encryption disabled).
    NotConfigured,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Unavailable => "unavailable",
            Health::NotConfigured => "not_configured",
        }
    }
}

/// Everything a request needs.
#[derive(Debug)]
pub struct MessageService {
    pub store: Store,
    pub provider: Option<Arc<dyn KeyProvider>>,
    pub encryption: Encryption,
    pub keys: ApiKeys,
    pub cache: ThreadCache,
    pub ids: MessageIdGen,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub kms_ready_timeout: Duration,
    /// Connection admission of the HTTP listener (shared with `/metrics`).
    pub gate: std::sync::Arc<service_kit::conn::ConnectionGate>,
    /// When thread keys are rotated without being asked.
    pub rotation_policy: crate::jobs::RotationPolicy,
    /// Jobs this process drives now.
    pub running: crate::jobs::Running,
    /// Requests a second per API key and user (`limits.key_rate_per_sec`).
    pub key_rate: service_kit::rate::RateLimiter<(crate::auth::ApiKeyId, Option<UserId>)>,
    /// Users whose signatures were revoked.
    pub signature_generations: crate::auth::SignatureGenerations,
}

/// The answer for thread `id`'s metadata that cannot be opened or sealed.
fn meta_error(id: &ThreadId, e: ProviderError) -> ApiError {
    match e {
        ProviderError::Unavailable(m) => {
            tracing::warn!(thread = %id, error = %m, "cannot open or seal a thread's metadata now");
            ApiError::KmsUnavailable
        }
        ProviderError::DecryptionFailed | ProviderError::UnknownKey => {
            tracing::error!(thread = %id, "a thread's sealed metadata does not open (moved, edited or under a key it does not have)");
            ApiError::MessageUnreadable
        }
        ProviderError::Rejected(m) | ProviderError::Internal(m) => {
            tracing::error!(thread = %id, error = %m, "a thread's metadata failed at the key provider");
            ApiError::Internal
        }
    }
}

fn require_user(p: &Principal, what: &str) -> Result<UserId, ApiError> {
    p.user
        .clone()
        .ok_or_else(|| ApiError::invalid(format!("X-User-ID is required to {what}")))
}

/// Which messages `p` may edit or delete: frontend callers only their own.
fn author_rule(p: &Principal) -> AuthorRule {
    match (p.role, &p.user) {
        (Role::Admin | Role::Backend, _) => AuthorRule::Anyone,
        (Role::Frontend, Some(u)) => AuthorRule::OnlyAuthor(u.clone()),
        // A frontend principal always carries its signed user; without one it may change
        // nothing (no message has an empty author).
        (Role::Frontend, None) => AuthorRule::Nobody,
    }
}

/// What the ciphertext of message `id` (by `author` at `created_at`) in `thread` is bound to.
/// Metadata as it is kept: its JSON text; `null` is none.
fn raw_metadata(m: Option<Value>) -> Result<Option<crate::store::RawJson>, ApiError> {
    m.filter(|v| !v.is_null())
        .map(|v| crate::store::RawJson::from_value(&v))
        .transpose()
        .map_err(|_| ApiError::Internal)
}

/// A decrypted body, if it is one JSON value.
fn decode_body(pt: &SecretBytes) -> Option<Box<RawValue>> {
    serde_json::from_slice(pt.expose()).ok()
}

/// `body` as JSON text for a [`MessageView`].
fn raw_body(body: &Value) -> Result<Box<RawValue>, ApiError> {
    serde_json::value::to_raw_value(body).map_err(|e| {
        tracing::error!(error = %e, "a message body does not serialize");
        ApiError::Internal
    })
}

impl MessageService {
    fn provider(&self) -> Result<&Arc<dyn KeyProvider>, ApiError> {
        self.provider.as_ref().ok_or_else(|| {
            tracing::error!("an encrypted thread needs a key provider, and none is configured");
            ApiError::KmsUnavailable
        })
    }

    /// The thread `id` if `p` may see it; another user's thread is `NotFound`.
    ///
    /// # Errors
    /// [`ApiError::NotFound`], or a store error.
    pub async fn thread_for(
        &self,
        p: &Principal,
        id: &ThreadId,
    ) -> Result<Arc<ThreadRecord>, ApiError> {
        let rec = match self.cache.get(id) {
            Some(r) => r,
            None => {
                let seen = self.cache.generation();
                let stored = self.store.get_thread(id).await?.ok_or(ApiError::NotFound)?;
                // Another user's thread is not opened (nor its existence told).
                if !p.may_access(&stored.author) {
                    return Err(ApiError::NotFound);
                }
                let r = Arc::new(
                    crate::meta::open(self.provider.as_deref(), stored)
                        .await
                        .map_err(|e| meta_error(id, e))?,
                );
                self.cache.insert_read(seen, r.clone());
                r
            }
        };
        if p.may_access(&rec.author) {
            Ok(rec)
        } else {
            Err(ApiError::NotFound)
        }
    }

    /// The thread `id` if `p` may see it, with its title and metadata opened when they can
    /// be, as stored when they cannot (a delete must not depend on them).
    async fn thread_for_delete(
        &self,
        p: &Principal,
        id: &ThreadId,
    ) -> Result<Arc<ThreadRecord>, ApiError> {
        match self.thread_for(p, id).await {
            Err(ApiError::MessageUnreadable) => {
                let r = self.store.get_thread(id).await?.ok_or(ApiError::NotFound)?;
                if p.may_access(&r.author) {
                    Ok(Arc::new(r))
                } else {
                    Err(ApiError::NotFound)
                }
            }
            other => other,
        }
    }

    fn check_title(&self, title: &str) -> Result<(), ApiError> {
        if title.trim().is_empty() {
            return Err(ApiError::invalid("title must not be empty"));
        }
        if title.len() > self.limits.max_title_bytes {
            return Err(ApiError::invalid(format!(
                "title must be at most {} bytes",
                self.limits.max_title_bytes
            )));
        }
        Ok(())
    }

    /// Thread metadata within `limits.max_metadata_bytes` of JSON text and
    /// `limits.max_metadata_depth` levels of nesting. It is kept as its JSON text
    /// ([`crate::store::RawJson`]), parsed only while a request body is read.
    fn check_metadata(&self, m: &Value) -> Result<(), ApiError> {
        let len = serde_json::to_vec(m).map_or(usize::MAX, |v| v.len());
        if len > self.limits.max_metadata_bytes {
            return Err(ApiError::invalid(format!(
                "metadata must be at most {} bytes of JSON",
                self.limits.max_metadata_bytes
            )));
        }
        if json_depth(m) > self.limits.max_metadata_depth {
            return Err(ApiError::invalid(format!(
                "metadata must nest at most {} levels deep",
                self.limits.max_metadata_depth
            )));
        }
        Ok(())
    }

    /// The page size for a requested `limit` (clamped to the maximum).
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] for 0.
    pub fn page_size(&self, limit: Option<usize>) -> Result<usize, ApiError> {
        match limit {
            None => Ok(self.limits.default_page_size),
            Some(0) => Err(ApiError::invalid("limit must be at least 1")),
            Some(n) => Ok(n.min(self.limits.max_page_size)),
        }
    }

    /// Destroys a DEK that ended up unused, in the background.
    fn discard_key(&self, key: ThreadKey) {
        let Some(p) = self.provider.clone() else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = p.destroy_key(&key).await {
                tracing::warn!(key_id = %key.key_id, error = %e, "could not destroy an unused DEK");
            }
        });
    }

    /// # Errors
    /// 400 without a user or with a bad title, 503 when the DEK cannot be created.
    pub async fn create_thread(
        &self,
        p: &Principal,
        title: String,
        metadata: Option<Value>,
    ) -> Result<Arc<ThreadRecord>, ApiError> {
        let author = require_user(p, "create a thread")?;
        self.check_title(&title)?;
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
            author,
            created_at: now,
            updated_at: now,
            metadata,
            kms,
            plain_migration: None,
            rotation: None,
            sealed: 0,
            key_since: None,
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
        let opened = crate::meta::open_all(self.provider.as_deref(), page.items)
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
                // Fail closed: a thread whose sealed metadata does not open is left out, and
                // said so in the log (like an unreadable record).
                Err(e) => {
                    tracing::error!(error = %e, "a listed thread's metadata does not open; it is left out");
                }
            }
        }
        Ok(Page {
            items,
            more: page.more,
        })
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
        metadata: Option<Option<Value>>,
    ) -> Result<Arc<ThreadRecord>, ApiError> {
        let current = self.thread_for(p, id).await?;
        if title.is_none() && metadata.is_none() {
            return Ok(current);
        }
        if let Some(t) = &title {
            self.check_title(t)?;
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
            if let Some(m) = &metadata {
                next.metadata.clone_from(m);
            }
            let op = match &base.kms {
                None => PatchThread {
                    id: id.clone(),
                    title: title.clone(),
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
        if deleted.sealed_meta.is_some() && deleted.sealed_meta == rec.sealed_meta {
            // Answered with the title and metadata as they were opened before the shred.
            deleted.title.clone_from(&rec.title);
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
    async fn shred(&self, id: &ThreadId, k: &ThreadKey) -> Result<(), ApiError> {
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
    async fn thread_key(&self, thread: &ThreadRecord) -> Result<Arc<ThreadKey>, ApiError> {
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

    /// Stored form of `body` for message `id` of `thread` with the record `stamp` (author,
    /// times, edit count; its content is not read), in [`RecordFormat::CURRENT`], and the key
    /// id it is sealed under. The key
    /// is the one the thread's rotation rule names for `id` ([`ThreadRecord::sealed_by`]);
    /// the writer checks that again inside its transaction. A thread that has a DEK is
    /// always encrypted, whatever `encryption.enabled` says: plain content never enters an
    /// encrypted thread (a not yet migrated message of a plain thread being encrypted stays
    /// plain until the job reaches it).
    async fn seal(
        &self,
        thread: &ThreadRecord,
        id: MessageId,
        stamp: &MessageRecord,
        body: &Value,
    ) -> Result<(Content, Option<kms_api::KeyId>), ApiError> {
        let key = match thread.sealed_by(id) {
            SealedBy::Key(k) => Arc::new(k.clone()),
            // The rule says "plain" for this id in a thread that has a DEK: a plain thread
            // being encrypted whose job has not reached this message yet, or a forged
            // `rotation`. Plain content never enters a thread that has a DEK: 503, and the
            // edit goes through once the job has passed the message.
            SealedBy::Plain if thread.kms.is_some() => {
                tracing::warn!(thread = %thread.id, message = %id, "refusing to write plain content into a thread that has a DEK (its encryption job has not reached this message)");
                return Err(ApiError::Unavailable);
            }
            SealedBy::Plain if thread.rotation.is_some() => {
                return Ok((Content::Plain(body.clone()), None))
            }
            SealedBy::Plain if self.encryption == Encryption::Disabled => {
                return Ok((Content::Plain(body.clone()), None))
            }
            SealedBy::Plain => self.thread_key(thread).await?,
        };
        // Serialized into zeroizing memory that grows without leaving copies, then moved (no
        // copy) into the zeroizing wire type.
        let mut buf = kms_api::wire::to_json_zeroizing(body, 256)
            .map_err(|_| ApiError::Internal)?
            .into_inner();
        let plaintext = SecretBytes::new(std::mem::take(&mut *buf));
        let key_id = key.key_id.clone();
        let item = EncryptItem {
            key,
            plaintext,
            aad: message_aad(
                RecordFormat::CURRENT,
                &MessageBinding::of(thread, id, stamp),
            ),
        };
        match self.provider()?.encrypt(item).await {
            Ok(ct) => Ok((Content::Enc(Bytes64(ct.0)), Some(key_id))),
            // The key is gone: the thread is being deleted.
            Err(ProviderError::UnknownKey) => Err(ApiError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// # Errors
    /// 404, 400 without a user, 503 when the KMS is down (nothing stored).
    pub async fn post_message(
        self: &Arc<Self>,
        p: &Principal,
        tid: &ThreadId,
        body: Value,
    ) -> Result<MessageView, ApiError> {
        let author = require_user(p, "post a message")?;
        // A rotation that moved on between reading the thread and writing is seen by the
        // writer (StaleKey): take a new id, read the thread again and seal again.
        for attempt in 0..SEAL_ATTEMPTS {
            let thread = self.thread_for(p, tid).await?;
            let id = self.ids.next();
            let now = id.timestamp();
            let mut rec = MessageRecord {
                format: RecordFormat::CURRENT,
                author: author.clone(),
                created_at: now,
                updated_at: now,
                edits: 0,
                content: Content::Plain(Value::Null),
            };
            let (content, sealed_with) = self.seal(&thread, id, &rec, &body).await?;
            rec.content = content;
            match self
                .store
                .write(PutMessage::new(tid, id, &rec, sealed_with)?)
                .await
            {
                Ok(counted) => {
                    if let Some(t) = counted {
                        crate::jobs::maybe_rotate(self, &t);
                    }
                    return Ok(view(tid, id, &rec, raw_body(&body)?));
                }
                Err(StoreError::StaleKey) if attempt + 1 < SEAL_ATTEMPTS => {
                    self.cache.invalidate(tid);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable)
    }

    /// # Errors
    /// 404; 500 `message_unreadable` when the stored content does not decrypt.
    pub async fn get_message(
        &self,
        p: &Principal,
        tid: &ThreadId,
        id: MessageId,
    ) -> Result<MessageView, ApiError> {
        self.thread_for(p, tid).await?;
        let (thread, stored) = self.store.message_with_thread(tid, id).await?;
        let (Some(thread), Some(stored)) = (thread, stored) else {
            return Err(ApiError::NotFound);
        };
        match self.open_page(&thread, vec![stored]).await?.pop() {
            Some(MessageItem::Ok(v)) => Ok(v),
            Some(MessageItem::Unreadable { .. }) | None => Err(ApiError::MessageUnreadable),
        }
    }

    /// # Errors
    /// 404, 400 for a bad cursor.
    pub async fn list_messages(
        &self,
        p: &Principal,
        tid: &ThreadId,
        order: Order,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<MessageItem>, Option<String>), ApiError> {
        let limit = self.page_size(limit)?;
        // An empty cursor is no cursor (a client passing back a missing `next_cursor`).
        let after = cursor
            .filter(|c| !c.is_empty())
            .map(|c| MessageId::parse(c).map_err(|_| ApiError::invalid("invalid cursor")))
            .transpose()?;
        self.thread_for(p, tid).await?;
        // The page and the thread record of one snapshot: a rotation's cursor moves with the
        // messages it migrates.
        let (thread, page) = self
            .store
            .messages_with_thread(tid, order, after, limit, self.limits.max_page_bytes)
            .await?;
        let thread = thread.ok_or(ApiError::NotFound)?;
        let next = if page.more {
            page.items.last().map(|m| m.id.to_string())
        } else {
            None
        };
        Ok((self.open_page(&thread, page.items).await?, next))
    }

    /// # Errors
    /// 404; 403 when a frontend caller edits another user's message; 503 when the KMS is
    /// down (nothing changed).
    pub async fn update_message(
        &self,
        p: &Principal,
        tid: &ThreadId,
        id: MessageId,
        body: Value,
    ) -> Result<MessageView, ApiError> {
        let thread = self.thread_for(p, tid).await?;
        let stored = self
            .store
            .get_message(tid, id)
            .await?
            .ok_or(ApiError::NotFound)?;
        let old = stored.record.map_err(|e| {
            tracing::error!(thread = %tid, message = %id, error = %e, "unparseable message record");
            ApiError::MessageUnreadable
        })?;
        let rule = author_rule(p);
        if !rule.allows(&old.author) {
            return Err(ApiError::Forbidden);
        }
        let mut thread = thread;
        let mut old = old;
        for attempt in 0..SEAL_ATTEMPTS {
            // The new content is bound to the edit it makes: one more edit, at a time not
            // before the last write.
            let stamp = MessageRecord {
                edits: old.edits.checked_add(1).ok_or_else(|| {
                    ApiError::InvalidArgument(
                        "this message was edited too often to edit again".into(),
                    )
                })?,
                updated_at: Timestamp::now().max(old.updated_at),
                format: RecordFormat::CURRENT,
                author: old.author.clone(),
                created_at: old.created_at,
                content: Content::Plain(Value::Null),
            };
            let (content, sealed_with) = self.seal(&thread, id, &stamp, &body).await?;
            let written = self
                .store
                .write(UpdateMessage {
                    thread: tid.clone(),
                    id,
                    content,
                    format: RecordFormat::CURRENT,
                    sealed_for: (stamp.author.clone(), stamp.created_at, old.edits),
                    updated_at: stamp.updated_at,
                    sealed_with,
                    rule: rule.clone(),
                })
                .await;
            match written {
                Ok(rec) => return Ok(view(tid, id, &rec, raw_body(&body)?)),
                Err(StoreError::StaleKey) if attempt + 1 < SEAL_ATTEMPTS => {
                    self.cache.invalidate(tid);
                    thread = self.thread_for(p, tid).await?;
                }
                // Another edit landed first: seal again for the record as it is now.
                Err(StoreError::Conflict(_)) if attempt + 1 < SEAL_ATTEMPTS => {
                    old = self
                        .store
                        .get_message(tid, id)
                        .await?
                        .ok_or(ApiError::NotFound)?
                        .record
                        .map_err(|e| {
                            tracing::error!(thread = %tid, message = %id, error = %e, "unparseable message record");
                            ApiError::MessageUnreadable
                        })?;
                    if !rule.allows(&old.author) {
                        return Err(ApiError::Forbidden);
                    }
                }
                // Edited by others on every attempt: retryable.
                Err(StoreError::Conflict(_)) => return Err(ApiError::Unavailable),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable)
    }

    /// Deletes a message; returns what is left to show of it (no body).
    ///
    /// # Errors
    /// 404; 403 when a frontend caller deletes another user's message.
    pub async fn delete_message(
        &self,
        p: &Principal,
        tid: &ThreadId,
        id: MessageId,
    ) -> Result<DeletedMessageView, ApiError> {
        self.thread_for(p, tid).await?;
        let rec = self
            .store
            .write(DeleteMessage {
                thread: tid.clone(),
                id,
                rule: author_rule(p),
            })
            .await?;
        Ok(DeletedMessageView {
            id,
            thread_id: tid.clone(),
            author: rec.as_ref().map(|r| r.author.clone()),
            created_at: rec.as_ref().map(|r| r.created_at.to_rfc3339()),
            deleted: true,
        })
    }

    /// Decrypts every encrypted item of a page in one batch call.
    async fn open_page(
        &self,
        thread: &ThreadRecord,
        items: Vec<StoredMessage>,
    ) -> Result<Vec<MessageItem>, ApiError> {
        let tid = &thread.id;
        let unreadable = |id: MessageId| MessageItem::Unreadable {
            id,
            thread_id: tid.clone(),
            error: ItemError {
                code: ErrorCode::MessageUnreadable,
            },
        };
        // (index in page, decrypt request) of every encrypted item that can be attempted.
        // The page is taken apart rather than copied: each ciphertext moves into its request
        // and each record (without its content) stays for the view.
        let mut to_decrypt: Vec<(usize, DecryptItem)> = Vec::new();
        let mut out: Vec<Option<MessageItem>> = Vec::with_capacity(items.len());
        let mut records: Vec<Option<MessageRecord>> = Vec::with_capacity(items.len());
        let mut ids: Vec<MessageId> = Vec::with_capacity(items.len());
        // Consecutive messages share their key: one `Arc` per run, not one per message.
        let mut last_key: Option<Arc<ThreadKey>> = None;
        for (i, m) in items.into_iter().enumerate() {
            ids.push(m.id);
            let mut rec = match m.record {
                Err(e) => {
                    tracing::error!(thread = %tid, message = %m.id, error = %e, "unparseable message record");
                    out.push(Some(unreadable(m.id)));
                    records.push(None);
                    continue;
                }
                Ok(rec) => rec,
            };
            let content = std::mem::replace(&mut rec.content, Content::Plain(Value::Null));
            match (content, thread.sealed_by(m.id)) {
                (Content::Plain(v), _) if thread.accepts_plain(m.id) => {
                    if thread.kms.is_some() {
                        tracing::debug!(thread = %tid, message = %m.id, "plain message from before the thread's DEK (plain_migration)");
                    }
                    out.push(Some(MessageItem::Ok(view(tid, m.id, &rec, raw_body(&v)?))))
                }
                (Content::Plain(_), _) => {
                    tracing::error!(thread = %tid, message = %m.id, "plain record in an encrypted thread refused (forged or planted)");
                    self.metrics.kms.plain_refused.inc();
                    out.push(Some(unreadable(m.id)));
                }
                (Content::Enc(ct), SealedBy::Key(k)) => {
                    let key = match &last_key {
                        Some(a) if **a == *k => Arc::clone(a),
                        _ => {
                            let a = Arc::new(k.clone());
                            last_key = Some(Arc::clone(&a));
                            a
                        }
                    };
                    let aad = message_aad(rec.format, &MessageBinding::of(thread, m.id, &rec));
                    to_decrypt.push((
                        i,
                        DecryptItem {
                            key,
                            ciphertext: ct.0,
                            aad,
                        },
                    ));
                    out.push(None);
                }
                (Content::Enc(_), SealedBy::Plain) => {
                    tracing::error!(thread = %tid, message = %m.id, "encrypted message where the thread names no key");
                    out.push(Some(unreadable(m.id)));
                }
            }
            records.push(Some(rec));
        }
        if !to_decrypt.is_empty() {
            let (idx, reqs): (Vec<usize>, Vec<DecryptItem>) = to_decrypt.into_iter().unzip();
            let results = self.provider()?.decrypt_batch(reqs).await.map_err(|e| match e {
                ProviderError::Unavailable(_) => {
                    tracing::warn!(thread = %tid, error = %e, "cannot decrypt: key provider unavailable");
                    ApiError::KmsUnavailable
                }
                other => ApiError::from(other),
            })?;
            if results.len() != idx.len() {
                tracing::error!("key provider answered a batch with the wrong number of results");
                return Err(ApiError::Internal);
            }
            for (i, r) in idx.into_iter().zip(results) {
                let Some(&id) = ids.get(i) else {
                    return Err(ApiError::Internal);
                };
                let item = match (r, &records[i]) {
                    (Ok(pt), Some(rec)) => match decode_body(&pt) {
                        Some(body) => MessageItem::Ok(view(tid, id, rec, body)),
                        None => {
                            tracing::error!(thread = %tid, message = %id, "decrypted content is not JSON");
                            unreadable(id)
                        }
                    },
                    (Ok(_), None) => unreadable(id),
                    (Err(ProviderError::Unavailable(m)), _) => {
                        tracing::warn!(thread = %tid, error = %m, "cannot decrypt: key provider unavailable");
                        return Err(ApiError::KmsUnavailable);
                    }
                    (Err(e @ (ProviderError::DecryptionFailed | ProviderError::UnknownKey)), _) => {
                        tracing::warn!(thread = %tid, message = %id, error = %e, "message does not decrypt");
                        unreadable(id)
                    }
                    (Err(e @ (ProviderError::Rejected(_) | ProviderError::Internal(_))), _) => {
                        tracing::error!(thread = %tid, message = %id, error = %e, "message decryption error");
                        unreadable(id)
                    }
                };
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(item);
                }
            }
        }
        Ok(out
            .into_iter()
            .zip(ids)
            .map(|(o, id)| o.unwrap_or_else(|| unreadable(id)))
            .collect())
    }

    /// Authenticates a request (API key, and the user signature of a frontend caller at the
    /// user's signature generation), then counts it against the rate of its API key and user.
    ///
    /// # Errors
    /// 401 for a missing or wrong credential, 400 for a malformed `X-User-ID`, 429 over the
    /// rate.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, ApiError> {
        let p = self
            .keys
            .authenticate(headers, &self.signature_generations)?;
        // Per signed user on the shared frontend key; per key for backend and admin callers,
        // who name any user they like (a bucket per name would let them out of their key's
        // rate, and a flood of names would reset everyone's).
        let user = match p.role {
            Role::Frontend => p.user.clone(),
            Role::Backend | Role::Admin => None,
        };
        self.key_rate
            .check(&(p.key, user))
            .map_err(|wait| ApiError::RateLimited(wait.as_secs().max(1)))?;
        Ok(p)
    }

    /// `POST /v1/sign`: backend (and admin) keys only. With `expires_in_secs`, the expiring
    /// signature form valid that long (at most `auth.max_signature_ttl_secs`); without, the
    /// plain form, or an expiring one of the longest lifetime when plain signatures are not
    /// accepted (`auth.require_expiring_signatures`) or the user's were revoked.
    ///
    /// # Errors
    /// 403 for frontend keys, 400 for a bad user id or lifetime.
    pub fn sign(
        &self,
        p: &Principal,
        user_id: &str,
        expires_in_secs: Option<u64>,
    ) -> Result<(UserId, String, Option<u64>), ApiError> {
        match p.role {
            Role::Backend | Role::Admin => {}
            Role::Frontend => return Err(ApiError::Forbidden),
        }
        let user = UserId::parse(user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
        let (sig, expires) = self
            .keys
            .sign_for(
                &user,
                expires_in_secs,
                self.signature_generations.of(&user),
                crate::auth::unix_now(),
            )
            .map_err(ApiError::InvalidArgument)?;
        Ok((user, sig, expires))
    }

    /// `POST /v1/users/{user_id}/revoke-signatures`: backend (and admin) keys only. Every
    /// signature of the user made so far stops being accepted (durably, before the answer);
    /// returns the user's new signature generation.
    ///
    /// # Errors
    /// 403 for frontend keys, 400 for a bad user id, 5xx when the store cannot write.
    pub async fn revoke_signatures(
        &self,
        p: &Principal,
        user_id: &str,
    ) -> Result<(UserId, u64), ApiError> {
        match p.role {
            Role::Backend | Role::Admin => {}
            Role::Frontend => return Err(ApiError::Forbidden),
        }
        let user = UserId::parse(user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
        let generation = self
            .store
            .write(crate::store::RevokeSignatures { user: user.clone() })
            .await?;
        self.signature_generations
            .set(&user, crate::auth::SignatureGeneration(generation));
        tracing::info!(user = %user, generation, "user signatures revoked");
        Ok((user, generation))
    }

    /// `GET /admin/threads/{id}/kms`.
    ///
    /// # Errors
    /// 403 for non-admin keys, 404 for an unknown thread or one without a key.
    pub async fn thread_kms(&self, p: &Principal, id: &ThreadId) -> Result<ThreadKey, ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let rec = self.thread_for(p, id).await?;
        let copy = rec.kms.clone().ok_or(ApiError::NotFound)?;
        // The copy is informational (reads use the key id), but it is shown true: refreshed
        // from the KMS, which rewraps DEKs when its KEK rotates.
        let Some(provider) = &self.provider else {
            return Ok(copy);
        };
        let fresh = match provider.current_copy(&copy).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(thread = %id, error = %e, "cannot refresh the thread's key copy; showing the stored one");
                return Ok(copy);
            }
        };
        if fresh != copy {
            let changed = self
                .store
                .write(crate::store::RefreshKeyCopy {
                    thread: id.clone(),
                    fresh: fresh.clone(),
                })
                .await?;
            self.cache.invalidate(id);
            if changed {
                tracing::info!(thread = %id, kek_version = %fresh.kek_version, "thread's key copy refreshed after a KEK rotation");
            }
        }
        Ok(fresh)
    }

    /// `GET /admin/kms/key-copies`: every thread's copy of its key, and of a rotation's
    /// retiring key.
    ///
    /// # Errors
    /// 403 for non-admin keys; store errors.
    pub async fn key_copies(&self, p: &Principal) -> Result<Vec<Value>, ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_threads(ThreadFilter::All, after.clone(), 256)
                .await?;
            for t in &page.items {
                let retiring = t.rotation.as_ref().and_then(|r| r.retiring.as_ref());
                for k in t.kms.iter().chain(retiring) {
                    out.push(serde_json::json!({
                        "thread_id": t.id,
                        "key_id": k.key_id,
                        "wrapped_dek": k.wrapped_dek,
                        "kek_id": k.kek_id,
                        "kek_version": k.kek_version,
                    }));
                }
            }
            match (page.more, page.items.last()) {
                (true, Some(last)) => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// `POST /admin/kms/refresh-copies`: refreshes every thread's copy of its key from the KMS.
    /// Returns (threads checked, copies refreshed, copies the KMS could not give).
    ///
    /// # Errors
    /// 403 for non-admin keys; store errors.
    pub async fn refresh_key_copies(&self, p: &Principal) -> Result<(u64, u64, u64), ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let provider = self.provider()?;
        let (mut checked, mut refreshed, mut missing) = (0, 0, 0);
        let mut after = None;
        loop {
            let page = self
                .store
                .list_threads(ThreadFilter::All, after.clone(), 256)
                .await?;
            for t in &page.items {
                let Some(copy) = &t.kms else { continue };
                checked += 1;
                match provider.current_copy(copy).await {
                    Ok(fresh) if &fresh != copy => {
                        let changed = self
                            .store
                            .write(crate::store::RefreshKeyCopy {
                                thread: t.id.clone(),
                                fresh,
                            })
                            .await?;
                        self.cache.invalidate(&t.id);
                        refreshed += u64::from(changed);
                    }
                    Ok(_) => {}
                    Err(ProviderError::Unavailable(_)) => return Err(ApiError::KmsUnavailable),
                    Err(e) => {
                        tracing::warn!(thread = %t.id, error = %e, "the KMS has no current copy of the thread's key");
                        missing += 1;
                    }
                }
            }
            match (page.more, page.items.last()) {
                (true, Some(last)) => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok((checked, refreshed, missing))
    }

    /// Health of the store and the key provider.
    pub async fn readiness(&self) -> (Health, Health) {
        let store = match self.store.check().await {
            Ok(()) => Health::Ok,
            Err(e) => {
                tracing::warn!(error = %e, "store not ready");
                Health::Unavailable
            }
        };
        let kms = match &self.provider {
            None => Health::NotConfigured,
            Some(p) => match tokio::time::timeout(self.kms_ready_timeout, p.ready()).await {
                Ok(Ok(())) => Health::Ok,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "key provider not ready");
                    Health::Unavailable
                }
                Err(_) => {
                    tracing::warn!("key provider readiness check timed out");
                    Health::Unavailable
                }
            },
        };
        (store, kms)
    }
}

/// Levels of nesting of `v` (a scalar is 0, `[]` and `{}` are 1).
fn json_depth(v: &Value) -> usize {
    // serde_json parses at most 128 levels, so this recursion is bounded.
    match v {
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn view(tid: &ThreadId, id: MessageId, rec: &MessageRecord, body: Box<RawValue>) -> MessageView {
    MessageView {
        id,
        thread_id: tid.clone(),
        author: rec.author.clone(),
        body,
        created_at: rec.created_at.to_rfc3339(),
        updated_at: rec.updated_at.to_rfc3339(),
    }
}

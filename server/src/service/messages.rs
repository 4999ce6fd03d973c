//! Messages: sealed under the thread's current key for the rotation rule, posted, read
//! a page at a time (decrypted in one batch per key), edited and deleted.

use std::sync::Arc;

use kms_api::wire::{Bytes64, SecretBytes};
use kms_api::ThreadId;
use serde_json::Value;

use crate::api::{DeletedMessageView, ItemError, MessageItem, MessageView};
use crate::auth::Principal;
use crate::error::{ApiError, ErrorCode};
use crate::ids::{MessageId, Timestamp};
use crate::provider::{DecryptItem, EncryptItem, ProviderError, ThreadKey};
use crate::store::aad::{message_aad, MessageBinding};
use crate::store::{
    Content, DeleteMessage, MessageAttrs, MessageRecord, Order, PutMessage, RecordFormat, SealedBy,
    StoreError, StoredMessage, ThreadRecord, UpdateMessage,
};

use super::*;

impl MessageService {
    /// Stored form of `body` for message `id` of `thread` with the record `stamp` (author,
    /// times, edit count; its content is not read), in [`RecordFormat::CURRENT`], and the key
    /// id it is sealed under. The key
    /// is the one the thread's rotation rule names for `id` ([`ThreadRecord::sealed_by`]);
    /// the writer checks that again inside its transaction. A thread that has a DEK is
    /// always encrypted, whatever `encryption.enabled` says: plain content never enters an
    /// encrypted thread (a not yet migrated message of a plain thread being encrypted stays
    /// plain until the job reaches it).
    pub(super) async fn seal(
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
        attrs: MessageAttrs,
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
                role: attrs.role.clone(),
                reply_to: attrs.reply_to,
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
                        crate::service::jobs::maybe_rotate(self, &t);
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
        // A deleted message's tombstone is not a message.
        if stored
            .record
            .as_ref()
            .is_ok_and(MessageRecord::is_tombstone)
        {
            return Err(ApiError::NotFound);
        }
        match self.open_page(&thread, vec![stored]).await?.pop() {
            Some(MessageItem::Ok(v)) => Ok(v),
            Some(MessageItem::Deleted { .. }) => Err(ApiError::NotFound),
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
        // A deleted message's tombstone is no message to edit (and costs no KMS call).
        if old.is_tombstone() {
            return Err(ApiError::NotFound);
        }
        let rule = author_rule(p);
        if !rule.allows(&old.author) {
            return Err(ApiError::Forbidden);
        }
        // An edit seals the record's role and reply anew: never ones its AAD did not cover.
        if !old.attrs_bound() {
            tracing::error!(thread = %tid, message = %id, "record claims a role or reply its format does not bind (edited on disk); not edited");
            return Err(ApiError::MessageUnreadable);
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
                role: old.role.clone(),
                reply_to: old.reply_to,
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
                    if !old.attrs_bound() {
                        return Err(ApiError::MessageUnreadable);
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
    pub(super) async fn open_page(
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
            if !rec.attrs_bound() {
                tracing::error!(thread = %tid, message = %m.id, "record claims a role or reply its format does not bind (edited on disk): refused");
                out.push(Some(unreadable(m.id)));
                records.push(None);
                continue;
            }
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
                (Content::Deleted, _) => out.push(Some(MessageItem::Deleted {
                    id: m.id,
                    thread_id: tid.clone(),
                    author: rec.author.clone(),
                    created_at: rec.created_at,
                    updated_at: rec.updated_at,
                    deleted: true,
                })),
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
}

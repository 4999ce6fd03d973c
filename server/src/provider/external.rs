//! The external provider: `progressdb-kms` through [`kms_api::KmsClient`] (Unix socket or
//! HTTPS with mutual TLS; pooled connections, timeouts, bounded retries of safe calls).
//!
//! Single encrypt/decrypt calls go through a [`Coalescer`] each, which sends them to
//! `/encrypt_batch` / `/decrypt_batch` together with whatever else is waiting. Explicit batch
//! calls (a page of messages) go straight to the batch endpoints. Every batch stays within
//! `kms.max_batch_items` items and `kms.max_batch_bytes` of request body (the KMS refuses
//! bodies over its `limits.max_body_bytes` with 413); a batch the KMS still refuses as too
//! large is split in halves and sent again.
//!
//! With the `dev-embedded` feature and `kms.master_key_file` set, decryption of threads whose
//! DEK the dev master key wrapped (`kek_id = "embedded-master"`) falls back to local
//! decryption while the KMS is unreachable, with a warning in the log.

use std::fmt;
use std::sync::Arc;

use kms_api::wire::{
    Bytes64, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, ErrorDetail,
    ItemResult, SecretBytes, BATCH_FRAMING_BYTES, MAX_BATCH_ITEMS,
};
use kms_api::{ClientError, ErrorCode, KmsClient, ThreadId};

use super::coalesce::{split, BatchFn, BatchLimits, Coalescer};
use super::{
    BoxFuture, Ciphertext, DecryptItem, EncryptItem, ItemOutcome, KeyProvider, ProviderError,
    ProviderKind, ThreadKey,
};
use crate::metrics::{KmsMetrics, OpLabels};

/// Coalescing settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub max_batch_items: usize,
    /// Largest batch request body sent to the KMS (keep it at or below the KMS's
    /// `limits.max_body_bytes`).
    pub max_batch_bytes: usize,
    pub max_inflight_batches: usize,
    /// The most one provider call waits, the client's retries and the per-item retries of a
    /// batch included (`kms.deadline_ms`).
    pub deadline: std::time::Duration,
}

/// See the module documentation.
pub struct ExternalProvider {
    client: KmsClient,
    deadline: std::time::Duration,
    enc: Coalescer<EncryptRequest, EncryptResponse>,
    dec: Coalescer<DecryptRequest, DecryptResponse>,
    limits: BatchLimits,
    metrics: KmsMetrics,
    #[cfg(feature = "dev-embedded")]
    fallback: Option<Arc<super::embedded::MasterKey>>,
}

impl fmt::Debug for ExternalProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalProvider")
            .field("endpoints", &self.client.endpoints())
            .finish_non_exhaustive()
    }
}

/// Maps a whole-call client error.
pub fn map_client_error(e: ClientError) -> ProviderError {
    match e {
        // Both are 503 to the caller: retrying later may work.
        ClientError::Unavailable(m) | ClientError::Overloaded(m) => ProviderError::Unavailable(m),
        ClientError::Api { code, message, .. } => map_code(code, message),
        ClientError::Protocol(m) | ClientError::Config(m) => ProviderError::Internal(m),
    }
}

fn map_code(code: ErrorCode, message: String) -> ProviderError {
    match code {
        ErrorCode::UnknownKey => ProviderError::UnknownKey,
        ErrorCode::DecryptionFailed => ProviderError::DecryptionFailed,
        // The KMS's key store full: the KMS cannot take writes now (503 kms_unavailable here;
        // the server's own store is fine).
        ErrorCode::Unavailable
        | ErrorCode::Overloaded
        | ErrorCode::RateLimited
        | ErrorCode::StorageFull => ProviderError::Unavailable(message),
        ErrorCode::MalformedRequest
        | ErrorCode::InvalidBase64
        | ErrorCode::InvalidArgument
        | ErrorCode::NotFound
        | ErrorCode::MethodNotAllowed
        | ErrorCode::Forbidden
        | ErrorCode::PayloadTooLarge => {
            ProviderError::Rejected(format!("{}: {message}", code.as_str()))
        }
        // Admin-only codes: the server never calls the admin API, so meeting one is a bug;
        // and its idempotency keys are random per call, so a conflict is one too.
        ErrorCode::IdempotencyConflict
        | ErrorCode::Internal
        | ErrorCode::Unknown
        | ErrorCode::UnknownJob
        | ErrorCode::KekNotRetired
        | ErrorCode::KekInUse
        | ErrorCode::BackupInvalid
        | ErrorCode::DestroysUnknown
        | ErrorCode::ArchiveMismatch => {
            ProviderError::Internal(format!("{}: {message}", code.as_str()))
        }
    }
}

fn map_item<T>(r: ItemResult<T>) -> ItemOutcome<T> {
    match r {
        ItemResult::Ok(v) => Ok(v),
        ItemResult::Error(ErrorDetail { code, message }) => Err(map_code(code, message)),
    }
}

fn outcome_label<T>(r: &Result<T, ProviderError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(ProviderError::Unavailable(_)) => "unavailable",
        Err(ProviderError::UnknownKey) => "unknown_key",
        Err(ProviderError::DecryptionFailed) => "decryption_failed",
        Err(ProviderError::Rejected(_)) => "rejected",
        Err(ProviderError::Internal(_)) => "error",
    }
}

fn encrypt_request(item: EncryptItem) -> EncryptRequest {
    EncryptRequest {
        key_id: item.key.key_id.clone(),
        plaintext: item.plaintext,
        aad: Some(Bytes64(item.aad)),
    }
}

fn decrypt_request(item: &DecryptItem) -> DecryptRequest {
    DecryptRequest {
        key_id: item.key.key_id.clone(),
        ciphertext: Bytes64(item.ciphertext.clone()),
        aad: Some(Bytes64(item.aad.clone())),
    }
}

/// One batch endpoint of the KMS, as the two batch calls share their handling.
trait BatchOp: Sized + Send + Sync + 'static {
    type Resp: Send + 'static;
    const NAME: &'static str;
    fn call<'a>(
        client: &'a KmsClient,
        items: &'a [&'a Self],
    ) -> BoxFuture<'a, Result<Vec<ItemResult<Self::Resp>>, ClientError>>;
}

impl BatchOp for EncryptRequest {
    type Resp = EncryptResponse;
    const NAME: &'static str = "encrypt_batch";
    fn call<'a>(
        client: &'a KmsClient,
        items: &'a [&'a Self],
    ) -> BoxFuture<'a, Result<Vec<ItemResult<EncryptResponse>>, ClientError>> {
        Box::pin(client.encrypt_batch_refs(items))
    }
}

impl BatchOp for DecryptRequest {
    type Resp = DecryptResponse;
    const NAME: &'static str = "decrypt_batch";
    fn call<'a>(
        client: &'a KmsClient,
        items: &'a [&'a Self],
    ) -> BoxFuture<'a, Result<Vec<ItemResult<DecryptResponse>>, ClientError>> {
        Box::pin(client.decrypt_batch_refs(items))
    }
}

/// One batch call, then the items that failed `unavailable`/`overloaded` (a cold key while
/// the HSM is down or saturated; the KMS answers every item on its own) sent again with the
/// client's backoff, up to its `max_retries` times.
fn batch_call<'a, Op: BatchOp>(
    client: &'a KmsClient,
    metrics: &'a KmsMetrics,
    items: &'a [Op],
) -> BoxFuture<'a, Result<Vec<ItemOutcome<Op::Resp>>, ProviderError>> {
    Box::pin(async move {
        let all: Vec<&Op> = items.iter().collect();
        let mut out = batch_call_once(client, metrics, &all).await?;
        for attempt in 0..client.max_retries() {
            let retry: Vec<usize> = out
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r, Err(ProviderError::Unavailable(_))))
                .map(|(i, _)| i)
                .collect();
            if retry.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50u64 << attempt.min(6))).await;
            metrics.call(Op::NAME, "item_retry");
            let again: Vec<&Op> = retry.iter().filter_map(|&i| items.get(i)).collect();
            let results = batch_call_once(client, metrics, &again).await?;
            for (i, r) in retry.into_iter().zip(results) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = r;
                }
            }
        }
        Ok(out)
    })
}

/// One batch call. A `413` from the KMS (its `limits.max_body_bytes` is below
/// `kms.max_batch_bytes`) splits the batch in halves and sends each again, down to single
/// items; only a single item that is still too large fails, with that error.
fn batch_call_once<'a, Op: BatchOp>(
    client: &'a KmsClient,
    metrics: &'a KmsMetrics,
    items: &'a [&'a Op],
) -> BoxFuture<'a, Result<Vec<ItemOutcome<Op::Resp>>, ProviderError>> {
    Box::pin(async move {
        metrics
            .batch_items
            .get_or_create(&OpLabels { op: Op::NAME })
            .observe(items.len() as f64);
        let r = Op::call(client, items).await;
        match r {
            Err(ClientError::Api {
                code: ErrorCode::PayloadTooLarge,
                ..
            }) if items.len() > 1 => {
                metrics.call(Op::NAME, "split");
                tracing::warn!(
                    op = Op::NAME,
                    items = items.len(),
                    "the KMS refused a batch as too large; splitting it (lower kms.max_batch_bytes \
                     to the KMS's limits.max_body_bytes to avoid the extra round trip)"
                );
                let (left, right) = items.split_at(items.len() / 2);
                let mut out = batch_call_once(client, metrics, left).await?;
                out.extend(batch_call_once(client, metrics, right).await?);
                Ok(out)
            }
            other => {
                let r = other
                    .map(|v| v.into_iter().map(map_item).collect())
                    .map_err(map_client_error);
                metrics.call(Op::NAME, outcome_label(&r));
                r
            }
        }
    })
}

impl ExternalProvider {
    /// Starts the two coalescing dispatchers on the current tokio runtime.
    pub fn new(
        client: KmsClient,
        opts: Options,
        metrics: KmsMetrics,
        #[cfg(feature = "dev-embedded")] fallback: Option<Arc<super::embedded::MasterKey>>,
    ) -> Self {
        let limits = BatchLimits {
            max_items: opts.max_batch_items.clamp(1, MAX_BATCH_ITEMS),
            max_bytes: opts
                .max_batch_bytes
                .saturating_sub(BATCH_FRAMING_BYTES)
                .max(1),
        };
        let (c, m) = (client.clone(), metrics.clone());
        let enc_send: BatchFn<EncryptRequest, EncryptResponse> = Arc::new(move |items| {
            let (c, m) = (c.clone(), m.clone());
            Box::pin(async move { batch_call(&c, &m, &items).await })
        });
        let (c, m) = (client.clone(), metrics.clone());
        let dec_send: BatchFn<DecryptRequest, DecryptResponse> = Arc::new(move |items| {
            let (c, m) = (c.clone(), m.clone());
            Box::pin(async move { batch_call(&c, &m, &items).await })
        });
        let inflight = opts.max_inflight_batches;
        Self {
            enc: Coalescer::spawn(
                "encrypt",
                enc_send,
                limits,
                EncryptRequest::encoded_len,
                inflight,
            ),
            dec: Coalescer::spawn(
                "decrypt",
                dec_send,
                limits,
                DecryptRequest::encoded_len,
                inflight,
            ),
            limits,
            client,
            deadline: opts.deadline,
            metrics,
            #[cfg(feature = "dev-embedded")]
            fallback,
        }
    }

    /// `fut`, or `Unavailable` once the deadline has passed (the call is dropped: a cancelled
    /// create may leave an unused key in the KMS, never a thread without its key).
    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(r) => r,
            Err(_) => {
                self.metrics.call("any", "deadline");
                Err(ProviderError::Unavailable(format!(
                    "no answer from the KMS within kms.deadline_ms ({} ms)",
                    self.deadline.as_millis()
                )))
            }
        }
    }

    /// Local decryption with the dev master key, when allowed for this item.
    #[cfg(feature = "dev-embedded")]
    fn fallback_decrypt(&self, item: &DecryptItem) -> Option<ItemOutcome<SecretBytes>> {
        let key = self.fallback.as_ref()?;
        if item.key.kek_id.as_str() != super::embedded::KEK_ID {
            return None;
        }
        self.metrics.fallback_decrypts.inc();
        Some(key.decrypt(&item.key, &item.ciphertext, &item.aad))
    }

    #[cfg(not(feature = "dev-embedded"))]
    fn fallback_decrypt(&self, _item: &DecryptItem) -> Option<ItemOutcome<SecretBytes>> {
        None
    }

    /// Whether `key` was wrapped by the configured dev master key (dev builds only).
    #[cfg(feature = "dev-embedded")]
    fn wrapped_by_dev_master_key(&self, key: &ThreadKey) -> bool {
        self.fallback.is_some() && key.kek_id.as_str() == super::embedded::KEK_ID
    }

    #[cfg(not(feature = "dev-embedded"))]
    fn wrapped_by_dev_master_key(&self, _key: &ThreadKey) -> bool {
        false
    }

    async fn decrypt_all(
        &self,
        items: Vec<DecryptItem>,
    ) -> Result<Vec<ItemOutcome<SecretBytes>>, ProviderError> {
        let mut out = Vec::with_capacity(items.len());
        let weighed: Vec<(DecryptRequest, &DecryptItem)> =
            items.iter().map(|i| (decrypt_request(i), i)).collect();
        for chunk in split(weighed, self.limits, |(r, _)| r.encoded_len()) {
            let (reqs, chunk): (Vec<DecryptRequest>, Vec<&DecryptItem>) = chunk.into_iter().unzip();
            match batch_call(&self.client, &self.metrics, &reqs).await {
                Ok(rs) => out.extend(rs.into_iter().map(|r| r.map(|d| d.plaintext))),
                Err(ProviderError::Unavailable(m)) => {
                    let local: Option<Vec<_>> =
                        chunk.iter().map(|i| self.fallback_decrypt(i)).collect();
                    drop(reqs);
                    match local {
                        Some(rs) => {
                            tracing::warn!(
                                items = rs.len(),
                                "KMS unreachable: decrypted with the local dev master key"
                            );
                            out.extend(rs);
                        }
                        None => return Err(ProviderError::Unavailable(m)),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

impl KeyProvider for ExternalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::External
    }

    fn create_dek_for_thread<'a>(
        &'a self,
        thread: &'a ThreadId,
    ) -> BoxFuture<'a, Result<ThreadKey, ProviderError>> {
        Box::pin(async move {
            let r = self
                .within(async {
                    self.client
                        .create_dek_for_thread(thread)
                        .await
                        .map_err(map_client_error)
                })
                .await
                .map(|r| ThreadKey {
                    key_id: r.key_id,
                    wrapped_dek: r.wrapped,
                    kek_id: r.kek_id,
                    kek_version: r.kek_version,
                });
            self.metrics
                .call("create_dek_for_thread", outcome_label(&r));
            r
        })
    }

    fn encrypt(&self, item: EncryptItem) -> BoxFuture<'_, Result<Ciphertext, ProviderError>> {
        Box::pin(async move {
            self.within(self.enc.call(encrypt_request(item)))
                .await
                .map(|r| Ciphertext(r.ciphertext.0))
        })
    }

    fn decrypt(&self, item: DecryptItem) -> BoxFuture<'_, Result<SecretBytes, ProviderError>> {
        Box::pin(async move {
            match self.within(self.dec.call(decrypt_request(&item))).await {
                Ok(r) => Ok(r.plaintext),
                Err(ProviderError::Unavailable(m)) => match self.fallback_decrypt(&item) {
                    Some(r) => {
                        tracing::warn!("KMS unreachable: decrypted with the local dev master key");
                        r
                    }
                    None => Err(ProviderError::Unavailable(m)),
                },
                Err(e) => Err(e),
            }
        })
    }

    fn encrypt_batch(
        &self,
        items: Vec<EncryptItem>,
    ) -> BoxFuture<'_, Result<Vec<ItemOutcome<Ciphertext>>, ProviderError>> {
        Box::pin(self.within(async move {
            let mut out = Vec::with_capacity(items.len());
            let reqs: Vec<EncryptRequest> = items.into_iter().map(encrypt_request).collect();
            for chunk in split(reqs, self.limits, EncryptRequest::encoded_len) {
                let rs = batch_call(&self.client, &self.metrics, &chunk).await?;
                out.extend(
                    rs.into_iter()
                        .map(|r| r.map(|e| Ciphertext(e.ciphertext.0))),
                );
            }
            Ok(out)
        }))
    }

    fn decrypt_batch(
        &self,
        items: Vec<DecryptItem>,
    ) -> BoxFuture<'_, Result<Vec<ItemOutcome<SecretBytes>>, ProviderError>> {
        Box::pin(self.within(self.decrypt_all(items)))
    }

    fn destroy_key<'a>(&'a self, key: &'a ThreadKey) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let r = match self
                .within(async {
                    self.client
                        .destroy_key(&key.key_id)
                        .await
                        .map_err(map_client_error)
                })
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => match e {
                    // A DEK that the dev master key wrapped was never known to this KMS:
                    // deleting the thread's wrapped copy is its shredding.
                    ProviderError::UnknownKey if self.wrapped_by_dev_master_key(key) => Ok(()),
                    // Anything else the KMS does not know cannot be called shredded: the
                    // caller reports it instead of deleting the thread.
                    other => Err(other),
                },
            };
            self.metrics.call("destroy_key", outcome_label(&r));
            r
        })
    }

    fn current_copy<'a>(
        &'a self,
        key: &'a ThreadKey,
    ) -> BoxFuture<'a, Result<ThreadKey, ProviderError>> {
        Box::pin(async move {
            if self.wrapped_by_dev_master_key(key) {
                return Ok(key.clone());
            }
            let r = self
                .within(async {
                    self.client
                        .get_wrapped(&key.key_id)
                        .await
                        .map_err(map_client_error)
                })
                .await
                .map(|w| ThreadKey {
                    key_id: key.key_id.clone(),
                    wrapped_dek: w.wrapped,
                    kek_id: w.kek_id,
                    kek_version: w.kek_version,
                });
            self.metrics.call("get_wrapped", outcome_label(&r));
            r
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move { self.client.ready().await.map_err(map_client_error) })
    }
}

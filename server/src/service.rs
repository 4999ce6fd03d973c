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

use kms_api::wire::SecretBytes;
use kms_api::ThreadId;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::MessageView;
use crate::auth::{ApiKeys, Principal, Role};
use crate::cache::ThreadCache;
use crate::error::ApiError;
use crate::ids::{MessageId, MessageIdGen, UserId};
use crate::metrics::Metrics;
use crate::provider::{KeyProvider, ProviderError, ThreadKey};
use crate::store::{AuthorRule, MessageRecord, Store, ThreadRecord};

mod admin;
pub mod job_state;
pub mod jobs;
mod messages;
mod pages;
pub use pages::ThreadMatch;
mod verify;
pub use verify::{KeyCheck, ThreadCheck};
mod threads;

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
    store: Store,
    provider: Option<Arc<dyn KeyProvider>>,
    encryption: Encryption,
    keys: ApiKeys,
    cache: ThreadCache,
    ids: MessageIdGen,
    metrics: Arc<Metrics>,
    limits: Limits,
    kms_ready_timeout: Duration,
    /// Connection admission of the HTTP listener (shared with `/metrics`).
    gate: std::sync::Arc<service_kit::conn::ConnectionGate>,
    /// When thread keys are rotated without being asked.
    rotation_policy: crate::service::job_state::RotationPolicy,
    /// Jobs this process drives now.
    running: crate::service::job_state::Running,
    /// Requests a second per API key and user (`limits.key_rate_per_sec`).
    key_rate: service_kit::rate::RateLimiter<(crate::auth::ApiKeyId, Option<UserId>)>,
    /// Users whose signatures were revoked.
    signature_generations: crate::auth::SignatureGenerations,
    /// Held while a backup is made and sent: one at a time.
    backups: Arc<tokio::sync::Mutex<()>>,
}

/// What [`MessageService::new`] is built from besides the config: the parts that take I/O
/// to make (the store opened, the provider built, the keys file read).
#[derive(Debug)]
pub struct ServiceDeps {
    pub store: Store,
    pub provider: Option<Arc<dyn KeyProvider>>,
    pub keys: ApiKeys,
    pub metrics: Arc<Metrics>,
    pub gate: Arc<service_kit::conn::ConnectionGate>,
    pub signature_generations: crate::auth::SignatureGenerations,
}

impl MessageService {
    /// The service of `cfg` (validated) over `deps`.
    pub fn new(cfg: &crate::config::Config, deps: ServiceDeps) -> Self {
        let encryption = if cfg.encryption.enabled {
            Encryption::Enabled
        } else {
            tracing::warn!(
                "encryption.enabled = false: new message content is stored in plain form"
            );
            Encryption::Disabled
        };
        Self {
            store: deps.store,
            provider: deps.provider,
            encryption,
            keys: deps.keys,
            cache: ThreadCache::new(
                cfg.limits.thread_cache_entries,
                cfg.limits.thread_cache_bytes,
            ),
            key_rate: service_kit::rate::RateLimiter::new(service_kit::rate::RateLimit {
                per_sec: cfg.limits.key_rate_per_sec,
                burst: cfg.limits.key_rate_burst,
            }),
            ids: MessageIdGen::new(),
            backups: Arc::new(tokio::sync::Mutex::new(())),
            metrics: deps.metrics,
            limits: Limits {
                default_page_size: cfg.limits.default_page_size.min(cfg.limits.max_page_size),
                max_page_size: cfg.limits.max_page_size,
                max_page_bytes: cfg.limits.max_page_bytes,
                max_title_bytes: cfg.limits.max_title_bytes,
                max_metadata_bytes: cfg.limits.max_metadata_bytes,
                max_metadata_depth: cfg.limits.max_metadata_depth,
                threads_per_user: match cfg.limits.max_threads_per_user {
                    0 => crate::store::ThreadsPerAuthor::Unlimited,
                    n => crate::store::ThreadsPerAuthor::AtMost(n),
                },
            },
            signature_generations: deps.signature_generations,
            kms_ready_timeout: cfg.kms.ready_timeout(),
            gate: deps.gate,
            rotation_policy: job_state::RotationPolicy {
                max_running: cfg.encryption.max_concurrent_rotations,
                after_messages: cfg.encryption.rotate_after_messages,
                after_age: match cfg.encryption.rotate_after_days {
                    0 => None,
                    d => Some(Duration::from_secs(d.saturating_mul(86_400))),
                },
            },
            running: job_state::Running::default(),
        }
    }

    /// The store (for tools and tests; requests go through the service's methods).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The thread cache (tests invalidate it to read what they planted).
    pub fn cache(&self) -> &ThreadCache {
        &self.cache
    }

    /// The key provider, if one is configured.
    pub fn key_provider(&self) -> Option<&dyn KeyProvider> {
        self.provider.as_deref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Connection admission of the HTTP listener.
    pub fn gate(&self) -> &Arc<service_kit::conn::ConnectionGate> {
        &self.gate
    }
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
        created_at: rec.created_at,
        updated_at: rec.updated_at,
        role: rec.role.clone(),
        reply_to: rec.reply_to,
    }
}

//! `POST /admin/verify`: a page of threads checked as a restore or a KMS change should leave
//! them: each thread's keys still known to the KMS, and every message (or every n-th) opening
//! under them. `progressdb verify` walks every page.

use kms_api::ThreadId;
use serde::Serialize;

use crate::api::MessageItem;
use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::provider::{ProviderError, ThreadKey};
use crate::store::Order;

use super::*;

/// What the KMS says of one of a thread's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyCheck {
    /// Known and usable.
    Ok,
    /// Not known (destroyed, or never made by this KMS): the thread cannot be read.
    Missing,
    /// The KMS answered with an error (detail in the server log).
    Error,
    /// The thread is stored without encryption.
    None,
    /// The thread record, which names the keys, does not parse (or is another thread's):
    /// nothing of the thread can be read.
    Unknown,
}

/// One thread's check.
#[derive(Debug, Clone, Serialize)]
pub struct ThreadCheck {
    pub thread: ThreadId,
    /// Whether the thread is whole ([`ThreadCheck::ok`]): clients read this, not the parts.
    pub ok: bool,
    /// `false` when the thread record does not parse (the server log says why).
    pub record_readable: bool,
    pub key: KeyCheck,
    /// The retiring key of a DEK rotation in progress, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retiring_key: Option<KeyCheck>,
    /// Messages opened (every one, or every `sample`-th).
    pub messages_checked: u64,
    /// Of those, the ones that did not open.
    pub unreadable: u64,
}

impl ThreadCheck {
    fn new(
        thread: ThreadId,
        key: KeyCheck,
        retiring_key: Option<KeyCheck>,
        (messages_checked, unreadable): (u64, u64),
    ) -> Self {
        let record_readable = key != KeyCheck::Unknown;
        let ok = record_readable
            && matches!(key, KeyCheck::Ok | KeyCheck::None)
            && retiring_key.is_none_or(|k| k == KeyCheck::Ok)
            && unreadable == 0;
        Self {
            thread,
            ok,
            record_readable,
            key,
            retiring_key,
            messages_checked,
            unreadable,
        }
    }

    /// The thread's record is readable, its keys are known to the KMS, and every message
    /// checked opened.
    pub fn ok(&self) -> bool {
        self.ok
    }
}

/// Messages read per step of one thread's check.
const VERIFY_BATCH: usize = 500;

impl MessageService {
    /// Checks up to `limit` threads after `after` (id order), opening every `sample`-th
    /// message (1: all); returns the checks and the cursor of the next page.
    ///
    /// # Errors
    /// 403 for non-admin callers; 503 when the KMS cannot be reached (checks cannot tell a
    /// missing key from an outage then: retry).
    pub async fn verify_threads(
        &self,
        p: &Principal,
        after: Option<ThreadId>,
        limit: usize,
        sample: u64,
    ) -> Result<(Vec<ThreadCheck>, Option<ThreadId>), ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let sample = sample.max(1);
        let page = self
            .store
            .thread_entries(after, limit.clamp(1, 1000))
            .await?;
        let next = if page.more {
            page.items.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        let mut out = Vec::with_capacity(page.items.len());
        for (id, record) in page.items {
            let t = match record {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(thread = %id, error = %e, "verify: the thread record does not parse");
                    out.push(ThreadCheck::new(id, KeyCheck::Unknown, None, (0, 0)));
                    continue;
                }
            };
            let key = match &t.kms {
                None => KeyCheck::None,
                Some(k) => self.check_key(&t.id, k).await?,
            };
            let retiring_key = match t.rotation.as_ref().and_then(|r| r.retiring.as_ref()) {
                None => None,
                Some(k) => Some(self.check_key(&t.id, k).await?),
            };
            let messages = self.check_messages(&t.id, sample).await?;
            out.push(ThreadCheck::new(t.id, key, retiring_key, messages));
        }
        Ok((out, next))
    }

    async fn check_key(&self, thread: &ThreadId, k: &ThreadKey) -> Result<KeyCheck, ApiError> {
        match self.provider()?.current_copy(k).await {
            Ok(_) => Ok(KeyCheck::Ok),
            Err(ProviderError::UnknownKey) => Ok(KeyCheck::Missing),
            Err(ProviderError::Unavailable(m)) => {
                tracing::warn!(thread = %thread, error = %m, "verify: the KMS is unavailable");
                Err(ApiError::KmsUnavailable)
            }
            Err(e) => {
                tracing::error!(thread = %thread, key_id = %k.key_id, error = %e, "verify: the KMS refused a key");
                Ok(KeyCheck::Error)
            }
        }
    }

    /// Opens every `sample`-th message of `thread`: (opened, of which unreadable).
    async fn check_messages(&self, thread: &ThreadId, sample: u64) -> Result<(u64, u64), ApiError> {
        let (mut checked, mut unreadable, mut seen) = (0u64, 0u64, 0u64);
        let mut after = None;
        loop {
            let (rec, page) = self
                .store
                .messages_with_thread(
                    thread,
                    Order::Asc,
                    after,
                    VERIFY_BATCH,
                    self.limits.max_page_bytes,
                )
                .await?;
            let Some(rec) = rec else {
                // Deleted meanwhile.
                return Ok((checked, unreadable));
            };
            after = page.items.last().map(|m| m.id);
            let picked: Vec<_> = page
                .items
                .into_iter()
                .filter(|_| {
                    seen += 1;
                    (seen - 1) % sample == 0
                })
                .collect();
            for item in self.open_page(&rec, picked).await? {
                checked += 1;
                if matches!(item, MessageItem::Unreadable { .. }) {
                    unreadable += 1;
                }
            }
            if !page.more || after.is_none() {
                return Ok((checked, unreadable));
            }
        }
    }
}

//! Authentication and signing, the admin views of a thread's key and the server's key
//! copies, and readiness.

use kms_api::ThreadId;
use serde_json::Value;

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::ids::UserId;
use crate::provider::{ProviderError, ThreadKey};
use crate::store::ThreadFilter;

use super::*;

impl MessageService {
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
        let mut pages = self.store.thread_pages(ThreadFilter::All, 256);
        while let Some(page) = pages.next().await? {
            for t in &page {
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
        let mut pages = self.store.thread_pages(ThreadFilter::All, 256);
        while let Some(page) = pages.next().await? {
            for t in &page {
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

    /// Starts job `kind` on thread `id` for admin `p` (202), or returns the one already
    /// running (`false`).
    ///
    /// # Errors
    /// 404 for a thread `p` cannot see, 409 when the job cannot start, 503 without a KMS.
    pub async fn start_job(
        self: &Arc<Self>,
        p: &Principal,
        id: &ThreadId,
        kind: crate::store::JobKind,
    ) -> Result<(crate::store::JobRecord, bool), ApiError> {
        self.thread_for(p, id).await?;
        jobs::start(self, id, kind, "admin").await
    }

    /// The job `id` (`GET /admin/jobs/{id}`).
    ///
    /// # Errors
    /// 404 for an unknown job, or a store error.
    pub async fn job(
        &self,
        id: &kms_api::admin::JobId,
    ) -> Result<crate::store::JobRecord, ApiError> {
        self.store.get_job(id).await?.ok_or(ApiError::NotFound)
    }

    /// Every job record (`GET /admin/jobs`).
    ///
    /// # Errors
    /// A store error.
    pub async fn jobs(&self) -> Result<Vec<crate::store::JobRecord>, ApiError> {
        Ok(self.store.jobs().await?)
    }

    /// Users who have threads, in store order, after `after` (admin callers).
    ///
    /// # Errors
    /// 403 for other callers; 400 for a bad cursor or limit.
    pub async fn users(
        &self,
        p: &Principal,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(crate::store::Page<UserId>, u64), ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let limit = self.page_size(limit)?;
        let after = after
            .filter(|a| !a.is_empty())
            .map(|a| {
                UserId::parse(a).map_err(|_| ApiError::invalid("invalid cursor: not a user id"))
            })
            .transpose()?;
        Ok(self.store.users(after, limit).await?)
    }

    /// Starts the encryption job of every thread that is not wholly encrypted (no key yet, or
    /// a key given later with plain messages from before it) (admin callers); each thread's
    /// outcome: its job, `None` when it is encrypted already, or why it did not start. The
    /// job decides (`AlreadyEncrypted`), not this loop.
    ///
    /// # Errors
    /// 403 for other callers; a store error while listing.
    #[allow(clippy::type_complexity)]
    pub async fn encrypt_plain_threads(
        self: &Arc<Self>,
        p: &Principal,
    ) -> Result<Vec<(ThreadId, Result<Option<crate::store::JobRecord>, ApiError>)>, ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let mut out = Vec::new();
        let mut pages = self.store.thread_pages(ThreadFilter::All, 500);
        while let Some(page) = pages.next().await? {
            for t in page {
                let r = match self
                    .start_job(p, &t.id, crate::store::JobKind::EncryptThread)
                    .await
                {
                    Ok((job, _)) => Ok(Some(job)),
                    Err(ApiError::AlreadyEncrypted) => Ok(None),
                    Err(e) => Err(e),
                };
                out.push((t.id, r));
            }
        }
        Ok(out)
    }

    /// A backup of the store (admin callers), and the permit that keeps others from starting
    /// until it is sent: LMDB's compacting copy under one read transaction, summarised from
    /// the copy ([`crate::backup`]).
    ///
    /// # Errors
    /// 403 for other callers; 503 while another backup runs; 500 when the copy fails (detail
    /// in the log).
    pub async fn backup(
        &self,
        p: &Principal,
    ) -> Result<(crate::backup::Snapshot, tokio::sync::OwnedMutexGuard<()>), ApiError> {
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden);
        }
        let permit = self
            .backups
            .clone()
            .try_lock_owned()
            .map_err(|_| ApiError::Unavailable)?;
        // In a task of its own that owns the permit: a caller that goes away mid-copy does
        // not stop the copy (it runs on a blocking thread), so the permit and the temporary
        // copy are released only when the copy is done, and a second backup waits for it.
        let store = self.store.clone();
        let now = crate::ids::Timestamp::now().as_nanos();
        let (made, permit) =
            tokio::spawn(async move { (crate::backup::snapshot(&store, now).await, permit) })
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "backup task failed");
                    ApiError::Internal
                })?;
        let snap = made.map_err(|e| {
            tracing::error!(error = %e, "backup failed");
            match e {
                crate::backup::BackupError::NoSpace { .. } => ApiError::StorageFull,
                crate::backup::BackupError::OnPostgres => ApiError::NotImplemented,
                crate::backup::BackupError::Invalid(_)
                | crate::backup::BackupError::NotEmpty(_)
                | crate::backup::BackupError::Store(_)
                | crate::backup::BackupError::Io(_) => ApiError::Internal,
            }
        })?;
        tracing::info!(
            threads = snap.manifest.summary.threads,
            messages = snap.manifest.summary.messages,
            bytes = snap.manifest.data_bytes,
            "backup made"
        );
        Ok((snap, permit))
    }
}

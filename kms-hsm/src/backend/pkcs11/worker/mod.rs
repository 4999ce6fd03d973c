//! Worker threads: each owns one PKCS#11 session and runs jobs sent over its bounded queue.
//!
//! # Recovery
//! A job that fails because the session, the login or the KEK handle is gone is answered by
//! one of three steps, then retried once:
//! * **re-login** (`CKR_USER_NOT_LOGGED_IN`, `CKR_KEY_HANDLE_INVALID`,
//!   `CKR_OBJECT_HANDLE_INVALID`): log in again on the same session (unless the PIN latch is
//!   set) and look the KEK up again;
//! * **library reset** (the session itself is gone: `CKR_SESSION_HANDLE_INVALID`,
//!   `CKR_SESSION_CLOSED`, `CKR_DEVICE_ERROR`, `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`,
//!   `CKR_TOKEN_NOT_RECOGNIZED`, `CKR_CRYPTOKI_NOT_INITIALIZED`; or the KEK or the token is
//!   no longer found after a re-login): [`Pkcs11Context::reset`], which closes every session
//!   of the process and makes the library rescan its slots, then reopen;
//! * **reopen** (the generation moved on because another worker reset the library): open a
//!   new session, log in if the process is no longer logged in, find and check the KEK.
//!
//! While a worker has no session it is unhealthy (so `/readyz` is 503) and retries in the
//! background with a backoff (100 ms doubling to 5 s), without any request; jobs meanwhile
//! fail fast with `Unavailable`. A job that waited in the queue past its deadline is answered
//! `Unavailable` without touching the HSM.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use kms_api::{KeyId, WrappedDek};
use secrecy::SecretString;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::context::Pkcs11Context;
use super::token::{classify, describe, Disposition, OpError};
use crate::backend::{
    BackendError, Dek, DekResidency, KekRef, ResidentItem, ResidentKey, WrapFormat,
};

mod live;
mod ops;
mod recovery;

use live::{Live, ResidentObjects};
use ops::*;
use recovery::{Backoff, Recovery};

/// Everything the workers and the backend handle share.
pub(super) struct WorkerPool {
    pub(super) ctx: &'static Pkcs11Context,
    pub(super) token_label: String,
    pub(super) audit_label: String,
    /// Label of the key that binds `AesKwV3` blobs (`hsm.binding_key_label`).
    pub(super) binding_label: String,
    /// The last KEK version that may hold `AesKwV2` blobs ([`token::legacy_until`]).
    pub(super) legacy_until: u32,
    pub(super) pin: SecretString,
    pub(super) current: RwLock<KekRef>,
    pub(super) calls: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) recoveries: AtomicU64,
    /// Whether the refused-PIN alert was logged.
    pub(super) alerted: AtomicBool,
    /// KEK versions found (and checked) at least once by this pool: if one of them is no
    /// longer found, the token lost objects, which calls for a library reset. A version never
    /// seen (a forged or future header) is just not found.
    pub(super) known_keks: RwLock<std::collections::HashSet<KekRef>>,
    /// KEK versions this process destroyed: never looked up again, even through a handle a
    /// session cached before the destroy.
    pub(super) destroyed_keks: RwLock<std::collections::HashSet<kms_api::KekVersion>>,
    pub(super) slots: Vec<WorkerSlot>,
    /// Where DEKs live (`hsm.dek_residency`).
    pub(super) residency: DekResidency,
    /// DEK session objects each worker keeps in hsm residency.
    pub(super) resident_cap: usize,
    /// IVs of messages encrypted in the HSM (not secret; unique per message with
    /// overwhelming probability, as in memory mode).
    pub(super) rng: ring::rand::SystemRandom,
    /// DEK session objects made (unwrapped or generated) in hsm residency.
    pub(super) resident_loads: AtomicU64,
    /// DEKs of `AesGcmV1` blobs that had to pass through this process to become session
    /// objects (hsm residency before the rotation to a wrap-class KEK finished).
    pub(super) imports: AtomicU64,
}

impl WorkerPool {
    /// Whether KEK `(id, version)` was found before by this pool.
    fn knows(&self, id: &kms_api::KekId, version: kms_api::KekVersion) -> bool {
        self.known_keks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&KekRef {
                id: id.clone(),
                version,
            })
    }

    fn is_destroyed(&self, version: kms_api::KekVersion) -> bool {
        self.destroyed_keks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&version)
    }

    pub(super) fn current_kek(&self) -> KekRef {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Per-worker state visible to the dispatcher.
pub(super) struct WorkerSlot {
    /// The worker has a session it believes usable.
    pub(super) healthy: AtomicBool,
    /// Jobs sent to the worker and not finished yet.
    pub(super) inflight: AtomicUsize,
    /// Library generation of the worker's open session, or [`NO_SESSION`]. A session of an
    /// older generation was closed by a reset, so the sessions open now are exactly the
    /// slots whose value is the current generation.
    pub(super) session_generation: AtomicU64,
}

/// [`WorkerSlot::session_generation`] of a worker without a session.
pub(super) const NO_SESSION: u64 = u64::MAX;

impl Default for WorkerSlot {
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            session_generation: AtomicU64::new(NO_SESSION),
        }
    }
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, BackendError>>;

/// What a job asks of the HSM.
pub(super) enum HsmOp {
    Generate {
        key_id: KeyId,
        reply: Reply<(Dek, WrappedDek, KekRef)>,
    },
    /// `kek` comes from the caller's KEK id and the blob's parsed header.
    Unwrap {
        key_id: KeyId,
        kek: KekRef,
        format: WrapFormat,
        wrapped: WrappedDek,
        reply: Reply<Dek>,
    },
    /// Unwrap under `kek` (an older version), then wrap the same DEK under the current KEK.
    Rewrap {
        key_id: KeyId,
        kek: KekRef,
        format: WrapFormat,
        wrapped: WrappedDek,
        reply: Reply<(WrappedDek, KekRef)>,
    },
    /// Extend the audit chain from `prev` over `messages` (HMAC-SHA256 in the HSM).
    AuditChain {
        prev: [u8; 32],
        messages: Vec<Vec<u8>>,
        reply: Reply<Vec<[u8; 32]>>,
    },
    Health {
        reply: Reply<()>,
    },
    /// Hsm residency: a DEK generated as a key object and wrapped by the HSM.
    GenerateResident {
        key_id: KeyId,
        reply: Reply<(WrappedDek, KekRef)>,
    },
    /// Hsm residency: encrypt each item under `key`'s session object.
    SealResident {
        key: ResidentKey,
        kek: KekRef,
        format: WrapFormat,
        items: Vec<ResidentItem>,
        reply: Reply<Vec<Result<Vec<u8>, BackendError>>>,
    },
    /// Hsm residency: decrypt each item under `key`'s session object.
    OpenResident {
        key: ResidentKey,
        kek: KekRef,
        format: WrapFormat,
        items: Vec<ResidentItem>,
        reply: Reply<Vec<Result<Zeroizing<Vec<u8>>, BackendError>>>,
    },
    /// Check that a wrapped DEK unwraps and authenticates (no DEK handed out).
    Check {
        key_id: KeyId,
        kek: KekRef,
        format: WrapFormat,
        wrapped: WrappedDek,
        reply: Reply<()>,
    },
    /// Destroy this worker's session object of a DEK, if it has one.
    Forget {
        key_id: KeyId,
    },
}

/// An HSM request (one operation for a worker) and the time after which nobody waits for
/// its answer any more.
pub(super) struct HsmRequest {
    pub(super) kind: HsmOp,
    pub(super) deadline: Instant,
}

pub(super) struct Worker {
    index: usize,
    pool: Arc<WorkerPool>,
    live: Option<Live>,
    backoff: Option<Backoff>,
    opened_once: bool,
    /// Set when this worker's session was lost but the reset was refused by the rate limit:
    /// the generation it saw. The worker opens no session until the library was reset (a new
    /// session in the same generation could get a handle another worker still holds).
    awaiting_reset: Option<u64>,
}

/// Marks the worker unhealthy if its thread ends for any reason (including a panic).
struct ExitGuard(Arc<WorkerPool>, usize);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.0.slots.get(self.1) {
            slot.healthy.store(false, Ordering::Release);
        }
    }
}

impl Worker {
    pub(super) fn new(index: usize, pool: Arc<WorkerPool>) -> Self {
        Self {
            index,
            pool,
            live: None,
            backoff: None,
            opened_once: false,
            awaiting_reset: None,
        }
    }

    fn slot(&self) -> Option<&WorkerSlot> {
        self.pool.slots.get(self.index)
    }

    fn set_healthy(&self, healthy: bool) {
        if let Some(slot) = self.slot() {
            slot.healthy.store(healthy, Ordering::Release);
        }
    }

    fn set_session(&self, generation: u64) {
        if let Some(slot) = self.slot() {
            slot.session_generation.store(generation, Ordering::Release);
        }
    }

    /// Opens the first session; the outcome is reported to `Pkcs11Backend::open`.
    pub(super) fn start(&mut self) -> Result<(), BackendError> {
        self.reopen()
    }

    /// The thread body: serve jobs until every sender is dropped.
    pub(super) fn run(mut self, jobs: Receiver<HsmRequest>) {
        let _exit = ExitGuard(Arc::clone(&self.pool), self.index);
        loop {
            let job = if self.live.is_some() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            } else {
                // No session: heal in the background so readiness comes back without traffic.
                let wait = self
                    .backoff
                    .as_ref()
                    .map_or(Duration::ZERO, |b| {
                        b.retry_at.saturating_duration_since(Instant::now())
                    })
                    .max(Duration::from_millis(1));
                match jobs.recv_timeout(wait) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        // Failure is logged and backs off inside `reopen`.
                        let _ = self.reopen();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            self.handle(job);
            if let Some(slot) = self.slot() {
                slot.inflight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(live) = self.live.take() {
            let _g = self.pool.ctx.read_gate();
            // Close only a session of the current generation; an older one is already gone.
            if live.generation == self.pool.ctx.generation() {
                self.close(live);
            }
        }
        tracing::debug!(worker = self.index, "HSM worker stopped");
    }

    /// Closes a session this worker opened in the current generation. Call under the gate.
    fn close(&self, live: Live) {
        self.set_session(NO_SESSION);
        if let Err(e) = live.session.close() {
            tracing::debug!(worker = self.index, error = %e, "closing HSM session");
        }
    }

    fn handle(&mut self, job: HsmRequest) {
        let expired = Instant::now() > job.deadline;
        tracing::trace!(expired, "HSM job taken by a worker");
        let late = || {
            BackendError::Unavailable("the HSM job waited in the queue past its deadline".into())
        };
        match job.kind {
            HsmOp::Generate { key_id, reply } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let kek = self.pool.current_kek();
                let res = self.run_op(|live| generate(live, &key_id, &kek));
                // The receiver may have gone (caller cancelled): the DEK is dropped and zeroized.
                let _ = reply.send(res);
            }
            HsmOp::Unwrap {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let res = self.run_op(|live| unwrap(live, &key_id, &kek, format, &wrapped));
                let _ = reply.send(res);
            }
            HsmOp::Rewrap {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let current = self.pool.current_kek();
                let pool = Arc::clone(&self.pool);
                let res = self.run_op(|live| {
                    let blob = rewrap(live, &pool, &key_id, &kek, format, &wrapped, &current)?;
                    Ok((blob, current.clone()))
                });
                let _ = reply.send(res);
            }
            HsmOp::AuditChain {
                prev,
                messages,
                reply,
            } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let label = self.pool.audit_label.clone();
                let res = self.run_op(|live| audit_chain(live, &label, prev, &messages));
                let _ = reply.send(res);
            }
            HsmOp::GenerateResident { key_id, reply } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let kek = self.pool.current_kek();
                let pool = Arc::clone(&self.pool);
                let res = self.run_op(|live| generate_resident(live, &pool, &key_id, &kek));
                let _ = reply.send(res);
            }
            HsmOp::SealResident {
                key,
                kek,
                format,
                items,
                reply,
            } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let pool = Arc::clone(&self.pool);
                let res = self.run_op(|live| {
                    let h = resident_handle(live, &pool, &key, &kek, format)?;
                    items
                        .iter()
                        .map(|item| seal_message(live, &pool, h, item))
                        .collect::<Result<Vec<_>, OpError>>()
                });
                let _ = reply.send(res);
            }
            HsmOp::OpenResident {
                key,
                kek,
                format,
                items,
                reply,
            } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let pool = Arc::clone(&self.pool);
                let res = self.run_op(|live| {
                    let h = resident_handle(live, &pool, &key, &kek, format)?;
                    items
                        .iter()
                        .map(|item| open_message(live, h, item))
                        .collect::<Result<Vec<_>, OpError>>()
                });
                let _ = reply.send(res);
            }
            HsmOp::Check {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let res = self.run_op(|live| check_wrapped(live, &key_id, &kek, format, &wrapped));
                let _ = reply.send(res);
            }
            HsmOp::Forget { key_id } => {
                if let Some(live) = self.live.as_mut() {
                    let _g = self.pool.ctx.read_gate();
                    if live.generation == self.pool.ctx.generation() {
                        if let Some(h) = live.resident.remove(&key_id) {
                            if let Err(e) = live.session.destroy_object(h) {
                                tracing::debug!(error = %e, "destroying a forgotten DEK session object");
                            }
                        }
                    }
                }
            }
            HsmOp::Health { reply } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let kek = self.pool.current_kek();
                let res = self.run_op(|live| health(live, &kek)).map_err(|e| match e {
                    BackendError::Unavailable(m) => BackendError::Unavailable(m),
                    other => BackendError::Unavailable(other.to_string()),
                });
                let _ = reply.send(res);
            }
        }
    }

    fn count_error(&self) {
        self.pool.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `op` on this worker's session, recovering once (see the module docs).
    fn run_op<T>(
        &mut self,
        mut op: impl FnMut(&mut Live) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        self.pool.calls.fetch_add(1, Ordering::Relaxed);
        let mut retried = false;
        loop {
            let gate = match self.acquire() {
                Ok(g) => g,
                Err(e) => {
                    self.count_error();
                    return Err(e);
                }
            };
            let Some(live) = self.live.as_mut() else {
                // `acquire` returns Ok only with a live session.
                self.count_error();
                return Err(BackendError::Internal("HSM worker has no session".into()));
            };
            let outcome = op(live);
            drop(gate);
            let recovery = match outcome {
                Ok(v) => return Ok(v),
                Err(OpError::Backend(BackendError::InvalidWrapped)) => {
                    return Err(BackendError::InvalidWrapped)
                }
                // A KEK that a running KMS used to find is gone: the token lost its objects
                // (SoftHSM after its files moved) or is being replaced. Only a library reset
                // makes such a token be read again.
                Err(OpError::Backend(BackendError::KekNotFound { id, version }))
                    if self.pool.knows(&id, version) =>
                {
                    Recovery::Reset(format!("KEK {id} version {version} no longer found"))
                }
                Err(OpError::Backend(e)) => {
                    self.count_error();
                    return Err(self.runtime_error(e));
                }
                Err(OpError::Pkcs11 { func, rv }) => match classify(func, rv) {
                    Disposition::AuthFailed => return Err(BackendError::InvalidWrapped),
                    Disposition::SessionLost => Recovery::Reset(describe(func, rv)),
                    Disposition::Relogin => Recovery::Relogin,
                    Disposition::Fail => {
                        self.count_error();
                        return Err(BackendError::Internal(describe(func, rv)));
                    }
                },
            };
            self.count_error();
            if retried {
                return Err(BackendError::Unavailable(match recovery {
                    Recovery::Relogin => "HSM login or object handle lost again".into(),
                    Recovery::Reset(why) => why,
                }));
            }
            retried = true;
            match recovery {
                Recovery::Relogin => {
                    tracing::warn!(
                        worker = self.index,
                        "HSM login or object handle lost; logging in again"
                    );
                    self.relogin();
                }
                Recovery::Reset(why) => {
                    tracing::warn!(worker = self.index, error = %why, "HSM session lost");
                    self.reset(&why);
                }
            }
        }
    }

    /// After start-up, a refused PIN or KEK is an outage of this KMS, not a start-up
    /// configuration error: the process keeps running, unready, and says why.
    fn runtime_error(&self, e: BackendError) -> BackendError {
        match e {
            BackendError::Config(m) if self.opened_once => BackendError::Unavailable(m),
            other => other,
        }
    }
}

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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{AttributeType, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use kms_api::{KeyId, WrappedDek};
use secrecy::SecretString;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::context::{Pkcs11Context, Reset};
use super::token::{self, classify, describe, Disposition, OpError};
use crate::backend::{
    binding_input, wrap_aad, BackendError, Dek, DekResidency, HmacRole, KekClass, KekRef,
    ResidentItem, ResidentKey, WrapFormat, AES_GCM_V1_LEN, AES_KW_LEN, AES_KW_V3_LEN, BINDING_LEN,
    DEK_LEN,
};
use cryptoki::object::{Attribute, KeyType, ObjectClass};

/// GCM IV length (96 bits) and tag length (128 bits) of `AesGcmV1`.
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// First reconnect delay after a failed reopen, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
pub(super) enum JobKind {
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

/// A job and the time after which nobody waits for it any more.
pub(super) struct Job {
    pub(super) kind: JobKind,
    pub(super) deadline: Instant,
}

/// A session the worker owns, with the object handles found through it.
struct Live {
    session: Session,
    slot: Slot,
    generation: u64,
    keks: HashMap<KekRef, (ObjectHandle, KekClass)>,
    /// The audit key's handle, found (and checked) once per session.
    audit: Option<ObjectHandle>,
    /// The binding key's label, and its handle once found (and checked) in this session.
    binding_label: String,
    binding: Option<ObjectHandle>,
    /// The last KEK version that may hold `AesKwV2` blobs ([`token::legacy_until`]).
    legacy_until: u32,
    known: Option<Arc<WorkerPool>>,
    /// Hsm residency: this session's DEK objects. They die with the session, so a new
    /// session starts with an empty map.
    resident: ResidentObjects,
}

/// A bounded map of DEK session objects, least recently used destroyed first.
struct ResidentObjects {
    cap: usize,
    tick: u64,
    by_key: HashMap<KeyId, (ObjectHandle, u64)>,
    by_use: std::collections::BTreeMap<u64, KeyId>,
}

impl ResidentObjects {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            tick: 0,
            by_key: HashMap::new(),
            by_use: std::collections::BTreeMap::new(),
        }
    }

    fn get(&mut self, key_id: &KeyId) -> Option<ObjectHandle> {
        self.tick += 1;
        let tick = self.tick;
        let (h, used) = self.by_key.get_mut(key_id)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, key_id.clone());
        Some(*h)
    }

    /// Adds `h`; returns the handles that must be destroyed (one evicted to stay within the
    /// bound, or an older object of the same key).
    fn insert(&mut self, key_id: KeyId, h: ObjectHandle) -> Vec<ObjectHandle> {
        let mut out = self.remove(&key_id).into_iter().collect::<Vec<_>>();
        while self.by_key.len() >= self.cap {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.by_key.remove(&oldest) {
                out.push(old);
            }
        }
        self.tick += 1;
        self.by_use.insert(self.tick, key_id.clone());
        self.by_key.insert(key_id, (h, self.tick));
        out
    }

    fn remove(&mut self, key_id: &KeyId) -> Option<ObjectHandle> {
        let (h, used) = self.by_key.remove(key_id)?;
        self.by_use.remove(&used);
        Some(h)
    }

    /// Takes every handle out of the map, for the caller to destroy.
    fn drain(&mut self) -> Vec<ObjectHandle> {
        self.by_use.clear();
        self.by_key.drain().map(|(_, (h, _))| h).collect()
    }
}

impl Live {
    /// The handle and class of `kek`, found (and its attributes checked) once per session.
    fn kek(&mut self, kek: &KekRef) -> Result<(ObjectHandle, KekClass), OpError> {
        if self
            .known
            .as_ref()
            .is_some_and(|pool| pool.is_destroyed(kek.version))
        {
            self.keks.remove(kek);
            return Err(OpError::Backend(BackendError::KekNotFound {
                id: kek.id.clone(),
                version: kek.version,
            }));
        }
        if let Some(h) = self.keks.get(kek) {
            return Ok(*h);
        }
        let h = token::find_kek(&self.session, kek)?;
        self.keks.insert(kek.clone(), h);
        if let Some(pool) = &self.known {
            pool.known_keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(kek.clone());
        }
        Ok(h)
    }

    /// The handle of `kek`, which must be of class `class` (a blob whose format names the
    /// other class was forged or damaged: `InvalidWrapped`).
    fn kek_of(&mut self, kek: &KekRef, class: KekClass) -> Result<ObjectHandle, OpError> {
        match self.kek(kek)? {
            (h, c) if c == class => Ok(h),
            _ => Err(OpError::Backend(BackendError::InvalidWrapped)),
        }
    }

    /// The binding key's handle, found (and checked) once per session.
    fn binding_key(&mut self) -> Result<ObjectHandle, OpError> {
        if let Some(h) = self.binding {
            return Ok(h);
        }
        let h = token::find_hmac_key(&self.session, HmacRole::Binding, &self.binding_label)?;
        self.binding = Some(h);
        Ok(h)
    }

    /// Keeps `h` as `key_id`'s DEK object, destroying what that pushes out.
    fn keep_resident(&mut self, key_id: &KeyId, h: ObjectHandle) {
        for old in self.resident.insert(key_id.clone(), h) {
            if let Err(e) = self.session.destroy_object(old) {
                tracing::debug!(error = %e, "destroying an evicted DEK session object");
            }
        }
    }
}

struct Backoff {
    retry_at: Instant,
    delay: Duration,
    last_error: String,
}

/// What the failure of one attempt calls for.
enum Recovery {
    Relogin,
    Reset(String),
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
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
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

    fn handle(&mut self, job: Job) {
        let expired = Instant::now() > job.deadline;
        tracing::trace!(expired, "HSM job taken by a worker");
        let late = || {
            BackendError::Unavailable("the HSM job waited in the queue past its deadline".into())
        };
        match job.kind {
            JobKind::Generate { key_id, reply } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let kek = self.pool.current_kek();
                let res = self.run_op(|live| generate(live, &key_id, &kek));
                // The receiver may have gone (caller cancelled): the DEK is dropped and zeroized.
                let _ = reply.send(res);
            }
            JobKind::Unwrap {
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
            JobKind::Rewrap {
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
            JobKind::AuditChain {
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
            JobKind::GenerateResident { key_id, reply } => {
                if expired {
                    let _ = reply.send(Err(late()));
                    return;
                }
                let kek = self.pool.current_kek();
                let pool = Arc::clone(&self.pool);
                let res = self.run_op(|live| generate_resident(live, &pool, &key_id, &kek));
                let _ = reply.send(res);
            }
            JobKind::SealResident {
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
            JobKind::OpenResident {
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
            JobKind::Check {
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
            JobKind::Forget { key_id } => {
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
            JobKind::Health { reply } => {
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

    /// A read guard with a live session of the current generation, reopening if needed.
    fn acquire(&mut self) -> Result<RwLockReadGuard<'static, ()>, BackendError> {
        let ctx = self.pool.ctx;
        for _ in 0..3 {
            let gate = ctx.read_gate();
            match &self.live {
                Some(live) if live.generation == ctx.generation() => return Ok(gate),
                Some(_) => {
                    drop(gate);
                    tracing::info!(
                        worker = self.index,
                        "the PKCS#11 library was reset; reopening"
                    );
                    // Its session was closed by the reset: forget it, never close it.
                    self.live = None;
                    self.set_healthy(false);
                }
                None => drop(gate),
            }
            self.reopen()?;
        }
        Err(BackendError::Unavailable(
            "the PKCS#11 library keeps being reset; giving up for this request".into(),
        ))
    }

    /// Resets the library (if nobody did since this worker's session was opened) and drops
    /// the session, which the reset closed.
    fn reset(&mut self, why: &str) {
        let seen = self
            .live
            .as_ref()
            .map_or_else(|| self.pool.ctx.generation(), |l| l.generation);
        self.live = None;
        self.set_healthy(false);
        match self.pool.ctx.reset(seen, why) {
            Ok(Reset::Done | Reset::AlreadyDone) => self.awaiting_reset = None,
            Ok(Reset::TooSoon) => self.awaiting_reset = Some(seen),
            Err(e) => {
                // The generation moved on before `C_Initialize` failed; the next reopen
                // initialises the library again.
                self.awaiting_reset = None;
                tracing::warn!(worker = self.index, error = %e, "PKCS#11 library reset failed");
            }
        }
    }

    /// Logs in again and forgets object handles; escalates to a reset if that fails.
    fn relogin(&mut self) {
        let ctx = self.pool.ctx;
        let res = {
            let _g = ctx.read_gate();
            let Some(live) = self.live.as_mut() else {
                return;
            };
            if live.generation != ctx.generation() {
                // The library was reset meanwhile: the session is gone; `acquire` reopens.
                return;
            }
            live.keks.clear();
            // The session lives on: its DEK objects are destroyed (best effort; a login that
            // was lost may have taken them already), not just forgotten, so the bound holds.
            for h in live.resident.drain() {
                destroy_quietly(live, h);
            }
            ctx.login(&live.session, &self.pool.token_label, &self.pool.pin)
        };
        match res {
            Ok(()) => {}
            Err(OpError::Backend(BackendError::PinRejected(m))) => self.pin_rejected(&m),
            Err(e) => {
                let e = token::op_to_setup_error("logging in again", e);
                self.reset(&format!("re-login failed: {e}"));
            }
        }
    }

    /// Raises the alert once per process when the token refused the PIN.
    fn pin_rejected(&self, detail: &str) {
        if !self.pool.alerted.swap(true, Ordering::AcqRel) {
            tracing::error!(
                alert = "hsm_pin_rejected",
                error = %detail,
                "the HSM refused the PIN: no further login will be tried (a real HSM locks the \
                 PIN after a few failures); the KMS stays unready until it is restarted with a \
                 correct hsm.pin_file"
            );
        }
    }

    /// Opens a new session (finding the token by label), logs in if needed and finds the
    /// current KEK. Fails fast while a previous attempt's backoff runs.
    fn reopen(&mut self) -> Result<(), BackendError> {
        if self.pool.ctx.pin_rejected(&self.pool.token_label) {
            self.set_healthy(false);
            return Err(BackendError::Unavailable(
                "the HSM refused the PIN; restart the KMS with a correct hsm.pin_file".into(),
            ));
        }
        if let Some(b) = &self.backoff {
            let now = Instant::now();
            if now < b.retry_at {
                return Err(BackendError::Unavailable(format!(
                    "HSM unavailable, next reconnect in {} ms: {}",
                    b.retry_at.duration_since(now).as_millis(),
                    b.last_error
                )));
            }
        }
        self.set_healthy(false);
        match self.reset_then_open() {
            Ok(live) => {
                self.live = Some(live);
                self.backoff = None;
                self.set_healthy(true);
                if self
                    .pool
                    .slots
                    .iter()
                    .all(|s| s.healthy.load(Ordering::Acquire))
                {
                    self.pool.ctx.reset_pace_ok();
                }
                if self.opened_once {
                    self.pool.recoveries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(worker = self.index, "HSM session recovered");
                }
                self.opened_once = true;
                Ok(())
            }
            Err(e) => {
                if let BackendError::PinRejected(m) = &e {
                    self.pin_rejected(m);
                }
                let delay = self
                    .backoff
                    .as_ref()
                    .map_or(FIRST_BACKOFF, |b| (b.delay * 2).min(MAX_BACKOFF));
                // Every worker retries; one of them keeps the operator informed at warn level.
                if self.index == 0 || delay == FIRST_BACKOFF {
                    tracing::warn!(
                        worker = self.index,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot open an HSM session"
                    );
                } else {
                    tracing::debug!(
                        worker = self.index,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot open an HSM session"
                    );
                }
                self.backoff = Some(Backoff {
                    retry_at: Instant::now() + delay,
                    delay,
                    last_error: e.to_string(),
                });
                if !self.opened_once {
                    return Err(e);
                }
                // A token or KEK that is not found, or a device-level failure, after start-up:
                // the library may need a rescan to see the token again.
                if matches!(
                    e,
                    BackendError::Config(_)
                        | BackendError::Unavailable(_)
                        | BackendError::KekNotFound { .. }
                ) {
                    self.reset(&format!("reopening failed: {e}"));
                }
                Err(match e {
                    BackendError::Config(m) | BackendError::PinRejected(m) => {
                        BackendError::Unavailable(m)
                    }
                    BackendError::KekNotFound { id, version } => BackendError::Unavailable(
                        format!("KEK {id} version {version} not found in the token"),
                    ),
                    other => other,
                })
            }
        }
    }

    /// Opens a session, first finishing a reset this worker is waiting for.
    fn reset_then_open(&mut self) -> Result<Live, BackendError> {
        if let Some(seen) = self.awaiting_reset {
            if self.pool.ctx.generation() == seen {
                match self.pool.ctx.reset(seen, "a session was lost") {
                    Ok(Reset::Done | Reset::AlreadyDone) => self.awaiting_reset = None,
                    Ok(Reset::TooSoon) => {
                        return Err(BackendError::Unavailable(
                            "waiting for the PKCS#11 library reset (rate-limited)".into(),
                        ))
                    }
                    Err(e) => {
                        self.awaiting_reset = None;
                        return Err(e);
                    }
                }
            } else {
                self.awaiting_reset = None;
            }
        }
        self.open_session()
    }

    fn open_session(&mut self) -> Result<Live, BackendError> {
        let ctx = self.pool.ctx;
        ctx.ensure_initialized()?;
        let _g = ctx.read_gate();
        let slot = token::find_slot(&ctx.pkcs11, &self.pool.token_label)?;
        let session = ctx
            .pkcs11
            .open_ro_session_no_drop(slot)
            .map_err(|e| match e {
                // At its session limit the token lost nothing: no reset (it would close every
                // other worker's session too).
                cryptoki::error::Error::Pkcs11(RvError::SessionCount, _) => {
                    tracing::warn!(
                        "the token has no session left (CKR_SESSION_COUNT): lower hsm.sessions \
                         or free sessions held by other applications"
                    );
                    BackendError::Overloaded
                }
                e => token::setup_error("opening an HSM session", e),
            })?;
        self.set_session(ctx.generation());
        let mut live = Live {
            session,
            slot,
            generation: ctx.generation(),
            keks: HashMap::new(),
            audit: None,
            binding_label: self.pool.binding_label.clone(),
            binding: None,
            legacy_until: self.pool.legacy_until,
            known: Some(Arc::clone(&self.pool)),
            resident: ResidentObjects::new(self.pool.resident_cap),
        };
        let kek = self.pool.current_kek();
        let checked = ctx
            .login(&live.session, &self.pool.token_label, &self.pool.pin)
            .and_then(|()| live.kek(&kek).map(|_| ()));
        if let Err(e) = checked {
            // The session is ours and of the current generation (we hold the gate).
            self.close(live);
            return Err(token::op_to_setup_error("preparing the HSM session", e));
        }
        tracing::debug!(worker = self.index, slot = %live.slot, "HSM session open");
        Ok(live)
    }
}

fn gcm_tag_bits() -> Ulong {
    Ulong::new((TAG_LEN * 8) as _)
}

/// DEK from the HSM RNG, encrypted under the KEK with AES-GCM by the HSM.
fn generate(
    live: &mut Live,
    key_id: &KeyId,
    kek: &KekRef,
) -> Result<(Dek, WrappedDek, KekRef), OpError> {
    let mut dek = Zeroizing::new([0u8; DEK_LEN]);
    live.session.generate_random_slice(&mut dek[..])?;
    let dek = Dek::from_bytes(dek);
    let blob = seal(live, key_id, kek, &dek)?;
    Ok((dek, blob, kek.clone()))
}

/// `dek` wrapped under `kek` in the format of its class: encrypted by the HSM (`AesGcmV1`,
/// IV from the HSM RNG), or made a session key object for the HSM to wrap and bind
/// (`AesKwV3`).
fn seal(live: &mut Live, key_id: &KeyId, kek: &KekRef, dek: &Dek) -> Result<WrappedDek, OpError> {
    let (handle, class) = live.kek(kek)?;
    if class == KekClass::Wrap {
        let obj = create_dek_object(live, dek, Extract::ByWrapOnly)?;
        let out = wrap_object(live, key_id, kek, handle, obj);
        destroy_quietly(live, obj);
        return out;
    }
    let mut iv = [0u8; IV_LEN];
    live.session.generate_random_slice(&mut iv)?;
    let aad = wrap_aad(key_id, kek);
    let ct = {
        let params = GcmParams::new(&mut iv, &aad, gcm_tag_bits())?;
        live.session
            .encrypt(&Mechanism::AesGcm(params), handle, &dek.expose()[..])?
    };
    if ct.len() != DEK_LEN + TAG_LEN {
        return Err(OpError::Backend(BackendError::Internal(format!(
            "AES-GCM wrap returned {} bytes, expected {}",
            ct.len(),
            DEK_LEN + TAG_LEN
        ))));
    }
    let mut blob = Vec::with_capacity(AES_GCM_V1_LEN);
    blob.push(WrapFormat::AesGcmV1 as u8);
    blob.extend_from_slice(&kek.version.get().to_be_bytes());
    blob.extend_from_slice(&iv);
    blob.extend_from_slice(&ct);
    debug_assert_eq!(blob.len(), AES_GCM_V1_LEN);
    Ok(WrappedDek::new(blob))
}

/// Decrypts a wrapped DEK through the HSM; any authentication failure is `InvalidWrapped`.
fn unwrap(
    live: &mut Live,
    key_id: &KeyId,
    kek: &KekRef,
    format: WrapFormat,
    wrapped: &WrappedDek,
) -> Result<Dek, OpError> {
    match format {
        WrapFormat::AesKwV2 | WrapFormat::AesKwV3 => {
            // Unwrapped into a readable session object, checked, read, destroyed.
            let handle = live.kek_of(kek, KekClass::Wrap)?;
            let obj = unwrap_checked(
                live,
                handle,
                key_id,
                kek,
                format,
                wrapped,
                Extract::Readable,
            )?;
            let value = live
                .session
                .get_attributes(obj, &[AttributeType::Value])
                .map_err(OpError::from);
            destroy_quietly(live, obj);
            let mut value = value?;
            let mut dek = Zeroizing::new([0u8; DEK_LEN]);
            let mut found = false;
            for a in &mut value {
                if let Attribute::Value(v) = a {
                    if v.len() == DEK_LEN {
                        dek.copy_from_slice(v);
                        found = true;
                    }
                    zeroize::Zeroize::zeroize(v);
                }
            }
            if !found {
                return Err(OpError::Backend(BackendError::Internal(
                    "the token did not return the unwrapped DEK's value".into(),
                )));
            }
            Ok(Dek::from_bytes(dek))
        }
        WrapFormat::AesGcmV1 => {
            let b = wrapped.as_bytes();
            // Length was checked by `parse_wrapped_header`; `get` keeps this panic-free anyway.
            let (Some(iv_bytes), Some(ct)) = (b.get(5..5 + IV_LEN), b.get(5 + IV_LEN..)) else {
                return Err(OpError::Backend(BackendError::InvalidWrapped));
            };
            let handle = live.kek_of(kek, KekClass::Encrypt)?;
            let aad = wrap_aad(key_id, kek);
            let mut iv = [0u8; IV_LEN];
            iv.copy_from_slice(iv_bytes);
            let plain = {
                let params = GcmParams::new(&mut iv, &aad, gcm_tag_bits())?;
                Zeroizing::new(
                    live.session
                        .decrypt(&Mechanism::AesGcm(params), handle, ct)?,
                )
            };
            if plain.len() != DEK_LEN {
                return Err(OpError::Backend(BackendError::InvalidWrapped));
            }
            let mut dek = Zeroizing::new([0u8; DEK_LEN]);
            dek.copy_from_slice(&plain);
            Ok(Dek::from_bytes(dek))
        }
    }
}

/// Who may get a DEK session object's value out of the HSM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Extract {
    /// Nobody: sensitive, non-extractable (hsm residency's working copy).
    Never,
    /// Only wrapped under a KEK: sensitive, extractable (made to be wrapped, then destroyed).
    ByWrapOnly,
    /// Read in the clear (memory residency unwrapping an `AesKwV2`/`AesKwV3` blob), then
    /// destroyed.
    Readable,
}

/// Attributes of a DEK session object (no value, no length: the mechanism or the caller
/// gives those).
fn dek_object_template(extract: Extract) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(extract != Extract::Readable),
        Attribute::Extractable(extract != Extract::Never),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

fn destroy_quietly(live: &Live, h: ObjectHandle) {
    if let Err(e) = live.session.destroy_object(h) {
        tracing::debug!(error = %e, "destroying a DEK session object");
    }
}

/// A session object holding `dek` (its bytes pass through this process: the memory path,
/// and the one-time import of `AesGcmV1` DEKs). The attribute buffer is zeroized.
fn create_dek_object(live: &Live, dek: &Dek, extract: Extract) -> Result<ObjectHandle, OpError> {
    let mut template = dek_object_template(extract);
    template.push(Attribute::Value(dek.expose().to_vec()));
    let out = live.session.create_object(&template);
    for a in &mut template {
        if let Attribute::Value(v) = a {
            zeroize::Zeroize::zeroize(v);
        }
    }
    Ok(out?)
}

/// `C_UnwrapKey` of an `AesKwV2`/`AesKwV3` blob's key part under the wrap-class KEK `kek_h`,
/// unchecked: callers go through [`unwrap_checked`].
fn unwrap_object(
    live: &Live,
    kek_h: ObjectHandle,
    wrapped: &WrappedDek,
    extract: Extract,
) -> Result<ObjectHandle, OpError> {
    let kw = wrapped
        .as_bytes()
        .get(5..5 + AES_KW_LEN)
        .ok_or(OpError::Backend(BackendError::InvalidWrapped))?;
    match live.session.unwrap_key(
        &Mechanism::AesKeyWrap,
        kek_h,
        kw,
        &dek_object_template(extract),
    ) {
        Ok(h) => Ok(h),
        // RFC 3394's integrity check failed: a damaged or foreign blob.
        Err(cryptoki::error::Error::Pkcs11(
            RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::GeneralError,
            cryptoki::context::Function::UnwrapKey,
        )) => Err(OpError::Backend(BackendError::InvalidWrapped)),
        Err(e) => Err(e.into()),
    }
}

/// The `AesKwV3` blob of the DEK object `obj` (extractable) under the wrap-class KEK: its
/// RFC 3394 wrap and the binding the HSM computes over it.
fn wrap_object(
    live: &mut Live,
    key_id: &KeyId,
    kek: &KekRef,
    kek_h: ObjectHandle,
    obj: ObjectHandle,
) -> Result<WrappedDek, OpError> {
    let kw = live.session.wrap_key(&Mechanism::AesKeyWrap, kek_h, obj)?;
    if kw.len() != AES_KW_LEN {
        return Err(OpError::Backend(BackendError::Internal(format!(
            "CKM_AES_KEY_WRAP returned {} bytes, expected {AES_KW_LEN}",
            kw.len()
        ))));
    }
    let binding = binding(live, key_id, kek, &kw)?;
    let mut blob = Vec::with_capacity(AES_KW_V3_LEN);
    blob.push(WrapFormat::AesKwV3 as u8);
    blob.extend_from_slice(&kek.version.get().to_be_bytes());
    blob.extend_from_slice(&kw);
    blob.extend_from_slice(&binding);
    debug_assert_eq!(blob.len(), AES_KW_V3_LEN);
    Ok(WrappedDek::new(blob))
}

/// `HMAC-SHA256(binding key, binding_input(key_id, kek, kw))`, computed by the HSM.
fn binding(
    live: &mut Live,
    key_id: &KeyId,
    kek: &KekRef,
    kw: &[u8],
) -> Result<[u8; BINDING_LEN], OpError> {
    let key = live.binding_key()?;
    let mac = live
        .session
        .sign(&Mechanism::Sha256Hmac, key, &binding_input(key_id, kek, kw))?;
    <[u8; BINDING_LEN]>::try_from(mac.as_slice()).map_err(|_| {
        OpError::Backend(BackendError::Internal(format!(
            "HMAC-SHA256 returned {} bytes",
            mac.len()
        )))
    })
}

/// Unwraps the key part of an `AesKwV2`/`AesKwV3` blob into a session object and checks what
/// binds it to `key_id` and `kek`: an `AesKwV3` binding before anything is unwrapped, an
/// `AesKwV2` check with the unwrapped object (which is destroyed if it fails), and only under
/// a KEK version that predates the binding key. A blob that fails is `InvalidWrapped`.
fn unwrap_checked(
    live: &mut Live,
    kek_h: ObjectHandle,
    key_id: &KeyId,
    kek: &KekRef,
    format: WrapFormat,
    wrapped: &WrappedDek,
    extract: Extract,
) -> Result<ObjectHandle, OpError> {
    let b = wrapped.as_bytes();
    let (Some(kw), Some(tail)) = (b.get(5..5 + AES_KW_LEN), b.get(5 + AES_KW_LEN..)) else {
        return Err(OpError::Backend(BackendError::InvalidWrapped));
    };
    match format {
        WrapFormat::AesKwV3 => {
            // Verified by the HSM (`C_Verify`), which compares in constant time.
            let key = live.binding_key()?;
            match live.session.verify(
                &Mechanism::Sha256Hmac,
                key,
                &binding_input(key_id, kek, kw),
                tail,
            ) {
                Ok(()) => {}
                Err(cryptoki::error::Error::Pkcs11(
                    RvError::SignatureInvalid | RvError::SignatureLenRange,
                    _,
                )) => return Err(OpError::Backend(BackendError::InvalidWrapped)),
                Err(e) => return Err(e.into()),
            }
            unwrap_object(live, kek_h, wrapped, extract)
        }
        // Written only before the binding key existed, so only under KEK versions up to the
        // one it records: a later one is forged.
        WrapFormat::AesKwV2 if kek.version.get() > live.legacy_until => {
            Err(OpError::Backend(BackendError::InvalidWrapped))
        }
        WrapFormat::AesKwV2 => {
            let h = unwrap_object(live, kek_h, wrapped, extract)?;
            check_in_hsm(live, key_id, kek, wrapped, h)
                .inspect_err(|_| destroy_quietly(live, h))?;
            Ok(h)
        }
        WrapFormat::AesGcmV1 => Err(OpError::Backend(BackendError::InvalidWrapped)),
    }
}

/// Verifies an `AesKwV2` blob's check with the DEK object `obj`, inside the HSM.
fn check_in_hsm(
    live: &Live,
    key_id: &KeyId,
    kek: &KekRef,
    wrapped: &WrappedDek,
    obj: ObjectHandle,
) -> Result<(), OpError> {
    let b = wrapped.as_bytes();
    let (Some(iv_bytes), Some(tag)) = (
        b.get(5 + AES_KW_LEN..5 + AES_KW_LEN + IV_LEN),
        b.get(5 + AES_KW_LEN + IV_LEN..),
    ) else {
        return Err(OpError::Backend(BackendError::InvalidWrapped));
    };
    let aad = wrap_aad(key_id, kek);
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(iv_bytes);
    let params = GcmParams::new(&mut iv, &aad, gcm_tag_bits())?;
    match live.session.decrypt(&Mechanism::AesGcm(params), obj, tag) {
        Ok(p) if p.is_empty() => Ok(()),
        Ok(_) => Err(OpError::Backend(BackendError::InvalidWrapped)),
        Err(cryptoki::error::Error::Pkcs11(rv, func))
            if classify(func, rv) == Disposition::AuthFailed =>
        {
            Err(OpError::Backend(BackendError::InvalidWrapped))
        }
        Err(e) => Err(e.into()),
    }
}

/// Hsm residency: the session object of `key`'s DEK, from this session's map or made now:
/// unwrapped and checked by the HSM (`AesKwV3`, `AesKwV2`), or, for an `AesGcmV1` blob,
/// decrypted and imported once (its bytes pass through this worker, zeroized at once).
fn resident_handle(
    live: &mut Live,
    pool: &WorkerPool,
    key: &ResidentKey,
    kek: &KekRef,
    format: WrapFormat,
) -> Result<ObjectHandle, OpError> {
    if let Some(h) = live.resident.get(&key.key_id) {
        return Ok(h);
    }
    let h = match format {
        WrapFormat::AesKwV2 | WrapFormat::AesKwV3 => {
            let kek_h = live.kek_of(kek, KekClass::Wrap)?;
            unwrap_checked(
                live,
                kek_h,
                &key.key_id,
                kek,
                format,
                &key.wrapped,
                Extract::Never,
            )?
        }
        WrapFormat::AesGcmV1 => {
            let dek = unwrap(live, &key.key_id, kek, format, &key.wrapped)?;
            let h = create_dek_object(live, &dek, Extract::Never)?;
            pool.imports.fetch_add(1, Ordering::Relaxed);
            h
        }
    };
    pool.resident_loads.fetch_add(1, Ordering::Relaxed);
    live.keep_resident(&key.key_id, h);
    Ok(h)
}

/// Hsm residency: a new DEK. Under a wrap-class KEK it is generated as a key object by the
/// HSM, wrapped and checked by the HSM, then made non-extractable and kept; its bytes never
/// exist outside the HSM. Under an encrypt-class KEK (a deployment switching to hsm
/// residency before its first rotation) it is made as in memory mode and imported.
fn generate_resident(
    live: &mut Live,
    pool: &WorkerPool,
    key_id: &KeyId,
    kek: &KekRef,
) -> Result<(WrappedDek, KekRef), OpError> {
    let (kek_h, class) = live.kek(kek)?;
    if class == KekClass::Encrypt {
        let (dek, blob, kek) = generate(live, key_id, kek)?;
        let h = create_dek_object(live, &dek, Extract::Never)?;
        pool.imports.fetch_add(1, Ordering::Relaxed);
        live.keep_resident(key_id, h);
        return Ok((blob, kek));
    }
    let mut template = dek_object_template(Extract::ByWrapOnly);
    template.push(Attribute::ValueLen(Ulong::new(DEK_LEN as _)));
    let obj = live
        .session
        .generate_key(&Mechanism::AesKeyGen, &template)?;
    let blob = match wrap_object(live, key_id, kek, kek_h, obj) {
        Ok(b) => b,
        Err(e) => {
            destroy_quietly(live, obj);
            return Err(e);
        }
    };
    // The working copy must not be extractable. A token that refuses the change gets a fresh
    // non-extractable object from the blob instead.
    let h = match live
        .session
        .update_attributes(obj, &[Attribute::Extractable(false)])
    {
        Ok(()) => obj,
        Err(e) => {
            tracing::debug!(error = %e, "the token keeps CKA_EXTRACTABLE; unwrapping a working copy");
            destroy_quietly(live, obj);
            unwrap_checked(
                live,
                kek_h,
                key_id,
                kek,
                WrapFormat::AesKwV3,
                &blob,
                Extract::Never,
            )?
        }
    };
    pool.resident_loads.fetch_add(1, Ordering::Relaxed);
    live.keep_resident(key_id, h);
    Ok((blob, kek.clone()))
}

/// Whether `wrapped` unwraps and authenticates. An `AesKwV3`/`AesKwV2` DEK is unwrapped into a
/// non-extractable session object, checked by the HSM and destroyed: its bytes never leave
/// the HSM; an `AesGcmV1` DEK is decrypted and zeroized at once.
fn check_wrapped(
    live: &mut Live,
    key_id: &KeyId,
    kek: &KekRef,
    format: WrapFormat,
    wrapped: &WrappedDek,
) -> Result<(), OpError> {
    match format {
        WrapFormat::AesKwV2 | WrapFormat::AesKwV3 => {
            let kek_h = live.kek_of(kek, KekClass::Wrap)?;
            let h = unwrap_checked(live, kek_h, key_id, kek, format, wrapped, Extract::Never)?;
            destroy_quietly(live, h);
            Ok(())
        }
        WrapFormat::AesGcmV1 => unwrap(live, key_id, kek, format, wrapped).map(drop),
    }
}

/// Rotation: the DEK of `wrapped` (under `kek`) wrapped again under `current`. Between two
/// wrap-class KEKs in hsm residency the DEK stays in the HSM (unwrapped into an extractable
/// session object, wrapped, destroyed); otherwise it passes through this worker.
fn rewrap(
    live: &mut Live,
    pool: &WorkerPool,
    key_id: &KeyId,
    kek: &KekRef,
    format: WrapFormat,
    wrapped: &WrappedDek,
    current: &KekRef,
) -> Result<WrappedDek, OpError> {
    let (cur_h, cur_class) = live.kek(current)?;
    if pool.residency == DekResidency::Hsm
        && format.kek_class() == KekClass::Wrap
        && cur_class == KekClass::Wrap
    {
        let old_h = live.kek_of(kek, KekClass::Wrap)?;
        let obj = unwrap_checked(
            live,
            old_h,
            key_id,
            kek,
            format,
            wrapped,
            Extract::ByWrapOnly,
        )?;
        let out = wrap_object(live, key_id, current, cur_h, obj);
        destroy_quietly(live, obj);
        return out;
    }
    let dek = unwrap(live, key_id, kek, format, wrapped)?;
    seal(live, key_id, current, &dek)
}

/// Hsm residency: `nonce | ciphertext | tag` of one message, encrypted by the HSM under the
/// DEK object `h` (IV from the OS RNG, as in memory mode).
fn seal_message(
    live: &Live,
    pool: &WorkerPool,
    h: ObjectHandle,
    item: &ResidentItem,
) -> Result<Result<Vec<u8>, BackendError>, OpError> {
    let mut iv = [0u8; IV_LEN];
    ring::rand::SecureRandom::fill(&pool.rng, &mut iv)
        .map_err(|_| OpError::Backend(BackendError::Internal("random generator failed".into())))?;
    let ct = {
        let params = GcmParams::new(&mut iv, &item.aad, gcm_tag_bits())?;
        live.session
            .encrypt(&Mechanism::AesGcm(params), h, &item.data)?
    };
    let mut out = Vec::with_capacity(IV_LEN + ct.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ct);
    Ok(Ok(out))
}

/// Hsm residency: one message decrypted by the HSM; a message that does not authenticate
/// is that item's `InvalidWrapped` (the caller's opaque decrypt failure).
fn open_message(
    live: &Live,
    h: ObjectHandle,
    item: &ResidentItem,
) -> Result<Result<Zeroizing<Vec<u8>>, BackendError>, OpError> {
    if item.data.len() < IV_LEN + TAG_LEN {
        return Ok(Err(BackendError::InvalidWrapped));
    }
    let (iv_bytes, ct) = item.data.split_at(IV_LEN);
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(iv_bytes);
    let params = GcmParams::new(&mut iv, &item.aad, gcm_tag_bits())?;
    match live.session.decrypt(&Mechanism::AesGcm(params), h, ct) {
        Ok(p) => Ok(Ok(Zeroizing::new(p))),
        Err(cryptoki::error::Error::Pkcs11(rv, func))
            if classify(func, rv) == Disposition::AuthFailed =>
        {
            Ok(Err(BackendError::InvalidWrapped))
        }
        Err(e) => Err(e.into()),
    }
}

/// `mac_i = HMAC-SHA256(audit key, mac_{i-1} || m_i)` for each message, from `prev`.
fn audit_chain(
    live: &mut Live,
    label: &str,
    prev: [u8; 32],
    messages: &[Vec<u8>],
) -> Result<Vec<[u8; 32]>, OpError> {
    let key = match live.audit {
        Some(h) => h,
        None => {
            let h = token::find_hmac_key(&live.session, HmacRole::Audit, label)?;
            live.audit = Some(h);
            h
        }
    };
    let mut prev = prev;
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let mut data = Vec::with_capacity(32 + m.len());
        data.extend_from_slice(&prev);
        data.extend_from_slice(m);
        let mac = live.session.sign(&Mechanism::Sha256Hmac, key, &data)?;
        let Ok(mac) = <[u8; 32]>::try_from(mac.as_slice()) else {
            return Err(OpError::Backend(BackendError::Internal(format!(
                "HMAC-SHA256 returned {} bytes",
                mac.len()
            ))));
        };
        out.push(mac);
        prev = mac;
    }
    Ok(out)
}

/// A real round trip: the session is logged in, the RNG answers, the KEK handle is valid.
fn health(live: &mut Live, kek: &KekRef) -> Result<(), OpError> {
    let state = live.session.get_session_info()?.session_state();
    if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
        return Err(OpError::Pkcs11 {
            func: cryptoki::context::Function::GetSessionInfo,
            rv: RvError::UserNotLoggedIn,
        });
    }
    let mut probe = [0u8; 16];
    live.session.generate_random_slice(&mut probe)?;
    let (handle, _) = live.kek(kek)?;
    live.session
        .get_attributes(handle, &[AttributeType::Class])?;
    Ok(())
}

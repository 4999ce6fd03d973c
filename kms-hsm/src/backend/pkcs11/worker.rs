//! Worker threads: each owns one PKCS#11 session and runs jobs sent over its channel.

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

use super::context::Runtime;
use super::token::{self, classify, describe, Disposition, OpError};
use crate::backend::{wrap_aad, BackendError, Dek, KekRef, WrapFormat, AES_GCM_V1_LEN, DEK_LEN};

/// GCM IV length (96 bits) and tag length (128 bits) of `AesGcmV1`.
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// First reconnect delay after a failed reopen, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Everything the workers and the backend handle share.
pub(super) struct Shared {
    pub(super) rt: &'static Runtime,
    pub(super) token_label: String,
    pub(super) pin: SecretString,
    pub(super) current: RwLock<KekRef>,
    pub(super) calls: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) recoveries: AtomicU64,
    pub(super) slots: Vec<WorkerSlot>,
}

impl Shared {
    pub(super) fn current_kek(&self) -> KekRef {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Per-worker state visible to the dispatcher.
#[derive(Default)]
pub(super) struct WorkerSlot {
    /// The worker has a session it believes usable.
    pub(super) healthy: AtomicBool,
    /// Jobs sent to the worker and not finished yet.
    pub(super) inflight: AtomicUsize,
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, BackendError>>;

pub(super) enum Job {
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
    Health {
        reply: Reply<()>,
    },
}

/// A session the worker owns, with the object handles found through it.
struct Live {
    session: Session,
    slot: Slot,
    epoch: u64,
    keks: HashMap<KekRef, ObjectHandle>,
}

impl Live {
    fn kek_handle(&mut self, kek: &KekRef) -> Result<ObjectHandle, OpError> {
        if let Some(h) = self.keks.get(kek) {
            return Ok(*h);
        }
        let h = token::find_kek(&self.session, kek)?;
        self.keks.insert(kek.clone(), h);
        Ok(h)
    }
}

struct Backoff {
    retry_at: Instant,
    delay: Duration,
    last_error: String,
}

pub(super) struct Worker {
    index: usize,
    shared: Arc<Shared>,
    live: Option<Live>,
    backoff: Option<Backoff>,
    /// Set when this worker saw its session die (as opposed to being told by the epoch).
    loss_detected: bool,
    /// Set when the loss was `CKR_CRYPTOKI_NOT_INITIALIZED`.
    needs_init: bool,
    opened_once: bool,
}

/// Marks the worker unhealthy if its thread ends for any reason (including a panic).
struct ExitGuard(Arc<Shared>, usize);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.0.slots.get(self.1) {
            slot.healthy.store(false, Ordering::Release);
        }
    }
}

impl Worker {
    pub(super) fn new(index: usize, shared: Arc<Shared>) -> Self {
        Self {
            index,
            shared,
            live: None,
            backoff: None,
            loss_detected: false,
            needs_init: false,
            opened_once: false,
        }
    }

    fn slot(&self) -> Option<&WorkerSlot> {
        self.shared.slots.get(self.index)
    }

    fn set_healthy(&self, healthy: bool) {
        if let Some(slot) = self.slot() {
            slot.healthy.store(healthy, Ordering::Release);
        }
    }

    /// Opens the first session; the outcome is reported to `Pkcs11Backend::open`.
    pub(super) fn start(&mut self) -> Result<(), BackendError> {
        self.reopen()
    }

    /// The thread body: serve jobs until every sender is dropped.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
        let _exit = ExitGuard(Arc::clone(&self.shared), self.index);
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
            let _g = self.shared.rt.read_gate();
            // Close only a session that is certainly still ours; otherwise just forget it.
            if live.epoch == self.shared.rt.epoch() {
                if let Err(e) = live.session.close() {
                    tracing::debug!(worker = self.index, error = %e, "closing HSM session");
                }
            }
        }
        tracing::debug!(worker = self.index, "HSM worker stopped");
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Generate { key_id, reply } => {
                let kek = self.shared.current_kek();
                let res = self.run_op(|live| generate(live, &key_id, &kek));
                // The receiver may have gone (caller cancelled): the DEK is dropped and zeroized.
                let _ = reply.send(res);
            }
            Job::Unwrap {
                key_id,
                kek,
                format,
                wrapped,
                reply,
            } => {
                let res = self.run_op(|live| unwrap(live, &key_id, &kek, format, &wrapped));
                let _ = reply.send(res);
            }
            Job::Health { reply } => {
                let kek = self.shared.current_kek();
                let res = self.run_op(|live| health(live, &kek)).map_err(|e| match e {
                    BackendError::Unavailable(m) => BackendError::Unavailable(m),
                    other => BackendError::Unavailable(other.to_string()),
                });
                let _ = reply.send(res);
            }
        }
    }

    fn count_error(&self) {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `op` on this worker's session, recovering once from a lost session or login.
    fn run_op<T>(
        &mut self,
        mut op: impl FnMut(&mut Live) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        self.shared.calls.fetch_add(1, Ordering::Relaxed);
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
            let (func, rv) = match outcome {
                Ok(v) => return Ok(v),
                Err(OpError::Backend(e)) => {
                    if !matches!(e, BackendError::InvalidWrapped) {
                        self.count_error();
                    }
                    return Err(e);
                }
                Err(OpError::Pkcs11 { func, rv }) => (func, rv),
            };
            let disposition = classify(func, rv);
            if disposition == Disposition::AuthFailed {
                return Err(BackendError::InvalidWrapped);
            }
            self.count_error();
            let what = describe(func, rv);
            match disposition {
                Disposition::SessionLost => {
                    tracing::warn!(worker = self.index, error = %what, "HSM session lost; reopening");
                    self.lose_session(rv == RvError::CryptokiNotInitialized);
                    if retried {
                        return Err(BackendError::Unavailable(what));
                    }
                }
                Disposition::Relogin => {
                    tracing::warn!(
                        worker = self.index,
                        error = %what,
                        "HSM login or object handle lost; logging in again"
                    );
                    if retried {
                        return Err(BackendError::Unavailable(what));
                    }
                    self.relogin();
                }
                Disposition::AuthFailed | Disposition::Fail => {
                    return Err(BackendError::Internal(what));
                }
            }
            retried = true;
        }
    }

    /// A read guard with a live session of the current epoch, reopening if needed.
    fn acquire(&mut self) -> Result<RwLockReadGuard<'static, ()>, BackendError> {
        let rt = self.shared.rt;
        for _ in 0..3 {
            let gate = rt.read_gate();
            match &self.live {
                Some(live) if live.epoch == rt.epoch() => return Ok(gate),
                Some(_) => {
                    drop(gate);
                    tracing::info!(worker = self.index, "HSM sessions were reset; reopening");
                    // Forget, never close: the handle may belong to a newer session now.
                    self.live = None;
                    self.set_healthy(false);
                }
                None => drop(gate),
            }
            self.reopen()?;
        }
        Err(BackendError::Unavailable(
            "HSM sessions keep being reset; giving up for this request".into(),
        ))
    }

    /// Drops the session after a loss (without closing it) and flags the worker unready.
    fn lose_session(&mut self, not_initialized: bool) {
        self.live = None;
        self.loss_detected = true;
        self.needs_init |= not_initialized;
        self.set_healthy(false);
    }

    /// Logs in again and forgets object handles; escalates to a reopen if the session is gone.
    fn relogin(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        live.keks.clear();
        let res = {
            let _g = self.shared.rt.read_gate();
            token::login(&live.session, &self.shared.token_label, &self.shared.pin)
        };
        match res {
            Ok(()) => {}
            Err(OpError::Pkcs11 { func, rv }) if classify(func, rv) == Disposition::SessionLost => {
                self.lose_session(rv == RvError::CryptokiNotInitialized);
            }
            Err(e) => {
                let e = token::op_to_setup_error("logging in again", e);
                tracing::warn!(worker = self.index, error = %e, "HSM re-login failed; reopening");
                self.lose_session(false);
            }
        }
    }

    /// Opens a new session (finding the token by label), logs in if needed and finds the
    /// current KEK. Fails fast while a previous attempt's backoff runs.
    fn reopen(&mut self) -> Result<(), BackendError> {
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
        let res = self.open_session();
        match res {
            Ok(live) => {
                self.live = Some(live);
                self.backoff = None;
                self.loss_detected = false;
                self.needs_init = false;
                self.set_healthy(true);
                if self.opened_once {
                    self.shared.recoveries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(worker = self.index, "HSM session recovered");
                }
                self.opened_once = true;
                Ok(())
            }
            Err(e) => {
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
                // After start-up a missing token or a refused login is an outage, not a
                // configuration error: the service keeps running and retries.
                Err(match e {
                    BackendError::Config(m) => BackendError::Unavailable(m),
                    other => other,
                })
            }
        }
    }

    fn open_session(&mut self) -> Result<Live, BackendError> {
        let rt = self.shared.rt;
        let _w = rt.write_gate();
        rt.reinit_if_needed(self.needs_init)?;
        if self.loss_detected {
            // Every session opened before now may be gone, and its handle may be reused by
            // the session we are about to open: make the other workers drop theirs.
            rt.bump_epoch();
        }
        let slot = token::find_slot(&rt.pkcs11, &self.shared.token_label)?;
        let session = rt
            .pkcs11
            .open_ro_session_no_drop(slot)
            .map_err(|e| token::setup_error("opening an HSM session", e))?;
        let mut live = Live {
            session,
            slot,
            epoch: rt.epoch(),
            keks: HashMap::new(),
        };
        let kek = self.shared.current_kek();
        let checked = token::login(&live.session, &self.shared.token_label, &self.shared.pin)
            .and_then(|()| live.kek_handle(&kek).map(|_| ()));
        if let Err(e) = checked {
            // The session is ours and nobody else runs (write gate): closing it is safe.
            let _ = live.session.close();
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
    let handle = live.kek_handle(kek)?;
    let mut dek = Zeroizing::new([0u8; DEK_LEN]);
    live.session.generate_random_slice(&mut dek[..])?;
    let mut iv = [0u8; IV_LEN];
    live.session.generate_random_slice(&mut iv)?;
    let aad = wrap_aad(key_id, kek);
    let ct = {
        let params = GcmParams::new(&mut iv, &aad, gcm_tag_bits())?;
        live.session
            .encrypt(&Mechanism::AesGcm(params), handle, &dek[..])?
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
    Ok((Dek::from_bytes(dek), WrappedDek::new(blob), kek.clone()))
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
        WrapFormat::AesGcmV1 => {
            let b = wrapped.as_bytes();
            // Length was checked by `parse_wrapped_header`; `get` keeps this panic-free anyway.
            let (Some(iv_bytes), Some(ct)) = (b.get(5..5 + IV_LEN), b.get(5 + IV_LEN..)) else {
                return Err(OpError::Backend(BackendError::InvalidWrapped));
            };
            let handle = live.kek_handle(kek)?;
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
    let handle = live.kek_handle(kek)?;
    live.session
        .get_attributes(handle, &[AttributeType::Class])?;
    Ok(())
}

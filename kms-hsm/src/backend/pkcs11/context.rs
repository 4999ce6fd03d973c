//! The process-wide PKCS#11 context: the loaded module, the gate that orders library resets,
//! the library generation, the reset rate limit and the PIN latch.
//!
//! A PKCS#11 library is initialised once per process (a second `C_Initialize` fails with
//! `CKR_CRYPTOKI_ALREADY_INITIALIZED`), so the loaded module lives in a process-wide
//! [`OnceLock`] shared by every backend and by the one-shot operations (`init_kek`,
//! `kek_attributes`).
//!
//! # Resets, the gate and the generation
//! Session handles are small integers that a library may hand out again once a session is
//! gone (SoftHSM reuses them). A worker whose session vanished behind its back must never use
//! its old handle once anyone may have opened a new session: it might now name another
//! thread's session. So every loss of a session is answered the same way, by a **library
//! reset** ([`Pkcs11Context::reset`]): `C_Finalize` (which closes every session of the
//! process, so none leaks) and `C_Initialize` (which also makes the library rescan its slots:
//! SoftHSM and many network-HSM clients see a token that came back only then), after which
//! the [generation](Pkcs11Context::generation) is raised.
//! * Every HSM operation of a worker, and every session it opens, runs under a **read** guard
//!   of the gate and first checks that its session belongs to the current generation.
//! * Only a reset (and the one-shot administrative sessions, which are rare) takes the
//!   **write** guard, for the few milliseconds of `C_Finalize` + `C_Initialize`. A worker that
//!   reopens its session, logs in or looks up its KEK holds only a read guard, so one worker's
//!   recovery never stalls the others.
//! * Resets are rate-limited process-wide (250 ms doubling to 5 s while the HSM stays away,
//!   back to 250 ms after a session opened): workers that all notice the same outage cause
//!   one reset, not one each.
//!
//! # The PIN latch
//! A login refused for the PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, `CKR_PIN_EXPIRED`,
//! ...) sets the token's [`Pkcs11Context::pin_rejected`] latch for the life of the process:
//! no worker tries to
//! log in again, because every retry can count against a real HSM's PIN retry limit and lock
//! the user PIN. The KMS stays up, answers 503 and reports unready until it is restarted with
//! a correct `hsm.pin_file`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};

use crate::backend::BackendError;

/// First pause between two library resets, doubled while the HSM stays away.
const FIRST_RESET_DELAY: Duration = Duration::from_millis(250);
const MAX_RESET_DELAY: Duration = Duration::from_secs(5);

/// When the next reset may run.
#[derive(Debug)]
struct ResetPace {
    not_before: Option<Instant>,
    delay: Duration,
}

/// The loaded module and the state shared by everything that talks to it.
pub(super) struct Pkcs11Context {
    module: PathBuf,
    pub(super) pkcs11: Pkcs11,
    gate: RwLock<()>,
    generation: AtomicU64,
    /// Set when `C_Initialize` failed after a `C_Finalize`: the library is not usable until an
    /// initialisation succeeds.
    needs_init: AtomicBool,
    pace: Mutex<ResetPace>,
    /// Labels of the tokens whose PIN was refused in this process. Also the lock every
    /// login is made under (see [`Pkcs11Context::login`]).
    pin_rejected: Mutex<std::collections::HashSet<String>>,
    /// Library resets done (for `/metrics`).
    pub(super) resets: AtomicU64,
    /// `C_Login` calls the token refused for the PIN.
    login_refusals: AtomicU64,
    /// Serialises KEK creation inside this process.
    pub(super) kek_create: Mutex<()>,
}

static CONTEXT: OnceLock<Pkcs11Context> = OnceLock::new();
static LOAD: Mutex<()> = Mutex::new(());

/// Returns the process-wide context for `module`, loading and initialising it on first use.
///
/// # Errors
/// `Config` when the module cannot be loaded or initialised, or when another module is already
/// loaded in this process.
pub(super) fn context(module: &Path) -> Result<&'static Pkcs11Context, BackendError> {
    if let Some(c) = CONTEXT.get() {
        return c.check_module(module).map(|()| c);
    }
    let _load = LOAD.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(c) = CONTEXT.get() {
        return c.check_module(module).map(|()| c);
    }
    let pkcs11 = Pkcs11::new(module).map_err(|e| {
        BackendError::Config(format!(
            "cannot load PKCS#11 module {} (hsm.module): {e}",
            module.display()
        ))
    })?;
    match initialize(&pkcs11) {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            module = %module.display(),
            "PKCS#11 module was already initialised in this process; sharing it"
        ),
        Err(e) => {
            return Err(BackendError::Config(format!(
                "cannot initialise PKCS#11 module {}: {e}",
                module.display()
            )))
        }
    }
    tracing::info!(module = %module.display(), "PKCS#11 module loaded and initialised");
    let c = Pkcs11Context {
        module: module.to_path_buf(),
        pkcs11,
        gate: RwLock::new(()),
        generation: AtomicU64::new(0),
        needs_init: AtomicBool::new(false),
        pace: Mutex::new(ResetPace {
            not_before: None,
            delay: FIRST_RESET_DELAY,
        }),
        pin_rejected: Mutex::new(std::collections::HashSet::new()),
        resets: AtomicU64::new(0),
        login_refusals: AtomicU64::new(0),
        kek_create: Mutex::new(()),
    };
    Ok(CONTEXT.get_or_init(|| c))
}

/// `C_Initialize` with OS locking. `Ok(false)` when the library was already initialised.
fn initialize(pkcs11: &Pkcs11) -> Result<bool, Error> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(true),
        Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Outcome of [`Pkcs11Context::reset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reset {
    /// This call reset the library.
    Done,
    /// Someone else already did since the caller's session was opened.
    AlreadyDone,
    /// The rate limit forbids a reset now; try again later.
    TooSoon,
}

impl Pkcs11Context {
    fn check_module(&self, module: &Path) -> Result<(), BackendError> {
        let same = self.module == module
            || matches!(
                (self.module.canonicalize(), module.canonicalize()),
                (Ok(a), Ok(b)) if a == b
            );
        if same {
            Ok(())
        } else {
            Err(BackendError::Config(format!(
                "PKCS#11 module {} is already loaded in this process; cannot also load {}",
                self.module.display(),
                module.display()
            )))
        }
    }

    /// Shared access: HSM operations and session openings.
    pub(super) fn read_gate(&self) -> RwLockReadGuard<'_, ()> {
        // The guarded value is `()`: a poisoned lock protects no broken state.
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Exclusive access: library resets and one-shot administrative sessions.
    pub(super) fn write_gate(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current library generation; a session opened in an older one is void.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Resets the library (see the module docs) unless it was already reset since
    /// generation `seen`, or the rate limit forbids it now.
    ///
    /// # Errors
    /// `Unavailable` when `C_Initialize` fails (the next reset tries again).
    pub(super) fn reset(&self, seen: u64, why: &str) -> Result<Reset, BackendError> {
        {
            let pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
            if self.generation() != seen {
                return Ok(Reset::AlreadyDone);
            }
            if pace.not_before.is_some_and(|t| Instant::now() < t) {
                return Ok(Reset::TooSoon);
            }
        }
        let _w = self.write_gate();
        let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
        if self.generation() != seen {
            return Ok(Reset::AlreadyDone);
        }
        pace.not_before = Some(Instant::now() + pace.delay);
        pace.delay = (pace.delay * 2).min(MAX_RESET_DELAY);
        tracing::warn!(
            reason = why,
            "resetting the PKCS#11 library (C_Finalize + C_Initialize)"
        );
        match self.pkcs11.clone().finalize() {
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => tracing::warn!(error = %e, "C_Finalize failed; initialising anyway"),
        }
        // Every session of the process is gone now, whatever happens next.
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.resets.fetch_add(1, Ordering::Relaxed);
        match initialize(&self.pkcs11) {
            Ok(_) => {
                self.needs_init.store(false, Ordering::Release);
                Ok(Reset::Done)
            }
            Err(e) => {
                self.needs_init.store(true, Ordering::Release);
                Err(BackendError::Unavailable(format!(
                    "cannot initialise the PKCS#11 module again: {e}"
                )))
            }
        }
    }

    /// After every worker has a session again: resets may again follow each other quickly.
    pub(super) fn reset_pace_ok(&self) {
        let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
        pace.delay = FIRST_RESET_DELAY;
    }

    /// Initialises the library again if a reset left it uninitialised.
    ///
    /// # Errors
    /// `Unavailable` when `C_Initialize` still fails.
    pub(super) fn ensure_initialized(&self) -> Result<(), BackendError> {
        if !self.needs_init.load(Ordering::Acquire) {
            return Ok(());
        }
        let _w = self.write_gate();
        if !self.needs_init.load(Ordering::Acquire) {
            return Ok(());
        }
        match initialize(&self.pkcs11) {
            Ok(_) => {
                self.needs_init.store(false, Ordering::Release);
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!("PKCS#11 module initialised again");
                Ok(())
            }
            Err(e) => Err(BackendError::Unavailable(format!(
                "cannot initialise the PKCS#11 module again: {e}"
            ))),
        }
    }

    /// Logs `session` in to token `label`, unless the process already is, under one lock for
    /// the whole process: the PIN latch is checked and set under the same lock, so however
    /// many workers reopen at once, a refused PIN is sent to the token exactly once.
    ///
    /// Returns whether a `C_Login` was actually refused by this call (for the failure
    /// counter).
    ///
    /// # Errors
    /// `PinRejected` when the latch is set or the token refuses the PIN (setting the latch);
    /// others as [`token::login`](super::token::login).
    pub(super) fn login(
        &self,
        session: &cryptoki::session::Session,
        label: &str,
        pin: &secrecy::SecretString,
    ) -> Result<(), super::token::OpError> {
        let mut rejected = self
            .pin_rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if rejected.contains(label) {
            return Err(super::token::OpError::Backend(BackendError::PinRejected(
                "an earlier login in this process was refused; restart with a correct PIN".into(),
            )));
        }
        let r = super::token::login(session, label, pin);
        if let Err(super::token::OpError::Backend(BackendError::PinRejected(_))) = &r {
            rejected.insert(label.to_owned());
            self.login_refusals.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Logins the token refused for the PIN (each one real `C_Login`).
    pub(super) fn login_refusals(&self) -> u64 {
        self.login_refusals.load(Ordering::Relaxed)
    }

    /// Whether a login to token `label` was refused for the PIN in this process (see the
    /// module docs). Login state, and so the latch, is per token.
    pub(super) fn pin_rejected(&self, label: &str) -> bool {
        self.pin_rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(label)
    }

    /// Test hook: `C_Finalize` without the matching `C_Initialize`, exactly like a device
    /// reset seen from the application: every session of the process closes and the next
    /// call fails with `CKR_CRYPTOKI_NOT_INITIALIZED`.
    #[cfg(any(test, feature = "test-hooks"))]
    pub(super) fn finalize_for_test(&self) -> Result<(), BackendError> {
        let _w = self.write_gate();
        match self.pkcs11.clone().finalize() {
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiNotInitialized, _)) => {
                self.needs_init.store(true, Ordering::Release);
                tracing::warn!("PKCS#11 module finalised on request (session-loss simulation)");
                Ok(())
            }
            Err(e) => Err(BackendError::Internal(format!("C_Finalize failed: {e}"))),
        }
    }
}

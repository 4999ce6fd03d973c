//! The process-wide PKCS#11 context and the gate that orders session lifecycle events.
//!
//! A PKCS#11 library is initialised once per process (a second `C_Initialize` fails with
//! `CKR_CRYPTOKI_ALREADY_INITIALIZED`), so the loaded module lives in a process-wide
//! [`OnceLock`] shared by every backend and by the one-shot operations (`init_kek`,
//! `kek_attributes`).
//!
//! # The gate and the session epoch
//! Session handles are small integers that a library may hand out again once a session is
//! gone (SoftHSM reuses them). A worker whose session vanished behind its back (token removed,
//! library reset) must therefore never use its old handle after *anyone* opened a new session:
//! it might now name another thread's session, and two threads sharing a session is undefined
//! behaviour in PKCS#11. So:
//! * every HSM operation of a worker runs under a **read** guard of [`Runtime::gate`];
//! * every event that can make handles be reused runs under the **write** guard: a worker
//!   reopening its session after a loss, re-initialising the library, one-shot administrative
//!   sessions (`init_kek`, `kek_attributes`), and the test hook that finalises the library;
//! * a worker that detected a loss (or a re-initialisation) bumps [`Runtime::epoch`]; a worker
//!   whose session was opened in an older epoch drops it (without closing it: the handle may
//!   belong to someone else now) and opens a new one before its next operation.
//!
//! Read guards are uncontended in normal operation (one atomic operation per job), so the gate
//! costs nothing measurable next to an HSM round trip.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};

use crate::backend::BackendError;

/// The loaded module and the state shared by everything that talks to it.
pub(super) struct Runtime {
    module: PathBuf,
    pub(super) pkcs11: Pkcs11,
    gate: RwLock<()>,
    epoch: AtomicU64,
    /// Set when the library was finalised (test hook) and not yet initialised again.
    needs_init: AtomicBool,
    /// Serialises KEK creation inside this process.
    pub(super) kek_create: Mutex<()>,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Returns the process-wide context for `module`, loading and initialising it on first use.
///
/// # Errors
/// `Config` when the module cannot be loaded or initialised, or when another module is already
/// loaded in this process.
pub(super) fn runtime(module: &Path) -> Result<&'static Runtime, BackendError> {
    if let Some(rt) = RUNTIME.get() {
        return rt.check_module(module).map(|()| rt);
    }
    let _init = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = RUNTIME.get() {
        return rt.check_module(module).map(|()| rt);
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
    let rt = Runtime {
        module: module.to_path_buf(),
        pkcs11,
        gate: RwLock::new(()),
        epoch: AtomicU64::new(0),
        needs_init: AtomicBool::new(false),
        kek_create: Mutex::new(()),
    };
    Ok(RUNTIME.get_or_init(|| rt))
}

/// `C_Initialize` with OS locking. `Ok(false)` when the library was already initialised.
fn initialize(pkcs11: &Pkcs11) -> Result<bool, Error> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(true),
        Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Runtime {
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

    /// Shared access for HSM operations on an existing session.
    pub(super) fn read_gate(&self) -> RwLockReadGuard<'_, ()> {
        // The guarded value is `()`: a poisoned lock protects no broken state.
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Exclusive access for session lifecycle events (see the module docs).
    pub(super) fn write_gate(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Declares every session opened before now suspect. Call with the write gate held.
    pub(super) fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Initialises the library again if it was finalised (or `force`, after a
    /// `CKR_CRYPTOKI_NOT_INITIALIZED`). Call with the write gate held. A real re-initialisation
    /// bumps the epoch: every session handle from before is void.
    pub(super) fn reinit_if_needed(&self, force: bool) -> Result<(), BackendError> {
        if !force && !self.needs_init.load(Ordering::Acquire) {
            return Ok(());
        }
        match initialize(&self.pkcs11) {
            Ok(fresh) => {
                self.needs_init.store(false, Ordering::Release);
                if fresh {
                    self.bump_epoch();
                    tracing::info!("PKCS#11 module initialised again");
                }
                Ok(())
            }
            Err(e) => Err(BackendError::Unavailable(format!(
                "cannot initialise the PKCS#11 module again: {e}"
            ))),
        }
    }

    /// Brings the library back if a test finalised it, for callers outside the worker pool.
    pub(super) fn ensure_initialized(&self) -> Result<(), BackendError> {
        if self.needs_init.load(Ordering::Acquire) {
            let _w = self.write_gate();
            self.reinit_if_needed(false)?;
        }
        Ok(())
    }

    /// Test hook: `C_Finalize`, which closes every session of this process and logs it out,
    /// exactly like a device reset. Runs under the write gate so no operation is in flight.
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

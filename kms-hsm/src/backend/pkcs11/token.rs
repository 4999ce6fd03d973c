//! Token-level helpers: classifying PKCS#11 return values, finding the token by label and
//! logging in. The token's key objects have their own files: KEKs (`kek.rs`), the KMS's HMAC
//! keys (`hmac_key.rs`), and the attribute checks both share (`attrs.rs`).

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use crate::backend::BackendError;

mod attrs;
mod hmac_key;
mod kek;

pub(super) use hmac_key::{find_hmac_key, generate_hmac_key, legacy_until};
pub(super) use kek::{current_kek, find_kek, find_kek_objects, generate_kek, list_kek_versions};

/// A failed PKCS#11 call, kept structured so the caller can decide on recovery.
#[derive(Debug)]
pub(super) enum OpError {
    Pkcs11 { func: Function, rv: RvError },
    Backend(BackendError),
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        match e {
            Error::Pkcs11(rv, func) => OpError::Pkcs11 { func, rv },
            other => OpError::Backend(BackendError::Internal(format!("PKCS#11: {other}"))),
        }
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> Self {
        OpError::Backend(e)
    }
}

/// What a failed call means for the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Disposition {
    /// The session (or the whole library state) is gone: reopen, log in, re-find handles.
    SessionLost,
    /// The session lives but the login or an object handle is gone: log in again and re-find.
    Relogin,
    /// A wrapped DEK did not authenticate (GCM tag mismatch and friends).
    AuthFailed,
    /// Anything else: report it.
    Fail,
}

pub(super) fn classify(func: Function, rv: RvError) -> Disposition {
    match rv {
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized => Disposition::SessionLost,
        RvError::UserNotLoggedIn | RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => {
            Disposition::Relogin
        }
        // SoftHSM 2.6 reports a GCM tag mismatch as CKR_GENERAL_ERROR.
        RvError::GeneralError | RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange
            if matches!(func, Function::Decrypt) =>
        {
            Disposition::AuthFailed
        }
        _ => Disposition::Fail,
    }
}

/// `C_Xxx returned CKR_...`-style text for logs. Never contains data.
pub(super) fn describe(func: Function, rv: RvError) -> String {
    format!("{func:?} failed: {rv:?}")
}

/// Maps a cryptoki error met while setting up (opening, logging in) to a backend error.
pub(super) fn setup_error(what: &str, e: Error) -> BackendError {
    match e {
        Error::Pkcs11(rv, func) => match classify(func, rv) {
            Disposition::SessionLost => {
                BackendError::Unavailable(format!("{what}: {}", describe(func, rv)))
            }
            _ => BackendError::Internal(format!("{what}: {}", describe(func, rv))),
        },
        other => BackendError::Internal(format!("{what}: {other}")),
    }
}

/// Finds the one slot whose token carries `label`.
///
/// # Errors
/// `Config` when no token or several tokens carry the label; `Unavailable` when the slot list
/// cannot be read.
pub(super) fn find_slot(pkcs11: &Pkcs11, label: &str) -> Result<Slot, BackendError> {
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| setup_error("listing PKCS#11 slots", e))?;
    let mut found = Vec::new();
    for slot in slots {
        match pkcs11.get_token_info(slot) {
            Ok(info) if info.token_initialized() && info.label().trim_end() == label => {
                found.push(slot)
            }
            Ok(_) => {}
            // A slot that cannot describe its token is not the one we want; keep looking.
            Err(e) => tracing::debug!(slot = %slot, error = %e, "skipping unreadable slot"),
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(BackendError::Config(format!(
            "no initialised token labelled '{label}' (hsm.token_label); \
             create it with softhsm-setup/setup.sh or the HSM vendor's tools"
        ))),
        _ => Err(BackendError::Config(format!(
            "{} tokens are labelled '{label}' (hsm.token_label); the label must be unique",
            found.len()
        ))),
    }
}

/// Logs the application in as the normal user unless the session already is.
/// `CKR_USER_ALREADY_LOGGED_IN` is success: login state is per application, not per session.
///
/// # Errors
/// `Config` for a wrong, locked or uninitialised PIN; `Unavailable`/`Internal` otherwise.
pub(super) fn login(session: &Session, token: &str, pin: &SecretString) -> Result<(), OpError> {
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RoUser | SessionState::RwUser) {
        return Ok(());
    }
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => {
            tracing::info!(token, "logged in to the HSM token");
            Ok(())
        }
        Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(Error::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::UserPinNotInitialized),
            _,
        )) => Err(OpError::Backend(BackendError::PinRejected(format!(
            "login to token '{token}' refused ({rv:?}): check the PIN in hsm.pin_file"
        )))),
        Err(e) => Err(e.into()),
    }
}

/// Resolves an [`OpError`] from `login`/setup into a backend error.
pub(super) fn op_to_setup_error(what: &str, e: OpError) -> BackendError {
    match e {
        OpError::Backend(b) => b,
        OpError::Pkcs11 { func, rv } => setup_error(what, Error::Pkcs11(rv, func)),
    }
}

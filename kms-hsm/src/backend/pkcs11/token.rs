//! Token-level helpers: finding the token by label, logging in, finding, listing and creating
//! KEK objects, and classifying PKCS#11 return values.

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use kms_api::{KekId, KekVersion};
use secrecy::SecretString;

use crate::backend::{BackendError, HmacRole, KekClass, KekRef, DEK_LEN};

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

/// `CKA_ID` of a KEK version: the version as a 4-byte big-endian integer.
pub(super) fn kek_id_bytes(version: KekVersion) -> Vec<u8> {
    version.get().to_be_bytes().to_vec()
}

fn kek_search_template(label: &KekId, version: Option<KekVersion>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_str().as_bytes().to_vec()),
    ];
    if let Some(v) = version {
        t.push(Attribute::Id(kek_id_bytes(v)));
    }
    t
}

/// Every object of this KEK version (normally exactly one).
pub(super) fn find_kek_objects(
    session: &Session,
    kek: &KekRef,
) -> Result<Vec<ObjectHandle>, Error> {
    session.find_objects(&kek_search_template(&kek.id, Some(kek.version)))
}

/// The handle of KEK `kek` and its class, which must exist exactly once and pass
/// [`check_kek`].
///
/// # Errors
/// `KekNotFound` when absent; `KekRefused` when it is not a hardened KEK; `Internal` when
/// several objects carry the same label and version.
pub(super) fn find_kek(
    session: &Session,
    kek: &KekRef,
) -> Result<(ObjectHandle, KekClass), OpError> {
    let found = find_kek_objects(session, kek)?;
    match found.as_slice() {
        [h] => {
            let class = check_kek(session, *h, kek)?;
            Ok((*h, class))
        }
        [] => Err(OpError::Backend(BackendError::KekNotFound {
            id: kek.id.clone(),
            version: kek.version,
        })),
        _ => Err(OpError::Backend(BackendError::Internal(format!(
            "{} objects carry KEK label '{}' version {}; refusing to guess",
            found.len(),
            kek.id,
            kek.version
        )))),
    }
}

/// Versions of every KEK object labelled `label`, ascending, one entry per object (so a
/// duplicate shows up twice). Objects whose `CKA_ID` is not a 4-byte version are skipped.
pub(super) fn list_kek_versions(
    session: &Session,
    label: &KekId,
) -> Result<Vec<KekVersion>, Error> {
    let mut versions = Vec::new();
    for obj in session.find_objects(&kek_search_template(label, None))? {
        let attrs = session.get_attributes(obj, &[AttributeType::Id])?;
        let version = attrs.iter().find_map(|a| match a {
            Attribute::Id(id) => <[u8; 4]>::try_from(id.as_slice())
                .ok()
                .and_then(|b| KekVersion::new(u32::from_be_bytes(b)).ok()),
            _ => None,
        });
        match version {
            Some(v) => versions.push(v),
            None => tracing::warn!(
                kek_label = %label,
                "ignoring an object with the KEK label whose CKA_ID is not a version number"
            ),
        }
    }
    versions.sort();
    Ok(versions)
}

/// The highest KEK version on the token.
///
/// # Errors
/// `Config` when no version exists (the operator must run `init-kek`) or the highest version
/// exists more than once.
pub(super) fn current_kek(
    session: &Session,
    label: &KekId,
    token: &str,
) -> Result<KekRef, OpError> {
    let versions = list_kek_versions(session, label)?;
    let Some(&latest) = versions.last() else {
        return Err(OpError::Backend(BackendError::Config(format!(
            "no KEK labelled '{label}' (hsm.kek_label) on token '{token}'; \
             create it with `progressdb-kms init-kek --config <file>`"
        ))));
    };
    let copies = versions.iter().filter(|v| **v == latest).count();
    if copies > 1 {
        return Err(OpError::Backend(BackendError::Config(format!(
            "{copies} objects carry KEK label '{label}' version {latest} on token '{token}'; \
             remove the duplicates"
        ))));
    }
    Ok(KekRef {
        id: label.clone(),
        version: latest,
    })
}

/// What a KEK object must be, attribute by attribute: the attributes [`generate_kek`] asks
/// for, plus what the token records about the key's history. A key imported in the clear, or
/// made extractable or non-sensitive at any time, fails `CKA_LOCAL`, `CKA_NEVER_EXTRACTABLE`
/// or `CKA_ALWAYS_SENSITIVE`: such an object is refused even if its other attributes were
/// tightened afterwards.
const KEK_REQUIREMENTS: &[(AttributeType, bool)] = &[
    (AttributeType::Token, true),
    (AttributeType::Private, true),
    (AttributeType::Sensitive, true),
    (AttributeType::Extractable, false),
    (AttributeType::AlwaysSensitive, true),
    (AttributeType::NeverExtractable, true),
    (AttributeType::Local, true),
    (AttributeType::Sign, false),
    (AttributeType::Verify, false),
    (AttributeType::Derive, false),
];

/// What each class adds to [`KEK_REQUIREMENTS`]: one pair of uses, never both.
const fn class_requirements(class: KekClass) -> &'static [(AttributeType, bool)] {
    match class {
        KekClass::Encrypt => &[
            (AttributeType::Encrypt, true),
            (AttributeType::Decrypt, true),
            (AttributeType::Wrap, false),
            (AttributeType::Unwrap, false),
        ],
        KekClass::Wrap => &[
            (AttributeType::Encrypt, false),
            (AttributeType::Decrypt, false),
            (AttributeType::Wrap, true),
            (AttributeType::Unwrap, true),
        ],
    }
}

fn bool_attr(a: &Attribute) -> Option<(AttributeType, bool)> {
    use AttributeType as T;
    Some(match a {
        Attribute::Token(v) => (T::Token, *v),
        Attribute::Private(v) => (T::Private, *v),
        Attribute::Sensitive(v) => (T::Sensitive, *v),
        Attribute::Extractable(v) => (T::Extractable, *v),
        Attribute::AlwaysSensitive(v) => (T::AlwaysSensitive, *v),
        Attribute::NeverExtractable(v) => (T::NeverExtractable, *v),
        Attribute::Local(v) => (T::Local, *v),
        Attribute::Encrypt(v) => (T::Encrypt, *v),
        Attribute::Decrypt(v) => (T::Decrypt, *v),
        Attribute::Wrap(v) => (T::Wrap, *v),
        Attribute::Unwrap(v) => (T::Unwrap, *v),
        Attribute::Sign(v) => (T::Sign, *v),
        Attribute::Verify(v) => (T::Verify, *v),
        Attribute::Derive(v) => (T::Derive, *v),
        Attribute::Modifiable(v) => (T::Modifiable, *v),
        _ => return None,
    })
}

/// Checks that the object `handle` is a KEK this KMS may use and returns its class: an
/// AES-256 secret key made inside the token, sensitive and never extractable
/// ([`KEK_REQUIREMENTS`]), for encryption and decryption only or for wrapping and unwrapping
/// only ([`class_requirements`]; `CKA_WRAP` says which is claimed). `CKA_MODIFIABLE = true` is
/// only warned about (some tokens refuse to create keys with it false).
///
/// # Errors
/// `KekRefused` naming the label, the version and the first attribute at fault; an attribute
/// the token does not report counts as at fault (fail closed).
pub(super) fn check_kek(
    session: &Session,
    handle: ObjectHandle,
    kek: &KekRef,
) -> Result<KekClass, OpError> {
    let refused = |reason: String| {
        OpError::Backend(BackendError::KekRefused {
            id: kek.id.clone(),
            version: kek.version,
            reason,
        })
    };
    let mut wanted: Vec<AttributeType> = KEK_REQUIREMENTS.iter().map(|(t, _)| *t).collect();
    wanted.extend([
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Class,
        AttributeType::KeyType,
        AttributeType::ValueLen,
        AttributeType::Modifiable,
    ]);
    let attrs = session.get_attributes(handle, &wanted)?;
    let class_ok = attrs
        .iter()
        .any(|a| matches!(a, Attribute::Class(c) if *c == ObjectClass::SECRET_KEY));
    let type_ok = attrs
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(k) if *k == KeyType::AES));
    if !class_ok || !type_ok {
        return Err(refused("it is not an AES secret key".into()));
    }
    let len = attrs.iter().find_map(|a| match a {
        Attribute::ValueLen(v) => Some(usize::from(*v)),
        _ => None,
    });
    if len != Some(DEK_LEN) {
        return Err(refused(format!(
            "CKA_VALUE_LEN is {len:?}, expected {DEK_LEN} (AES-256)"
        )));
    }
    let flags: Vec<(AttributeType, bool)> = attrs.iter().filter_map(bool_attr).collect();
    unmet_requirement(&flags, KEK_REQUIREMENTS).map_or(Ok(()), |why| Err(refused(why)))?;
    let class = if flags.contains(&(AttributeType::Wrap, true)) {
        KekClass::Wrap
    } else {
        KekClass::Encrypt
    };
    unmet_requirement(&flags, class_requirements(class)).map_or(Ok(()), |why| Err(refused(why)))?;
    if flags.contains(&(AttributeType::Modifiable, true)) {
        tracing::warn!(
            kek_id = %kek.id,
            kek_version = %kek.version,
            "the KEK is CKA_MODIFIABLE (the token did not accept CKA_MODIFIABLE=false)"
        );
    }
    Ok(class)
}

/// The first of `requirements` that `flags` (what the token reported) does not meet, as a
/// reason; an attribute the token does not report is unmet (fail closed).
fn unmet_requirement(
    flags: &[(AttributeType, bool)],
    requirements: &[(AttributeType, bool)],
) -> Option<String> {
    requirements
        .iter()
        .find_map(|(t, want)| match flags.iter().find(|(ft, _)| ft == t) {
            Some((_, v)) if v == want => None,
            Some((_, v)) => Some(format!("CKA_{} is {v}, must be {want}", attr_name(*t))),
            None => Some(format!("the token does not report CKA_{}", attr_name(*t))),
        })
}

/// `EXTRACTABLE`, `NEVER_EXTRACTABLE`, ...: the PKCS#11 name without its `CKA_` prefix.
fn attr_name(t: AttributeType) -> &'static str {
    use AttributeType as T;
    match t {
        T::Token => "TOKEN",
        T::Private => "PRIVATE",
        T::Sensitive => "SENSITIVE",
        T::Extractable => "EXTRACTABLE",
        T::AlwaysSensitive => "ALWAYS_SENSITIVE",
        T::NeverExtractable => "NEVER_EXTRACTABLE",
        T::Local => "LOCAL",
        T::Encrypt => "ENCRYPT",
        T::Decrypt => "DECRYPT",
        T::Wrap => "WRAP",
        T::Unwrap => "UNWRAP",
        T::Sign => "SIGN",
        T::Verify => "VERIFY",
        T::Derive => "DERIVE",
        T::Modifiable => "MODIFIABLE",
        _ => "?",
    }
}

/// Attributes of a new KEK that every PKCS#11 token must honour.
fn kek_template(kek: &KekRef, class: KekClass) -> Vec<Attribute> {
    let encrypt = class == KekClass::Encrypt;
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::new(DEK_LEN as _)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(encrypt),
        Attribute::Wrap(!encrypt),
        Attribute::Unwrap(!encrypt),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(kek.id.as_str().as_bytes().to_vec()),
        Attribute::Id(kek_id_bytes(kek.version)),
    ]
}

/// Hardening attributes some tokens refuse at generation time.
fn kek_hardening() -> Vec<Attribute> {
    vec![Attribute::Modifiable(false), Attribute::Copyable(false)]
}

/// Generates KEK `kek` of class `class` inside the token (`CKM_AES_KEY_GEN`, AES-256,
/// sensitive, non-extractable, encrypt/decrypt only or wrap/unwrap only). Needs a
/// read-write, logged-in session.
pub(super) fn generate_kek(
    session: &Session,
    kek: &KekRef,
    class: KekClass,
) -> Result<ObjectHandle, Error> {
    let mut template = kek_template(kek, class);
    template.extend(kek_hardening());
    match session.generate_key(&Mechanism::AesKeyGen, &template) {
        Ok(h) => Ok(h),
        Err(Error::Pkcs11(
            rv @ (RvError::TemplateInconsistent
            | RvError::AttributeReadOnly
            | RvError::AttributeTypeInvalid
            | RvError::AttributeValueInvalid),
            _,
        )) => {
            tracing::warn!(
                error = ?rv,
                "token refused CKA_MODIFIABLE/CKA_COPYABLE=false on the KEK; creating it without"
            );
            session.generate_key(&Mechanism::AesKeyGen, &kek_template(kek, class))
        }
        Err(e) => Err(e),
    }
}

/// What an HMAC key of the KMS (the audit key, the binding key) must be: a generic secret
/// generated in the token, sensitive, never extractable, for HMAC signing and verifying only.
const HMAC_KEY_REQUIREMENTS: &[(AttributeType, bool)] = &[
    (AttributeType::Token, true),
    (AttributeType::Private, true),
    (AttributeType::Sensitive, true),
    (AttributeType::Extractable, false),
    (AttributeType::AlwaysSensitive, true),
    (AttributeType::NeverExtractable, true),
    (AttributeType::Local, true),
    (AttributeType::Sign, true),
    (AttributeType::Verify, true),
    (AttributeType::Encrypt, false),
    (AttributeType::Decrypt, false),
    (AttributeType::Wrap, false),
    (AttributeType::Unwrap, false),
    (AttributeType::Derive, false),
];

/// Length of an HMAC key of the KMS (HMAC-SHA256).
pub(super) const HMAC_KEY_LEN: usize = 32;

fn hmac_key_search(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The handle of the `role` HMAC key labelled `label`, which must exist exactly once and
/// meet [`HMAC_KEY_REQUIREMENTS`].
///
/// # Errors
/// `HmacKey` when it is absent, duplicated or not hardened.
pub(super) fn find_hmac_key(
    session: &Session,
    role: HmacRole,
    label: &str,
) -> Result<ObjectHandle, OpError> {
    let refused = |reason: String| {
        OpError::Backend(BackendError::HmacKey {
            role,
            label: label.to_owned(),
            reason,
        })
    };
    let found = session.find_objects(&hmac_key_search(label))?;
    let h = match found.as_slice() {
        [h] => *h,
        [] => {
            return Err(refused(
                "not in the token; create it with `progressdb-kms init-kek --config <file>`".into(),
            ))
        }
        _ => return Err(refused(format!("{} objects carry this label", found.len()))),
    };
    let mut wanted: Vec<AttributeType> = HMAC_KEY_REQUIREMENTS.iter().map(|(t, _)| *t).collect();
    wanted.extend([AttributeType::KeyType, AttributeType::ValueLen]);
    let attrs = session.get_attributes(h, &wanted)?;
    if !attrs
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(k) if *k == KeyType::GENERIC_SECRET))
    {
        return Err(refused("it is not a generic secret key".into()));
    }
    let len = attrs.iter().find_map(|a| match a {
        Attribute::ValueLen(v) => Some(usize::from(*v)),
        _ => None,
    });
    if len != Some(HMAC_KEY_LEN) {
        return Err(refused(format!(
            "CKA_VALUE_LEN is {len:?}, expected {HMAC_KEY_LEN}"
        )));
    }
    let flags: Vec<(AttributeType, bool)> = attrs.iter().filter_map(bool_attr).collect();
    unmet_requirement(&flags, HMAC_KEY_REQUIREMENTS).map_or(Ok(()), |why| Err(refused(why)))?;
    Ok(h)
}

/// The binding key's `CKA_ID`: the highest KEK version that existed when it was made (`0`
/// for a token provisioned with it). Only KEK versions up to this one can hold `AesKwV2`
/// blobs, written before the binding key existed; one under a later version is forged. The
/// value is set when the key is generated (unmodifiable where the token allows), and a
/// replaced binding key would fail every `AesKwV3` binding, so it cannot be raised quietly.
///
/// # Errors
/// `HmacKey` when the attribute is not 4 bytes.
pub(super) fn legacy_until(
    session: &Session,
    label: &str,
    h: ObjectHandle,
) -> Result<u32, OpError> {
    let attrs = session.get_attributes(h, &[AttributeType::Id])?;
    attrs
        .iter()
        .find_map(|a| match a {
            Attribute::Id(id) => <[u8; 4]>::try_from(id.as_slice())
                .ok()
                .map(u32::from_be_bytes),
            _ => None,
        })
        .ok_or_else(|| {
            OpError::Backend(BackendError::HmacKey {
                role: HmacRole::Binding,
                label: label.to_owned(),
                reason: "CKA_ID is not the 4-byte KEK version it was made at".into(),
            })
        })
}

/// Generates an HMAC key of the KMS in the token (`CKM_GENERIC_SECRET_KEY_GEN`, 32 bytes),
/// with `CKA_ID` = `id` (see [`legacy_until`]). Needs a read-write, logged-in session.
pub(super) fn generate_hmac_key(
    session: &Session,
    label: &str,
    id: u32,
) -> Result<ObjectHandle, Error> {
    let base = vec![
        Attribute::Id(id.to_be_bytes().to_vec()),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(Ulong::new(HMAC_KEY_LEN as _)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let mut hardened = base.clone();
    hardened.extend(kek_hardening());
    match session.generate_key(&Mechanism::GenericSecretKeyGen, &hardened) {
        Ok(h) => Ok(h),
        Err(Error::Pkcs11(
            RvError::TemplateInconsistent
            | RvError::AttributeReadOnly
            | RvError::AttributeTypeInvalid
            | RvError::AttributeValueInvalid,
            _,
        )) => session.generate_key(&Mechanism::GenericSecretKeyGen, &base),
        Err(e) => Err(e),
    }
}

//! Provisioning and inspecting the token outside the serving path, each on a one-shot admin
//! session: `init-kek`, the HMAC keys (audit, binding), making or adopting a KEK version,
//! destroying one, `check-config`'s read-only token check, and reading a KEK's attributes
//! back.

use std::sync::PoisonError;

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use kms_api::KekVersion;

use self::context::Pkcs11Context;
use self::token::OpError;
use crate::backend::{BackendError, HmacRole, HsmSettings, KekMissing, KekRef};

use super::*;

/// Result of [`init_kek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitKekOutcome {
    /// No version of the KEK existed; version 1 was generated in the token.
    Created(KekRef),
    /// The KEK already exists; this is its current (highest) version. Nothing was changed.
    AlreadyPresent(KekRef),
}

impl InitKekOutcome {
    pub fn kek(&self) -> &KekRef {
        match self {
            InitKekOutcome::Created(k) | InitKekOutcome::AlreadyPresent(k) => k,
        }
    }
}

/// A KEK's attributes as read back from the token (see [`kek_attributes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekAttributes {
    pub kek: KekRef,
    pub token: bool,
    pub private: bool,
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    pub local: bool,
    pub modifiable: bool,
    pub encrypt: bool,
    pub decrypt: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub sign: bool,
    pub verify: bool,
    pub derive: bool,
    /// `CKA_VALUE_LEN` in bytes (32 for AES-256).
    pub key_len: usize,
    /// Whether `C_GetAttributeValue(CKA_VALUE)` returned the key (must be `false`).
    pub value_readable: bool,
    /// Whether `C_WrapKey` of the KEK under another (session) key was refused (must be `true`).
    pub wrap_by_other_key_refused: bool,
}

/// Runs `f` on a fresh logged-in session of the token, under the write gate (one-shot
/// administrative sessions must not overlap a reset; see [`context`]).
pub(super) fn with_admin_session<T>(
    settings: &HsmSettings,
    read_write: bool,
    f: impl FnOnce(&Pkcs11Context, &Session) -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    let rt = context::context(&settings.module)?;
    rt.ensure_initialized()?;
    let _w = rt.write_gate();
    let slot = token::find_slot(&rt.pkcs11, &settings.token_label)?;
    let session = if read_write {
        rt.pkcs11.open_rw_session(slot)
    } else {
        rt.pkcs11.open_ro_session(slot)
    }
    .map_err(|e| token::setup_error("opening an HSM session", e))?;
    rt.login(&session, &settings.token_label, &settings.pin)
        .map_err(|e| token::op_to_setup_error("logging in", e))?;
    let out = f(rt, &session);
    if let Err(e) = session.close() {
        tracing::debug!(error = %e, "closing the administrative HSM session");
    }
    out
}

pub(super) fn hsm_error(what: &str, e: Error) -> BackendError {
    token::setup_error(what, e)
}

/// Creates KEK version 1 in the token unless some version of `settings.kek_label` exists.
/// Idempotent: a second call (or a call after rotation added versions) changes nothing and
/// reports the current version. Blocking.
///
/// # Errors
/// `Config` for an unloadable module, an unknown token label, a refused PIN or a duplicated
/// current version; `Unavailable` for device errors; `Internal` if the token refuses to
/// generate the key.
///
/// Creation is serialised inside this process only; across processes the caller serialises
/// it ([`crate::app::init_kek`] does, through the key store).
pub fn init_kek(settings: &HsmSettings) -> Result<InitKekOutcome, BackendError> {
    ensure_hmac_keys(settings)?;
    with_admin_session(settings, true, |rt, session| {
        let _create = rt.kek_create.lock().unwrap_or_else(PoisonError::into_inner);
        let versions = token::list_kek_versions(session, &settings.kek_label)
            .map_err(|e| hsm_error("listing KEK versions", e))?;
        if !versions.is_empty() {
            let current = token::current_kek(session, &settings.kek_label, &settings.token_label)
                .map_err(|e| token::op_to_setup_error("finding the KEK", e))?;
            tracing::info!(
                kek_id = %current.id,
                kek_version = %current.version,
                "KEK already present; nothing to do"
            );
            return Ok(InitKekOutcome::AlreadyPresent(current));
        }
        let kek = KekRef {
            id: settings.kek_label.clone(),
            version: KekVersion::FIRST,
        };
        let class = settings.residency.new_kek_class();
        token::generate_kek(session, &kek, class)
            .map_err(|e| hsm_error("generating the KEK", e))?;
        tracing::info!(
            token = %settings.token_label,
            kek_id = %kek.id,
            kek_version = %kek.version,
            kek_class = class.as_str(),
            "KEK created in the HSM"
        );
        Ok(InitKekOutcome::Created(kek))
    })
}

/// Creates the KMS's HMAC keys (the audit log's and the `AesKwV3` binding key) in the token
/// unless they exist; checks them either way. Idempotent. Blocking. Returns the roles of the
/// keys it created.
///
/// # Errors
/// `HmacKey` when an object with one of the labels exists but is not a hardened HMAC key; as
/// [`init_kek`] otherwise.
pub fn ensure_hmac_keys(settings: &HsmSettings) -> Result<Vec<HmacRole>, BackendError> {
    with_admin_session(settings, true, |rt, session| {
        let _create = rt.kek_create.lock().unwrap_or_else(PoisonError::into_inner);
        let mut created = Vec::new();
        for (role, label) in hmac_keys(settings) {
            match token::find_hmac_key(session, role, label) {
                Ok(_) => continue,
                Err(OpError::Backend(BackendError::HmacKey { .. }))
                    if token_has_no_object(session, label)? => {}
                Err(e) => return Err(token::op_to_setup_error("finding an HMAC key", e)),
            }
            // The binding key records the last KEK version that may hold AesKwV2 blobs.
            let id = match role {
                HmacRole::Audit => 0,
                HmacRole::Binding => token::list_kek_versions(session, &settings.kek_label)
                    .map_err(|e| hsm_error("listing KEK versions", e))?
                    .last()
                    .map_or(0, |v| v.get()),
            };
            token::generate_hmac_key(session, label, id)
                .map_err(|e| hsm_error("generating an HMAC key", e))?;
            token::find_hmac_key(session, role, label)
                .map_err(|e| token::op_to_setup_error("checking a new HMAC key", e))?;
            tracing::info!(%role, label, "HMAC key created in the HSM");
            created.push(role);
        }
        Ok(created)
    })
}

/// The KMS's HMAC keys and their labels.
pub(super) fn hmac_keys(settings: &HsmSettings) -> [(HmacRole, &str); 2] {
    [
        (HmacRole::Audit, settings.audit_key_label.as_str()),
        (HmacRole::Binding, settings.binding_key_label.as_str()),
    ]
}

pub(super) fn token_has_no_object(session: &Session, label: &str) -> Result<bool, BackendError> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| hsm_error("looking for an HMAC key", e))?;
    Ok(found.is_empty())
}

/// Makes KEK `version` exist: adopts an existing object that passes [`token::check_kek`],
/// otherwise generates it in the token (or, with [`KekMissing::Adopt`], answers
/// `KekNotFound`). Blocking.
pub(super) fn ensure_kek(
    settings: &HsmSettings,
    version: KekVersion,
    missing: KekMissing,
) -> Result<KekRef, BackendError> {
    let kek = KekRef {
        id: settings.kek_label.clone(),
        version,
    };
    with_admin_session(settings, true, |rt, session| {
        let _create = rt.kek_create.lock().unwrap_or_else(PoisonError::into_inner);
        match token::find_kek(session, &kek) {
            Ok(_) => {
                tracing::info!(kek_id = %kek.id, kek_version = %kek.version, "KEK version already in the HSM; adopted");
                return Ok(kek.clone());
            }
            Err(OpError::Backend(e @ BackendError::KekNotFound { .. })) => {
                if missing == KekMissing::Adopt {
                    return Err(e);
                }
            }
            Err(OpError::Backend(b)) => return Err(b),
            Err(OpError::Pkcs11 { func, rv }) => {
                return Err(hsm_error("finding the KEK", Error::Pkcs11(rv, func)))
            }
        }
        let class = settings.residency.new_kek_class();
        token::generate_kek(session, &kek, class)
            .map_err(|e| hsm_error("generating the KEK", e))?;
        // Read it back through the same checks as every KEK before anyone uses it.
        token::find_kek(session, &kek)
            .map_err(|e| token::op_to_setup_error("checking the new KEK", e))?;
        tracing::info!(
            token = %settings.token_label,
            kek_id = %kek.id,
            kek_version = %kek.version,
            kek_class = class.as_str(),
            "KEK version created in the HSM"
        );
        Ok(kek.clone())
    })
}

/// Destroys every object of KEK `kek`. Blocking.
pub(super) fn destroy_kek(settings: &HsmSettings, kek: &KekRef) -> Result<(), BackendError> {
    with_admin_session(settings, true, |_, session| {
        let objects =
            token::find_kek_objects(session, kek).map_err(|e| hsm_error("finding the KEK", e))?;
        if objects.is_empty() {
            return Err(BackendError::KekNotFound {
                id: kek.id.clone(),
                version: kek.version,
            });
        }
        for h in objects {
            session
                .destroy_object(h)
                .map_err(|e| hsm_error("destroying the KEK", e))?;
        }
        tracing::info!(kek_id = %kek.id, kek_version = %kek.version, "KEK version destroyed in the HSM");
        Ok(())
    })
}

/// What [`check_token`] found in the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenCheck {
    /// The current (highest) KEK version, present exactly once and hardened; `None` when no
    /// version exists yet (run `init-kek`).
    pub kek: Option<KekRef>,
    /// The HMAC keys that exist (and are hardened); an absent one is created by `init-kek`
    /// or the first start.
    pub hmac_keys: Vec<HmacRole>,
}

/// Read-only check for `check-config`: the module loads, the token with `hsm.token_label` is
/// present, the PIN logs in (one attempt: a token counts failed logins), the current KEK
/// exists once and is a hardened KEK, and the HMAC keys (audit, binding), if present, are
/// hardened. Changes
/// nothing in the token. Blocking.
///
/// # Errors
/// `Config` (module, token label, PIN, no KEK, duplicates), `PinRejected`, `KekRefused`,
/// `HmacKey`, `Unavailable`.
pub fn check_token(settings: &HsmSettings) -> Result<TokenCheck, BackendError> {
    with_admin_session(settings, false, |_, session| {
        let versions = token::list_kek_versions(session, &settings.kek_label)
            .map_err(|e| hsm_error("listing KEK versions", e))?;
        let kek = if versions.is_empty() {
            None
        } else {
            let kek = token::current_kek(session, &settings.kek_label, &settings.token_label)
                .map_err(|e| token::op_to_setup_error("finding the KEK", e))?;
            token::find_kek(session, &kek)
                .map_err(|e| token::op_to_setup_error("checking the KEK", e))?;
            Some(kek)
        };
        let mut present = Vec::new();
        for (role, label) in hmac_keys(settings) {
            match token::find_hmac_key(session, role, label) {
                Ok(_) => present.push(role),
                Err(OpError::Backend(BackendError::HmacKey { .. }))
                    if token_has_no_object(session, label)? => {}
                Err(e) => return Err(token::op_to_setup_error("checking an HMAC key", e)),
            }
        }
        Ok(TokenCheck {
            kek,
            hmac_keys: present,
        })
    })
}

/// Versions of the KEK objects labelled `settings.kek_label`, ascending, one entry per object
/// (a duplicate appears twice). For `status` and tests. Blocking.
///
/// # Errors
/// As [`init_kek`], without the generation failure.
pub fn list_kek_versions(settings: &HsmSettings) -> Result<Vec<KekVersion>, BackendError> {
    with_admin_session(settings, false, |_, session| {
        token::list_kek_versions(session, &settings.kek_label)
            .map_err(|e| hsm_error("listing KEK versions", e))
    })
}

/// Reads back the attributes of KEK `version` and checks that it cannot leave the token:
/// `CKA_VALUE` must be unreadable and wrapping it under another key must be refused (a
/// temporary session key is generated for the attempt and destroyed). Blocking.
///
/// # Errors
/// `KekNotFound` when that version is absent; otherwise as [`init_kek`].
pub fn kek_attributes(
    settings: &HsmSettings,
    version: KekVersion,
) -> Result<KekAttributes, BackendError> {
    let kek = KekRef {
        id: settings.kek_label.clone(),
        version,
    };
    with_admin_session(settings, false, |_, session| {
        let (handle, _) = token::find_kek(session, &kek).map_err(|e| match e {
            OpError::Backend(b) => b,
            OpError::Pkcs11 { func, rv } => hsm_error("finding the KEK", Error::Pkcs11(rv, func)),
        })?;
        read_kek_attributes(session, handle, kek.clone())
    })
}

fn read_kek_attributes(
    session: &Session,
    handle: ObjectHandle,
    kek: KekRef,
) -> Result<KekAttributes, BackendError> {
    use AttributeType as T;
    let wanted = [
        T::Token,
        T::Private,
        T::Sensitive,
        T::Extractable,
        T::AlwaysSensitive,
        T::NeverExtractable,
        T::Local,
        T::Modifiable,
        T::Encrypt,
        T::Decrypt,
        T::Wrap,
        T::Unwrap,
        T::Sign,
        T::Verify,
        T::Derive,
        T::ValueLen,
    ];
    let attrs = session
        .get_attributes(handle, &wanted)
        .map_err(|e| hsm_error("reading KEK attributes", e))?;
    let flag = |t: AttributeType| -> Result<bool, BackendError> {
        attrs
            .iter()
            .find_map(|a| match (t, a) {
                (T::Token, Attribute::Token(v))
                | (T::Private, Attribute::Private(v))
                | (T::Sensitive, Attribute::Sensitive(v))
                | (T::Extractable, Attribute::Extractable(v))
                | (T::AlwaysSensitive, Attribute::AlwaysSensitive(v))
                | (T::NeverExtractable, Attribute::NeverExtractable(v))
                | (T::Local, Attribute::Local(v))
                | (T::Modifiable, Attribute::Modifiable(v))
                | (T::Encrypt, Attribute::Encrypt(v))
                | (T::Decrypt, Attribute::Decrypt(v))
                | (T::Wrap, Attribute::Wrap(v))
                | (T::Unwrap, Attribute::Unwrap(v))
                | (T::Sign, Attribute::Sign(v))
                | (T::Verify, Attribute::Verify(v))
                | (T::Derive, Attribute::Derive(v)) => Some(*v),
                _ => None,
            })
            .ok_or_else(|| BackendError::Internal(format!("the KEK has no {t:?} attribute")))
    };
    let key_len = attrs
        .iter()
        .find_map(|a| match a {
            Attribute::ValueLen(v) => Some(usize::from(*v)),
            _ => None,
        })
        .ok_or_else(|| BackendError::Internal("the KEK has no CKA_VALUE_LEN".into()))?;

    // CKA_VALUE must be refused: both the size probe and the read.
    let value_info = session
        .get_attribute_info(handle, &[T::Value])
        .map_err(|e| hsm_error("probing CKA_VALUE", e))?;
    let value_returned = match session.get_attributes(handle, &[T::Value]) {
        Ok(v) => v.iter().any(|a| matches!(a, Attribute::Value(_))),
        Err(_) => false,
    };
    let value_readable =
        value_returned || matches!(value_info.first(), Some(AttributeInfo::Available(_)));

    Ok(KekAttributes {
        kek,
        token: flag(T::Token)?,
        private: flag(T::Private)?,
        sensitive: flag(T::Sensitive)?,
        extractable: flag(T::Extractable)?,
        always_sensitive: flag(T::AlwaysSensitive)?,
        never_extractable: flag(T::NeverExtractable)?,
        local: flag(T::Local)?,
        modifiable: flag(T::Modifiable)?,
        encrypt: flag(T::Encrypt)?,
        decrypt: flag(T::Decrypt)?,
        wrap: flag(T::Wrap)?,
        unwrap: flag(T::Unwrap)?,
        sign: flag(T::Sign)?,
        verify: flag(T::Verify)?,
        derive: flag(T::Derive)?,
        key_len,
        value_readable,
        wrap_by_other_key_refused: wrap_attempt_refused(session, handle)?,
    })
}

/// Tries to export the KEK with `C_WrapKey` under a fresh session key, with both AES key-wrap
/// mechanisms. `true` when no attempt succeeded and at least one was refused because the KEK
/// is unextractable (a mechanism the token lacks proves nothing either way).
fn wrap_attempt_refused(session: &Session, kek: ObjectHandle) -> Result<bool, BackendError> {
    let template = [
        Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::new(32)),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ];
    let wrapping = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| hsm_error("generating a temporary wrapping key", e))?;
    let mut exported = false;
    let mut refused = false;
    let mut outcome = Ok(());
    for mech in [Mechanism::AesKeyWrapPad, Mechanism::AesKeyWrap] {
        match session.wrap_key(&mech, wrapping, kek) {
            Ok(mut bytes) => {
                zeroize::Zeroize::zeroize(&mut bytes);
                exported = true;
            }
            Err(Error::Pkcs11(RvError::KeyUnextractable, _)) => refused = true,
            // Not about extractability: proves nothing either way.
            Err(Error::Pkcs11(
                rv @ (RvError::MechanismInvalid
                | RvError::MechanismParamInvalid
                | RvError::KeyNotWrappable),
                _,
            )) => {
                tracing::debug!(mechanism = ?mech.mechanism_type(), error = ?rv, "wrap attempt inconclusive");
            }
            Err(e) => {
                outcome = Err(hsm_error("attempting to wrap the KEK", e));
                break;
            }
        }
    }
    if let Err(e) = session.destroy_object(wrapping) {
        tracing::debug!(error = %e, "destroying the temporary wrapping key");
    }
    outcome.map(|()| refused && !exported)
}

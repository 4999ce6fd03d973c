//! The KMS's HMAC keys in the token (the audit key, the binding key): finding and checking
//! one, the legacy range of a binding key, and generating one.

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;

use super::attrs::{bool_attr, kek_hardening, unmet_requirement};
use super::OpError;
use crate::backend::{BackendError, HmacRole};

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
const HMAC_KEY_LEN: usize = 32;

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
pub(in crate::backend::pkcs11) fn find_hmac_key(
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
pub(in crate::backend::pkcs11) fn legacy_until(
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
pub(in crate::backend::pkcs11) fn generate_hmac_key(
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

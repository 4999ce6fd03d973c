//! KEK objects: finding them by label and version, listing versions, the current one, the
//! attribute checks a KEK must pass, and generating one.

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use kms_api::{KekId, KekVersion};

use super::attrs::{bool_attr, kek_hardening, unmet_requirement};
use super::OpError;
use crate::backend::{BackendError, KekClass, KekRef, DEK_LEN};

/// `CKA_ID` of a KEK version: the version as a 4-byte big-endian integer.
fn kek_id_bytes(version: KekVersion) -> Vec<u8> {
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
pub(in crate::backend::pkcs11) fn find_kek_objects(
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
pub(in crate::backend::pkcs11) fn find_kek(
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
pub(in crate::backend::pkcs11) fn list_kek_versions(
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
pub(in crate::backend::pkcs11) fn current_kek(
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

/// Checks that the object `handle` is a KEK this KMS may use and returns its class: an
/// AES-256 secret key made inside the token, sensitive and never extractable
/// ([`KEK_REQUIREMENTS`]), for encryption and decryption only or for wrapping and unwrapping
/// only ([`class_requirements`]; `CKA_WRAP` says which is claimed). `CKA_MODIFIABLE = true` is
/// only warned about (some tokens refuse to create keys with it false).
///
/// # Errors
/// `KekRefused` naming the label, the version and the first attribute at fault; an attribute
/// the token does not report counts as at fault (fail closed).
fn check_kek(session: &Session, handle: ObjectHandle, kek: &KekRef) -> Result<KekClass, OpError> {
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

/// Generates KEK `kek` of class `class` inside the token (`CKM_AES_KEY_GEN`, AES-256,
/// sensitive, non-extractable, encrypt/decrypt only or wrap/unwrap only). Needs a
/// read-write, logged-in session.
pub(in crate::backend::pkcs11) fn generate_kek(
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

//! The HSM operations a worker runs on its live session: DEK generation and the wrapped-DEK
//! formats (`AesGcmV1`, `AesKwV3`, and `AesKwV2` read), the hsm-residency DEK objects and
//! message encryption, the audit chain and the health round trip.

use std::sync::atomic::Ordering;

use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::SessionState;
use cryptoki::types::Ulong;
use kms_api::{KeyId, WrappedDek};
use zeroize::Zeroizing;

use super::super::token::{self, classify, Disposition, OpError};
use super::*;
use crate::backend::{
    binding_input, wrap_aad, BackendError, Dek, DekResidency, HmacRole, KekClass, KekRef,
    ResidentItem, ResidentKey, WrapFormat, WrappedHeader, AES_KW_LEN, BINDING_LEN, DEK_LEN,
    WRAPPED_HEADER_LEN,
};

/// GCM IV length (96 bits) and tag length (128 bits) of `AesGcmV1`.
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

pub(super) fn gcm_tag_bits() -> Ulong {
    Ulong::new((TAG_LEN * 8) as _)
}

/// DEK from the HSM RNG, encrypted under the KEK with AES-GCM by the HSM.
pub(super) fn generate(
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
pub(super) fn seal(
    live: &mut Live,
    key_id: &KeyId,
    kek: &KekRef,
    dek: &Dek,
) -> Result<WrappedDek, OpError> {
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
    let header = WrappedHeader {
        format: WrapFormat::AesGcmV1,
        kek_version: kek.version,
    };
    Ok(header.encode(&[&iv, &ct])?)
}

/// Decrypts a wrapped DEK through the HSM; any authentication failure is `InvalidWrapped`.
pub(super) fn unwrap(
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
            let (Some(iv_bytes), Some(ct)) = (
                b.get(WRAPPED_HEADER_LEN..WRAPPED_HEADER_LEN + IV_LEN),
                b.get(WRAPPED_HEADER_LEN + IV_LEN..),
            ) else {
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
pub(super) enum Extract {
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
pub(super) fn dek_object_template(extract: Extract) -> Vec<Attribute> {
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

pub(super) fn destroy_quietly(live: &Live, h: ObjectHandle) {
    if let Err(e) = live.session.destroy_object(h) {
        tracing::debug!(error = %e, "destroying a DEK session object");
    }
}

/// A session object holding `dek` (its bytes pass through this process: the memory path,
/// and the one-time import of `AesGcmV1` DEKs). The attribute buffer is zeroized.
pub(super) fn create_dek_object(
    live: &Live,
    dek: &Dek,
    extract: Extract,
) -> Result<ObjectHandle, OpError> {
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
pub(super) fn unwrap_object(
    live: &Live,
    kek_h: ObjectHandle,
    wrapped: &WrappedDek,
    extract: Extract,
) -> Result<ObjectHandle, OpError> {
    let kw = wrapped
        .as_bytes()
        .get(WRAPPED_HEADER_LEN..WRAPPED_HEADER_LEN + AES_KW_LEN)
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
pub(super) fn wrap_object(
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
    let header = WrappedHeader {
        format: WrapFormat::AesKwV3,
        kek_version: kek.version,
    };
    Ok(header.encode(&[&kw, &binding])?)
}

/// `HMAC-SHA256(binding key, binding_input(key_id, kek, kw))`, computed by the HSM.
pub(super) fn binding(
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
pub(super) fn unwrap_checked(
    live: &mut Live,
    kek_h: ObjectHandle,
    key_id: &KeyId,
    kek: &KekRef,
    format: WrapFormat,
    wrapped: &WrappedDek,
    extract: Extract,
) -> Result<ObjectHandle, OpError> {
    let b = wrapped.as_bytes();
    const KW_END: usize = WRAPPED_HEADER_LEN + AES_KW_LEN;
    let (Some(kw), Some(tail)) = (b.get(WRAPPED_HEADER_LEN..KW_END), b.get(KW_END..)) else {
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
pub(super) fn check_in_hsm(
    live: &Live,
    key_id: &KeyId,
    kek: &KekRef,
    wrapped: &WrappedDek,
    obj: ObjectHandle,
) -> Result<(), OpError> {
    let b = wrapped.as_bytes();
    let (Some(iv_bytes), Some(tag)) = (
        b.get(WRAPPED_HEADER_LEN + AES_KW_LEN..WRAPPED_HEADER_LEN + AES_KW_LEN + IV_LEN),
        b.get(WRAPPED_HEADER_LEN + AES_KW_LEN + IV_LEN..),
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
pub(super) fn resident_handle(
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
pub(super) fn generate_resident(
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
pub(super) fn check_wrapped(
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
pub(super) fn rewrap(
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
pub(super) fn seal_message(
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
pub(super) fn open_message(
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
pub(super) fn audit_chain(
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
pub(super) fn health(live: &mut Live, kek: &KekRef) -> Result<(), OpError> {
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

//! DEK key objects in the HSM: their templates, creation from bytes, AES key wrap (RFC 3394)
//! into and out of the token, the `AesKwV3` binding, and the checked unwrap of `AesKwV3` and
//! `AesKwV2` blobs.

use super::*;

/// Who may get a DEK session object's value out of the HSM.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::backend::pkcs11::worker) enum Extract {
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
pub(in crate::backend::pkcs11::worker) fn dek_object_template(extract: Extract) -> Vec<Attribute> {
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

pub(in crate::backend::pkcs11::worker) fn destroy_quietly(live: &Live, h: ObjectHandle) {
    if let Err(e) = live.session.destroy_object(h) {
        tracing::debug!(error = %e, "destroying a DEK session object");
    }
}

/// A session object holding `dek` (its bytes pass through this process: the memory path,
/// and the one-time import of `AesGcmV1` DEKs). The attribute buffer is zeroized.
pub(in crate::backend::pkcs11::worker) fn create_dek_object(
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
pub(in crate::backend::pkcs11::worker) fn unwrap_object(
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
pub(in crate::backend::pkcs11::worker) fn wrap_object(
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
pub(in crate::backend::pkcs11::worker) fn binding(
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
pub(in crate::backend::pkcs11::worker) fn unwrap_checked(
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
pub(in crate::backend::pkcs11::worker) fn check_in_hsm(
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

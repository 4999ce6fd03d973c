//! Hsm residency: the DEK session objects of resident keys (found in the session's map or
//! made on first use), resident DEK generation, and message encryption and decryption by
//! the HSM.

use super::*;

/// Hsm residency: the session object of `key`'s DEK, from this session's map or made now:
/// unwrapped and checked by the HSM (`AesKwV3`, `AesKwV2`), or, for an `AesGcmV1` blob,
/// decrypted and imported once (its bytes pass through this worker, zeroized at once).
pub(in crate::backend::pkcs11::worker) fn resident_handle(
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
pub(in crate::backend::pkcs11::worker) fn generate_resident(
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

/// Hsm residency: `nonce | ciphertext | tag` of one message, encrypted by the HSM under the
/// DEK object `h` (IV from the OS RNG, as in memory mode).
pub(in crate::backend::pkcs11::worker) fn seal_message(
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
pub(in crate::backend::pkcs11::worker) fn open_message(
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

//! The HSM operations a worker runs on its live session: DEK generation and the wrapped-DEK
//! formats (`AesGcmV1`, `AesKwV3`, and `AesKwV2` read), the audit chain and the health round
//! trip. The DEK key objects these use are in `objects.rs`; the hsm-residency DEK objects and
//! message encryption in `resident.rs`.

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

mod objects;
mod resident;

pub(super) use objects::destroy_quietly;
use objects::{create_dek_object, dek_object_template, unwrap_checked, wrap_object, Extract};
pub(super) use resident::{generate_resident, open_message, resident_handle, seal_message};

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

//! The key-backend boundary: everything the KMS asks of the place where the KEK lives.
//!
//! The only production backend is [`pkcs11::Pkcs11Backend`] (an HSM reached through PKCS#11).
//! The service layer is generic over [`KeyBackend`], so unit tests of its logic can use a mock
//! and a future "DEKs never leave the HSM" backend can slot in.
//!
//! # Wrapped-DEK format
//! A wrapped DEK is self-describing; its first byte is a [`WrapFormat`] tag, so a blob written
//! today stays readable when another mechanism is added for an HSM that lacks this one. The
//! choice of format for new wraps lives in exactly one place: [`WrapFormat::for_kek`].
//!
//! `AesGcmV1` (tag `0x01`), 65 bytes, under an *encrypt-class* KEK ([`KekClass::Encrypt`]):
//! `tag(1) | kek_version (u32 BE, 4) | iv (12) | encrypted DEK (32) | GCM tag (16)`.
//! The DEK is encrypted by the HSM with `CKM_AES_GCM` under the KEK `(kek_id, kek_version)`,
//! with AAD = [`wrap_aad`] (binds the blob to its key id, KEK id and KEK version).
//!
//! `AesKwV3` (tag `0x03`), 77 bytes, under a *wrap-class* KEK ([`KekClass::Wrap`]), the
//! format of every new wrap under one:
//! `tag(1) | kek_version (u32 BE, 4) | C_WrapKey output (CKM_AES_KEY_WRAP, RFC 3394, 40) |
//! binding (32)`. The DEK is a key object wrapped by the HSM, so it can be unwrapped into a
//! non-extractable object without its bytes leaving the HSM ([`DekResidency::Hsm`]).
//! RFC 3394 authenticates the DEK under the KEK but takes no AAD: the *binding*,
//! `HMAC-SHA256(binding key, `[`binding_input`]`)` computed by the HSM under its own
//! non-extractable key (`hsm.binding_key_label`), ties the blob to its key id and KEK. No
//! call of the key API drives that key, so no client (nor anyone who learnt a DEK) can bind
//! a DEK to a key id of its choosing; a blob whose binding fails is refused like a bad GCM tag.
//!
//! `AesKwV2` (tag `0x02`), 73 bytes, is read, never written: the same key part followed by a
//! *check* (`iv (12) | tag (16)`: AES-GCM under the DEK itself of an empty message, AAD =
//! [`wrap_aad`]). Anyone who can run AES-GCM under the DEK can make that check; every AAD
//! under the reserved prefix is refused on the key API for that reason, and a KEK rotation
//! rewraps every such blob as `AesKwV3`.
//!
//! # DEK residency
//! [`DekResidency::Memory`] (the default): the service holds unwrapped DEKs in its bounded
//! cache and encrypts messages itself. [`DekResidency::Hsm`]: DEKs exist in plaintext only
//! inside the HSM, as sensitive, non-extractable session objects; messages are encrypted
//! and decrypted by the HSM ([`KeyBackend::seal_resident`], [`KeyBackend::open_resident`]),
//! and no method of the backend returns DEK bytes. Both modes write the same message
//! ciphertext (`nonce | ciphertext | tag`, AES-256-GCM).

use kms_api::{KekId, KekVersion};

mod error;
mod key_backend;
/// The mock backend of the unit tests, beside the trait it implements.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod mock;
mod residency;
mod settings;
mod wrap;

pub mod pkcs11;

pub(crate) use error::not_resident;
pub use error::{BackendError, KekMissing};
pub use key_backend::{BackendState, KeyBackend};
pub use residency::{DekResidency, ResidentItem, ResidentKey};
pub use settings::{HmacRole, HsmLimits, HsmSettings};
pub use wrap::{
    binding_input, parse_wrapped_header, wrap_aad, KekClass, WrapFormat, WrappedHeader,
    AES_GCM_V1_LEN, AES_KW_LEN, AES_KW_V2_LEN, AES_KW_V3_LEN, BINDING_LEN, WRAPPED_HEADER_LEN,
};

/// Length of a DEK in bytes (AES-256).
pub const DEK_LEN: usize = service_kit::aead::KEY_LEN;

/// A raw data-encryption key: boxed, zeroized on drop, never printed, not `Clone`
/// ([`service_kit::aead::DataKey`]).
pub use service_kit::aead::DataKey as Dek;

/// One KEK: its label in the HSM and its version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KekRef {
    pub id: KekId,
    pub version: KekVersion,
}

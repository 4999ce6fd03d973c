//! The wrapped-DEK formats (see the parent module's documentation): the format tag and the
//! KEK class that picks it, the AAD and binding inputs, the header's one encoder and parser,
//! and the length of each format.

use kms_api::{KekVersion, KeyId, WrappedDek};

use super::{BackendError, KekRef, DEK_LEN};

/// Tag of the wrapped-DEK format (first byte of every [`WrappedDek`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WrapFormat {
    /// DEK encrypted by the HSM with `CKM_AES_GCM` (96-bit IV from the HSM RNG, 128-bit tag)
    /// via `C_Encrypt`, AAD = [`wrap_aad`].
    AesGcmV1 = 0x01,
    /// DEK key object wrapped by the HSM with `CKM_AES_KEY_WRAP` (RFC 3394) via
    /// `C_WrapKey`, followed by its check under the DEK (see the module documentation).
    /// Read only: rotations rewrap these blobs as [`WrapFormat::AesKwV3`].
    AesKwV2 = 0x02,
    /// DEK key object wrapped as in `AesKwV2`, bound to its key id and KEK by an
    /// HMAC-SHA256 in the HSM under the binding key (see the module documentation).
    AesKwV3 = 0x03,
}

impl WrapFormat {
    /// The format of every new wrap under a KEK of class `class`. The choice lives here and
    /// only here.
    pub const fn for_kek(class: KekClass) -> WrapFormat {
        match class {
            KekClass::Encrypt => WrapFormat::AesGcmV1,
            KekClass::Wrap => WrapFormat::AesKwV3,
        }
    }

    /// The KEK class a blob of this format was made under.
    pub const fn kek_class(self) -> KekClass {
        match self {
            WrapFormat::AesGcmV1 => KekClass::Encrypt,
            WrapFormat::AesKwV2 | WrapFormat::AesKwV3 => KekClass::Wrap,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0x01 => Some(WrapFormat::AesGcmV1),
            0x02 => Some(WrapFormat::AesKwV2),
            0x03 => Some(WrapFormat::AesKwV3),
            _ => None,
        }
    }

    /// Length of a wrapped DEK of this format.
    pub const fn blob_len(self) -> usize {
        match self {
            WrapFormat::AesGcmV1 => AES_GCM_V1_LEN,
            WrapFormat::AesKwV2 => AES_KW_V2_LEN,
            WrapFormat::AesKwV3 => AES_KW_V3_LEN,
        }
    }
}

/// What a KEK version may do, fixed when it is generated and read back from its attributes
/// (`CKA_ENCRYPT`/`CKA_DECRYPT` or `CKA_WRAP`/`CKA_UNWRAP`, never both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KekClass {
    /// Encrypts and decrypts DEK bytes (`AesGcmV1`): the DEK passes through the KMS.
    Encrypt,
    /// Wraps and unwraps DEK key objects (`AesKwV3`, and `AesKwV2` read): the DEK can stay
    /// in the HSM.
    Wrap,
}

impl KekClass {
    pub fn as_str(self) -> &'static str {
        match self {
            KekClass::Encrypt => "encrypt",
            KekClass::Wrap => "wrap",
        }
    }
}

/// AAD that binds a wrapped DEK to its key id and KEK:
/// `"progressdb-kms:dek:v1" 0x00 key_id 0x00 kek_id 0x00 kek_version(u32 BE)`.
pub fn wrap_aad(key_id: &KeyId, kek: &KekRef) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    // Under the prefix no client AAD may have (`kms_api::RESERVED_AAD_PREFIX`).
    aad.extend_from_slice(kms_api::RESERVED_AAD_PREFIX);
    aad.extend_from_slice(b"dek:v1");
    aad.push(0);
    aad.extend_from_slice(key_id.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(kek.id.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(&kek.version.get().to_be_bytes());
    aad
}

/// What the binding of an `AesKwV3` blob authenticates:
/// `"progressdb-kms:dek-binding:v3" 0x00 | wrap_aad(key_id, kek) | kw (40)`.
pub fn binding_input(key_id: &KeyId, kek: &KekRef, kw: &[u8]) -> Vec<u8> {
    const DOMAIN: &[u8] = b"dek-binding:v3\0";
    let aad = wrap_aad(key_id, kek);
    let mut m = Vec::with_capacity(
        kms_api::RESERVED_AAD_PREFIX.len() + DOMAIN.len() + aad.len() + kw.len(),
    );
    m.extend_from_slice(kms_api::RESERVED_AAD_PREFIX);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&aad);
    m.extend_from_slice(kw);
    m
}

/// The parsed header of a wrapped DEK (format and KEK version), without touching the HSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrappedHeader {
    pub format: WrapFormat,
    pub kek_version: KekVersion,
}

/// Length of the header of every wrapped DEK: the format tag and the KEK version (u32 BE).
pub const WRAPPED_HEADER_LEN: usize = 1 + 4;

impl WrappedHeader {
    /// A wrapped DEK of this format and KEK version whose body (all after the header) is the
    /// concatenation of `body`: the one encoder of the header, beside its parser
    /// [`parse_wrapped_header`].
    ///
    /// # Errors
    /// [`BackendError::Internal`] when the result is not exactly the format's length (a
    /// token answer of the wrong size).
    pub fn encode(self, body: &[&[u8]]) -> Result<WrappedDek, BackendError> {
        let len = self.format.blob_len();
        let mut blob = Vec::with_capacity(len);
        blob.push(self.format as u8);
        blob.extend_from_slice(&self.kek_version.get().to_be_bytes());
        for part in body {
            blob.extend_from_slice(part);
        }
        if blob.len() != len {
            return Err(BackendError::Internal(format!(
                "a {:?} wrapped DEK of {} bytes, expected {len}",
                self.format,
                blob.len()
            )));
        }
        Ok(WrappedDek::new(blob))
    }
}

/// Reads the header of a wrapped DEK.
///
/// # Errors
/// [`BackendError::InvalidWrapped`] for an unknown tag, a bad version or a wrong length.
pub fn parse_wrapped_header(w: &WrappedDek) -> Result<WrappedHeader, BackendError> {
    let b = w.as_bytes();
    let format = b
        .first()
        .and_then(|t| WrapFormat::from_tag(*t))
        .ok_or(BackendError::InvalidWrapped)?;
    if b.len() != format.blob_len() {
        return Err(BackendError::InvalidWrapped);
    }
    let v = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
    let kek_version = KekVersion::new(v).map_err(|_| BackendError::InvalidWrapped)?;
    Ok(WrappedHeader {
        format,
        kek_version,
    })
}

/// Length of an `AesGcmV1` wrapped DEK.
pub const AES_GCM_V1_LEN: usize = 1 + 4 + 12 + DEK_LEN + 16;
/// Length of RFC 3394 output for a DEK (one 8-byte integrity block more).
pub const AES_KW_LEN: usize = DEK_LEN + 8;
/// Length of an `AesKwV2` wrapped DEK.
pub const AES_KW_V2_LEN: usize = 1 + 4 + AES_KW_LEN + 12 + 16;
/// Length of an `AesKwV3` binding (HMAC-SHA256).
pub const BINDING_LEN: usize = 32;
/// Length of an `AesKwV3` wrapped DEK.
pub const AES_KW_V3_LEN: usize = 1 + 4 + AES_KW_LEN + BINDING_LEN;

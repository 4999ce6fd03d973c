//! Where unwrapped DEKs live ([`DekResidency`]), and the names and items of the DEKs that
//! stay in the HSM.

use std::fmt;

use kms_api::{KekId, KeyId, WrappedDek};

use super::KekClass;

/// Where unwrapped DEKs live (`hsm.dek_residency`); see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DekResidency {
    /// In the KMS's bounded cache of unwrapped DEKs (locked, zeroized memory).
    #[default]
    Memory,
    /// Only inside the HSM, as sensitive, non-extractable session objects.
    Hsm,
}

impl DekResidency {
    pub fn as_str(self) -> &'static str {
        match self {
            DekResidency::Memory => "memory",
            DekResidency::Hsm => "hsm",
        }
    }

    /// The class of the KEK versions this mode generates (`init-kek`, rotations): memory
    /// mode keeps making encrypt-class KEKs; hsm mode needs wrap-class ones.
    pub const fn new_kek_class(self) -> KekClass {
        match self {
            DekResidency::Memory => KekClass::Encrypt,
            DekResidency::Hsm => KekClass::Wrap,
        }
    }
}

/// A DEK that stays in the HSM, named by what is needed to find or re-create its session
/// object: nothing in it is secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentKey {
    pub key_id: KeyId,
    pub kek_id: KekId,
    pub wrapped: WrappedDek,
}

/// One message for [`KeyBackend::seal_resident`] / [`KeyBackend::open_resident`]: the input
/// (plaintext, or `nonce | ciphertext | tag`) and its AAD.
///
/// [`KeyBackend::seal_resident`]: super::KeyBackend::seal_resident
/// [`KeyBackend::open_resident`]: super::KeyBackend::open_resident
pub struct ResidentItem {
    pub data: zeroize::Zeroizing<Vec<u8>>,
    pub aad: Vec<u8>,
}

impl fmt::Debug for ResidentItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResidentItem")
            .field("data_len", &self.data.len())
            .finish_non_exhaustive()
    }
}

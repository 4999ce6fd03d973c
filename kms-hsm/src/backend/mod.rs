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

use std::fmt;
use std::future::Future;

use kms_api::{KekId, KekVersion, KeyId, WrappedDek};
use secrecy::SecretString;

pub mod pkcs11;

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

/// Settings of the PKCS#11 backend (section `[hsm]` of the KMS config).
#[derive(Clone)]
pub struct HsmSettings {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: std::path::PathBuf,
    /// Token label (`CKA_LABEL` of the token); never a slot number.
    pub token_label: String,
    /// User PIN.
    pub pin: SecretString,
    /// KEK label (`CKA_LABEL` of the key); the KEK id on the wire.
    pub kek_label: KekId,
    /// Label of the audit log's HMAC key (a generic-secret token object, never extractable).
    pub audit_key_label: String,
    /// Label of the HMAC key that binds `AesKwV3` blobs to their key id and KEK (same kind
    /// of object as the audit key, used for nothing else).
    pub binding_key_label: String,
    /// Sessions (= worker threads) opened against the token.
    pub sessions: usize,
    /// Where unwrapped DEKs live (`hsm.dek_residency`).
    pub residency: DekResidency,
    /// In [`DekResidency::Hsm`]: DEK session objects each worker session keeps (least
    /// recently used destroyed first; `hsm.resident_keys_per_session`).
    pub resident_keys_per_session: usize,
    /// Queue and deadline of HSM jobs.
    pub limits: HsmLimits,
}

/// Bounds on the work waiting for the HSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HsmLimits {
    /// Jobs queued per worker (session) before new ones are refused with `Overloaded`.
    pub queue_depth: usize,
    /// How long a caller waits for an HSM job (queue time included) before `Unavailable`.
    pub job_timeout: std::time::Duration,
}

impl Default for HsmLimits {
    /// 64 jobs per worker, 5 s.
    fn default() -> Self {
        Self {
            queue_depth: 64,
            job_timeout: std::time::Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for HsmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSettings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("kek_label", &self.kek_label)
            .field("audit_key_label", &self.audit_key_label)
            .field("binding_key_label", &self.binding_key_label)
            .field("sessions", &self.sessions)
            .field("residency", &self.residency)
            .field("resident_keys_per_session", &self.resident_keys_per_session)
            .field("limits", &self.limits)
            .finish()
    }
}

/// What one of the KMS's HMAC keys in the token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacRole {
    /// Chains the audit log (`hsm.audit_key_label`).
    Audit,
    /// Binds `AesKwV3` blobs to their key id and KEK (`hsm.binding_key_label`).
    Binding,
}

impl HmacRole {
    /// The configuration key that names this key's label.
    pub fn config_key(self) -> &'static str {
        match self {
            HmacRole::Audit => "hsm.audit_key_label",
            HmacRole::Binding => "hsm.binding_key_label",
        }
    }
}

impl fmt::Display for HmacRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HmacRole::Audit => "audit",
            HmacRole::Binding => "DEK binding",
        })
    }
}

/// Failures of a backend. Messages are for the KMS log (they never contain key material or the
/// PIN); the HTTP layer maps variants to codes and never shows the 5xx detail to callers.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The HSM cannot be used now (token absent, device error, login failed, workers
    /// recovering). Retryable; maps to 503.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// The wrapped DEK is not valid under its KEK: unknown format, wrong length, or failed
    /// authentication (tampered blob, wrong key id). Opaque; maps to 422/500 by caller context.
    #[error("wrapped DEK is invalid or does not authenticate")]
    InvalidWrapped,
    /// The KEK named by id and version is not in the token.
    #[error("KEK {id} version {version} not found in the token")]
    KekNotFound { id: KekId, version: KekVersion },
    /// An object with the KEK's label and version is not a hardened KEK (not sensitive,
    /// extractable, imported, usable for wrapping...): it is never used.
    #[error("KEK '{id}' version {version} is refused: {reason}; remove or replace that object")]
    KekRefused {
        id: KekId,
        version: KekVersion,
        reason: String,
    },
    /// One of the KMS's HMAC keys (the audit log's, or the binding key of `AesKwV3` blobs)
    /// is missing or is not a hardened key: nothing is audited (so nothing that must be
    /// audited is done), or no DEK is wrapped or unwrapped under a wrap-class KEK. Fatal at
    /// start-up, 503 later.
    #[error("{role} key '{label}': {reason}")]
    HmacKey {
        role: HmacRole,
        label: String,
        reason: String,
    },
    /// The token refused the PIN. Never retried (a real HSM locks the PIN after a few
    /// failures); the KMS stays unready until it is restarted with a correct PIN.
    #[error("HSM PIN rejected: {0}")]
    PinRejected(String),
    /// Every HSM worker's queue is full: the HSM is saturated. Retryable; maps to 503
    /// `overloaded`.
    #[error("HSM queues are full")]
    Overloaded,
    /// Configuration problems found when opening (module not loadable, no token with that
    /// label, wrong PIN). Fatal at start-up.
    #[error("HSM configuration: {0}")]
    Config(String),
    /// Anything else the HSM reported; detail for the log only.
    #[error("HSM error: {0}")]
    Internal(String),
}

/// What [`KeyBackend::ensure_kek_version`] does when the version is not in the HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekMissing {
    /// Generate it (the rotation that introduces it).
    Generate,
    /// Refuse (`KekNotFound`): only a version another process made is adopted.
    Adopt,
}

/// What the KMS needs from the holder of its KEKs.
///
/// Implementations must be cheap to share (`Send + Sync`); methods never block the async
/// runtime (the PKCS#11 backend runs HSM calls on its own worker threads).
pub trait KeyBackend: Send + Sync + 'static {
    /// The KEK used for new wraps.
    fn current_kek(&self) -> KekRef;

    /// Generates a 256-bit DEK with the HSM's random generator and wraps it under the current
    /// KEK in [`WrapFormat::for_kek`] of its class, bound to `key_id`. Returns the raw DEK too, so the
    /// caller can seed its cache without an unwrap round trip.
    ///
    /// # Errors
    /// `Unavailable` when the HSM cannot be used (nothing was created: the DEK only exists in
    /// memory until the caller stores the wrapped form); `KekNotFound` when the current KEK is
    /// missing; `Internal` otherwise.
    fn generate_dek(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<(Dek, WrappedDek, KekRef), BackendError>> + Send;

    /// Unwraps `wrapped` (made for `key_id`) through the HSM.
    ///
    /// # Errors
    /// `InvalidWrapped` when the blob is malformed or does not authenticate (opaque);
    /// `KekNotFound` when its KEK version is not in the token; `Unavailable` when the HSM
    /// cannot be used now.
    fn unwrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<Dek, BackendError>> + Send;

    /// Checks that `wrapped` (made for `key_id`) unwraps and authenticates, without handing
    /// out the DEK: verification passes and restores use it. In hsm residency an `AesKwV2`
    /// DEK is unwrapped into a session object, checked by the HSM and destroyed.
    ///
    /// # Errors
    /// As [`KeyBackend::unwrap_dek`].
    fn check_wrapped(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let unwrapped = self.unwrap_dek(key_id, kek_id, wrapped);
        async move { unwrapped.await.map(drop) }
    }

    /// Unwraps `wrapped` (made for `key_id` under an older KEK version) and wraps the same
    /// DEK again under the current KEK, inside one HSM job: the DEK bytes never leave the
    /// backend and are zeroized at once. KEK rotation moves every record this way.
    ///
    /// # Errors
    /// As [`KeyBackend::unwrap_dek`] for the unwrap; `Unavailable`/`Overloaded` when the HSM
    /// cannot take the job now (nothing changed: the caller keeps the old blob).
    fn rewrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send;

    /// The KEK versions present in the HSM, ascending (one entry per object, so a duplicate
    /// shows twice).
    ///
    /// # Errors
    /// `Unavailable` when the HSM cannot be asked now.
    fn kek_versions(&self) -> impl Future<Output = Result<Vec<KekVersion>, BackendError>> + Send;

    /// Makes KEK `version` known and checked, and current for new wraps when it is newer
    /// than the current one. A version that exists and passes the checks is adopted, never
    /// made twice; a missing one is generated inside the token with the same hardened
    /// attributes as the first one when `missing` is [`KekMissing::Generate`] (a rotation),
    /// and refused with [`KekMissing::Adopt`] (a replica following a rotation another one
    /// made).
    ///
    /// # Errors
    /// `KekRefused` when an object with that label and version exists but is not a hardened
    /// KEK (it is not used); `KekNotFound` when it is missing and `missing` is `Adopt`;
    /// `Unavailable` for device errors; `Internal` when the token refuses to generate the
    /// key. On error the current KEK is unchanged.
    fn ensure_kek_version(
        &self,
        version: KekVersion,
        missing: KekMissing,
    ) -> impl Future<Output = Result<KekRef, BackendError>> + Send;

    /// Destroys every object of KEK `version` in the HSM; afterwards the backend answers
    /// `KekNotFound` for blobs under it. The caller has checked that nothing depends on it.
    ///
    /// # Errors
    /// `Config` when `version` is the current KEK (never destroyed); `KekNotFound` when no
    /// object has that version; `Unavailable` for device errors.
    fn destroy_kek_version(
        &self,
        version: KekVersion,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Extends the audit chain: for each message `m_i`, `mac_i = HMAC-SHA256(audit key,
    /// mac_{i-1} || m_i)` computed inside the HSM, starting from `prev`. One HSM job for the
    /// whole batch.
    ///
    /// # Errors
    /// `HmacKey` when the audit key is missing or refused; `Unavailable`/`Overloaded`.
    fn audit_chain(
        &self,
        prev: [u8; 32],
        messages: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<[u8; 32]>, BackendError>> + Send;

    /// Where this backend keeps unwrapped DEKs. With [`DekResidency::Hsm`] the service never
    /// asks for DEK bytes: it calls the `*_resident` methods, and [`KeyBackend::generate_dek`]
    /// and [`KeyBackend::unwrap_dek`] refuse with `Config`.
    fn residency(&self) -> DekResidency {
        DekResidency::Memory
    }

    /// [`DekResidency::Hsm`]: generates a DEK as a key object inside the HSM, wraps it under
    /// the current (wrap-class) KEK, and keeps a non-extractable session object of it for
    /// later use. No DEK bytes are returned, or exist outside the HSM.
    ///
    /// # Errors
    /// `Config` when the backend is not in hsm residency or the current KEK is not
    /// wrap-class; `Unavailable`/`Overloaded` as [`KeyBackend::generate_dek`] (nothing was
    /// created but, at worst, a session object that is destroyed).
    fn generate_resident(
        &self,
        _key_id: &KeyId,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send {
        std::future::ready(Err(not_resident()))
    }

    /// [`DekResidency::Hsm`]: encrypts each item with AES-256-GCM inside the HSM under the
    /// DEK of `key` (unwrapped into a session object on first use), returning `nonce |
    /// ciphertext | tag` per item, in order. Large batches are spread over the sessions.
    ///
    /// # Errors
    /// The whole call: `InvalidWrapped` when `key`'s blob does not unwrap or its check fails;
    /// `KekNotFound`, `Unavailable`, `Overloaded` as [`KeyBackend::unwrap_dek`]; `Config`
    /// when not in hsm residency. Per item: `Internal` when the HSM refused that message.
    fn seal_resident(
        &self,
        _key: &ResidentKey,
        _items: Vec<ResidentItem>,
    ) -> impl Future<Output = Result<Vec<Result<Vec<u8>, BackendError>>, BackendError>> + Send {
        std::future::ready(Err(not_resident()))
    }

    /// [`DekResidency::Hsm`]: decrypts each item (`nonce | ciphertext | tag`) inside the HSM
    /// under the DEK of `key`; one result per item, in order.
    ///
    /// # Errors
    /// The whole call as [`KeyBackend::seal_resident`]. Per item: `InvalidWrapped` for a
    /// message that does not authenticate (the caller answers its opaque decrypt failure).
    #[allow(clippy::type_complexity)]
    fn open_resident(
        &self,
        _key: &ResidentKey,
        _items: Vec<ResidentItem>,
    ) -> impl Future<
        Output = Result<Vec<Result<zeroize::Zeroizing<Vec<u8>>, BackendError>>, BackendError>,
    > + Send {
        std::future::ready(Err(not_resident()))
    }

    /// [`DekResidency::Hsm`]: destroys every session object of `key_id`'s DEK (a destroyed
    /// key, or one the service's cache let go). Best effort: a session whose queue is full
    /// destroys it when its bounded object cache evicts it.
    fn forget_resident(&self, _key_id: &KeyId) {}

    /// One real round trip to the HSM (e.g. a random-number request on a pooled session).
    ///
    /// # Errors
    /// `Unavailable` when the HSM does not answer correctly.
    fn health_check(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// What the backend can do now, without a round trip; `/readyz` reports unready unless
    /// [`BackendState::Ready`].
    fn state(&self) -> BackendState;

    /// `state() == Ready`.
    fn is_ready(&self) -> bool {
        self.state() == BackendState::Ready
    }
}

/// What the resident methods answer on a backend that keeps DEKs in memory.
pub(crate) fn not_resident() -> BackendError {
    BackendError::Config("this backend does not keep DEKs resident in the HSM".into())
}

/// Whether a backend can serve, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Ready,
    /// Sessions are being re-established after a loss; the backend heals by itself.
    Recovering,
    /// The token refused the PIN; nothing happens until an operator fixes it and restarts.
    PinRejected,
}

impl BackendState {
    /// A short reason safe to show to callers.
    pub fn reason(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::Recovering => "HSM sessions are being re-established",
            BackendState::PinRejected => {
                "the HSM refused the PIN; fix hsm.pin_file and restart the KMS"
            }
        }
    }
}

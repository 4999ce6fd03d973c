//! Raw PKCS#11 loops: the HSM work of the KMS's operations, done straight through `cryptoki`
//! by threads that each own a logged-in session, with no HTTP, store, cache or worker queue.
//! They are the limits the KMS's HSM-bound rows are measured against.
//!
//! The operations are byte-for-byte the KMS's (`backend/pkcs11/worker.rs`): a DEK is 32 bytes
//! from `C_GenerateRandom`, wrapped by `C_Encrypt` with AES-256-GCM under the KEK (a 12-byte
//! IV from the HSM's RNG, the KMS's wrap AAD, a 128-bit tag) and unwrapped by `C_Decrypt`.
//! They run on a token of their own in this process (SoftHSM reads `SOFTHSM2_CONF` once per
//! process), made by the same set-up as the KMS's tokens.

use std::sync::Mutex;

use anyhow::{anyhow, bail, Context as _, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use kms_api::{KekId, KekVersion, KeyId};
use progressdb_kms::backend::{wrap_aad, KekRef};
use secrecy::SecretString;
use zeroize::Zeroizing;

const IV_LEN: usize = 12;
const DEK_LEN: usize = 32;

/// One PKCS#11 context on one token, with its KEK.
pub(crate) struct RawHsm {
    pkcs11: Pkcs11,
    slot: Slot,
    pin: SecretString,
    kek: KekRef,
    /// Sessions opened so far, handed out once each.
    spare: Mutex<Vec<(Session, ObjectHandle)>>,
}

/// A wrapped DEK in the KMS's layout: IV then ciphertext and tag (no format header: the raw
/// loops do not parse one).
pub(crate) struct RawWrapped {
    pub key_id: KeyId,
    pub iv: [u8; IV_LEN],
    pub ct: Vec<u8>,
}

impl RawHsm {
    /// Opens the token labelled `token_label` (created by `testkit::token::Token`, whose
    /// KEK `kek_label` version 1 must exist: `init-kek` makes it).
    pub(crate) fn open(
        module: &str,
        token_label: &str,
        pin: &str,
        kek_label: &str,
    ) -> Result<Self> {
        let pkcs11 = Pkcs11::new(module).context("loading the PKCS#11 module")?;
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e).context("C_Initialize"),
        }
        let mut slot = None;
        for s in pkcs11.get_slots_with_token()? {
            if pkcs11.get_token_info(s)?.label().trim_end() == token_label {
                slot = Some(s);
            }
        }
        let slot = slot.ok_or_else(|| anyhow!("token {token_label} not found"))?;
        Ok(Self {
            pkcs11,
            slot,
            pin: SecretString::from(pin.to_owned()),
            kek: KekRef {
                id: KekId::parse(kek_label)?,
                version: KekVersion::new(1)?,
            },
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Opens `n` sessions (logged in once: the login is per token and process).
    pub(crate) fn open_sessions(&self, n: usize) -> Result<()> {
        let template = [
            Attribute::Token(true),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(self.kek.id.as_str().as_bytes().to_vec()),
            Attribute::Id(self.kek.version.get().to_be_bytes().to_vec()),
        ];
        let mut spare = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while spare.len() < n {
            let s = self.pkcs11.open_ro_session(self.slot)?;
            if !matches!(
                s.get_session_info()?.session_state(),
                SessionState::RoUser | SessionState::RwUser
            ) {
                match s.login(UserType::User, Some(&self.pin)) {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                    Err(e) => return Err(e).context("C_Login"),
                }
            }
            let h = *s
                .find_objects(&template)?
                .first()
                .ok_or_else(|| anyhow!("KEK not found"))?;
            spare.push((s, h));
        }
        Ok(())
    }

    pub(crate) fn kek(&self) -> &KekRef {
        &self.kek
    }

    /// Takes the opened sessions out, one per benchmark thread (each thread locks only its
    /// own, so the mutexes are never contended; they make the sessions shareable).
    pub(crate) fn take_sessions(&self) -> Vec<Mutex<(Session, ObjectHandle)>> {
        std::mem::take(
            &mut *self
                .spare
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .map(Mutex::new)
        .collect()
    }
}

fn tag_bits() -> Ulong {
    Ulong::new(128)
}

/// A new DEK from the HSM's RNG, wrapped under `kek` (what `create_dek_for_thread` asks of
/// the HSM).
pub(crate) fn generate_wrap(
    s: &Session,
    kek_handle: ObjectHandle,
    kek: &KekRef,
    key_id: KeyId,
) -> Result<RawWrapped> {
    let mut dek = Zeroizing::new([0u8; DEK_LEN]);
    s.generate_random_slice(&mut dek[..])?;
    wrap(s, kek_handle, kek, key_id, &dek[..])
}

/// `dek` wrapped under `kek` with a fresh IV from the HSM.
pub(crate) fn wrap(
    s: &Session,
    kek_handle: ObjectHandle,
    kek: &KekRef,
    key_id: KeyId,
    dek: &[u8],
) -> Result<RawWrapped> {
    let mut iv = [0u8; IV_LEN];
    s.generate_random_slice(&mut iv)?;
    let aad = wrap_aad(&key_id, kek);
    let mut iv_param = iv;
    let params = GcmParams::new(&mut iv_param, &aad, tag_bits())?;
    let ct = s.encrypt(&Mechanism::AesGcm(params), kek_handle, dek)?;
    Ok(RawWrapped { key_id, iv, ct })
}

/// The DEK of `w` (what a cache-miss `/decrypt` asks of the HSM).
pub(crate) fn unwrap(
    s: &Session,
    kek_handle: ObjectHandle,
    kek: &KekRef,
    w: &RawWrapped,
) -> Result<Zeroizing<Vec<u8>>> {
    let aad = wrap_aad(&w.key_id, kek);
    let mut iv = w.iv;
    let params = GcmParams::new(&mut iv, &aad, tag_bits())?;
    let dek = Zeroizing::new(s.decrypt(&Mechanism::AesGcm(params), kek_handle, &w.ct)?);
    if dek.len() != DEK_LEN {
        bail!("unwrapped DEK has {} bytes", dek.len());
    }
    Ok(dek)
}

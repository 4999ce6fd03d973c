//! The token's capability profile: what the KMS needs from a PKCS#11 token, read once at
//! start-up from the token itself (`C_GetInfo`, `C_GetTokenInfo`, `C_GetMechanismList`,
//! `C_GetMechanismInfo`) and, where a token's word cannot be taken, probed. Tokens differ
//! (SoftHSM, Kryoptic and real HSMs offer different key-wrap mechanisms, cap sessions, and
//! some do not keep what they promise); every such difference the KMS knows of is decided
//! here, in one place, and the start-up refuses a token that lacks what the KMS needs,
//! naming it.
//!
//! What is required, for 256-bit keys where keys are involved:
//!
//! | mechanism | flags | what for |
//! |---|---|---|
//! | `CKM_AES_KEY_GEN` | generate | KEK versions |
//! | `CKM_AES_GCM` | encrypt, decrypt | wrapping and unwrapping DEKs under the KEK (format 1) |
//! | `CKM_GENERIC_SECRET_KEY_GEN` | generate | the audit log's HMAC key |
//! | `CKM_SHA256_HMAC` | sign | the audit chain |
//!
//! and a random-number generator (`CKF_RNG`: DEKs and IVs come from the token). The key-wrap
//! mechanisms the token has are recorded in preference order (`CKM_AES_KEY_WRAP_PAD`, then
//! `CKM_AES_KEY_WRAP`); `hsm.dek_residency = "hsm"` needs `CKM_AES_KEY_WRAP` (the `AesKwV3`
//! format), checked by the backend at open.
//! (Kryoptic has `CKM_AES_KEY_WRAP` and PKCS#11 3.0's `CKM_AES_KEY_WRAP_KWP` instead of
//! `_PAD`; SoftHSM has both of the first two.)
//!
//! Probed, because a token's flags are not proof: **sensitive values stay inside**. A
//! throwaway session key is made sensitive and non-extractable, and its `CKA_VALUE` is asked
//! for the way a PKCS#11 caller may ask (length first, then the value). A token that hands the
//! bytes out (Kryoptic 1.2.0 does: it answers `CKR_ATTRIBUTE_SENSITIVE` but fills the buffer)
//! would give the KEK to anyone holding the PIN, so it is refused; the probe key is zeroized
//! and destroyed either way. And **AES-GCM takes the caller's IV**: the KMS makes every GCM
//! IV itself (from the token's RNG for wraps, the OS RNG for messages in hsm residency) and
//! passes it in `CK_GCM_PARAMS`. A token in a FIPS mode that insists on generating the IV (and
//! returns it in the parameters) fails the probe's encrypt-then-decrypt round trip and is
//! refused by name: that convention is not supported yet.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use zeroize::Zeroize as _;

use crate::backend::{BackendError, DEK_LEN};

/// What the token offers, as the KMS uses it (`progressdb-kms status` shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenProfile {
    /// The PKCS#11 library: manufacturer, description and version.
    pub library: String,
    /// The token: manufacturer and model.
    pub token: String,
    /// How DEKs are wrapped under the KEK today.
    pub dek_wrap: &'static str,
    /// Key-wrap mechanisms the token has, most preferred first.
    pub key_wrap: Vec<&'static str>,
    /// The token's own cap on sessions (`None`: it states none).
    pub max_sessions: Option<u64>,
    /// Whether a sensitive key's value stays in the token (probed; always true for a token
    /// the KMS runs on).
    pub sensitive_values_enforced: bool,
}

/// One requirement of the table in the module docs.
struct Need {
    mechanism: MechanismType,
    name: &'static str,
    what: &'static str,
    generate: bool,
    encrypt_decrypt: bool,
    sign: bool,
    /// Checked against the mechanism's key-size range (in bytes for AES).
    key_bytes: Option<usize>,
}

const NEEDS: &[Need] = &[
    Need {
        mechanism: MechanismType::AES_KEY_GEN,
        name: "CKM_AES_KEY_GEN",
        what: "KEK generation",
        generate: true,
        encrypt_decrypt: false,
        sign: false,
        key_bytes: Some(DEK_LEN),
    },
    Need {
        mechanism: MechanismType::AES_GCM,
        name: "CKM_AES_GCM",
        what: "wrapping DEKs under the KEK",
        generate: false,
        encrypt_decrypt: true,
        sign: false,
        key_bytes: Some(DEK_LEN),
    },
    Need {
        mechanism: MechanismType::GENERIC_SECRET_KEY_GEN,
        name: "CKM_GENERIC_SECRET_KEY_GEN",
        what: "the audit key",
        generate: true,
        encrypt_decrypt: false,
        sign: false,
        key_bytes: None,
    },
    Need {
        mechanism: MechanismType::SHA256_HMAC,
        name: "CKM_SHA256_HMAC",
        what: "the audit chain",
        generate: false,
        encrypt_decrypt: false,
        sign: true,
        key_bytes: None,
    },
];

/// Reads and probes the token in `slot` through `session` (logged in). Blocking.
///
/// # Errors
/// `Config` naming every required mechanism or flag the token lacks, or the sensitive-value
/// probe's finding; `Unavailable` when the token cannot be asked.
pub(super) fn read(
    pkcs11: &cryptoki::context::Pkcs11,
    slot: Slot,
    session: &Session,
) -> Result<TokenProfile, BackendError> {
    let unavailable = |what: &str, e: cryptoki::error::Error| {
        BackendError::Unavailable(format!("reading the token's {what}: {e}"))
    };
    let info = pkcs11
        .get_library_info()
        .map_err(|e| unavailable("library info", e))?;
    let token = pkcs11
        .get_token_info(slot)
        .map_err(|e| unavailable("token info", e))?;
    let mechanisms = pkcs11
        .get_mechanism_list(slot)
        .map_err(|e| unavailable("mechanism list", e))?;
    let mut missing = Vec::new();
    if !token.rng() {
        missing.push(
            "a random-number generator (CKF_RNG: DEKs and IVs come from the token)".to_owned(),
        );
    }
    for need in NEEDS {
        if !mechanisms.contains(&need.mechanism) {
            missing.push(format!("{} (for {})", need.name, need.what));
            continue;
        }
        let m = pkcs11
            .get_mechanism_info(slot, need.mechanism)
            .map_err(|e| unavailable("mechanism info", e))?;
        let mut lacks = Vec::new();
        if need.generate && !m.generate() {
            lacks.push("generate");
        }
        if need.encrypt_decrypt && !(m.encrypt() && m.decrypt()) {
            lacks.push("encrypt and decrypt");
        }
        if need.sign && !m.sign() {
            lacks.push("sign");
        }
        if let Some(bytes) = need.key_bytes {
            let (min, max) = (m.min_key_size(), m.max_key_size());
            if !(min <= bytes && bytes <= max) {
                missing.push(format!(
                    "{} with {}-byte keys (it takes {min} to {max}; for {})",
                    need.name, bytes, need.what
                ));
            }
        }
        if !lacks.is_empty() {
            missing.push(format!(
                "{} with {} (for {})",
                need.name,
                lacks.join(", "),
                need.what
            ));
        }
    }
    if !missing.is_empty() {
        return Err(BackendError::Config(format!(
            "the token {:?} lacks what the KMS needs: {} (docs/kms.md, token capabilities)",
            token.label().trim_end(),
            missing.join("; ")
        )));
    }
    let key_wrap = [
        (MechanismType::AES_KEY_WRAP_PAD, "CKM_AES_KEY_WRAP_PAD"),
        (MechanismType::AES_KEY_WRAP, "CKM_AES_KEY_WRAP"),
    ]
    .into_iter()
    .filter(|(m, _)| mechanisms.contains(m))
    .map(|(_, name)| name)
    .collect();
    let sensitive_values_enforced = probe_sensitive(session)?;
    if !sensitive_values_enforced {
        return Err(BackendError::Config(format!(
            "the token {:?} hands out the value of a sensitive, non-extractable key \
             (C_GetAttributeValue filled in CKA_VALUE of a probe key): it would give the KEK to \
             anyone with the PIN; use a token that keeps sensitive values inside",
            token.label().trim_end()
        )));
    }
    Ok(TokenProfile {
        library: format!(
            "{} {} {}",
            info.manufacturer_id().trim_end(),
            info.library_description().trim_end(),
            info.library_version()
        ),
        token: format!(
            "{} {}",
            token.manufacturer_id().trim_end(),
            token.model().trim_end()
        ),
        dek_wrap: "CKM_AES_GCM under an encrypt-class KEK (AesGcmV1: IV from the token RNG, AAD bound to the key id); CKM_AES_KEY_WRAP plus an HMAC-SHA256 binding under the HSM's binding key, under a wrap-class KEK (AesKwV3)",
        key_wrap,
        max_sessions: match token.max_session_count() {
            cryptoki::slot::Limit::Max(n) if n > 0 => Some(n),
            _ => None,
        },
        sensitive_values_enforced,
    })
}

/// `true` when a sensitive, non-extractable session key's `CKA_VALUE` cannot be read.
fn probe_sensitive(session: &Session) -> Result<bool, BackendError> {
    let key = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::new(DEK_LEN as u64)),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .map_err(|e| BackendError::Config(format!("cannot make a probe key in the token: {e}")))?;
    let gcm = probe_caller_iv(session, key);
    let read = session.get_attributes(key, &[AttributeType::Value]);
    let leaked = match read {
        Ok(mut attrs) => {
            let mut leaked = false;
            for a in &mut attrs {
                if let Attribute::Value(bytes) = a {
                    leaked |= !bytes.is_empty();
                    bytes.zeroize();
                }
            }
            leaked
        }
        // Refused outright: nothing came out.
        Err(_) => false,
    };
    if let Err(e) = session.destroy_object(key) {
        tracing::warn!(error = %e, "cannot destroy the probe key (a session object: it goes with the session)");
    }
    gcm?;
    Ok(!leaked)
}

/// AES-GCM with an IV the caller chose round-trips (encrypt, then decrypt, same IV and AAD).
fn probe_caller_iv(
    session: &Session,
    key: cryptoki::object::ObjectHandle,
) -> Result<(), BackendError> {
    use cryptoki::mechanism::aead::GcmParams;
    let refused = |what: &str, e: &dyn std::fmt::Display| {
        BackendError::Config(format!(
            "the token does not take a caller-supplied AES-GCM IV ({what}: {e}); the KMS \
             makes its own IVs and does not support tokens that generate them (FIPS mode)"
        ))
    };
    let aad = b"progressdb-kms:probe";
    let mut iv = [7u8; 12];
    let ct = {
        let params =
            GcmParams::new(&mut iv, aad, Ulong::new(128)).map_err(|e| refused("parameters", &e))?;
        session
            .encrypt(&Mechanism::AesGcm(params), key, b"probe")
            .map_err(|e| refused("encrypt", &e))?
    };
    let mut iv = [7u8; 12];
    let params =
        GcmParams::new(&mut iv, aad, Ulong::new(128)).map_err(|e| refused("parameters", &e))?;
    match session.decrypt(&Mechanism::AesGcm(params), key, &ct) {
        Ok(p) if p == b"probe" => Ok(()),
        Ok(_) => Err(refused("decrypt", &"another plaintext came back")),
        Err(e) => Err(refused("decrypt", &e)),
    }
}

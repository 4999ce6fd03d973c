//! The PKCS#11 backend's settings (section `[hsm]`) and limits, and the roles of the KMS's
//! HMAC keys in the token.

use std::fmt;

use kms_api::KekId;
use secrecy::SecretString;

use super::DekResidency;

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

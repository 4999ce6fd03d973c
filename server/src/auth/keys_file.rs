//! The keys file (`auth.keys_file`): its on-disk form, read as a secret file, and why it is
//! refused.

use super::*;

/// Why the keys file was refused. Never shows a key.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("auth.keys_file: {0}")]
    Secret(#[from] SecretFileError),
    #[error("auth.keys_file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeysFile {
    #[serde(default)]
    pub(super) admin: Vec<String>,
    #[serde(default)]
    pub(super) backend: Vec<String>,
    #[serde(default)]
    pub(super) frontend: Vec<String>,
    #[serde(default)]
    pub(super) signing_secret: Option<String>,
    #[serde(default)]
    pub(super) signing_secrets: Vec<String>,
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        for k in self
            .admin
            .iter_mut()
            .chain(self.backend.iter_mut())
            .chain(self.frontend.iter_mut())
        {
            k.zeroize();
        }
        if let Some(s) = &mut self.signing_secret {
            s.zeroize();
        }
        for s in &mut self.signing_secrets {
            s.zeroize();
        }
    }
}

pub(super) struct KeyEntry {
    pub(super) digest: [u8; 32],
    pub(super) role: Role,
}

/// The configured keys and signing secrets (the first one signs; all of them verify).
pub struct ApiKeys {
    pub(super) entries: Vec<KeyEntry>,
    pub(super) signing_secrets: Vec<Zeroizing<Vec<u8>>>,
    pub(super) policy: SignaturePolicy,
}

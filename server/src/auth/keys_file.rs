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

/// The first admin key of the keys file at `path`, for the operator tools that call the
/// running server (`progressdb backup`). The file is read as a secret file (mode checked).
///
/// # Errors
/// [`KeysFileError`] naming the file, or when it lists no admin key.
pub fn first_admin_key(path: &Path) -> Result<zeroize::Zeroizing<String>, KeysFileError> {
    let bytes = secret_file::read_secret_bytes(path)?;
    let invalid = |message: &str| KeysFileError::Invalid {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8"))?;
    let file: KeysFile = toml::from_str(text).map_err(|_| invalid("not a valid keys file"))?;
    file.admin
        .first()
        .map(|k| zeroize::Zeroizing::new(k.clone()))
        .ok_or_else(|| invalid("lists no admin key (the operator tools need one)"))
}

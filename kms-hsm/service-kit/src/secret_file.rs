//! Reading secrets (PINs, API keys, master keys, TLS private keys) from files.
//!
//! A secret file must be a regular file that is not readable or writable by group or others
//! (mode `0600` or stricter); anything else is refused with an error naming the file and its
//! mode, never its content.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use zeroize::Zeroizing;

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("secret file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file {path} has mode {mode:04o}: it must not be accessible by group or others (chmod 600 {path})")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("secret file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
    #[error("secret file {path} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
}

/// Checks that `path` is a regular file with no group/other permission bits.
///
/// # Errors
/// [`SecretFileError`] naming the file when it is missing, not a regular file, or too open.
pub fn check_permissions(path: &Path) -> Result<(), SecretFileError> {
    let meta = fs::metadata(path).map_err(|source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_metadata(path, &meta)
}

/// The checks of [`check_permissions`] on metadata already read.
fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), SecretFileError> {
    if !meta.is_file() {
        return Err(SecretFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file's bytes after checking its permissions. The buffer is zeroized on drop.
///
/// # Errors
/// See [`check_permissions`]; also when the file cannot be read.
pub fn read_secret_bytes(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    // Opened first, then checked through the descriptor (fstat): the file checked is the
    // file read, even if the path is swapped in between. Opening a FIFO must not block.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_nonblock())
        .open(path)
        .map_err(io)?;
    check_metadata(path, &f.metadata().map_err(io)?)?;
    let mut buf = Zeroizing::new(Vec::new());
    f.read_to_end(&mut buf)
        .map_err(|source| SecretFileError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(buf)
}

/// `O_NONBLOCK`: an open of a FIFO planted at the path returns at once (and is then refused
/// as not a regular file); reads of a regular file ignore it.
fn libc_nonblock() -> i32 {
    rustix::fs::OFlags::NONBLOCK.bits() as i32
}

/// Reads a one-line text secret (a PIN, a token), trimming surrounding whitespace.
///
/// # Errors
/// See [`read_secret_bytes`]; also when the file is empty or not UTF-8.
pub fn read_secret_string(path: &Path) -> Result<SecretString, SecretFileError> {
    let bytes = read_secret_bytes(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SecretFileError::NotUtf8 {
        path: path.to_owned(),
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[test]
    fn refuses_world_readable_and_accepts_0600() {
        let dir = std::env::temp_dir().join(format!("sf-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pin");
        fs::write(&p, "123456\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_string(&p).unwrap_err().to_string();
        assert!(e.contains("pin") && e.contains("0644"), "{e}");
        assert!(!e.contains("123456"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_string(&p).unwrap().expose_secret(), "123456");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What is checked is the descriptor that is read: a FIFO at the path (which a stat of
    /// the path followed by an open could be raced into) is refused without blocking.
    #[test]
    fn the_opened_file_is_what_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = read_secret_bytes(&p).unwrap_err();
        assert!(matches!(e, SecretFileError::NotAFile { .. }), "{e}");
    }
}

//! The backup file: its header line, the manifest, and the checks made while reading it.

use std::io::{BufRead, Read, Write};

use kms_api::{KekId, KekVersion, KeyId, ThreadId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first line of every backup file of this format.
pub const FORMAT: &str = "progressdb-backup/1";

/// Longest manifest line read (a manifest names every thread: about 150 bytes each).
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// Why a backup could not be made, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file is not a whole backup of this format: nothing was restored.
    #[error("the backup file is invalid: {0}")]
    Invalid(String),
    /// The target store holds data (restore only into an empty store, or with `--force`).
    #[error("{0}")]
    NotEmpty(String),
    /// The store is in use (the server runs) or cannot be opened.
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Io(String),
    /// The store's file system lacks the room for the copy and for the store to go on
    /// growing meanwhile: nothing was copied.
    #[error("{free} bytes free beside the store; a backup needs {needed}")]
    NoSpace { needed: u64, free: u64 },
    /// The store is on PostgreSQL: backed up with PostgreSQL's own tools.
    #[error("a PostgreSQL store is backed up with PostgreSQL's own tools (pg_dump or a base backup: docs/operations.md)")]
    OnPostgres,
}

impl From<std::io::Error> for BackupError {
    fn from(e: std::io::Error) -> Self {
        BackupError::Io(e.to_string())
    }
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// When the copy was made (unix nanoseconds).
    pub created_at: u64,
    /// Length of the data part in bytes.
    pub data_bytes: u64,
    /// SHA-256 of the data part, lowercase hex.
    pub data_sha256: String,
    /// What the store holds: its summary as read from the copy itself.
    #[serde(flatten)]
    pub summary: Summary,
}

/// What a store holds, as a backup's manifest says and a restore checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub threads: u64,
    /// Live messages (tombstones of deleted ones not counted).
    pub messages: u64,
    /// Every thread, in id order, with the keys its messages need.
    pub thread_keys: Vec<ThreadKeys>,
}

/// A thread and the DEKs it needs: its key, and during a DEK rotation the retiring one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadKeys {
    pub thread: ThreadId,
    /// Absent for a thread stored without encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<KeyRef>,
}

/// A DEK as a thread record names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRef {
    pub key_id: KeyId,
    pub kek_id: KekId,
    pub kek_version: KekVersion,
}

impl From<&crate::provider::ThreadKey> for KeyRef {
    fn from(k: &crate::provider::ThreadKey) -> Self {
        KeyRef {
            key_id: k.key_id.clone(),
            kek_id: k.kek_id.clone(),
            kek_version: k.kek_version,
        }
    }
}

/// Writes the header and manifest of a backup (the data follows).
///
/// # Errors
/// The writer's.
pub fn write_header(out: &mut impl Write, m: &Manifest) -> Result<(), BackupError> {
    let json = serde_json::to_string(m).map_err(|e| BackupError::Io(e.to_string()))?;
    out.write_all(FORMAT.as_bytes())?;
    out.write_all(b"\n")?;
    out.write_all(json.as_bytes())?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Reads a backup's header and manifest from `r`, leaving it at the first byte of the data.
///
/// # Errors
/// [`BackupError::Invalid`] when the file is not a backup of this format.
pub fn read_header(r: &mut impl BufRead) -> Result<Manifest, BackupError> {
    let invalid = |m: &str| BackupError::Invalid(m.to_owned());
    let mut first = Vec::new();
    r.take(FORMAT.len() as u64 + 1)
        .read_until(b'\n', &mut first)?;
    if first != format!("{FORMAT}\n").as_bytes() {
        return Err(invalid(
            "not a progressdb backup (its first line is not progressdb-backup/1)",
        ));
    }
    let mut line = Vec::new();
    r.take(MAX_MANIFEST_BYTES).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Err(invalid("the manifest is cut short"));
    }
    let m: Manifest = serde_json::from_slice(&line).map_err(|e| {
        BackupError::Invalid(format!(
            "the manifest does not parse ({})",
            crate::store::scan_error_text(&e)
        ))
    })?;
    if m.format != FORMAT {
        return Err(invalid("the manifest's format is not progressdb-backup/1"));
    }
    Ok(m)
}

/// Copies the data part of a backup from `r` to `out`, checking it against the manifest:
/// exactly `data_bytes` bytes, then the end of the file, with digest `data_sha256`.
///
/// # Errors
/// [`BackupError::Invalid`] for a truncated, longer or altered file (what was written to
/// `out` must then be discarded).
pub fn copy_data(r: &mut impl Read, out: &mut impl Write, m: &Manifest) -> Result<(), BackupError> {
    let mut hasher = Sha256::new();
    let mut left = m.data_bytes;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(BackupError::Invalid(format!(
                "the file is truncated: {} of {} data bytes",
                m.data_bytes - left,
                m.data_bytes
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    if r.read(&mut buf[..1])? != 0 {
        return Err(BackupError::Invalid(
            "the file goes on after its data".into(),
        ));
    }
    if hex::encode(hasher.finalize()) != m.data_sha256 {
        return Err(BackupError::Invalid(
            "the data does not match the manifest's SHA-256 (corrupted)".into(),
        ));
    }
    Ok(())
}

/// Length and SHA-256 (hex) of the file at `path`.
///
/// # Errors
/// The file's.
pub fn digest_file(path: &std::path::Path) -> Result<(u64, String), BackupError> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let n = std::io::copy(&mut f, &mut hasher)?;
    Ok((n, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn manifest(data: &[u8]) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            created_at: 1,
            data_bytes: data.len() as u64,
            data_sha256: hex::encode(Sha256::digest(data)),
            summary: Summary {
                threads: 1,
                messages: 2,
                thread_keys: vec![ThreadKeys {
                    thread: ThreadId::parse("t1").unwrap(),
                    key: None,
                    retiring: None,
                }],
            },
        }
    }

    fn file(m: &Manifest, data: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        write_header(&mut f, m).unwrap();
        f.extend_from_slice(data);
        f
    }

    fn read(f: &[u8]) -> Result<(Manifest, Vec<u8>), BackupError> {
        let mut r = std::io::BufReader::new(f);
        let m = read_header(&mut r)?;
        let mut out = Vec::new();
        copy_data(&mut r, &mut out, &m)?;
        Ok((m, out))
    }

    #[test]
    fn a_whole_file_reads_back_and_any_damage_is_refused() {
        let data = b"some lmdb bytes".repeat(10_000);
        let m = manifest(&data);
        let good = file(&m, &data);
        assert_eq!(read(&good).unwrap(), (m.clone(), data.clone()));
        // Truncated anywhere: in the header, the manifest, the data.
        for cut in [5, 25, good.len() - data.len() - 1, good.len() - 1] {
            assert!(
                matches!(read(&good[..cut]), Err(BackupError::Invalid(_))),
                "cut at {cut}"
            );
        }
        // One bit flipped in the data, a byte appended, another format.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(read(&flipped), Err(BackupError::Invalid(_))));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(read(&longer), Err(BackupError::Invalid(_))));
        let other = [b"progressdb-backup/2\n".as_slice(), &good[20..]].concat();
        assert!(matches!(read(&other), Err(BackupError::Invalid(_))));
        assert!(matches!(read(b""), Err(BackupError::Invalid(_))));
    }
}

//! `progressdb restore`: a backup into a stopped store that holds nothing (or, forced, over
//! one that does). The file is checked whole before anything of the store changes: its data
//! is staged beside the store and must have the manifest's length and SHA-256, and the staged
//! store must hold what the manifest says; only then does it replace `data.mdb`, under the
//! store's lock (so never under a running server).

use std::io::BufReader;
use std::path::Path;

use super::*;
use crate::store::LOCK_FILE;

/// Whether a restore may replace a store that holds threads or messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    Replace,
}

/// Restores the backup at `input` into the store directory `store_dir`; returns its manifest.
///
/// # Errors
/// [`BackupError::Invalid`] for a file that is not a whole, matching backup;
/// [`BackupError::Store`] while the store is in use; [`BackupError::NotEmpty`] over data
/// without [`Existing::Replace`]. Nothing of the store changes on any error.
pub async fn restore(
    store_dir: &Path,
    input: &Path,
    existing: Existing,
) -> Result<Manifest, BackupError> {
    {
        use std::os::unix::fs::DirBuilderExt as _;
        // Private, as the server makes its store directory.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(store_dir)?;
    }
    // In use (the server runs): refused before anything is read.
    {
        let _lock =
            service_kit::lmdb::lock_store(store_dir, LOCK_FILE).map_err(BackupError::Store)?;
        remove_leftovers(store_dir);
    }
    // What the store is now: it must still be that when the restore swaps it (a server that
    // ran meanwhile may have written to it).
    let before = identity(&store_dir.join("data.mdb"));
    if store_dir.join("data.mdb").is_file() && existing == Existing::Refuse {
        let s = summarize(store_dir).await?;
        if s.threads > 0 || s.messages > 0 {
            return Err(BackupError::NotEmpty(format!(
                "{} holds {} threads and {} messages: restore into an empty store, or pass --force to replace them",
                store_dir.display(),
                s.threads,
                s.messages
            )));
        }
    }
    let stage = tempfile::Builder::new()
        .prefix(STAGE_PREFIX)
        .tempdir_in(store_dir)?;
    let staged = stage.path().join("data.mdb");
    let manifest = {
        let input = input.to_owned();
        let staged = staged.clone();
        tokio::task::spawn_blocking(move || -> Result<Manifest, BackupError> {
            let mut r = BufReader::new(std::fs::File::open(&input)?);
            let m = read_header(&mut r)?;
            let mut out = {
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&staged)?
            };
            copy_data(&mut r, &mut out, &m)?;
            out.sync_all()?;
            Ok(m)
        })
        .await
        .map_err(|e| BackupError::Io(e.to_string()))??
    };
    let held = summarize(stage.path()).await?;
    if held != manifest.summary {
        return Err(BackupError::Invalid(format!(
            "the store in the file does not hold what its manifest says ({} threads and {} messages, manifest {} and {})",
            held.threads, held.messages, manifest.summary.threads, manifest.summary.messages
        )));
    }
    // Install under the store's lock: a server starting now waits for nothing and fails.
    let _lock = service_kit::lmdb::lock_store(store_dir, LOCK_FILE).map_err(BackupError::Store)?;
    if identity(&store_dir.join("data.mdb")) != before {
        return Err(BackupError::Store(
            "the store changed while the backup was being checked (did the server run?): nothing was restored; run the restore again".into(),
        ));
    }
    std::fs::rename(&staged, store_dir.join("data.mdb"))?;
    // The data is in place: what follows cannot undo it, so it only warns. LMDB's reader
    // table of the replaced file would be reset by the next open anyway.
    if let Err(e) = std::fs::remove_file(store_dir.join("lock.mdb")) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, "cannot remove the replaced store's lock.mdb");
        }
    }
    if let Err(e) = std::fs::File::open(store_dir).and_then(|d| d.sync_all()) {
        tracing::warn!(error = %e, "cannot sync the store directory after the restore");
    }
    Ok(manifest)
}

/// The identity of a file (device, inode, length, modification time), or `None` when absent.
fn identity(path: &Path) -> Option<(u64, u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

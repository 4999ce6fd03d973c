//! Making a backup of the running store: LMDB's compacting copy (one read transaction, so one
//! consistent state, without free pages), summarised from the copy itself.

use std::path::{Path, PathBuf};

use super::*;
use crate::store::{Store, StoreOptions, ThreadFilter};

/// A backup made and not yet sent: its data in a private temporary directory inside the store
/// directory (removed when this is dropped), and its manifest.
#[derive(Debug)]
pub struct Snapshot {
    dir: tempfile::TempDir,
    pub manifest: Manifest,
}

/// Prefix of the temporary directories backups are made in.
const TMP_PREFIX: &str = ".backup-";
/// Prefix of the directories restores stage their data in.
pub(super) const STAGE_PREFIX: &str = ".restore-";

impl Snapshot {
    /// The data part (an LMDB `data.mdb`).
    pub fn data_path(&self) -> PathBuf {
        self.dir.path().join("data.mdb")
    }

    /// The header and manifest that precede the data in the file.
    ///
    /// # Errors
    /// When the manifest cannot be written (never, for a manifest that was read).
    pub fn header(&self) -> Result<Vec<u8>, BackupError> {
        let mut h = Vec::new();
        write_header(&mut h, &self.manifest)?;
        Ok(h)
    }

    /// The temporary directory, to keep alive until the data is sent.
    pub fn into_dir(self) -> tempfile::TempDir {
        self.dir
    }
}

/// Copies `store` (compacted, under one read transaction) into a temporary directory beside
/// it and summarises the copy. One at a time (the caller serialises): directories left by an
/// earlier backup or restore that died are removed first.
///
/// # Errors
/// [`BackupError`] when the copy, its summary or its digest fails (the temporary directory
/// is removed).
pub async fn snapshot(store: &Store, now_nanos: u64) -> Result<Snapshot, BackupError> {
    let Some(store_dir) = store.lmdb_dir() else {
        return Err(BackupError::OnPostgres);
    };
    remove_leftovers(store_dir);
    // The copy lands beside the store: a copy that filled the disk would make the store's
    // own writes fail. It is at most the store's data file (compaction only removes).
    let used = std::fs::metadata(store_dir.join("data.mdb"))?.len();
    let free = service_kit::disk::free_bytes(store_dir)?;
    room_for_copy(used, free)?;
    let dir = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempdir_in(store_dir)?;
    let data = dir.path().join("data.mdb");
    store
        .copy_compacted(&data)
        .await
        .map_err(|e| BackupError::Store(format!("copying the store: {e}")))?;
    let summary = summarize(dir.path()).await?;
    // A thread record that does not parse is left out of listings: a backup that cannot
    // name every thread's keys is refused rather than made incomplete.
    if summary.thread_keys.len() as u64 != summary.threads {
        return Err(BackupError::Store(format!(
            "{} of the store's {} thread records do not parse (see the server log); no backup was made",
            summary.threads.saturating_sub(summary.thread_keys.len() as u64),
            summary.threads
        )));
    }
    let data_for_digest = data.clone();
    let (data_bytes, data_sha256) =
        tokio::task::spawn_blocking(move || digest_file(&data_for_digest))
            .await
            .map_err(|e| BackupError::Io(e.to_string()))??;
    Ok(Snapshot {
        dir,
        manifest: Manifest {
            format: FORMAT.into(),
            created_at: now_nanos,
            data_bytes,
            data_sha256,
            summary,
        },
    })
}

/// Room kept for the store's own writes while a copy of it is made: 64 MiB and a tenth of
/// the store.
fn reserve(used: u64) -> u64 {
    (64 << 20) + used / 10
}

/// Whether a copy of a store of `used` bytes fits in `free` bytes with [`reserve`] to spare.
fn room_for_copy(used: u64, free: u64) -> Result<(), BackupError> {
    let needed = used.saturating_add(reserve(used));
    if free < needed {
        return Err(BackupError::NoSpace { needed, free });
    }
    Ok(())
}

/// Removes the temporary directories a backup or a restore that died left in `store_dir`
/// (each as large as the store). Call it holding the store (the server at start, a backup
/// under its permit, a restore under the store's lock).
pub fn remove_leftovers(store_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(store_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) || name.starts_with(STAGE_PREFIX) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an earlier backup's temporary directory");
            }
        }
    }
}

/// What the LMDB store in `dir` holds: every thread with the keys it needs, and the counts.
/// Opens the store (so it must not be in use) and closes it again.
///
/// # Errors
/// [`BackupError::Store`] when the store cannot be opened or read.
pub async fn summarize(dir: &Path) -> Result<Summary, BackupError> {
    let store_err = |e: String| BackupError::Store(e);
    let size = std::fs::metadata(dir.join("data.mdb"))?.len();
    let mb = size / (1 << 20) + 2;
    let store = Store::open(
        &StoreOptions::new(dir, mb, mb.saturating_mul(2)),
        crate::metrics::StoreMetrics::default(),
    )
    .map_err(|e| store_err(e.to_string()))?;
    let mut thread_keys = Vec::new();
    let mut pages = store.thread_pages(ThreadFilter::All, 1000);
    while let Some(page) = pages.next().await.map_err(|e| store_err(e.to_string()))? {
        for t in &page {
            thread_keys.push(ThreadKeys {
                thread: t.id.clone(),
                key: t.kms.as_ref().map(KeyRef::from),
                retiring: t
                    .rotation
                    .as_ref()
                    .and_then(|r| r.retiring.as_ref())
                    .map(KeyRef::from),
            });
        }
    }
    let (threads, messages) = store.stats().await.map_err(|e| store_err(e.to_string()))?;
    // Closing joins the store's writer thread: not on the runtime's threads.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .map_err(|e| BackupError::Io(e.to_string()))?;
    Ok(Summary {
        threads,
        messages,
        thread_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_needs_the_store_and_its_reserve() {
        let gib = 1u64 << 30;
        assert!(room_for_copy(gib, 2 * gib).is_ok());
        // The copy would fit, but would leave the store no room to go on.
        let needed = gib + reserve(gib);
        assert!(matches!(
            room_for_copy(gib, needed - 1),
            Err(BackupError::NoSpace { needed: n, free }) if n == needed && free == needed - 1
        ));
        assert!(room_for_copy(0, 64 << 20).is_ok());
        // No overflow at the extremes.
        assert!(room_for_copy(u64::MAX, u64::MAX - 1).is_err());
    }
}

//! What both LMDB stores need beyond the writer: one process per store (an exclusive
//! `flock` on a lock file in the store directory, held for the store's life) and offline
//! compaction.
//!
//! LMDB never overwrites a page in place: a replaced or deleted record's bytes stay in a free
//! page until that page is reused. For data that must really go (a destroyed key's wrapped
//! DEK, a plain message that was encrypted in place), [`compact`] rewrites the store without
//! its free pages and swaps the copy in atomically. It needs the store's lock, so it refuses
//! while the service runs.

use std::path::Path;

/// Takes the exclusive lock of the store in `dir` (`name`, created 0600), or says who holds
/// it.
///
/// # Errors
/// A one-line reason: the lock is held by another process, or the file cannot be opened.
pub fn lock_store(dir: &Path, name: &str) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(name))
        .map_err(|e| format!("cannot open {name}: {e}"))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            Err("another process (the running service, or `compact`) is using this store".into())
        }
        Err(e) => Err(format!("cannot lock {name}: {e}")),
    }
}

/// Rewrites the LMDB store in `dir` without its free pages (`data.mdb` replaced atomically
/// by a compacted copy, synced), holding the store's lock `lock_name`. Returns the file size
/// before and after.
///
/// # Errors
/// A one-line reason: the store is in use, absent, or the copy failed (then `data.mdb` is
/// untouched).
pub fn compact(dir: &Path, lock_name: &str, max_dbs: u32) -> Result<(u64, u64), String> {
    let data = dir.join("data.mdb");
    let before = std::fs::metadata(&data)
        .map_err(|e| format!("no store in {}: {e}", dir.display()))?
        .len();
    let _lock = lock_store(dir, lock_name)?;
    let tmp = dir.join("data.mdb.compact");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut opts = heed::EnvOpenOptions::new();
        opts.max_dbs(max_dbs)
            .map_size(usize::try_from(before.max(1 << 20)).unwrap_or(usize::MAX));
        // SAFETY: the store's exclusive lock is held, so the service that owns these files is
        // not running; this is the only environment opened on `dir` in this process, with
        // default flags (LMDB's own locking and durable commits stay on).
        #[allow(unsafe_code)]
        let env = unsafe { opts.open(dir) }.map_err(|e| e.to_string())?;
        let copy = env
            .copy_to_path(&tmp, heed::CompactionOption::Enabled)
            .map_err(|e| format!("compacting copy: {e}"))?;
        copy.sync_all().map_err(|e| e.to_string())?;
        env.prepare_for_closing().wait();
    }
    std::fs::rename(&tmp, &data).map_err(|e| e.to_string())?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| e.to_string())?;
    let after = std::fs::metadata(&data).map_err(|e| e.to_string())?.len();
    tracing::info!(path = %dir.display(), before, after, "store compacted");
    Ok((before, after))
}

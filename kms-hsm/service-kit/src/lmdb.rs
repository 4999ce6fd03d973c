//! What both LMDB stores need beyond the writer: the one place an LMDB environment is
//! opened ([`open`], with its safety argument), one process per store (an exclusive `flock`
//! on a lock file in the store directory, held for the store's life) and offline compaction.
//!
//! LMDB never overwrites a page in place: a replaced or deleted record's bytes stay in a free
//! page until that page is reused. For data that must really go (a destroyed key's wrapped
//! DEK, a plain message that was encrypted in place), [`compact`] rewrites the store without
//! its free pages and swaps the copy in atomically. It needs the store's lock, so it refuses
//! while the service runs.

use std::path::Path;

use heed::{Env, EnvOpenOptions};

/// An opened store: the environment and the lock that makes this process its only user
/// (released when the file is dropped; keep it as long as the environment).
pub struct Opened<T: heed::TlsUsage> {
    pub env: Env<T>,
    pub lock: std::fs::File,
}

impl<T: heed::TlsUsage> std::fmt::Debug for Opened<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("path", &self.env.path())
            .finish_non_exhaustive()
    }
}

/// Opens the LMDB store in `dir` with `opts`, after making `dir` private (created 0700, or an
/// existing directory's group and other bits cleared) and taking its lock `lock_name`. Every
/// LMDB environment of both services is opened here and nowhere else.
///
/// # Errors
/// A one-line reason: the directory cannot be made private, the lock is held by another
/// process, or LMDB refuses the files.
pub fn open<T: heed::TlsUsage>(
    dir: &Path,
    lock_name: &str,
    opts: &EnvOpenOptions<T>,
) -> Result<Opened<T>, String> {
    make_private_dir(dir).map_err(|e| format!("cannot make {} private: {e}", dir.display()))?;
    let lock = lock_store(dir, lock_name)?;
    // SAFETY: opening a memory map is unsound only if the files are modified behind LMDB's
    // back while mapped. (1) This process holds the store's exclusive lock (`lock_store`
    // above), so no other process of ours (a second service on the same store, `compact`,
    // `restore`) has it open; (2) within this process heed refuses a second open of the same
    // canonical path (`EnvAlreadyOpened`), and every open goes through this function; (3) the
    // directory is private to the service's user (made so above), so nothing else writes
    // its files; (4) no unsafe flag (NO_LOCK, NO_SYNC, NO_META_SYNC, WRITE_MAP) is ever set
    // by a caller (they pass sizes and counts only), so LMDB's own locking and durable
    // commits stay in force.
    #[allow(unsafe_code)]
    let env = unsafe { opts.open(dir) }.map_err(|e| e.to_string())?;
    Ok(Opened { env, lock })
}

/// Creates `dir` (and its parents) with mode 0700, or clears the group and other bits of an
/// existing one.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if !dir.is_dir() {
        return std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

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
    let mut opts = heed::EnvOpenOptions::new();
    opts.max_dbs(max_dbs)
        .map_size(usize::try_from(before.max(1 << 20)).unwrap_or(usize::MAX));
    // The lock is held until the copy has replaced `data.mdb`: a service started in between
    // would map the file that the rename then unlinks.
    let Opened { env, lock: _lock } = open(dir, lock_name, &opts)?;
    let tmp = dir.join("data.mdb.compact");
    let _ = std::fs::remove_file(&tmp);
    {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn open_makes_the_directory_private_and_one_process_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut opts = EnvOpenOptions::new();
        opts.map_size(1 << 20);
        let opened = open(&dir, "test.lock", &opts).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // While it is open, the store's lock refuses a second user (compaction included).
        let e = open(&dir, "test.lock", &opts).unwrap_err();
        assert!(e.contains("another process"), "{e}");
        let e = compact(&dir, "test.lock", 1).unwrap_err();
        assert!(e.contains("another process"), "{e}");
        drop(opened);
        // A missing directory is created 0700, parents included.
        let deep = tmp.path().join("a/b");
        drop(open(&deep, "test.lock", &opts).unwrap());
        let mode = std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}

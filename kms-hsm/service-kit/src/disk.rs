//! How much room a file system has left for this process.

use std::path::Path;

/// Bytes an unprivileged process may still write on the file system holding `dir`
/// (`statvfs`: available blocks times the fragment size).
///
/// # Errors
/// The `statvfs` error (no such directory, ...).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_has_room_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::free_bytes(dir.path()).unwrap() > 0);
        assert!(super::free_bytes(&dir.path().join("missing")).is_err());
    }
}

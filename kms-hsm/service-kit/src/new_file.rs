//! Writing an operator's file (a backup) so that it is whole or absent: written under a
//! temporary name beside it (owner-only, mode 0600), synced, then put in place and the
//! directory synced. The temporary file is removed when the write is abandoned.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Whether an existing file at the destination may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Renamed over it.
    Replace,
    /// Never replaced, also when it appears while the file is written (linked, not renamed).
    Keep,
}

/// A file being written to `dest`: [`NewFile::create`], write to the file, then
/// [`NewFile::commit`]. Dropped before the commit, it removes what it wrote.
#[derive(Debug)]
pub struct NewFile {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl NewFile {
    /// A new owner-only temporary file beside `dest`, to write the content to.
    ///
    /// # Errors
    /// The file system's (the directory is not writable, ...).
    pub fn create(dest: &Path) -> std::io::Result<(Self, File)> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let name = dest
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir_of(dest).join(format!(".{name}.tmp{}", std::process::id()));
        // Readable too: a writer may read its file back to check it before the commit.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok((
            Self {
                tmp,
                dest: dest.to_owned(),
                committed: false,
            },
            file,
        ))
    }

    /// Syncs `file` (the one [`NewFile::create`] gave), puts it at the destination and syncs
    /// the directory.
    ///
    /// # Errors
    /// The file system's; with [`Existing::Keep`], `AlreadyExists` when the destination
    /// exists. The temporary file is removed on every error.
    pub fn commit(mut self, file: File, existing: Existing) -> std::io::Result<()> {
        file.sync_all()?;
        drop(file);
        match existing {
            Existing::Replace => std::fs::rename(&self.tmp, &self.dest)?,
            Existing::Keep => {
                std::fs::hard_link(&self.tmp, &self.dest)?;
                self.committed = true;
                std::fs::remove_file(&self.tmp)?;
            }
        }
        self.committed = true;
        File::open(dir_of(&self.dest))?.sync_all()
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn whole_or_absent_private_and_kept_or_replaced_as_asked() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("backup");
        let (nf, mut f) = NewFile::create(&dest).unwrap();
        f.write_all(b"one").unwrap();
        nf.commit(f, Existing::Keep).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"one");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Kept: refused, the old content stays, no temporary file is left.
        let (nf, mut f) = NewFile::create(&dest).unwrap();
        f.write_all(b"two").unwrap();
        let e = nf.commit(f, Existing::Keep).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&dest).unwrap(), b"one");
        // Abandoned: nothing left but the destination.
        let (nf, mut f) = NewFile::create(&dest).unwrap();
        f.write_all(b"half").unwrap();
        drop((nf, f));
        // Replaced.
        let (nf, mut f) = NewFile::create(&dest).unwrap();
        f.write_all(b"three").unwrap();
        nf.commit(f, Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"three");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}

//! Small private files the agent keeps about volumes and keys (formatted
//! markers, format intents and records, attach records, locks): private
//! directories, and whole-file replacement that a crash or a SIGKILL at any
//! point leaves holding the old content or the new, never a torn file.
//!
//! Errors are plain `std::io::Error`s; callers name the volume or key.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Whether a replaced file must survive a power loss, or only a crash of
/// the process (files under the run directory, which a reboot clears).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// File and directory entry flushed before returning.
    PowerLoss,
    /// Renamed into place, nothing flushed.
    ProcessCrash,
}

/// Creates `dir` and its missing parents, new ones mode 0700 (the files
/// below may name volumes and keys).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Flushes `dir`, so that entries created, renamed or removed in it are
/// durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temporary name [`replace`] writes beside `path`.
fn beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with a file (mode 0600) holding `contents`: written
/// beside, renamed over, and with [`Durability::PowerLoss`] flushed before
/// and after the rename. The parent directory is created when missing.
pub fn replace(path: &Path, contents: &[u8], durability: Durability) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    let tmp = beside(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    if durability == Durability::PowerLoss {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(&tmp, path)?;
    if durability == Durability::PowerLoss {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replace_creates_private_parents_and_replaces_whole_files() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("a/b/record");
        for durability in [Durability::PowerLoss, Durability::ProcessCrash] {
            replace(&path, b"first, a longer content\n", durability).unwrap();
            replace(&path, b"second\n", durability).unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"second\n");
        }
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&root.path().join("a/b")), 0o700);
        let names: Vec<_> = fs::read_dir(root.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["record"], "no temporary file left beside");
    }

    #[test]
    fn a_leftover_temporary_file_is_overwritten() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("intent");
        fs::write(beside(&path), b"torn garbage from a killed writer").unwrap();
        replace(&path, b"new\n", Durability::PowerLoss).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new\n");
        assert!(!beside(&path).exists());
    }
}

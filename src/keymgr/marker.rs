//! The "this key's volume was formatted" marker kept on local disk: the
//! local key store's only marker, and the fallback when Barbican's policy
//! does not let us write secret metadata.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{KeyError, KeyId};

/// Markers as empty files under `<state_dir>/formatted/`.
#[derive(Clone, Debug)]
pub struct LocalMarkers {
    dir: PathBuf,
}

impl LocalMarkers {
    /// Markers under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        LocalMarkers {
            dir: state_dir.join("formatted"),
        }
    }

    /// A file name for any key id: the UUID when the id names one, else a
    /// hash of the id (ids may be hrefs with slashes).
    fn path(&self, id: &KeyId) -> PathBuf {
        match id.uuid() {
            Ok(u) => self.dir.join(u.hyphenated().to_string()),
            Err(_) => self
                .dir
                .join(hex::encode(Sha256::digest(id.as_str().as_bytes()))),
        }
    }

    fn err(&self, id: &KeyId, op: &str, path: &Path, source: std::io::Error) -> KeyError {
        KeyError::Local {
            key_id: id.to_string(),
            op: op.into(),
            path: path.display().to_string(),
            source,
        }
    }

    /// Whether a marker exists.
    pub fn is_marked(&self, id: &KeyId) -> Result<bool, KeyError> {
        let p = self.path(id);
        match fs::symlink_metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(id, "reading formatted marker", &p, e)),
        }
    }

    /// Creates the marker durably (file and directory entry flushed).
    pub fn mark(&self, id: &KeyId) -> Result<(), KeyError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.err(id, "creating marker directory", &self.dir, e))?;
        let p = self.path(id);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| self.err(id, "writing formatted marker", &p, e))?;
        writeln!(f, "{}", id.as_str())
            .and_then(|_| f.sync_all())
            .map_err(|e| self.err(id, "writing formatted marker", &p, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.err(id, "flushing marker directory", &self.dir, e))
    }
}

//! The built-in local key store: one 0600 file of raw key bytes per key in
//! a 0700 directory, named by the key's UUID. For machines without a cloud
//! and for demos; operators manage it with `luks-agent keys`. Image
//! signing certificates (public, so not secret) live beside the keys in
//! `certificates/`, one DER file per certificate, named by a UUID.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::marker::LocalMarkers;
use super::{
    BoxFuture, FormatState, FormatStateOp, Key, KeyError, KeyId, KeyManager, RequestAuth,
    SecretKind,
};
use crate::secret::SecretBytes;

/// Default directory of the store.
pub const DEFAULT_DIR: &str = "/var/lib/luks-agent/keys";

/// A key directory.
#[derive(Clone, Debug)]
pub struct LocalKeyStore {
    dir: PathBuf,
    markers: LocalMarkers,
}

/// One stored key, for listings (never the bytes).
#[derive(Clone, Debug)]
pub struct StoredKey {
    /// Key id.
    pub id: String,
    /// Size in bits.
    pub bits: u64,
}

impl LocalKeyStore {
    /// A store in `dir`, markers under `state_dir`.
    pub fn new(dir: &Path, state_dir: &Path) -> Self {
        LocalKeyStore {
            dir: dir.to_path_buf(),
            markers: LocalMarkers::new(state_dir),
        }
    }

    fn local_err(id: &str, op: &str, path: &Path, source: std::io::Error) -> KeyError {
        KeyError::Local {
            key_id: id.into(),
            op: op.into(),
            path: path.display().to_string(),
            source,
        }
    }

    fn path_of(&self, id: &KeyId) -> Result<PathBuf, KeyError> {
        Ok(self.dir.join(id.uuid_text()?))
    }

    /// Creates a random key of `bits` bits and returns its id. The file is
    /// created with `O_EXCL` and mode 0600 and written once: the key never
    /// exists in a temporary file or with wider permissions.
    pub fn create(&self, bits: usize) -> Result<KeyId, KeyError> {
        if !bits.is_multiple_of(8)
            || !(super::MIN_SYMMETRIC_BYTES * 8..=super::MAX_SYMMETRIC_BYTES * 8).contains(&bits)
        {
            return Err(KeyError::Config(format!(
                "key size {bits} bits; choose 128 to 512 in whole bytes"
            )));
        }
        let key = SecretBytes::random(bits / 8)
            .map_err(|_| KeyError::Config("system random number generator failed".into()))?;
        self.store_new(&self.dir, key.expose(), 0o600, "key")
    }

    /// Writes `bytes` into a new file of `dir` (the store's directory or
    /// one below it) named by a fresh UUID, with `mode`: created with
    /// `O_EXCL` at its final mode, written once and flushed. Its id.
    fn store_new(
        &self,
        dir: &Path,
        bytes: &[u8],
        mode: u32,
        what: &str,
    ) -> Result<KeyId, KeyError> {
        crate::state_file::private_dir(&self.dir)
            .map_err(|e| Self::local_err("-", "creating key directory", &self.dir, e))?;
        self.check_dir()?;
        if dir != self.dir {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Self::local_err("-", "creating", dir, e)),
            }
        }
        let id = KeyId::new(&uuid::Uuid::new_v4().hyphenated().to_string())?;
        let path = dir.join(id.uuid_text()?);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| {
                Self::local_err(id.as_str(), &format!("creating {what} file"), &path, e)
            })?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Self::local_err(id.as_str(), &format!("writing {what} file"), &path, e))?;
        Ok(id)
    }

    fn certificate_dir(&self) -> PathBuf {
        self.dir.join("certificates")
    }

    /// Stores an X.509 certificate (PEM or DER, as `payload` holds it) and
    /// returns its new id. The payload must parse as one certificate.
    pub fn import_certificate(&self, payload: &[u8]) -> Result<KeyId, KeyError> {
        let der = super::certificate_pem_or_der(payload)
            .map_err(|reason| super::InvalidMaterial(reason).at("-", &self.describe()))?;
        <x509_cert::Certificate as x509_cert::der::Decode>::from_der(&der).map_err(|e| {
            super::InvalidMaterial(format!("not an X.509 certificate: {e}"))
                .at("-", &self.describe())
        })?;
        self.store_new(&self.certificate_dir(), &der, 0o644, "certificate")
    }

    /// Reads a certificate stored by [`import_certificate`](Self::import_certificate).
    fn read_certificate(&self, id: &KeyId) -> Result<Vec<u8>, KeyError> {
        let path = self.certificate_dir().join(id.uuid_text()?);
        let (f, _) = self.open_stored(id, &path, "certificate")?;
        let bytes = SecretBytes::read_all(f)
            .map_err(|e| Self::local_err(id.as_str(), "reading certificate", &path, e))?
            .ok_or_else(|| {
                super::InvalidMaterial("certificate file is too large".into())
                    .at(id.as_str(), &self.describe())
            })?;
        Ok(bytes.expose().to_vec())
    }

    /// Opens the regular file that holds `id`'s `what` (key or
    /// certificate) for reading: never through a symlink out of the store,
    /// never blocking on a FIFO planted in it. A missing file is the key
    /// manager's "not found".
    fn open_stored(
        &self,
        id: &KeyId,
        path: &Path,
        what: &str,
    ) -> Result<(fs::File, fs::Metadata), KeyError> {
        let f = match Self::open_key_file(path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    key_id: id.to_string(),
                    endpoint: self.describe(),
                    status: 0,
                });
            }
            Err(e) => {
                let op = format!("opening {what} file");
                return Err(Self::local_err(id.as_str(), &op, path, e));
            }
        };
        let meta = Self::regular_file(id, path, &f)?;
        Ok((f, meta))
    }

    /// The stored keys.
    pub fn list(&self) -> Result<Vec<StoredKey>, KeyError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Self::local_err("-", "listing key directory", &self.dir, e)),
        };
        let mut keys = vec![];
        for entry in entries {
            let entry =
                entry.map_err(|e| Self::local_err("-", "listing key directory", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if uuid::Uuid::parse_str(&name).is_err() {
                continue;
            }
            // The entry itself, not what a symlink leads to: only regular
            // files are keys (read refuses anything else the same way).
            let meta = entry
                .metadata()
                .map_err(|e| Self::local_err(&name, "reading", &entry.path(), e))?;
            if !meta.file_type().is_file() {
                continue;
            }
            keys.push(StoredKey {
                id: name,
                bits: meta.len() * 8,
            });
        }
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    /// Deletes a key: overwritten with zeros, flushed, then unlinked.
    pub fn delete(&self, id: &KeyId) -> Result<(), KeyError> {
        let path = self.path_of(id)?;
        let f = Self::open_key_file(&path, true).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyError::NotFound {
                key_id: id.to_string(),
                endpoint: self.describe(),
                status: 0,
            },
            _ => Self::local_err(id.as_str(), "opening key file", &path, e),
        })?;
        let len = Self::regular_file(id, &path, &f)?.len() as usize;
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; len], 0)
            .and_then(|_| f.sync_all())
            .and_then(|_| fs::remove_file(&path))
            .map_err(|e| Self::local_err(id.as_str(), "deleting key file", &path, e))
    }

    /// Opens a key file: never through a symlink out of the store, never
    /// blocking on a FIFO planted in it.
    fn open_key_file(path: &Path, write: bool) -> std::io::Result<fs::File> {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
    }

    /// The metadata of an opened key file, refused unless it is a regular
    /// file.
    fn regular_file(id: &KeyId, path: &Path, f: &fs::File) -> Result<fs::Metadata, KeyError> {
        let meta = f
            .metadata()
            .map_err(|e| Self::local_err(id.as_str(), "reading key file", path, e))?;
        if !meta.file_type().is_file() {
            return Err(KeyError::Config(format!(
                "key file {} is not a regular file",
                path.display()
            )));
        }
        Ok(meta)
    }

    /// Refuses a key directory that others can read or enter.
    fn check_dir(&self) -> Result<(), KeyError> {
        let meta = fs::metadata(&self.dir)
            .map_err(|e| Self::local_err("-", "checking key directory", &self.dir, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::Config(format!(
                "key directory {} is accessible to group or others (mode {:o}); it must be 0700",
                self.dir.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        Ok(())
    }

    fn read(&self, id: &KeyId) -> Result<Key, KeyError> {
        let path = self.path_of(id)?;
        let (f, meta) = self.open_stored(id, &path, "key")?;
        if meta.mode() & 0o077 != 0 {
            return Err(KeyError::Config(format!(
                "key file {} is accessible to group or others (mode {:o}); it must be 0600",
                path.display(),
                meta.mode() & 0o777
            )));
        }
        let bytes = SecretBytes::read_all(f)
            .map_err(|e| Self::local_err(id.as_str(), "reading key file", &path, e))?
            .ok_or_else(|| {
                super::InvalidMaterial("key file is too large".into())
                    .at(id.as_str(), &self.describe())
            })?;
        Key::new(id.clone(), SecretKind::Symmetric, bytes)
            .map_err(|e| e.at(id.as_str(), &self.describe()))
    }
}

impl KeyManager for LocalKeyStore {
    fn format_state<'a>(
        &'a self,
        id: &'a KeyId,
        _auth: &'a RequestAuth,
        op: FormatStateOp<'a>,
    ) -> BoxFuture<'a, Result<FormatState, KeyError>> {
        Box::pin(async move { self.markers.apply(id, op) })
    }

    fn describe(&self) -> String {
        format!("local key store {}", self.dir.display())
    }

    fn fetch<'a>(
        &'a self,
        id: &'a KeyId,
        _auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Key, KeyError>> {
        Box::pin(async move { self.read(id) })
    }

    fn fetch_certificate<'a>(
        &'a self,
        id: &'a KeyId,
        _auth: &'a RequestAuth,
    ) -> BoxFuture<'a, Result<Vec<u8>, KeyError>> {
        Box::pin(async move { self.read_certificate(id) })
    }
}

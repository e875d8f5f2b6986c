//! Device-mapper crypt mappings: the one choke point through which the
//! agent creates, queries, reloads and removes dm devices (through the
//! `devicemapper` crate) and hands volume keys to the kernel (through the
//! keyring). Errors record the operation and the mapping, never keys.

pub mod crypt;
pub mod keyring;

use std::ffi::CString;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::Duration;

use devicemapper::{DM, DevId, DmFlags, DmName, DmOptions, DmUuid};

pub use crypt::{CryptOptions, CryptTarget};
use keyring::{KeyringError, LogonKey};

use crate::secret::VolumeKey;

/// Where mapping nodes live.
pub const MAPPER_DIR: &str = "/dev/mapper";

/// Why a device-mapper operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// The control device cannot be opened (no device-mapper in this kernel,
    /// or not root).
    #[error("device-mapper is not available (/dev/mapper/control)")]
    Unavailable(#[source] Box<devicemapper::DmError>),
    /// An ioctl failed.
    #[error("device-mapper {op} of '{name}' failed")]
    Op {
        /// The operation.
        op: &'static str,
        /// The mapping.
        name: String,
        /// What the kernel said.
        #[source]
        source: Box<devicemapper::DmError>,
    },
    /// A name or uuid device-mapper does not accept.
    #[error("invalid device-mapper {what} '{value}'")]
    InvalidId {
        /// `name` or `uuid`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The key could not be placed in the keyring.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The mapping stayed busy through every removal attempt.
    #[error("mapping '{name}' is still in use after {attempts} removal attempts")]
    Busy {
        /// The mapping.
        name: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Creating or removing the /dev/mapper node failed.
    #[error("{op} {path}")]
    Node {
        /// What we did.
        op: &'static str,
        /// The node.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A failed create whose rollback failed too.
    #[error("{cause}; rolling back also failed: {rollback}")]
    RollbackFailed {
        /// The original failure.
        cause: Box<DmError>,
        /// The rollback failure.
        rollback: Box<DmError>,
    },
}

/// A mapping as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    /// Name (`crypt-...`).
    pub name: String,
    /// DM uuid (`CRYPT-LUKS2-...`).
    pub uuid: String,
    /// Device number `major:minor`.
    pub device: String,
    /// Number of openers.
    pub open_count: i32,
}

impl MappingInfo {
    /// The mapping's node.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(MAPPER_DIR).join(&self.name)
    }
}

/// An open device-mapper control device.
pub struct DeviceMapper {
    dm: DM,
}

fn name_of(name: &str) -> Result<&DmName, DmError> {
    DmName::new(name).map_err(|_| DmError::InvalidId {
        what: "name",
        value: name.into(),
    })
}

impl DeviceMapper {
    /// Opens `/dev/mapper/control`.
    pub fn open() -> Result<DeviceMapper, DmError> {
        Ok(DeviceMapper {
            dm: DM::new().map_err(|e| DmError::Unavailable(Box::new(e)))?,
        })
    }

    fn op(op: &'static str, name: &str) -> impl FnOnce(devicemapper::DmError) -> DmError {
        let name = name.to_string();
        move |source| DmError::Op {
            op,
            name,
            source: Box::new(source),
        }
    }

    /// Information about `name`, or `None` when no such mapping exists.
    pub fn info(&self, name: &str) -> Result<Option<MappingInfo>, DmError> {
        let id = DevId::Name(name_of(name)?);
        match self.dm.device_info(&id) {
            Ok(info) => Ok(Some(MappingInfo {
                name: name.to_string(),
                uuid: info.uuid().map(|u| u.to_string()).unwrap_or_default(),
                device: format!("{}:{}", info.device().major, info.device().minor),
                open_count: info.open_count(),
            })),
            Err(e) if is_enxio(&e) => Ok(None),
            Err(e) => Err(Self::op("info", name)(e)),
        }
    }

    /// Every mapping whose uuid starts with `uuid_prefix`.
    pub fn list(&self, uuid_prefix: &str) -> Result<Vec<MappingInfo>, DmError> {
        let all = self.dm.list_devices().map_err(Self::op("list", "*"))?;
        let mut out = vec![];
        for (name, _, _) in all {
            if let Some(info) = self.info(&name.to_string())?
                && info.uuid.starts_with(uuid_prefix)
            {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// The table of `name` as the kernel prints it (key references only:
    /// our tables never hold key bytes).
    pub fn table(&self, name: &str) -> Result<Vec<String>, DmError> {
        let id = DevId::Name(name_of(name)?);
        let (_, lines) = self
            .dm
            .table_status(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .map_err(Self::op("table", name))?;
        Ok(lines
            .into_iter()
            .map(|(start, len, ty, params)| format!("{start} {len} {ty} {params}"))
            .collect())
    }

    /// Creates mapping `name` with `uuid` over `target`, the key going
    /// through the keyring; creates the /dev/mapper node when udev does not.
    /// On failure everything created is removed again.
    pub fn create_crypt(
        &self,
        name: &str,
        uuid: &str,
        target: &CryptTarget,
        key: &VolumeKey,
        read_only: bool,
    ) -> Result<MappingInfo, DmError> {
        let dm_name = name_of(name)?;
        let dm_uuid = DmUuid::new(uuid).map_err(|_| DmError::InvalidId {
            what: "uuid",
            value: uuid.into(),
        })?;
        let mut flags = DmFlags::empty();
        if read_only {
            flags |= DmFlags::DM_READONLY;
        }
        self.dm
            .device_create(
                dm_name,
                Some(dm_uuid),
                DmOptions::default().set_flags(flags),
            )
            .map_err(Self::op("create", name))?;
        match self.load_and_resume(name, target, key, flags) {
            Ok(info) => Ok(info),
            Err(cause) => match self.remove_once(name) {
                Ok(()) => Err(cause),
                Err(rollback) => Err(DmError::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                }),
            },
        }
    }

    fn load_and_resume(
        &self,
        name: &str,
        target: &CryptTarget,
        key: &VolumeKey,
        flags: DmFlags,
    ) -> Result<MappingInfo, DmError> {
        let id = DevId::Name(name_of(name)?);
        {
            // The key lives in the keyring only while the table is loaded;
            // dm-crypt has copied it when table_load returns.
            let logon = LogonKey::add(&target.key_description, key)?;
            let line = vec![(
                0,
                target.length_sectors,
                "crypt".to_string(),
                target.params(),
            )];
            debug_assert_eq!(logon.description(), target.key_description);
            self.dm
                .table_load(
                    &id,
                    &line,
                    DmOptions::default().set_flags(flags | DmFlags::DM_SECURE_DATA),
                )
                .map_err(Self::op("table load", name))?;
        }
        self.dm
            .device_suspend(&id, DmOptions::default())
            .map_err(Self::op("resume", name))?;
        let info = self.info(name)?.ok_or_else(|| DmError::Node {
            op: "mapping vanished after creation:",
            path: name.to_string(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        ensure_node(&info)?;
        Ok(info)
    }

    /// Replaces the table of a live mapping (extend): load, suspend, resume.
    pub fn reload_crypt(
        &self,
        name: &str,
        target: &CryptTarget,
        key: &VolumeKey,
    ) -> Result<(), DmError> {
        let id = DevId::Name(name_of(name)?);
        {
            let _logon = LogonKey::add(&target.key_description, key)?;
            let line = vec![(
                0,
                target.length_sectors,
                "crypt".to_string(),
                target.params(),
            )];
            self.dm
                .table_load(
                    &id,
                    &line,
                    DmOptions::default().set_flags(DmFlags::DM_SECURE_DATA),
                )
                .map_err(Self::op("table reload", name))?;
        }
        self.dm
            .device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(Self::op("suspend", name))?;
        self.dm
            .device_suspend(&id, DmOptions::default())
            .map_err(Self::op("resume", name))?;
        Ok(())
    }

    fn remove_once(&self, name: &str) -> Result<(), DmError> {
        let id = DevId::Name(name_of(name)?);
        self.dm
            .device_remove(&id, DmOptions::default())
            .map_err(Self::op("remove", name))?;
        remove_node(name)
    }

    /// Removes `name`, retrying a busy mapping `attempts` times with a
    /// doubling backoff. Returns `false` when there was nothing to remove.
    pub fn remove(
        &self,
        name: &str,
        attempts: u32,
        first_backoff: Duration,
    ) -> Result<bool, DmError> {
        let mut wait = first_backoff;
        for attempt in 1..=attempts.max(1) {
            match self.info(name)? {
                None => {
                    remove_node(name)?;
                    return Ok(attempt > 1);
                }
                Some(info) if info.open_count > 0 && attempt < attempts => {
                    std::thread::sleep(wait);
                    wait = wait.saturating_mul(2);
                }
                Some(_) => match self.remove_once(name) {
                    Ok(()) => return Ok(true),
                    Err(DmError::Op { source, .. }) if is_ebusy(&source) && attempt < attempts => {
                        std::thread::sleep(wait);
                        wait = wait.saturating_mul(2);
                    }
                    Err(DmError::Op { source, .. }) if is_ebusy(&source) => {
                        return Err(DmError::Busy {
                            name: name.into(),
                            attempts,
                        });
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        Err(DmError::Busy {
            name: name.into(),
            attempts,
        })
    }
}

fn errno_of(e: &devicemapper::DmError) -> Option<i32> {
    match e {
        devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            Some(**errno as i32)
        }
        _ => None,
    }
}

fn is_enxio(e: &devicemapper::DmError) -> bool {
    errno_of(e) == Some(libc::ENXIO)
}

fn is_ebusy(e: &devicemapper::DmError) -> bool {
    errno_of(e) == Some(libc::EBUSY)
}

/// Creates `/dev/mapper/<name>` if udev has not (it does not run in every
/// environment, and libdevmapper does the same).
fn ensure_node(info: &MappingInfo) -> Result<(), DmError> {
    let path = info.path();
    if let Ok(meta) = std::fs::symlink_metadata(&path)
        && (meta.file_type().is_block_device() || meta.file_type().is_symlink())
    {
        return Ok(());
    }
    let (major, minor) = info.device.split_once(':').unwrap_or(("0", "0"));
    let (major, minor): (u32, u32) = (major.parse().unwrap_or(0), minor.parse().unwrap_or(0));
    let node_err = |source| DmError::Node {
        op: "creating node",
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(MAPPER_DIR).map_err(node_err)?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| node_err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: mknod reads a NUL-terminated path that outlives the call.
    let rc = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(node_err(e));
        }
    }
    Ok(())
}

/// Removes a stale `/dev/mapper/<name>` node (udev removes its own).
fn remove_node(name: &str) -> Result<(), DmError> {
    let path = PathBuf::from(MAPPER_DIR).join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DmError::Node {
            op: "removing node",
            path: path.display().to_string(),
            source,
        }),
    }
}

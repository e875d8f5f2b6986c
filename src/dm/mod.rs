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
pub use devicemapper::{Device, Sectors};

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
    /// A failed create whose rollback failed too. Both errors are shown
    /// with their whole chains: an error has one `source`, and either
    /// chain alone would hide half of what happened.
    #[error("{}; rolling back also failed: {}", crate::text::error_chain(.cause.as_ref()), crate::text::error_chain(.rollback.as_ref()))]
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
    /// The mapping's device number.
    pub device: Device,
    /// Number of openers.
    pub open_count: i32,
    /// Whether a table is live (loaded and resumed at least once). A
    /// mapping without one is what a create interrupted between its ioctls
    /// (create, table load, resume) leaves behind: it has no size and
    /// serves no I/O.
    pub live_table: bool,
    /// Whether the mapping is suspended (I/O to it blocks).
    pub suspended: bool,
}

impl MappingInfo {
    /// The mapping's node.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(MAPPER_DIR).join(&self.name)
    }
}

/// What the volume layer does with device-mapper: the seam under the
/// orchestration. [`DeviceMapper`] is the kernel; tests put a recording
/// fake behind it to check settling, undo and rollback without a kernel.
pub trait Mapper {
    /// The mapping named `name`, if there is one.
    fn info(&self, name: &str) -> Result<Option<MappingInfo>, DmError>;
    /// Creates a crypt mapping (see [`DeviceMapper::create_crypt`]).
    fn create_crypt(
        &self,
        name: &str,
        uuid: &str,
        target: &CryptTarget,
        key: &VolumeKey,
        read_only: bool,
    ) -> Result<MappingInfo, DmError>;
    /// Replaces a live mapping's table (see [`DeviceMapper::reload_crypt`]).
    fn reload_crypt(
        &self,
        name: &str,
        target: &CryptTarget,
        key: &VolumeKey,
    ) -> Result<(), DmError>;
    /// Makes the mapping's /dev/mapper node when it is missing or stale.
    fn ensure_node(&self, info: &MappingInfo) -> Result<(), DmError>;
    /// Resumes a suspended mapping.
    fn resume(&self, name: &str) -> Result<Option<MappingInfo>, DmError>;
    /// Removes a mapping, retrying while busy; `false`: nothing to remove.
    fn remove(&self, name: &str, attempts: u32, first_backoff: Duration) -> Result<bool, DmError>;
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
            let line = vec![(0, *target.length, "crypt".to_string(), target.params())];
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

    fn remove_once(&self, name: &str) -> Result<(), DmError> {
        let id = DevId::Name(name_of(name)?);
        self.dm
            .device_remove(&id, DmOptions::default())
            .map_err(Self::op("remove", name))?;
        remove_node(name)
    }
}

impl Mapper for DeviceMapper {
    /// Information about `name`, or `None` when no such mapping exists.
    fn info(&self, name: &str) -> Result<Option<MappingInfo>, DmError> {
        let id = DevId::Name(name_of(name)?);
        match self.dm.device_info(&id) {
            Ok(info) => Ok(Some(MappingInfo {
                name: name.to_string(),
                uuid: info.uuid().map(|u| u.to_string()).unwrap_or_default(),
                device: info.device(),
                open_count: info.open_count(),
                live_table: info.flags().contains(DmFlags::DM_ACTIVE_PRESENT),
                suspended: info.flags().contains(DmFlags::DM_SUSPEND),
            })),
            Err(e) if is_enxio(&e) => Ok(None),
            Err(e) => Err(Self::op("info", name)(e)),
        }
    }

    /// Creates mapping `name` with `uuid` over `target`, the key going
    /// through the keyring; creates the /dev/mapper node when udev does not.
    /// On failure everything created is removed again.
    fn create_crypt(
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

    /// Replaces the table of a live mapping (extend): load, suspend, resume.
    fn reload_crypt(
        &self,
        name: &str,
        target: &CryptTarget,
        key: &VolumeKey,
    ) -> Result<(), DmError> {
        let id = DevId::Name(name_of(name)?);
        {
            let _logon = LogonKey::add(&target.key_description, key)?;
            let line = vec![(0, *target.length, "crypt".to_string(), target.params())];
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

    /// Makes sure `/dev/mapper/<name>` is the node of `info`'s device (an
    /// attach killed between the resume and the mknod leaves none).
    fn ensure_node(&self, info: &MappingInfo) -> Result<(), DmError> {
        ensure_node(info)
    }

    /// Resumes a suspended mapping (one whose reload was interrupted after
    /// the suspend) and makes sure its node exists.
    fn resume(&self, name: &str) -> Result<Option<MappingInfo>, DmError> {
        let id = DevId::Name(name_of(name)?);
        self.dm
            .device_suspend(&id, DmOptions::default())
            .map_err(Self::op("resume", name))?;
        let info = self.info(name)?;
        if let Some(i) = &info {
            ensure_node(i)?;
        }
        Ok(info)
    }

    /// Removes `name`, retrying a busy mapping `attempts` times with a
    /// doubling backoff. Returns `false` when there was nothing to remove.
    fn remove(&self, name: &str, attempts: u32, first_backoff: Duration) -> Result<bool, DmError> {
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
    ensure_node_in(std::path::Path::new(MAPPER_DIR), info)
}

/// `ensure_node` in `dir`. A node is kept only when it is (or links to) the
/// mapping's own block device: without udev nothing removes a node whose
/// mapping went away behind our back (a detach killed between the remove
/// ioctl and the unlink), and device-mapper hands the number to the next
/// mapping created, so a stale node of the same name could lead to another
/// volume. Such a node is replaced; a directory in its place is an error.
fn ensure_node_in(dir: &std::path::Path, info: &MappingInfo) -> Result<(), DmError> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(&info.name);
    let want = libc::dev_t::from(info.device);
    // metadata() follows udev's `/dev/mapper/NAME -> ../dm-N` links.
    if let Ok(meta) = std::fs::metadata(&path)
        && meta.file_type().is_block_device()
        && meta.rdev() == want
    {
        return Ok(());
    }
    let node_err = |op, source| DmError::Node {
        op,
        path: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            return Err(node_err(
                "a directory stands where the node must go:",
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        Ok(_) => std::fs::remove_file(&path).map_err(|e| node_err("removing stale node", e))?,
        Err(_) => {}
    }
    std::fs::create_dir_all(dir).map_err(|e| node_err("creating node", e))?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| node_err("creating node", std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: mknod reads a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFBLK | 0o600, want) };
    if rc != 0 {
        return Err(node_err("creating node", std::io::Error::last_os_error()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn info(name: &str, device: &str) -> MappingInfo {
        MappingInfo {
            name: name.into(),
            uuid: format!("CRYPT-PLAIN-{name}"),
            device: device.parse().expect("major:minor"),
            open_count: 0,
            live_table: true,
            suspended: false,
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn stale_nodes_are_replaced_and_directories_refused() {
        if !is_root() {
            eprintln!("skipped: mknod needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let node = d.path().join("crypt-a");
        let rdev = |p: &std::path::Path| std::fs::metadata(p).unwrap().rdev();

        // Missing: created.
        ensure_node_in(d.path(), &info("crypt-a", "254:3")).unwrap();
        assert_eq!(rdev(&node), libc::makedev(254, 3));
        let ino = std::fs::metadata(&node).unwrap().ino();
        // Right device: kept as it is.
        ensure_node_in(d.path(), &info("crypt-a", "254:3")).unwrap();
        assert_eq!(std::fs::metadata(&node).unwrap().ino(), ino);
        // A node left by an earlier mapping with another number: replaced.
        ensure_node_in(d.path(), &info("crypt-a", "254:7")).unwrap();
        assert_eq!(rdev(&node), libc::makedev(254, 7));
        // A regular file or a dangling link: replaced.
        std::fs::remove_file(&node).unwrap();
        std::fs::write(&node, b"x").unwrap();
        ensure_node_in(d.path(), &info("crypt-a", "254:8")).unwrap();
        assert_eq!(rdev(&node), libc::makedev(254, 8));
        std::fs::remove_file(&node).unwrap();
        std::os::unix::fs::symlink("../dm-99", &node).unwrap();
        ensure_node_in(d.path(), &info("crypt-a", "254:9")).unwrap();
        assert!(
            std::fs::symlink_metadata(&node)
                .unwrap()
                .file_type()
                .is_block_device()
        );
        // A link to the right device (what udev makes): kept.
        let dm = d.path().join("dm-9");
        std::fs::rename(&node, &dm).unwrap();
        std::os::unix::fs::symlink(&dm, &node).unwrap();
        ensure_node_in(d.path(), &info("crypt-a", "254:9")).unwrap();
        assert!(
            std::fs::symlink_metadata(&node)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // A directory is not ours to remove.
        std::fs::create_dir(d.path().join("crypt-b")).unwrap();
        let e = ensure_node_in(d.path(), &info("crypt-b", "254:1")).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }
}

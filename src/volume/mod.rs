//! Attach and detach of encrypted volumes: the orchestration from cinder's
//! encryption metadata and a device path to a dm-crypt mapping, with the
//! key from the key manager, a first-use format that cannot destroy data,
//! per-volume serialisation and rollback of partial work.

mod error;
mod first_use;
pub mod guard;
mod holds;
pub mod id;
pub mod naming;
pub mod native;
mod records;
pub mod spec;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::blockdev::{self, Accept};
use crate::dm::{CryptOptions, CryptTarget, DeviceMapper, Mapper, MappingInfo};
use crate::keymgr::{KeyManager, RequestAuth};
use crate::luks::{self, CipherSpec, FileDisk, Header, KdfLimits, LuksVersion};
use crate::secret::VolumeKey;
use error::io_err;
pub use error::{Failure, FileOp, VolumeError};
use guard::FormatRecords;
pub use holds::{KeyHoldRecord, key_holds};
pub use id::VolumeId;
pub use records::{AttachedVolume, attached_volumes, volume_of_mapping};
use records::{RunRecords, VolumeRecord};
pub use spec::{EncryptionSpec, Provider, SpecError};

/// What an idempotent operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It made the change (attach: created the mapping).
    Created,
    /// Detach removed the mapping.
    Removed,
    /// The state was already as requested.
    Identity,
    /// Nothing to do for this volume (no front-end encryption).
    NoOp,
}

/// Result of an attach.
#[derive(Clone, Debug, Serialize)]
pub struct Attached {
    /// The device the guest should use.
    pub path: PathBuf,
    /// The mapping name (absent for no-op volumes).
    pub mapping: Option<String>,
    /// What happened.
    pub action: Action,
    /// Whether this attach formatted the volume.
    pub formatted: bool,
}

/// Result of an extend.
#[derive(Clone, Debug, Serialize)]
pub struct Extended {
    /// The mapping name.
    pub mapping: Option<String>,
    /// Size of the decrypted device in bytes.
    pub new_size: u64,
}

/// Result of a detach.
#[derive(Clone, Debug, Serialize)]
pub struct Detached {
    /// The mapping name.
    pub mapping: Option<String>,
    /// What happened.
    pub action: Action,
}

/// An attach request.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    /// Cinder volume id.
    pub volume_id: VolumeId,
    /// The connector's device path (often a symlink).
    pub device_path: PathBuf,
    /// Cinder's encryption metadata.
    pub spec: EncryptionSpec,
    /// The multipath WWN, if any (older mapping name).
    pub multipath_id: Option<String>,
    /// Whose credentials fetch the key.
    pub auth: RequestAuth,
}

/// Tunables of attach/detach.
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// Where formatting records live (persistent).
    pub state_dir: PathBuf,
    /// Where locks and attach records live (cleared at boot).
    pub run_dir: PathBuf,
    /// Argon2 memory cap for strong-KDF formats.
    pub max_argon2_memory_kib: u32,
    /// Attempts to remove a busy mapping.
    pub detach_attempts: u32,
    /// First wait between those attempts.
    pub detach_backoff: Duration,
    /// Crypt target options.
    pub crypt: CryptOptions,
    /// How old a format intent recorded in the key manager must be before
    /// another attach, on any host, may redo that format (see `guard.rs`).
    pub format_intent_min_age: Duration,
    /// How long opening a device may take before the operation gives up.
    pub device_open_timeout: Duration,
}

/// An operation on an encrypted volume under way (see `Volumes::begin`):
/// the volume's lock is held while it lives.
struct Begun<'s> {
    provider: Provider,
    /// The key id (empty for operations that need no key).
    key_id: &'s str,
    _lock: File,
}

/// Attach/detach orchestration.
pub struct Volumes<'k> {
    keys: &'k dyn KeyManager,
    opts: VolumeOptions,
    records: FormatRecords,
    /// The device-mapper to use; `None`: the kernel's, opened per
    /// operation.
    mapper: Option<&'k dyn Mapper>,
}

/// The device-mapper an operation uses: the kernel's, opened for it, or
/// the one the orchestration was given.
enum MapperRef<'k> {
    Kernel(DeviceMapper),
    Given(&'k dyn Mapper),
}

impl<'k> std::ops::Deref for MapperRef<'k> {
    type Target = dyn Mapper + 'k;
    fn deref(&self) -> &Self::Target {
        match self {
            MapperRef::Kernel(dm) => dm,
            MapperRef::Given(m) => *m,
        }
    }
}

/// The device behind `path`, checked from `stat` (it exists and is a kind
/// the caller accepts) before anything opens it, then resolved.
fn resolve_device(path: &Path, accept: Accept) -> Result<PathBuf, Failure> {
    blockdev::check_device(path, accept)?;
    fs::canonicalize(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            // Gone between the check and here.
            Failure::from(blockdev::DeviceError::NotFound {
                path: blockdev::device::shown(path),
            })
        } else {
            io_err(FileOp::Resolving, path)(source)
        }
    })
}

impl<'k> Volumes<'k> {
    /// Orchestration over `keys`.
    pub fn new(keys: &'k dyn KeyManager, opts: VolumeOptions) -> Self {
        let records = FormatRecords::new(&opts.state_dir);
        Volumes {
            keys,
            opts,
            records,
            mapper: None,
        }
    }

    /// The same orchestration over `mapper` instead of the kernel's
    /// device-mapper (tests of settling, undo and rollback).
    pub fn with_mapper(mut self, mapper: &'k dyn Mapper) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// Opens a caller's device (see [`blockdev::open_device`]) within the
    /// configured time.
    fn open_device(&self, path: &Path, writable: bool, accept: Accept) -> Result<File, Failure> {
        Ok(blockdev::open_device(
            path,
            writable,
            accept,
            self.opts.device_open_timeout,
        )?)
    }

    /// The device-mapper for one operation.
    fn mapper(&self) -> Result<MapperRef<'k>, Failure> {
        Ok(match self.mapper {
            Some(m) => MapperRef::Given(m),
            None => MapperRef::Kernel(DeviceMapper::open()?),
        })
    }

    /// Serialises all operations on one volume, across processes.
    fn lock(&self, volume_id: &str) -> Result<File, Failure> {
        let dir = self.opts.run_dir.join("locks");
        crate::state_file::private_dir(&dir).map_err(io_err(FileOp::CreatingDir, &dir))?;
        let path = dir.join(format!("{volume_id}.lock"));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(FileOp::OpeningLock, &path))?;
        f.lock().map_err(io_err(FileOp::Locking, &path))?;
        Ok(f)
    }

    fn records(&self) -> RunRecords {
        records::attach_records(&self.opts.run_dir)
    }

    fn read_record(&self, volume_id: &str) -> Option<VolumeRecord> {
        self.records().read(volume_id)
    }

    fn write_record(&self, volume_id: &str, rec: &VolumeRecord) -> Result<(), Failure> {
        self.records().write(volume_id, rec)
    }

    /// The provider the spec names.
    fn checked_provider(spec: &EncryptionSpec) -> Result<Provider, Failure> {
        Ok(spec.provider()?)
    }

    /// The opening step every operation shares (the volume id was checked
    /// when its [`VolumeId`] was made): the provider checked (and `check`ed, for modes that take only some
    /// providers); `None` for a volume without front-end encryption (the
    /// caller answers its own no-op); else the key id read from the spec
    /// when `needs_key`, and the volume's lock taken.
    fn begin<'s>(
        &self,
        volume_id: &VolumeId,
        spec: &'s EncryptionSpec,
        needs_key: bool,
        check: impl FnOnce(Provider) -> Result<(), Failure>,
    ) -> Result<Option<Begun<'s>>, Failure> {
        let provider = Self::checked_provider(spec)?;
        check(provider)?;
        if provider == Provider::NoOp {
            return Ok(None);
        }
        let key_id = if needs_key {
            Some(spec.key_id()?)
        } else {
            None
        };
        Ok(Some(Begun {
            provider,
            key_id: key_id.unwrap_or_default(),
            _lock: self.lock(volume_id)?,
        }))
    }

    /// Attaches a volume: after this, the returned path reads and writes
    /// plaintext. Idempotent; a failure leaves nothing behind.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attached, VolumeError> {
        self.attach_mapping(req)
            .await
            .map_err(VolumeError::naming(&req.volume_id))
    }

    async fn attach_mapping(&self, req: &AttachRequest) -> Result<Attached, Failure> {
        let vid = req.volume_id.as_str();
        let Some(begun) = self.begin(&req.volume_id, &req.spec, true, |_| Ok(()))? else {
            return Ok(Attached {
                path: req.device_path.clone(),
                mapping: None,
                action: Action::NoOp,
                formatted: false,
            });
        };
        let (provider, key_id_text) = (begun.provider, begun.key_id);
        let dm = self.mapper()?;
        let name = naming::choose_name(&req.device_path, req.multipath_id.as_deref(), |n| {
            matches!(dm.info(n), Ok(Some(_)))
        });
        let existing = match dm.info(&name)? {
            Some(m) => self.settle_existing(vid, &*dm, m)?,
            None => None,
        };
        // An attach record whose mapping is gone: a detach killed after it
        // removed the mapping (or the mapping removed by hand). The device
        // path may still lead to the old /dev/mapper node; finish the
        // detach before the path is resolved.
        if let Some(r) = self.read_record(vid)
            && dm.info(&r.mapping)?.is_none()
        {
            self.undo_map(vid, &*dm, &r.mapping)?;
        }
        if let Some(existing) = existing {
            self.point_symlink(vid, &req.device_path, &existing)?;
            return Ok(Attached {
                path: existing.path(),
                mapping: Some(name),
                action: Action::Identity,
                formatted: false,
            });
        }
        // A dm-crypt mapping needs a block device: refused before the key
        // is fetched or anything is opened.
        let device = resolve_device(&req.device_path, Accept::BlockOnly)?;
        let (key_id, key) = self.fetch_key(key_id_text, &req.auth).await?;
        let passphrase = key.passphrase();

        if provider == Provider::Plain {
            // cryptsetup create: no header; key derived from the passphrase.
            let (target, key) = self.plain_target(&device, &req.spec, &name, &passphrase)?;
            let uuid = naming::dm_uuid("PLAIN", None, &name);
            return self.map(vid, &*dm, &req.device_path, &name, &uuid, &target, key);
        }
        let (header, volume_key, formatted) = self
            .open_or_format(vid, &device, provider, &req.spec, &key_id, &key, &req.auth)
            .await?;
        let target = self.luks_target(&device, &header, &name)?;
        let kind = if header.version() == LuksVersion::Luks1 {
            "LUKS1"
        } else {
            "LUKS2"
        };
        let uuid = naming::dm_uuid(kind, Some(header.uuid()), &name);
        let mut attached = self.map(
            vid,
            &*dm,
            &req.device_path,
            &name,
            &uuid,
            &target,
            volume_key,
        )?;
        attached.formatted = formatted;
        Ok(attached)
    }

    /// A mapping of the volume's name found at attach, as a killed attach or
    /// extend may have left it: without a live table (killed between the
    /// create, table load and resume ioctls) it serves no I/O and is removed
    /// so that attach creates it afresh; suspended (killed inside a reload)
    /// it is resumed; without its /dev/mapper node (killed before the mknod)
    /// the node is made. Mappings whose uuid is not a crypt one are not
    /// touched: they are someone else's.
    fn settle_existing(
        &self,
        vid: &str,
        dm: &dyn Mapper,
        m: MappingInfo,
    ) -> Result<Option<MappingInfo>, Failure> {
        if m.live_table && !m.suspended {
            dm.ensure_node(&m)?;
            return Ok(Some(m));
        }
        if !m.uuid.starts_with("CRYPT-") {
            return Err(Failure::Unsupported {
                what: format!(
                    "mapping {} exists {} and is not a crypt mapping (uuid '{}')",
                    m.name,
                    if m.live_table {
                        "suspended"
                    } else {
                        "without a table"
                    },
                    m.uuid
                ),
            });
        }
        if m.live_table {
            tracing::warn!(
                volume_id = vid,
                mapping = m.name,
                "resuming a suspended mapping"
            );
            return Ok(dm.resume(&m.name)?);
        }
        tracing::warn!(
            volume_id = vid,
            mapping = m.name,
            "removing a mapping without a table, left by an interrupted attach"
        );
        dm.remove(&m.name, self.opts.detach_attempts, self.opts.detach_backoff)?;
        Ok(None)
    }

    /// Creates the mapping and repoints the device path; when the symlink
    /// cannot be set, undoes everything (mapping, record, symlink).
    #[allow(clippy::too_many_arguments)]
    fn map(
        &self,
        vid: &str,
        dm: &dyn Mapper,
        device_path: &Path,
        name: &str,
        uuid: &str,
        target: &CryptTarget,
        volume_key: VolumeKey,
    ) -> Result<Attached, Failure> {
        let info = dm.create_crypt(name, uuid, target, &volume_key, false)?;
        drop(volume_key);
        if let Err(cause) = self.point_symlink(vid, device_path, &info) {
            return Err(Failure::with_rollback(cause, self.undo_map(vid, dm, name)));
        }
        Ok(Attached {
            path: info.path(),
            mapping: Some(name.to_string()),
            action: Action::Created,
            formatted: false,
        })
    }

    /// Undoes an attach: removes the mapping (and its node) if it is there,
    /// puts the device path back where the attach record says it pointed
    /// and drops the record. The rollback of `map`, and the end of a detach
    /// that was killed. The keyring entry needs no undo: it lives only
    /// while the table loads. Every step is tried; the first failure is
    /// returned.
    fn undo_map(&self, vid: &str, dm: &dyn Mapper, name: &str) -> Result<(), Failure> {
        let mut first = dm
            .remove(name, 3, Duration::from_millis(50))
            .map(|_| ())
            .map_err(Failure::from);
        if let Some(r) = self.read_record(vid).filter(|r| r.mapping == name) {
            let mapped = PathBuf::from(crate::dm::MAPPER_DIR).join(name);
            if let Some(orig) = &r.original_target
                && fs::read_link(&r.device_path).ok().as_deref() == Some(mapped.as_path())
                && let Err(e) = replace_symlink(&r.device_path, orig)
            {
                first = first.and(Err(io_err(FileOp::Restoring, &r.device_path)(e)));
            }
            if let Err(e) = self.records().remove(vid) {
                first = first.and(Err(e));
            }
        }
        first
    }

    /// The crypt target of a LUKS volume on `device`.
    fn luks_target(
        &self,
        device: &Path,
        header: &Header,
        name: &str,
    ) -> Result<CryptTarget, Failure> {
        self.target(
            device,
            &header.cipher(),
            header.key_bytes(),
            format!("luks-agent:{}-{name}", header.uuid()),
            header.data_offset(),
            header.sector_size(),
        )
    }

    /// The crypt target and key of a plain volume on `device`.
    fn plain_target(
        &self,
        device: &Path,
        spec: &EncryptionSpec,
        name: &str,
        passphrase: &crate::secret::Passphrase,
    ) -> Result<(CryptTarget, VolumeKey), Failure> {
        let cipher = spec.plain_cipher();
        let bits = spec.plain_key_bits()?;
        CipherSpec::parse(cipher, bits / 8).map_err(|e| Failure::Unsupported {
            what: e.to_string(),
        })?;
        let target = self.target(
            device,
            cipher,
            bits / 8,
            format!("luks-agent:plain-{name}"),
            0,
            512,
        )?;
        Ok((
            target,
            luks::plain::plain_key(passphrase.expose(), bits / 8),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn target(
        &self,
        device: &Path,
        cipher: &str,
        key_bytes: usize,
        key_description: String,
        data_offset: u64,
        sector_size: u32,
    ) -> Result<CryptTarget, Failure> {
        use std::os::unix::fs::MetadataExt;
        let file = self.open_device(device, false, Accept::BlockOnly)?;
        let meta = file
            .metadata()
            .map_err(io_err(FileOp::Inspecting, device))?;
        let size = blockdev::size_of(&file).map_err(io_err(FileOp::Sizing, device))?;
        let sector = u64::from(sector_size);
        let data = size.saturating_sub(data_offset) / sector * sector;
        if data == 0 {
            return Err(Failure::Unsupported {
                what: format!(
                    "{} has no room for data after its header",
                    blockdev::device::shown(device)
                ),
            });
        }
        let rdev = meta.rdev();
        let mut options = self.opts.crypt.clone();
        if sector > 512 {
            options.sector_size = sector_size;
            // LUKS2 counts IVs in 512-byte sectors whatever its encryption
            // sector size: cryptsetup loads `sector_size:4096` without
            // `iv_large_sectors` (which only plain mode and BitLocker
            // use). With it every sector would be encrypted under another
            // IV than cryptsetup and os-brick use, and each side would
            // read the other's data as noise.
            options.iv_large_sectors = false;
        }
        Ok(CryptTarget {
            cipher: cipher.to_string(),
            key_bytes,
            key_description,
            iv_offset: 0,
            device: crate::dm::Device::from(rdev),
            offset: crate::dm::Sectors(data_offset / 512),
            length: crate::dm::Sectors(data / 512),
            options,
        })
    }

    /// Points the connector's symlink at the mapping (as os-brick does),
    /// remembering where it pointed so detach can restore it.
    fn point_symlink(
        &self,
        vid: &str,
        device_path: &Path,
        info: &MappingInfo,
    ) -> Result<(), Failure> {
        let mapping_path = info.path();
        let link = fs::symlink_metadata(device_path)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        let current = fs::read_link(device_path).ok();
        let original = match self.read_record(vid) {
            Some(r) if r.mapping == info.name => r.original_target,
            _ => {
                if link && current.as_deref() != Some(mapping_path.as_path()) {
                    current.clone()
                } else {
                    None
                }
            }
        };
        self.write_record(
            vid,
            &VolumeRecord {
                mapping: info.name.clone(),
                device_path: device_path.to_path_buf(),
                original_target: original,
            },
        )?;
        if !link || current.as_deref() == Some(mapping_path.as_path()) {
            return Ok(());
        }
        replace_symlink(device_path, &mapping_path).map_err(io_err(FileOp::Repointing, device_path))
    }

    /// Detaches a volume: removes the mapping (retrying while it is busy)
    /// and restores the device path. Detaching a detached volume succeeds.
    pub async fn detach(
        &self,
        volume_id: &VolumeId,
        device_path: &Path,
        spec: &EncryptionSpec,
        multipath_id: Option<&str>,
    ) -> Result<Detached, VolumeError> {
        self.detach_mapping(volume_id, device_path, spec, multipath_id)
            .map_err(VolumeError::naming(volume_id))
    }

    fn detach_mapping(
        &self,
        volume_id: &VolumeId,
        device_path: &Path,
        spec: &EncryptionSpec,
        multipath_id: Option<&str>,
    ) -> Result<Detached, Failure> {
        let Some(_begun) = self.begin(volume_id, spec, false, |_| Ok(()))? else {
            return Ok(Detached {
                mapping: None,
                action: Action::NoOp,
            });
        };
        let dm = self.mapper()?;
        let record = self.read_record(volume_id);
        let name = match &record {
            Some(r) => r.mapping.clone(),
            None => naming::choose_name(device_path, multipath_id, |n| {
                matches!(dm.info(n), Ok(Some(_)))
            }),
        };
        let removed = dm.remove(&name, self.opts.detach_attempts, self.opts.detach_backoff)?;
        if let Some(r) = &record {
            if let Some(orig) = &r.original_target {
                replace_symlink(&r.device_path, orig)
                    .map_err(io_err(FileOp::Restoring, &r.device_path))?;
            }
            self.records().remove(volume_id)?;
        }
        Ok(Detached {
            mapping: Some(name),
            action: if removed {
                Action::Removed
            } else {
                Action::Identity
            },
        })
    }
}

impl Volumes<'_> {
    /// Grows the mapping of an attached volume to its device's new size:
    /// the key is fetched and the header unlocked again, and the table is
    /// reloaded (suspend, resume) at the new length.
    pub async fn extend(&self, req: &AttachRequest) -> Result<Extended, VolumeError> {
        self.extend_mapping(req)
            .await
            .map_err(VolumeError::naming(&req.volume_id))
    }

    async fn extend_mapping(&self, req: &AttachRequest) -> Result<Extended, Failure> {
        let vid = req.volume_id.as_str();
        let Some(begun) = self.begin(&req.volume_id, &req.spec, true, |_| Ok(()))? else {
            // Nothing of ours sits on the device: its size is the answer,
            // read without opening the path.
            return Ok(Extended {
                mapping: None,
                new_size: blockdev::size_without_opening(&req.device_path, Accept::BlockOnly)?,
            });
        };
        let (provider, key_id_text) = (begun.provider, begun.key_id);
        let dm = self.mapper()?;
        let record = self.read_record(vid);
        let name = match &record {
            Some(r) => r.mapping.clone(),
            None => naming::choose_name(&req.device_path, req.multipath_id.as_deref(), |n| {
                matches!(dm.info(n), Ok(Some(_)))
            }),
        };
        if dm.info(&name)?.is_none() {
            return Err(Failure::NotAttached {
                mapping: name.clone(),
            });
        }
        // The lower device: the record's symlink target, else the path.
        let lower = match record.as_ref().and_then(|r| r.original_target.clone()) {
            Some(t) => resolve_device(&t, Accept::BlockOnly)?,
            None => resolve_device(&req.device_path, Accept::BlockOnly)?,
        };
        let (_, key) = self.fetch_key(key_id_text, &req.auth).await?;
        let passphrase = key.passphrase();
        let (target, vk) = if provider == Provider::Plain {
            self.plain_target(&lower, &req.spec, &name, &passphrase)?
        } else {
            let file = self.open_device(&lower, false, Accept::BlockOnly)?;
            let disk = FileDisk::new(file, blockdev::device::shown(&lower));
            let header = Header::read(&disk)?;
            let unlocked = header.unlock(&disk, &passphrase, None, &KdfLimits::default())?;
            let target = self.luks_target(&lower, &header, &name)?;
            (target, unlocked.volume_key)
        };
        dm.reload_crypt(&name, &target, &vk)?;
        Ok(Extended {
            mapping: Some(name.clone()),
            new_size: *target.length * 512,
        })
    }
}

/// Atomically makes `link` a symlink to `target` (create beside, rename).
fn replace_symlink(link: &Path, target: &Path) -> std::io::Result<()> {
    let tmp = link.with_file_name(format!(".{}.luks-agent-tmp", naming::basename(link)));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
mod mapping_tests;

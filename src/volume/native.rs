//! QEMU-native LUKS ("libvirt mode"), nova's path for `luks` volumes: no
//! dm-crypt mapping on the host; QEMU opens the LUKS1 header itself with
//! a passphrase it gets from a libvirt secret that the disk's
//! `<encryption>` element names.
//!
//! Attach fetches the key and runs the same first-use guard and format as
//! the dm-crypt path (as LUKS1, the only version QEMU opens), then defines
//! or reuses the volume's secret. Everything runs under the per-volume
//! lock, so concurrent attaches of one volume make one secret.
//!
//! Whether an existing private secret already holds the right value cannot
//! be asked of libvirt (a private value cannot be read back). The agent
//! keeps a record per volume in the run directory (root only, cleared at
//! boot, like ephemeral secrets): the secret's UUID and a SHA-256
//! fingerprint of the UUID and passphrase. Same UUID, same fingerprint,
//! same flags: reuse without writing. Anything else (another value, an
//! unknown one, nova's persistent readable secret): the value is set
//! again, and a secret with other flags is first defined anew under the
//! same UUID with ours.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::records::RunRecords;
use super::{
    AttachRequest, EncryptionSpec, Failure, FileOp, Provider, VolumeError, VolumeId, Volumes,
    io_err, resolve_device,
};
use crate::blockdev::{self, Accept};
use crate::libvirt::{self, SecretFlags, Secrets};
use crate::luks::{FileDisk, Header, LuksVersion};
use crate::secret::Passphrase;

/// Where and how secrets are defined.
#[derive(Clone, Debug)]
pub struct NativeOptions {
    /// libvirt connection URI.
    pub uri: String,
    /// Flags of the secrets we define.
    pub flags: SecretFlags,
}

/// What happened to the volume's secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretAction {
    /// No secret existed; one was defined.
    Created,
    /// Our secret with this value and these flags existed; untouched.
    Reused,
    /// A secret existed with another (or unknown) value or other flags; it
    /// was redefined under the same UUID and given the value.
    Replaced,
    /// Detach undefined the secret.
    Removed,
    /// Detach left the secret defined (`--keep-secret`).
    Kept,
    /// There was no secret.
    Absent,
    /// Nothing to do for this volume (no front-end encryption).
    NoOp,
}

/// Result of a QEMU-native attach.
#[derive(Clone, Debug, Serialize)]
pub struct NativeAttached {
    /// The device for the disk's `<source>` (the volume itself).
    pub path: PathBuf,
    /// The secret's UUID (absent for volumes without encryption).
    pub secret_uuid: Option<String>,
    /// The disk's `<encryption>` element.
    pub encryption_xml: Option<String>,
    /// What happened to the secret.
    pub secret: SecretAction,
    /// The secret's flags.
    pub flags: Option<SecretFlags>,
    /// Whether this attach formatted the volume.
    pub formatted: bool,
}

/// Result of a QEMU-native detach.
#[derive(Clone, Debug, Serialize)]
pub struct NativeDetached {
    /// The secret's UUID, if there was one.
    pub secret_uuid: Option<String>,
    /// What happened to it.
    pub secret: SecretAction,
}

/// Result of a QEMU-native extend.
#[derive(Clone, Debug, Serialize)]
pub struct NativeExtended {
    /// The device's size in bytes.
    pub device_size: u64,
    /// Where the encrypted payload starts (0 without encryption).
    pub payload_offset: u64,
    /// What the guest sees: device size minus payload offset, as nova
    /// computes it for `virDomainBlockResize`.
    pub new_size: u64,
}

/// The per-volume secret record (see the module documentation).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct SecretRecord {
    uuid: String,
    fingerprint: String,
}

/// SHA-256 over a domain tag, the UUID and the passphrase: equal only for
/// the same value in the same secret, and the UUID keeps fingerprints of
/// one passphrase in different secrets apart. The hasher wipes its buffer
/// when dropped (sha2's `zeroize` feature).
fn fingerprint(uuid: &str, passphrase: &Passphrase) -> String {
    let mut h = Sha256::new();
    h.update(b"luks-agent libvirt secret v1\0");
    h.update(uuid.as_bytes());
    h.update(b"\0");
    h.update(passphrase.expose());
    hex::encode(h.finalize())
}

fn refuse_provider(provider: Provider) -> Result<(), Failure> {
    match provider {
        Provider::Luks1 | Provider::NoOp => Ok(()),
        other => Err(Failure::Unsupported {
            what: format!(
                "provider {} cannot be used in libvirt mode: QEMU opens only LUKS1 volumes natively (use --mode dm); nothing was written",
                if other == Provider::Plain {
                    "plain"
                } else {
                    "luks2"
                }
            ),
        }),
    }
}

/// A volume attached in libvirt mode, as its secret record describes it.
#[derive(Clone, Debug, Serialize)]
pub struct NativeVolume {
    /// Cinder volume id.
    pub volume_id: String,
    /// The secret QEMU reads the passphrase from.
    pub secret_uuid: String,
}

/// The volumes with a secret record under `run_dir` (for status listings),
/// sorted by id.
pub fn native_volumes(run_dir: &std::path::Path) -> Vec<NativeVolume> {
    RunRecords::new(run_dir, SECRET_RECORDS)
        .all::<SecretRecord>()
        .into_iter()
        .map(|(volume_id, rec)| NativeVolume {
            volume_id,
            secret_uuid: rec.uuid,
        })
        .collect()
}

/// The run directory's subdirectory of secret records.
pub(super) const SECRET_RECORDS: &str = "secrets";

impl Volumes<'_> {
    fn secret_records(&self) -> RunRecords {
        RunRecords::new(&self.opts.run_dir, SECRET_RECORDS)
    }

    /// Attaches a `luks` volume for QEMU to open: format on first use
    /// (LUKS1, same guard as dm-crypt), then define or reuse the secret.
    /// Returns the `<encryption>` element for the disk. Idempotent.
    pub async fn attach_native(
        &self,
        req: &AttachRequest,
        native: &NativeOptions,
    ) -> Result<NativeAttached, VolumeError> {
        self.attach_secret(req, native)
            .await
            .map_err(VolumeError::naming(&req.volume_id))
    }

    async fn attach_secret(
        &self,
        req: &AttachRequest,
        native: &NativeOptions,
    ) -> Result<NativeAttached, Failure> {
        let vid = req.volume_id.as_str();
        let Some(begun) = self.begin(&req.volume_id, &req.spec, true, refuse_provider)? else {
            return Ok(NativeAttached {
                path: req.device_path.clone(),
                secret_uuid: None,
                encryption_xml: None,
                secret: SecretAction::NoOp,
                flags: None,
                formatted: false,
            });
        };
        let (provider, key_id_text) = (begun.provider, begun.key_id);
        // Connect before anything is fetched or written: with libvirtd
        // down the attach fails with nothing changed.
        let secrets = Secrets::connect(&native.uri)?;
        // QEMU opens block devices and image files (NFS-backed volumes).
        let device = resolve_device(&req.device_path, Accept::BlockOrFile)?;
        let (key_id, key) = self.fetch_key(key_id_text, &req.auth).await?;
        let (header, volume_key, formatted) = self
            .open_or_format(vid, &device, provider, &req.spec, &key_id, &key, &req.auth)
            .await?;
        // QEMU only needs the passphrase; the volume key proved it opens.
        drop(volume_key);
        if header.version() != LuksVersion::Luks1 {
            return Err(Failure::Unsupported {
                what: format!(
                    "{} holds a LUKS2 header, which QEMU cannot open natively (use --mode dm)",
                    device.display()
                ),
            });
        }
        let passphrase = key.passphrase();
        let existing = secrets.find(vid)?;
        let record = self.secret_records().read::<SecretRecord>(vid);
        let (uuid, action) = match existing {
            Some(s)
                if s.ours
                    && s.flags == native.flags
                    && record.as_ref().is_some_and(|r| {
                        r.uuid == s.uuid && r.fingerprint == fingerprint(&s.uuid, &passphrase)
                    }) =>
            {
                (s.uuid, SecretAction::Reused)
            }
            Some(s) => {
                // Forget the old value first: if what follows fails, the
                // next attach must not take the secret for ours.
                self.secret_records().remove(vid)?;
                if !s.ours || s.flags != native.flags {
                    // Not ours (nova's: persistent and readable) or other
                    // flags: undefine, then define ours under the same UUID
                    // so a disk that names it still finds it. Redefining in
                    // place would not do: libvirt 9.0 turning a persistent
                    // secret ephemeral deletes its value file but leaves
                    // its XML file, which a libvirtd restart loads again.
                    secrets.undefine(vid, &s.uuid)?;
                    secrets.define(vid, native.flags, Some(&s.uuid))?;
                }
                secrets.set_value(vid, &s.uuid, &passphrase)?;
                (s.uuid, SecretAction::Replaced)
            }
            None => {
                let uuid = secrets.define(vid, native.flags, None)?;
                if let Err(e) = secrets.set_value(vid, &uuid, &passphrase) {
                    let rollback = secrets
                        .undefine(vid, &uuid)
                        .map(drop)
                        .map_err(Failure::from);
                    return Err(Failure::with_rollback(e.into(), rollback));
                }
                (uuid, SecretAction::Created)
            }
        };
        if action != SecretAction::Reused {
            self.secret_records().write(
                vid,
                &SecretRecord {
                    uuid: uuid.clone(),
                    fingerprint: fingerprint(&uuid, &passphrase),
                },
            )?;
        }
        tracing::info!(volume_id = vid, secret = uuid, action = ?action, "libvirt secret");
        Ok(NativeAttached {
            path: req.device_path.clone(),
            encryption_xml: Some(libvirt::encryption_xml(&uuid)),
            secret_uuid: Some(uuid),
            secret: action,
            flags: Some(native.flags),
            formatted,
        })
    }

    /// Detaches a QEMU-native volume: undefines the secret nova would find
    /// for it (ours or nova's own), unless `keep` (nova keeps secrets
    /// across a hard reboot). Detaching a detached volume succeeds.
    pub fn detach_native(
        &self,
        volume_id: &VolumeId,
        spec: &EncryptionSpec,
        native: &NativeOptions,
        keep: bool,
    ) -> Result<NativeDetached, VolumeError> {
        self.detach_secret(volume_id, spec, native, keep)
            .map_err(VolumeError::naming(volume_id))
    }

    fn detach_secret(
        &self,
        volume_id: &VolumeId,
        spec: &EncryptionSpec,
        native: &NativeOptions,
        keep: bool,
    ) -> Result<NativeDetached, Failure> {
        let Some(_begun) = self.begin(volume_id, spec, false, |_| Ok(()))? else {
            return Ok(NativeDetached {
                secret_uuid: None,
                secret: SecretAction::NoOp,
            });
        };
        let secrets = Secrets::connect(&native.uri)?;
        let Some(found) = secrets.find(volume_id)? else {
            self.secret_records().remove(volume_id)?;
            return Ok(NativeDetached {
                secret_uuid: None,
                secret: SecretAction::Absent,
            });
        };
        if keep {
            return Ok(NativeDetached {
                secret_uuid: Some(found.uuid),
                secret: SecretAction::Kept,
            });
        }
        let removed = secrets.undefine(volume_id, &found.uuid)?;
        self.secret_records().remove(volume_id)?;
        Ok(NativeDetached {
            secret_uuid: Some(found.uuid),
            secret: if removed {
                SecretAction::Removed
            } else {
                SecretAction::Absent
            },
        })
    }

    /// nova detaches a QEMU-native volume by deleting its libvirt secret
    /// itself, without calling the encryptor: the agent learns of it here.
    /// A secret record whose secret is gone and that no domain names any
    /// more (a guest still running after a libvirtd restart lost an
    /// ephemeral secret still names it) is such a detach: the record is
    /// removed and the key's hold released with the agent's own
    /// credentials. Returns the volumes found detached.
    pub async fn reconcile_native(&self, native: &NativeOptions) -> Result<Vec<String>, Failure> {
        let records = self.secret_records().all::<SecretRecord>();
        if records.is_empty() {
            return Ok(vec![]);
        }
        let secrets = Secrets::connect(&native.uri)?;
        let mut detached = vec![];
        for (volume_id, _) in records {
            let _lock = self.lock(&volume_id)?;
            // Again under the lock: an attach or a detach may have run.
            let Some(rec) = self.secret_records().read::<SecretRecord>(&volume_id) else {
                continue;
            };
            if secrets.find(&volume_id)?.is_some()
                || secrets.used_by_a_domain(&volume_id, &rec.uuid)?
            {
                continue;
            }
            self.secret_records().remove(&volume_id)?;
            tracing::info!(
                volume_id = volume_id.as_str(),
                secret_uuid = rec.uuid.as_str(),
                "the volume's libvirt secret was removed and no domain uses it: detached"
            );
            self.release_recorded(&volume_id, &crate::keymgr::RequestAuth::Service)
                .await?;
            detached.push(volume_id);
        }
        Ok(detached)
    }

    /// The guest-visible size of a grown QEMU-native volume: the device's
    /// size minus the LUKS payload offset, as nova computes it. Reads the
    /// header only; no key is needed and nothing is written.
    pub fn extend_native(&self, req: &AttachRequest) -> Result<NativeExtended, VolumeError> {
        self.extend_size(req)
            .map_err(VolumeError::naming(&req.volume_id))
    }

    fn extend_size(&self, req: &AttachRequest) -> Result<NativeExtended, Failure> {
        let path = &req.device_path;
        let Some(_begun) = self.begin(&req.volume_id, &req.spec, false, refuse_provider)? else {
            // Nothing of ours on the device: its size, without opening it.
            let device_size = blockdev::size_without_opening(path, Accept::BlockOrFile)?;
            return Ok(NativeExtended {
                device_size,
                payload_offset: 0,
                new_size: device_size,
            });
        };
        let file = self.open_device(path, false, Accept::BlockOrFile)?;
        let device_size = blockdev::size_of(&file).map_err(io_err(FileOp::Sizing, path))?;
        let payload_offset = {
            let disk = FileDisk::new(file, blockdev::device::shown(path));
            Header::read(&disk)?.data_offset()
        };
        Ok(NativeExtended {
            device_size,
            payload_offset,
            new_size: device_size.saturating_sub(payload_offset),
        })
    }
}

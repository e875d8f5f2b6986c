//! The first-use decision of an attach, shared by the dm-crypt and the
//! QEMU-native paths: fetch the volume's key, then open its LUKS header,
//! or format the device when the guard allows it (the state machine is
//! documented in `guard.rs`), and keep the key manager's "formatted"
//! marker and the local format record in step.

use std::path::Path;

use super::guard::Inspection;
use super::{EncryptionSpec, Provider, VolumeError, Volumes, io_err};
use crate::blockdev;
use crate::keymgr::{KeyId, RequestAuth};
use crate::luks::{
    self, CipherSpec, Disk, FileDisk, FormatOptions, Header, KdfLimits, KdfPolicy, LuksError,
    LuksVersion,
};
use crate::secret::VolumeKey;

impl Volumes<'_> {
    /// Opens the volume's LUKS header with its key, or formats the device
    /// on first use when the guard allows it (the state machine is in
    /// `guard.rs`). Returns the header, the volume key and whether this
    /// call formatted. Shared by the dm-crypt and the QEMU-native attach,
    /// so both refuse and format under exactly the same rules.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn open_or_format(
        &self,
        vid: &str,
        device: &Path,
        provider: Provider,
        spec: &EncryptionSpec,
        key_id: &KeyId,
        key: &crate::keymgr::Key,
        auth: &RequestAuth,
    ) -> Result<(Header, VolumeKey, bool), VolumeError> {
        let passphrase = key.passphrase();
        let dev_name = device.display().to_string();
        let luks_err = |source| VolumeError::Luks {
            volume_id: vid.into(),
            device: dev_name.clone(),
            source,
        };
        let file = blockdev::open(device, true).map_err(io_err(vid, "opening", device))?;
        let disk = FileDisk::new(file, dev_name.clone());
        let limits = KdfLimits::default();
        let recorded = self.records.is_recorded(vid);
        // Only an interrupted format of our own may be redone: our
        // record says it started here, and no marker says it finished.
        let redo_ours = recorded
            && !self
                .keys
                .is_marked_formatted(key_id, auth)
                .await
                .map_err(|source| VolumeError::Key {
                    volume_id: vid.into(),
                    source,
                })?;
        let opened = match Header::read(&disk) {
            Ok(h) => match h.unlock(&disk, &passphrase, None, &limits) {
                Ok(u) => {
                    self.heal_marker(vid, key_id, auth).await?;
                    (h, u.volume_key, false)
                }
                Err(LuksError::WrongPassphrase { .. }) if redo_ours => {
                    let (h, k) = self
                        .format(vid, &disk, provider, spec, key, key_id, auth)
                        .await?;
                    (h, k, true)
                }
                Err(e) => return Err(luks_err(e)),
            },
            Err(LuksError::NotLuks { .. }) => {
                if self
                    .keys
                    .is_marked_formatted(key_id, auth)
                    .await
                    .map_err(|source| VolumeError::Key {
                        volume_id: vid.into(),
                        source,
                    })?
                {
                    return Err(VolumeError::FormatRefused {
                        volume_id: vid.into(),
                        device: dev_name.clone(),
                        reason: format!(
                            "no LUKS header, but the key manager records key {key_id} as formatted: the header was destroyed or the device is not the volume"
                        ),
                    });
                }
                let seen = Inspection::of(&disk).map_err(io_err(vid, "probing", device))?;
                if !seen.is_blank() && !redo_ours {
                    return Err(VolumeError::FormatRefused {
                        volume_id: vid.into(),
                        device: dev_name.clone(),
                        reason: format!("the device is not blank: {}", seen.describe()),
                    });
                }
                let (h, k) = self
                    .format(vid, &disk, provider, spec, key, key_id, auth)
                    .await?;
                (h, k, true)
            }
            Err(
                e @ (LuksError::InvalidHeader { .. }
                | LuksError::Unsupported { .. }
                | LuksError::TooSmall { .. }),
            ) => {
                if redo_ours {
                    let (h, k) = self
                        .format(vid, &disk, provider, spec, key, key_id, auth)
                        .await?;
                    (h, k, true)
                } else {
                    return Err(luks_err(e));
                }
            }
            Err(e) => return Err(luks_err(e)),
        };
        Ok(opened)
    }

    pub(super) async fn heal_marker(
        &self,
        vid: &str,
        key_id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<(), VolumeError> {
        let key_err = |source| VolumeError::Key {
            volume_id: vid.into(),
            source,
        };
        if !self
            .keys
            .is_marked_formatted(key_id, auth)
            .await
            .map_err(key_err)?
        {
            self.keys
                .mark_formatted(key_id, auth)
                .await
                .map_err(key_err)?;
        }
        self.records
            .clear(vid)
            .map_err(io_err(vid, "clearing format record for", Path::new(vid)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn format(
        &self,
        vid: &str,
        disk: &FileDisk,
        provider: Provider,
        spec: &EncryptionSpec,
        key: &crate::keymgr::Key,
        key_id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<(Header, VolumeKey), VolumeError> {
        let dev = disk.name().to_string();
        let spec_err = |source| VolumeError::Spec {
            volume_id: vid.into(),
            source,
        };
        let bits = spec.key_bits().map_err(spec_err)?;
        let cipher =
            CipherSpec::parse(spec.cipher(), bits / 8).map_err(|e| VolumeError::Unsupported {
                volume_id: vid.into(),
                what: e.to_string(),
            })?;
        let version = if provider == Provider::Luks1 {
            LuksVersion::Luks1
        } else {
            LuksVersion::Luks2
        };
        let kdf = if key.is_high_entropy() {
            KdfPolicy::HighEntropyKey
        } else {
            match KdfPolicy::cryptsetup_default(version) {
                KdfPolicy::Benchmark {
                    kind,
                    iter_time,
                    parallel,
                    ..
                } => KdfPolicy::Benchmark {
                    kind,
                    iter_time,
                    parallel,
                    max_memory_kib: self.opts.max_argon2_memory_kib,
                },
                other => other,
            }
        };
        let opts = FormatOptions {
            version,
            cipher,
            hash: luks::HashAlg::Sha256,
            kdf,
            keyslot: None,
            uuid: None,
            sector_size: blockdev::default_encryption_sector_size(disk.file()),
            metadata_size: None,
            keyslots_size: None,
            key_id: (version == LuksVersion::Luks2).then(|| key_id.to_string()),
        };
        self.records.record(vid, &dev).map_err(io_err(
            vid,
            "recording format of",
            Path::new(&dev),
        ))?;
        let (header, vk) =
            luks::format(disk, &opts, &key.passphrase()).map_err(|source| VolumeError::Luks {
                volume_id: vid.into(),
                device: dev.clone(),
                source,
            })?;
        tracing::info!(volume_id = vid, device = dev, "formatted on first use");
        self.heal_marker(vid, key_id, auth).await?;
        Ok((header, vk))
    }

    /// Fetches the volume's key.
    pub(super) async fn fetch_key(
        &self,
        vid: &str,
        key_id: &str,
        auth: &RequestAuth,
    ) -> Result<(KeyId, crate::keymgr::Key), VolumeError> {
        let key_err = |source| VolumeError::Key {
            volume_id: vid.into(),
            source,
        };
        let key_id = KeyId::new(key_id).map_err(key_err)?;
        let key = self.keys.fetch(&key_id, auth).await.map_err(key_err)?;
        Ok((key_id, key))
    }
}

//! The first-use decision of an attach, shared by the dm-crypt and the
//! QEMU-native paths: fetch the volume's key, then open its LUKS header,
//! or format the device when the guard allows it (the state machine is
//! documented in `guard.rs`), and keep the key manager's "formatted"
//! marker and the local format record in step.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::guard::Inspection;
use super::{EncryptionSpec, Provider, VolumeError, Volumes, io_err, key_err};
use crate::blockdev;
use crate::keymgr::{FormatIntent, KeyId, RequestAuth};
use crate::luks::{
    self, CipherSpec, Disk, FileDisk, FormatOptions, Header, KdfLimits, KdfPolicy, LuksError,
    LuksVersion,
};
use crate::secret::VolumeKey;

/// `secs` after the epoch as an RFC 3339 time, clamped to the years
/// humantime can show (an intent's time may be any number).
fn rfc3339(secs: u64) -> String {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    humantime::format_rfc3339_seconds(
        UNIX_EPOCH + Duration::from_secs(secs.min(LAST_SECOND_OF_9999)),
    )
    .to_string()
}

/// The volume one first-use decision is about: what every step of it
/// needs to read the device, ask the key manager and name the volume in
/// errors.
struct FirstUse<'a> {
    vid: &'a str,
    disk: &'a FileDisk,
    key: &'a crate::keymgr::Key,
    key_id: &'a KeyId,
    auth: &'a RequestAuth,
}

/// What an attach may do about a device whose header does not open.
enum Redo {
    /// Format again over what an interrupted format left, reusing this
    /// intent's LUKS UUID.
    Allowed(FormatIntent),
    /// No intent applies (none recorded, or the marker says the volume
    /// was formatted): the usual checks decide.
    NoIntent,
    /// An intent is recorded but the device or its age forbid a redo.
    Refused(String),
}

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
        let refused = |reason: String| VolumeError::FormatRefused {
            volume_id: vid.into(),
            device: dev_name.clone(),
            reason,
        };
        let file = blockdev::open(device, true).map_err(io_err(vid, "opening", device))?;
        let disk = FileDisk::new(file, dev_name.clone());
        let job = FirstUse {
            vid,
            disk: &disk,
            key,
            key_id,
            auth,
        };
        let limits = KdfLimits::default();
        let recorded = self.records.is_recorded(vid);
        // An interrupted format of our own on this host may be redone: our
        // record says it started here, and no marker says it finished.
        let redo_ours = recorded && !self.is_formatted(vid, key_id, auth).await?;
        // Only a format needs these: a spec that a format cannot use must
        // not stop an existing header from opening.
        let options = || self.format_options(vid, &disk, provider, spec, key, key_id);
        let opened = match Header::read(&disk) {
            Ok(h) => match h.unlock(&disk, &passphrase, None, &limits) {
                Ok(u) => {
                    self.heal_marker(vid, key_id, auth).await?;
                    (h, u.volume_key, false)
                }
                Err(LuksError::WrongPassphrase { .. }) if redo_ours => {
                    let (h, k) = self.redo(&job, options()?).await?;
                    (h, k, true)
                }
                Err(e @ LuksError::WrongPassphrase { .. }) => {
                    let Ok(opts) = options() else {
                        return Err(luks_err(e));
                    };
                    let (h, k) = self
                        .format_redone_elsewhere(&job, opts, luks_err(e))
                        .await?;
                    (h, k, true)
                }
                Err(e) => return Err(luks_err(e)),
            },
            Err(LuksError::NotLuks { .. }) => {
                if self.is_formatted(vid, key_id, auth).await? {
                    return Err(refused(format!(
                        "no LUKS header, but the key manager records key {key_id} as formatted: the header was destroyed or the device is not the volume"
                    )));
                }
                let seen = Inspection::of(&disk).map_err(io_err(vid, "probing", device))?;
                let opts = options()?;
                let (h, k) = if redo_ours {
                    self.redo(&job, opts).await?
                } else {
                    match self.redo_elsewhere(&job, &opts).await? {
                        Redo::Allowed(intent) => self.format(&job, opts, intent).await?,
                        Redo::Refused(reason) => return Err(refused(reason)),
                        Redo::NoIntent if seen.is_blank() => {
                            self.format(&job, opts, FormatIntent::new_here()).await?
                        }
                        Redo::NoIntent => {
                            return Err(refused(format!(
                                "the device is not blank: {}",
                                seen.describe()
                            )));
                        }
                    }
                };
                (h, k, true)
            }
            Err(
                e @ (LuksError::InvalidHeader { .. }
                | LuksError::Unsupported { .. }
                | LuksError::TooSmall { .. }),
            ) => {
                let opts = match options() {
                    Ok(o) => o,
                    Err(_) if !redo_ours => return Err(luks_err(e)),
                    Err(x) => return Err(x),
                };
                let (h, k) = if redo_ours {
                    self.redo(&job, opts).await?
                } else {
                    self.format_redone_elsewhere(&job, opts, luks_err(e))
                        .await?
                };
                (h, k, true)
            }
            Err(e) => return Err(luks_err(e)),
        };
        Ok(opened)
    }

    /// Redoes an interrupted format recorded on this host. The UUID of a
    /// recorded intent is kept, so that whatever this attempt leaves still
    /// matches the intent any other host will read.
    async fn redo(
        &self,
        job: &FirstUse<'_>,
        opts: FormatOptions,
    ) -> Result<(Header, VolumeKey), VolumeError> {
        let mut intent = FormatIntent::new_here();
        if let Some(earlier) = self.intent(job).await? {
            intent.luks_uuid = earlier.luks_uuid;
        }
        self.format(job, opts, intent).await
    }

    /// Whether the key manager records the volume as formatted.
    async fn is_formatted(
        &self,
        vid: &str,
        key_id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<bool, VolumeError> {
        self.keys
            .is_marked_formatted(key_id, auth)
            .await
            .map_err(key_err(vid))
    }

    /// The format intent the key manager records for the volume's key.
    async fn intent(&self, job: &FirstUse<'_>) -> Result<Option<FormatIntent>, VolumeError> {
        self.keys
            .formatting_intent(job.key_id, job.auth)
            .await
            .map_err(key_err(job.vid))
    }

    /// Formats over what an interrupted format of another host left, when
    /// [`Self::redo_elsewhere`] allows it; otherwise its refusal, or
    /// `otherwise` when no intent applies.
    async fn format_redone_elsewhere(
        &self,
        job: &FirstUse<'_>,
        opts: FormatOptions,
        otherwise: VolumeError,
    ) -> Result<(Header, VolumeKey), VolumeError> {
        match self.redo_elsewhere(job, &opts).await? {
            Redo::Allowed(intent) => self.format(job, opts, intent).await,
            Redo::Refused(reason) => Err(VolumeError::FormatRefused {
                volume_id: job.vid.into(),
                device: job.disk.name().into(),
                reason,
            }),
            Redo::NoIntent => Err(otherwise),
        }
    }

    /// Whether an interrupted format recorded in the key manager (by any
    /// host) may be redone here without a local record: no marker says it
    /// finished, the intent is old enough that the format cannot still be
    /// running, and the device holds only what that format can have
    /// written (see [`Inspection::foreign_to_format`]).
    async fn redo_elsewhere(
        &self,
        job: &FirstUse<'_>,
        opts: &FormatOptions,
    ) -> Result<Redo, VolumeError> {
        let FirstUse {
            vid, disk, key_id, ..
        } = *job;
        let Some(intent) = self.intent(job).await? else {
            return Ok(Redo::NoIntent);
        };
        if self.is_formatted(vid, key_id, job.auth).await? {
            return Ok(Redo::NoIntent);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let min_age = self.opts.format_intent_min_age.as_secs();
        // A start time in the future (clock skew, or a hostile value) counts
        // as just now: waiting is always safe.
        let age = now.saturating_sub(intent.started_at);
        let started = rfc3339(intent.started_at);
        if age < min_age {
            return Ok(Redo::Refused(format!(
                "a format of key {key_id}'s volume started on host {} at {started} and may still be running; if it was interrupted, attach again after {} s, when it is {min_age} s old",
                intent.host,
                min_age - age
            )));
        }
        let seen = Inspection::of(disk).map_err(io_err(vid, "probing", Path::new(disk.name())))?;
        match seen
            .foreign_to_format(disk, &intent.luks_uuid, opts.data_offset())
            .map_err(io_err(vid, "probing", Path::new(disk.name())))?
        {
            Some(why) => Ok(Redo::Refused(format!(
                "key {key_id} records a format that started on host {} at {started} and did not finish, but it cannot be redone: {why}",
                intent.host
            ))),
            None => {
                tracing::warn!(
                    volume_id = vid,
                    device = disk.name(),
                    key_id = key_id.as_str(),
                    host = intent.host,
                    started = %started,
                    "redoing a first-use format that was interrupted"
                );
                Ok(Redo::Allowed(FormatIntent {
                    luks_uuid: intent.luks_uuid,
                    ..FormatIntent::new_here()
                }))
            }
        }
    }

    pub(super) async fn heal_marker(
        &self,
        vid: &str,
        key_id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<(), VolumeError> {
        if !self.is_formatted(vid, key_id, auth).await? {
            self.keys
                .mark_formatted(key_id, auth)
                .await
                .map_err(key_err(vid))?;
        }
        self.records
            .clear(vid)
            .map_err(io_err(vid, "clearing format record for", Path::new(vid)))
    }

    /// The options a first-use format of this volume uses (its LUKS UUID
    /// comes from the intent, see `format`).
    fn format_options(
        &self,
        vid: &str,
        disk: &FileDisk,
        provider: Provider,
        spec: &EncryptionSpec,
        key: &crate::keymgr::Key,
        key_id: &KeyId,
    ) -> Result<FormatOptions, VolumeError> {
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
        Ok(FormatOptions {
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
        })
    }

    /// Formats: the local record, then the intent with the LUKS UUID the
    /// header will carry, both durable before the first byte goes to the
    /// device; then the format; then the marker, and the record dropped.
    async fn format(
        &self,
        job: &FirstUse<'_>,
        mut opts: FormatOptions,
        intent: FormatIntent,
    ) -> Result<(Header, VolumeKey), VolumeError> {
        let FirstUse {
            vid,
            disk,
            key,
            key_id,
            auth,
        } = *job;
        let dev = disk.name().to_string();
        opts.uuid = Some(intent.luks_uuid);
        self.records.record(vid, &dev).map_err(io_err(
            vid,
            "recording format of",
            Path::new(&dev),
        ))?;
        self.keys
            .mark_formatting(key_id, auth, &intent)
            .await
            .map_err(key_err(vid))?;
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
        let key_id = KeyId::new(key_id).map_err(key_err(vid))?;
        let key = self.keys.fetch(&key_id, auth).await.map_err(key_err(vid))?;
        Ok((key_id, key))
    }
}

#[cfg(test)]
#[path = "first_use_tests.rs"]
mod tests;

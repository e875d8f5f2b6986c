//! The first-use decision of an attach, shared by the dm-crypt and the
//! QEMU-native paths: fetch the volume's key, then open its LUKS header,
//! or format the device when the guard allows it (the state machine is
//! documented in `guard.rs`), and keep the key manager's "formatted"
//! marker and the local format record in step.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::guard::{self, Decision, Inspection, IntentSeen};
use super::{EncryptionSpec, Failure, FileOp, Provider, Volumes, io_err};
use crate::blockdev::{self, Accept};
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
/// needs to read the device, ask the key manager and keep its records.
struct FirstUse<'a> {
    vid: &'a str,
    disk: &'a FileDisk,
    key: &'a crate::keymgr::Key,
    key_id: &'a KeyId,
    auth: &'a RequestAuth,
}

impl Volumes<'_> {
    /// Opens the volume's LUKS header with its key, or formats the device
    /// on first use when the guard allows it (the state machine is in
    /// `guard.rs`). Returns the header, the volume key and whether this
    /// call formatted. Shared by the dm-crypt and the QEMU-native attach,
    /// so both refuse and format under exactly the same rules. `device`
    /// has passed [`blockdev::check_device`].
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
    ) -> Result<(Header, VolumeKey, bool), Failure> {
        let passphrase = key.passphrase();
        let dev_name = blockdev::device::shown(device);
        let refused = |reason: String| Failure::FormatRefused {
            device: dev_name.clone(),
            reason,
        };
        // Libvirt mode takes image files (NFS-backed volumes); dm mode has
        // refused anything but a block device before the key was fetched.
        let file = self.open_device(device, true, Accept::BlockOrFile)?;
        let disk = FileDisk::new(file, dev_name.clone());
        let job = FirstUse {
            vid,
            disk: &disk,
            key,
            key_id,
            auth,
        };
        let limits = KdfLimits::default();
        // Why the header did not open: `None` when there is none at all.
        let not_opened = match Header::read(&disk) {
            Ok(h) => match h.unlock(&disk, &passphrase, None, &limits) {
                Ok(u) => {
                    self.heal_marker(vid, key_id, auth).await?;
                    return Ok((h, u.volume_key, false));
                }
                Err(e @ LuksError::WrongPassphrase { .. }) => Some(Failure::from(e)),
                Err(e) => return Err(e.into()),
            },
            Err(LuksError::NotLuks { .. }) => None,
            Err(
                e @ (LuksError::InvalidHeader { .. }
                | LuksError::Unsupported { .. }
                | LuksError::TooSmall { .. }),
            ) => Some(Failure::from(e)),
            Err(e) => return Err(e.into()),
        };
        if self.is_formatted(key_id, auth).await? {
            return Err(not_opened.unwrap_or_else(|| {
                refused(format!(
                    "no LUKS header, but the key manager records key {key_id} as formatted: the header was destroyed or the device is not the volume"
                ))
            }));
        }
        // Only a format needs these: a spec that a format cannot use must
        // not hide why an existing header did not open.
        let opts = match self.format_options(&disk, provider, spec, key, key_id) {
            Ok(o) => o,
            Err(e) => return Err(not_opened.unwrap_or(e)),
        };
        let probing = |e| io_err(FileOp::Probing, device)(e);
        let seen = Inspection::of(&disk).map_err(probing)?;
        let intent = self.intent_seen(&job).await?;
        let record = self.records.read(vid);
        let decision = guard::decide(
            &seen,
            &disk,
            intent.as_ref(),
            record.as_ref(),
            self.opts.format_intent_min_age.as_secs(),
            opts.data_offset(),
        )
        .map_err(probing)?;
        let uuid = match decision {
            Decision::FormatNew => None,
            Decision::Redo(uuid) => {
                if !seen.is_blank() || intent.is_some() {
                    tracing::warn!(
                        volume_id = vid,
                        device = disk.name(),
                        key_id = key_id.as_str(),
                        luks_uuid = %uuid,
                        "redoing a first-use format that was interrupted"
                    );
                }
                Some(uuid)
            }
            Decision::Refuse(reason) => return Err(refused(reason)),
            Decision::NotBlank => {
                return Err(not_opened.unwrap_or_else(|| {
                    refused(format!("the device is not blank: {}", seen.describe()))
                }));
            }
        };
        let (h, k) = self.format(&job, opts, uuid).await?;
        Ok((h, k, true))
    }

    /// Whether the key manager records the volume as formatted.
    async fn is_formatted(&self, key_id: &KeyId, auth: &RequestAuth) -> Result<bool, Failure> {
        Ok(self.keys.is_marked_formatted(key_id, auth).await?)
    }

    /// The format intent the key manager records for the volume's key, as
    /// the guard weighs it.
    async fn intent_seen(&self, job: &FirstUse<'_>) -> Result<Option<IntentSeen>, Failure> {
        let Some(intent) = self.keys.formatting_intent(job.key_id, job.auth).await? else {
            return Ok(None);
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let min_age = self.opts.format_intent_min_age.as_secs();
        // A start time in the future (clock skew, or a hostile value) counts
        // as just now: waiting is always safe.
        let age = now.saturating_sub(intent.started_at);
        let started = rfc3339(intent.started_at);
        let key_id = job.key_id;
        Ok(Some(IntentSeen {
            luks_uuid: intent.luks_uuid,
            age_secs: age,
            too_young: format!(
                "a format of key {key_id}'s volume started on host {} at {started} and may still be running; if it was interrupted, attach again after {} s, when it is {min_age} s old",
                intent.host,
                min_age.saturating_sub(age)
            ),
            context: format!(
                "key {key_id} records a format that started on host {} at {started} and did not finish, but it cannot be redone",
                intent.host
            ),
        }))
    }

    pub(super) async fn heal_marker(
        &self,
        vid: &str,
        key_id: &KeyId,
        auth: &RequestAuth,
    ) -> Result<(), Failure> {
        if !self.is_formatted(key_id, auth).await? {
            self.keys.mark_formatted(key_id, auth).await?;
        }
        self.records.clear(vid).map_err(io_err(
            FileOp::ClearingFormatRecord,
            &self.records.path(vid),
        ))
    }

    /// The options a first-use format of this volume uses (its LUKS UUID
    /// comes from the intent, see `format`).
    fn format_options(
        &self,
        disk: &FileDisk,
        provider: Provider,
        spec: &EncryptionSpec,
        key: &crate::keymgr::Key,
        key_id: &KeyId,
    ) -> Result<FormatOptions, Failure> {
        let bits = spec.key_bits()?;
        let cipher =
            CipherSpec::parse(spec.cipher(), bits / 8).map_err(|e| Failure::Unsupported {
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

    /// Formats: the format worked out and checked against the device
    /// (size, parameters) first; then the local record and the intent,
    /// both carrying the LUKS UUID the header will carry and both durable
    /// before the first byte goes to the device; then the writes; then the
    /// marker, and the record dropped. `uuid` is that of the interrupted
    /// format being redone, `None` for a first format. An attempt that
    /// fails before its first write takes back what it recorded, so that
    /// it blocks no later attach.
    async fn format(
        &self,
        job: &FirstUse<'_>,
        mut opts: FormatOptions,
        uuid: Option<uuid::Uuid>,
    ) -> Result<(Header, VolumeKey), Failure> {
        let FirstUse {
            vid,
            disk,
            key,
            key_id,
            auth,
        } = *job;
        let dev = disk.name().to_string();
        let mut intent = FormatIntent::new_here();
        if let Some(u) = uuid {
            intent.luks_uuid = u;
        }
        opts.uuid = Some(intent.luks_uuid);
        let passphrase = key.passphrase();
        let plan = luks::plan_format(disk, &opts, &passphrase)?;
        let recorded_before = self.records.read(vid);
        self.records
            .record(vid, &dev, &intent.luks_uuid)
            .map_err(io_err(FileOp::RecordingFormat, &self.records.path(vid)))?;
        if let Err(e) = self.keys.mark_formatting(key_id, auth, &intent).await {
            let rollback = self
                .take_back(job, &intent, uuid.is_none(), recorded_before)
                .await;
            return Err(Failure::with_rollback(e.into(), rollback));
        }
        let (header, vk) = plan.write(disk, &passphrase)?;
        tracing::info!(volume_id = vid, device = dev, "formatted on first use");
        self.heal_marker(vid, key_id, auth).await?;
        Ok((header, vk))
    }

    /// Takes back what a format attempt recorded when it failed before its
    /// first write: the local record (unless an earlier one of this host
    /// names the same UUID, which still accounts for an earlier attempt),
    /// and, for a first format, the intent if it was stored and is still
    /// this one. A redo's intent stays: it carries the UUID of the
    /// interrupted format whose leftovers may be on the device.
    async fn take_back(
        &self,
        job: &FirstUse<'_>,
        intent: &FormatIntent,
        first: bool,
        recorded_before: Option<guard::FormatRecord>,
    ) -> Result<(), Failure> {
        let vid = job.vid;
        let keep_record = recorded_before.is_some_and(|r| r.luks_uuid == Some(intent.luks_uuid));
        let record = if keep_record {
            Ok(())
        } else {
            self.records.clear(vid).map_err(io_err(
                FileOp::RemovingFormatRecord,
                &self.records.path(vid),
            ))
        };
        if first {
            self.keys
                .withdraw_formatting(job.key_id, job.auth, intent)
                .await?;
        }
        record
    }

    /// Fetches the volume's key.
    pub(super) async fn fetch_key(
        &self,
        key_id: &str,
        auth: &RequestAuth,
    ) -> Result<(KeyId, crate::keymgr::Key), Failure> {
        let key_id = KeyId::new(key_id)?;
        let key = self.keys.fetch(&key_id, auth).await?;
        Ok((key_id, key))
    }
}

#[cfg(test)]
#[path = "first_use_tests.rs"]
mod tests;

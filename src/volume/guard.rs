//! The first-use format guard: when a volume without a LUKS header that
//! opens may be formatted, and the records that keep an interrupted format
//! recoverable.
//!
//! os-brick formats whenever `cryptsetup isLuks` fails, which also happens
//! when a degraded backend transiently reads zeros over a volume that holds
//! data. The device behind a volume id can also change between two
//! attaches (another path, a reused LUN, a multipath mix-up). So every
//! format, first or redo, on this host or another, requires the device to
//! prove, at that moment, that it holds nothing but what a format of ours
//! can have written; no record, intent or earlier check stands in for that
//! ([`decide`]):
//!
//! 1. the device is a block device (or, in libvirt mode, an image file),
//!    opened exclusively, large enough for the header (checked before
//!    anything is recorded, see `first_use.rs`);
//! 2. the key manager holds no "formatted" marker for the volume's key;
//! 3. the device is blank (no LUKS header at any allowed offset, no other
//!    known signature, zeros where signatures live), or it holds only what
//!    an interrupted format with the recorded UUID can have left
//!    ([`Inspection::foreign_to_format`]): LUKS headers, valid or torn,
//!    carrying that UUID, no other signature, nothing in the first sector
//!    but such a header, zeros at the start of the data segment and at the
//!    end of the device;
//! 4. a format intent in the key manager younger than the safety age
//!    (`[volume] format_intent_min_age_secs`) is not raced: that format may
//!    still be running on another host. The one exception is this host's
//!    own interrupted format: its local record names the intent's UUID, and
//!    the volume lock rules out a second format here.
//!
//! State machine of one format (each arrow is a durable write):
//!
//! ```text
//!  Checked (device usable, format planned in memory: nothing written)
//!        --local record (device, LUKS UUID)--> Recorded
//!        --intent (LUKS UUID, time, host) in key manager--> Intended
//!        --zeros, keyslots, then header carrying that UUID--> Formatted
//!        --marker in key manager--> Marked --drop local record--> Done
//! ```
//!
//! The intent stays after `Done`: the marker outranks it, and it is the
//! record of which host formatted the volume and when.
//!
//! * Failure in `Checked` (too small, bad parameters): nothing recorded.
//! * Failure writing the intent: the attempt takes back its local record
//!   and, for a first format, the intent if it got stored: nothing of it
//!   holds off a later attach.
//! * Crash in `Recorded`: nothing was written to the device. The record's
//!   UUID has no intent to match, so it grants nothing: the next attach,
//!   here or elsewhere, sees a blank device and formats as on first use.
//! * Crash in `Intended` (nothing written yet, zeros, partial keyslot
//!   area, torn or missing header): no valid header that opens, no marker.
//!   - This host (record and intent name the same UUID) redoes the format
//!     at once, keeping the UUID, if the device passes check 3 with it.
//!   - Another host (the volume was evacuated) redoes it only once the
//!     intent is at least the safety age old, and only if the device passes
//!     check 3; the refusal says on which host and since when.
//!   - Anything the device holds that check 3 cannot account for is
//!     refused and named: nothing formats over bytes it cannot explain.
//! * Crash in `Formatted` or `Marked`: the header opens; attach proceeds,
//!   sets the marker if it is missing and drops the record.
//! * After `Done`, a missing header with the marker present is refused:
//!   the volume held data and something destroyed its header. An intent,
//!   however old, changes nothing once the marker is there.
//! * Killed while mapping (after `Done`): the next attach finishes or
//!   redoes the mapping (see `Volumes::settle_existing`); the header is
//!   only read.
//!
//! Key managers without a per-volume place for the intent (nova's fixed
//! key, shared by every legacy volume) keep none: for those volumes this
//! host's record alone can account for a torn header of its own, under
//! check 3 as always. Where Barbican's policy refuses secret metadata, the
//! intent and the marker are kept in the local state directory, with the
//! same effect.
//!
//! `tests/vm/kill_format.sh` proves this with real dm-crypt: SIGKILL on
//! entry to each state-changing system call of a first-use attach and of
//! a normal one, and after increasing delays, then attach again; for some
//! kills during the format writes also without the local record, as on
//! another host. `tests/vm/power_loss.sh` replays every crash state a
//! power cut can leave during a format (dm-log-writes: unflushed writes
//! lost or torn, the key manager's state of that moment) and attaches
//! again. `tests/vm/format_guard.sh` and `tests/hostile_input.rs`
//! attach a volume whose first attempt failed on a device that holds data.

use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::blockdev::probe::{self, Signature, SignatureKind};
use crate::luks::Disk;
use crate::state_file::{self, Durability};

/// Bytes at the start of the data segment that must read as zeros before
/// an interrupted format is redone on the strength of a format intent: a
/// volume that was ever opened and written shows ciphertext there (a file
/// system writes its first blocks there, and encrypted zeros are not zeros).
pub const DATA_HEAD_CHECK: u64 = 1 << 20;
/// Bytes at the end of the device that must read as zeros for the same
/// redo, as the blank check saw them before the first format.
const TAIL_CHECK: u64 = 64 * 1024;
/// Offset and length of the UUID field in LUKS1 and LUKS2 binary headers
/// alike (NUL-terminated ASCII).
const UUID_FIELD: (u64, usize) = (168, 40);

/// The raw UUID field of a LUKS header at `offset`, whether or not the
/// header is valid; `None` when it is not ASCII text or lies (in part)
/// beyond the end of the device, as in a magic near the end of a small one.
pub fn raw_header_uuid(disk: &dyn Disk, offset: u64) -> std::io::Result<Option<String>> {
    let mut buf = [0u8; UUID_FIELD.1];
    let at = offset.saturating_add(UUID_FIELD.0);
    if at.saturating_add(UUID_FIELD.1 as u64) > disk.size()? {
        return Ok(None);
    }
    disk.read_at(&mut buf, at)?;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = &buf[..len];
    if text.is_empty() || !text.iter().all(|b| b.is_ascii_graphic()) {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(text).into_owned()))
}

/// The offset of the first non-zero byte in `start..end`.
fn first_non_zero(disk: &dyn Disk, start: u64, end: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = start;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], at)?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

/// A local record of a format this host started and has not finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatRecord {
    /// The device the format was started on (for logs).
    pub device: String,
    /// The LUKS UUID that format writes into the header; `None` in a
    /// record written by an older version, which proves nothing.
    pub luks_uuid: Option<Uuid>,
}

/// Records of formats in progress, under `<state_dir>/formatting/`.
#[derive(Clone, Debug)]
pub struct FormatRecords {
    dir: PathBuf,
}

impl FormatRecords {
    /// Records under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        FormatRecords {
            dir: state_dir.join("formatting"),
        }
    }

    /// The record file of `volume_id`.
    pub fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(volume_id)
    }

    /// The record of a format of `volume_id` that was started here and
    /// not finished, if any. A record that cannot be read counts as none:
    /// a record only ever lets a redo skip the intent's age, never the
    /// device checks.
    pub fn read(&self, volume_id: &str) -> Option<FormatRecord> {
        let text = fs::read_to_string(self.path(volume_id)).ok()?;
        let mut lines = text.lines();
        let device = lines.next()?.to_string();
        let luks_uuid = lines.next().and_then(|u| Uuid::try_parse(u).ok());
        Some(FormatRecord { device, luks_uuid })
    }

    /// Durably records that a format of `volume_id` on `device`, writing a
    /// header with `luks_uuid`, begins.
    pub fn record(&self, volume_id: &str, device: &str, luks_uuid: &Uuid) -> std::io::Result<()> {
        let line = format!("{device}\n{}\n", luks_uuid.hyphenated());
        state_file::replace(
            &self.path(volume_id),
            line.as_bytes(),
            Durability::PowerLoss,
        )
    }

    /// Drops the record after the format is complete and marked, or when
    /// the attempt failed before its first write.
    ///
    /// The directory is synced only when a record was removed. Every
    /// attach of an existing volume comes here, almost always with no
    /// record, and a directory fsync can cost a device cache flush. With
    /// no record there is nothing to make durable: the one case is a
    /// record removed by an earlier run that died before its sync, which
    /// may reappear after a power loss. That is harmless: a record never
    /// lets a format skip the device checks, and with the marker present
    /// a recorded format is never redone.
    pub fn clear(&self, volume_id: &str) -> std::io::Result<()> {
        match fs::remove_file(self.path(volume_id)) {
            Ok(()) => state_file::sync_dir(&self.dir).or(Ok(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// What the guard decides about a device whose header does not open with
/// the volume's key, when no "formatted" marker exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The device is blank and nothing was started: a first format with a
    /// fresh UUID.
    FormatNew,
    /// The device holds nothing but what an interrupted format with this
    /// UUID can have written (or nothing at all): format again, keeping
    /// the UUID, so that whatever this attempt leaves still matches.
    Redo(Uuid),
    /// Formatting is refused; the reason names what was found.
    Refuse(String),
    /// No intent and no record apply and the device is not blank: the
    /// caller reports why its header did not open (a wrong key, a damaged
    /// header), or that the device is not blank.
    NotBlank,
}

/// A format intent as the guard weighs it.
#[derive(Clone, Debug)]
pub struct IntentSeen {
    /// The UUID the interrupted format writes.
    pub luks_uuid: Uuid,
    /// How old the intent is, in seconds (0 for one from the future).
    pub age_secs: u64,
    /// The refusal text for an intent too young to redo (it names the
    /// host and the time it started).
    pub too_young: String,
    /// The text that introduces a refusal to redo it.
    pub context: String,
}

/// The guard's decision, from what the device holds (`seen`), the key
/// manager's intent, this host's local record, and the safety age. Every
/// path that formats requires the device to prove it holds nothing else:
/// blank, or only what an interrupted format with the chosen UUID can
/// have written ([`Inspection::foreign_to_format`]). A local record never
/// skips that; it only lets this host redo its own interrupted format
/// (same UUID as the intent) without waiting for the intent's age.
pub fn decide(
    seen: &Inspection,
    disk: &dyn Disk,
    intent: Option<&IntentSeen>,
    record: Option<&FormatRecord>,
    min_age_secs: u64,
    data_offset: u64,
) -> std::io::Result<Decision> {
    if let Some(intent) = intent {
        let ours = record.and_then(|r| r.luks_uuid) == Some(intent.luks_uuid);
        if !ours && intent.age_secs < min_age_secs {
            return Ok(Decision::Refuse(intent.too_young.clone()));
        }
        return Ok(
            match seen.foreign_to_format(disk, &intent.luks_uuid, data_offset)? {
                None => Decision::Redo(intent.luks_uuid),
                Some(why) => Decision::Refuse(format!("{}: {why}", intent.context)),
            },
        );
    }
    if seen.is_blank() {
        return Ok(Decision::FormatNew);
    }
    // No intent (a key manager without a place for one, or this host was
    // cut before writing it): this host's own record may still account
    // for what is on the device.
    if let Some(uuid) = record.and_then(|r| r.luks_uuid)
        && seen.foreign_to_format(disk, &uuid, data_offset)?.is_none()
    {
        return Ok(Decision::Redo(uuid));
    }
    Ok(Decision::NotBlank)
}

/// What the device looks like to the guard.
#[derive(Debug)]
pub struct Inspection {
    /// Every signature found.
    pub signatures: Vec<Signature>,
}

impl Inspection {
    /// Probes `disk`.
    pub fn of(disk: &dyn Disk) -> std::io::Result<Inspection> {
        Ok(Inspection {
            signatures: probe::probe(disk)?,
        })
    }

    /// True when nothing at all was found.
    pub fn is_blank(&self) -> bool {
        probe::is_blank(&self.signatures)
    }

    /// Why the device holds something else than what an interrupted
    /// first-use format of ours can have left; `None` when it holds only
    /// that. Our format writes nothing but the `data_offset` bytes before
    /// the data segment (zeros, keyslot material, then the headers), each
    /// header carrying `uuid`. So: every LUKS header magic found, valid or
    /// torn, must carry `uuid` in its raw UUID field (the checksum is not
    /// consulted: a torn header fails it); no other signature may be
    /// found; and the first [`DATA_HEAD_CHECK`] bytes of the data segment
    /// and the last 64 KiB of the device must read as zeros, as the guard
    /// saw them before that format began. Unknown bytes inside the header
    /// area are ours (keyslot material).
    pub fn foreign_to_format(
        &self,
        disk: &dyn Disk,
        uuid: &Uuid,
        data_offset: u64,
    ) -> std::io::Result<Option<String>> {
        for s in &self.signatures {
            let header = match s.kind {
                SignatureKind::Luks1 | SignatureKind::Luks2Primary => s.offset == 0,
                SignatureKind::Luks2Secondary => s.offset < data_offset,
                SignatureKind::NonZeroHead => {
                    // Only the first non-zero byte is reported; what lies
                    // past the header area is checked below. In the first
                    // sector, where the header begins, our format writes
                    // nothing but the header itself (a write tears at
                    // sector boundaries, and the magic and UUID lie in
                    // that sector): bytes there without a LUKS magic are
                    // someone else's.
                    let header_at_start = self.signatures.iter().any(|h| {
                        h.offset == 0
                            && matches!(h.kind, SignatureKind::Luks1 | SignatureKind::Luks2Primary)
                    });
                    if s.offset < data_offset && (s.offset >= 512 || header_at_start) {
                        continue;
                    }
                    false
                }
                _ => false,
            };
            if !header {
                return Ok(Some(format!(
                    "besides what the interrupted format wrote, the device holds {} at offset {}",
                    s.what, s.offset
                )));
            }
            let found = raw_header_uuid(disk, s.offset)?;
            if found.as_deref().and_then(|f| Uuid::try_parse(f).ok()) != Some(*uuid) {
                return Ok(Some(format!(
                    "the {} at offset {} carries UUID {}, not {} of the interrupted format",
                    s.what,
                    s.offset,
                    found.as_deref().unwrap_or("(none)"),
                    uuid.hyphenated()
                )));
            }
        }
        let size = disk.size()?;
        let tail = size.saturating_sub(TAIL_CHECK).max(data_offset);
        let regions = [
            (data_offset, data_offset.saturating_add(DATA_HEAD_CHECK)),
            (tail, size),
        ];
        for (start, end) in regions {
            if let Some(at) = first_non_zero(disk, start, end.min(size))? {
                return Ok(Some(format!(
                    "non-zero data at offset {at}, past the {data_offset} bytes the interrupted format could write"
                )));
            }
        }
        Ok(None)
    }

    /// A short description of what was found, for refusals.
    pub fn describe(&self) -> String {
        self.signatures
            .iter()
            .map(|s| format!("{} at offset {}", s.what, s.offset))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks::MemDisk;

    /// A LUKS magic whose UUID field would lie past the end of the device
    /// is a refusal that names it, not a read error.
    #[test]
    fn a_magic_near_the_end_of_a_small_device_is_refused_not_an_error() {
        let uuid = Uuid::from_u128(7);
        for size in [6usize, 200, 16384 + 100] {
            let mut bytes = vec![0u8; size];
            let at = if size > 16384 { 16384 } else { 0 };
            let magic: &[u8] = if at == 0 {
                b"LUKS\xba\xbe"
            } else {
                b"SKUL\xba\xbe"
            };
            bytes[at..at + 6].copy_from_slice(magic);
            let disk = MemDisk::new("small", bytes);
            let inspection = Inspection::of(&disk).unwrap();
            assert!(!inspection.is_blank(), "{size}: {}", inspection.describe());
            let why = inspection
                .foreign_to_format(&disk, &uuid, 1 << 20)
                .unwrap_or_else(|e| panic!("{size}: {e}"))
                .unwrap_or_else(|| panic!("{size}: redo allowed"));
            assert!(why.contains("carries UUID (none)"), "{size}: {why}");
        }
    }
}

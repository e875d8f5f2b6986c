//! The first-use format guard: when a volume without a LUKS header may be
//! formatted, and the records that keep an interrupted format recoverable.
//!
//! os-brick formats whenever `cryptsetup isLuks` fails, which also happens
//! when a degraded backend transiently reads zeros over a volume that holds
//! data. We format only when every check passes:
//!
//! 1. no LUKS header, primary or secondary at any allowed offset;
//! 2. no other known signature (filesystems, swap, LVM, MD, bcache,
//!    partition tables including the GPT backup at the end), and zero
//!    bytes where our own format would write first and where data starts;
//! 3. the key manager holds no "formatted" marker for the volume's key;
//! 4. the key manager holds no format intent younger than the safety age
//!    (`[volume] format_intent_min_age_secs`): a format that another host
//!    may still be running is not raced.
//!
//! The one exception is the redo of an interrupted format of ours, below.
//!
//! State machine of one format (each arrow is a durable write):
//!
//! ```text
//!  Blank --local record "formatting"--> Recorded
//!        --intent (LUKS UUID, time, host) in key manager--> Intended
//!        --zeros, keyslots, then header carrying that UUID--> Formatted
//!        --marker in key manager--> Marked --drop local record--> Done
//! ```
//!
//! The intent stays after `Done`: the marker outranks it, and it is the
//! record of which host formatted the volume and when.
//!
//! * Crash in `Recorded`: nothing was written to the device. The same host
//!   finds its record and formats; another host finds a blank device and
//!   no intent (or an older one, see below) and formats as on first use.
//! * Crash in `Intended` (nothing written yet, zeros, partial keyslot
//!   area, torn or missing header): no valid header, or one that no
//!   keyslot opens, and no marker. Nothing was ever attached, so no data
//!   can exist.
//!   - The same host finds its record and formats again, keeping the
//!     intent's UUID, so that a crash of the redo leaves the same picture.
//!   - Another host (the volume was evacuated) has no record. It redoes the
//!     format only when the intent is at least the safety age old (a
//!     format takes milliseconds to seconds; a younger intent may belong to
//!     a format still running, and the refusal says on which host and
//!     since when), and the device holds only what that format can have
//!     written ([`Inspection::foreign_to_format`]): every LUKS header
//!     magic, valid or torn, carries the intent's UUID; no other
//!     signature; zeros at the start of the data segment and at the end of
//!     the device. Anything else is refused and named: it never formats
//!     over bytes it cannot account for. The device checks are a second
//!     line: the marker is durable in the key manager before an attach
//!     hands out the device, so data can only exist where the marker does
//!     (where policy keeps marker and intent local, no other host sees
//!     either).
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
//! key, shared by every legacy volume) keep none: those volumes get only
//! the same-host redo. Where Barbican's policy refuses secret metadata,
//! the intent and the marker are kept in the local state directory, with
//! the same effect.
//!
//! `tests/vm/kill_format.sh` proves this with real dm-crypt: SIGKILL on
//! entry to each state-changing system call of a first-use attach and of
//! a normal one, and after increasing delays, then attach again; for some
//! kills during the format writes also without the local record, as on
//! another host.

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

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(volume_id)
    }

    /// Whether a format of `volume_id` was started and not finished.
    pub fn is_recorded(&self, volume_id: &str) -> bool {
        self.path(volume_id).exists()
    }

    /// Durably records that a format of `volume_id` on `device` begins.
    pub fn record(&self, volume_id: &str, device: &str) -> std::io::Result<()> {
        let line = format!("{device}\n");
        state_file::replace(
            &self.path(volume_id),
            line.as_bytes(),
            Durability::PowerLoss,
        )
    }

    /// Drops the record after the format is complete and marked.
    ///
    /// The directory is synced only when a record was removed. Every
    /// attach of an existing volume comes here, almost always with no
    /// record, and a directory fsync can cost a device cache flush. With
    /// no record there is nothing to make durable: the one case is a
    /// record removed by an earlier run that died before its sync, which
    /// may reappear after a power loss. That is harmless, because the
    /// marker is durable before any record is dropped: a header that
    /// opens drops the record again, and with the marker present a
    /// recorded format is never redone.
    pub fn clear(&self, volume_id: &str) -> std::io::Result<()> {
        match fs::remove_file(self.path(volume_id)) {
            Ok(()) => state_file::sync_dir(&self.dir).or(Ok(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
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
                    // past the header area is checked below.
                    if s.offset < data_offset {
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

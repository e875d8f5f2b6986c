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
//! 3. the key manager holds no "formatted" marker for the volume's key.
//!
//! State machine of one format (each arrow is a durable write):
//!
//! ```text
//!  Blank --record "formatting"--> Recorded --keyslots, then header--> Formatted
//!        --marker in key manager--> Marked --drop record--> Done
//! ```
//!
//! * Crash in `Recorded` (partial keyslot area, torn or missing header): the
//!   next attach finds no valid header, or one that no keyslot opens, plus
//!   our "formatting" record and no marker. Nothing was ever attached, so
//!   no data can exist: it formats again. Without the record (another
//!   host) it refuses and says why; it never formats over bytes it cannot
//!   account for.
//! * Crash in `Formatted` or `Marked`: the header opens; attach proceeds,
//!   sets the marker if it is missing and drops the record.
//! * After `Done`, a missing header with the marker present is refused:
//!   the volume held data and something destroyed its header.
//! * Killed while mapping (after `Done`): the next attach finishes or
//!   redoes the mapping (see `Volumes::settle_existing`); the header is
//!   only read.
//!
//! `tests/vm/kill_format.sh` proves this with real dm-crypt: SIGKILL on
//! entry to each state-changing system call of a first-use attach and of
//! a normal one, and after increasing delays, then attach again.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::blockdev::probe::{self, Signature};
use crate::luks::Disk;

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
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.path(volume_id))?;
        writeln!(f, "{device}")?;
        f.sync_all()?;
        File::open(&self.dir)?.sync_all()
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
            Ok(()) => File::open(&self.dir).and_then(|d| d.sync_all()).or(Ok(())),
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

    /// A short description of what was found, for refusals.
    pub fn describe(&self) -> String {
        self.signatures
            .iter()
            .map(|s| format!("{} at offset {}", s.what, s.offset))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

//! Errors of the volume layer. A [`VolumeError`] names the volume once, at
//! the public entry points; below them every step fails with a
//! [`Failure`] that says what went wrong and on which device, mapping or
//! file. Each fact is in one place of the printed chain: a variant either
//! prints its source's text (`transparent`) or its own words with the
//! source as `#[source]`, never both.

use crate::blockdev::DeviceError;
use crate::dm::DmError;
use crate::keymgr::KeyError;
use crate::libvirt::LibvirtError;
use crate::luks::LuksError;

use super::SpecError;

/// A failed volume operation: the volume, and what failed. It prints as
/// `volume <id>: <failure>`, and its causes are the failure's, so that
/// both `{e}` and the chain read whole, each fact once.
#[derive(Debug)]
pub struct VolumeError {
    /// The volume as the request named it (escaped: a refused id may hold
    /// anything).
    pub volume_id: String,
    /// What failed.
    pub failure: Failure,
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "volume {}: {}", self.volume_id, self.failure)
    }
}

impl std::error::Error for VolumeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failure.source()
    }
}

impl VolumeError {
    /// `failure` of an operation on `volume_id`.
    pub fn new(volume_id: &str, failure: Failure) -> Self {
        VolumeError {
            volume_id: volume_id.escape_debug().to_string(),
            failure,
        }
    }

    /// Names `volume_id` on the failure of an operation (for `map_err` at
    /// the entry points).
    pub fn naming(volume_id: &str) -> impl FnOnce(Failure) -> VolumeError + '_ {
        move |failure| VolumeError::new(volume_id, failure)
    }
}

/// What failed in a volume operation.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The encryption metadata cannot be used.
    #[error(transparent)]
    Spec {
        /// What is wrong.
        #[from]
        source: SpecError,
    },
    /// The key could not be fetched.
    #[error("fetching its key")]
    Key {
        /// Why.
        #[from]
        source: KeyError,
    },
    /// The key manager did not keep the key for this attachment, and the
    /// configuration requires it (the attach was undone).
    #[error("keeping its key while attached")]
    KeyHold {
        /// Why.
        source: KeyError,
    },
    /// The LUKS header could not be read, unlocked or written (the source
    /// names the device).
    #[error(transparent)]
    Luks {
        /// Why.
        #[from]
        source: LuksError,
    },
    /// The first-use format was refused; nothing was written.
    #[error("refusing to format {device}: {reason}")]
    FormatRefused {
        /// Device.
        device: String,
        /// Which check failed.
        reason: String,
    },
    /// A device-mapper operation failed (the source names the mapping).
    #[error(transparent)]
    Dm {
        /// Why.
        #[from]
        source: DmError,
    },
    /// The device path does not name a usable device, or opening it
    /// failed; nothing was opened for writing or recorded.
    #[error(transparent)]
    Device {
        /// Why.
        #[from]
        source: DeviceError,
    },
    /// A file operation (lock, state, symlink, device) failed.
    #[error("{op} {path}")]
    Io {
        /// What we did.
        op: FileOp,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An operation failed and undoing it failed too. Both are shown with
    /// their whole chains (an error has one `source`; either alone would
    /// hide half of what happened).
    #[error(
        "{}; rollback also failed: {}",
        crate::text::error_chain(.cause.as_ref()),
        crate::text::error_chain(.rollback.as_ref())
    )]
    Rollback {
        /// The failure.
        cause: Box<Failure>,
        /// The rollback failure.
        rollback: Box<Failure>,
    },
    /// A libvirt operation (QEMU-native mode) failed.
    #[error(transparent)]
    Libvirt {
        /// Why.
        source: Box<LibvirtError>,
    },
    /// The volume is not attached (extend needs its mapping).
    #[error("not attached (no mapping {mapping})")]
    NotAttached {
        /// The mapping that is missing.
        mapping: String,
    },
    /// This operation is not supported for this volume.
    #[error("{what}")]
    Unsupported {
        /// What.
        what: String,
    },
}

impl Failure {
    /// A failure that is `cause`, or, when undoing it failed too, both.
    pub fn with_rollback(cause: Failure, rollback: Result<(), Failure>) -> Failure {
        match rollback {
            Ok(()) => cause,
            Err(r) => Failure::Rollback {
                cause: Box::new(cause),
                rollback: Box::new(r),
            },
        }
    }
}

impl From<LibvirtError> for Failure {
    fn from(source: LibvirtError) -> Self {
        Failure::Libvirt {
            source: Box::new(source),
        }
    }
}

/// A file operation of the volume layer, as an error names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// Making a state or run directory.
    CreatingDir,
    /// Opening a volume's lock file.
    OpeningLock,
    /// Taking a volume's lock.
    Locking,
    /// Resolving the device path.
    Resolving,
    /// Reading the device for signatures.
    Probing,
    /// Writing the local record of a format.
    RecordingFormat,
    /// Dropping the local record of a finished format.
    ClearingFormatRecord,
    /// Taking back the local record of a failed format.
    RemovingFormatRecord,
    /// Pointing the device path at the mapping.
    Repointing,
    /// Pointing the device path back.
    Restoring,
    /// Reading a device's metadata.
    Inspecting,
    /// Reading a device's size.
    Sizing,
    /// Writing a record.
    Writing,
    /// Removing a record.
    Removing,
}

impl std::fmt::Display for FileOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileOp::CreatingDir => "creating",
            FileOp::OpeningLock => "opening lock",
            FileOp::Locking => "locking",
            FileOp::Resolving => "resolving",
            FileOp::Probing => "probing",
            FileOp::RecordingFormat => "recording format of",
            FileOp::ClearingFormatRecord => "clearing format record for",
            FileOp::RemovingFormatRecord => "removing format record of",
            FileOp::Repointing => "repointing",
            FileOp::Restoring => "restoring",
            FileOp::Inspecting => "inspecting",
            FileOp::Sizing => "sizing",
            FileOp::Writing => "writing",
            FileOp::Removing => "removing",
        })
    }
}

/// `io::Error` -> [`Failure::Io`] naming `op` on `path`.
pub(crate) fn io_err(
    op: FileOp,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> Failure + use<> {
    let path = crate::blockdev::device::shown(path);
    move |source| Failure::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::DmError;

    /// Each fact once: the volume at the top, the device in the LUKS
    /// error's own text, the mapping in its variant.
    #[test]
    fn a_printed_chain_names_each_fact_once() {
        let luks = VolumeError::new(
            "v1",
            Failure::Luks {
                source: LuksError::TooSmall {
                    device: "/dev/loop7".into(),
                    what: "LUKS2 header".into(),
                    needed: 16 << 20,
                    size: 4096,
                },
            },
        );
        let text = crate::text::error_chain(&luks);
        assert_eq!(text.matches("v1").count(), 1, "{text}");
        assert_eq!(text.matches("/dev/loop7").count(), 1, "{text}");
        let dm = VolumeError::new(
            "v1",
            Failure::Rollback {
                cause: Box::new(Failure::NotAttached {
                    mapping: "crypt-a".into(),
                }),
                rollback: Box::new(Failure::Dm {
                    source: DmError::Busy {
                        name: "crypt-b".into(),
                        attempts: 3,
                    },
                }),
            },
        );
        let text = crate::text::error_chain(&dm);
        assert_eq!(text.matches("v1").count(), 1, "{text}");
        assert_eq!(text.matches("crypt-b").count(), 1, "{text}");
        assert!(
            text.contains("crypt-a") && text.contains("rollback also failed"),
            "{text}"
        );
        let spec = VolumeError::new("v\n1", Failure::Unsupported { what: "x".into() });
        assert_eq!(crate::text::error_chain(&spec), "volume v\\n1: x");
    }
}

//! Errors of the LUKS engine. Every variant names the device; none carries
//! key material.

use std::io;

use super::kdf::KdfError;

/// What went wrong while reading, unlocking or writing a LUKS header.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// Reading or writing the device failed.
    #[error("{device}: I/O error while {op}")]
    Io {
        /// Device path.
        device: String,
        /// What we were doing.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No LUKS magic at any header location.
    #[error("{device}: not a LUKS device (no valid LUKS header found)")]
    NotLuks {
        /// Device path.
        device: String,
    },
    /// The device ends before the header says it should.
    #[error("{device}: device is too small: {what} needs {needed} bytes, the device has {size}")]
    TooSmall {
        /// Device path.
        device: String,
        /// Which structure does not fit.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        size: u64,
    },
    /// A header that violates the on-disk specification.
    #[error("{device}: invalid LUKS{version} header: {reason}")]
    InvalidHeader {
        /// Device path.
        device: String,
        /// 1 or 2.
        version: u8,
        /// The field and the rule it breaks.
        reason: String,
    },
    /// A valid header using something this engine does not implement.
    #[error("{device}: unsupported LUKS feature: {what}")]
    Unsupported {
        /// Device path.
        device: String,
        /// The feature.
        what: String,
    },
    /// No keyslot opened with the passphrase.
    #[error("{device}: no keyslot matches the passphrase")]
    WrongPassphrase {
        /// Device path.
        device: String,
    },
    /// KDF parameters (of a keyslot or of the volume key digest) were
    /// refused before running.
    #[error("{device}: {what}")]
    Kdf {
        /// Device path.
        device: String,
        /// Which keyslot or digest.
        what: String,
        /// Why.
        #[source]
        source: KdfError,
    },
    /// An operation that would destroy data or lock the volume out.
    #[error("{device}: refused: {reason}")]
    Refused {
        /// Device path.
        device: String,
        /// What would have been lost.
        reason: String,
    },
    /// A request that cannot be satisfied as asked.
    #[error("{device}: invalid argument: {reason}")]
    InvalidArgument {
        /// Device path.
        device: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The OS random number generator failed.
    #[error("{device}: the system random number generator failed")]
    Random {
        /// Device path.
        device: String,
    },
}

/// Shorthand constructors that take the device name from a [`super::Disk`].
pub(crate) fn io_err(device: &str, op: impl Into<String>, source: io::Error) -> LuksError {
    LuksError::Io {
        device: device.to_string(),
        op: op.into(),
        source,
    }
}

pub(crate) fn invalid(device: &str, version: u8, reason: impl Into<String>) -> LuksError {
    LuksError::InvalidHeader {
        device: device.to_string(),
        version,
        reason: reason.into(),
    }
}

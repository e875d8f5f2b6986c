//! Every error code of the API, in one table: per code its name (the
//! stable snake_case string in answers), its HTTP status and the CLI's exit
//! code, so that a command exits the same way whether the agent or the
//! command itself did the work. Errors of the lower layers map to a code
//! by their variant, never by their message.

use crate::blockdev::DeviceError;
use crate::dm::DmError;
use crate::image::file::FileError;
use crate::image::{ImageError, ImageFailure};
use crate::keymgr::KeyError;
use crate::libvirt::LibvirtError;
use crate::luks::LuksError;
use crate::luks::kdf::KdfError;
use crate::volume::{Failure, VolumeError};

/// Success.
pub const EXIT_OK: u8 = 0;
/// Usage error or invalid argument.
pub const EXIT_USAGE: u8 = 1;
/// No keyslot matches the passphrase.
pub const EXIT_WRONG_PASSPHRASE: u8 = 2;
/// Out of memory.
pub const EXIT_NO_MEMORY: u8 = 3;
/// Device unusable: not LUKS, damaged or invalid header, I/O error,
/// unsupported feature, too small.
pub const EXIT_DEVICE: u8 = 4;
/// Refused: would destroy a header or data, last keyslot, no free keyslot.
pub const EXIT_REFUSED: u8 = 5;
/// The key manager has no such key.
pub const EXIT_KEY_NOT_FOUND: u8 = 6;
/// The key manager refused the credentials or access to the key.
pub const EXIT_KEY_ACCESS: u8 = 7;
/// The key manager is unavailable or timed out (after retries).
pub const EXIT_KEY_UNAVAILABLE: u8 = 8;
/// The key manager answered nonsense or the key cannot be a volume key.
pub const EXIT_KEY_INVALID: u8 = 9;
/// The agent refused the caller, is stopping, or could not be talked to.
pub const EXIT_AGENT: u8 = 10;
/// libvirtd cannot be reached (libvirt mode).
pub const EXIT_LIBVIRT_UNAVAILABLE: u8 = 11;
/// libvirt refused or failed an operation on a secret (libvirt mode).
pub const EXIT_LIBVIRT: u8 = 12;
/// `image verify`: the image has no signature properties.
pub const EXIT_IMAGE_NOT_SIGNED: u8 = 13;
/// `image verify`: the signature does not match the image.
pub const EXIT_SIGNATURE_MISMATCH: u8 = 14;
/// `image verify`: the signature properties are incomplete or invalid.
pub const EXIT_IMAGE_PROPERTIES: u8 = 15;
/// `image verify`: the signing certificate cannot vouch for the image.
pub const EXIT_CERTIFICATE: u8 = 16;
/// The highest exit code.
pub const EXIT_MAX: u8 = EXIT_CERTIFICATE;

macro_rules! api_codes {
    ($($variant:ident = $name:literal, $status:literal, $exit:ident, $doc:literal;)*) => {
        /// An error code the API answers with.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ApiCode {
            $(#[doc = $doc] $variant,)*
        }

        impl ApiCode {
            /// Every code, in the order of the table.
            pub const ALL: &'static [ApiCode] = &[$(ApiCode::$variant,)*];

            /// The stable name in answers, logs and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(ApiCode::$variant => $name,)*
                }
            }

            /// The HTTP status of an answer with this code.
            pub fn status(self) -> u16 {
                match self {
                    $(ApiCode::$variant => $status,)*
                }
            }

            /// The CLI's exit code for this error.
            pub fn exit_code(self) -> u8 {
                match self {
                    $(ApiCode::$variant => $exit,)*
                }
            }

            /// What the code means (the README's table).
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ApiCode::$variant => $doc,)*
                }
            }
        }
    };
}

api_codes! {
    MalformedJson = "malformed_json", 400, EXIT_USAGE, "the body is not JSON";
    UnknownField = "unknown_field", 400, EXIT_USAGE, "the body has a field the API does not know";
    InvalidRequest = "invalid_request", 400, EXIT_USAGE, "the body is JSON but not a valid request";
    InvalidVolumeId = "invalid_volume_id", 400, EXIT_USAGE, "the volume id is not 1-128 letters, digits, '-', '_' and '.'";
    Forbidden = "forbidden", 403, EXIT_AGENT, "the caller may not call the agent";
    KeyAccessDenied = "key_access_denied", 403, EXIT_KEY_ACCESS, "the key manager refused the credentials or the key";
    NotFound = "not_found", 404, EXIT_AGENT, "no such route";
    VolumeNotFound = "volume_not_found", 404, EXIT_DEVICE, "the volume is not attached on this host";
    MethodNotAllowed = "method_not_allowed", 405, EXIT_AGENT, "the route does not take this method";
    RequestTimeout = "request_timeout", 408, EXIT_AGENT, "the body did not arrive in time";
    Busy = "busy", 409, EXIT_DEVICE, "the mapping or device is in use";
    NotAttached = "not_attached", 409, EXIT_USAGE, "extend of a volume that is not attached";
    PayloadTooLarge = "payload_too_large", 413, EXIT_USAGE, "the body is larger than max_body_bytes";
    InvalidSpec = "invalid_spec", 422, EXIT_USAGE, "the encryption metadata or an option cannot be used";
    InvalidKeyId = "invalid_key_id", 422, EXIT_USAGE, "the key id is not one the key manager takes";
    KeyNotFound = "key_not_found", 422, EXIT_KEY_NOT_FOUND, "the key manager has no such key";
    InvalidKeyMaterial = "invalid_key_material", 422, EXIT_KEY_INVALID, "the key cannot be a volume key";
    WrongKey = "wrong_key", 422, EXIT_WRONG_PASSPHRASE, "no keyslot opens with the volume's key";
    DeviceUnusable = "device_unusable", 422, EXIT_DEVICE, "not a device, not LUKS, a damaged or unsupported header, too small";
    DeviceNotFound = "device_not_found", 422, EXIT_DEVICE, "the device path does not exist";
    FormatRefused = "format_refused", 422, EXIT_REFUSED, "first-use format refused: the device is not provably blank";
    Refused = "refused", 422, EXIT_REFUSED, "refused: would destroy a header or lock the volume out";
    Unsupported = "unsupported", 422, EXIT_USAGE, "the operation is not supported for this volume";
    Internal = "internal", 500, EXIT_DEVICE, "the agent failed unexpectedly";
    IoError = "io_error", 500, EXIT_DEVICE, "a file or device operation failed";
    DeviceMapperError = "device_mapper_error", 500, EXIT_DEVICE, "a device-mapper operation failed";
    RollbackFailed = "rollback_failed", 500, EXIT_DEVICE, "an attach failed and undoing it failed too";
    KeyManagerConfig = "key_manager_config", 500, EXIT_USAGE, "the key manager's configuration cannot work";
    KeyStoreError = "key_store_error", 500, EXIT_DEVICE, "the local key store or marker files failed";
    KeyManagerUnavailable = "key_manager_unavailable", 502, EXIT_KEY_UNAVAILABLE, "the key manager cannot be reached (after retries)";
    KeyManagerError = "key_manager_error", 502, EXIT_KEY_INVALID, "the key manager answered nonsense";
    KeyNotHeld = "key_not_held", 502, EXIT_KEY_ACCESS, "require_consumer is set and Barbican did not register this host as a consumer of the key";
    LibvirtError = "libvirt_error", 502, EXIT_LIBVIRT, "libvirt refused or failed an operation on a secret";
    OutOfMemory = "out_of_memory", 503, EXIT_NO_MEMORY, "not enough memory for the KDF";
    TooManyConnections = "too_many_connections", 503, EXIT_AGENT, "more connections than max_connections";
    ShuttingDown = "shutting_down", 503, EXIT_AGENT, "the agent is stopping";
    LibvirtUnavailable = "libvirt_unavailable", 503, EXIT_LIBVIRT_UNAVAILABLE, "libvirtd cannot be reached";
    KeyManagerTimeout = "key_manager_timeout", 504, EXIT_KEY_UNAVAILABLE, "the key manager did not answer in time";
    DeviceTimeout = "device_timeout", 504, EXIT_DEVICE, "opening the device did not finish in time";
    SignatureMismatch = "signature_mismatch", 422, EXIT_SIGNATURE_MISMATCH, "the image's signature does not match the image and its certificate";
    InvalidImageProperties = "invalid_image_properties", 422, EXIT_IMAGE_PROPERTIES, "the image's signature properties are incomplete or invalid";
    CertificateInvalid = "certificate_invalid", 422, EXIT_CERTIFICATE, "the signing certificate is not one, does not fit the key type, or does not chain to a trusted certificate";
    ImageFileUnusable = "image_file_unusable", 422, EXIT_DEVICE, "the image file is missing, not a regular file, not readable by the caller, or changed while read";
}

impl ApiCode {
    /// The code named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<ApiCode> {
        ApiCode::ALL.iter().copied().find(|c| c.name() == name)
    }

    /// The code of a key manager failure.
    pub fn of_key(e: &KeyError) -> ApiCode {
        match e {
            KeyError::InvalidKeyId { .. } => ApiCode::InvalidKeyId,
            KeyError::NotFound { .. } => ApiCode::KeyNotFound,
            KeyError::Forbidden { .. } | KeyError::Unauthenticated { .. } => {
                ApiCode::KeyAccessDenied
            }
            KeyError::Unavailable { .. } => ApiCode::KeyManagerUnavailable,
            KeyError::TimedOut { .. } => ApiCode::KeyManagerTimeout,
            KeyError::Protocol { .. } => ApiCode::KeyManagerError,
            KeyError::NotHeld { .. } => ApiCode::KeyNotHeld,
            KeyError::InvalidKeyMaterial { .. } => ApiCode::InvalidKeyMaterial,
            KeyError::Config(_) => ApiCode::KeyManagerConfig,
            KeyError::Local { .. } => ApiCode::KeyStoreError,
        }
    }

    /// The code of a LUKS engine failure.
    pub fn of_luks(e: &LuksError) -> ApiCode {
        match e {
            LuksError::WrongPassphrase { .. } => ApiCode::WrongKey,
            LuksError::Kdf {
                source: KdfError::Memory { .. },
                ..
            } => ApiCode::OutOfMemory,
            LuksError::Refused { .. } => ApiCode::Refused,
            LuksError::InvalidArgument { .. } => ApiCode::InvalidSpec,
            LuksError::NotLuks { .. }
            | LuksError::TooSmall { .. }
            | LuksError::InvalidHeader { .. }
            | LuksError::Unsupported { .. }
            | LuksError::Kdf { .. } => ApiCode::DeviceUnusable,
            LuksError::Io { .. } | LuksError::Random { .. } => ApiCode::IoError,
        }
    }

    /// The code of a device that cannot be used.
    pub fn of_device(e: &DeviceError) -> ApiCode {
        match e {
            DeviceError::NotFound { .. } => ApiCode::DeviceNotFound,
            DeviceError::TimedOut { .. } => ApiCode::DeviceTimeout,
            DeviceError::Io { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                ApiCode::Busy
            }
            DeviceError::Io { .. } => ApiCode::IoError,
            DeviceError::NotADevice { .. }
            | DeviceError::InvalidPath { .. }
            | DeviceError::Changed { .. } => ApiCode::DeviceUnusable,
        }
    }

    /// The code of a libvirt failure.
    pub fn of_libvirt(e: &LibvirtError) -> ApiCode {
        match e {
            LibvirtError::Unavailable { .. } => ApiCode::LibvirtUnavailable,
            LibvirtError::Secret { .. } => ApiCode::LibvirtError,
        }
    }

    /// The code of an image verification failure.
    pub fn of_image(e: &ImageError) -> ApiCode {
        match &e.failure {
            ImageFailure::Properties(_) => ApiCode::InvalidImageProperties,
            ImageFailure::Mismatch { .. } => ApiCode::SignatureMismatch,
            ImageFailure::Certificate(_) => ApiCode::CertificateInvalid,
            ImageFailure::Key { source, .. } => ApiCode::of_key(source),
            ImageFailure::File(FileError::Unusable { .. }) => ApiCode::ImageFileUnusable,
            ImageFailure::File(FileError::Io { .. }) => ApiCode::IoError,
        }
    }

    /// The code of a volume failure.
    pub fn of_volume(e: &VolumeError) -> ApiCode {
        ApiCode::of_failure(&e.failure)
    }

    /// The code of what failed in a volume operation.
    pub fn of_failure(f: &Failure) -> ApiCode {
        match f {
            Failure::Spec { .. } => ApiCode::InvalidSpec,
            Failure::Key { source } | Failure::KeyHold { source } => ApiCode::of_key(source),
            Failure::Luks { source } => ApiCode::of_luks(source),
            Failure::FormatRefused { .. } => ApiCode::FormatRefused,
            Failure::Dm { source } => match source {
                DmError::Busy { .. } => ApiCode::Busy,
                _ => ApiCode::DeviceMapperError,
            },
            Failure::Device { source } => ApiCode::of_device(source),
            Failure::Io { .. } => ApiCode::IoError,
            Failure::Rollback { .. } => ApiCode::RollbackFailed,
            Failure::Libvirt { source } => ApiCode::of_libvirt(source),
            Failure::NotAttached { .. } => ApiCode::NotAttached,
            Failure::Unsupported { .. } => ApiCode::Unsupported,
        }
    }

    /// The README's table of codes, generated from this one.
    pub fn markdown_table() -> String {
        let mut s = String::from("| code | HTTP | exit | meaning |\n|---|---|---|---|\n");
        for c in ApiCode::ALL {
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                c.name(),
                c.status(),
                c.exit_code(),
                c.meaning()
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ApiCode::ALL {
            assert!(seen.insert(c.name()), "{} twice", c.name());
            assert!(
                c.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                c.name()
            );
            assert!((400..600).contains(&c.status()), "{}", c.name());
            assert!((1..=EXIT_MAX).contains(&c.exit_code()), "{}", c.name());
            assert_eq!(ApiCode::from_name(c.name()), Some(*c));
        }
        assert_eq!(ApiCode::from_name("no_such_code"), None);
    }

    #[test]
    fn the_readme_table_is_generated_from_the_codes() {
        let readme = include_str!("../../README.md");
        let table = ApiCode::markdown_table();
        assert!(
            readme.contains(&table),
            "README.md lacks the table of API codes; paste `luks-agent generate api-codes`:\n{table}"
        );
    }
}

//! API errors: every failure becomes an HTTP status that fits and a stable
//! snake_case code, mapped from the typed errors of the lower layers. The
//! CLI maps the same codes to its exit codes, so a command exits the same
//! way whether the agent or the command itself did the work.
//!
//! Messages are the error and its causes, as the CLI prints them; no layer
//! puts key material into an error, so none can reach an answer or a log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::blockdev::DeviceError;
use crate::dm::DmError;
use crate::keymgr::KeyError;
use crate::libvirt::LibvirtError;
use crate::luks::LuksError;
use crate::luks::kdf::KdfError;
use crate::volume::VolumeError;

use super::api::{ErrorBody, ErrorDetail};

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Message.
    pub message: String,
    /// The volume the request named.
    pub volume_id: Option<String>,
}

/// The error code of an answer, kept in its extensions for metrics and
/// logs.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// Every code the API answers with and its HTTP status (for the README and
/// the tests).
pub const CODES: &[(&str, u16)] = &[
    ("malformed_json", 400),
    ("unknown_field", 400),
    ("invalid_request", 400),
    ("invalid_volume_id", 400),
    ("forbidden", 403),
    ("key_access_denied", 403),
    ("not_found", 404),
    ("volume_not_found", 404),
    ("method_not_allowed", 405),
    ("request_timeout", 408),
    ("busy", 409),
    ("not_attached", 409),
    ("payload_too_large", 413),
    ("invalid_spec", 422),
    ("invalid_key_id", 422),
    ("key_not_found", 422),
    ("invalid_key_material", 422),
    ("wrong_key", 422),
    ("device_unusable", 422),
    ("device_not_found", 422),
    ("format_refused", 422),
    ("refused", 422),
    ("unsupported", 422),
    ("internal", 500),
    ("io_error", 500),
    ("device_mapper_error", 500),
    ("rollback_failed", 500),
    ("key_manager_config", 500),
    ("key_store_error", 500),
    ("key_manager_unavailable", 502),
    ("key_manager_error", 502),
    ("libvirt_error", 502),
    ("out_of_memory", 503),
    ("too_many_connections", 503),
    ("shutting_down", 503),
    ("libvirt_unavailable", 503),
    ("key_manager_timeout", 504),
    ("device_timeout", 504),
];

/// An error and its causes on one line, `a: b: c`, exactly as the CLI
/// prints an error chain (so both paths print the same).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl ApiError {
    /// An error with `code`; its status comes from [`CODES`].
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        let status = CODES
            .iter()
            .find(|(c, _)| *c == code)
            .and_then(|(_, s)| StatusCode::from_u16(*s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError {
            status,
            code,
            message: message.into(),
            volume_id: None,
        }
    }

    /// The same error naming `volume_id`.
    pub fn for_volume(mut self, volume_id: &str) -> Self {
        self.volume_id = Some(volume_id.to_string());
        self
    }

    /// The code of a key manager failure.
    pub fn key_code(e: &KeyError) -> &'static str {
        match e {
            KeyError::InvalidKeyId { .. } => "invalid_key_id",
            KeyError::NotFound { .. } => "key_not_found",
            KeyError::Forbidden { .. } | KeyError::Unauthenticated { .. } => "key_access_denied",
            KeyError::Unavailable { .. } => "key_manager_unavailable",
            KeyError::TimedOut { .. } => "key_manager_timeout",
            KeyError::Protocol { .. } => "key_manager_error",
            KeyError::InvalidKeyMaterial { .. } => "invalid_key_material",
            KeyError::Config(_) => "key_manager_config",
            KeyError::Local { .. } => "key_store_error",
        }
    }

    /// The code of a volume failure.
    pub fn volume_code(e: &VolumeError) -> &'static str {
        match e {
            VolumeError::Spec { .. } => "invalid_spec",
            VolumeError::Key { source, .. } => Self::key_code(source),
            VolumeError::Luks { source, .. } => match source {
                LuksError::WrongPassphrase { .. } => "wrong_key",
                LuksError::Kdf {
                    source: KdfError::Memory { .. },
                    ..
                } => "out_of_memory",
                LuksError::Refused { .. } => "refused",
                LuksError::InvalidArgument { .. } => "invalid_spec",
                LuksError::NotLuks { .. }
                | LuksError::TooSmall { .. }
                | LuksError::InvalidHeader { .. }
                | LuksError::Unsupported { .. }
                | LuksError::Kdf { .. } => "device_unusable",
                _ => "io_error",
            },
            VolumeError::FormatRefused { .. } => "format_refused",
            VolumeError::Device { source, .. } => match source {
                DeviceError::NotFound { .. } => "device_not_found",
                DeviceError::TimedOut { .. } => "device_timeout",
                DeviceError::Io { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                    "busy"
                }
                DeviceError::Io { .. } => "io_error",
                DeviceError::NotADevice { .. }
                | DeviceError::InvalidPath { .. }
                | DeviceError::Changed { .. } => "device_unusable",
            },
            VolumeError::Dm { source, .. } => match source {
                DmError::Busy { .. } => "busy",
                _ => "device_mapper_error",
            },
            VolumeError::Io { source, op, .. } => {
                if source.kind() == std::io::ErrorKind::NotFound && op == "resolving" {
                    "device_not_found"
                } else {
                    "io_error"
                }
            }
            VolumeError::Rollback { .. } => "rollback_failed",
            VolumeError::Libvirt { source, .. } => match source.as_ref() {
                LibvirtError::Unavailable { .. } => "libvirt_unavailable",
                LibvirtError::Secret { .. } => "libvirt_error",
            },
            VolumeError::Unsupported { what, .. } => {
                if what.starts_with("not attached") {
                    "not_attached"
                } else {
                    "unsupported"
                }
            }
        }
    }

    /// The answer for a volume failure.
    pub fn from_volume(volume_id: &str, e: &VolumeError) -> Self {
        ApiError::new(Self::volume_code(e), chain(e)).for_volume(volume_id)
    }

    /// The answer while the agent is stopping.
    pub fn shutting_down() -> Self {
        ApiError::new(
            "shutting_down",
            "the agent is shutting down; retry when it is back",
        )
    }

    /// The answer to an unknown route.
    pub fn not_found(path: &str) -> Self {
        ApiError::new(
            "not_found",
            format!("no such route: {}", path.escape_debug()),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                volume_id: self.volume_id,
            },
        };
        let text = serde_json::to_string(&body).unwrap_or_default();
        let mut resp = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response();
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_with_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for (code, status) in CODES {
            assert!(seen.insert(code), "{code} twice");
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert!((400..600).contains(status), "{code} {status}");
            assert_eq!(ApiError::new(code, "x").status.as_u16(), *status);
        }
    }

    #[test]
    fn volume_errors_map_to_fitting_statuses() {
        let vid = "v1".to_string();
        let key = |source| VolumeError::Key {
            volume_id: vid.clone(),
            source,
        };
        let cases: Vec<(VolumeError, &str, u16)> = vec![
            (
                key(KeyError::TimedOut {
                    key_id: "k".into(),
                    endpoint: "e".into(),
                    after: std::time::Duration::from_secs(1),
                }),
                "key_manager_timeout",
                504,
            ),
            (
                key(KeyError::Unavailable {
                    key_id: "k".into(),
                    endpoint: "e".into(),
                    attempts: 3,
                    last: "refused".into(),
                }),
                "key_manager_unavailable",
                502,
            ),
            (
                VolumeError::FormatRefused {
                    volume_id: vid.clone(),
                    device: "/dev/x".into(),
                    reason: "ext4".into(),
                },
                "format_refused",
                422,
            ),
            (
                VolumeError::Dm {
                    volume_id: vid.clone(),
                    mapping: "m".into(),
                    source: DmError::Busy {
                        name: "m".into(),
                        attempts: 6,
                    },
                },
                "busy",
                409,
            ),
            (
                VolumeError::Io {
                    volume_id: vid.clone(),
                    op: "resolving".into(),
                    path: "/dev/nope".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                "device_not_found",
                422,
            ),
        ];
        for (e, code, status) in cases {
            let a = ApiError::from_volume(&vid, &e);
            assert_eq!((a.code, a.status.as_u16()), (code, status), "{e}");
            assert_eq!(a.volume_id.as_deref(), Some("v1"));
        }
    }

    #[test]
    fn chain_joins_causes_like_the_cli() {
        let e = VolumeError::Io {
            volume_id: "v".into(),
            op: "opening".into(),
            path: "/p".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert_eq!(chain(&e), "volume v: opening /p: permission denied");
    }
}

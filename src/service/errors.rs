//! API errors: every failure becomes an [`ApiCode`] (which owns its HTTP
//! status and exit code), mapped from the typed errors of the lower layers
//! by variant, and a message that is the error's chain.
//!
//! Messages are the error and its causes, as the CLI prints them; no layer
//! puts key material into an error, so none can reach an answer or a log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::text::error_chain;
use crate::volume::VolumeError;

use super::api::{ErrorBody, ErrorDetail};
pub use super::codes::ApiCode;

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// Stable code (it owns the HTTP status and the exit code).
    pub code: ApiCode,
    /// Message.
    pub message: String,
    /// The volume the request named.
    pub volume_id: Option<String>,
}

/// The error code of an answer, kept in its extensions for metrics and
/// logs.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub ApiCode);

impl ApiError {
    /// An error with `code`.
    pub fn new(code: ApiCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            volume_id: None,
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The same error naming `volume_id`.
    pub fn for_volume(mut self, volume_id: &str) -> Self {
        self.volume_id = Some(volume_id.to_string());
        self
    }

    /// The answer for a volume failure.
    pub fn from_volume(volume_id: &str, e: &VolumeError) -> Self {
        ApiError::new(ApiCode::of_volume(e), error_chain(e)).for_volume(volume_id)
    }

    /// The answer while the agent is stopping.
    pub fn shutting_down() -> Self {
        ApiError::new(
            ApiCode::ShuttingDown,
            "the agent is shutting down; retry when it is back",
        )
    }

    /// The answer to an unknown route.
    pub fn not_found(path: &str) -> Self {
        ApiError::new(
            ApiCode::NotFound,
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
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.name().to_string(),
                message: self.message,
                volume_id: self.volume_id,
            },
        };
        let text = serde_json::to_string(&body).unwrap_or_default();
        let mut resp = (
            status,
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
    use crate::dm::DmError;
    use crate::keymgr::KeyError;
    use crate::volume::Failure;

    #[test]
    fn volume_errors_map_to_fitting_statuses() {
        let key = |source| Failure::Key { source };
        let cases: Vec<(Failure, &str, u16)> = vec![
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
                Failure::FormatRefused {
                    device: "/dev/x".into(),
                    reason: "ext4".into(),
                },
                "format_refused",
                422,
            ),
            (
                Failure::Dm {
                    source: DmError::Busy {
                        name: "m".into(),
                        attempts: 6,
                    },
                },
                "busy",
                409,
            ),
            (
                Failure::Device {
                    source: crate::blockdev::DeviceError::NotFound {
                        path: "/dev/nope".into(),
                    },
                },
                "device_not_found",
                422,
            ),
            (
                Failure::NotAttached {
                    mapping: "crypt-x".into(),
                },
                "not_attached",
                409,
            ),
        ];
        for (failure, code, status) in cases {
            let e = VolumeError::new("v1", failure);
            let a = ApiError::from_volume("v1", &e);
            assert_eq!((a.code.name(), a.status().as_u16()), (code, status), "{e}");
            assert_eq!(a.volume_id.as_deref(), Some("v1"));
        }
    }

    #[test]
    fn chain_joins_causes_like_the_cli() {
        let e = VolumeError::new(
            "v",
            Failure::Io {
                op: crate::volume::FileOp::OpeningLock,
                path: "/p".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            },
        );
        assert_eq!(
            error_chain(&e),
            "volume v: opening lock /p: permission denied"
        );
    }
}

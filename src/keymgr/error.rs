//! Errors of the key managers: each names the key id, and for remote
//! backends the endpoint and HTTP status; none carries key material.

use std::time::Duration;

/// Why a key could not be fetched or a marker not read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The id is not something any key manager could hold.
    #[error("invalid key id '{key_id}'")]
    InvalidKeyId {
        /// The id as given (escaped).
        key_id: String,
    },
    /// The key manager has no such key.
    #[error("key {key_id} not found at {endpoint}{}", http_status(*.status))]
    NotFound {
        /// Key id.
        key_id: String,
        /// Where we asked.
        endpoint: String,
        /// HTTP status (0 for local stores).
        status: u16,
    },
    /// Authenticated, but not allowed to read the key.
    #[error("access to key {key_id} at {endpoint} is forbidden{}", http_status(*.status))]
    Forbidden {
        /// Key id.
        key_id: String,
        /// Where we asked.
        endpoint: String,
        /// HTTP status.
        status: u16,
    },
    /// The credentials were refused.
    #[error("authentication for key {key_id} refused by {endpoint} (HTTP {status}): {reason}")]
    Unauthenticated {
        /// Key id.
        key_id: String,
        /// Who refused.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// What was refused.
        reason: String,
    },
    /// The service did not answer usefully after every retry.
    #[error(
        "key manager {endpoint} unavailable for key {key_id} after {attempts} attempt(s): {last}"
    )]
    Unavailable {
        /// Key id.
        key_id: String,
        /// Where we asked.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure (status or connection error, without secrets).
        last: String,
    },
    /// The overall deadline passed.
    #[error("key manager {endpoint} timed out for key {key_id} after {after:?}")]
    TimedOut {
        /// Key id.
        key_id: String,
        /// Where we asked.
        endpoint: String,
        /// Elapsed time.
        after: Duration,
    },
    /// An answer that is not what the API promises.
    #[error("key manager {endpoint} answered nonsense for key {key_id} (HTTP {status}): {reason}")]
    Protocol {
        /// Key id.
        key_id: String,
        /// Where we asked.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// What is wrong.
        reason: String,
    },
    /// The secret exists but cannot be a volume key.
    #[error("key {key_id} from {endpoint} holds invalid key material: {reason}")]
    InvalidKeyMaterial {
        /// Key id.
        key_id: String,
        /// Where it came from.
        endpoint: String,
        /// What is wrong (lengths and types, never bytes).
        reason: String,
    },
    /// The key manager did not register this host as a user of the key,
    /// and the configuration requires it.
    #[error(
        "key {key_id} is not protected against deletion at {endpoint}: {reason} (require_consumer is set)"
    )]
    NotHeld {
        /// Key id.
        key_id: String,
        /// Where we asked.
        endpoint: String,
        /// Why not (status and what it means).
        reason: String,
    },
    /// Configuration that cannot work.
    #[error("key manager configuration: {0}")]
    Config(String),
    /// A local file operation failed.
    #[error("key {key_id}: {op} {path}")]
    Local {
        /// Key id (or `-` for store-wide operations).
        key_id: String,
        /// What we were doing.
        op: String,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// " (HTTP n)" for remote answers, nothing for local stores (status 0).
fn http_status(status: u16) -> String {
    if status == 0 {
        String::new()
    } else {
        format!(" (HTTP {status})")
    }
}

/// Why bytes cannot be a volume key; the caller adds the key id and where
/// the bytes came from.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidMaterial(pub String);

impl InvalidMaterial {
    /// The full error for `key_id` fetched from `endpoint`.
    pub fn at(self, key_id: &str, endpoint: &str) -> KeyError {
        KeyError::InvalidKeyMaterial {
            key_id: key_id.into(),
            endpoint: endpoint.into(),
            reason: self.0,
        }
    }
}

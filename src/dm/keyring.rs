//! The kernel keyring, the one place keys reach the kernel: a volume key is
//! added as a `logon` key (the kernel never hands its payload back to user
//! space) to the calling thread's keyring, referenced by the dm-crypt table
//! being loaded from that same thread, and revoked right after.

use std::ffi::CString;
use std::io;

use crate::secret::VolumeKey;

/// `KEY_SPEC_THREAD_KEYRING` from `<linux/keyctl.h>`.
const KEY_SPEC_THREAD_KEYRING: libc::c_long = -1;
/// `KEYCTL_REVOKE`.
const KEYCTL_REVOKE: libc::c_long = 3;
/// `KEYCTL_UNLINK`.
const KEYCTL_UNLINK: libc::c_long = 9;

/// Why a keyring operation failed; names the operation and description,
/// never the key.
#[derive(Debug, thiserror::Error)]
#[error("keyring: {op} of logon key '{description}'")]
pub struct KeyringError {
    /// `add_key` or `keyctl(...)`.
    pub op: &'static str,
    /// Key description.
    pub description: String,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// A logon key in the thread keyring; revoked and unlinked on drop.
pub struct LogonKey {
    serial: libc::c_long,
    description: String,
}

impl LogonKey {
    /// Adds `key` under `description` (which must look like `prefix:name`).
    pub fn add(description: &str, key: &VolumeKey) -> Result<LogonKey, KeyringError> {
        let err = |op, source| KeyringError {
            op,
            description: description.to_string(),
            source,
        };
        let c_type = CString::new("logon")
            .map_err(|_| err("add_key", io::ErrorKind::InvalidInput.into()))?;
        let c_desc = CString::new(description)
            .map_err(|_| err("add_key", io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: add_key reads two NUL-terminated strings and `plen` bytes
        // of payload, all of which live for the duration of the call.
        let serial = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                c_type.as_ptr(),
                c_desc.as_ptr(),
                key.expose().as_ptr(),
                key.len(),
                KEY_SPEC_THREAD_KEYRING,
            )
        };
        if serial < 0 {
            return Err(err("add_key", io::Error::last_os_error()));
        }
        Ok(LogonKey {
            serial,
            description: description.to_string(),
        })
    }

    /// The description, as the dm-crypt table references it.
    pub fn description(&self) -> &str {
        &self.description
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        // SAFETY: keyctl with integer arguments only; a stale serial just
        // fails with an error we cannot do anything about.
        unsafe {
            libc::syscall(libc::SYS_keyctl, KEYCTL_REVOKE, self.serial);
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_UNLINK,
                self.serial,
                KEY_SPEC_THREAD_KEYRING,
            );
        }
    }
}

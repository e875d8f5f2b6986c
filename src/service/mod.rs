//! The service layer between the front ends (the agent's server and the
//! CLI acting directly) and the volume layer: request and response bodies
//! (`api`), error codes (`codes`) and answers (`errors`), one volume
//! operation from request to response with its log line (`ops`), status
//! listings (`status`), log output (`logging`), the options the
//! configuration gives the volume layer, and the CLI's client of the
//! agent (`client`). Both front ends use it; neither reaches into the
//! other.
//!
//! ```text
//! CLI ----------------------------\
//!                                  service (ops, codes, api) --> volume
//! caller --socket--> daemon server/
//! ```

pub mod api;
pub mod client;
pub mod codes;
pub mod errors;
pub mod logging;
pub mod ops;
pub mod status;

use std::time::Duration;

use crate::config::Config;
use crate::libvirt::SecretFlags;
use crate::volume::VolumeOptions;
use crate::volume::native::NativeOptions;

/// The volume layer's options as the configuration sets them; the same for
/// the agent and for the CLI acting directly.
pub fn volume_options(config: &Config) -> VolumeOptions {
    VolumeOptions {
        state_dir: config.state_dir.clone(),
        run_dir: config.run_dir.clone(),
        max_argon2_memory_kib: config.kdf.max_argon2_memory_kib,
        detach_attempts: 6,
        detach_backoff: Duration::from_millis(100),
        crypt: config.crypt.options(),
        format_intent_min_age: Duration::from_secs(config.volume.format_intent_min_age_secs),
        device_open_timeout: Duration::from_millis(config.volume.device_open_timeout_ms),
    }
}

/// Where and how libvirt-mode secrets are defined, as the configuration
/// sets it.
pub fn native_options(config: &Config) -> NativeOptions {
    NativeOptions {
        uri: config.libvirt.uri.clone(),
        flags: SecretFlags {
            ephemeral: !config.libvirt.persistent,
            private: true,
        },
    }
}

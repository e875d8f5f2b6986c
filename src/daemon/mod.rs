//! The long-running agent, `luks-agent serve`: an HTTP/JSON API on a Unix
//! socket in front of the volume layer, and the client the CLI uses to
//! talk to it.
//!
//! One process holds the root rights, the key manager's tokens and warm
//! connections, and serialises work per volume across every caller:
//!
//! ```text
//! caller --unix socket--> server (peer check, limits) --> per-volume lock
//!        --> blocking thread: volume layer (key, LUKS, dm) --> answer
//! ```
//!
//! Requests never run volume work on the async executor: each operation
//! runs on a blocking thread once the caller holds the volume's lock, and
//! every Argon2 run there draws from one process-wide memory budget
//! ([`crate::luks::kdf::MemoryBudget`]), so many concurrent unlocks wait
//! instead of exhausting memory.

pub mod api;
pub mod auth;
pub mod client;
pub mod errors;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod shutdown;

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

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

/// The file in the run directory that every agent process holds a shared
/// lock on for as long as it lives (the kernel drops it only when the last
/// thread is gone). The CLI takes it as proof that an agent still runs,
/// and may still hold volume locks, after its socket is gone.
const AGENT_LOCK: &str = "agent.lock";

/// Takes this process's shared lock on the run directory's agent lock and
/// keeps it until the process ends.
pub fn hold_agent_lock(run_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not a private directory: the socket may live in it.
    std::fs::create_dir_all(run_dir)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(run_dir.join(AGENT_LOCK))?;
    f.lock_shared()?;
    // Held until the process is gone, however it ends.
    std::mem::forget(f);
    Ok(())
}

/// Whether an agent process that uses `run_dir` is still alive (it holds
/// the agent lock), whether or not it still answers on its socket.
pub fn agent_process_alive(run_dir: &std::path::Path) -> bool {
    let Ok(f) = std::fs::File::open(run_dir.join(AGENT_LOCK)) else {
        return false;
    };
    matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

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

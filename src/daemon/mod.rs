//! The long-running agent, `luks-agent serve`: an HTTP/JSON API on a Unix
//! socket in front of the service layer (`crate::service`): the socket,
//! peer credentials, limits, metrics and shutdown.
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

pub mod auth;
pub mod metrics;
pub mod server;
pub mod shutdown;

/// The lock file beside a socket (`<socket>.lock`) that every agent
/// process serving that socket holds a shared lock on for as long as it
/// lives (the kernel drops it only when its last thread is gone). The CLI
/// takes it as proof that the agent of its socket still runs, and may
/// still hold volume locks, after the socket itself is gone.
fn agent_lock_path(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".lock");
    std::path::PathBuf::from(name)
}

/// Takes this process's shared lock on the agent lock of `socket` and
/// keeps it until the process ends.
pub fn hold_agent_lock(socket: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(agent_lock_path(socket))?;
    f.lock_shared()?;
    // Held until the process is gone, however it ends.
    std::mem::forget(f);
    Ok(())
}

/// Whether an agent process serving `socket` is still alive (it holds the
/// socket's agent lock), whether or not it still answers there. The probe
/// takes the lock exclusively for an instant, so other commands probing
/// at the same moment make it fail now and then: only a lock that stays
/// held through half a second of tries is an agent's (an agent holds it
/// as long as it lives; this path is taken only when the socket does not
/// answer).
pub fn agent_process_alive(socket: &std::path::Path) -> bool {
    let Ok(f) = std::fs::File::open(agent_lock_path(socket)) else {
        return false;
    };
    for _ in 0..25 {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => return false,
        }
    }
    true
}

//! Graceful shutdown, bounded. SIGTERM or SIGINT stops the accept loop;
//! requests still waiting for their volume's lock are answered
//! `shutting_down`; operations that already started (a key fetched, a
//! header unlocked, a table loaded) are given until `shutdown_timeout_ms`
//! after the signal to finish, since stopping one halfway leaves work for
//! the next attach. An operation still running then (stuck in the kernel
//! or on a device) is abandoned: the agent logs which one and exits, as a
//! kill would, and the next attach of that volume finishes or undoes it.
//! A second signal abandons at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, watch};

/// An operation that is running: what and on which volume, since when.
#[derive(Clone, Debug)]
pub struct RunningOperation {
    /// `attach`, `detach` or `extend`.
    pub op: &'static str,
    /// The volume.
    pub volume_id: String,
    /// When it started.
    pub since: Instant,
}

#[derive(Debug, Default)]
struct Running {
    count: AtomicU64,
    changed: Notify,
    next_id: AtomicU64,
    ops: Mutex<BTreeMap<u64, RunningOperation>>,
}

/// The shutdown signal and the running operations.
#[derive(Clone, Debug)]
pub struct Shutdown {
    stop: Arc<watch::Sender<bool>>,
    hurry: Arc<watch::Sender<bool>>,
    running: Arc<Running>,
}

/// One running operation; dropping it ends it.
#[derive(Debug)]
pub struct OperationGuard {
    running: Arc<Running>,
    id: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Not stopping, nothing running.
    pub fn new() -> Self {
        Shutdown {
            stop: Arc::new(watch::channel(false).0),
            hurry: Arc::new(watch::channel(false).0),
            running: Arc::new(Running::default()),
        }
    }

    /// Starts stopping.
    pub fn trigger(&self) {
        self.stop.send_replace(true);
    }

    /// Whether stopping has started.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once stopping has started.
    pub async fn stopping(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops waiting for running operations (a second signal).
    pub fn hurry(&self) {
        self.hurry.send_replace(true);
    }

    /// Resolves once [`hurry`](Self::hurry) was called.
    pub async fn hurried(&self) {
        let mut rx = self.hurry.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Counts `op` on `volume_id` as running until the guard drops.
    pub fn start_operation(&self, op: &'static str, volume_id: &str) -> OperationGuard {
        let id = self.running.next_id.fetch_add(1, Ordering::SeqCst);
        self.running
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                RunningOperation {
                    op,
                    volume_id: volume_id.to_string(),
                    since: Instant::now(),
                },
            );
        self.running.count.fetch_add(1, Ordering::SeqCst);
        OperationGuard {
            running: self.running.clone(),
            id,
        }
    }

    /// Operations running now.
    pub fn running(&self) -> u64 {
        self.running.count.load(Ordering::SeqCst)
    }

    /// The operations running now, oldest first.
    pub fn running_operations(&self) -> Vec<RunningOperation> {
        self.running
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Resolves when no operation runs.
    pub async fn idle(&self) {
        loop {
            let notified = self.running.changed.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits until no operation runs, at most until `deadline` or a second
    /// signal; returns the operations abandoned then (none when idle).
    pub async fn idle_until(&self, deadline: Instant) -> Vec<RunningOperation> {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = self.idle() => return Vec::new(),
            _ = tokio::time::sleep(left) => {}
            _ = self.hurried() => {}
        }
        self.running_operations()
    }

    /// Resolves on the first SIGTERM or SIGINT, then triggers; a second
    /// signal hurries the shutdown.
    pub async fn on_signals(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = self.stopping() => return Ok(()),
        };
        tracing::info!(
            signal = name,
            operations_in_flight = self.running(),
            "stopping: no new connections; running operations are given until the shutdown timeout"
        );
        self.trigger();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = name,
            operations_in_flight = self.running(),
            "second signal: not waiting for running operations"
        );
        self.hurry();
        Ok(())
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.running
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        self.running.count.fetch_sub(1, Ordering::SeqCst);
        self.running.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_every_operation() {
        let s = Shutdown::new();
        assert!(!s.is_stopping());
        let a = s.start_operation("attach", "v1");
        let b = s.start_operation("detach", "v2");
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        s.trigger();
        s.stopping().await;
        assert!(s.is_stopping());
    }

    #[tokio::test]
    async fn a_stuck_operation_is_abandoned_at_the_deadline_and_named() {
        let s = Shutdown::new();
        let _stuck = s.start_operation("extend", "vol-stuck");
        let done = s.start_operation("attach", "vol-done");
        drop(done);
        let started = Instant::now();
        let abandoned = s
            .idle_until(Instant::now() + Duration::from_millis(200))
            .await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        let names: Vec<_> = abandoned
            .iter()
            .map(|o| (o.op, o.volume_id.as_str()))
            .collect();
        assert_eq!(names, [("extend", "vol-stuck")]);
        // A second signal does not wait for the deadline.
        let waiter = tokio::spawn({
            let s = s.clone();
            async move {
                s.idle_until(Instant::now() + Duration::from_secs(3600))
                    .await
            }
        });
        tokio::task::yield_now().await;
        s.hurry();
        let abandoned = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(abandoned.len(), 1);
    }
}

//! Graceful shutdown. SIGTERM or SIGINT stops the accept loop; requests
//! still waiting for their volume's lock are answered `shutting_down`;
//! operations that already started (a key fetched, a header unlocked, a
//! table loaded) always run to the end, since stopping one halfway is what
//! would leave a half-made mapping. The server waits for the callers to
//! receive their answers (bounded by `shutdown_timeout_ms`) and then, with
//! no bound, for the last running operation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};

/// The shutdown signal and the count of running operations.
#[derive(Clone, Debug)]
pub struct Shutdown {
    stop: Arc<watch::Sender<bool>>,
    running: Arc<(AtomicU64, Notify)>,
}

/// One running operation; dropping it ends it.
#[derive(Debug)]
pub struct OperationGuard {
    running: Arc<(AtomicU64, Notify)>,
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
            running: Arc::new((AtomicU64::new(0), Notify::new())),
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

    /// Counts an operation as running until the guard drops.
    pub fn start_operation(&self) -> OperationGuard {
        self.running.0.fetch_add(1, Ordering::SeqCst);
        OperationGuard {
            running: self.running.clone(),
        }
    }

    /// Operations running now.
    pub fn running(&self) -> u64 {
        self.running.0.load(Ordering::SeqCst)
    }

    /// Resolves when no operation runs.
    pub async fn idle(&self) {
        loop {
            let notified = self.running.1.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Resolves on the first SIGTERM or SIGINT, then triggers.
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
            "stopping: no new connections; running operations finish"
        );
        self.trigger();
        Ok(())
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.running.0.fetch_sub(1, Ordering::SeqCst);
        self.running.1.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_operation() {
        let s = Shutdown::new();
        assert!(!s.is_stopping());
        let a = s.start_operation();
        let b = s.start_operation();
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
}

//! One shutdown source for the whole process: SIGTERM or SIGINT (or a call to
//! [`Shutdown::trigger`]) ends every task that holds a clone.

use tokio::sync::watch;

/// A cloneable handle that resolves [`Shutdown::signaled`] once shutdown starts.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A handle that only [`Shutdown::trigger`] ends (for tests and embedding).
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// A handle that SIGTERM and SIGINT end. Must be called inside a Tokio runtime.
    pub fn on_signals() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let shutdown = Self::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = which, "shutting down");
            trigger.trigger();
        });
        Ok(shutdown)
    }

    /// Starts shutdown.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown has started.
    pub fn is_signaled(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has started (at once if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone, which cannot happen while `self`
        // holds one; treat it as shutdown all the same.
        let _ = rx.wait_for(|down| *down).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_wakes_every_clone() {
        let s = Shutdown::new();
        let c = s.clone();
        let waiter = tokio::spawn(async move { c.signaled().await });
        assert!(!s.is_signaled());
        s.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(s.is_signaled());
        // Resolves at once afterwards.
        s.signaled().await;
    }
}

//! Bounded waits: every wait of a test has a deadline and says what it waited for.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
/// The error names `what` and how long was waited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! The limiter's settings: IMDS answers at most 20 token requests per second
//! and 5 at a time per VM, and NMI queues only so many calls per pod.

use std::time::Duration;

/// IMDS token requests in flight at once, per VM.
pub(super) const IMDS_CONCURRENT: usize = 5;
/// IMDS token requests started per second, per VM.
pub(super) const IMDS_PER_SECOND: u32 = 20;
/// Default `--max-pending-fetches-per-pod`.
pub const DEFAULT_MAX_PENDING_PER_POD: usize = 16;

/// Time between request starts for `per_second`, 5% wider than `1 s /
/// per_second`: IMDS (and the emulator) count a sliding one-second window, and
/// with exact spacing the 1st and the 21st start may both fall inside one
/// window once arrival jitter is added (seen as 429s in the benchmark).
pub fn spacing_for(per_second: u32) -> Duration {
    Duration::from_micros(1_050_000 / u64::from(per_second.max(1)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::StatusCode;
    use tokio::time::Instant;

    use super::*;
    use crate::fair::RequesterKey;
    use crate::token::testing::{Slow, spawn_fetches};
    use crate::token::{TokenCache, TokenError};

    #[tokio::test]
    async fn a_pod_beyond_its_pending_bound_gets_429_with_retry_after() {
        let cache =
            Arc::new(TokenCache::with_limits(Slow::new(None, false), 1, 1000).with_bounds(2, 100));
        let busy = RequesterKey::pod("ns", "busy");
        let tasks = spawn_fetches(&cache, &busy, 3);
        while cache.pending_fetches() != (2, 1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = cache.by_resource_id("a", "app-of-a", "r9", &busy).await;
        match got {
            Err(e @ TokenError::Throttled { .. }) => {
                assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
                assert!(e.retry_after().is_some_and(|d| d >= Duration::from_secs(1)));
            }
            other => panic!("want 429, got {other:?}"),
        }
        assert_eq!(cache.len(), 3, "the refused request left no entry");
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test]
    async fn a_quiet_pod_is_not_held_behind_a_busy_one() {
        let call = Duration::from_millis(20);
        let cache = Arc::new(
            TokenCache::with_limits(Slow::new(Some(call), false), 5, 20).with_bounds(1000, 4096),
        );
        let busy = RequesterKey::pod("ns", "busy");
        let tasks = spawn_fetches(&cache, &busy, 200);
        while cache.pending_fetches().0 < 190 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        cache
            .by_resource_id("b", "app-of-b", "r", &RequesterKey::pod("ns", "quiet"))
            .await
            .unwrap();
        let waited = started.elapsed();
        // The bound: one call plus (concurrency + 1) spacings.
        let bound = call + spacing_for(20) * 6;
        eprintln!(
            "quiet pod waited {waited:?} (bound {bound:?}) behind {} queued calls",
            cache.pending_fetches().0
        );
        assert!(waited <= bound * 3, "{waited:?} > 3 × {bound:?}");
        for t in tasks {
            t.abort();
        }
    }

    #[test]
    fn limiter_spacing_keeps_a_margin_below_the_rate() {
        for per_second in [1u32, 5, 20, 1000] {
            let span = spacing_for(per_second) * per_second;
            assert!(
                span >= Duration::from_millis(1040),
                "{per_second}: {span:?}"
            );
            assert!(
                span <= Duration::from_millis(1060),
                "{per_second}: {span:?}"
            );
        }
        assert_eq!(spacing_for(0), Duration::from_micros(1_050_000));
    }
}

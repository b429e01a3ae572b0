//! The emulator's clock: wall time for everything a client compares with its own
//! clock (JWT `iat`/`exp`, `expires_on`), and an accelerable *virtual* clock for every
//! duration the emulator itself imposes (LRO length, bucket refill, IMDS windows,
//! assignment delay, slow responses).
//!
//! Why two: SDKs decide whether a cached token is still good from their own wall
//! clock, so tokens must carry wall time; but a 50 s LRO or a 1-minute bucket refill
//! must take milliseconds in tests while keeping every ratio, so those run on a
//! virtual clock that advances `speed` times faster than real time. A speed of 0
//! gives a manual clock that moves only through [`Clock::advance`], which is what
//! tests use to check limits without wall-clock timing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::lock;

/// Virtual time, as a duration since the Unix epoch.
pub type VirtualTime = Duration;

/// Cheap to clone; clones share one timeline.
#[derive(Clone, Debug)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    speed: f64,
    real_start: Instant,
    virtual_start: Duration,
    /// Extra virtual time added by `advance`.
    offset: Mutex<Duration>,
    /// Bumped on every `advance`, so sleepers on a manual clock re-check.
    tick: watch::Sender<u64>,
}

impl Clock {
    /// A clock running `speed` times faster than real time; `0.0` (or any
    /// non-positive or non-finite value) makes a manual clock.
    pub fn new(speed: f64) -> Self {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            0.0
        };
        let virtual_start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (tick, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                speed,
                real_start: Instant::now(),
                virtual_start,
                offset: Mutex::new(Duration::ZERO),
                tick,
            }),
        }
    }

    /// Real time (speed 1).
    pub fn real() -> Self {
        Self::new(1.0)
    }

    /// A clock that only moves through [`Clock::advance`].
    pub fn manual() -> Self {
        Self::new(0.0)
    }

    /// The speed factor; 0 for a manual clock.
    pub fn speed(&self) -> f64 {
        self.inner.speed
    }

    /// Current virtual time since the Unix epoch.
    pub fn now(&self) -> VirtualTime {
        let offset = *lock(&self.inner.offset);
        let run = if self.inner.speed > 0.0 {
            self.inner.real_start.elapsed().mul_f64(self.inner.speed)
        } else {
            Duration::ZERO
        };
        self.inner.virtual_start + run + offset
    }

    /// Moves virtual time forward (works at any speed) and wakes sleepers.
    pub fn advance(&self, by: Duration) {
        {
            let mut offset = lock(&self.inner.offset);
            *offset += by;
        }
        self.inner.tick.send_modify(|t| *t = t.wrapping_add(1));
    }

    /// Converts a virtual duration into the real time it takes at this speed
    /// (`None` on a manual clock, where only `advance` moves time).
    pub fn to_real(&self, virtual_duration: Duration) -> Option<Duration> {
        (self.inner.speed > 0.0).then(|| virtual_duration.div_f64(self.inner.speed))
    }

    /// Sleeps until `virtual_duration` of virtual time has passed.
    pub async fn sleep(&self, virtual_duration: Duration) {
        let deadline = self.now() + virtual_duration;
        self.sleep_until(deadline).await;
    }

    /// Sleeps until the virtual clock reaches `deadline`.
    pub async fn sleep_until(&self, deadline: VirtualTime) {
        let mut ticks = self.inner.tick.subscribe();
        loop {
            let now = self.now();
            if now >= deadline {
                return;
            }
            match self.to_real(deadline - now) {
                Some(real) => {
                    // Cap each real wait so an `advance` on a running clock is
                    // noticed even if the watch is missed.
                    tokio::select! {
                        _ = tokio::time::sleep(real.min(Duration::from_secs(1))) => {}
                        _ = ticks.changed() => {}
                    }
                }
                None => {
                    if ticks.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Seconds a client should wait, as written in a `Retry-After` header, for a
    /// virtual wait. When `scale` is set and the clock runs fast, the figure is
    /// divided by the speed so that real clients honouring it wait the scaled
    /// time (rounded up, at least 1 s when the virtual wait is positive).
    pub fn retry_after_secs(&self, virtual_wait: Duration, scale: bool) -> u64 {
        let wait = match (scale, self.to_real(virtual_wait)) {
            (true, Some(real)) => real,
            _ => virtual_wait,
        };
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        if virtual_wait.is_zero() {
            0
        } else {
            secs.max(1)
        }
    }
}

/// Wall time since the Unix epoch, in seconds (for JWTs and token bodies).
pub fn wall_now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn split(t: Duration) -> (i64, u32, u32, u32, u32, u32, u32) {
    let secs = t.as_secs() as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    (
        y,
        mo,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
        t.subsec_nanos() / 100,
    )
}

/// ARM's timestamp form, e.g. `2017-01-06T18:58:24.7596323+00:00` (as in
/// operation-status answers).
pub fn arm_timestamp(t: Duration) -> String {
    let (y, mo, d, h, mi, s, ticks) = split(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ticks:07}+00:00")
}

/// Entra's error timestamp form, `2025-01-01 00:00:00Z`.
pub fn aad_timestamp(t: Duration) -> String {
    let (y, mo, d, h, mi, s, _) = split(t);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_like_azure() {
        let t = Duration::from_secs(1_483_728_704) + Duration::from_nanos(759_632_300);
        assert_eq!(arm_timestamp(t), "2017-01-06T18:51:44.7596323+00:00");
        assert_eq!(
            aad_timestamp(Duration::from_secs(1_735_689_600)),
            "2025-01-01 00:00:00Z"
        );
        assert_eq!(
            aad_timestamp(Duration::from_secs(951_782_400)),
            "2000-02-29 00:00:00Z"
        );
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = Clock::manual();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_secs(60));
        assert_eq!(c.now() - t0, Duration::from_secs(60));
        assert_eq!(c.to_real(Duration::from_secs(1)), None);
    }

    #[test]
    fn accelerated_clock_scales_durations() {
        let c = Clock::new(1000.0);
        assert_eq!(
            c.to_real(Duration::from_secs(50)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(c.retry_after_secs(Duration::from_secs(15), true), 1);
        assert_eq!(c.retry_after_secs(Duration::from_secs(15), false), 15);
        assert_eq!(c.retry_after_secs(Duration::ZERO, true), 0);
    }

    #[tokio::test]
    async fn manual_sleep_wakes_on_advance() {
        let c = Clock::manual();
        let c2 = c.clone();
        let sleeper = tokio::spawn(async move { c2.sleep(Duration::from_secs(50)).await });
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(!sleeper.is_finished());
        c.advance(Duration::from_secs(50));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("sleeper woke")
            .expect("task ok");
    }
}

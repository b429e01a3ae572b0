//! When to ask ARM again whether a running operation (a VMSS/VM identity
//! PATCH) has ended. ARM offers no push for the end of an operation, so
//! the delay between the end and MIC noticing it is set by the poll
//! spacing. The schedule:
//!
//! - honours every `Retry-After` ARM sends as the least wait before the
//!   next poll (the write's answer for the first poll, a status answer for
//!   the one after it);
//! - between polls, keeps to the last `Retry-After` ARM sent for the
//!   operation (Compute's status answers carry none; its write answers may),
//!   or to the fallback spacing when ARM sent none at all;
//! - polls densely over the window in which earlier operations of the same
//!   kind ended ([`Endings`]): at most [`PollPolicy::window_polls`] polls
//!   spread over it, never closer than [`PollPolicy::min_spacing`];
//! - past the window, widens the spacing step by step (doubling it from the
//!   window's) back to the usual one, so an operation a little longer than
//!   any seen is noticed almost as soon (a few more reads for one much
//!   longer).
//!
//! So one operation costs about `L / spacing + window_polls` status reads,
//! a few dozen at most, against ARM's read budget of 12,000 per hour per
//! subscription and principal and Compute's `GetOperation3Min` bucket
//! (50,000 per 3 minutes in recorded answers).
//!
//! Pure: time is a [`Duration`] since ARM accepted the write.

use std::collections::VecDeque;
use std::time::Duration;

/// Fixed settings of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollPolicy {
    /// Spacing when ARM sent no `Retry-After` for the operation
    /// (go-autorest's `PollingDelay`, which upstream MIC kept: 5 s).
    pub fallback: Duration,
    /// Closest two polls of one operation may be.
    pub min_spacing: Duration,
    /// Most polls spent inside the window where earlier operations ended.
    pub window_polls: u32,
    /// Longest single wait, whatever ARM says.
    pub max_delay: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            fallback: Duration::from_secs(5),
            min_spacing: Duration::from_millis(100),
            window_polls: 20,
            max_delay: Duration::from_secs(60),
        }
    }
}

/// Where recent operations of one kind ended: each between the last poll
/// that found it running and the poll that found it ended, as time since
/// the write was accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endings {
    brackets: VecDeque<(Duration, Duration)>,
}

impl Endings {
    /// Operations remembered per kind.
    pub const KEPT: usize = 8;

    /// Records an operation that was still running at `running` and had
    /// ended at `ended`.
    pub fn record(&mut self, running: Duration, ended: Duration) {
        if self.brackets.len() == Self::KEPT {
            self.brackets.pop_front();
        }
        self.brackets.push_back((running.min(ended), ended));
    }

    /// The span all remembered operations ended in: from the earliest
    /// "still running" to the latest "ended"; `None` before the first.
    pub fn window(&self) -> Option<(Duration, Duration)> {
        let lo = self.brackets.iter().map(|b| b.0).min()?;
        let hi = self.brackets.iter().map(|b| b.1).max()?;
        Some((lo, hi))
    }
}

/// What is known of the running operation when the next poll is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Time since ARM accepted the write.
    pub elapsed: Duration,
    /// `Retry-After` of the answer just received (the write's, before the
    /// first poll).
    pub retry_after: Option<Duration>,
    /// The latest `Retry-After` ARM sent for this operation in any answer.
    pub last_hint: Option<Duration>,
}

/// How long to wait before the next poll.
pub fn next_delay(
    policy: &PollPolicy,
    progress: &Progress,
    window: Option<(Duration, Duration)>,
) -> Duration {
    let unit = progress
        .last_hint
        .unwrap_or(policy.fallback)
        .max(policy.min_spacing);
    let now = progress.elapsed;
    let planned = match window {
        Some((lo, hi)) => {
            let span = hi.saturating_sub(lo);
            let spacing = (span / policy.window_polls.max(1)).max(policy.min_spacing);
            let start = lo.saturating_sub(spacing);
            let end = hi + spacing;
            if now < start {
                // Keep the usual spacing, but be there when the window opens.
                unit.min(start - now)
            } else if now < end {
                spacing
            } else {
                // Doubling from the window's spacing: polls at about end +
                // spacing, + 3 spacings, + 7 spacings, ... (the lag stays
                // under the time past the window).
                (now - end + spacing).max(spacing).min(unit)
            }
        }
        None => unit,
    };
    let floor = progress
        .retry_after
        .unwrap_or_default()
        .max(policy.min_spacing);
    planned.max(floor).min(policy.max_delay)
}

#[cfg(test)]
mod tests;

//! The ARM-aware scheduler (beyond upstream, whose users saw thousands of
//! PATCHes an hour and 429s on busy scale sets): a local mirror of
//! Microsoft.Compute's write buckets per VMSS/VM and per subscription (burst
//! 12, 4/min per scale set; 1,500 burst, 500/min per subscription;
//! docs/upstream-behaviour.md#azure-throttling), corrected from the
//! `x-ms-ratelimit-remaining-resource` header and `Retry-After`, so MIC
//! spends writes within budget instead of provoking 429s; and the linger of
//! lazy removal, so a CronJob's identity does not churn the scale set.
//!
//! Everything here is pure: time is a [`Duration`] since an origin the
//! caller picks (the executor uses its start; tests use any value).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::cloud::ResourceRef;
use crate::plan::Plan;

/// One token bucket's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketSpec {
    /// Tokens when full.
    pub burst: f64,
    /// Tokens added per minute.
    pub per_minute: f64,
}

/// Compute's write budget as MIC assumes it (configurable).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Per VMSS or VM ("VMSS Update" / "VM Update" per-resource bucket).
    pub resource: BucketSpec,
    /// Per subscription and region, shared with every other tool.
    pub subscription: BucketSpec,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            resource: BucketSpec {
                burst: 12.0,
                per_minute: 4.0,
            },
            subscription: BucketSpec {
                burst: 1500.0,
                per_minute: 500.0,
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Bucket {
    tokens: f64,
    at: Duration,
}

impl Bucket {
    fn full(spec: BucketSpec, now: Duration) -> Self {
        Bucket {
            tokens: spec.burst,
            at: now,
        }
    }

    fn refill(&mut self, spec: BucketSpec, now: Duration) {
        if now > self.at {
            let minutes = (now - self.at).as_secs_f64() / 60.0;
            self.tokens = (self.tokens + minutes * spec.per_minute).min(spec.burst);
            self.at = now;
        }
    }

    /// Time until one token is there (zero when it already is).
    fn wait(&self, spec: BucketSpec) -> Duration {
        let missing = 1.0 - self.tokens;
        // Refill arithmetic in f64 may miss a whole token by a hair.
        if missing <= 1e-9 {
            return Duration::ZERO;
        }
        if spec.per_minute <= 0.0 {
            // Never refills: look again in a minute (a header may correct it).
            return Duration::from_secs(60);
        }
        Duration::from_secs_f64((missing / spec.per_minute * 60.0).min(86_400.0))
    }
}

/// The local mirror of Compute's write buckets.
#[derive(Clone, Debug)]
pub struct Budget {
    limits: Limits,
    resources: BTreeMap<ResourceRef, Bucket>,
    subscription: Option<Bucket>,
    /// Retry-After per resource: nothing is sent to it before then.
    paused: BTreeMap<ResourceRef, Duration>,
}

/// One entry of `x-ms-ratelimit-remaining-resource`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remaining {
    /// Policy name without the `Microsoft.Compute/` prefix.
    pub policy: String,
    pub remaining: u64,
}

/// Parses `Microsoft.Compute/<policy>;<n>[,Microsoft.Compute/<policy>;<n>...]`
/// (several policies may be comma-joined); malformed entries are skipped.
pub fn parse_remaining(header: &str) -> Vec<Remaining> {
    header
        .split(',')
        .filter_map(|entry| {
            let (name, n) = entry.trim().rsplit_once(';')?;
            let policy = name.rsplit('/').next().unwrap_or(name).trim();
            let remaining = n.trim().parse::<u64>().ok()?;
            (!policy.is_empty()).then(|| Remaining {
                policy: policy.to_string(),
                remaining,
            })
        })
        .collect()
}

/// Whether a policy is a subscription-wide one (`...SubscriptionMaximum`,
/// or any name that says subscription); the others count per resource.
fn is_subscription_policy(policy: &str) -> bool {
    policy.to_ascii_lowercase().contains("subscription")
}

/// Whether a policy counts reads (`GetVMScaleSet3Min`,
/// `HighCostGetVMScaleSet30Min`, `LowCostGet3Min`, `GetOperation...`). A GET answer
/// lists these; they say nothing about the write buckets, so they never correct the
/// mirror.
fn is_read_policy(policy: &str) -> bool {
    policy.to_ascii_lowercase().contains("get")
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Budget {
            limits,
            resources: BTreeMap::new(),
            subscription: None,
            paused: BTreeMap::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn buckets(&mut self, r: &ResourceRef, now: Duration) -> (&mut Bucket, &mut Bucket) {
        let l = self.limits;
        let res = self
            .resources
            .entry(r.clone())
            .or_insert_with(|| Bucket::full(l.resource, now));
        res.refill(l.resource, now);
        let sub = self
            .subscription
            .get_or_insert_with(|| Bucket::full(l.subscription, now));
        sub.refill(l.subscription, now);
        (res, sub)
    }

    /// When a write to `r` may be sent, if not now.
    pub fn wait(&mut self, r: &ResourceRef, now: Duration) -> Option<Duration> {
        let pause = self
            .paused
            .get(r)
            .copied()
            .filter(|t| *t > now)
            .map(|t| t - now)
            .unwrap_or_default();
        let l = self.limits;
        let (res, sub) = self.buckets(r, now);
        let wait = pause
            .max(res.wait(l.resource))
            .max(sub.wait(l.subscription));
        (!wait.is_zero()).then_some(wait)
    }

    /// Takes one write token for `r`; `Err(wait)` when the budget is spent
    /// (nothing is taken then).
    pub fn try_acquire(&mut self, r: &ResourceRef, now: Duration) -> Result<(), Duration> {
        if let Some(wait) = self.wait(r, now) {
            return Err(wait);
        }
        let (res, sub) = self.buckets(r, now);
        res.tokens = (res.tokens - 1.0).max(0.0);
        sub.tokens = (sub.tokens - 1.0).max(0.0);
        Ok(())
    }

    /// Corrects the mirror from `x-ms-ratelimit-remaining-resource` of any
    /// answer about `r` (a write, or a GET): for the write policies it lists,
    /// ARM's count wins over ours, in both directions, capped at the burst.
    /// Read policies are skipped.
    pub fn observe_remaining(&mut self, r: &ResourceRef, header: &str, now: Duration) {
        let entries = parse_remaining(header);
        let min_of = |sub: bool| {
            entries
                .iter()
                .filter(|e| !is_read_policy(&e.policy))
                .filter(|e| is_subscription_policy(&e.policy) == sub)
                .map(|e| e.remaining)
                .min()
        };
        let (res_min, sub_min) = (min_of(false), min_of(true));
        let l = self.limits;
        let (res, sub) = self.buckets(r, now);
        if let Some(n) = res_min {
            res.tokens = (n as f64).min(l.resource.burst);
        }
        if let Some(n) = sub_min {
            sub.tokens = (n as f64).min(l.subscription.burst);
        }
    }

    /// `x-ms-ratelimit-remaining-subscription-writes` of a write answer
    /// (ARM's own per-subscription write budget): another
    /// limit over the same writes, so it can only lower the subscription
    /// bucket of the mirror, never fill it.
    pub fn observe_subscription_writes(&mut self, remaining: u64, now: Duration) {
        let spec = self.limits.subscription;
        let sub = self
            .subscription
            .get_or_insert_with(|| Bucket::full(spec, now));
        sub.refill(spec, now);
        sub.tokens = sub.tokens.min(remaining as f64);
    }

    /// A 429 (or any answer with Retry-After) on `r`: this resource only is paused
    /// (upstream paused all of them:
    /// docs/upstream-behaviour.md#h8-one-throttle-for-all-scale-sets), and ARM's word
    /// wins over the mirror: its bucket is set so that exactly one token is there when
    /// the wait ends.
    pub fn observe_retry_after(&mut self, r: &ResourceRef, after: Duration, now: Duration) {
        let spec = self.limits.resource;
        let (res, _) = self.buckets(r, now);
        res.tokens = 1.0 - after.as_secs_f64() / 60.0 * spec.per_minute;
        let until = now + after;
        let entry = self.paused.entry(r.clone()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Tokens left for `r` and for the subscription (for tests and logs).
    pub fn tokens(&mut self, r: &ResourceRef, now: Duration) -> (f64, f64) {
        let (res, sub) = self.buckets(r, now);
        (res.tokens, sub.tokens)
    }
}

/// Lazy removal: an identity no AAI needs on a VMSS/VM any more is taken off
/// only after it stayed unneeded for the linger; a pod that comes back within
/// it needs no ARM write, since the identity is still there.
#[derive(Clone, Debug, Default)]
pub struct Linger {
    linger: Duration,
    /// (resource, identity ID) → when it was first seen unneeded.
    since: BTreeMap<(ResourceRef, String), Duration>,
}

impl Linger {
    pub fn new(linger: Duration) -> Self {
        Linger {
            linger,
            since: BTreeMap::new(),
        }
    }

    /// Holds back the removals of retiring AAIs that have not lingered long
    /// enough: the identity stays on the resource and its AAIs stay as they
    /// are (they leave with the removal). Removals that no AAI waits on (an
    /// edited identity) are never held. Returns when the next held removal
    /// falls due.
    pub fn hold(&mut self, plan: &mut Plan, now: Duration) -> Option<Duration> {
        if self.linger.is_zero() {
            self.since.clear();
            return None;
        }
        let mut seen: BTreeSet<(ResourceRef, String)> = BTreeSet::new();
        let mut next: Option<Duration> = None;
        for (r, w) in plan.resources.iter_mut() {
            let retiring: BTreeSet<String> = w
                .delete_on_success
                .iter()
                .map(|(_, id)| id.clone())
                .collect();
            let mut held: BTreeSet<String> = BTreeSet::new();
            for id in w.remove.iter().filter(|id| retiring.contains(*id)) {
                let k = (r.clone(), id.clone());
                let since = *self.since.entry(k.clone()).or_insert(now);
                seen.insert(k);
                let due = since + self.linger;
                if due > now {
                    held.insert(id.clone());
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
            w.remove.retain(|id| !held.contains(id));
            w.delete_on_success.retain(|(_, id)| !held.contains(id));
        }
        plan.resources.retain(|_, w| {
            !(w.add.is_empty()
                && w.remove.is_empty()
                && w.assign_on_success.is_empty()
                && w.delete_on_success.is_empty())
        });
        // Needed again (or gone): the clock restarts next time.
        self.since.retain(|k, _| seen.contains(k));
        next.map(|due| due - now)
    }
}

/// How many times its own length a cycle keeps the next one away: a cycle
/// plans over every pod and AAI, so under a stream of changes (thousands of
/// pods arriving) back-to-back cycles would spend the CPU on planning.
pub const CYCLE_SPACING: u32 = 4;

/// When a cycle starts for a change seen at `now`, the last cycle having
/// started at `start` and taken `took` (`None`: none yet): at once after a
/// quiet spell, so a lone new pod's identity write is not delayed; else
/// `debounce`, or [`CYCLE_SPACING`] times the last cycle's length if more,
/// after the last start, so changes arriving close together (a burst of
/// pods) are folded into one cycle.
pub fn cycle_at(last: Option<(Duration, Duration)>, now: Duration, debounce: Duration) -> Duration {
    last.map_or(now, |(start, took)| {
        (start + debounce.max(took * CYCLE_SPACING)).max(now)
    })
}

#[cfg(test)]
mod tests;

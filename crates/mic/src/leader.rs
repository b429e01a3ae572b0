//! Leader election on a `coordination.k8s.io` Lease and, while
//! `--leader-election-endpoints-lock` is on, also on upstream v1.8.17's
//! Endpoints lock of the same namespace and name: this replica leads only
//! while it holds both, renews both with the same record, and writes the
//! Endpoints record as client-go does, so an upstream mic sees the holder
//! and stays standby (the pattern of client-go's migration lock).
//!
//! Timings as upstream: renew deadline = duration/2, retry period =
//! duration/4. The Endpoints record keeps whole seconds, so an upstream
//! standby may see a renewal up to a second late; with that lock the renew
//! deadline is also at most duration - 1 s, and a leader stops acting before
//! any standby can call its claim expired.
//!
//! The decisions are in [`decide`] (pure); this module reads, writes and
//! keeps time.

mod decide;
mod locks;
mod record;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use aadpodid_runtime::Shutdown;

use decide::{Decision, Me, Seen, decide, observe, released};
use locks::{Kind, Lock};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    /// Also hold upstream's Endpoints lock of the same namespace and name
    /// (`--leader-election-endpoints-lock`).
    pub endpoints_lock: bool,
}

impl LeaderConfig {
    fn renew_deadline(&self) -> Duration {
        let half = self.lease_duration / 2;
        if self.endpoints_lock {
            half.min(self.lease_duration.saturating_sub(Duration::from_secs(1)))
        } else {
            half
        }
    }

    /// `namespace/name`, as client-go describes a lock.
    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn retry_period(&self) -> Duration {
        (self.lease_duration / 4).max(Duration::from_millis(100))
    }

    /// The locks, in write order: the Endpoints lock first (as client-go's
    /// migration lock), then the Lease.
    fn locks(&self, client: &Client) -> Vec<Lock> {
        let mut kinds = Vec::new();
        if self.endpoints_lock {
            kinds.push(Kind::Endpoints);
        }
        kinds.push(Kind::Lease);
        kinds
            .into_iter()
            .map(|k| Lock::new(client, k, &self.namespace, &self.name))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the lease {namespace}/{name}")]
    LostLease { namespace: String, name: String },
}

/// What one round came to.
enum Round {
    /// Every lock now carries this replica's record; written from `at` on.
    Held {
        at: Instant,
    },
    Standby {
        lock: Kind,
        holder: String,
        remaining: Duration,
    },
    Lost {
        lock: Kind,
        holder: Option<String>,
    },
    Failed {
        lock: Kind,
        writing: bool,
        error: kube::Error,
    },
    TimedOut,
}

/// Runs the election until shutdown (Ok) or until a lock is lost (Err).
/// `leading` is true exactly while this replica may write.
pub async fn run(
    client: Client,
    cfg: LeaderConfig,
    leading: watch::Sender<bool>,
    shutdown: Shutdown,
) -> Result<(), LeaderError> {
    let locks = cfg.locks(&client);
    if cfg.endpoints_lock && cfg.lease_duration < Duration::from_secs(2) {
        tracing::warn!(
            duration = ?cfg.lease_duration,
            "with the Endpoints lock a lease under 2 s leaves no time to renew: set --leader-election-duration to 2s or more"
        );
    }
    let mut seen: Vec<Option<Seen>> = vec![None; locks.len()];
    let mut last_renew = Instant::now();
    let mut standby_on: Option<(Kind, String)> = None;
    loop {
        let is_leader = *leading.borrow();
        let deadline = last_renew + cfg.renew_deadline();
        // A leader's round may not outlast its renew deadline.
        let budget = if is_leader {
            deadline.saturating_duration_since(Instant::now())
        } else {
            cfg.lease_duration
        };
        let outcome = tokio::time::timeout(budget, round(&locks, &cfg, &mut seen, is_leader))
            .await
            .unwrap_or(Round::TimedOut);
        match outcome {
            Round::Held { at } => {
                last_renew = at;
                if !is_leader {
                    tracing::info!(
                        lock = %cfg.describe(), identity = %cfg.identity, endpoints_lock = cfg.endpoints_lock,
                        "became leader"
                    );
                    standby_on = None;
                    leading.send_replace(true);
                }
            }
            Round::Standby {
                lock,
                holder,
                remaining,
            } => {
                let key = (lock, holder);
                if standby_on.as_ref() != Some(&key) {
                    tracing::info!(
                        lock = %cfg.describe(), kind = %key.0,
                        holder = %key.1, ?remaining, "standby: the lock is held"
                    );
                    standby_on = Some(key);
                }
            }
            Round::Lost { lock, holder } => {
                // Stop writes before anything else.
                leading.send_replace(false);
                tracing::error!(
                    lock = %cfg.describe(), kind = %lock, holder = holder.as_deref().unwrap_or("(object deleted)"),
                    "lost leader lease: the lock was written by another process"
                );
                return Err(lost(&cfg));
            }
            Round::Failed {
                lock,
                writing,
                error,
            } => log_failure(&cfg, lock, writing, &error),
            Round::TimedOut => {
                tracing::warn!(lock = %cfg.describe(), "leader election round timed out")
            }
        }
        let is_leader = *leading.borrow();
        if is_leader && Instant::now() >= last_renew + cfg.renew_deadline() {
            leading.send_replace(false);
            tracing::error!(lock = %cfg.describe(), "lost leader lease: not renewed within the deadline");
            return Err(lost(&cfg));
        }
        let mut wake = Instant::now() + cfg.retry_period();
        if is_leader {
            wake = wake.min(last_renew + cfg.renew_deadline());
        }
        tokio::select! {
            _ = shutdown.signaled() => {
                if *leading.borrow() {
                    leading.send_replace(false);
                    release(&locks, &cfg).await;
                }
                return Ok(());
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

fn lost(cfg: &LeaderConfig) -> LeaderError {
    LeaderError::LostLease {
        namespace: cfg.namespace.clone(),
        name: cfg.name.clone(),
    }
}

fn log_failure(cfg: &LeaderConfig, lock: Kind, writing: bool, error: &kube::Error) {
    let op = if writing { "writing" } else { "reading" };
    match error {
        // Another replica wrote first: the next round reads who.
        kube::Error::Api(s) if s.code == 409 => {
            tracing::debug!(kind = %lock, "leader lock changed while {op} it");
        }
        kube::Error::Api(s) if s.code == 403 && lock == Kind::Endpoints => tracing::warn!(
            %error,
            "{op} the Endpoints lock {} is forbidden: grant endpoints get, create and update in that namespace, or set --leader-election-endpoints-lock=false once no upstream mic can run",
            cfg.describe()
        ),
        _ => tracing::warn!(%error, kind = %lock, "{op} the leader lock"),
    }
}

/// Reads every lock, decides, and writes when the decision says so.
async fn round(
    locks: &[Lock],
    cfg: &LeaderConfig,
    seen: &mut [Option<Seen>],
    leading: bool,
) -> Round {
    let mut current = Vec::with_capacity(locks.len());
    for lock in locks {
        match lock.read().await {
            Ok(c) => current.push(c),
            Err(error) => {
                return Round::Failed {
                    lock: lock.kind,
                    writing: false,
                    error,
                };
            }
        }
    }
    let now = Instant::now();
    for (s, c) in seen.iter_mut().zip(&current) {
        *s = Some(observe(s.as_ref(), c.record(), now));
    }
    let views: Vec<Seen> = seen.iter().flatten().cloned().collect();
    let me = Me {
        identity: &cfg.identity,
        leading,
        lease_duration: cfg.lease_duration,
    };
    match decide(&me, &views, now, Timestamp::now()) {
        Decision::Wait {
            lock,
            holder,
            remaining,
        } => Round::Standby {
            lock: kind_of(locks, lock),
            holder,
            remaining,
        },
        Decision::Lost { lock, holder } => Round::Lost {
            lock: kind_of(locks, lock),
            holder,
        },
        Decision::Write(record) => {
            let at = Instant::now();
            for ((lock, c), s) in locks.iter().zip(current).zip(seen.iter_mut()) {
                match lock.write(c, &record).await {
                    Ok(stored) => {
                        if let Some(s) = s {
                            s.mine = Some(stored);
                        }
                    }
                    Err(error) => {
                        return Round::Failed {
                            lock: lock.kind,
                            writing: true,
                            error,
                        };
                    }
                }
            }
            Round::Held { at }
        }
    }
}

fn kind_of(locks: &[Lock], i: usize) -> Kind {
    locks.get(i).map_or(Kind::Lease, |l| l.kind)
}

/// Hands every lock that names this replica over at shutdown, so a standby
/// (upstream's included) need not wait for expiry.
async fn release(locks: &[Lock], cfg: &LeaderConfig) {
    for lock in locks {
        let current = match lock.read().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, kind = %lock.kind, "reading the leader lock to release it");
                continue;
            }
        };
        let Some(record) = released(&cfg.identity, current.record().as_ref(), Timestamp::now())
        else {
            continue;
        };
        if let Err(error) = lock.write(current, &record).await {
            tracing::warn!(%error, kind = %lock.kind, "releasing the leader lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        let ms = Duration::from_millis;
        // (duration, endpoints lock, renew deadline, retry period)
        let cases = [
            (ms(15_000), true, ms(7_500), ms(3_750)),
            (ms(15_000), false, ms(7_500), ms(3_750)),
            (ms(4_000), true, ms(2_000), ms(1_000)),
            // Whole seconds in the Endpoints record: a second less than the duration.
            (ms(2_000), true, ms(1_000), ms(500)),
            (ms(1_500), true, ms(500), ms(375)),
            (ms(1_500), false, ms(750), ms(375)),
            (ms(200), false, ms(100), ms(100)),
        ];
        for (duration, endpoints_lock, deadline, retry) in cases {
            let cfg = LeaderConfig {
                namespace: "ns".into(),
                name: "aad-pod-identity-mic".into(),
                identity: "mic-0".into(),
                lease_duration: duration,
                endpoints_lock,
            };
            assert_eq!(
                (cfg.renew_deadline(), cfg.retry_period()),
                (deadline, retry),
                "{duration:?} endpoints={endpoints_lock}"
            );
        }
    }
}

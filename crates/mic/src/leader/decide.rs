//! What a replica does in one round of the election, given the records of
//! its locks as just read. With several locks (upstream's Endpoints lock,
//! then the Lease) it leads only while holding all of them, and writes the
//! same record to each, as client-go's migration lock does.
//!
//! Expiry is judged as client-go judges it: on this replica's clock, from
//! when it last saw a record change, never from the times written in it, so
//! clock skew between replicas does not matter.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::record::Record;

/// One lock as this replica last read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `None`: the object does not exist.
    pub record: Option<Record>,
    /// Since when (local clock) the record has not changed.
    pub since: Instant,
}

/// Folds a fresh read into what was seen before: `since` moves only when the
/// record changed.
pub fn observe(before: Option<&Seen>, record: Option<Record>, now: Instant) -> Seen {
    let since = match before {
        Some(b) if b.record == record => b.since,
        _ => now,
    };
    Seen { record, since }
}

/// This replica, as the decision needs it.
#[derive(Clone, Copy, Debug)]
pub struct Me<'a> {
    pub identity: &'a str,
    /// Whether it held every lock after its last round.
    pub leading: bool,
    pub lease_duration: Duration,
}

/// The outcome of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every lock is free or ours: write this record to each (creating those
    /// that do not exist), in order; lead once every write landed.
    Write(Record),
    /// Lock `lock` is held by `holder`, whose claim has `remaining` to run:
    /// stay standby.
    Wait {
        lock: usize,
        holder: String,
        remaining: Duration,
    },
    /// This replica led, and lock `lock` now names `holder` (`None`: the
    /// object is gone): stop acting at once.
    Lost { lock: usize, holder: Option<String> },
}

/// How one lock stands for this replica.
enum Stand {
    Free,
    Held { holder: String, remaining: Duration },
}

fn stand(me: &Me, seen: &Seen, now: Instant) -> Stand {
    let Some(r) = &seen.record else {
        return Stand::Free;
    };
    if r.holder.is_empty() || r.holder == me.identity {
        return Stand::Free;
    }
    // The longer of the holder's stated duration and ours: never earlier than
    // either side would call it expired.
    let stated = Duration::from_secs(u64::try_from(r.lease_duration_seconds).unwrap_or(0));
    let expires = seen.since + me.lease_duration.max(stated);
    match expires.checked_duration_since(now) {
        Some(remaining) if !remaining.is_zero() => Stand::Held {
            holder: r.holder.clone(),
            remaining,
        },
        _ => Stand::Free,
    }
}

/// Decides one round over `locks` (in write order; the first is the primary,
/// whose acquire time and transition count a renewal keeps). `wall` is the
/// time written into the record.
pub fn decide(me: &Me, locks: &[Seen], now: Instant, wall: Timestamp) -> Decision {
    if me.leading {
        for (i, seen) in locks.iter().enumerate() {
            match &seen.record {
                None => {
                    return Decision::Lost {
                        lock: i,
                        holder: None,
                    };
                }
                Some(r) if !r.holder.is_empty() && r.holder != me.identity => {
                    return Decision::Lost {
                        lock: i,
                        holder: Some(r.holder.clone()),
                    };
                }
                Some(_) => {}
            }
        }
    } else {
        for (i, seen) in locks.iter().enumerate() {
            if let Stand::Held { holder, remaining } = stand(me, seen, now) {
                return Decision::Wait {
                    lock: i,
                    holder,
                    remaining,
                };
            }
        }
    }
    Decision::Write(next_record(me, locks, wall))
}

fn next_record(me: &Me, locks: &[Seen], wall: Timestamp) -> Record {
    let fresh = Record {
        holder: me.identity.to_string(),
        lease_duration_seconds: i32::try_from(me.lease_duration.as_secs().max(1))
            .unwrap_or(i32::MAX),
        acquire_time: Some(wall),
        renew_time: Some(wall),
        leader_transitions: 0,
    };
    let primary = locks.first().and_then(|s| s.record.as_ref());
    if me.leading
        && let Some(p) = primary.filter(|p| p.holder == me.identity)
    {
        return Record {
            acquire_time: p.acquire_time.or(Some(wall)),
            leader_transitions: p.leader_transitions,
            ..fresh
        };
    }
    let present: Vec<&Record> = locks.iter().filter_map(|s| s.record.as_ref()).collect();
    let Some(most) = present.iter().map(|r| r.leader_transitions).max() else {
        return fresh;
    };
    // A transition unless every existing record already names this replica
    // (a restart under the same identity).
    let changed = present.iter().any(|r| r.holder != me.identity);
    Record {
        leader_transitions: most.saturating_add(i32::from(changed)),
        ..fresh
    }
}

/// The record that hands a lock over at shutdown, as client-go's release
/// writes it (no holder, one second, the count kept); `None` when the lock
/// does not name this replica.
pub fn released(identity: &str, current: Option<&Record>, wall: Timestamp) -> Option<Record> {
    let r = current.filter(|r| r.holder == identity)?;
    Some(Record {
        holder: String::new(),
        lease_duration_seconds: 1,
        acquire_time: Some(wall),
        renew_time: Some(wall),
        leader_transitions: r.leader_transitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::record::UNKNOWN_HOLDER;

    const ME: &str = "mic-ours";
    const GO: &str = "go-mic-0";
    const PEER: &str = "mic-peer";
    const D: Duration = Duration::from_secs(15);

    fn wall() -> Timestamp {
        "2026-12-05T02:00:00.5Z".parse().unwrap()
    }

    fn earlier() -> Timestamp {
        "2026-12-05T01:00:00Z".parse().unwrap()
    }

    /// A record naming `holder` with `transitions`, written earlier, stating
    /// `secs` as its duration.
    fn rec(holder: &str, secs: i32, transitions: i32) -> Option<Record> {
        Some(Record {
            holder: holder.into(),
            lease_duration_seconds: secs,
            acquire_time: Some(earlier()),
            renew_time: Some(earlier()),
            leader_transitions: transitions,
        })
    }

    /// A lock seen unchanged for `age`.
    fn seen(now: Instant, record: Option<Record>, age: Duration) -> Seen {
        Seen {
            record,
            since: now - age,
        }
    }

    fn write(transitions: i32, acquire: Timestamp) -> Decision {
        Decision::Write(Record {
            holder: ME.into(),
            lease_duration_seconds: 15,
            acquire_time: Some(acquire),
            renew_time: Some(wall()),
            leader_transitions: transitions,
        })
    }

    fn wait(lock: usize, holder: &str, remaining: Duration) -> Decision {
        Decision::Wait {
            lock,
            holder: holder.into(),
            remaining,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn decisions() {
        type Lock = (Option<Record>, Duration);
        let none: Lock = (None, secs(0));
        // (what, leading, [(endpoints record, unchanged for), (lease record, unchanged for)], decision)
        let cases: Vec<(&str, bool, Vec<Lock>, Decision)> = vec![
            (
                "a new cluster: create both",
                false,
                vec![none.clone(), none.clone()],
                write(0, wall()),
            ),
            (
                "Go mic holds the Endpoints lock: standby",
                false,
                vec![(rec(GO, 15, 4), secs(5)), none.clone()],
                wait(0, GO, secs(10)),
            ),
            (
                "Go mic's record unchanged for its duration: take both",
                false,
                vec![(rec(GO, 15, 4), secs(15)), none.clone()],
                write(5, wall()),
            ),
            (
                "Go mic released (client-go's release: no holder, 1 s): take at once",
                false,
                vec![(rec("", 1, 4), secs(0)), rec_lock(ME, 3)],
                write(5, wall()),
            ),
            (
                "a longer duration stated by Go mic is waited for",
                false,
                vec![(rec(GO, 60, 0), secs(20)), none.clone()],
                wait(0, GO, secs(40)),
            ),
            (
                "a shorter stated duration does not shorten ours",
                false,
                vec![(rec(GO, 1, 0), secs(10)), none.clone()],
                wait(0, GO, secs(5)),
            ),
            (
                "an unreadable Endpoints record waits out our duration",
                false,
                vec![(rec(UNKNOWN_HOLDER, 0, 0), secs(3)), none.clone()],
                wait(0, UNKNOWN_HOLDER, secs(12)),
            ),
            (
                "Endpoints free, a peer holds the Lease: standby",
                false,
                vec![(rec("", 1, 2), secs(30)), (rec(PEER, 15, 2), secs(1))],
                wait(1, PEER, secs(14)),
            ),
            (
                "Endpoints expired but the Lease not: standby on the Lease",
                false,
                vec![(rec(PEER, 15, 2), secs(20)), (rec(PEER, 15, 2), secs(2))],
                wait(1, PEER, secs(13)),
            ),
            (
                "the two locks name different holders, both unexpired: the first is reported",
                false,
                vec![(rec(GO, 15, 2), secs(1)), (rec(PEER, 15, 7), secs(1))],
                wait(0, GO, secs(14)),
            ),
            (
                "both expired under different holders: take both, past the higher count",
                false,
                vec![(rec(GO, 15, 2), secs(16)), (rec(PEER, 15, 7), secs(15))],
                write(8, wall()),
            ),
            (
                "restart under the same identity: both name us, take at once, no transition",
                false,
                vec![(rec(ME, 15, 3), secs(0)), (rec(ME, 15, 3), secs(0))],
                write(3, wall()),
            ),
            (
                "the Endpoints record names us, a peer's unexpired Lease still waits",
                false,
                vec![(rec(ME, 15, 3), secs(0)), (rec(PEER, 15, 3), secs(0))],
                wait(1, PEER, D),
            ),
            (
                "only the Lease exists (Lease-only history): take it and create the Endpoints",
                false,
                vec![none.clone(), (rec(PEER, 15, 6), secs(15))],
                write(7, wall()),
            ),
            (
                "leading: renew both, keeping acquire time and count",
                true,
                vec![(rec(ME, 15, 5), secs(3)), (rec(ME, 15, 5), secs(3))],
                write(5, earlier()),
            ),
            (
                "leading, and Go mic took the Endpoints lock: lost",
                true,
                vec![(rec(GO, 15, 6), secs(0)), (rec(ME, 15, 5), secs(3))],
                Decision::Lost {
                    lock: 0,
                    holder: Some(GO.into()),
                },
            ),
            (
                "leading, and a peer took the Lease: lost",
                true,
                vec![(rec(ME, 15, 5), secs(0)), (rec(PEER, 15, 6), secs(0))],
                Decision::Lost {
                    lock: 1,
                    holder: Some(PEER.into()),
                },
            ),
            (
                "leading, and the Endpoints object is gone: lost",
                true,
                vec![none.clone(), (rec(ME, 15, 5), secs(0))],
                Decision::Lost {
                    lock: 0,
                    holder: None,
                },
            ),
            (
                "leading, and a record was cleared: written again as a new term",
                true,
                vec![(rec(ME, 15, 5), secs(0)), (rec("", 1, 5), secs(0))],
                write(5, earlier()),
            ),
            (
                "leading, the primary cleared: a new term",
                true,
                vec![(rec("", 1, 5), secs(0)), (rec(ME, 15, 5), secs(0))],
                write(6, wall()),
            ),
        ];
        for (what, leading, locks, want) in cases {
            let now = Instant::now() + secs(3600);
            let locks: Vec<Seen> = locks
                .into_iter()
                .map(|(r, age)| seen(now, r, age))
                .collect();
            let me = Me {
                identity: ME,
                leading,
                lease_duration: D,
            };
            assert_eq!(decide(&me, &locks, now, wall()), want, "{what}");
        }
    }

    /// A Lease record of ours, seen just now.
    fn rec_lock(holder: &str, transitions: i32) -> (Option<Record>, Duration) {
        (rec(holder, 15, transitions), secs(0))
    }

    #[test]
    fn lease_only_decisions() {
        let now = Instant::now() + secs(3600);
        let me = Me {
            identity: ME,
            leading: false,
            lease_duration: D,
        };
        let cases: Vec<(&str, Option<Record>, Duration, Decision)> = vec![
            ("absent: create", None, secs(0), write(0, wall())),
            (
                "held: wait",
                rec(PEER, 15, 1),
                secs(5),
                wait(0, PEER, secs(10)),
            ),
            (
                "expired: take",
                rec(PEER, 15, 1),
                secs(15),
                write(2, wall()),
            ),
            ("released: take", rec("", 1, 1), secs(0), write(2, wall())),
        ];
        for (what, r, age, want) in cases {
            assert_eq!(
                decide(&me, &[seen(now, r, age)], now, wall()),
                want,
                "{what}"
            );
        }
        let leading = Me {
            leading: true,
            ..me
        };
        assert_eq!(
            decide(&leading, &[seen(now, rec(ME, 15, 1), secs(2))], now, wall()),
            write(1, earlier()),
            "renew"
        );
    }

    #[test]
    fn release_only_what_names_us() {
        let mine = rec(ME, 15, 4);
        assert_eq!(
            released(ME, mine.as_ref(), wall()),
            Some(Record {
                holder: String::new(),
                lease_duration_seconds: 1,
                acquire_time: Some(wall()),
                renew_time: Some(wall()),
                leader_transitions: 4,
            })
        );
        assert_eq!(released(ME, rec(GO, 15, 4).as_ref(), wall()), None);
        assert_eq!(released(ME, rec("", 1, 4).as_ref(), wall()), None);
        assert_eq!(released(ME, None, wall()), None);
    }

    #[test]
    fn observations() {
        let t0 = Instant::now();
        let t1 = t0 + secs(4);
        let a = rec(GO, 15, 0);
        let renewed = Some(Record {
            renew_time: Some(wall()),
            ..a.clone().unwrap()
        });
        let first = observe(None, a.clone(), t0);
        assert_eq!(first.since, t0, "first sight");
        assert_eq!(observe(Some(&first), a.clone(), t1).since, t0, "unchanged");
        assert_eq!(observe(Some(&first), renewed, t1).since, t1, "renewed");
        assert_eq!(observe(Some(&first), None, t1).since, t1, "deleted");
        let gone = observe(None, None, t0);
        assert_eq!(observe(Some(&gone), None, t1).since, t0, "still absent");
        assert_eq!(observe(Some(&gone), a, t1).since, t1, "created");
    }
}

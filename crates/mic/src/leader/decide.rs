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
    /// The record as stored by this process's last write to the lock. A
    /// record that names this replica's identity but is not this one was
    /// written by another process (an earlier run, or a replica given the
    /// same `--leader-election-instance`): it is not trusted as ours.
    pub mine: Option<Record>,
}

/// Folds a fresh read into what was seen before: `since` moves only when the
/// record changed.
pub fn observe(before: Option<&Seen>, record: Option<Record>, now: Instant) -> Seen {
    let since = match before {
        Some(b) if b.record == record => b.since,
        _ => now,
    };
    Seen {
        record,
        since,
        mine: before.and_then(|b| b.mine.clone()),
    }
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
    /// This replica led, and lock `lock` is no longer as it left it: it
    /// names `holder` (`None`: the object is gone). Stop acting at once.
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
    if r.holder.is_empty() || seen.mine.as_ref() == Some(r) {
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
        // Only this process writes a lock it holds: anything else there
        // (another holder, a release, the same identity renewed by another
        // process, the object gone) means it may no longer be alone.
        for (i, seen) in locks.iter().enumerate() {
            if seen.record.is_none() || seen.record != seen.mine {
                return Decision::Lost {
                    lock: i,
                    holder: seen.record.as_ref().map(|r| r.holder.clone()),
                };
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

    /// A lock as read: its record, unchanged for `age`, and whether this
    /// process wrote it as it is.
    #[derive(Clone)]
    struct Lock {
        record: Option<Record>,
        age: Duration,
        mine: bool,
    }

    /// Read unchanged for `age`, not written by this process.
    fn read(record: Option<Record>, age: u64) -> Lock {
        Lock {
            record,
            age: secs(age),
            mine: false,
        }
    }

    /// As this process last wrote it, `age` ago.
    fn own(record: Option<Record>, age: u64) -> Lock {
        Lock {
            mine: true,
            ..read(record, age)
        }
    }

    fn absent() -> Lock {
        read(None, 0)
    }

    fn seen(now: Instant, l: Lock) -> Seen {
        Seen {
            mine: if l.mine { l.record.clone() } else { None },
            record: l.record,
            since: now - l.age,
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

    fn wait(lock: usize, holder: &str, remaining: u64) -> Decision {
        Decision::Wait {
            lock,
            holder: holder.into(),
            remaining: secs(remaining),
        }
    }

    fn lost(lock: usize, holder: Option<&str>) -> Decision {
        Decision::Lost {
            lock,
            holder: holder.map(String::from),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn run(leading: bool, locks: Vec<Lock>) -> Decision {
        let now = Instant::now() + secs(3600);
        let locks: Vec<Seen> = locks.into_iter().map(|l| seen(now, l)).collect();
        let me = Me {
            identity: ME,
            leading,
            lease_duration: D,
        };
        decide(&me, &locks, now, wall())
    }

    #[test]
    fn standby_decisions() {
        // (what, [endpoints, lease], decision); this replica does not lead.
        let cases: Vec<(&str, Vec<Lock>, Decision)> = vec![
            (
                "a new cluster: create both",
                vec![absent(), absent()],
                write(0, wall()),
            ),
            (
                "Go mic holds the Endpoints lock: standby",
                vec![read(rec(GO, 15, 4), 5), absent()],
                wait(0, GO, 10),
            ),
            (
                "Go mic's record unchanged for the lease: take both",
                vec![read(rec(GO, 15, 4), 15), absent()],
                write(5, wall()),
            ),
            (
                "Go mic released (no holder, 1 s): take at once",
                vec![read(rec("", 1, 4), 0), read(rec("", 1, 3), 0)],
                write(5, wall()),
            ),
            (
                "a longer duration stated by Go mic is waited for",
                vec![read(rec(GO, 60, 0), 20), absent()],
                wait(0, GO, 40),
            ),
            (
                "a shorter stated duration does not shorten ours",
                vec![read(rec(GO, 1, 0), 10), absent()],
                wait(0, GO, 5),
            ),
            (
                "an unreadable Endpoints record waits out our duration",
                vec![read(rec(UNKNOWN_HOLDER, 0, 0), 3), absent()],
                wait(0, UNKNOWN_HOLDER, 12),
            ),
            (
                "Endpoints free, a peer holds the Lease: standby",
                vec![read(rec("", 1, 2), 30), read(rec(PEER, 15, 2), 1)],
                wait(1, PEER, 14),
            ),
            (
                "Endpoints expired but not the Lease: standby on the Lease",
                vec![read(rec(PEER, 15, 2), 20), read(rec(PEER, 15, 2), 2)],
                wait(1, PEER, 13),
            ),
            (
                "different holders, both unexpired: the first is reported",
                vec![read(rec(GO, 15, 2), 1), read(rec(PEER, 15, 7), 1)],
                wait(0, GO, 14),
            ),
            (
                "both expired under different holders: take both, past the higher count",
                vec![read(rec(GO, 15, 2), 16), read(rec(PEER, 15, 7), 15)],
                write(8, wall()),
            ),
            (
                "our identity written by another process (a restart, or a twin instance name): waited out",
                vec![read(rec(ME, 15, 3), 1), read(rec(ME, 15, 3), 1)],
                wait(0, ME, 14),
            ),
            (
                "our identity, unchanged for the lease: taken, no transition",
                vec![read(rec(ME, 15, 3), 15), read(rec(ME, 15, 3), 15)],
                write(3, wall()),
            ),
            (
                "our own write (the Lease write failed last round): the Endpoints lock stays ours",
                vec![own(rec(ME, 15, 3), 2), read(rec("", 1, 2), 0)],
                write(4, wall()),
            ),
            (
                "our Endpoints write, and a peer's unexpired Lease: standby",
                vec![own(rec(ME, 15, 3), 0), read(rec(PEER, 15, 3), 0)],
                wait(1, PEER, 15),
            ),
            (
                "only a Lease (a Lease-only history): take it past its count, create the Endpoints",
                vec![absent(), read(rec(PEER, 15, 6), 15)],
                write(7, wall()),
            ),
        ];
        for (what, locks, want) in cases {
            assert_eq!(run(false, locks), want, "{what}");
        }
    }

    #[test]
    fn leader_decisions() {
        let renewed_elsewhere = Some(Record {
            renew_time: Some(wall()),
            ..rec(ME, 15, 5).unwrap()
        });
        // (what, [endpoints, lease], decision); this replica leads.
        let cases: Vec<(&str, Vec<Lock>, Decision)> = vec![
            (
                "both as we left them: renew, keeping acquire time and count",
                vec![own(rec(ME, 15, 5), 3), own(rec(ME, 15, 5), 3)],
                write(5, earlier()),
            ),
            (
                "Go mic took the Endpoints lock",
                vec![read(rec(GO, 15, 6), 0), own(rec(ME, 15, 5), 3)],
                lost(0, Some(GO)),
            ),
            (
                "a peer took the Lease",
                vec![own(rec(ME, 15, 5), 0), read(rec(PEER, 15, 6), 0)],
                lost(1, Some(PEER)),
            ),
            (
                "the Endpoints object is gone",
                vec![absent(), own(rec(ME, 15, 5), 0)],
                lost(0, None),
            ),
            (
                "the Lease was cleared by someone else",
                vec![own(rec(ME, 15, 5), 0), read(rec("", 1, 5), 0)],
                lost(1, Some("")),
            ),
            (
                "our identity renewed by another process",
                vec![read(renewed_elsewhere, 0), own(rec(ME, 15, 5), 0)],
                lost(0, Some(ME)),
            ),
        ];
        for (what, locks, want) in cases {
            assert_eq!(run(true, locks), want, "leading, {what}");
        }
    }

    #[test]
    fn lease_only_decisions() {
        let cases: Vec<(&str, bool, Lock, Decision)> = vec![
            ("absent: create", false, absent(), write(0, wall())),
            (
                "held: wait",
                false,
                read(rec(PEER, 15, 1), 5),
                wait(0, PEER, 10),
            ),
            (
                "expired: take",
                false,
                read(rec(PEER, 15, 1), 15),
                write(2, wall()),
            ),
            (
                "released: take",
                false,
                read(rec("", 1, 1), 0),
                write(2, wall()),
            ),
            ("renew", true, own(rec(ME, 15, 1), 2), write(1, earlier())),
            (
                "taken",
                true,
                read(rec(PEER, 15, 2), 0),
                lost(0, Some(PEER)),
            ),
        ];
        for (what, leading, lock, want) in cases {
            assert_eq!(run(leading, vec![lock]), want, "{what}");
        }
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
        let mut written = first.clone();
        written.mine = a.clone();
        assert_eq!(
            observe(Some(&written), None, t1).mine,
            a,
            "what this process wrote is remembered"
        );
        let gone = observe(None, None, t0);
        assert_eq!(observe(Some(&gone), None, t1).since, t0, "still absent");
        assert_eq!(observe(Some(&gone), a, t1).since, t1, "created");
    }
}

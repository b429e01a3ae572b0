//! What an in-place upgrade run saw ([`super`]), and the decisions
//! made from it, as pure functions of the samples: who acted on ARM while
//! holding which lock, identities removed from a scale set while a pod
//! needed them, AzureAssignedIdentity (AAI) changes, pods' outcomes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

/// The Compute api-version upstream's Go SDK sends; this project's mic never
/// sends it.
pub const GO_COMPUTE: &str = "api-version=2019-12-01";

/// Which implementation a process or a request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// Upstream v1.8.17's Go mic or nmi.
    Upstream,
    /// This project's.
    Ours,
}

/// The side of an ARM request, by its api-version.
pub fn side_of_arm(uri: &str) -> Side {
    if uri.contains(GO_COMPUTE) {
        Side::Upstream
    } else {
        Side::Ours
    }
}

/// One 100 ms sample of the leader locks and of the ARM requests answered
/// since the previous sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockSample {
    /// Milliseconds since the run began.
    pub at_ms: u64,
    /// Holder of upstream's Endpoints lock (`None`: no object or free).
    pub endpoints: Option<String>,
    /// Holder of the Lease (`None`: no object or free).
    pub lease: Option<String>,
    /// Sides that sent ARM requests since the previous sample.
    pub arm: BTreeSet<Side>,
}

/// Every sample in which two mics acted at once, or one acted without the
/// lock it needs, described. `sides` names each mic replica's side. A mic
/// acts when it sends ARM requests; upstream's needs the Endpoints lock,
/// ours needs it and the Lease. The requests seen in a sample were sent
/// between the previous sample and this one, so the holder of either one
/// counts.
pub fn acting_conflicts(samples: &[LockSample], sides: &BTreeMap<String, Side>) -> Vec<String> {
    let side = |h: &Option<String>| h.as_ref().and_then(|h| sides.get(h)).copied();
    let mut out = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if s.arm.len() > 1 {
            out.push(format!("{} ms: ARM requests from both sides", s.at_ms));
            continue;
        }
        let prev = i.checked_sub(1).map(|p| &samples[p]);
        let held = |lock: HolderOf, by: Side| {
            side(lock(s)) == Some(by) || prev.is_some_and(|p| side(lock(p)) == Some(by))
        };
        for by in &s.arm {
            let endpoints = held(|s| &s.endpoints, *by);
            let lease = *by == Side::Upstream || held(|s| &s.lease, *by);
            if !(endpoints && lease) {
                out.push(format!(
                    "{} ms: ARM requests from {by:?} while Endpoints is held by {:?} and the Lease by {:?}",
                    s.at_ms, s.endpoints, s.lease
                ));
            }
        }
    }
    out
}

/// One holder's time on one lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenure {
    /// `Endpoints` or `Lease`.
    pub lock: &'static str,
    /// The holder.
    pub holder: String,
    /// First and last sample (ms since the run began) that showed it.
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Tenure {
    /// How long it was seen holding the lock.
    pub fn held(&self) -> Duration {
        Duration::from_millis(self.to_ms - self.from_ms)
    }
}

/// Reads one lock's holder from a sample.
type HolderOf = fn(&LockSample) -> &Option<String>;

/// The runs of one holder on each lock, in order (free stretches left out).
pub fn tenures(samples: &[LockSample]) -> Vec<Tenure> {
    let mut out = Vec::new();
    let locks: [(&'static str, HolderOf); 2] =
        [("Endpoints", |s| &s.endpoints), ("Lease", |s| &s.lease)];
    for (lock, of) in locks {
        let mut current: Option<Tenure> = None;
        for s in samples {
            match (of(s), current.as_mut()) {
                (Some(h), Some(t)) if *h == t.holder => t.to_ms = s.at_ms,
                (holder, _) => {
                    out.extend(current.take());
                    current = holder.as_ref().map(|h| Tenure {
                        lock,
                        holder: h.clone(),
                        from_ms: s.at_ms,
                        to_ms: s.at_ms,
                    });
                }
            }
        }
        out.extend(current);
    }
    out
}

/// The first sample at or after `since_ms` in which side `to` held every lock
/// it needs (upstream: the Endpoints lock; ours: it and the Lease).
pub fn takeover_at(
    samples: &[LockSample],
    sides: &BTreeMap<String, Side>,
    to: Side,
    since_ms: u64,
) -> Option<u64> {
    let is = |h: &Option<String>| h.as_ref().and_then(|h| sides.get(h)) == Some(&to);
    samples
        .iter()
        .filter(|s| s.at_ms >= since_ms)
        .find(|s| is(&s.endpoints) && (to == Side::Upstream || is(&s.lease)))
        .map(|s| s.at_ms)
}

/// Every sample in which a scale set or VM lacked an identity of `needed`
/// (names, by scale set) that an earlier sample or this one had shown on it,
/// as `<ms>: <vmss> lacks <identity>`.
pub fn removed_while_needed(
    needed: &BTreeMap<String, BTreeSet<String>>,
    samples: &[(u64, BTreeMap<String, BTreeSet<String>>)],
) -> Vec<String> {
    let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut out = Vec::new();
    for (at, sets) in samples {
        for (vmss, want) in needed {
            let have = sets.get(vmss);
            for id in want {
                let on = have.is_some_and(|h| h.iter().any(|i| i.eq_ignore_ascii_case(id)));
                if on {
                    seen.insert((vmss, id));
                } else if seen.contains(&(vmss.as_str(), id.as_str())) {
                    out.push(format!("{at} ms: {vmss} lacks {id}"));
                }
            }
        }
    }
    out
}

/// One AAI as a sample saw it: (uid, resourceVersion, status).
pub type AaiState = (String, String, String);

/// AAIs by name, as one sample saw them.
pub type AaiSnapshot = BTreeMap<String, AaiState>;

/// Changes of AAIs between samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AaiChanges {
    /// Status changes of one object (same uid).
    pub status_changes: usize,
    /// Objects written (new resourceVersion, same uid) with the same status.
    pub rewrites: usize,
    /// Names deleted and created again (new uid), or gone.
    pub recreates: usize,
    /// Names that appeared.
    pub created: usize,
}

impl AaiChanges {
    /// Any write at all.
    pub fn any(&self) -> bool {
        *self != AaiChanges::default()
    }
}

impl std::ops::AddAssign for AaiChanges {
    fn add_assign(&mut self, o: AaiChanges) {
        self.status_changes += o.status_changes;
        self.rewrites += o.rewrites;
        self.recreates += o.recreates;
        self.created += o.created;
    }
}

/// What changed from `before` to `after`.
pub fn aai_changes(before: &AaiSnapshot, after: &AaiSnapshot) -> AaiChanges {
    let mut c = AaiChanges::default();
    for (name, (uid, rv, status)) in after {
        match before.get(name) {
            None => c.created += 1,
            Some((u, _, _)) if u != uid => c.recreates += 1,
            Some((_, _, s)) if s != status => c.status_changes += 1,
            Some((_, r, _)) if r != rv => c.rewrites += 1,
            Some(_) => {}
        }
    }
    c.recreates += before.keys().filter(|n| !after.contains_key(*n)).count();
    c
}

/// What one token request from a pod got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// 200 with an access token.
    Token,
    /// Another HTTP answer.
    Http(u16),
    /// No answer (refused, reset, timed out).
    NoAnswer,
}

impl Outcome {
    /// The outcome of curl's (status, body); status 0 when no answer came.
    pub fn of(code: u16, body: &str) -> Outcome {
        match code {
            0 => Outcome::NoAnswer,
            200 if body.contains("\"access_token\"") => Outcome::Token,
            c => Outcome::Http(c),
        }
    }
}

/// Connections of a relay's peer log (ms since the epoch, peer) at or after
/// `since_ms` whose peer is one of `pods`: requests from a pod that reached
/// IMDS directly.
pub fn direct_from_pods(log: &[(u64, IpAddr)], pods: &BTreeSet<IpAddr>, since_ms: u64) -> usize {
    log.iter()
        .filter(|(at, peer)| *at >= since_ms && pods.contains(peer))
        .count()
}

/// One write of the objects (helm or kubectl) and what it did to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectStep {
    /// What was run.
    pub name: String,
    /// How long the write took (the snapshot after it not counted).
    pub took: Duration,
    /// Objects written in place, created, deleted (none is recreated: the
    /// step fails then).
    pub replaced: usize,
    pub created: usize,
    pub deleted: usize,
    /// The nmi DaemonSet's and the mic Deployment's images after the write.
    pub images: Vec<String>,
}

impl ObjectStep {
    /// `name (took): r replaced, c created, d deleted; images`.
    pub fn line(&self) -> String {
        format!(
            "{} ({:.2?}): {} replaced, {} created, {} deleted; {}",
            self.name,
            self.took,
            self.replaced,
            self.created,
            self.deleted,
            self.images.join(" ")
        )
    }
}

/// The figures of one direction of the run (upgrade or rollback).
#[derive(Clone, Debug, Default)]
pub struct UpgradeFigures {
    /// `upgrade` or `rollback`.
    pub name: String,
    /// The writes of the objects right before the processes were swapped
    /// (none when only the processes are swapped).
    pub objects: Vec<ObjectStep>,
    /// From the first process started to the last step's end (every node's
    /// nmi and the mic leader on the new side).
    pub duration: Duration,
    /// ARM writes (not GET) by side.
    pub arm_writes: BTreeMap<Side, usize>,
    /// ARM reads (GET) by side.
    pub arm_reads: BTreeMap<Side, usize>,
    /// AAI changes seen (sampled every 100 ms).
    pub aai: AaiChanges,
    /// Token requests the pods made, and what they got other than a token.
    pub token_requests: usize,
    pub token_errors: BTreeMap<String, usize>,
    /// Requests from pods that reached IMDS directly (around nmi).
    pub imds_direct: usize,
    /// Each holder's time on each lock.
    pub tenures: Vec<Tenure>,
    /// From the old mic leader's SIGTERM to the new side holding the locks it needs.
    pub takeover: Option<Duration>,
    /// Samples with two mics acting, or one acting without its lock.
    pub conflicts: Vec<String>,
    /// Samples with a needed identity missing from its scale set.
    pub removed_needed: Vec<String>,
    /// Pods without their token before the first step and after the last.
    pub failures_before: Vec<String>,
    pub failures_after: Vec<String>,
    /// Lock samples taken.
    pub samples: usize,
}

impl UpgradeFigures {
    /// Token requests that got no token.
    pub fn token_error_count(&self) -> usize {
        self.token_errors.values().sum()
    }

    /// ARM writes of `side`.
    pub fn writes(&self, side: Side) -> usize {
        self.arm_writes.get(&side).copied().unwrap_or(0)
    }

    /// What an in-place switch to `to` must not show, one line each: two
    /// mics acting at once, a needed identity removed, any ARM write or AAI
    /// change (everything was assigned before), a pod without its token
    /// before or after, no takeover by `to`, no samples or no load.
    pub fn violations(&self, to: Side) -> Vec<String> {
        let w = [Side::Upstream, Side::Ours].map(|s| self.writes(s));
        let c = |ok: bool, what: String| (!ok).then_some(what);
        [
            c(
                self.conflicts.is_empty(),
                format!("two mics acting: {:?}", self.conflicts),
            ),
            c(
                self.removed_needed.is_empty(),
                format!("needed identities removed: {:?}", self.removed_needed),
            ),
            c(w == [0, 0], format!("ARM writes (upstream, ours): {w:?}")),
            c(!self.aai.any(), format!("AAIs written: {:?}", self.aai)),
            c(
                self.failures_before.is_empty(),
                format!("pods without token before: {:?}", self.failures_before),
            ),
            c(
                self.failures_after.is_empty(),
                format!("pods without token after: {:?}", self.failures_after),
            ),
            c(
                self.takeover.is_some(),
                format!("{to:?} never held the locks it needs"),
            ),
            c(
                self.samples > 10 && self.token_requests > 0,
                format!(
                    "{} samples, {} token requests",
                    self.samples, self.token_requests
                ),
            ),
        ]
        .into_iter()
        .flatten()
        .map(|what| format!("{}: {what}", self.name))
        .collect()
    }

    /// The figures as one printed block.
    pub fn block(&self) -> String {
        let mut out = format!("--- {} figures ---\n", self.name);
        let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<28} {v}\n"));
        for o in &self.objects {
            line(&mut out, "objects", o.line());
        }
        line(&mut out, "duration", format!("{:.1?}", self.duration));
        for (what, map) in [
            ("ARM writes", &self.arm_writes),
            ("ARM reads", &self.arm_reads),
        ] {
            let v = [Side::Upstream, Side::Ours]
                .map(|s| format!("{s:?} {}", map.get(&s).copied().unwrap_or(0)))
                .join(", ");
            line(&mut out, what, v);
        }
        let a = self.aai;
        line(
            &mut out,
            "AAI changes",
            format!(
                "status {}, rewrites {}, recreates {}, created {}",
                a.status_changes, a.rewrites, a.recreates, a.created
            ),
        );
        line(
            &mut out,
            "token requests / errors",
            format!(
                "{} / {} {:?}",
                self.token_requests,
                self.token_error_count(),
                self.token_errors
            ),
        );
        line(
            &mut out,
            "IMDS-direct requests",
            self.imds_direct.to_string(),
        );
        line(
            &mut out,
            "lock takeover",
            self.takeover
                .map_or("none".into(), |d| format!("{:.1?}", d)),
        );
        for t in &self.tenures {
            line(
                &mut out,
                &format!("held {}", t.lock),
                format!(
                    "{} {:.1?} ({}..{} ms)",
                    t.holder,
                    t.held(),
                    t.from_ms,
                    t.to_ms
                ),
            );
        }
        line(
            &mut out,
            "two acting / needed removed",
            format!("{} / {}", self.conflicts.len(), self.removed_needed.len()),
        );
        line(
            &mut out,
            "pods without token before/after",
            format!(
                "{} / {}",
                self.failures_before.len(),
                self.failures_after.len()
            ),
        );
        line(&mut out, "lock samples", self.samples.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, e: Option<&str>, l: Option<&str>, arm: &[Side]) -> LockSample {
        LockSample {
            at_ms,
            endpoints: e.map(Into::into),
            lease: l.map(Into::into),
            arm: arm.iter().copied().collect(),
        }
    }

    fn sides() -> BTreeMap<String, Side> {
        BTreeMap::from([
            ("go-0".into(), Side::Upstream),
            ("go-1".into(), Side::Upstream),
            ("ours-0".into(), Side::Ours),
        ])
    }

    #[test]
    fn arm_requests_are_told_apart_by_api_version() {
        let go = "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/v?api-version=2019-12-01";
        assert_eq!(side_of_arm(go), Side::Upstream);
        assert_eq!(
            side_of_arm(&go.replace("2019-12-01", "2022-03-01")),
            Side::Ours
        );
    }

    #[test]
    fn acting_needs_the_locks_and_never_both_sides() {
        use Side::{Ours, Upstream};
        let go = Some("go-0");
        let ours = Some("ours-0");
        // (samples, conflicts expected)
        let cases: Vec<(Vec<LockSample>, usize)> = vec![
            // Go leads and acts, then ours holds both and acts.
            (
                vec![
                    sample(0, go, None, &[Upstream]),
                    sample(100, None, None, &[]),
                    sample(200, ours, ours, &[Ours]),
                ],
                0,
            ),
            // Requests of the previous holder seen in the sample after it lost the lock.
            (
                vec![
                    sample(0, go, None, &[]),
                    sample(100, ours, ours, &[Upstream]),
                ],
                0,
            ),
            // Both sides in one sample.
            (vec![sample(0, go, None, &[Upstream, Ours])], 1),
            // Ours acting while Go holds Endpoints.
            (vec![sample(0, go, ours, &[Ours])], 1),
            // Ours acting with Endpoints but without the Lease.
            (vec![sample(0, ours, None, &[Ours])], 1),
            // Go acting while ours holds Endpoints (two samples in a row).
            (
                vec![
                    sample(0, ours, ours, &[]),
                    sample(100, ours, ours, &[Upstream]),
                ],
                1,
            ),
            // A holder the run does not know acts for nobody.
            (vec![sample(0, Some("other"), None, &[Upstream])], 1),
        ];
        for (i, (samples, want)) in cases.iter().enumerate() {
            let got = acting_conflicts(samples, &sides());
            assert_eq!(got.len(), *want, "case {i}: {got:?}");
        }
    }

    #[test]
    fn tenures_and_takeover_come_from_the_samples() {
        let s = vec![
            sample(0, Some("go-0"), None, &[]),
            sample(100, Some("go-0"), None, &[]),
            sample(200, None, None, &[]),
            sample(300, Some("ours-0"), None, &[]),
            sample(400, Some("ours-0"), Some("ours-0"), &[]),
        ];
        let t = tenures(&s);
        let got: Vec<(&str, &str, u64, u64)> = t
            .iter()
            .map(|t| (t.lock, t.holder.as_str(), t.from_ms, t.to_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("Endpoints", "go-0", 0, 100),
                ("Endpoints", "ours-0", 300, 400),
                ("Lease", "ours-0", 400, 400)
            ]
        );
        assert_eq!(t[0].held(), Duration::from_millis(100));
        assert_eq!(takeover_at(&s, &sides(), Side::Ours, 100), Some(400));
        assert_eq!(takeover_at(&s, &sides(), Side::Upstream, 0), Some(0));
        assert_eq!(takeover_at(&s, &sides(), Side::Upstream, 150), None);
    }

    #[test]
    fn a_needed_identity_missing_after_it_was_seen_is_reported() {
        let set = |ids: &[&str]| -> BTreeMap<String, BTreeSet<String>> {
            BTreeMap::from([("vmss-0".into(), ids.iter().map(|s| s.to_string()).collect())])
        };
        let needed = set(&["id-0"]);
        // (samples, reports expected)
        let cases = [
            (vec![(0, set(&["id-0"])), (100, set(&["id-0", "k"]))], 0),
            (vec![(0, set(&["ID-0"]))], 0),
            // Never seen yet: not yet added, not removed.
            (vec![(0, set(&[])), (100, set(&["id-0"]))], 0),
            (
                vec![(0, set(&["id-0"])), (100, set(&[])), (200, set(&[]))],
                2,
            ),
            (vec![(0, set(&["id-0"])), (100, BTreeMap::new())], 1),
        ];
        for (i, (samples, want)) in cases.iter().enumerate() {
            let got = removed_while_needed(&needed, samples);
            assert_eq!(got.len(), *want, "case {i}: {got:?}");
        }
    }

    #[test]
    fn aai_changes_are_status_rewrites_recreates_and_new_ones() {
        let snap = |items: &[(&str, &str, &str, &str)]| -> AaiSnapshot {
            items
                .iter()
                .map(|(n, u, r, s)| (n.to_string(), (u.to_string(), r.to_string(), s.to_string())))
                .collect()
        };
        let base = snap(&[("a", "u1", "1", "Assigned"), ("b", "u2", "2", "Assigned")]);
        let cases = [
            (base.clone(), AaiChanges::default()),
            (
                snap(&[("a", "u1", "3", "Assigned"), ("b", "u2", "2", "Assigned")]),
                AaiChanges {
                    rewrites: 1,
                    ..Default::default()
                },
            ),
            (
                snap(&[("a", "u1", "3", "Created"), ("b", "u2", "2", "Assigned")]),
                AaiChanges {
                    status_changes: 1,
                    ..Default::default()
                },
            ),
            (
                snap(&[("a", "u9", "9", "Assigned"), ("c", "u3", "4", "Created")]),
                AaiChanges {
                    recreates: 2,
                    created: 1,
                    ..Default::default()
                },
            ),
        ];
        for (i, (after, want)) in cases.iter().enumerate() {
            assert_eq!(aai_changes(&base, after), *want, "case {i}");
        }
        let mut sum = AaiChanges::default();
        sum += cases[2].1;
        sum += cases[1].1;
        assert!(sum.any() && !AaiChanges::default().any());
        assert_eq!((sum.status_changes, sum.rewrites), (1, 1));
    }

    #[test]
    fn outcomes_and_direct_requests() {
        assert_eq!(Outcome::of(200, r#"{"access_token":"x"}"#), Outcome::Token);
        assert_eq!(Outcome::of(200, "{}"), Outcome::Http(200));
        assert_eq!(Outcome::of(404, ""), Outcome::Http(404));
        assert_eq!(Outcome::of(0, ""), Outcome::NoAnswer);
        let pod: IpAddr = "10.244.1.10".parse().unwrap();
        let node: IpAddr = "169.254.169.254".parse().unwrap();
        let log = [(5, pod), (10, node), (20, pod)];
        let pods = BTreeSet::from([pod]);
        assert_eq!(direct_from_pods(&log, &pods, 0), 2);
        assert_eq!(direct_from_pods(&log, &pods, 10), 1);
        assert_eq!(direct_from_pods(&log, &BTreeSet::new(), 0), 0);
    }

    #[test]
    fn an_object_step_is_one_line() {
        let o = ObjectStep {
            name: "helm rollback".into(),
            took: Duration::from_millis(300),
            replaced: 13,
            created: 2,
            deleted: 12,
            images: vec!["nmi:v1.8.17".into(), "mic:v1.8.17".into()],
        };
        assert_eq!(
            o.line(),
            "helm rollback (300.00ms): 13 replaced, 2 created, 12 deleted; nmi:v1.8.17 mic:v1.8.17"
        );
    }

    #[test]
    fn violations_name_each_broken_rule() {
        let good = UpgradeFigures {
            name: "upgrade".into(),
            takeover: Some(Duration::from_secs(4)),
            samples: 100,
            token_requests: 50,
            ..Default::default()
        };
        assert!(good.violations(Side::Ours).is_empty());
        type Change = fn(&mut UpgradeFigures);
        let cases: Vec<(Change, &str)> = vec![
            (|f| f.conflicts.push("x".into()), "two mics acting"),
            (
                |f| f.removed_needed.push("x".into()),
                "needed identities removed",
            ),
            (
                |f| {
                    f.arm_writes.insert(Side::Ours, 1);
                },
                "ARM writes (upstream, ours): [0, 1]",
            ),
            (|f| f.aai.rewrites = 1, "AAIs written"),
            (
                |f| f.failures_before.push("p".into()),
                "without token before",
            ),
            (|f| f.failures_after.push("p".into()), "without token after"),
            (|f| f.takeover = None, "Ours never held"),
            (|f| f.samples = 3, "3 samples"),
            (|f| f.token_requests = 0, "0 token requests"),
        ];
        for (change, want) in cases {
            let mut f = good.clone();
            change(&mut f);
            let v = f.violations(Side::Ours);
            assert_eq!(v.len(), 1, "{want}: {v:?}");
            assert!(
                v[0].starts_with("upgrade: ") && v[0].contains(want),
                "{want}: {v:?}"
            );
        }
    }

    #[test]
    fn the_block_names_every_figure() {
        let mut f = UpgradeFigures {
            name: "upgrade".into(),
            ..Default::default()
        };
        f.arm_writes.insert(Side::Upstream, 2);
        f.token_errors.insert("NoAnswer".into(), 3);
        let b = f.block();
        for want in [
            "--- upgrade figures ---",
            "ARM writes                   Upstream 2, Ours 0",
            "token requests / errors      0 / 3",
            "IMDS-direct requests         0",
            "lock takeover                none",
        ] {
            assert!(b.contains(want), "{want:?} in\n{b}");
        }
        assert_eq!((f.writes(Side::Upstream), f.token_error_count()), (2, 3));
    }
}

//! The decisions of MIC's identity writes on one VMSS/VM, over plain data:
//! which group of identities the next PATCH carries, what a refused PATCH
//! does (quarantine the identities ARM names, halve a group when it names
//! none, stop when the identities are not at fault), how many failures a
//! resource may take in one cycle, what a spent write budget does, and how
//! each AzureAssignedIdentity settles from what really landed. The executor
//! in [`crate::apply`] performs them and decides nothing of its own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::cloud::{ArmError, IdentityPatch, ResourceIdentity, identity_patches};
use crate::guard;
use crate::index::Key;

/// Back-off of an identity ARM refused, kept across cycles (upstream MIC
/// leaves a refused identity out only for the retries of one update): it
/// leaves the batch until then and never holds back the others. Doubles per
/// refusal up to [`QUARANTINE_MAX`].
pub(crate) const QUARANTINE_FIRST: Duration = Duration::from_secs(5);
pub(crate) const QUARANTINE_MAX: Duration = Duration::from_secs(300);

/// Identity ID → (when it may be tried again, refusals so far).
pub(crate) type Quarantine = BTreeMap<String, (Instant, u32)>;

/// The wait after the `failures`-th refusal of one identity: 5 s, doubling,
/// at most 160 s (and never beyond [`QUARANTINE_MAX`]).
pub(crate) fn back_off(failures: u32) -> Duration {
    QUARANTINE_FIRST
        .saturating_mul(1 << failures.min(6).saturating_sub(1))
        .min(QUARANTINE_MAX)
}

/// Quarantines `ids` once more from `now`; returns when the first of them is
/// due (at most `now + QUARANTINE_MAX`).
pub(crate) fn quarantine(q: &mut Quarantine, ids: &BTreeSet<String>, now: Instant) -> Instant {
    let mut earliest = now + QUARANTINE_MAX;
    for id in ids {
        let failures = q.get(id).map_or(0, |(_, n)| *n) + 1;
        let at = now + back_off(failures);
        earliest = earliest.min(at);
        q.insert(id.clone(), (at, failures));
    }
    earliest
}

/// `provisioningState: Failed`: the last write on the resource failed.
pub(crate) fn is_failed(current: &ResourceIdentity) -> bool {
    current.provisioning_state.eq_ignore_ascii_case("Failed")
}

/// `provisioningState: Deleting`: a resource being deleted is never
/// PATCHed (ARM would refuse it, and a write could race the deletion).
pub(crate) fn is_deleting(current: &ResourceIdentity) -> bool {
    current.provisioning_state.eq_ignore_ascii_case("Deleting")
}

/// What the PATCH is computed against: after a failed operation the adds
/// are sent again even if the model already lists them.
pub(crate) fn patch_basis(current: &ResourceIdentity, add: &BTreeSet<String>) -> ResourceIdentity {
    let mut basis = current.clone();
    if is_failed(current) {
        basis.user_assigned.retain(|id| !add.contains(id));
    }
    basis
}

/// One PATCH's worth of adds in the [`WriteQueue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    pub add: BTreeSet<String>,
    /// Carries the resource's removals (only the batch does).
    pub removes: bool,
    /// A quarantined identity retried alone.
    pub probe: bool,
}

/// The adds of one resource, split by the quarantine.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AddSplit {
    /// Sent together: every add ARM has not refused.
    pub batch: BTreeSet<String>,
    /// Refused identities whose back-off is over: each is retried alone.
    pub probes: Vec<String>,
    /// Every refused identity among the adds (due or not).
    pub quarantined: BTreeSet<String>,
    /// When the next refused identity still waiting is due.
    pub next_probe: Option<Instant>,
}

/// Splits `add` by the quarantine. A quarantined identity never rejoins the
/// batch, however long ago it was refused: it must first land on its own.
/// Wall-clock back-off alone is not enough: when the write budget spaces
/// PATCHes further apart than the back-off, the refused identity would ride
/// again with the others and hold them back.
pub(crate) fn split_quarantined(
    add: &BTreeSet<String>,
    quarantine: &Quarantine,
    now: Instant,
) -> AddSplit {
    let mut out = AddSplit::default();
    for id in add {
        match quarantine.get(id) {
            None => {
                out.batch.insert(id.clone());
            }
            Some((due, _)) => {
                out.quarantined.insert(id.clone());
                if *due <= now {
                    out.probes.push(id.clone());
                } else {
                    out.next_probe = Some(out.next_probe.map_or(*due, |t| t.min(*due)));
                }
            }
        }
    }
    out
}

/// What to do after ARM refused a PATCH adding `group`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not the identities' fault (throttled, conflict, server error): stop
    /// writing this resource for now.
    Stop,
    /// These identities are at fault: quarantine them, send the rest now.
    Quarantine(BTreeSet<String>),
    /// An identity is at fault but ARM did not say which: send the halves
    /// apart until the culprit stands alone.
    Split(BTreeSet<String>, BTreeSet<String>),
}

/// The decision after a refused PATCH. ARM names the refused identity in
/// the messages of `FailedIdentityOperation` (for example an identity that
/// does not exist) and `LinkedAuthorizationFailed` (no permission to assign
/// it); when it names none of the group the group is halved (a group of one
/// is the culprit).
pub(crate) fn on_refusal(group: &BTreeSet<String>, error: Option<&ArmError>) -> Refusal {
    let Some(error) = error.filter(|e| e.is_identity_failure()) else {
        return Refusal::Stop;
    };
    let named: BTreeSet<String> = error
        .named_identity_ids()
        .intersection(group)
        .cloned()
        .collect();
    if !named.is_empty() {
        return Refusal::Quarantine(named);
    }
    match group.len() {
        0 => Refusal::Stop,
        1 => Refusal::Quarantine(group.clone()),
        n => {
            let first: BTreeSet<String> = group.iter().take(n / 2).cloned().collect();
            let second = group.difference(&first).cloned().collect();
            Refusal::Split(first, second)
        }
    }
}

/// Failures a halving search over `n` identities may need (⌈log2 n⌉).
pub(crate) fn bisect_steps(n: usize) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// The next PATCHes to send: one group's, in order.
#[derive(Debug)]
pub(crate) struct Write {
    pub group: Group,
    pub patches: Vec<IdentityPatch>,
}

/// How sending a [`Write`] ended.
#[derive(Debug)]
pub(crate) enum Sent<'e> {
    /// Every PATCH landed.
    Landed,
    /// The write budget held a PATCH back; `sent_some` when PATCHes before
    /// it went out. What waits is folded into the next PATCH of this
    /// resource.
    Deferred { sent_some: bool },
    /// A PATCH failed, with ARM's answer when there was one.
    Failed(Option<&'e ArmError>),
}

/// What the executor does after a [`Write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send the next group at once.
    Continue,
    /// Wait `--update-user-msi-retry-interval`, read the resource again, then
    /// send the next group.
    PauseAndReread,
    /// Write nothing more to this resource in this cycle.
    Stop,
}

/// The decision after a [`Write`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Step {
    /// Identities to quarantine (whatever `next` says: the next PATCH of
    /// this resource goes without them).
    pub quarantine: BTreeSet<String>,
    pub next: Next,
}

/// The work queue of one resource's PATCHes in one cycle: the batch first
/// (carrying the removes), then each due quarantined identity alone. A
/// group ARM refuses loses the identities the error names; a refusal naming
/// none is split in halves until the culprit stands alone. The failures
/// allowed are `--update-user-msi-max-retry` plus the halvings the group
/// needs.
#[derive(Debug)]
pub(crate) struct WriteQueue {
    groups: VecDeque<Group>,
    remove: BTreeSet<String>,
    max_retry: u32,
    failures: u32,
    refused: BTreeSet<String>,
    deferred: bool,
    wrote: bool,
}

impl WriteQueue {
    pub fn new(
        batch: BTreeSet<String>,
        probes: Vec<String>,
        remove: BTreeSet<String>,
        max_retry: u32,
    ) -> Self {
        let mut groups = VecDeque::from([Group {
            add: batch,
            removes: true,
            probe: false,
        }]);
        groups.extend(probes.into_iter().map(|id| Group {
            add: BTreeSet::from([id]),
            removes: false,
            probe: true,
        }));
        WriteQueue {
            groups,
            remove,
            max_retry,
            failures: 0,
            refused: BTreeSet::new(),
            deferred: false,
            wrote: false,
        }
    }

    /// The next group that changes something on `current`, with its
    /// PATCHes; `None` when the queue is done.
    pub fn next(&mut self, current: &ResourceIdentity) -> Option<Write> {
        let none = BTreeSet::new();
        while let Some(group) = self.groups.pop_front() {
            let remove = if group.removes { &self.remove } else { &none };
            let patches = identity_patches(&patch_basis(current, &group.add), &group.add, remove);
            if !patches.is_empty() {
                return Some(Write { group, patches });
            }
        }
        None
    }

    /// Takes in how `group`'s PATCHes ended and says what comes next.
    pub fn record(&mut self, group: &Group, sent: Sent<'_>) -> Step {
        let step = match sent {
            Sent::Landed => {
                self.wrote = true;
                Step {
                    quarantine: BTreeSet::new(),
                    next: Next::Continue,
                }
            }
            Sent::Deferred { sent_some } => {
                self.wrote |= sent_some;
                self.deferred = true;
                Step {
                    quarantine: BTreeSet::new(),
                    next: Next::Stop,
                }
            }
            Sent::Failed(error) => {
                self.wrote = true;
                self.failed(group, error)
            }
        };
        if step.next == Next::Stop {
            self.groups.clear();
        }
        step
    }

    fn failed(&mut self, group: &Group, error: Option<&ArmError>) -> Step {
        let decision = on_refusal(&group.add, error);
        let quarantine = match &decision {
            Refusal::Quarantine(ids) => ids.clone(),
            _ => BTreeSet::new(),
        };
        self.refused.extend(quarantine.iter().cloned());
        self.failures += 1;
        let step = |next| Step {
            quarantine: quarantine.clone(),
            next,
        };
        if self.failures > self.max_retry + bisect_steps(group.add.len()) {
            return step(Next::Stop);
        }
        match decision {
            Refusal::Stop => step(Next::Stop),
            Refusal::Quarantine(ids) => {
                let rest: BTreeSet<String> = group.add.difference(&ids).cloned().collect();
                if group.probe || (rest.is_empty() && !group.removes) {
                    return step(Next::Continue);
                }
                self.groups.push_front(Group {
                    add: rest,
                    removes: group.removes,
                    probe: false,
                });
                step(Next::PauseAndReread)
            }
            Refusal::Split(first, second) => {
                self.groups.push_front(Group {
                    add: second,
                    removes: false,
                    probe: false,
                });
                self.groups.push_front(Group {
                    add: first,
                    removes: group.removes,
                    probe: false,
                });
                step(Next::PauseAndReread)
            }
        }
    }

    /// Identities ARM refused in this cycle (and quarantined).
    pub fn refused(&self) -> &BTreeSet<String> {
        &self.refused
    }

    /// The write budget held a PATCH back.
    pub fn deferred(&self) -> bool {
        self.deferred
    }

    /// Something was sent: read the resource again, since what really
    /// landed decides the AAIs.
    pub fn reread(&self) -> bool {
        self.wrote
    }
}

/// The text of the `BindingApplyError` Event of an identity ARM refused.
pub(crate) const WHY_REFUSED: &str = "Azure refused the identity; retrying with back-off";
/// The text of the `BindingApplyError` Event of an identity not there yet.
pub(crate) const WHY_NOT_YET: &str = "identity not yet on the node";

/// What happens to one AAI of a resource after its writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Its identity is on the resource and passes the checks against ARM's
    /// view: lift the identity's quarantine, mark the AAI Assigned
    /// (`BindingApplied` Event).
    Assign { key: Key, id: String },
    /// Its identity is on the resource but fails the checks: lift the
    /// identity's quarantine, refuse the AAI (annotation, Event on its
    /// AzureIdentity); it stays Created.
    Refuse {
        key: Key,
        id: String,
        refusal: guard::Refusal,
    },
    /// Its identity is not on the resource: stays Created, tried again
    /// later, with a `BindingApplyError` Event saying `event` when set.
    NotYet {
        key: Key,
        event: Option<&'static str>,
    },
    /// Retiring and its identity is off the resource (or stays there by
    /// design): delete it.
    Delete { key: Key },
    /// Retiring but its identity is still on the resource: tried again later.
    StillThere { key: Key },
}

/// What [`settle`] decides from.
#[derive(Debug)]
pub(crate) struct SettleInput<'a> {
    /// The resource as ARM reports it after the writes.
    pub current: &'a ResourceIdentity,
    /// AAIs (with their identity ID) to assign once the identity is there;
    /// only those whose AAI exists and was written this cycle.
    pub assign: Vec<(&'a Key, &'a str)>,
    /// AAIs (with their identity ID) to delete once it is off; only those
    /// whose AAI exists.
    pub delete: Vec<(&'a Key, &'a str)>,
    /// AAIs the guard refused before anything was sent (already reported).
    pub refused_before: &'a BTreeSet<Key>,
    /// Identities ARM refused in this cycle.
    pub refused_now: &'a BTreeSet<String>,
    /// Identities in quarantine when the cycle began.
    pub quarantined: &'a BTreeSet<String>,
    /// The write budget held a PATCH back.
    pub deferred: bool,
    /// Retiring AAIs whose identity stays on the resource by design.
    pub released: &'a BTreeSet<Key>,
}

/// The settle decisions, in order, and whether the resource is tried again
/// later whatever they give.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Settled {
    pub actions: Vec<Settle>,
    /// The last operation failed: the model may list identities the
    /// instances never got, so nothing counts as landed until a PATCH
    /// succeeds (the next cycle sends the adds again).
    pub last_operation_failed: bool,
}

/// Decides how each AAI of the resource settles. `check` is the guard's
/// verdict on an AAI (by key and identity ID) whose identity is on the
/// resource.
pub(crate) fn settle(
    input: &SettleInput<'_>,
    check: &dyn Fn(&Key, &str) -> Option<guard::Refusal>,
) -> Settled {
    let last_operation_failed = is_failed(input.current);
    let mut actions = Vec::new();
    for &(key, id) in &input.assign {
        if last_operation_failed || input.refused_before.contains(key) {
            continue;
        }
        if input.current.user_assigned.contains(id) {
            actions.push(match check(key, id) {
                Some(refusal) => Settle::Refuse {
                    key: key.clone(),
                    id: id.to_string(),
                    refusal,
                },
                None => Settle::Assign {
                    key: key.clone(),
                    id: id.to_string(),
                },
            });
        } else {
            let refused = input.refused_now.contains(id) || input.quarantined.contains(id);
            // A PATCH held back by the budget is no error.
            let event = match (refused, input.deferred) {
                (true, _) => Some(WHY_REFUSED),
                (false, false) => Some(WHY_NOT_YET),
                (false, true) => None,
            };
            actions.push(Settle::NotYet {
                key: key.clone(),
                event,
            });
        }
    }
    for &(key, id) in &input.delete {
        let stays = input.released.contains(key);
        actions.push(if input.current.user_assigned.contains(id) && !stays {
            Settle::StillThere { key: key.clone() }
        } else {
            Settle::Delete { key: key.clone() }
        });
    }
    Settled {
        actions,
        last_operation_failed,
    }
}

/// What the drift check does on one resource.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Drift {
    /// Assigned AAIs that now fail the checks against ARM's view: back to
    /// Created, then refused (annotation, Event).
    pub demote: Vec<(Key, guard::Refusal)>,
    /// Identities of Assigned AAIs gone from the resource: recorded in the
    /// ledger, then added again.
    pub readd: BTreeSet<String>,
}

/// The drift check of one resource: `expected` are the identities its
/// Assigned AAIs need, `assigned` those AAIs (with their identity ID) and
/// `check` the guard's verdict on one of them. Identities of demoted AAIs
/// are not added again; nothing is added to a resource being deleted.
pub(crate) fn drift(
    expected: &BTreeSet<String>,
    assigned: &[(&Key, &str)],
    current: &ResourceIdentity,
    check: &dyn Fn(&Key, &str) -> Option<guard::Refusal>,
) -> Drift {
    let mut demoted: BTreeSet<&str> = BTreeSet::new();
    let mut demote = Vec::new();
    for &(key, id) in assigned {
        if let Some(refusal) = check(key, id) {
            demoted.insert(id);
            demote.push((key.clone(), refusal));
        }
    }
    let readd = if is_deleting(current) {
        BTreeSet::new()
    } else {
        expected
            .difference(&current.user_assigned)
            .filter(|id| !demoted.contains(id.as_str()))
            .cloned()
            .collect()
    };
    Drift { demote, readd }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_failed_operation_sends_the_adds_again() {
        // (provisioningState, identities in the model, adds, expected basis)
        let cases = [
            ("Succeeded", &["a", "b"][..], &["a"][..], &["a", "b"][..]),
            ("Failed", &["a", "b"][..], &["a"][..], &["b"][..]),
            ("failed", &["a"][..], &["c"][..], &["a"][..]),
            ("Updating", &["a"][..], &["a"][..], &["a"][..]),
        ];
        for (state, model, add, want) in cases {
            let current = ResourceIdentity {
                type_: "UserAssigned".into(),
                user_assigned: ids(model),
                provisioning_state: state.into(),
                ..Default::default()
            };
            let basis = patch_basis(&current, &ids(add));
            assert_eq!(basis.user_assigned, ids(want), "{state}");
            assert_eq!(is_failed(&current), state.eq_ignore_ascii_case("failed"));
            assert!(!is_deleting(&current));
        }
        let deleting = ResourceIdentity {
            provisioning_state: "deleting".into(),
            ..Default::default()
        };
        assert!(is_deleting(&deleting) && !is_failed(&deleting));
    }

    fn uai(n: &str) -> String {
        format!(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/{n}"
        )
    }

    fn uais(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|n| uai(n)).collect()
    }

    fn refusal(code: &str, message: String) -> ArmError {
        ArmError {
            status: Some(400),
            code: code.into(),
            message,
            retry_after: None,
        }
    }

    /// ARM's answer when an identity in the PATCH does not exist.
    fn not_found(n: &str) -> ArmError {
        refusal(
            "FailedIdentityOperation",
            format!(
                "Identity operation for resource '/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v' failed with error 'Failed to perform resource identity operation. Status: 'BadRequest'. Response: '{{\"error\":{{\"code\":\"BadRequest\",\"message\":\"Resource '{}' was not found.\"}}}}'.'.",
                uai(n)
            ),
        )
    }

    fn anonymous() -> ArmError {
        refusal("LinkedAuthorizationFailed", "no scope given".into())
    }

    fn throttled() -> ArmError {
        ArmError {
            status: Some(429),
            code: "TooManyRequests".into(),
            message: format!("'{}'", uai("a")),
            retry_after: Some(Duration::from_secs(2)),
        }
    }

    #[test]
    fn a_refused_identity_stays_out_of_the_batch_after_its_back_off() {
        // The e2e 429-storm case: the budget spaces PATCHes 15 s apart, more
        // than the 5 s back-off. Before the fix the ghost rejoined the batch
        // as soon as its back-off ran out and the whole PATCH was refused again.
        let now = Instant::now();
        let add = uais(&["a", "b", "ghost", "slow"]);
        let q: Quarantine = [
            (uai("ghost"), (now - Duration::from_secs(10), 1)),
            (uai("slow"), (now + Duration::from_secs(20), 3)),
            (uai("not-wanted"), (now - Duration::from_secs(1), 1)),
        ]
        .into();
        let s = split_quarantined(&add, &q, now);
        assert_eq!(s.batch, uais(&["a", "b"]));
        assert_eq!(s.probes, vec![uai("ghost")], "due: retried alone");
        assert_eq!(s.quarantined, uais(&["ghost", "slow"]));
        assert_eq!(s.next_probe, Some(now + Duration::from_secs(20)));
        // Nothing quarantined: everything in one batch.
        let s = split_quarantined(&add, &BTreeMap::new(), now);
        assert_eq!(s.batch, add);
        assert!(s.probes.is_empty() && s.quarantined.is_empty() && s.next_probe.is_none());
    }

    #[test]
    fn a_refusal_takes_out_the_named_identity_or_halves_the_group() {
        let group = uais(&["a", "b", "c", "ghost"]);
        assert_eq!(
            on_refusal(&group, Some(&not_found("ghost"))),
            Refusal::Quarantine(uais(&["ghost"]))
        );
        // Named identities outside the group are not blamed.
        assert_eq!(
            on_refusal(&uais(&["a", "b"]), Some(&not_found("ghost"))),
            Refusal::Split(uais(&["a"]), uais(&["b"]))
        );
        // No identity named: halves, and a group of one is the culprit.
        assert_eq!(
            on_refusal(&group, Some(&anonymous())),
            Refusal::Split(uais(&["a", "b"]), uais(&["c", "ghost"]))
        );
        assert_eq!(
            on_refusal(&uais(&["ghost"]), Some(&anonymous())),
            Refusal::Quarantine(uais(&["ghost"]))
        );
        // Not the identities' fault: throttling or a conflict stops the writes.
        assert_eq!(on_refusal(&group, Some(&throttled())), Refusal::Stop);
        assert_eq!(on_refusal(&group, None), Refusal::Stop);
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 150].map(bisect_steps),
            [0, 0, 1, 2, 2, 3, 8]
        );
    }

    #[test]
    fn each_refusal_of_an_identity_doubles_its_back_off() {
        // (refusals so far, wait after this one)
        let cases = [
            (1, 5),
            (2, 10),
            (3, 20),
            (4, 40),
            (5, 80),
            (6, 160),
            (7, 160),
            (40, 160),
        ];
        for (failures, secs) in cases {
            assert_eq!(back_off(failures), Duration::from_secs(secs), "{failures}");
        }
        let now = Instant::now();
        let mut q: Quarantine = [(uai("old"), (now, 2))].into();
        let due = quarantine(&mut q, &uais(&["old", "new"]), now);
        assert_eq!(due, now + Duration::from_secs(5), "the earliest of the two");
        assert_eq!(q[&uai("old")], (now + Duration::from_secs(20), 3));
        assert_eq!(q[&uai("new")], (now + Duration::from_secs(5), 1));
        assert_eq!(
            quarantine(&mut q, &BTreeSet::new(), now),
            now + QUARANTINE_MAX,
            "nothing quarantined: the latest a probe can be"
        );
    }

    /// How a row's PATCH ends.
    #[derive(Clone, Copy, Debug)]
    enum Ends {
        Lands,
        Deferred,
        DeferredAfterOne,
        NotFound(&'static str),
        Anonymous,
        Throttled,
        NoAnswer,
    }

    type Names = &'static [&'static str];
    /// A write's group: adds, carries the removes, probe.
    type Expected = (Names, bool, bool);

    /// One row: the queue's start, then per write (expected group: adds,
    /// carries removes, probe) → how it ends → expected (quarantine, next).
    struct Row {
        name: &'static str,
        batch: &'static [&'static str],
        probes: &'static [&'static str],
        remove: &'static [&'static str],
        max_retry: u32,
        writes: Vec<(Expected, Ends, (Names, Next))>,
        /// refused, deferred, reread at the end.
        end: (&'static [&'static str], bool, bool),
    }

    fn run(row: &Row) {
        // Nothing on the resource, so every non-empty group is a PATCH.
        let mut current = ResourceIdentity {
            type_: "None".into(),
            provisioning_state: "Succeeded".into(),
            ..Default::default()
        };
        current.user_assigned = uais(row.remove);
        let mut q = WriteQueue::new(
            uais(row.batch),
            row.probes.iter().map(|n| uai(n)).collect(),
            uais(row.remove),
            row.max_retry,
        );
        for (i, ((add, removes, probe), ends, (quarantined, next))) in row.writes.iter().enumerate()
        {
            let write = q
                .next(&current)
                .unwrap_or_else(|| panic!("{}: write {i}: the queue ended early", row.name));
            let want = Group {
                add: uais(add),
                removes: *removes,
                probe: *probe,
            };
            assert_eq!(write.group, want, "{}: write {i}", row.name);
            assert!(!write.patches.is_empty(), "{}: write {i}", row.name);
            let error = match ends {
                Ends::NotFound(n) => Some(not_found(n)),
                Ends::Anonymous => Some(anonymous()),
                Ends::Throttled => Some(throttled()),
                Ends::Lands | Ends::Deferred | Ends::DeferredAfterOne | Ends::NoAnswer => None,
            };
            let sent = match ends {
                Ends::Lands => Sent::Landed,
                Ends::Deferred => Sent::Deferred { sent_some: false },
                Ends::DeferredAfterOne => Sent::Deferred { sent_some: true },
                _ => Sent::Failed(error.as_ref()),
            };
            let want = Step {
                quarantine: uais(quarantined),
                next: *next,
            };
            assert_eq!(
                q.record(&write.group, sent),
                want,
                "{}: write {i}",
                row.name
            );
        }
        assert!(q.next(&current).is_none(), "{}: more writes", row.name);
        let (refused, deferred, reread) = row.end;
        assert_eq!(q.refused(), &uais(refused), "{}", row.name);
        assert_eq!(q.deferred(), deferred, "{}", row.name);
        assert_eq!(q.reread(), reread, "{}", row.name);
    }

    #[test]
    fn the_write_queue_quarantines_halves_bounds_and_defers() {
        use Ends::*;
        use Next::*;
        // Rows give what differs from this.
        let base = || Row {
            name: "",
            batch: &[],
            probes: &[],
            remove: &[],
            max_retry: 5,
            writes: vec![],
            end: (&[], false, true),
        };
        let rows = [
            Row {
                name: "everything lands in one batch",
                batch: &["a", "b"],
                remove: &["old"],
                max_retry: 2,
                writes: vec![((&["a", "b"], true, false), Lands, (&[], Continue))],
                ..base()
            },
            Row {
                name: "nothing to change: no PATCH",
                batch: &[],
                max_retry: 2,
                writes: vec![],
                end: (&[], false, false),
                ..base()
            },
            Row {
                name: "the named identity is quarantined, the rest go on with the removes",
                batch: &["a", "b", "ghost"],
                remove: &["old"],
                max_retry: 2,
                writes: vec![
                    (
                        (&["a", "b", "ghost"], true, false),
                        NotFound("ghost"),
                        (&["ghost"], PauseAndReread),
                    ),
                    ((&["a", "b"], true, false), Lands, (&[], Continue)),
                ],
                end: (&["ghost"], false, true),
                ..base()
            },
            Row {
                name: "the batch was only the culprit: the removes still go",
                batch: &["ghost"],
                remove: &["old"],
                max_retry: 2,
                writes: vec![
                    (
                        (&["ghost"], true, false),
                        NotFound("ghost"),
                        (&["ghost"], PauseAndReread),
                    ),
                    ((&[], true, false), Lands, (&[], Continue)),
                ],
                end: (&["ghost"], false, true),
                ..base()
            },
            Row {
                name: "no identity named: halves until the culprit stands alone",
                batch: &["a", "b", "c", "ghost"],
                max_retry: 3,
                writes: vec![
                    (
                        (&["a", "b", "c", "ghost"], true, false),
                        Anonymous,
                        (&[], PauseAndReread),
                    ),
                    ((&["a", "b"], true, false), Lands, (&[], Continue)),
                    (
                        (&["c", "ghost"], false, false),
                        Anonymous,
                        (&[], PauseAndReread),
                    ),
                    ((&["c"], false, false), Lands, (&[], Continue)),
                    (
                        (&["ghost"], false, false),
                        Anonymous,
                        (&["ghost"], Continue),
                    ),
                ],
                end: (&["ghost"], false, true),
                ..base()
            },
            Row {
                name: "the failures are counted across the groups of the cycle",
                batch: &["a", "b", "c", "ghost"],
                max_retry: 0,
                writes: vec![
                    (
                        (&["a", "b", "c", "ghost"], true, false),
                        Anonymous,
                        (&[], PauseAndReread),
                    ),
                    ((&["a", "b"], true, false), Lands, (&[], Continue)),
                    ((&["c", "ghost"], false, false), Anonymous, (&[], Stop)),
                ],
                ..base()
            },
            Row {
                name: "the retry bound: max retry plus the halvings of the group",
                batch: &["a", "b"],
                probes: &["p"],
                max_retry: 1,
                writes: vec![
                    ((&["a", "b"], true, false), Anonymous, (&[], PauseAndReread)),
                    ((&["a"], true, false), Anonymous, (&["a"], Stop)),
                ],
                end: (&["a"], false, true),
                ..base()
            },
            Row {
                name: "throttled: stop, nothing quarantined, probes wait",
                batch: &["a"],
                probes: &["p"],
                writes: vec![((&["a"], true, false), Throttled, (&[], Stop))],
                ..base()
            },
            Row {
                name: "no answer at all: stop",
                batch: &["a"],
                writes: vec![((&["a"], true, false), NoAnswer, (&[], Stop))],
                ..base()
            },
            Row {
                name: "probes go alone after the batch; a refused probe does not pause",
                batch: &["a"],
                probes: &["p", "q"],
                writes: vec![
                    ((&["a"], true, false), Lands, (&[], Continue)),
                    ((&["p"], false, true), NotFound("p"), (&["p"], Continue)),
                    ((&["q"], false, true), Lands, (&[], Continue)),
                ],
                end: (&["p"], false, true),
                ..base()
            },
            Row {
                name: "the budget defers the first PATCH: stop, nothing to read again",
                batch: &["a"],
                probes: &["p"],
                writes: vec![((&["a"], true, false), Deferred, (&[], Stop))],
                end: (&[], true, false),
                ..base()
            },
            Row {
                name: "the budget defers a later PATCH: stop, read again",
                batch: &["a"],
                writes: vec![((&["a"], true, false), DeferredAfterOne, (&[], Stop))],
                end: (&[], true, true),
                ..base()
            },
            Row {
                name: "a refusal naming someone outside the group halves it",
                batch: &["a", "b"],
                max_retry: 0,
                writes: vec![
                    (
                        (&["a", "b"], true, false),
                        NotFound("zz"),
                        (&[], PauseAndReread),
                    ),
                    ((&["a"], true, false), Lands, (&[], Continue)),
                    ((&["b"], false, false), Lands, (&[], Continue)),
                ],
                ..base()
            },
        ];
        for row in &rows {
            run(row);
        }
    }

    fn key(n: &str) -> Key {
        ("ns".to_string(), n.to_string())
    }

    fn clash(id: &str) -> guard::Refusal {
        guard::Refusal::ClientIdMismatch {
            identity_id: id.to_string(),
            typed: "typed".into(),
            reported: "other".into(),
        }
    }

    #[test]
    fn each_assigned_identity_settles_from_what_landed() {
        // Row: (name, provisioning state, on the resource, assign (aai, id),
        // delete (aai, id), refused before, refused now, quarantined,
        // deferred, released, expected actions, expected last failed).
        type Pairs = &'static [(&'static str, &'static str)];
        struct Row {
            name: &'static str,
            state: &'static str,
            on: Names,
            assign: Pairs,
            delete: Pairs,
            refused_before: Names,
            refused_now: Names,
            quarantined: Names,
            deferred: bool,
            released: Names,
            want: Vec<Settle>,
            failed: bool,
        }
        let assign = |k: &str, id: &str| Settle::Assign {
            key: key(k),
            id: id.into(),
        };
        let not_yet = |k: &str, event| Settle::NotYet { key: key(k), event };
        let base = Row {
            name: "",
            state: "Succeeded",
            on: &[],
            assign: &[],
            delete: &[],
            refused_before: &[],
            refused_now: &[],
            quarantined: &[],
            deferred: false,
            released: &[],
            want: vec![],
            failed: false,
        };
        let rows = [
            Row {
                name: "landed: Assigned",
                on: &["a"],
                assign: &[("pa", "a")],
                want: vec![assign("pa", "a")],
                ..base
            },
            Row {
                name: "landed but fails the checks: refused",
                on: &["bad"],
                assign: &[("pb", "bad")],
                want: vec![Settle::Refuse {
                    key: key("pb"),
                    id: "bad".into(),
                    refusal: clash("bad"),
                }],
                ..base
            },
            Row {
                name: "not there: an Event says so",
                assign: &[("pa", "a")],
                want: vec![not_yet("pa", Some(WHY_NOT_YET))],
                ..base
            },
            Row {
                name: "deferred by the budget: no Event",
                assign: &[("pa", "a")],
                deferred: true,
                want: vec![not_yet("pa", None)],
                ..base
            },
            Row {
                name: "refused now or quarantined: the refusal Event, even when deferred",
                assign: &[("pa", "a"), ("pq", "q"), ("pc", "c")],
                refused_now: &["a"],
                quarantined: &["q"],
                deferred: true,
                want: vec![
                    not_yet("pa", Some(WHY_REFUSED)),
                    not_yet("pq", Some(WHY_REFUSED)),
                    not_yet("pc", None),
                ],
                ..base
            },
            Row {
                name: "refused by the guard before the PATCH: already reported",
                on: &["a"],
                assign: &[("pa", "a")],
                refused_before: &["pa"],
                want: vec![],
                ..base
            },
            Row {
                name: "the last operation failed: nothing counts as landed",
                state: "Failed",
                on: &["a"],
                assign: &[("pa", "a")],
                delete: &[("pd", "d")],
                want: vec![Settle::Delete { key: key("pd") }],
                failed: true,
                ..base
            },
            Row {
                name: "retiring: deleted once off, kept while there, released stays",
                on: &["there", "kept"],
                delete: &[("p1", "gone"), ("p2", "there"), ("p3", "kept")],
                released: &["p3"],
                want: vec![
                    Settle::Delete { key: key("p1") },
                    Settle::StillThere { key: key("p2") },
                    Settle::Delete { key: key("p3") },
                ],
                ..base
            },
            Row {
                name: "assigns come before deletes",
                on: &["a"],
                assign: &[("pa", "a"), ("pb", "b")],
                delete: &[("pd", "d")],
                want: vec![
                    assign("pa", "a"),
                    not_yet("pb", Some(WHY_NOT_YET)),
                    Settle::Delete { key: key("pd") },
                ],
                ..base
            },
        ];
        for row in rows {
            let current = ResourceIdentity {
                type_: "UserAssigned".into(),
                user_assigned: ids(row.on),
                provisioning_state: row.state.into(),
                ..Default::default()
            };
            let keys = |v: Names| v.iter().map(|n| key(n)).collect::<BTreeSet<_>>();
            let pairs = |v: Pairs| {
                v.iter()
                    .map(|(k, id)| (key(k), id.to_string()))
                    .collect::<Vec<_>>()
            };
            let (assign, delete) = (pairs(row.assign), pairs(row.delete));
            let (refused_before, released) = (keys(row.refused_before), keys(row.released));
            let (refused_now, quarantined) = (ids(row.refused_now), ids(row.quarantined));
            let input = SettleInput {
                current: &current,
                assign: assign.iter().map(|(k, id)| (k, id.as_str())).collect(),
                delete: delete.iter().map(|(k, id)| (k, id.as_str())).collect(),
                refused_before: &refused_before,
                refused_now: &refused_now,
                quarantined: &quarantined,
                deferred: row.deferred,
                released: &released,
            };
            let check = |_: &Key, id: &str| (id == "bad").then(|| clash(id));
            let got = settle(&input, &check);
            assert_eq!(got.actions, row.want, "{}", row.name);
            assert_eq!(got.last_operation_failed, row.failed, "{}", row.name);
        }
    }

    #[test]
    fn the_drift_check_demotes_failing_aais_and_readds_the_rest() {
        // (name, state, on the resource, expected, assigned (aai, id),
        // expected demotions (aai, id), expected re-adds)
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: [(&str, &str, Names, Names, Pairs, Pairs, Names); 6] = [
            (
                "nothing gone",
                "Succeeded",
                &["a"],
                &["a"],
                &[("pa", "a")],
                &[],
                &[],
            ),
            (
                "gone: added again",
                "Succeeded",
                &[],
                &["a", "b"],
                &[("pa", "a")],
                &[],
                &["a", "b"],
            ),
            (
                "a failing AAI is demoted; its identity is not added again",
                "Succeeded",
                &["bad"],
                &["a", "worse"],
                &[("pb", "bad"), ("pw", "worse"), ("pa", "a")],
                &[("pb", "bad"), ("pw", "worse")],
                &["a"],
            ),
            (
                "being deleted: demotions only",
                "Deleting",
                &["bad"],
                &["a"],
                &[("pb", "bad")],
                &[("pb", "bad")],
                &[],
            ),
            (
                "no Assigned AAI: re-adds only",
                "Succeeded",
                &[],
                &["a"],
                &[],
                &[],
                &["a"],
            ),
            ("nothing expected", "Succeeded", &["x"], &[], &[], &[], &[]),
        ];
        for (name, state, on, expected, assigned, demote, readd) in cases {
            let current = ResourceIdentity {
                type_: "UserAssigned".into(),
                user_assigned: ids(on),
                provisioning_state: state.into(),
                ..Default::default()
            };
            let keys: Vec<(Key, &str)> = assigned.iter().map(|(k, id)| (key(k), *id)).collect();
            let pairs: Vec<(&Key, &str)> = keys.iter().map(|(k, id)| (k, *id)).collect();
            let check = |_: &Key, id: &str| (id == "bad" || id == "worse").then(|| clash(id));
            let got = drift(&ids(expected), &pairs, &current, &check);
            let want = Drift {
                demote: demote.iter().map(|(k, id)| (key(k), clash(id))).collect(),
                readd: ids(readd),
            };
            assert_eq!(got, want, "{name}");
        }
    }
}

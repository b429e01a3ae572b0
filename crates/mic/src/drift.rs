//! Event-driven drift checks: which watch events ask for a drift check of one
//! VMSS/VM, and how often one resource may be checked that way. Pure; the
//! watches ([`crate::watch`]) and the control loop (`run`) do the I/O.
//!
//! Between the periodic safety net (`--identity-assignment-reconcile-interval`,
//! 30 minutes by default), MIC makes no ARM call while nothing changes. An
//! identity removed from a VMSS/VM behind MIC's back is caught instead from
//! what such a removal comes with:
//! - a Node whose boot ID, node image (the label AKS sets,
//!   [`LABEL_NODE_IMAGE_VERSION`]) or providerID changed (a reimage or an
//!   upgrade, which resets a scale set's model);
//! - an Event NMI publishes in its own (the release) namespace, reason
//!   [`REASON_IDENTITY_NOT_ON_NODE`], about its Node, when IMDS
//!   answers "Identity not found" for an identity whose
//!   AzureAssignedIdentity is Assigned.
//!
//! Either asks for a check of that node's resource only. A check reads the
//! resource and re-adds only what MIC's own plan says must be there (as the
//! periodic one does); still, [`Gate`] lets at most one event-driven check
//! run per resource per [`MIN_GAP`]: a request inside the gap is held until
//! it ends, and any number of requests meanwhile make one check.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node};

use crate::cloud::ResourceRef;

/// The label AKS sets on every node to its node image version (for example
/// `AKSUbuntu-2204gen2containerd-202509.23.0`); a new value means the node
/// was reimaged.
pub const LABEL_NODE_IMAGE_VERSION: &str = "kubernetes.azure.com/node-image-version";

/// The reason of the Event NMI publishes when IMDS does not know an
/// identity an Assigned AzureAssignedIdentity says is on its node (one
/// constant for both programs).
pub use aadpodid_api::REASON_IDENTITY_NOT_ON_NODE;

/// At most one event-driven drift check per resource in this time.
pub const MIN_GAP: Duration = Duration::from_secs(60);

/// What of a Node says it was rebooted, reimaged or replaced: its boot ID,
/// node image label and providerID, hashed (MIC keeps one per node).
/// `None` when the Node has none of the three (nothing to compare).
pub fn node_mark(node: &Node) -> Option<u64> {
    let boot = node
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.boot_id.as_str())
        .filter(|b| !b.is_empty());
    let image = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_NODE_IMAGE_VERSION))
        .map(String::as_str);
    let provider = node
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.as_deref())
        .filter(|p| !p.is_empty());
    if boot.is_none() && image.is_none() && provider.is_none() {
        return None;
    }
    // A fixed-key hasher: the same Node gives the same mark in every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (boot, image, provider).hash(&mut h);
    Some(h.finish())
}

/// Whether a Node seen with `old` (`None`: never seen, or seen without any
/// of the three) and now with `new` asks for a drift check of its resource:
/// only a change of a mark MIC already knew. A node seen the first time is
/// not one (MIC's first drift check after gaining the lease looks at every
/// resource, and a new node carries no identity MIC added yet).
pub fn node_changed(old: Option<u64>, new: Option<u64>) -> bool {
    matches!((old, new), (Some(a), Some(b)) if a != b)
}

/// The node an Event asks a drift check for: an Event with the reason
/// NMI publishes, about a Node (`regarding`/`involvedObject` of kind Node);
/// `None` for any other.
pub fn event_node(event: &Event) -> Option<&str> {
    if event.reason.as_deref() != Some(REASON_IDENTITY_NOT_ON_NODE) {
        return None;
    }
    let about = &event.involved_object;
    (about.kind.as_deref() == Some("Node"))
        .then_some(about.name.as_deref())
        .flatten()
        .filter(|n| !n.is_empty())
}

/// At most one event-driven check per resource per gap; requests within it
/// wait for its end and merge. Time is a [`Duration`] since an origin the
/// caller picks.
#[derive(Debug)]
pub struct Gate {
    gap: Duration,
    /// When each resource was last checked (entries older than the gap are
    /// dropped as checks are handed out, so this stays as small as the
    /// resources checked within one gap).
    last: BTreeMap<ResourceRef, Duration>,
    /// Requested checks and when each may run.
    pending: BTreeMap<ResourceRef, Duration>,
}

impl Gate {
    pub fn new(gap: Duration) -> Self {
        Gate {
            gap,
            last: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Asks for a check of `r` at `now`: due at once, or at the end of the
    /// gap after its last check; a check already pending absorbs it.
    pub fn request(&mut self, r: ResourceRef, now: Duration) {
        if self.pending.contains_key(&r) {
            return;
        }
        let at = self.last.get(&r).map_or(now, |l| (*l + self.gap).max(now));
        self.pending.insert(r, at);
    }

    /// The checks due at `now`, each recorded as run now.
    pub fn due(&mut self, now: Duration) -> Vec<ResourceRef> {
        let gap = self.gap;
        self.last.retain(|_, l| *l + gap > now);
        let due: Vec<ResourceRef> = self
            .pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(r, _)| r.clone())
            .collect();
        for r in &due {
            self.pending.remove(r);
            self.last.insert(r.clone(), now);
        }
        due
    }

    /// When the next pending check is due.
    pub fn next_at(&self) -> Option<Duration> {
        self.pending.values().min().copied()
    }

    /// Forgets pending checks (a replica that stops leading; the next term
    /// starts with a check of every resource).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, NodeSystemInfo, ObjectReference};

    fn node(boot: &str, image: Option<&str>, provider: Option<&str>, other: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("team".to_string(), other.to_string());
        if let Some(i) = image {
            labels.insert(LABEL_NODE_IMAGE_VERSION.to_string(), i.to_string());
        }
        n.metadata.labels = Some(labels);
        n.spec = Some(NodeSpec {
            provider_id: provider.map(str::to_string),
            ..NodeSpec::default()
        });
        n.status = Some(NodeStatus {
            node_info: Some(NodeSystemInfo {
                boot_id: boot.into(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        });
        n
    }

    #[test]
    fn only_a_boot_image_or_provider_change_of_a_known_node_asks_for_a_check() {
        let p1 = Some(
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/0",
        );
        let p2 = Some(
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/1",
        );
        let base = node("b1", Some("img-1"), p1, "a");
        // (before, after, a check?)
        let cases = [
            (None, node("b1", Some("img-1"), p1, "a"), false),
            (Some(base.clone()), base.clone(), false),
            (
                Some(base.clone()),
                node("b1", Some("img-1"), p1, "b"),
                false,
            ),
            (Some(base.clone()), node("b2", Some("img-1"), p1, "a"), true),
            (Some(base.clone()), node("b1", Some("img-2"), p1, "a"), true),
            (Some(base.clone()), node("b1", None, p1, "a"), true),
            (Some(base.clone()), node("b1", Some("img-1"), p2, "a"), true),
            // A node that had none of the three, then got them: first sight.
            (Some(node("", None, None, "a")), base.clone(), false),
            (Some(base.clone()), node("", None, None, "a"), false),
        ];
        for (i, (before, after, want)) in cases.into_iter().enumerate() {
            let old = before.as_ref().and_then(node_mark);
            assert_eq!(node_changed(old, node_mark(&after)), want, "case {i}");
        }
        // Status heartbeats and other fields do not move the mark.
        let mut beat = base.clone();
        beat.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        beat.metadata.resource_version = Some("99".into());
        assert_eq!(node_mark(&beat), node_mark(&base));
    }

    #[test]
    fn only_the_reason_about_a_node_names_one() {
        let ev = |reason: &str, kind: &str, name: &str| Event {
            reason: Some(reason.into()),
            involved_object: ObjectReference {
                kind: Some(kind.into()),
                name: Some(name.into()),
                ..ObjectReference::default()
            },
            ..Event::default()
        };
        let r = REASON_IDENTITY_NOT_ON_NODE;
        let cases = [
            (ev(r, "Node", "n1"), Some("n1")),
            (ev(r, "Pod", "n1"), None),
            (ev(r, "Node", ""), None),
            (ev("Other", "Node", "n1"), None),
            (Event::default(), None),
        ];
        for (i, (event, want)) in cases.iter().enumerate() {
            assert_eq!(event_node(event), *want, "case {i}");
        }
    }

    #[test]
    fn one_check_per_resource_per_gap_and_requests_meanwhile_merge() {
        let s = Duration::from_secs;
        let a = ResourceRef::vmss("a");
        let b = ResourceRef::vm("b");
        let mut g = Gate::new(s(60));
        assert_eq!(g.next_at(), None);
        g.request(a.clone(), s(10));
        assert_eq!(g.next_at(), Some(s(10)));
        assert_eq!(g.due(s(10)), vec![a.clone()]);
        // Within the gap: held to its end; more requests merge into it.
        g.request(a.clone(), s(20));
        g.request(a.clone(), s(30));
        g.request(b.clone(), s(30));
        assert_eq!(g.next_at(), Some(s(30)));
        assert_eq!(g.due(s(30)), vec![b.clone()]);
        assert_eq!(g.next_at(), Some(s(70)));
        assert!(g.due(s(69)).is_empty());
        assert_eq!(g.due(s(70)), vec![a.clone()]);
        assert_eq!(g.next_at(), None);
        // After the gap a request is due at once.
        g.request(b.clone(), s(200));
        assert_eq!(g.due(s(200)), vec![b.clone()]);
        // Old records are dropped.
        assert_eq!(g.last.len(), 1);
        g.request(a.clone(), s(300));
        g.clear_pending();
        assert!(g.due(s(400)).is_empty());
    }
}

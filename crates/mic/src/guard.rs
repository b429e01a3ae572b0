//! Entitlement decisions on one VMSS/VM, made against what ARM reports: the
//! plan ([`crate::plan`]) knows only the cluster, so it says what should be
//! on each resource; this module takes that work and the resource as read
//! from ARM, with the ownership [`Ledger`], and says what may really be sent
//! and which AzureAssignedIdentities (AAIs) may be marked Assigned. Pure.
//!
//! The rules:
//! - an AAI is Assigned only if the `clientId` ARM reports for its identity
//!   on the resource equals the AzureIdentity's `spec.clientID` (ignoring
//!   case): the user-typed client ID is what NMI asks for, the resource ID
//!   is what MIC assigns, and both must name the same identity;
//! - cluster identities are protected: those whose ARM-reported client ID
//!   is azure.json's `userAssignedIdentityID` or in `--immutable-user-msis`,
//!   and every identity on the resource that MIC did not add (no ledger
//!   entry: it was there before MIC). A protected identity is never removed,
//!   and its AAI is never Assigned unless `--serve-cluster-identities`. An
//!   AzureIdentity whose typed client ID is in that set is refused the same
//!   way, before anything is sent;
//! - MIC removes only identities it added (ledger entry), and writes the
//!   entry before the PATCH that adds an identity.

use std::collections::{BTreeMap, BTreeSet};

use crate::cloud::ResourceIdentity;
use crate::index::Key;
use crate::plan::ResourceWork;

/// Settings of the guard.
#[derive(Clone, Debug, Default)]
pub struct Protection {
    /// Client IDs of the cluster's identities, lower-cased: azure.json's
    /// `userAssignedIdentityID` and `--immutable-user-msis`.
    pub cluster_client_ids: BTreeSet<String>,
    /// `--serve-cluster-identities`: AAIs of protected identities may be
    /// Assigned (they are still never removed).
    pub serve_cluster_identities: bool,
}

/// Why an AAI is not marked Assigned. The AAI stays Created, carries the
/// message in its `assignment-error` annotation, and an Event with the
/// reason goes to its AzureIdentity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// ARM's client ID for the resource ID is not the AzureIdentity's.
    ClientIdMismatch {
        identity_id: String,
        typed: String,
        /// Empty when ARM reported none.
        reported: String,
    },
    /// A cluster identity (by ARM's client ID, by the typed client ID, or
    /// because it was on the resource before MIC).
    ClusterIdentity {
        identity_id: String,
        why: ClusterWhy,
    },
}

/// What makes an identity a cluster identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterWhy {
    /// ARM reports a client ID of the cluster's identities.
    ReportedClientId,
    /// The AzureIdentity's typed client ID is one of the cluster's.
    TypedClientId,
    /// On the resource and not added by MIC.
    PreExisting,
}

/// Event reason of a client ID mismatch.
pub const REASON_CLIENT_ID_MISMATCH: &str = "IdentityClientIDMismatch";
/// Event reason of a refused cluster identity.
pub const REASON_CLUSTER_IDENTITY: &str = "ClusterIdentityRefused";

impl Refusal {
    /// The Event reason (also the metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ClientIdMismatch { .. } => REASON_CLIENT_ID_MISMATCH,
            Refusal::ClusterIdentity { .. } => REASON_CLUSTER_IDENTITY,
        }
    }

    /// The text of the annotation and the Event.
    pub fn message(&self) -> String {
        match self {
            Refusal::ClientIdMismatch {
                identity_id,
                typed,
                reported,
            } if reported.is_empty() => format!(
                "not assigned: Azure reports no client ID for {identity_id}, so clientID {typed} cannot be checked"
            ),
            Refusal::ClientIdMismatch {
                identity_id,
                typed,
                reported,
            } => format!(
                "not assigned: clientID {typed} is not the client ID of {identity_id} (Azure reports {reported})"
            ),
            Refusal::ClusterIdentity { identity_id, why } => {
                let what = match why {
                    ClusterWhy::ReportedClientId => {
                        "is one of the cluster's own identities (its client ID is the kubelet identity's or listed in --immutable-user-msis)"
                    }
                    ClusterWhy::TypedClientId => {
                        "names a client ID of the cluster's own identities (the kubelet identity's or one listed in --immutable-user-msis)"
                    }
                    ClusterWhy::PreExisting => {
                        "was on the node's VMSS/VM before MIC added it (a cluster or add-on identity)"
                    }
                };
                format!(
                    "not assigned: {identity_id} {what}; MIC serves such identities only with --serve-cluster-identities"
                )
            }
        }
    }
}

/// The work on one resource that the guard lets through, before the PATCH.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vetted {
    /// Identity IDs to add (those already there are skipped by the PATCH).
    pub add: BTreeSet<String>,
    /// Identity IDs to remove: on the resource, added by MIC, not protected.
    pub remove: BTreeSet<String>,
    /// Identity IDs to record in the ledger before any PATCH: the adds not
    /// on the resource and not recorded yet.
    pub record: BTreeSet<String>,
    /// Retiring AAIs whose identity stays on the resource (protected or not
    /// MIC's): deleted with no ARM call.
    pub release: Vec<Key>,
    /// AAIs refused before anything is sent.
    pub refused: Vec<(Key, Refusal)>,
}

fn lower(s: &str) -> String {
    s.trim().to_lowercase()
}

/// Whether `id`, on the resource now, is protected there.
fn protected_on(
    id: &str,
    current: &ResourceIdentity,
    owns: &dyn Fn(&str) -> bool,
    p: &Protection,
) -> Option<ClusterWhy> {
    if !current.user_assigned.contains(id) {
        return None;
    }
    if current
        .client_id(id)
        .is_some_and(|c| p.cluster_client_ids.contains(c))
    {
        return Some(ClusterWhy::ReportedClientId);
    }
    (!owns(id)).then_some(ClusterWhy::PreExisting)
}

/// Checks one AAI against the resource as ARM reports it. `None` means it
/// may be marked Assigned (if its identity is there). Pure.
pub fn check(
    id: &str,
    typed_client_id: &str,
    current: &ResourceIdentity,
    owns: &dyn Fn(&str) -> bool,
    p: &Protection,
) -> Option<Refusal> {
    let typed = lower(typed_client_id);
    if !p.serve_cluster_identities {
        let why = if p.cluster_client_ids.contains(&typed) {
            Some(ClusterWhy::TypedClientId)
        } else {
            protected_on(id, current, owns, p)
        };
        if let Some(why) = why {
            return Some(Refusal::ClusterIdentity {
                identity_id: id.to_string(),
                why,
            });
        }
    }
    if !current.user_assigned.contains(id) {
        return None;
    }
    let reported = current.client_id(id).unwrap_or_default();
    (reported.is_empty() || reported != typed).then(|| Refusal::ClientIdMismatch {
        identity_id: id.to_string(),
        typed: typed_client_id.to_string(),
        reported: reported.to_string(),
    })
}

/// Vets a resource's work before the PATCH. `typed` gives the AzureIdentity
/// client ID of each AAI of `w.assign_on_success`; `owns` says whether the
/// ledger has an entry for an identity on this resource. Pure.
pub fn vet(
    w: &ResourceWork,
    current: &ResourceIdentity,
    typed: &BTreeMap<Key, String>,
    owns: &dyn Fn(&str) -> bool,
    p: &Protection,
) -> Vetted {
    let mut out = Vetted::default();
    // An add goes out if some AAI waiting on it is not refused.
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut waited: BTreeSet<String> = BTreeSet::new();
    for (key, id) in &w.assign_on_success {
        waited.insert(id.clone());
        let client = typed.get(key).map(String::as_str).unwrap_or_default();
        match check(id, client, current, owns, p) {
            // A mismatch can only be known once the identity is there; an
            // identity that is there needs no add anyway.
            Some(r) => out.refused.push((key.clone(), r)),
            None => {
                wanted.insert(id.clone());
            }
        }
    }
    for id in &w.add {
        if wanted.contains(id) || !waited.contains(id) {
            out.add.insert(id.clone());
        }
    }
    for id in &out.add {
        if !current.user_assigned.contains(id) && !owns(id) {
            out.record.insert(id.clone());
        }
    }
    for id in &w.remove {
        if current.user_assigned.contains(id)
            && !out.add.contains(id)
            && owns(id)
            && protected_on(id, current, owns, p).is_none()
        {
            out.remove.insert(id.clone());
        }
    }
    for (key, id) in &w.delete_on_success {
        if current.user_assigned.contains(id) && !out.remove.contains(id) && !out.add.contains(id) {
            out.release.push(key.clone());
        }
    }
    out
}

/// Withholds the adds of identities that ARM reported, on some other
/// resource, with a client ID of the cluster's identities (`known`:
/// lower-cased identity ID → ARM's client ID, learned from earlier reads).
/// Once added such an identity could never be removed again, so unless
/// cluster identities are served it is not added at all, and the AAIs
/// waiting on it are refused now. Pure.
pub fn withhold_known_cluster_identities(
    v: &mut Vetted,
    w: &ResourceWork,
    known: &BTreeMap<String, String>,
    p: &Protection,
) {
    if p.serve_cluster_identities {
        return;
    }
    let withheld: BTreeSet<String> = v
        .record
        .iter()
        .filter(|id| {
            known
                .get(*id)
                .is_some_and(|c| p.cluster_client_ids.contains(c))
        })
        .cloned()
        .collect();
    if withheld.is_empty() {
        return;
    }
    v.add.retain(|id| !withheld.contains(id));
    v.record.retain(|id| !withheld.contains(id));
    for (key, id) in &w.assign_on_success {
        if withheld.contains(id) && !v.refused.iter().any(|(k, _)| k == key) {
            v.refused.push((
                key.clone(),
                Refusal::ClusterIdentity {
                    identity_id: id.clone(),
                    why: ClusterWhy::ReportedClientId,
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::ArmIdentity;

    fn id(n: &str) -> String {
        format!(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/{n}"
        )
    }

    fn client(n: &str) -> String {
        format!("client-{n}")
    }

    /// A resource holding `names`, ARM reporting `client-<name>` for each.
    fn resource(names: &[&str]) -> ResourceIdentity {
        ResourceIdentity {
            type_: "UserAssigned".into(),
            user_assigned: names.iter().map(|n| id(n)).collect(),
            provisioning_state: "Succeeded".into(),
            reported: names
                .iter()
                .map(|n| {
                    (
                        id(n),
                        ArmIdentity {
                            client_id: client(n),
                            principal_id: format!("principal-{n}"),
                        },
                    )
                })
                .collect(),
        }
    }

    fn key(n: &str) -> Key {
        ("default".into(), n.into())
    }

    fn kubelet_protection(serve: bool) -> Protection {
        Protection {
            cluster_client_ids: [client("kubelet"), "immutable-client".to_string()].into(),
            serve_cluster_identities: serve,
        }
    }

    fn owned(names: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |i: &str| names.iter().any(|n| id(n) == i)
    }

    #[test]
    fn an_aai_is_assigned_only_when_arm_reports_its_client_id() {
        let p = kubelet_protection(false);
        let cur = resource(&["kubelet", "app", "addon"]);
        let owns = owned(&["app", "kubelet"]);
        // (identity, typed client ID, expected)
        let cases: Vec<(&str, String, Option<Refusal>)> = vec![
            ("app", client("app"), None),
            ("app", client("app").to_uppercase(), None),
            // Not there yet: nothing to compare; checked after the PATCH.
            ("new", client("whatever"), None),
            (
                "app",
                client("other"),
                Some(Refusal::ClientIdMismatch {
                    identity_id: id("app"),
                    typed: client("other"),
                    reported: client("app"),
                }),
            ),
            // The first attack: another identity's resource ID with the
            // kubelet identity's client ID.
            (
                "app",
                client("kubelet"),
                Some(Refusal::ClusterIdentity {
                    identity_id: id("app"),
                    why: ClusterWhy::TypedClientId,
                }),
            ),
            // The kubelet resource ID with any client ID: protected by the
            // client ID ARM reports, even though the ledger lists it.
            (
                "kubelet",
                client("mine"),
                Some(Refusal::ClusterIdentity {
                    identity_id: id("kubelet"),
                    why: ClusterWhy::ReportedClientId,
                }),
            ),
            // There before MIC: an add-on identity, even with its true client ID.
            (
                "addon",
                client("addon"),
                Some(Refusal::ClusterIdentity {
                    identity_id: id("addon"),
                    why: ClusterWhy::PreExisting,
                }),
            ),
            (
                "new",
                "IMMUTABLE-client".into(),
                Some(Refusal::ClusterIdentity {
                    identity_id: id("new"),
                    why: ClusterWhy::TypedClientId,
                }),
            ),
        ];
        for (name, typed, want) in cases {
            assert_eq!(
                check(&id(name), &typed, &cur, &owns, &p),
                want,
                "{name} {typed}"
            );
        }
        // Opted in: cluster identities may be served, but only with the right client ID.
        let p = kubelet_protection(true);
        assert_eq!(
            check(&id("kubelet"), &client("kubelet"), &cur, &owns, &p),
            None
        );
        assert_eq!(check(&id("addon"), &client("addon"), &cur, &owns, &p), None);
        assert!(matches!(
            check(&id("kubelet"), &client("app"), &cur, &owns, &p),
            Some(Refusal::ClientIdMismatch { .. })
        ));
        // ARM reporting no client ID: refused, never assumed.
        let mut silent = resource(&["app"]);
        silent.reported.clear();
        assert_eq!(
            check(&id("app"), &client("app"), &silent, &owned(&["app"]), &p),
            Some(Refusal::ClientIdMismatch {
                identity_id: id("app"),
                typed: client("app"),
                reported: String::new(),
            })
        );
    }

    #[test]
    fn only_identities_mic_added_are_removed() {
        let p = kubelet_protection(false);
        let cur = resource(&["kubelet", "app", "addon", "mine-immutable"]);
        let mut cur_imm = cur.clone();
        cur_imm.reported.insert(
            id("mine-immutable"),
            ArmIdentity {
                client_id: "immutable-client".into(),
                principal_id: String::new(),
            },
        );
        let owns = owned(&["app", "mine-immutable", "gone"]);
        let w = ResourceWork {
            remove: [
                id("kubelet"),
                id("app"),
                id("addon"),
                id("mine-immutable"),
                id("gone"),
            ]
            .into(),
            delete_on_success: vec![
                (key("f6"), id("kubelet")),
                (key("app"), id("app")),
                (key("addon"), id("addon")),
                (key("imm"), id("mine-immutable")),
                (key("gone"), id("gone")),
            ],
            ..Default::default()
        };
        let v = vet(&w, &cur_imm, &BTreeMap::new(), &owns, &p);
        assert_eq!(v.remove, [id("app")].into(), "only MIC's own, unprotected");
        assert_eq!(
            v.release,
            vec![key("f6"), key("addon"), key("imm")],
            "their AAIs go, the identities stay"
        );
        assert!(v.add.is_empty() && v.record.is_empty() && v.refused.is_empty());
        // Serving cluster identities never makes them removable.
        let v = vet(
            &w,
            &cur_imm,
            &BTreeMap::new(),
            &owns,
            &kubelet_protection(true),
        );
        assert_eq!(v.remove, [id("app")].into());
    }

    #[test]
    fn the_ledger_entry_is_written_for_new_adds_only() {
        let p = kubelet_protection(false);
        let cur = resource(&["kubelet", "app", "addon"]);
        let owns = owned(&["app"]);
        let w = ResourceWork {
            add: [id("app"), id("new"), id("addon"), id("forged")].into(),
            assign_on_success: vec![
                (key("a"), id("app")),
                (key("n"), id("new")),
                (key("ad"), id("addon")),
                (key("fg"), id("forged")),
            ],
            ..Default::default()
        };
        let typed: BTreeMap<Key, String> = [
            (key("a"), client("app")),
            (key("n"), client("new")),
            (key("ad"), client("addon")),
            (key("fg"), client("kubelet")),
        ]
        .into();
        let v = vet(&w, &cur, &typed, &owns, &p);
        assert_eq!(v.add, [id("app"), id("new")].into());
        assert_eq!(
            v.record,
            [id("new")].into(),
            "app is recorded, addon is not MIC's"
        );
        assert_eq!(
            v.refused
                .iter()
                .map(|(k, r)| (k.clone(), r.reason()))
                .collect::<Vec<_>>(),
            vec![
                (key("ad"), REASON_CLUSTER_IDENTITY),
                (key("fg"), REASON_CLUSTER_IDENTITY)
            ],
            "refused before anything is sent: the forged one is never added"
        );
        // An add that one AAI wants and another is refused for still goes.
        let w2 = ResourceWork {
            add: [id("new")].into(),
            assign_on_success: vec![(key("n"), id("new")), (key("fg"), id("new"))],
            ..Default::default()
        };
        let v = vet(&w2, &cur, &typed, &owns, &p);
        assert_eq!(v.add, [id("new")].into());
        assert_eq!(v.refused.len(), 1);
    }

    #[test]
    fn an_identity_both_retired_and_added_is_not_removed() {
        let p = kubelet_protection(false);
        let cur = resource(&["app"]);
        let w = ResourceWork {
            add: [id("app")].into(),
            remove: [id("app")].into(),
            assign_on_success: vec![(key("new"), id("app"))],
            delete_on_success: vec![(key("old"), id("app"))],
        };
        let typed = [(key("new"), client("app"))].into();
        let v = vet(&w, &cur, &typed, &owned(&["app"]), &p);
        assert!(v.remove.is_empty());
        assert!(v.release.is_empty(), "the old AAI waits for the usual path");
    }

    #[test]
    fn a_cluster_identity_seen_elsewhere_is_not_added_here() {
        // The kubelet identity of another pool, named with a forged client
        // ID, on a scale set where it is not: not added (it could never be
        // removed again), unless cluster identities are served.
        let cur = resource(&[]);
        let w = ResourceWork {
            add: [id("kubelet"), id("app")].into(),
            assign_on_success: vec![(key("f"), id("kubelet")), (key("a"), id("app"))],
            ..Default::default()
        };
        let typed = [(key("f"), client("forged")), (key("a"), client("app"))].into();
        let known: BTreeMap<String, String> = [
            (id("kubelet"), client("kubelet")),
            (id("app"), client("app")),
        ]
        .into();
        let p = kubelet_protection(false);
        let mut v = vet(&w, &cur, &typed, &|_| false, &p);
        assert_eq!(v.record, [id("kubelet"), id("app")].into());
        withhold_known_cluster_identities(&mut v, &w, &known, &p);
        assert_eq!(v.add, [id("app")].into());
        assert_eq!(v.record, [id("app")].into());
        assert_eq!(
            v.refused,
            vec![(
                key("f"),
                Refusal::ClusterIdentity {
                    identity_id: id("kubelet"),
                    why: ClusterWhy::ReportedClientId
                }
            )]
        );
        let p = kubelet_protection(true);
        let mut v = vet(&w, &cur, &typed, &|_| false, &p);
        withhold_known_cluster_identities(&mut v, &w, &known, &p);
        assert_eq!(v.add.len(), 2, "served on request");
    }

    #[test]
    fn messages_name_the_identity_and_the_reason() {
        let m = Refusal::ClientIdMismatch {
            identity_id: id("a"),
            typed: "t".into(),
            reported: "r".into(),
        }
        .message();
        assert!(m.contains(&id("a")) && m.contains("Azure reports r"), "{m}");
        let m = Refusal::ClusterIdentity {
            identity_id: id("k"),
            why: ClusterWhy::PreExisting,
        }
        .message();
        assert!(m.contains("--serve-cluster-identities"), "{m}");
    }
}

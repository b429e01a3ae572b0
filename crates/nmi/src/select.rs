//! Which identity a pod gets: the security boundary, pure and table-tested.
//!
//! **AzureAssignedIdentities are checked, not trusted** ([`check_aai`]). An
//! AzureAssignedIdentity (AAI) counts only when all of these hold:
//! - it names this pod, and its status is exactly `Assigned` (usable) or
//!   `Created` (MIC is still working: the request waits). An empty status no
//!   longer counts as `Assigned`;
//! - it lives where MIC writes it: `default`, or the identity's namespace
//!   when the identity is namespaced (namespaced mode, or the identity's
//!   `aadpodidentity.k8s.io/Behavior: namespaced` annotation), and in that
//!   case the identity is in the pod's namespace;
//! - the identity and the binding it embeds carry a UID, and NMI's caches
//!   hold objects of the same name with the same UID and an equal spec;
//! - that binding names that identity, in the identity's namespace, and its
//!   selector equals the pod's current `aadpodidbinding` label.
//!
//! The token is then fetched for the *live* identity from the cache. An AAI
//! somewhere MIC never writes is ignored, as if absent (it can come only from
//! someone other than MIC, and must not turn a pod's wait into a refusal). One
//! where MIC writes that fails a check is settled and gives nothing: forged,
//! or stale (its identity or binding was deleted, recreated or edited, or the
//! pod relabelled), so the pod is refused at once rather than after the
//! wait (the server holds such a refusal for a moment, since its watches are
//! separate streams and a genuine AAI may arrive before its binding). Only
//! when a cache has not listed yet does the check wait.
//! Upstream trusted any AAI labelled with the node, from any namespace.
//!
//! **Deterministic choice.** When a pod may use several identities and the
//! request names none, NMI picks the usable identity whose AzureIdentity has
//! the smallest `(namespace, name)`. Upstream took "element 0" of an
//! unordered cache list; this rule gives every replica and every restart the
//! same answer.
//!
//! **Matching.** `client_id` and `msi_res_id` are compared ignoring ASCII case
//! (GUIDs and ARM IDs are case-insensitive; upstream's case-sensitive compare
//! gave a 404 after waiting:
//! docs/upstream-behaviour.md#h7-case-and-object_id-mismatches). `object_id`
//! is really matched: the server fetches each candidate's token by its
//! resource ID (checked against its client ID) and answers with the one whose
//! `oid` claim is the requested object ID.

use aadpodid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzureIdentityBindingSpec, AzureIdentitySpec, IdentityType,
};
use std::sync::Arc;

use kube::ResourceExt;

use crate::index::{Cached, Index, PodEntry};
use crate::request::Selector;

/// The namespace MIC writes AzureAssignedIdentities to when the identity is
/// not namespaced.
pub const DEFAULT_AAI_NAMESPACE: &str = "default";

/// What to do with a token request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Get a token for this identity.
    Use(Arc<AzureIdentity>),
    /// `object_id` request: fetch these (type-0) identities' tokens and use
    /// the one whose object ID is the requested one.
    ByObjectId(Vec<Arc<AzureIdentity>>),
    /// Nothing usable yet; wait for MIC. `created` says whether a matching
    /// identity is already `Created` (upstream's longer budget) or none exists.
    Wait {
        /// A matching AzureAssignedIdentity exists in state `Created`.
        created: bool,
    },
    /// Refused now: the pod's identities are settled and none matches.
    Deny,
}

/// Why an AzureAssignedIdentity gives nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AaiDefect {
    /// It names another pod.
    OtherPod,
    /// It embeds no identity.
    NoIdentity,
    /// Its status is neither `Assigned` nor `Created` (empty included).
    NotAssigned,
    /// It is not in the namespace MIC writes it to.
    WrongNamespace,
    /// Its identity is namespaced and in another namespace than the pod.
    ForeignNamespacedIdentity,
    /// The embedded identity has no UID.
    IdentityWithoutUid,
    /// No identity of that name exists any more.
    IdentityGone,
    /// The identity of that name is another object (other UID).
    IdentityReplaced,
    /// The identity's spec differs from the embedded copy.
    IdentityChanged,
    /// It embeds no binding.
    NoBinding,
    /// The embedded binding has no UID.
    BindingWithoutUid,
    /// No binding of that name exists any more.
    BindingGone,
    /// The binding of that name is another object (other UID).
    BindingReplaced,
    /// The binding's spec differs from the embedded copy.
    BindingChanged,
    /// The binding names another identity, or lives in another namespace.
    BindingForOtherIdentity,
    /// The binding's selector is not the pod's `aadpodidbinding` label.
    SelectorMismatch,
}

/// The verdict on one AzureAssignedIdentity for one pod.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AaiCheck<'a> {
    /// Not MIC's for this pod: no effect at all.
    Ignored(AaiDefect),
    /// Where MIC writes, but forged or stale: settled, gives nothing.
    Rejected(AaiDefect),
    /// An identity or binding cache has not listed yet.
    Undecided,
    /// Valid; `identity` is the live object from the cache.
    Valid {
        /// `Assigned` (else `Created`).
        assigned: bool,
        /// The live AzureIdentity.
        identity: &'a Arc<AzureIdentity>,
    },
}

/// The namespace MIC writes the AzureAssignedIdentity of `identity` to.
pub fn aai_namespace(identity: &AzureIdentity, force_namespaced: bool) -> String {
    if aadpodid_api::is_namespaced(identity, force_namespaced) {
        identity.namespace().unwrap_or_default()
    } else {
        DEFAULT_AAI_NAMESPACE.to_string()
    }
}

/// Identity specs equal in every field NMI reads. Go's upstream MIC embeds
/// an absent `clientPassword` as `{}` and absent lists as `null`, so those
/// count as equal to absent; `replicas` and `adResourceID` are never read.
pub fn same_identity_spec(a: &AzureIdentitySpec, b: &AzureIdentitySpec) -> bool {
    let password = |s: &AzureIdentitySpec| {
        s.client_password
            .clone()
            .filter(|p| p.name.is_some() || p.namespace.is_some())
    };
    let tenants = |s: &AzureIdentitySpec| s.auxiliary_tenant_ids.clone().unwrap_or_default();
    a.r#type == b.r#type
        && a.resource_id == b.resource_id
        && a.client_id == b.client_id
        && password(a) == password(b)
        && a.tenant_id == b.tenant_id
        && tenants(a) == tenants(b)
        && a.ad_endpoint == b.ad_endpoint
}

/// Binding specs equal in every field NMI reads (`weight` is never read).
pub fn same_binding_spec(a: &AzureIdentityBindingSpec, b: &AzureIdentityBindingSpec) -> bool {
    a.azure_identity == b.azure_identity && a.selector == b.selector
}

fn uid<K: ResourceExt>(obj: &K) -> Option<&str> {
    obj.meta().uid.as_deref().filter(|u| !u.is_empty())
}

/// Checks one AzureAssignedIdentity for `pod` against the live identities
/// and bindings in `index` (see the module documentation).
pub fn check_aai<'a>(
    aai: &AzureAssignedIdentity,
    pod: &PodEntry,
    index: &'a Index,
    namespaced: bool,
) -> AaiCheck<'a> {
    use AaiCheck::{Ignored, Rejected, Undecided};
    if aai.spec.pod != pod.name || aai.spec.pod_namespace != pod.namespace {
        return Ignored(AaiDefect::OtherPod);
    }
    let Some(embedded) = aai.spec.azure_identity_ref.as_deref() else {
        return Ignored(AaiDefect::NoIdentity);
    };
    let assigned = match aai.status.as_ref().map(|s| s.status.as_str()) {
        Some(s) if s == AssignedIdentityState::Assigned.as_str() => true,
        Some(s) if s == AssignedIdentityState::Created.as_str() => false,
        _ => return Ignored(AaiDefect::NotAssigned),
    };
    let id_ns = embedded.namespace().unwrap_or_default();
    let id_name = embedded.name_any();
    let live = index.lookup::<AzureIdentity>(&id_ns, &id_name);
    // Where MIC would have written it, judged by the live identity's
    // annotations when there is one (they decide namespaced behaviour).
    let judge: &AzureIdentity = match live {
        Cached::Found(l) => l,
        Cached::Missing | Cached::NotListed => embedded,
    };
    if aai.namespace().unwrap_or_default() != aai_namespace(judge, namespaced) {
        return Ignored(AaiDefect::WrongNamespace);
    }
    if aadpodid_api::is_namespaced(judge, namespaced) && id_ns != pod.namespace {
        return Ignored(AaiDefect::ForeignNamespacedIdentity);
    }
    let Some(embedded_uid) = uid(embedded) else {
        return Rejected(AaiDefect::IdentityWithoutUid);
    };
    let identity = match live {
        Cached::Found(l) => l,
        Cached::Missing => return Rejected(AaiDefect::IdentityGone),
        Cached::NotListed => return Undecided,
    };
    if uid(identity.as_ref()) != Some(embedded_uid) {
        return Rejected(AaiDefect::IdentityReplaced);
    }
    if !same_identity_spec(&identity.spec, &embedded.spec) {
        return Rejected(AaiDefect::IdentityChanged);
    }
    let Some(embedded_binding) = aai.spec.azure_binding_ref.as_deref() else {
        return Rejected(AaiDefect::NoBinding);
    };
    let Some(binding_uid) = uid(embedded_binding) else {
        return Rejected(AaiDefect::BindingWithoutUid);
    };
    let binding = match index.lookup::<AzureIdentityBinding>(
        &embedded_binding.namespace().unwrap_or_default(),
        &embedded_binding.name_any(),
    ) {
        Cached::Found(b) => b,
        Cached::Missing => return Rejected(AaiDefect::BindingGone),
        Cached::NotListed => return Undecided,
    };
    if uid(binding.as_ref()) != Some(binding_uid) {
        return Rejected(AaiDefect::BindingReplaced);
    }
    if !same_binding_spec(&binding.spec, &embedded_binding.spec) {
        return Rejected(AaiDefect::BindingChanged);
    }
    if binding.namespace().unwrap_or_default() != id_ns || binding.spec.azure_identity != id_name {
        return Rejected(AaiDefect::BindingForOtherIdentity);
    }
    if pod.labels.get(aadpodid_api::POD_LABEL_BINDING) != Some(&binding.spec.selector) {
        return Rejected(AaiDefect::SelectorMismatch);
    }
    AaiCheck::Valid { assigned, identity }
}

/// The pod's AzureAssignedIdentities that are where MIC writes but do not
/// match the live objects ([`AaiCheck::Rejected`]), and why.
pub fn rejected_aais(pod: &PodEntry, index: &Index, namespaced: bool) -> Vec<(String, AaiDefect)> {
    index
        .aais_for_pod(&pod.namespace, &pod.name)
        .into_iter()
        .filter_map(|a| match check_aai(a, pod, index, namespaced) {
            AaiCheck::Rejected(d) => Some((
                format!("{}/{}", a.namespace().unwrap_or_default(), a.name_any()),
                d,
            )),
            AaiCheck::Ignored(_) | AaiCheck::Undecided | AaiCheck::Valid { .. } => None,
        })
        .collect()
}

fn matches(identity: &AzureIdentity, selector: &Selector) -> bool {
    match selector {
        Selector::Default => true,
        Selector::ClientId(c) => identity.spec.client_id.eq_ignore_ascii_case(c),
        Selector::ResourceId(r) => identity.spec.resource_id.eq_ignore_ascii_case(r),
        // Only managed identities live in IMDS under an object ID.
        Selector::ObjectId(_) => identity.spec.r#type == IdentityType::UserAssignedMsi,
    }
}

/// `(namespace, name)`, borrowed (what [`ResourceExt::namespace`] and
/// [`ResourceExt::name_any`] give, without copying).
fn sort_key(i: &AzureIdentity) -> (&str, &str) {
    let m = &i.metadata;
    (
        m.namespace.as_deref().unwrap_or_default(),
        m.name
            .as_deref()
            .or(m.generate_name.as_deref())
            .unwrap_or_default(),
    )
}

fn choose(mut usable: Vec<Arc<AzureIdentity>>, selector: &Selector) -> Outcome {
    usable.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    usable.dedup_by(|a, b| sort_key(a) == sort_key(b));
    match selector {
        Selector::ObjectId(_) => Outcome::ByObjectId(usable),
        _ => match usable.into_iter().next() {
            Some(first) => Outcome::Use(first),
            None => Outcome::Deny,
        },
    }
}

/// Standard mode (docs/upstream-behaviour.md#identity-selection-and-retry-budgets):
/// the pod's AzureAssignedIdentities that pass [`check_aai`] decide. `Assigned`
/// ones are usable (the live identity is used); `Created` ones (and ones a cache
/// cannot judge yet) make the request wait.
pub fn standard(pod: &PodEntry, selector: &Selector, index: &Index, namespaced: bool) -> Outcome {
    let mut usable = Vec::new();
    let mut pending = false;
    let mut any = false;
    for aai in index.aais_for_pod(&pod.namespace, &pod.name) {
        match check_aai(aai, pod, index, namespaced) {
            AaiCheck::Ignored(_) => {}
            AaiCheck::Undecided => pending = true,
            AaiCheck::Rejected(_) => any = true,
            AaiCheck::Valid { assigned, identity } => {
                any = true;
                if !matches(identity, selector) {
                    continue;
                }
                if assigned {
                    usable.push(Arc::clone(identity));
                } else {
                    pending = true;
                }
            }
        }
    }
    if !usable.is_empty() {
        return choose(usable, selector);
    }
    if pending {
        return Outcome::Wait { created: true };
    }
    if !any {
        // MIC has not created anything for this pod yet: wait, as upstream.
        return Outcome::Wait { created: false };
    }
    // Beyond upstream: the pod's identities are all settled and none matches,
    // so waiting (upstream: 80 s, then 404) cannot help; refuse now.
    Outcome::Deny
}

/// Managed mode: identities bound in the pod's namespace, no waiting.
pub fn managed(selector: &Selector, identities: &[&Arc<AzureIdentity>]) -> Outcome {
    let usable: Vec<Arc<AzureIdentity>> = identities
        .iter()
        .filter(|i| matches(i, selector))
        .map(|i| Arc::clone(i))
        .collect();
    choose(usable, selector)
}

/// Whether `pod` is one of the real MIC pods, which get node-level tokens:
/// in `mic_namespace` (ignoring case, as upstream) and running as one of the
/// MIC service accounts. Upstream accepted any pod whose ReplicaSet name
/// starts with `mic`
/// (docs/upstream-behaviour.md#h4-mic-found-by-replicaset-name).
pub fn is_mic(pod: &PodEntry, mic_namespace: &str, mic_service_accounts: &[String]) -> bool {
    pod.namespace.eq_ignore_ascii_case(mic_namespace)
        && !pod.service_account.is_empty()
        && mic_service_accounts.contains(&pod.service_account)
}

/// Upstream's message when the wait budget runs out (its wording, so that
/// log searches written for upstream still match).
pub fn wait_expired_message(
    pod: &PodEntry,
    created: bool,
    attempts: u32,
    interval_secs: u64,
) -> String {
    let state = if created { "ASSIGNED" } else { "CREATED" };
    format!(
        "getting assigned identities for pod {}/{} in {state} state failed after {attempts} attempts, retry duration [{interval_secs}]s, error: <nil>. Check MIC pod logs for identity assignment errors",
        pod.namespace, pod.name
    )
}

/// Upstream's message when no bound identity matches, with the
/// requested ID redacted as upstream does (only its first 4 characters kept).
pub fn no_match_message(selector: &Selector) -> String {
    let id = match selector {
        Selector::Default => "",
        Selector::ClientId(s) | Selector::ResourceId(s) | Selector::ObjectId(s) => s,
    };
    let shown: String = id.chars().take(4).collect();
    format!("no azure identity found for request clientID {shown}##### REDACTED #####")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testutil::*;

    fn pod(ns: &str, name: &str) -> PodEntry {
        PodEntry::from_pod(&mk_pod(
            ns,
            name,
            "10.0.0.1",
            "Running",
            &[("aadpodidbinding", "sel")],
        ))
    }

    fn chosen(o: &Outcome) -> String {
        match o {
            Outcome::Use(i) => format!("use {}", i.name_any()),
            Outcome::ByObjectId(v) => format!(
                "oid {}",
                v.iter().map(|i| i.name_any()).collect::<Vec<_>>().join(",")
            ),
            Outcome::Wait { created } => format!("wait created={created}"),
            Outcome::Deny => "deny".into(),
        }
    }

    /// Identities `a`, `b` (ns), `z` (zz), `sp` (ns, type 1), `ann` (other,
    /// annotated namespaced), each with a binding `bind-<name>` in its
    /// namespace selecting "sel".
    struct World {
        a: AzureIdentity,
        b: AzureIdentity,
        z: AzureIdentity,
        sp: AzureIdentity,
        ann: AzureIdentity,
    }

    fn world() -> World {
        let mut sp = mk_identity("ns", "sp", "44444444");
        sp.spec.r#type = IdentityType::ServicePrincipal;
        let mut ann = mk_identity("other", "ann", "55555555");
        ann.metadata.annotations = Some(
            [(
                aadpodid_api::ANNOTATION_BEHAVIOR.to_string(),
                "namespaced".to_string(),
            )]
            .into(),
        );
        World {
            a: mk_identity("ns", "a", "11111111-aaaa-4000-8000-000000000001"),
            b: mk_identity("ns", "b", "22222222-bbbb-4000-8000-000000000002"),
            z: mk_identity("zz", "z", "33333333-cccc-4000-8000-000000000003"),
            sp,
            ann,
        }
    }

    fn bind(i: &AzureIdentity) -> AzureIdentityBinding {
        mk_binding(
            &i.namespace().unwrap_or_default(),
            &format!("bind-{}", i.name_any()),
            &i.name_any(),
            "sel",
        )
    }

    impl World {
        fn all(&self) -> Vec<AzureIdentity> {
            vec![
                self.a.clone(),
                self.b.clone(),
                self.z.clone(),
                self.sp.clone(),
                self.ann.clone(),
            ]
        }

        /// An index holding the world's live objects and `aais`.
        fn index(&self, aais: &[AzureAssignedIdentity]) -> Index {
            let mut idx = Index::new();
            let ids = self.all();
            idx.reset(&ids);
            idx.reset(&ids.iter().map(bind).collect::<Vec<_>>());
            idx.reset(aais);
            idx
        }
    }

    /// MIC's AAI for pod ns/p and `i` through its binding.
    fn p(i: &AzureIdentity, status: &str) -> AzureAssignedIdentity {
        mk_aai("ns", "p", i, &bind(i), status)
    }

    #[test]
    fn standard_mode_table() {
        let w = world();
        let (a, b, z, sp, ann) = (&w.a, &w.b, &w.z, &w.sp, &w.ann);
        let res_b = b.spec.resource_id.to_ascii_uppercase();
        let cid = |s: &str| Selector::ClientId(s.into());
        struct Case<'a> {
            name: &'a str,
            aais: Vec<AzureAssignedIdentity>,
            sel: Selector,
            namespaced: bool,
            want: &'a str,
        }
        let cases = vec![
            Case {
                name: "one assigned",
                aais: vec![p(a, "Assigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "use a",
            },
            Case {
                name: "deterministic: smallest (ns,name) wins",
                aais: vec![p(z, "Assigned"), p(b, "Assigned"), p(a, "Assigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "use a",
            },
            Case {
                name: "client_id picks b",
                aais: vec![p(a, "Assigned"), p(b, "Assigned")],
                sel: cid("22222222-bbbb-4000-8000-000000000002"),
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "client_id ignores case",
                aais: vec![p(a, "Assigned"), p(b, "Assigned")],
                sel: cid("22222222-BBBB-4000-8000-000000000002"),
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "msi_res_id ignores case",
                aais: vec![p(a, "Assigned"), p(b, "Assigned")],
                sel: Selector::ResourceId(res_b.clone()),
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "bound to a, asks b: denied",
                aais: vec![p(a, "Assigned")],
                sel: cid("22222222-bbbb-4000-8000-000000000002"),
                namespaced: false,
                want: "deny",
            },
            Case {
                name: "bound to a, asks b by resource: denied",
                aais: vec![p(a, "Assigned")],
                sel: Selector::ResourceId(res_b.clone()),
                namespaced: false,
                want: "deny",
            },
            Case {
                name: "prefix of a client id is no match",
                aais: vec![p(a, "Assigned")],
                sel: cid("11111111"),
                namespaced: false,
                want: "deny",
            },
            Case {
                name: "no aai yet: wait (created budget)",
                aais: vec![],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "created: wait (assigned budget)",
                aais: vec![p(a, "Created")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=true",
            },
            Case {
                name: "asked identity still created: wait",
                aais: vec![p(a, "Assigned"), p(b, "Created")],
                sel: cid("22222222-bbbb-4000-8000-000000000002"),
                namespaced: false,
                want: "wait created=true",
            },
            Case {
                name: "default with one assigned and one created: use assigned",
                aais: vec![p(b, "Assigned"), p(a, "Created")],
                sel: Selector::Default,
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "unassigned only: as if none",
                aais: vec![p(a, "Unassigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "unknown state ignored",
                aais: vec![p(a, "Weird")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "another pod's aai is not ours",
                aais: vec![
                    mk_aai("ns", "q", a, &bind(a), "Assigned"),
                    mk_aai("other", "p", b, &bind(b), "Assigned"),
                ],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "namespaced mode drops other namespaces",
                aais: vec![p(z, "Assigned"), in_ns(p(b, "Assigned"), "ns")],
                sel: Selector::Default,
                namespaced: true,
                want: "use b",
            },
            Case {
                name: "namespaced mode with only a foreign identity: as if none",
                aais: vec![in_ns(p(z, "Assigned"), "zz")],
                sel: Selector::Default,
                namespaced: true,
                want: "wait created=false",
            },
            Case {
                name: "namespaced annotation on a foreign identity: as if none",
                aais: vec![p(ann, "Assigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "object_id: type-0 candidates, sorted",
                aais: vec![p(b, "Assigned"), p(sp, "Assigned"), p(a, "Assigned")],
                sel: Selector::ObjectId("oid".into()),
                namespaced: false,
                want: "oid a,b",
            },
            Case {
                name: "object_id with only a service principal: denied",
                aais: vec![p(sp, "Assigned")],
                sel: Selector::ObjectId("oid".into()),
                namespaced: false,
                want: "deny",
            },
        ];
        let pod = pod("ns", "p");
        for c in cases {
            let idx = w.index(&c.aais);
            let got = standard(&pod, &c.sel, &idx, c.namespaced);
            assert_eq!(chosen(&got), c.want, "{}", c.name);
        }
    }

    fn in_ns(mut aai: AzureAssignedIdentity, ns: &str) -> AzureAssignedIdentity {
        aai.metadata.namespace = Some(ns.into());
        aai
    }

    /// Every way an AzureAssignedIdentity can be forged or stale gives
    /// nothing; each case changes one thing from MIC's genuine object (or
    /// from the live objects) and says what the pod gets.
    #[test]
    fn forged_and_stale_aais_give_nothing() {
        let w = world();
        let a = &w.a;
        let good = || p(a, "Assigned");
        // The genuine object changed by `f`, or its embedded identity or binding.
        let aai = |f: &dyn Fn(&mut AzureAssignedIdentity)| {
            let mut aai = good();
            f(&mut aai);
            aai
        };
        let ident = |f: &dyn Fn(&mut AzureIdentity)| {
            aai(&|x| {
                x.spec
                    .azure_identity_ref
                    .as_deref_mut()
                    .into_iter()
                    .for_each(f)
            })
        };
        let binding = |f: &dyn Fn(&mut AzureIdentityBinding)| {
            aai(&|x| {
                x.spec
                    .azure_binding_ref
                    .as_deref_mut()
                    .into_iter()
                    .for_each(f)
            })
        };
        /// A change to the live objects (the index) instead of the AAI.
        type Live = fn(&mut Index, &World);
        let no_live: Live = |_, _| {};
        struct Case<'a> {
            name: &'a str,
            aai: AzureAssignedIdentity,
            live: Live,
            pod_label: Option<&'a str>,
            namespaced: bool,
            check: &'a str,
            want: &'a str,
        }
        let case = |name, aai, check, want| Case {
            name,
            aai,
            live: no_live,
            pod_label: Some("sel"),
            namespaced: false,
            check,
            want,
        };
        let cases = vec![
            case("genuine", good(), "valid", "use a"),
            case(
                "empty status (upstream counted it as Assigned)",
                aai(&|x| x.status = None),
                "ignored NotAssigned",
                "wait created=false",
            ),
            case(
                "empty status string",
                p(a, ""),
                "ignored NotAssigned",
                "wait created=false",
            ),
            case(
                "status in another case",
                p(a, "assigned"),
                "ignored NotAssigned",
                "wait created=false",
            ),
            case(
                "in the pod's namespace, not where MIC writes",
                in_ns(good(), "ns"),
                "ignored WrongNamespace",
                "wait created=false",
            ),
            case(
                "in an attacker's namespace",
                in_ns(good(), "evil"),
                "ignored WrongNamespace",
                "wait created=false",
            ),
            case(
                "no identity embedded",
                aai(&|x| x.spec.azure_identity_ref = None),
                "ignored NoIdentity",
                "wait created=false",
            ),
            case(
                "identity without uid",
                ident(&|i| i.metadata.uid = None),
                "rejected IdentityWithoutUid",
                "deny",
            ),
            case(
                "identity with an empty uid",
                ident(&|i| i.metadata.uid = Some(String::new())),
                "rejected IdentityWithoutUid",
                "deny",
            ),
            case(
                "identity with another uid (deleted and recreated)",
                ident(&|i| i.metadata.uid = Some("forged".into())),
                "rejected IdentityReplaced",
                "deny",
            ),
            case(
                "identity that does not exist",
                ident(&|i| i.metadata.name = Some("ghost".into())),
                "rejected IdentityGone",
                "deny",
            ),
            case(
                "embedded clientID differs from the live identity",
                ident(&|i| i.spec.client_id = "kubelet-client-id".into()),
                "rejected IdentityChanged",
                "deny",
            ),
            case(
                "embedded resourceID differs from the live identity",
                ident(&|i| i.spec.resource_id.push('x')),
                "rejected IdentityChanged",
                "deny",
            ),
            case(
                "embedded type differs",
                ident(&|i| i.spec.r#type = IdentityType::ServicePrincipal),
                "rejected IdentityChanged",
                "deny",
            ),
            case(
                "no binding embedded",
                aai(&|x| x.spec.azure_binding_ref = None),
                "rejected NoBinding",
                "deny",
            ),
            case(
                "binding without uid",
                binding(&|b| b.metadata.uid = None),
                "rejected BindingWithoutUid",
                "deny",
            ),
            case(
                "binding with another uid",
                binding(&|b| b.metadata.uid = Some("forged".into())),
                "rejected BindingReplaced",
                "deny",
            ),
            case(
                "binding that does not exist",
                binding(&|b| b.metadata.name = Some("ghost".into())),
                "rejected BindingGone",
                "deny",
            ),
            case(
                "binding in another namespace",
                binding(&|b| b.metadata.namespace = Some("zz".into())),
                "rejected BindingGone",
                "deny",
            ),
            case(
                "embedded selector differs from the live binding",
                binding(&|b| b.spec.selector = "other".into()),
                "rejected BindingChanged",
                "deny",
            ),
            Case {
                pod_label: Some("other"),
                ..case(
                    "selector is not the pod's current label",
                    good(),
                    "rejected SelectorMismatch",
                    "deny",
                )
            },
            Case {
                pod_label: Some("SEL"),
                ..case(
                    "selector compared byte for byte",
                    good(),
                    "rejected SelectorMismatch",
                    "deny",
                )
            },
            Case {
                pod_label: None,
                ..case(
                    "pod no longer labelled",
                    good(),
                    "rejected SelectorMismatch",
                    "deny",
                )
            },
            Case {
                live: |idx, w| {
                    let mut i = w.a.clone();
                    i.metadata.uid = Some("recreated".into());
                    idx.apply(&i);
                },
                ..case(
                    "live identity recreated since",
                    good(),
                    "rejected IdentityReplaced",
                    "deny",
                )
            },
            Case {
                live: |idx, w| {
                    let mut i = w.a.clone();
                    i.spec.client_id = "edited".into();
                    idx.apply(&i);
                },
                ..case(
                    "live identity edited since",
                    good(),
                    "rejected IdentityChanged",
                    "deny",
                )
            },
            Case {
                live: |idx, _| idx.delete::<AzureIdentity>("ns", "a"),
                ..case(
                    "live identity deleted",
                    good(),
                    "rejected IdentityGone",
                    "deny",
                )
            },
            Case {
                live: |idx, _| idx.delete::<AzureIdentityBinding>("ns", "bind-a"),
                ..case(
                    "live binding deleted",
                    good(),
                    "rejected BindingGone",
                    "deny",
                )
            },
            Case {
                live: |idx, w| {
                    let mut b = bind(&w.a);
                    b.spec.selector = "other".into();
                    idx.apply(&b);
                },
                ..case(
                    "live binding's selector edited since",
                    good(),
                    "rejected BindingChanged",
                    "deny",
                )
            },
            Case {
                live: |idx, w| {
                    // A genuine binding of identity b, embedded with identity a.
                    let b = mk_binding("ns", "bind-a", "b", "sel");
                    let _ = w;
                    idx.apply(&b);
                },
                aai: aai(&|x| {
                    x.spec.azure_binding_ref =
                        Some(Box::new(mk_binding("ns", "bind-a", "b", "sel")))
                }),
                ..case(
                    "binding names another identity",
                    good(),
                    "rejected BindingForOtherIdentity",
                    "deny",
                )
            },
            Case {
                live: |idx, w| {
                    // The caches have not listed yet.
                    *idx = Index::new();
                    idx.reset(&[p(&w.a, "Assigned")]);
                },
                ..case(
                    "caches not listed yet: wait",
                    good(),
                    "undecided",
                    "wait created=true",
                )
            },
            Case {
                live: |idx, w| {
                    // Identities listed, bindings not yet.
                    *idx = Index::new();
                    idx.reset(&w.all());
                    idx.reset(&[p(&w.a, "Assigned")]);
                },
                ..case(
                    "binding cache not listed yet: wait",
                    good(),
                    "undecided",
                    "wait created=true",
                )
            },
            Case {
                namespaced: true,
                ..case(
                    "namespaced mode: MIC writes to the identity's namespace, not default",
                    good(),
                    "ignored WrongNamespace",
                    "wait created=false",
                )
            },
            Case {
                namespaced: true,
                ..case(
                    "namespaced mode: in the identity's namespace",
                    in_ns(good(), "ns"),
                    "valid",
                    "use a",
                )
            },
            Case {
                live: |idx, w| {
                    // The live identity turned namespaced: MIC now writes
                    // its AAIs to "ns", so one in "default" is not MIC's.
                    let mut i = w.a.clone();
                    i.metadata.annotations = Some(
                        [(
                            aadpodid_api::ANNOTATION_BEHAVIOR.to_string(),
                            "namespaced".to_string(),
                        )]
                        .into(),
                    );
                    idx.apply(&i);
                },
                ..case(
                    "live identity's annotation decides the namespace",
                    good(),
                    "ignored WrongNamespace",
                    "wait created=false",
                )
            },
            case(
                "a created AAI with a forged identity uid does not make the pod wait",
                {
                    let mut x = p(a, "Created");
                    if let Some(i) = x.spec.azure_identity_ref.as_deref_mut() {
                        i.metadata.uid = Some("forged".into());
                    }
                    x
                },
                "rejected IdentityReplaced",
                "deny",
            ),
        ];
        for c in cases {
            let mut idx = w.index(std::slice::from_ref(&c.aai));
            (c.live)(&mut idx, &w);
            let labels: Vec<(&str, &str)> = c
                .pod_label
                .map(|l| vec![("aadpodidbinding", l)])
                .unwrap_or_default();
            let pod = PodEntry::from_pod(&mk_pod("ns", "p", "10.0.0.1", "Running", &labels));
            let check = match check_aai(&c.aai, &pod, &idx, c.namespaced) {
                AaiCheck::Ignored(d) => format!("ignored {d:?}"),
                AaiCheck::Rejected(d) => format!("rejected {d:?}"),
                AaiCheck::Undecided => "undecided".into(),
                AaiCheck::Valid { identity, .. } => {
                    assert_eq!(
                        uid(identity.as_ref()),
                        Some("uid-identity-ns-a"),
                        "{}: the live identity is used",
                        c.name
                    );
                    "valid".into()
                }
            };
            assert_eq!(check, c.check, "{}", c.name);
            let got = standard(&pod, &Selector::Default, &idx, c.namespaced);
            assert_eq!(chosen(&got), c.want, "{}", c.name);
        }
    }

    #[test]
    fn the_live_identity_is_served_and_a_forged_aai_cannot_outvote_a_genuine_one() {
        let w = world();
        let pod = pod("ns", "p");
        // A forged AAI for the kubelet identity next to the pod's genuine one.
        let mut forged = p(&w.b, "Assigned");
        if let Some(i) = forged.spec.azure_identity_ref.as_deref_mut() {
            i.spec.client_id = "kubelet".into();
        }
        let idx = w.index(&[p(&w.a, "Assigned"), forged]);
        assert_eq!(
            chosen(&standard(
                &pod,
                &Selector::ClientId("kubelet".into()),
                &idx,
                false
            )),
            "deny"
        );
        assert_eq!(
            chosen(&standard(&pod, &Selector::Default, &idx, false)),
            "use a"
        );
        let rejected = rejected_aais(&pod, &idx, false);
        assert_eq!(
            rejected,
            [("default/p-ns-b".to_string(), AaiDefect::IdentityChanged)]
        );
    }

    #[test]
    fn specs_compare_as_upstream_embeds_them() {
        use k8s_openapi::api::core::v1::SecretReference;
        let a = mk_identity("ns", "a", "c").spec;
        let mut b = a.clone();
        b.client_password = Some(SecretReference::default());
        b.auxiliary_tenant_ids = Some(Vec::new());
        b.replicas = Some(1);
        b.ad_resource_id = "x".into();
        assert!(
            same_identity_spec(&a, &b),
            "Go's empty values equal absent ones"
        );
        b.client_password = Some(SecretReference {
            name: Some("s".into()),
            namespace: None,
        });
        assert!(!same_identity_spec(&a, &b));
        let mut c = a.clone();
        c.auxiliary_tenant_ids = Some(vec!["t".into()]);
        assert!(!same_identity_spec(&a, &c));
        let mut d = a.clone();
        d.resource_id = d.resource_id.to_ascii_uppercase();
        assert!(
            !same_identity_spec(&a, &d),
            "exact: both copies come from one object"
        );
        let x = mk_binding("ns", "b", "a", "s").spec;
        let mut y = x.clone();
        y.weight = 5;
        assert!(same_binding_spec(&x, &y));
        y.selector = "t".into();
        assert!(!same_binding_spec(&x, &y));
    }

    #[test]
    fn managed_mode_table() {
        let a = Arc::new(mk_identity("ns", "a", "c-a"));
        let b = Arc::new(mk_identity("ns", "b", "c-b"));
        let cases: Vec<(&str, Vec<&Arc<AzureIdentity>>, Selector, &str)> = vec![
            ("first by name", vec![&b, &a], Selector::Default, "use a"),
            (
                "client id",
                vec![&a, &b],
                Selector::ClientId("C-B".into()),
                "use b",
            ),
            (
                "unknown client id",
                vec![&a],
                Selector::ClientId("c-x".into()),
                "deny",
            ),
            ("none bound: no waiting", vec![], Selector::Default, "deny"),
        ];
        for (name, ids, sel, want) in cases {
            assert_eq!(chosen(&managed(&sel, &ids)), want, "{name}");
        }
    }

    #[test]
    fn mic_is_by_namespace_and_service_account_not_name_prefix() {
        let sas = vec!["aad-pod-identity-mic".to_string()];
        let mut p = pod("Default", "mic-7d9f-abc");
        p.service_account = "aad-pod-identity-mic".into();
        assert!(is_mic(&p, "default", &sas));
        let mut impostor = pod("default", "microservice-5f6-xyz");
        impostor.service_account = "default".into();
        // Upstream found MIC by pod name prefix
        // (docs/upstream-behaviour.md#h4-mic-found-by-replicaset-name).
        assert!(!is_mic(&impostor, "default", &sas), "a pod named like MIC");
        let mut elsewhere = p.clone();
        elsewhere.namespace = "apps".into();
        assert!(!is_mic(&elsewhere, "default", &sas));
    }

    #[test]
    fn messages_are_upstreams() {
        let p = pod("ns", "p");
        assert_eq!(
            wait_expired_message(&p, false, 16, 5),
            "getting assigned identities for pod ns/p in CREATED state failed after 16 attempts, retry duration [5]s, error: <nil>. Check MIC pod logs for identity assignment errors"
        );
        assert!(
            wait_expired_message(&p, true, 20, 5)
                .contains("in ASSIGNED state failed after 20 attempts")
        );
        let m = no_match_message(&Selector::ClientId("abcdef-secret".into()));
        assert!(m.starts_with("no azure identity found for request clientID abcd"));
        assert!(!m.contains("secret"));
    }
}

//! Which identity a pod gets: the security boundary, pure and table-tested.
//!
//! **Deterministic choice.** When a pod may use several identities and the
//! request names none, NMI picks the usable identity whose AzureIdentity has
//! the smallest `(namespace, name)`. Upstream took "element 0" of an
//! unordered cache list (statement 49); this rule gives every replica and
//! every restart the same answer.
//!
//! **Matching.** `client_id` and `msi_res_id` are compared ignoring ASCII case
//! (GUIDs and ARM IDs are case-insensitive; upstream's case-sensitive compare
//! gave a 404 after waiting, hazard H7). `object_id` is really matched: the
//! candidates go to the token source, which asks IMDS for that object ID and
//! accepts the token only if its `appid` is one of the candidates' client IDs.

use aadpodid_api::{AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, IdentityType};
use kube::ResourceExt;

use crate::index::PodEntry;
use crate::request::Selector;

/// What to do with a token request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Get a token for this identity.
    Use(Box<AzureIdentity>),
    /// `object_id` request: get a token by object ID and accept it only if it
    /// is for one of these (type-0) identities.
    ByObjectId(Vec<AzureIdentity>),
    /// Nothing usable yet; wait for MIC. `created` says whether a matching
    /// identity is already `Created` (upstream's longer budget) or none exists.
    Wait {
        /// A matching AzureAssignedIdentity exists in state `Created`.
        created: bool,
    },
    /// Refused now: the pod's identities are settled and none matches.
    Deny,
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

fn sort_key(i: &AzureIdentity) -> (String, String) {
    (i.namespace().unwrap_or_default(), i.name_any())
}

fn choose(mut usable: Vec<AzureIdentity>, selector: &Selector) -> Outcome {
    usable.sort_by_key(sort_key);
    usable.dedup_by(|a, b| sort_key(a) == sort_key(b));
    match selector {
        Selector::ObjectId(_) => Outcome::ByObjectId(usable),
        _ => match usable.into_iter().next() {
            Some(first) => Outcome::Use(Box::new(first)),
            None => Outcome::Deny,
        },
    }
}

/// Standard mode (§3.6): the pod's AzureAssignedIdentities decide. Identities
/// in `Assigned` (or legacy empty) state are usable; `Created` ones make the
/// request wait. With `namespaced` (or an identity annotated namespaced) only
/// identities in the pod's namespace count.
pub fn standard(
    pod: &PodEntry,
    selector: &Selector,
    aais: &[&AzureAssignedIdentity],
    namespaced: bool,
) -> Outcome {
    let mut usable = Vec::new();
    let mut pending = false;
    let mut any = false;
    for aai in aais {
        if aai.spec.pod != pod.name || aai.spec.pod_namespace != pod.namespace {
            continue;
        }
        let Some(identity) = aai.spec.azure_identity_ref.as_deref() else {
            continue;
        };
        if aadpodid_api::is_namespaced(identity, namespaced)
            && identity.namespace().as_deref() != Some(pod.namespace.as_str())
        {
            continue;
        }
        let state = aai.state();
        if matches!(
            state,
            Some(AssignedIdentityState::Assigned | AssignedIdentityState::Created)
        ) {
            any = true;
        }
        if !matches(identity, selector) {
            continue;
        }
        match state {
            Some(AssignedIdentityState::Assigned) => usable.push(identity.clone()),
            Some(AssignedIdentityState::Created) => pending = true,
            _ => {}
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

/// Managed mode (§3.7): identities bound in the pod's namespace, no waiting.
pub fn managed(selector: &Selector, identities: &[&AzureIdentity]) -> Outcome {
    let usable: Vec<AzureIdentity> = identities
        .iter()
        .filter(|i| matches(i, selector))
        .map(|i| (*i).clone())
        .collect();
    choose(usable, selector)
}

/// Whether `pod` is one of the real MIC pods, which get node-level tokens:
/// in `mic_namespace` (ignoring case, as upstream) and running as one of the
/// MIC service accounts. Upstream accepted any pod whose ReplicaSet name
/// starts with `mic` (hazard H4).
pub fn is_mic(pod: &PodEntry, mic_namespace: &str, mic_service_accounts: &[String]) -> bool {
    pod.namespace.eq_ignore_ascii_case(mic_namespace)
        && !pod.service_account.is_empty()
        && mic_service_accounts.contains(&pod.service_account)
}

/// Upstream's message when the wait budget runs out (statements 46-47).
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

/// Upstream's message when no bound identity matches (statement 50), with the
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

    #[test]
    fn standard_mode_table() {
        let a = mk_identity("ns", "a", "11111111-aaaa-4000-8000-000000000001");
        let b = mk_identity("ns", "b", "22222222-bbbb-4000-8000-000000000002");
        let z = mk_identity("zz", "z", "33333333-cccc-4000-8000-000000000003");
        let mut sp = mk_identity("ns", "sp", "44444444");
        sp.spec.r#type = IdentityType::ServicePrincipal;
        let mut annotated = mk_identity("other", "ann", "55555555");
        annotated.metadata.annotations = Some(
            [(
                aadpodid_api::ANNOTATION_BEHAVIOR.to_string(),
                "namespaced".to_string(),
            )]
            .into(),
        );
        let res_b = b.spec.resource_id.to_ascii_uppercase();
        let cid = |s: &str| Selector::ClientId(s.into());
        struct Case<'a> {
            name: &'a str,
            aais: Vec<AzureAssignedIdentity>,
            sel: Selector,
            namespaced: bool,
            want: &'a str,
        }
        let p = |i: &AzureIdentity, s: &str| mk_aai("ns", "p", i, s);
        let cases = vec![
            Case {
                name: "one assigned",
                aais: vec![p(&a, "Assigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "use a",
            },
            Case {
                name: "legacy empty status counts as assigned",
                aais: vec![p(&a, "")],
                sel: Selector::Default,
                namespaced: false,
                want: "use a",
            },
            Case {
                name: "deterministic: smallest (ns,name) wins",
                aais: vec![p(&z, "Assigned"), p(&b, "Assigned"), p(&a, "Assigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "use a",
            },
            Case {
                name: "client_id picks b",
                aais: vec![p(&a, "Assigned"), p(&b, "Assigned")],
                sel: cid("22222222-bbbb-4000-8000-000000000002"),
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "client_id ignores case (H7)",
                aais: vec![p(&a, "Assigned"), p(&b, "Assigned")],
                sel: cid("22222222-BBBB-4000-8000-000000000002"),
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "msi_res_id ignores case",
                aais: vec![p(&a, "Assigned"), p(&b, "Assigned")],
                sel: Selector::ResourceId(res_b.clone()),
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "bound to a, asks b: denied",
                aais: vec![p(&a, "Assigned")],
                sel: cid("22222222-bbbb-4000-8000-000000000002"),
                namespaced: false,
                want: "deny",
            },
            Case {
                name: "bound to a, asks b by resource: denied",
                aais: vec![p(&a, "Assigned")],
                sel: Selector::ResourceId(res_b.clone()),
                namespaced: false,
                want: "deny",
            },
            Case {
                name: "prefix of a client id is no match",
                aais: vec![p(&a, "Assigned")],
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
                aais: vec![p(&a, "Created")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=true",
            },
            Case {
                name: "asked identity still created: wait",
                aais: vec![p(&a, "Assigned"), p(&b, "Created")],
                sel: cid("22222222-bbbb-4000-8000-000000000002"),
                namespaced: false,
                want: "wait created=true",
            },
            Case {
                name: "default with one assigned and one created: use assigned",
                aais: vec![p(&b, "Assigned"), p(&a, "Created")],
                sel: Selector::Default,
                namespaced: false,
                want: "use b",
            },
            Case {
                name: "unassigned only: as if none",
                aais: vec![p(&a, "Unassigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "unknown state ignored",
                aais: vec![p(&a, "Weird")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "another pod's aai is not ours",
                aais: vec![
                    mk_aai("ns", "q", &a, "Assigned"),
                    mk_aai("other", "p", &b, "Assigned"),
                ],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "namespaced mode drops other namespaces",
                aais: vec![p(&z, "Assigned"), p(&b, "Assigned")],
                sel: Selector::Default,
                namespaced: true,
                want: "use b",
            },
            Case {
                name: "namespaced mode with only foreign identity: no panic, wait",
                aais: vec![p(&z, "Assigned")],
                sel: Selector::Default,
                namespaced: true,
                want: "wait created=false",
            },
            Case {
                name: "namespaced annotation on identity",
                aais: vec![p(&annotated, "Assigned")],
                sel: Selector::Default,
                namespaced: false,
                want: "wait created=false",
            },
            Case {
                name: "object_id: type-0 candidates, sorted",
                aais: vec![p(&b, "Assigned"), p(&sp, "Assigned"), p(&a, "Assigned")],
                sel: Selector::ObjectId("oid".into()),
                namespaced: false,
                want: "oid a,b",
            },
            Case {
                name: "object_id with only a service principal: denied",
                aais: vec![p(&sp, "Assigned")],
                sel: Selector::ObjectId("oid".into()),
                namespaced: false,
                want: "deny",
            },
        ];
        let pod = pod("ns", "p");
        for c in cases {
            let refs: Vec<&AzureAssignedIdentity> = c.aais.iter().collect();
            let got = standard(&pod, &c.sel, &refs, c.namespaced);
            assert_eq!(chosen(&got), c.want, "{}", c.name);
        }
    }

    #[test]
    fn managed_mode_table() {
        let a = mk_identity("ns", "a", "c-a");
        let b = mk_identity("ns", "b", "c-b");
        let cases: Vec<(&str, Vec<&AzureIdentity>, Selector, &str)> = vec![
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
        assert!(!is_mic(&impostor, "default", &sas), "H4");
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

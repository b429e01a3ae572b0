//! The token source: a federated identity is never written to ARM and its
//! AzureAssignedIdentities go Assigned at once; switching an identity's
//! source moves it on or off the nodes; a value naming no source gives the
//! identity to nobody.

use super::*;
use crate::ledger::Ledger;

/// `identity` with the token-source annotation set to `value` (none for `None`).
fn with_source(mut identity: AzureIdentity, value: Option<&str>) -> AzureIdentity {
    let annotations = identity.metadata.annotations.get_or_insert_default();
    match value {
        Some(v) => annotations.insert(ANNOTATION_TOKEN_SOURCE.to_string(), v.to_string()),
        None => annotations.remove(ANNOTATION_TOKEN_SOURCE),
    };
    identity
}

/// [`base`] with identity `ns/id` (its source annotation `value`) bound to
/// pods labelled `sel`.
fn bound_with_source(value: Option<&str>) -> Index {
    let mut ix = base();
    ix.apply_identity(&with_source(mk_uami("ns", "id"), value));
    ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
    ix
}

/// The token source the AAI `default/<name>` of the index records.
fn recorded(ix: &Index, name: &str) -> TokenSource {
    recorded_token_source(&ix.assigned[&key("default", name)])
}

#[test]
fn a_federated_identity_is_assigned_at_once_and_never_on_a_node() {
    let mut ix = bound_with_source(Some("federated"));
    // An imds identity beside it on the same node, for contrast.
    ix.apply_identity(&mk_uami("ns", "plain"));
    ix.apply_binding(&mk_binding("ns", "b-plain", "plain", "sel"));
    let pod = add_web(&mut ix);
    let opts = Options::default();

    let p = plan(&ix, &opts);
    assert_eq!(created_names(&p), ["web-ns-id", "web-ns-plain"]);
    assert_eq!(p.assign_now, vec![key("default", "web-ns-id")]);
    let w = &p.resources[&vmss("vmss-a")];
    assert_eq!(w.add, [lrid("plain")].into(), "only the imds identity");
    assert_eq!(
        w.assign_on_success,
        vec![(key("default", "web-ns-plain"), lrid("plain"))]
    );
    assert_eq!(p.resources.len(), 1);
    // The AAI records the source MIC decided; the imds one records none
    // (as upstream's AAIs).
    let written = p.create[0].aai();
    assert_eq!(
        written.annotations().get(ANNOTATION_TOKEN_SOURCE),
        Some(&"federated".to_string())
    );
    assert_eq!(
        p.create[1].aai().annotations().get(ANNOTATION_TOKEN_SOURCE),
        None
    );
    // MIC's other annotations stay.
    let plain = p.create[1].aai().metadata.annotations.unwrap_or_default();
    let mut expected = plain.clone();
    expected.insert(ANNOTATION_TOKEN_SOURCE.into(), "federated".into());
    assert_eq!(written.metadata.annotations, Some(expected));
    assert!(p.warnings.is_empty());

    settle(&mut ix, &opts);
    assert_eq!(recorded(&ix, "web-ns-id"), TokenSource::Federated);
    assert_eq!(recorded(&ix, "web-ns-plain"), TokenSource::Imds);
    assert_eq!(
        ix.assigned[&key("default", "web-ns-id")].state(),
        Some(AssignedIdentityState::Assigned)
    );
    assert!(plan(&ix, &opts).is_empty(), "steady state needs no work");
    // Neither the drift check nor the ledger counts it on the node.
    assert_eq!(
        expected_assignments(&ix, &opts),
        [(vmss("vmss-a"), [lrid("plain")].into())].into()
    );
    let listed: Vec<Key> = assigned_by_resource(&ix)
        .into_values()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, vec![key("default", "web-ns-plain")]);
    let ledger = Ledger::seed(&ix);
    assert!(!ledger.owns(&vmss("vmss-a"), &lrid("id")));
    assert!(ledger.owns(&vmss("vmss-a"), &lrid("plain")));

    // The pod leaves: its federated AAI goes with no ARM call.
    ix.delete_pod(&pod);
    let p = plan(&ix, &opts);
    assert_eq!(p.delete_now, vec![key("default", "web-ns-id")]);
    assert_removes(&p, "web-ns-plain", "plain");
}

#[test]
fn service_principals_may_be_federated_too() {
    let mut ix = base();
    let sp = mk_identity("ns", "sp", IdentityType::ServicePrincipal, "");
    ix.apply_identity(&with_source(sp, Some("federated")));
    ix.apply_binding(&mk_binding("ns", "b", "sp", "sel"));
    add_web(&mut ix);
    let p = plan(&ix, &Options::default());
    assert_eq!(p.assign_now, vec![key("default", "web-ns-sp")]);
    assert!(p.resources.is_empty());
    assert_eq!(
        p.create[0].aai().annotations().get(ANNOTATION_TOKEN_SOURCE),
        Some(&"federated".to_string())
    );
}

/// An identity's source edited under a settled pod `ns/web` (and, in some
/// cases, a second pod `ns/api` on the same scale set using the same Azure
/// identity through another AzureIdentity that stays `imds`): the AAI is
/// rewritten with the new source and the identity comes off (or goes on)
/// the scale set only as its imds users require.
#[test]
fn switching_the_source_moves_the_identity_off_or_onto_the_nodes() {
    /// (case, annotation before, annotation after, another imds
    /// AzureIdentity of the same Azure identity used on n2, identities taken
    /// off vmss-a, identities added to it, the rewritten AAI marked Assigned
    /// with no ARM call, the source it records)
    type Case = (
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        bool,
        &'static [&'static str],
        &'static [&'static str],
        bool,
        TokenSource,
    );
    use TokenSource::{Federated, Imds};
    #[rustfmt::skip]
    let cases: [Case; 5] = [
        ("imds to federated, no other imds user: taken off", None, Some("federated"), false, &["id"], &[], true, Federated),
        ("explicit imds to federated", Some("imds"), Some("federated"), false, &["id"], &[], true, Federated),
        ("imds to federated, still used by an imds pod there: kept", None, Some("federated"), true, &[], &[], true, Federated),
        ("federated to imds: assigned through ARM", Some("federated"), None, false, &[], &["id"], false, Imds),
        ("federated to explicit imds", Some("federated"), Some("imds"), false, &[], &["id"], false, Imds),
    ];
    let opts = Options::default();
    for (name, from, to, other_imds_user, remove, add, assigned_now, recorded_after) in cases {
        let mut ix = bound_with_source(from);
        add_web(&mut ix);
        if other_imds_user {
            // Same resource ID, another AzureIdentity name.
            let mut twin = mk_uami("ns", "twin");
            twin.spec.resource_id = rid("id");
            ix.apply_identity(&twin);
            ix.apply_binding(&mk_binding("ns", "b-twin", "twin", "sel-twin"));
            ix.apply_pod(&mk_pod("ns", "api", "sel-twin", "n2"));
        }
        settle(&mut ix, &opts);
        assert!(plan(&ix, &opts).is_empty(), "{name}: settled");

        ix.apply_identity(&with_source(mk_uami("ns", "id"), to));
        let p = plan(&ix, &opts);
        let k = key("default", "web-ns-id");
        assert_eq!(
            p.update.iter().map(|u| &u.key).collect::<Vec<_>>(),
            [&k],
            "{name}"
        );
        assert!(p.create.is_empty() && p.delete_now.is_empty(), "{name}");
        assert_eq!(
            p.update[0].aai().state(),
            Some(AssignedIdentityState::Created)
        );
        assert_eq!(p.assign_now.contains(&k), assigned_now, "{name}");
        let w = p
            .resources
            .get(&vmss("vmss-a"))
            .cloned()
            .unwrap_or_default();
        let ids = |names: &[&str]| names.iter().map(|n| lrid(n)).collect::<BTreeSet<_>>();
        assert_eq!(w.remove, ids(remove), "{name}");
        assert_eq!(w.add, ids(add), "{name}");
        // A removal that follows a source switch deletes no AAI.
        assert!(w.delete_on_success.is_empty(), "{name}");

        settle(&mut ix, &opts);
        assert_eq!(recorded(&ix, "web-ns-id"), recorded_after, "{name}");
        assert!(plan(&ix, &opts).is_empty(), "{name}: settled again");
    }
}

#[test]
fn a_value_naming_no_source_gives_the_identity_to_nobody() {
    for value in ["Federated", "workload-identity", ""] {
        // Two pods, one report.
        let mut ix = bound_with_source(Some(value));
        add_web(&mut ix);
        ix.apply_pod(&mk_pod("ns", "api", "sel", "n3"));
        let p = plan(&ix, &Options::default());
        assert!(p.is_empty(), "{value:?}: {p:?}");
        assert_eq!(
            p.warnings,
            vec![Warning::UnknownTokenSource {
                identity: key("ns", "id"),
                error: UnknownTokenSource(value.to_string()),
            }],
            "{value:?}"
        );
        assert!(expected_assignments(&ix, &Options::default()).is_empty());
    }

    // Misspelt on an identity in use: its AAIs retire, the identity comes
    // off the node (an imds AAI), never left to the default source.
    let mut ix = bound_with_source(None);
    add_web(&mut ix);
    settle(&mut ix, &Options::default());
    ix.apply_identity(&with_source(mk_uami("ns", "id"), Some("federated ")));
    let p = plan(&ix, &Options::default());
    assert!(p.create.is_empty() && p.update.is_empty() && p.assign_now.is_empty());
    assert_removes(&p, "web-ns-id", "id");
    assert!(
        matches!(&p.warnings[..], [Warning::UnknownTokenSource { .. }]),
        "{:?}",
        p.warnings
    );
}

#[test]
fn the_identity_policy_applies_to_federated_identities_too() {
    let mut ix = bound_with_source(Some("federated"));
    ix.apply_namespace(&mk_namespace("ns", None));
    add_web(&mut ix);
    let enforce = Options {
        policy: PolicyMode::Enforce,
        ..Default::default()
    };
    let p = plan(&ix, &enforce);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(
        p.warnings,
        vec![Warning::IdentityNotGranted {
            identity: key("ns", "id"),
            namespace: "ns".into(),
            resource_id: rid("id"),
            enforced: true,
        }]
    );
    ix.apply_namespace(&mk_namespace("ns", Some(&rid("id"))));
    let p = plan(&ix, &enforce);
    assert_eq!(p.assign_now, vec![key("default", "web-ns-id")]);
    assert!(p.resources.is_empty());
}

/// Only MIC's own exact value marks an AAI federated: anything else is
/// read as `imds`, whose identity may be on the node (its removal, when
/// the identity is not there, costs a GET and sends nothing).
#[test]
fn an_aai_is_federated_only_by_the_exact_annotation() {
    let cases: [(Option<&str>, TokenSource); 5] = [
        (None, TokenSource::Imds),
        (Some("imds"), TokenSource::Imds),
        (Some("federated"), TokenSource::Federated),
        (Some("Federated"), TokenSource::Imds),
        (Some(""), TokenSource::Imds),
    ];
    let (ix, _, _) = web_with_uids(mk_uami("ns", "id"), "uid-i", "uid-b");
    for (value, want) in cases {
        let mut aai = AzureAssignedIdentity::new("web-ns-id", go_written_spec("uid-i", "uid-b"));
        if let Some(v) = value {
            aai.metadata.annotations =
                Some([(ANNOTATION_TOKEN_SOURCE.to_string(), v.to_string())].into());
        }
        let kept = AssignedInfo::new(&aai, &ix);
        assert_eq!(recorded_token_source(&kept), want, "{value:?}");
        let id = assigned_identity_id(&kept);
        assert_eq!(id.is_none(), want == TokenSource::Federated, "{value:?}");
    }
}

/// What the executor keeps of a federated AAI it writes is what the index
/// keeps of the AAI read back.
#[test]
fn a_written_federated_aai_is_kept_as_the_index_would_keep_it() {
    let mut ix = bound_with_source(Some("federated"));
    add_web(&mut ix);
    let p = plan(&ix, &Options::default());
    let planned = &p.create[0];
    let mut written = planned.aai();
    written.metadata.uid = Some("u".into());
    written.metadata.resource_version = Some("7".into());
    let kept = planned.kept(Some("u".into()), Some("7".into()));
    assert_eq!(kept, AssignedInfo::new(&written, &ix));
    assert_eq!(recorded_token_source(&kept), TokenSource::Federated);
}

/// `--default-token-source=federated`: identities without the annotation are
/// federated, `imds` on one keeps it on the nodes; AAIs written while the
/// default was `imds` (no annotation) are rewritten and their identities
/// taken off, and turning the default back assigns them again.
#[test]
fn the_default_source_is_the_flags_and_a_changed_default_moves_identities() {
    let federated = Options {
        default_token_source: TokenSource::Federated,
        ..Default::default()
    };
    let imds = Options::default();
    let mut ix = bound_with_source(None);
    ix.apply_identity(&with_source(mk_uami("ns", "pinned"), Some("imds")));
    ix.apply_binding(&mk_binding("ns", "b-pinned", "pinned", "sel"));
    add_web(&mut ix);

    let p = plan(&ix, &federated);
    assert_eq!(p.assign_now, vec![key("default", "web-ns-id")]);
    assert_eq!(p.resources[&vmss("vmss-a")].add, [lrid("pinned")].into());

    // Settled under imds, then the default turns federated.
    let mut ix2 = ix.clone();
    settle(&mut ix2, &imds);
    assert_eq!(recorded(&ix2, "web-ns-id"), TokenSource::Imds);
    let p = plan(&ix2, &federated);
    assert_eq!(
        p.update
            .iter()
            .map(|u| u.key.1.as_str())
            .collect::<Vec<_>>(),
        ["web-ns-id"]
    );
    assert_eq!(p.assign_now, vec![key("default", "web-ns-id")]);
    let w = &p.resources[&vmss("vmss-a")];
    assert_eq!(w.remove, [lrid("id")].into());
    assert!(w.add.is_empty());
    settle(&mut ix2, &federated);
    assert_eq!(recorded(&ix2, "web-ns-id"), TokenSource::Federated);
    assert_eq!(recorded(&ix2, "web-ns-pinned"), TokenSource::Imds);
    assert!(plan(&ix2, &federated).is_empty());

    // And back.
    let p = plan(&ix2, &imds);
    assert_eq!(p.resources[&vmss("vmss-a")].add, [lrid("id")].into());
    assert!(p.assign_now.is_empty());
    settle(&mut ix2, &imds);
    assert!(plan(&ix2, &imds).is_empty());
}

//! Upstream's sync-cycle behaviours and the hazards we close
//! (docs/upstream-behaviour.md), as cases over a hand-built index.

use super::*;
use aadpodid_api::policy::PolicyMode;
use aadpodid_api::{
    ANNOTATION_BEHAVIOR, AzureIdentityBindingSpec, AzureIdentitySpec, BEHAVIOR_NAMESPACED,
};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec, PodStatus};
use std::sync::Arc;

fn rid(name: &str) -> String {
    format!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn lrid(name: &str) -> String {
    rid(name).to_lowercase()
}

fn mk_pod(ns: &str, name: &str, label: &str, node: &str) -> Pod {
    let mut p = Pod::default();
    p.metadata.namespace = Some(ns.into());
    p.metadata.name = Some(name.into());
    if !label.is_empty() {
        p.metadata.labels = Some([("aadpodidbinding".to_string(), label.to_string())].into());
    }
    p.spec = Some(PodSpec {
        node_name: (!node.is_empty()).then(|| node.to_string()),
        ..Default::default()
    });
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        ..Default::default()
    });
    p
}

fn mk_vmss_node(name: &str, vmss: &str) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    n.spec = Some(NodeSpec {
        provider_id: Some(format!(
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/0"
        )),
        ..Default::default()
    });
    n
}

fn mk_identity(ns: &str, name: &str, t: IdentityType, resource: &str) -> AzureIdentity {
    let mut i = AzureIdentity::new(
        name,
        AzureIdentitySpec {
            r#type: t,
            resource_id: resource.into(),
            client_id: format!("client-{name}"),
            ..Default::default()
        },
    );
    i.metadata.namespace = Some(ns.into());
    i
}

fn mk_uami(ns: &str, name: &str) -> AzureIdentity {
    mk_identity(ns, name, IdentityType::UserAssignedMsi, &rid(name))
}

pub fn mk_binding(ns: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    let mut b = AzureIdentityBinding::new(
        name,
        AzureIdentityBindingSpec {
            azure_identity: identity.into(),
            selector: selector.into(),
            weight: 0,
        },
    );
    b.metadata.namespace = Some(ns.into());
    b
}

fn key(ns: &str, name: &str) -> Key {
    (ns.into(), name.into())
}

/// A cluster with two scale sets: nodes n1, n2 on vmss-a, n3 on vmss-b.
fn base() -> Index {
    let mut ix = Index::default();
    ix.apply_node(&mk_vmss_node("n1", "vmss-a"));
    ix.apply_node(&mk_vmss_node("n2", "vmss-a"));
    ix.apply_node(&mk_vmss_node("n3", "vmss-b"));
    ix
}

/// [`base`] with the world most cases start from: the user-assigned
/// AzureIdentity `ns/id` and the binding `ns/b` giving it to pods labelled
/// `sel`.
fn bound() -> Index {
    let mut ix = base();
    ix.apply_identity(&mk_uami("ns", "id"));
    ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
    ix
}

/// Adds pod `ns/web` on node n1, labelled `sel`, and returns it.
fn add_web(ix: &mut Index) -> Pod {
    let pod = mk_pod("ns", "web", "sel", "n1");
    ix.apply_pod(&pod);
    pod
}

/// [`bound`] with `pods` (namespace, name, node) labelled `sel`, settled;
/// then the first of them is deleted. The index and the plan after that.
fn first_pod_gone(pods: &[(&str, &str, &str)], opts: &Options) -> (Index, Plan) {
    let mut ix = bound();
    let pods: Vec<Pod> = pods
        .iter()
        .map(|(ns, name, node)| mk_pod(ns, name, "sel", node))
        .collect();
    for pod in &pods {
        ix.apply_pod(pod);
    }
    settle(&mut ix, opts);
    ix.delete_pod(&pods[0]);
    let p = plan(&ix, opts);
    (ix, p)
}

/// The plan takes identity `id` off vmss-a and, once that succeeds, deletes
/// the AzureAssignedIdentity `default/aai`.
fn assert_removes(p: &Plan, aai: &str, id: &str) {
    let w = &p.resources[&vmss("vmss-a")];
    assert_eq!(w.remove, [lrid(id)].into());
    assert_eq!(w.delete_on_success, vec![(key("default", aai), lrid(id))]);
}

/// Names of the AzureAssignedIdentities the plan creates.
fn created_names(p: &Plan) -> Vec<&str> {
    p.create.iter().map(|a| a.key.1.as_str()).collect()
}

/// Runs the plan and applies its AAI writes to the index as the executor
/// would after full success, so multi-cycle stories can be told.
fn settle(ix: &mut Index, opts: &Options) -> Plan {
    let p = plan(ix, opts);
    for aai in p.create.iter().chain(&p.update) {
        ix.apply_assigned(&aai.aai());
    }
    let assigned: Vec<Key> = p
        .assign_now
        .iter()
        .cloned()
        .chain(
            p.resources
                .values()
                .flat_map(|w| w.assign_on_success.iter().map(|(k, _)| k.clone())),
        )
        .collect();
    for k in assigned {
        if let Some(a) = ix.assigned.get_mut(&k).map(Arc::make_mut) {
            a.status.get_or_insert_default().status = "Assigned".into();
        }
    }
    let deleted: Vec<Key> = p
        .delete_now
        .iter()
        .cloned()
        .chain(
            p.resources
                .values()
                .flat_map(|w| w.delete_on_success.iter().map(|(k, _)| k.clone())),
        )
        .collect();
    for k in deleted {
        ix.delete_assigned(&k);
    }
    p
}

fn vmss(name: &str) -> ResourceRef {
    ResourceRef::vmss(name)
}

#[test]
fn s1_s2_unlabelled_or_unscheduled_pods_get_nothing() {
    let mut ix = bound();
    ix.apply_pod(&mk_pod("ns", "nolabel", "", "n1"));
    ix.apply_pod(&mk_pod("ns", "unscheduled", "sel", ""));
    assert!(plan(&ix, &Options::default()).is_empty());
}

#[test]
fn s3_s6_s7_s8_new_pod_gets_a_created_aai_and_an_add() {
    let mut ix = base();
    ix.apply_identity(&mk_uami("ns", "id"));
    ix.apply_binding(&mk_binding("other", "b-cross", "id", "sel"));
    ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
    ix.apply_binding(&mk_binding("ns", "b-other-selector", "id", "Sel"));
    add_web(&mut ix);
    let p = plan(&ix, &Options::default());
    // The cross-namespace binding names "other/id", which does not exist (an
    // identity is looked up in the binding's namespace only).
    assert_eq!(
        p.warnings,
        vec![Warning::IdentityNotFound {
            binding: key("other", "b-cross"),
            identity: key("other", "id")
        }]
    );
    assert_eq!(p.create.len(), 1);
    let aai = &p.create[0].aai();
    assert_eq!(aai.metadata.name.as_deref(), Some("web-ns-id"));
    assert_eq!(aai.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(aai.labels().get("nodename").map(String::as_str), Some("n1"));
    assert_eq!(
        aai.metadata.finalizers,
        Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_string()])
    );
    assert_eq!(aai.state(), Some(AssignedIdentityState::Created));
    assert_eq!(aai.spec.node_name, "n1");
    // No annotation on an imds AAI (upstream writes none), not even the
    // CRD's own `api-approved` one that the derived `new` adds.
    assert_eq!(aai.metadata.annotations, None);
    let w = &p.resources[&vmss("vmss-a")];
    assert_eq!(w.add, [lrid("id")].into());
    assert_eq!(
        w.assign_on_success,
        vec![(key("default", "web-ns-id"), lrid("id"))]
    );
    assert!(w.remove.is_empty());
}

#[test]
fn s3_default_mode_matches_bindings_in_any_namespace() {
    let mut ix = base();
    ix.apply_identity(&mk_uami("idns", "id"));
    ix.apply_binding(&mk_binding("idns", "b", "id", "sel"));
    ix.apply_pod(&mk_pod("app", "web", "sel", "n1"));
    assert_eq!(plan(&ix, &Options::default()).create.len(), 1);
}

#[test]
fn s5_namespaced_mode_requires_one_namespace() {
    for (force, annotate) in [(true, false), (false, true)] {
        let mut ix = base();
        let mut id = mk_uami("idns", "id");
        if annotate {
            id.metadata.annotations = Some(
                [(
                    ANNOTATION_BEHAVIOR.to_string(),
                    BEHAVIOR_NAMESPACED.to_string(),
                )]
                .into(),
            );
        }
        ix.apply_identity(&id);
        ix.apply_binding(&mk_binding("idns", "b", "id", "sel"));
        ix.apply_pod(&mk_pod("app", "web", "sel", "n1"));
        ix.apply_pod(&mk_pod("idns", "local", "sel", "n1"));
        let opts = Options {
            force_namespaced: force,
            ..Default::default()
        };
        let p = plan(&ix, &opts);
        let names: Vec<_> = p
            .create
            .iter()
            .map(|a| a.aai())
            .map(|a| key(&a.namespace().unwrap_or_default(), &a.name_any()))
            .collect();
        // A namespaced AAI lives in the identity's namespace.
        assert_eq!(names, vec![key("idns", "local-idns-id")], "force={force}");
        assert!(p.warnings.contains(&Warning::NamespaceMismatch {
            binding: key("idns", "b"),
            pod: key("app", "web")
        }));
    }
}

#[test]
fn s10_service_principals_are_assigned_without_arm() {
    let mut ix = base();
    ix.apply_identity(&mk_identity("ns", "sp", IdentityType::ServicePrincipal, ""));
    ix.apply_identity(&mk_identity(
        "ns",
        "cert",
        IdentityType::ServicePrincipalCertificate,
        "",
    ));
    ix.apply_binding(&mk_binding("ns", "b1", "sp", "sel"));
    ix.apply_binding(&mk_binding("ns", "b2", "cert", "sel"));
    add_web(&mut ix);
    let p = plan(&ix, &Options::default());
    assert_eq!(p.create.len(), 2);
    assert!(p.resources.is_empty());
    assert_eq!(
        p.assign_now,
        vec![key("default", "web-ns-cert"), key("default", "web-ns-sp")]
    );
}

#[test]
fn s11_invalid_resource_id_and_unknown_type_are_reported_and_skipped() {
    let mut ix = base();
    ix.apply_identity(&mk_identity(
        "ns",
        "bad",
        IdentityType::UserAssignedMsi,
        "/subscriptions/x",
    ));
    ix.apply_identity(&mk_identity(
        "ns",
        "odd",
        IdentityType::Unknown(7),
        &rid("odd"),
    ));
    ix.apply_identity(&mk_uami("ns", "good"));
    ix.apply_binding(&mk_binding("ns", "b1", "bad", "sel"));
    ix.apply_binding(&mk_binding("ns", "b2", "odd", "sel"));
    ix.apply_binding(&mk_binding("ns", "b3", "good", "sel"));
    add_web(&mut ix);
    ix.apply_pod(&mk_pod("ns", "web2", "sel", "n1"));
    let p = plan(&ix, &Options::default());
    assert_eq!(p.create.len(), 2, "only the good identity, once per pod");
    assert_eq!(
        p.warnings.len(),
        2,
        "each bad identity reported once: {:?}",
        p.warnings
    );
    assert!(matches!(p.warnings[0], Warning::InvalidResourceId { .. }));
    assert!(matches!(
        p.warnings[1],
        Warning::UnknownIdentityType { value: 7, .. }
    ));
}

#[test]
fn s9_s12_lifecycle_created_assigned_then_removed() {
    let mut ix = bound();
    let opts = Options::default();
    let pod = add_web(&mut ix);
    settle(&mut ix, &opts);
    assert_eq!(
        ix.assigned[&key("default", "web-ns-id")].state(),
        Some(AssignedIdentityState::Assigned)
    );
    assert!(plan(&ix, &opts).is_empty(), "steady state needs no work");

    ix.delete_pod(&pod);
    let p = plan(&ix, &opts);
    assert_removes(&p, "web-ns-id", "id");
    assert!(p.resources[&vmss("vmss-a")].add.is_empty());
}

#[test]
fn s25_identity_still_used_on_the_scale_set_is_kept() {
    let mut ix = bound();
    ix.apply_pod(&mk_pod("ns", "a", "sel", "n1"));
    ix.apply_pod(&mk_pod("ns", "b", "sel", "n2"));
    assert_eq!(
        plan(&ix, &Options::default()).resources[&vmss("vmss-a")].add,
        [lrid("id")].into(),
        "one add for both pods"
    );

    let (_, p) = first_pod_gone(&[("ns", "a", "n1"), ("ns", "b", "n2")], &Options::default());
    assert!(p.resources.is_empty(), "{:?}", p.resources);
    assert_eq!(p.delete_now, vec![key("default", "a-ns-id")]);
}

#[test]
fn h2_same_pod_name_in_another_namespace_keeps_the_identity() {
    let pods = [("ns-a", "web-0", "n1"), ("ns-b", "web-0", "n2")];
    let (_, p) = first_pod_gone(&pods, &Options::default());
    assert!(p.resources.is_empty());
    assert_eq!(p.delete_now, vec![key("default", "web-0-ns-a-id")]);
}

#[test]
fn identity_used_on_another_scale_set_is_removed_here() {
    let pods = [("ns", "a", "n1"), ("ns", "b", "n3")];
    let (_, p) = first_pod_gone(&pods, &Options::default());
    assert_eq!(
        p.resources.keys().collect::<Vec<_>>(),
        vec![&vmss("vmss-a")]
    );
}

#[test]
fn s26_s27_immutable_and_cluster_identities_are_never_removed() {
    let opts = Options {
        immutable_client_ids: ["client-id".to_string()].into(),
        ..Default::default()
    };
    let (_, p) = first_pod_gone(&[("ns", "web", "n1")], &opts);
    assert!(p.resources.is_empty());
    assert_eq!(p.delete_now, vec![key("default", "web-ns-id")]);
}

#[test]
fn s13_deleting_the_identity_or_binding_removes_its_aais() {
    for delete_binding in [false, true] {
        let mut ix = bound();
        let opts = Options::default();
        add_web(&mut ix);
        settle(&mut ix, &opts);
        if delete_binding {
            ix.delete_binding(&key("ns", "b"));
        } else {
            ix.delete_identity(&key("ns", "id"));
        }
        let p = plan(&ix, &opts);
        assert_eq!(p.resources[&vmss("vmss-a")].remove, [lrid("id")].into());
    }
}

#[test]
fn s14_editing_the_identity_swaps_the_assignment() {
    let mut ix = bound();
    let opts = Options::default();
    add_web(&mut ix);
    settle(&mut ix, &opts);
    let k = key("default", "web-ns-id");
    Arc::make_mut(ix.assigned.get_mut(&k).unwrap())
        .metadata
        .resource_version = Some("42".into());
    let mut edited = mk_uami("ns", "id");
    edited.spec.resource_id = rid("id2");
    ix.apply_identity(&edited);
    let p = plan(&ix, &opts);
    assert_eq!(p.update.len(), 1);
    assert_eq!(
        p.update[0].aai().state(),
        Some(AssignedIdentityState::Created)
    );
    // The replacement names the version it replaces.
    assert_eq!(p.update[0].key, k);
    assert_eq!(
        p.update[0].aai().metadata.resource_version.as_deref(),
        Some("42")
    );
    let w = &p.resources[&vmss("vmss-a")];
    assert_eq!(w.add, [lrid("id2")].into());
    assert_eq!(w.remove, [lrid("id")].into());
}

#[test]
fn a_recreated_identity_or_binding_is_embedded_anew() {
    // nmi trusts an AAI only while its embedded objects are the live ones
    // (same UID), so a delete and re-create under the same name and spec
    // must refresh the AAI; the identity stays on the scale set meanwhile.
    let opts = Options::default();
    let (mut ix, mut id, mut b) = web_with_uids(mk_uami("ns", "id"), "uid-1", "uid-b1");
    settle(&mut ix, &opts);
    assert!(plan(&ix, &opts).is_empty());
    for (new_id_uid, new_b_uid) in [("uid-2", "uid-b1"), ("uid-2", "uid-b2")] {
        id.metadata.uid = Some(new_id_uid.into());
        b.metadata.uid = Some(new_b_uid.into());
        ix.apply_identity(&id);
        ix.apply_binding(&b);
        let p = settle(&mut ix, &opts);
        assert_eq!(p.update.len(), 1, "{new_id_uid} {new_b_uid}");
        let embedded = &p.update[0].aai().spec;
        assert_eq!(
            embedded
                .azure_identity_ref
                .as_ref()
                .and_then(|i| i.metadata.uid.as_deref()),
            Some(new_id_uid)
        );
        assert_eq!(
            embedded
                .azure_binding_ref
                .as_ref()
                .and_then(|b| b.metadata.uid.as_deref()),
            Some(new_b_uid)
        );
        let w = &p.resources[&vmss("vmss-a")];
        assert!(w.remove.is_empty(), "the identity stays: {w:?}");
        assert!(plan(&ix, &opts).is_empty(), "settled");
    }
}

/// The spec of the AAI `web` of identity `id` and binding `b` as upstream's
/// Go MIC v1.8.17 stores it: every field its types serialise (an empty
/// `clientPassword`, `status` and `spec.metadata` blocks, `creationTimestamp:
/// null`, no `type` when 0) around the same objects as [`bound`].
fn go_written_spec(identity_uid: &str, binding_uid: &str) -> AzureAssignedIdentitySpec {
    serde_json::from_value(serde_json::json!({
        "metadata": {"creationTimestamp": null},
        "azureIdentityRef": {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzureIdentity",
            "metadata": {"name": "id", "namespace": "ns", "uid": identity_uid,
                         "resourceVersion": "11", "creationTimestamp": "2026-12-05T01:50:36Z"},
            "spec": {
                "metadata": {"creationTimestamp": null},
                "resourceID": rid("id"),
                "clientID": "client-id",
                "clientPassword": {}
            },
            "status": {"metadata": {"creationTimestamp": null}}
        },
        "azureBindingRef": {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzureIdentityBinding",
            "metadata": {"name": "b", "namespace": "ns", "uid": binding_uid,
                         "resourceVersion": "12", "creationTimestamp": "2026-12-05T01:50:36Z"},
            "spec": {"metadata": {"creationTimestamp": null}, "azureIdentity": "id", "selector": "sel"},
            "status": {"metadata": {"creationTimestamp": null}}
        },
        "pod": "web",
        "podNamespace": "ns",
        "nodename": "n1"
    }))
    .unwrap()
}

/// [`base`] with `identity` (given `identity_uid`), the binding `ns/b` of it
/// to `sel` (given `binding_uid`) and pod `web`: the index and both objects.
fn web_with_uids(
    mut identity: AzureIdentity,
    identity_uid: &str,
    binding_uid: &str,
) -> (Index, AzureIdentity, AzureIdentityBinding) {
    let mut ix = base();
    identity.metadata.uid = Some(identity_uid.into());
    let mut b = mk_binding("ns", "b", "id", "sel");
    b.metadata.uid = Some(binding_uid.into());
    ix.apply_identity(&identity);
    ix.apply_binding(&b);
    add_web(&mut ix);
    (ix, identity, b)
}

/// What this MIC wants for `web` in [`bound`] with `identity` as the live
/// identity (UIDs `uid-i` and `uid-b`).
fn desired_web_spec(identity: AzureIdentity) -> AzureAssignedIdentitySpec {
    let (ix, _, _) = web_with_uids(identity, "uid-i", "uid-b");
    let p = plan(&ix, &Options::default());
    p.create[0].aai().spec.clone()
}

#[test]
fn go_written_aais_are_the_same_assignment_and_real_differences_are_not() {
    let live = || mk_uami("ns", "id");
    let with = |f: &dyn Fn(&mut AzureIdentity)| {
        let mut i = live();
        f(&mut i);
        i
    };
    // (case, live identity, Go-written AAI's UIDs (identity, binding), same)
    let cases: Vec<(&str, AzureIdentity, (&str, &str), bool)> = vec![
        ("as Go wrote it", live(), ("uid-i", "uid-b"), true),
        (
            "live clientPassword {} too",
            with(&|i| i.spec.client_password = Some(Default::default())),
            ("uid-i", "uid-b"),
            true,
        ),
        (
            "live auxiliaryTenantIDs []",
            with(&|i| i.spec.auxiliary_tenant_ids = Some(vec![])),
            ("uid-i", "uid-b"),
            true,
        ),
        (
            "another resource ID",
            with(&|i| i.spec.resource_id = rid("other")),
            ("uid-i", "uid-b"),
            false,
        ),
        (
            "another client ID",
            with(&|i| i.spec.client_id = "client-other".into()),
            ("uid-i", "uid-b"),
            false,
        ),
        (
            "a secret named",
            with(&|i| {
                i.spec.client_password = Some(k8s_openapi::api::core::v1::SecretReference {
                    name: Some("sp".into()),
                    namespace: None,
                })
            }),
            ("uid-i", "uid-b"),
            false,
        ),
        (
            "another type",
            with(&|i| i.spec.r#type = IdentityType::ServicePrincipal),
            ("uid-i", "uid-b"),
            false,
        ),
        ("identity recreated", live(), ("uid-old", "uid-b"), false),
        ("binding recreated", live(), ("uid-i", "uid-old"), false),
    ];
    for (case, identity, (iu, bu), same) in cases {
        let desired = desired_web_spec(identity);
        let go = go_written_spec(iu, bu);
        assert_eq!(same_assignment(&go, &desired), same, "{case}");
        assert_eq!(same_assignment(&desired, &go), same, "{case} (swapped)");
    }
    // Neither pod, node nor binding spec may differ either.
    let desired = desired_web_spec(live());
    type Edit<'a> = (&'a str, &'a dyn Fn(&mut AzureAssignedIdentitySpec));
    let variants: [Edit; 4] = [
        ("pod", &|s| s.pod = "other".into()),
        ("node", &|s| s.node_name = "n2".into()),
        ("selector", &|s| {
            if let Some(b) = s.azure_binding_ref.as_mut() {
                b.spec.selector = "other".into();
            }
        }),
        ("identity name", &|s| {
            if let Some(i) = s.azure_identity_ref.as_mut() {
                i.metadata.name = Some("other".into());
            }
        }),
    ];
    for (case, change) in variants {
        let mut go = go_written_spec("uid-i", "uid-b");
        change(&mut go);
        assert!(!same_assignment(&go, &desired), "{case}");
    }
}

#[test]
fn a_go_written_assigned_aai_needs_no_work() {
    // Taking over from upstream's Go MIC: an Assigned AAI it wrote gives an
    // empty plan (no update back to Created, no ARM work), and the drift
    // check expects its identity where it is.
    let opts = Options::default();
    let (mut ix, id, _) = web_with_uids(mk_uami("ns", "id"), "uid-i", "uid-b");
    let mut aai = AzureAssignedIdentity::new(
        &assigned_identity_name("web", "ns", "id"),
        go_written_spec("uid-i", "uid-b"),
    );
    aai.metadata.namespace = Some(DEFAULT_AAI_NAMESPACE.into());
    aai.status = Some(AzureAssignedIdentityStatus {
        status: "Assigned".into(),
        available_replicas: 1,
    });
    ix.apply_assigned(&aai);
    let p = plan(&ix, &opts);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(
        expected_assignments(&ix, &opts),
        [(vmss("vmss-a"), [lrid("id")].into())].into()
    );
    // The same AAI after the identity really changed is rewritten.
    let mut edited = id.clone();
    edited.spec.resource_id = rid("id2");
    ix.apply_identity(&edited);
    let p = plan(&ix, &opts);
    assert_eq!(p.update.len(), 1);
    assert_eq!(
        p.update[0].aai().state(),
        Some(AssignedIdentityState::Created)
    );
}

#[test]
fn h5_metadata_edits_cause_no_work() {
    let mut ix = bound();
    let opts = Options::default();
    add_web(&mut ix);
    settle(&mut ix, &opts);
    let mut touched = mk_uami("ns", "id");
    touched.metadata.labels = Some([("team".to_string(), "x".to_string())].into());
    touched.metadata.resource_version = Some("999".into());
    assert!(!ix.apply_identity(&touched), "no cycle needed");
    assert!(plan(&ix, &opts).is_empty());
}

#[test]
fn s15_relabelled_pod_gets_the_new_identity() {
    let mut ix = base();
    let opts = Options::default();
    ix.apply_identity(&mk_uami("ns", "id1"));
    ix.apply_identity(&mk_uami("ns", "id2"));
    ix.apply_binding(&mk_binding("ns", "b1", "id1", "one"));
    ix.apply_binding(&mk_binding("ns", "b2", "id2", "two"));
    ix.apply_pod(&mk_pod("ns", "web", "one", "n1"));
    settle(&mut ix, &opts);
    ix.apply_pod(&mk_pod("ns", "web", "two", "n1"));
    let p = plan(&ix, &opts);
    assert_eq!(p.create.len(), 1);
    assert_eq!(p.resources[&vmss("vmss-a")].add, [lrid("id2")].into());
    assert_removes(&p, "web-ns-id1", "id1");
}

#[test]
fn pod_moving_node_updates_the_aai() {
    let mut ix = bound();
    let opts = Options::default();
    add_web(&mut ix);
    settle(&mut ix, &opts);
    ix.apply_pod(&mk_pod("ns", "web", "sel", "n3"));
    let p = plan(&ix, &opts);
    assert_eq!(p.update.len(), 1);
    assert_eq!(
        p.update[0]
            .aai()
            .labels()
            .get("nodename")
            .map(String::as_str),
        Some("n3")
    );
    assert_eq!(p.resources[&vmss("vmss-a")].remove, [lrid("id")].into());
    assert_eq!(p.resources[&vmss("vmss-b")].add, [lrid("id")].into());
}

#[test]
fn s39_same_identity_name_from_two_namespaces_first_binding_wins() {
    let mut ix = base();
    ix.apply_identity(&mk_uami("a", "id"));
    ix.apply_identity(&mk_uami("b", "id"));
    ix.apply_binding(&mk_binding("a", "b", "id", "sel"));
    ix.apply_binding(&mk_binding("b", "b", "id", "sel"));
    add_web(&mut ix);
    let p = plan(&ix, &Options::default());
    assert_eq!(p.create.len(), 1);
    assert_eq!(
        p.create[0]
            .aai()
            .spec
            .azure_binding_ref
            .as_ref()
            .and_then(|b| b.metadata.namespace.clone()),
        Some("a".into())
    );
    assert!(matches!(
        p.warnings[0],
        Warning::DuplicateAssignedIdentity { .. }
    ));
}

#[test]
fn s40_completed_pods_release_identities_unless_told_otherwise() {
    let mut ix = bound();
    let mut pod = mk_pod("ns", "job", "sel", "n1");
    ix.apply_pod(&pod);
    settle(&mut ix, &Options::default());
    pod.status = Some(PodStatus {
        phase: Some("Succeeded".into()),
        ..Default::default()
    });
    ix.apply_pod(&pod);
    let upstream = Options {
        keep_completed_pod_identities: true,
        ..Default::default()
    };
    assert!(plan(&ix, &upstream).is_empty());
    let p = plan(&ix, &Options::default());
    assert_eq!(p.resources[&vmss("vmss-a")].remove, [lrid("id")].into());
}

#[test]
fn s28_aais_of_a_deleted_node_go_without_arm() {
    let mut ix = bound();
    let opts = Options::default();
    let pod = add_web(&mut ix);
    settle(&mut ix, &opts);
    ix.delete_pod(&pod);
    ix.delete_node(&mk_vmss_node("n1", "vmss-a"));
    let p = plan(&ix, &opts);
    assert!(p.resources.is_empty());
    assert_eq!(p.delete_now, vec![key("default", "web-ns-id")]);
}

#[test]
fn created_aais_are_retried_and_deleting_ones_are_not_recreated_yet() {
    let mut ix = bound();
    let opts = Options::default();
    add_web(&mut ix);
    let created = plan(&ix, &opts).create.remove(0).aai();
    ix.apply_assigned(&created);
    // The ARM write failed: the AAI stays Created and the next plan retries the add.
    let p = plan(&ix, &opts);
    assert!(p.create.is_empty());
    assert_eq!(p.resources[&vmss("vmss-a")].add, [lrid("id")].into());

    let mut terminating = created;
    terminating.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
    ix.apply_assigned(&terminating);
    let p = plan(&ix, &opts);
    assert!(p.create.is_empty());
    assert_eq!(p.delete_now, vec![key("default", "web-ns-id")]);
}

#[test]
fn expected_assignments_lists_assigned_type0_only() {
    let mut ix = base();
    let opts = Options::default();
    ix.apply_identity(&mk_uami("ns", "id"));
    ix.apply_identity(&mk_identity("ns", "sp", IdentityType::ServicePrincipal, ""));
    ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
    ix.apply_binding(&mk_binding("ns", "b2", "sp", "sel"));
    add_web(&mut ix);
    assert!(expected_assignments(&ix, &opts).is_empty());
    settle(&mut ix, &opts);
    assert_eq!(
        expected_assignments(&ix, &opts),
        [(vmss("vmss-a"), [lrid("id")].into())].into()
    );
}

#[test]
fn the_drift_check_never_expects_an_identity_on_its_way_out() {
    // The pod is gone, its AAI still says Assigned (its removal may have
    // landed while the AAI delete waits for the apiserver): not expected.
    let mut ix = bound();
    let opts = Options::default();
    let pod = add_web(&mut ix);
    settle(&mut ix, &opts);
    assert_eq!(expected_assignments(&ix, &opts).len(), 1);
    ix.delete_pod(&pod);
    assert!(expected_assignments(&ix, &opts).is_empty());
}

#[test]
fn a_created_aai_that_retires_takes_its_identity_off_if_there() {
    // Its status may lag ARM (MIC's own Assigned write not seen yet, or a
    // leader killed after its PATCH): deleting it without a removal would
    // orphan the identity. The executor sends nothing if it is not there (so
    // the system identity is never stripped).
    let mut ix = bound();
    let opts = Options::default();
    let pod = add_web(&mut ix);
    let p = plan(&ix, &opts);
    ix.apply_assigned(&p.create[0].aai());
    assert_eq!(
        ix.assigned[&key("default", "web-ns-id")].state(),
        Some(AssignedIdentityState::Created)
    );
    ix.delete_pod(&pod);
    let p = plan(&ix, &opts);
    assert!(p.delete_now.is_empty());
    assert_removes(&p, "web-ns-id", "id");
}

fn mk_namespace(name: &str, allowed: Option<&str>) -> k8s_openapi::api::core::v1::Namespace {
    let mut n = k8s_openapi::api::core::v1::Namespace::default();
    n.metadata.name = Some(name.into());
    if let Some(a) = allowed {
        n.metadata.annotations = Some(
            [(
                aadpodid_api::ANNOTATION_ALLOWED_IDENTITIES.to_string(),
                a.to_string(),
            )]
            .into(),
        );
    }
    n
}

#[test]
fn the_identity_policy_at_run_time() {
    let rg_all = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/*";
    // (mode, annotation of ns, AAI made, warning, enforced)
    let cases: [(PolicyMode, Option<&str>, bool, bool); 9] = [
        (PolicyMode::Off, None, true, false),
        (PolicyMode::Warn, None, true, true),
        (PolicyMode::Enforce, None, false, true),
        (PolicyMode::Enforce, Some(""), false, true),
        (PolicyMode::Enforce, Some(&rid("other")), false, true),
        (PolicyMode::Enforce, Some(rg_all), true, false),
        (PolicyMode::Warn, Some(rg_all), true, false),
        // Case and blanks do not matter; several patterns.
        (
            PolicyMode::Enforce,
            Some(
                " /x/*, /SUBSCRIPTIONS/s/resourcegroups/RG/providers/microsoft.managedidentity/userassignedidentities/ID ",
            ),
            true,
            false,
        ),
        (PolicyMode::Enforce, Some("*"), true, false),
    ];
    for (mode, annotation, made, warned) in cases {
        let mut ix = base();
        ix.apply_namespace(&mk_namespace("ns", annotation));
        // Another namespace's grant does not count.
        ix.apply_namespace(&mk_namespace("other", Some("*")));
        ix.apply_identity(&mk_uami("ns", "id"));
        ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
        ix.apply_pod(&mk_pod("other", "web", "sel", "n1"));
        // Service principals are not subject to the policy.
        ix.apply_identity(&mk_identity("ns", "sp", IdentityType::ServicePrincipal, ""));
        ix.apply_binding(&mk_binding("ns", "b-sp", "sp", "sel"));
        let opts = Options {
            policy: mode,
            ..Default::default()
        };
        let p = plan(&ix, &opts);
        let names = created_names(&p);
        let ctx = format!("{mode:?} {annotation:?}");
        assert_eq!(names.contains(&"web-other-id"), made, "{ctx}");
        assert!(names.contains(&"web-other-sp"), "{ctx}");
        let warning = Warning::IdentityNotGranted {
            identity: key("ns", "id"),
            namespace: "ns".into(),
            resource_id: rid("id"),
            enforced: mode == PolicyMode::Enforce,
        };
        assert_eq!(
            p.warnings.contains(&warning),
            warned,
            "{ctx}: {:?}",
            p.warnings
        );
        assert_eq!(p.warnings.len(), usize::from(warned), "{ctx}");
    }
}

#[test]
fn a_binding_reaching_another_namespace_needs_the_grant_there_too() {
    // Namespace a is granted id-a; b is granted nothing. Upstream's default
    // mode lets a pod in b carry a's selector and match a's binding: under
    // the policy the pod's namespace must be granted the identity as well.
    // (mode, grant of b, AAI for the pod in b, warning about b)
    let cases = [
        (PolicyMode::Off, None, true, false),
        (PolicyMode::Warn, None, true, true),
        (PolicyMode::Enforce, None, false, true),
        (PolicyMode::Enforce, Some(rid("other")), false, true),
        (PolicyMode::Enforce, Some(rid("id-a")), true, false),
    ];
    for (mode, grant_b, made, warned) in cases {
        let mut ix = base();
        ix.apply_namespace(&mk_namespace("a", Some(&rid("id-a"))));
        ix.apply_namespace(&mk_namespace("b", grant_b.as_deref()));
        ix.apply_identity(&mk_uami("a", "id-a"));
        ix.apply_binding(&mk_binding("a", "bind-a", "id-a", "sel-a"));
        ix.apply_pod(&mk_pod("a", "own", "sel-a", "n1"));
        ix.apply_pod(&mk_pod("b", "thief", "sel-a", "n1"));
        let opts = Options {
            policy: mode,
            ..Default::default()
        };
        let p = plan(&ix, &opts);
        let names = created_names(&p);
        let ctx = format!("{mode:?} {grant_b:?}: {names:?} {:?}", p.warnings);
        assert!(names.contains(&"own-a-id-a"), "{ctx}");
        assert_eq!(names.contains(&"thief-b-id-a"), made, "{ctx}");
        let warning = Warning::IdentityNotGranted {
            identity: key("a", "id-a"),
            namespace: "b".into(),
            resource_id: rid("id-a"),
            enforced: mode == PolicyMode::Enforce,
        };
        assert_eq!(p.warnings.contains(&warning), warned, "{ctx}");
        assert_eq!(p.warnings.len(), usize::from(warned), "{ctx}");
    }
}

#[test]
fn enforce_retires_an_existing_aai_like_any_undesired_one() {
    let mut ix = bound();
    add_web(&mut ix);
    settle(&mut ix, &Options::default());
    let enforce = Options {
        policy: PolicyMode::Enforce,
        ..Default::default()
    };
    let p = plan(&ix, &enforce);
    // Removed only if the ledger says MIC added it (decided by the guard).
    assert_removes(&p, "web-ns-id", "id");
    // Granted again: assigned again.
    assert!(ix.apply_namespace(&mk_namespace("ns", Some(&rid("id")))));
    assert!(
        !ix.apply_namespace(&mk_namespace("ns", Some(&rid("id")))),
        "no change"
    );
    assert!(plan(&ix, &enforce).is_empty());
}

#[test]
fn the_ledger_is_seeded_from_every_existing_aai() {
    let mut ix = base();
    ix.apply_identity(&mk_uami("ns", "id"));
    ix.apply_identity(&mk_uami("ns", "id2"));
    ix.apply_identity(&mk_identity("ns", "sp", IdentityType::ServicePrincipal, ""));
    ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
    ix.apply_binding(&mk_binding("ns", "b2", "id2", "sel2"));
    ix.apply_binding(&mk_binding("ns", "b-sp", "sp", "sel"));
    add_web(&mut ix);
    ix.apply_pod(&mk_pod("ns", "job", "sel2", "n3"));
    // Upstream wrote these; one is still Created.
    let p = plan(&ix, &Options::default());
    let mut web = None;
    for mut aai in p.create.iter().map(PlannedAai::aai) {
        if aai.metadata.name.as_deref() != Some("job-ns-id2") {
            aai.status.get_or_insert_default().status = "Assigned".into();
        }
        ix.apply_assigned(&aai);
        if aai.metadata.name.as_deref() == Some("web-ns-id") {
            web = Some(aai);
        }
    }
    let web = web.unwrap();
    // An AAI of a node MIC does not know is skipped.
    let mut orphan = web.clone();
    orphan.metadata.name = Some("orphan".into());
    orphan.spec.node_name = "gone".into();
    ix.apply_assigned(&orphan);
    // One this MIC refused proves nothing (its identity may be an add-on's).
    let mut refused = web.clone();
    refused.metadata.name = Some("refused".into());
    refused.spec.node_name = "n3".into();
    refused.metadata.annotations = Some(
        [(
            aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR.to_string(),
            "not assigned".to_string(),
        )]
        .into(),
    );
    ix.apply_assigned(&refused);
    let l = crate::ledger::Ledger::seed(&ix);
    assert!(l.owns(&vmss("vmss-a"), &rid("id")));
    assert!(l.owns(&vmss("vmss-b"), &rid("id2")), "Created counts too");
    assert!(!l.owns(&vmss("vmss-b"), &rid("id")));
    assert!(!l.owns(&vmss("vmss-a"), &rid("id2")));
    assert_eq!(l.len(), 2);
}

/// Plan and guard together, over a resource as ARM reports it.
mod entitlement {
    use super::*;
    use crate::cloud::{ArmIdentity, ResourceIdentity};
    use crate::guard::{ClusterWhy, Protection, Refusal, vet};
    use crate::ledger::Ledger;

    const KUBELET_CLIENT: &str = "kubelet-client-id";

    fn arm(ids: &[(&str, &str)]) -> ResourceIdentity {
        ResourceIdentity {
            type_: "UserAssigned".into(),
            user_assigned: ids.iter().map(|(n, _)| lrid(n)).collect(),
            provisioning_state: "Succeeded".into(),
            reported: ids
                .iter()
                .map(|(n, c)| {
                    (
                        lrid(n),
                        ArmIdentity {
                            client_id: c.to_string(),
                            principal_id: String::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn protection() -> Protection {
        Protection {
            cluster_client_ids: [KUBELET_CLIENT.to_string()].into(),
            serve_cluster_identities: false,
        }
    }

    fn typed(ix: &Index, w: &ResourceWork) -> BTreeMap<Key, String> {
        w.assign_on_success
            .iter()
            .filter_map(|(k, _)| {
                ix.assigned
                    .get(k)
                    .map(|a| (k.clone(), assigned_client_id(a)))
            })
            .collect()
    }

    /// An AzureIdentity with the kubelet identity's resource ID and
    /// another client ID; its pod goes. Before, MIC removed the kubelet
    /// identity from the node pool (it protected by typed client ID only).
    #[test]
    fn f6_the_kubelet_identity_is_never_removed_whatever_its_client_id() {
        for seeded_by_upstream in [false, true] {
            let mut ix = base();
            let opts = Options {
                immutable_client_ids: [KUBELET_CLIENT.to_string()].into(),
                ..Default::default()
            };
            let mut forged = mk_uami("attacker", "kubelet");
            forged.spec.client_id = "attacker-client".into();
            ix.apply_identity(&forged);
            ix.apply_binding(&mk_binding("attacker", "b", "kubelet", "sel"));
            let pod = mk_pod("attacker", "p", "sel", "n1");
            ix.apply_pod(&pod);
            let p = settle(&mut ix, &opts);
            let cur = arm(&[("kubelet", KUBELET_CLIENT)]);
            let ledger = if seeded_by_upstream {
                Ledger::seed(&ix)
            } else {
                Ledger::default()
            };
            let r = vmss("vmss-a");
            let owns = |id: &str| ledger.owns(&r, id);
            // While the pod runs: refused, nothing sent.
            let w = &p.resources[&r];
            let v = vet(w, &cur, &typed(&ix, w), &owns, &protection());
            assert_eq!(
                v.refused,
                vec![(
                    key("default", "p-attacker-kubelet"),
                    Refusal::ClusterIdentity {
                        identity_id: lrid("kubelet"),
                        // By what ARM reports, whatever the ledger says.
                        why: ClusterWhy::ReportedClientId,
                    }
                )]
            );
            assert!(v.record.is_empty());
            // The pod goes: the plan asks for the removal, the guard refuses it.
            ix.delete_pod(&pod);
            let p = plan(&ix, &opts);
            let w = &p.resources[&r];
            assert_eq!(w.remove, [lrid("kubelet")].into());
            let v = vet(w, &cur, &BTreeMap::new(), &owns, &protection());
            assert!(v.remove.is_empty(), "seeded={seeded_by_upstream}");
            assert_eq!(v.release, vec![key("default", "p-attacker-kubelet")]);
        }
    }

    /// An identity that was on the scale set before MIC (an add-on's),
    /// referenced by a namespace user, then released: it stays.
    #[test]
    fn a_pre_existing_identity_referenced_then_released_stays() {
        let mut ix = base();
        let opts = Options::default();
        let mut addon = mk_uami("user", "addon");
        addon.spec.client_id = "addon-client".into();
        ix.apply_identity(&addon);
        ix.apply_binding(&mk_binding("user", "b", "addon", "sel"));
        let pod = mk_pod("user", "p", "sel", "n1");
        ix.apply_pod(&pod);
        let p = settle(&mut ix, &opts);
        let cur = arm(&[("addon", "addon-client")]);
        let ledger = Ledger::default();
        let r = vmss("vmss-a");
        let owns = |id: &str| ledger.owns(&r, id);
        let w = &p.resources[&r];
        let v = vet(w, &cur, &typed(&ix, w), &owns, &protection());
        assert_eq!(v.refused.len(), 1, "not served: {v:?}");
        ix.delete_pod(&pod);
        let p = plan(&ix, &opts);
        let v = vet(
            &p.resources[&r],
            &cur,
            &BTreeMap::new(),
            &owns,
            &protection(),
        );
        assert!(v.remove.is_empty());
        assert_eq!(v.release, vec![key("default", "p-user-addon")]);
    }

    /// MIC's own add: recorded before the PATCH, assigned once ARM reports
    /// the right client ID, removed when released, then the entry pruned.
    #[test]
    fn an_identity_mic_adds_is_recorded_then_removed_then_dropped() {
        let mut ix = bound();
        let opts = Options::default();
        let pod = add_web(&mut ix);
        let p = plan(&ix, &opts);
        for aai in &p.create {
            ix.apply_assigned(&aai.aai());
        }
        let r = vmss("vmss-a");
        let before = arm(&[("kubelet", KUBELET_CLIENT)]);
        let mut ledger = Ledger::default();
        let w = &p.resources[&r];
        let v = vet(
            w,
            &before,
            &typed(&ix, w),
            &|id| ledger.owns(&r, id),
            &protection(),
        );
        assert_eq!(v.record, [lrid("id")].into());
        assert_eq!(v.add, [lrid("id")].into());
        ledger.set(
            &r,
            crate::ledger::with_added(&ledger.entries(&r), &v.record),
        );
        // Landed, with ARM's client ID: assigned. A wrong one: refused.
        let after = arm(&[("kubelet", KUBELET_CLIENT), ("id", "client-id")]);
        let owns = |id: &str| ledger.owns(&r, id);
        assert_eq!(
            crate::guard::check(&lrid("id"), "CLIENT-ID", &after, &owns, &protection()),
            None
        );
        assert!(matches!(
            crate::guard::check(&lrid("id"), "client-other", &after, &owns, &protection()),
            Some(Refusal::ClientIdMismatch { .. })
        ));
        // Released: removed (MIC's own), then the entry leaves.
        for a in ix.assigned.values_mut().map(Arc::make_mut) {
            a.status.get_or_insert_default().status = "Assigned".into();
        }
        ix.delete_pod(&pod);
        let p = plan(&ix, &opts);
        let v = vet(
            &p.resources[&r],
            &after,
            &BTreeMap::new(),
            &owns,
            &protection(),
        );
        assert_eq!(v.remove, [lrid("id")].into());
        assert!(v.release.is_empty());
        let gone = arm(&[("kubelet", KUBELET_CLIENT)]);
        let kept = crate::ledger::pruned(&ledger.entries(&r), &gone.user_assigned, &v.add);
        assert!(kept.is_empty());
    }
}

#[test]
fn assigned_aais_are_listed_per_resource_for_the_drift_check() {
    let mut ix = base();
    ix.apply_identity(&mk_uami("ns", "id"));
    ix.apply_identity(&mk_identity("ns", "sp", IdentityType::ServicePrincipal, ""));
    ix.apply_binding(&mk_binding("ns", "b", "id", "sel"));
    ix.apply_binding(&mk_binding("ns", "b-sp", "sp", "sel"));
    add_web(&mut ix);
    ix.apply_pod(&mk_pod("ns", "new", "sel", "n3"));
    let p = plan(&ix, &Options::default());
    for mut aai in p.create.iter().map(PlannedAai::aai) {
        if aai.spec.pod == "web" {
            aai.status.get_or_insert_default().status = "Assigned".into();
        }
        ix.apply_assigned(&aai);
    }
    // Assigned type-0 only: not the service principal, not the Created one.
    let got = assigned_by_resource(&ix);
    assert_eq!(
        got,
        [(
            vmss("vmss-a"),
            vec![(key("default", "web-ns-id"), lrid("id"))]
        )]
        .into()
    );
}

/// The plan compares an existing AAI with the index's objects by reference
/// and builds the desired AAI only to write it: the comparison must say what
/// [`same_assignment`] says of the AAI it would build.
#[test]
fn a_desired_aai_matches_by_reference_as_the_object_it_builds() {
    let (ix, _, _) = web_with_uids(mk_uami("ns", "id"), "uid-i", "uid-b");
    let desired = desired_set(&ix, &Options::default(), &mut Vec::new());
    let k = key("default", "web-ns-id");
    let d = &desired[&k];
    let built = d.planned(&k, None).aai().spec;
    type Spec = AzureAssignedIdentitySpec;
    fn id(s: &mut Spec) -> &mut AzureIdentity {
        s.azure_identity_ref.as_deref_mut().unwrap()
    }
    fn bd(s: &mut Spec) -> &mut AzureIdentityBinding {
        s.azure_binding_ref.as_deref_mut().unwrap()
    }
    /// (case, edit of the built spec, still the same assignment)
    type Edit = (&'static str, fn(&mut Spec), bool);
    #[rustfmt::skip]
    let edits: [Edit; 14] = [
        ("as built", |_| {}, true),
        ("as upstream's Go MIC writes it", |s| *s = go_written_spec("uid-i", "uid-b"), true),
        ("another resourceVersion", |s| id(s).metadata.resource_version = Some("9".into()), true),
        ("another pod", |s| s.pod = "other".into(), false),
        ("another pod namespace", |s| s.pod_namespace = "other".into(), false),
        ("another node", |s| s.node_name = "n2".into(), false),
        ("no identity", |s| s.azure_identity_ref = None, false),
        ("no binding", |s| s.azure_binding_ref = None, false),
        ("identity made anew", |s| id(s).metadata.uid = Some("other".into()), false),
        ("identity moved", |s| id(s).metadata.namespace = Some("other".into()), false),
        ("identity edited", |s| id(s).spec.client_id = "other".into(), false),
        ("binding made anew", |s| bd(s).metadata.uid = Some("other".into()), false),
        ("binding renamed", |s| bd(s).metadata.name = Some("other".into()), false),
        ("binding edited", |s| bd(s).spec.selector = "other".into(), false),
    ];
    let cases = edits.into_iter().map(|(case, edit, same)| {
        let mut spec = built.clone();
        edit(&mut spec);
        (case, spec, same)
    });
    for (case, existing, same) in cases {
        assert_eq!(same_assignment(&existing, &built), same, "{case}");
        let kept = AssignedInfo::new(&AzureAssignedIdentity::new("web-ns-id", existing), &ix);
        assert_eq!(d.made_by(&kept), same, "{case}");
    }
}

/// A clone of the index (what a cycle plans on) shares every object.
#[test]
fn a_cloned_index_shares_its_objects() {
    let mut ix = bound();
    add_web(&mut ix);
    settle(&mut ix, &Options::default());
    let copy = ix.clone();
    fn same<K, V>(a: &BTreeMap<K, Arc<V>>, b: &BTreeMap<K, Arc<V>>) -> bool {
        a.len() == b.len() && a.values().zip(b.values()).all(|(x, y)| Arc::ptr_eq(x, y))
    }
    let shared = |a: &Index, b: &Index| {
        same(&a.pods, &b.pods)
            && same(&a.nodes, &b.nodes)
            && same(&a.identities, &b.identities)
            && same(&a.bindings, &b.bindings)
            && same(&a.assigned, &b.assigned)
    };
    assert_eq!(copy.assigned.len(), 1);
    assert!(shared(&ix, &copy));
    // An unchanged object applied again keeps the one in place.
    let pod = mk_pod("ns", "web", "sel", "n1");
    assert!(!ix.apply_pod(&pod));
    assert!(!ix.apply_node(&mk_vmss_node("n1", "vmss-a")));
    assert!(shared(&ix, &copy));
}

/// The executor keeps of each AAI it writes what the index would keep of
/// the apiserver's answer (the AAI it sent, with a uid and a resourceVersion).
#[test]
fn a_written_aai_is_kept_as_the_index_would_keep_it() {
    let mut ix = bound();
    add_web(&mut ix);
    let p = plan(&ix, &Options::default());
    let planned = &p.create[0];
    let cases = [
        (None, None),
        (Some("uid-a".to_string()), Some("7".to_string())),
    ];
    for (uid, rv) in cases {
        let mut answer = planned.aai();
        answer.metadata.uid = uid.clone();
        answer.metadata.resource_version = rv.clone();
        // What the apiserver adds and MIC does not keep.
        answer.metadata.generation = Some(1);
        let kept = planned.kept(uid.clone(), rv.clone());
        assert_eq!(kept, AssignedInfo::new(&answer, &ix), "{uid:?} {rv:?}");
        assert!(Arc::ptr_eq(
            kept.spec.identity.as_ref().unwrap(),
            &ix.identities[&key("ns", "id")]
        ));
    }
}

mod token_source;

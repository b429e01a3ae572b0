//! The cluster as MIC sees it: plain maps that watches update with
//! `apply`/`delete`/`reset`, and that [`crate::plan::plan`] reads. No I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use aadpodid_api::policy::ANNOTATION_ALLOWED_IDENTITIES;
use aadpodid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, POD_LABEL_BINDING,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::cloud::{ResourceRef, resource_for_node};

/// `(namespace, name)`.
pub type Key = (String, String);

fn key_of<K: ResourceExt>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What MIC keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// Value of the `aadpodidbinding` label.
    pub binding_label: String,
    /// `spec.nodeName`; empty until scheduled.
    pub node: String,
    /// `status.phase`.
    pub phase: String,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        PodInfo {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            binding_label: pod
                .labels()
                .get(POD_LABEL_BINDING)
                .cloned()
                .unwrap_or_default(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            phase: pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
        }
    }

    /// Succeeded or Failed: its containers will not run again.
    pub fn is_completed(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }
}

/// What MIC keeps of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub resource: ResourceRef,
    /// The providerID was set but did not parse; the node is addressed as a VM.
    pub malformed_provider_id: bool,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let name = node.name_any();
        let provider_id = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .unwrap_or_default();
        let (resource, malformed_provider_id) = resource_for_node(&name, &provider_id);
        NodeInfo {
            name,
            resource,
            malformed_provider_id,
        }
    }
}

/// What MIC keeps of an AzureAssignedIdentity (AAI): what the plan compares,
/// what the status writes, the deletion and the ledger read, and the
/// embedded identity and binding (for Events). The embedded objects are
/// shared with the index's own identity and binding when they are the same
/// (at 10 pods per identity, one copy instead of ten). No write sends it:
/// status, annotations and finalizers are patches; creates and updates are
/// built by the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignedInfo {
    /// Name, namespace, uid, resourceVersion, deletionTimestamp, finalizers
    /// and annotations; nothing else is kept.
    pub metadata: ObjectMeta,
    pub spec: AssignedSpec,
    pub status: Option<AzureAssignedIdentityStatus>,
}

/// The spec of an [`AssignedInfo`]: an AAI's, with the embedded objects shared.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignedSpec {
    /// `spec.azureIdentityRef`.
    pub identity: Option<Arc<AzureIdentity>>,
    /// `spec.azureBindingRef`.
    pub binding: Option<Arc<AzureIdentityBinding>>,
    pub pod: String,
    pub pod_namespace: String,
    pub node_name: String,
    pub replicas: Option<i32>,
}

/// `embedded` as an `Arc`: the index's object of the same namespace and name
/// when it is equal, else a copy of its own.
fn share<K>(indexed: &BTreeMap<Key, Arc<K>>, embedded: &K) -> Arc<K>
where
    K: Resource + Clone + PartialEq,
{
    match indexed.get(&key_of(embedded)) {
        Some(same) if **same == *embedded => Arc::clone(same),
        _ => Arc::new(embedded.clone()),
    }
}

impl AssignedInfo {
    /// What MIC keeps of `aai`, sharing the embedded objects with `index`.
    pub fn new(aai: &AzureAssignedIdentity, index: &Index) -> Self {
        let m = &aai.metadata;
        AssignedInfo {
            metadata: ObjectMeta {
                name: m.name.clone(),
                namespace: m.namespace.clone(),
                uid: m.uid.clone(),
                resource_version: m.resource_version.clone(),
                deletion_timestamp: m.deletion_timestamp.clone(),
                finalizers: m.finalizers.clone(),
                annotations: m.annotations.clone(),
                ..ObjectMeta::default()
            },
            spec: AssignedSpec {
                identity: aai
                    .spec
                    .azure_identity_ref
                    .as_deref()
                    .map(|i| share(&index.identities, i)),
                binding: aai
                    .spec
                    .azure_binding_ref
                    .as_deref()
                    .map(|b| share(&index.bindings, b)),
                pod: aai.spec.pod.clone(),
                pod_namespace: aai.spec.pod_namespace.clone(),
                node_name: aai.spec.node_name.clone(),
                replicas: aai.spec.replicas,
            },
            status: aai.status.clone(),
        }
    }

    /// As [`AzureAssignedIdentity::state`].
    pub fn state(&self) -> Option<AssignedIdentityState> {
        AssignedIdentityState::parse(self.status.as_ref().map_or("", |s| s.status.as_str()))
    }
}

/// The AAI's kind, so that [`ResourceExt`] and Event references work as on the AAI.
impl Resource for AssignedInfo {
    type DynamicType = ();
    type Scope = <AzureAssignedIdentity as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        AzureAssignedIdentity::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        AzureAssignedIdentity::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        AzureAssignedIdentity::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        AzureAssignedIdentity::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The in-memory view. Objects are shared by `Arc`: a clone of the index
/// (the copy a cycle plans on while the watches go on) copies the maps'
/// keys and pointers, never an object.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub pods: BTreeMap<Key, Arc<PodInfo>>,
    pub nodes: BTreeMap<String, Arc<NodeInfo>>,
    pub identities: BTreeMap<Key, Arc<AzureIdentity>>,
    pub bindings: BTreeMap<Key, Arc<AzureIdentityBinding>>,
    pub assigned: BTreeMap<Key, Arc<AssignedInfo>>,
    /// Identity policy: namespace → its `allowed-identities` annotation.
    /// Only namespaces carrying it are kept (watched only when the policy is on).
    pub namespaces: BTreeMap<String, String>,
}

/// Whether an apply changed anything MIC decides on; unchanged resyncs and
/// status-only pod updates cost no cycle (upstream ran a full cycle for each
/// such event: docs/upstream-behaviour.md#h9-sync-storms).
pub type Changed = bool;

impl Index {
    pub fn apply_pod(&mut self, pod: &Pod) -> Changed {
        let info = PodInfo::from_pod(pod);
        let key = (info.namespace.clone(), info.name.clone());
        if info.binding_label.is_empty() {
            return self.pods.remove(&key).is_some();
        }
        if self.pods.get(&key).is_some_and(|old| **old == info) {
            return false;
        }
        self.pods.insert(key, Arc::new(info));
        true
    }

    pub fn delete_pod(&mut self, pod: &Pod) -> Changed {
        self.pods.remove(&key_of(pod)).is_some()
    }

    pub fn apply_node(&mut self, node: &Node) -> Changed {
        let info = NodeInfo::from_node(node);
        if self.nodes.get(&info.name).is_some_and(|old| **old == info) {
            return false;
        }
        self.nodes.insert(info.name.clone(), Arc::new(info));
        true
    }

    pub fn delete_node(&mut self, node: &Node) -> Changed {
        self.nodes.remove(&node.name_any()).is_some()
    }

    pub fn apply_identity(&mut self, obj: &AzureIdentity) -> Changed {
        let old = self.identities.insert(key_of(obj), Arc::new(obj.clone()));
        // Metadata-only edits (labels, resourceVersion) change nothing MIC
        // decides on (docs/upstream-behaviour.md#h5-metadata-edits-cause-token-gaps);
        // the annotation does (namespaced).
        old.is_none_or(|o| o.spec != obj.spec || o.annotations() != obj.annotations())
    }

    pub fn delete_identity(&mut self, key: &Key) -> Changed {
        self.identities.remove(key).is_some()
    }

    pub fn apply_binding(&mut self, obj: &AzureIdentityBinding) -> Changed {
        let old = self.bindings.insert(key_of(obj), Arc::new(obj.clone()));
        old.is_none_or(|o| o.spec != obj.spec)
    }

    pub fn delete_binding(&mut self, key: &Key) -> Changed {
        self.bindings.remove(key).is_some()
    }

    pub fn apply_assigned(&mut self, obj: &AzureAssignedIdentity) -> Changed {
        let new = Arc::new(AssignedInfo::new(obj, self));
        let old = self.assigned.insert(key_of(obj), Arc::clone(&new));
        old.is_none_or(|o| {
            o.spec != new.spec
                || o.status != new.status
                || o.metadata.deletion_timestamp != new.metadata.deletion_timestamp
                || o.metadata.finalizers != new.metadata.finalizers
        })
    }

    pub fn delete_assigned(&mut self, key: &Key) -> Changed {
        self.assigned.remove(key).is_some()
    }

    /// Keeps only the namespace's `allowed-identities` annotation.
    pub fn apply_namespace(&mut self, ns: &Namespace) -> Changed {
        let name = ns.name_any();
        match ns.annotations().get(ANNOTATION_ALLOWED_IDENTITIES) {
            Some(v) => self.namespaces.insert(name, v.clone()).as_ref() != Some(v),
            None => self.namespaces.remove(&name).is_some(),
        }
    }

    pub fn delete_namespace(&mut self, name: &str) -> Changed {
        self.namespaces.remove(name).is_some()
    }
}

/// Key of a namespaced object.
pub fn key<K: ResourceExt>(obj: &K) -> Key {
    key_of(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::mk_binding;
    use aadpodid_api::AzureIdentitySpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn identity(client_id: &str) -> AzureIdentity {
        let mut i = AzureIdentity::new(
            "id",
            AzureIdentitySpec {
                client_id: client_id.into(),
                ..Default::default()
            },
        );
        i.metadata.namespace = Some("ns".into());
        i.metadata.uid = Some("uid-i".into());
        i
    }

    /// An AAI as the apiserver returns it: every metadata field MIC does not
    /// keep is set too.
    fn aai(identity: &AzureIdentity, binding: &AzureIdentityBinding) -> AzureAssignedIdentity {
        let mut a = AzureAssignedIdentity::for_pod(identity, binding, "web", "ns", "n1");
        let m = &mut a.metadata;
        m.namespace = Some("default".into());
        m.uid = Some("uid-a".into());
        m.resource_version = Some("7".into());
        m.generation = Some(1);
        m.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        m.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        m.labels = Some([("nodename".to_string(), "n1".to_string())].into());
        m.annotations = Some([("a".to_string(), "b".to_string())].into());
        m.finalizers = Some(vec!["f".into()]);
        a.status = Some(AzureAssignedIdentityStatus {
            status: "Assigned".into(),
            available_replicas: 1,
        });
        a
    }

    #[test]
    fn an_assigned_identity_keeps_what_mic_reads_and_shares_the_embedded_objects() {
        let mut ix = Index::default();
        let live = identity("client");
        let binding = mk_binding("ns", "b", "id", "sel");
        ix.apply_identity(&live);
        ix.apply_binding(&binding);
        let a = aai(&live, &binding);
        let kept = AssignedInfo::new(&a, &ix);
        let m = &kept.metadata;
        assert_eq!(
            *m,
            ObjectMeta {
                name: a.metadata.name.clone(),
                namespace: Some("default".into()),
                uid: Some("uid-a".into()),
                resource_version: Some("7".into()),
                deletion_timestamp: a.metadata.deletion_timestamp.clone(),
                finalizers: Some(vec!["f".into()]),
                annotations: a.metadata.annotations.clone(),
                ..ObjectMeta::default()
            }
        );
        assert_eq!(kept.status, a.status);
        assert_eq!(kept.state(), a.state());
        assert_eq!(
            (
                &*kept.spec.pod,
                &*kept.spec.pod_namespace,
                &*kept.spec.node_name
            ),
            ("web", "ns", "n1")
        );
        // Events regard it as they would the AAI.
        assert_eq!(kept.object_ref(&()), a.object_ref(&()));
        // Equal embedded objects are the index's own.
        assert!(Arc::ptr_eq(
            kept.spec.identity.as_ref().unwrap(),
            &ix.identities[&("ns".into(), "id".into())]
        ));
        assert!(Arc::ptr_eq(
            kept.spec.binding.as_ref().unwrap(),
            &ix.bindings[&("ns".into(), "b".into())]
        ));
        // An embedded identity that differs from the live one stays as embedded.
        let old = aai(&identity("old-client"), &binding);
        let kept = AssignedInfo::new(&old, &ix);
        assert_eq!(
            kept.spec.identity.as_deref(),
            old.spec.azure_identity_ref.as_deref()
        );
        assert_eq!(kept.spec.identity.unwrap().spec.client_id, "old-client");
        // No embedded objects: none kept.
        let mut bare = a.clone();
        bare.spec.azure_identity_ref = None;
        bare.spec.azure_binding_ref = None;
        let kept = AssignedInfo::new(&bare, &ix);
        assert!(kept.spec.identity.is_none() && kept.spec.binding.is_none());
    }

    #[test]
    fn an_assigned_identity_changes_the_index_only_where_mic_decides() {
        let mut ix = Index::default();
        let binding = mk_binding("ns", "b", "id", "sel");
        let a = aai(&identity("client"), &binding);
        assert!(ix.apply_assigned(&a));
        let edit = |f: &dyn Fn(&mut AzureAssignedIdentity)| {
            let mut e = a.clone();
            f(&mut e);
            e
        };
        let cases: Vec<(&str, AzureAssignedIdentity, bool)> = vec![
            ("the same", a.clone(), false),
            (
                "another resourceVersion",
                edit(&|e| e.metadata.resource_version = Some("8".into())),
                false,
            ),
            ("another label", edit(&|e| e.metadata.labels = None), false),
            (
                "another status",
                edit(&|e| e.status.as_mut().unwrap().status = "Created".into()),
                true,
            ),
            (
                "no deletion",
                edit(&|e| e.metadata.deletion_timestamp = None),
                true,
            ),
            (
                "no finalizers",
                edit(&|e| e.metadata.finalizers = None),
                true,
            ),
            (
                "another node",
                edit(&|e| e.spec.node_name = "n2".into()),
                true,
            ),
            (
                "another embedded identity",
                edit(&|e| e.spec.azure_identity_ref = Some(Box::new(identity("other")))),
                true,
            ),
        ];
        for (case, changed, want) in cases {
            let mut ix = ix.clone();
            assert_eq!(ix.apply_assigned(&changed), want, "{case}");
        }
    }
}

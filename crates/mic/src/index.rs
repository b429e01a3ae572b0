//! The cluster as MIC sees it: plain maps that watches update with
//! `apply`/`delete`/`reset`, and that [`crate::plan::plan`] reads. No I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use aadpodid_api::policy::ANNOTATION_ALLOWED_IDENTITIES;
use aadpodid_api::{
    ANNOTATION_ASSIGNMENT_ERROR, ANNOTATION_TOKEN_SOURCE, AssignedIdentityState,
    AzureAssignedIdentity, AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding,
    POD_LABEL_BINDING,
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
    /// and annotations (in the index: only those MIC reads,
    /// [`KEPT_ANNOTATIONS`]); nothing else is kept.
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

/// The AAI annotations MIC reads: the refusal it wrote and the token source
/// it recorded. No other is kept: every AAI MIC creates carries the CRD's
/// `api-approved.kubernetes.io` annotation (kube's derived `new` puts the
/// CRD's annotations on every object it makes), and a map of one entry is
/// about 600 bytes per AAI (6 MB at 10,000 AAIs).
pub const KEPT_ANNOTATIONS: [&str; 2] = [ANNOTATION_ASSIGNMENT_ERROR, ANNOTATION_TOKEN_SOURCE];

/// Of `annotations`, those in [`KEPT_ANNOTATIONS`]; `None` when there are none.
fn kept_annotations(
    annotations: Option<&BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    let kept: BTreeMap<String, String> = annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| KEPT_ANNOTATIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!kept.is_empty()).then_some(kept)
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
        Self::with_annotations(aai, index, aai.metadata.annotations.clone())
    }

    /// As the index keeps `aai`: [`AssignedInfo::new`] with only the
    /// annotations MIC reads.
    pub fn indexed(aai: &AzureAssignedIdentity, index: &Index) -> Self {
        Self::with_annotations(
            aai,
            index,
            kept_annotations(aai.metadata.annotations.as_ref()),
        )
    }

    fn with_annotations(
        aai: &AzureAssignedIdentity,
        index: &Index,
        annotations: Option<BTreeMap<String, String>>,
    ) -> Self {
        let m = &aai.metadata;
        AssignedInfo {
            metadata: ObjectMeta {
                name: m.name.clone(),
                namespace: m.namespace.clone(),
                uid: m.uid.clone(),
                resource_version: m.resource_version.clone(),
                deletion_timestamp: m.deletion_timestamp.clone(),
                finalizers: m.finalizers.clone(),
                annotations,
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
    /// MIC's own AAI writes the index holds and the watch has not delivered yet.
    pub own_writes: OwnWrites,
}

/// MIC's own writes of AzureAssignedIdentities that went into the index as
/// soon as the apiserver answered, and that the watch has not delivered
/// yet: key → their resourceVersions, in the order written (MIC writes one
/// AAI one write after another). A watch delivers each object's versions in
/// order, so while an AAI has such writes, any version the watch delivers
/// that is not one of them is older than what the index holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnWrites(BTreeMap<Key, Vec<String>>);

/// What to do with an AAI the watch delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Into the index, as any watch event.
    Apply,
    /// Older than MIC's own write the index holds: nothing to do.
    Skip,
}

/// What one of MIC's AAI writes replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaced<'a> {
    /// Nothing: the write created the AAI.
    Nothing,
    /// The AAI at this resourceVersion: the one MIC's write was made from
    /// (`None`: not known).
    Version(Option<&'a str>),
}

impl OwnWrites {
    /// The watch delivers version `rv` of `key`: applied unless MIC's own
    /// newer write is in the index. The echo of MIC's last write is applied
    /// (it equals what the index holds, so it changes nothing).
    pub fn delivered(&mut self, key: &Key, rv: Option<&str>) -> Delivered {
        let Some(written) = self.0.get_mut(key) else {
            return Delivered::Apply;
        };
        let Some(at) = rv.and_then(|rv| written.iter().position(|w| w == rv)) else {
            return Delivered::Skip;
        };
        written.drain(..=at);
        if !written.is_empty() {
            return Delivered::Skip;
        }
        self.0.remove(key);
        Delivered::Apply
    }

    /// MIC's write of `key`, which replaced `replaced`, was answered with
    /// version `rv`; the index holds `indexed` (its resourceVersion, if it
    /// holds the AAI). Whether the answer goes into the index now: only when
    /// the index still holds what the write replaced (nothing, for a
    /// create), so that the watch has delivered neither this write nor
    /// anything after it. resourceVersions are opaque: they are only
    /// compared for equality. Otherwise the watch brings the write, as any
    /// change. A write that changed nothing (answered with the version it
    /// replaced) has no echo to wait for and changes nothing.
    pub fn wrote(
        &mut self,
        key: &Key,
        rv: Option<&str>,
        replaced: Replaced<'_>,
        indexed: Option<&str>,
    ) -> bool {
        let Some(rv) = rv else { return false };
        let newer = match replaced {
            // Not in the index: the watch has not delivered the create yet.
            Replaced::Nothing => indexed.is_none(),
            // The index holds what the write replaced: nothing came after
            // it. An AAI no longer in the index was deleted meanwhile.
            Replaced::Version(base) => base.is_some_and(|b| b != rv) && indexed == base,
        };
        self.record(key, rv, newer)
    }

    /// Remembers `rv` of `key` until its echo when `newer`; returns `newer`.
    fn record(&mut self, key: &Key, rv: &str, newer: bool) -> bool {
        if newer {
            self.0.entry(key.clone()).or_default().push(rv.to_string());
        }
        newer
    }

    /// The watch deleted `key`, or listed everything again.
    pub fn forget(&mut self, key: &Key) {
        self.0.remove(key);
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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
        let new = Arc::new(AssignedInfo::indexed(obj, self));
        let old = self.assigned.insert(key_of(obj), Arc::clone(&new));
        old.is_none_or(|o| !same_decisions(&o, &new))
    }

    pub fn delete_assigned(&mut self, key: &Key) -> Changed {
        self.own_writes.forget(key);
        self.assigned.remove(key).is_some()
    }

    /// An AAI as the watch delivers it (see [`OwnWrites`]).
    pub fn deliver_assigned(&mut self, obj: &AzureAssignedIdentity) -> Changed {
        let rv = obj.metadata.resource_version.as_deref();
        match self.own_writes.delivered(&key_of(obj), rv) {
            Delivered::Apply => self.apply_assigned(obj),
            Delivered::Skip => false,
        }
    }

    /// MIC's own write of an AAI, which replaced `replaced`, as the
    /// apiserver answered it, kept as `kept`: into the index unless the
    /// watch brought it, or something after it, already
    /// ([`OwnWrites::wrote`]).
    pub fn own_write(&mut self, kept: AssignedInfo, replaced: Replaced<'_>) -> Changed {
        self.keep_own(kept, |own, key, rv, indexed| {
            own.wrote(key, rv, replaced, indexed)
        })
    }

    /// Puts `kept` into the index when `newer` (given the own writes, its
    /// key, its version and the indexed version) says so.
    fn keep_own(
        &mut self,
        mut kept: AssignedInfo,
        newer: impl FnOnce(&mut OwnWrites, &Key, Option<&str>, Option<&str>) -> bool,
    ) -> Changed {
        let key = key_of(&kept);
        let indexed = self.assigned.get(&key);
        let indexed_rv = indexed.and_then(|a| a.metadata.resource_version.as_deref());
        let rv = kept.metadata.resource_version.as_deref();
        if !newer(&mut self.own_writes, &key, rv, indexed_rv) {
            return false;
        }
        kept.metadata.annotations = kept_annotations(kept.metadata.annotations.as_ref());
        let changed = indexed.is_none_or(|o| !same_decisions(o, &kept));
        self.assigned.insert(key, Arc::new(kept));
        changed
    }

    /// Every AAI again, from a complete list.
    pub fn clear_assigned(&mut self) {
        self.own_writes.clear();
        self.assigned.clear();
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

/// Whether two versions of an AAI are the same to what MIC decides on.
fn same_decisions(a: &AssignedInfo, b: &AssignedInfo) -> bool {
    a.spec == b.spec
        && a.status == b.status
        && a.metadata.deletion_timestamp == b.metadata.deletion_timestamp
        && a.metadata.finalizers == b.metadata.finalizers
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

    fn annotations(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The annotations of [`aai`] that MIC reads.
    fn read_by_mic() -> Option<BTreeMap<String, String>> {
        annotations(&[
            (ANNOTATION_ASSIGNMENT_ERROR, "refused"),
            (ANNOTATION_TOKEN_SOURCE, "federated"),
        ])
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
        m.annotations = annotations(&[
            ("api-approved.kubernetes.io", "unapproved"),
            (ANNOTATION_ASSIGNMENT_ERROR, "refused"),
            (ANNOTATION_TOKEN_SOURCE, "federated"),
            ("a", "b"),
        ]);
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
        // The index keeps only the annotations MIC reads.
        assert_eq!(
            AssignedInfo::indexed(&a, &ix).metadata,
            ObjectMeta {
                annotations: read_by_mic(),
                ..m.clone()
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
        bare.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        let kept = AssignedInfo::new(&bare, &ix);
        assert!(kept.spec.identity.is_none() && kept.spec.binding.is_none());
        let kept = AssignedInfo::indexed(&bare, &ix);
        assert_eq!(kept.metadata.annotations, None, "none MIC reads: no map");
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
    /// Runs one row of steps, each a word: `c<rv>/<indexed rv>` MIC created
    /// the AAI while the index held that version (`_`: none),
    /// `w<rv>/<replaced rv>/<indexed rv>` MIC wrote it otherwise, made from
    /// the version it replaced, then `+` when it goes into the index, `-`
    /// when not; `e<rv>` the watch delivers a version (`_`: none), then `+`
    /// applied or `-` skipped; `d` the watch deletes the AAI. Versions are
    /// any words: they are only compared for equality.
    fn own_writes_row(case: &str, steps: &str) {
        let k: Key = ("ns".into(), "a".into());
        let rv = |v: &str| (v != "_").then(|| v.to_string());
        let mut own = OwnWrites::default();
        for step in steps.split(' ') {
            let (body, want) = step.split_at(step.len() - 1);
            let want = want == "+";
            match body.split_at(1) {
                ("c", versions) => {
                    let (v, indexed) = versions.split_once('/').expect("c<rv>/<rv>");
                    let (v, indexed) = (rv(v), rv(indexed));
                    let got = own.wrote(&k, v.as_deref(), Replaced::Nothing, indexed.as_deref());
                    assert_eq!(got, want, "{case}: {step}");
                }
                ("w", versions) => {
                    let v: Vec<Option<String>> = versions.split('/').map(rv).collect();
                    let [v, base, indexed] = &v[..] else {
                        panic!("{case}: {step}: w<rv>/<rv>/<rv>")
                    };
                    let replaced = Replaced::Version(base.as_deref());
                    let got = own.wrote(&k, v.as_deref(), replaced, indexed.as_deref());
                    assert_eq!(got, want, "{case}: {step}");
                }
                ("e", v) => {
                    let got = own.delivered(&k, rv(v).as_deref()) == Delivered::Apply;
                    assert_eq!(got, want, "{case}: {step}");
                }
                _ => own.forget(&k),
            }
        }
        assert!(own.is_empty(), "{case}: every own write was echoed");
    }

    #[test]
    fn own_writes_decide_which_watch_events_are_echoes() {
        #[rustfmt::skip]
        let rows = [
            ("no own write: every event applies", "e5+ e_+"),
            ("a create, then its echo", "c5/_+ e5+ e6+"),
            ("a create the watch delivered first is not applied", "c5/5- e6+"),
            ("create and status write, the create's echo first", "c5/_+ w6/5/5+ e5- e6+"),
            ("another's write between MIC's two is older than the second", "c5/_+ w7/5/5+ e5- e6- e7+"),
            ("an event from before the write waits for its echo", "w9/4/4+ e8- e9+"),
            ("the watch was first: the answer is not applied", "w5/4/5- e6+"),
            ("the watch is past the answer", "w5/4/6- e7+"),
            ("another's write came first and was delivered: left to the watch", "w6/4/5- e6+"),
            ("versions are opaque: equality only", "cb/_+ wa/b/b+ eb- ea+ ez+"),
            ("a lower-looking version is news too", "w10/9/9+ e10+ e2+"),
            ("a write that changed nothing has no echo to wait for", "w5/5/5- e6+"),
            ("no version: left to the watch", "w_/4/4- e5+"),
            ("what the write replaced is not known: left to the watch", "w5/_/4- e5+"),
            ("a deletion forgets the writes", "c5/_+ d. e3+"),
            ("a write to an AAI deleted meanwhile is left out", "w5/4/_- e_+"),
        ];
        for (case, steps) in rows {
            own_writes_row(case, steps);
        }
    }

    #[test]
    fn an_own_write_is_in_the_index_at_once_and_its_echo_changes_nothing() {
        let binding = mk_binding("ns", "b", "id", "sel");
        let mut created = aai(&identity("client"), &binding);
        created.metadata.deletion_timestamp = None;
        created.status.as_mut().unwrap().status = "Created".into();
        let mut assigned = created.clone();
        assigned.metadata.resource_version = Some("8".into());
        assigned.status.as_mut().unwrap().status = "Assigned".into();
        let mut ix = Index::default();
        // MIC's create and status write are answered before the watch delivers either.
        assert!(ix.own_write(AssignedInfo::new(&created, &ix), Replaced::Nothing));
        assert!(ix.own_write(
            AssignedInfo::new(&assigned, &ix),
            Replaced::Version(Some("7"))
        ));
        assert!(
            !ix.deliver_assigned(&created),
            "the create's echo: older than the index"
        );
        assert_eq!(
            ix.assigned[&key(&created)].state(),
            Some(AssignedIdentityState::Assigned)
        );
        assert!(!ix.deliver_assigned(&assigned), "the status write's echo");
        assert!(ix.own_writes.is_empty());
        // Another's change after them is applied as always.
        let mut edited = assigned.clone();
        edited.metadata.resource_version = Some("9".into());
        edited.spec.node_name = "n2".into();
        assert!(ix.deliver_assigned(&edited));
        // Both ways in keep only the annotations MIC reads.
        let reads = read_by_mic();
        assert_eq!(ix.assigned[&key(&edited)].metadata.annotations, reads);
        // A list again forgets every own write.
        assert!(ix.own_write(
            AssignedInfo::new(
                &{
                    let mut e = edited.clone();
                    e.metadata.resource_version = Some("10".into());
                    e.status.as_mut().unwrap().status = "Unassigned".into();
                    e
                },
                &ix
            ),
            Replaced::Version(Some("9"))
        ));
        assert_eq!(ix.assigned[&key(&edited)].metadata.annotations, reads);
        ix.clear_assigned();
        assert!(ix.own_writes.is_empty() && ix.assigned.is_empty());
    }
}
